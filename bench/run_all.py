"""Run every benchmark in turn (`make bench`); each prints its own table and writes bench/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "bench_index.py",
    "bench_extract.py",
    "bench_concurrency.py",
    "bench_search_threads.py",
    "bench_ingest_stages.py",
    "bench_storage.py",
    "bench_hnsw_removals.py",
    "bench_buckets.py",
    "bench_sift.py",
]


def main() -> int:
    failed = 0
    for script in SCRIPTS:
        print(f"\n=== {script} ===", flush=True)
        failed |= subprocess.call([sys.executable, str(HERE / script)]) != 0
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
