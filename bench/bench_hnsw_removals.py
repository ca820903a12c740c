"""HNSW recall after removals: the server's index, tombstones and all, against a fresh graph.

FAISS's HNSW cannot delete: the server marks removed images as tombstones, filters them out of
every search, and rebuilds the graph once they pass a quarter of it (``needs_compaction``).
Tombstones still take room in the search's beam, so the server widens the beam by their share
(``vector_index.hnsw_beam``). For each share of removed vectors this prints recall@10 (against
an exact float64 search of the live vectors) of the server's ``VectorIndex`` with that beam, of
the same index with the beam left at ``ef_search``, and of raw FAISS ``IndexHNSWFlat`` built
fresh on the live vectors with the same parameters, plus each one's single-query p50.

    .venv/bin/python bench/bench_hnsw_removals.py [--n 10000] [--dim 128] [--queries 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_data_arguments, machine, percentile, random_data, save
from imagesearch.plugins.metrics import L2
from imagesearch.plugins.types import HNSW
from imagesearch.server import vector_index
from imagesearch.server.vector_index import IndexSpec, VectorIndex

SHARES = (0.0, 0.1, 0.2, 0.25)
K = 10


def exact_top(base: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The true top-K ids among ``ids`` by L2, in float64."""
    vectors = base[ids].astype(np.float64)
    distances = (
        (queries.astype(np.float64) ** 2).sum(1)[:, None] - 2 * queries @ vectors.T + (vectors**2).sum(1)
    )
    return ids[np.argsort(distances, axis=1, kind="stable")[:, :K]]


def measured(search, queries: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """recall@K and single-query p50 (ms) of ``search(query) -> ids``."""
    found, times = [], []
    for query in queries:
        started = time.perf_counter()
        found.append(search(query[None, :]))
        times.append((time.perf_counter() - started) * 1000)
    recall = np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)])
    return {"recall": float(recall), "p50_ms": percentile(times, 50)}


def cell(figures: dict[str, float]) -> str:
    return f"{figures['recall']:.3f} ({figures['p50_ms']:.3f} ms)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, queries=300)
    parser.set_defaults(n=10000, dim=128)
    args = parser.parse_args()
    base, queries = random_data(args)
    spec = IndexSpec(kind=HNSW, dim=args.dim, metric=L2)
    index = VectorIndex(spec)
    index.add(np.arange(args.n), base)
    rng = np.random.default_rng(1)
    order = rng.permutation(args.n)
    widened = vector_index.hnsw_beam
    results: dict = {
        "n": args.n,
        "dim": args.dim,
        "hnsw_m": spec.hnsw_m,
        "ef_search": spec.ef_search,
        "rows": [],
    }
    print(f"machine: {machine()}")
    print(
        f"data: {args.n} x {args.dim} random vectors, L2, HNSW m {spec.hnsw_m}, ef_construction "
        f"{spec.ef_construction}, ef_search {spec.ef_search}; recall@{K} and p50 ms of {args.queries} single queries"
    )
    print(
        f"{'removed':>8}{'server, widened beam':>24}{'server, beam ef_search':>26}{'fresh FAISS graph':>22}"
    )
    removed_so_far = 0
    for share in SHARES:
        removing = order[removed_so_far : int(share * args.n)]
        index.remove(removing)  # tombstones (a quarter is the most kept before a rebuild)
        removed_so_far = int(share * args.n)
        live = np.sort(order[removed_so_far:])
        truth = exact_top(base, live, queries)
        server = measured(lambda q: index.search(q, K)[1][0], queries, truth)
        vector_index.hnsw_beam = lambda ef_search, k, held, tombstones: max(ef_search, k)
        try:
            narrow = measured(lambda q: index.search(q, K)[1][0], queries, truth)
        finally:
            vector_index.hnsw_beam = widened
        fresh_graph = faiss.IndexHNSWFlat(args.dim, spec.hnsw_m)
        fresh_graph.hnsw.efConstruction = spec.ef_construction
        fresh_graph.hnsw.efSearch = spec.ef_search
        fresh_graph.add(base[live])
        fresh = measured(lambda q, g=fresh_graph, ids=live: ids[g.search(q, K)[1][0]], queries, truth)
        row = {
            "removed_share": share,
            "server": server,
            "server_beam_ef_search": narrow,
            "fresh_faiss": fresh,
        }
        results["rows"].append(row)
        cells = "".join(f"{cell(m):>{width}}" for m, width in ((server, 24), (narrow, 26), (fresh, 22)))
        print(f"{share:>8.2f}{cells}")
    print(f"wrote {save('hnsw_removals', results)}")


if __name__ == "__main__":
    main()
