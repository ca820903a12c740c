"""Run the server in its own process, as it is deployed, so the load generator's Python does not
share the server's GIL (a client in the server's process would make every client thread's work
look like the server's)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from imagesearch.server.config import ServerConfig


def _serve(
    config: ServerConfig, vector_dim: int | None, gemv_max_queries: int | None, commands: Connection
) -> None:
    """Child: serve until told to stop; answer ``stats`` with the search batcher's counters, and
    ``snapshot`` once every collection's pending changes are in its snapshot."""
    from bench.common import VectorPlugin
    from imagesearch.server import vector_index
    from imagesearch.server.app import run_server

    if gemv_max_queries is not None:  # an A/B of the lone-query path (bench_concurrency.py)
        vector_index.GEMV_MAX_QUERIES = gemv_max_queries

    plugins = [("bench", VectorPlugin(vector_dim))] if vector_dim else []
    with run_server(config, extra_plugins=plugins) as running:
        commands.send(("ready", running.port))
        while True:
            command = commands.recv()
            if command == "stats":
                batcher = running.engine.searching.searches
                commands.send((batcher.batches, batcher.items))
            elif command == "snapshot":  # every collection with changes not yet in its snapshot, now
                for collection in running.engine.catalog.list():
                    collection.snapshot()
                commands.send("snapshotted")
            elif command == "stop":
                break
    commands.send("stopped")


def _serve_generic(options: list[tuple[str, int]], commands: Connection, handler: object) -> None:
    """Child: a gRPC server answering every method with ``handler`` (a grpc.RpcMethodHandler)
    until told to stop."""
    import asyncio

    import grpc

    class AnyMethod(grpc.GenericRpcHandler):
        def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return handler

    async def serve() -> None:
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((AnyMethod(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        commands.send(("ready", port))
        await asyncio.get_running_loop().run_in_executor(None, commands.recv)  # "stop"
        await server.stop(grace=None)

    asyncio.run(serve())
    commands.send("stopped")


def _serve_bare(options: list[tuple[str, int]], commands: Connection) -> None:
    """Child: a gRPC server that answers every unary call with an empty message, without parsing
    the request: what the transport alone costs (``bare_grpc_process``)."""
    import grpc

    async def empty(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    _serve_generic(
        options,
        commands,
        grpc.unary_unary_rpc_method_handler(empty, request_deserializer=bytes, response_serializer=bytes),
    )


def _serve_pipeline(options: list[tuple[str, int]], directory: Path, commands: Connection) -> None:
    """Child: a gRPC server whose every stream-in call feeds its chunks, unparsed, to a fresh
    ``MinimalPipeline`` and answers once all are committed and indexed (``pipeline_process``)."""
    import asyncio

    import grpc

    from bench.common import MinimalPipeline
    from imagesearch.server.store import page_size_for

    streams = 0

    async def ingest(chunks: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        nonlocal streams
        streams += 1
        loop = asyncio.get_running_loop()
        path = directory / f"pipeline-{os.getpid()}-{streams}.sqlite3"
        pipeline = MinimalPipeline(path, page_size_for(1280), 1280)
        async for chunk in chunks:  # parsed and prepared on a worker thread, as the server does
            await loop.run_in_executor(None, pipeline.put, chunk)
        await loop.run_in_executor(None, pipeline.finish)
        return b""

    _serve_generic(
        options,
        commands,
        grpc.stream_unary_rpc_method_handler(ingest, request_deserializer=bytes, response_serializer=bytes),
    )


@dataclass
class ServerProcess:
    target: str
    pid: int
    _commands: Connection

    def batcher_counts(self) -> tuple[int, int]:
        """(batches, queries) the search batcher has run so far, for the mean batch size."""
        self._commands.send("stats")
        return self._commands.recv()

    def snapshot(self) -> None:
        """Snapshot every collection with changes since its last snapshot, now: a measurement
        started after this does not meet the snapshot the server would otherwise write of a
        collection filled before it (100 MB at 20,000 x 1280, in the middle of a stream)."""
        self._commands.send("snapshot")
        self._commands.recv()


@contextmanager
def server_process(
    config: ServerConfig,
    *,
    vector_dim: int | None = None,
    gemv_max_queries: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """Start the server in a spawned process (``vector_dim``: register a vectors-only extractor of
    that dimension, ``vectors-<dim>``; ``gemv_max_queries``: override vector_index's; ``env``:
    variables for the server's process only, as its libraries read them when they load); stop
    it, drained and snapshotted, on exit."""
    with _child(_serve, (config, vector_dim, gemv_max_queries), config.host, env) as started:
        yield started


@contextmanager
def bare_grpc_process(options: list[tuple[str, int]]) -> Iterator[ServerProcess]:
    """A gRPC server in its own process that answers every call with an empty message unparsed:
    the floor under any server's round trip for the same bytes (``batcher_counts`` unsupported)."""
    with _child(_serve_bare, (options,), "127.0.0.1") as started:
        yield started


@contextmanager
def pipeline_process(options: list[tuple[str, int]], directory: Path) -> Iterator[ServerProcess]:
    """A gRPC server in its own process whose streams go into ``bench.common.MinimalPipeline``,
    1280-d, on the pages the store takes for them, files under ``directory``: the floor under any server's durable stream."""
    with _child(_serve_pipeline, (options, directory), "127.0.0.1") as started:
        yield started


@contextmanager
def _environment(changes: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``changes`` for the duration, then as it was."""
    before = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _child(serve, args: tuple, host: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=serve, args=(*args, theirs), name="imagesearch-server")
    with _environment(env or {}):  # a spawned child starts with a copy of the parent's
        child.start()
    try:
        deadline = time.monotonic() + 120
        while not ours.poll(0.2):
            if not child.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server process did not start (exit code {child.exitcode})")
        _, port = ours.recv()
        yield ServerProcess(f"{host}:{port}", child.pid, ours)
    finally:
        if child.is_alive():  # also when the benchmark failed: stop it instead of waiting for it
            ours.send("stop")
            ours.poll(120)
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
