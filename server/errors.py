"""Domain errors: what went wrong, in terms the servicer maps to gRPC status codes.

Domain code never imports grpc; it raises these, and the servicer turns each
class into exactly one status code (see servicer.STATUS_OF). ``reason`` is a
stable machine-readable string (google.rpc.ErrorInfo.reason) and ``field`` names
the offending request field for INVALID_ARGUMENT (google.rpc.BadRequest).
"""

from __future__ import annotations


class ImageSearchError(Exception):
    """Base class of every error a client can cause or observe."""

    reason = "ERROR"

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if reason is not None:
            self.reason = reason


class InvalidArgument(ImageSearchError):
    reason = "INVALID_ARGUMENT"


class NotFound(ImageSearchError):
    reason = "NOT_FOUND"


class AlreadyExists(ImageSearchError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(ImageSearchError):
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(ImageSearchError):
    reason = "LIMIT_EXCEEDED"


class DeadlineExceeded(ImageSearchError):
    reason = "DEADLINE_EXCEEDED"


class Unavailable(ImageSearchError):
    reason = "UNAVAILABLE"


class Internal(ImageSearchError):
    """A bug or a broken invariant on the server side (never the client's fault)."""

    reason = "INTERNAL"


class DataDirLocked(RuntimeError):
    """Another process owns the data directory."""
