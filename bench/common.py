"""Helpers shared by the benchmark scripts: timing, result files, plots, machine description."""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from imagesearch.plugins import Extractor, hookimpl
from imagesearch.server.store import insert_many

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def best_rate(work: Callable[[], int], repeats: int = 3) -> float:
    """Items per second of the best of ``repeats`` runs (the machine is shared and noisy)."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        items = work()
        best = max(best, items / (time.perf_counter() - started))
    return best


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def bar_plot(
    name: str,
    title: str,
    labels: list[str],
    series: dict[str, list[float]],
    ylabel: str,
    *,
    log: bool = False,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for offset, (key, values) in enumerate(series.items()):
        ax.bar(x + offset * width - 0.4 + width / 2, values, width, label=key)
    ax.set_xticks(x, labels)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # Below the axes, so it never hides a bar.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(series), frameon=False)
    return save_figure(fig, name)


def save_figure(fig, name: str) -> Path:
    """Lay out, write ``bench/results/<name>.png`` and free a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class VectorOnlyExtractor(Extractor):
    """Registers a dimension for collections that are only ever given precomputed vectors."""

    version, default_metric, description = "1", "cosine", "benchmark placeholder (vectors only)"

    def __init__(self, dim: int) -> None:
        self.name, self.dim = f"vectors-{dim}", dim

    def extract(self, images):
        raise RuntimeError("vector-only benchmark extractor")


class VectorPlugin:
    """A plugin registering one ``VectorOnlyExtractor``: bring-your-own-vector benchmarks."""

    def __init__(self, dim: int) -> None:
        self.extractor = VectorOnlyExtractor(dim)

    @hookimpl
    def register_extractors(self, register) -> None:
        register(self.extractor)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def p50_ms(call: Callable[[Any], object], arguments: Iterable[Any]) -> float:
    """Median milliseconds of ``call(argument)`` over the arguments, one after another."""
    times = []
    for argument in arguments:
        started = time.perf_counter()
        call(argument)
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 50)


def add_data_arguments(parser: argparse.ArgumentParser, queries: int) -> None:
    """--n, --dim and --queries of the random vectors the vector benchmarks share."""
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=queries)


def random_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(base, queries): standard normal float32, seed 0, so every benchmark measures the same data."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    return base, rng.normal(size=(args.queries, args.dim)).astype(np.float32)


# The store's rows as a bare insert writes them: (id, seq, label, metadata, vector, created).
BARE_INSERT = "INSERT INTO images(id, seq, label, metadata, vector, created) VALUES "


def bare_store(path: Path, page_size: int | None = None) -> sqlite3.Connection:
    """A SQLite file with the store's schema and durability (WAL, synchronous=FULL), nothing else:
    the raw library a durable add is compared with."""
    from imagesearch.server.store import SCHEMA

    conn = sqlite3.connect(path, isolation_level=None)
    if page_size is not None:
        conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    return conn


def insert_rows_one_by_one(conn: sqlite3.Connection, rows: list[tuple]) -> None:
    """``executemany``: one statement a row."""
    conn.executemany(BARE_INSERT + "(?, ?, ?, ?, ?, ?)", rows)


def bare_insert_rate(
    conn: sqlite3.Connection,
    vectors: np.ndarray,
    insert: Callable[[sqlite3.Connection, list[tuple]], None] = insert_rows_one_by_one,
    batch: int = 256,
) -> float:
    """Rows/s of ``vectors`` inserted by ``insert``, one transaction (one fsync'd commit) a batch."""
    started = time.perf_counter()
    for start in range(0, len(vectors), batch):
        rows = [
            (str(start + i), start + i, "", "{}", v.tobytes(), time.time())
            for i, v in enumerate(vectors[start : start + batch])
        ]
        conn.execute("BEGIN IMMEDIATE")
        insert(conn, rows)
        conn.execute("COMMIT")
    return len(vectors) / (time.perf_counter() - started)


class MinimalPipeline:
    """The least any durable server must do with a batch of vectors received as an
    AddImagesRequest: parse it, read its vectors as one matrix, check them finite, normalise them
    (cosine), commit the rows (the store's schema, one fsync'd transaction and one statement a
    batch) and add them to a flat FAISS index. The commit and the index add run on threads of their
    own, so the next batch is parsed meanwhile; no per-image checks, no responses. What a server
    does on top of this is its own cost; what this costs above the bare insert, any server pays."""

    def __init__(self, path: Path, page_size: int, dim: int) -> None:
        import faiss

        self._path, self._page_size = path, page_size
        self._to_store: queue.Queue = queue.Queue(4)
        self._to_index: queue.Queue = queue.Queue(4)
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._threads = [threading.Thread(target=self._store), threading.Thread(target=self._add_to_index)]
        for thread in self._threads:
            thread.start()

    def put(self, message: bytes) -> None:
        """One serialised AddImagesRequest (or AddImagesStreamRequest: the same field numbers)."""
        from imagesearch.plugins import l2_normalize
        from imagesearch.v1 import image_search_service_pb2 as pb

        images = pb.AddImagesRequest.FromString(message).images
        joined = bytearray().join([m.vector.float32_le for m in images])
        matrix = np.frombuffer(joined, dtype=np.float32).reshape(len(images), -1)
        if not np.isfinite(np.einsum("ij,ij->i", matrix, matrix)).all():
            raise ValueError("a vector is not finite")
        self._to_store.put(([m.id for m in images], matrix, l2_normalize(matrix)))

    def finish(self) -> None:
        """Wait until every batch put is committed and indexed."""
        self._to_store.put(None)
        for thread in self._threads:
            thread.join()

    def _store(self) -> None:
        conn = bare_store(self._path, self._page_size)
        stored = 0
        try:
            while (work := self._to_store.get()) is not None:
                ids, matrix, prepared = work
                rows = [(ids[i], stored + i, "", "{}", matrix[i], time.time()) for i in range(len(ids))]
                conn.execute("BEGIN IMMEDIATE")
                insert_many(conn, BARE_INSERT, rows)
                conn.execute("COMMIT")
                self._to_index.put((np.arange(stored, stored + len(ids)), prepared))
                stored += len(ids)
        except BaseException:
            while self._to_store.get() is not None:  # never leave ``put`` waiting on a full queue
                pass
            raise
        finally:
            self._to_index.put(None)
            conn.close()

    def _add_to_index(self) -> None:
        while (work := self._to_index.get()) is not None:
            self._index.add_with_ids(work[1], work[0])


def add_requests(vectors: np.ndarray, batch: int = 256) -> list[bytes]:
    """``vectors`` as serialised AddImagesRequests of ``batch`` images, ids "0", "1", ...,
    vectors packed as float32_le (what the Python client sends)."""
    from imagesearch.v1 import image_search_service_pb2 as pb

    return [
        pb.AddImagesRequest(
            images=[
                pb.ImageInput(id=str(start + i), vector=pb.FloatVector(float32_le=v.tobytes()))
                for i, v in enumerate(vectors[start : start + batch])
            ]
        ).SerializeToString()
        for start in range(0, len(vectors), batch)
    ]
