"""A process-wide budget of decoded pixels, so that memory stays bounded however many calls decode.

Each call's own decoding is already capped (``max_batch_pixels``); this caps all of
them together. A call takes what it will decode before decoding and gives it back
once its images are extracted; a call that would overdraw waits for others to finish.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class PixelBudget:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._changed = threading.Condition()

    @property
    def free(self) -> int:
        return self._free

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` (at most the whole budget) for the duration of the block."""
        pixels = min(max(pixels, 0), self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self._free >= pixels)
            self._free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self._free += pixels
                self._changed.notify_all()
