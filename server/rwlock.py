"""A readers-writer lock: concurrent searches, exclusive index writes.

FAISS indexes are safe for concurrent reads but not for a read during a
write, so each collection guards its index with one of these. Writers are
preferred (a waiting writer blocks new readers) so a stream of searches
cannot starve an import. A writer that takes the lock again and again (an
add applied to HNSW piece by piece) lets the readers waiting at that moment
in first: else it took the lock back before they woke, and they waited for
every piece.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ReadWriteLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._readers_admitted = 0  # ever: a writer letting readers in counts them through
        self._yielding = 0  # writers waiting for readers to be admitted first

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._readers_waiting += 1
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers_waiting -= 1
            self._readers += 1
            self._readers_admitted += 1
            if self._yielding:
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self, *, after_waiting_readers: bool = False) -> Iterator[None]:
        """Exclusive. ``after_waiting_readers``: the readers already waiting go first (a writer
        taking the lock once per piece of one long change)."""
        with self._cond:
            if after_waiting_readers and self._readers_waiting:
                turn = self._readers_admitted + self._readers_waiting
                self._yielding += 1
                # Only a writer keeps them out; then this one queues behind it like any writer.
                while self._readers_admitted < turn and not (self._writer or self._writers_waiting):
                    self._cond.wait()
                self._yielding -= 1
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
