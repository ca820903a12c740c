"""A misbehaving plugin is INTERNAL with the request id, never UNKNOWN, and the server keeps serving."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import grpc
import numpy as np
import pytest

from imagesearch.client import DataLoss, ImageItem, ImageSearchClient
from imagesearch.plugins.hookspecs import hookimpl
from imagesearch.server.app import run_server
from imagesearch.server.store import CollectionStore
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.images import encode, pattern
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

pytestmark = pytest.mark.e2e


class Crashing(TinyExtractor):
    name = "crashing"

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise RuntimeError("model exploded")


class NaNs(TinyExtractor):
    name = "nans"

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.full((len(images), self.dim), np.nan, np.float32)


class BadPlugin:
    @hookimpl
    def register_extractors(self, register) -> None:
        register(Crashing())
        register(NaNs())


@pytest.mark.parametrize(("extractor", "text"), [("crashing", "RuntimeError"), ("nans", "non-finite")])
def test_plugin_failures_are_internal(data_dir, extractor, text):
    config = tiny_config(data_dir)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN, ("bad", BadPlugin())]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        stub = pb_grpc.ImageSearchServiceStub(chan)
        stub.CreateCollection(
            pb.CreateCollectionRequest(collection=pb.Collection(name="c", extractor=extractor))
        )
        request = pb.AddImagesRequest(
            collection="c", images=[pb.ImageInput(id="a", content=encode(pattern(1)))]
        )
        with pytest.raises(grpc.RpcError) as error:
            stub.AddImages(request, metadata=[("x-request-id", "req-7")])
        assert error.value.code() == grpc.StatusCode.INTERNAL
        assert text in error.value.details()
        assert error.value.details().endswith("; request id req-7")  # for clients reading only the message
        assert ("x-request-id", "req-7") in error.value.trailing_metadata()
        assert stub.ListImages(pb.ListImagesRequest(collection="c")).images == []
        stub.AddImages(pb.AddImagesRequest(images=[pb.ImageInput(id="ok", content=encode(pattern(2)))]))
        assert stub.Search(pb.SearchRequest(image_id="ok")).hits[0].id == "ok"


def test_every_domain_error_has_its_own_status():
    from imagesearch.server import errors
    from imagesearch.server.servicer import status_of

    expected = {
        errors.InvalidArgument: "INVALID_ARGUMENT",
        errors.NotFound: "NOT_FOUND",
        errors.AlreadyExists: "ALREADY_EXISTS",
        errors.FailedPrecondition: "FAILED_PRECONDITION",
        errors.ResourceExhausted: "RESOURCE_EXHAUSTED",
        errors.DeadlineExceeded: "DEADLINE_EXCEEDED",
        errors.Unavailable: "UNAVAILABLE",
        errors.Aborted: "ABORTED",
        errors.Internal: "INTERNAL",
        errors.StoreDamaged: "DATA_LOSS",
    }
    assert set(expected) == set(errors.ImageSearchError.__subclasses__())
    assert {cls: status_of(cls("x")).name for cls in expected} == expected


def test_a_store_damaged_while_serving_is_data_loss_with_what_to_do(server, stub, monkeypatch):
    """SQLite finding a collection's file corrupt mid-request is no bug of ours: DATA_LOSS
    (STORE_DAMAGED) saying what an operator can do, not INTERNAL (an outside test saw INTERNAL);
    other SQLite errors stay INTERNAL."""
    stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name="c", metric="l2")))
    failure = sqlite3.DatabaseError("database disk image is malformed")

    def failing(*args, **kwargs):
        raise failure

    monkeypatch.setattr(CollectionStore, "existing_ids", failing)
    image = pb.ImageInput(id="a", vector=pb.FloatVector(values=[1.0] * TinyExtractor.dim))
    with pytest.raises(grpc.RpcError) as refused:
        stub.AddImages(pb.AddImagesRequest(collection="c", images=[image]))
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    assert (
        "store is damaged" in refused.value.details() and "restore the collection" in refused.value.details()
    )
    with ImageSearchClient(server.target) as client, pytest.raises(DataLoss) as raised:
        client.add_images([ImageItem(id="b", vector=np.ones(TinyExtractor.dim, np.float32))], collection="c")
    assert raised.value.reason == "STORE_DAMAGED"
    failure = sqlite3.OperationalError("database is locked")
    with pytest.raises(grpc.RpcError) as other:
        stub.AddImages(pb.AddImagesRequest(collection="c", images=[image]))
    assert other.value.code() == grpc.StatusCode.INTERNAL


def test_store_damage_fails_only_its_own_queries_and_a_stream_says_what_it_stored(server, stub, monkeypatch):
    """The damaged collection's searches are DATA_LOSS naming it (a search by vector was INTERNAL
    "search failed"), a SearchBatch's query on another collection is still answered (the whole
    batch failed), and a stream's status counts what it stored first (it said nothing): the
    fourth outside test."""
    from imagesearch.server.servicer import ADDED_COUNT_KEY

    for name in ("c", "d"):
        stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name=name, metric="l2")))
    vectors = [pb.FloatVector(values=[float(i)] * TinyExtractor.dim) for i in range(10)]
    for name in ("c", "d"):
        images = [pb.ImageInput(id=f"{name}{i}", vector=v) for i, v in enumerate(vectors[:5])]
        stub.AddImages(pb.AddImagesRequest(collection=name, images=images))
    damaged = server.engine.catalog.get("c").store
    real_rows, real_existing = CollectionStore.rows_by_row_id, CollectionStore.existing_ids
    malformed = sqlite3.DatabaseError("database disk image is malformed")

    def rows(store, row_ids):
        if store is damaged:
            raise malformed
        return real_rows(store, row_ids)

    def existing(store, ids):
        if store is damaged and "s1" in ids:  # the stream's second chunk meets the damage
            raise malformed
        return real_existing(store, ids)

    monkeypatch.setattr(CollectionStore, "existing_ids", existing)
    chunks = [
        pb.AddImagesStreamRequest(collection="c", images=[pb.ImageInput(id="s0", vector=vectors[5])]),
        pb.AddImagesStreamRequest(images=[pb.ImageInput(id="s1", vector=vectors[6])]),
    ]
    with pytest.raises(grpc.RpcError) as streamed:
        stub.AddImagesStream(iter(chunks))
    assert streamed.value.code() == grpc.StatusCode.DATA_LOSS
    assert (ADDED_COUNT_KEY, "1") in streamed.value.trailing_metadata()
    monkeypatch.setattr(CollectionStore, "rows_by_row_id", rows)
    with pytest.raises(grpc.RpcError) as searched:
        stub.Search(pb.SearchRequest(collection="c", vector=vectors[1], top_k=3))
    assert searched.value.code() == grpc.StatusCode.DATA_LOSS and "collection 'c'" in searched.value.details()
    batch = stub.SearchBatch(
        pb.SearchBatchRequest(
            queries=[
                pb.SearchRequest(collection="d", vector=vectors[1], top_k=3),
                pb.SearchRequest(collection="c", vector=vectors[2], top_k=3),
            ]
        )
    )
    assert batch.results[0].response.hits[0].id == "d1"
    assert batch.results[1].code == grpc.StatusCode.DATA_LOSS.value[0]
