"""Recognise, then retrieve: Classify (k-NN vote and class centroids) and BUCKETED search, through
the real server, on labelled vectors whose classes are known."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from imagesearch.client import ImageItem, ImageSearchClient, InvalidArgument
from imagesearch.server.app import RunningServer, run_server
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

pytestmark = pytest.mark.e2e
DIM = TinyExtractor.dim
CLASSES = 6
PER_CLASS = 20


def labelled_clusters(seed: int = 3) -> tuple[np.ndarray, list[str]]:
    """Six well-separated Gaussian clusters in DIM dimensions, one label each."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10, size=(CLASSES, DIM))
    vectors = np.concatenate([c + rng.normal(size=(PER_CLASS, DIM)) for c in centres]).astype(np.float32)
    return vectors, [f"c{i // PER_CLASS}" for i in range(len(vectors))]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Iterator[tuple[RunningServer, np.ndarray, list[str]]]:
    vectors, labels = labelled_clusters()
    config = tiny_config(tmp_path_factory.mktemp("classify") / "data")
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        client.create_collection("c", metric="l2")
        for start in range(0, len(vectors), 100):
            items = [
                pb.ImageInput(id=f"v{i}", vector=pb.FloatVector(values=vectors[i].tolist()), label=labels[i])
                for i in range(start, min(start + 100, len(vectors)))
            ]
            with grpc.insecure_channel(running.target) as chan:
                pb_grpc.ImageSearchServiceStub(chan).AddImages(
                    pb.AddImagesRequest(collection="c", images=items)
                )
        yield running, vectors, labels


@pytest.mark.parametrize("mode", ["knn", "centroid"])
def test_classify_recognises_every_class_leave_one_out(labelled, mode):
    running, _vectors, labels = labelled
    with ImageSearchClient(running.target) as client:
        found = [
            client.classify(image_id=f"v{i}", exclude_query=True, mode=mode, collection="c")
            for i in range(0, 120, 7)
        ]
    assert [f.label for f in found] == [labels[i] for i in range(0, 120, 7)]
    assert all(f.mode == mode and 0.5 < f.confidence <= 1 for f in found)
    assert all(f.candidates[0] == (f.label, pytest.approx(f.confidence)) for f in found)
    assert all(abs(sum(score for _, score in f.candidates) - 1) < 1e-4 for f in found)


def test_a_query_between_two_classes_names_both_with_split_confidence(labelled):
    running, vectors, _labels = labelled
    between = (vectors[0] + vectors[PER_CLASS]) / 2
    with ImageSearchClient(running.target) as client:
        found = client.classify(vector=between, neighbors=40, collection="c")
    assert {label for label, _ in found.candidates[:2]} == {"c0", "c1"}
    assert found.confidence < 0.75


def test_bucketed_search_ranks_only_the_predicted_class(labelled):
    running, vectors, _labels = labelled
    query = vectors[45] + 0.1
    with ImageSearchClient(running.target) as client:
        bucketed = client.search(vector=query, top_k=50, mode="bucketed", collection="c")
        plain = client.search(vector=query, top_k=50, collection="c")
        filtered = client.search(vector=query, top_k=50, labels=["c2"], collection="c")
    assert bucketed.predicted_label == "c2" and bucketed.label_confidence > 0.9
    assert {hit.label for hit in bucketed} == {"c2"} and len(bucketed) == PER_CLASS
    assert bucketed.ids == filtered.ids  # the bucket is the explicit label filter, chosen for you
    assert {hit.label for hit in plain} > {"c2"} and plain.predicted_label == ""


def test_bucketed_search_refuses_labels_and_classify_refuses_unknown_modes(labelled):
    running, vectors, _ = labelled
    with (
        ImageSearchClient(running.target) as client,
        pytest.raises(InvalidArgument, match="chooses the label itself"),
    ):
        client.search(vector=vectors[0], mode="bucketed", labels=["c0"], collection="c")
    with grpc.insecure_channel(running.target) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(pb.ClassifyRequest(collection="c", image_id="v1", mode=9))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_neighbors_out_of_range_is_reported_as_neighbors(labelled):
    """ClassifyRequest has no top_k: the error must name the field the caller actually sent."""
    running, _vectors, _labels = labelled
    with ImageSearchClient(running.target) as client, pytest.raises(InvalidArgument) as caught:
        client.classify(image_id="v1", neighbors=1001, collection="c")
    assert caught.value.reason == "BAD_TOP_K"
    assert [v.field for v in caught.value.field_violations] == ["neighbors"]
    assert "neighbors 1001 is over the limit of 1000" in str(caught.value)


def test_classify_without_labelled_images_says_so(data_dir):
    with (
        run_server(tiny_config(data_dir), extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        client.add_images([unlabelled_item(i) for i in range(3)])
        found = client.classify(image_id="u0")
        assert (found.label, found.confidence, found.candidates) == ("", 0.0, ())
        assert client.search(image_id="u0", mode="bucketed").predicted_label == ""


def unlabelled_item(i: int) -> ImageItem:
    return ImageItem(id=f"u{i}", vector=np.random.default_rng(i).normal(size=DIM))


@pytest.mark.parametrize("mode", ["knn", "centroid"])
def test_leave_one_out_really_leaves_the_query_out(labelled, mode):
    """A class of one image: counting the query itself would name that class with full confidence."""
    running, vectors, _ = labelled
    lone = vectors[0] + 0.5  # beside class c0, labelled "solo"
    with ImageSearchClient(running.target) as client:
        client.add_images([ImageItem(id="solo", vector=lone, label="solo")], collection="c")
        try:
            kept = client.classify(image_id="solo", mode=mode, collection="c")
            left_out = client.classify(image_id="solo", exclude_query=True, mode=mode, collection="c")
        finally:
            client.remove_images(["solo"], collection="c")
    assert kept.label == "solo"
    assert left_out.label == "c0" and "solo" not in {label for label, _ in left_out.candidates}
