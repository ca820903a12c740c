"""Copy detection on the offline copy set: mAP and recall@1 of SIFT-BoVW, SIFT-VLAD (generic and
refitted vocabulary, each with and without geometric re-ranking), the CNN and the CNN + SIFT hybrid.

    IMAGESEARCH_MODELS=var/models .venv/bin/python bench/copy_detection.py [--rerank 10 50] [--top-k 10]

Builds the copy set (server/copy_detection.py) in a temporary folder, starts a server in-process on
a free port, indexes the originals once per method family, searches every copy with every method,
prints the tables docs/evaluation.md shows and saves bench/results/copy_detection.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, save
from imagesearch.client import ImageSearchClient
from imagesearch.server.app import run_server
from imagesearch.server.config import ServerConfig
from imagesearch.server.copy_detection import build_copy_set
from imagesearch.server.copy_eval import (
    DEFAULT_RERANK,
    DEFAULT_TOP_K,
    evaluate,
    prepare,
    render_markdown,
    setups_and_methods,
)
from imagesearch.server.progress import ProgressLine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rerank",
        type=int,
        nargs="+",
        default=[DEFAULT_RERANK, 50],
        help="re-ranking depths: candidates verified geometrically (default: 10, and the server's default 50)",
    )
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="hits per query (AP is 0 past them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the copy set and of the vocabulary fits")
    parser.add_argument(
        "--sift-max-side",
        type=int,
        default=0,
        help="[plugins.sift] max_side for this run (0: the default, 640)",
    )
    args = parser.parse_args()
    setups, methods = setups_and_methods(args.rerank)
    with tempfile.TemporaryDirectory() as tmp:
        copies = build_copy_set(Path(tmp) / "copies", seed=args.seed)
        sift = {"max_side": args.sift_max_side} if args.sift_max_side else {}
        config = ServerConfig(
            port=0, data_dir=Path(tmp) / "data", log_level="WARNING", plugins={"sift": sift}
        )
        with run_server(config) as running, ImageSearchClient(running.target) as client:
            prepare(client, copies, setups, seed=args.seed)
            progress = ProgressLine(unit="searches", label="copy detection")
            report = evaluate(client, copies, methods, top_k=args.top_k, progress=progress)
            progress.close()
    report.settings.update(
        {
            "rerank": ",".join(map(str, args.rerank)),
            "seed": args.seed,
            "queries": len(copies.queries),
            "sift_max_side": args.sift_max_side or 640,
        }
    )
    print(
        f"\n{len(copies.originals)} originals, {len(copies.queries)} copies; re-ranking depths {args.rerank}, "
        f"top {args.top_k}; SIFT max_side {args.sift_max_side or 640}; {machine()}\n"
    )
    print(render_markdown(report))
    path = save("copy_detection", {"report": report.to_json()})
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
