"""VectorIndex below the gRPC layer: every index kind agrees with a NumPy brute force after
adds, removals and re-adds, including IVF after training and HNSW past compaction."""

from __future__ import annotations

import faulthandler
import os

import faiss
import numpy as np
import pytest

from imagesearch.plugins import l2_normalize
from imagesearch.plugins.metrics import COSINE, INNER_PRODUCT, L2
from imagesearch.plugins.types import FLAT, HNSW, IVF, Metric
from imagesearch.server import vector_index
from imagesearch.server.vector_index import (
    FLOAT16,
    FLOAT32,
    INT8,
    IndexSpec,
    VectorIndex,
    rescore_pool,
)
from tests.support.storage import storage_address

DIM = 16


def spec(kind: str, **params) -> IndexSpec:
    defaults = {"nlist": 4, "nprobe": 4, "train_size": 40} if kind == IVF else {}
    return IndexSpec(kind=kind, dim=DIM, metric=L2, **{**defaults, **params})


def brute_force_ids(base: dict[int, np.ndarray], query: np.ndarray, k: int) -> list[int]:
    ids = np.array(sorted(base))
    vectors = np.stack([base[i] for i in ids])
    order = np.argsort(((vectors - query) ** 2).sum(axis=1), kind="stable")
    return ids[order[:k]].tolist()


def check_against_brute_force(index: VectorIndex, base: dict[int, np.ndarray], rng) -> None:
    """Every stored vector finds itself first; random queries get the brute-force top 5."""
    assert index.size == len(base)
    for row_id, vector in base.items():
        _, ids = index.search(vector[None, :], 1)
        assert ids[0, 0] == row_id
    for query in rng.normal(size=(10, DIM)).astype(np.float32):
        _, ids = index.search(query[None, :], 5)
        assert ids[0].tolist() == brute_force_ids(base, query, 5)


@pytest.mark.parametrize("kind", [FLAT, IVF, HNSW])
def test_removal_and_re_add_agree_with_brute_force(kind):
    rng = np.random.default_rng(7)
    index = VectorIndex(spec(kind))
    base: dict[int, np.ndarray] = {}
    next_id = 1
    for round_ in range(6):
        vectors = rng.normal(size=(30, DIM)).astype(np.float32)
        ids = np.arange(next_id, next_id + 30, dtype=np.int64)
        next_id += 30
        index.add(ids, vectors)
        base.update(zip(ids.tolist(), vectors, strict=True))
        doomed = rng.choice(sorted(base), size=12, replace=False)
        index.remove(doomed)
        for row_id in doomed.tolist():
            del base[row_id]
        index.remove(np.array([10_000 + round_]))  # an id it never held: no effect
        check_against_brute_force(index, base, rng)
    if kind == IVF:
        assert index.trained, "past train_size the IVF index is in use"


def test_ivf_switches_from_exact_to_trained_keeping_every_id():
    rng = np.random.default_rng(1)
    index = VectorIndex(spec(IVF))
    vectors = rng.normal(size=(39, DIM)).astype(np.float32)
    index.add(np.arange(100, 139), vectors)
    assert not index.trained
    index.add(np.array([139]), rng.normal(size=(1, DIM)).astype(np.float32))
    assert index.trained
    assert sorted(index.ids().tolist()) == list(range(100, 140))


def test_ivf_training_failure_keeps_the_exact_index_serving():
    """Fewer distinct training rows than lists: FAISS refuses; adds still succeed."""
    index = VectorIndex(spec(IVF, nlist=4, train_size=2))  # below nlist: CreateCollection refuses this
    vectors = np.eye(DIM, dtype=np.float32)[:3]
    index.add(np.array([1, 2, 3]), vectors)
    assert not index.trained and "IVF training failed" in index.training_error
    _, ids = index.search(vectors[2:3], 1)
    assert ids[0, 0] == 3


def test_hnsw_tombstones_only_what_it_holds_and_needs_compaction_past_a_quarter():
    rng = np.random.default_rng(3)
    index = VectorIndex(spec(HNSW, hnsw_m=8))
    index.add(np.arange(1, 4001), rng.normal(size=(4000, DIM)).astype(np.float32))
    index.remove(np.arange(5000, 5100))  # absent: no tombstones, size unchanged
    assert index.size == 4000 and not index.needs_compaction()
    index.remove(np.arange(1, 1001))
    assert index.size == 3000 and not index.needs_compaction(), "a quarter: kept"
    index.remove(np.arange(1001, 1002))
    assert index.size == 2999 and index.needs_compaction()
    _, ids = index.search(rng.normal(size=(3, DIM)).astype(np.float32), 50)
    assert not set(ids.ravel().tolist()) & set(range(1, 1002))


def test_hnsw_filters_its_tombstones_through_one_selector_kept_up_by_removals() -> None:
    """The removed ids are a bitmap the index keeps (built per search, the selector cost
    O(tombstones) a query): every search shares one selector until a removal, ids past the bitmap
    (added after it grew) are alive, and a reloaded index filters the tombstones it was given."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=(3000, DIM)).astype(np.float32)
    index = VectorIndex(spec(HNSW, hnsw_m=8))
    index.add(np.arange(3000), base[:3000])
    index.remove(np.arange(0, 600, 2))
    first, _ = index._params(None)
    again, _ = index._params(None)
    assert first.sel.this == again.sel.this, "the selector is made once, not per search"
    index.add(np.arange(100_000, 100_050), base[:50])  # ids far past the bitmap: alive
    queries = base[:50]
    _, ids = index.search(queries, 5)
    assert not set(ids.ravel().tolist()) & set(range(0, 600, 2))
    assert set(range(100_000, 100_050)) & set(ids.ravel().tolist())  # copies of the even rows answer
    index.remove(np.arange(100_000, 100_010))  # grows the bitmap
    _, ids = index.search(queries, 5)
    assert not set(ids.ravel().tolist()) & (set(range(0, 600, 2)) | set(range(100_000, 100_010)))
    reloaded = VectorIndex(spec(HNSW, hnsw_m=8), index=index.faiss_index, tombstones=index.tombstones)
    assert np.array_equal(reloaded.search(queries, 5)[1], index.search(queries, 5)[1])


def test_hnsw_widens_its_beam_by_the_share_of_tombstones_and_keeps_its_recall() -> None:
    """Tombstones take room in HNSW's beam: with a quarter removed, a beam of ef_search found
    fewer true neighbours than the same beam over a graph without removals (an outside test:
    recall@10 0.83 after heavy churn). Widened by their share, it finds as many."""
    assert vector_index.hnsw_beam(64, 10, 1000, 0) == 64 and vector_index.hnsw_beam(64, 100, 1000, 0) == 100
    assert vector_index.hnsw_beam(64, 10, 1000, 250) == 85
    rng = np.random.default_rng(6)
    base = rng.normal(size=(6000, 32)).astype(np.float32)
    queries = rng.normal(size=(200, 32)).astype(np.float32)
    made = IndexSpec(kind=HNSW, dim=32, metric=L2, hnsw_m=8, ef_construction=40, ef_search=16)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a graph built in one order: the same graph every run
    try:
        index = VectorIndex(made)
        index.add(np.arange(6000), base)
    finally:
        faiss.omp_set_num_threads(threads)
    index.remove(np.arange(0, 6000, 4))  # a quarter: the most kept before a rebuild
    live = {i: base[i] for i in range(6000) if i % 4}

    def recall() -> float:
        found = index.search(queries, 10)[1]
        return float(
            np.mean(
                [
                    len(set(f.tolist()) & set(brute_force_ids(live, q, 10))) / 10
                    for f, q in zip(found, queries, strict=True)
                ]
            )
        )

    widened = recall()
    original = vector_index.hnsw_beam
    vector_index.hnsw_beam = lambda ef_search, k, held, tombstones: max(ef_search, k)
    try:
        narrow = recall()
    finally:
        vector_index.hnsw_beam = original
    assert widened > narrow + 0.02, (widened, narrow)


def test_float16_storage_of_a_metric_faiss_cannot_quantise_keeps_float32_and_says_so() -> None:
    """A float16 collection of a plugin's L1 metric (created before CreateCollection refused it)
    searched nothing: FAISS's scalar quantizer asserts on any metric but L2 and inner product. Its
    index keeps float32 instead, answers exactly, and says why (GetCollection's state_reason)."""
    l1 = Metric(name="l1", faiss_metric=faiss.METRIC_L1, description="", to_score=lambda d: -d)
    rng = np.random.default_rng(13)
    base = rng.normal(size=(200, DIM)).astype(np.float32)
    index = VectorIndex(IndexSpec(kind=FLAT, dim=DIM, metric=l1, storage=FLOAT16))
    index.add(np.arange(200), base)
    assert index.stored_as == FLOAT32 and "kept as float32" in index.storage_note
    query = rng.normal(size=(1, DIM)).astype(np.float32)
    expected = np.argsort(np.abs(base - query).sum(axis=1), kind="stable")[:5]
    assert index.search(query, 5)[1][0].tolist() == expected.tolist()
    index.check_layout()  # a snapshot of it loads again
    assert VectorIndex(IndexSpec(kind=FLAT, dim=DIM, metric=L2, storage=FLOAT16)).storage_note == ""


def test_float16_storage_halves_memory_and_keeps_recall():
    """float16 codes: half the bytes of float32, recall@10 against exact float32 search >= 0.99."""
    rng = np.random.default_rng(9)
    base = rng.normal(size=(3000, 64)).astype(np.float32)
    queries = rng.normal(size=(50, 64)).astype(np.float32)
    exact = VectorIndex(IndexSpec(kind=FLAT, dim=64, metric=L2))
    half = VectorIndex(IndexSpec(kind=FLAT, dim=64, metric=L2, storage=FLOAT16))
    for index in (exact, half):
        index.add(np.arange(3000), base)
        index.remove(np.arange(0, 3000, 7))  # removal works on both
    _, truth = exact.search(queries, 10)
    _, found = half.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.99
    ids = 2 * 8 * half.size
    assert half.memory_bytes() - ids == (exact.memory_bytes() - ids) // 2
    assert np.allclose(half.stored_vectors(), exact.stored_vectors(), atol=1e-2)
    half.check_layout()
    with pytest.raises(ValueError, match="does not fit"):
        VectorIndex(half.spec, exact.faiss_index).check_layout()


def codes_of(index: VectorIndex) -> np.ndarray:
    return np.array(faiss.vector_to_array(faiss.downcast_index(index.faiss_index.index).codes))


def test_int8_learns_its_grid_and_keeps_the_true_neighbours_among_its_candidates():
    """int8 holds float32 until INT8_LEARN_SIZE vectors, then codes on a grid learnt from exactly
    those, whatever the batches: a quarter of the bytes. Later vectors using dimensions the first
    ones left unused are clipped there, so they are outliers, which with the top 40 hold the true
    top 10 that the collection re-scores with float32 (a grid learnt without outliers lost them)."""
    rng = np.random.default_rng(9)
    base = rng.normal(size=(3000, 64)).astype(np.float32)
    base[:1000, :16] = 0  # the first vectors leave 16 dimensions unused; later ones use them
    base = l2_normalize(base)
    queries = l2_normalize(base[rng.choice(3000, 50)] + 0.3 * l2_normalize(rng.normal(size=(50, 64))))
    exact = VectorIndex(IndexSpec(kind=FLAT, dim=64, metric=COSINE))
    small = VectorIndex(IndexSpec(kind=FLAT, dim=64, metric=COSINE, storage=INT8))
    by_sevens = VectorIndex(IndexSpec(kind=FLAT, dim=64, metric=COSINE, storage=INT8))
    small.add(np.arange(999), base[:999])
    assert not small.quantized and not small.trained, "float32, exact, until it has learnt"
    small.add(np.arange(999, 3000), base[999:])
    for start in range(0, 3000, 7):
        by_sevens.add(np.arange(start, min(start + 7, 3000)), base[start : start + 7])
    assert small.quantized and np.array_equal(codes_of(small), codes_of(by_sevens)), "whatever the batches"
    assert np.array_equal(small.outliers(), by_sevens.outliers())
    assert set(small.outliers().tolist()) <= set(range(1000, 3000))
    exact.add(np.arange(3000), base)
    for index in (exact, small):
        index.remove(np.arange(0, 3000, 7))
    assert not set(small.outliers().tolist()) & set(range(0, 3000, 7))
    _, truth = exact.search(queries, 10)
    _, scanned = small.search(queries, rescore_pool(10))
    candidates = [set(row.tolist()) | set(small.outliers().tolist()) for row in scanned]
    assert np.mean([len(set(t) & c) / 10 for t, c in zip(truth, candidates, strict=True)]) == 1.0
    ids = 2 * 8 * small.size
    assert small.memory_bytes() - ids == (exact.memory_bytes() - ids) // 4
    inside = ~np.isin(small.ids(), small.outliers())
    assert np.abs(small.stored_vectors() - exact.stored_vectors())[inside].max() <= 2 / 255  # a grid step
    small.check_layout()
    half = VectorIndex(IndexSpec(kind=FLAT, dim=64, metric=COSINE, storage=FLOAT16))
    half.add(np.arange(10), base[:10])
    with pytest.raises(ValueError, match="does not fit"):  # float16 codes are not int8 codes
        VectorIndex(small.spec, half.faiss_index).check_layout()


def test_ivf_trains_on_the_first_train_size_vectors_whatever_the_batches() -> None:
    """Live adds (batches crossing the training size) and a rebuild's replay (other chunks) train
    on the same vectors, so a rebuilt index answers exactly as the live one did."""
    made = spec(IVF)
    rng = np.random.default_rng(8)
    base = rng.normal(size=(500, DIM)).astype(np.float32)
    live, rebuilt = VectorIndex(made), VectorIndex(made)
    for start, stop in ((0, 25), (25, 55), (55, 500)):
        live.add(np.arange(start, stop), base[start:stop])
    rebuilt.add(np.arange(500), base)
    assert live.trained and rebuilt.trained
    queries = rng.normal(size=(20, DIM)).astype(np.float32)
    assert np.array_equal(live.search(queries, 10)[1], rebuilt.search(queries, 10)[1])


@pytest.mark.parametrize(
    "made", [spec(IVF), IndexSpec(kind=FLAT, dim=128, metric=COSINE, storage=INT8)], ids=["ivf", "int8"]
)
def test_an_index_given_what_another_learnt_learns_nothing_of_its_own(made: IndexSpec) -> None:
    """Given ``learnt``, an index trains to the very lists (or grid) the other learnt, even from
    other first rows (the ones removed since are gone from the store), and without k-means; one
    of another shape is ignored, and the index learns for itself."""
    rng = np.random.default_rng(12)
    base = l2_normalize(rng.normal(size=(1500, made.dim)).astype(np.float32))  # int8's grid saturates at 16-d
    first = VectorIndex(made)
    first.add(np.arange(1500), base)
    learnt = first.learnt
    assert learnt is not None and VectorIndex(made).learnt is None
    given = VectorIndex(made, learnt=learnt)
    given.add(np.arange(100, 1500), base[100:])
    assert np.array_equal(given.learnt, learnt)
    alone = VectorIndex(made)
    alone.add(np.arange(100, 1500), base[100:])
    assert not np.array_equal(alone.learnt, learnt)  # what a rebuild learnt before
    misfit = VectorIndex(made, learnt=np.zeros((3, made.dim), np.float32))
    misfit.add(np.arange(100, 1500), base[100:])
    assert np.array_equal(misfit.learnt, alone.learnt)
    queries = l2_normalize(rng.normal(size=(20, made.dim)).astype(np.float32))
    same = VectorIndex(made, learnt=learnt)
    same.add(np.arange(1500), base)
    assert np.array_equal(same.search(queries, 10)[1], first.search(queries, 10)[1])


def test_flat_l2_distances_are_exact_and_the_same_alone_or_batched():
    """FAISS's BLAS path computes L2 as |x|^2 + |y|^2 - 2xy (a vector lies ~1e-4 from itself); the
    index re-scores its hits directly, so distances are exact and independent of the batch."""
    rng = np.random.default_rng(4)
    base = (10 * rng.normal(size=(2000, DIM))).astype(np.float32)
    index = VectorIndex(spec(FLAT))
    index.add(np.arange(2000), base)
    together, ids = index.search(base[:40], 5)
    assert np.all(together[:, 0] == 0) and np.array_equal(ids[:, 0], np.arange(40))
    for row in (0, 17, 39):
        alone, alone_ids = index.search(base[row : row + 1], 5)
        assert np.array_equal(alone[0], together[row]) and np.array_equal(alone_ids[0], ids[row])
    expected = ((base[ids[3]] - base[3]) ** 2).sum(axis=1)
    assert np.allclose(together[3], expected, rtol=1e-6)


@pytest.mark.parametrize("queries", [1, 2])
def test_a_lone_cosine_query_by_matrix_vector_product_equals_faiss(monkeypatch, queries):
    """One or two queries on a float32 flat inner-product index skip FAISS (GEMV_MAX_QUERIES): same
    ids, same scores to float32 rounding, after removals too, for every k up to the whole index."""
    rng = np.random.default_rng(5)
    base = l2_normalize(rng.normal(size=(500, DIM)).astype(np.float32))
    index = VectorIndex(IndexSpec(kind=FLAT, dim=DIM, metric=COSINE))
    index.add(np.arange(1000, 1500), base)
    index.remove(np.arange(1000, 1500, 7))  # FAISS compacts its storage and id map
    kept = np.array([i for i in range(1000, 1500) if (i - 1000) % 7])
    probes = l2_normalize(rng.normal(size=(queries, DIM)).astype(np.float32))
    gemv_calls = []
    real_gemv = index._search_by_gemv
    monkeypatch.setattr(index, "_search_by_gemv", lambda *a: gemv_calls.append(1) or real_gemv(*a))
    for k in (1, 10, len(kept)):
        fast_scores, fast_ids = index.search(probes, k)
        assert len(gemv_calls) == 1
        gemv_calls.clear()
        with monkeypatch.context() as patched:  # the same search through FAISS
            patched.setattr(vector_index, "GEMV_MAX_QUERIES", 0)
            faiss_scores, faiss_ids = index.search(probes, k)
        assert np.array_equal(fast_ids, faiss_ids)
        assert np.allclose(fast_scores, faiss_scores, atol=1e-6)
        expected = kept[np.argsort(-(base[kept - 1000] @ probes.T), axis=0, kind="stable")[:k].T]
        assert np.array_equal(fast_ids, expected)


def test_equal_scores_at_the_cut_off_keep_the_earliest_stored_alone_or_batched(monkeypatch):
    """Duplicates (the same photo under many ids, or all-zero vectors): a lone query (sgemv) and a
    batch of three (FAISS) return the same earliest-stored ids, in that order."""
    rng = np.random.default_rng(6)
    others = l2_normalize(rng.normal(size=(300, DIM)).astype(np.float32))
    twin = l2_normalize(rng.normal(size=(1, DIM)).astype(np.float32))
    base = np.concatenate([others[:100], np.repeat(twin, 40, axis=0), others[100:]])
    order = rng.permutation(len(base))  # the twins spread through the collection
    index = VectorIndex(IndexSpec(kind=FLAT, dim=DIM, metric=COSINE))
    index.add(np.arange(len(base)), base[order])
    twin_ids = np.flatnonzero((order >= 100) & (order < 140))
    _, alone = index.search(twin, 10)
    _, batched = index.search(np.repeat(twin, 3, axis=0), 10)
    assert alone[0].tolist() == twin_ids[:10].tolist()
    assert all(row.tolist() == twin_ids[:10].tolist() for row in batched)
    zeros = VectorIndex(IndexSpec(kind=FLAT, dim=DIM, metric=COSINE))
    zeros.add(np.arange(50), np.zeros((50, DIM), np.float32))
    assert zeros.search(twin, 5)[1][0].tolist() == zeros.search(np.repeat(twin, 3, axis=0), 5)[1][1].tolist()
    assert zeros.search(twin, 5)[1][0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("metric", [COSINE, INNER_PRODUCT, L2], ids=lambda m: m.name)
def test_a_query_ranks_the_same_alone_or_in_any_batch_among_duplicates(metric):
    """Copies of one vector stored far apart, and scaled copies, after removals: a query gets the
    same ids and the same distances alone (sgemv for inner products), in a batch of three and in a
    batch past GEMV_MAX_QUERIES (FAISS), scored exactly, equal scores by ascending id.
    The float32 scans round differently per path and per stored position (found by an outside
    test: the lone search and a batch returned different copies of a duplicate)."""
    rng = np.random.default_rng(12)
    base = rng.normal(size=(150, DIM)).astype(np.float32)
    stored = np.concatenate([base, base[:50], base[:50] * 2.0])
    prepared = metric.prepare(stored)
    index = VectorIndex(IndexSpec(kind=FLAT, dim=DIM, metric=metric))
    index.add(np.arange(len(stored)), prepared)
    index.remove(np.arange(100, 120))
    kept = np.array([i for i in range(len(stored)) if not 100 <= i < 120])
    queries = metric.prepare(np.concatenate([stored[:60:3], stored[1:60:3] + 0.01]).astype(np.float32))
    for k in (1, 3, 10, 60):
        alone = [index.search(query[None], k) for query in queries]
        for size in (3, 20):
            for start in range(0, len(queries), size):
                distances, ids = index.search(queries[start : start + size], k)
                for row, (lone_distances, lone_ids) in enumerate(alone[start : start + size]):
                    assert ids[row].tolist() == lone_ids[0].tolist(), (k, size, start + row)
                    assert distances[row].tolist() == lone_distances[0].tolist(), (k, size, start + row)
    for query, (distances, ids) in zip(queries, (index.search(q[None], 10) for q in queries), strict=True):
        vectors = prepared[kept].astype(np.float64)
        if metric.faiss_metric == faiss.METRIC_L2:
            exact = ((vectors - query) ** 2).sum(axis=1)
            order = np.lexsort((kept, exact))
        else:
            exact = vectors @ query.astype(np.float64)
            order = np.lexsort((kept, -exact))
        assert ids[0].tolist() == kept[order[:10]].tolist()
        assert np.allclose(distances[0], exact[order[:10]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric", [COSINE, INNER_PRODUCT, L2], ids=lambda m: m.name)
def test_a_search_among_a_label_ranks_copies_by_id_alone_or_batched(metric):
    """A label filter's exact search (``search_among``: float64 products of the label's vectors)
    only proposes candidates; they are scored one pair at a time, so 300 copies of one vector tie
    exactly and come in id order, alone or in a batch (found by an outside test: at 192
    dimensions the matrix product rounded copies apart, differently alone and batched)."""
    dim = 192
    rng = np.random.default_rng(5)
    base = rng.normal(size=(61, dim)).astype(np.float32)
    stored = metric.prepare(np.concatenate([base, np.repeat(base[:1], 300, axis=0)]))
    index = VectorIndex(IndexSpec(kind=FLAT, dim=dim, metric=metric))
    ids = np.arange(1, len(stored) + 1)
    index.add(ids, stored)
    copies = [1, *range(62, 362)]
    queries = metric.prepare(np.concatenate([base[1:4], rng.normal(size=(37, dim))]).astype(np.float32))
    _, batched = index.search_among(queries, len(stored), ids)
    for row, query in enumerate(queries):
        _, alone = index.search_among(query[None], len(stored), ids)
        assert alone[0].tolist() == batched[row].tolist(), row
        assert [i for i in alone[0].tolist() if i in set(copies)] == copies, row


def test_a_vector_the_float32_scan_misjudges_still_ranks_by_its_exact_score():
    """Inner product with one vector of norm 5e16 whose components cancel: float32 scores it 0,
    its exact score is 2^31 (found by an outside test). The rounding bound uses the largest norm
    held, not the candidates' own, so the search asks for more until it has it."""
    dim = 192
    rng = np.random.default_rng(1)
    ordinary = np.abs(rng.normal(size=(40, dim))).astype(np.float32) / 10
    big = np.zeros(dim, np.float32)
    big[0], big[1] = (1 + 2.0**-12) * 2.0**55, -(1 + 2.0**-11) * 2.0**55
    query = np.zeros(dim, np.float32)
    query[0], query[1] = 1 + 2.0**-12, 1
    stored = np.concatenate([ordinary, big[None]])
    index = VectorIndex(IndexSpec(kind=FLAT, dim=dim, metric=INNER_PRODUCT))
    index.add(np.arange(len(stored)), stored)
    exact = stored.astype(np.float64) @ query.astype(np.float64)
    assert exact[40] == 2.0**31 and float(stored[40] @ query) < 1e6  # what the scan sees
    expected = np.argsort(-exact, kind="stable")[:3].tolist()
    assert expected[0] == 40
    for batch in (1, 3, 25):
        _, ids = index.search(np.repeat(query[None], batch, axis=0), 3)
        assert all(row.tolist() == expected for row in ids), batch


def test_a_query_that_ties_everything_is_answered_in_bounded_slices(monkeypatch):
    """The zero vector under inner product scores 0 against every vector: all tie, and each retry
    would gather 32 times as many. Past EXACT_MAX_MARGIN the query is scored against the
    whole pool a slice at a time, never the whole collection at once (an outside test: 1.2 GB for a
    batch of 32 over 50,000 vectors), and gets the earliest ids; identical queries once."""
    monkeypatch.setattr(vector_index, "EXACT_MAX_MARGIN", 64)
    monkeypatch.setattr(vector_index, "EXACT_SLICE", 64 * DIM)
    scored: list[tuple[int, int]] = []
    exact_scores = vector_index._exact_scores
    monkeypatch.setattr(
        vector_index,
        "_exact_scores",
        lambda queries, vectors, ip: scored.append(vectors.shape[:2]) or exact_scores(queries, vectors, ip),
    )
    rng = np.random.default_rng(2)
    index = VectorIndex(IndexSpec(kind=FLAT, dim=DIM, metric=INNER_PRODUCT))
    index.add(rng.permutation(5000) + 7, rng.normal(size=(5000, DIM)).astype(np.float32))
    for batch in (1, 3, 32):
        scored.clear()
        _, ids = index.search(np.zeros((batch, DIM), np.float32), 10)
        assert all(row.tolist() == list(range(7, 17)) for row in ids)
        assert all(queries == 1 for queries, _ in scored), scored  # the zero vector, once
        assert max(candidates for _, candidates in scored) <= 10 + 64, scored  # k + the margin


def test_a_large_k_is_settled_by_its_first_scan(monkeypatch):
    """k 1000 asks k / 16 candidates more, not 8: among random vectors the band the scan may
    misjudge holds a few, and 8 more left every such query to the whole-pool pass (64 queries
    at k 1000 over 20,000 x 1280 vectors took 2.4 s instead of 0.1, bench_search_threads.py)."""
    scans: list[int] = []
    monkeypatch.setattr(vector_index, "_exhaustive_top_k", lambda *_: pytest.fail("whole-pool pass"))
    rng = np.random.default_rng(8)
    index = VectorIndex(IndexSpec(kind=FLAT, dim=256, metric=INNER_PRODUCT))
    index.add(np.arange(5000), l2_normalize(rng.normal(size=(5000, 256)).astype(np.float32)))
    scan = index._scan
    monkeypatch.setattr(index, "_scan", lambda q, asked, *rest: scans.append(asked) or scan(q, asked, *rest))
    _, ids = index.search(l2_normalize(rng.normal(size=(16, 256)).astype(np.float32)), 1000)
    assert scans == [1000 + 1000 // 16] and (ids >= 0).all()


def far_cluster(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors 10^4 from the origin with a spread of 10^-2, and queries among them: the float32
    scan's rounding (|q|^2 + |v|^2 in its expansion) is wider than every distance between them."""
    rng = np.random.default_rng(seed)
    center = rng.normal(size=dim) * 1e4
    vectors = (center + rng.normal(size=(n, dim)) * 1e-2).astype(np.float32)
    return vectors, (center + rng.normal(size=(8, dim)) * 1e-2).astype(np.float32)


def exact_l2(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> tuple[list, list]:
    """The k nearest by float64 distance, equal distances by ascending id."""
    wide = vectors.astype(np.float64) - query.astype(np.float64)
    distances = (wide * wide).sum(axis=1)
    order = np.lexsort((ids, distances))[:k]
    return ids[order].tolist(), distances[order].astype(np.float32).tolist()


@pytest.mark.parametrize("dim", [3, 64])
def test_l2_far_from_the_origin_ranks_exactly_alone_and_in_any_batch(dim):
    """Past EXACT_MAX_MARGIN vectors all within the scan's rounding, the answer used to be
    whatever the scan gave: other hits for a lone query (FAISS's direct path) than in a batch (its
    BLAS expansion), and not the nearest (an outside test). Now such a query is scored exactly
    against the whole collection."""
    vectors, queries = far_cluster(3000, dim, seed=dim)
    ids = np.random.default_rng(1).permutation(len(vectors)).astype(np.int64)
    index = VectorIndex(IndexSpec(kind=FLAT, dim=dim, metric=L2))
    index.add(ids, vectors)
    for query_row, query in enumerate(queries):
        expected_ids, expected_distances = exact_l2(vectors, ids, query, 5)
        batches = [(query[None], 0), (queries, query_row), (np.vstack([queries[::-1], query]), 8)]
        for batch, row in batches:
            distances, found = index.search(batch, 5)
            assert found[row].tolist() == expected_ids
            assert distances[row].tolist() == expected_distances


@pytest.mark.parametrize("metric", [INNER_PRODUCT, L2])
def test_vectors_whose_products_underflow_float32_rank_exactly(metric):
    """Vectors of norm about 1e-22: their products (about 1e-46) fall below float32's smallest
    subnormal, so the scan scored nearly all of them 0, and its relative rounding bound, of the
    same tiny order, called that settled (an outside test: hits neither the exact ones nor the
    same alone as in a batch). The bound now counts what underflow can lose."""
    rng = np.random.default_rng(1)
    stored = (rng.normal(size=(3000, 16)) * 1e-23).astype(np.float32)
    ids = rng.permutation(len(stored)).astype(np.int64) + 5
    queries = (rng.normal(size=(8, 16)) * 1e-23).astype(np.float32)
    index = VectorIndex(IndexSpec(kind=FLAT, dim=16, metric=metric))
    index.add(ids, stored)
    wide, wide_queries = stored.astype(np.float64), queries.astype(np.float64)
    for row, query in enumerate(wide_queries):
        badness = -(wide @ query) if metric is INNER_PRODUCT else ((wide - query) ** 2).sum(axis=1)
        expected = ids[np.lexsort((ids, badness))[:5]].tolist()
        for batch, at in ((queries[row : row + 1], 0), (queries, row)):
            assert index.search(batch, 5)[1][at].tolist() == expected


def test_ties_past_the_cap_give_the_earliest_ids():
    """2,000 copies of one vector under L2 (ids shuffled), and the zero vector under inner product
    over 1,100 vectors: more ties than k + EXACT_MAX_MARGIN, so the earliest ids come from scoring
    the whole pool, not from the scan's order (an outside test got 2, 3, 4, 12, 20)."""
    rng = np.random.default_rng(0)
    copy = np.array([1.0, 2.0, 3.0], np.float32)
    stored = np.vstack([np.tile(copy, (2000, 1)), rng.normal(size=(100, 3)).astype(np.float32)])
    ids = rng.permutation(len(stored)).astype(np.int64)
    index = VectorIndex(IndexSpec(kind=FLAT, dim=3, metric=L2))
    index.add(ids, stored)
    for batch in (copy[None], np.vstack([copy, stored[-5:]])):
        distances, found = index.search(batch, 5)
        assert found[0].tolist() == np.sort(ids[:2000])[:5].tolist()
        assert distances[0].tolist() == [0.0] * 5
    _, found = index.search(copy[None], 5)
    allowed = np.sort(ids[:2000])[::3]  # a label's vectors: the filter keeps its own earliest
    _, found = index.search(copy[None], 5, allowed=allowed)
    assert found[0].tolist() == allowed[:5].tolist()
    index = VectorIndex(IndexSpec(kind=FLAT, dim=3, metric=INNER_PRODUCT))
    index.add(rng.permutation(1100), rng.normal(size=(1100, 3)).astype(np.float32))
    _, found = index.search(np.zeros((1, 3), np.float32), 5)
    assert found[0].tolist() == [0, 1, 2, 3, 4]


def test_brute_force_ties_past_the_cap_give_the_earliest_positions():
    """The exact search among a label's vectors (and metric overrides, int8 re-scoring) ranks
    the same way: 2,100 copies tie among 900 others, and the zero vector ties 1,500 vectors; the
    earliest positions come back (they used to be 1097, 1098, 1099, 1101, 1104, and 1 to 5)."""
    rng = np.random.default_rng(0)
    base = np.ones((3000, 4), np.float32)
    elsewhere = rng.random(3000) < 0.3
    base[elsewhere] = 5
    raw, positions = vector_index.brute_force(L2, base, np.ones((1, 4), np.float32), 5)
    assert positions[0].tolist() == np.flatnonzero(~elsewhere)[:5].tolist()
    assert raw[0].tolist() == [0.0] * 5
    stored = rng.normal(size=(1500, 4)).astype(np.float32)
    _, positions = vector_index.brute_force(INNER_PRODUCT, stored, np.zeros((1, 4), np.float32), 5)
    assert positions[0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("metric", [INNER_PRODUCT, L2])
def test_the_whole_pool_pass_scores_a_pair_as_the_candidates_do(metric):
    """The exact score of a pair is the same bits whether the pair was a scan candidate (gathered
    copies) or met in the whole-pool pass (slices of the storage, shared by the queries): an answer
    cannot depend on which way a query went."""
    rng = np.random.default_rng(5)
    for dim in (3, 127, 1280):
        vectors = (rng.normal(size=(300, dim)) * rng.choice([1e-3, 1, 1e4], (300, 1))).astype(np.float32)
        queries = rng.normal(size=(4, dim)).astype(np.float32)
        candidates = np.stack([rng.permutation(300)[:40] for _ in queries])
        ranked, keys, whole, whole_keys = both_ways(vectors, queries, candidates, metric is INNER_PRODUCT)
        for row in range(len(queries)):
            scores = dict(zip(whole_keys[row].tolist(), whole[row].tolist(), strict=True))
            assert [scores[key] for key in keys[row].tolist()] == ranked[row].tolist()


def both_ways(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, inner_product: bool):
    """Exact scores of the candidates as a scan's candidates, and of every vector by the whole-pool
    pass in slices of 64."""
    ranked, keys, _ = vector_index._ranked_exactly(
        queries, candidates, lambda at: vectors[at], candidates.shape[1], inner_product, (0.0, 0.0), 1.0
    )

    def slices(rows: int):
        for start in range(0, len(vectors), min(rows, 64)):
            yield np.arange(start, min(start + 64, len(vectors))), vectors[start : start + 64]

    whole, whole_keys = vector_index._exhaustive_top_k(queries, len(vectors), inner_product, slices)
    return ranked, keys, whole, whole_keys


def test_the_norm_bound_follows_adds_after_the_first_search():
    """The largest norm held is read from the storage at the first search, then kept up by adds:
    a large-norm vector whose components cancel, added after a search, still ranks first."""
    dim = 192
    rng = np.random.default_rng(4)
    index = VectorIndex(IndexSpec(kind=FLAT, dim=dim, metric=INNER_PRODUCT))
    index.add(np.arange(40), np.abs(rng.normal(size=(40, dim))).astype(np.float32) / 10)
    query = np.zeros(dim, np.float32)
    query[0], query[1] = 1 + 2.0**-12, 1
    assert 40 not in index.search(query[None], 3)[1][0].tolist()  # the bound is now read
    big = np.zeros(dim, np.float32)
    big[0], big[1] = (1 + 2.0**-12) * 2.0**55, -(1 + 2.0**-11) * 2.0**55
    index.add(np.array([40]), big[None])
    for batch in (1, 3):
        _, ids = index.search(np.repeat(query[None], batch, axis=0), 3)
        assert all(row[0] == 40 for row in ids), ids


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e10, 1e17])
def test_the_largest_norm_is_bounded_from_above_within_a_rounding_at_any_scale(scale):
    """Summed in float32 where that is safe, in float64 where float32 would under- or overflow:
    never below the true largest norm (an underestimate would let the scan's error go unnoticed)."""
    rows = (np.random.default_rng(5).normal(size=(300, 1280)) * scale).astype(np.float32)
    true = float(np.sqrt((rows.astype(np.float64) ** 2).sum(axis=1).max()))
    bound = vector_index._largest_norm(rows)
    assert true <= bound <= true * (1 + 2 * vector_index.scan_error(1280))


def test_the_whole_pool_pass_works_in_a_forked_child():
    """The pass's threads do not survive a fork: a child (a worker forked by an application that
    embeds the index) makes its own instead of waiting forever on the parent's."""
    base = np.random.default_rng(0).normal(size=(3000, 8)).astype(np.float32)
    zero = np.zeros((1, 8), np.float32)
    assert vector_index.brute_force(INNER_PRODUCT, base, zero, 3)[1].tolist() == [[0, 1, 2]]
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's outcome is its exit status
        faulthandler.dump_traceback_later(30, exit=True)
        ok = vector_index.brute_force(INNER_PRODUCT, base, zero, 3)[1].tolist() == [[0, 1, 2]]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("metric", [INNER_PRODUCT, L2])
def test_nothing_to_search_gives_empty_answers(metric):
    """An empty label filter, and an exact search among no vectors, answer nothing: FAISS asserts
    on an empty selector and the exact ranking divided by the pool's size (an outside test; the
    server checks both first, but these are the index's own answers)."""
    index = VectorIndex(IndexSpec(kind=FLAT, dim=DIM, metric=metric))
    index.add(np.arange(10), np.random.default_rng(0).normal(size=(10, DIM)).astype(np.float32))
    queries = np.ones((2, DIM), np.float32)
    _, ids = index.search(queries, 5, allowed=np.zeros(0, np.int64))
    assert (ids == -1).all() and ids.shape == (2, 5)
    raw, positions = vector_index.brute_force(metric, np.zeros((0, DIM), np.float32), queries, 5)
    assert raw.shape == positions.shape == (2, 0)


def test_the_whole_pool_pass_after_removals_and_re_adds(monkeypatch):
    """The pass reads what the index holds now: removed ids never come back, ids added since
    rank among the ties by id, and a label filter keeps only its own (allowed ids since removed
    included)."""
    passes: list[int] = []
    exhaustive = vector_index._exhaustive_top_k
    monkeypatch.setattr(
        vector_index, "_exhaustive_top_k", lambda q, *rest: passes.append(len(q)) or exhaustive(q, *rest)
    )
    copy = np.array([1.0, 2.0, 3.0], np.float32)
    index = VectorIndex(IndexSpec(kind=FLAT, dim=3, metric=L2))
    index.add(np.arange(100, 3100), np.tile(copy, (3000, 1)))
    index.remove(np.array([100, 101, 102, 105]))
    index.add(np.array([7, 3200]), np.tile(copy, (2, 1)))  # a new row id below the rest, and above
    _, found = index.search(copy[None], 5)
    assert found[0].tolist() == [7, 103, 104, 106, 107] and passes == [1]
    # Even ids: 100 and 102 removed since; 101 removed and odd; 99999 never held.
    allowed = np.concatenate([[99999, 101], np.arange(3100, 99, -2)])
    _, found = index.search(np.vstack([copy, copy + 1]), 5, allowed=allowed)
    assert found.tolist() == [[104, 106, 108, 110, 112]] * 2  # both tie every copy
    assert passes == [1, 2]


@pytest.mark.parametrize("storage", [FLOAT32, FLOAT16, INT8])
def test_room_made_beforehand_keeps_every_vector_and_faiss_adds_in_place(storage: str) -> None:
    """Storage grown outside the write lock (room_for), so that FAISS's own add never copies the
    collection under it: the index holds exactly what plain adds give."""
    rng = np.random.default_rng(0)
    vectors = l2_normalize(rng.normal(size=(1500, 64)).astype(np.float32))
    grown = VectorIndex(IndexSpec(kind=FLAT, dim=64, metric=COSINE, storage=storage))
    plain = VectorIndex(IndexSpec(kind=FLAT, dim=64, metric=COSINE, storage=storage))
    for start in range(0, 1500, 100):  # int8 learns its grid at 1,000 and swaps its index
        ids = np.arange(start, start + 100)
        install = grown.room_for(len(ids))
        if install is not None:
            install()
        before, learnt_before = storage_address(grown), grown.quantized
        grown.add(ids, vectors[ids])
        learns_here = grown.quantized and not learnt_before  # int8 learnt its grid: new storage
        assert learns_here or before in (0, storage_address(grown)), "FAISS added in place"
        plain.add(ids, vectors[ids])
        if start == 500:  # removals shrink the storage in place: the room made stays known
            for index in (grown, plain):
                index.remove(np.arange(100, 300))
    assert grown.room_for(0) is None
    np.testing.assert_array_equal(grown.ids(), plain.ids())
    if storage != INT8:
        np.testing.assert_array_equal(np.asarray(grown.stored_vectors()), np.asarray(plain.stored_vectors()))
    raw, found = grown.search(vectors[:20], 10)
    raw_plain, found_plain = plain.search(vectors[:20], 10)
    np.testing.assert_array_equal(found, found_plain)
    np.testing.assert_array_equal(raw, raw_plain)


def test_room_for_leaves_graph_and_list_indexes_to_faiss() -> None:
    rng = np.random.default_rng(1)
    hnsw = VectorIndex(spec(HNSW))
    hnsw.add(np.arange(50), rng.normal(size=(50, DIM)).astype(np.float32))
    assert hnsw.room_for(100) is None


def test_ivf_training_on_few_vectors_warns_in_the_log_not_on_stderr(capfd, caplog):
    """FAISS printed its own 'WARNING clustering ...' to stderr, which broke a JSON log stream (an
    outside test). The server logs it instead; the lists are what FAISS's default would give."""
    import logging

    import faiss

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(40, DIM)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="imagesearch.server.vector_index"):
        index = VectorIndex(spec(IVF, nlist=4, train_size=40))
        index.add(np.arange(40), vectors)
    assert index.trained
    assert "WARNING clustering" not in capfd.readouterr().err
    assert "training 4 IVF lists on 40 vectors: 156 or more give steadier lists" in caplog.text
    # The threshold decides FAISS's print and nothing else: the same centroids either way.
    quiet = faiss.Kmeans(DIM, 4, niter=10, seed=1, min_points_per_centroid=1)
    quiet.train(vectors)
    loud = faiss.Kmeans(DIM, 4, niter=10, seed=1)
    loud.train(vectors)
    capfd.readouterr()
    np.testing.assert_array_equal(quiet.centroids, loud.centroids)


def test_a_postponed_ivf_training_leaves_every_vector_searchable_and_trains_later_as_a_rebuild_would() -> (
    None
):
    """An add whose ``still_wanted`` raises ``TrainingPostponed`` (a stopping server) keeps its
    vectors in the exact index, untrained and with no error kept; a later add trains on the first
    ``train_size`` vectors, so its lists are those of an index that trained at once (a rebuild)."""
    made = spec(IVF)
    rng = np.random.default_rng(21)
    base = rng.normal(size=(120, DIM)).astype(np.float32)
    calls = []

    def stopping() -> None:
        calls.append(1)
        raise vector_index.TrainingPostponed("the server is stopping")

    index = VectorIndex(made)
    index.add(np.arange(30), base[:30])
    index.learn_ahead(base[30:100], stopping)  # the k-means before the lock stops too
    index.add(np.arange(30, 100), base[30:100], stopping)  # crosses train_size (40)
    assert calls and not index.trained and index.training_error == ""
    assert index.learnt is None
    expected = {i: base[i] for i in range(100)}
    for query in rng.normal(size=(5, DIM)).astype(np.float32):
        assert index.search(query[None, :], 5)[1][0].tolist() == brute_force_ids(expected, query, 5)
    index.add(np.arange(100, 120), base[100:120])  # no stop: trains
    at_once = VectorIndex(made)
    at_once.add(np.arange(120), base)
    assert index.trained and np.array_equal(index.learnt, at_once.learnt)
    assert sorted(index.ids().tolist()) == list(range(120))
