"""A flat collection's three storages through the server: memory, search time and recall.

Adds the same 20,000 x 1280 random vectors (cosine) to a float32, a float16 and an int8
collection of a server in its own process, then for each prints ``index_bytes`` from
GetCollection, one caller's search-by-vector p50 (top 10) and recall@10 against the float32
collection's hits (float32 flat is exact). Next to them, raw FAISS on the same prepared
vectors: single-query p50 of IndexFlatIP and of IndexScalarQuantizer fp16 / 8bit trained by FAISS
on the first 1,000 vectors (best of 1 and 2 threads), each index's own recall@10, and how much of
the true top 10 its top 40 holds (what the server's float32 re-scoring of int8 candidates starts
from). Then, raw FAISS only, the same
recalls on vectors clustered ever more tightly around one direction, where a fixed int8 grid can
no longer tell neighbours apart and the server's learnt one still can.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_data_arguments, machine, percentile, random_data, save
from bench.server_process import server_process
from imagesearch.client import float_vector
from imagesearch.plugins import l2_normalize
from imagesearch.plugins.metrics import COSINE
from imagesearch.plugins.types import FLAT
from imagesearch.server.config import ServerConfig
from imagesearch.server.vector_index import (
    INT8,
    INT8_LEARN_SIZE,
    INT8_RANGE,
    IndexSpec,
    VectorIndex,
    rescore_pool,
)
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc

STORAGES = {
    "float32": (pb.VECTOR_STORAGE_FLOAT32, None),
    "float16": (pb.VECTOR_STORAGE_FLOAT16, faiss.ScalarQuantizer.QT_fp16),
    "int8": (pb.VECTOR_STORAGE_INT8, faiss.ScalarQuantizer.QT_8bit),
}


def recall_at_10(truth: list[list[str]] | np.ndarray, found: list[list[str]] | np.ndarray) -> float:
    return float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)]))


def raw_faiss(base: np.ndarray, queries: np.ndarray) -> dict[str, dict[str, float]]:
    """Single-query p50 (best of 1 and 2 OpenMP threads) and recall@10 of each raw FAISS index."""
    prepared, asked = l2_normalize(base), l2_normalize(queries)
    figures: dict[str, dict[str, float]] = {}
    truth = None
    for name, (_, kind) in STORAGES.items():
        if kind is None:
            index = faiss.IndexFlatIP(base.shape[1])
        else:
            index = faiss.IndexScalarQuantizer(base.shape[1], kind, faiss.METRIC_INNER_PRODUCT)
            # FAISS's own training (each dimension's min and max) on the vectors the server learns
            # its int8 grid from (without the server's headroom and outliers; float16 needs none)
            index.train(prepared[:INT8_LEARN_SIZE])
        index.add(prepared)
        best = float("inf")
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            times = []
            for query in asked:
                started = time.perf_counter()
                index.search(query[None], 10)
                times.append((time.perf_counter() - started) * 1000)
            best = min(best, percentile(times, 50))
        faiss.omp_set_num_threads(2)
        _, found = index.search(asked, rescore_pool(10))
        truth = found[:, :10] if truth is None else truth
        figures[name] = {
            "p50_ms": best,
            "recall_at_10": recall_at_10(truth, found[:, :10]),
            "top_10_in_candidates": recall_at_10(truth, found),  # what the server's re-scoring starts from
        }
    return figures


CLUSTER_SPREADS = (0.5, 0.3, 0.2, 0.1, 0.05)


def clustered(n: int, dim: int, queries: int) -> list[dict[str, float]]:
    """Recall@10 on vectors clustered around one direction (a common centre plus ``spread`` x
    N(0, 1) noise), where neighbours lie close: raw FAISS float16; int8 on the fixed [-1, 1] grid
    (the design before the grid was learnt) re-scoring its top ``rescore_pool(10)``; and the
    server's int8 index (``VectorIndex``: a grid learnt from the first INT8_LEARN_SIZE vectors),
    re-scoring its top ``rescore_pool(10)`` and its outliers, as ``Collection.search_many`` does.
    Re-scoring exactly keeps exactly the true top 10 that the candidates hold."""
    rng = np.random.default_rng(1)
    rows = []
    for spread in CLUSTER_SPREADS:
        centre = rng.normal(size=dim)
        base = l2_normalize((centre + spread * rng.normal(size=(n, dim))).astype(np.float32))
        asked = l2_normalize((centre + spread * rng.normal(size=(queries, dim))).astype(np.float32))
        exact = faiss.IndexFlatIP(dim)
        exact.add(base)
        nearest, truth = exact.search(asked, 10)
        row = {"spread": spread, "mean_cosine_to_nearest": float(nearest[:, 0].mean())}
        for name, kind, pool in (
            ("float16", faiss.ScalarQuantizer.QT_fp16, 10),
            ("int8_fixed_grid", faiss.ScalarQuantizer.QT_8bit, rescore_pool(10)),
        ):
            index = faiss.IndexScalarQuantizer(dim, kind, faiss.METRIC_INNER_PRODUCT)
            index.train(np.array([[low] * dim for low in INT8_RANGE], np.float32))
            index.add(base)
            row[name] = recall_at_10(truth, index.search(asked, pool)[1])
        learnt = VectorIndex(IndexSpec(kind=FLAT, dim=dim, metric=COSINE, storage=INT8))
        for start in range(0, n, 256):
            learnt.add(np.arange(start, min(start + 256, n)), base[start : start + 256])
        outliers = set(learnt.outliers().tolist())
        found = learnt.search(asked, rescore_pool(10))[1]
        row["int8"] = recall_at_10(truth, [set(ids.tolist()) | outliers for ids in found])
        row["int8_outliers"] = len(outliers)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, queries=200)
    args = parser.parse_args()
    base, queries = random_data(args)
    results: dict = {
        "machine": machine(),
        "n": args.n,
        "dim": args.dim,
        "raw_faiss": raw_faiss(base, queries),
        "clustered": clustered(args.n, args.dim, args.queries),
    }
    server: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(port=0, data_dir=Path(tmp) / "data", log_level="WARNING")
        with (
            server_process(config, vector_dim=args.dim) as running,
            grpc.insecure_channel(running.target) as channel,
        ):
            stub = pb_grpc.ImageSearchServiceStub(channel)
            for name, (storage, _) in STORAGES.items():
                collection = pb.Collection(name=name, extractor=f"vectors-{args.dim}", storage=storage)
                stub.CreateCollection(pb.CreateCollectionRequest(collection=collection))
                for start in range(0, args.n, 256):
                    images = [
                        pb.ImageInput(id=str(start + i), vector=float_vector(v))
                        for i, v in enumerate(base[start : start + 256])
                    ]
                    stub.AddImages(pb.AddImagesRequest(collection=name, images=images))
            answers: dict[str, list[list[str]]] = {}
            for name in STORAGES:
                times, answers[name] = [], []
                for query in queries:
                    request = pb.SearchRequest(collection=name, vector=float_vector(query), top_k=10)
                    started = time.perf_counter()
                    hits = stub.Search(request).hits
                    times.append((time.perf_counter() - started) * 1000)
                    answers[name].append([hit.id for hit in hits])
                info = stub.GetCollection(pb.GetCollectionRequest(name=name)).collection
                server[name] = {
                    "index_bytes": info.index_bytes,
                    "p50_ms": percentile(times, 50),
                    "recall_at_10": recall_at_10(answers["float32"], answers[name]),
                }
    results["server"] = server
    print(f"machine: {results['machine']}")
    print(
        f"data: {args.n} x {args.dim} random vectors, flat cosine, top 10, one caller, {args.queries} queries"
    )
    print(
        f"{'storage':>8}{'index MB':>10}{'server p50 ms':>15}{'recall@10':>11}{'raw FAISS p50 ms':>18}"
        f"{'raw recall@10':>15}{'raw top 10 in ' + str(rescore_pool(10)):>19}"
    )
    for name in STORAGES:
        s, r = server[name], results["raw_faiss"][name]
        print(
            f"{name:>8}{s['index_bytes'] / 1e6:10.1f}{s['p50_ms']:15.2f}{s['recall_at_10']:11.4f}"
            f"{r['p50_ms']:18.2f}{r['recall_at_10']:15.4f}{r['top_10_in_candidates']:19.4f}"
        )
    print(
        f"clustered vectors (centre + spread x N(0, 1)), recall@10: raw FAISS float16; int8 on a fixed "
        f"[-1, 1] grid re-scoring its top {rescore_pool(10)}; the server's int8 (learnt grid) re-scoring "
        f"its top {rescore_pool(10)} and its outliers"
    )
    print(
        f"{'spread':>8}{'mean cos to nearest':>21}{'float16':>9}{'int8 fixed':>12}{'int8':>8}{'outliers':>10}"
    )
    for row in results["clustered"]:
        print(
            f"{row['spread']:8.2f}{row['mean_cosine_to_nearest']:21.4f}{row['float16']:9.4f}"
            f"{row['int8_fixed_grid']:12.4f}{row['int8']:8.4f}{row['int8_outliers']:10d}"
        )
    save("storage", results)


if __name__ == "__main__":
    main()
