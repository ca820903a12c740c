"""FAISS's k-means run one iteration at a time (``imagesearch.plugins.kmeans``): the same centroids,
bit for bit, as FAISS's own runs that it replaces (a SIFT vocabulary's version is a digest of
them, and IVF's lists decide every IVF search), and a fit that stops when it is no longer wanted."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from imagesearch.plugins.kmeans import kmeans
from imagesearch.plugins.metrics import COSINE, L2
from imagesearch.plugins.sift.vocabulary import fit_vocabulary
from imagesearch.plugins.types import IVF, l2_normalize
from imagesearch.server.vector_index import IndexSpec, VectorIndex, _lists


def random(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, dim), dtype=np.float32)


@pytest.mark.parametrize(
    ("rows", "k", "dim"),
    [(3000, 50, 128), (20000, 16, 64)],  # the second samples: more than 256 points a centroid
    ids=["all points", "sampled"],
)
def test_step_by_step_gives_faiss_kmeans_centroids_exactly(rows: int, k: int, dim: int) -> None:
    vectors = random(rows, dim)
    whole = faiss.Kmeans(dim, k, niter=12, seed=5, spherical=False, verbose=False, min_points_per_centroid=1)
    whole.train(vectors)
    params = faiss.ClusteringParameters()
    params.niter, params.seed, params.min_points_per_centroid = 12, 5, 1
    assert np.array_equal(kmeans(vectors, k, params), whole.centroids)


def test_a_vocabulary_is_the_one_faiss_kmeans_fitted_before() -> None:
    """A vocabulary's version names its centroids: the same descriptors and seed must give the
    same version as before the fit went step by step."""
    descriptors = random(4000, 128, seed=3)
    before = faiss.Kmeans(
        128, 40, niter=20, seed=9, spherical=False, verbose=False, min_points_per_centroid=1
    )
    before.train(descriptors)
    assert np.array_equal(fit_vocabulary(descriptors, 40, seed=9).centroids, before.centroids)


def test_ivf_lists_are_the_ones_faiss_trains() -> None:
    """Cosine IVF (spherical k-means, inner-product assignment, FAISS's sampling above 256 points a
    list): the server's lists against ``IndexIVFFlat.train`` on the same vectors."""
    vectors = l2_normalize(np.random.default_rng(1).normal(size=(3000, 64)).astype(np.float32))
    faiss_ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(64), 64, 10, faiss.METRIC_INNER_PRODUCT)
    faiss_ivf.cp.min_points_per_centroid = 1
    faiss_ivf.train(vectors)
    index = VectorIndex(IndexSpec(IVF, 64, COSINE, nlist=10, nprobe=10, train_size=3000))
    index.add(np.arange(3000), vectors)
    assert index.trained
    assert np.array_equal(_lists(index.faiss_index), _lists(faiss_ivf))


def test_still_wanted_is_asked_before_each_iteration_and_stops_the_fit() -> None:
    asked: list[int] = []

    def still_wanted() -> None:
        asked.append(1)
        if len(asked) == 4:
            raise TimeoutError("no longer wanted")

    params = faiss.ClusteringParameters()
    params.niter = 10
    with pytest.raises(TimeoutError):
        kmeans(random(500, 8), 5, params, still_wanted=still_wanted)
    assert len(asked) == 4  # three iterations ran, the fourth was never started
    asked.clear()
    params.niter = 3
    assert kmeans(random(500, 8), 5, params, still_wanted=lambda: asked.append(1)).shape == (5, 8)
    assert len(asked) == 3


def test_an_ivf_index_built_for_a_training_stops_in_its_kmeans() -> None:
    """A training's new IVF index learns its lists while the server may be stopping: the k-means
    stops at its next iteration, and an index filled without ``still_wanted`` still trains."""
    vectors = random(400, 16)
    calls: list[int] = []

    def stopping() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise InterruptedError("stopping")

    index = VectorIndex(IndexSpec(IVF, 16, L2, nlist=4, nprobe=4, train_size=300))
    with pytest.raises(InterruptedError):
        index.add(np.arange(400), vectors, stopping)
    assert len(calls) == 2
    again = VectorIndex(IndexSpec(IVF, 16, L2, nlist=4, nprobe=4, train_size=300))
    again.add(np.arange(400), vectors)
    assert again.trained and again.size == 400


def test_steps_stop_where_faiss_stops() -> None:
    """FAISS ends a run once an iteration no longer improves it; steps that ran every iteration
    anyway doubled the time of a 4,000-word vocabulary (an outside test). They stop where the
    centroids stand still, with FAISS's centroids."""
    vectors = random(3000, 16, seed=7)
    params = faiss.ClusteringParameters()
    params.niter, params.seed, params.min_points_per_centroid = 100, 3, 1
    whole = faiss.Clustering(16, 20, params)
    whole.train(vectors, faiss.IndexFlatL2(16))
    iterations = whole.iteration_stats.size()
    assert iterations < 100  # it converged early
    asked: list[int] = []
    stepped = kmeans(vectors, 20, params, still_wanted=lambda: asked.append(1))
    assert np.array_equal(stepped, faiss.vector_to_array(whole.centroids).reshape(20, 16))
    # FAISS sees the standstill one iteration later (the objective that no longer falls); the
    # steps see the centroids stand still: at most as many iterations, never all 100.
    assert iterations - 1 <= len(asked) <= iterations
