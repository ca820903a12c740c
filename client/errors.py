"""Exceptions the client raises: one class per gRPC status code a caller can act on.

The server attaches google.rpc rich status details to its errors: INVALID_ARGUMENT
carries ``BadRequest`` field violations naming the offending request field, other
codes carry ``ErrorInfo`` with a stable ``reason``. ``from_rpc_error`` turns any
``grpc.RpcError`` (sync or asyncio) into the matching subclass with those details
parsed, so callers write ``except NotFound`` instead of comparing status codes.

Argument mistakes the client can see without the server (two query kinds at once,
a 2-D vector, ...) are ordinary ``ValueError`` / ``TypeError``, not these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagesearch.client.types import AddResult
from imagesearch.v1 import image_search_service_pb2 as pb

REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (google.rpc.BadRequest.FieldViolation), e.g. ``images[3].content``."""

    field: str
    description: str


@dataclass(frozen=True)
class ErrorDetails:
    """The rich status details of an error; empty when the server sent none."""

    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)
    field_violations: tuple[FieldViolation, ...] = ()
    stored: AddResult | None = None
    """For a failed AddImagesStream: what the stream had stored before the error."""
    retry_delay: float | None = None
    """Seconds the server asks the client to wait before retrying (google.rpc.RetryInfo, sent
    with back-pressure such as TOO_MANY_STREAMS); None when it sent none."""


class ImageSearchError(Exception):
    """Base class of every error the server (or the transport to it) reports.

    ``code`` is the grpc.StatusCode, ``message`` the server's message, ``details``
    the parsed rich status, ``request_id`` the ``x-request-id`` the call was sent
    with (quote it when you look for the call in the server's logs; "" only for an error
    ``from_rpc_error`` made of a call that is not this client's). For a failed
    ``add_files``, ``upload_ids`` holds the id of every file of the upload, to resume with.
    """

    upload_ids: tuple[str, ...] = ()

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        details: ErrorDetails | None = None,
        request_id: str = "",
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or ErrorDetails()
        self.request_id: str = request_id
        self.sent = sent
        """False when the client refused the call itself and sent nothing (a request over its own
        ``max_message_bytes``): the server never saw it."""

    @property
    def reason(self) -> str:
        """The stable machine-readable reason (google.rpc.ErrorInfo.reason), "" if none."""
        return self.details.reason

    @property
    def field_violations(self) -> tuple[FieldViolation, ...]:
        return self.details.field_violations

    @property
    def retry_delay(self) -> float | None:
        """Seconds the server asks to wait before retrying (its RetryInfo), None if it gave none:
        back-pressure (RESOURCE_EXHAUSTED, TOO_MANY_STREAMS) says when to come back."""
        return self.details.retry_delay

    def __str__(self) -> str:
        parts = [f"{self.code.name}: {self.message}"]
        if self.details.reason:
            parts.append(f"reason={self.details.reason}")
        parts.extend(
            f"field={v.field}" if v.description in ("", self.message) else f"field={v.field}: {v.description}"
            for v in self.details.field_violations
        )
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        return " | ".join(parts)


class InvalidArgument(ImageSearchError):
    """The request is malformed: see ``field_violations`` for which field and why."""


class NotFound(ImageSearchError):
    """The collection or image does not exist."""


class AlreadyExists(ImageSearchError):
    """A collection or image id is already taken."""


class FailedPrecondition(ImageSearchError):
    """The request is valid but the collection's state forbids it (e.g. another extractor)."""


class ResourceExhausted(ImageSearchError):
    """A server limit was hit (message size, batch size, top_k, concurrent calls)."""


class Unavailable(ImageSearchError):
    """The server cannot be reached or is shutting down; retrying later may succeed."""


class DeadlineExceeded(ImageSearchError):
    """The call's timeout expired before the server answered."""


class Unauthenticated(ImageSearchError):
    """The server requires credentials the call did not carry."""


class Aborted(ImageSearchError):
    """A concurrency conflict (e.g. the collection was retrained mid-search): send the call again."""


class Internal(ImageSearchError):
    """A server-side bug; report it with the ``request_id``."""


class DataLoss(ImageSearchError):
    """A collection's store is damaged (reason ``STORE_DAMAGED``): its operator must restore it from
    a backup or delete it; retrying will not help."""


ERROR_CLASSES: Mapping[grpc.StatusCode, type[ImageSearchError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.DATA_LOSS: DataLoss,
}
"""Status code -> exception class; any other code raises the base ImageSearchError."""


def parse_details(error: grpc.RpcError) -> ErrorDetails:
    """The BadRequest / ErrorInfo details of a failed call; empty if absent or inconsistent.

    ``rpc_status.from_call`` raises ValueError when the rich status disagrees with
    the call's code or message; such details are not trustworthy, so they are dropped.
    """
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return ErrorDetails()
    if status is None:
        return ErrorDetails()
    reason, domain, metadata, violations, stored, retry_delay = "", "", {}, [], None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(
                FieldViolation(field=v.field, description=v.description) for v in bad_request.field_violations
            )
        elif detail.Is(pb.AddImagesStreamResponse.DESCRIPTOR):
            progress = pb.AddImagesStreamResponse()
            detail.Unpack(progress)
            stored = AddResult.from_proto(progress)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
    return ErrorDetails(
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=tuple(violations),
        stored=stored,
        retry_delay=retry_delay,
    )


def _echoed_request_id(error: grpc.RpcError) -> str | None:
    """The ``x-request-id`` the server put in the trailers (what its logs say), if any."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == REQUEST_ID_HEADER and value:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def from_rpc_error(error: grpc.RpcError, *, request_id: str | None = None) -> ImageSearchError:
    """Map a failed gRPC call (sync or ``grpc.aio``) to the matching ImageSearchError subclass.

    ``request_id`` is the id the call was sent with; the server's echo in the
    trailers wins when present (the server may shorten overlong ids).
    """
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    message = (details_of() if callable(details_of) else str(error)) or code.name
    cls = ERROR_CLASSES.get(code, ImageSearchError)
    details = parse_details(error)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not details.reason:
        message, details = _server_message_limit(message, details)
    return cls(
        message,
        code=code,
        details=details,
        request_id=_echoed_request_id(error) or request_id or "",
    )


MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
"""The reason of a request over a message size limit: the client's own (nothing sent) or, from
gRPC's refusal, the server's; ``details.metadata["limit"]`` is that limit in bytes."""

_GRPC_REFUSAL = re.compile(r"SERVER: Received message larger than max \((\d+) vs\. (\d+)\)")


def _server_message_limit(message: str, details: ErrorDetails) -> tuple[str, ErrorDetails]:
    """gRPC refuses a request over the server's ``max_message_bytes`` itself, before the server
    sees it, with a terse text and no reason or limit a caller could act on (an outside test: a
    server whose limit was below the client's failed every `imagesearch add` for good). Read as
    MESSAGE_TOO_LARGE with the server's limit; anything else is left as it came."""
    found = _GRPC_REFUSAL.search(message)
    if found is None:
        return message, details
    size, limit = found.groups()
    return (
        f"the request is {size} bytes, more than the server takes in one message ({limit} bytes, its "
        "max_message_bytes), and was refused unread. Send less at once, or raise max_message_bytes "
        "on the server",
        ErrorDetails(reason=MESSAGE_TOO_LARGE, metadata={"limit": limit, "size": size}),
    )
