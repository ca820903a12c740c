"""What the sync and async clients share: construction, call settings, the method cache.

``grpc`` and ``grpc.aio`` channels have the same ``unary_unary`` / ``stream_unary``
factories and ``insecure_channel`` / ``secure_channel`` constructors, so the two
clients differ only in which module builds the channel and in ``await``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor

from imagesearch.client import _requests as R


class ClientBase:
    """Holds the channel, the per-call defaults and one multicallable per method."""

    def __init__(
        self,
        channel_module: ModuleType,
        target: str,
        *,
        timeout: float | None,
        max_message_bytes: int,
        credentials: grpc.ChannelCredentials | None,
        channel: Any,
        metadata: Mapping[str, str] | Sequence[tuple[str, str]] | None,
    ) -> None:
        self.target = target
        self.max_message_bytes = max_message_bytes
        self._settings = R.CallSettings(timeout=timeout, metadata=R.metadata_pairs(metadata))
        self._owns_channel = channel is None
        if channel is None:
            options = R.channel_options(max_message_bytes)
            if credentials is None:
                channel = channel_module.insecure_channel(target, options=options)
            else:
                channel = channel_module.secure_channel(target, credentials, options=options)
        self._channel = channel
        self._callables: dict[str, Callable[..., Any]] = {}

    def _multicallable(self, method: MethodDescriptor) -> Callable[..., Any]:
        path = R.method_path(method)
        if path not in self._callables:
            serialize, deserialize = R.codec(method)
            factory = self._channel.stream_unary if method.client_streaming else self._channel.unary_unary
            self._callables[path] = factory(
                path, request_serializer=serialize, response_deserializer=deserialize
            )
        return self._callables[path]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"
