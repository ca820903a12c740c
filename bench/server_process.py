"""Run the server in its own process, as it is deployed, so the load generator's Python does not
share the server's GIL (a client in the server's process would make every client thread's work
look like the server's)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection

from imagesearch.server.config import ServerConfig


def _serve(config: ServerConfig, vector_dim: int | None, commands: Connection) -> None:
    """Child: serve until told to stop; answer ``stats`` with the search batcher's counters."""
    from bench.common import VectorPlugin
    from imagesearch.server.app import run_server

    plugins = [("bench", VectorPlugin(vector_dim))] if vector_dim else []
    with run_server(config, extra_plugins=plugins) as running:
        commands.send(("ready", running.port))
        while True:
            command = commands.recv()
            if command == "stats":
                batcher = running.engine.searches
                commands.send((batcher.batches, batcher.items))
            elif command == "stop":
                break
    commands.send("stopped")


@dataclass
class ServerProcess:
    target: str
    pid: int
    _commands: Connection

    def batcher_counts(self) -> tuple[int, int]:
        """(batches, queries) the search batcher has run so far, for the mean batch size."""
        self._commands.send("stats")
        return self._commands.recv()


@contextmanager
def server_process(config: ServerConfig, *, vector_dim: int | None = None) -> Iterator[ServerProcess]:
    """Start the server in a spawned process (``vector_dim``: register a vectors-only extractor of
    that dimension, ``vectors-<dim>``); stop it, drained and snapshotted, on exit."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=_serve, args=(config, vector_dim, theirs), name="imagesearch-server")
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not ours.poll(0.2):
            if not child.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server process did not start (exit code {child.exitcode})")
        _, port = ours.recv()
        yield ServerProcess(f"{config.host}:{port}", child.pid, ours)
    finally:
        if child.is_alive():  # also when the benchmark failed: stop it instead of waiting for it
            ours.send("stop")
            ours.poll(120)
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
