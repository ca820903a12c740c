"""Micro-batching of concurrent work: many callers, one library call.

FAISS answers 64 queries at once several times faster per query than one by
one (matrix-matrix instead of matrix-vector products), and onnxruntime runs a
batch of images faster per image than single images. Callers arrive one by one
on different threads, so a ``Batcher`` gathers them:

- the first caller to find no batch running becomes the *leader* and runs a
  batch at once with whatever is queued, its own item included: an idle server
  adds no wait at all;
- callers arriving while a batch runs queue up and are served together by the
  next batch, whose leader is the first of them (promoted when the running
  batch ends), so no caller waits for more than the batch before its own;
- a promoted leader (one that arrived while the server was busy) first waits
  ``max_wait_s`` for company. Callers in a closed loop otherwise split into two
  groups that alternate, each batch half the size it could be: the callers
  served by one batch come back a round trip later, just after the next batch
  started without them. An idle server never waits.

Leader/follower keeps the work on the callers' own threads: no extra thread,
no queue to drain at shutdown, and an exception in a batch reaches exactly the
callers whose items were in it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)
class _Slot(Generic[Item, Result]):
    item: Item
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    result: Result | None = None
    error: BaseException | None = None


class Batcher(Generic[Item, Result]):
    """Run ``run(items) -> results`` (one result per item, in order) over concurrent callers' items."""

    def __init__(
        self, run: Callable[[Sequence[Item]], Sequence[Result]], max_batch: int = 256, max_wait_s: float = 0.0
    ) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._queue: list[_Slot[Item, Result]] = []
        self._busy = False
        self.batches = 0  # statistics, for tests and benchmarks
        self.items = 0

    def submit(self, item: Item) -> Result:
        """The result for ``item``, computed in a batch with whatever else is pending."""
        return self.submit_many([item])[0]

    def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Results for several items (one caller's batch), run together with everyone else's."""
        slots: list[_Slot[Item, Result]] = [_Slot(item) for item in items]
        if not slots:
            return []
        with self._lock:
            self._queue.extend(slots)
            idle = not self._busy
            if idle:
                self._busy = slots[0].lead = True
        for slot in slots:
            if not slot.lead:
                slot.done.wait()
            if slot.lead:  # the first caller, or promoted by the previous leader
                self._lead(promoted=not idle or slot is not slots[0])
        for slot in slots:
            if slot.error is not None:
                raise slot.error
        return [slot.result for slot in slots]  # type: ignore[misc]

    def _lead(self, promoted: bool) -> None:
        if promoted and self.max_wait_s:
            time.sleep(self.max_wait_s)  # the server is busy: let the callers of the last batch rejoin
        with self._lock:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        try:
            results = self.run([slot.item for slot in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            for slot, result in zip(batch, results, strict=True):
                slot.result = result
        except BaseException as exc:  # every caller of the batch gets the error
            for slot in batch:
                slot.error = exc
        self.batches += 1
        self.items += len(batch)
        with self._lock:
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._busy = False
            else:
                successor.lead = True
        for slot in batch:
            slot.lead = False
            slot.done.set()
        if successor is not None:
            successor.done.set()
