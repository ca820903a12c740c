"""Work on a list of items from several threads, each taking the next item as it finishes one.

Fixed shares (halves, or one task per item in a shared FIFO pool) either leave a core idle when
one share finishes first, or make a small call wait behind every item a large call queued. Here a
call's items stay in the call's own queue; its few pullers take them in order, and each item's
result (or error) lands in its own Future, so the caller can consume them in order while later
ones are still being worked on. Used for a CNN batch (plugins/onnx_cnn.py) and for decoding an
AddImages batch ahead (engine.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import wait as futures_wait
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Pulling(Generic[Item, Result]):
    """One Future per item, filled by whichever threads call ``pull``."""

    def __init__(self, work: Callable[[Item], Result], items: Sequence[Item], *, stop_on_error: bool) -> None:
        self.work = work
        self.items = items
        self.futures: list[Future[Result]] = [Future() for _ in items]
        self.stop_on_error = stop_on_error  # a batch that fails whole stops taking items
        self._next = iter(range(len(items)))
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._helpers: list[Future[None]] = []

    def pull(self) -> None:
        """Work on the next item until none is left (or the job was stopped)."""
        while not self._stopped.is_set():
            with self._lock:
                position = next(self._next, None)
            if position is None:
                return
            future = self.futures[position]
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.work(self.items[position]))
            except BaseException as exc:  # the item's own error, raised where its result is read
                future.set_exception(exc)
                if self.stop_on_error:
                    self.stop()

    def start_helpers(self, pool: Executor, count: int) -> None:
        """``count`` pullers on ``pool`` (no more than there are items)."""
        self._helpers = [pool.submit(self.pull) for _ in range(min(count, len(self.items)))]

    def stop(self) -> None:
        """Take no more items; cancel the futures not started."""
        self._stopped.set()
        for future in self.futures:
            future.cancel()

    def finish(self) -> None:
        """Stop, then wait for the items being worked on: none outlives the call."""
        self.stop()
        running = [helper for helper in self._helpers if not helper.cancel()]
        futures_wait(running)


def map_pulling(
    work: Callable[[Item], Result], items: Sequence[Item], workers: int, pool: Executor
) -> list[Result]:
    """``[work(item) for item in items]`` on up to ``workers`` threads, the caller's among them
    (helpers from ``pool``); the first error in item order is raised, and stops the rest."""
    job = Pulling(work, items, stop_on_error=True)
    job.start_helpers(pool, workers - 1)
    try:
        job.pull()
    finally:
        job.finish()
    return [future.result() for future in job.futures if not future.cancelled()]
