"""What the sync and async clients share: construction, call settings, the method cache.

``grpc`` and ``grpc.aio`` channels have the same ``unary_unary`` / ``stream_unary``
factories and ``insecure_channel`` / ``secure_channel`` constructors, so the two
clients differ only in which module builds the channel and in ``await``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor

from imagesearch.client import _requests as R
from imagesearch.client._upload import PerFile, Progress, Upload
from imagesearch.client.types import PathLike


class ClientBase:
    """Holds the channel, the per-call defaults and one multicallable per method."""

    def __init__(
        self,
        channel_module: ModuleType,
        target: str | None,
        *,
        timeout: float | None,
        max_message_bytes: int,
        credentials: grpc.ChannelCredentials | None,
        channel: Any,
        metadata: Mapping[str, str] | Sequence[tuple[str, str]] | None,
    ) -> None:
        _check_one_connection(target, credentials, channel)
        self.target = _address(target, channel)
        self.max_message_bytes = max_message_bytes
        self._settings = R.CallSettings(timeout=timeout, metadata=R.metadata_pairs(metadata))
        self._owns_channel = channel is None
        self._closed = False
        if channel is None:
            options = R.channel_options(max_message_bytes)
            if credentials is None:
                channel = channel_module.insecure_channel(self.target, options=options)
            else:
                channel = channel_module.secure_channel(self.target, credentials, options=options)
        self._channel = channel
        self._callables: dict[str, Any] = {}

    def _closing(self) -> bool:
        """Mark the client closed; True when the channel is its own to close."""
        self._closed = True
        return self._owns_channel

    def _prepare(
        self, options: R.CallOptions, rpc: R.Rpc[Any] | None = None, *, deadline: bool = True
    ) -> tuple[dict[str, Any], str]:
        """The call's gRPC keyword arguments and request id, after the checks gRPC would make with a
        bare message (a closed channel, a request over the send limit): nothing is sent if one fails."""
        self._check_open()
        kwargs, request_id = self._settings.resolve(options, deadline=deadline)
        if rpc is not None:
            rpc.check_size(self.max_message_bytes, request_id)
        return kwargs, request_id

    def _upload(
        self,
        paths: Iterable[PathLike],
        labels: PerFile,
        ids: PerFile,
        collection: str | None,
        skip_invalid: bool,
        skip_existing: bool,
        batch_size: int,
        progress: Progress | None,
    ) -> Upload:
        """The upload both clients' ``add_files`` send: planned, every file checked, none read yet."""
        return Upload(
            paths,
            labels=labels,
            ids=ids,
            collection=collection,
            skip_invalid=skip_invalid,
            skip_existing=skip_existing,
            batch_size=batch_size,
            max_message_bytes=self.max_message_bytes,
            progress=progress,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed: make a new client (or call it inside its with block)")

    def _multicallable(self, method: MethodDescriptor) -> Any:
        """The method's grpc or grpc.aio multicallable (typed Any: the two modules' types differ, the
        calls made on them do not; the blocking client also uses a stream's ``future``)."""
        path = R.method_path(method)
        if path not in self._callables:
            serialize, deserialize = R.codec(method)
            factory = self._channel.stream_unary if method.client_streaming else self._channel.unary_unary
            self._callables[path] = factory(
                path, request_serializer=serialize, response_deserializer=deserialize
            )
        return self._callables[path]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.target!r})"
            if self._owns_channel
            else f"{type(self).__name__}(channel=...)"
        )


_HOST_PORT = re.compile(r"(\[[^\[\]\s]+\]|[^:\[\]\s]+):(\d{1,5})")
_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")  # gRPC's own target forms


def check_target(target: str) -> str:
    """``target`` if it is HOST:PORT with a port from 1 to 65535 (an IPv6 address in brackets), or
    a target in one of gRPC's own schemes (``dns:``, ``unix:``, ...), taken as given; else
    ValueError saying what to write. gRPC took port 116537 as 50001 (another server answered),
    a missing port as 443, and "" with its core's log lines on stderr (an outside test)."""
    address = target
    if target.startswith("dns:"):  # dns:[//authority/]host:port: its port defaults to 443 too
        address = target.removeprefix("dns:")
        address = address.split("/", 3)[-1] if address.startswith("//") else address
    elif target.startswith(_SCHEMES):
        return target
    found = _HOST_PORT.fullmatch(address)
    if found is None or not 1 <= int(found.group(2)) <= 65535:
        raise ValueError(
            f"target must be HOST:PORT with a port from 1 to 65535 ({R.DEFAULT_TARGET}; [::1]:50051 for "
            f"IPv6), or a gRPC target such as unix:/path; got {target!r}"
        )
    return target


def _address(target: str | None, channel: object) -> str:
    """What the client connects to: the target (``check_target``), the default one, or "" when a
    passed channel holds its own (gRPC does not say which)."""
    if target is not None:
        return check_target(target)
    return "" if channel is not None else R.DEFAULT_TARGET


def _check_one_connection(target: str | None, credentials: object, channel: object) -> None:
    """A ready channel has its own target and credentials: ones given with it would be silently
    ignored (an outside test passed a dead target with a live channel and never knew)."""
    if channel is not None and (target is not None or credentials is not None):
        given = [
            name for name, value in (("target", target), ("credentials", credentials)) if value is not None
        ]
        raise ValueError(
            f"pass either a ready channel or a target (and credentials), not both: {' and '.join(given)} "
            "given with a channel"
        )
