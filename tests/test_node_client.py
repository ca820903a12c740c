"""A client in another language (Node.js, @grpc/grpc-js) works from the .proto alone."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.images import encode, pattern

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node-client"


@pytest.fixture(scope="session")
def node_client() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "Node.js and npm are needed for the cross-language test (the machine image has both)"
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=EXAMPLE, check=True, timeout=300
        )
    return EXAMPLE / "search.js"


def test_node_client_adds_and_searches(server, node_client, tmp_path):
    image = tmp_path / "pattern.png"
    image.write_bytes(encode(pattern(3)))
    done = subprocess.run(
        ["node", str(node_client), server.target, str(image)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "tiny-8x8" in result["extractors"]
    assert result["ids"] == ["pattern.png"]
    top = result["hits"][0]
    assert (
        top["id"] == "pattern.png"
        and top["label"] == "from-node"
        and top["metadata"] == {"client": "grpc-js"}
    )
    assert top["score"] == pytest.approx(1.0, abs=1e-5)
    assert result["bad_request"].startswith("Search failed: INVALID_ARGUMENT: not a decodable image")
