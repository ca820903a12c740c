"""The FAISS index of one collection: a derived, rebuildable cache of the store.

Wraps flat, IVF and HNSW indexes behind one interface with stable int64 ids
(IndexIDMap2), label filtering through ID selectors, and removal everywhere:
HNSW cannot delete, so removed ids become tombstones that every search
excludes until the next rebuild compacts them away. IVF cannot search before
it is trained, so an IVF collection searches exactly (a flat index) until it
holds ``train_size`` vectors, then trains on all of them and switches over.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from imagesearch.plugins.types import FLAT, HNSW, IVF, Metric


@dataclass(frozen=True)
class IndexSpec:
    kind: str
    dim: int
    metric: Metric
    nlist: int = 100
    nprobe: int = 10
    train_size: int = 0  # 0: 39 * nlist, FAISS's minimum for a well-trained k-means
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64

    @property
    def effective_train_size(self) -> int:
        return self.train_size or 39 * self.nlist


def _flat(spec: IndexSpec) -> faiss.Index:
    index = faiss.IndexFlat(spec.dim, spec.metric.faiss_metric)
    if spec.metric.metric_arg:
        index.metric_arg = spec.metric.metric_arg
    return index


class VectorIndex:
    """Thread-compatible, not thread-safe: the collection serialises writes against reads."""

    def __init__(
        self, spec: IndexSpec, index: faiss.Index | None = None, tombstones: np.ndarray | None = None
    ):
        self.spec = spec
        self._index = index if index is not None else self._empty()
        self._tombstones: set[int] = set() if tombstones is None else {int(t) for t in tombstones}

    def _empty(self) -> faiss.Index:
        if self.spec.kind == HNSW:
            inner = faiss.IndexHNSWFlat(self.spec.dim, self.spec.hnsw_m, self.spec.metric.faiss_metric)
            inner.hnsw.efConstruction = self.spec.ef_construction
        else:  # flat, and IVF before it is trained
            inner = _flat(self.spec)
        return faiss.IndexIDMap2(inner)

    # -- state -------------------------------------------------------------------
    @property
    def inner(self) -> faiss.Index:
        return faiss.downcast_index(self._index.index)

    @property
    def trained(self) -> bool:
        """For IVF: whether the inverted-file index is in use yet."""
        return isinstance(self.inner, faiss.IndexIVF)

    @property
    def size(self) -> int:
        """Live vectors (tombstoned ones excluded)."""
        return int(self._index.ntotal) - len(self._tombstones)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def stored_vectors(self) -> np.ndarray:
        """A zero-copy view of a flat index's (prepared) vectors, in ids() order."""
        inner = self.inner
        if not isinstance(inner, faiss.IndexFlat):
            raise TypeError("only flat indexes expose their vectors")
        return faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d)

    # -- writes ------------------------------------------------------------------
    def add(self, ids: np.ndarray, prepared: np.ndarray) -> None:
        if len(ids) == 0:
            return
        self._index.add_with_ids(
            np.ascontiguousarray(prepared, dtype=np.float32), np.asarray(ids, dtype=np.int64)
        )
        if (
            self.spec.kind == IVF
            and not self.trained
            and self._index.ntotal >= self.spec.effective_train_size
        ):
            self._train_ivf()

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if self.spec.kind == HNSW:
            self._tombstones.update(int(i) for i in ids)
        else:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))

    def _train_ivf(self) -> None:
        """Train IVF on every vector held so far and move them into it."""
        ids, vectors = self.ids(), np.array(self.stored_vectors())
        quantizer = _flat(self.spec)
        ivf = faiss.IndexIVFFlat(quantizer, self.spec.dim, self.spec.nlist, self.spec.metric.faiss_metric)
        ivf.train(vectors)
        ivf.nprobe = self.spec.nprobe
        index = faiss.IndexIDMap2(ivf)
        index.add_with_ids(vectors, ids)
        self._index = index

    # -- search ------------------------------------------------------------------
    def _params(self, allowed: np.ndarray | None) -> tuple[faiss.SearchParameters | None, list[object]]:
        """Search parameters plus the selector objects they point to (kept alive by the caller)."""
        keep: list[object] = []
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
            keep.append(selector)
        if self._tombstones:
            dead = faiss.IDSelectorBatch(np.fromiter(self._tombstones, dtype=np.int64))
            alive = faiss.IDSelectorNot(dead)
            keep += [dead, alive]
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
        queries = np.ascontiguousarray(prepared_queries, dtype=np.float32)
        k = max(1, min(k, max(self.size, 1)))
        params, _keep = self._params(allowed)  # _keep holds the selectors alive during the search
        if self.spec.kind == HNSW:
            # HNSW's beam must be at least k wide or it returns fewer hits than it could.
            params.efSearch = max(self.spec.ef_search, k)
        return self._index.search(queries, k, params=params)

    # -- persistence -------------------------------------------------------------
    def serialize(self) -> tuple[bytes, np.ndarray]:
        return faiss.serialize_index(self._index).tobytes(), np.fromiter(
            sorted(self._tombstones), dtype=np.int64
        )

    @classmethod
    def deserialize(cls, spec: IndexSpec, data: bytes, tombstones: np.ndarray) -> VectorIndex:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != spec.dim:
            raise ValueError(f"snapshot has dimension {index.d}, collection has {spec.dim}")
        return cls(spec, index, tombstones)

    def needs_compaction(self) -> bool:
        return self.spec.kind == HNSW and len(self._tombstones) > max(1000, self._index.ntotal // 4)


def brute_force(metric: Metric, prepared_base: np.ndarray, prepared_queries: np.ndarray, k: int):
    """Exact k-NN with any FAISS metric, for metric overrides on flat collections."""
    index = faiss.IndexFlat(prepared_base.shape[1], metric.faiss_metric)
    if metric.metric_arg:
        index.metric_arg = metric.metric_arg
    index.add(np.ascontiguousarray(prepared_base, dtype=np.float32))
    return index.search(
        np.ascontiguousarray(prepared_queries, dtype=np.float32), max(1, min(k, len(prepared_base)))
    )


__all__ = ["FLAT", "HNSW", "IVF", "IndexSpec", "VectorIndex", "brute_force"]
