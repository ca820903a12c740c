"""Index throughput through the server vs raw FAISS on the same vectors, in the same run.

Adds (bring-your-own vectors, batches of 256) and single-query top-10 searches on a flat cosine
collection, through gRPC on localhost, against `faiss.IndexFlatIP` on the same normalised data.
Prints a table of rates and the server/raw ratio; writes bench/results/index.{json,png}.

    .venv/bin/python bench/bench_index.py [--n 20000] [--dim 1280] [--queries 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import faiss
import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import VectorPlugin, add_data_arguments, bar_plot, best_rate, machine, random_data, save
from imagesearch.client import float_vector
from imagesearch.plugins import l2_normalize
from imagesearch.server.app import run_server
from imagesearch.server.config import ServerConfig
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, queries=300)
    args = parser.parse_args()
    base, queries = random_data(args)
    batches = [base[i : i + 256] for i in range(0, args.n, 256)]

    def raw_add() -> int:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(args.dim))
        for start, batch in zip(range(0, args.n, 256), batches, strict=True):
            index.add_with_ids(l2_normalize(batch), np.arange(start, start + len(batch), dtype=np.int64))
        raw_add.index = index
        return args.n

    def raw_search() -> int:
        for query in queries:
            raw_add.index.search(l2_normalize(query[None]), 10)
        return len(queries)

    results: dict[str, dict[str, float]] = {"raw FAISS": {}, "server (gRPC)": {}}
    results["raw FAISS"]["add vectors/s"] = best_rate(raw_add, 1)
    results["raw FAISS"]["search queries/s"] = best_rate(raw_search)

    with tempfile.TemporaryDirectory() as tmp:
        plugin = VectorPlugin(args.dim)
        config = ServerConfig(
            port=0, data_dir=Path(tmp), default_extractor=plugin.extractor.name, log_level="WARNING"
        )
        with run_server(config, extra_plugins=[("bench", plugin)]) as running:
            options = [
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ]
            with grpc.insecure_channel(running.target, options=options) as channel:
                stub = pb_grpc.ImageSearchServiceStub(channel)

                def server_add() -> int:
                    for start, batch in zip(range(0, args.n, 256), batches, strict=True):
                        images = [
                            pb.ImageInput(id=str(start + i), vector=float_vector(v))
                            for i, v in enumerate(batch)
                        ]
                        stub.AddImages(pb.AddImagesRequest(images=images))
                    return args.n

                def server_search() -> int:
                    for query in queries:
                        stub.Search(pb.SearchRequest(vector=float_vector(query), top_k=10))
                    return len(queries)

                results["server (gRPC)"]["add vectors/s"] = best_rate(server_add, 1)
                results["server (gRPC)"]["search queries/s"] = best_rate(server_search)
                hits = stub.Search(pb.SearchRequest(vector=pb.FloatVector(values=base[5]), top_k=1)).hits
                assert hits[0].id == "5", "benchmark sanity: a stored vector finds itself"

    print(f"machine: {machine()}")
    print(f"data: {args.n} vectors x {args.dim} dims, flat cosine, top-10, {args.queries} single queries")
    print(f"{'':22}{'raw FAISS':>14}{'server (gRPC)':>16}{'ratio':>8}")
    for key in ("add vectors/s", "search queries/s"):
        raw, server = results["raw FAISS"][key], results["server (gRPC)"][key]
        print(f"{key:22}{raw:14.1f}{server:16.1f}{server / raw:8.2f}")
    save("index", {"n": args.n, "dim": args.dim, "results": results})
    labels = ["add vectors/s", "search queries/s"]
    path = bar_plot(
        "index",
        f"flat cosine, {args.n} x {args.dim}",
        labels,
        {k: [v[label] for label in labels] for k, v in results.items()},
        "items / second (log scale)",
        log=True,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
