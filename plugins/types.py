"""The interfaces plugins implement: feature extractors and distance metrics.

These are the only types a plugin author needs; they depend on NumPy alone so
a plugin can be unit-tested without the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# Index types a metric can serve (names match the IndexType enum of the API).
FLAT, IVF, HNSW = "flat", "ivf", "hnsw"
ALL_INDEX_TYPES = frozenset({FLAT, IVF, HNSW})


@runtime_checkable
class Extractor(Protocol):
    """Turns decoded images into fixed-length feature vectors.

    Images arrive as OpenCV BGR ``uint8`` arrays of shape (h, w, 3), already
    decoded and size-checked by the server. ``extract`` must be thread-safe:
    the server calls it from several gRPC worker threads at once.
    """

    name: str
    version: str
    dim: int
    default_metric: str
    description: str

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Return a float32 array of shape (len(images), dim)."""
        ...


@runtime_checkable
class TrainableExtractor(Extractor, Protocol):
    """An extractor that must be fitted on a sample first (e.g. a SIFT vocabulary).

    The fitted state belongs to a collection: the server stores the bytes from
    ``fit`` with the collection and calls ``with_state`` to get the instance
    that serves it.
    """

    def fit(self, sample: Sequence[np.ndarray]) -> bytes:
        """Learn from a sample of images; return the state to persist."""
        ...

    def with_state(self, state: bytes) -> Extractor:
        """Return an extractor that uses a previously fitted state."""
        ...


class RegistrationProblems(Exception):
    """Raise from a hook *after* registering what works: those registrations are kept
    and each problem is reported under the plugin's name (e.g. one bad model file
    among good ones). Any other exception discards everything the hook registered.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def _identity(vectors: np.ndarray) -> np.ndarray:
    return vectors


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale each row to unit length (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


@dataclass(frozen=True)
class Metric:
    """How vectors are compared, mapped onto a FAISS metric.

    ``prepare`` is applied to stored and query vectors before they reach FAISS
    (cosine normalises). ``to_distance`` turns FAISS's raw output into the
    metric's natural value (L2: FAISS returns squared distances, we report the
    distance). ``to_score`` turns that distance into a similarity where higher
    is better; hits are sorted by it.
    """

    name: str
    faiss_metric: int
    description: str
    to_score: Callable[[np.ndarray], np.ndarray]
    prepare: Callable[[np.ndarray], np.ndarray] = _identity
    to_distance: Callable[[np.ndarray], np.ndarray] = _identity
    version: str = "1"
    metric_arg: float = 0.0
    index_types: frozenset[str] = field(default=frozenset({FLAT}))
