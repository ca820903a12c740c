"""One collection: its spec, its store, its index, and the rules that bind them.

A collection fixes an extractor (name and version), a metric, an index type and
the local features it keeps when it is created; only TrainCollection changes the
extractor's version (a trainable extractor's state, refitted on the collection's
own images). The store is written first and is the truth; the
index follows it and can always be rebuilt from it. Writes hold the writer
lock, searches the reader lock, so searches run concurrently with each other
but never see an index mid-update.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imagesearch.plugins.types import (
    FLAT,
    HNSW,
    IVF,
    Extractor,
    FitAbandoned,
    LocalFeatures,
    Metric,
    NotEnoughTrainingData,
    TrainableExtractor,
)
from imagesearch.server.classify import CENTROID, Classification, shares
from imagesearch.server.config import Limits
from imagesearch.server.descriptors import out_of_descriptors, out_of_descriptors_said
from imagesearch.server.errors import (
    Aborted,
    AlreadyExists,
    DiskFull,
    FailedPrecondition,
    ImageSearchError,
    Internal,
    InvalidArgument,
    NotFound,
    disk_full_reported,
    plugin_failure,
    shown,
)
from imagesearch.server.files import fsync_dir
from imagesearch.server.plugin_output import checked_encode
from imagesearch.server.rwlock import ReadWriteLock
from imagesearch.server.snapshot import EarlierSnapshot, SnapshotError, read_snapshot, write_snapshot
from imagesearch.server.store import CollectionStore, HitRow, ImageRow, NewImage, page_size_for
from imagesearch.server.vector_index import (
    FLOAT32,
    INT8,
    INT8_METRIC,
    STORAGES,
    IndexSpec,
    VectorIndex,
    brute_force,
    default_train_size,
    rescore_pool,
)
from imagesearch.server.vector_input import as_matrix

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # used with fullmatch: no "$" before "\n"
STORE_FILE = "store.sqlite3"
# A label filter that leaves at most this many images is searched among those images only
# (vectors fetched by id); beyond it, the whole index is scanned with an id selector.
GATHER_LIMIT = 20_000
SKIPPED = -1  # Collection.add's row id for an image left out under skip_existing
SNAPSHOT_FILE = "index.snapshot"
# A snapshot that fails is logged: the index is only a cache. sqlite3.Error: pruning the removals
# a snapshot covers writes to the store, which may be read-only (an outside test: the error killed
# the snapshot thread, and every collection's periodic snapshots with it).
SNAPSHOT_ERRORS = (OSError, DiskFull, sqlite3.Error)
# A snapshot rewrites the whole index while the collection's writers wait, however few the
# changes, so periodic snapshots are bounded by what they cost: after one that took t seconds the
# next waits (1 / SNAPSHOT_TIME_SHARE - 1) t, so they take at most this share of the time (every
# 5,000 adds wrote the whole index again: a bulk import rewrote it over and over, quadratic in its
# size); and the interval alone takes one only for changes of at least SNAPSHOT_TRICKLE_SHARE of
# the images (a few adds a minute to a large collection rewrote all of it every minute, to save a
# replay of those few). A clean stop always takes one.
SNAPSHOT_TIME_SHARE = 0.1
SNAPSHOT_TRICKLE_SHARE = 0.01
EXTRACTOR_CHANGED = "EXTRACTOR_CHANGED"  # a query encoded with a state a training replaced
TRAINING_SAMPLE_IMAGES = 2000  # images a fit reads at most (a seeded sample): ~290 MB of SIFT features
ENCODE_CHUNK = 256
REBUILD_CHUNK = 4096  # vectors a training's new index is given at once (the store's replay chunk)


NAME_RULE = "use 1-64 characters of A-Z a-z 0-9 _ -, starting with a letter or digit"


def check_collection_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"invalid collection name {shown(name)}: {NAME_RULE}", field="name", reason="BAD_COLLECTION_NAME"
        )
    return name


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection is bound to; persisted in its store and never changed."""

    name: str
    extractor: str
    extractor_version: str
    metric: str
    dim: int
    index_type: str = FLAT
    nlist: int = 100
    nprobe: int = 10
    train_size: int = 0
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    storage: str = FLOAT32
    local_features: str = ""  # the LocalFeatures kept for every image ("" for none)
    local_features_version: str = ""
    extractor_base_version: str = ""  # a trainable extractor's code version (its state may change)
    store_originals: bool = False
    description: str = ""
    created: float = field(default_factory=time.time)

    @property
    def trainable(self) -> bool:
        """Whether the collection's vectors come from a trainable extractor's own stored state
        (its images then always keep the local features it encodes)."""
        return bool(self.extractor_base_version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CollectionSpec:
        return cls(**json.loads(text))

    def index_spec(self, metric: Metric) -> IndexSpec:
        return IndexSpec(
            kind=self.index_type,
            dim=self.dim,
            metric=metric,
            nlist=self.nlist,
            nprobe=self.nprobe,
            train_size=self.train_size,
            hnsw_m=self.hnsw_m,
            ef_construction=self.ef_construction,
            ef_search=self.ef_search,
            storage=self.storage,
        )


IVF_KEYS = frozenset({"nlist", "nprobe", "train_size"})
HNSW_KEYS = frozenset({"hnsw_m", "ef_construction", "ef_search"})


def index_params(index_type: str, given: dict[str, int], limits: Limits) -> dict[str, int]:
    """The parameters a new collection gets: the given ones (0 = unset) over the spec's defaults.

    Parameters of another index type are refused (the Python client refuses them too). A default
    above the server's limit for it is lowered to the limit: an operator who lowers
    ``max_hnsw_m`` or ``max_ef`` has not asked for every create that leaves them unset to fail.
    nprobe's default, 10 lists, is capped at nlist: probing more lists than exist is meaningless.
    """
    chosen = {key: value for key, value in given.items() if value}
    for kind, group, keys in ((IVF, "ivf", IVF_KEYS), (HNSW, "hnsw", HNSW_KEYS)):
        if index_type != kind and chosen.keys() & keys:  # dropped without a word (an outside test)
            raise InvalidArgument(
                f"{group} parameters are for index_type {kind}, not {index_type}",
                field=f"collection.{group}",
                reason="BAD_INDEX_PARAM",
            )
    ceilings = {
        "nlist": limits.max_nlist,
        "hnsw_m": limits.max_hnsw_m,
        "ef_construction": limits.max_ef,
        "ef_search": limits.max_ef,
    }
    for key, ceiling in ceilings.items():
        if key not in chosen and getattr(CollectionSpec, key) > ceiling:
            chosen[key] = ceiling
    nlist = chosen.get("nlist", CollectionSpec.nlist)
    if (
        index_type == IVF
        and "train_size" not in chosen
        and default_train_size(nlist, 0) > limits.max_train_size
    ):
        chosen["train_size"] = limits.max_train_size  # 39 a list, lowered like the others (an outside test)
    nprobe = min(CollectionSpec.nprobe, nlist)
    if "nprobe" not in chosen and (index_type == IVF or nprobe != CollectionSpec.nprobe):
        chosen["nprobe"] = nprobe
    return chosen


def check_index_params(spec: CollectionSpec, limits: Limits) -> None:
    """Every index parameter within its bound, or INVALID_ARGUMENT naming the field and the bound.

    FAISS itself asserts (and aborts the process) or allocates without limit on
    values past these, so they are refused before anything is built.
    """
    bounds = {  # parameter: (field, lowest, highest)
        "nlist": ("collection.ivf.nlist", 1, limits.max_nlist),
        "nprobe": ("collection.ivf.nprobe", 1, spec.nlist),
        "train_size": ("collection.ivf.train_size", spec.nlist, limits.max_train_size),
        "hnsw_m": ("collection.hnsw.m", 2, limits.max_hnsw_m),
        "ef_construction": ("collection.hnsw.ef_construction", 1, limits.max_ef),
        "ef_search": ("collection.hnsw.ef_search", 1, limits.max_ef),
    }
    if spec.storage not in STORAGES:
        raise InvalidArgument(
            f"unknown storage {shown(spec.storage)} (available: {', '.join(STORAGES)})",
            field="collection.storage",
            reason="BAD_INDEX_PARAM",
        )
    if spec.storage != FLOAT32 and spec.index_type != FLAT:
        raise InvalidArgument(
            f"storage {spec.storage} is for flat indexes; an {spec.index_type} index keeps float32",
            field="collection.storage",
            reason="BAD_INDEX_PARAM",
        )
    if spec.storage == INT8 and spec.metric != INT8_METRIC:
        raise InvalidArgument(
            f"storage int8 is for {INT8_METRIC} collections, whose unit-length vectors bound its grid "
            f"to [-1, 1]; a {spec.metric} collection can use float16",
            field="collection.storage",
            reason="BAD_INDEX_PARAM",
        )
    for name, (field_path, lowest, highest) in bounds.items():
        value = getattr(spec, name)
        if name == "train_size" and value == 0:  # unset: 39 per list
            continue
        if lowest <= value <= highest:
            continue
        said = f"{field_path.rsplit('.', 1)[1]} is {value}; it must be between {lowest} and {highest}"
        if name == "train_size":  # k-means needs a vector a list; nlist may be more than the limit
            said += (
                f": {spec.nlist} lists need more training vectors than this server's max_train_size "
                f"allows; ask for at most {highest} lists"
                if lowest > highest
                else " (k-means needs at least one training vector per list)"
            )
        raise InvalidArgument(
            said,
            field=field_path,
            reason="BAD_INDEX_PARAM",
            metadata={"min": str(lowest), "max": str(highest), "value": str(value)},
        )


@dataclass(frozen=True)
class CollectionInfo:
    """A collection as the API shows it: its spec (defaults resolved) and its current state."""

    spec: CollectionSpec
    image_count: int
    index_bytes: int
    index_trained: bool
    read_only: bool
    state_reason: str
    local_features_bytes: int = 0


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    distance: float
    label: str
    metadata: dict[str, str]
    row_id: int = 0
    inliers: int = 0  # geometric re-ranking's verified matches (0 without it)


@dataclass(frozen=True)
class TrainOutcome:
    previous_version: str
    training_images: int
    reencoded_images: int
    train_ms: float = 0.0  # filled in by the engine, which times the whole call


def _with_outliers(ids: np.ndarray, outliers: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """An int8 scan's candidates for each query, and the index's outliers (those a label filter
    allows), which the scan may have misjudged: all of them are re-scored."""
    if allowed is not None:
        outliers = outliers[np.isin(outliers, allowed)]
    if len(outliers) == 0:
        return ids
    return np.hstack([ids, np.broadcast_to(outliers, (len(ids), len(outliers)))])


def scored_by(metric: Metric, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``metric``'s distances and scores for FAISS's raw distances, refused (INTERNAL,
    METRIC_FAILED, naming the metric) unless one number each and none NaN: a metric that raised
    failed as SEARCH_FAILED without its name, and NaN scores reached Classify's answers (an
    outside test). The one home of the rule for Search, SearchBatch and Classify."""
    with plugin_failure(f"metric {metric.name!r} scoring hits", "METRIC_FAILED"):
        distances = np.asarray(metric.to_distance(raw))
        scores = np.asarray(metric.to_score(distances))
    wrong = ""
    if distances.dtype.kind not in "iuf" or scores.dtype.kind not in "iuf":
        wrong = f"distances of type {distances.dtype} and scores of type {scores.dtype}, not numbers"
    elif distances.shape != raw.shape or scores.shape != raw.shape:
        wrong = f"{distances.shape} distances and {scores.shape} scores for {raw.shape} raw distances"
    elif not np.isfinite(scores).all() or np.isnan(distances).any():
        wrong = "non-finite scores" if not np.isfinite(scores).all() else "NaN distances"
    if wrong:
        raise Internal(f"metric {metric.name!r} produced {wrong}", reason="METRIC_FAILED")
    return distances, scores


def _fit_options(extractor: TrainableExtractor, still_wanted: Callable[[], None]) -> dict[str, object]:
    """``still_wanted`` for a ``fit`` that takes it (a plugin written before it may not), raising
    the plugin API's ``FitAbandoned`` (caused by the server's own error) so the plugin can let it
    through while its other exceptions are the plugin's failure."""
    if "still_wanted" not in inspect.signature(extractor.fit).parameters:
        return {}

    def fit_still_wanted() -> None:
        try:
            still_wanted()
        except ImageSearchError as exc:
            raise FitAbandoned(str(exc)) from exc

    return {"still_wanted": fit_still_wanted}


def _hits(metric: Metric, pairs: list[tuple[float, int]], rows: dict[int, HitRow], k: int) -> list[Hit]:
    """Raw (FAISS distance, row id) pairs to the k best hits, scored by ``metric``, best first."""
    distances, scores = scored_by(metric, np.array([d for d, _ in pairs], dtype=np.float32))
    hits = [
        Hit(row.id, float(score), float(distance), row.label, row.metadata, row_id)
        for (_, row_id), distance, score in zip(pairs, distances, scores, strict=True)
        if (row := rows.get(row_id)) is not None
    ]
    hits.sort(key=lambda hit: hit.score, reverse=True)
    return hits[:k]


def prepared_by(metric: Metric, vectors: np.ndarray) -> np.ndarray:
    """``metric.prepare(vectors)``, refused (INTERNAL, METRIC_FAILED, naming the metric) unless it
    gives finite float32 vectors of the same shape. The index takes whatever it is given; a plugin
    whose preparation changed the shape had an add acknowledged, then its collection read-only for
    good, and one that gave NaN had searches answer nothing (outside tests)."""
    with plugin_failure(f"metric {metric.name!r} preparing vectors", "METRIC_FAILED"):
        prepared = np.asarray(metric.prepare(vectors), dtype=np.float32)
    if prepared.shape != vectors.shape or not np.isfinite(prepared).all():
        raise Internal(
            f"metric {metric.name!r} prepared vectors of shape {vectors.shape} into "
            + (f"shape {prepared.shape}" if prepared.shape != vectors.shape else "non-finite values"),
            reason="METRIC_FAILED",
        )
    return prepared


class Collection:
    def __init__(
        self,
        directory: Path,
        spec: CollectionSpec,
        metric: Metric,
        extractor: Extractor | None,
        local: LocalFeatures | None = None,
        extractor_problem: str = "",
    ):
        """``extractor`` and ``local`` are the registered plugins of the spec's names (None when
        this server lacks them, ``extractor_problem`` then saying why); the collection checks their
        versions and binds its own state."""
        self.directory = directory
        self.spec = spec
        self.metric = metric
        self.store = CollectionStore(directory / STORE_FILE, create=False)
        self._check_tables(spec)
        # Why image queries and adds are refused ("" while the extractor serves): said in their
        # errors and in GetCollection's state_reason, not only in the start-up log.
        self._extractor_problem = extractor_problem or "no loaded plugin provides it"
        self._extractor = self._bind(extractor)
        self._local = local if local is not None and self._matches(local) else None
        self._training = threading.Lock()
        self._local_bytes: tuple[int, int] | None = None  # (seq, bytes) cached for GetCollection
        # Three locks, always taken in this order. ``_writes`` serialises every change to the store;
        # ``_indexing`` the index updates that follow the commits, in commit order: an add takes it
        # before it lets ``_writes`` go, so the next add commits while this one updates the index,
        # and every other change takes both (``_writing``), finding the index up to date with the
        # store. ``lock`` guards the index, the spec and the extractor: searches share it, and an
        # add takes it only for its index update, so searches never wait for a commit's fsync or a
        # snapshot (docs/decisions.md).
        self._writes = threading.Lock()
        self._indexing = threading.Lock()
        self.lock = ReadWriteLock()
        self._applied_seq = 0
        self._snapshot_seq = 0
        self._last_snapshot = time.monotonic()
        self._snapshot_took = 0.0  # seconds the last snapshot took to write
        self.closed = False
        self.problem = ""  # why the index is unavailable (the collection is then read-only)
        self._centroids: tuple[int, list[str], np.ndarray, np.ndarray] | None = None  # cached class sums
        self.index: VectorIndex | None = None
        self._learnt_kept = False  # whether the store keeps what the index learnt (``_keep_learnt``)
        try:
            self.index = self._load_index()
        except Exception as exc:  # one broken collection must not stop the server
            self._index_failed(f"its index could not be built from the store: {exc}")
        self._keep_learnt()  # learnt at this start (a rebuild), or before stores kept it

    def _bind(self, registered: Extractor | None) -> Extractor | None:
        """The extractor serving this collection: the registered one if its version and dimension
        match the spec's; for a trainable one, an instance over the collection's own stored state.
        When there is none, ``_extractor_problem`` says why."""
        if registered is None:
            return None
        bound = registered
        if isinstance(registered, TrainableExtractor) and self.spec.trainable:
            state = self.store.extractor_state()
            if state is None or registered.base_version != self.spec.extractor_base_version:
                return self._unbound(
                    f"the server's {registered.name} {registered.base_version} cannot serve its stored "
                    f"state (made by {self.spec.extractor_base_version})"
                )
            try:
                bound = registered.with_state(state)
            except Exception as exc:  # a plugin's bug fails this collection, not the server's start
                return self._unbound(f"its stored extractor state is unusable: {exc}", error=True)
        if bound.version != self.spec.extractor_version:
            return self._unbound(f"the server has version {bound.version!r} of it")
        if bound.dim != self.spec.dim:  # a plugin that changed its output size under the same version
            return self._unbound(
                f"it now makes vectors of dimension {bound.dim}, the collection holds {self.spec.dim}",
                error=True,
            )
        return bound

    def _unbound(self, problem: str, *, error: bool = False) -> None:
        """No extractor for this collection, because of ``problem`` (logged, and kept for its errors)."""
        self._extractor_problem = problem
        log.log(
            logging.ERROR if error else logging.WARNING,
            "collection %s: extractor %s version %s cannot serve it: %s; image queries and adds are refused",
            self.spec.name,
            self.spec.extractor,
            self.spec.extractor_version,
            problem,
        )
        return None

    def _matches(self, local: LocalFeatures) -> bool:
        if local.name == self.spec.local_features and local.version == self.spec.local_features_version:
            return True
        log.warning(
            "collection %s keeps local features %s %s, server has %s %s: image adds and re-ranking refused",
            self.spec.name,
            self.spec.local_features,
            self.spec.local_features_version,
            local.name,
            local.version,
        )
        return False

    def _index_failed(self, problem: str) -> None:
        """Serve the store read-only: the data is safe, only the index is missing."""
        self.index, self.problem = None, problem
        log.error("collection %s is read-only: %s", self.spec.name, problem, exc_info=True)

    def check_serving(self) -> None:
        """FailedPrecondition if the collection is read-only: checked before a request's own validation."""
        self.live_index()

    def live_index(self) -> VectorIndex:
        """The index, or FailedPrecondition saying why this collection is read-only."""
        if self.index is None:
            raise FailedPrecondition(
                f"collection {self.spec.name!r} is read-only: {self.problem}; its images can still be "
                "read and listed (fix the cause and restart, or delete and re-create it)",
                reason="INDEX_UNAVAILABLE",
            )
        return self.index

    # -- opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory: Path,
        spec: CollectionSpec,
        metric: Metric,
        extractor: Extractor | None,
        local: LocalFeatures | None = None,
    ) -> Collection:
        """Write a new collection's spec (and a trainable extractor's starting state), then open it."""
        directory.mkdir(parents=True, exist_ok=False)
        store = CollectionStore(directory / STORE_FILE, page_size=page_size_for(spec.dim))
        store.set_meta("spec", spec.to_json())
        if isinstance(extractor, TrainableExtractor):
            store.set_extractor_state(extractor.state())
        store.close()
        return cls(directory, spec, metric, extractor, local)

    @staticmethod
    def read_spec(directory: Path) -> CollectionSpec:
        store = CollectionStore(directory / STORE_FILE, create=False, migrate=False)
        try:
            text = store.get_meta("spec")
        finally:
            store.close()
        if text is None:
            raise ValueError(f"{directory} has no collection spec")
        return CollectionSpec.from_json(text)

    def _check_tables(self, spec: CollectionSpec) -> None:
        """A table this collection's spec relies on must have been in the store already: opening
        adds the tables later versions brought, so a lost one would come back empty and the
        collection serve as READY without its local features (an outside test) or its trained
        state."""
        needed = {"local_features"} if spec.local_features else set()
        self.store.require_tables(needed | ({"extractor_state"} if spec.trainable else set()))

    def _load_index(self) -> VectorIndex:
        """Snapshot plus the store's tail; a full rebuild when the snapshot is unusable or disagrees."""
        index_spec = self.spec.index_spec(self.metric)
        path = self.directory / SNAPSHOT_FILE
        try:
            index, seq = read_snapshot(
                path,
                index_spec,
                self.store.identity,
                self.store.last_seq(),
                self.store.commit_token,
                self._stored_learnt(),
            )
        except SnapshotError as exc:
            if path.exists():
                # INFO for an earlier version's snapshot: rebuilt once, as an upgrade's expected step
                level = logging.INFO if isinstance(exc, EarlierSnapshot) else logging.WARNING
                log.log(
                    level,
                    "collection %s: snapshot unusable (%s); rebuilding from the store",
                    self.spec.name,
                    exc,
                )
                self._discard_snapshot()
            return self._rebuild(index_spec)
        self._snapshot_seq = seq
        compacted_live = self._replay(index, after_seq=seq)
        if index.size != self.store.count():
            log.warning(
                "collection %s: index holds %d vectors after replay but the store %d; rebuilding",
                self.spec.name,
                index.size,
                self.store.count(),
            )
            self._discard_snapshot()
            return self._rebuild(index_spec)
        if compacted_live or index.needs_compaction():  # removals replayed as tombstones after a crash
            log.info(
                "collection %s: %d tombstones after replay; compacting", self.spec.name, len(index.tombstones)
            )
            return self._rebuild(index_spec)
        return index

    def _discard_snapshot(self) -> None:
        """Delete a snapshot the store disagrees with, before any write. Left on disk, one refused
        beside a store restored from an older backup was taken back once new writes brought the
        store to the writes it covers, and served the old rows' vectors under the new rows' ids,
        for good (an outside test: a restore as documented, adds, a kill -9). One that cannot be
        deleted (a directory in its place) is logged: it cannot be read either, and the snapshot
        is only a cache, never a reason not to serve."""
        path = self.directory / SNAPSHOT_FILE
        try:
            path.unlink(missing_ok=True)
            fsync_dir(self.directory)
        except OSError as exc:
            log.error(
                "collection %s: the refused snapshot %s could not be deleted: %s", self.spec.name, path, exc
            )

    def _replay(self, index: VectorIndex, after_seq: int, upto_seq: int | None = None) -> bool:
        """Apply the store's changes after ``after_seq`` (up to ``upto_seq``, else all) to ``index``.
        True if the tombstones ever passed the compaction threshold on the way, as the live
        collection then compacted (adds after it can bring them back under: an outside test)."""
        upto = self.store.last_seq() if upto_seq is None else upto_seq
        # In sequence order, removals between the adds: what an index holds when it trains (IVF)
        # or learns its grid (int8) must be what it held live. All adds first, then all removals,
        # trained a crashed collection on vectors removed before it ever reached the size (an
        # outside test: int8 recall collapsed after a kill -9, for good).
        removals = self.store.removals_after(after_seq, upto_seq=upto)
        seqs = np.array([s for s, _ in removals], dtype=np.int64)
        removed = np.array([r for _, r in removals], dtype=np.int64)
        done, compacted = 0, False  # removals applied; whether the live collection compacted
        for row_ids, vectors, row_seqs in self.store.iter_vectors(after_seq, upto_seq=upto):
            prepared = prepared_by(self.metric, vectors)
            start = 0
            while done < len(seqs) and seqs[done] < row_seqs[-1]:
                cut = int(np.searchsorted(row_seqs, seqs[done]))  # rows committed before that removal
                index.add(row_ids[start:cut], prepared[start:cut])
                end = done + int(np.searchsorted(seqs[done:], row_seqs[cut]))  # removals before the next row
                index.remove(removed[done:end])
                compacted |= index.needs_compaction()
                start, done = cut, end
            index.add(row_ids[start:], prepared[start:])
        index.remove(removed[done:])
        self._applied_seq = upto
        return compacted or index.needs_compaction()

    def _rebuild(self, index_spec: IndexSpec, upto_seq: int | None = None) -> VectorIndex:
        index = VectorIndex(index_spec, learnt=self._stored_learnt())
        self._snapshot_seq = 0
        self._replay(index, after_seq=0, upto_seq=upto_seq)
        return index

    def _stored_learnt(self) -> np.ndarray | None:
        """What the index learnt in an earlier life, as the store keeps it."""
        learnt = self.store.learnt()
        self._learnt_kept = learnt is not None
        return learnt

    def _keep_learnt(self) -> None:
        """Keep what the index learnt (IVF's lists, int8's grid) with the store, once. Learnt again
        from the store's first rows, it could differ: rows removed since are gone, so a rebuild
        after a crash answered otherwise than the index it replaced (and ran k-means again). A
        failure to keep it is logged: the rows are committed, the index serves, and a rebuild
        learns it again as before."""
        learnt = None if self._learnt_kept or self.index is None else self.index.learnt
        if learnt is None:
            return
        try:
            self.store.keep_learnt(learnt)
        except (sqlite3.Error, DiskFull) as exc:
            log.warning("collection %s: what its index learnt was not kept (%s)", self.spec.name, exc)
            return
        self._learnt_kept = True

    # -- extractor -----------------------------------------------------------------
    @property
    def loaded_extractor(self) -> Extractor | None:
        """The matching extractor if this server has it, else None (no error)."""
        return self._extractor

    def check_extractor(self) -> None:
        """FailedPrecondition unless this server has the collection's exact extractor (before decoding)."""
        self.extractor  # noqa: B018  (the property raises)

    @property
    def extractor_version(self) -> str:
        """The version this collection's vectors are encoded with now (it changes with training)."""
        return self.spec.extractor_version

    @property
    def loaded_local_features(self) -> LocalFeatures | None:
        """The collection's local features if this server has them, else None (no error)."""
        return self._local

    @property
    def local_features(self) -> LocalFeatures | None:
        """The local features this collection keeps (None when it keeps none); FailedPrecondition
        when it keeps some this server cannot extract: rows without them would break re-ranking
        and training."""
        if not self.spec.local_features:
            return None
        if self._local is None:
            raise FailedPrecondition(
                f"collection {self.spec.name!r} keeps local features {self.spec.local_features!r} version "
                f"{self.spec.local_features_version!r}, which this server does not provide; install or "
                "enable that plugin",
                reason="LOCAL_FEATURES_UNAVAILABLE",
            )
        return self._local

    @property
    def extractor(self) -> Extractor:
        """The extractor that serves this collection; FailedPrecondition if the server lacks that exact one."""
        if self._extractor is None:
            raise FailedPrecondition(
                f"collection {self.spec.name!r} was built with extractor {self.spec.extractor!r} "
                f"version {self.spec.extractor_version!r}, which this server cannot serve: "
                f"{self._extractor_problem}. Bring that extractor back and restart the server, or "
                "re-index into a new collection",
                reason="EXTRACTOR_UNAVAILABLE",
            )
        return self._extractor

    # -- writes --------------------------------------------------------------------
    def add(
        self,
        images: Sequence[NewImage],
        *,
        skip_existing: bool = False,
        before_storing: Callable[[], None] | None = None,
        after_storing: Callable[[], None] | None = None,
        before_commit: Callable[[], None] | None = None,
        training_wanted: Callable[[], None] | None = None,
    ) -> list[int]:
        """Commit rows to the store, then to the index. Returns row ids.

        An id that another caller committed after the engine checked (the check runs before this
        lock) fails the batch with AlreadyExists, or with ``skip_existing`` is left out: its row id
        is then SKIPPED. ``before_storing`` runs once the vectors are prepared, before the writer
        lock; it may wait, or raise to store nothing. ``after_storing`` runs once the rows are
        committed, before the index takes them (a stream's next chunk may then commit).
        ``before_commit`` runs under the writer lock, right before the commit: it may raise to
        store nothing (a deadline that passed while the add waited for the lock).
        ``training_wanted`` runs between the iterations of an IVF k-means this add sets off, after
        its commit: it raises ``TrainingPostponed`` to leave the index untrained (a stopping server).

        Searches go on during the store's commit and see the rows once the index has them, when
        this returns; a reader of the store (``get``, ``count``) may see them a moment sooner.
        """
        # Prepared before the commit (a metric plugin that fails here leaves nothing stored) and
        # before the writer lock, so that one caller's preparing overlaps another's commit.
        prepared = self._prepared(images)
        if before_storing is not None:  # e.g. a stream's chunk waiting for the one before it
            before_storing()
        with self._writes:
            self._check_open()
            self.live_index()  # a read-only collection refuses the add before storing anything
            if before_commit is not None:
                before_commit()
            current = self._current_encoding(images)
            if current is not images:  # re-encoded under the lock: a training replaced the state
                prepared = self._prepared(current)
            self._check_dimension(prepared)
            images = list(current)
            kept = [True] * len(images)
            try:
                row_ids, seqs = self.store.insert(images)
            except AlreadyExists:
                if not skip_existing:
                    raise
                taken = self.store.existing_ids([image.id for image in images])  # every commit is visible
                kept = [image.id not in taken for image in images]
                if not any(kept):
                    return [SKIPPED] * len(images)
                row_ids, seqs = self.store.insert(
                    [image for image, keep in zip(images, kept, strict=True) if keep]
                )
                prepared = prepared[np.array(kept)]
            if after_storing is not None:
                after_storing()
            self._indexing.acquire()  # before the next add may commit: index updates keep commit order
        try:
            # Only index changes take _indexing, which this add holds: the index stands still while
            # its storage grows here, and searches go on (VectorIndex.room_for).
            first = self.index  # the add before may have rebuilt it after a failed update
            ids = np.array(row_ids, dtype=np.int64)
            grown, pieces = None, [slice(0, len(ids))]
            if first is not None:
                grown = first.room_for(len(ids))
                first.learn_ahead(prepared, training_wanted)  # IVF's k-means, before the lock too
                pieces = first.pieces(len(ids))
            for number, piece in enumerate(pieces):  # one, but on HNSW (VectorIndex.pieces)
                with self.lock.write(after_waiting_readers=number > 0):
                    index = self.index  # another after a piece's failed update (rebuilt, or None)
                    if grown is not None and number == 0:
                        grown()
                    # Not after a rebuild (it holds every row of this add) or with none (read-only:
                    # the store keeps the rows). Searches between pieces see part of the add, as a
                    # search during it might, and label filters none of it (``_applied_seq``).
                    if index is not None and index is first:
                        self._follow_store(
                            lambda index=index, piece=piece: index.add(
                                ids[piece], prepared[piece], training_wanted
                            ),
                            upto_seq=seqs[-1],
                        )
                    if number == len(pieces) - 1:
                        self._applied_seq = seqs[-1]
            self._keep_learnt()  # after the lock: searches need not wait for its commit
        finally:
            self._indexing.release()
        stored = iter(row_ids)
        return [next(stored) if keep else SKIPPED for keep in kept]

    def _check_dimension(self, prepared: np.ndarray) -> None:
        """Refuse vectors of another size than the collection's before they are stored: the engine
        checks a client's vectors, so these came from a plugin (an extractor whose output changed
        size under the same version had its add acknowledged, then the collection read-only for
        good: an outside test)."""
        if prepared.shape[1] != self.spec.dim:
            raise Internal(
                f"vectors of dimension {prepared.shape[1]} reached collection {self.spec.name!r} of "
                f"dimension {self.spec.dim} (extractor {self.spec.extractor!r}); nothing was stored",
                reason="EXTRACTOR_FAILED",
            )

    def _prepared(self, images: Sequence[NewImage]) -> np.ndarray:
        """The rows' vectors as the index takes them (the metric's preparation, e.g. unit length)."""
        vectors = [np.asarray(image.vector, dtype=np.float32) for image in images]
        # Their own size, not the spec's: rows encoded before a training replaced the state are
        # prepared, then re-encoded under the writer lock (``_current_encoding``).
        return prepared_by(self.metric, as_matrix(vectors, len(vectors[0]) if vectors else self.spec.dim))

    def _current_encoding(self, images: Sequence[NewImage]) -> Sequence[NewImage]:
        """Re-encode rows whose vectors a since-replaced extractor state made (a training committed
        while they were being extracted): a collection never mixes states."""
        extractor = self._extractor
        if not isinstance(extractor, TrainableExtractor):
            return images
        stale = [i for i, image in enumerate(images) if image.encoded_with not in ("", extractor.version)]
        if not stale:
            return images
        vectors = checked_encode(extractor, [images[i].local or b"" for i in stale])
        fresh = list(images)
        for i, vector in zip(stale, vectors, strict=True):
            fresh[i] = dataclasses.replace(fresh[i], vector=vector, encoded_with=extractor.version)
        return fresh

    def remove(self, ids: Sequence[str], before_commit: Callable[[], None] | None = None) -> int:
        """Remove the images with ``ids``; ``before_commit`` as in ``add``."""
        # The delete commits under the reader lock too: a search never meets a hit whose row is gone.
        with self._writing():
            with self.lock.write():
                self._check_open()
                index = self.live_index()
                if before_commit is not None:
                    before_commit()
                removed = self.store.delete(ids)
                self._follow_store(lambda: index.remove(np.array(removed, dtype=np.int64)))
                self._applied_seq = self.store.last_seq()
            if self.index is not None and self.index.needs_compaction():
                self._compact(self.index)
        return len(removed)

    def _compact(self, index: VectorIndex) -> None:
        """Rebuild an HNSW index without its tombstones (``needs_compaction``) while searches go on
        with it, then put the new one in place. Rebuilt under the write lock, it held every search
        of the collection for as long as inserting every vector takes: at the 1,100 vectors/s
        bench/README.md measured for HNSW ("Ingest stages", into 5,000 to 10,000 vectors; slower
        into more), 18 s or more for 20,000. The caller holds
        ``_writing``: nothing changes the store or the index meanwhile. A failure leaves the
        tombstoned index serving, which answers rightly (the removal is committed either way)."""
        try:
            rebuilt = self._rebuild(index.spec)
        except Exception as exc:
            log.error(
                "collection %s: compacting its HNSW index failed (%s); it keeps its tombstones",
                self.spec.name,
                exc,
            )
            return
        with self.lock.write():
            self.index = rebuilt

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The store's writer, with the index up to date with the store: what every change but an
        add's commit needs (an add updates the index after it lets the next add commit)."""
        with self._writes, self._indexing:
            yield

    def _follow_store(self, change: Callable[[], None], upto_seq: int | None = None) -> None:
        """Apply a committed change to the index; if FAISS refuses it, rebuild from the store (up
        to ``upto_seq``, the change's own: later adds may have committed, and add their rows
        themselves).

        The rows are committed and so the request succeeded: an index that fell
        behind is rebuilt at once, or the collection turns read-only, saying why.
        """
        try:
            change()
        except Exception as exc:
            log.error("collection %s: index update failed (%s); rebuilding", self.spec.name, exc)
            try:
                self.index = self._rebuild(self.spec.index_spec(self.metric), upto_seq)
            except Exception as again:
                self._index_failed(f"its index could not be rebuilt after a failed update: {again}")

    # -- reads ---------------------------------------------------------------------
    def search(
        self,
        raw_query: np.ndarray,
        k: int,
        labels: Sequence[str] = (),
        metric_override: Metric | None = None,
        exclude_row_id: int | None = None,
    ) -> list[Hit]:
        """The k best hits for a raw (not yet metric-prepared) query vector, best first."""
        return self.search_many(raw_query.reshape(1, -1), [k], labels, metric_override, [exclude_row_id])[0]

    @property
    def hits_follow_count(self) -> bool:
        """Whether a query's hits depend on how many the index is asked for, not only on which are
        best: HNSW's beam widens with the count past ef_search, int8 re-scores a pool of candidates
        that grows with it, and where scores tie FAISS's heap keeps other copies for another count
        (float16 and IVF: an outside test, one vector stored twice). Such queries share an index
        call only with queries that ask for as many; float32 flat ranks exactly, ties by id."""
        return not (self.spec.index_type == FLAT and self.spec.storage == FLOAT32)

    def search_many(
        self,
        raw_queries: np.ndarray,
        ks: Sequence[int],
        labels: Sequence[str] = (),
        metric_override: Metric | None = None,
        exclude_row_ids: Sequence[int | None] | None = None,
        version: str = "",
    ) -> list[list[Hit]]:
        """Hits for several queries with one index call (a matrix-matrix product on flat indexes).

        Each query gets its own ``k`` and excluded row; the index is asked for the largest
        and each list is cut to its own, which gives every query the hits it would get alone
        on flat and IVF indexes (where hits follow the count asked, ``hits_follow_count``, the
        engine batches queries asking for equal counts only). On a float32 flat index hits are scored exactly and equal scores ranked
        by id, so a query gets the same hits and scores alone or in any batch
        (``vector_index.EXACT_MARGIN``); on IVF, HNSW and quantised storage scores may differ in
        the last float32 bits (a matrix product sums in another order), and so may the order of
        hits that close.
        """
        excludes = list(exclude_row_ids) if exclude_row_ids is not None else [None] * len(ks)
        metric = metric_override or self.metric
        with self.lock.read():
            self._check_open()
            if version and version != self.extractor_version:
                raise Aborted(
                    f"collection {self.spec.name!r} was retrained while the query was encoded (extractor "
                    f"version {version} is now {self.extractor_version}); send the query again",
                    reason=EXTRACTOR_CHANGED,
                )
            allowed = self.store.row_ids_with_labels(labels, self._applied_seq) if labels else None
            if allowed is not None and len(allowed) == 0:
                return [[] for _ in ks]
            want = max(k + (exclude is not None) for k, exclude in zip(ks, excludes, strict=True))
            index = self.live_index() if metric_override is None else None
            quantized = index is not None and index.quantized
            if index is not None:
                prepared = prepared_by(self.metric, raw_queries)
                # int8 ranks approximately: take more candidates and re-score them in float32.
                asked = rescore_pool(want) if quantized else want
                if allowed is not None and len(allowed) <= GATHER_LIMIT:
                    # A small label set is compared exactly, whatever the index: a filter inside
                    # HNSW's graph walk or IVF's probed lists misses images of a rare label.
                    raw, ids = index.search_among(prepared, asked, allowed)
                else:
                    raw, ids = index.search(prepared, asked, allowed)
                if quantized:
                    ids = _with_outliers(ids, index.outliers(), allowed)
            else:
                raw, ids = self._search_other_metric(metric, raw_queries, want, allowed)
            if not quantized:
                found, rows = self._found(raw, ids, excludes)
        if quantized:  # re-scoring reads only the store: writers need not wait for it
            found, rows = self._found(*self._rescored(prepared, ids, want), excludes)
        return [_hits(metric, pairs, rows, k) for pairs, k in zip(found, ks, strict=True)]

    def _found(
        self, raw: np.ndarray, ids: np.ndarray, excludes: Sequence[int | None]
    ) -> tuple[list[list[tuple[float, int]]], dict[int, HitRow]]:
        """Each query's (raw distance, row id) pairs without empty slots and its excluded row, and
        the rows of all of them."""
        found = [
            [
                (d, i)
                for d, i in zip(raw[q].tolist(), ids[q].tolist(), strict=True)
                if i >= 0 and i != excludes[q]
            ]
            for q in range(len(excludes))
        ]
        return found, self.store.rows_by_row_id(sorted({i for pairs in found for _, i in pairs}))

    def _rescored(
        self, prepared_queries: np.ndarray, ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """An int8 search's candidates re-scored with the store's float32 vectors: exact distances
        and order, as a float32 index would give for them. Rows removed since the candidates were
        found are absent from the store and drop out."""
        stored = self.store.vectors_by_row_id(sorted({int(i) for i in ids.ravel() if i >= 0}))
        order = list(stored)  # each candidate prepared once, however many queries share it
        position = {row_id: n for n, row_id in enumerate(order)}
        prepared = prepared_by(self.metric, np.stack([stored[r] for r in order])) if order else None
        exact_raw = np.zeros((len(ids), k), np.float32)
        exact_ids = np.full((len(ids), k), -1, np.int64)
        for q, candidates in enumerate(ids):
            # Each candidate once (an outlier may also be among the scan's best), by row id: equal
            # scores rank by id, as on a float32 index.
            kept = np.unique([i for i in candidates.tolist() if i in position]).astype(np.int64)
            if len(kept) == 0:
                continue
            base = prepared[[position[int(i)] for i in kept]]  # type: ignore[index]
            found_raw, positions = brute_force(self.metric, base, prepared_queries[q : q + 1], k)
            count = found_raw.shape[1]
            exact_raw[q, :count], exact_ids[q, :count] = found_raw[0], kept[positions[0]]
        return exact_raw, exact_ids

    def _search_other_metric(
        self, metric: Metric, raw_queries: np.ndarray, k: int, allowed: np.ndarray | None
    ):
        """Exact search with another metric over a flat collection's stored vectors."""
        if self.spec.index_type != FLAT:
            raise FailedPrecondition(
                f"metric override needs a flat index; collection {self.spec.name!r} is {self.spec.index_type}",
                field="metric",
                reason="METRIC_OVERRIDE_UNSUPPORTED",
            )
        index = self.live_index()
        ids = index.ids()
        base = index.stored_vectors()
        if index.quantized and len(index.outliers()):
            # An outlier decodes clipped, far from itself: compare its stored float32 vector instead
            # (an outside test: an override missed a vector's own copy among its top 5).
            base = np.array(base)
            at = np.flatnonzero(np.isin(ids, index.outliers()))
            stored = self.store.vectors_by_row_id(ids[at].tolist())
            base[at] = prepared_by(self.metric, np.stack([stored[int(i)] for i in ids[at]]))
        if allowed is not None:
            mask = np.isin(ids, allowed)
            ids, base = ids[mask], base[mask]
        if len(ids) == 0:
            return np.zeros((len(raw_queries), 0), np.float32), np.zeros((len(raw_queries), 0), np.int64)
        # Stored vectors went through the collection metric's prepare; put the queries in the same space first.
        query = prepared_by(metric, prepared_by(self.metric, raw_queries))
        raw, positions = brute_force(metric, prepared_by(metric, base), query, k)
        return raw, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Read the store under the reader lock, refusing a deleted collection: DeleteCollection
        closes the store's connections under the writer lock, so no read can overlap it."""
        with self.lock.read():
            self._check_open()
            yield

    def get(self, image_id: str, *, with_original: bool = False, with_vector: bool = False) -> ImageRow:
        with self._reading():
            row = self.store.get(image_id, with_original=with_original, with_vector=with_vector)
        if row is None:
            raise NotFound(
                f"image {shown(image_id)} not found in collection {self.spec.name!r}",
                reason="IMAGE_NOT_FOUND",
            )
        return row

    def vector_of(self, image_id: str) -> tuple[int, np.ndarray]:
        with self._reading():
            found = self.store.vector_of(image_id)
        if found is None:
            raise NotFound(
                f"image {shown(image_id)} not found in collection {self.spec.name!r}",
                reason="IMAGE_NOT_FOUND",
            )
        return found

    def local_features_of(self, row_ids: Sequence[int]) -> dict[int, bytes]:
        with self._reading():
            return self.store.local_features_of(row_ids)

    def stored_local_features(self, image_id: str) -> bytes:
        """An indexed image's local features (an image_id query's, for re-ranking)."""
        row_id, _ = self.vector_of(image_id)
        found = self.local_features_of([row_id]).get(row_id)
        if found is None:
            raise FailedPrecondition(
                f"image {shown(image_id)} has no local features (it was added as a vector)",
                field="image_id",
                reason="NO_LOCAL_FEATURES",
            )
        return found

    def nearest_centroids(self, raw_query: np.ndarray, exclude_row_id: int | None = None) -> Classification:
        """Classify by the most similar class mean (of metric-prepared vectors); with
        ``exclude_row_id``, that image is left out of its class's mean (leave-one-out)."""
        with self._reading():
            labels, sums, counts = self._class_sums()
            found = self.store.rows_by_row_id([exclude_row_id]) if exclude_row_id is not None else {}
            row = found.get(exclude_row_id)
        if row is not None and row.label in labels:  # the query is that image: take it out of its mean
            at = labels.index(row.label)
            sums, counts = sums.copy(), counts.copy()
            sums[at] -= prepared_by(self.metric, raw_query[None])[0]
            counts[at] -= 1
        keep = counts > 0
        if not keep.any():
            return shares((), CENTROID)
        names = [label for label, kept in zip(labels, keep, strict=True) if kept]
        means = prepared_by(self.metric, sums[keep] / counts[keep, None])
        query = prepared_by(self.metric, raw_query[None])
        raw, positions = brute_force(self.metric, means, query, len(names))
        scores = scored_by(self.metric, raw[0])[1]
        return shares(((names[p], s) for p, s in zip(positions[0], scores, strict=True) if p >= 0), CENTROID)

    def _class_sums(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Per label: the sum and count of prepared vectors, recomputed only after writes."""
        if self._centroids is None or self._centroids[0] != self._applied_seq:
            codes: dict[str, int] = {}
            sums = np.zeros((0, self.spec.dim))
            counts = np.zeros(0)
            for _, labels, vectors in self.store.iter_labelled():
                rows = np.array([codes.setdefault(label, len(codes)) for label in labels])
                if len(codes) > len(counts):  # new labels in this chunk
                    sums = np.vstack([sums, np.zeros((len(codes) - len(counts), self.spec.dim))])
                    counts = np.concatenate([counts, np.zeros(len(codes) - len(counts))])
                np.add.at(sums, rows, prepared_by(self.metric, vectors))
                np.add.at(counts, rows, 1)
            order = sorted(codes, key=codes.__getitem__)
            self._centroids = (self._applied_seq, order, sums, counts)
        _, names, matrix, count_array = self._centroids
        return names, matrix, count_array

    def count(self, label: str | None = None) -> int:
        """Images stored (with ``label``, when given)."""
        with self._reading():
            return self.store.count(label or None)

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored."""
        with self._reading():
            return self.store.existing_ids(ids)

    def page(self, after_row_id: int, limit: int, label: str | None = None) -> list[ImageRow]:
        """Rows in insertion order after a position (keyset pagination)."""
        with self._reading():
            return self.store.page(after_row_id, limit, label or None)

    def info(self) -> CollectionInfo:
        """What GetCollection reports, with every default resolved."""
        spec = self.spec
        unreadable = ""
        with self._reading():
            index_bytes = self.index.memory_bytes() if self.index is not None else 0
            try:
                count = self.store.count()
                if self._local_bytes is None or self._local_bytes[0] != self._applied_seq:
                    local = self.store.local_features_bytes() if spec.local_features else 0
                    self._local_bytes = (self._applied_seq, local)
            except sqlite3.DatabaseError as exc:  # damaged since it opened: say so, and let others list
                count, self._local_bytes = 0, None
                unreadable = (
                    f"its store cannot be read: {exc}; {out_of_descriptors_said()}"
                    if out_of_descriptors()
                    else f"its store cannot be read: {exc}; restore it from a backup, or delete the collection"
                )
        return CollectionInfo(
            spec=dataclasses.replace(spec, train_size=default_train_size(spec.nlist, spec.train_size)),
            image_count=count,
            index_bytes=index_bytes,
            index_trained=self.index_trained,
            read_only=bool(self.problem or unreadable),
            state_reason=unreadable or self.state_reason,
            local_features_bytes=self._local_bytes[1] if self._local_bytes else 0,
        )

    @property
    def index_trained(self) -> bool:
        """For IVF: whether the trained index is in use (False for other kinds)."""
        return self.index is not None and self.index.trained

    @property
    def state_reason(self) -> str:
        """Why the collection is read-only, or a warning about its index or its extractor; "" when
        all is well (image queries and adds refused for want of the extractor: monitoring built on
        GetCollection must see it, not only the start-up log; an outside test)."""
        if self.problem:
            return self.problem
        warnings = [self.index.training_error, self.index.storage_note] if self.index is not None else []
        if self.spec.local_features and self._local is None:
            warnings.insert(
                0,
                f"image adds and re-ranking are refused: local features {self.spec.local_features!r} "
                f"version {self.spec.local_features_version!r} are not provided by this server (install "
                "or enable that plugin)",
            )
        if self._extractor is None:
            warnings.insert(
                0,
                f"image queries and image adds are refused: extractor {self.spec.extractor!r} version "
                f"{self.spec.extractor_version!r} cannot serve it: {self._extractor_problem}",
            )
        return "; ".join(warning for warning in warnings if warning)

    # -- training ----------------------------------------------------------------------
    def train(self, size: int, seed: int, still_wanted: Callable[[], None] | None = None) -> TrainOutcome:
        """Refit a trainable extractor on this collection's local features and re-encode every image.

        Fitting, encoding and building the new index run while the old state keeps serving; one
        transaction then commits the state, the spec and every vector, and the new index takes the
        old one's place. The snapshot is deleted first, so a crash at any point restarts with
        either the old state or the new one, whole.
        ``still_wanted`` runs after the fit, between chunks of encoding and last under the writer
        lock before the commit; it raises to abandon the training uncommitted (a server shutting
        down: an outside test saw a SIGTERM'd training commit at the end of the drain).
        """
        still_wanted = still_wanted or (lambda: None)
        extractor = self.extractor
        if not isinstance(extractor, TrainableExtractor):
            raise FailedPrecondition(
                f"extractor {extractor.name!r} of collection {self.spec.name!r} has nothing to train",
                reason="NOT_TRAINABLE",
            )
        if not self.spec.trainable:  # made before collections kept their state and features
            raise FailedPrecondition(
                f"collection {self.spec.name!r} was created before SIFT collections kept their local "
                "features, which training needs; re-index its images into a new collection",
                reason="NOT_TRAINABLE",
            )
        self.live_index()
        if not 0 <= size <= extractor.max_model_size:
            raise InvalidArgument(
                f"model_size is {size}; extractor {extractor.name!r} takes 0 (its default, "
                f"{extractor.default_model_size}) up to {extractor.max_model_size}",
                field="model_size",
                reason="BAD_MODEL_SIZE",
                metadata={"limit": str(extractor.max_model_size), "value": str(size)},
            )
        if not self._training.acquire(blocking=False):
            raise Aborted(
                f"collection {self.spec.name!r} is being trained already", reason="TRAINING_RUNNING"
            )
        try:
            with self._reading():
                row_ids = self.store.local_row_ids()
            sample = row_ids
            if len(row_ids) > TRAINING_SAMPLE_IMAGES:
                sample = np.sort(
                    np.random.default_rng(seed).choice(row_ids, TRAINING_SAMPLE_IMAGES, replace=False)
                )
            features = self.local_features_of(sample.tolist())
            try:
                with plugin_failure(
                    f"extractor {extractor.name!r}",
                    "EXTRACTOR_FAILED",
                    (NotEnoughTrainingData, FitAbandoned),
                ):
                    state = extractor.fit(
                        [features[r] for r in sample.tolist() if r in features],
                        size,
                        seed,
                        **_fit_options(extractor, still_wanted),
                    )
            except NotEnoughTrainingData as exc:
                raise FailedPrecondition(str(exc), reason="NOT_ENOUGH_TRAINING_DATA") from exc
            except FitAbandoned as exc:  # ours, from still_wanted: the server's own error
                if isinstance(exc.__cause__, ImageSearchError):
                    raise exc.__cause__ from None
                raise Internal(
                    f"extractor {extractor.name!r} failed: FitAbandoned without the server asking",
                    reason="EXTRACTOR_FAILED",
                ) from exc
            del features
            still_wanted()
            with plugin_failure(f"extractor {extractor.name!r}", "EXTRACTOR_FAILED"):
                trained = extractor.with_state(state)
            vectors: dict[int, np.ndarray] = {}
            self._encode_rows(trained, row_ids.tolist(), vectors, locked=False, still_wanted=still_wanted)
            with self._writing():  # adds and removals wait from here; searches go on
                self._check_open()
                current = self.store.local_row_ids().tolist()
                self._encode_rows(trained, [r for r in current if r not in vectors], vectors, locked=True)
                kept = set(current)
                vectors = {r: v for r, v in vectors.items() if r in kept}
                spec = dataclasses.replace(self.spec, extractor_version=trained.version, dim=trained.dim)
                rebuilt = self._index_of(spec.index_spec(self.metric), vectors, still_wanted)
                with self.lock.write():
                    still_wanted()
                    (self.directory / SNAPSHOT_FILE).unlink(missing_ok=True)
                    fsync_dir(self.directory)
                    self._applied_seq = self.store.reencode(spec.to_json(), state, vectors)
                    self.spec, self._extractor, self._centroids = spec, trained, None
                    self.index, self._snapshot_seq, self._learnt_kept = rebuilt, 0, False
                self._keep_learnt()
            return TrainOutcome(extractor.version, len(sample), len(vectors))
        finally:
            self._training.release()

    def _index_of(
        self, index_spec: IndexSpec, vectors: dict[int, np.ndarray], still_wanted: Callable[[], None]
    ) -> VectorIndex:
        """A training's new index, built before its commit from the re-encoded ``vectors`` (the
        store still holds the old ones) while searches go on with the old index: rebuilt under the
        writer lock after the commit, it held every search of the collection for as long as adding
        every vector takes (an HNSW graph of 20,000 vectors: 18 s at the rate bench/README.md
        measured). Built in row order, as a rebuild from the store adds them; it learns afresh (IVF's
        lists, int8's grid), since what the old index learnt belongs to the old vectors. The caller
        holds ``_writing``: the store cannot change meanwhile. A failure raises before the commit,
        which then leaves the collection as it was."""
        missing = self.store.count() - len(vectors)
        if missing:  # every image of a trainable collection keeps its features (VECTOR_NOT_ACCEPTED)
            raise Internal(
                f"{missing} image(s) of collection {self.spec.name!r} have no local features to re-encode; "
                "the training was not committed",
                reason="TRAINING_FAILED",
            )
        index = VectorIndex(index_spec)
        row_ids = np.array(sorted(vectors), dtype=np.int64)
        try:
            for start in range(0, len(row_ids), REBUILD_CHUNK):
                still_wanted()
                chunk = row_ids[start : start + REBUILD_CHUNK]
                index.add(
                    chunk,
                    prepared_by(self.metric, np.stack([vectors[r] for r in chunk.tolist()])),
                    still_wanted,
                )
        except ImageSearchError:
            raise
        except Exception as exc:
            raise Internal(
                f"the new index of collection {self.spec.name!r} could not be built ({type(exc).__name__}: "
                f"{exc}); the training was not committed",
                reason="TRAINING_FAILED",
            ) from exc
        return index

    def _encode_rows(
        self,
        extractor: TrainableExtractor,
        row_ids: list[int],
        into: dict[int, np.ndarray],
        *,
        locked: bool,
        still_wanted: Callable[[], None] = lambda: None,
    ) -> None:
        """Encode stored local features chunk by chunk (``locked``: the caller holds ``_writing``, so
        the store is neither changed nor closed meanwhile; ``still_wanted`` runs before each chunk)."""
        for start in range(0, len(row_ids), ENCODE_CHUNK):
            still_wanted()
            chunk = row_ids[start : start + ENCODE_CHUNK]
            found = self.store.local_features_of(chunk) if locked else self.local_features_of(chunk)
            present = [r for r in chunk if r in found]
            if present:
                into.update(zip(present, checked_encode(extractor, [found[r] for r in present]), strict=True))

    # -- snapshots & lifecycle -------------------------------------------------------
    def pending_ops(self) -> int:
        return self._applied_seq - self._snapshot_seq

    def snapshot_if_due(self, every_ops: int, interval_s: float) -> bool:
        """Snapshot after ``every_ops`` changes, or after ``interval_s`` with changes pending, within
        SNAPSHOT_TIME_SHARE and SNAPSHOT_TRICKLE_SHARE (above)."""
        pending = self.pending_ops()
        if pending <= 0:
            return False
        since = time.monotonic() - self._last_snapshot
        if since < self._snapshot_took * (1 / SNAPSHOT_TIME_SHARE - 1):
            return False
        size = self.index.size if self.index is not None else 0
        if pending < every_ops and (since < interval_s or pending < SNAPSHOT_TRICKLE_SHARE * size):
            return False
        self.snapshot()
        return True

    def snapshot(self) -> None:
        """Persist the index. Only writers wait: every index change happens under the writer lock,
        so the index holds still while it is written, and searches go on (a reader lock would
        stall them too, behind the first writer that queued for it)."""
        with self._writing():
            if self.closed or self.index is None:
                return
            seq = self._applied_seq
            if seq == self._snapshot_seq and (self.directory / SNAPSHOT_FILE).exists():
                return
            started = time.monotonic()
            with disk_full_reported("the index snapshot was not written (the store is intact)", logged=False):
                token = self.store.snapshot_token(seq)
                write_snapshot(self.directory / SNAPSHOT_FILE, self.index, seq, self.store.identity, token)
                self.store.prune_removals(seq)
            self._snapshot_seq = seq
            self._last_snapshot = time.monotonic()
            self._snapshot_took = self._last_snapshot - started

    def _check_open(self) -> None:
        if self.closed:
            raise NotFound(f"collection {self.spec.name!r} was deleted", reason="COLLECTION_NOT_FOUND")

    def close(self, *, snapshot: bool = True) -> None:
        if self.closed:
            return
        if snapshot:
            try:
                self.snapshot()
            except SNAPSHOT_ERRORS as exc:
                log.error("collection %s: final snapshot failed: %s", self.spec.name, exc)
        with self._writing(), self.lock.write():
            self.closed = True
            self.store.close()
