"""Waiting for another thread to reach a state, without sleeping longer than it takes."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(condition: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``condition`` every millisecond until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return bool(condition())
