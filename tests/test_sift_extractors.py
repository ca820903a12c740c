"""The SIFT extractors served: zero set-up with the generic vocabulary, an edited copy finds its
photo, an image without keypoints is stored (zero vector) instead of failing the batch."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from imagesearch.client import ImageItem, ImageSearchClient
from imagesearch.plugins.manager import PluginRegistry
from imagesearch.server.app import run_server
from imagesearch.server.catalog import Catalog
from imagesearch.server.errors import InvalidArgument
from imagesearch.server.sift_vocabulary import build_generic_vocabulary
from tests.conftest import tiny_config
from tests.support.tiny_plugin import TINY_PLUGIN

pytestmark = pytest.mark.e2e
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def photo(name: str) -> np.ndarray:
    rgb = np.asarray(getattr(skdata, name)())
    bgr = cv2.cvtColor(rgb, cv2.COLOR_GRAY2BGR) if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    scale = 480 / max(bgr.shape[:2])
    return cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def edited(image: np.ndarray) -> np.ndarray:
    """A crop to ~70% area, turned 10 degrees, a little brighter."""
    h, w = image.shape[:2]
    crop = image[int(0.15 * h) : int(0.85 * h), int(0.1 * w) : int(0.95 * w)]
    turn = cv2.getRotationMatrix2D((crop.shape[1] / 2, crop.shape[0] / 2), 10, 1.0)
    return cv2.convertScaleAbs(cv2.warpAffine(crop, turn, (crop.shape[1], crop.shape[0])), alpha=1.1, beta=5)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sift-models")
    build_generic_vocabulary(directory)
    return directory


def test_no_vocabulary_no_sift_extractors_but_the_local_features(tmp_path):
    """A CNN collection keeping ``sift`` for re-ranking must not lose its image queries when the
    vocabulary file goes: the features are SIFT itself (an outside test)."""
    registry = PluginRegistry(load_entry_points=False, models_dir=tmp_path, env={})
    assert not {"sift-bovw", "sift-vlad"} & set(registry.extractors)
    assert "sift" in registry.local_features
    # and the reason is a plugin problem, which a collection made with them quotes (an outside test)
    (problem,) = [p for p in registry.problems if "sift-vlad" in p]
    assert f"no SIFT vocabulary at {tmp_path / 'sift-vocabulary.bin'}" in problem
    assert registry.problems_naming("sift-vlad") == [problem] and registry.problems_naming("vlad") == []
    # ... and so does asking for one: a plain "unknown extractor" sent operators looking for a typo
    with pytest.raises(
        InvalidArgument, match=r"unknown extractor 'sift-vlad'.*no SIFT vocabulary"
    ) as unknown:
        Catalog(tmp_path / "data", registry).extractor("sift-vlad")
    assert unknown.value.reason == "UNKNOWN_EXTRACTOR"
    # no models directory at all: no plugin problem, but the refusal says what is missing
    nowhere = PluginRegistry(load_entry_points=False, models_dir=tmp_path / "none", env={})
    for name in ("sift-vlad", "efficientnet-lite0"):
        with pytest.raises(
            InvalidArgument, match=rf"unknown extractor '{name}'.*models directory .*none does not"
        ):
            Catalog(tmp_path / f"data-{name}", nowhere).extractor(name)
    assert not [
        p for p in PluginRegistry(load_entry_points=False, models_dir=tmp_path / "none", env={}).problems
    ]


@pytest.mark.parametrize("shape", [(640, 640), (3000, 4000), (1200, 1100)])
def test_jpegs_are_never_decoded_below_what_sift_runs_at(models, data_dir, shape):
    """SIFT shrinks an image to max_side and never enlarges it, so a JPEG decoded at a reduced scale
    must keep its long side at max_side: the first rule (a short side of max_side / 2) decoded a
    square 640-px query at 320 px, and its pasted copy lost inliers; a CNN collection keeping SIFT
    features was decoded for the CNN alone."""
    from imagesearch.plugins import hookimpl
    from imagesearch.server.config import ServerConfig
    from imagesearch.server.extraction import Extraction
    from imagesearch.server.image_header import read_header
    from imagesearch.server.imaging import decoded_shape
    from tests.support.tiny_plugin import TinyExtractor

    class SmallInput(TinyExtractor):  # like a CNN: content with a short side of 100 px
        name, min_input_side = "small-input", 100

    class SmallInputPlugin:
        @hookimpl
        def register_extractors(self, register) -> None:
            register(SmallInput())

    registry = PluginRegistry(
        [("small", SmallInputPlugin())], load_entry_points=False, models_dir=models, env={}
    )
    max_side = registry.local_features["sift"].item.max_side
    catalog = Catalog(data_dir, registry)
    try:
        catalog.create("vlad", extractor="sift-vlad")
        catalog.create("hybrid", extractor="small-input", local_features="sift")
        extraction = Extraction(ServerConfig(data_dir=data_dir))
        header = read_header(jpeg(np.zeros((*shape, 3), np.uint8)))
        for collection in catalog.list():
            decoded = decoded_shape(header, extraction.min_side(collection))
            assert max(decoded) >= min(max_side, max(shape)), (collection.spec.name, decoded)
        extraction.close()
    finally:
        catalog.close()


@pytest.mark.parametrize("extractor", ["sift-vlad", "sift-bovw"])
def test_a_sift_collection_works_with_zero_set_up(models, data_dir, extractor):
    config = tiny_config(data_dir, models_dir=models)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        info = {e.name: e for e in client.list_plugins().extractors}[extractor]
        assert info.dimension == (32 * 128 if extractor == "sift-vlad" else 32)
        client.create_collection("s", extractor=extractor)
        originals = {name: photo(name) for name in PHOTOS}
        flat = np.full((64, 64, 3), 128, np.uint8)  # no keypoints at all
        items = [ImageItem(id=name, content=jpeg(image), label=name) for name, image in originals.items()]
        stored = client.add_images([*items, ImageItem(id="flat", content=jpeg(flat))], collection="s")
        assert stored.added_count == len(PHOTOS) + 1
        found = [
            client.search(jpeg(edited(image)), top_k=2, collection="s").ids for image in originals.values()
        ]
    top1 = sum(ids[0] == name for ids, name in zip(found, PHOTOS, strict=True))
    print(f"{extractor}: edited copy finds its photo first for {top1} of {len(PHOTOS)}")
    assert top1 >= (5 if extractor == "sift-vlad" else 4), found
