"""The quick-start examples in README.md and docs/client.md run as written against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.images import encode, pattern

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLIENT_DOC = ROOT / "docs" / "client.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs(server, tmp_path, monkeypatch, capsys):
    (example,) = python_blocks(README.read_text())[:1]
    assert '"127.0.0.1:50051"' in example
    for seed, name in enumerate(("cat.jpg", "dog.jpg", "car.png")):
        (tmp_path / name).write_bytes(encode(pattern(seed), Path(name).suffix))
    (tmp_path / "query.jpg").write_bytes((tmp_path / "cat.jpg").read_bytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(example.replace("127.0.0.1:50051", server.target), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:2] == ["cat-1", "cats"], printed
    assert printed[-1] == "()", "cat-1 is the only 'cats' image and exclude_query drops it"


def test_client_doc_quick_start_runs(server, tmp_path, monkeypatch, capsys):
    (example,) = python_blocks(CLIENT_DOC.read_text())[:1]
    (tmp_path / "cat.jpg").write_bytes(encode(pattern(1), ".jpg"))
    (tmp_path / "dog.png").write_bytes(encode(pattern(2)))
    (tmp_path / "query.jpg").write_bytes(encode(pattern(1), ".jpg"))
    for seed, folder in enumerate(("birds", "fish")):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        (tmp_path / "photos" / folder / f"{folder}.jpg").write_bytes(encode(pattern(10 + seed), ".jpg"))
    monkeypatch.chdir(tmp_path)
    exec(compile(example.replace("127.0.0.1:50051", server.target), "docs/client.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "SERVING"
    assert printed[1].startswith("cat-1 cat 1.000")
    assert printed[-1].startswith("IMAGE_NOT_FOUND ")
