"""The FAISS index of one collection: a derived, rebuildable cache of the store.

Wraps flat, IVF and HNSW indexes behind one interface keyed by the store's
stable int64 row ids, with label filtering through ID selectors and removal
everywhere. How each kind keeps ids is chosen so that no id can ever point at
another row:

- flat: ``IndexIDMap2(IndexFlat)``. FAISS's flat ``remove_ids`` compacts rows
  in order and the id map compacts the same way (FAISS asserts it).
- IVF: the trained ``IndexIVFFlat`` itself, which stores each vector's id in its
  inverted list and removes by id natively. (``IndexIDMap`` around IVF is wrong
  after a removal: IVF does not renumber its rows the way the map assumes.)
  Until it holds ``train_size`` vectors an IVF collection searches exactly
  (flat), then trains on all of them and switches over. A training failure
  keeps the exact index serving and is reported, never raised into a write.
- HNSW cannot delete: removed ids become tombstones that every search excludes
  until the next rebuild compacts them away.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from imagesearch.plugins.kmeans import kmeans
from imagesearch.plugins.types import FLAT, HNSW, IVF, Metric
from imagesearch.server.config import available_cpus

log = logging.getLogger(__name__)


class TrainingPostponed(Exception):
    """Raised by an add's ``still_wanted`` to stop IVF's first k-means, which runs after the add's
    commit: the index keeps the vectors untrained (exact) and a later add trains it. A server being
    told to stop raises it, so that a stop does not wait for a k-means that can take minutes."""


# FAISS's rule of thumb for a well-trained k-means: at least 39 points per centroid.
TRAIN_POINTS_PER_LIST = 39

# Flat search takes FAISS's BLAS path (blocked matrix products) when queries x dimensions reach this
# threshold, and otherwise scans query by query, one OpenMP thread per query (faiss/utils/
# distances.cpp: ``nx * d < distance_compute_blas_threshold``). The wheel's 128,000 kept every batch
# the server forms (16 x 1280 = 20,480) on the scan: a batch of 16 cost nearly 16 scans. At 20
# every search takes BLAS. On the project VM, 20,000 x 1280 cosine vectors at 2 threads (the raw
# FAISS line "by BLAS threshold" of bench/bench_concurrency.py, bench/README.md): a batch of 16
# took 9.99 ms p50 against 45.11 on the scan, and a single query 6.39 against 6.48; only on one
# thread is the scan better for one query (6.49 ms against 14.22), and the server gives a large
# search both cores.
BLAS_THRESHOLD = 20
WHEEL_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold  # for benchmarks of raw FAISS
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD

# A search uses every core once its work (queries x vectors x dimensions) passes this size, one
# thread below it: a second thread gains nothing on a small search and halves a large one.
# bench/bench_search_threads.py (bench/README.md; the server's VectorIndex, one query after a 2 ms
# pause, called from one thread as the index thread does): 32 x 1280 vectors 0.036 ms on one
# thread and on two; 2,000 vectors 1.07 against 1.21; 20,000 vectors 14.84 against 6.88.
PARALLEL_WORK = 10_000_000


# One or two queries against a float32 flat inner-product index (cosine, ip) go to NumPy's
# matrix-vector product (OpenBLAS sgemv, on every core) instead of FAISS, whose flat search has no
# matrix-vector path (its BLAS path runs a one-row matrix product, its scan one thread per query):
# over 20,000 x 1280 vectors 3.1 ms against FAISS's best 7.3, over 2,000 0.28 against 1.2
# (bench/bench_search_threads.py, bench/README.md). From three queries on, FAISS's matrix-matrix
# product costs less per query. L2 stays with FAISS (sgemv gives dot products, not distances).
GEMV_MAX_QUERIES = 2


# A float32 flat search (inner product or L2) asks its scan for a margin of candidates more than it
# returns (EXACT_MARGIN, or k / EXACT_MARGIN_SHARE for a large k), scores them exactly (float64)
# and ranks them, equal scores by ascending id. The scan rounds in float32, and differently for a
# lone query (sgemv) than for a batch (FAISS's matrix product), and for two copies of one vector
# stored at different places: without this the same query found another copy of a duplicate, or
# ordered near-equal hits otherwise, depending on what other callers sent at the same moment (an
# outside test: 156 of 800 answers differed in scores or order). If the candidates' worst is not
# clearly worse than the k-th (by more than twice the scan's worst rounding, ``scan_error`` of the
# largest norm held, and what underflow can lose), a margin 32 times as wide is asked for, until
# nothing left out could rank or tie, or the margin reaches EXACT_MAX_MARGIN: at most three scans
# for k 10 (8, 256, 1,024), two for k 1000.
EXACT_MARGIN = 8
EXACT_MARGIN_SHARE = 16  # k 1000: 62 more, where a band of twice the rounding holds about 20
EXACT_MARGIN_GROWTH = 32
# Past this margin a query still unsettled (the zero vector under inner product ties every vector;
# L2 vectors far from the origin all lie within the scan's rounding of each other) is scored
# exactly against every vector, in slices of at most EXACT_SLICE floats of vectors: an answer
# that never depends on the scan, for a float64 pass over the collection (gathering ever more
# candidates would copy the whole collection for every query: 1.2 GB for a batch of 32 over
# 50,000 vectors, an outside test).
EXACT_MAX_MARGIN = 1024
EXACT_SLICE = 1 << 22
EXACT_PASS_ROWS = 1024  # the least a slice of the whole-pool pass holds, when EXACT_SLICE allows


# The smallest normal float32 and float64. Below it a product or a sum loses absolute precision
# (gradual underflow), or all of it where a build flushes subnormals to zero: vectors of norm 1e-23
# score 0 against each other in float32 (an outside test), far more wrong than ``scan_error``.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
FLOAT64_TINY = float(np.finfo(np.float64).tiny)


def scan_error(dim: int) -> float:
    """A bound on a float32 dot product's rounding over ``dim`` terms, relative to |q| |v|
    (d x 2^-24 for a sum of d products, doubled)."""
    return dim * 2.0**-23


def hnsw_beam(ef_search: int, k: int, held: int, tombstones: int) -> int:
    """HNSW's beam for a search: at least ``k`` wide, or it returns fewer hits than it could; and
    widened by the share of nodes that are tombstones (at most a quarter, ``needs_compaction``),
    which take room in it without being answers, so that it holds ``ef_search`` live candidates
    as a graph without removals would (an outside test measured recall@10 0.83 after heavy churn;
    bench/bench_hnsw_removals.py prints recall with and without it)."""
    alive = max(held - tombstones, 1)
    return max(ef_search, k) * held // alive if tombstones else max(ef_search, k)


def search_threads(queries: int, vectors: int, dim: int) -> int:
    """OpenMP threads for a search of this size: one for small work, every core for large."""
    return 1 if queries * vectors * dim < PARALLEL_WORK else available_cpus()


# How a flat index holds vectors in memory (the store always keeps float32).
FLOAT32, FLOAT16, INT8 = "float32", "float16", "int8"
STORAGES = (FLOAT32, FLOAT16, INT8)

# FAISS's scalar quantizer (float16 and int8 storage) searches by L2 and inner product only: its
# search asserts on any other metric. CreateCollection refuses other metrics with those storages;
# a float16 collection made with one before that check (a plugin's l1: every search failed, an
# outside test) keeps float32 vectors, and says so.
QUANTIZABLE_METRICS = (faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT)


def quantizable(metric: Metric) -> bool:
    """Whether float16 and int8 storage can serve ``metric``."""
    return metric.faiss_metric in QUANTIZABLE_METRICS


SCALAR_TYPES = {FLOAT16: faiss.ScalarQuantizer.QT_fp16, INT8: faiss.ScalarQuantizer.QT_8bit}

# int8 is for cosine collections, whose prepared vectors have unit length: every component lies in
# INT8_RANGE. A fixed grid over that range cannot tell close neighbours apart (its step, 2/255, is
# coarser than the components of a unit 1280-d vector, about 0.03: recall@10 0.10 where the nearest
# lies at cosine 0.97, bench/bench_storage.py), so the grid is learnt: an int8 index keeps float32
# and searches exactly until it holds INT8_LEARN_SIZE vectors, then takes each dimension's range
# over exactly those (whatever the batches, as IVF trains, so a rebuild learns the same): between
# its INT8_TRIM quantiles, INT8_HEADROOM times as wide about their centre, within INT8_RANGE. A later vector outside a range
# is clipped there in its code, so it is kept as an outlier: every search re-scores the outliers
# too, and clipping never loses a neighbour (a grid learnt without this lost the vectors that used
# dimensions the first ones had left at zero: an outside test).
INT8_RANGE = (-1.0, 1.0)
INT8_METRIC = "cosine"
INT8_LEARN_SIZE = 1000
INT8_HEADROOM = 2.0
INT8_TRIM = 0.005  # each dimension's range spans its 0.5 % to 99.5 % quantiles of those vectors
INT8_MIN_HALF_WIDTH = 2.0**-10  # a dimension the first vectors all left at one value
INT8_EDGES = (0, 255)  # codes a clipped component takes (and an unclipped one at the very edge)
OUTLIER_WARNING_SHARE = 0.01  # past this share of outliers, searches re-read many vectors: say so
# An int8 search takes this many times the hits asked for and re-scores them exactly with the
# store's float32 vectors (bench/bench_storage.py prints the recall it reaches and how much of the
# true top 10 the int8 top 40 holds).
RESCORE_FACTOR = 4
RESCORE_MARGIN_CAP = 300  # past k = 100 the pool grows by k only: top_k 1000 re-scores 1,300, not 4,000


# HNSW inserts one vector at a time into a graph, about a millisecond each at 20,000 x 1280 on this
# VM's two cores: an add of 256 held the collection's searches for a quarter of a second. An HNSW
# add is applied in pieces of about HNSW_PIECE_S each (sized from the last piece's time per vector,
# at least HNSW_MIN_PIECE vectors), and the searches waiting go between them (``Collection.add``).
# Pieces cost FAISS some of its parallel insertion: bench/bench_ingest_stages.py runs an HNSW ingest
# both ways in one run, searches meanwhile (bench/README.md, "Ingest stages").
HNSW_PIECE_S = 0.05
HNSW_MIN_PIECE = 16


def rescore_pool(k: int) -> int:
    """How many int8 candidates to re-score for ``k`` hits: 4k for the usual small k, and a margin
    of at most RESCORE_MARGIN_CAP beyond k for large ones (each candidate is a float32 vector read
    from the store)."""
    return k + min((RESCORE_FACTOR - 1) * k, RESCORE_MARGIN_CAP)


@dataclass(frozen=True)
class IndexSpec:
    kind: str
    dim: int
    metric: Metric
    nlist: int = 100
    nprobe: int = 10
    train_size: int = 0  # 0: TRAIN_POINTS_PER_LIST * nlist
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    storage: str = FLOAT32

    @property
    def effective_train_size(self) -> int:
        return default_train_size(self.nlist, self.train_size)


def default_train_size(nlist: int, train_size: int) -> int:
    """The number of vectors an IVF index trains on: ``train_size``, or 39 per list when unset."""
    return train_size or TRAIN_POINTS_PER_LIST * nlist


def _flat(spec: IndexSpec) -> faiss.Index:
    index = faiss.IndexFlat(spec.dim, spec.metric.faiss_metric)
    if spec.metric.metric_arg:
        index.metric_arg = spec.metric.metric_arg
    return index


def _with_direct_map(index: faiss.Index) -> faiss.Index:
    """An IVF index that can fetch a vector by id (a hash map from id to list and offset, kept up
    to date by FAISS on adds and removals), which exact searches among a label's images need;
    other indexes as they are."""
    if isinstance(index, faiss.IndexIVF) and index.direct_map.type != faiss.DirectMap.Hashtable:
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def as_float32(vectors: np.ndarray) -> np.ndarray:
    """The C-contiguous float32 matrix FAISS wants, without a copy when it already is one."""
    return np.ascontiguousarray(vectors, dtype=np.float32)


class _DeadIds:
    """Removed HNSW ids as a bitmap over ids, with the FAISS selector that keeps the others.

    Made once and updated in place by removals (which hold the collection's write lock, so no
    search reads it meanwhile), not for every search: a selector built from the tombstones per
    query cost O(tombstones) each, many times HNSW's own search in a large collection."""

    def __init__(self) -> None:
        self.bits = np.zeros(0, np.uint8)
        self._alive: faiss.IDSelector | None = None
        self._members: faiss.IDSelector | None = None

    def add(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        needed = (int(ids.max()) >> 3) + 1
        if needed > len(self.bits):  # grown by doubling: selectors point into the old buffer
            grown = np.zeros(max(needed, 2 * len(self.bits)), np.uint8)
            grown[: len(self.bits)] = self.bits
            self.bits, self._alive, self._members = grown, None, None
        np.bitwise_or.at(self.bits, ids >> 3, (1 << (ids & 7)).astype(np.uint8))

    def alive_selector(self) -> faiss.IDSelector:
        """Every id but the removed ones (ids past the bitmap are not members: alive)."""
        if self._alive is None:
            self._members = faiss.IDSelectorBitmap(len(self.bits), faiss.swig_ptr(self.bits))
            self._alive = faiss.IDSelectorNot(self._members)
        return self._alive


class VectorIndex:
    """Thread-compatible, not thread-safe: the collection serialises writes against reads."""

    def __init__(
        self,
        spec: IndexSpec,
        index: faiss.Index | None = None,
        tombstones: np.ndarray | None = None,
        learnt: np.ndarray | None = None,
    ):
        self.spec = spec
        # What an earlier life of this index learnt (``learnt``), taken instead of learning again.
        self._given = learnt if learnt is not None and self.fits_learnt(learnt) else None
        self._index = _with_direct_map(index) if index is not None else self._empty()
        self._tombstones: set[int] = set()
        self._dead = _DeadIds()  # the tombstones as a bitmap FAISS filters by, kept up by ``remove``
        if tombstones is not None:
            self._bury(np.asarray(tombstones, dtype=np.int64))
        self.training_error = ""
        self._postponed = False  # an IVF training put off by a stopping server (logged once)
        self._largest_norm: float | None = None  # of any vector held here (``_norm_bound``)
        self._outliers: set[int] = (
            self._clipped(self.ids(), _codes(faiss.downcast_index(self._index.index)))
            if self.quantized
            else set()
        )
        self._warned_outliers = False
        self._room: tuple[int, int] = (0, 0)  # (address, bytes) of flat storage grown by ``room_for``
        self._seconds_per_vector = 0.0  # of the last HNSW add (``pieces``)

    def _empty(self) -> faiss.Index:
        if self.spec.kind == HNSW:
            inner = faiss.IndexHNSWFlat(self.spec.dim, self.spec.hnsw_m, self.spec.metric.faiss_metric)
            inner.hnsw.efConstruction = self.spec.ef_construction
        elif self.stored_as == FLOAT16:  # flat only: CreateCollection refuses it elsewhere
            inner = self._scalar_quantizer(SCALAR_TYPES[FLOAT16])
        else:  # flat, IVF before it is trained, int8 before it learns its grid
            inner = _flat(self.spec)
        return faiss.IndexIDMap2(inner)

    def _scalar_quantizer(self, kind: int) -> faiss.IndexScalarQuantizer:
        inner = faiss.IndexScalarQuantizer(self.spec.dim, kind, self.spec.metric.faiss_metric)
        if self.spec.metric.metric_arg:
            inner.metric_arg = self.spec.metric.metric_arg
        return inner

    # -- state -------------------------------------------------------------------
    @property
    def stored_as(self) -> str:
        """The storage the index keeps: the spec's, but float32 for a metric FAISS cannot quantise."""
        return self.spec.storage if quantizable(self.spec.metric) else FLOAT32

    @property
    def storage_note(self) -> str:
        """Why the index keeps another storage than the spec asks for ("" when it does not)."""
        if self.stored_as == self.spec.storage:
            return ""
        return (
            f"storage {self.spec.storage} cannot serve metric {self.spec.metric.name!r} (FAISS quantises "
            "for L2 and inner product only): its vectors are kept as float32"
        )

    @property
    def faiss_index(self) -> faiss.Index:
        """The FAISS object itself (for persistence)."""
        return self._index

    @property
    def trained(self) -> bool:
        """For IVF: whether the inverted-file index is in use yet."""
        return isinstance(self._index, faiss.IndexIVF)

    @property
    def learnt(self) -> np.ndarray | None:
        """What training learnt from the collection's first vectors, to be kept with the store: IVF's
        centroids (nlist x dim), int8's grid (FAISS's ``ScalarQuantizer.trained``: each dimension's
        minimum, then its range). A rebuild given it (``learnt=``) adds the same vectors to the
        same lists or codes, where learning again from the store could not: rows removed since
        are gone from it. None before training and for other kinds."""
        if isinstance(self._index, faiss.IndexIVF):
            return _lists(self._index)
        if self.quantized:
            return faiss.vector_to_array(faiss.downcast_index(self._index.index).sq.trained).astype(
                np.float32
            )
        return None

    def fits_learnt(self, learnt: np.ndarray) -> bool:
        """Whether ``learnt`` is the shape this spec learns (an IVF's lists, int8's grid)."""
        if self.spec.kind == IVF:
            return learnt.shape == (self.spec.nlist, self.spec.dim)
        return self.spec.storage == INT8 and learnt.shape == (2 * self.spec.dim,)

    @property
    def quantized(self) -> bool:
        """Whether distances are approximate (int8 once it has learnt its grid): hits need
        re-scoring with float32."""
        inner = (
            faiss.downcast_index(self._index.index) if isinstance(self._index, faiss.IndexIDMap2) else None
        )
        return isinstance(inner, faiss.IndexScalarQuantizer) and inner.sq.qtype == SCALAR_TYPES[INT8]

    def outliers(self) -> np.ndarray:
        """Ids of int8 vectors with a component at the edge of the grid (clipped, or all but): a
        search must re-score them whatever their codes say."""
        return np.fromiter(sorted(self._outliers), dtype=np.int64, count=len(self._outliers))

    @staticmethod
    def _clipped(ids: np.ndarray, codes: np.ndarray) -> set[int]:
        """The ids whose codes touch the grid's edges."""
        edge = np.isin(codes, INT8_EDGES).any(axis=1)
        return {int(i) for i in ids[edge]}

    @property
    def size(self) -> int:
        """Live vectors (tombstoned ones excluded)."""
        return int(self._index.ntotal) - len(self._tombstones)

    @property
    def tombstones(self) -> np.ndarray:
        return np.fromiter(sorted(self._tombstones), dtype=np.int64, count=len(self._tombstones))

    def ids(self) -> np.ndarray:
        """Every id the index holds (tombstoned ones included), in storage order."""
        if self.trained:
            ivf = faiss.extract_index_ivf(self._index)
            lists = ivf.invlists
            parts = [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                for i in range(ivf.nlist)
                if lists.list_size(i)
            ]
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def stored_vectors(self) -> np.ndarray:
        """A flat index's (prepared) vectors in ids() order: a zero-copy view for float32, decoded
        for float16 and int8."""
        inner = faiss.downcast_index(self._index.index) if not self.trained else None
        if isinstance(inner, faiss.IndexScalarQuantizer):
            return inner.reconstruct_n(0, inner.ntotal)
        if not isinstance(inner, faiss.IndexFlat):
            raise TypeError("only flat indexes expose their vectors")
        return faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d)

    def memory_bytes(self) -> int:
        """What the index holds: vectors or codes, ids, graph links, lists (not allocator overhead)."""
        index = self._index
        if isinstance(index, faiss.IndexIVF):  # codes and ids in the lists, plus the centroids
            return index.ntotal * (index.code_size + 8) + index.nlist * index.d * 4
        inner = faiss.downcast_index(index.index)
        ids = 2 * 8 * index.ntotal  # the id map and its reverse map
        if isinstance(inner, faiss.IndexHNSWFlat):
            links = inner.hnsw.neighbors.size() * 4 + inner.hnsw.levels.size() * 4
            return ids + inner.ntotal * inner.d * 4 + links
        if isinstance(inner, faiss.IndexScalarQuantizer):
            return ids + inner.ntotal * inner.code_size
        return ids + inner.ntotal * inner.d * 4

    # -- writes ------------------------------------------------------------------
    def add(
        self, ids: np.ndarray, prepared: np.ndarray, still_wanted: Callable[[], None] | None = None
    ) -> None:
        """Add vectors; an IVF index trains once it holds ``train_size`` of them, calling
        ``still_wanted`` between k-means iterations: a training's new index stops when the server
        does (whatever it raises propagates), and an add after its commit, which must not fail,
        passes one that raises ``TrainingPostponed``: the index then holds the vectors untrained,
        searching exactly, and trains on a later add.

        It trains on exactly the first ``train_size`` vectors held, whatever the batches: a batch
        that crosses the size is split around the training. A rebuild from the store (which replays
        rows in their order, in chunks of another size) then trains on the same vectors and gives
        the same results; if some of those rows were removed since, it takes what this index
        learnt (``learnt``, kept by the store) instead.
        """
        ids, prepared = np.asarray(ids, dtype=np.int64), as_float32(prepared)
        if len(ids) == 0:
            return
        wanted = self._train_size() - self._index.ntotal
        if self._will_train() and 0 < wanted < len(ids):
            self.add(ids[:wanted], prepared[:wanted], still_wanted)
            ids, prepared = ids[wanted:], prepared[wanted:]
        started = time.perf_counter()
        self._index.add_with_ids(prepared, ids)
        self._seconds_per_vector = (time.perf_counter() - started) / len(ids)
        if self._largest_norm is not None:
            self._largest_norm = max(self._largest_norm, _largest_norm(prepared))
        if self.quantized:  # the codes just stored, the last rows (read, not encoded again)
            self._note_outliers(
                self._clipped(ids, _codes(faiss.downcast_index(self._index.index))[-len(ids) :])
            )
        if self._will_train() and self._index.ntotal >= self._train_size():
            self._train(still_wanted)

    def room_for(self, count: int) -> Callable[[], None] | None:
        """Room in a flat index's storage for ``count`` more vectors, made now, outside the
        collection's write lock, or None when there is room already (or the index is not flat).

        FAISS grows its storage inside ``add``, copying all of it while searches wait for the
        lock: a pause that grows with the collection (bench/bench_ingest_stages.py prints the
        longest search during an ingest; bench/README.md, "Ingest stages"). Here the larger buffer
        is made and filled while searches still read the old one (only the caller may change the
        index meanwhile), and the returned function, called under the write lock, puts it in place
        by a swap of pointers. Storage then at least doubles, as std::vector's would."""
        storage = _flat_storage(self._index)
        if storage is None:
            return None
        inner, codes = storage
        size, address = codes.size(), _address(codes)
        needed = size + count * inner.code_size
        capacity = self._room[1] if self._room[0] == address else size
        if needed <= capacity:
            return None
        capacity = max(needed, 2 * size)
        larger = faiss.UInt8Vector()
        larger.resize(capacity)  # allocated and touched here, not under the lock
        if size:
            np.copyto(faiss.rev_swig_ptr(larger.data(), size), faiss.rev_swig_ptr(codes.data(), size))
        larger.resize(size)  # a std::vector keeps its capacity when it shrinks

        def install() -> None:
            if _address(codes) != address or codes.size() != size:  # changed since: FAISS grows it
                return
            codes.owned_data.swap(larger)
            codes.resize(size)  # MaybeOwnedVector caches the data pointer: point it at the new buffer
            self._room = (_address(codes), capacity)

        return install

    def pieces(self, count: int) -> list[slice]:
        """How to apply an add of ``count`` vectors so that searches wait for no piece much longer
        than HNSW_PIECE_S: in one piece but on HNSW, whose inserts are slow (above)."""
        size = count
        if self.spec.kind == HNSW and self._seconds_per_vector > 0:
            size = max(HNSW_MIN_PIECE, int(HNSW_PIECE_S / self._seconds_per_vector))
        return [slice(start, start + size) for start in range(0, count, max(size, 1))]

    def learn_ahead(self, prepared: np.ndarray, still_wanted: Callable[[], None] | None = None) -> None:
        """Run now the k-means that adding ``prepared`` will set off (IVF's first ``train_size``
        vectors), so that the add under the collection's write lock takes its lists as a rebuild
        takes ``learnt``: k-means for 100 lists held every search for about a second, and it grows
        with nlist. The caller holds the collection's ``_indexing``, so the index stands still;
        searches read it meanwhile. FAISS's k-means is seeded: the same lists as under the lock.
        ``still_wanted`` as in ``add``."""
        if self.spec.kind != IVF or self._given is not None or not self._will_train():
            return
        wanted = self._train_size() - self._index.ntotal
        if not 0 < wanted <= len(prepared):
            return
        vectors = np.concatenate([np.array(self.stored_vectors()), as_float32(prepared)[:wanted]])
        try:
            self._given = _lists(self._trained_ivf(vectors, still_wanted))
        except Exception:  # the rows are committed: this add must not fail here
            return  # trained again under the lock, where ``_train`` keeps the reason

    def _train_size(self) -> int:
        """How many vectors IVF trains on, or int8 learns its grid from."""
        return INT8_LEARN_SIZE if self.spec.storage == INT8 else self.spec.effective_train_size

    def _note_outliers(self, found: set[int]) -> None:
        self._outliers |= found
        if not self._warned_outliers and len(self._outliers) > max(100, OUTLIER_WARNING_SHARE * self.size):
            self._warned_outliers = True
            log.warning(
                "%d int8 vectors lie outside the grid learnt from the first %d: every search re-scores "
                "them from the store; if the collection's vectors have changed since, float16 storage "
                "would serve it better",
                len(self._outliers),
                INT8_LEARN_SIZE,
            )

    def _will_train(self) -> bool:
        """An IVF index, or an int8 one, still searching exactly, with no failed training behind it."""
        if self.spec.kind == IVF:
            return not self.trained and not self.training_error
        return self.spec.storage == INT8 and not self.quantized

    def _bury(self, ids: np.ndarray) -> None:
        """Mark HNSW ids removed: searches filter them out until a compaction rebuilds the graph."""
        self._tombstones.update(ids.tolist())
        self._dead.add(ids)

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if self.spec.kind == HNSW:
            # Only ids the index holds: a tombstone for an absent id would make size() lie.
            present = ids[np.isin(ids, self.ids())]
            self._bury(present)
        else:  # flat (IDMap2 over a compacting flat index) and trained IVF (native ids)
            # IVF's direct map removes by an explicit id array only (FAISS DirectMap::remove_ids).
            selector = (
                faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
                if self.trained
                else faiss.IDSelectorBatch(ids)
            )
            self._index.remove_ids(selector)
            self._outliers.difference_update(int(i) for i in ids)

    def _train(self, still_wanted: Callable[[], None] | None = None) -> None:
        """Train IVF's lists on the first ``train_size`` vectors held (all of them, but after a
        postponed training: what a rebuild from the store trains on) and move every vector into the
        trained index, keyed by its own id.

        On failure the exact index keeps serving and the reason is kept for
        GetCollection and the logs: a write must never fail after its rows are committed. A
        ``TrainingPostponed`` leaves it serving, untrained, with no reason kept: a later add trains.
        """
        ids, vectors = self.ids(), np.array(self.stored_vectors())
        if self.spec.storage == INT8:
            self._index = self._int8_index(ids, vectors)
            return
        try:
            if still_wanted is not None:
                still_wanted()
            trained = self._trained_ivf(vectors[: self._train_size()], still_wanted)
            trained.add_with_ids(vectors, ids)
        except TrainingPostponed as postponed:
            if not self._postponed:  # once, not for each piece of the add
                log.warning(
                    "IVF training of %d vectors postponed (%s): the index searches exactly until an "
                    "add trains it",
                    len(ids),
                    postponed,
                )
            self._postponed = True
            return
        except (RuntimeError, ValueError) as exc:
            self.training_error = f"IVF training failed, searching exactly instead: {exc}"
            log.error("%s", self.training_error)
            return
        self._index = trained

    def _int8_index(self, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
        """The 8-bit grid learnt from ``vectors`` (see INT8_LEARN_SIZE), holding them."""
        # Quantiles, not the extremes: one odd vector among the first 1,000 widened every dimension's
        # range and cut the recall of the rest (an outside test: by a fifth); beyond them it is an
        # outlier like any other, re-scored by every search.
        quantizer = self._scalar_quantizer(SCALAR_TYPES[INT8])
        if self._given is not None:
            faiss.copy_array_to_vector(self._given, quantizer.sq.trained)
            quantizer.is_trained = True
        else:
            low, high = np.quantile(vectors, [INT8_TRIM, 1 - INT8_TRIM], axis=0)
            centre = (low + high) / 2
            half = np.maximum((high - low) / 2 * INT8_HEADROOM, INT8_MIN_HALF_WIDTH)
            grid = np.stack(
                [np.maximum(centre - half, INT8_RANGE[0]), np.minimum(centre + half, INT8_RANGE[1])]
            )
            quantizer.train(grid.astype(np.float32))
        index = faiss.IndexIDMap2(quantizer)
        index.add_with_ids(vectors, ids)
        self._outliers = self._clipped(ids, _codes(quantizer))
        return index

    def _trained_ivf(
        self, vectors: np.ndarray, still_wanted: Callable[[], None] | None = None
    ) -> faiss.Index:
        if len(vectors) < self.spec.nlist:
            raise ValueError(f"{len(vectors)} vectors cannot train {self.spec.nlist} lists")
        ivf = faiss.IndexIVFFlat(
            _flat(self.spec), self.spec.dim, self.spec.nlist, self.spec.metric.faiss_metric
        )
        ivf.nprobe = self.spec.nprobe
        if self._given is not None:  # the lists an earlier life learnt (``learnt``): no k-means
            ivf.quantizer.add(self._given)
            ivf.is_trained = True
            return _with_direct_map(ivf)
        # FAISS prints its own warning below 39 vectors a list, straight to stderr (it broke a JSON
        # log stream); the threshold decides nothing else, so the warning is the server's log's.
        ivf.cp.min_points_per_centroid = 1
        if len(vectors) < TRAIN_POINTS_PER_LIST * self.spec.nlist:
            log.warning(
                "training %d IVF lists on %d vectors: %d or more give steadier lists",
                self.spec.nlist,
                len(vectors),
                TRAIN_POINTS_PER_LIST * self.spec.nlist,
            )
        # FAISS's own k-means (``ivf.train``), one iteration at a time (the same lists, bit for bit)
        ivf.quantizer.add(kmeans(vectors, self.spec.nlist, ivf.cp, _flat(self.spec), still_wanted))
        ivf.is_trained = True
        return _with_direct_map(ivf)

    # -- search ------------------------------------------------------------------
    def _params(self, allowed: np.ndarray | None) -> tuple[faiss.SearchParameters | None, list[object]]:
        """Search parameters plus the selector objects they point to (kept alive by the caller)."""
        keep: list[object] = []
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
            keep.append(selector)
        if self._tombstones:
            alive = self._dead.alive_selector()
            keep.append(self._dead)  # its bitmap, which the selector points into
            if selector is not None:
                selector = faiss.IDSelectorAnd(selector, alive)
                keep.append(selector)
            else:
                selector = alive
        if self.spec.kind == HNSW:
            params = faiss.SearchParametersHNSW(efSearch=self.spec.ef_search)
        elif self.trained:
            params = faiss.SearchParametersIVF(nprobe=self.spec.nprobe)
        elif selector is None:
            return None, keep
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        return params, keep

    def search(
        self, prepared_queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (raw FAISS distances, ids); ids of -1 mark empty slots."""
        queries = as_float32(prepared_queries)
        k = max(1, min(k, max(self.size, 1)))
        if allowed is not None and len(allowed) == 0:  # FAISS asserts on an empty selector
            inner_product = self.spec.metric.faiss_metric == faiss.METRIC_INNER_PRODUCT
            empty = np.full((len(queries), k), _empty_distance(inner_product), np.float32)
            return empty, np.full((len(queries), k), -1, np.int64)
        flat = self._float32_flat()
        if flat is not None and flat.ntotal:
            return self._exactly_ranked(flat, queries, k, allowed)
        return self._scan(queries, k, allowed)

    def _scan(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None, flat: faiss.IndexFlat | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's search; one or two inner-product queries on a float32 ``flat`` index by sgemv."""
        inner_product = self.spec.metric.faiss_metric == faiss.METRIC_INNER_PRODUCT
        if flat is not None and inner_product and allowed is None and len(queries) <= GEMV_MAX_QUERIES:
            return self._search_by_gemv(flat, queries, k)
        faiss.omp_set_num_threads(search_threads(len(queries), self.size, self.spec.dim))
        params, _keep = self._params(allowed)  # _keep holds the selectors alive during the search
        if self.spec.kind == HNSW:
            params.efSearch = hnsw_beam(self.spec.ef_search, k, self._index.ntotal, len(self._tombstones))
        return self._index.search(queries, k, params=params)

    def _float32_flat(self) -> faiss.IndexFlat | None:
        """The float32 flat index inside, when its metric is an inner product (cosine, ip) or L2."""
        if self.trained or self.spec.kind == HNSW:
            return None
        if self.spec.metric.faiss_metric not in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2):
            return None
        inner = faiss.downcast_index(self._index.index)
        return inner if isinstance(inner, faiss.IndexFlat) else None

    def _exactly_ranked(
        self, flat: faiss.IndexFlat, queries: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best by exact score among the float32 scan's candidates, equal scores by ascending
        id (``exact_top_k``): the same answer whichever way the scan ran."""
        return exact_top_k(
            queries,
            k,
            inner_product=self.spec.metric.faiss_metric == faiss.METRIC_INNER_PRODUCT,
            pool=flat.ntotal if allowed is None else min(flat.ntotal, len(allowed)),
            rounding=scan_error(queries.shape[1]),
            tiny=FLOAT32_TINY,
            largest_norm=self._norm_bound(flat),
            scan=lambda rows, asked: self._scan(queries[rows], asked, allowed, flat)[1],
            gather=self._index.reconstruct_batch,
            pool_slices=lambda rows: self._pool_slices(allowed, rows),
        )

    def _pool_slices(self, allowed: np.ndarray | None, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of every vector a search may return (all, or those ``allowed``), ``rows``
        at a time: views of FAISS's own storage when unfiltered, a slice's copy when filtered."""
        stored, ids = self.stored_vectors(), self.ids()
        if allowed is None:
            yield from _in_slices(ids, stored, rows)
            return
        positions = np.flatnonzero(np.isin(ids, np.asarray(allowed, np.int64)))
        for part, at in _in_slices(ids[positions], positions, rows):
            yield part, stored[at]

    def _norm_bound(self, flat: faiss.IndexFlat) -> float:
        """The largest norm of any vector held (removed ones may count: an overestimate is safe),
        which bounds how far the scan can misjudge a vector it left out. Read from the storage
        once, then kept up by ``add``."""
        if self._largest_norm is None:
            stored = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
            self._largest_norm = _largest_norm(stored)
        return self._largest_norm

    def _search_by_gemv(
        self, flat: faiss.IndexFlat, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each query scored against every vector by one matrix-vector product (views of FAISS's
        own storage and id map, no copy): the k best candidates, for ``_exactly_ranked``."""
        count = flat.ntotal
        base = faiss.rev_swig_ptr(flat.get_xb(), count * flat.d).reshape(count, flat.d)
        ids = faiss.rev_swig_ptr(self._index.id_map.data(), count)
        distances = np.empty((len(queries), k), np.float32)
        found = np.empty((len(queries), k), np.int64)
        for row, query in enumerate(queries):
            scores = base @ query
            cut = np.partition(scores, count - k)[count - k]  # the k-th best score
            above = np.flatnonzero(scores > cut)
            best = np.concatenate([above, np.flatnonzero(scores == cut)[: k - len(above)]])
            distances[row], found[row] = scores[best], ids[best]
        return distances, found

    def search_among(
        self, prepared_queries: np.ndarray, k: int, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN among the vectors of ``ids`` only: the cost follows len(ids), not the index size.

        This is how a label filter (and BUCKETED search) avoids scanning other classes, and finds
        every image of a rare label on HNSW and IVF, whose own filtering walks only part of the
        index: the label's row ids come from the store's label index, their vectors by id from the
        index (the id map; IVF's direct map), and only those are compared.
        """
        ids = np.asarray(ids, dtype=np.int64)
        queries = as_float32(prepared_queries)
        if len(ids) == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        vectors = self._index.reconstruct_batch(ids)
        raw, positions = brute_force(self.spec.metric, vectors, queries, k)
        return raw, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    def check_layout(self) -> None:
        """Refuse a loaded FAISS object that is not what this spec builds (old or foreign snapshots)."""
        index = self._index
        if index.d != self.spec.dim:
            raise ValueError(f"index has dimension {index.d}, collection has {self.spec.dim}")
        if isinstance(index, faiss.IndexIVF):
            ok = self.spec.kind == IVF and index.nlist == self.spec.nlist
        elif isinstance(index, faiss.IndexIDMap2):
            inner = faiss.downcast_index(index.index)
            if self.spec.kind == HNSW:
                wanted = faiss.IndexHNSWFlat
            elif self.stored_as == FLOAT16 or (
                self.stored_as == INT8 and isinstance(inner, faiss.IndexScalarQuantizer)
            ):  # int8 holds float32 until it learns its grid
                wanted = faiss.IndexScalarQuantizer
            else:
                wanted = faiss.IndexFlat
            ok = isinstance(inner, wanted) and not isinstance(inner, faiss.IndexIVF)
            if isinstance(
                inner, faiss.IndexScalarQuantizer
            ):  # float16 and int8 codes are not interchangeable
                ok = ok and inner.sq.qtype == SCALAR_TYPES[self.spec.storage]
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"index of type {type(index).__name__} does not fit a {self.spec.kind} collection"
            )

    def needs_compaction(self) -> bool:
        """HNSW past a quarter of tombstones: rebuilt without them. Removed nodes still take room in
        the search's beam, so a graph that is mostly tombstones loses recall and returns fewer
        hits than it holds (an outside test, 600 of 800 removed: half the recall of a fresh
        graph). A quarter keeps a rebuild's cost, O(size), at O(1) a removal however small the
        collection (there used to be a floor of 1,000 tombstones, which is what let small
        collections decay)."""
        return self.spec.kind == HNSW and len(self._tombstones) > self._index.ntotal // 4


def _lists(ivf: faiss.Index) -> np.ndarray:
    """An IVF index's centroids (nlist x dim), a copy."""
    quantizer = faiss.downcast_index(faiss.downcast_index(ivf).quantizer)
    return (
        faiss.rev_swig_ptr(quantizer.get_xb(), quantizer.ntotal * quantizer.d)
        .reshape(quantizer.ntotal, quantizer.d)
        .copy()
    )


def _flat_storage(index: faiss.Index) -> tuple[faiss.IndexFlatCodes, Any] | None:
    """A flat index's inner index and the storage FAISS owns (float32, float16 or int8 codes)."""
    if not isinstance(index, faiss.IndexIDMap2):
        return None
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexFlatCodes) or not inner.codes.is_owned:
        return None
    return inner, inner.codes


def _address(codes: Any) -> int:
    """Where a FAISS byte vector's data starts."""
    return faiss.rev_swig_ptr(codes.data(), 1).ctypes.data if codes.size() else 0


def _codes(quantizer: faiss.IndexScalarQuantizer) -> np.ndarray:
    """A scalar quantiser's codes, one row a vector in storage order (a view, no copy)."""
    count, size = quantizer.ntotal, quantizer.code_size
    return faiss.rev_swig_ptr(quantizer.codes.data(), count * size).reshape(count, size)


def exact_top_k(
    queries: np.ndarray,
    k: int,
    *,
    inner_product: bool,
    pool: int,
    rounding: float,
    tiny: float,
    largest_norm: float,
    scan: Callable[[np.ndarray, int], np.ndarray],
    gather: Callable[[np.ndarray], np.ndarray],
    pool_slices: PoolSlices,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k best of ``pool`` vectors by exact score (float64), equal scores by ascending
    key, and their distances as FAISS gives them (inner products; squared L2), empty slots as FAISS
    marks them. ``scan(rows, asked)`` gives the keys (-1: none) of the ``asked`` best for
    ``queries[rows]`` by a computation that may round, off by at most ``rounding`` × |q||v| (L2:
    × (|q|² + |v|²)), |v| at most ``largest_norm``, plus what underflow below ``tiny`` (the
    smallest normal number of the scan's type) can lose; ``gather(keys)`` their vectors; ``pool_slices``
    the whole pool, a slice at a time. A margin of candidates beyond k is scored exactly, a margin
    EXACT_MARGIN_GROWTH times as wide (up to EXACT_MAX_MARGIN) while the worst is within twice that
    rounding of the k-th (a vector left out might then rank as well or better). A query still
    unsettled there (its scores tie past the cap, or the scan cannot tell them apart: L2 far from
    the origin) is scored exactly against the whole pool (``_exhaustive_top_k``)."""
    first, inverse = _distinct_rows(queries)
    if len(first) < len(queries):  # identical queries are answered once (a batch of zero vectors)
        distances, found = exact_top_k(
            queries[first],
            k,
            inner_product=inner_product,
            pool=pool,
            rounding=rounding,
            tiny=tiny,
            largest_norm=largest_norm,
            scan=lambda rows, asked: scan(first[rows], asked),
            gather=gather,
            pool_slices=pool_slices,
        )
        return distances[inverse], found[inverse]
    distances = np.full((len(queries), k), _empty_distance(inner_product), np.float32)
    found = np.full((len(queries), k), -1, np.int64)
    margin, todo = max(EXACT_MARGIN, k // EXACT_MARGIN_SHARE), np.arange(len(queries))
    while len(todo):
        asked = min(pool, k + margin)
        candidates = scan(todo, asked)
        per_slice = max(1, EXACT_SLICE // (asked * queries.shape[1]))
        unsettled = []
        for start in range(0, len(todo), per_slice):
            rows = todo[start : start + per_slice]
            part = candidates[start : start + per_slice]
            exact, keys, settled = _ranked_exactly(
                queries[rows], part, gather, k, inner_product, (rounding, tiny), largest_norm
            )
            kept = exact.shape[1]
            distances[rows, :kept], found[rows, :kept] = exact, keys
            complete = (part < 0).any(axis=1) | (asked >= pool)  # every vector was a candidate
            unsettled.append(rows[~(settled | complete)])
        todo = np.concatenate(unsettled)
        if len(todo) and margin >= EXACT_MAX_MARGIN:
            exact, keys = _exhaustive_top_k(queries[todo], k, inner_product, pool_slices)
            kept = exact.shape[1]
            distances[todo, :kept], found[todo, :kept] = exact, keys
            break
        margin = min(EXACT_MAX_MARGIN, margin * EXACT_MARGIN_GROWTH)
    return distances, found


PoolSlices = Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]


def _in_slices(keys: np.ndarray, vectors: np.ndarray, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, vectors) ``rows`` at a time, as views: the pool a whole-pool pass reads."""
    for start in range(0, len(keys), rows):
        yield keys[start : start + rows], vectors[start : start + rows]


def _exhaustive_top_k(
    queries: np.ndarray, k: int, inner_product: bool, pool_slices: PoolSlices
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the whole pool by exact score, equal scores by ascending key: ``pool_slices``
    gives (keys, vectors) of at most the rows asked for at a time, each slice scored by
    ``_exact_scores`` (the very products the candidates get, so a pair scores the same either way),
    the best k kept from slice to slice. Queries go through in groups small enough that a slice
    holds at least EXACT_PASS_ROWS rows (or 4k) within EXACT_SLICE floats: a batch of 256 shared
    each slice, so slices of 12 rows each re-sorted 256 × k kept scores, and its time grew with the
    square of the batch (found by an outside test). The cost is a float64 pass over the pool per query, on every
    core (bench/bench_search_threads.py, "a query the scan cannot settle")."""
    rows = max(EXACT_PASS_ROWS, 4 * k)
    group = max(1, EXACT_SLICE // (rows * queries.shape[1]))
    parts = [
        _exhaustive_group(queries[start : start + group], k, inner_product, pool_slices)
        for start in range(0, len(queries), group)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _exhaustive_group(
    queries: np.ndarray, k: int, inner_product: bool, pool_slices: PoolSlices
) -> tuple[np.ndarray, np.ndarray]:
    best_badness = np.full((len(queries), 0), np.inf)
    best_exact, best_keys = best_badness.copy(), np.zeros((len(queries), 0), np.int64)
    slices = pool_slices(max(1, EXACT_SLICE // queries.size))
    for keys, (exact, badness) in _scored_on_every_core(queries, slices, inner_product):
        shape = (len(queries), len(keys))
        badness = np.concatenate([best_badness, badness], axis=1)
        exact = np.concatenate([best_exact, exact], axis=1)
        joined = np.concatenate([best_keys, np.broadcast_to(keys, shape)], axis=1)
        order = np.lexsort((joined, badness), axis=1)[:, :k]
        best_badness = np.take_along_axis(badness, order, axis=1)
        best_exact = np.take_along_axis(exact, order, axis=1)
        best_keys = np.take_along_axis(joined, order, axis=1)
    return best_exact.astype(np.float32), best_keys


def _scored_on_every_core(
    queries: np.ndarray, slices: Iterator[tuple[np.ndarray, np.ndarray]], inner_product: bool
) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]]:
    """Each slice's keys and ``_exact_scores``, in the slices' order, scored by one thread a core
    (NumPy's einsum releases the GIL), at most that many slices in flight so that memory stays
    bounded."""
    scorers, in_flight = _scorers(), available_cpus()
    pending: deque[tuple[np.ndarray, Future]] = deque()
    for keys, vectors in slices:
        view = np.broadcast_to(vectors, (len(queries), *vectors.shape))
        pending.append((keys, scorers.submit(_exact_scores, queries, view, inner_product)))
        if len(pending) >= in_flight:
            done_keys, future = pending.popleft()
            yield done_keys, future.result()
    while pending:
        done_keys, future = pending.popleft()
        yield done_keys, future.result()


@functools.cache
def _scorers() -> ThreadPoolExecutor:
    """The threads of the whole-pool pass, made on first use (most servers never need them)."""
    return ThreadPoolExecutor(available_cpus(), thread_name_prefix="exact-pass")


os.register_at_fork(after_in_child=_scorers.cache_clear)  # a forked child has none of its threads


def _distinct_rows(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first row of each distinct query, and for each query the position of its own among
    them (bitwise identity: the same bytes always get the same answer)."""
    seen: dict[bytes, int] = {}
    inverse = np.array([seen.setdefault(row.tobytes(), len(seen)) for row in queries], np.int64)
    return np.unique(inverse, return_index=True)[1], inverse


def _exact_scores(
    queries: np.ndarray, vectors: np.ndarray, inner_product: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's candidate vectors (queries × candidates × dimensions) scored exactly: float64,
    one product a pair, the same wherever a vector sits and whatever else is scored beside it
    (tests/test_vector_index.py checks copies, slices and broadcast views). Returns the scores
    (inner products; squared L2) and their badness (lower ranks first)."""
    if inner_product:
        exact = np.einsum("qcd,qd->qc", vectors, queries, dtype=np.float64)
        return exact, -exact
    # L2: differences widened as they are made, then one product a pair (a third of the time of
    # widening the vectors, subtracting, squaring and summing, each a pass of its own)
    differences = np.subtract(vectors, queries[:, None, :], dtype=np.float64)
    exact = np.einsum("qcd,qcd->qc", differences, differences)
    return exact, exact.copy()


def _ranked_exactly(
    queries: np.ndarray,
    candidates: np.ndarray,
    gather: Callable[[np.ndarray], np.ndarray],
    k: int,
    inner_product: bool,
    error: tuple[float, float],
    largest_norm: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates scored exactly (``_exact_scores``), best k first, equal scores by ascending key;
    and for each query whether they surely hold its k best: their worst is worse than the k-th by
    more than the scan could have misjudged either. (A vector left out scanned no better than every
    candidate, so its exact score is at most the worst candidate's plus twice the rounding: the
    candidates are the scan's best, in any order.) ``error`` is the scan's (rounding, tiny), as
    ``exact_top_k`` takes them."""
    valid = candidates >= 0
    shape = (*candidates.shape, queries.shape[1])
    if valid.all():
        vectors = np.asarray(gather(candidates.ravel()), np.float32).reshape(shape)
    else:
        vectors = np.zeros(shape, np.float32)
        vectors[valid] = gather(candidates[valid])
    exact, badness = _exact_scores(queries, vectors, inner_product)
    badness[~valid] = np.inf
    order = np.lexsort((candidates, badness), axis=1)[:, :k]
    ranked = np.take_along_axis(exact, order, axis=1).astype(np.float32)
    ranked_keys = np.take_along_axis(candidates, order, axis=1)
    missing = ~np.take_along_axis(valid, order, axis=1)
    ranked[missing], ranked_keys[missing] = _empty_distance(inner_product), -1
    query_norms = np.sqrt(np.einsum("qd,qd->q", queries, queries, dtype=np.float64))
    rounding, tiny = error
    scale = query_norms * largest_norm if inner_product else query_norms**2 + largest_norm**2
    # Underflow: each of the d products (for L2 also the squares) may lose up to ``tiny`` times the
    # larger operand, or ``tiny`` itself, and so may each partial sum.
    underflow = 4 * queries.shape[1] * tiny * (1 + query_norms + largest_norm)
    worst = np.where(valid, badness, -np.inf).max(axis=1)
    kth = np.take_along_axis(badness, order[:, -1:], axis=1)[:, 0]
    return ranked, ranked_keys, worst > kth + 2 * (rounding * scale + underflow)


def _largest_norm(vectors: np.ndarray) -> float:
    """A bound on the largest row norm, at most a rounding above it (an overestimate is safe).

    Squares are summed in float32 (a fifth of the time of float64) when their largest sum is a
    normal float32 far from overflow, and widened by that sum's rounding bound; else in float64
    (a square of a norm near 1e18 overflows float32, and tiny ones underflow)."""
    if len(vectors) == 0:
        return 0.0
    largest = float(np.einsum("ij,ij->i", vectors, vectors).max())
    if not 1e-30 < largest < 1e30:
        largest = float(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64).max())
    return math.sqrt(largest * (1 + scan_error(vectors.shape[1])))


def _empty_distance(inner_product: bool) -> float:
    """What FAISS puts in an empty slot's distance: the worst float32 score for the metric."""
    return -np.finfo(np.float32).max if inner_product else np.finfo(np.float32).max


def brute_force(
    metric: Metric, prepared_base: np.ndarray, prepared_queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN with any FAISS metric: (raw distances, positions in ``prepared_base``), best first.

    L2 and inner product are computed in float64 here, because FAISS's BLAS path computes L2 as
    |x|^2 + |y|^2 - 2xy in float32, which puts a vector 1e-4 from itself and can misorder
    near-duplicates (what metric overrides, int8 re-scoring and label gathers must not do); other
    metrics go to FAISS's own exact flat search.
    """
    queries, base = as_float32(prepared_queries), as_float32(prepared_base)
    if len(base) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    k = max(1, min(k, len(base)))
    if metric.faiss_metric not in (faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT):
        index = faiss.IndexFlat(base.shape[1], metric.faiss_metric)
        if metric.metric_arg:
            index.metric_arg = metric.metric_arg
        index.add(base)
        return index.search(queries, k)
    wide_q, wide_v = queries.astype(np.float64), base.astype(np.float64)
    products = wide_q @ wide_v.T
    inner_product = metric.faiss_metric == faiss.METRIC_INNER_PRODUCT
    if inner_product:
        badness = -products
    else:
        badness = (wide_q**2).sum(1)[:, None] + (wide_v**2).sum(1)[None, :] - 2 * products

    def best(rows: np.ndarray, asked: int) -> np.ndarray:
        if asked >= len(base):
            return np.tile(np.arange(len(base)), (len(rows), 1))
        return np.argpartition(badness[rows], asked - 1, axis=1)[:, :asked]

    # The matrix product rounds each pair its own way (by position, and by how many queries share
    # it): it only proposes candidates, which exact_top_k scores one pair at a time.
    return exact_top_k(
        queries,
        k,
        inner_product=inner_product,
        pool=len(base),
        rounding=queries.shape[1] * 2.0**-52,
        tiny=FLOAT64_TINY,
        largest_norm=_largest_norm(base),
        scan=best,
        gather=lambda positions: base[positions],
        pool_slices=lambda rows: _in_slices(np.arange(len(base)), base, rows),
    )


__all__ = [
    "FLAT",
    "HNSW",
    "INT8",
    "IVF",
    "IndexSpec",
    "VectorIndex",
    "brute_force",
    "default_train_size",
    "rescore_pool",
]
