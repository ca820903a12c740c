"""A full disk under the data directory: every write it stops answers RESOURCE_EXHAUSTED, reason
DISK_FULL, saying so; nothing half-written stays behind, and the server keeps serving.

The disk is simulated (no root, no small mount): SQLite's COMMIT fails as a full disk makes it
fail (SQLite rolls the transaction back itself), and the snapshot writer meets ENOSPC mid-file.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagesearch.server import snapshot as snapshot_module
from imagesearch.server.app import RunningServer
from imagesearch.server.collection import SNAPSHOT_FILE
from imagesearch.server.store import CollectionStore
from imagesearch.v1 import image_search_service_pb2 as pb
from tests.support.tiny_plugin import TinyExtractor

FULL = "database or disk is full"


class FullAtCommit:
    """The store's writer connection on a full disk: COMMIT fails, and SQLite has already rolled
    the transaction back (a ROLLBACK then says "no transaction is active")."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self._conn.execute("ROLLBACK")
            raise sqlite3.OperationalError(FULL)
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@contextmanager
def full_disk(store: CollectionStore) -> Iterator[None]:
    real = store._writer
    store._writer = FullAtCommit(real)  # type: ignore[assignment]
    try:
        yield
    finally:
        store._writer = real


def vectors(prefix: str, count: int) -> list[pb.ImageInput]:
    rng = np.random.default_rng(len(prefix) + count)
    return [
        pb.ImageInput(id=f"{prefix}{i}", vector=pb.FloatVector(values=rng.standard_normal(TinyExtractor.dim)))
        for i in range(count)
    ]


def refused(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    return caught.value


def reason_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    (detail,) = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    return info.reason


def assert_disk_full(error: grpc.RpcError, outcome: str) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(error) == "DISK_FULL"
    assert f"the disk holding the server's data directory is full, so {outcome}" in error.details()


def count(stub: Any) -> int:
    return stub.GetCollection(pb.GetCollectionRequest(name="default")).collection.image_count


def test_writes_on_a_full_disk_say_so_store_nothing_and_the_server_goes_on(
    server: RunningServer, stub: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stub.AddImages(pb.AddImagesRequest(images=vectors("a", 5)))
    store = server.engine.catalog.get("default").store
    with full_disk(store), caplog.at_level(logging.ERROR):
        added = refused(stub.AddImages, pb.AddImagesRequest(images=vectors("b", 3)))
        removed = refused(stub.RemoveImages, pb.RemoveImagesRequest(ids=["a0"]))
        hits = stub.Search(pb.SearchRequest(image_id="a1", top_k=3)).hits  # reads go on
    assert_disk_full(added, "nothing was stored")
    assert_disk_full(removed, "nothing was removed")  # said "stored" (an outside test)
    assert "cannot rollback" not in caplog.text and "unhandled error" not in caplog.text
    assert f"{FULL})" in caplog.text  # the operator sees the low-level cause in the log
    assert hits[0].id == "a1"
    assert count(stub) == 5 and not store._writer.in_transaction
    stub.AddImages(pb.AddImagesRequest(images=vectors("b", 3)))  # space again: no restart needed
    stub.RemoveImages(pb.RemoveImagesRequest(ids=["a0"]))
    assert count(stub) == 7


def test_a_collection_not_created_on_a_full_disk_leaves_no_directory(
    server: RunningServer, stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_args: Any) -> None:
        raise sqlite3.OperationalError(FULL)

    monkeypatch.setattr(CollectionStore, "set_meta", full)  # the new store's first write
    wanted = pb.Collection(name="c2", extractor=TinyExtractor.name)
    error = refused(stub.CreateCollection, pb.CreateCollectionRequest(collection=wanted))
    assert_disk_full(error, "collection 'c2' was not created")
    root = server.config.data_dir / "collections"
    assert sorted(p.name for p in root.iterdir()) == ["default"]
    monkeypatch.undo()
    stub.CreateCollection(pb.CreateCollectionRequest(collection=wanted))
    assert stub.GetCollection(pb.GetCollectionRequest(name="c2")).collection.name == "c2"


def test_a_snapshot_on_a_full_disk_is_logged_and_leaves_no_temp_file(
    server: RunningServer, stub: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    collection = server.engine.catalog.get("default")
    stub.AddImages(pb.AddImagesRequest(images=vectors("a", 5)))
    real_write = snapshot_module._CrcWriter.__call__

    def write_then_run_out(self: Any, data: bytes) -> int:
        real_write(self, data)  # part of the file is on disk when space runs out
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(snapshot_module._CrcWriter, "__call__", write_then_run_out)
    with caplog.at_level(logging.ERROR):
        server.engine.catalog.snapshot_due(every_ops=1, interval_s=0)
    assert "snapshot failed: the disk holding the server's data directory is full" in caplog.text
    assert "the index snapshot was not written" in caplog.text
    assert caplog.text.count("the index snapshot was not written") == 1  # once, with the collection's name
    assert [p.name for p in collection.directory.iterdir() if p.name.endswith(".tmp")] == []
    assert not (collection.directory / SNAPSHOT_FILE).exists()
    assert collection.pending_ops() == 5  # still due: retried on the next round
    monkeypatch.undo()
    stub.AddImages(pb.AddImagesRequest(images=vectors("b", 2)))
    server.engine.catalog.snapshot_due(every_ops=1, interval_s=0)
    assert (collection.directory / SNAPSHOT_FILE).exists() and collection.pending_ops() == 0
