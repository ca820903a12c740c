"""Guards for calls and client streams: a cap on calls in flight, a cap per peer and an idle timeout.

On the asyncio server a stream that sends nothing holds no thread, but it still
holds a slot of ``max_concurrent_rpcs`` and a little memory, so one client must
not be able to open them without limit or leave them open for ever. The cap on
calls in flight is the server's own, not gRPC's ``maximum_concurrent_rpcs``:
gRPC's counts every call from its first byte, health checks and calls whose
request never finishes arriving included, so one client holding that many (health
Watch streams, or requests sent a byte short) had health checks refused for as long
as it liked, and a load balancer then pulled an idle server (an outside test).
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


class CallLimit:
    """At most ``limit`` calls of the image search service in flight, counted from the moment a
    handler runs (its request has arrived): RESOURCE_EXHAUSTED with a retry hint past it. Health
    and reflection are not counted. Touched only from the event loop's thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.in_flight >= self.limit:
            raise ResourceExhausted(
                f"{self.in_flight} calls are in flight; the limit is {self.limit} (retry shortly)",
                reason="TOO_MANY_CALLS",
                metadata={"limit": str(self.limit)},
                retry_after_s=0.5,
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class StreamGuard:
    def __init__(self, max_per_peer: int, idle_timeout_s: float, what: str = "upload streams") -> None:
        self.max_per_peer = max_per_peer
        self.idle_timeout_s = idle_timeout_s
        self.what = what  # what the streams are, as the refusal names them
        self._open: Counter[str] = Counter()  # touched only from the event loop's thread

    @contextmanager
    def admit(self, peer: str) -> Iterator[None]:
        """Count a stream against its peer's cap for as long as it is open."""
        host = peer_host(peer)
        if self._open[host] >= self.max_per_peer:
            raise ResourceExhausted(
                f"{self._open[host]} {self.what} are open from {host}; the limit is {self.max_per_peer} "
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


class ChunkOrder:
    """The order a stream's chunks store in: each ``turn`` follows the one made before it, and
    ``give_up`` ends them all (the stream failed, or the client went away).

    A stream validates, decodes and extracts one chunk while the chunk before it commits (the
    commit's fsync leaves the CPU to the next chunk), and commits it while the one before goes
    into the index; yet the outcome is that of storing them one after the other: a chunk is never
    stored after an earlier one failed. Giving up must free every chunk waiting for its turn even
    when the chunk before it never ran at all (a cancelled call drops work still queued for a
    worker): waits end on the chunk before being done or on the stream being given up.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._given_up = False
        self._last: ChunkTurn | None = None

    def turn(self) -> ChunkTurn:
        """The turn of the stream's next chunk, after every chunk given a turn before it."""
        self._last = ChunkTurn(self, self._last)
        return self._last

    def give_up(self) -> None:
        """No chunk that has not begun to store will: its ``wait`` raises ChunkAbandoned."""
        with self._changed:
            self._given_up = True
            self._changed.notify_all()


class ChunkTurn:
    """When one chunk may store its rows: once the chunk before it is done, and only if that one
    succeeded and the stream goes on (``ChunkOrder``). ``wait``, ``stored`` and ``finish`` run on
    worker threads; ``ChunkOrder.give_up`` on the event loop."""

    def __init__(self, order: ChunkOrder, previous: ChunkTurn | None) -> None:
        self._order, self._previous = order, previous
        self._done = self._succeeded = False

    def wait(self) -> None:
        """Block until the chunk before is done; raise ChunkAbandoned when it failed or the stream
        was given up (the engine calls this right before it stores the rows)."""
        if not self._previous_succeeded():
            raise ChunkAbandoned()

    def stored(self) -> None:
        """This chunk's rows are committed: the next chunk may commit its own (while this one's go
        into the index)."""
        self._end(succeeded=True)

    def finish(self, succeeded: bool) -> None:
        """This chunk is done (a no-op once ``stored``); it counts as succeeded only when every
        chunk before it did too (a chunk that stored nothing never waited for its turn)."""
        if not self._done:
            self._end(succeeded and self._previous_succeeded())

    def _end(self, succeeded: bool) -> None:
        with self._order._changed:
            self._done, self._succeeded = True, succeeded
            self._order._changed.notify_all()

    def _previous_succeeded(self) -> bool:
        order, previous = self._order, self._previous
        with order._changed:
            order._changed.wait_for(lambda: order._given_up or previous is None or previous._done)
            return not order._given_up and (previous is None or previous._succeeded)
