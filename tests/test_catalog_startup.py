"""What start-up finds in a data directory: temp files a crash left behind are removed, and a
collection whose store cannot be opened is reported with its real cause and advice that fits it
(never "delete the collection" for intact data), without creating anything in its place."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imagesearch.plugins.manager import PluginRegistry
from imagesearch.server.catalog import Catalog
from imagesearch.server.collection import STORE_FILE, Collection
from imagesearch.server.errors import AlreadyExists, FailedPrecondition, NotFound
from imagesearch.server.files import remove_temp_files
from imagesearch.server.store import NewImage
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor


@contextmanager
def catalog(data: Path) -> Iterator[Catalog]:
    """The tiny extractor, and SIFT local features when the models directory holds the vocabulary."""
    models = Path(os.environ["IMAGESEARCH_MODELS"]) if "IMAGESEARCH_MODELS" in os.environ else None
    opened = Catalog(data, PluginRegistry([TINY_PLUGIN], load_entry_points=False, env={}, models_dir=models))
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data directory with collection ``c`` holding three images."""
    with catalog(tmp_path / "data") as made:
        made.create("c", extractor=TinyExtractor.name, metric="l2")
        rows = [
            NewImage(id=f"a{i}", label="", vector=np.full(TinyExtractor.dim, i, np.float32)) for i in range(3)
        ]
        made.get("c").add(rows)
    return tmp_path / "data"


def collection_dir(data: Path) -> Path:
    return data / "collections" / "c"


def unavailable(data: Path) -> str:
    """The reason start-up gives for collection ``c``, checked to be COLLECTION_UNAVAILABLE."""
    with catalog(data) as opened, pytest.raises(FailedPrecondition) as refused:
        opened.get("c")
    assert refused.value.reason == "COLLECTION_UNAVAILABLE"
    return refused.value.message


def test_a_write_killed_midway_leaves_a_temp_file_that_the_cleanup_removes(tmp_path: Path) -> None:
    """A real crash: a process dies inside atomic_write, as `kill -9` during a snapshot does."""
    target = tmp_path / "index.snapshot"
    crash = (
        "import os, sys; from pathlib import Path; from imagesearch.server.files import atomic_write; "
        "atomic_write(Path(sys.argv[1]), lambda h: (h.write(b'x' * 4096), h.flush(), os._exit(9)))"
    )
    assert subprocess.run([sys.executable, "-c", crash, str(target)]).returncode == 9
    (leftover,) = tmp_path.glob(".index.snapshot.*.tmp")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    assert remove_temp_files(tmp_path) == [(leftover, 4096)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp"]
    assert not target.exists()


def test_start_up_removes_leftover_temp_files_and_logs_each(
    data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    leftover = collection_dir(data) / ".index.snapshot.k9x2ab.tmp"
    leftover.write_bytes(b"\0" * 1000)
    with caplog.at_level(logging.INFO), catalog(data) as opened:
        assert opened.get("c").count() == 3
    assert not leftover.exists()
    assert (
        "collection c: removed .index.snapshot.k9x2ab.tmp (1000 bytes), left by an interrupted write"
        in caplog.text
    )


def test_a_missing_store_is_reported_as_missing_and_not_recreated(data: Path, tmp_path: Path) -> None:
    store = collection_dir(data) / STORE_FILE
    moved = tmp_path / "moved.sqlite3"
    store.rename(moved)
    reason = unavailable(data)
    assert f"store.sqlite3 is missing from {collection_dir(data)}; nothing was changed" in reason
    assert "Put the file back" in reason and "delete" not in reason
    assert not store.exists()  # opening never made an empty store in its place
    moved.rename(store)
    with catalog(data) as opened:
        assert opened.get("c").count() == 3


def fail_to_open(directory: Path) -> Any:
    raise sqlite3.OperationalError("unable to open database file")


def failing_io(directory: Path) -> Any:
    raise sqlite3.OperationalError("disk I/O error")


def test_a_read_only_file_system_is_named_with_advice_that_keeps_the_data(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated (mounting needs root): the store cannot be opened and statvfs says read-only."""
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path: Any) -> None:
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(Collection, "read_spec", staticmethod(fail_to_open))
    monkeypatch.setattr(os, "statvfs", ReadOnly)
    reason = unavailable(data)
    assert f"{collection_dir(data)} is on a read-only file system (unable to open database file)" in reason
    assert "Its data is intact: mount it read-write and restart the server" in reason
    assert "delete" not in reason


def test_a_full_disk_is_named_with_advice_that_keeps_the_data(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restarting on a full disk, SQLite says "disk I/O error" (it cannot make its shared-memory
    file), and the advice was to restore or delete intact data (an outside test, on a 3 MB tmpfs;
    simulated here: statvfs says no space left)."""
    real_statvfs = os.statvfs

    class Full:
        def __init__(self, path: Any) -> None:
            self.f_flag, self.f_frsize, self.f_bavail = real_statvfs(path).f_flag, 4096, 3

    monkeypatch.setattr(Collection, "read_spec", staticmethod(failing_io))
    monkeypatch.setattr(os, "statvfs", Full)
    reason = unavailable(data)
    assert (
        f"{collection_dir(data)} cannot be opened (disk I/O error): the disk holding it is full (12288 bytes free)"
        in reason
    )
    assert "Nothing was changed: free space on that disk and restart the server" in reason
    assert "delete" not in reason


def test_a_store_the_server_may_not_write_is_named_with_advice_that_keeps_the_data(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated (root ignores permissions): the store cannot be opened and is not writable."""
    store = collection_dir(data) / STORE_FILE
    real_access = os.access
    monkeypatch.setattr(Collection, "read_spec", staticmethod(fail_to_open))
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != store and real_access(path, mode))
    reason = unavailable(data)
    assert f"the server may not read and write {store} (unable to open database file)" in reason
    assert "Its data is intact: give the server's user read-write access" in reason
    assert "delete" not in reason


def test_a_damaged_store_still_suggests_a_backup_or_deleting_it(data: Path) -> None:
    store = collection_dir(data) / STORE_FILE
    store.write_bytes(b"not a database" * 100)
    for name in ("-wal", "-shm"):
        Path(f"{store}{name}").unlink(missing_ok=True)
    reason = unavailable(data)
    assert "cannot be opened" in reason and "restore it from a backup, or delete the collection" in reason


def test_a_store_that_opens_read_only_is_unavailable_not_ready(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated (root ignores permissions): SQLite opens a store it may not write read-only without
    a word, so the collection served as READY and every write failed INTERNAL (an outside test)."""
    store = collection_dir(data) / STORE_FILE
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != store and real_access(path, mode))
    reason = unavailable(data)
    assert f"the server may not read and write {store}" in reason and "delete" not in reason


def test_a_copied_or_renamed_collection_directory_is_refused_not_served_under_its_old_name(
    data: Path,
) -> None:
    """A copy beside the original took over its name (its writes went to the copy, deleting it
    deleted the copy, and the original came back with a write lost); a renamed one kept serving
    under the old name and made creating the new name fail INTERNAL (an outside test)."""
    root = data / "collections"
    shutil.copytree(root / "c", root / "c-copy")
    with catalog(data) as opened:
        assert [c.spec.name for c in opened.list()] == ["c"]
        assert opened.get("c").directory == root / "c"
        with pytest.raises(FailedPrecondition) as refused:
            opened.get("c-copy")
        assert "belongs to collection 'c', not 'c-copy'" in refused.value.message
        assert "rename it back" in refused.value.message
        opened.get("c").add([NewImage(id="new", label="", vector=np.ones(TinyExtractor.dim, np.float32))])
        with pytest.raises(AlreadyExists):
            opened.create("c-copy", extractor=TinyExtractor.name, metric="l2")
        opened.delete("c-copy")  # how an operator clears it: the original is untouched
        assert opened.get("c").count() == 4
    shutil.rmtree(root / "c-copy", ignore_errors=True)
    os.replace(root / "c", root / "renamed")
    with catalog(data) as opened:
        assert opened.list() == []
        with pytest.raises(FailedPrecondition, match="belongs to collection 'c', not 'renamed'"):
            opened.get("renamed")
        with pytest.raises(NotFound):
            opened.get("c")


def test_a_store_damaged_past_its_spec_is_unavailable_and_deletable(data: Path) -> None:
    """The spec read, the images table did not: the collection was recorded both as loaded and as
    unavailable, so listing every collection failed INTERNAL for every client, and deleting it left
    it half-registered (an outside test)."""
    store = collection_dir(data) / STORE_FILE
    conn = sqlite3.connect(store)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    roots = [r for (r,) in conn.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name = 'images'") if r]
    conn.close()
    with open(store, "r+b") as file:  # the images table's pages and its indexes'; the spec's intact
        for root in roots:
            file.seek((root - 1) * page)
            file.write(b"\xff" * page)
    with catalog(data) as opened:
        assert opened.list() == []
        with pytest.raises(FailedPrecondition) as refused:
            opened.get("c")
        assert refused.value.reason == "COLLECTION_UNAVAILABLE"
        opened.delete("c")
        with pytest.raises(NotFound):
            opened.get("c")
        opened.create("c", extractor=TinyExtractor.name, metric="l2")
        assert opened.get("c").count() == 0


def test_a_snapshot_that_cannot_be_read_is_rebuilt_from_the_store(data: Path) -> None:
    """A directory where the snapshot should be (or one the server may not read) made the
    collection read-only although its store was intact (an outside test); it is only a cache."""
    snapshot = collection_dir(data) / "index.snapshot"
    snapshot.unlink(missing_ok=True)
    snapshot.mkdir()
    with catalog(data) as opened:
        collection = opened.get("c")
        assert collection.problem == "" and collection.count() == 3
        assert [hit.id for hit in collection.search(np.full(TinyExtractor.dim, 2, np.float32), 1)] == ["a2"]


def test_a_snapshot_whose_store_refuses_writes_is_logged_and_the_others_go_on(
    data: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Pruning the removals a snapshot covers writes to the store: a read-only one raised an
    sqlite3 error that ended the snapshot thread for every collection, and made shutdown fail."""
    from imagesearch.server.store import CollectionStore

    def refuse(store: CollectionStore, upto_seq: int) -> None:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(CollectionStore, "prune_removals", refuse)
    with catalog(data) as opened:
        opened.create("d", extractor=TinyExtractor.name, metric="l2")
        for name in ("c", "d"):
            opened.get(name).add([NewImage(id="x", label="", vector=np.ones(TinyExtractor.dim, np.float32))])
        with caplog.at_level(logging.ERROR):
            opened.snapshot_due(every_ops=1, interval_s=0)
        assert (
            sum("snapshot failed: attempt to write a readonly database" in r.message for r in caplog.records)
            == 2
        )


def test_a_store_that_lost_its_images_table_is_unavailable_not_empty(data: Path) -> None:
    """Opening made a new, empty images table in place of the lost one: the collection served
    as READY with no images (an outside test)."""
    store = collection_dir(data) / STORE_FILE
    conn = sqlite3.connect(store)
    conn.execute("DROP TABLE images")
    conn.commit()
    conn.close()
    reason = unavailable(data)
    assert "lost its images table" in reason and "restore it from a backup" in reason


def test_a_store_that_lost_its_local_features_table_is_unavailable(tmp_path: Path) -> None:
    """Opening adds the tables later versions brought, so a lost local_features table came back
    empty and the collection served READY with nothing to re-rank by (an outside test)."""
    data = tmp_path / "data"
    with catalog(data) as made:
        made.create("c", extractor=TinyExtractor.name, metric="l2", local_features="sift")
    conn = sqlite3.connect(collection_dir(data) / STORE_FILE)
    conn.execute("DROP TABLE local_features")
    conn.commit()
    conn.close()
    assert "lost its local_features table" in unavailable(data)


def test_a_store_damaged_while_serving_is_listed_with_its_reason(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One collection's unreadable store must not make listing fail for everyone (an outside test
    showed INTERNAL for every ListCollections from a store damaged past its spec)."""
    from imagesearch.server.store import CollectionStore

    with catalog(data) as opened:
        opened.create("d", extractor=TinyExtractor.name, metric="l2")
        damaged = opened.get("c").store
        count = CollectionStore.count

        def failing(store: CollectionStore, label: str | None = None) -> int:
            if store is damaged:
                raise sqlite3.DatabaseError("database disk image is malformed")
            return count(store, label)

        monkeypatch.setattr(CollectionStore, "count", failing)
        infos = {c.spec.name: c.info() for c in opened.list()}
        assert infos["c"].read_only and "its store cannot be read" in infos["c"].state_reason
        assert not infos["d"].read_only and infos["d"].image_count == 0


@pytest.mark.parametrize("obstacle", ["mount point", "read-only file system"])
def test_a_delete_refused_up_front_keeps_serving_the_collection(
    data: Path, monkeypatch: pytest.MonkeyPatch, obstacle: str
) -> None:
    """A mounted collection directory, or a data directory on a read-only file system, is seen
    before the collection is closed: the delete is refused and the very same collection goes on
    serving (an outside test: it was closed, reopened and, read-only, unavailable until a restart)."""
    from imagesearch.server import catalog as catalog_module

    with catalog(data) as opened:
        served = opened.get("c")
        closed = []
        monkeypatch.setattr(served, "close", lambda **_: closed.append(True))
        if obstacle == "mount point":
            monkeypatch.setattr(
                catalog_module.os.path, "ismount", lambda path: Path(path) == served.directory
            )
        else:
            real_statvfs = os.statvfs

            class ReadOnly:
                def __init__(self, path: Any) -> None:
                    self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

            monkeypatch.setattr(catalog_module.os, "statvfs", ReadOnly)
        with pytest.raises(FailedPrecondition) as error:
            opened.delete("c")
        assert error.value.reason == "DELETE_REFUSED" and obstacle in error.value.message
        assert "still served" in error.value.message and "restart" not in error.value.message
        assert closed == [] and opened.get("c") is served and served.count() == 3
        assert served.directory.is_dir() and not list(served.directory.parent.glob(".deleting-*"))
        monkeypatch.undo()
        opened.delete("c")
        assert opened.list() == []


def test_a_delete_that_cannot_move_the_directory_leaves_the_collection_as_it_was(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only or mounted collection directory (an outside test: the delete answered INTERNAL
    and the collection vanished from every list until the next start, its data still on disk)."""
    from imagesearch.server import catalog as catalog_module

    with catalog(data) as opened:
        opened.create("d", extractor=TinyExtractor.name, metric="l2")
    (collection_dir(data).parent / "d" / STORE_FILE).write_bytes(b"damaged" * 100)  # d: unavailable
    real_replace = os.replace

    def refused(source: Any, target: Any) -> None:
        raise OSError(30, "Read-only file system")

    with catalog(data) as opened:
        assert list(opened.unavailable()) == ["d"]
        monkeypatch.setattr(catalog_module.os, "replace", refused)
        for name in ("c", "d"):
            with pytest.raises(FailedPrecondition) as error:
                opened.delete(name)
            assert error.value.reason == "DELETE_REFUSED" and "Read-only file system" in error.value.message
        assert list(opened.unavailable()) == ["d"]
        assert opened.get("c").count() == 3  # reopened, serving its images
        monkeypatch.setattr(catalog_module.os, "replace", real_replace)
        opened.delete("c")
        opened.delete("d")
        assert opened.list() == [] and opened.unavailable() == {}


def test_create_describes_the_collection_it_made_even_if_it_is_deleted_at_once(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreateCollection used to read the new collection's description after the catalog let it
    go, so a delete by another caller in between made a successful create answer NOT_FOUND."""
    from imagesearch.server import catalog as catalog_module

    with catalog(data) as opened:
        real_info = catalog_module.log.info

        def deleted_by_someone_else(message: str, *args: Any) -> None:
            real_info(message, *args)
            if message.startswith("collection %s created"):
                opened.delete(args[0])

        monkeypatch.setattr(catalog_module.log, "info", deleted_by_someone_else)
        made = opened.create("fleeting", extractor=TinyExtractor.name, metric="cosine")
        assert (made.spec.name, made.spec.metric, made.image_count) == ("fleeting", "cosine", 0)
        with pytest.raises(NotFound):
            opened.get("fleeting")
