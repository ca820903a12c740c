"""The server's open-files budget: a client creating collections cannot exhaust it, a start that
could not open every collection is refused plainly, and a collection's descriptors stay bounded
however many threads use it (server/descriptors.py; an outside test ran the server out)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from imagesearch.client import ImageItem, ImageSearchClient, NotFound, ResourceExhausted
from imagesearch.server import descriptors
from imagesearch.server.app import run_server
from tests.conftest import tiny_config
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

pytestmark = pytest.mark.e2e


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_collections_past_the_limit_are_refused_saying_which_limit(data_dir: Path) -> None:
    config = tiny_config(data_dir, create_default_collection=False, limits={"max_collections": 3})
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        for name in ("a", "b", "c"):
            client.create_collection(name)
        with pytest.raises(
            ResourceExhausted, match="holds 3 collections, the limit max_collections"
        ) as refused:
            client.create_collection("d")
        assert refused.value.reason == "TOO_MANY_COLLECTIONS"
        assert dict(refused.value.details.metadata) == {"limit": "3", "value": "3", "collection": "d"}
        client.delete_collection("a")
        client.create_collection("d")  # room again


def test_collections_are_refused_past_what_the_open_files_limit_holds(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1,024-file soft limit (a common default) and a hard limit no higher hold 69 collections."""
    assert descriptors.collections_allowed(1024) == 69
    monkeypatch.setattr(descriptors.resource, "getrlimit", lambda _: (descriptors.RESERVED + 2 * 11, 1 << 20))
    config = tiny_config(data_dir, create_default_collection=False)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        client.create_collection("a")
        client.create_collection("b")
        with pytest.raises(
            ResourceExhausted, match=r"open-files limit \(278\) holds .*: raise it \(ulimit -n"
        ):
            client.create_collection("c")


def test_a_full_collection_budget_leaves_the_default_collection_out_and_starts(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Restarted with ``max_collections`` collections and ``default`` deleted, the server stopped
    with a traceback (exit code 1) trying to make ``default`` again (an outside test)."""
    config = tiny_config(data_dir, limits={"max_collections": 2})
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        client.create_collection("a")
        client.delete_collection("default")
        client.create_collection("b")
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        assert sorted(c.name for c in client.list_collections()) == ["a", "b"]
        with pytest.raises(NotFound, match="not created at start-up: the server holds 2 collections"):
            client.get_collection("default")
    assert "default collection not created" in caplog.text


def test_a_start_the_open_files_limit_cannot_hold_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """Twelve collections need 12 x 5 + 256 = 316 files: under a hard limit of 300 the server used
    to open what it could and call the rest damaged ("restore it from a backup, or delete the
    collection"), or die on a bare "Too many open files"."""
    data = tmp_path / "data"
    with (
        run_server(
            tiny_config(data, create_default_collection=False), extra_plugins=[TINY_PLUGIN]
        ) as running,
        ImageSearchClient(running.target) as client,
    ):
        for number in range(12):
            client.create_collection(f"c{number}")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

    started = subprocess.run(
        [sys.executable, "-m", "imagesearch.server.cli", "serve", "--port", "0", "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "IMAGESEARCH_MODELS": str(tmp_path / "no-models")},
        preexec_fn=low_limit,
    )
    assert started.returncode == 2, started.stdout + started.stderr
    said = started.stdout + started.stderr
    assert "holds 12 collections, which need at least 316 open files; this process may open 300" in said
    assert "ulimit -n" in said and "restore it from a backup" not in said


def test_a_collection_used_from_many_threads_keeps_its_descriptors_bounded(data_dir: Path) -> None:
    """Every worker thread that read a collection kept a connection (two descriptors): 41 a
    collection after concurrent use. Now at most descriptors.PER_COLLECTION."""
    config = tiny_config(data_dir, create_default_collection=False, workers=32)
    rng = np.random.default_rng(2)
    names = [f"c{number}" for number in range(8)]
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        before = open_descriptors()
        for name in names:
            client.create_collection(name, metric="l2")
        barrier = threading.Barrier(32)

        def use(caller: int) -> None:
            name = names[caller % len(names)]
            barrier.wait()
            for round_ in range(6):
                vectors = rng.normal(size=(4, TinyExtractor.dim)).astype(np.float32)
                items = [ImageItem(id=f"{caller}-{round_}-{i}", vector=v) for i, v in enumerate(vectors)]
                client.add_images(items, collection=name)
                client.search(vector=vectors[0], collection=name, top_k=5)
                client.get_image(items[0].id, collection=name)
                client.get_collection(name)

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(use, range(32)))
        per_collection = (open_descriptors() - before) / len(names)
    assert per_collection <= descriptors.PER_COLLECTION, per_collection


def test_running_out_of_descriptors_is_told_apart_from_a_damaged_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite says only "unable to open database file"; out of descriptors, that advised deleting an
    intact collection. ``out_of_descriptors`` probes for EMFILE (here in a child run out of them),
    and a start that meets it is refused saying so, with nothing marked damaged."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, resource\n"
            "from imagesearch.server.descriptors import out_of_descriptors\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
            "before = out_of_descriptors()\n"
            "held = []\n"
            "try:\n"
            "    while True: held.append(os.open(os.devnull, os.O_RDONLY))\n"
            "except OSError: pass\n"
            "print(before, out_of_descriptors())\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.split() == ["False", "True"], probe.stdout + probe.stderr
    data = tmp_path / "data"
    with run_server(tiny_config(data), extra_plugins=[TINY_PLUGIN]):
        pass
    (data / "collections" / "default" / "store.sqlite3").write_bytes(b"not a database")
    monkeypatch.setattr("imagesearch.server.catalog.out_of_descriptors", lambda: True)
    with (
        pytest.raises(descriptors.NotEnoughDescriptors, match=r"run out of open files .*ulimit -n"),
        run_server(tiny_config(data), extra_plugins=[TINY_PLUGIN]),
    ):
        pass
