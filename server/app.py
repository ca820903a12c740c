"""Assemble and run the server: plugins, catalog, engine, gRPC, health, reflection.

``run_server`` is the one way to start a server; the CLI, the tests and the
benchmarks all use it, so what the tests exercise is what operators run.
"""

from __future__ import annotations

import asyncio
import errno
import faulthandler
import ipaddress
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from imagesearch.plugins.manager import PluginRegistry
from imagesearch.server.catalog import Catalog
from imagesearch.server.config import ServerConfig
from imagesearch.server.descriptors import raise_soft_limit
from imagesearch.server.engine import Engine
from imagesearch.server.errors import ResourceExhausted
from imagesearch.server.imaging import check_decoder_cap
from imagesearch.server.reflection import enable_reflection
from imagesearch.server.response_size import max_response_bytes
from imagesearch.server.servicer import ImageSearchServicer, add_to_server, to_rpc_status
from imagesearch.server.streams import StreamGuard
from imagesearch.v1 import image_search_service_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageSearchService"].full_name
T = TypeVar("T")


COLLECTION_HEALTH_PREFIX = SERVICE_NAME + "/"


class CollectionHealth(health.aio.HealthServicer):
    """grpc.health.v1 plus one name per collection, ``imagesearch.v1.ImageSearchService/<name>``:
    SERVING when it can search, NOT_SERVING when it is read-only or unavailable (the reason is
    in GetCollection and the log), NOT_FOUND when there is no such collection. Worked out at each
    Check, so it is never stale; Watch covers the fixed names only. Answered on the event loop
    itself, so no amount of queued work delays it."""

    def __init__(self, catalog: Catalog, watches: StreamGuard) -> None:
        super().__init__()
        self._catalog = catalog
        self._watches = watches  # open Watch streams per client address
        self._stopping = asyncio.Event()

    async def Watch(self, request, context):
        """grpc.health.v1's Watch, at most ``max_streams_per_peer`` open from one client address
        (256 from one channel held every slot of the server's call limit, health checks refused
        with the rest: an outside test), and ended when the server stops taking calls
        (``end_watches``): gRPC counts an open Watch as a call in flight, so one (as clients' own
        health checking and Envoy keep) held every stop for the whole ``shutdown_grace_s`` (an
        outside test). Its watchers have had NOT_SERVING since the announcement."""
        try:
            with self._watches.admit(context.peer()):
                await self._watch_until_stop(request, context)
        except ResourceExhausted as refused:  # only admit raises it
            await context.abort_with_status(rpc_status.to_status(to_rpc_status(refused)))

    async def _watch_until_stop(self, request, context) -> None:
        watching = asyncio.ensure_future(super().Watch(request, context))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((watching, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watching, stopping):
                task.cancel()
            await asyncio.gather(watching, stopping, return_exceptions=True)

    def end_watches(self) -> None:
        self._stopping.set()

    async def Check(self, request, context):
        if not request.service.startswith(COLLECTION_HEALTH_PREFIX):
            return await super().Check(request, context)
        problem = self._catalog.problem(request.service[len(COLLECTION_HEALTH_PREFIX) :])
        if problem is None:
            await context.abort(grpc.StatusCode.NOT_FOUND)
        serving = not problem and not self._gracefully_shutting_down
        Status = health_pb2.HealthCheckResponse
        return Status(status=Status.SERVING if serving else Status.NOT_SERVING)


class _EventLoopThread:
    """The asyncio loop the gRPC server lives on, in a thread of its own, so that ``run_server``
    stays an ordinary context manager for the CLI, the tests and the benchmarks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@dataclass
class RunningServer:
    """What ``run_server`` yields: the gRPC server, its port and the parts behind it."""

    server: grpc.aio.Server
    port: int
    engine: Engine
    health: CollectionHealth
    config: ServerConfig

    @property
    def target(self) -> str:
        """Where a client on this machine reaches it: the banner's commands and the demo said
        127.0.0.1 for a server bound to [::1] only, and were refused (an outside test)."""
        host = self.config.host.strip("[]")
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


class _SnapshotThread(threading.Thread):
    def __init__(self, catalog: Catalog, config: ServerConfig) -> None:
        super().__init__(name="snapshotter", daemon=True)
        self.catalog, self.config = catalog, config
        self.stopped = threading.Event()

    def run(self) -> None:
        period = max(0.5, min(self.config.snapshot_interval_s, 5.0))
        while not self.stopped.wait(period):
            try:
                self.catalog.snapshot_due(self.config.snapshot_every_ops, self.config.snapshot_interval_s)
                self.catalog.close_idle_readers()
            except Exception:  # never let one failure end every collection's snapshots
                log.exception("periodic snapshot failed")


def default_extractor_reported(name: str, registry: PluginRegistry) -> None:
    """Log an ERROR when the configured default extractor is not loaded, whatever the data directory
    holds: a misspelt name started the server with at most a warning on a new data directory and
    nothing on an existing one (an outside test). Not a refusal to start: a server without models
    yet serves collections of vectors and of other extractors."""
    if name in registry.extractors:
        return
    log.error(
        "default_extractor %r is not loaded (loaded: %s): the default collection is not created and a "
        "CreateCollection without an extractor fails until it is. Check the name, or build the model "
        "(`imagesearch model export %s`, `make models`)",
        name,
        ", ".join(sorted(registry.extractors)) or "none",
        name,
    )


def check_listenable(host: str, port: int) -> None:
    """RuntimeError, saying what to do, unless ``host:port`` can be listened on. gRPC's own refusal
    ("Failed to bind to address ...; set GRPC_VERBOSITY=debug") came after the data directory had
    been locked and the default collection made (an outside test). Port 0 always can."""
    wrong = _miswritten(host)
    if wrong:
        raise RuntimeError(f"cannot listen on {host}:{port}: {wrong}")
    if port == 0:
        return
    try:
        # gRPC takes an IPv6 address in brackets ("[::1]"), the resolver without them.
        addresses = socket.getaddrinfo(
            host.removeprefix("[").removesuffix("]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:  # not a port conflict: the name itself is unknown
        raise RuntimeError(
            f"cannot listen on {host}:{port}: {host!r} does not resolve to an address of this machine "
            f"({exc.strerror or exc}); give an address (127.0.0.1, 0.0.0.0, [::1]) or a name that resolves"
        ) from exc
    # gRPC listens on every address of the host it can bind, silently leaving out the others: with
    # [::1]:port held by another process, "localhost" served on 127.0.0.1 alone, and clients of
    # localhost reached the other process (an outside test). An address taken refuses the start;
    # one the machine lacks (no IPv6) does not.
    reason, bound = "", False
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(address)
                bound = True
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and len(addresses) > 1:
                    raise RuntimeError(
                        _cannot_listen(host, port, f"{address[0]} is in use, and {host} names it too")
                    ) from exc
                reason = reason or exc.strerror or str(exc)
    if not bound:
        raise RuntimeError(_cannot_listen(host, port, reason))


def _miswritten(host: str) -> str:
    """What is wrong with how ``host`` is written, or "". gRPC read "::1:50051" as a domain name it
    could not resolve, after the probe passed and the data directory was written; "[::1" and
    "[::1]:50799" were "held by another process" (outside tests)."""
    if "://" in host:
        bare = host.split("://", 1)[1].split("/", 1)[0]
        return f"a host name or address, not a URL: --host '{bare}'"
    if any(character.isspace() for character in host):
        return f"{host!r} holds white space; a host name or address has none"
    inner = host.removeprefix("[").removesuffix("]")
    port_given = re.fullmatch(r"(\[[^\[\]]*\]|[^:\[\]]*):(\d+)", host)
    if port_given:
        return f"the port goes in --port, not --host: --host '{port_given[1]}' --port {port_given[2]}"
    if "[" in inner or "]" in inner or host.startswith("[") != host.endswith("]"):
        example = bare if _is_ipv6(bare := inner.strip("[]")) else "::1"
        return f"brackets that do not pair: an IPv6 address is written as in --host '[{example}]'"
    if host.startswith("[") and not _is_ipv6(inner):
        return f"brackets hold an IPv6 address, and {inner!r} is not one"
    if ":" in host and not host.startswith("["):
        return (
            f"an IPv6 address is written in brackets, as in --host '[{host}]' "
            f'(or host = "[{host}]" in the config file)'
        )
    return ""


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _cannot_listen(host: str, port: int, reason: str) -> str:
    return (
        f"cannot listen on {host}:{port} ({reason}): another process (perhaps another imagesearch "
        "server) holds the port, or the host is not an address of this machine. Choose another "
        "--port or --host, or stop that process"
    )


def _grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Requests up to max_message_bytes; responses up to the largest the limits allow."""
    return [
        ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ("grpc.max_send_message_length", max_response_bytes(config.limits)),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", connection_streams(config.limits.max_concurrent_rpcs)),
    ]


def connection_streams(max_concurrent_rpcs: int) -> int:
    """Calls one connection may have open at once (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS): well
    above the call limit, so a client's calls past that limit get TOO_MANY_CALLS with a retry hint,
    yet bounded, so a connection's requests that never finish arriving cannot pile up. Past it
    gRPC refuses new streams (REFUSED_STREAM, which clients see as UNAVAILABLE): at twice the call
    limit (100 at least) an outside test met that with 150 calls at once on one channel."""
    return min(max(4 * max_concurrent_rpcs, 1000), 2**31 - 1)


def plugin_registry(config: ServerConfig, extra_plugins: Iterable[tuple[str, object]] = ()) -> PluginRegistry:
    """The plugins a server with ``config`` loads, each told the models directory and its own table."""
    return PluginRegistry(extra_plugins, models_dir=config.models_dir, plugin_config=config.plugins)


@dataclass
class _Pools:
    """The threads engine work runs on: ``workers`` for adds, searches and removals (searches
    waiting to join a batch wait here too), two for the cheap reads so they never queue behind."""

    workers: ThreadPoolExecutor
    reads: ThreadPoolExecutor

    @classmethod
    def for_config(cls, config: ServerConfig) -> _Pools:
        return cls(
            ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="work"),
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="read"),
        )

    def shutdown(self) -> None:
        self.workers.shutdown(wait=True)
        self.reads.shutdown(wait=True)


async def _start(
    config: ServerConfig, engine: Engine, catalog: Catalog, pools: _Pools
) -> tuple[grpc.aio.Server, int, CollectionHealth]:
    # No maximum_concurrent_rpcs: the servicer counts its own calls (streams.CallLimit), so that
    # health is never refused; each connection holds a bounded number of streams.
    server = grpc.aio.server(options=_grpc_options(config))
    limits = config.limits
    streams = StreamGuard(limits.max_streams_per_peer, limits.stream_idle_timeout_s)
    add_to_server(ImageSearchServicer(engine, pools.workers, pools.reads, streams), server)
    watches = StreamGuard(limits.max_streams_per_peer, limits.stream_idle_timeout_s, "health Watch streams")
    health_servicer = CollectionHealth(catalog, watches)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    try:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError as exc:  # taken between check_listenable and now
        raise RuntimeError(_cannot_listen(config.host, config.port, str(exc))) from exc
    if port == 0:
        raise RuntimeError(_cannot_listen(config.host, config.port, "gRPC could not bind it"))
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


async def _announce_and_stop(
    server: grpc.aio.Server, health_servicer: CollectionHealth, config: ServerConfig
) -> None:
    """Tell load balancers first (NOT_SERVING while still answering), then drain in-flight calls."""
    await health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(config.shutdown_announce_s)
    health_servicer.end_watches()  # not work to drain: they would hold the stop for the whole grace
    await server.stop(config.shutdown_grace_s)


@contextmanager
def run_server(
    config: ServerConfig | None = None,
    *,
    extra_plugins: Iterable[tuple[str, object]] = (),
    registry: PluginRegistry | None = None,
) -> Iterator[RunningServer]:
    """Start a server (port 0 picks a free one); stop it, drained and snapshotted, on exit."""
    config = config or ServerConfig()
    check_decoder_cap(config.limits)
    check_listenable(config.host, config.port)  # before the data directory is locked or touched
    if config.data_dir.exists() and not config.data_dir.is_dir():  # said only "[Errno 17] File exists"
        raise RuntimeError(f"the data directory {config.data_dir} is a file; give --data a directory")
    registry = registry or plugin_registry(config, extra_plugins)
    open_files = raise_soft_limit()  # before the collections are opened (server/descriptors.py)
    catalog = Catalog(config.data_dir, registry, config.limits)
    default_extractor_reported(config.default_extractor, registry)
    loop = pools = engine = None
    served = False  # whether it served: "stopped" is logged then, once everything is persisted
    try:
        if config.create_default_collection:
            catalog.ensure_default(config.default_extractor)
        engine = Engine(config, registry, catalog)
        loop, pools = _EventLoopThread(), _Pools.for_config(config)
        server, port, health_servicer = loop.run(_start(config, engine, catalog, pools))
        snapshotter = _SnapshotThread(catalog, config)
        snapshotter.start()
        log.info(
            "serving",
            extra={
                "address": f"{config.host}:{port}",
                "data_dir": str(config.data_dir),
                "max_response_bytes": max_response_bytes(config.limits),  # what clients must accept
                "open_files_limit": open_files,
                "collections_allowed": catalog.collections_allowed(),
            },
        )
        served = True
        try:
            yield RunningServer(server, port, engine, health_servicer, config)
        finally:
            engine.begin_shutdown()  # streams stop at their next chunk, saying what they stored
            budget = config.shutdown_announce_s + config.shutdown_grace_s + 5
            try:
                loop.run(_announce_and_stop(server, health_servicer, config), timeout=budget)
            except TimeoutError:
                log.error("gRPC server did not stop within its grace period; persisting anyway")
            snapshotter.stopped.set()
            snapshotter.join()
    finally:
        if pools is not None:
            pools.shutdown()
        if engine is not None:
            engine.close()
        if loop is not None:
            loop.close()
        catalog.close()  # the final snapshots: "stopped" comes after what they log (an outside test)
        if served:
            log.info("stopped")


def serve_forever(
    config: ServerConfig,
    on_ready: Callable[[RunningServer], None] | None = None,
    extra_plugins: Iterable[tuple[str, object]] = (),
) -> None:
    """Run until SIGTERM, SIGINT or SIGHUP, then drain and stop; used by ``imagesearch serve``.

    The signal handler only flips a flag: taking a lock (``Event.set``) inside a
    handler can deadlock against the very thread it interrupts. The main thread
    polls the flag instead.
    """
    received: list[int] = []
    stopping = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # a closed terminal stops it gracefully too
    before = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in stopping}
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see what a stuck server does.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        with run_server(config, extra_plugins=extra_plugins) as running:
            if on_ready is not None:
                on_ready(running)
            while not received:
                time.sleep(0.2)
            log.info("signal %s received: draining", signal.Signals(received[0]).name)
            _exit_if_stuck(config.shutdown_announce_s + config.shutdown_grace_s + 30)
    finally:  # a caller in the same process (a test, an embedding) gets its own handlers back
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _exit_if_stuck(after_s: float) -> None:
    """A last resort, like a service manager's stop timeout: if shutdown has not finished
    after ``after_s`` seconds, print every thread's stack and exit. Every acknowledged write
    is already in SQLite; a missing snapshot is rebuilt on the next start."""

    def watchdog() -> None:
        time.sleep(after_s)
        log.error("shutdown still running after %.0f s; exiting without finishing it", after_s)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(1)

    threading.Thread(target=watchdog, name="shutdown-watchdog", daemon=True).start()
