"""Fast tests of the client: request building, response conversion, error mapping, streaming.

The pure parts are tested directly; everything that crosses the wire runs against
``fake_server`` (real gRPC on a free localhost port, scripted answers and rich
error details), so no model, index or OpenCV is involved.
"""

from __future__ import annotations

import _thread
import asyncio
import inspect
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from imagesearch.client import (
    AddResult,
    AlreadyExists,
    AsyncImageSearchClient,
    CollectionInfo,
    DeadlineExceeded,
    FailedPrecondition,
    HnswParams,
    ImageItem,
    ImageRecord,
    ImageSearchClient,
    ImageSearchError,
    IndexType,
    InvalidArgument,
    ItemResult,
    IvfParams,
    NotFound,
    Query,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)
from imagesearch.client import _requests as R
from imagesearch.client import _upload as U
from imagesearch.v1 import image_search_service_pb2 as pb
from tests.support.fake_server import LISTED_IMAGES, FakeServicer, fake_server

UUID_HEX = re.compile(r"^[0-9a-f]{32}$")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "client.md"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeServicer, str]]:
    with fake_server() as (servicer, target):
        yield servicer, target


@pytest.fixture()
def servicer(served: tuple[FakeServicer, str]) -> FakeServicer:
    return served[0]


@pytest.fixture()
def client(served: tuple[FakeServicer, str]) -> Iterator[ImageSearchClient]:
    with ImageSearchClient(served[1], timeout=10.0, metadata={"X-Api-Key": "k1"}) as client:
        yield client


def _search(**overrides: object) -> pb.SearchRequest:
    args: dict[str, object] = dict(
        image_id=None,
        vector=None,
        top_k=10,
        labels=(),
        metric=None,
        exclude_query=False,
        extractor=None,
        collection=None,
    )
    image = overrides.pop("image", None)
    args.update(overrides)
    return R.search(image, **args).request  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------
# Request building (no server)


def test_search_request_carries_each_query_kind(tmp_path: Path) -> None:
    image_file = tmp_path / "q.jpg"
    image_file.write_bytes(b"jpeg-bytes")

    assert _search(image=b"raw").image == b"raw"
    from_path = _search(image=image_file, labels=["a", "b"], metric="l2", collection="c", top_k=3)
    assert from_path.image == b"jpeg-bytes"
    assert (list(from_path.labels), from_path.metric, from_path.collection, from_path.top_k) == (
        ["a", "b"],
        "l2",
        "c",
        3,
    )
    by_id = _search(image_id="x", exclude_query=True, extractor="sift")
    assert by_id.WhichOneof("query") == "image_id"
    assert (by_id.image_id, by_id.exclude_query, by_id.extractor) == ("x", True, "sift")
    by_vector = _search(vector=np.array([1.0, 2.5, -3.0], dtype=np.float64))
    assert np.frombuffer(by_vector.vector.float32_le, "<f4").tolist() == [1.0, 2.5, -3.0]
    assert not by_vector.vector.values  # packed only: the server refuses both
    assert (by_vector.collection, by_vector.metric) == ("", "")  # server defaults


@pytest.mark.parametrize(
    "overrides",
    [{}, {"image": b"x", "image_id": "y"}, {"image_id": "y", "vector": [1.0]}],
)
def test_search_needs_exactly_one_query(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="exactly one of image, image_id or vector"):
        _search(**overrides)


def test_search_rejects_bad_vectors_and_label_strings() -> None:
    with pytest.raises(ValueError, match="1-D"):
        _search(vector=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-empty"):
        _search(vector=[])
    with pytest.raises(TypeError, match="single string"):
        _search(image_id="x", labels="cat")


def test_search_takes_labels_none_as_no_filter() -> None:
    """``labels=None`` raised "'NoneType' object is not iterable" (an outside test)."""
    assert list(_search(image_id="x", labels=None).labels) == []


def test_add_images_request_from_items_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"png-bytes")
    items = [
        ImageItem(id="one", content=b"abc", label="cat", metadata={"k": "v"}),
        ImageItem(vector=[0.5, 1.5]),
        path,
        str(path),
    ]
    request = R.add_images(items, "col", True, False).request
    assert (request.collection, request.skip_invalid, len(request.images)) == ("col", True, 4)
    first, second, third, fourth = request.images
    assert (first.id, first.content, first.label, dict(first.metadata)) == ("one", b"abc", "cat", {"k": "v"})
    assert second.WhichOneof("source") == "vector"
    assert np.frombuffer(second.vector.float32_le, "<f4").tolist() == [0.5, 1.5]
    assert third.content == fourth.content == b"png-bytes" and third.id == ""


def test_image_item_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ImageItem(id="x")
    with pytest.raises(ValueError, match="exactly one"):
        ImageItem(content=b"a", vector=[1.0])
    with pytest.raises(TypeError, match="bytes"):
        ImageItem(content="not-bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="items\\[0\\]"):
        R.add_images([42], None, False, False)  # type: ignore[list-item]


def test_create_collection_request_params() -> None:
    def build(**kwargs: object) -> pb.Collection:
        args: dict[str, object] = dict(
            extractor=None,
            metric=None,
            index_type="flat",
            ivf=None,
            hnsw=None,
            store_originals=False,
            description="",
        )
        args.update(kwargs)
        return R.create_collection("c", **args).request.collection  # type: ignore[arg-type]

    ivf = build(index_type="IVF", ivf={"nlist": 64, "nprobe": 4}, extractor="sift", metric="l2")
    assert ivf.index_type == pb.INDEX_TYPE_IVF
    assert (ivf.ivf.nlist, ivf.ivf.nprobe, ivf.ivf.train_size) == (64, 4, 0)
    assert (ivf.extractor, ivf.metric) == ("sift", "l2")
    hnsw = build(index_type=IndexType.HNSW, hnsw=HnswParams(m=16), store_originals=True, description="d")
    assert (hnsw.index_type, hnsw.hnsw.m, hnsw.store_originals, hnsw.description) == (
        pb.INDEX_TYPE_HNSW,
        16,
        True,
        "d",
    )
    flat = build()
    assert flat.index_type == pb.INDEX_TYPE_FLAT and not flat.HasField("ivf") and not flat.HasField("hnsw")
    with pytest.raises(ValueError, match="index_type='ivf'"):
        build(ivf={"nlist": 8})
    with pytest.raises(ValueError, match="unknown ivf parameter"):
        build(index_type="ivf", ivf={"nlists": 8})
    with pytest.raises(ValueError, match="unknown index type"):
        build(index_type="annoy")


def test_call_settings_request_id_metadata_and_timeout() -> None:
    settings = R.CallSettings(timeout=5.0, metadata=R.metadata_pairs({"X-Api-Key": "k"}))
    first, first_id = settings.resolve({})
    _, second_id = settings.resolve({})
    assert UUID_HEX.match(first_id) and UUID_HEX.match(second_id) and first_id != second_id
    assert first["metadata"] == (("x-api-key", "k"), (R.REQUEST_ID_HEADER, first_id))
    assert first["timeout"] == 5.0 and "wait_for_ready" not in first

    mine, mine_id = settings.resolve(
        {"request_id": "abc", "timeout": None, "metadata": [("a", "1")], "wait_for_ready": True}
    )
    assert mine_id == "abc"
    assert mine == {
        "timeout": None,
        "metadata": (("x-api-key", "k"), ("a", "1"), (R.REQUEST_ID_HEADER, "abc")),
        "wait_for_ready": True,
    }
    assert settings.resolve({}, deadline=False)[0]["timeout"] is None
    assert settings.resolve({"timeout": 2.0}, deadline=False)[0]["timeout"] == 2.0
    per_call = settings.resolve({"metadata": [("X-Tenant", "t1"), ("trace-bin", b"\x00\x01")]})[0]
    assert per_call["metadata"][1:3] == (("x-tenant", "t1"), ("trace-bin", b"\x00\x01"))


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"colection": "pets"}, TypeError, "unexpected keyword argument(s) colection"),
        ({"metadata": [("x-key", "café")]}, ValueError, "printable ASCII"),
        ({"metadata": [("bad key", "v")]}, ValueError, "may hold only"),
        ({"metadata": [("x-key", b"raw")]}, ValueError, "ending in -bin"),
        ({"request_id": "café-1"}, ValueError, "printable ASCII"),
    ],
)
def test_call_options_are_checked_before_anything_is_sent(options: dict, error: type, text: str) -> None:
    """A misspelt option would otherwise be dropped (a typo in collection= writing to the default
    collection), and a header gRPC cannot send would fail as a bare INTERNAL "Invalid metadata"."""
    with pytest.raises(error, match=re.escape(text)):
        R.CallSettings().resolve(options)  # type: ignore[arg-type]


def test_a_misspelt_option_raises_type_error_from_the_client(tmp_path: Path) -> None:
    with ImageSearchClient("127.0.0.1:1") as client, pytest.raises(TypeError, match="colection"):
        client.search(vector=[1.0, 2.0], colection="pets")  # type: ignore[call-arg]


def test_chunk_sizes_respect_count_and_bytes() -> None:
    assert U._chunk_sizes([10] * 7, 3, 1000) == [3, 3, 1]
    assert U._chunk_sizes([400, 400, 400, 100, 900], 10, 1000) == [2, 2, 1]
    assert U._chunk_sizes([], 3, 1000) == []


def _files(tmp_path: Path, sizes: list[int]) -> list[Path]:
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"class{i % 2}" / f"img{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i % 256]) * size)
        paths.append(path)
    return paths


def test_upload_fails_before_sending_for_bad_files(tmp_path: Path) -> None:
    def plan(paths: list[Path], **kwargs: object) -> U.Upload:
        args: dict[str, object] = dict(
            labels=None,
            ids=None,
            collection=None,
            skip_invalid=False,
            skip_existing=False,
            batch_size=8,
            max_message_bytes=8192,
        )
        args.update(kwargs)
        return U.Upload(paths, progress=None, **args)  # type: ignore[arg-type]

    small, big, other = _files(tmp_path, [100, 8000, 100])
    with pytest.raises(ValueError, match="more than one message may carry"):
        plan([small, big])
    with pytest.raises(FileNotFoundError):
        plan([small, tmp_path / "missing.jpg"])
    with pytest.raises(IsADirectoryError):
        plan([tmp_path])
    with pytest.raises(ValueError, match="1 entries for 2 paths"):
        plan([small, small], labels=["a"])
    with pytest.raises(ValueError, match="batch_size"):
        plan([small], batch_size=0)
    # One id for two files: refused or half-skipped depending on the chunking (an outside test).
    with pytest.raises(ValueError, match=r"ids: 'x' is given to both .* and .*; nothing was sent"):
        plan([small, other], ids=["x", "x"], batch_size=1)
    assert len(plan([small, other], ids=["", ""]).files) == 2  # "": the server names them
    # gRPC took b"a" for "a", escaping that check, and failed an int mid-upload (an outside test)
    with pytest.raises(TypeError, match=r"ids\[1\] is bytes b'x', not str .*nothing was sent"):
        plan([small, other], ids=["x", b"x"])
    with pytest.raises(TypeError, match=r"ids\[0\] is int 7, not str"):
        plan([small], ids=lambda path: 7)
    with pytest.raises(TypeError, match=r"labels\[0\] is NoneType None, not str"):
        plan([small], labels=[None])
    with pytest.raises(TypeError, match="single string"):
        plan([small], ids=b"x")


# -------------------------------------------------------------------------------------------------
# Response conversion (no server)


def test_image_record_marks_absent_fields_none() -> None:
    bare = ImageRecord.from_proto(pb.Image(id="v", label="l"))
    assert (bare.thumbnail, bare.original, bare.vector, bare.created_at) == (None, None, None, None)
    full = ImageRecord.from_proto(
        pb.Image(
            id="i",
            thumbnail=b"t",
            original=b"o",
            vector=pb.FloatVector(values=[1, 2]),
            create_time=timestamp_pb2.Timestamp(seconds=60),
        )
    )
    assert (full.thumbnail, full.original) == (b"t", b"o")
    assert full.vector is not None and full.vector.dtype == np.float32 and full.vector.tolist() == [1.0, 2.0]
    assert full.created_at is not None and full.created_at.timestamp() == 60.0
    assert full.created_at.tzinfo is UTC


def test_collection_info_and_index_types() -> None:
    ivf = CollectionInfo.from_proto(
        pb.Collection(name="c", index_type=pb.INDEX_TYPE_IVF, ivf=pb.IvfParams(nlist=4))
    )
    assert (ivf.index_type, ivf.ivf, ivf.hnsw) == (IndexType.IVF, IvfParams(nlist=4), None)
    unspecified = CollectionInfo.from_proto(pb.Collection(name="d"))
    assert unspecified.index_type is IndexType.FLAT and unspecified.created_at is None
    for kind in IndexType:
        assert IndexType.from_proto(kind.to_proto()) is kind
    assert IndexType.parse("Hnsw") is IndexType.HNSW and str(IndexType.IVF) == "ivf"


def test_item_results_map_codes() -> None:
    result = AddResult.from_proto(
        pb.AddImagesResponse(
            ids=["a", ""],
            results=[pb.ItemResult(index=0, id="a", code=0), pb.ItemResult(index=1, code=3, message="bad")],
            added_count=1,
        )
    )
    assert result.failed == (
        ItemResult(index=1, id="", code=grpc.StatusCode.INVALID_ARGUMENT, message="bad"),
    )
    assert result.results[0].ok and result.chunk_count == 1
    assert ItemResult.from_proto(pb.ItemResult(code=999)).code is grpc.StatusCode.UNKNOWN


def test_images_already_stored_are_not_failures() -> None:
    """A resume with skip_existing that fully succeeded listed every skipped image in ``failed``
    (an outside test): they are ``already_stored``; ``failed`` keeps the rejections."""
    result = AddResult.from_proto(
        pb.AddImagesResponse(
            ids=["a", "b", ""],
            results=[
                pb.ItemResult(index=0, id="a", code=0),
                pb.ItemResult(index=1, id="b", code=6, reason="IMAGE_EXISTS"),
                pb.ItemResult(index=2, code=3, reason="IMAGE_UNDECODABLE"),
            ],
            added_count=1,
        )
    )
    assert [r.id for r in result.already_stored] == ["b"]
    assert [r.reason for r in result.failed] == ["IMAGE_UNDECODABLE"]


# -------------------------------------------------------------------------------------------------
# Over the wire: the fake server


def test_search_leaves_the_default_top_k_to_the_server(
    client: ImageSearchClient, servicer: FakeServicer
) -> None:
    client.search(image_id="q")
    assert servicer.last("Search").request.top_k == 0


def test_search_round_trip_and_request_ids(client: ImageSearchClient, servicer: FakeServicer) -> None:
    result = client.search(image_id="q", top_k=3, labels=["cat", "dog"], metric="l2")
    assert result.ids == ["hit-0", "hit-1", "hit-2"]
    assert [hit.label for hit in result] == ["cat", "dog", "cat"]
    assert [hit.metadata for hit in result] == [{"query": "image_id"}] * 3
    assert result.hits[1].score == pytest.approx(0.99) and result.hits[2].distance == pytest.approx(0.2)
    assert (result.metric, result.timings.extract_ms, result.timings.total_ms, len(result)) == (
        "l2",
        2.5,
        5.0,
        3,
    )

    first = servicer.last("Search").metadata
    client.search(vector=[1.0, 2.0])
    second = servicer.last("Search").metadata
    assert UUID_HEX.match(first["x-request-id"]) and UUID_HEX.match(second["x-request-id"])
    assert first["x-request-id"] != second["x-request-id"]
    assert first["x-api-key"] == "k1"

    client.search(image=b"img", request_id="trace-42", metadata=[("x-extra", "1")])
    third = servicer.last("Search")
    assert (third.metadata["x-request-id"], third.metadata["x-extra"]) == ("trace-42", "1")
    assert third.request.image == b"img"


def test_error_details_are_parsed(client: ImageSearchClient) -> None:
    with pytest.raises(NotFound) as not_found:
        client.search(image_id="missing", request_id="rid-1")
    error = not_found.value
    assert (error.code, error.message, error.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "no image 'missing'",
        "IMAGE_NOT_FOUND",
    )
    assert (error.details.domain, dict(error.details.metadata), error.request_id) == (
        "imagesearch.v1",
        {"k": "v"},
        "rid-1",
    )
    assert "IMAGE_NOT_FOUND" in str(error) and "rid-1" in str(error)

    with pytest.raises(InvalidArgument) as invalid:
        client.search(image_id="q", top_k=5000)
    assert [(v.field, v.description) for v in invalid.value.field_violations] == [
        ("top_k", "must be at most 1000")
    ]
    assert "field=top_k: must be at most 1000" in str(invalid.value)
    assert invalid.value.request_id is not None and UUID_HEX.match(invalid.value.request_id)

    with pytest.raises(AlreadyExists) as exists:
        client.create_collection("taken", request_id="r" * 100)
    assert exists.value.reason == "COLLECTION_EXISTS"
    assert exists.value.request_id == "r" * 64  # the id the server echoed (and logged) wins


def test_errors_without_usable_details(client: ImageSearchClient) -> None:
    with pytest.raises(FailedPrecondition) as plain:
        client.delete_collection("busy")
    assert plain.value.message == "plain abort without rich details" and plain.value.details.reason == ""

    # The rich status says INTERNAL while the call says NOT_FOUND: trust the call, drop the details.
    with pytest.raises(NotFound) as inconsistent:
        client.get_collection("inconsistent")
    assert inconsistent.value.reason == "" and inconsistent.value.field_violations == ()

    # A code without a dedicated class still becomes an ImageSearchError.
    with pytest.raises(ImageSearchError) as unimplemented:
        client.remove_images(["a"])
    assert type(unimplemented.value) is ImageSearchError
    assert unimplemented.value.code is grpc.StatusCode.UNIMPLEMENTED


def test_deadline_and_unreachable_server(client: ImageSearchClient) -> None:
    with pytest.raises(DeadlineExceeded):
        client.search(image_id="slow", timeout=0.2)
    with ImageSearchClient("127.0.0.1:1", timeout=5.0) as nowhere, pytest.raises(Unavailable):
        nowhere.list_collections()


def test_add_images_all_or_nothing_and_skip_invalid(client: ImageSearchClient) -> None:
    items = [ImageItem(id="a", content=b"ok"), ImageItem(content=b"bad"), ImageItem(vector=[1.0])]
    with pytest.raises(InvalidArgument) as error:
        client.add_images(items)
    assert [v.field for v in error.value.field_violations] == ["images[1].content"]

    result = client.add_images(items, collection="c", skip_invalid=True)
    assert result.ids == ("a", "", "auto-2") and result.added_count == 2
    assert [(r.index, r.code) for r in result.failed] == [(1, grpc.StatusCode.INVALID_ARGUMENT)]


def test_add_files_streams_chunks_below_limits(tmp_path: Path, served: tuple[FakeServicer, str]) -> None:
    servicer, target = served
    paths = _files(tmp_path, [3000] * 7)
    limit = 8 * 1024  # two 3000-byte files fit in a message, three do not
    seen: list[tuple[int, int]] = []
    with ImageSearchClient(target, max_message_bytes=limit) as client:
        result = client.add_files(
            paths,
            labels=lambda p: p.parent.name,
            collection="files",
            batch_size=3,
            progress=lambda sent, total: seen.append((sent, total)),
        )
    chunks = servicer.last("AddImagesStream").request
    assert [len(chunk.images) for chunk in chunks] == [2, 2, 2, 1]
    assert all(chunk.ByteSize() <= limit for chunk in chunks)
    assert chunks[0].collection == "files"
    sent = [image for chunk in chunks for image in chunk.images]
    assert [image.content for image in sent] == [p.read_bytes() for p in paths]
    assert [image.label for image in sent] == [p.parent.name for p in paths]
    assert [image.metadata["path"] for image in sent] == [str(p) for p in paths]
    assert seen == [(2, 7), (4, 7), (6, 7), (7, 7)]
    assert (result.added_count, result.chunk_count) == (7, 4)
    planned = [image.id for image in sent]  # ids chosen before sending, so a retry can name them
    assert len(set(planned)) == 7 and all(len(i) == 32 for i in planned)
    assert all(chunk.skip_existing for chunk in chunks)

    with ImageSearchClient(target) as client:
        by_count = client.add_files(paths, ids=[f"id{i}" for i in range(7)], batch_size=3)
        assert client.add_files([]) == U.NOTHING_ADDED
    assert [len(c.images) for c in servicer.last("AddImagesStream").request] == [3, 3, 1]
    assert by_count.ids == tuple(f"id{i}" for i in range(7))


def test_add_files_reports_a_file_lost_mid_stream(client: ImageSearchClient, tmp_path: Path) -> None:
    paths = _files(tmp_path, [100] * 4)

    def lose_the_last_file(sent: int, total: int) -> None:
        paths[-1].unlink(missing_ok=True)

    with pytest.raises(FileNotFoundError) as error:
        client.add_files(paths, batch_size=2, progress=lose_the_last_file)
    assert any("images were stored before this error" in note for note in error.value.__notes__)
    assert len(error.value.upload_ids) == 4 and error.value.stored is not None  # type: ignore[attr-defined]


def test_add_files_surfaces_local_errors_not_cancelled(client: ImageSearchClient, tmp_path: Path) -> None:
    paths = _files(tmp_path, [100] * 4)

    def grow_the_last_file(sent: int, total: int) -> None:
        paths[-1].write_bytes(b"x" * 5000)

    with pytest.raises(OSError, match="changed size during the upload"):
        client.add_files(paths, batch_size=2, progress=grow_the_last_file)

    def broken_progress(sent: int, total: int) -> None:
        raise RuntimeError("progress bar crashed")

    with pytest.raises(RuntimeError, match="progress bar crashed"):
        client.add_files(paths[:2], batch_size=1, progress=broken_progress)


def test_listing_and_records(client: ImageSearchClient) -> None:
    page = client.list_images(page_size=10, label="cat")
    assert (len(page.images), page.next_page_token, page.total_size) == (10, "10", LISTED_IMAGES)
    assert page.images[0].label == "cat"
    assert [image.id for image in client.iter_images(page_size=10)] == [
        f"img-{i}" for i in range(LISTED_IMAGES)
    ]

    record = client.get_image("x", include_original=True, include_vector=True)
    assert (record.thumbnail, record.original, record.width, record.height) == (
        b"\xff\xd8thumb",
        b"original-bytes",
        64,
        48,
    )
    assert record.vector is not None and record.vector.tolist() == [0.25, -1.0, 3.5]
    assert record.created_at is not None and record.created_at.timestamp() == 1_700_000_000.5
    assert client.get_image("x").original is None


def test_collections_plugins_and_health(client: ImageSearchClient, servicer: FakeServicer) -> None:
    created = client.create_collection("new", extractor="sift", index_type="ivf", ivf=IvfParams(nlist=32))
    assert (created.name, created.extractor, created.index_type, created.ivf) == (
        "new",
        "sift",
        IndexType.IVF,
        IvfParams(nlist=32),
    )
    assert (created.dimension, created.extractor_version) == (128, "1")

    assert client.get_collection().name == "default"
    assert servicer.last("GetCollection").request.name == ""
    collections = client.list_collections()
    assert [(c.name, c.index_type, c.hnsw, c.ivf) for c in collections] == [
        ("a", IndexType.HNSW, HnswParams(m=16), None),
        ("b", IndexType.IVF, None, IvfParams(nlist=8)),
    ]
    assert collections[1].index_trained
    client.delete_collection("old")
    assert servicer.last("DeleteCollection").request.name == "old"

    plugins = client.list_plugins()
    assert plugins.extractor("sift").trainable and plugins.extractor("sift").dimension == 512
    assert plugins.metric("cosine").index_types == (IndexType.FLAT, IndexType.HNSW)
    assert plugins.problems == ("broken-plugin: ImportError",)
    assert plugins.skipped == ("plugin 'colorhist' is blocked by IMAGESEARCH_DISABLE_PLUGINS",)
    with pytest.raises(KeyError, match="loaded: sift"):
        plugins.extractor("resnet")

    assert client.health() == "SERVING"
    assert client.health("imagesearch.v1.ImageSearchService") == "NOT_SERVING"
    with pytest.raises(NotFound):
        client.health("no.such.Service")


def test_passed_channel_is_left_open(served: tuple[FakeServicer, str]) -> None:
    channel = grpc.insecure_channel(served[1])
    with ImageSearchClient(channel=channel) as client:
        assert client.health() == "SERVING"
    with ImageSearchClient(channel=channel) as again:  # still usable after the first client closed
        assert again.health() == "SERVING"
    channel.close()


def test_async_client_matches_sync(served: tuple[FakeServicer, str], tmp_path: Path) -> None:
    servicer, target = served
    paths = _files(tmp_path, [500] * 5)

    async def scenario() -> None:
        async with AsyncImageSearchClient(target, metadata=[("x-api-key", "k2")]) as client:
            result = await client.search(image_id="q", top_k=2, labels=["x"], request_id="async-1")
            assert result.ids == ["hit-0", "hit-1"] and [h.label for h in result] == ["x", "x"]
            assert servicer.last("Search").metadata["x-request-id"] == "async-1"
            assert servicer.last("Search").metadata["x-api-key"] == "k2"

            ids = [image.id async for image in client.iter_images(page_size=7)]
            assert ids == [f"img-{i}" for i in range(LISTED_IMAGES)]

            added = await client.add_files(paths, batch_size=2, labels=["l"] * 5)
            assert (added.added_count, added.chunk_count) == (5, 3)

            with pytest.raises(NotFound) as error:
                await client.get_image("missing", request_id="async-2")
            assert (error.value.reason, error.value.request_id) == ("IMAGE_NOT_FOUND", "async-2")
            with pytest.raises(InvalidArgument) as invalid:
                await client.add_images([ImageItem(content=b"bad")])
            assert invalid.value.field_violations[0].field == "images[0].content"
            with pytest.raises(DeadlineExceeded):
                await client.search(image_id="slow", timeout=0.2)
            assert await client.health() == "SERVING"

            def lose_the_last_file(sent: int, total: int) -> None:
                paths[-1].unlink(missing_ok=True)

            with pytest.raises(FileNotFoundError):
                await client.add_files(paths, batch_size=2, progress=lose_the_last_file)

    asyncio.run(scenario())


# -------------------------------------------------------------------------------------------------
# The two clients stay one API, and the docs cover it


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_async_client_mirrors_the_sync_client() -> None:
    sync_methods, async_methods = _public_methods(ImageSearchClient), _public_methods(AsyncImageSearchClient)
    assert sync_methods.keys() == async_methods.keys()
    for name, signature in sync_methods.items():
        assert signature.parameters == async_methods[name].parameters, name
    assert (
        inspect.signature(ImageSearchClient).parameters.keys()
        == inspect.signature(AsyncImageSearchClient).parameters.keys()
    )


def test_every_method_is_documented() -> None:
    text = DOCS.read_text()
    undocumented = [
        name for name in _public_methods(ImageSearchClient) if name != "close" and f"**`{name}(" not in text
    ]
    assert not undocumented


def test_create_collection_request_carries_the_storage() -> None:
    common = dict(extractor=None, metric="l2", index_type="flat", ivf=None, hnsw=None, store_originals=False)
    for name, number in (("float16", pb.VECTOR_STORAGE_FLOAT16), ("int8", pb.VECTOR_STORAGE_INT8)):
        request = R.create_collection("c", description="", storage=name, **common).request
        assert request.collection.storage == number
        assert CollectionInfo.from_proto(request.collection).storage == name
    assert R.create_collection("c", description="", **common).request.collection.storage == 0
    with pytest.raises(ValueError, match="storage must be one of"):
        R.create_collection("c", description="", storage="int4", **common)


# -------------------------------------------------------------------------------------------------
# Found by an outside test of the client: interrupted uploads, retry hints, closed clients, ...


class _FailedCall(grpc.RpcError):
    """A failed call as gRPC reports it: code, message, and the rich status in the trailers."""

    def __init__(self, status: status_pb2.Status) -> None:
        self.status = status

    def code(self) -> grpc.StatusCode:
        return next(code for code in grpc.StatusCode if code.value[0] == self.status.code)

    def details(self) -> str:
        return self.status.message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return (("grpc-status-details-bin", self.status.SerializeToString()),)


def _status(code: grpc.StatusCode, *details: Message) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message="too many streams")
    for detail in details:
        status.details.add().Pack(detail)
    return status


def test_retry_info_is_read_as_seconds() -> None:
    """The server's RetryInfo (back-pressure) was dropped by parse_details (an outside test)."""
    hint = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000))
    info = error_details_pb2.ErrorInfo(reason="TOO_MANY_STREAMS", domain="imagesearch.v1")
    error = from_rpc_error(_FailedCall(_status(grpc.StatusCode.RESOURCE_EXHAUSTED, info, hint)))
    assert isinstance(error, ResourceExhausted) and error.reason == "TOO_MANY_STREAMS"
    assert error.retry_delay == error.details.retry_delay == 1.5
    assert from_rpc_error(_FailedCall(_status(grpc.StatusCode.RESOURCE_EXHAUSTED, info))).retry_delay is None


def test_only_images_left_as_they_were_are_already_stored() -> None:
    """Rejections with code ALREADY_EXISTS (an id twice in a request; an id taken, under skip_invalid
    alone) are failures: the server gives them no id, where an image it left as it was keeps its own."""
    result = AddResult.from_proto(
        pb.AddImagesResponse(
            ids=["a", "b", "", ""],
            results=[
                pb.ItemResult(index=0, id="a", code=0),
                pb.ItemResult(index=1, id="b", code=6, reason="IMAGE_EXISTS"),
                pb.ItemResult(index=2, code=6, reason="DUPLICATE_ID"),
                pb.ItemResult(index=3, code=6, reason="IMAGE_EXISTS"),
            ],
            added_count=1,
        )
    )
    assert [r.id for r in result.already_stored] == ["b"]
    assert [(r.index, r.reason) for r in result.failed] == [(2, "DUPLICATE_ID"), (3, "IMAGE_EXISTS")]


def test_every_error_has_a_request_id_as_text() -> None:
    """``request_id`` was ``str | None`` and search_batch's returned errors had none, though the
    server logged them under the batch call's id."""
    assert ImageSearchError("x").request_id == ""
    rpc = R.search_batch([Query(image_id="q")])
    failed = pb.SearchBatchResult(code=5, message="no image 'q'", reason="IMAGE_NOT_FOUND")
    (result,) = rpc.result(pb.SearchBatchResponse(results=[failed]), "batch-7")
    assert isinstance(result, NotFound) and result.request_id == "batch-7"


def test_a_channel_comes_without_a_target_or_credentials(served: tuple[FakeServicer, str]) -> None:
    """A target given with a channel was silently ignored (an outside test)."""
    with grpc.insecure_channel(served[1]) as channel:
        for client_class in (ImageSearchClient, AsyncImageSearchClient):
            with pytest.raises(ValueError, match="not both: target given with a channel"):
                client_class("127.0.0.1:1", channel=channel)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="credentials given"):
                client_class(credentials=grpc.ssl_channel_credentials(), channel=channel)  # type: ignore[arg-type]
        with ImageSearchClient(channel=channel) as client:
            assert client.health() == "SERVING" and repr(client) == "ImageSearchClient(channel=...)"
    assert ImageSearchClient().target == R.DEFAULT_TARGET


def test_a_closed_client_says_so(served: tuple[FakeServicer, str], tmp_path: Path) -> None:
    """gRPC's bare "Cannot invoke RPC on closed channel!" (sync) / UsageError (asyncio) did not say
    which object was closed; a client on a passed channel went on working after close()."""
    paths = _files(tmp_path, [100])
    closed = ImageSearchClient(served[1])
    closed.close()
    with pytest.raises(ValueError, match=r"ImageSearchClient\('127.*'\) is closed"):
        closed.health()
    with pytest.raises(ValueError, match="is closed"):
        closed.add_files(paths)
    with pytest.raises(ValueError, match="is closed"), closed:  # a with block on it fails at its start
        pass
    with grpc.insecure_channel(served[1]) as channel:
        borrowed = ImageSearchClient(channel=channel)
        borrowed.close()
        with pytest.raises(ValueError, match="is closed"):
            borrowed.search(image_id="q")

    async def scenario() -> None:
        client = AsyncImageSearchClient(served[1])
        await client.close()
        with pytest.raises(ValueError, match=r"AsyncImageSearchClient\(.*\) is closed"):
            await client.health()
        with pytest.raises(ValueError, match="is closed"):
            await client.add_files(paths)

    asyncio.run(scenario())


def test_a_request_over_the_message_limit_names_it(served: tuple[FakeServicer, str]) -> None:
    """It raised ResourceExhausted with gRPC's own text and no word of max_message_bytes."""
    servicer, target = served
    big = ImageItem(id="big", content=b"x" * 5000)
    calls = len(servicer.calls)
    with ImageSearchClient(target, max_message_bytes=4096) as client:
        with pytest.raises(
            ResourceExhausted, match=r"AddImages request is \d+ bytes.*max_message_bytes \(4096\)"
        ):
            client.add_images([big], request_id="big-1")
        with pytest.raises(ResourceExhausted, match=r"nothing was sent\. Send a smaller image") as error:
            client.search(b"x" * 5000)
        assert error.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and error.value.request_id
        assert client.search(b"x" * 3000).ids  # below the limit: sent

    async def scenario() -> None:
        async with AsyncImageSearchClient(target, max_message_bytes=4096) as client:
            with pytest.raises(ResourceExhausted, match=r"max_message_bytes \(4096\)"):
                await client.add_images([big])

    asyncio.run(scenario())
    assert [call.method for call in servicer.calls[calls:]] == ["Search"]


def test_a_keyboard_interrupt_from_progress_ends_the_upload_and_carries_its_ids(tmp_path: Path) -> None:
    """It escaped gRPC's sending thread, killing it: the call waited for chunks that never came
    (until its deadline), and no exception carried the ids (an outside test)."""
    paths = _files(tmp_path, [100] * 6)

    def interrupt_after_two(sent: int, total: int) -> None:
        if sent == 2:
            raise KeyboardInterrupt

    with fake_server() as (servicer, target), ImageSearchClient(target) as client:
        with pytest.raises(KeyboardInterrupt) as caught:
            client.add_files(paths, batch_size=1, progress=interrupt_after_two, timeout=10)
        error = caught.value
        assert len(error.upload_ids) == 6 and error.stored.added_count == 2  # type: ignore[attr-defined]
        assert "ids=error.upload_ids" in "".join(error.__notes__)
        assert [len(chunk.images) for chunk in servicer.last("AddImagesStream").request] == [1, 1]


def test_a_ctrl_c_cancels_the_upload_and_leaves_no_thread_behind(tmp_path: Path, ctrl_c_raises: None) -> None:
    """Ctrl-C escaped the blocking call and left gRPC's sending thread stuck for good."""
    paths = _files(tmp_path, [100] * 10)
    sent_so_far: list[int] = []

    def ctrl_c_after_two(sent: int, total: int) -> None:
        sent_so_far.append(sent)
        if sent == 2:
            _thread.interrupt_main()
        time.sleep(0.05)

    with fake_server() as (_, target), ImageSearchClient(target) as client:
        before = _client_threads()
        with pytest.raises(KeyboardInterrupt) as caught:
            client.add_files(paths, batch_size=1, progress=ctrl_c_after_two)
            time.sleep(5)  # the interrupt lands here if the upload ended before it
        assert len(caught.value.upload_ids) == 10 and "interrupted" in "".join(caught.value.__notes__)
        deadline = time.monotonic() + 5
        while _client_threads() - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _client_threads() - before and len(sent_so_far) < 10


def _client_threads() -> set[threading.Thread]:
    """Running threads but the fake server's workers (its pool grows with the calls it serves)."""
    return {thread for thread in threading.enumerate() if not thread.name.startswith("ThreadPoolExecutor")}


def test_a_cancelled_async_upload_carries_its_ids(tmp_path: Path) -> None:
    paths = _files(tmp_path, [100] * 6)
    first_chunk_sent, release = threading.Event(), threading.Event()

    def wait_after_the_first_chunk(sent: int, total: int) -> None:  # in the reading thread
        first_chunk_sent.set()
        release.wait(5)

    async def cancel_mid_upload() -> BaseException:
        async with AsyncImageSearchClient(target) as client:
            task = asyncio.create_task(
                client.add_files(paths, batch_size=1, progress=wait_after_the_first_chunk)
            )
            while not first_chunk_sent.is_set():
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as caught:
                await task
            release.set()
            return caught.value

    with fake_server() as (_, target):
        error = asyncio.run(cancel_mid_upload())
    assert len(error.upload_ids) == 6 and "ids=error.upload_ids" in "".join(error.__notes__)  # type: ignore[attr-defined]


def test_a_keyboard_interrupt_from_progress_ends_the_async_upload_too(tmp_path: Path) -> None:
    paths = _files(tmp_path, [100] * 6)

    def interrupt_after_two(sent: int, total: int) -> None:
        if sent == 2:
            raise KeyboardInterrupt

    async def upload() -> None:
        async with AsyncImageSearchClient(target) as client:
            await client.add_files(paths, batch_size=1, progress=interrupt_after_two, timeout=10)

    with fake_server() as (_, target), pytest.raises(KeyboardInterrupt) as caught:
        asyncio.run(upload())
    assert len(caught.value.upload_ids) == 6 and caught.value.stored.added_count == 2  # type: ignore[attr-defined]


def test_an_async_upload_timed_out_by_asyncio_carries_its_ids_in_the_cause(tmp_path: Path) -> None:
    """``asyncio.timeout`` / ``wait_for`` turn the cancellation into a TimeoutError of their own; the
    CancelledError carrying the ids is its ``__cause__`` (as docs/client.md says)."""
    paths = _files(tmp_path, [100] * 6)

    def slow(sent: int, total: int) -> None:
        time.sleep(0.2)

    async def upload_for_a_moment() -> BaseException:
        async with AsyncImageSearchClient(target) as client:
            with pytest.raises(TimeoutError) as caught:
                async with asyncio.timeout(0.3):
                    await client.add_files(paths, batch_size=1, progress=slow)
            return caught.value

    with fake_server() as (_, target):
        error = asyncio.run(upload_for_a_moment())
    assert len(error.__cause__.upload_ids) == 6  # type: ignore[union-attr]


def test_misused_arguments_name_themselves() -> None:
    """protobuf said "bad argument type for built-in operation" for a metadata value 1 or a
    collection 123, and an empty image path read the current directory (an outside test)."""
    with pytest.raises(TypeError, match=r"item\.metadata\['a'\] must be a str, not int 1"):
        R.image_input(ImageItem(id="x", vector=[1.0], metadata={"a": 1}))  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"item\.label must be a str, not int 3"):
        R.image_input(ImageItem(id="x", vector=[1.0], label=3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="collection must be a str or None, not int 123"):
        R.get_collection(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image: an empty path"):
        _search(image="")
    with pytest.raises(ValueError, match="an empty path"):
        R.image_input("")


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50051",
        "localhost:1",
        "[::1]:65535",
        "unix:/run/imagesearch.sock",
        "dns:///h:50051",
        "dns:h:1",
    ],
)
def test_targets_grpc_reads_as_written_are_taken(target: str) -> None:
    from imagesearch.client import ImageSearchClient

    with ImageSearchClient(target) as client:
        assert client.target == target


@pytest.mark.parametrize(
    "target",
    ["", "127.0.0.1", "127.0.0.1:116537", "127.0.0.1:0", "::1", "h :1", "[::1]", "dns:///127.0.0.1", "dns:h"],
)
def test_targets_grpc_would_misread_are_refused(target: str) -> None:
    """gRPC took port 116537 as 50001 (another server answered), a missing port as 443, and "" with
    its core's log lines on stderr (an outside test)."""
    from imagesearch.client import ImageSearchClient

    with pytest.raises(ValueError, match="must be HOST:PORT with a port from 1 to 65535"):
        ImageSearchClient(target)


def test_integers_outside_what_the_api_carries_name_their_argument() -> None:
    """protobuf said only "Value out of range" for train_collection(seed=2**64 - 1) (an outside test)."""
    from imagesearch.client import _requests as R

    with pytest.raises(
        ValueError, match=r"seed is 18446744073709551615, outside what the API carries \(64-bit"
    ):
        R.train_collection("c", 0, 2**64 - 1)
    with pytest.raises(ValueError, match="model_size is 2147483648"):
        R.train_collection("c", 2**31, 0)
    with pytest.raises(TypeError, match=r"page_size must be an int, not float 2\.5"):
        R.list_images(None, 2.5, "", None)  # type: ignore[arg-type]
    assert R.train_collection("c", np.int64(8), 0).request.model_size == 8
