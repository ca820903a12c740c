"""Where a durable vector add spends its time, inside the server process (no gRPC).

Runs ``Engine.add_images`` in-process on 20,000 x 1280 vectors in batches of 256 (one caller,
then several at once into one collection), timing the stages the docs name:
the store's insert with its fsync'd commit, the FAISS add, the rest of ``Collection.add``
(stacking and preparing vectors, under the collection's writer lock) and the engine's validation
and rows. Prints ms per batch, vectors/s and the CPU the process used, so the bench/README
breakdown of ingest comes from a command. First, the minimal durable pipeline (no server)
against the bare insert: how close any server could come; the store's page size, what it gives
the insert and costs a search's reads. Then the cost of one batch's message in each of
FloatVector's two forms (``values``, ``float32_le``) on the client and on the server, and how a
thread running Python slows SQLite inserts made one statement a row against one a batch.
"""

from __future__ import annotations

import argparse
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BARE_INSERT,
    MinimalPipeline,
    VectorPlugin,
    add_requests,
    bare_insert_rate,
    bare_store,
    insert_rows_one_by_one,
    machine,
    percentile,
    save,
)
from imagesearch.server import vector_index
from imagesearch.server.app import run_server
from imagesearch.server.collection import Collection
from imagesearch.server.config import ServerConfig, default_models_dir
from imagesearch.server.engine import Engine
from imagesearch.server.records import ImageItem, NewCollection, SearchQuery
from imagesearch.server.store import CollectionStore, NewImage, insert_many, page_size_for
from imagesearch.server.vector_index import VectorIndex
from imagesearch.server.vector_input import as_matrix, read_vector, vector_input
from imagesearch.v1 import image_search_service_pb2 as pb

STAGES = {  # stage name -> (class, method); inner stages are subtracted from the outer ones
    "engine": (Engine, "add_images"),
    "collection": (Collection, "add"),
    "store insert + commit": (CollectionStore, "insert"),
    "FAISS add": (VectorIndex, "add"),
}


@contextmanager
def timed_stages() -> Iterator[dict[str, float]]:
    """Wrap each stage's method to add up its wall time (seconds) while the block runs."""
    totals: dict[str, float] = defaultdict(float)
    lock = threading.Lock()
    originals = {name: getattr(cls, method) for name, (cls, method) in STAGES.items()}

    def wrap(name: str, original: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with lock:
                    totals[name] += time.perf_counter() - started

        return timed

    for name, (cls, method) in STAGES.items():
        setattr(cls, method, wrap(name, originals[name]))
    try:
        yield totals
    finally:
        for name, (cls, method) in STAGES.items():
            setattr(cls, method, originals[name])


def best_ms(call: Callable[[], object], repeats: int = 20) -> float:
    """The fastest of ``repeats`` calls, in ms: the cost of the work itself on a noisy machine."""
    fastest = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - started)
    return fastest * 1000


def message_forms(batch: np.ndarray) -> dict[str, dict[str, float]]:
    """One AddImagesRequest of ``batch`` with vectors as ``values`` and as ``float32_le``: what a
    Python client spends building and serialising it, and the server parsing and reading it."""
    builders = {
        "values": lambda v: pb.FloatVector(values=v.tolist()),
        "float32_le": lambda v: pb.FloatVector(float32_le=v.astype("<f4").tobytes()),
    }
    forms = {}
    for form, build in builders.items():

        def request(build: Callable = build) -> pb.AddImagesRequest:
            return pb.AddImagesRequest(
                images=[pb.ImageInput(id=str(i), vector=build(v)) for i, v in enumerate(batch)]
            )

        wire = request().SerializeToString()

        def server_read(wire: bytes = wire) -> np.ndarray:
            images = pb.AddImagesRequest.FromString(wire).images
            vectors = [read_vector(vector_input(m.vector.values, m.vector.float32_le), "v") for m in images]
            return as_matrix(vectors, batch.shape[1])  # type: ignore[arg-type]

        forms[form] = {
            "client build ms": best_ms(request),
            "client serialise ms": best_ms(request().SerializeToString),
            "server parse + read ms": best_ms(server_read),
        }
    return forms


def matrix_ms(batch: np.ndarray) -> dict[str, float]:
    """One batch's vectors, read from packed bytes, made into one matrix: by ``np.stack`` (which
    makes a view of every row first) and by the server's ``as_matrix`` (one concatenation)."""
    rows = [np.frombuffer(v.astype("<f4").tobytes(), dtype="<f4") for v in batch]
    return {
        "np.stack ms": best_ms(lambda: np.stack(rows), 100),
        "as_matrix ms": best_ms(lambda: as_matrix(rows, batch.shape[1]), 100),
    }


def searches_during_ingest(
    engine: Engine, batches: list[list[ImageItem]], dim: int, name: str = "searched", index_type: str = "flat"
) -> dict[str, float]:
    """Search latency on a collection while one caller adds to it, against the same searches idle:
    what a commit's fsync, the index's storage growing, and for HNSW its inserts cost the readers
    (the first 20 batches fill it, the rest are added)."""
    engine.create_collection(NewCollection(name, extractor=f"vectors-{dim}", index_type=index_type))
    for batch in batches[:20]:
        engine.add_images(name, batch)
    query = SearchQuery(collection=name, vector=batches[0][0].vector, top_k=10)

    def search_times(until: Callable[[], bool]) -> list[float]:
        times = []
        while not until():
            started = time.perf_counter()
            engine.search(query)
            times.append((time.perf_counter() - started) * 1000)
        return times

    deadline = time.monotonic() + 2
    idle = search_times(lambda: time.monotonic() > deadline)
    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        adding = pool.submit(lambda: [engine.add_images(name, batch) for batch in batches[20:]])
        busy = search_times(adding.done)
        adding.result()
        elapsed = time.perf_counter() - started
    return {
        "idle p50 ms": percentile(idle, 50),
        "idle p99 ms": percentile(idle, 99),
        "during ingest p50 ms": percentile(busy, 50),
        "during ingest p99 ms": percentile(busy, 99),
        "during ingest max ms": max(busy),  # the longest wait: once, an index update that copied it all
        "ingest vectors/s": sum(len(batch) for batch in batches[20:]) / elapsed,
    }


def hnsw_searches_during_ingest(engine: Engine, batches: list[list[ImageItem]], dim: int) -> dict[str, dict]:
    """``searches_during_ingest`` on HNSW, its adds applied in pieces as the server does
    (vector_index.HNSW_PIECE_S) and in one piece a batch, as before: what the pieces give the
    searches and cost the ingest, same data, same run."""
    found = {}
    for way, piece_s in (("pieces", vector_index.HNSW_PIECE_S), ("one piece", 1e9)):
        saved, vector_index.HNSW_PIECE_S = vector_index.HNSW_PIECE_S, piece_s
        try:
            found[way] = searches_during_ingest(engine, batches, dim, f"hnsw-{len(found)}", "hnsw")
        finally:
            vector_index.HNSW_PIECE_S = saved
    return found


def insert_while_python_runs(
    vectors: np.ndarray, directory: Path, batches: int = 8
) -> dict[str, dict[str, float]]:
    """Rows/s of the store's rows inserted by ``executemany`` (one statement a row) and by
    ``store.insert_many`` (one statement a batch), alone and while another thread runs Python.
    Python's sqlite3 lets go of the GIL around every statement and must win it back, from a
    thread that gives it up only every switch interval (5 ms)."""
    ways: dict[str, Callable[[sqlite3.Connection, list[tuple]], None]] = {
        "executemany": insert_rows_one_by_one,
        "insert_many": lambda conn, rows: insert_many(conn, BARE_INSERT, rows),
    }
    results: dict[str, dict[str, float]] = {}
    for way, insert in ways.items():
        for load in ("alone", "while a thread runs Python"):
            conn = bare_store(directory / f"{way}-{len(results.get(way, {}))}.sqlite3")
            stop = threading.Event()

            def busy(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    sum(i * i for i in range(1000))

            hog = threading.Thread(target=busy)
            if load != "alone":
                hog.start()
            results.setdefault(way, {})[load] = bare_insert_rate(conn, vectors[: batches * 256], insert)
            stop.set()
            if hog.is_alive():
                hog.join()
            conn.close()
    return results


def minimal_pipeline(vectors: np.ndarray, directory: Path, page_size: int) -> dict[str, float]:
    """Rows/s of ``MinimalPipeline`` in this process, fed the batches as serialised requests,
    against the bare insert of the same rows, same page size, same run: how close any server
    could come with no gRPC at all."""
    directory.mkdir(exist_ok=True)
    wire = add_requests(vectors)
    started = time.perf_counter()
    pipeline = MinimalPipeline(directory / f"pipeline-{page_size}.sqlite3", page_size, vectors.shape[1])
    for message in wire:
        pipeline.put(message)
    pipeline.finish()
    rate = len(vectors) / (time.perf_counter() - started)
    conn = bare_store(directory / f"bare-{page_size}.sqlite3", page_size)
    bare = bare_insert_rate(conn, vectors)
    conn.close()
    return {"minimal pipeline rows/s": rate, "bare insert rows/s": bare, "ratio": rate / bare}


def page_size_trade(vectors: np.ndarray, directory: Path, batch: int = 256) -> dict[int, dict[str, float]]:
    """The store at SQLite's default 4 KiB pages and at the size it picks for these vectors
    (``store.page_size_for``): rows/s of its durable insert in batches, and the p50 of reading 10
    random rows' hit fields (``rows_by_row_id``, what every search does for its hits) once all are in."""
    rng = np.random.default_rng(1)
    picks = [rng.integers(1, len(vectors) + 1, 10).tolist() for _ in range(2000)]
    trade = {}
    for size in (4096, page_size_for(vectors.shape[1])):
        store = CollectionStore(directory / f"pages-{size}.sqlite3", page_size=size)
        rows = [
            [
                NewImage(id=str(start + i), label="", vector=v)
                for i, v in enumerate(vectors[start : start + batch])
            ]
            for start in range(0, len(vectors), batch)
        ]
        started = time.perf_counter()
        for chunk in rows:
            store.insert(chunk)
        rate = len(vectors) / (time.perf_counter() - started)
        reads = []
        for pick in picks:
            began = time.perf_counter()
            store.rows_by_row_id(pick)
            reads.append((time.perf_counter() - began) * 1e6)
        store.close()
        trade[size] = {"insert rows/s": rate, "10 hit rows p50 us": percentile(reads, 50)}
    return trade


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--callers", default="1,4")
    parser.add_argument(
        "--hnsw-batches", type=int, default=20, help="batches added to the HNSW collections (0: no HNSW part)"
    )
    args = parser.parse_args()
    dim = 1280
    base = np.random.default_rng(0).normal(size=(args.n, dim)).astype(np.float32)
    batches = [
        [ImageItem(id=str(start + i), vector=v) for i, v in enumerate(base[start : start + 256])]
        for start in range(0, args.n, 256)
    ]
    results: dict = {}
    print(f"machine: {machine()}; {args.n} x {dim} vectors, batches of 256, in-process Engine.add_images")
    results["message_forms"] = message_forms(base[:256])
    for form, costs in results["message_forms"].items():
        print(f"one batch as {form}: " + ", ".join(f"{stage} {ms:.2f}" for stage, ms in costs.items()))
    results["matrix_ms"] = matrix_ms(base[:256])
    print(
        "one batch's vectors (256, packed) into one matrix: "
        + ", ".join(f"{way} {ms:.3f}" for way, ms in results["matrix_ms"].items())
    )
    with tempfile.TemporaryDirectory() as tmp:
        results["minimal_pipeline"] = [
            minimal_pipeline(base, Path(tmp) / str(run), 32768) for run in range(3)
        ]
        for run in results["minimal_pipeline"]:
            print(
                f"the minimal durable pipeline, {page_size_for(dim) // 1024} KiB pages: {run['minimal pipeline rows/s']:.0f} rows/s against "
                f"the bare insert's {run['bare insert rows/s']:.0f}: {run['ratio']:.2f}x"
            )
        results["page_sizes"] = page_size_trade(base, Path(tmp))
        for size, trade in results["page_sizes"].items():
            print(
                f"the store at {size // 1024} KiB pages: {trade['insert rows/s']:.0f} rows/s inserted, "
                f"10 hits' rows read in {trade['10 hit rows p50 us']:.0f} us p50"
            )
        results["insert_while_python_runs"] = insert_while_python_runs(base, Path(tmp))
        for way, rates in results["insert_while_python_runs"].items():
            print(f"rows/s by {way}: " + ", ".join(f"{load} {rate:.0f}" for load, rate in rates.items()))
        config = ServerConfig(
            port=0,
            data_dir=Path(tmp) / "data",
            models_dir=default_models_dir().resolve(),
            create_default_collection=False,
            log_level="WARNING",
        )
        with run_server(config, extra_plugins=[("bench", VectorPlugin(dim))]) as running:
            engine = running.engine
            for callers in (int(c) for c in args.callers.split(",")):
                name = f"ingest-{callers}"
                engine.create_collection(NewCollection(name, extractor=f"vectors-{dim}"))
                cpu, started = cpu_seconds(), time.perf_counter()
                with timed_stages() as totals, ThreadPoolExecutor(callers) as pool:
                    list(pool.map(lambda batch, n=name: engine.add_images(n, batch), batches))
                elapsed = time.perf_counter() - started
                per_batch = {stage: seconds * 1000 / len(batches) for stage, seconds in totals.items()}
                row = {
                    "vectors_s": args.n / elapsed,
                    "cpu_cores": (cpu_seconds() - cpu) / elapsed,
                    "ms_per_batch": {
                        "store insert + commit": per_batch["store insert + commit"],
                        "FAISS add": per_batch["FAISS add"],
                        "rest of Collection.add": per_batch["collection"]
                        - per_batch["store insert + commit"]
                        - per_batch["FAISS add"],
                        "engine validation and rows": per_batch["engine"] - per_batch["collection"],
                        "engine.add_images in all": per_batch["engine"],
                    },
                }
                results[callers] = row
                stages = ", ".join(f"{stage} {ms:.2f}" for stage, ms in row["ms_per_batch"].items())
                print(
                    f"{callers} caller(s): {row['vectors_s']:.0f} vectors/s, {row['cpu_cores']:.2f} cores; "
                    f"ms a batch (summed over callers): {stages}"
                )
            results["searches"] = searches_during_ingest(engine, batches, dim)
            print(
                f"searches of a {20 * 256}-vector collection while one caller adds {len(batches) - 20} batches to "
                "it: " + ", ".join(f"{stage} {ms:.2f}" for stage, ms in results["searches"].items())
            )
            hnsw_batches = batches[: 20 + args.hnsw_batches]
            results["hnsw_searches"] = (
                hnsw_searches_during_ingest(engine, hnsw_batches, dim) if args.hnsw_batches else {}
            )
            for way, found in results["hnsw_searches"].items():
                print(
                    f"the same on HNSW, {args.hnsw_batches} batches added, {way}: "
                    + ", ".join(f"{stage} {value:.2f}" for stage, value in found.items())
                )
    save("ingest_stages", results)


if __name__ == "__main__":
    main()
