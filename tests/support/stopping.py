"""Stopping a server while a call runs, as SIGTERM does, and timing the stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack


def stop_during(server: ExitStack, call: Callable[[], object], after_s: float = 1.5) -> tuple[float, object]:
    """Run ``call`` on a thread; ``after_s`` into it, stop the server (``server.close()``: the drain
    and stop of SIGTERM). Returns the seconds the stop took and what the call returned or raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # the caller asserts on what the call met
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(after_s)
    started = time.monotonic()
    server.close()
    stopped_after = time.monotonic() - started
    thread.join(30)
    assert len(outcome) == 1, "the call did not end within 30 s of the stop"
    return stopped_after, outcome[0]
