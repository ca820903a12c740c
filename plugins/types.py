"""The interfaces plugins implement: feature extractors and distance metrics.

Plugin authors import them from ``imagesearch.plugins``. They depend on NumPy
alone, so a plugin can be unit-tested without the server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Index types a metric can serve (names match the IndexType enum of the API).
FLAT, IVF, HNSW = "flat", "ivf", "hnsw"
ALL_INDEX_TYPES = frozenset({FLAT, IVF, HNSW})


class Extractor:
    """Base class of feature extractors: subclass it, set the four required class attributes
    and implement ``extract``.

    Images arrive as OpenCV BGR ``uint8`` arrays of shape (h, w, 3), already
    decoded, size-checked and turned upright by the server. ``extract`` must be
    thread-safe: the server calls it from several threads at once.

    Required: ``name`` (unique across plugins), ``version`` (bump it whenever the
    output changes: a collection refuses to mix versions), ``dim`` (vector length) and
    ``default_metric`` (a registered metric's name). Everything else is optional, with
    the defaults below: override what your extractor can use.
    """

    name: str
    version: str
    dim: int
    default_metric: str
    description: str = ""
    min_input_side: int = 0
    """The shortest side your extractor needs. The server may decode a large JPEG at 1/2, 1/4 or
    1/8 scale (almost free) as long as its short side stays at least this long; 0 means full size."""

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Return a float32 array of shape (len(images), dim), one finite vector per image."""
        raise NotImplementedError(f"{type(self).__name__} does not implement extract")

    def warm_up(self) -> None:
        """Load models or other state now. The server calls this at start and before creating a
        collection, so a broken model fails there with a clear message instead of mid-request."""


class TrainableExtractor(Extractor):
    """An extractor that must be fitted on a sample first (e.g. a SIFT vocabulary).

    The fitted state belongs to a collection: the server stores the bytes from
    ``fit`` with the collection and calls ``with_state`` to get the instance
    that serves it. Reserved for the SIFT extractors, its first users.
    """

    def fit(self, sample: Sequence[np.ndarray]) -> bytes:
        """Learn from a sample of images; return the state to persist."""
        raise NotImplementedError

    def with_state(self, state: bytes) -> Extractor:
        """Return an extractor that uses a previously fitted state."""
        raise NotImplementedError


@dataclass(frozen=True)
class PluginContext:
    """What the host tells a plugin's hooks: declare a ``context`` argument to receive it.

    ``models_dir`` is the server's model directory (``--models``, ``models_dir`` in the
    config, ``IMAGESEARCH_MODELS``), None when the host has none; ``config`` is the plugin's own
    table of the server config, ``[plugins.<plugin name>]``, empty when absent.
    """

    models_dir: Path | None = None
    config: Mapping[str, Any] = field(default_factory=dict)


class RegistrationProblems(Exception):
    """Raise from a hook *after* registering what works: those registrations are kept
    and each problem is reported under the plugin's name (e.g. one bad model file
    among good ones). Any other exception discards everything the hook registered.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def inverse_distance_score(distance: np.ndarray) -> np.ndarray:
    """Map a distance in [0, inf) to a similarity in (0, 1]: 1 / (1 + d)."""
    return 1.0 / (1.0 + distance)


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
