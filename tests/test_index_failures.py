"""No client request and no damaged collection stops the server: a legacy IVF spec that cannot
train keeps searching exactly, and a collection whose index cannot be built is served read-only."""

from __future__ import annotations

import json
import sqlite3

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagesearch.server.app import run_server
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

pytestmark = pytest.mark.e2e
DIM = TinyExtractor.dim


def vectors(first: int, count: int) -> list[pb.ImageInput]:
    rng = np.random.default_rng(first)
    return [
        pb.ImageInput(id=f"v{first + i}", vector=pb.FloatVector(values=rng.normal(size=DIM).tolist()))
        for i in range(count)
    ]


def edit_spec(data_dir, name: str, **changes) -> None:
    """Rewrite a stopped collection's stored spec, as an older server version might have left it."""
    with sqlite3.connect(data_dir / "collections" / name / "store.sqlite3") as db:
        (text,) = db.execute("SELECT value FROM meta WHERE key = 'spec'").fetchone()
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'spec'", (json.dumps({**json.loads(text), **changes}),)
        )


def serve(data_dir):
    return run_server(tiny_config(data_dir), extra_plugins=[TINY_PLUGIN])


def test_an_ivf_spec_that_cannot_train_searches_exactly_and_restarts(data_dir):
    ivf = pb.Collection(name="ivf", metric="l2", index_type=pb.INDEX_TYPE_IVF, ivf=pb.IvfParams(nlist=4))
    with serve(data_dir) as running, grpc.insecure_channel(running.target) as chan:
        pb_grpc.ImageSearchServiceStub(chan).CreateCollection(pb.CreateCollectionRequest(collection=ivf))
    edit_spec(data_dir, "ivf", nlist=1000, train_size=10)  # what CreateCollection accepted before the bounds
    for _ in range(2):  # the second start replays what the first stored
        with serve(data_dir) as running, grpc.insecure_channel(running.target) as chan:
            stub = pb_grpc.ImageSearchServiceStub(chan)
            added = len(stub.ListImages(pb.ListImagesRequest(collection="ivf")).images)
            request = pb.AddImagesRequest(collection="ivf", images=vectors(added, 10))
            assert stub.AddImages(request).added_count == 10
            info = stub.GetCollection(pb.GetCollectionRequest(name="ivf")).collection
            assert info.state == pb.COLLECTION_STATE_READY and not info.index_trained
            assert "IVF training failed" in info.state_reason
            query = request.images[3]
            hits = stub.Search(pb.SearchRequest(collection="ivf", vector=query.vector, top_k=1)).hits
            assert hits[0].id == query.id
    assert info.image_count == 20


def test_a_collection_whose_index_cannot_be_built_is_read_only_and_the_others_serve(data_dir):
    with serve(data_dir) as running, grpc.insecure_channel(running.target) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name="broken")))
        stub.AddImages(pb.AddImagesRequest(collection="broken", images=vectors(0, 5)))
        stub.AddImages(pb.AddImagesRequest(images=vectors(100, 5)))
    edit_spec(data_dir, "broken", dim=DIM + 1)  # its stored vectors no longer fit: no index can be built
    with serve(data_dir) as running, grpc.insecure_channel(running.target) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        info = stub.GetCollection(pb.GetCollectionRequest(name="broken")).collection
        assert info.state == pb.COLLECTION_STATE_READ_ONLY and "could not be built" in info.state_reason
        assert len(stub.ListImages(pb.ListImagesRequest(collection="broken")).images) == 5
        assert stub.GetImage(pb.GetImageRequest(collection="broken", id="v0")).image.id == "v0"
        for call, request in (
            (stub.Search, pb.SearchRequest(collection="broken", image_id="v0")),
            (stub.AddImages, pb.AddImagesRequest(collection="broken", images=vectors(9, 1))),
            (stub.RemoveImages, pb.RemoveImagesRequest(collection="broken", ids=["v0"])),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(request)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "read-only" in caught.value.details()
        health = health_pb2_grpc.HealthStub(chan)
        name = "imagesearch.v1.ImageSearchService/broken"
        status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert stub.Search(pb.SearchRequest(image_id="v100", top_k=1)).hits[0].id == "v100"
        stub.DeleteCollection(pb.DeleteCollectionRequest(name="broken"))
