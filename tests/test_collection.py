"""Collection below the gRPC layer: a store and an index kept in agreement.

Every search is compared with a NumPy brute force over what the store holds, for each
index kind, after adds and removals, after a snapshot plus a replayed tail, after a
damaged snapshot and after HNSW compaction. The collection's own rules (read-only
when no index can be built, NotFound once closed, index parameter bounds, collection
names) are checked here so a failure points at collection.py rather than the API.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from imagesearch.plugins.metrics import COSINE, INNER_PRODUCT, L2
from imagesearch.plugins.types import FLAT, HNSW, IVF, Metric
from imagesearch.server import collection as collection_module
from imagesearch.server import vector_index as vector_index_module
from imagesearch.server.collection import (
    SNAPSHOT_FILE,
    STORE_FILE,
    Collection,
    CollectionSpec,
    Hit,
    check_collection_name,
    check_index_params,
    index_params,
)
from imagesearch.server.config import Limits
from imagesearch.server.errors import FailedPrecondition, InvalidArgument, NotFound
from imagesearch.server.store import CollectionStore, NewImage
from imagesearch.server.vector_index import INT8, INT8_LEARN_SIZE
from tests.support.storage import storage_address
from tests.support.waiting import until

DIM = 8
LABELS = ("a", "b", "c")
K = 5
# IVF small enough to train within a test (20 vectors) and probing every list, so it is exact.
IVF_PARAMS = {"nlist": 4, "nprobe": 4, "train_size": 20}

Base = dict[str, NewImage]  # what the store should hold, by image id: the brute-force side


def make_spec(kind: str = FLAT, metric: Metric = L2, **params: int) -> CollectionSpec:
    """A spec for DIM-sized vectors; IVF gets IVF_PARAMS unless a test overrides them."""
    chosen = {**(IVF_PARAMS if kind == IVF else {}), **params}
    return CollectionSpec(
        name="c",
        extractor="none",
        extractor_version="1",
        metric=metric.name,
        dim=DIM,
        index_type=kind,
        **chosen,
    )


def create(tmp_path: Path, kind: str = FLAT, metric: Metric = L2, **params: int) -> Collection:
    """A new collection without an extractor (vectors only), in ``tmp_path / "c"``."""
    return Collection.create(tmp_path / "c", make_spec(kind, metric, **params), metric, None)


def reopen(collection: Collection) -> Collection:
    """Open the same directory again, as a restart does (the caller closed ``collection``)."""
    return Collection(collection.directory, collection.spec, collection.metric, None)


def rows(start: int, count: int) -> list[NewImage]:
    """Images ``img<start>``...: random vectors seeded by ``start`` (reproducible), labels cycling
    through LABELS so every label filter has something to find."""
    rng = np.random.default_rng(start)
    vectors = rng.normal(size=(count, DIM)).astype(np.float32)
    return [
        NewImage(
            id=f"img{n}", label=LABELS[n % len(LABELS)], vector=vectors[n - start], metadata={"n": str(n)}
        )
        for n in range(start, start + count)
    ]


def add(collection: Collection, base: Base, images: list[NewImage]) -> None:
    """Add to the collection and to the brute-force mirror."""
    collection.add(images)
    base.update((image.id, image) for image in images)


def remove(collection: Collection, base: Base, ids: Sequence[str]) -> None:
    """Remove from the collection and from the brute-force mirror."""
    assert collection.remove(ids) == len(ids)
    for image_id in ids:
        del base[image_id]


def expected_ids(
    base: Base, query: np.ndarray, k: int, metric: Metric, labels: Sequence[str] = (), exclude: str = ""
) -> list[str]:
    """Exact k-NN with NumPy: FAISS-L2 metrics rank by squared distance, the others by inner
    product, both over ``metric.prepare``d vectors (as the index stores them)."""
    ids = [i for i, image in base.items() if (not labels or image.label in labels) and i != exclude]
    if not ids:
        return []
    vectors = metric.prepare(np.stack([base[i].vector for i in ids]))
    prepared = metric.prepare(query.reshape(1, -1))[0]
    if metric.faiss_metric == L2.faiss_metric:
        keys = ((vectors - prepared) ** 2).sum(axis=1)
    else:
        keys = -(vectors @ prepared)
    return [ids[i] for i in np.argsort(keys, kind="stable")[:k]]


def queries(base: Base, seed: int, count: int = 6) -> list[np.ndarray]:
    """Random queries plus a few stored vectors (each of which must find itself)."""
    rng = np.random.default_rng(seed)
    stored = [base[i].vector for i in sorted(base)[:3]]
    return [*rng.normal(size=(count, DIM)).astype(np.float32), *stored]


def hit_ids(hits: list[Hit]) -> list[str]:
    """Hit ids best first: ranking is what the brute force comparison checks."""
    return [hit.id for hit in hits]


def assert_same_hits(actual: list[Hit], expected: list[Hit]) -> None:
    """Same images, in the same order, with the same scores up to float rounding: a batch of
    queries may be answered with one BLAS product, whose rounding differs from query-by-query."""
    assert [(h.id, h.label, h.metadata) for h in actual] == [(h.id, h.label, h.metadata) for h in expected]
    assert [h.score for h in actual] == pytest.approx([h.score for h in expected], rel=1e-5, abs=1e-6)
    assert [h.distance for h in actual] == pytest.approx([h.distance for h in expected], rel=1e-5, abs=1e-6)


def check_against_brute_force(
    collection: Collection, base: Base, seed: int, labels: Sequence[str] = ()
) -> None:
    """The store, the index and the brute force agree on size and on every query's top K."""
    assert collection.count() == len(base)
    assert collection.live_index().size == len(base)
    for query in queries(base, seed):
        hits = collection.search(query, K, labels)
        assert hit_ids(hits) == expected_ids(base, query, K, collection.metric, labels)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


# -- search agrees with brute force ------------------------------------------------------------


@pytest.mark.parametrize("metric", [L2, COSINE], ids=lambda m: m.name)
@pytest.mark.parametrize("kind", [FLAT, IVF, HNSW])
def test_add_search_remove_agree_with_brute_force(tmp_path: Path, kind: str, metric: Metric) -> None:
    collection = create(tmp_path, kind, metric)
    base: Base = {}
    rng = np.random.default_rng(11)
    for round_ in range(3):
        add(collection, base, rows(25 * round_, 25))
        remove(collection, base, sorted(rng.choice(sorted(base), size=8, replace=False).tolist()))
        check_against_brute_force(collection, base, seed=round_)
    assert collection.index_trained == (kind == IVF), "past train_size the IVF index is in use"
    collection.close(snapshot=False)


def test_int8_storage_rescores_exactly_and_survives_a_restart(tmp_path: Path) -> None:
    """int8 (cosine) searches float32 exactly until it learns its grid from the first
    INT8_LEARN_SIZE vectors; then hits are re-scored with the store's float32 vectors, so they
    match the brute force (ids, order and scores) through removals, label filters, batches and a
    reopen."""
    collection = create(tmp_path, FLAT, COSINE, storage=INT8)
    base: Base = {}
    add(collection, base, rows(0, 75))
    assert not collection.live_index().quantized and not collection.index_trained
    check_against_brute_force(collection, base, seed=1)
    add(collection, base, rows(75, INT8_LEARN_SIZE))
    assert collection.live_index().quantized and not collection.index_trained
    remove(collection, base, ["img3", "img30", "img44"])
    for labels in ((), ("a",), ("a", "c")):
        check_against_brute_force(collection, base, seed=2, labels=labels)
    query = queries(base, 3)[0]
    exact = brute_force_hits(base, query, COSINE)
    assert_same_hits(collection.search(query, K), exact)
    batch = collection.search_many(np.stack([query, query]), [2, K])
    assert_same_hits(batch[0], exact[:2])
    assert_same_hits(batch[1], exact)
    assert hit_ids(collection.search(query, 60)) == expected_ids(base, query, 60, COSINE)  # a large k
    collection.close()
    again = reopen(collection)
    assert again.live_index().quantized
    check_against_brute_force(again, base, seed=4)
    again.close(snapshot=False)


def int8_collection(tmp_path: Path, dim: int) -> Collection:
    spec = dataclasses.replace(make_spec(FLAT, COSINE, storage=INT8), dim=dim)
    return Collection.create(tmp_path / "c", spec, COSINE, None)


def test_int8_ranks_close_neighbours_as_float32_does(tmp_path: Path) -> None:
    """Vectors clustered tightly around one direction: on a fixed [-1, 1] grid their codes were
    nearly equal, the re-scored candidates nearly arbitrary (recall@10 0.2 in an outside test);
    on the grid learnt from the first vectors the hits are the brute force's."""
    dim = 192
    rng = np.random.default_rng(4)
    centre = rng.normal(size=dim)
    vectors = (centre + 0.1 * rng.normal(size=(1500, dim))).astype(np.float32)
    vectors[[100, 300, 500]] = rng.normal(size=(3, dim))  # odd ones among the first 1,000: outliers
    collection = int8_collection(tmp_path, dim)
    base: Base = {}
    add(collection, base, [NewImage(id=f"v{n}", label="", vector=v) for n, v in enumerate(vectors)])
    assert collection.live_index().quantized
    assert len(collection.live_index().outliers()) >= 3, "the odd ones widen no range"
    for query in (centre + 0.1 * rng.normal(size=(10, dim))).astype(np.float32):
        assert hit_ids(collection.search(query, 10)) == expected_ids(base, query, 10, COSINE)
    collection.close(snapshot=False)


def test_an_int8_vector_outside_the_learnt_grid_is_still_found(tmp_path: Path) -> None:
    """A later vector that uses a dimension the first ones left at zero is clipped in its code: it
    is kept as an outlier and re-scored by every search, also after a reopen (an outside test
    lost such vectors when the grid was first learnt)."""
    dim = 32
    rng = np.random.default_rng(6)
    first = rng.normal(size=(INT8_LEARN_SIZE, dim)).astype(np.float32)
    first[:, 0] = 0.0
    later = np.zeros((1, dim), np.float32)
    later[0, 0], later[0, 1] = 1.0, 0.05
    collection = int8_collection(tmp_path, dim)
    base: Base = {}
    add(collection, base, [NewImage(id=f"v{n}", label="", vector=v) for n, v in enumerate(first)])
    add(collection, base, [NewImage(id="later", label="x", vector=later[0])])
    index = collection.live_index()
    assert index.quantized and len(index.outliers()) == 1
    for labels in ((), ("x",)):
        assert hit_ids(collection.search(later[0], 3, labels))[0] == "later"
    for override in (INNER_PRODUCT, L2):  # compares vectors: an outlier's own, not its clipped code
        assert hit_ids(collection.search(later[0], 3, metric_override=override))[0] == "later"
    collection.close()
    again = reopen(collection)
    assert len(again.live_index().outliers()) == 1, "found again from the codes"
    assert hit_ids(again.search(later[0], 3))[0] == "later"
    remove(again, base, ["later"])
    assert len(again.live_index().outliers()) == 0
    again.close(snapshot=False)


def test_an_l2_override_ranks_near_duplicates_exactly(tmp_path: Path) -> None:
    """A metric override is an exact search: a stored vector lies at 0 from itself and near-copies
    at their true distances, in order (FAISS's float32 BLAS expansion put them 1e-2 apart here)."""
    collection = create(tmp_path, FLAT, INNER_PRODUCT)
    rng = np.random.default_rng(12)
    centre = (100 * rng.normal(size=DIM)).astype(np.float32)
    step = rng.normal(size=DIM).astype(np.float32)
    step /= np.linalg.norm(step)
    images = [NewImage(id="same", label="", vector=centre), *rows(0, 40)]
    images += [NewImage(id=f"near{d}", label="", vector=centre + d * step) for d in (0.02, 0.03)]
    collection.add(images)
    hits = collection.search(centre, 3, metric_override=L2)
    assert [hit.id for hit in hits] == ["same", "near0.02", "near0.03"]
    assert [hit.distance for hit in hits] == pytest.approx([0.0, 0.02, 0.03], abs=2e-4)
    collection.close(snapshot=False)


def test_int8_re_scoring_does_not_hold_writers_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-scoring reads float32 vectors from the store after the index lock is released: an add
    completes while a search is still re-scoring (a large top_k re-scores many candidates)."""
    collection = create(tmp_path, FLAT, COSINE, storage=INT8)
    add(collection, {}, rows(0, INT8_LEARN_SIZE))
    assert collection.live_index().quantized
    rescoring, added = threading.Event(), threading.Event()
    read = CollectionStore.vectors_by_row_id

    def slow_read(store: CollectionStore, row_ids: Sequence[int]) -> dict[int, np.ndarray]:
        rescoring.set()
        assert added.wait(10), "the add waited for the re-scoring"
        return read(store, row_ids)

    monkeypatch.setattr(CollectionStore, "vectors_by_row_id", slow_read)
    with ThreadPoolExecutor(1) as pool:
        searching = pool.submit(collection.search, rows(0, 1)[0].vector, 5)
        assert rescoring.wait(10)
        collection.add(rows(INT8_LEARN_SIZE, 3))
        added.set()
        assert hit_ids(searching.result(timeout=10))[0] == "img0"
    collection.close(snapshot=False)


def test_int8_storage_is_for_cosine_collections() -> None:
    with pytest.raises(InvalidArgument, match="int8 is for cosine collections") as caught:
        check_index_params(make_spec(FLAT, L2, storage=INT8), Limits())
    assert caught.value.field == "collection.storage"


def brute_force_hits(base: Base, query: np.ndarray, metric: Metric) -> list[Hit]:
    """The K best hits a float32 flat collection gives, from NumPy: ids, then distances by the metric."""
    ids = expected_ids(base, query, K, metric)
    vectors = metric.prepare(np.stack([base[i].vector for i in ids]))
    prepared = metric.prepare(query.reshape(1, -1))[0]
    if metric.faiss_metric == L2.faiss_metric:
        raw = ((vectors - prepared) ** 2).sum(axis=1)
    else:
        raw = vectors @ prepared
    distances = metric.to_distance(raw.astype(np.float32))
    scores = metric.to_score(distances)
    return [
        Hit(i, float(score), float(distance), base[i].label, base[i].metadata, 0)
        for i, distance, score in zip(ids, distances, scores, strict=True)
    ]


def test_hits_carry_the_rows_label_metadata_distance_and_score(tmp_path: Path) -> None:
    collection = create(tmp_path)
    base: Base = {}
    add(collection, base, rows(0, 10))
    query = np.random.default_rng(3).normal(size=DIM).astype(np.float32)
    for hit in collection.search(query, 3):
        image = base[hit.id]
        assert (hit.label, hit.metadata) == (image.label, image.metadata)
        assert hit.distance == pytest.approx(float(np.linalg.norm(image.vector - query)), rel=1e-4)
        assert hit.score == pytest.approx(1 / (1 + hit.distance))
    assert len(collection.search(query, 50)) == 10, "k past the collection's size returns everything"
    collection.close(snapshot=False)


@pytest.mark.parametrize("kind", [FLAT, IVF, HNSW])
def test_label_filters(tmp_path: Path, kind: str) -> None:
    collection = create(tmp_path, kind)
    base: Base = {}
    add(collection, base, rows(0, 60))
    remove(collection, base, ["img0", "img3", "img7", "img13"])  # tombstones too, for HNSW
    for labels in (["a"], ["a", "c"], ["b"]):
        check_against_brute_force(collection, base, seed=5, labels=labels)
    assert collection.search(base["img1"].vector, K, ["none"]) == []
    collection.close(snapshot=False)


@pytest.mark.parametrize("kind", [IVF, HNSW])
def test_a_rare_label_is_searched_exactly_on_approximate_indexes(tmp_path: Path, kind: str) -> None:
    """Filtering inside HNSW's walk or IVF's probed lists misses most images of a rare label; a
    small label set is compared exactly instead, so every one of them is found, in order."""
    params = {"nlist": 32, "nprobe": 1, "train_size": 1000} if kind == IVF else {"hnsw_m": 8, "ef_search": 16}
    collection = create(tmp_path, kind, **params)
    base: Base = {}
    images = rows(0, 2000)
    rare = {n: dataclasses.replace(images[n], label="rare") for n in (17, 900, 1999)}
    add(collection, base, [rare.get(n, image) for n, image in enumerate(images)])
    assert collection.index_trained == (kind == IVF)
    for query in queries(base, 9, count=10):
        hits = collection.search(query, 3, labels=["rare"])
        assert hit_ids(hits) == expected_ids(base, query, 3, collection.metric, ["rare"])
    collection.close(snapshot=False)


@pytest.mark.parametrize("kind", [FLAT, IVF, HNSW])
def test_exclude_row_id_drops_the_query_image_and_still_returns_k(tmp_path: Path, kind: str) -> None:
    collection = create(tmp_path, kind)
    base: Base = {}
    add(collection, base, rows(0, 40))
    row_id, vector = collection.vector_of("img9")
    assert hit_ids(collection.search(vector, K))[0] == "img9"
    hits = collection.search(vector, K, exclude_row_id=row_id)
    assert hit_ids(hits) == expected_ids(base, vector, K, L2, exclude="img9")
    collection.close(snapshot=False)


@pytest.mark.parametrize("kind", [FLAT, IVF, HNSW])
def test_search_many_gives_each_query_what_it_gets_alone(tmp_path: Path, kind: str) -> None:
    """One index call for several queries, each cut to its own k and exclusion (HNSW: equal k,
    since its beam width follows k; the engine only batches those together)."""
    collection = create(tmp_path, kind)
    base: Base = {}
    add(collection, base, rows(0, 40))
    remove(collection, base, ["img5", "img6"])
    stored = collection.vector_of("img7")
    batch = np.stack([*np.random.default_rng(1).normal(size=(3, DIM)).astype(np.float32), stored[1]])
    ks = [K] * 4 if kind == HNSW else [1, 3, K, 2]
    excludes = [None, None, None, stored[0]]
    for labels in ((), ("a", "b")):
        together = collection.search_many(batch, ks, labels, exclude_row_ids=excludes)
        alone = [
            collection.search(query, k, labels, exclude_row_id=exclude)
            for query, k, exclude in zip(batch, ks, excludes, strict=True)
        ]
        for batched, single in zip(together, alone, strict=True):
            assert_same_hits(batched, single)
        assert [len(hits) for hits in together] == ks
        assert "img7" not in hit_ids(together[3])
    assert collection.search_many(batch, ks, ["none"]) == [[], [], [], []]
    collection.close(snapshot=False)


@pytest.mark.parametrize(
    ("own", "override"),
    [(L2, COSINE), (L2, INNER_PRODUCT), (COSINE, L2), (INNER_PRODUCT, L2)],
    ids=lambda m: m.name,
)
def test_metric_override_on_flat_is_an_exact_search_in_the_collections_space(
    tmp_path: Path, own: Metric, override: Metric
) -> None:
    """Stored vectors went through the collection metric's prepare (cosine: normalised), so the
    override ranks those prepared vectors, with the query prepared the same way."""
    collection = create(tmp_path, FLAT, own)
    base: Base = {}
    add(collection, base, rows(0, 30))
    remove(collection, base, ["img4", "img5"])
    as_stored = {
        i: dataclasses.replace(image, vector=own.prepare(image.vector[None])[0]) for i, image in base.items()
    }
    for query in queries(base, seed=2):
        prepared = own.prepare(query[None])[0]
        for labels in ((), ("b",)):
            hits = collection.search(query, K, labels, metric_override=override)
            assert hit_ids(hits) == expected_ids(as_stored, prepared, K, override, labels)
            wanted = [raw_distance(override, as_stored[h.id].vector, prepared) for h in hits]
            assert [h.distance for h in hits] == pytest.approx(wanted, rel=1e-4, abs=1e-5)
    collection.close(snapshot=False)


def raw_distance(metric: Metric, stored: np.ndarray, query: np.ndarray) -> float:
    """The distance ``metric`` reports between a stored vector and a query, both as the collection
    prepared them: rankings alone cannot tell a query normalised twice from one normalised once."""
    a, b = metric.prepare(stored[None])[0], metric.prepare(query[None])[0]
    faiss_value = ((a - b) ** 2).sum() if metric.faiss_metric == L2.faiss_metric else a @ b
    return float(metric.to_distance(np.array([faiss_value], dtype=np.float32))[0])


@pytest.mark.parametrize("kind", [IVF, HNSW])
def test_metric_override_needs_a_flat_index(tmp_path: Path, kind: str) -> None:
    collection = create(tmp_path, kind)
    add(collection, {}, rows(0, 25))
    with pytest.raises(FailedPrecondition) as caught:
        collection.search(np.zeros(DIM, np.float32), K, metric_override=COSINE)
    assert caught.value.reason == "METRIC_OVERRIDE_UNSUPPORTED" and caught.value.field == "metric"
    collection.close(snapshot=False)


# -- snapshots, recovery, compaction -----------------------------------------------------------


def search_all(collection: Collection, base: Base) -> list[list[tuple[str, float]]]:
    """Every query's (id, rounded score) list: what two indexes over the same rows must share."""
    return [[(h.id, round(h.score, 4)) for h in collection.search(q, K)] for q in queries(base, seed=9)]


@pytest.mark.parametrize("kind", [FLAT, IVF, HNSW])
def test_reopen_loads_the_snapshot_and_replays_the_tail(tmp_path: Path, kind: str) -> None:
    collection = create(tmp_path, kind)
    base: Base = {}
    add(collection, base, rows(0, 30))
    remove(collection, base, ["img1", "img2", "img3", "img4", "img5"])
    collection.snapshot()
    assert collection.pending_ops() == 0 and (collection.directory / SNAPSHOT_FILE).exists()
    assert collection.store.removals_after(0) == [], "the snapshot covers them: the log is pruned"
    add(collection, base, rows(30, 15))  # 15 ops after the snapshot...
    remove(collection, base, ["img6", "img20", "img31", "img40", "img44"])  # ...and 5 more, old and new rows
    assert collection.pending_ops() == 20
    collection.close(snapshot=False)

    loaded = reopen(collection)
    assert loaded.pending_ops() == 20, "loaded from the snapshot (a rebuild would owe all 55 ops)"
    check_against_brute_force(loaded, base, seed=4)
    assert loaded.index_trained == (kind == IVF)
    from_snapshot = search_all(loaded, base)
    loaded.close(snapshot=False)

    (collection.directory / SNAPSHOT_FILE).unlink()
    rebuilt = reopen(collection)
    assert rebuilt.pending_ops() == 55
    assert search_all(rebuilt, base) == from_snapshot
    rebuilt.close(snapshot=False)


def test_a_store_restored_from_an_older_copy_is_not_served_with_a_newer_snapshot(tmp_path: Path) -> None:
    """Restoring only store.sqlite3 from a backup leaves a snapshot of later writes beside it: that
    snapshot is refused (it covers writes the store lacks) and the index is rebuilt from the store."""
    collection = create(tmp_path)
    base: Base = {}
    add(collection, base, rows(0, 10))
    collection.close()
    backup = tmp_path / "backup.sqlite3"
    shutil.copy(collection.directory / STORE_FILE, backup)
    later = reopen(collection)
    later.add(rows(100, 5))
    later.close()  # a snapshot of 15 writes
    for leftover in collection.directory.glob(STORE_FILE + "-*"):  # WAL and shared memory, if any
        leftover.unlink()
    shutil.copy(backup, collection.directory / STORE_FILE)
    restored = reopen(collection)
    assert restored.live_index().size == restored.count() == 10
    check_against_brute_force(restored, base, seed=6)
    # The refused snapshot is gone: left on disk, it was taken back once new writes brought the
    # store to the writes it covers, and served the old rows' vectors under the new rows' ids, for
    # good (an outside test: a restore as documented, adds, then a kill -9).
    assert not (collection.directory / SNAPSHOT_FILE).exists()
    add(restored, base, rows(200, 5))  # other rows, as many writes as the refused snapshot covered
    restored.close(snapshot=False)  # a crash: no snapshot of them
    again = reopen(collection)
    check_against_brute_force(again, base, seed=7)
    again.close(snapshot=False)


def test_a_snapshot_of_another_history_of_the_store_is_refused(tmp_path: Path) -> None:
    """Two backups of one store, restored in turn: the snapshot written after the first restore
    (and new writes) covered as many writes as the second backup held, with the same identity, and
    was taken for its own: other images' vectors under the ids, for good (an outside test). Each
    change carries a random token the snapshot records; another history has other tokens."""
    collection = create(tmp_path)
    base: Base = {}
    add(collection, base, rows(0, 10))
    collection.close()
    old, new = tmp_path / "old.sqlite3", tmp_path / "new.sqlite3"
    shutil.copy(collection.directory / STORE_FILE, old)
    later = reopen(collection)
    add(later, base, rows(100, 5))  # the history the second backup holds: 15 writes
    later.close()
    shutil.copy(collection.directory / STORE_FILE, new)

    def restore(backup: Path) -> Collection:
        for leftover in collection.directory.glob(STORE_FILE + "-*"):
            leftover.unlink()
        shutil.copy(backup, collection.directory / STORE_FILE)
        return reopen(collection)

    other = restore(old)
    other.add(rows(200, 5))  # another history: 15 writes too
    other.close()  # snapshots them
    assert (collection.directory / SNAPSHOT_FILE).exists()
    restored = restore(new)
    assert restored.pending_ops() == 15, "rebuilt from the store, not loaded from that snapshot"
    check_against_brute_force(restored, base, seed=8)
    restored.close()  # a snapshot of its own, which the next start takes
    again = reopen(collection)
    assert again.pending_ops() == 0
    check_against_brute_force(again, base, seed=9)
    again.close(snapshot=False)


@pytest.mark.parametrize("kind", [FLAT, IVF, HNSW])
def test_a_corrupt_snapshot_is_rebuilt_from_the_store(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    collection = create(tmp_path, kind)
    base: Base = {}
    add(collection, base, rows(0, 30))
    remove(collection, base, ["img0", "img10", "img20", "img29"])
    before = search_all(collection, base)
    collection.close()  # writes the snapshot
    path = collection.directory / SNAPSHOT_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="imagesearch.server.collection"):
        rebuilt = reopen(collection)
    assert "snapshot unusable" in caplog.text
    assert rebuilt.pending_ops() == 34, "rebuilt from seq 0, never an empty index"
    check_against_brute_force(rebuilt, base, seed=6)
    assert search_all(rebuilt, base) == before
    rebuilt.close()  # writes a good snapshot again
    healed = reopen(collection)
    assert healed.pending_ops() == 0 and search_all(healed, base) == before
    healed.close(snapshot=False)


def test_hnsw_past_the_compaction_threshold_is_rebuilt_without_tombstones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    collection = create(tmp_path, HNSW, hnsw_m=8)
    base: Base = {}
    add(collection, base, rows(0, 400))
    spared = np.random.default_rng(0).choice(np.arange(2, 400), size=298, replace=False)
    doomed = [f"img{n}" for n in sorted(set(range(2, 400)) - set(spared.tolist()))]
    assert len(doomed) == 100
    remove(collection, base, doomed)
    index = collection.live_index()
    assert len(index.tombstones) == 100 and index.faiss_index.ntotal == 400, "at the threshold: kept"
    check_against_brute_force(collection, base, seed=7)
    # 101 > 400 // 4: rebuilt while searches go on with the old graph (under the write lock, they
    # waited for every vector to be inserted again)
    rebuild = collection_module.Collection._rebuild
    searched: list[list[Hit]] = []

    def searched_meanwhile(self: Collection, spec: object, upto_seq: int | None = None) -> object:
        done = threading.Event()  # a daemon thread: under the lock, it would wait for the rebuild

        def search() -> None:
            searched.append(collection.search(rows(0, 1)[0].vector, K))
            done.set()

        threading.Thread(target=search, daemon=True).start()
        assert done.wait(timeout=10), "the search waited for the rebuild"
        return rebuild(self, spec, upto_seq)

    monkeypatch.setattr(collection_module.Collection, "_rebuild", searched_meanwhile)
    remove(collection, base, ["img1"])
    monkeypatch.undo()
    assert len(searched) == 1 and searched[0][0].id == "img0"
    index = collection.live_index()
    assert len(index.tombstones) == 0 and index.faiss_index.ntotal == index.size == 299
    check_against_brute_force(collection, base, seed=8)
    collection.close(snapshot=False)


def test_a_failed_hnsw_compaction_keeps_the_tombstoned_graph_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The removal is committed before the rebuild: its failure must not fail the call, and the
    graph with tombstones still answers rightly."""
    collection = create(tmp_path, HNSW, hnsw_m=8)
    base: Base = {}
    add(collection, base, rows(0, 40))

    def refused(self: Collection, spec: object, upto_seq: int | None = None) -> object:
        raise MemoryError("no room for a second graph")

    monkeypatch.setattr(collection_module.Collection, "_rebuild", refused)
    with caplog.at_level(logging.ERROR):
        remove(collection, base, [f"img{n}" for n in range(11)])  # 11 > 40 // 4
    monkeypatch.undo()
    assert "compacting its HNSW index failed" in caplog.text
    assert len(collection.live_index().tombstones) == 11
    check_against_brute_force(collection, base, seed=9)
    collection.close(snapshot=False)


def learning(tmp_path: Path, storage: str, nlist: int, train_size: int) -> tuple[Collection, int]:
    """A collection whose index learns from its first rows (IVF, nprobe 1; or int8), and how many."""
    if storage == INT8:
        return create(tmp_path, FLAT, COSINE, storage=INT8), INT8_LEARN_SIZE
    return create(tmp_path, IVF, nlist=nlist, nprobe=1, train_size=train_size), train_size


@pytest.mark.parametrize("storage", ["ivf", INT8])
def test_a_crash_replays_removals_between_adds_so_training_sees_what_it_saw_live(
    tmp_path: Path, storage: str
) -> None:
    """Replaying every add after the snapshot before any removal made a crashed collection cross
    its training size on vectors removed before it ever got there: an IVF index trained although
    it never held train_size vectors, an int8 grid learnt from removed outliers (an outside test:
    recall collapsed after a kill -9, for good)."""
    collection, size = learning(tmp_path, storage, nlist=4, train_size=1000)
    base: Base = {}
    add(collection, base, rows(0, size - 100))
    collection.snapshot()
    remove(collection, base, [f"img{n}" for n in range(100)])
    add(collection, base, rows(size, 150))  # size - 50 live: never trained
    before = search_all(collection, base)
    assert not collection.live_index().quantized and not collection.index_trained
    collection.close(snapshot=False)  # as a crash leaves it
    again = reopen(collection)
    assert not again.live_index().quantized and not again.index_trained
    assert search_all(again, base) == before
    again.close(snapshot=False)


@pytest.mark.parametrize("storage", ["ivf", INT8])
@pytest.mark.parametrize("snapshot", ["before training", "none"])
def test_what_the_index_learnt_outlives_a_crash_after_its_first_rows_were_removed(
    tmp_path: Path, storage: str, snapshot: str
) -> None:
    """IVF's lists and int8's grid are learnt from the first rows; a rebuild after a crash learnt
    them again from the store, where the rows removed since were gone: other lists, other
    answers than the index the crash lost. The store now keeps what was learnt."""
    collection, size = learning(tmp_path, storage, nlist=8, train_size=400)
    base: Base = {}
    add(collection, base, rows(0, size - 100))
    if snapshot == "before training":
        collection.snapshot()
    add(collection, base, rows(size, 300))  # trains
    learnt = collection.live_index().learnt
    assert learnt is not None and np.array_equal(collection.store.learnt(), learnt)
    remove(collection, base, [f"img{n}" for n in range(150)])  # half the training rows gone
    before = search_all(collection, base)
    collection.close(snapshot=False)  # as a crash leaves it
    if snapshot == "none":
        (collection.directory / SNAPSHOT_FILE).unlink(missing_ok=True)
    again = reopen(collection)
    assert np.array_equal(again.live_index().learnt, learnt)
    assert search_all(again, base) == before
    again.close(snapshot=False)


def test_hnsw_removals_replayed_after_a_crash_are_compacted(tmp_path: Path) -> None:
    """Removals made after the last snapshot come back as tombstones when the snapshot is loaded
    and the store's tail replayed: the collection must compact them then too (an outside test: a
    top_k of 200 returned far fewer than the 200 images left after a kill -9)."""
    collection = create(tmp_path, HNSW, hnsw_m=8, ef_search=16)
    base: Base = {}
    add(collection, base, rows(0, 800))
    collection.snapshot()
    remove(collection, base, [f"img{n}" for n in range(200, 800)])
    collection.close(snapshot=False)  # as a crash leaves it: the snapshot predates the removals
    again = reopen(collection)
    assert again.live_index().tombstones.size == 0 and again.live_index().size == 200
    queries = np.stack([base[f"img{n}"].vector for n in range(0, 200, 10)])
    for hits in again.search_many(queries, [200] * len(queries)):
        assert sorted(hit.id for hit in hits) == sorted(base)
    add(again, base, rows(800, 300))  # past the quarter again, then adds bring it back under
    again.snapshot()
    remove(again, base, [f"img{n}" for n in range(800, 950)])
    assert again.live_index().tombstones.size == 0, "compacted live"
    add(again, base, rows(1100, 400))
    again.close(snapshot=False)
    again = reopen(again)
    assert again.live_index().tombstones.size == 0, "and after the crash, though the adds replayed after it"
    again.close(snapshot=False)


def test_a_small_hnsw_collection_mostly_removed_still_returns_every_image_it_holds(tmp_path: Path) -> None:
    """Tombstones take room in HNSW's beam: 600 of 800 removed, with a narrow beam, returned as
    fewer than the 200 left for a top_k of 200 (an outside test), before small collections
    were compacted too."""
    collection = create(tmp_path, HNSW, hnsw_m=8, ef_search=16)
    base: Base = {}
    add(collection, base, rows(0, 800))
    remove(collection, base, [f"img{n}" for n in range(200, 800)])
    assert collection.live_index().tombstones.size == 0
    queries = np.stack([base[f"img{n}"].vector for n in range(0, 200, 10)])
    for hits in collection.search_many(queries, [200] * len(queries)):
        assert sorted(hit.id for hit in hits) == sorted(base)
    collection.close(snapshot=False)


def test_removed_hnsw_vectors_are_never_returned(tmp_path: Path) -> None:
    """Query with the removed vectors themselves: the tombstone filter is all that hides them."""
    collection = create(tmp_path, HNSW)
    base: Base = {}
    add(collection, base, rows(0, 50))
    gone = {i: base[i] for i in ["img2", "img12", "img22", "img32"]}
    remove(collection, base, list(gone))
    for image in gone.values():
        assert hit_ids(collection.search(image.vector, K)) == expected_ids(base, image.vector, K, L2)
    collection.close(snapshot=False)


# -- states ------------------------------------------------------------------------------------


def test_a_spec_that_no_longer_fits_its_vectors_opens_read_only(tmp_path: Path) -> None:
    collection = create(tmp_path)
    add(collection, {}, rows(0, 5))
    collection.close()
    store = CollectionStore(collection.directory / STORE_FILE)
    store.set_meta("spec", dataclasses.replace(collection.spec, dim=DIM + 1).to_json())
    store.close()
    (collection.directory / SNAPSHOT_FILE).unlink()

    broken = Collection(collection.directory, Collection.read_spec(collection.directory), L2, None)
    assert broken.spec.dim == DIM + 1
    for refused in (
        broken.live_index,
        broken.check_serving,
        lambda: broken.search(np.zeros(DIM + 1, np.float32), K),
        lambda: broken.add(rows(5, 1)),
        lambda: broken.remove(["img0"]),
    ):
        with pytest.raises(FailedPrecondition) as caught:
            refused()
        assert caught.value.reason == "INDEX_UNAVAILABLE" and "read-only" in caught.value.message
    assert broken.get("img0").label == "a"
    assert [row.id for row in broken.page(0, 10)] == [f"img{n}" for n in range(5)]
    assert broken.count() == 5 and broken.count("b") == 2
    info = broken.info()
    assert info.read_only and "could not be built" in info.state_reason and not info.index_trained
    broken.snapshot()
    assert not (collection.directory / SNAPSHOT_FILE).exists()
    broken.close()


def test_searches_do_not_wait_for_an_adds_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's fsync'd commit runs outside the index lock: a search answers while an add is
    still committing, and sees the new rows once the add has returned."""
    collection = create(tmp_path)
    base: Base = {}
    add(collection, base, rows(0, 20))
    committing, searched = threading.Event(), threading.Event()
    insert = CollectionStore.insert

    def slow_insert(store: CollectionStore, images: Sequence[NewImage]):
        committed = insert(store, images)  # committed, not yet in the index
        committing.set()
        assert searched.wait(10), "the search waited for the commit"
        return committed

    monkeypatch.setattr(CollectionStore, "insert", slow_insert)
    new = rows(100, 5)
    with ThreadPoolExecutor(1) as pool:
        adding = pool.submit(collection.add, new)
        assert committing.wait(10)
        hits = collection.search(new[0].vector, 3)
        # a label filter reads the store, which may hold rows the index does not have yet
        labelled = collection.search(new[0].vector, 3, labels=[new[0].label])
        searched.set()
        adding.result(timeout=10)
    assert new[0].id not in [hit.id for hit in hits + labelled]  # not yet in the index while committing
    assert [hit.id for hit in labelled] == expected_ids(base, new[0].vector, 3, L2, [new[0].label])
    assert collection.search(new[0].vector, 1)[0].id == new[0].id
    collection.close()


def test_searches_do_not_wait_for_a_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot holds writers back (the index must hold still) but never searches, even with a
    writer queued behind it."""
    collection = create(tmp_path)
    add(collection, {}, rows(0, 20))
    writing, searched = threading.Event(), threading.Event()
    write = collection_module.write_snapshot

    def slow_write(*args: object) -> None:
        writing.set()
        assert searched.wait(10), "the search waited for the snapshot"
        write(*args)

    monkeypatch.setattr(collection_module, "write_snapshot", slow_write)
    with ThreadPoolExecutor(2) as pool:
        snapshotting = pool.submit(collection.snapshot)
        assert writing.wait(10)
        adding = pool.submit(collection.add, rows(100, 5))  # queues behind the snapshot
        time.sleep(0.05)
        assert not adding.done()
        assert collection.search(rows(0, 1)[0].vector, 1)[0].id == "img0"
        searched.set()
        snapshotting.result(timeout=10)
        adding.result(timeout=10)
    collection.close()


def test_concurrent_adds_reach_the_index_in_commit_order(tmp_path: Path) -> None:
    """Many adders at once: every committed row is searchable, and a reopened collection (snapshot
    plus replay) holds exactly the same vectors."""
    collection = create(tmp_path)
    batches = [rows(start, 10) for start in range(0, 400, 10)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(collection.add, batches))
    assert collection.index is not None and collection.index.size == collection.count() == 400
    for batch in batches[::7]:
        assert collection.search(batch[3].vector, 1)[0].id == batch[3].id
    collection.close()
    again = reopen(collection)
    assert again.index is not None and again.index.size == 400
    assert again.search(batches[5][2].vector, 1)[0].id == batches[5][2].id
    again.close()


def _index_update_held(
    monkeypatch: pytest.MonkeyPatch, fail: bool
) -> tuple[threading.Event, threading.Event]:
    """Make the next FAISS add (``VectorIndex.add``) signal ``updating``, wait for ``release``,
    then fail (``fail``) or go on; later adds run as usual."""
    updating, release = threading.Event(), threading.Event()
    original = collection_module.VectorIndex.add
    calls = []

    def held(index, row_ids, *args):
        calls.append(len(row_ids))
        if len(calls) == 1:
            updating.set()
            assert release.wait(10)
            if fail:
                raise RuntimeError("FAISS refused the add")
        return original(index, row_ids, *args)

    monkeypatch.setattr(collection_module.VectorIndex, "add", held)
    return updating, release


@contextmanager
def _an_add_held_in_its_index_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: bool = False
) -> Iterator[tuple[Collection, ThreadPoolExecutor, Callable[[], None]]]:
    """A collection of img0..img9 and an add of img10..img14, committed and held in its FAISS add
    until ``release()`` (then failing, with ``fail``). Yields the collection, a pool for calls made
    meanwhile and ``release``; the held add has returned at exit."""
    collection = create(tmp_path)
    add(collection, {}, rows(0, 10))
    updating, released = _index_update_held(monkeypatch, fail)
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(collection.add, rows(10, 5))
        assert updating.wait(10)
        yield collection, pool, released.set
        held.result(timeout=10)


def _committed(collection: Collection, count: int) -> bool:
    """Wait (up to 10 s) until the store holds ``count`` rows: committed, whatever the index has."""
    deadline = time.monotonic() + 10
    while collection.store.count() < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return collection.store.count() == count


def test_the_next_add_commits_while_one_updates_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An add lets the store's writer go before its FAISS add, so the next add's fsync'd commit
    overlaps it; the index still takes them in commit order."""
    with _an_add_held_in_its_index_update(tmp_path, monkeypatch) as (collection, pool, release):
        second = pool.submit(collection.add, rows(20, 5))
        assert _committed(collection, 20) and not second.done(), "committed, waiting for its index turn"
        release()
        second.result(timeout=10)
    assert collection.index is not None and collection.index.size == 20
    assert [collection.search(r.vector, 1)[0].id for r in rows(20, 5)] == [f"img{n}" for n in range(20, 25)]
    collection.close()


def test_a_failed_index_update_rebuilds_up_to_its_own_commit_while_later_adds_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The rebuild after FAISS refuses an add reads the store, which by then may hold a later add
    that has committed and adds its own rows next: rebuilt past it, those rows would be in the
    index twice."""
    with (
        caplog.at_level(logging.ERROR),
        _an_add_held_in_its_index_update(tmp_path, monkeypatch, fail=True) as (collection, pool, release),
    ):
        second = pool.submit(collection.add, rows(20, 5))
        assert _committed(collection, 20)
        release()
        second.result(timeout=10)
    assert "index update failed" in caplog.text
    assert collection.index is not None and collection.index.size == collection.count() == 20
    found = [collection.search(r.vector, 2) for r in rows(10, 5) + rows(20, 5)]
    assert [hits[0].id for hits in found] == [f"img{n}" for n in (*range(10, 15), *range(20, 25))]
    assert all(hits[0].id != hits[1].id for hits in found), "no row twice in the index"
    collection.close()


def test_a_removal_waits_for_an_index_update_still_to_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal of rows an add has committed but not yet put in the index waits for that add:
    otherwise it would remove them from the index first and the add would put them back."""
    with _an_add_held_in_its_index_update(tmp_path, monkeypatch) as (collection, pool, release):
        removing = pool.submit(collection.remove, ["img10", "img11"])
        time.sleep(0.05)
        assert not removing.done()
        release()
        assert removing.result(timeout=10) == 2
    assert collection.index is not None and collection.index.size == collection.count() == 13
    assert {hit.id for hit in collection.search(rows(10, 1)[0].vector, 13)}.isdisjoint({"img10", "img11"})
    collection.close()


def test_an_hnsw_add_is_applied_in_pieces_and_searches_go_between_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HNSW inserts are slow (an add of 256 held searches for a quarter of a second at 20,000 x 1280): an add is
    applied in pieces sized from the last one's time per vector, and the searches waiting go
    between them. The index ends as one add would leave it: every row once, after a restart too."""
    monkeypatch.setattr(vector_index_module, "HNSW_PIECE_S", 1e-9)  # pieces of HNSW_MIN_PIECE
    collection = create(tmp_path, HNSW, hnsw_m=8, ef_search=64)
    base: Base = {}
    add(collection, base, rows(0, 20))  # its time per vector sizes the next add's pieces
    events: list[str] = []
    searching: list[Future] = []
    original = collection_module.VectorIndex.add
    pool = ThreadPoolExecutor(1)

    def piece(index: vector_index_module.VectorIndex, ids: np.ndarray, *args: object) -> None:
        events.append(f"piece of {len(ids)}")
        original(index, ids, *args)
        if not searching:  # a search arrives during the first piece, and waits for the lock
            searching.append(
                pool.submit(
                    lambda: events.append(f"search: {len(collection.search(rows(0, 1)[0].vector, K))}")
                )
            )
            assert until(lambda: collection.lock._readers_waiting == 1)

    monkeypatch.setattr(collection_module.VectorIndex, "add", piece)
    add(collection, base, rows(20, 40))
    searching[0].result(timeout=10)
    pool.shutdown()
    size = vector_index_module.HNSW_MIN_PIECE
    assert events == [f"piece of {size}", f"search: {K}", f"piece of {size}", f"piece of {40 - 2 * size}"]
    monkeypatch.undo()
    check_against_brute_force(collection, base, seed=3)
    collection.close()
    again = reopen(collection)
    assert again.index is not None and again.index.size == 60
    check_against_brute_force(again, base, seed=3)
    again.close()


def test_hnsw_adds_in_pieces_removals_and_searches_at_once_end_as_brute_force_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces of two vectors, readers let in between every two, under four searching threads, an
    adding one and a removing one: no error, every search whole (K hits, best first, none a row
    removed before it began), and the end agrees with brute force, after a restart too."""
    monkeypatch.setattr(vector_index_module, "HNSW_PIECE_S", 1e-9)
    monkeypatch.setattr(vector_index_module, "HNSW_MIN_PIECE", 2)
    collection = create(tmp_path, HNSW, hnsw_m=8, ef_search=64)
    base: Base = {}
    add(collection, base, rows(0, 40))
    removed: set[str] = set()
    stop = threading.Event()

    def search(seed: int) -> int:
        count = 0
        while not stop.is_set():
            gone = set(removed)
            hits = collection.search(rows(1000 + seed * 100 + count % 50, 1)[0].vector, K)
            assert len(hits) == K and not gone & {hit.id for hit in hits}
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            count += 1
        return count

    def write() -> None:
        for start in range(40, 200, 20):
            add(collection, base, rows(start, 20))
            doomed = [f"img{n}" for n in range(start - 40, start - 30)]
            remove(collection, base, doomed)
            removed.update(doomed)
        stop.set()

    with ThreadPoolExecutor(5) as pool:
        searches = [pool.submit(search, seed) for seed in range(4)]
        pool.submit(write).result(timeout=60)
        assert all(done.result(timeout=10) > 0 for done in searches)
    check_against_brute_force(collection, base, seed=7)
    collection.close()
    again = reopen(collection)
    check_against_brute_force(again, base, seed=7)
    again.close()


def test_a_failed_hnsw_piece_is_rebuilt_with_the_whole_add_and_the_rest_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The rebuild after a refused piece holds every row of the add: the pieces after it must not
    add theirs a second time."""
    monkeypatch.setattr(vector_index_module, "HNSW_PIECE_S", 1e-9)  # pieces of HNSW_MIN_PIECE
    collection = create(tmp_path, HNSW, hnsw_m=8, ef_search=64)
    base: Base = {}
    add(collection, base, rows(0, 20))
    original = collection_module.VectorIndex.add
    pieces: list[int] = []

    def second_fails(index: vector_index_module.VectorIndex, ids: np.ndarray, *args: object) -> None:
        pieces.append(len(ids))
        if len(pieces) == 2:
            raise RuntimeError("FAISS refused the piece")
        original(index, ids, *args)

    monkeypatch.setattr(collection_module.VectorIndex, "add", second_fails)
    with caplog.at_level(logging.ERROR):
        add(collection, base, rows(20, 40))
    size = vector_index_module.HNSW_MIN_PIECE
    assert pieces[:2] == [size, size] and "index update failed" in caplog.text
    monkeypatch.undo()
    check_against_brute_force(collection, base, seed=5)  # every row once: the index holds 60
    collection.close()


def test_ivf_trains_outside_the_write_lock_and_learns_what_it_would_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The k-means an add sets off ran under the write lock: every search waited for it (about a
    second for 100 lists, more with more). It runs before the lock now, and learns the same lists."""
    collection = create(tmp_path, IVF)
    base: Base = {}
    add(collection, base, rows(0, 12))
    under_lock: list[bool] = []
    original = collection_module.VectorIndex._trained_ivf

    def k_means(index: vector_index_module.VectorIndex, vectors: np.ndarray, *more: object) -> object:
        if index._given is None:  # else it takes lists learnt before: no k-means
            under_lock.append(collection.lock._writer)
        return original(index, vectors, *more)

    monkeypatch.setattr(collection_module.VectorIndex, "_trained_ivf", k_means)
    add(collection, base, rows(12, 15))  # crosses train_size (20)
    monkeypatch.undo()
    assert under_lock == [False], "one k-means, outside the lock; the add under it took its lists"
    index = collection.live_index()
    assert index.trained
    alone = vector_index_module.VectorIndex(index.spec)
    alone.add(np.arange(27, dtype=np.int64), np.stack([base[f"img{n}"].vector for n in range(27)]))
    assert alone.trained and np.array_equal(alone.learnt, index.learnt)
    check_against_brute_force(collection, base, seed=4)
    collection.close()


def test_a_k_means_failing_before_the_lock_is_run_again_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are committed when the k-means runs: its failure (here MemoryError) must not fail
    the add and leave the index behind the store; the add trains under the lock as before."""
    collection = create(tmp_path, IVF)
    base: Base = {}
    add(collection, base, rows(0, 12))
    original = collection_module.VectorIndex._trained_ivf
    calls: list[int] = []

    def first_fails(index: vector_index_module.VectorIndex, vectors: np.ndarray, *more: object) -> object:
        calls.append(len(vectors))
        if len(calls) == 1:
            raise MemoryError("k-means")
        return original(index, vectors, *more)

    monkeypatch.setattr(collection_module.VectorIndex, "_trained_ivf", first_fails)
    add(collection, base, rows(12, 15))
    monkeypatch.undo()
    assert calls == [20, 20] and collection.live_index().trained
    check_against_brute_force(collection, base, seed=6)
    collection.close()


def test_a_lone_query_after_a_restart_from_the_snapshot_skips_faiss_and_finds_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lone-query path reads FAISS's storage and id map directly: an index read back from a
    snapshot (after removals, then a restart) must hold them in the same form."""
    collection = create(tmp_path, metric=COSINE)
    base: Base = {}
    add(collection, base, rows(0, 60))
    remove(collection, base, [f"img{n}" for n in range(0, 60, 7)])
    collection.close()  # snapshots the index
    assert (collection.directory / SNAPSHOT_FILE).exists()
    again = reopen(collection)
    assert again.pending_ops() == 0, "read from the snapshot, not rebuilt from the store"
    lone = []
    by_gemv = collection_module.VectorIndex._search_by_gemv
    monkeypatch.setattr(
        collection_module.VectorIndex, "_search_by_gemv", lambda *a: lone.append(1) or by_gemv(*a)
    )
    for query in rows(100, 5):
        found = [hit.id for hit in again.search(query.vector, K)]
        assert found == expected_ids(base, query.vector, K, COSINE)
    assert len(lone) == 5
    again.close()


def test_a_closed_collection_is_not_found(tmp_path: Path) -> None:
    collection = create(tmp_path)
    add(collection, {}, rows(0, 3))
    collection.close()
    for call in (
        lambda: collection.add(rows(3, 1)),
        lambda: collection.remove(["img0"]),
        lambda: collection.search(np.zeros(DIM, np.float32), K),
        lambda: collection.get("img0"),
        lambda: collection.vector_of("img0"),
        lambda: collection.page(0, 10),
    ):
        with pytest.raises(NotFound) as caught:
            call()
        assert caught.value.reason == "COLLECTION_NOT_FOUND"
    collection.close()  # a second close is harmless
    collection.snapshot()


def test_get_and_vector_of_a_missing_image_are_not_found(tmp_path: Path) -> None:
    collection = create(tmp_path)
    for call in (collection.get, collection.vector_of):
        with pytest.raises(NotFound) as caught:
            call("nope")
        assert caught.value.reason == "IMAGE_NOT_FOUND"
    collection.close(snapshot=False)


def test_info_reports_resolved_defaults_and_state(tmp_path: Path) -> None:
    ivf = Collection.create(tmp_path / "ivf", make_spec(IVF, nlist=4, train_size=0), L2, None)
    info = ivf.info()
    assert info.spec.train_size == 39 * 4 and ivf.spec.train_size == 0, "resolved in info only"
    assert (info.image_count, info.index_trained, info.read_only) == (0, False, False)
    assert info.state_reason == (  # no extractor was given: said, not only logged (an outside test)
        "image queries and image adds are refused: extractor 'none' version '1' cannot serve it: "
        "no loaded plugin provides it"
    )
    ivf.close(snapshot=False)

    trained = Collection.create(tmp_path / "trained", make_spec(IVF), L2, None)
    add(trained, {}, rows(0, 20))
    info = trained.info()
    assert info.spec.train_size == 20 and info.image_count == 20 and info.index_trained
    trained.close(snapshot=False)

    flat = Collection.create(tmp_path / "flat", make_spec(FLAT), L2, None)
    assert flat.info().spec.train_size == 39 * 100 and not flat.info().index_trained
    flat.close(snapshot=False)

    # A legacy spec that cannot train (train_size below nlist): serving exactly, with a warning.
    legacy = Collection.create(tmp_path / "legacy", make_spec(IVF, nlist=4, train_size=2), L2, None)
    add(legacy, {}, rows(0, 3))
    info = legacy.info()
    assert not info.read_only and not info.index_trained and "IVF training failed" in info.state_reason
    legacy.close(snapshot=False)


# -- parameters and names ----------------------------------------------------------------------


def test_index_params_fill_defaults_and_cap_nprobe_at_nlist() -> None:
    limits = Limits()
    assert index_params(IVF, {"nlist": 4}, limits) == {"nlist": 4, "nprobe": 4}
    assert index_params(IVF, {"nlist": 50}, limits) == {"nlist": 50, "nprobe": 10}
    assert index_params(IVF, {}, limits) == {"nprobe": 10}
    assert index_params(IVF, {"nlist": 4, "nprobe": 2, "train_size": 0}, limits) == {"nlist": 4, "nprobe": 2}
    assert index_params(FLAT, {"nlist": 0, "hnsw_m": 0}, limits) == {}
    assert index_params(HNSW, {"hnsw_m": 16, "ef_search": 0}, limits) == {"hnsw_m": 16}


@pytest.mark.parametrize(
    ("index_type", "given", "group"),
    [
        (FLAT, {"nlist": 5}, "ivf"),
        (HNSW, {"nprobe": 3}, "ivf"),
        (IVF, {"hnsw_m": 8}, "hnsw"),
        (FLAT, {"ef_search": 9}, "hnsw"),
    ],
)
def test_parameters_of_another_index_type_are_refused(
    index_type: str, given: dict[str, int], group: str
) -> None:
    """They were checked, then dropped without a word: a client that forgot index_type got a flat
    collection (an outside test); the Python client refuses them before sending."""
    with pytest.raises(InvalidArgument, match=f"{group} parameters are for index_type") as refused:
        index_params(index_type, given, Limits())
    assert (refused.value.reason, refused.value.field) == ("BAD_INDEX_PARAM", f"collection.{group}")


@pytest.mark.parametrize("index_type", [FLAT, IVF, HNSW])
def test_defaults_above_lowered_limits_are_lowered_to_them(index_type: str) -> None:
    """``max_nlist = 8``, ``max_hnsw_m = 6`` or ``max_ef = 20`` are valid limits, yet the built-in
    defaults (100, 32, 40 and 64) were checked against them: start-up failed creating the default
    flat collection, and every create that left them unset failed (an outside test)."""
    limits = Limits(max_nlist=8, max_hnsw_m=6, max_ef=20)
    chosen = index_params(index_type, {}, limits)
    spec = make_spec(index_type, L2, **chosen)
    check_index_params(spec, limits)
    assert (spec.nlist, spec.hnsw_m, spec.ef_construction, spec.ef_search) == (8, 6, 20, 20)
    if index_type == IVF:
        assert spec.nprobe == 8
    given = {"nlist": 9} if index_type == IVF else {"hnsw_m": 7}
    with pytest.raises(InvalidArgument):  # what a client asks for is still checked, not lowered
        check_index_params(make_spec(index_type, L2, **index_params(index_type, given, limits)), limits)


def test_the_default_train_size_is_lowered_to_max_train_size() -> None:
    """An explicit train_size past ``max_train_size`` was refused while a create that left it unset
    trained on 39 a list anyway, past the operator's limit (an outside test)."""
    limits = Limits(max_train_size=200)
    chosen = index_params(IVF, {"nlist": 10}, limits)
    assert chosen["train_size"] == 200  # 390 by default
    check_index_params(make_spec(IVF, L2, **chosen), limits)
    assert "train_size" not in index_params(IVF, {"nlist": 5}, limits)  # 195 is within it
    with pytest.raises(InvalidArgument, match=r"100 lists need more training vectors .* at most 50 lists"):
        limited = Limits(max_train_size=50)
        check_index_params(make_spec(IVF, L2, **index_params(IVF, {"nlist": 100}, limited)), limited)


@pytest.mark.parametrize(
    "params",
    [
        {"nlist": 4, "nprobe": 4, "train_size": 4},
        {"nlist": 4, "nprobe": 1, "train_size": 0},
        {"nlist": 65536, "nprobe": 1, "train_size": 10_000_000},
        {"hnsw_m": 2, "ef_construction": 1, "ef_search": 4096},
        {"hnsw_m": 64},
    ],
)
def test_check_index_params_accepts_the_bounds(params: dict[str, int]) -> None:
    check_index_params(make_spec(IVF, **params), Limits())


@pytest.mark.parametrize(
    ("params", "field", "low", "high", "value"),
    [
        ({"nlist": 0}, "collection.ivf.nlist", 1, 65536, 0),
        ({"nlist": 65537, "train_size": 0}, "collection.ivf.nlist", 1, 65536, 65537),
        ({"nlist": 4, "nprobe": 5}, "collection.ivf.nprobe", 1, 4, 5),
        ({"nlist": 4, "train_size": 3}, "collection.ivf.train_size", 4, 10_000_000, 3),
        ({"train_size": 10_000_001}, "collection.ivf.train_size", 4, 10_000_000, 10_000_001),
        ({"hnsw_m": 1}, "collection.hnsw.m", 2, 64, 1),
        ({"hnsw_m": 65}, "collection.hnsw.m", 2, 64, 65),
        ({"ef_construction": 4097}, "collection.hnsw.ef_construction", 1, 4096, 4097),
        ({"ef_search": 0}, "collection.hnsw.ef_search", 1, 4096, 0),
    ],
)
def test_check_index_params_refuses_out_of_bounds(
    params: dict[str, int], field: str, low: int, high: int, value: int
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_index_params(make_spec(IVF, **params), Limits())
    error = caught.value
    assert (error.field, error.reason) == (field, "BAD_INDEX_PARAM")
    assert error.metadata == {"min": str(low), "max": str(high), "value": str(value)}


def test_check_index_params_takes_its_bounds_from_limits() -> None:
    spec = make_spec(HNSW, hnsw_m=17)
    check_index_params(spec, Limits())
    with pytest.raises(InvalidArgument) as caught:
        check_index_params(spec, Limits(max_hnsw_m=16))
    assert caught.value.metadata["max"] == "16"


@pytest.mark.parametrize("name", ["a", "default", "A-b_9", "9lives", "x" * 64])
def test_valid_collection_names(name: str) -> None:
    assert check_collection_name(name) == name


@pytest.mark.parametrize("name", ["", "keep\n", "x" * 65, "_x", "-x", "a b", "a/b", "a.b", "é"])
def test_invalid_collection_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_collection_name(name)
    assert (caught.value.field, caught.value.reason) == ("name", "BAD_COLLECTION_NAME")


def test_a_new_collection_stores_rows_on_pages_sized_for_its_dimension(tmp_path: Path) -> None:
    """1280-d rows (5 KiB) get 16 KiB pages, which three fill; small vectors keep SQLite's 4 KiB."""
    for dim, pages in ((1280, 16384), (DIM, 4096)):
        spec = dataclasses.replace(make_spec(), dim=dim)
        Collection.create(tmp_path / str(dim), spec, L2, None).close()
        with sqlite3.connect(tmp_path / str(dim) / collection_module.STORE_FILE) as conn:
            assert conn.execute("PRAGMA page_size").fetchone()[0] == pages


def test_periodic_snapshots_take_a_bounded_share_of_the_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot rewrites the whole index while writers wait: after one that took t seconds the
    next waits 9 t, whatever the writes (a bulk import rewrote the index every 5,000 adds)."""
    collection = create(tmp_path)
    collection.add(rows(0, 50))
    clock = [time.monotonic() + 1000]
    monkeypatch.setattr(collection_module.time, "monotonic", lambda: clock[0])

    def slow_write(*args: object) -> None:
        clock[0] += 2.0  # this snapshot takes 2 s

    monkeypatch.setattr(collection_module, "write_snapshot", slow_write)
    assert collection.snapshot_if_due(every_ops=1, interval_s=0)
    collection.add(rows(50, 10))
    clock[0] += 17.9
    assert not collection.snapshot_if_due(every_ops=1, interval_s=0), "within 9 x 2 s of the last"
    clock[0] += 0.2
    assert collection.snapshot_if_due(every_ops=1, interval_s=0)
    collection.close(snapshot=False)


def test_the_interval_alone_snapshots_only_changes_of_a_hundredth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few adds a minute to a large collection must not rewrite all of it every minute."""
    collection = create(tmp_path)
    collection.add(rows(0, 300))
    collection.snapshot()
    clock = [time.monotonic() + 3600]  # long past the interval
    monkeypatch.setattr(collection_module.time, "monotonic", lambda: clock[0])
    collection.add(rows(300, 2))  # 2 of 302 images: under 1 %
    assert not collection.snapshot_if_due(every_ops=5000, interval_s=60)
    collection.add(rows(302, 2))  # 4 of 304: past it
    assert collection.snapshot_if_due(every_ops=5000, interval_s=60)
    collection.add(rows(304, 1))
    assert not collection.snapshot_if_due(every_ops=5000, interval_s=60)
    assert collection.snapshot_if_due(every_ops=1, interval_s=60), "every_ops still applies"
    collection.close(snapshot=False)


def test_an_add_never_copies_the_index_storage_while_searches_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storage grows before the write lock (VectorIndex.room_for): under it FAISS adds in
    place, so a growing collection never makes searches wait for a copy of all its vectors."""
    from imagesearch.server.vector_index import VectorIndex

    collection = create(tmp_path)
    moved: list[bool] = []
    add = VectorIndex.add

    def watched(index: VectorIndex, *args: object) -> None:
        before = storage_address(index)
        add(index, *args)
        moved.append(before != 0 and storage_address(index) != before)

    monkeypatch.setattr(VectorIndex, "add", watched)
    for start in range(0, 600, 20):
        collection.add(rows(start, 20))
    assert len(moved) == 30 and not any(moved)
    collection.close(snapshot=False)
