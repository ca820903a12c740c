"""The engine's plain inputs and outputs: what the servicer builds from protobuf and gets back.

Kept apart from the engine so that the servicer, the streams and the tests name a request or a
result without importing the machinery that serves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from imagesearch.plugins.types import FLAT, Metric
from imagesearch.server.classify import Classification
from imagesearch.server.collection import Collection, Hit
from imagesearch.server.errors import ImageSearchError
from imagesearch.server.vector_input import VectorInput

OK_CODE = 0  # google.rpc.Code OK; failures carry their error's code


# One of each of these three is made per image of a batch: plain slotted records, a third of the
# cost of frozen ones (whose __init__ sets each field through object.__setattr__), which a batch of
# 256 vectors paid three times over.
@dataclass(slots=True)
class ImageItem:
    """One image of an AddImages batch: ``content`` bytes or a ``vector``, not both."""

    id: str = ""
    content: bytes | None = None
    vector: VectorInput | None = None
    label: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ItemResult:
    index: int
    id: str
    code: int = OK_CODE
    message: str = ""
    reason: str = ""
    field: str = ""
    note: str = ""

    @classmethod
    def failed(cls, index: int, image_id: str, error: ImageSearchError) -> ItemResult:
        """The per-item form of ``error``: the same code, reason and field a whole request would get."""
        return cls(index, image_id, error.code, error.message, error.reason, error.field or "")


@dataclass(frozen=True)
class AddOutcome:
    ids: list[str]
    results: list[ItemResult]

    @property
    def added_count(self) -> int:
        return sum(1 for r in self.results if r.code == OK_CODE)


@dataclass(frozen=True)
class SearchQuery:
    collection: str = ""
    image: bytes | None = None
    image_id: str | None = None
    vector: VectorInput | None = None
    top_k: int = 0
    labels: Sequence[str] = ()
    metric: str = ""
    exclude_query: bool = False
    extractor: str = ""
    mode: str = ""  # "" or PLAIN: as asked; BUCKETED: only the predicted class's images
    rerank: str = ""  # "" or GEOMETRIC: re-rank the first stage's candidates by verified geometry
    rerank_candidates: int = 0  # 0: the server's default_rerank_candidates
    extractor_version: str = ""  # a vector query's guard: refused when the collection encodes otherwise


@dataclass(frozen=True)
class ClassifyQuery:
    collection: str = ""
    image: bytes | None = None
    image_id: str | None = None
    vector: VectorInput | None = None
    neighbors: int = 0  # 0: DEFAULT_NEIGHBORS
    mode: str = ""  # "" or KNN, or CENTROID
    exclude_query: bool = False


@dataclass(frozen=True)
class NewCollection:
    """CreateCollection's input; zeros and empty strings mean "the server's default"."""

    name: str
    extractor: str = ""
    metric: str = ""
    index_type: str = FLAT
    params: dict[str, int] = field(default_factory=dict)
    store_originals: bool = False
    description: str = ""
    storage: str = ""
    local_features: str = ""


@dataclass(frozen=True)
class ExtractorInfo:
    name: str
    version: str
    dim: int
    default_metric: str
    description: str
    plugin: str
    trainable: bool
    local_features: str = ""


@dataclass(frozen=True)
class LocalFeaturesInfo:
    name: str
    version: str
    description: str
    plugin: str


@dataclass(frozen=True)
class MetricInfo:
    name: str
    version: str
    description: str
    plugin: str
    index_types: tuple[str, ...]


@dataclass(frozen=True)
class PluginList:
    extractors: list[ExtractorInfo]
    metrics: list[MetricInfo]
    problems: tuple[str, ...]
    local_features: list[LocalFeaturesInfo] = field(default_factory=list)
    skipped: tuple[str, ...] = ()  # left out on purpose: not problems (an outside test's monitor fired)


@dataclass(frozen=True)
class PendingSearch:
    """A search whose query vector is known, waiting to share an index call with others."""

    collection: Collection
    vector: np.ndarray
    k: int
    labels: tuple[str, ...]
    override: Metric | None
    exclude: int | None
    version: str = ""


@dataclass(frozen=True)
class Timings:
    decode_ms: float = 0.0
    extract_ms: float = 0.0
    search_ms: float = 0.0
    total_ms: float = 0.0
    rerank_ms: float = 0.0


@dataclass(frozen=True)
class SearchOutcome:
    hits: list[Hit]
    timings: Timings
    metric: str
    predicted: Classification | None = None  # BUCKETED mode: the class the hits come from
