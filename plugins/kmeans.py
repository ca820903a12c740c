"""FAISS's k-means one iteration at a time, so that a long fit can stop between iterations.

FAISS looks for an interruption only through Python's signal handlers, which run on the main
thread, and a fit runs on a worker thread: a server told to stop waited for the whole fit (a
16,384-word SIFT vocabulary, or the lists of a large IVF collection, take minutes), and its stop
watchdog gave up first. Each step here continues from the centroids the step before left, which
gives, bit for bit, the centroids of one FAISS run of all the iterations: FAISS draws its sample
and its first centroids from ``seed`` and splits empty clusters with a fixed seed, so restarting
from given centroids changes nothing (tests/test_kmeans.py compares them with ``faiss.Kmeans`` and
``IndexIVFFlat.train``). FAISS stops early once an iteration no longer improves its objective
(its centroids then no longer move); one step at a time cannot see that objective across calls,
so the steps stop where the centroids stop moving: run to the end, they doubled the time of a
4,000-word vocabulary (an outside test).
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np


def kmeans(
    vectors: np.ndarray,
    k: int,
    params: faiss.ClusteringParameters,
    index: faiss.Index | None = None,
    still_wanted: Callable[[], None] | None = None,
) -> np.ndarray:
    """The (k, d) centroids FAISS's k-means finds with ``params`` (iterations, seed, sampling,
    spherical ...), assigning vectors by ``index`` (an empty flat index: its metric; L2 when
    None), calling ``still_wanted`` before each iteration: whatever it raises stops the fit."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    index = index if index is not None else faiss.IndexFlatL2(dim)
    centroids: np.ndarray | None = None
    for _ in range(max(params.niter, 1)):
        if still_wanted is not None:
            still_wanted()
        clustering = faiss.Clustering(dim, k, params)
        clustering.niter = min(params.niter, 1)
        if centroids is not None:
            faiss.copy_array_to_vector(centroids.ravel(), clustering.centroids)
        clustering.train(vectors, index)  # empties the index first, as FAISS's own run does
        previous, centroids = centroids, faiss.vector_to_array(clustering.centroids).reshape(k, dim)
        if previous is not None and np.array_equal(previous, centroids):
            break  # a fixed point: every further iteration gives these again (FAISS stops one later)
    assert centroids is not None
    return centroids
