"""CollectionStore below the gRPC layer: the SQLite source of truth every index is rebuilt from.

Row ids and sequence numbers are what the index and its snapshots rely on, so each promise
(all-or-nothing batches, a removal log, never-reused row ids, keyset pages, replay in seq order)
is checked directly against a store on a temporary file.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imagesearch.server.errors import AlreadyExists
from imagesearch.server.store import MAX_READERS, CollectionStore, HitRow, ImageRow, NewImage, page_size_for

DIM = 4


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CollectionStore]:
    """A fresh store on a temporary file, closed after the test."""
    opened = CollectionStore(tmp_path / "store.sqlite3")
    yield opened
    opened.close()


def vector_for(image_id: str) -> np.ndarray:
    """A vector derived from the id alone, so any test can recompute what a row must hold."""
    seed = sum(ord(ch) * 31**i for i, ch in enumerate(image_id)) % 2**32
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


def image(image_id: str, label: str = "", **changes: Any) -> NewImage:
    """A row with a reproducible vector and thumbnail/original blobs that name it, so a read-back
    can be checked against the id alone; ``changes`` overrides any field."""
    row = NewImage(
        id=image_id,
        label=label,
        vector=vector_for(image_id),
        metadata={"name": image_id},
        thumbnail=f"thumb-{image_id}".encode(),
        original=f"original-{image_id}".encode(),
        width=3,
        height=2,
    )
    return dataclasses.replace(row, **changes)


def insert(store: CollectionStore, *ids: str, label: str = "") -> list[int]:
    """Insert rows by id in one batch (all with ``label``); returns their row ids."""
    row_ids, _ = store.insert([image(i, label) for i in ids])
    return row_ids


def ids_of(rows: Sequence[ImageRow]) -> list[str]:
    """Image ids in the order a listing returned them (what pagination promises)."""
    return [row.id for row in rows]


def test_insert_returns_row_ids_and_increasing_seqs(store: CollectionStore) -> None:
    assert store.last_seq() == 0
    row_ids, seqs = store.insert([image("a"), image("b"), image("c")])
    assert row_ids == [1, 2, 3] and seqs == [1, 2, 3]
    row_ids, seqs = store.insert([image("d"), image("e")])
    assert row_ids == [4, 5] and seqs == [4, 5]
    assert store.last_seq() == 5 and store.count() == 5


@pytest.mark.parametrize("batch", [["new1", "taken", "new2"], ["new1", "new2", "new1"]])
def test_a_taken_id_rolls_back_the_whole_batch(store: CollectionStore, batch: list[str]) -> None:
    """Either an id already stored or one repeated in the batch: nothing of the batch stays."""
    insert(store, "taken")
    with pytest.raises(AlreadyExists) as caught:
        store.insert([image(i) for i in batch])
    assert caught.value.reason == "IMAGE_EXISTS" and caught.value.code == 6
    assert store.count() == 1 and store.get("new1") is None and store.get("new2") is None
    assert store.last_seq() == 1
    assert store.existing_ids(["new1", "new2", "taken"]) == {"taken"}
    # The writer is out of its transaction: the next batch commits normally, with the next seq.
    row_ids, seqs = store.insert([image("new1")])
    assert seqs == [2] and store.get("new1").row_id == row_ids[0]


def test_delete_logs_removals_and_returns_only_existing_row_ids(store: CollectionStore) -> None:
    insert(store, "a", "b", "c")
    assert store.delete(["b", "missing", "a", "a"]) == [2, 1]
    assert store.removals_after(0) == [(4, 2), (5, 1)]
    assert store.removals_after(4) == [(5, 1)]
    assert store.last_seq() == 5
    assert store.delete(["missing", "b"]) == []
    assert store.last_seq() == 5 and store.removals_after(5) == []
    assert ids_of(store.page(0, 10)) == ["c"]


def test_prune_removals_forgets_only_what_a_snapshot_covers(store: CollectionStore) -> None:
    insert(store, "a", "b", "c")
    store.delete(["a"])
    store.delete(["b"])
    store.delete(["c"])
    store.prune_removals(5)
    assert store.removals_after(0) == [(6, 3)]
    store.prune_removals(6)
    assert store.removals_after(0) == []
    assert store.last_seq() == 6, "pruning the log never moves the sequence"


def test_iter_vectors_yields_rows_after_a_seq_in_seq_order_in_chunks(store: CollectionStore) -> None:
    insert(store, *[f"r{i}" for i in range(5)])  # seqs 1-5
    store.delete(["r1", "r3"])  # seqs 6-7
    insert(store, *[f"s{i}" for i in range(4)])  # seqs 8-11
    chunks = list(store.iter_vectors(after_seq=3, chunk=2))
    assert [len(ids) for ids, _, _ in chunks] == [2, 2, 1]
    row_ids = np.concatenate([ids for ids, _, _ in chunks]).tolist()
    assert row_ids == [5, 6, 7, 8, 9]  # r4 (seq 5), then s0..s3 (seqs 8-11); r3 is gone
    assert [seqs.tolist() for _, _, seqs in chunks] == [[5, 8], [9, 10], [11]]
    expected = np.stack([vector_for(i) for i in ["r4", "s0", "s1", "s2", "s3"]])
    assert np.array_equal(np.concatenate([v for _, v, _ in chunks]), expected)
    assert all(ids.dtype == np.int64 and v.dtype == np.float32 for ids, v, _ in chunks)
    assert list(store.iter_vectors(after_seq=11, chunk=2)) == []
    everything = np.concatenate([ids for ids, _, _ in store.iter_vectors(chunk=3)]).tolist()
    assert everything == [1, 3, 5, 6, 7, 8, 9]


def walk_pages(store: CollectionStore, size: int, label: str | None = None) -> list[list[str]]:
    """Follow page() from the start to an empty page, each page continuing after the last row
    of the one before. Gives up after 50 pages, so a position that never advances fails the
    test instead of hanging it."""
    pages: list[list[str]] = []
    after = 0
    for _ in range(50):
        page = store.page(after, size, label)
        if not page:
            return pages
        if label:
            assert {row.label for row in page} == {label}
        pages.append(ids_of(page))
        after = page[-1].row_id
    raise AssertionError(f"page() never ran out: {pages[:4]}...")


def test_page_is_keyset_pagination_in_insertion_order(store: CollectionStore) -> None:
    ids = [f"i{n}" for n in range(10)]
    for n, image_id in enumerate(ids):
        insert(store, image_id, label="even" if n % 2 == 0 else "odd")
    assert walk_pages(store, 3) == [ids[0:3], ids[3:6], ids[6:9], ids[9:10]]
    assert walk_pages(store, 2, label="odd") == [ids[1:5:2], ids[5:9:2], ids[9:10]]
    assert ids_of(store.page(0, 100, label="")) == ids, "an empty label is no filter"
    assert store.page(0, 5, label="none") == []
    row = store.page(0, 1)[0]
    assert (row.metadata, row.width, row.height, row.thumbnail) == ({"name": "i0"}, 3, 2, None)


def test_page_is_stable_when_rows_are_deleted_between_pages(store: CollectionStore) -> None:
    ids = [f"i{n}" for n in range(8)]
    insert(store, *ids)
    first = store.page(0, 3)
    assert ids_of(first) == ids[:3]
    store.delete(["i2", "i3", "i5"])  # the last row of the page just read, and two still to come
    insert(store, "late")
    second = store.page(first[-1].row_id, 3)
    assert ids_of(second) == ["i4", "i6", "i7"]
    assert ids_of(store.page(second[-1].row_id, 3)) == ["late"]


def test_count_with_and_without_label(store: CollectionStore) -> None:
    assert store.count() == 0
    insert(store, "a", "b", label="cat")
    insert(store, "c", label="dog")
    assert store.count() == 3 and store.count("") == 3 and store.count(None) == 3
    assert store.count("cat") == 2 and store.count("dog") == 1 and store.count("cow") == 0
    store.delete(["a"])
    assert store.count() == 2 and store.count("cat") == 1


def test_get_returns_original_and_vector_only_when_asked(store: CollectionStore) -> None:
    store.insert([image("a", "lbl", metadata={"k": "v", "x": "y"}, width=640, height=480)])
    plain = store.get("a")
    assert plain is not None
    assert (plain.row_id, plain.id, plain.label, plain.metadata) == (1, "a", "lbl", {"k": "v", "x": "y"})
    assert (plain.width, plain.height, plain.thumbnail) == (640, 480, b"thumb-a")
    assert plain.original is None and plain.vector is None
    assert plain.created > 0
    full = store.get("a", with_original=True, with_vector=True)
    assert full is not None and full.original == b"original-a"
    assert full.vector is not None and np.array_equal(full.vector, vector_for("a"))
    assert full.vector.dtype == np.float32 and full.vector.flags.writeable
    assert store.get("missing", with_original=True, with_vector=True) is None


def test_a_row_without_blobs_reads_back_as_none(store: CollectionStore) -> None:
    store.insert([image("bare", thumbnail=None, original=None)])
    row = store.get("bare", with_original=True)
    assert row is not None and row.thumbnail is None and row.original is None


def test_a_batch_of_bare_vectors_and_a_mixed_batch_keep_each_rows_columns(store: CollectionStore) -> None:
    """A batch whose rows carry no image leaves the image columns to their defaults (fewer values
    to bind); a batch mixing such rows with images stores each row's own."""
    bare = {"thumbnail": None, "original": None, "width": 0, "height": 0}
    store.insert([image("v0", **bare), image("v1", **bare, metadata={})])
    store.insert([image("v2", **bare), image("i0")])
    for image_id in ("v0", "v1", "v2"):
        row = store.get(image_id, with_original=True, with_vector=True)
        assert row is not None
        assert (row.thumbnail, row.original, row.width, row.height) == (None, None, 0, 0)
        assert np.array_equal(row.vector, vector_for(image_id))
    assert store.get("v0", with_original=False).metadata == {"name": "v0"}
    assert store.get("v1", with_original=False).metadata == {}
    full = store.get("i0", with_original=True)
    assert (full.thumbnail, full.original, full.width, full.height) == (b"thumb-i0", b"original-i0", 3, 2)
    assert store.last_seq() == 4


def test_vector_of(store: CollectionStore) -> None:
    insert(store, "a", "b")
    row_id, vector = store.vector_of("b")
    assert row_id == 2 and np.array_equal(vector, vector_for("b"))
    assert store.vector_of("missing") is None


def test_rows_by_row_id(store: CollectionStore) -> None:
    insert(store, "a", "b", label="x")
    insert(store, "c", label="y")
    rows = store.rows_by_row_id([3, 1, 99])
    assert sorted(rows) == [1, 3]
    assert (rows[3].id, rows[3].label, rows[1].id, rows[1].metadata) == ("c", "y", "a", {"name": "a"})
    assert rows[1] == HitRow(1, "a", "x", {"name": "a"})  # what a hit shows, no blobs read
    assert store.rows_by_row_id([]) == {}
    assert store.rows_by_row_id(np.array([2], dtype=np.int64))[2].id == "b"


def test_row_ids_with_labels(store: CollectionStore) -> None:
    insert(store, "a", "b", label="x")
    insert(store, "c", label="y")
    insert(store, "d", label="z")
    last = store.last_seq()
    found = store.row_ids_with_labels(["x", "z"], last)
    assert found.dtype == np.int64 and sorted(found.tolist()) == [1, 2, 4]
    assert store.row_ids_with_labels(["nope"], last).tolist() == []
    assert sorted(store.row_ids_with_labels(["x", "z"], last - 1).tolist()) == [1, 2]  # d not applied yet
    many = [f"label-{i}" for i in range(300_000)] + ["y"]  # past SQLite's 250,000 bound variables
    assert store.row_ids_with_labels(many, last).tolist() == [3]


def test_labels_holding_a_nul_character_filter_whole(store: CollectionStore) -> None:
    """Labels are stored whole whatever they hold; the filter cut "a\x00b" at the NUL and found
    the images labelled "a" (an outside test: wrong hits for a label filter and BUCKETED mode)."""
    insert(store, "plain", label="a")
    insert(store, "nul-b", label="a\x00b")
    insert(store, "nul-c", label="a\x00c")
    last = store.last_seq()
    assert store.row_ids_with_labels(["a\x00b"], last).tolist() == [2]
    assert store.row_ids_with_labels(["a\x00c", "a"], last).tolist() == [1, 3]
    assert store.row_ids_with_labels(["a\x00b", "a\x00c"], last).tolist() == [2, 3]
    assert store.row_ids_with_labels(["a\x00b", "a\x00b"], last).tolist() == [2]


def test_lookups_by_many_ids_take_one_parameter(store: CollectionStore) -> None:
    """Every lookup of a set (ids, row ids) stays one query whatever its size: a SearchBatch of 256
    queries of 1,000 hits asks for 256,000 rows, past SQLite's limit on bound variables."""
    insert(store, "a", "b", label="x")
    row_ids = np.arange(300_000, dtype=np.int64)  # NumPy integers, as search results are
    assert sorted(store.rows_by_row_id(row_ids)) == [1, 2]
    assert sorted(store.vectors_by_row_id(row_ids)) == [1, 2]
    assert store.local_features_of(row_ids.tolist()) == {}
    assert store.existing_ids(["a", *(f"id{i}" for i in range(300_000))]) == {"a"}


def test_meta_get_and_set(store: CollectionStore) -> None:
    assert store.get_meta("spec") is None
    store.set_meta("spec", '{"a": 1}')
    assert store.get_meta("spec") == '{"a": 1}'
    store.set_meta("spec", "replaced")
    assert store.get_meta("spec") == "replaced"


def test_existing_ids_across_many_chunks(store: CollectionStore) -> None:
    """More ids than one IN (...) query takes: every chunk is looked up."""
    stored = [f"s{i}" for i in range(1200)]
    store.insert([NewImage(id=i, label="", vector=np.zeros(DIM, np.float32)) for i in stored])
    asked = [f"s{i}" for i in range(0, 1200, 7)] + ["absent", "s1200"]
    assert store.existing_ids(asked) == {f"s{i}" for i in range(0, 1200, 7)}
    assert store.existing_ids([]) == set()


def test_row_ids_are_never_reused_after_deletes(store: CollectionStore, tmp_path: Path) -> None:
    """Row ids are FAISS ids: reusing a deleted one would resurrect it in a stale index or snapshot."""
    insert(store, "a", "b", "c")
    store.delete(["c", "b"])
    assert insert(store, "d") == [4]
    store.delete(["a", "d"])
    assert store.count() == 0
    assert insert(store, "c") == [5]
    store.close()
    reopened = CollectionStore(tmp_path / "store.sqlite3")
    try:
        assert insert(reopened, "e") == [6]
    finally:
        reopened.close()


def test_a_reader_connection_sees_the_writers_committed_rows(store: CollectionStore) -> None:
    assert store.count() == 0  # this thread's reader connection now exists
    insert(store, "a")
    assert store.count() == 1 and store.get("a") is not None
    seen: list[ImageRow | int | None] = []

    def read_elsewhere() -> None:
        """A fresh thread gets its own reader connection."""
        seen.append(store.get("a"))
        seen.append(store.count())

    thread = threading.Thread(target=read_elsewhere)
    thread.start()
    thread.join()
    row, count = seen
    assert isinstance(row, ImageRow) and row.id == "a" and count == 1
    other = CollectionStore(store.path)  # a second store on the same file, as a restart would open
    try:
        assert other.count() == 1
        insert(store, "b")
        assert other.existing_ids(["a", "b"]) == {"a", "b"}
    finally:
        other.close()


def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    first = CollectionStore(path)
    first.insert([image("a", "x"), image("b", "y"), image("c", "x")])
    first.delete(["b"])
    first.set_meta("spec", "kept")
    first.close()
    reopened = CollectionStore(path)
    try:
        assert reopened.count() == 2 and reopened.count("x") == 2
        assert reopened.last_seq() == 4 and reopened.get_meta("spec") == "kept"
        assert reopened.removals_after(0) == [(4, 2)]
        row = reopened.get("c", with_original=True, with_vector=True)
        assert row is not None and row.original == b"original-c"
        assert np.array_equal(row.vector, vector_for("c"))
        assert np.concatenate([ids for ids, _, _ in reopened.iter_vectors()]).tolist() == [1, 3]
    finally:
        reopened.close()


def test_local_features_live_and_die_with_their_rows(store: CollectionStore) -> None:
    first, second = store.insert([image("a", local=b"aa"), image("b", local=b"bbb"), image("c")])[0][:2]
    assert store.local_features_of([first, second, 99]) == {first: b"aa", second: b"bbb"}
    assert store.local_row_ids().tolist() == [first, second] and store.local_features_bytes() == 5
    with pytest.raises(AlreadyExists):  # a failed batch leaves no features behind
        store.insert([image("d", local=b"dd"), image("a", local=b"xx")])
    assert store.local_features_bytes() == 5
    store.delete(["a"])
    assert store.local_features_of([first]) == {} and store.local_features_bytes() == 3


def test_reencode_commits_state_spec_and_vectors_together(store: CollectionStore) -> None:
    row_ids, _ = store.insert([image("a"), image("b")])
    before = store.last_seq()
    seq = store.reencode('{"new": 1}', b"state", {row_ids[0]: np.ones(3, np.float32)})
    assert seq == before + 1 == store.last_seq()
    assert store.extractor_state() == b"state" and store.get_meta("spec") == '{"new": 1}'
    np.testing.assert_array_equal(store.vector_of("a")[1], np.ones(3))
    np.testing.assert_array_equal(store.vector_of("b")[1], vector_for("b"))


def page_size_of(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA page_size").fetchone()[0]


@pytest.mark.parametrize(
    ("dim", "pages"), [(128, 4096), (512, 16384), (1000, 8192), (1280, 16384), (2048, 32768)]
)
def test_pages_are_sized_for_rows_to_fill_them(dim: int, pages: int) -> None:
    """The smallest page that a vector row fills to 90 %, else the best filled: 1280 floats (5 KiB)
    spill out of a 4 KiB page, leave a third of an 8 KiB one empty and fill a 16 KiB one."""
    assert page_size_for(dim) == pages


def test_a_new_store_takes_its_page_size_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    """A new store takes the page size it is given; a store made with SQLite's default 4 KiB before
    that opens, reads and grows as it is (WAL fixes the size), even when opened with another."""
    new = CollectionStore(tmp_path / "new.sqlite3", page_size=16384)
    insert(new, "a")
    new.close()
    assert page_size_of(tmp_path / "new.sqlite3") == 16384
    old_path = tmp_path / "old.sqlite3"
    with sqlite3.connect(old_path) as conn:  # what an older server made: default pages, then WAL
        conn.execute("PRAGMA journal_mode=WAL")
    old = CollectionStore(old_path, page_size=16384)
    insert(old, "a", "b")
    assert [row.id for row in old.page(0, 10)] == ["a", "b"]
    old.close()
    reopened = CollectionStore(old_path, create=False)
    assert reopened.count() == 2
    reopened.close()
    assert page_size_of(old_path) == 4096


def test_what_an_index_learnt_is_kept_until_a_training_replaces_the_vectors(store: CollectionStore) -> None:
    """``keep_learnt`` writes on its own connection; ``reencode`` (TrainCollection) clears it in the
    transaction that replaces the vectors it was learnt from."""
    assert store.learnt() is None
    centroids = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.keep_learnt(centroids)
    kept = store.learnt()
    assert kept is not None and kept.dtype == np.float32 and np.array_equal(kept, centroids)
    store.reencode('{"spec": 1}', b"state", {})
    assert store.learnt() is None


def test_each_change_carries_its_own_token_until_a_snapshot_prunes_it(store: CollectionStore) -> None:
    """What a snapshot checks to tell this store's history from another of it (test_collection)."""
    _, seqs = store.insert([image("a"), image("b")])
    assert seqs == [1, 2] and store.commit_token(1) is None  # a change has one token, at its end
    first = store.commit_token(2)
    assert first is not None and len(first) == 8
    assert store.delete(["nope"]) == [] and store.commit_token(2) == first  # no change, no new token
    store.delete(["a"])
    assert store.commit_token(3) not in (None, first)
    store.prune_removals(3)
    assert store.commit_token(2) is None and store.commit_token(3) is not None  # the snapshot's kept


def test_a_snapshot_of_a_change_without_a_token_gets_one_and_keeps_it(store: CollectionStore) -> None:
    """A store's last change made before stores kept tokens (or none at all): the snapshot of it
    makes one, the same at every later snapshot of that point, so every snapshot proves its history."""
    assert store.commit_token(0) is None
    empty = store.snapshot_token(0)
    assert store.snapshot_token(0) == empty == store.commit_token(0)
    store.insert([image("a")])
    store._writer.execute("DELETE FROM commits WHERE seq = 1")  # as a change of an earlier version
    made = store.snapshot_token(1)
    assert len(made) == 8 and store.snapshot_token(1) == made == store.commit_token(1)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_reads_share_a_few_pooled_connections_and_idle_ones_close(store: CollectionStore) -> None:
    """Each connection holds two file descriptors; one per thread that ever read brought a
    collection to 41, and a few hundred collections ran the server out (an outside test). Reads
    from 32 threads at once open at most MAX_READERS connections, and idle ones close (SQLite keeps
    a closed one's database descriptor for reuse while the writer holds its lock: not its WAL's)."""
    before = open_descriptors()
    store.insert([image(f"img{i}") for i in range(10)])
    start = threading.Barrier(32)

    def read() -> None:
        start.wait()
        for _ in range(20):
            assert store.count() == 10 and store.get("img3") is not None

    threads = [threading.Thread(target=read) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert open_descriptors() - before <= 2 * MAX_READERS
    assert store.close_idle_readers(unused_for_s=3600) == 0  # just used: kept
    assert store.close_idle_readers() <= MAX_READERS
    assert open_descriptors() - before <= MAX_READERS


def test_a_pooled_connection_sees_every_commit_before_its_read(store: CollectionStore) -> None:
    """Reads on pooled connections see every commit made before them (one given back inside a read
    transaction would not), and a closed store refuses reads as a closed connection does."""
    store.insert([image("a"), image("b")])
    assert store.get_meta("seq") == "2" and store.count() == 2  # fetchone: the statement is ended
    store.insert([image("c")])
    assert store.get_meta("seq") == "3" and store.count() == 3
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store.count()
