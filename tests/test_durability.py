"""Data survives restarts and crashes: kill -9 after an acknowledged write, damaged snapshots, the data-dir lock."""

from __future__ import annotations

import errno
import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagesearch.client import ImageSearchClient
from imagesearch.server.app import run_server
from imagesearch.server.catalog import DataDirLock
from imagesearch.server.collection import SNAPSHOT_FILE
from imagesearch.server.errors import DataDirLocked
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.images import encode, pattern
from tests.support.process import tiny_server
from tests.support.tiny_plugin import TINY_PLUGIN

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def add_range(stub, start: int, stop: int) -> None:
    images = [
        pb.ImageInput(id=f"img{i}", content=encode(pattern(i)), label=str(i % 2)) for i in range(start, stop)
    ]
    assert stub.AddImages(pb.AddImagesRequest(images=images)).added_count == stop - start


def check_all_present(target: str, count: int) -> None:
    with grpc.insecure_channel(target) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        listed = stub.ListImages(pb.ListImagesRequest(page_size=1000))
        assert [i.id for i in listed.images] == [f"img{i}" for i in range(count)]
        for i in (0, count // 2, count - 1):
            assert stub.Search(pb.SearchRequest(image=encode(pattern(i)), top_k=1)).hits[0].id == f"img{i}"


def test_acknowledged_adds_survive_kill_9(data_dir):
    server = tiny_server(data_dir)
    with grpc.insecure_channel(server.target) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        for start in range(0, 40, 10):
            add_range(stub, start, start + 10)
    server.kill9()  # no snapshot was ever written: everything comes back from SQLite
    assert not (data_dir / "collections" / "default" / SNAPSHOT_FILE).exists()
    again = tiny_server(data_dir)
    try:
        check_all_present(again.target, 40)
    finally:
        assert again.terminate() == 0


def test_snapshot_plus_tail_replay_after_kill_9(data_dir):
    server = tiny_server(data_dir, "snapshot_every_ops=10", "snapshot_interval_s=0.2")
    with grpc.insecure_channel(server.target) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        add_range(stub, 0, 30)
        snapshot = data_dir / "collections" / "default" / SNAPSHOT_FILE
        deadline = time.monotonic() + 20
        while not snapshot.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert snapshot.exists(), "the snapshotter should have written the index"
        stub.RemoveImages(pb.RemoveImagesRequest(ids=["img29"]))
        add_range(stub, 30, 35)
    server.kill9()
    again = tiny_server(data_dir)
    try:
        with grpc.insecure_channel(again.target) as chan:
            stub = pb_grpc.ImageSearchServiceStub(chan)
            ids = [i.id for i in stub.ListImages(pb.ListImagesRequest(page_size=100)).images]
            assert ids == [f"img{i}" for i in range(35) if i != 29]
            hits = stub.Search(pb.SearchRequest(image=encode(pattern(29)), top_k=40)).hits
            assert "img29" not in {h.id for h in hits} and len(hits) == 34
            assert stub.Search(pb.SearchRequest(image=encode(pattern(33)), top_k=1)).hits[0].id == "img33"
    finally:
        assert again.terminate() == 0


def test_damaged_snapshot_is_rebuilt_from_the_store(data_dir, caplog):
    config = tiny_config(data_dir)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        add_range(pb_grpc.ImageSearchServiceStub(chan), 0, 12)
    snapshot = data_dir / "collections" / "default" / SNAPSHOT_FILE
    assert snapshot.exists(), "a clean stop writes a snapshot"
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    with run_server(config, extra_plugins=[TINY_PLUGIN]) as running:
        check_all_present(running.target, 12)
    assert "snapshot unusable" in caplog.text and "checksum" in caplog.text


def test_one_process_owns_a_data_directory(data_dir):
    config = tiny_config(data_dir)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]),
        pytest.raises(DataDirLocked, match="in use by another process"),
        run_server(config, extra_plugins=[TINY_PLUGIN]),
    ):
        pass
    with run_server(config, extra_plugins=[TINY_PLUGIN]):  # released on stop
        pass


def test_a_deleted_lock_file_does_not_let_a_second_server_in(data_dir):
    """The LOCK file is left by a kill -9, pid and all, which invites deleting it; deleted while a
    server ran, it let a second one open the same collections (an outside test: their indexes
    disagreed and an add went into a collection the other had deleted). The directory's own lock
    holds."""
    config = tiny_config(data_dir)
    with run_server(config, extra_plugins=[TINY_PLUGIN]):
        (data_dir / "LOCK").unlink()
        with (
            pytest.raises(DataDirLocked, match="in use by another process"),
            run_server(config, extra_plugins=[TINY_PLUGIN]),
        ):
            pass
    with run_server(config, extra_plugins=[TINY_PLUGIN]):  # released on stop, LOCK made again
        assert (data_dir / "LOCK").read_text().strip() == str(os.getpid())


def test_a_data_directory_that_cannot_be_written_is_named_with_what_to_do(data_dir, monkeypatch):
    """A read-only file system stopped start-up with a bare ``[Errno 30] ... LOCK``."""
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith("LOCK"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(DataDirLocked, match=r"cannot be written .*mount it read-write"):
        DataDirLock(data_dir)
    monkeypatch.undo()
    DataDirLock(data_dir).release()  # nothing was left locked


def test_sigterm_drains_and_persists(data_dir):
    server = tiny_server(data_dir)
    with grpc.insecure_channel(server.target) as chan:
        add_range(pb_grpc.ImageSearchServiceStub(chan), 0, 5)
    assert server.terminate() == 0
    assert (data_dir / "collections" / "default" / SNAPSHOT_FILE).exists()
    again = tiny_server(data_dir)
    try:
        check_all_present(again.target, 5)
    finally:
        again.terminate()


def health_of(stub: health_pb2_grpc.HealthStub, collection: str) -> int:
    service = f"imagesearch.v1.ImageSearchService/{collection}"
    return stub.Check(health_pb2.HealthCheckRequest(service=service)).status


def test_an_unreadable_store_is_reported_while_the_others_serve(data_dir):
    config = tiny_config(data_dir)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        stub = pb_grpc.ImageSearchServiceStub(chan)
        add_range(stub, 0, 3)
        stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name="other")))
    store = data_dir / "collections" / "other" / "store.sqlite3"
    store.write_bytes(b"this is not a database" * 100)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        stub = pb_grpc.ImageSearchServiceStub(chan)
        health = health_pb2_grpc.HealthStub(chan)
        check_all_present(running.target, 3)
        assert health_of(health, "default") == health_pb2.HealthCheckResponse.SERVING
        assert health_of(health, "other") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetCollection(pb.GetCollectionRequest(name="other"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "collections/other" in caught.value.details()
        assert "file is not a database" in caught.value.details()
        listed = stub.ListCollections(pb.ListCollectionsRequest(page_size=1))
        assert [c.name for c in listed.collections] == ["default"] and not listed.next_page_token
        (unopened,) = listed.unavailable  # apart, with the same reason GetCollection gives
        assert unopened.name == "other" and unopened.reason in caught.value.details()
        with ImageSearchClient(running.target) as client:
            assert client.unavailable_collections() == {"other": unopened.reason}
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name="other")))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        stub.DeleteCollection(pb.DeleteCollectionRequest(name="other"))  # how an operator clears it
        with pytest.raises(grpc.RpcError) as caught:
            health_of(health, "other")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert not stub.ListCollections(pb.ListCollectionsRequest()).unavailable
    assert not (data_dir / "collections" / "other").exists()
