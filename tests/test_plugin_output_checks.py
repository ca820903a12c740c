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

from imagesearch.client import ImageItem, ImageSearchClient, Internal
from imagesearch.plugins import LocalFeatures, Metric, hookimpl, inverse_distance_score
from imagesearch.plugins.metrics import L2
from imagesearch.server.app import RunningServer, run_server
from imagesearch.server.collection import Collection
from imagesearch.server.errors import FailedPrecondition
from imagesearch.server.errors import Internal as ServerInternal
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


class TextFeatures(LocalFeatures):
    """Local features as ``str``, not ``bytes``."""

    name, version, description = "text-features", "1", "returns text (test)"

    def extract(self, images: Sequence[np.ndarray], *, for_query: bool = False) -> list[bytes]:
        return ["features"] * len(images)  # type: ignore[list-item]

    def count(self, features: bytes) -> int:
        return 1

    def verify(self, query: bytes, candidates: Sequence[bytes]) -> list[int]:
        return [0] * len(candidates)


def _metric(name: str, prepare) -> Metric:
    return Metric(
        name=name,
        faiss_metric=faiss.METRIC_L2,
        description=f"{name} (test)",
        to_score=inverse_distance_score,
        to_distance=lambda squared: np.sqrt(np.maximum(squared, 0.0)),
        prepare=prepare,
    )


class CarelessPlugin:
    @hookimpl
    def register_extractors(self, register) -> None:
        register(Texts())
        register(Crashing())

    @hookimpl
    def register_metrics(self, register) -> None:
        register(_metric("halving", lambda vectors: vectors[:, : vectors.shape[1] // 2]))
        register(_metric("nan-making", lambda vectors: vectors * np.nan))

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
