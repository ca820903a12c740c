"""What a careless plugin returns never reaches the store or the index: each refusal is INTERNAL with
the reason of its kind, names the plugin object, stores nothing and leaves the collection serving.
Found by an outside test writing third-party plugins: a metric whose preparation changed the
vectors' shape, an extractor whose output changed size under the same version, local features
returned as text, each had an add acknowledged and then the collection broken for good."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
import pytest

from imagesearch.client import ImageItem, ImageSearchClient, Internal, Query
from imagesearch.plugins import LocalFeatures, Metric, hookimpl, inverse_distance_score
from imagesearch.plugins.metrics import L2
from imagesearch.server.app import RunningServer, run_server
from imagesearch.server.collection import Collection
from imagesearch.server.errors import FailedPrecondition, InvalidArgument
from imagesearch.server.errors import Internal as ServerInternal
from imagesearch.server.plugin_output import checked_count, checked_inliers, checked_vectors
from imagesearch.server.store import NewImage
from tests.conftest import tiny_config
from tests.support.images import encode, pattern
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

pytestmark = pytest.mark.e2e


class Texts(TinyExtractor):
    name = "texts"

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.full((len(images), self.dim), "0.5")


class Crashing(TinyExtractor):
    name = "crashing"

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise RuntimeError("model exploded")


class Interrupting(TinyExtractor):
    """Raises what a plugin should never raise: it reached the event loop and stopped it."""

    name = "interrupting"
    raised: type[BaseException] = KeyboardInterrupt

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise self.raised("plugin gave up")


class Picky(TinyExtractor):
    """Refuses images 33 pixels wide, extracts the rest."""

    name = "picky"

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if any(image.shape[1] == 33 for image in images):
            raise ValueError("an image 33 pixels wide")
        return super().extract(images)


def _far_is_nan(distances: np.ndarray) -> np.ndarray:
    """A score that is NaN past a distance of 1,000: registration's spot-check samples below it."""
    return np.where(np.asarray(distances) > 1000, np.nan, 1 / (1 + np.asarray(distances)))


def _one_over(distances: np.ndarray) -> np.ndarray:
    """1 / d: infinite for an exact match, which Classify turned into NaN confidences."""
    with np.errstate(divide="ignore"):
        return 1 / np.asarray(distances, np.float64)


class TextFeatures(LocalFeatures):
    """Local features as ``str``, not ``bytes``."""

    name, version, description = "text-features", "1", "returns text (test)"

    def extract(self, images: Sequence[np.ndarray], *, for_query: bool = False) -> list[bytes]:
        return ["features"] * len(images)  # type: ignore[list-item]

    def count(self, features: bytes) -> int:
        return 1

    def verify(self, query: bytes, candidates: Sequence[bytes]) -> list[int]:
        return [0] * len(candidates)


def _metric(name: str, prepare=lambda vectors: vectors, to_score=inverse_distance_score) -> Metric:
    return Metric(
        name=name,
        faiss_metric=faiss.METRIC_L2,
        description=f"{name} (test)",
        to_score=to_score,
        to_distance=lambda squared: np.sqrt(np.maximum(squared, 0.0)),
        prepare=prepare,
    )


class CarelessPlugin:
    @hookimpl
    def register_extractors(self, register) -> None:
        register(Texts())
        register(Crashing())
        register(Interrupting())
        register(Picky())

    @hookimpl
    def register_metrics(self, register) -> None:
        register(_metric("halving", lambda vectors: vectors[:, : vectors.shape[1] // 2]))
        register(_metric("nan-making", lambda vectors: vectors * np.nan))
        register(_metric("nan-far", to_score=_far_is_nan))
        register(_metric("one-over", to_score=_one_over))

    @hookimpl
    def register_local_features(self, register) -> None:
        register(TextFeatures())


@pytest.fixture
def server(data_dir: Path) -> Iterator[RunningServer]:
    with run_server(
        tiny_config(data_dir), extra_plugins=[TINY_PLUGIN, ("careless", CarelessPlugin())]
    ) as running:
        yield running


@pytest.mark.parametrize(
    ("collection", "reason", "says"),
    [
        (
            {"extractor": "texts"},
            "EXTRACTOR_FAILED",
            "extractor 'texts' returned values of type <U3, not numbers",
        ),
        (
            {"extractor": "crashing"},
            "EXTRACTOR_FAILED",
            "extractor 'crashing' failed: RuntimeError: model exploded",
        ),
        (
            {"metric": "halving"},
            "METRIC_FAILED",
            "metric 'halving' prepared vectors of shape (1, 192) into shape (1, 96)",
        ),
        (
            {"metric": "nan-making"},
            "METRIC_FAILED",
            "metric 'nan-making' prepared vectors of shape (1, 192) into non-finite",
        ),
        (
            {"local_features": "text-features"},
            "LOCAL_FEATURES_FAILED",
            "returned str for 1 images, not one bytes each",
        ),
    ],
)
def test_bad_plugin_output_stores_nothing_and_the_collection_keeps_serving(
    server: RunningServer, collection: dict[str, str], reason: str, says: str
) -> None:
    with ImageSearchClient(server.target) as client:
        client.create_collection("c", **{"extractor": TinyExtractor.name, **collection})
        with pytest.raises(Internal) as refused:
            client.add_images([ImageItem(id="a", content=encode(pattern(1)))], collection="c")
        assert refused.value.reason == reason and says in str(refused.value)
        info = client.get_collection("c")
        assert info.image_count == 0 and not info.read_only
        if "metric" not in collection:  # the same collection still takes vectors (its index is sound)
            client.add_images(
                [ImageItem(id="v", vector=np.ones(TinyExtractor.dim, np.float32))], collection="c"
            )
            assert [hit.id for hit in client.search(image_id="v", collection="c").hits] == ["v"]


def test_an_extractor_whose_output_changed_size_serves_no_image_query_and_says_why(tmp_path: Path) -> None:
    """Same name and version, another dimension after a restart: the collection refuses its image
    queries with the reason (it used to store the new vectors, then turn read-only for good)."""
    from tests.test_collection import make_spec

    spec = make_spec()
    Collection.create(tmp_path / "c", spec, L2, None).close(snapshot=False)

    class Wider(TinyExtractor):
        name, version, dim = spec.extractor, spec.extractor_version, spec.dim + 4

    collection = Collection(tmp_path / "c", spec, L2, Wider())
    try:
        with pytest.raises(FailedPrecondition) as refused:
            collection.check_extractor()
        assert f"it now makes vectors of dimension {spec.dim + 4}, the collection holds {spec.dim}" in str(
            refused.value
        )
        assert "image queries and image adds are refused" in collection.info().state_reason
        wide = NewImage(id="w", label="", vector=np.ones(spec.dim + 4, np.float32))
        with pytest.raises(ServerInternal, match=f"vectors of dimension {spec.dim + 4} reached collection"):
            collection.add([wide])
        assert collection.count() == 0 and not collection.problem
        collection.add([NewImage(id="ok", label="", vector=np.ones(spec.dim, np.float32))])
        assert collection.count() == 1
    finally:
        collection.close(snapshot=False)


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit, GeneratorExit, InvalidArgument])
def test_a_plugin_raising_an_interrupt_fails_its_call_and_the_server_keeps_serving(
    server: RunningServer, raised: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt or SystemExit from an extractor reached the event loop, which stopped:
    every later call, health checks too, hung until a restart; a GeneratorExit left the call
    unanswered until its deadline; one of the server's own error classes passed as the client's
    fault, without the plugin's name (outside tests)."""
    monkeypatch.setattr(Interrupting, "raised", raised)
    with ImageSearchClient(server.target, timeout=20) as client:
        client.create_collection("c", extractor="interrupting")
        for _ in range(2):
            with pytest.raises(
                Internal, match=f"extractor 'interrupting' failed: {raised.__name__}"
            ) as refused:
                client.search(encode(pattern(1)), collection="c")
            assert refused.value.reason == "EXTRACTOR_FAILED"
        assert client.health() == "SERVING"
        client.add_images([ImageItem(id="v", vector=np.ones(TinyExtractor.dim, np.float32))], collection="c")
        assert [hit.id for hit in client.search(image_id="v", collection="c").hits] == ["v"]


def test_an_image_the_extractor_refuses_fails_only_its_own_query_of_a_batch(server: RunningServer) -> None:
    """SearchBatch extracts a collection's images in one call: one refused image failed every
    image query of the batch (an outside test)."""
    with ImageSearchClient(server.target) as client:
        client.create_collection("c", extractor="picky")
        client.add_images([ImageItem(id="a", content=encode(pattern(1)))], collection="c")
        refused, answered = client.search_batch(
            [
                Query(image=encode(pattern(2, size=(32, 33))), collection="c"),
                Query(image=encode(pattern(1)), collection="c"),
            ]
        )
    assert isinstance(refused, Internal) and refused.reason == "EXTRACTOR_FAILED"
    assert "queries[0]" in str(refused) and "33 pixels" in str(refused)
    assert not isinstance(answered, Exception) and answered.ids == ["a"]


def test_a_metric_that_cannot_score_a_hit_fails_that_query_by_name_in_search_and_classify(
    server: RunningServer,
) -> None:
    """NaN scores came back from Classify as its confidence (an outside test); queries sharing the
    index call with a query the metric cannot score are answered."""
    near, far = np.zeros(TinyExtractor.dim, np.float32), np.full(TinyExtractor.dim, 500, np.float32)
    with ImageSearchClient(server.target) as client:
        client.create_collection("c", extractor=TinyExtractor.name, metric="nan-far")
        client.add_images([ImageItem(id="a", vector=near, label="x")], collection="c")
        with pytest.raises(Internal, match="metric 'nan-far' produced non-finite scores") as refused:
            client.search(vector=far, collection="c")
        assert refused.value.reason == "METRIC_FAILED"
        for mode in ("knn", "centroid"):
            with pytest.raises(Internal, match="metric 'nan-far' produced non-finite scores"):
                client.classify(vector=far, collection="c", mode=mode)
        assert client.classify(vector=near, collection="c").label == "x"
        unscorable, answered = client.search_batch(
            [Query(vector=far, collection="c"), Query(vector=near, collection="c")]
        )
    assert isinstance(unscorable, Internal) and unscorable.reason == "METRIC_FAILED"
    assert not isinstance(answered, Exception) and answered.ids == ["a"]


class Counting(TextFeatures):
    """Counts and verifies as told (``counted``, ``inliers``)."""

    counted: object = 1
    inliers: object = 0

    def count(self, features: bytes) -> int:
        return self.counted  # type: ignore[return-value]

    def verify(self, query: bytes, candidates: Sequence[bytes]) -> list[int]:
        return [self.inliers] * len(candidates)  # type: ignore[list-item]


@pytest.mark.parametrize("counted", [float("nan"), "many", -5, 2**40, 2.5])
def test_a_keypoint_count_that_is_no_count_is_refused(counted: object) -> None:
    """``LocalFeatures.count`` was taken as it came (an outside test)."""
    features = Counting()
    features.counted = counted
    with pytest.raises(ServerInternal, match=r"counted .* keypoints, not a whole number") as refused:
        checked_count(features, b"x")
    assert refused.value.reason == "LOCAL_FEATURES_FAILED"
    features.counted = 3
    assert checked_count(features, b"x") == 3


def test_inliers_past_int32_and_ragged_vectors_are_refused_by_name() -> None:
    """``verify`` giving 10**30 and an extractor's ragged list failed as bare INTERNAL errors."""
    features = Counting()
    features.inliers = 10**30
    with pytest.raises(ServerInternal, match="not one whole number from 0 to 2147483647 each"):
        checked_inliers(features, b"q", [b"c"])
    with pytest.raises(ServerInternal, match="extractor 'tiny-8x8' failed: ValueError") as refused:
        checked_vectors(TinyExtractor(), [np.zeros(TinyExtractor.dim), np.zeros(3)], 2)  # type: ignore[arg-type]
    assert refused.value.reason == "EXTRACTOR_FAILED"


def test_an_infinite_score_is_refused_by_name(server: RunningServer) -> None:
    """``1 / d`` passes registration, but an exact match scores +inf, which Classify normalised into
    NaN confidences (a third outside test)."""
    near = np.ones(TinyExtractor.dim, np.float32)
    with ImageSearchClient(server.target) as client:
        client.create_collection("c", extractor=TinyExtractor.name, metric="one-over")
        client.add_images([ImageItem(id="a", vector=near, label="x")], collection="c")
        for call in (
            lambda: client.search(vector=near, collection="c"),
            lambda: client.classify(vector=near, collection="c", mode="knn"),
        ):
            with pytest.raises(Internal, match="metric 'one-over' produced non-finite scores") as refused:
                call()
            assert refused.value.reason == "METRIC_FAILED"
        assert client.search(vector=near * 2, collection="c").ids == ["a"]
