"""AddImagesStream checks its next chunk while the one before it commits, with the outcome of
storing them one after the other: the turn primitive, then the real server over gRPC."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from imagesearch.server import servicer
from imagesearch.server.app import run_server
from imagesearch.server.store import CollectionStore
from imagesearch.server.streams import ChunkAbandoned, ChunkOrder
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.images import encode, pattern
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor
from tests.support.uploads import listed_ids, stored_progress

DIM = TinyExtractor.dim


# -- ChunkOrder / ChunkTurn -------------------------------------------------------------------
def test_a_chunk_stores_only_after_the_one_before_it_finished() -> None:
    order, events = ChunkOrder(), []
    first, second = order.turn(), order.turn()

    def store_second() -> None:
        second.wait()
        events.append("second stores")

    waiting = threading.Thread(target=store_second)
    waiting.start()
    time.sleep(0.05)
    assert events == [], "the second chunk waits for the first"
    first.wait()
    events.append("first stores")
    first.stored()
    waiting.join(5)
    assert events == ["first stores", "second stores"]


def test_a_chunk_after_a_failed_one_is_abandoned() -> None:
    order = ChunkOrder()
    first, second = order.turn(), order.turn()
    first.finish(succeeded=False)
    with pytest.raises(ChunkAbandoned):
        second.wait()


def test_a_chunk_that_stored_nothing_after_a_failed_one_passes_the_failure_on() -> None:
    order = ChunkOrder()
    first, middle, last = order.turn(), order.turn(), order.turn()
    first.finish(succeeded=False)
    middle.finish(succeeded=True)  # never waited: it had nothing to store
    with pytest.raises(ChunkAbandoned):
        last.wait()


def test_giving_up_frees_a_chunk_waiting_for_one_that_never_ran() -> None:
    """A cancelled call drops work still queued for a worker: the chunk before never finishes,
    and the one waiting for it must not hold its worker thread for ever."""
    order = ChunkOrder()
    order.turn()  # never runs
    waiting, outcome = order.turn(), []

    def store() -> None:
        try:
            waiting.wait()
            outcome.append("stored")
        except ChunkAbandoned:
            outcome.append("abandoned")

    thread = threading.Thread(target=store)
    thread.start()
    time.sleep(0.05)
    order.give_up()
    thread.join(5)
    assert outcome == ["abandoned"]
    with pytest.raises(ChunkAbandoned):
        order.turn().wait()


# -- over gRPC -------------------------------------------------------------------------------
def vectors(prefix: str, count: int, seed: int = 0) -> list[pb.ImageInput]:
    rows = np.random.default_rng(seed).random((count, DIM), dtype=np.float32) + 0.1
    return [
        pb.ImageInput(id=f"{prefix}{i}", vector=pb.FloatVector(float32_le=row.tobytes()))
        for i, row in enumerate(rows)
    ]


@pytest.fixture
def slow_commits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str, float]]]:
    """Every store insert takes 0.2 s more; records when each chunk's insert began and ended."""
    timeline: list[tuple[str, str, float]] = []
    insert = CollectionStore.insert

    def slow_insert(self, images):
        timeline.append(("insert begins", images[0].id, time.monotonic()))
        time.sleep(0.2)
        try:
            return insert(self, images)
        finally:
            timeline.append(("insert ends", images[0].id, time.monotonic()))

    monkeypatch.setattr(CollectionStore, "insert", slow_insert)
    yield timeline


def test_the_next_chunk_is_checked_while_one_commits_and_stored_after_it(
    stub, slow_commits, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagesearch.server import engine

    check = engine.check_vectors

    def recorded_check(values, collection, fields, **options):
        slow_commits.append(("check begins", fields[0], time.monotonic()))
        return check(values, collection, fields, **options)

    monkeypatch.setattr(engine, "check_vectors", recorded_check)
    chunks = [pb.AddImagesStreamRequest(images=vectors(f"c{n}-", 5, seed=n)) for n in range(3)]
    response = stub.AddImagesStream(iter(chunks))
    assert response.added_count == 15 and response.chunk_count == 3
    assert list(response.ids) == [f"c{n}-{i}" for n in range(3) for i in range(5)]
    assert [r.index for r in response.results] == list(range(15))
    when = {(event, key): at for event, key, at in slow_commits}
    assert when[("check begins", "images[5].vector")] < when[("insert ends", "c0-0")], (
        "chunk 2 is checked while chunk 1 commits"
    )
    assert when[("insert begins", "c1-0")] >= when[("insert ends", "c0-0")], "and stored after it"
    assert when[("insert begins", "c2-0")] >= when[("insert ends", "c1-0")]
    assert set(listed_ids(stub)) == {f"c{n}-{i}" for n in range(3) for i in range(5)}


def test_a_chunk_checked_ahead_is_not_stored_when_the_one_before_it_fails(stub, slow_commits) -> None:
    bad = vectors("bad", 2, seed=7)
    bad[1].vector.float32_le = np.full(DIM, np.nan, np.float32).tobytes()
    chunks = [
        pb.AddImagesStreamRequest(images=vectors("a", 4, seed=1)),
        pb.AddImagesStreamRequest(images=bad),
        pb.AddImagesStreamRequest(images=vectors("c", 4, seed=3)),
    ]
    with pytest.raises(grpc.RpcError) as error:
        stub.AddImagesStream(iter(chunks))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk 2" in error.value.details() and "images[5]" in error.value.details()
    assert "4 images from earlier chunks were stored" in error.value.details()
    assert set(listed_ids(stub)) == {f"a{i}" for i in range(4)}, "neither the bad chunk nor the one after it"


def test_a_chunk_repeating_an_id_of_the_chunk_before_waits_for_it_and_is_refused_per_item(stub) -> None:
    first = vectors("x", 3, seed=1)
    second = [vectors("x", 1, seed=2)[0], *vectors("y", 2, seed=3)]  # "x0" again
    response = stub.AddImagesStream(
        iter(
            [
                pb.AddImagesStreamRequest(images=first, skip_invalid=True),
                pb.AddImagesStreamRequest(images=second),
            ]
        )
    )
    assert response.added_count == 5
    repeated = response.results[3]
    assert repeated.code == grpc.StatusCode.ALREADY_EXISTS.value[0] and "images[3]" in repeated.message
    assert set(listed_ids(stub)) == {"x0", "x1", "x2", "y0", "y1"}


def test_a_chunk_waiting_for_its_turn_holds_no_decoding_budget(
    data_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget of decoded pixels is one chunk's worth. Chunk 2 reaches it first (chunk 1 is
    slow to be read) and must wait for chunk 1's turn: holding the budget meanwhile, it would
    leave chunk 1 waiting for pixels, and both for ever."""
    image_pixels = 96 * 128  # tests.support.images.pattern's default size
    limits = {"max_decoding_pixels": 2 * image_pixels, "max_batch_pixels": 2 * image_pixels}
    read = servicer.image_item

    def first_chunk_read_late(message: pb.ImageInput):
        if message.id == "c1-0":
            time.sleep(0.3)
        return read(message)

    monkeypatch.setattr(servicer, "image_item", first_chunk_read_late)
    chunks = [
        pb.AddImagesStreamRequest(
            images=[pb.ImageInput(id=f"c{n}-{i}", content=encode(pattern(10 * n + i))) for i in range(2)]
        )
        for n in (1, 2, 3)
    ]
    with (
        run_server(tiny_config(data_dir, limits=limits), extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as channel,
    ):
        response = pb_grpc.ImageSearchServiceStub(channel).AddImagesStream(iter(chunks), timeout=20)
    assert response.added_count == 6
    assert list(response.ids) == [f"c{n}-{i}" for n in (1, 2, 3) for i in range(2)]


def test_a_cancelled_stream_leaves_no_worker_waiting_for_a_chunk_that_never_ran(
    data_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the one worker busy, a stream's chunks queue for it; the client cancels, and work not
    yet started is dropped. A chunk that then waits for its turn behind a dropped one must give
    up, or it holds the worker for ever and every later call hangs."""
    release = threading.Event()
    extract = TinyExtractor.extract

    def held_extract(self, images):
        assert release.wait(10)
        return extract(self, images)

    monkeypatch.setattr(TinyExtractor, "extract", held_extract)
    keep_open = threading.Event()

    def chunks() -> Iterator[pb.AddImagesStreamRequest]:
        for n in range(3):
            yield pb.AddImagesStreamRequest(images=vectors(f"c{n}-", 5, seed=n))
        keep_open.wait(10)

    with (
        run_server(tiny_config(data_dir, workers=1), extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as channel,
    ):
        stub = pb_grpc.ImageSearchServiceStub(channel)
        busy = stub.AddImages.future(
            pb.AddImagesRequest(images=[pb.ImageInput(id="busy", content=encode(pattern(1)))])
        )
        time.sleep(0.2)  # the worker is extracting
        stream = stub.AddImagesStream.future(chunks())
        time.sleep(0.3)  # its chunks are queued behind
        stream.cancel()
        keep_open.set()
        release.set()
        assert busy.result(timeout=10).added_count == 1
        after = stub.AddImages(pb.AddImagesRequest(images=vectors("after", 1, seed=9)), timeout=5)
        assert after.added_count == 1


def test_a_large_failed_stream_says_what_it_stored_within_a_status_clients_accept(stub) -> None:
    """800 stored ids made a status past gRPC's default 16 KiB limit for trailing metadata: the
    client got RESOURCE_EXHAUSTED and no word of what was stored. The detail now lists only the
    images not stored when all of them would not fit."""
    good = [
        pb.AddImagesStreamRequest(images=vectors(f"c{n}-", 100, seed=n), skip_invalid=True) for n in range(8)
    ]
    refused = good[3].images[7]
    refused.vector.float32_le = b"\x00\x00\x80\x7f" * DIM  # +inf: refused under skip_invalid
    too_many = vectors("many", 257, seed=99)  # past max_batch_size: the chunk fails whole
    with pytest.raises(grpc.RpcError) as caught:
        stub.AddImagesStream(iter([*good, pb.AddImagesStreamRequest(images=too_many)]))
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert (
        error.details().startswith("chunk 9:")
        and "799 images from earlier chunks were stored" in error.details()
    )
    progress = stored_progress(error)
    assert progress.stored_ids_omitted and progress.added_count == 799 and progress.chunk_count == 9
    assert [r.index for r in progress.results] == [307] and progress.results[0].reason == "NON_FINITE_VECTOR"
    stored = stub.GetCollection(pb.GetCollectionRequest(name="default")).collection.image_count
    assert stored == 799


def test_a_small_failed_stream_still_lists_every_image(stub) -> None:
    bad = vectors("bad", 1, seed=99)
    bad[0].vector.float32_le = b"\x00" * 3
    with pytest.raises(grpc.RpcError) as caught:
        stub.AddImagesStream(
            iter([pb.AddImagesStreamRequest(images=vectors("a", 5)), pb.AddImagesStreamRequest(images=bad)])
        )
    progress = stored_progress(caught.value)
    assert not progress.stored_ids_omitted and list(progress.ids) == [f"a{i}" for i in range(5)]


def test_the_python_client_reports_what_a_large_failed_upload_stored(server, stub, tmp_path) -> None:
    """add_files of 400 files and one that is not an image: the error's details say 400 were
    stored (before, the status was too large for the client and said nothing)."""
    from imagesearch.client import ImageSearchClient, InvalidArgument

    paths = []
    for n in range(400):
        paths.append(tmp_path / f"{n:03}.png")
        paths[-1].write_bytes(encode(pattern(n, size=(8, 8))))
    paths.append(tmp_path / "not-an-image.png")
    paths[-1].write_bytes(b"not an image at all")
    with ImageSearchClient(server.target) as client, pytest.raises(InvalidArgument) as caught:
        client.add_files(paths, batch_size=100)
    stored = caught.value.details.stored
    assert stored is not None and stored.added_count == 400 and stored.stored_ids_omitted
    assert stub.GetCollection(pb.GetCollectionRequest(name="default")).collection.image_count == 400


def test_a_stream_never_goes_on_into_a_collection_created_again_under_its_name(stub) -> None:
    """Deleted and created again between two chunks: the stream fails NOT_FOUND, as an AddImages
    would, and nothing of it lands in the new collection (an outside test: chunk 2 went into the
    new one and the stream ended OK)."""
    stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name="c", metric="l2")))
    sent: queue.Queue = queue.Queue()
    call = stub.AddImagesStream.future(iter(sent.get, None), timeout=30)
    sent.put(pb.AddImagesStreamRequest(collection="c", images=vectors("old", 5, seed=1)))
    deadline = time.monotonic() + 10
    while stub.GetCollection(pb.GetCollectionRequest(name="c")).collection.image_count < 5:
        assert time.monotonic() < deadline, "chunk 1 was stored"
        time.sleep(0.02)
    stub.DeleteCollection(pb.DeleteCollectionRequest(name="c"))
    stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name="c", metric="cosine")))
    sent.put(pb.AddImagesStreamRequest(images=vectors("new", 5, seed=2)))
    sent.put(None)
    with pytest.raises(grpc.RpcError) as error:
        call.result()
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "chunk 2" in error.value.details()
    assert "'c' was deleted" in error.value.details()
    assert stub.GetCollection(pb.GetCollectionRequest(name="c")).collection.image_count == 0


def test_a_stream_whose_first_chunk_is_empty_adds_to_the_collection_there_when_images_come(stub) -> None:
    """The collection is looked up at the first chunk with images (an outside test: an empty first
    chunk naming a collection created a moment later failed NOT_FOUND)."""
    sent: queue.Queue = queue.Queue()
    call = stub.AddImagesStream.future(iter(sent.get, None), timeout=30)
    sent.put(pb.AddImagesStreamRequest(collection="late"))
    time.sleep(0.2)  # the empty chunk is read before the collection exists
    stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name="late", metric="l2")))
    sent.put(pb.AddImagesStreamRequest(images=vectors("x", 3, seed=4)))
    sent.put(None)
    assert call.result().added_count == 3
    assert stub.GetCollection(pb.GetCollectionRequest(name="late")).collection.image_count == 3
