"""What the server package sets in its process's environment before its libraries load, and that
it takes effect: FAISS's OpenMP threads spin briefly after a search, then sleep, instead of
spinning for ~10 ms (on shared cores that made 16 concurrent searches slower than one;
bench/README.md)."""

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
    time.sleep(0.02)
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
    shown = (
        "import imagesearch.server, os; "
        "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'), os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    )
    assert run(shown) == "10000 None 4"
    assert run(shown, OMP_WAIT_POLICY="PASSIVE", OPENBLAS_THREAD_TIMEOUT="28") == "None PASSIVE 28"
    assert run(shown, GOMP_SPINCOUNT="300000") == "300000 None 4"


def test_faiss_threads_spin_only_briefly_after_a_search() -> None:
    """libgomp's default kept a thread spinning through most of each 20 ms pause after a search
    (more than 5 ms of CPU in each); with the server's default, under 4 ms."""
    assert float(run(SPIN_PROBE)) < 4.0
    assert float(run(SPIN_PROBE, GOMP_SPINCOUNT="300000")) > 5.0  # the probe sees libgomp's default spin
    assert float(run(SPIN_PROBE, OMP_WAIT_POLICY="PASSIVE")) < 1.0
