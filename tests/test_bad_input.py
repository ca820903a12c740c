"""Bad input: each gets its own status and a clear message; the server keeps serving; nothing half-stored."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagesearch.server.app import RunningServer, run_server
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.images import encode, pattern
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor
from tests.support.uploads import listed_ids

pytestmark = pytest.mark.e2e
Code = grpc.StatusCode


@pytest.fixture
def limited(data_dir) -> Iterator[RunningServer]:
    """A server with small limits so the limit tests stay fast."""
    limits = {
        "max_message_bytes": 1 << 20,
        "max_image_pixels": 200 * 200,
        "max_batch_size": 8,
        "max_top_k": 50,
    }
    with run_server(tiny_config(data_dir, limits=limits), extra_plugins=[TINY_PLUGIN]) as running:
        yield running


@pytest.fixture
def stub(limited: RunningServer) -> Iterator[pb_grpc.ImageSearchServiceStub]:
    with grpc.insecure_channel(limited.target, options=[("grpc.max_send_message_length", 64 << 20)]) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        stub.AddImages(pb.AddImagesRequest(images=[pb.ImageInput(id="seed", content=encode(pattern(0)))]))
        yield stub


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb's calling card)."""
    real = encode(pattern(1, size=(8, 8)))
    ihdr = struct.pack(">II", width, height) + real[24:29]
    return real[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + real[33:]


def call_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request)
    return caught.value


def still_serving(stub) -> None:
    assert stub.Search(pb.SearchRequest(image_id="seed", top_k=1)).hits[0].id == "seed"


BAD_IMAGES = {
    "empty": (b"", Code.INVALID_ARGUMENT, "empty"),
    "garbage": (b"hello, this is not an image", Code.INVALID_ARGUMENT, "unrecognised image format"),
    "truncated-jpeg": (encode(pattern(2), ".jpg")[:600], Code.INVALID_ARGUMENT, "truncated"),
    "truncated-png": (encode(pattern(2))[:200], Code.INVALID_ARGUMENT, "truncated PNG"),
    "corrupt-png": (
        encode(pattern(2))[:60] + b"\x00" * 400 + b"IEND",
        Code.INVALID_ARGUMENT,
        "could not be decoded",
    ),
    "pixel-bomb": (png_claiming(60000, 60000), Code.RESOURCE_EXHAUSTED, "3600000000 pixels"),
    "over-pixel-limit": (
        encode(pattern(3, size=(300, 300))),
        Code.RESOURCE_EXHAUSTED,
        "the limit is 40000 pixels",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_in_a_batch_fails_it_whole(stub, name):
    data, code, text = BAD_IMAGES[name]
    images = [pb.ImageInput(id="good1", content=encode(pattern(5))), pb.ImageInput(id="bad", content=data)]
    error = call_error(stub.AddImages, pb.AddImagesRequest(images=images))
    assert error.code() == code
    assert "images[1]" in error.details() and text in error.details()
    status = rpc_status.from_call(error)
    bad_request = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad_request) for detail in status.details)
    assert bad_request.field_violations[0].field == "images[1].content"
    assert listed_ids(stub) == ["seed"], "nothing from a rejected batch may be stored"
    still_serving(stub)


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_query_image(stub, name):
    data, code, text = BAD_IMAGES[name]
    error = call_error(stub.Search, pb.SearchRequest(image=data))
    assert error.code() == code and text in error.details()
    still_serving(stub)


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (pb.SearchRequest(collection="nope", image_id="seed"), Code.NOT_FOUND, "collection 'nope' not found"),
        (pb.SearchRequest(image_id="missing"), Code.NOT_FOUND, "image 'missing' not found"),
        (
            pb.SearchRequest(image_id="seed", metric="manhattan"),
            Code.INVALID_ARGUMENT,
            "unknown metric 'manhattan'",
        ),
        (pb.SearchRequest(vector=pb.FloatVector(values=[1.0, 2.0])), Code.INVALID_ARGUMENT, "dimension 192"),
        (pb.SearchRequest(image_id="seed", top_k=-1), Code.INVALID_ARGUMENT, "top_k must be >= 0"),
        (pb.SearchRequest(image_id="seed", top_k=51), Code.INVALID_ARGUMENT, "over the limit of 50"),
        (pb.SearchRequest(), Code.INVALID_ARGUMENT, "needs image, image_id or vector"),
        (pb.SearchRequest(image_id="seed", extractor="resnet50"), Code.FAILED_PRECONDITION, "not 'resnet50'"),
        (
            pb.SearchRequest(vector=pb.FloatVector(values=[float("nan")] * TinyExtractor.dim)),
            Code.INVALID_ARGUMENT,
            "NaN",
        ),
        (
            pb.SearchRequest(vector=pb.FloatVector(float32_le=b"\0" * 7)),
            Code.INVALID_ARGUMENT,
            "not a multiple of 4",
        ),
        (
            pb.SearchRequest(vector=pb.FloatVector(values=[1.0], float32_le=b"\0" * 4)),
            Code.INVALID_ARGUMENT,
            "values or float32_le, not both",
        ),
        (pb.SearchRequest(vector=pb.FloatVector(float32_le=b"\0" * 8)), Code.INVALID_ARGUMENT, "2 values"),
    ],
    ids=[
        "unknown-collection",
        "unknown-image",
        "unknown-metric",
        "wrong-dim",
        "negative-top-k",
        "top-k-over-max",
        "no-query",
        "other-extractor",
        "nan-vector",
        "packed-odd-length",
        "packed-and-values",
        "packed-wrong-dim",
    ],
)
def test_bad_search(stub, request_, code, text):
    error = call_error(stub.Search, request_)
    assert error.code() == code and text in error.details()
    still_serving(stub)


def test_wrong_vector_dimension_on_add_stores_nothing(stub):
    images = [
        pb.ImageInput(id="ok", vector=pb.FloatVector(values=[0.5] * TinyExtractor.dim)),
        pb.ImageInput(id="short", vector=pb.FloatVector(values=[0.5] * 3)),
    ]
    error = call_error(stub.AddImages, pb.AddImagesRequest(images=images))
    assert (
        error.code() == Code.INVALID_ARGUMENT
        and "images[1]" in error.details()
        and "dimension 192" in error.details()
    )
    assert listed_ids(stub) == ["seed"]


def test_a_malformed_packed_vector_fails_alone(stub):
    """skip_invalid: the malformed item gets its own result naming the field; the others are stored."""
    packed = np.full(TinyExtractor.dim, 0.5, dtype="<f4").tobytes()
    images = [
        pb.ImageInput(id="good", vector=pb.FloatVector(float32_le=packed)),
        pb.ImageInput(id="odd", vector=pb.FloatVector(float32_le=packed[:-1])),
    ]
    response = stub.AddImages(pb.AddImagesRequest(images=images, skip_invalid=True))
    assert [r.code for r in response.results] == [0, Code.INVALID_ARGUMENT.value[0]]
    assert response.results[1].field == "images[1].vector.float32_le"
    assert sorted(listed_ids(stub)) == ["good", "seed"]


def test_duplicate_ids(stub):
    error = call_error(
        stub.AddImages, pb.AddImagesRequest(images=[pb.ImageInput(id="seed", content=encode(pattern(9)))])
    )
    assert error.code() == Code.ALREADY_EXISTS and "'seed' already exists" in error.details()
    twice = [
        pb.ImageInput(id="x", content=encode(pattern(9))),
        pb.ImageInput(id="x", content=encode(pattern(8))),
    ]
    error = call_error(stub.AddImages, pb.AddImagesRequest(images=twice))
    assert error.code() == Code.ALREADY_EXISTS and "appears twice" in error.details()
    assert listed_ids(stub) == ["seed"]


def test_batch_over_the_limit(stub):
    images = [pb.ImageInput(id=f"i{i}", content=encode(pattern(i))) for i in range(9)]
    error = call_error(stub.AddImages, pb.AddImagesRequest(images=images))
    assert error.code() == Code.RESOURCE_EXHAUSTED and "limit is 8" in error.details()
    assert listed_ids(stub) == ["seed"]


def test_batch_over_the_pixel_budget(data_dir):
    limits = {"max_image_pixels": 200 * 200, "max_batch_pixels": 3 * 150 * 150}
    with (
        run_server(tiny_config(data_dir, limits=limits), extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        stub = pb_grpc.ImageSearchServiceStub(chan)
        each_fine = [pb.ImageInput(id=f"i{i}", content=encode(pattern(i, size=(150, 150)))) for i in range(4)]
        error = call_error(stub.AddImages, pb.AddImagesRequest(images=each_fine))
        assert error.code() == Code.RESOURCE_EXHAUSTED and "decodes to 90000 pixels" in error.details()
        assert stub.AddImages(pb.AddImagesRequest(images=each_fine[:3])).added_count == 3


def test_oversized_message(stub):
    huge = pb.ImageInput(id="huge", content=b"\xff\xd8\xff" + b"\x00" * (2 << 20))
    error = call_error(stub.AddImages, pb.AddImagesRequest(images=[huge]))
    assert error.code() == Code.RESOURCE_EXHAUSTED
    assert listed_ids(stub) == ["seed"]
    still_serving(stub)


def test_bad_collection_requests(stub):
    create = stub.CreateCollection
    cases = [
        (pb.Collection(name="bad name!"), Code.INVALID_ARGUMENT, "invalid collection name"),
        (pb.Collection(name="x", extractor="nope"), Code.INVALID_ARGUMENT, "unknown extractor 'nope'"),
        (pb.Collection(name="x", metric="nope"), Code.INVALID_ARGUMENT, "unknown metric 'nope'"),
        (pb.Collection(name="default"), Code.ALREADY_EXISTS, "already exists"),
        (pb.Collection(name="x", index_type=99), Code.INVALID_ARGUMENT, "unknown index_type"),
        (pb.Collection(name="x", description="d" * 1025), Code.INVALID_ARGUMENT, "longer than 1024"),
    ]
    for collection, code, text in cases:
        error = call_error(create, pb.CreateCollectionRequest(collection=collection))
        assert (error.code(), text in error.details()) == (code, True), error.details()
    error = call_error(stub.DeleteCollection, pb.DeleteCollectionRequest(name="nope"))
    assert error.code() == Code.NOT_FOUND
    error = call_error(stub.ListImages, pb.ListImagesRequest(page_token="bm90IGEgdG9rZW4="))
    assert error.code() == Code.INVALID_ARGUMENT and "page_token" in error.details()


def test_metric_override_needs_a_flat_index(stub):
    stub.CreateCollection(
        pb.CreateCollectionRequest(collection=pb.Collection(name="graph", index_type=pb.INDEX_TYPE_HNSW))
    )
    stub.AddImages(
        pb.AddImagesRequest(collection="graph", images=[pb.ImageInput(id="a", content=encode(pattern(1)))])
    )
    error = call_error(stub.Search, pb.SearchRequest(collection="graph", image_id="a", metric="l2"))
    assert error.code() == Code.FAILED_PRECONDITION and "flat" in error.details()


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    (detail,) = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    return info


def test_error_info_metadata_names_the_collection_the_field_and_the_limit(stub):
    images = [pb.ImageInput(content=encode(pattern(i, size=(8, 8)))) for i in range(9)]
    info = error_info(call_error(stub.AddImages, pb.AddImagesRequest(images=images)))
    assert info.reason == "BATCH_TOO_LARGE"
    assert dict(info.metadata) == {"collection": "default", "field": "images", "limit": "8", "value": "9"}
    hnsw = pb.Collection(name="h", index_type=pb.INDEX_TYPE_HNSW, hnsw=pb.HnswParams(m=100_000))
    info = error_info(call_error(stub.CreateCollection, pb.CreateCollectionRequest(collection=hnsw)))
    assert info.reason == "BAD_INDEX_PARAM"
    assert dict(info.metadata) == {
        "collection": "h",
        "field": "collection.hnsw.m",
        "min": "2",
        "max": "64",
        "value": "100000",
    }
    # A stream's and the calls on a collection itself name it too (they did not: an outside test).
    stream = [pb.AddImagesStreamRequest(collection="default", images=[pb.ImageInput(content=b"junk data!")])]
    info = error_info(call_error(stub.AddImagesStream, iter(stream)))
    assert (info.reason, dict(info.metadata)) == (
        "IMAGE_UNDECODABLE",
        {"collection": "default", "field": "images[0].content"},
    )
    info = error_info(call_error(stub.TrainCollection, pb.TrainCollectionRequest(name="default")))
    assert (info.reason, info.metadata["collection"]) == ("NOT_TRAINABLE", "default")
    info = error_info(call_error(stub.GetCollection, pb.GetCollectionRequest(name="nope")))
    assert (info.reason, info.metadata["collection"], info.metadata["field"]) == (
        "COLLECTION_NOT_FOUND",
        "nope",
        "name",
    )
    # The name itself, cut plainly, not as the message quotes it ("'ccc...'... (300 characters)").
    info = error_info(call_error(stub.Search, pb.SearchRequest(collection="c" * 300, image_id="x")))
    assert (info.reason, info.metadata["collection"]) == ("BAD_COLLECTION_NAME", "c" * 80)


def test_per_item_results_carry_the_reason_and_field_a_whole_request_would(stub):
    images = [
        pb.ImageInput(id="ok", content=encode(pattern(3))),
        pb.ImageInput(id="bad", content=b"junk data!"),
    ]
    response = stub.AddImages(pb.AddImagesRequest(images=images, skip_invalid=True))
    good, bad = response.results
    assert (good.code, good.reason, good.field) == (0, "", "")
    assert (bad.reason, bad.field) == ("IMAGE_UNDECODABLE", "images[1].content")
    whole = error_info(call_error(stub.AddImages, pb.AddImagesRequest(images=images[1:])))
    assert whole.reason == bad.reason
