"""End to end over gRPC: the real server on a free localhost port, the generated stubs."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from imagesearch.server.app import SERVICE_NAME, run_server
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.images import encode, pattern, variant
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

pytestmark = pytest.mark.e2e
LABELS = ("cats", "dogs", "cars")


def labelled_batch(count: int = 30, prefix: str = "img") -> list[pb.ImageInput]:
    return [
        pb.ImageInput(
            id=f"{prefix}{i}",
            content=encode(pattern(i)),
            label=LABELS[i % 3],
            metadata={"n": str(i)},
        )
        for i in range(count)
    ]


def add(stub, images, collection: str = "") -> pb.AddImagesResponse:
    return stub.AddImages(pb.AddImagesRequest(collection=collection, images=images))


def all_ids(stub, collection: str = "", page_size: int = 7) -> list[str]:
    ids, token = [], ""
    while True:
        page = stub.ListImages(
            pb.ListImagesRequest(collection=collection, page_size=page_size, page_token=token)
        )
        ids += [image.id for image in page.images]
        token = page.next_page_token
        if not token:
            return ids


def test_add_returns_ids_in_request_order(stub):
    response = add(stub, labelled_batch(12))
    assert list(response.ids) == [f"img{i}" for i in range(12)]
    assert response.added_count == 12
    assert all(r.code == 0 for r in response.results)


def test_server_assigns_ids_when_empty(stub):
    response = add(stub, [pb.ImageInput(content=encode(pattern(1)))])
    assert len(response.ids[0]) == 32
    assert stub.GetImage(pb.GetImageRequest(id=response.ids[0])).image.id == response.ids[0]


def test_identical_image_ranks_first_with_top_score(stub):
    add(stub, labelled_batch())
    response = stub.Search(pb.SearchRequest(image=encode(pattern(17)), top_k=5))
    hits = response.hits
    assert hits[0].id == "img17"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].label == "cars" and hits[0].metadata["n"] == "17"
    assert response.metric == "cosine"
    assert response.timings.extract_ms > 0 and response.timings.total_ms >= response.timings.search_ms


def test_edited_copy_finds_its_original(stub):
    add(stub, labelled_batch())
    hits = stub.Search(pb.SearchRequest(image=encode(variant(pattern(4)), ".jpg", 60), top_k=3)).hits
    assert hits[0].id == "img4"


def test_search_by_id_and_by_vector(stub):
    add(stub, labelled_batch())
    by_id = stub.Search(pb.SearchRequest(image_id="img9", top_k=4)).hits
    assert by_id[0].id == "img9"
    excluded = stub.Search(pb.SearchRequest(image_id="img9", top_k=3, exclude_query=True)).hits
    assert [h.id for h in excluded] == [h.id for h in by_id[1:4]]
    vector = stub.GetImage(pb.GetImageRequest(id="img9", include_vector=True)).image.vector
    by_vector = stub.Search(pb.SearchRequest(vector=vector, top_k=4)).hits
    assert [h.id for h in by_vector] == [h.id for h in by_id]
    assert [h.score for h in by_vector] == pytest.approx([h.score for h in by_id], abs=1e-5)


def test_label_filter_restricts_hits(stub):
    add(stub, labelled_batch())
    hits = stub.Search(pb.SearchRequest(image=encode(pattern(0)), top_k=30, labels=["dogs", "cars"])).hits
    assert len(hits) == 20
    assert {h.label for h in hits} == {"dogs", "cars"}
    assert stub.Search(pb.SearchRequest(image_id="img0", labels=["no-such-label"])).hits == []


def test_remove_makes_an_image_disappear(stub):
    add(stub, labelled_batch(10))
    assert stub.RemoveImages(pb.RemoveImagesRequest(ids=["img3", "img5"])).removed_count == 2
    hits = stub.Search(pb.SearchRequest(image=encode(pattern(3)), top_k=10)).hits
    assert "img3" not in {h.id for h in hits} and len(hits) == 8
    with pytest.raises(grpc.RpcError) as error:
        stub.GetImage(pb.GetImageRequest(id="img3"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        stub.RemoveImages(pb.RemoveImagesRequest(ids=["img4", "img3"]))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "img4" in all_ids(stub), "a failed remove must remove nothing"
    assert (
        stub.RemoveImages(pb.RemoveImagesRequest(ids=["img4", "img3"], allow_missing=True)).removed_count == 1
    )


def test_pagination_walks_every_image_once(stub):
    add(stub, labelled_batch(23))
    ids = all_ids(stub, page_size=5)
    assert ids == [f"img{i}" for i in range(23)]
    page = stub.ListImages(pb.ListImagesRequest(label="cars", page_size=100))
    assert [i.id for i in page.images] == [f"img{i}" for i in range(2, 23, 3)]
    assert page.total_size == 7 and page.next_page_token == ""


def test_collections_are_isolated(stub):
    stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name="other", metric="l2")))
    add(stub, labelled_batch(5))
    add(stub, labelled_batch(4, prefix="o"), collection="other")
    assert all_ids(stub) == [f"img{i}" for i in range(5)]
    assert all_ids(stub, "other") == [f"o{i}" for i in range(4)]
    hits = stub.Search(pb.SearchRequest(collection="other", image=encode(pattern(1)), top_k=10)).hits
    assert {h.id for h in hits} == {"o0", "o1", "o2", "o3"}
    assert hits[0].id == "o1" and hits[0].distance == pytest.approx(0.0, abs=1e-3)
    info = stub.GetCollection(pb.GetCollectionRequest(name="other")).collection
    assert (info.metric, info.image_count, info.extractor) == ("l2", 4, TinyExtractor.name)
    names = [c.name for c in stub.ListCollections(pb.ListCollectionsRequest()).collections]
    assert names == ["default", "other"]
    stub.DeleteCollection(pb.DeleteCollectionRequest(name="other"))
    with pytest.raises(grpc.RpcError) as error:
        stub.Search(pb.SearchRequest(collection="other", image_id="o1"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert all_ids(stub) == [f"img{i}" for i in range(5)]


def test_get_image_returns_thumbnail_and_original(stub):
    stub.CreateCollection(
        pb.CreateCollectionRequest(collection=pb.Collection(name="keep", store_originals=True))
    )
    big = encode(pattern(2, size=(600, 800)))
    add(stub, [pb.ImageInput(id="big", content=big, label="x")], collection="keep")
    image = stub.GetImage(pb.GetImageRequest(collection="keep", id="big", include_original=True)).image
    assert image.original == big and (image.width, image.height) == (800, 600)
    assert abs(image.create_time.ToSeconds() - time.time()) < 60
    assert image.thumbnail[:3] == b"\xff\xd8\xff"
    import cv2

    thumb = cv2.imdecode(np.frombuffer(image.thumbnail, np.uint8), cv2.IMREAD_COLOR)
    assert max(thumb.shape[:2]) == 256


def test_precomputed_vectors_are_indexed(stub):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, TinyExtractor.dim)).astype(np.float32)
    add(stub, [pb.ImageInput(id=f"v{i}", vector=pb.FloatVector(values=v)) for i, v in enumerate(vectors)])
    hits = stub.Search(pb.SearchRequest(vector=pb.FloatVector(values=vectors[2] * 3), top_k=2)).hits
    assert hits[0].id == "v2" and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_skip_invalid_stores_the_good_ones(stub):
    images = labelled_batch(4)
    images.insert(2, pb.ImageInput(id="bad", content=b"not an image at all"))
    response = stub.AddImages(pb.AddImagesRequest(images=images, skip_invalid=True))
    assert response.added_count == 4
    assert list(response.ids) == ["img0", "img1", "", "img2", "img3"]
    bad = response.results[2]
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "images[2]" in bad.message
    assert all_ids(stub) == ["img0", "img1", "img2", "img3"]


def test_streaming_upload_commits_every_chunk(stub):
    batch = labelled_batch(25)
    chunks = [pb.AddImagesStreamRequest(images=batch[i : i + 10]) for i in range(0, 25, 10)]
    response = stub.AddImagesStream(iter(chunks))
    assert response.chunk_count == 3 and response.added_count == 25
    assert list(response.ids) == [f"img{i}" for i in range(25)]
    assert all_ids(stub) == [f"img{i}" for i in range(25)]


def test_streaming_upload_error_names_the_chunk(stub):
    good = labelled_batch(3)
    chunks = [
        pb.AddImagesStreamRequest(images=good[:2]),
        pb.AddImagesStreamRequest(
            images=[good[2], pb.ImageInput(id="bad", content=b"\x89PNG\r\n\x1a\n....")]
        ),
    ]
    with pytest.raises(grpc.RpcError) as error:
        stub.AddImagesStream(iter(chunks))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk 2" in error.value.details() and "images[3]" in error.value.details()
    assert all_ids(stub) == ["img0", "img1"], "the failed chunk stores nothing; earlier chunks stay"


def test_list_plugins(stub):
    plugins = stub.ListPlugins(pb.ListPluginsRequest())
    extractors = {e.name: e for e in plugins.extractors}
    assert extractors[TinyExtractor.name].dimension == TinyExtractor.dim
    assert extractors[TinyExtractor.name].plugin == "tiny"
    assert {"l2", "inner_product", "cosine"} <= {m.name for m in plugins.metrics}


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert "grpc.reflection.v1.ServerReflection" in services


def test_reflection_answers_clients_that_speak_only_v1(channel):
    """A v1 client calls /grpc.reflection.v1.ServerReflection/...; its messages have v1alpha's wire format."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (listing, described) = call(
        iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
            ]
        )
    )
    assert SERVICE_NAME in {s.name for s in listing.list_services_response.service}
    assert described.file_descriptor_response.file_descriptor_proto, "the contract's descriptor comes back"


def test_restart_keeps_everything(data_dir):
    config = tiny_config(data_dir)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        stub = pb_grpc.ImageSearchServiceStub(chan)
        stub.CreateCollection(
            pb.CreateCollectionRequest(collection=pb.Collection(name="second", metric="l2"))
        )
        add(stub, labelled_batch(15))
        add(stub, labelled_batch(6, prefix="s"), collection="second")
        stub.RemoveImages(pb.RemoveImagesRequest(ids=["img4"]))
        before = stub.Search(pb.SearchRequest(image=encode(pattern(8)), top_k=5))
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        stub = pb_grpc.ImageSearchServiceStub(chan)
        assert all_ids(stub) == [f"img{i}" for i in range(15) if i != 4]
        assert all_ids(stub, "second") == [f"s{i}" for i in range(6)]
        after = stub.Search(pb.SearchRequest(image=encode(pattern(8)), top_k=5))
        assert [h.id for h in after.hits] == [h.id for h in before.hits]
        assert [h.score for h in after.hits] == pytest.approx([h.score for h in before.hits], abs=1e-6)
        image = stub.GetImage(pb.GetImageRequest(id="img8")).image
        assert image.label == "cars" and image.metadata["n"] == "8" and image.thumbnail


def test_collections_are_paginated(data_dir):
    from imagesearch.client import ImageSearchClient

    config = tiny_config(data_dir, limits={"max_page_size": 2})
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        stub = pb_grpc.ImageSearchServiceStub(chan)
        for name in ("d", "b", "c", "a"):
            stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name=name)))
        names, token, pages = [], "", 0
        while True:
            page = stub.ListCollections(pb.ListCollectionsRequest(page_size=10, page_token=token))
            names += [c.name for c in page.collections]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert names == ["a", "b", "c", "d", "default"] and pages == 3
        with ImageSearchClient(running.target) as client:  # the client walks the pages itself
            assert [c.name for c in client.list_collections()] == names
        image_token = stub.ListImages(pb.ListImagesRequest(page_size=1)).next_page_token or "x"
        with pytest.raises(grpc.RpcError) as error:
            stub.ListCollections(pb.ListCollectionsRequest(page_token=image_token))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
