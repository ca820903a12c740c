"""What the server package sets in its process's environment before its libraries load, and that
it takes effect: FAISS's OpenMP threads sleep as soon as a search is done instead of spinning
(on shared cores, spinning teams made 16 concurrent searches slower than one; bench/README.md)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.process import REPO

SPIN_PROBE = """
import time
import imagesearch.server  # first, as `imagesearch serve` imports it
import faiss
import numpy as np
vectors = np.random.default_rng(0).random((20000, 64), dtype=np.float32)
index = faiss.IndexFlatL2(64)
index.add(vectors)
faiss.omp_set_num_threads(2)
idle = 0.0
for _ in range(20):
    index.search(vectors[:64], 10)  # a parallel loop on two threads
    started = time.process_time()
    time.sleep(0.005)
    idle += time.process_time() - started
print(idle / 20 * 1000)
"""


def run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_server_package_sets_its_defaults_and_keeps_the_operators() -> None:
    shown = "import imagesearch.server, os; print(os.environ['OMP_WAIT_POLICY'], os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    assert run(shown) == "PASSIVE 4"
    assert run(shown, OMP_WAIT_POLICY="ACTIVE", OPENBLAS_THREAD_TIMEOUT="28") == "ACTIVE 28"


def test_faiss_threads_use_no_cpu_between_searches() -> None:
    """libgomp's default kept a thread spinning through each 5 ms pause after a search (about
    4.7 ms of CPU a pause on the project VM); with the server's default, next to none."""
    assert float(run(SPIN_PROBE)) < 1.0
    assert float(run(SPIN_PROBE, GOMP_SPINCOUNT="300000")) > 1.5  # the probe sees spinning
