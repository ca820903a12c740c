"""A visual vocabulary: k-means centroids of RootSIFT descriptors, with IDF weights for BoVW.

The vocabulary is fitted on a collection's own images and stored with it; its ``version``
names the centroids so vectors encoded with different vocabularies are never mixed.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

from imagesearch.plugins.kmeans import kmeans
from imagesearch.plugins.sift.features import DESCRIPTOR_DIM

FORMAT_VERSION = 1
_HEADER = struct.Struct("<BII")  # format version, k, dim
log = logging.getLogger(__name__)

POINTS_PER_CENTROID_ADVISED = 39
"""FAISS warns below 39 training points per centroid; we only refuse below 1."""


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """``centroids`` (k, 128) float32 and ``idf`` (k,) float32 (all ones until ``fit_idf``)."""

    centroids: np.ndarray
    idf: np.ndarray
    _index: faiss.IndexFlatL2 = field(init=False, repr=False)

    def __post_init__(self) -> None:
        k = len(self.centroids)
        if k < 1 or self.centroids.shape != (k, DESCRIPTOR_DIM) or self.idf.shape != (k,):
            raise ValueError(
                f"centroids {self.centroids.shape} and idf {self.idf.shape} must be (k, {DESCRIPTOR_DIM}) "
                "and (k,) with k >= 1"
            )
        centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        index = faiss.IndexFlatL2(DESCRIPTOR_DIM)
        index.add(centroids)  # built once: searching a flat index is read-only, so threads may share it
        object.__setattr__(self, "centroids", centroids)
        object.__setattr__(self, "idf", np.ascontiguousarray(self.idf, dtype=np.float32))
        object.__setattr__(self, "_index", index)

    @property
    def k(self) -> int:
        return len(self.centroids)

    @property
    def version(self) -> str:
        """First 16 hex digits of the sha256 of the centroids and the idf weights: everything the
        encodings depend on, so vectors from two versions are never compared."""
        return hashlib.sha256(
            self.centroids.tobytes() + np.asarray(self.idf, np.float32).tobytes()
        ).hexdigest()[:16]

    def assign(self, descriptors: np.ndarray) -> np.ndarray:
        """The nearest centroid (L2) of each descriptor, as (n,) int64 labels."""
        descriptors = np.ascontiguousarray(descriptors, dtype=np.float32).reshape(-1, DESCRIPTOR_DIM)
        if len(descriptors) == 0:
            return np.zeros(0, np.int64)
        _, labels = self._index.search(descriptors, 1)
        return labels[:, 0]

    def fit_idf(self, per_image_descriptors: Sequence[np.ndarray]) -> Vocabulary:
        """A copy whose idf is log((N + 1) / (n_w + 1)) for N images, n_w of them containing word w.

        Smoothed so a word no image contains stays finite and one in every image weighs 0.
        """
        counts = np.zeros(self.k, np.int64)
        for descriptors in per_image_descriptors:
            counts[np.unique(self.assign(descriptors))] += 1
        total = len(per_image_descriptors)
        idf = np.log((total + 1.0) / (counts + 1.0)).astype(np.float32)
        return Vocabulary(self.centroids, idf)

    def to_bytes(self) -> bytes:
        return (
            _HEADER.pack(FORMAT_VERSION, self.k, DESCRIPTOR_DIM)
            + self.centroids.tobytes()
            + self.idf.tobytes()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Vocabulary:
        if len(data) < _HEADER.size:
            raise ValueError(f"a vocabulary needs at least {_HEADER.size} bytes, got {len(data)}")
        version, k, dim = _HEADER.unpack_from(data)
        if version != FORMAT_VERSION or dim != DESCRIPTOR_DIM:
            raise ValueError(
                f"vocabulary format {version} for {dim}-d descriptors; this code reads "
                f"format {FORMAT_VERSION}, {DESCRIPTOR_DIM}-d"
            )
        expected = _HEADER.size + 4 * k * (dim + 1)
        if len(data) != expected:
            raise ValueError(f"a vocabulary of {k} words needs {expected} bytes, got {len(data)}")
        centroids = np.frombuffer(data, "<f4", k * dim, _HEADER.size).reshape(k, dim)
        idf = np.frombuffer(data, "<f4", k, _HEADER.size + 4 * k * dim)
        return cls(centroids.copy(), idf.copy())


def fit_vocabulary(
    descriptors: np.ndarray,
    k: int,
    seed: int,
    niter: int = 20,
    still_wanted: Callable[[], None] | None = None,
) -> Vocabulary:
    """Cluster descriptors into ``k`` visual words with FAISS k-means (Euclidean, not spherical),
    calling ``still_wanted`` before each iteration (``kmeans``: a stopping server abandons the fit).

    FAISS cannot place k centroids with fewer than k points, so that is refused here with the
    number needed; below ``POINTS_PER_CENTROID_ADVISED × k`` it works, the centroids are noisier,
    and that is logged (FAISS's own warning, printed straight to stderr, broke a JSON log stream:
    an outside test; its threshold only decides that warning, so turning it off changes nothing
    else, which ``tests/test_sift_library.py`` checks).
    """
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32).reshape(-1, DESCRIPTOR_DIM)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(descriptors) < k:
        raise ValueError(
            f"a {k}-word vocabulary needs at least {k} descriptors (ideally "
            f"{POINTS_PER_CENTROID_ADVISED * k}), got {len(descriptors)}"
        )
    if len(descriptors) < POINTS_PER_CENTROID_ADVISED * k:
        log.warning(
            "clustering %d descriptors into %d visual words: %d or more give steadier words",
            len(descriptors),
            k,
            POINTS_PER_CENTROID_ADVISED * k,
        )
    params = faiss.ClusteringParameters()  # as faiss.Kmeans(niter=niter, seed=seed, ...) sets them
    params.niter, params.seed, params.spherical, params.min_points_per_centroid = niter, seed, False, 1
    centroids = kmeans(descriptors, k, params, still_wanted=still_wanted)
    return Vocabulary(centroids, np.ones(k, np.float32))
