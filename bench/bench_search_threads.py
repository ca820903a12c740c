"""Which thread calls FAISS, with how many OpenMP threads, and what a lone query costs without
FAISS: the settings behind the server's one index thread (server/batching.py), ``search_threads``
and ``GEMV_MAX_QUERIES`` (server/vector_index.py), and OPENBLAS_THREAD_TIMEOUT (server/__init__.py).

Prints single-query p50 of the server's own ``VectorIndex.search`` over flat cosine indexes of 32,
2,000 and 20,000 x 1280 vectors, each query after a 2 ms pause as a server's would be:
1. through FAISS, 1 against 2 OpenMP threads, called from one thread (what the index thread does);
2. through FAISS, 2 OpenMP threads called from a pool of 64 threads, whichever is free (what
   searches led by whichever worker thread came first did): each calling thread gets its own
   OpenMP team, and teams left spinning take the cores from the current one;
3. as the server runs a lone query on such an index: NumPy's matrix-vector product (sgemv).
Then one query over the 20,000 vectors scanned by FAISS as two halves on two threads at once;
what the exact ranking of a flat search costs (``VectorIndex.search``, which scores its scan's
candidates exactly, against FAISS's own search of the same batch, for batches and k a server
meets); what a query costs that the scan cannot settle (``exact_top_k`` scores it against every
vector); and the CPU NumPy's OpenBLAS spends spinning after one product, with its default thread
timeout and with the server's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, percentile, save
from imagesearch.plugins import FLAT, l2_normalize
from imagesearch.plugins.metrics import COSINE, INNER_PRODUCT, L2
from imagesearch.server import vector_index
from imagesearch.server.vector_index import IndexSpec, VectorIndex


def p50_ms(
    index: VectorIndex, queries: np.ndarray, threads: int, pool: ThreadPoolExecutor, gemv: bool = False
) -> float:
    vector_index.search_threads = lambda *_: threads  # what VectorIndex.search asks at each call
    vector_index.GEMV_MAX_QUERIES = 2 if gemv else 0  # 0: every query goes to FAISS

    def one(query: np.ndarray) -> float:
        started = time.perf_counter()
        index.search(query[None], 10)
        return (time.perf_counter() - started) * 1000

    times = []
    for query in queries:
        time.sleep(0.002)
        times.append(pool.submit(one, query).result())
    return percentile(times, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    queries = l2_normalize(rng.normal(size=(args.queries, 1280)).astype(np.float32))
    one_thread, many_threads = ThreadPoolExecutor(1), ThreadPoolExecutor(64)
    results: dict = {}
    print(f"machine: {machine()}; faiss {faiss.__version__}; p50 ms of one query after a 2 ms pause")
    print(
        f"{'vectors':>8}{'FAISS 1 thread':>16}{'2 threads':>11}{'2 threads from a 64-thread pool':>33}"
        f"{'sgemv (the server)':>20}"
    )
    for size in (32, 2000, 20000):
        index = VectorIndex(IndexSpec(FLAT, 1280, COSINE))
        index.add(np.arange(size), l2_normalize(rng.normal(size=(size, 1280)).astype(np.float32)))
        list(many_threads.map(lambda q, i=index: i.search(q[None], 10), queries[:128]))  # a team each
        row = {
            "1": p50_ms(index, queries, 1, one_thread),
            "2": p50_ms(index, queries, 2, one_thread),
            "2_from_pool": p50_ms(index, queries, 2, many_threads),
            "gemv": p50_ms(index, queries, 2, one_thread, gemv=True),
        }
        results[size] = row
        print(f"{size:8d}{row['1']:16.3f}{row['2']:11.3f}{row['2_from_pool']:33.3f}{row['gemv']:20.3f}")
    split = split_scan_p50_ms(index, queries)  # the 20,000-vector index
    print(
        f"20,000 vectors, one query's FAISS scan split in two halves on two threads (1 OpenMP thread "
        f"each): {split:.3f}"
    )
    l2_index = VectorIndex(IndexSpec(FLAT, 1280, L2))  # the same 20,000 vectors, by L2
    l2_index.add(np.arange(index.size), index.faiss_index.reconstruct_n(0, index.size))
    ranking = {"cosine": exact_ranking_ms(index, queries), "l2": exact_ranking_ms(l2_index, queries)}
    for metric, rows in ranking.items():
        print(
            f"20,000 vectors by {metric}, the exact ranking's cost, p50 ms of VectorIndex.search against "
            "FAISS's own search of the same batch (2 OpenMP threads): "
            + "; ".join(
                f"{found['queries']} queries, k {found['k']}: {found['server']:.2f} against {found['faiss']:.2f}"
                for found in rows
            )
        )
    unsettled = unsettled_ms(index, l2_index, queries)
    print(
        "20,000 x 1280 vectors, queries the float32 scan cannot settle (scored against every vector "
        "in float64), p50 ms of VectorIndex.search against an ordinary query on the same index and "
        "FAISS's own search: "
        + "; ".join(
            f"{row['case']}: {row['server']:.2f} against {row['ordinary']:.2f} and FAISS {row['faiss']:.2f}"
            for row in unsettled
        )
    )
    spin = {timeout or "default": blas_spin(timeout) for timeout in ("", "4")}
    print(
        "NumPy's OpenBLAS, one 20,000 x 1280 matrix-vector product: "
        + "; ".join(
            f"OPENBLAS_THREAD_TIMEOUT={name}: {found['spin_cpu_ms']:.1f} ms of CPU spinning in the 200 ms "
            f"after it, the product {found['product_p50_ms']:.2f} ms p50"
            for name, found in spin.items()
        )
    )
    save(
        "search_threads",
        {
            "p50_ms": results,
            "split_scan_p50_ms": split,
            "exact_ranking_ms": ranking,
            "unsettled_ms": unsettled,
            "blas_spin": spin,
        },
    )


SPIN_PROBE = """
import resource, statistics, time, numpy as np
base, query = np.ones((20000, 1280), np.float32), np.ones(1280, np.float32)
times = []
for _ in range(30):
    time.sleep(0.002)
    started = time.perf_counter()
    base @ query
    times.append((time.perf_counter() - started) * 1000)
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
before = cpu()
time.sleep(0.2)
print((cpu() - before) * 1000, statistics.median(times))
"""


def blas_spin(timeout: str) -> dict[str, float]:
    """CPU spent by a fresh process in the 200 ms after a matrix-vector product, and the product's
    p50 after a 2 ms pause (the variable is read when NumPy loads, hence a process each)."""
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_THREAD_TIMEOUT"}
    if timeout:
        env["OPENBLAS_THREAD_TIMEOUT"] = timeout
    done = subprocess.run(
        [sys.executable, "-c", SPIN_PROBE], env=env, capture_output=True, text=True, check=True
    )
    spun, product = (float(value) for value in done.stdout.split())
    return {"spin_cpu_ms": spun, "product_p50_ms": product}


def exact_ranking_ms(index: VectorIndex, queries: np.ndarray) -> list[dict[str, float]]:
    """p50 of the server's search (scan, then exact scores of k + EXACT_MARGIN candidates) and of
    FAISS's own search alone, the two interleaved, for batches of (queries, k)."""
    vector_index.search_threads = lambda *_: 2
    faiss.omp_set_num_threads(2)
    pool = np.resize(
        queries, (256, queries.shape[1])
    )  # as many as the largest batch (repeats past --queries)
    found = []
    for size, k in ((16, 10), (256, 10), (256, 100), (64, 1000)):
        times: dict[str, list[float]] = {"server": [], "faiss": []}
        for round_ in range(5):
            batch = np.ascontiguousarray(np.roll(pool, round_ * 7, axis=0)[:size])
            for name, search in (("server", index.search), ("faiss", index.faiss_index.search)):
                started = time.perf_counter()
                search(batch, k)
                times[name].append((time.perf_counter() - started) * 1000)
        found.append({"queries": size, "k": k} | {name: percentile(t, 50) for name, t in times.items()})
    return found


def unsettled_ms(index: VectorIndex, l2_index: VectorIndex, queries: np.ndarray) -> list[dict]:
    """What queries cost that the exact ranking must score against the whole pool: the zero vector
    by inner product (it ties every vector), alone and 16 at once (one pass: identical queries are
    answered once); 16 distinct queries orthogonal to every vector (the vectors use the first half
    of the dimensions, the queries the second: every score is 0); and L2 queries in a tight cluster
    10^4 from the origin (every distance within the scan's rounding), 1, 16 and 64 distinct. Each
    against ordinary queries of the same number (random unit vectors: by inner product on the same
    index, by L2 on the same vectors near the origin, ``l2_index``), and FAISS's own search of the
    batch, interleaved, k 10."""
    vector_index.search_threads = lambda *_: 2
    vector_index.GEMV_MAX_QUERIES = 2
    faiss.omp_set_num_threads(2)
    vectors = index.faiss_index.reconstruct_n(0, index.size)
    by_ip, half = (
        VectorIndex(IndexSpec(FLAT, 1280, INNER_PRODUCT)),
        VectorIndex(IndexSpec(FLAT, 1280, INNER_PRODUCT)),
    )
    by_ip.add(np.arange(len(vectors)), vectors)
    first_half = vectors.copy()
    first_half[:, 640:] = 0
    half.add(np.arange(len(vectors)), first_half)
    orthogonal = queries[:16].copy()
    orthogonal[:, :640] = 0
    rng = np.random.default_rng(1)
    center = rng.normal(size=1280) * 1e4
    far = VectorIndex(IndexSpec(FLAT, 1280, L2))
    far.add(np.arange(len(vectors)), (center + rng.normal(size=vectors.shape) * 1e-2).astype(np.float32))
    near_far = (center + rng.normal(size=(64, 1280)) * 1e-2).astype(np.float32)
    zeros = np.zeros((16, 1280), np.float32)
    cases = (
        ("the zero vector by inner product, 1", by_ip, zeros[:1], by_ip, queries[:1]),
        ("the zero vector by inner product, 16", by_ip, zeros, by_ip, queries[:16]),
        ("queries orthogonal to every vector, 16 distinct", half, orthogonal, by_ip, queries[:16]),
        ("L2 far from the origin, 1", far, near_far[:1], l2_index, queries[:1]),
        ("L2 far from the origin, 16 distinct", far, near_far[:16], l2_index, queries[:16]),
        ("L2 far from the origin, 64 distinct", far, near_far, l2_index, queries[:64]),
    )
    found = []
    for case, target, hard, usual, easy in cases:
        times: dict[str, list[float]] = {"server": [], "ordinary": [], "faiss": []}
        for _ in range(5):
            for name, search, batch in (
                ("server", target.search, hard),
                ("ordinary", usual.search, easy),
                ("faiss", target.faiss_index.search, hard),
            ):
                started = time.perf_counter()
                search(batch, 10)
                times[name].append((time.perf_counter() - started) * 1000)
        found.append({"case": case} | {name: percentile(t, 50) for name, t in times.items()})
    return found


def split_scan_p50_ms(index: VectorIndex, queries: np.ndarray) -> float:
    """One query over a flat index scanned as two halves at once, one per core (FAISS's
    IDSelectorRange makes each call scan only its half), the results merged: what intra-query
    parallelism would give, against the one- and two-thread rows above."""
    flat = faiss.downcast_index(index.faiss_index.index)
    halves = ThreadPoolExecutor(2)
    list(halves.map(lambda _: faiss.omp_set_num_threads(1), range(8)))
    bounds = [(0, flat.ntotal // 2), (flat.ntotal // 2, flat.ntotal)]

    def half(query: np.ndarray, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParameters(sel=faiss.IDSelectorRange(low, high))
        return flat.search(query[None], 10, params=params)

    times = []
    for query in queries:
        time.sleep(0.002)
        started = time.perf_counter()
        parts = list(halves.map(lambda b, q=query: half(q, *b), bounds))
        scores = np.concatenate([p[0] for p in parts], axis=1)
        np.argsort(-scores, axis=1)[:, :10]
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 50)


if __name__ == "__main__":
    main()
