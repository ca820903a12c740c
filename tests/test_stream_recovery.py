"""A stream that fails, or that a shutdown cuts, tells the client what it stored; client ids with
skip_existing make the retry store every image exactly once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from imagesearch.client import AlreadyExists, ImageItem, ImageSearchClient, InvalidArgument, ResourceExhausted
from imagesearch.server.app import run_server
from imagesearch.server.servicer import ADDED_COUNT_KEY
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.images import encode, pattern
from tests.support.process import tiny_server
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor
from tests.support.uploads import listed_ids, stored_progress

pytestmark = pytest.mark.e2e


def chunk(first: int, count: int, **fields) -> pb.AddImagesStreamRequest:
    images = [
        pb.ImageInput(id=f"img{i}", content=encode(pattern(i, size=(24, 32))))
        for i in range(first, first + count)
    ]
    return pb.AddImagesStreamRequest(images=images, **fields)


def test_a_failed_chunk_reports_what_earlier_chunks_stored(stub):
    bad = pb.AddImagesStreamRequest(images=[pb.ImageInput(id="bad", content=b"not an image at all")])
    with pytest.raises(grpc.RpcError) as caught:
        stub.AddImagesStream(iter([chunk(0, 3), chunk(3, 2), bad, chunk(5, 2)]))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "5 images from earlier chunks were stored" in error.details()
    progress = stored_progress(error)
    assert list(progress.ids) == [f"img{i}" for i in range(5)] and progress.added_count == 5
    assert (ADDED_COUNT_KEY, "5") in error.trailing_metadata()
    assert listed_ids(stub) == [f"img{i}" for i in range(5)]


def test_skip_existing_makes_a_retry_store_each_image_once(stub):
    stub.AddImagesStream(iter([chunk(0, 3)]))
    retry = stub.AddImagesStream(iter([chunk(0, 3, skip_existing=True), chunk(3, 3)]))
    assert retry.added_count == 3
    assert [r.code for r in retry.results] == [grpc.StatusCode.ALREADY_EXISTS.value[0]] * 3 + [0] * 3
    assert list(retry.ids) == [f"img{i}" for i in range(6)]
    assert listed_ids(stub) == [f"img{i}" for i in range(6)]
    with pytest.raises(grpc.RpcError) as caught:  # without it, a stored id still fails the batch
        stub.AddImages(pb.AddImagesRequest(images=[chunk(0, 1).images[0]]))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_the_sdk_upload_says_how_to_finish_and_finishing_stores_each_file_once(server, tmp_path):
    paths = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"broken" if i == 4 else encode(pattern(i, size=(24, 32))))
        paths.append(path)
    with ImageSearchClient(server.target) as client:
        with pytest.raises(InvalidArgument) as caught:
            client.add_files(paths, batch_size=2)
        error = caught.value
        assert error.details.stored is not None and error.details.stored.added_count == 4
        assert len(error.upload_ids) == 8 and "ids=error.upload_ids" in "".join(error.__notes__)
        paths[4].write_bytes(encode(pattern(4, size=(24, 32))))
        finished = client.add_files(paths, ids=error.upload_ids, skip_existing=True, batch_size=2)
        assert finished.added_count == 4
        stored = {image.id for image in client.iter_images()}
    assert stored == set(error.upload_ids)


def test_a_local_error_mid_upload_keeps_every_chunk_sent_and_says_how_to_finish(server, tmp_path):
    """A file deleted mid-upload (or a failing progress callback) ends the stream cleanly: every
    chunk sent before it is stored (a cancelled call made the server drop chunks gRPC had taken),
    and the error carries what was stored and the ids to finish with."""
    paths = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        path.write_bytes(encode(pattern(i, size=(24, 32))))
        paths.append(path)

    def lose_a_later_file(sent: int, total: int) -> None:
        if sent == 8:
            paths[10].unlink()

    with ImageSearchClient(server.target) as client:
        with pytest.raises(FileNotFoundError) as caught:
            client.add_files(paths, batch_size=2, progress=lose_a_later_file)
        error = caught.value
        assert error.stored.added_count == 10  # chunks 1-5: the one holding the lost file never went
        assert "10 of 12 images were stored" in "".join(error.__notes__)
        assert len({image.id for image in client.iter_images()}) == 10
        paths[10].write_bytes(encode(pattern(10, size=(24, 32))))
        finished = client.add_files(paths, ids=error.upload_ids, skip_existing=True, batch_size=2)
        assert finished.added_count == 2
        assert {image.id for image in client.iter_images()} == set(error.upload_ids)


def slow_stream(stop_after: threading.Event, sent: list[int]) -> Iterator[pb.AddImagesStreamRequest]:
    """Chunks of two images, 20 a second, until told to stop (the server will cut it first)."""
    for number in range(400):
        if stop_after.is_set() and number > sent[0] + 50:
            return
        yield chunk(2 * number, 2, skip_existing=True)
        sent[0] = number
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_cuts_a_stream_at_a_chunk_and_says_exactly_what_was_stored(data_dir):
    server = tiny_server(data_dir)
    sent, terminated = [0], threading.Event()

    def terminate_soon() -> None:
        time.sleep(0.6)
        server.proc.terminate()
        terminated.set()

    with grpc.insecure_channel(server.target) as chan:
        threading.Thread(target=terminate_soon, daemon=True).start()
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.ImageSearchServiceStub(chan).AddImagesStream(slow_stream(terminated, sent))
    assert server.proc.wait(30) == 0
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    progress = stored_progress(error)
    assert progress.added_count > 0
    again = tiny_server(data_dir)
    try:
        with grpc.insecure_channel(again.target) as chan:
            stub = pb_grpc.ImageSearchServiceStub(chan)
            assert listed_ids(stub) == list(progress.ids)
            total = 2 * (sent[0] + 1)
            resumed = stub.AddImagesStream(iter([chunk(0, total, skip_existing=True)]))
            assert resumed.added_count == total - progress.added_count
            assert sorted(listed_ids(stub)) == sorted(f"img{i}" for i in range(total))
    finally:
        again.terminate()


def _photos(tmp_path, count: int) -> list:
    paths = []
    for i in range(count):
        path = tmp_path / f"{i}.png"
        path.write_bytes(encode(pattern(i, size=(24, 32))))
        paths.append(path)
    return paths


def test_a_ctrl_c_mid_upload_carries_the_ids_to_finish_with(server, tmp_path, ctrl_c_raises):
    """Ctrl-C during add_files without ids escaped with nothing to resume by: chunks already sent
    were stored under ids the caller never saw, and the re-run stored them twice (an outside test)."""
    import _thread

    paths = _photos(tmp_path, 12)

    def interrupt_after_the_second_chunk(sent: int, total: int) -> None:
        if sent == 4:
            time.sleep(0.3)  # the server stores the two chunks sent so far
            _thread.interrupt_main()

    with ImageSearchClient(server.target) as client:
        with pytest.raises(KeyboardInterrupt) as caught:
            client.add_files(paths, batch_size=2, progress=interrupt_after_the_second_chunk)
            time.sleep(5)  # the interrupt lands here if the upload ended before it
        error = caught.value
        assert len(error.upload_ids) == 12 and "ids=error.upload_ids" in "".join(error.__notes__)
        finished = client.add_files(paths, ids=error.upload_ids, skip_existing=True, batch_size=2)
        stored = [image.id for image in client.iter_images()]
    assert sorted(stored) == sorted(error.upload_ids) and finished.added_count < 12


def test_a_cancelled_async_upload_carries_the_ids_to_finish_with(server, tmp_path):
    import asyncio

    from imagesearch.client.aio import AsyncImageSearchClient

    paths = _photos(tmp_path, 12)

    async def cancel_mid_upload() -> tuple[BaseException, int]:
        sent = threading.Event()

        def slow_after_two_chunks(done: int, total: int) -> None:  # runs off the loop, in the reader
            if done >= 4:
                sent.set()
                time.sleep(0.5)

        async with AsyncImageSearchClient(server.target) as client:
            task = asyncio.create_task(client.add_files(paths, batch_size=2, progress=slow_after_two_chunks))
            while not sent.is_set():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the server stores the chunks sent so far
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as caught:
                await task
            error = caught.value
            finished = await client.add_files(paths, ids=error.upload_ids, skip_existing=True, batch_size=2)
            stored = [image.id async for image in client.iter_images()]
            assert sorted(stored) == sorted(error.upload_ids)
            return error, finished.added_count

    error, added = asyncio.run(cancel_mid_upload())
    assert len(error.upload_ids) == 12 and "ids=error.upload_ids" in "".join(error.__notes__) and added < 12


def test_a_keyboard_interrupt_from_progress_ends_the_upload_instead_of_hanging_it(server, tmp_path):
    """It killed gRPC's sending thread, and the call hung until its deadline (a helper's review)."""
    paths = _photos(tmp_path, 12)

    def interrupt(sent: int, total: int) -> None:
        if sent == 4:
            raise KeyboardInterrupt

    with ImageSearchClient(server.target) as client:
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt) as caught:
            client.add_files(paths, batch_size=2, progress=interrupt, timeout=60)
        assert time.monotonic() - started < 30
        error = caught.value
        assert error.stored.added_count == 4 and len(error.upload_ids) == 12
        client.add_files(paths, ids=error.upload_ids, skip_existing=True, batch_size=2)
        assert sorted(image.id for image in client.iter_images()) == sorted(error.upload_ids)


def test_failed_holds_rejections_and_already_stored_the_images_left_as_they_were(server):
    """``failed`` listed the images a resume skipped as already stored; images the server rejects
    with the same code (an id twice in a request, an id taken without skip_existing) stay in it
    (an outside test of the client)."""
    image = ImageItem(id="a", content=encode(pattern(1)))
    with ImageSearchClient(server.target) as client:
        client.add_images([image])
        resumed = client.add_images(
            [image, ImageItem(id="b", content=encode(pattern(2)))], skip_existing=True
        )
        assert ([r.id for r in resumed.already_stored], resumed.failed, resumed.added_count) == (["a"], (), 1)
        taken = client.add_images([image], skip_invalid=True)
        twice = client.add_images([ImageItem(id="c", content=encode(pattern(3)))] * 2, skip_invalid=True)
    assert (taken.already_stored, [r.reason for r in taken.failed]) == ((), ["IMAGE_EXISTS"])
    assert (twice.already_stored, [r.reason for r in twice.failed]) == ((), ["DUPLICATE_ID"])


def test_the_client_says_when_to_retry_a_stream_refused_by_back_pressure(data_dir, tmp_path):
    """The server's RetryInfo reached no caller of the client (parse_details dropped it)."""
    paths = _photos(tmp_path, 2)
    first_chunk_sent, release = threading.Event(), threading.Event()

    def hold_the_stream_open(sent: int, total: int) -> None:
        first_chunk_sent.set()
        release.wait(10)

    config = tiny_config(data_dir, limits={"max_streams_per_peer": 1})
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        holder = threading.Thread(
            target=client.add_files, args=(paths,), kwargs={"batch_size": 1, "progress": hold_the_stream_open}
        )
        holder.start()
        try:
            assert first_chunk_sent.wait(10)
            with pytest.raises(ResourceExhausted) as caught:
                client.add_files(paths[:1])
        finally:
            release.set()
            holder.join(10)
    assert (caught.value.reason, caught.value.retry_delay) == ("TOO_MANY_STREAMS", 1.0)


def test_an_upload_larger_than_the_servers_batches_is_sent_again_in_chunks_it_takes(data_dir, tmp_path):
    """A server with a lowered max_batch_size refused every `imagesearch add` and `eval` at their
    defaults (chunks of 32), and "run the same command again" failed the same way (an outside
    test). add_files sends again in the chunks the refusal names, each image stored once; so does
    the asyncio client, and the folder import and evaluation that use it."""
    import asyncio

    from imagesearch.client.aio import AsyncImageSearchClient

    paths = _photos(tmp_path, 11)
    config = tiny_config(data_dir, limits={"max_batch_size": 4})
    with run_server(config, extra_plugins=[TINY_PLUGIN]) as running:
        with ImageSearchClient(running.target) as client:
            client.create_collection("sync", extractor=TinyExtractor.name)
            added = client.add_files(paths, collection="sync")
            assert added.added_count == 11 and added.chunk_count == 3
            assert sorted(image.id for image in client.iter_images(collection="sync")) == sorted(added.ids)
            # ids the server makes: sent again only because the refusal stored nothing
            assert client.add_files(paths, ids=[""] * 11, collection="sync").added_count == 11
            assert client.get_collection("sync").image_count == 22
            # the caller's skip_existing is kept: a taken id fails as on a server that took the
            # chunks at once (the resend turned it on, and the image was silently not stored)
            client.add_images(
                [ImageItem(id="f10", content=paths[0].read_bytes(), label="old")], collection="sync"
            )
            with pytest.raises(AlreadyExists, match="'f10' already exists"):
                client.add_files(paths, ids=[f"f{n}" for n in range(11)], collection="sync")
            assert client.get_image("f10", collection="sync").label == "old"
            client.create_collection("async", extractor=TinyExtractor.name)

        async def upload():
            async with AsyncImageSearchClient(running.target) as client:
                return await client.add_files(paths, ids=[p.stem for p in paths], collection="async")

        assert asyncio.run(upload()).added_count == 11


def _noise(path, side: int, seed: int):
    """A PNG of random pixels: about 3 bytes a pixel, whatever PNG tries."""
    path.write_bytes(encode(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)))
    return path


def test_an_upload_larger_than_the_servers_messages_is_sent_within_them(data_dir, tmp_path):
    """gRPC refuses a request over the server's max_message_bytes itself, with no reason or limit:
    a server with a limit below the client's failed every `imagesearch add` for good, "run the same
    command again" included (an outside test). The refusal now reads MESSAGE_TOO_LARGE with the
    server's limit; add_files sends again in chunks within it, names a file that no message can
    carry, and the folder import lists that file and stores the rest."""
    from imagesearch.client import add_folder

    small = [_noise(tmp_path / f"s{i}.png", 80, i) for i in range(6)]  # ~19 KB each, 3 a message
    (tmp_path / "folder" / "cats").mkdir(parents=True)
    big = _noise(tmp_path / "folder" / "cats" / "big.png", 200, 99)  # ~120 KB: over the limit alone
    for path in small[:2]:
        (tmp_path / "folder" / "cats" / path.name).write_bytes(path.read_bytes())
    limit = 64 * 1024
    config = tiny_config(data_dir, limits={"max_message_bytes": limit})
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        client.create_collection("c", extractor=TinyExtractor.name)
        with pytest.raises(ResourceExhausted) as refused:
            client.add_images([big], collection="c")
        assert refused.value.reason == "MESSAGE_TOO_LARGE"
        assert refused.value.details.metadata["limit"] == str(limit)
        assert "more than the server takes in one message (65536 bytes" in refused.value.message

        added = client.add_files(small, collection="c")
        assert added.added_count == 6 and added.chunk_count >= 2
        with pytest.raises(ResourceExhausted, match=r"big\.png alone needs \d+ bytes") as too_large:
            client.add_files([*small, big], ids=[p.stem for p in [*small, big]], collection="c")
        assert too_large.value.reason == "MESSAGE_TOO_LARGE"
        assert client.get_collection("c").image_count == 6  # the refused chunk stored nothing

        imported = add_folder(client, tmp_path / "folder", collection="c")
        assert imported.stored == 2
        assert [(f.id, f.reason) for f in imported.failed] == [("cats/big.png", "FILE_TOO_LARGE")]
        assert "the server's max_message_bytes" in imported.failed[0].message
        assert client.get_collection("c").image_count == 8
