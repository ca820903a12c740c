"""What the commands that talk to a running server (`add`, `search`) share: where to connect, how to fail.

They use the client SDK only, so they work with the client install alone (no extras).
Exit codes are the same for all of them: 2 means the command could not do its job
(bad usage, server unreachable, unknown collection), and the message says why.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imagesearch.client import DeadlineExceeded, ImageSearchError, Unavailable
from imagesearch.client._base import check_target
from imagesearch.client._requests import DEFAULT_TARGET

TARGET_ENV = "IMAGESEARCH_TARGET"
EXIT_OK, EXIT_PARTIAL, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
EXIT_TERMINATED = 143  # and for SIGTERM


def add_server_arguments(parser: argparse.ArgumentParser, *, collection: bool = True) -> None:
    """``--target`` (default $IMAGESEARCH_TARGET, else the server's default address) and, unless
    the command makes its own collections, ``--collection``."""
    parser.add_argument(
        "--target",
        type=target_argument,
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"server address (default ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    if collection:
        parser.add_argument(
            "--collection", metavar="NAME", help="collection (default: the 'default' collection)"
        )


def target_argument(text: str) -> str:
    """An argparse type: a server address, as the client takes it (``check_target``). A bad
    ``$IMAGESEARCH_TARGET`` is named as such: the message named only ``--target``, which the
    user had not given (an outside test)."""
    try:
        return check_target(text)
    except ValueError as error:
        where = f" (from ${TARGET_ENV})" if text == os.environ.get(TARGET_ENV) else ""
        raise argparse.ArgumentTypeError(f"{str(error).removeprefix('target ')}{where}") from error


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (a timeout of 0 or less failed every call at once)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0 (a seed: TrainCollection refuses negative ones)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def path_argument(text: str) -> Path:
    """An argparse type: a path, never empty (``--data "$UNSET"`` would be ".", the current
    directory: an outside test saw a server make its data directory where it was started)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(text)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is (``sigterm_unwinds``): a KeyboardInterrupt, so that
    what cleans up after Ctrl-C cleans up after it too."""


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Make SIGTERM (what `timeout`, CI cancellation and systemd send) unwind the command like
    Ctrl-C, running its cleanup: an evaluation stopped so left its collections on the server (an
    outside test). The main thread only, where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM off while a cleanup runs, then deliver the first to come: a second
    signal a moment after the first (a double Ctrl-C, a CI runner signalling the process group)
    interrupted the cleanup the first had started (an outside test). The main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda number, frame: held.append(number)) for number in wanted}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if held:
        signal.raise_signal(held[0])


def unwritable(report: Path | None) -> str | None:
    """Why ``report`` cannot be written (its folder is missing), checked before the work it reports
    on: an evaluation ran for hours, and a search ran, before failing to write (outside tests)."""
    if report is not None and not report.resolve().parent.is_dir():
        return f"cannot write {report}: no directory {report.resolve().parent}"
    return None


def fail(message: str) -> int:
    """Print ``error: message`` on stderr; return the exit code for a command that could not run."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def server_error(error: ImageSearchError, target: str, *, reached: bool = False) -> int:
    """Report a failed call in terms a shell user can act on (naming the server it tried).
    ``reached``: the command had already been answered by that server, so an UNAVAILABLE means it
    went away (stopped, restarted, the network failed), not a wrong address (an outside test: an
    import cut off by a killed server was told to check --target)."""
    if isinstance(error, Unavailable) and reached:
        return fail(
            f"lost the imagesearch server at {target} ({error.message}): it stopped, or the network "
            "to it failed"
        )
    if isinstance(error, Unavailable):
        return fail(
            f"cannot reach an imagesearch server at {target} ({error.message}). Is it running? "
            f"Pass --target HOST:PORT or set {TARGET_ENV}."
        )
    if isinstance(error, DeadlineExceeded):
        return fail(f"the imagesearch server at {target} did not answer in time ({error.message})")
    if not error.sent:
        return fail(f"{error.code.name} (refused by this client, nothing sent to {target}): {error.message}")
    return fail(f"{error.code.name} from {target}: {error.message}")
