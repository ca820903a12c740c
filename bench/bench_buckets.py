"""Label buckets: a search among one label's images of a large collection against a collection
holding only that label's images, same run (bring-your-own vectors through the real server).

The bucket is searched among its own vectors only (fetched by id from the id map, row ids
from the store's label index), so its cost follows the bucket's size, not the collection's.
Prints p50 latencies, their ratio, and BUCKETED mode (classify, then search the bucket) for
reference; writes bench/results/buckets.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import VectorPlugin, machine, p50_ms, save
from imagesearch.client import float_vector
from imagesearch.server.app import run_server
from imagesearch.server.config import ServerConfig
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc

OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def fill(stub, collection: str, vectors: np.ndarray, labels: list[str]) -> None:
    for start in range(0, len(vectors), 256):
        images = [
            pb.ImageInput(id=str(start + i), vector=float_vector(v), label=labels[start + i])
            for i, v in enumerate(vectors[start : start + 256])
        ]
        stub.AddImages(pb.AddImagesRequest(collection=collection, images=images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--per-label", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3, size=(args.labels, args.dim)).astype(np.float32)
    vectors = np.repeat(centres, args.per_label, axis=0) + rng.normal(
        size=(args.labels * args.per_label, args.dim)
    ).astype(np.float32)
    labels = [f"L{i // args.per_label}" for i in range(len(vectors))]
    bucket = "L7"
    inside = vectors[7 * args.per_label : 8 * args.per_label]
    queries = [float_vector(v + rng.normal(scale=0.5, size=args.dim)) for v in inside[: args.queries]]
    queries = (queries * (args.queries // len(queries) + 1))[: args.queries]
    plugin = VectorPlugin(args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(
            port=0, data_dir=Path(tmp), default_extractor=plugin.extractor.name, log_level="WARNING"
        )
        with (
            run_server(config, extra_plugins=[("bench", plugin)]) as running,
            grpc.insecure_channel(running.target, options=OPTIONS) as chan,
        ):
            stub = pb_grpc.ImageSearchServiceStub(chan)
            for name in ("all", "one"):
                stub.CreateCollection(
                    pb.CreateCollectionRequest(
                        collection=pb.Collection(name=name, metric="l2", extractor=plugin.extractor.name)
                    )
                )
            fill(stub, "all", vectors, labels)
            fill(stub, "one", inside, [bucket] * len(inside))
            alone = p50_ms(
                lambda q: stub.Search(pb.SearchRequest(collection="one", vector=q, top_k=10)), queries
            )
            bucket_ms = p50_ms(
                lambda q: stub.Search(
                    pb.SearchRequest(collection="all", vector=q, top_k=10, labels=[bucket])
                ),
                queries,
            )
            whole = p50_ms(
                lambda q: stub.Search(pb.SearchRequest(collection="all", vector=q, top_k=10)), queries[:50]
            )
            bucketed = p50_ms(
                lambda q: stub.Search(
                    pb.SearchRequest(collection="all", vector=q, top_k=10, mode=pb.SEARCH_MODE_BUCKETED)
                ),
                queries[:50],
            )
    results = {
        "labels": args.labels,
        "per_label": args.per_label,
        "dim": args.dim,
        "one_label_collection_p50_ms": alone,
        "bucket_in_large_collection_p50_ms": bucket_ms,
        "ratio": bucket_ms / alone,
        "whole_collection_p50_ms": whole,
        "bucketed_mode_p50_ms": bucketed,
    }
    print(f"machine: {machine()}")
    print(
        f"{args.labels} labels x {args.per_label} vectors, dim {args.dim}, l2, top-10, {args.queries} queries"
    )
    print(
        f"search among one label's {args.per_label} vectors: {bucket_ms:.2f} ms p50 in the large collection, "
        f"{alone:.2f} ms in a collection of only those (ratio {bucket_ms / alone:.2f})"
    )
    print(
        f"for reference: the whole collection {whole:.2f} ms; BUCKETED mode (classify + bucket) {bucketed:.2f} ms"
    )
    save("buckets", results)


if __name__ == "__main__":
    main()
