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
- callers in a closed loop would otherwise split into groups that alternate (a
  batch of 16, then one of 1 with the first caller back, then 15 ...): the
  callers served by one batch come back a round trip later, just after the next
  batch started without them. So a leader that comes right after a batch (while
  one ran, or within ``RECENT_WAITS`` x ``max_wait_s`` of its end) waits until as
  many items are queued as were seen around that batch (its own items plus those
  queued when it ended; a caller's several items count each), at most
  ``max_wait_s``. The wait ends as soon as they are all there, a single caller
  never waits (it is all the demand there is), and a server idle for longer
  never waits.

Leader/follower keeps the bookkeeping on the callers' own threads: no queue to
drain at shutdown. An exception reaches only the callers whose own items raise
it: a batch of several callers that fails is run again caller by caller (a
plugin that refuses one caller's image must not fail everyone who shared its
batch; found by an outside test), which costs a second run only when a batch
fails. A coroutine (``submit_many_async``) holds no thread while it
waits: a batch it leads is gathered and run on the ``runner``, and its event loop
hears of a whole batch's results by one wake-up, not one per caller. The batch itself may run on a ``runner``: the engine gives
FAISS searches one dedicated thread, because OpenMP keeps a team of helper
threads per calling thread, and a search from whichever of many threads is free
meets a cold or competing team (bench/bench_search_threads.py: one query over 32
vectors 0.178 ms from a pool of 64 threads against 0.036 from one thread; over
20,000 x 1280, 7.53 against 6.88 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

# How long after a batch (in max_wait_s) a new leader still expects that batch's callers back.
RECENT_WAITS = 2

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)
class _Slot(Generic[Item, Result]):
    """One item on its way: a thread waits on ``done``, a coroutine awaits ``future``."""

    item: Item
    caller: object  # the call the item came in (a failing batch is retried call by call)
    done: threading.Event | None = None
    future: asyncio.Future[None] | None = None
    lead: bool = False
    result: Result | None = None
    error: BaseException | None = None


def _wake(slots: Sequence[_Slot]) -> None:
    """On the slots' event loop: their batch ran (a caller that went away is left alone)."""
    for slot in slots:
        if slot.future is not None and not slot.future.done():
            slot.future.set_result(None)


def _results(slots: Sequence[_Slot[Item, Result]]) -> list[Result]:
    for slot in slots:
        if slot.error is not None:
            raise slot.error
    return [slot.result for slot in slots]  # type: ignore[misc]


class Batcher(Generic[Item, Result]):
    """Run ``run(items) -> results`` (one result per item, in order) over concurrent callers' items."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Sequence[Result]],
        max_batch: int = 256,
        max_wait_s: float = 0.0,
        runner: Executor | None = None,
    ) -> None:
        self.run = run
        self.runner = runner  # where batches run (None: on the leader's own thread)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a leader gathering callers waits on it
        self._awaited = 0  # queued items the gathering leader waits for (0: no leader waits)
        self._queue: list[_Slot[Item, Result]] = []
        self._busy = False
        self._demand = 1  # items seen around the last batch: in it, or queued when it ended
        self._last_end = float("-inf")
        self.batches = 0  # statistics, for tests and benchmarks
        self.items = 0

    def submit(self, item: Item) -> Result:
        """The result for ``item``, computed in a batch with whatever else is pending."""
        return self.submit_many([item])[0]

    def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """Results for several items (one caller's batch), run together with everyone else's."""
        caller = object()
        slots: list[_Slot[Item, Result]] = [_Slot(item, caller, done=threading.Event()) for item in items]
        if not slots:
            return []
        idle = self._enqueue(slots)
        for slot in slots:
            if not slot.lead:
                slot.done.wait()  # type: ignore[union-attr]
            if slot.lead:  # the first caller, or promoted by the previous leader
                self._lead(promoted=not idle or slot is not slots[0])
        return _results(slots)

    async def submit_many_async(self, items: Sequence[Item]) -> list[Result]:
        """``submit_many`` for a coroutine, which no thread waits for. A batch it leads is gathered
        and run on the ``runner`` (required)."""
        if self.runner is None:
            raise RuntimeError("submit_many_async needs a runner to lead batches on")
        loop = asyncio.get_running_loop()
        caller = object()
        slots: list[_Slot[Item, Result]] = [
            _Slot(item, caller, future=loop.create_future()) for item in items
        ]
        if not slots:
            return []
        if self._enqueue(slots):
            self._lead_on_runner(promoted=False)
        for slot in slots:
            await slot.future  # type: ignore[misc]
        return _results(slots)

    def _enqueue(self, slots: list[_Slot[Item, Result]]) -> bool:
        """Queue the slots; True when no batch was running, and so their first is to lead."""
        with self._lock:
            self._queue.extend(slots)
            idle = not self._busy
            if idle:
                self._busy = slots[0].lead = True
            elif self._awaited and len(self._queue) >= self._awaited:
                self._arrived.notify()  # only then: waking the leader for less costs a thread switch
        return idle

    def _lead_on_runner(self, promoted: bool) -> None:
        """Lead the next batch on the runner, for a coroutine caller (which has no thread to lead
        on). A runner that is shut down fails the queued callers instead of leaving them waiting."""
        try:
            self.runner.submit(self._lead, promoted, True)  # type: ignore[union-attr]
        except RuntimeError as exc:  # the runner is shut down
            with self._lock:
                queued, self._queue, self._busy = self._queue, [], False
            for slot in queued:
                slot.error = exc
            self._finish(queued)

    def _lead(self, promoted: bool, on_runner: bool = False) -> None:
        with self._lock:
            self._gather(promoted)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        try:
            self._run_into(batch, on_runner)
        except Exception as exc:  # run again call by call: the error reaches only the calls that cause it
            calls: dict[object, list[_Slot[Item, Result]]] = {}
            for slot in batch:
                calls.setdefault(slot.caller, []).append(slot)
            for slots in calls.values():
                try:
                    if len(calls) == 1:
                        raise exc
                    self._run_into(slots, on_runner)
                except BaseException as error:
                    for slot in slots:
                        slot.error = error
        except BaseException as exc:  # not an error of the items (an interrupt): every caller gets it
            for slot in batch:
                slot.error = exc
        self.batches += 1
        self.items += len(batch)
        with self._lock:
            self._demand = len(batch) + len(self._queue)
            self._last_end = time.monotonic()
            successor = self._queue[0] if self._queue else None
            if successor is None:
                self._busy = False
            else:
                successor.lead = True
        for slot in batch:
            slot.lead = False
        self._finish(batch)
        if successor is None:
            return
        if successor.done is not None:
            successor.done.set()  # a thread: it leads the next batch
        else:
            self._lead_on_runner(promoted=True)

    def _run_into(self, slots: Sequence[_Slot[Item, Result]], on_runner: bool) -> None:
        """Run the slots' items as one batch (on the runner, if there is one) and fill in their results."""
        items = [slot.item for slot in slots]
        results = (
            self.run(items)
            if self.runner is None or on_runner
            else self.runner.submit(self.run, items).result()
        )
        if len(results) != len(slots):
            raise RuntimeError(f"batch of {len(slots)} gave {len(results)} results")
        for slot, result in zip(slots, results, strict=True):
            slot.result = result

    @staticmethod
    def _finish(slots: Sequence[_Slot[Item, Result]]) -> None:
        """Tell the slots' callers their results are in: threads one by one, each event loop once."""
        loops: dict[asyncio.AbstractEventLoop, list[_Slot[Item, Result]]] = {}
        for slot in slots:
            if slot.done is not None:
                slot.done.set()
            elif slot.future is not None:
                loops.setdefault(slot.future.get_loop(), []).append(slot)
        for loop, waiting in loops.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_wake, waiting)

    def _gather(self, promoted: bool) -> None:
        """Under the lock: right after a batch, wait (at most max_wait_s) for as many items as were
        seen around it, so closed-loop callers stay in one batch instead of alternating halves."""
        if not self.max_wait_s:
            return
        now = time.monotonic()
        if not promoted and now - self._last_end > RECENT_WAITS * self.max_wait_s:
            return  # idle for a while: nobody is coming back
        target, deadline = min(self._demand, self.max_batch), now + self.max_wait_s
        while len(self._queue) < target and (remaining := deadline - time.monotonic()) > 0:
            self._awaited = target
            self._arrived.wait(remaining)
        self._awaited = 0
