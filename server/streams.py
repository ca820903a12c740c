"""Guards for client streams: a cap per peer and an idle timeout.

On the asyncio server a stream that sends nothing holds no thread, but it still
holds a slot of ``max_concurrent_rpcs`` and a little memory, so one client must
not be able to open them without limit or leave them open for ever.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from imagesearch.server.errors import DeadlineExceeded, ResourceExhausted


def peer_host(peer: str) -> str:
    """The client's address without its port: "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"."""
    host, _, port = peer.rpartition(":")
    return host if host and port.isdigit() else peer


class StreamGuard:
    def __init__(self, max_per_peer: int, idle_timeout_s: float) -> None:
        self.max_per_peer = max_per_peer
        self.idle_timeout_s = idle_timeout_s
        self._open: Counter[str] = Counter()  # touched only from the event loop's thread

    @contextmanager
    def admit(self, peer: str) -> Iterator[None]:
        """Count a stream against its peer's cap for as long as it is open."""
        host = peer_host(peer)
        if self._open[host] >= self.max_per_peer:
            raise ResourceExhausted(
                f"{self._open[host]} upload streams are open from {host}; the limit is {self.max_per_peer} "
                "per client (finish or close one, then retry)",
                reason="TOO_MANY_STREAMS",
                metadata={"limit": str(self.max_per_peer)},
                retry_after_s=1.0,
            )
        self._open[host] += 1
        try:
            yield
        finally:
            self._open[host] -= 1
            if not self._open[host]:
                del self._open[host]

    async def next_chunk(self, context: grpc.aio.ServicerContext) -> Any | None:
        """The stream's next message, None at its end; DEADLINE_EXCEEDED after a silence too long."""
        try:
            message = await asyncio.wait_for(context.read(), self.idle_timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the stream sent nothing for {self.idle_timeout_s:g} s; the server closed it "
                "(send chunks more often, or open the stream when the data is ready)",
                reason="STREAM_IDLE",
                metadata={"limit": f"{self.idle_timeout_s:g}s"},
            ) from None
        return None if message is grpc.aio.EOF else message
