"""Plain Python values the client returns and accepts, so callers never touch protobuf.

Results are frozen dataclasses built by ``from_proto`` class methods: they are
safe to share between threads and to keep after the response is gone. Fields
that the server leaves empty when absent (thumbnail, original, vector, times)
become ``None`` so "not returned" cannot be mistaken for a real value.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Self, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import timestamp_pb2

from imagesearch.v1 import image_search_service_pb2 as pb

VectorLike = npt.ArrayLike
"""Anything ``numpy.asarray`` turns into a 1-D float vector: an ndarray, a list of floats, ..."""

PathLike = str | os.PathLike[str]

_STATUS_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Code number (unknown numbers become UNKNOWN)."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


_STORAGE_NAMES = {pb.VECTOR_STORAGE_FLOAT16: "float16", pb.VECTOR_STORAGE_INT8: "int8"}  # else float32


def _vector(message: pb.FloatVector) -> npt.NDArray[np.float32]:
    if message.float32_le:  # servers fill values today; read the packed form too
        return np.frombuffer(message.float32_le, dtype="<f4").astype(np.float32)
    return np.asarray(message.values, dtype=np.float32)


def _time(stamp: timestamp_pb2.Timestamp) -> datetime | None:
    """An aware UTC datetime; None when the server left the field unset (never read as 1970)."""
    if not stamp.seconds and not stamp.nanos:
        return None
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, tz=UTC)


class IndexType(enum.StrEnum):
    """How a collection's vectors are indexed (the API's ``IndexType`` enum, by short name)."""

    FLAT = "flat"
    IVF = "ivf"
    HNSW = "hnsw"

    @classmethod
    def parse(cls, value: IndexType | str) -> IndexType:
        """Accept an IndexType or its name in any case ("flat", "IVF", ...)."""
        if isinstance(value, IndexType):
            return value
        try:
            return cls(value.lower())
        except ValueError:
            choices = ", ".join(repr(member.value) for member in cls)
            raise ValueError(f"unknown index type {value!r}; expected one of {choices}") from None

    def to_proto(self) -> pb.IndexType.ValueType:
        return pb.IndexType.Value(f"INDEX_TYPE_{self.name}")

    @classmethod
    def from_proto(cls, value: int) -> IndexType:
        """UNSPECIFIED means the default, FLAT (as the API defines it)."""
        name = pb.IndexType.Name(value).removeprefix("INDEX_TYPE_")
        return cls.FLAT if name == "UNSPECIFIED" else cls[name]


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class ImageItem:
    """One image to add: encoded ``content`` bytes or a precomputed ``vector``, never both.

    ``id`` empty lets the server assign one; ``label`` is the class / bucket that
    searches can filter on; ``metadata`` is returned with every hit.
    """

    id: str = ""
    content: bytes | None = None
    vector: VectorLike | None = field(default=None, compare=False)
    label: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if (self.content is None) == (self.vector is None):
            raise ValueError("ImageItem needs exactly one of `content` (encoded bytes) or `vector`")
        if self.content is not None and not isinstance(self.content, bytes | bytearray | memoryview):
            raise TypeError(f"ImageItem.content must be bytes, not {type(self.content).__name__}")

    @classmethod
    def from_path(
        cls, path: PathLike, *, id: str = "", label: str = "", metadata: Mapping[str, str] | None = None
    ) -> Self:
        """Read an encoded image file (JPEG, PNG, WebP, ...) into an item."""
        return cls(id=id, content=Path(path).read_bytes(), label=label, metadata=dict(metadata or {}))


@dataclass(frozen=True)
class IvfParams:
    """IVF index parameters; 0 means the server default (nlist 100, nprobe 10, train_size 39 * nlist)."""

    nlist: int = 0
    nprobe: int = 0
    train_size: int = 0

    def to_proto(self) -> pb.IvfParams:
        return pb.IvfParams(nlist=self.nlist, nprobe=self.nprobe, train_size=self.train_size)

    @classmethod
    def from_proto(cls, message: pb.IvfParams) -> Self:
        return cls(nlist=message.nlist, nprobe=message.nprobe, train_size=message.train_size)


@dataclass(frozen=True)
class HnswParams:
    """HNSW index parameters; 0 means the server default (m 32, ef_construction 40, ef_search 64)."""

    m: int = 0
    ef_construction: int = 0
    ef_search: int = 0

    def to_proto(self) -> pb.HnswParams:
        return pb.HnswParams(m=self.m, ef_construction=self.ef_construction, ef_search=self.ef_search)

    @classmethod
    def from_proto(cls, message: pb.HnswParams) -> Self:
        return cls(m=message.m, ef_construction=message.ef_construction, ef_search=message.ef_search)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class SearchHit:
    """One similar image: ``score`` is higher for more similar, ``distance`` the metric's raw value."""

    id: str
    score: float
    distance: float
    label: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)
    inliers: int = 0
    """With ``rerank``: the query's local features one geometric transform maps onto this image
    (0: nothing verified); hits are then ordered by it first."""

    @classmethod
    def from_proto(cls, message: pb.SearchHit) -> Self:
        return cls(
            id=message.id,
            score=message.score,
            distance=message.distance,
            label=message.label,
            metadata=dict(message.metadata),
            inliers=message.inliers,
        )


@dataclass(frozen=True)
class StageTimings:
    """Server-side milliseconds per stage of a search."""

    decode_ms: float = 0.0
    extract_ms: float = 0.0
    search_ms: float = 0.0
    total_ms: float = 0.0
    rerank_ms: float = 0.0

    @classmethod
    def from_proto(cls, message: pb.StageTimings) -> Self:
        return cls(
            decode_ms=message.decode_ms,
            extract_ms=message.extract_ms,
            search_ms=message.search_ms,
            total_ms=message.total_ms,
            rerank_ms=message.rerank_ms,
        )


@dataclass(frozen=True)
class Query:
    """One search of ``search_batch``: the same arguments as ``ImageSearchClient.search``."""

    image: bytes | PathLike | None = None
    image_id: str | None = None
    vector: VectorLike | None = None
    top_k: int = 0
    labels: Sequence[str] | None = ()
    metric: str | None = None
    exclude_query: bool = False
    extractor: str | None = None
    collection: str | None = None
    mode: str | None = None
    rerank: int = 0
    extractor_version: str | None = None


@dataclass(frozen=True)
class SearchResult:
    """Hits sorted by descending score, the metric that scored them, and server timings.

    Iterating a result iterates its hits; ``len(result)`` is the number of hits.
    """

    hits: tuple[SearchHit, ...]
    timings: StageTimings
    metric: str = ""
    predicted_label: str = ""
    """``mode="bucketed"``: the class the hits were taken from ("" otherwise)."""
    label_confidence: float = 0.0
    """``mode="bucketed"``: the classifier's confidence in ``predicted_label``, in [0, 1]."""

    @property
    def ids(self) -> list[str]:
        return [hit.id for hit in self.hits]

    def __iter__(self) -> Iterator[SearchHit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    @classmethod
    def from_proto(cls, message: pb.SearchResponse) -> Self:
        return cls(
            hits=tuple(SearchHit.from_proto(hit) for hit in message.hits),
            timings=StageTimings.from_proto(message.timings),
            metric=message.metric,
            predicted_label=message.predicted_label,
            label_confidence=message.label_confidence,
        )


@dataclass(frozen=True)
class Classification:
    """A query's predicted class: ``label`` (empty when the collection has no labelled image),
    its ``confidence`` in [0, 1], and every class that got a share, best first."""

    label: str
    confidence: float
    candidates: tuple[tuple[str, float], ...]
    mode: str

    @classmethod
    def from_proto(cls, message: pb.ClassifyResponse) -> Self:
        return cls(
            label=message.label,
            confidence=message.confidence,
            candidates=tuple((c.label, c.score) for c in message.candidates),
            mode="centroid" if message.mode == pb.CLASSIFY_MODE_CENTROID else "knn",
        )


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one image of an add: ``code`` is OK when it was stored."""

    index: int
    id: str
    code: grpc.StatusCode
    message: str = ""
    reason: str = ""
    """The stable reason (as ``ImageSearchError.reason`` would give it), e.g. ``IMAGE_UNDECODABLE``."""
    field: str = ""
    """The request field at fault, e.g. ``images[3].content``."""
    note: str = ""
    """Something worth knowing about a stored image (e.g. no keypoints were found)."""

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @classmethod
    def from_proto(cls, message: pb.ItemResult) -> Self:
        return cls(
            index=message.index,
            id=message.id,
            code=status_code(message.code),
            message=message.message,
            reason=message.reason,
            field=message.field,
            note=message.note,
        )


@dataclass(frozen=True)
class AddResult:
    """What an add stored: ids in request order ("" for images rejected under ``skip_invalid``).

    ``chunk_count`` is the number of streamed chunks (1 for ``add_images``). ``stored_ids_omitted``
    is set only in a failed upload's ``details.stored`` when listing every image would not fit in
    the error status: ``ids`` and ``results`` then hold only the images not stored, and every other
    image of the chunks before the failed one is stored.
    """

    ids: tuple[str, ...]
    results: tuple[ItemResult, ...]
    added_count: int
    chunk_count: int = 1
    stored_ids_omitted: bool = False

    @property
    def failed(self) -> tuple[ItemResult, ...]:
        """The rejected images (only possible with ``skip_invalid=True``). Images left out because
        their id was already stored (``skip_existing=True``) are not failures: they are in
        ``already_stored`` (they were listed here, so a resume that fully succeeded looked failed:
        an outside test)."""
        return tuple(result for result in self.results if not result.ok and not _already_stored(result))

    @property
    def already_stored(self) -> tuple[ItemResult, ...]:
        """The images left out under ``skip_existing=True`` because their id was already stored
        (code ALREADY_EXISTS); the stored image was left as it was. A rejection with that code (an
        id twice in one request, or taken without ``skip_existing``) is in ``failed``."""
        return tuple(result for result in self.results if _already_stored(result))

    @classmethod
    def from_proto(cls, message: pb.AddImagesResponse | pb.AddImagesStreamResponse) -> Self:
        streamed = isinstance(message, pb.AddImagesStreamResponse)
        return cls(
            ids=tuple(message.ids),
            results=tuple(ItemResult.from_proto(result) for result in message.results),
            added_count=message.added_count,
            chunk_count=message.chunk_count if streamed else 1,
            stored_ids_omitted=streamed and message.stored_ids_omitted,
        )


def _already_stored(result: ItemResult) -> bool:
    """Left as it is under skip_existing: the server names the stored id, where a rejected image's
    id is "" (ItemResult.id in the proto); DUPLICATE_ID and, under skip_invalid alone, IMAGE_EXISTS
    rejections have the same code."""
    return result.code is grpc.StatusCode.ALREADY_EXISTS and bool(result.id)


@dataclass(frozen=True)
class ImageRecord:
    """A stored image. ``thumbnail`` (JPEG), ``original`` and ``vector`` are None when not returned
    (``thumbnail`` also for an image added as a vector: it has no pixels)."""

    id: str
    label: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)
    thumbnail: bytes | None = None
    original: bytes | None = None
    vector: npt.NDArray[np.float32] | None = field(default=None, compare=False)
    width: int = 0
    height: int = 0
    created_at: datetime | None = None
    """When the image was stored (aware, UTC; this server always sets it)."""

    @classmethod
    def from_proto(cls, message: pb.Image) -> Self:
        return cls(
            id=message.id,
            label=message.label,
            metadata=dict(message.metadata),
            thumbnail=message.thumbnail or None,
            original=message.original or None,
            vector=_vector(message.vector) if message.HasField("vector") else None,
            width=message.width,
            height=message.height,
            created_at=_time(message.create_time),
        )


@dataclass(frozen=True)
class ImagePage:
    """One page of ``list_images``; pass ``next_page_token`` back for the next ("" on the last page)."""

    images: tuple[ImageRecord, ...]
    next_page_token: str
    total_size: int

    @classmethod
    def from_proto(cls, message: pb.ListImagesResponse) -> Self:
        return cls(
            images=tuple(ImageRecord.from_proto(image) for image in message.images),
            next_page_token=message.next_page_token,
            total_size=message.total_size,
        )


@dataclass(frozen=True)
class CollectionInfo:
    """A collection: one extractor (and version), one metric, one index.

    ``ivf`` / ``hnsw`` are set only for collections of that index type.
    """

    name: str
    extractor: str
    extractor_version: str
    metric: str
    index_type: IndexType
    dimension: int
    image_count: int
    store_originals: bool = False
    description: str = ""
    ivf: IvfParams | None = None
    hnsw: HnswParams | None = None
    created_at: datetime | None = None
    """When the collection was created (aware, UTC; this server always sets it)."""
    index_trained: bool = False
    storage: str = "float32"
    """How a flat index keeps its vectors in memory: "float32" or "float16"."""
    index_bytes: int = 0
    """Bytes the index holds in memory."""
    read_only: bool = False
    """True when the index could not be built: reads work, searches and writes do not."""
    state_reason: str = ""
    """Why the collection is read-only, or a warning about its index."""
    local_features: str = ""
    """The local features kept for every image (e.g. "sift"), which enable ``search(rerank=...)``."""
    local_features_bytes: int = 0
    """Bytes of local features stored, all images together."""

    @classmethod
    def from_proto(cls, message: pb.Collection) -> Self:
        index_type = IndexType.from_proto(message.index_type)
        return cls(
            name=message.name,
            extractor=message.extractor,
            extractor_version=message.extractor_version,
            metric=message.metric,
            index_type=index_type,
            dimension=message.dimension,
            image_count=message.image_count,
            store_originals=message.store_originals,
            description=message.description,
            ivf=IvfParams.from_proto(message.ivf) if index_type is IndexType.IVF else None,
            hnsw=HnswParams.from_proto(message.hnsw) if index_type is IndexType.HNSW else None,
            created_at=_time(message.create_time),
            index_trained=message.index_trained,
            storage=_STORAGE_NAMES.get(message.storage, "float32"),
            index_bytes=message.index_bytes,
            read_only=message.state == pb.COLLECTION_STATE_READ_ONLY,
            state_reason=message.state_reason,
            local_features=message.local_features,
            local_features_bytes=message.local_features_bytes,
        )


@dataclass(frozen=True)
class ExtractorInfo:
    """A feature extractor the server has loaded."""

    name: str
    version: str
    dimension: int
    default_metric: str
    description: str = ""
    plugin: str = ""
    trainable: bool = False
    """Whether ``train_collection`` can refit its model on a collection's own images."""
    local_features: str = ""
    """For a trainable extractor: the local features it encodes (its collections keep them)."""

    @classmethod
    def from_proto(cls, message: pb.ExtractorInfo) -> Self:
        return cls(
            name=message.name,
            version=message.version,
            dimension=message.dimension,
            default_metric=message.default_metric,
            description=message.description,
            plugin=message.plugin,
            trainable=message.trainable,
            local_features=message.local_features,
        )


@dataclass(frozen=True)
class LocalFeaturesInfo:
    """A kind of local features (keypoints with descriptors) the server has loaded."""

    name: str
    version: str
    description: str = ""
    plugin: str = ""

    @classmethod
    def from_proto(cls, message: pb.LocalFeaturesInfo) -> Self:
        return cls(
            name=message.name, version=message.version, description=message.description, plugin=message.plugin
        )


@dataclass(frozen=True)
class TrainResult:
    """What ``train_collection`` did: the collection after it (new ``extractor_version``), the version
    before, how many images the fit read and how many were re-encoded, and how long it took."""

    collection: CollectionInfo
    previous_extractor_version: str
    training_images: int
    reencoded_images: int
    train_ms: float

    @classmethod
    def from_proto(cls, message: pb.TrainCollectionResponse) -> Self:
        return cls(
            collection=CollectionInfo.from_proto(message.collection),
            previous_extractor_version=message.previous_extractor_version,
            training_images=message.training_images,
            reencoded_images=message.reencoded_images,
            train_ms=message.train_ms,
        )


@dataclass(frozen=True)
class MetricInfo:
    """A distance metric the server has loaded, and the index types it works with."""

    name: str
    version: str
    description: str = ""
    plugin: str = ""
    index_types: tuple[IndexType, ...] = ()

    @classmethod
    def from_proto(cls, message: pb.MetricInfo) -> Self:
        return cls(
            name=message.name,
            version=message.version,
            description=message.description,
            plugin=message.plugin,
            index_types=tuple(IndexType.from_proto(value) for value in message.index_types),
        )


@dataclass(frozen=True)
class PluginList:
    """Loaded extractors and metrics (sorted by name); ``problems``: plugins that failed to load or
    loaded with something wrong, with why (alert on any); ``skipped``: plugins the server was told
    to leave out (IMAGESEARCH_PLUGINS, IMAGESEARCH_DISABLE_PLUGINS), with why."""

    extractors: tuple[ExtractorInfo, ...]
    metrics: tuple[MetricInfo, ...]
    problems: tuple[str, ...] = ()
    local_features: tuple[LocalFeaturesInfo, ...] = ()
    skipped: tuple[str, ...] = ()

    def extractor(self, name: str) -> ExtractorInfo:
        """The extractor called ``name`` (KeyError if the server has none)."""
        return _by_name(self.extractors, name, "extractor")

    def metric(self, name: str) -> MetricInfo:
        """The metric called ``name`` (KeyError if the server has none)."""
        return _by_name(self.metrics, name, "metric")

    @classmethod
    def from_proto(cls, message: pb.ListPluginsResponse) -> Self:
        return cls(
            extractors=tuple(ExtractorInfo.from_proto(item) for item in message.extractors),
            metrics=tuple(MetricInfo.from_proto(item) for item in message.metrics),
            problems=tuple(message.problems),
            local_features=tuple(LocalFeaturesInfo.from_proto(item) for item in message.local_features),
            skipped=tuple(message.skipped),
        )


_Named = TypeVar("_Named", ExtractorInfo, MetricInfo)


def _by_name(items: Sequence[_Named], name: str, kind: str) -> _Named:
    for item in items:
        if item.name == name:
            return item
    known = ", ".join(item.name for item in items) or "none"
    raise KeyError(f"no {kind} named {name!r} on the server (loaded: {known})")
