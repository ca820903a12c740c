"""Domain errors: what went wrong, in terms the servicer maps to gRPC status codes.

Domain code never imports grpc; it raises these. Each class carries its
``code``, the google.rpc.Code number of exactly one gRPC status, which the
servicer reports and per-item results (skip_invalid) carry. ``reason`` is a
stable machine-readable string (google.rpc.ErrorInfo.reason), ``field`` names
the offending request field (google.rpc.BadRequest) and ``metadata`` carries
the values behind the error, such as the limit that was hit (ErrorInfo.metadata).
"""

from __future__ import annotations

SHOWN_CHARS = 80


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


class Internal(ImageSearchError):
    """A bug or a broken invariant on the server side (never the client's fault)."""

    reason = "INTERNAL"
    code = 13


class DataDirLocked(RuntimeError):
    """Another process owns the data directory."""
