"""A one-line progress display for long CLI runs: done/total, rate and ETA.

On a terminal the line is redrawn in place; into a pipe or a log file it is
written as whole lines, at most one per ``interval``, so logs stay readable.
No dependencies: the CLI that uses it must run with the client alone.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

_BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``--:--`` while unknown."""
    if seconds != seconds or seconds == float("inf"):  # NaN or infinite: no rate yet
        return "--:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_progress(done: int, total: int, elapsed: float, unit: str = "images") -> str:
    """``[#####.......]  50/200  25%  12.5 images/s  ETA 0:12``."""
    fraction = done / total if total else 1.0
    filled = round(fraction * _BAR_WIDTH)
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    width = len(str(total))
    return (
        f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {done:>{width}}/{total} {fraction:4.0%}  "
        f"{rate:.1f} {unit}/s  ETA {format_duration(eta)}"
    )


class ProgressLine:
    """Call it with ``(done, total)`` (the client's ``progress`` callback); ``close()`` when finished.

    Safe to call from another thread (gRPC calls progress callbacks from its sending thread).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        unit: str = "images",
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        label: str = "",
    ) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._interval = interval if interval is not None else (0.1 if self._tty else 2.0)
        self._unit = unit
        self._label = f"{label}  " if label else ""
        self._clock = clock
        self._start = clock()
        self._last_drawn: float | None = None
        self._width = 0
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            now = self._clock()
            due = self._last_drawn is None or now - self._last_drawn >= self._interval
            if not (due or done >= total):
                return
            self._last_drawn = now
            self._draw(self._label + format_progress(done, total, now - self._start, self._unit))

    def _draw(self, line: str) -> None:
        if self._tty:  # redraw in place, blanking what a longer previous line left behind
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        """End the redrawn line, so what is printed next starts on its own line."""
        with self._lock:
            if self._tty and self._width:
                self._stream.write("\n")
                self._stream.flush()
                self._width = 0
