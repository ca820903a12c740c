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

from imagesearch.server.settings import Setting, check_table

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

    batches: bool = True
    """Whether one call on many images is faster than many calls on one (a CNN on a BLAS
    backend): the server then gathers concurrent requests' images into one ``extract`` call.
    False (per-image work such as SIFT) keeps each request's images on its own thread."""

    def warm_up(self) -> None:
        """Load models or other state now. The server calls this at start and before creating a
        collection, so a broken model fails there with a clear message instead of mid-request."""


class LocalFeatures:
    """Base class of local-feature plugins: keypoints with descriptors, compared geometrically.

    A collection created with ``local_features=<name>`` keeps each image's features (the
    opaque bytes ``extract`` returns) beside its vector, which enables two things: a search
    option that re-ranks the first stage's candidates by ``verify`` (how many matches one
    geometric transform explains: the same object or scene, not just a similar look), and
    trainable extractors, which are fitted on and encode these features. Any extractor's
    collection may keep them (a CNN's too: the hybrid cascade).

    Required: ``name``, ``version`` (bump it when the bytes or their meaning change). All
    methods must be thread-safe.
    """

    name: str
    version: str
    description: str = ""
    min_inliers: int = 10
    """Fewer verified matches than this are no evidence (unrelated images reach a few by chance):
    the server orders such candidates as the first stage did, below every verified one."""
    min_input_side: int = 0
    """The shortest side ``extract`` needs, as ``Extractor.min_input_side``: the server decodes a
    large JPEG at a reduced scale only while its short side stays at least this long, for the
    collection's extractor and its local features alike; 0 means full size."""

    def extract(self, images: Sequence[np.ndarray], *, for_query: bool = False) -> list[bytes]:
        """One serialised feature set per image (BGR ``uint8`` arrays, as ``Extractor.extract``).

        ``for_query``: the features of a query, which are never stored and may be denser
        (a query holding a small copy of a stored image needs more keypoints to find it).
        An image without features (flat colour, tiny) gets an empty set, not an error.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement extract")

    def count(self, features: bytes) -> int:
        """How many keypoints a serialised set holds (0 makes the server note it on the image)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement count")

    def verify(self, query: bytes, candidates: Sequence[bytes]) -> list[int]:
        """For each candidate, the number of query features one geometric transform maps onto
        it (RANSAC inliers); 0 when nothing agrees. Higher means more surely the same scene."""
        raise NotImplementedError(f"{type(self).__name__} does not implement verify")

    def warm_up(self) -> None:
        """Load models or other state now (called at start and before creating a collection)."""


class NotEnoughTrainingData(ValueError):
    """Raised by ``TrainableExtractor.fit`` when the sample is too small; the message must say
    how many images or features are needed (the server answers FAILED_PRECONDITION with it)."""


class FitAbandoned(Exception):
    """Raised by the ``still_wanted`` callback the server gives ``TrainableExtractor.fit`` when it
    no longer wants the fit (it is stopping). Let it through: the training ends uncommitted."""


class TrainableExtractor(Extractor):
    """An extractor that turns local features into one vector through a fitted model (a visual
    vocabulary, a PCA ...): the state belongs to each collection.

    A collection of a trainable extractor keeps the local features named by
    ``local_features`` (a registered ``LocalFeatures``), so the server can refit the model on
    the collection's own images (TrainCollection) and re-encode every stored image without
    the images themselves. The registered instance carries the generic state every new
    collection starts with; the server persists ``state()`` with the collection and serves it
    through ``with_state``. ``version`` must name the state too (``base_version`` + a digest):
    vectors of two states are never compared.
    """

    local_features: str
    """The name of the ``LocalFeatures`` plugin whose features ``fit`` and ``encode`` read."""
    base_version: str
    """The code's version, without the state: a stored state is served by any instance with this
    ``base_version``."""
    default_model_size: int = 0
    """The model size ``fit`` uses when the caller gives 0 (e.g. vocabulary words)."""
    max_model_size: int = 0
    """The largest model size ``fit`` accepts (0: only the default). The server refuses larger
    requests before fitting: fit time and vector size grow with it, so it is a resource limit."""

    def state(self) -> bytes:
        """The fitted state this instance encodes with, serialised."""
        raise NotImplementedError

    def with_state(self, state: bytes) -> TrainableExtractor:
        """An instance encoding with ``state`` (from ``state()`` or ``fit``); ValueError if unusable.
        Its ``dim`` may differ from this one's (a bigger vocabulary)."""
        raise NotImplementedError

    def fit(
        self,
        features: Sequence[bytes],
        size: int = 0,
        seed: int = 0,
        still_wanted: Callable[[], None] | None = None,
    ) -> bytes:
        """Fit a new state on a collection's local features (``size``: the model size, 0 for the
        default); raise ``NotEnoughTrainingData`` saying what is needed when the sample is too small.
        A fit that takes long should call ``still_wanted`` now and then (between k-means
        iterations: ``imagesearch.plugins.kmeans``); it raises ``FitAbandoned`` once the server is
        stopping. The server passes it only to a ``fit`` that has this parameter."""
        raise NotImplementedError

    def encode(self, features: Sequence[bytes]) -> np.ndarray:
        """(len(features), dim) float32 vectors from serialised local features."""
        raise NotImplementedError


@dataclass(frozen=True)
class PluginContext:
    """What the host tells a plugin's hooks: declare a ``context`` argument to receive it.

    ``models_dir`` is the server's model directory (``--models``, ``models_dir`` in the
    config, ``IMAGESEARCH_MODELS``), None when the host has none; ``config`` is the plugin's own
    table of the server config, ``[plugins.<plugin name>]``, empty when absent; ``plugin`` is
    that name.
    """

    models_dir: Path | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    plugin: str = ""

    def settings(self, rules: Mapping[str, Setting]) -> dict[str, Any]:
        """The plugin's table, checked against ``rules`` (every key it takes): an unknown key or a
        bad value raises SettingsError, which stops start-up with a message naming
        ``[plugins.<name>] key``. A misspelt setting must not silently keep its default. Values come
        back as their kind: a float setting written ``1`` is 1.0, a path setting a Path."""
        return check_table(self.config, rules, f"[plugins.{self.plugin}]")


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


# Norms within these bounds are divided by as float32 (a third of the time of float64 for 256 rows
# of 1280): far from float32's overflow, and from its subnormals, which keep too few bits.
_FLOAT32_SAFE_NORMS = (1e-30, 1e30)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale each row to unit length (zero rows stay zero); float32 in and out.

    Norms are summed in float64: float32 squares underflow for tiny vectors (norm 1e-24 would
    become 0, a zero vector) and overflow for huge ones, while float64 holds the square of any
    float32. A row's result depends on that row alone, whatever else is in the batch."""
    rows = np.asarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))[:, None]
    low, high = _FLOAT32_SAFE_NORMS
    safe = (norms > low) & (norms < high)  # False for NaN
    if safe.all():  # the usual case: no mask
        return np.divide(rows, norms.astype(np.float32), out=np.empty_like(rows))
    # Each row by its own rule, never by the batch's: a query must be the same vector alone as
    # beside a zero row (an outside test caught the whole batch switching to float64).
    unit = np.divide(rows, np.where(safe, norms, 1).astype(np.float32), out=np.zeros_like(rows), where=safe)
    return np.divide(rows, norms, out=unit, where=~safe & (norms > 0))


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
