"""The pip-installed example plugin serves a collection end to end through the real gRPC server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from imagesearch.server.app import run_server
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.images import encode

pytestmark = pytest.mark.e2e


def solid(bgr: tuple[int, int, int], seed: int) -> bytes:
    """A colour field with some noise, so no two images are identical."""
    rng = np.random.default_rng(seed)
    image = np.clip(np.array(bgr, np.float32) + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
    return encode(image)


@pytest.mark.parametrize("metric", ["l1", "jensen_shannon"])
def test_colorhist_collection_end_to_end(colorhist_plugin, data_dir, metric):
    with run_server(tiny_config(data_dir)) as running, grpc.insecure_channel(running.target) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        plugins = stub.ListPlugins(pb.ListPluginsRequest())
        assert {e.name: e.plugin for e in plugins.extractors}["colorhist-hsv"] == colorhist_plugin
        collection = pb.Collection(name="palettes", extractor="colorhist-hsv", metric=metric)
        created = stub.CreateCollection(pb.CreateCollectionRequest(collection=collection)).collection
        assert (created.dimension, created.metric) == (128, metric)
        colours = {"red": (20, 20, 220), "green": (30, 200, 40), "blue": (210, 40, 30)}
        images = [
            pb.ImageInput(id=f"{name}{i}", content=solid(bgr, 10 * i + n), label=name)
            for n, (name, bgr) in enumerate(colours.items())
            for i in range(3)
        ]
        stub.AddImages(pb.AddImagesRequest(collection="palettes", images=images))
        hits = stub.Search(
            pb.SearchRequest(collection="palettes", image=solid(colours["green"], 99), top_k=9)
        ).hits
        assert [h.label for h in hits[:3]] == ["green"] * 3
        assert hits[0].score > hits[3].score and hits[0].distance < hits[3].distance
        error = None
        try:
            stub.CreateCollection(
                pb.CreateCollectionRequest(
                    collection=pb.Collection(
                        name="x", extractor="colorhist-hsv", metric=metric, index_type=pb.INDEX_TYPE_HNSW
                    )
                )
            )
        except grpc.RpcError as caught:
            error = caught
        assert error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION
        # FAISS quantises for L2 and inner product only: a float16 collection of this metric was
        # accepted, then every search failed INTERNAL while it reported READY (an outside test).
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateCollection(
                pb.CreateCollectionRequest(
                    collection=pb.Collection(
                        name="y", extractor="colorhist-hsv", metric=metric, storage=pb.VECTOR_STORAGE_FLOAT16
                    )
                )
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "needs float32 storage" in refused.value.details()
