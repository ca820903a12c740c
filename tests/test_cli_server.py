"""The real command (`imagesearch serve`) with the real default model, end to end over gRPC."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from imagesearch.client import FailedPrecondition, ImageItem, ImageSearchClient
from imagesearch.server.config import Limits, ServerConfig
from imagesearch.server.imaging import decode_image
from tests.cnn_fixtures import default_extractor, default_models_dir, distorted_copy, jpeg_bytes, photos  # noqa: F401
from tests.support.process import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def serve_command(data_dir: Path, models_dir: Path) -> list[str]:
    """`imagesearch serve` exactly as an operator runs it, on a free port."""
    return [sys.executable, "-m", "imagesearch.server.cli", "serve", "--port", "0", "--data", str(data_dir),
            "--models", str(models_dir), "--log-format", "text"]  # fmt: skip


@pytest.fixture
def cli_server(tmp_path, default_models_dir) -> Iterator[ServerProcess]:  # noqa: F811
    server = ServerProcess(
        serve_command(tmp_path / "data", default_models_dir), ready=r"serving on [\d.]+:(\d+)"
    )
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.terminate()


def test_default_collection_finds_photos_and_matches_in_process(cli_server, photos, default_extractor):  # noqa: F811
    with ImageSearchClient(cli_server.target) as client:
        assert client.health() == "SERVING"
        info = client.get_collection()
        assert (info.name, info.extractor, info.metric, info.dimension) == (
            "default",
            "efficientnet-lite0",
            "cosine",
            1280,
        )
        originals = {name: jpeg_bytes(image) for name, image in photos.items()}
        client.add_images([ImageItem(id=name, content=data, label=name) for name, data in originals.items()])
        for name, image in photos.items():
            hits = client.search(jpeg_bytes(distorted_copy(image)), top_k=4).hits
            assert hits[0].id == name, f"an edited copy of {name} should find its original first: {hits}"
            assert hits[0].score > hits[1].score
        # Serving-path parity: the stored vector equals the plugin's embedding computed in-process
        # on the same bytes through the same decode path.
        for name, data in originals.items():
            served = client.get_image(name, include_vector=True).vector
            decoded = decode_image(data, Limits(), "image", min_side=default_extractor.min_input_side).pixels
            local = default_extractor.extract([decoded])[0]
            np.testing.assert_allclose(served, local, atol=1e-5)
    assert cli_server.terminate() == 0


def test_data_dir_in_use_is_a_clear_error(cli_server, tmp_path, default_models_dir):  # noqa: F811
    second = subprocess.run(
        serve_command(tmp_path / "data", default_models_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert "in use by another process" in second.stderr


def test_corrupt_default_model_keeps_the_server_up(tmp_path, default_models_dir):  # noqa: F811
    import shutil

    from imagesearch.server.app import run_server
    from imagesearch.server.config import ServerConfig

    models = tmp_path / "models"
    shutil.copytree(default_models_dir, models)
    onnx = next(models.glob("efficientnet-lite0.onnx"))
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the sha256 check can tell
    onnx.write_bytes(bytes(data))
    config = ServerConfig(port=0, data_dir=tmp_path / "data", models_dir=models, shutdown_announce_s=0)
    with run_server(config) as running, ImageSearchClient(running.target) as client:
        assert client.health() == "SERVING"
        assert "default" not in {c.name for c in client.list_collections()}
        with pytest.raises(FailedPrecondition, match="cannot start"):
            client.create_collection("photos", extractor="efficientnet-lite0")


@pytest.mark.parametrize(
    ("host", "target"),
    [
        ("127.0.0.1", "127.0.0.1:7"),
        ("0.0.0.0", "127.0.0.1:7"),
        ("::", "[::1]:7"),
        ("::1", "[::1]:7"),
        ("[::1]", "[::1]:7"),
        ("localhost", "localhost:7"),
    ],
)
def test_the_banner_and_the_demo_reach_the_server_where_it_listens(host: str, target: str) -> None:
    """They said 127.0.0.1 for a server bound to [::1] only, and were refused (an outside test)."""
    from imagesearch.server.app import RunningServer

    running = RunningServer(None, 7, None, None, ServerConfig(host=host))  # type: ignore[arg-type]
    assert running.target == target
