"""Domain errors: what went wrong, in terms the servicer maps to gRPC status codes.

Domain code never imports grpc; it raises these. Each class carries its
``code``, the google.rpc.Code number of exactly one gRPC status, which the
servicer reports and per-item results (skip_invalid) carry. ``reason`` is a
stable machine-readable string (google.rpc.ErrorInfo.reason), ``field`` names
the offending request field (google.rpc.BadRequest) and ``metadata`` carries
the values behind the error, such as the limit that was hit (ErrorInfo.metadata).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

SHOWN_CHARS = 80
NOTHING_STORED = "nothing was stored"


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """A client's string as error messages quote it: repr'd and cut to ``limit`` characters.

    Echoing input whole lets a 1 MB id turn a NOT_FOUND into a status too large to send.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class ImageSearchError(Exception):
    """Base class of every error a client can cause or observe."""

    reason = "ERROR"
    code = 13  # INTERNAL unless a subclass says otherwise

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if reason is not None:
            self.reason = reason
        # google.rpc.ErrorInfo.metadata (AIP-193): the values a program needs, such as the limit.
        self.metadata = dict(metadata or {})
        # For back-pressure: when trying again makes sense (google.rpc.RetryInfo).
        self.retry_after_s = retry_after_s


class InvalidArgument(ImageSearchError):
    reason = "INVALID_ARGUMENT"
    code = 3


class NotFound(ImageSearchError):
    reason = "NOT_FOUND"
    code = 5


class AlreadyExists(ImageSearchError):
    reason = "ALREADY_EXISTS"
    code = 6


class FailedPrecondition(ImageSearchError):
    reason = "FAILED_PRECONDITION"
    code = 9


class ResourceExhausted(ImageSearchError):
    reason = "LIMIT_EXCEEDED"
    code = 8


class DiskFull(ResourceExhausted):
    """The file system of the data directory is full: the write was undone, the data is intact."""

    reason = "DISK_FULL"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused for lack of space: SQLite's SQLITE_FULL ("database or disk
    is full") or the OS's ENOSPC / EDQUOT (snapshots, new collections' files)."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_full_reported(outcome: str = NOTHING_STORED, *, logged: bool = True) -> Iterator[None]:
    """Raise DiskFull for a full disk met inside the block, the one mapping of it: the low-level
    error ("database or disk is full", errno 28) means nothing to a client, and an operator needs
    to hear which disk to free. ``outcome`` says what the failure left behind; ``logged=False``
    for a caller that logs the failure itself (a snapshot's was logged twice: an outside test)."""
    try:
        yield
    except (sqlite3.OperationalError, OSError) as exc:
        if not is_disk_full(exc):
            raise
        full = DiskFull(
            f"the disk holding the server's data directory is full, so {outcome}; free space on it, "
            "then retry",
            metadata={"cause": str(exc)},
        )
        if logged:  # the operator's to fix: said in the log, not only to clients
            log.error("%s (%s)", full.message, exc)
        raise full from exc


class DeadlineExceeded(ImageSearchError):
    reason = "DEADLINE_EXCEEDED"
    code = 4


class Aborted(ImageSearchError):
    """A concurrency conflict: the same request can succeed when sent again."""

    reason = "ABORTED"
    code = 10


class Unavailable(ImageSearchError):
    reason = "UNAVAILABLE"
    code = 14


class StoreDamaged(ImageSearchError):
    """A collection's SQLite file turned out corrupt while serving: DATA_LOSS, the status gRPC keeps
    for unrecoverable corruption, with what an operator can do (not INTERNAL: no bug of ours)."""

    reason = "STORE_DAMAGED"
    code = 15


def is_corruption(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite finding its file corrupt (SQLITE_CORRUPT, SQLITE_NOTADB)."""
    corrupt = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    return isinstance(exc, sqlite3.DatabaseError) and (
        getattr(exc, "sqlite_errorcode", None) in corrupt or "malformed" in str(exc)
    )


def store_damaged(exc: sqlite3.DatabaseError, collection: str = "") -> StoreDamaged:
    """The DATA_LOSS a corrupt store gives, naming the collection when known, and logged."""
    whose = f"collection {shown(collection)}'s store" if collection else "the collection's store"
    damaged = StoreDamaged(
        f"{whose} is damaged ({exc}), so the request failed; restore the collection from a backup, "
        "or delete it"
    )
    log.error("%s", damaged.message)  # the operator's to fix
    return damaged


@contextmanager
def store_damage_reported(collection: str) -> Iterator[None]:
    """Turn SQLite finding ``collection``'s file corrupt into StoreDamaged, an error of ours, so a
    batch, a stream or a query of a SearchBatch reports it as it reports any other."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise
        raise store_damaged(exc, collection) from exc


class Internal(ImageSearchError):
    """A bug or a broken invariant on the server side (never the client's fault)."""

    reason = "INTERNAL"
    code = 13


class DataDirLocked(RuntimeError):
    """Another process owns the data directory."""


@contextmanager
def plugin_failure(
    what: str, reason: str, passes: type[BaseException] | tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """A plugin's exception as INTERNAL naming the plugin object (the log keeps the traceback);
    only ``passes``, exceptions the plugin API gives a meaning (NotEnoughTrainingData), go
    through. Any exception: a KeyboardInterrupt or SystemExit raised by a plugin in a worker thread
    reached the event loop, which stopped, and every later call, health checks too, hung until a
    restart; a GeneratorExit left its call unanswered; one of the server's own error classes
    passed as the client's fault without the plugin's name (outside tests). Plugins run in worker
    threads, so a real Ctrl-C never arrives here: it interrupts the main thread. The guard never
    wraps a ``yield``, so the GeneratorExit it meets is the plugin's."""
    try:
        yield
    except passes:
        raise
    except BaseException as exc:
        log.error("%s failed", what, exc_info=exc)
        raise Internal(f"{what} failed: {type(exc).__name__}: {exc}", reason=reason) from exc
