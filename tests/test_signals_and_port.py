"""How a server process ends and refuses to start: a hang-up stops it gracefully, as SIGTERM does,
and a port another process holds is refused, saying so, before the data directory is touched.
Both found by an outside test of an operator's first months (SIGHUP killed the server on the
spot; a taken port gave gRPC's own message after the data directory was locked and filled)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imagesearch.client import ImageItem, ImageSearchClient, NotFound
from tests.support.process import tiny_server
from tests.support.tiny_plugin import TinyExtractor

pytestmark = pytest.mark.e2e


def test_a_hang_up_drains_and_stops_the_server_like_sigterm(tmp_path: Path) -> None:
    import numpy as np

    server = tiny_server(tmp_path / "data")
    with ImageSearchClient(server.target) as client:
        client.add_images([ImageItem(id="kept", vector=np.ones(TinyExtractor.dim, np.float32))])
    server.proc.send_signal(signal.SIGHUP)
    assert server.proc.wait(30) == 0  # drained and stopped: exit 0, not killed by the signal
    again = tiny_server(tmp_path / "data")
    try:
        with ImageSearchClient(again.target) as client:
            assert client.get_image("kept").id == "kept"
    finally:
        assert again.terminate() == 0


def _serve(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``imagesearch serve`` with ``options`` on a data directory under ``tmp_path``, no models."""
    return subprocess.run(
        [sys.executable, "-m", "imagesearch.server.cli", "serve", *options, "--data", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "IMAGESEARCH_MODELS": str(tmp_path / "no-models")},
    )


def test_a_taken_port_is_refused_plainly_before_the_data_directory_is_touched(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        refused = _serve(tmp_path, "--port", str(port))
    assert refused.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in refused.stderr
    assert "Choose another --port" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_default_extractor_that_is_not_loaded_is_an_error_at_every_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, existing: bool
) -> None:
    """A misspelt default_extractor started with a warning on a new data directory and nothing on
    an existing one; now one ERROR naming it and what is loaded, either way (the server still starts)."""
    import logging

    from imagesearch.server.app import run_server
    from tests.conftest import tiny_config
    from tests.support.tiny_plugin import TINY_PLUGIN

    data = tmp_path / "data"
    if existing:
        with run_server(tiny_config(data), extra_plugins=[TINY_PLUGIN]):
            pass
    with (
        caplog.at_level(logging.ERROR, logger="imagesearch.server.app"),
        run_server(
            tiny_config(data, default_extractor="no-such-extractor"), extra_plugins=[TINY_PLUGIN]
        ) as running,
        ImageSearchClient(running.target) as client,
    ):
        assert client.health() == "SERVING"
        if not existing:  # no default collection was made: its NOT_FOUND says why
            with pytest.raises(NotFound, match="made at start-up with default_extractor 'no-such-extractor'"):
                client.add_images([ImageItem(id="a", vector=np.ones(3, np.float32))])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "default_extractor 'no-such-extractor' is not loaded" in errors[0]
    assert "tiny-8x8" in errors[0]


def test_an_ipv6_host_in_brackets_is_probed_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC takes "[::1]"; the resolver does not, and the probe must not refuse what gRPC serves."""
    from imagesearch.server import app

    asked: list[str] = []
    real = socket.getaddrinfo

    def resolve(host: str, port: int, **kwargs: object) -> list:
        asked.append(host)
        return real("127.0.0.1", port, type=socket.SOCK_STREAM)

    monkeypatch.setattr(app.socket, "getaddrinfo", resolve)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    app.check_listenable("[::1]", port)
    assert asked == ["::1"]


@pytest.mark.parametrize("host", ["::1", "::"])
def test_an_ipv6_host_without_brackets_is_refused_saying_how_to_write_it(host: str, tmp_path: Path) -> None:
    """gRPC read "::1:50243" as a domain name it could not resolve, after the probe passed and the
    data directory was written; the user was told another process held the port (an outside test)."""
    from imagesearch.server import app

    with pytest.raises(
        RuntimeError, match=rf"an IPv6 address is written in brackets, as in --host '\[{host}\]'"
    ):
        app.check_listenable(host, 0)
    refused = _serve(tmp_path, "--host", host)
    assert refused.returncode == 2 and "in brackets" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("host", "said"),
    [
        ("[::1", r"brackets that do not pair: an IPv6 address is written as in --host '\[::1\]'"),
        ("::1]", r"brackets that do not pair"),
        ("[::1]:50799", r"the port goes in --port, not --host: --host '\[::1\]' --port 50799"),
        ("localhost:50051", r"the port goes in --port, not --host: --host 'localhost' --port 50051"),
        ("[localhost]", r"brackets hold an IPv6 address, and 'localhost' is not one"),
        ("http://127.0.0.1", r"a host name or address, not a URL: --host '127.0.0.1'"),
        ("127.0.0.1 ", r"'127.0.0.1 ' holds white space"),
    ],
)
def test_a_miswritten_host_is_refused_saying_how_to_write_it(host: str, said: str) -> None:
    """These were "held by another process, or not an address of this machine" (an outside test)."""
    from imagesearch.server import app

    with pytest.raises(RuntimeError, match=rf"cannot listen on {re.escape(host)}:0: {said}"):
        app.check_listenable(host, 0)


def test_a_host_naming_an_address_another_process_holds_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC listens on every address of the host it can bind and leaves out the rest without a
    word: with [::1]:port held elsewhere, "localhost" served on 127.0.0.1 alone, and its clients
    trying ::1 first reached the other process (an outside test). An address the machine lacks
    does not refuse the start."""
    from imagesearch.server import app

    with socket.socket(socket.AF_INET6) as other:
        other.bind(("::1", 0))
        other.listen()
        port = other.getsockname()[1]
        both = [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
        ]
        monkeypatch.setattr(app.socket, "getaddrinfo", lambda *args, **kwargs: both)
        with pytest.raises(
            RuntimeError, match=rf"cannot listen on localhost:{port} \(::1 is in use, and localhost"
        ):
            app.check_listenable("localhost", port)
    lacking = [both[0], (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::dead:1", port, 0, 0))]
    monkeypatch.setattr(app.socket, "getaddrinfo", lambda *args, **kwargs: lacking)
    app.check_listenable("localhost", port)  # fe80::dead:1 is no address here: 127.0.0.1 serves


def test_a_host_name_that_does_not_resolve_is_not_blamed_on_another_process() -> None:
    from imagesearch.server import app

    with pytest.raises(RuntimeError, match=r"'no-such-host\.invalid' does not resolve") as refused:
        app.check_listenable("no-such-host.invalid", 50999)
    assert "another process" not in str(refused.value)


def test_a_data_directory_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    """It said only "[Errno 17] File exists: ..." (an outside test)."""
    (tmp_path / "data").write_text("not a directory")
    refused = _serve(tmp_path, "--port", "0")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"the data directory {tmp_path / 'data'} is a file; give --data a directory" in refused.stderr
