"""Shared fixtures: a real in-process server on a free port, its stub, and a CLI server helper."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from imagesearch.server.app import RunningServer, run_server
from imagesearch.server.config import ServerConfig
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.plugin_fixtures import colorhist_plugin  # noqa: F401  (the example plugin, pip-installed)
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """CLI tests run ``main`` in-process, which points the root logger at the test's captured
    stderr; put the handlers back, or later tests' servers log into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def tiny_config(data_dir: Path, **changes) -> ServerConfig:
    """A server on a free localhost port whose default collection uses the fast test extractor."""
    base = ServerConfig(
        port=0,
        data_dir=data_dir,
        default_extractor=TinyExtractor.name,
        log_format="text",
        shutdown_grace_s=2.0,
        shutdown_announce_s=0.0,
    )
    return base.replace(**changes)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server(data_dir: Path) -> Iterator[RunningServer]:
    with run_server(tiny_config(data_dir), extra_plugins=[TINY_PLUGIN]) as running:
        yield running


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.ImageSearchServiceStub:
    return pb_grpc.ImageSearchServiceStub(channel)


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT as Python's default handler makes it (KeyboardInterrupt), whatever ran before: CI runs
    the suite as a background job, where SIGINT is ignored and a simulated Ctrl-C would do nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
