"""Guards for client streams: a cap per peer and an idle timeout.

On the asyncio server a stream that sends nothing holds no thread, but it still
holds a slot of ``max_concurrent_rpcs`` and a little memory, so one client must
not be able to open them without limit or leave them open for ever.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from imagesearch.server.errors import Aborted, DeadlineExceeded, ResourceExhausted


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


class ChunkAbandoned(Aborted):
    """A chunk's turn to be stored never came: an earlier chunk failed, or the stream was given up."""

    def __init__(self) -> None:
        super().__init__(
            "an earlier chunk of this stream failed, so this one was not stored", reason="CHUNK_ABANDONED"
        )


class ChunkTurn:
    """When a stream's chunk may store its rows: once the chunk before it is done, and only if that
    one succeeded and the stream goes on.

    A stream validates, decodes and extracts one chunk while the chunk before it commits (the
    commit's fsync leaves the CPU to the next chunk), and commits it while the one before goes
    into the index; yet the outcome is that of storing them one after the other: a chunk is never
    stored after an earlier one failed. ``wait``, ``stored`` and ``finish`` run on worker
    threads, ``abandon`` on the event loop.
    """

    def __init__(self, previous: ChunkTurn | None) -> None:
        self._previous = previous
        self._done = threading.Event()
        self._succeeded = False
        self._abandoned = False

    def wait(self) -> None:
        """Block until the chunk before is done; raise ChunkAbandoned when it failed or the stream
        was given up (the engine calls this right before it stores the rows)."""
        if not self._previous_succeeded() or self._abandoned:
            raise ChunkAbandoned()

    def stored(self) -> None:
        """This chunk's rows are committed: the next chunk may commit its own (while this one's go
        into the index)."""
        self._succeeded = True
        self._done.set()

    def finish(self, succeeded: bool) -> None:
        """This chunk is done (a no-op once ``stored``); it counts as succeeded only when every
        chunk before it did too (a chunk that stored nothing never waited for its turn)."""
        if self._done.is_set():
            return
        self._succeeded = succeeded and self._previous_succeeded()
        self._done.set()

    def abandon(self) -> None:
        """The stream failed or ended: this chunk must not be stored if it has not begun to be."""
        self._abandoned = True

    def _previous_succeeded(self) -> bool:
        if self._previous is None:
            return True
        self._previous._done.wait()
        return self._previous._succeeded
