"""The plugin's own tests: what a plugin author runs with `pytest` in this folder.

They need imagesearch (with the server extra) installed; they do not need a
running server. The last test is the contract test every plugin should have:
imagesearch loads the plugin and accepts what it registers.
"""

from concurrent.futures import ThreadPoolExecutor

import faiss
import imagesearch_colorhist
import numpy as np
import pytest
from imagesearch_colorhist import JENSEN_SHANNON, HSVHistogram

from imagesearch.plugins.manager import PluginRegistry


def solid(bgr: tuple[int, int, int], size: int = 16) -> np.ndarray:
    return np.full((size, size, 3), bgr, dtype=np.uint8)


def test_histograms_are_normalised_float32_rows() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(10, 30), (64, 48), (1, 1)]]
    vectors = HSVHistogram().extract(images)
    assert vectors.shape == (3, HSVHistogram.dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors.sum(axis=1), 1.0, rtol=1e-5)


def test_a_solid_colour_fills_one_bin_and_different_hues_fill_different_bins() -> None:
    extractor = HSVHistogram()
    red, green, blue = extractor.extract([solid((0, 0, 255)), solid((0, 255, 0)), solid((255, 0, 0))])
    for vector in (red, green, blue):
        assert np.count_nonzero(vector) == 1
    assert len({int(np.argmax(v)) for v in (red, green, blue)}) == 3


def test_grey_and_bgra_images_are_accepted_and_other_inputs_refused() -> None:
    extractor = HSVHistogram()
    grey = np.full((8, 8), 128, dtype=np.uint8)
    bgra = np.dstack([solid((255, 0, 0), 8), np.full((8, 8), 255, dtype=np.uint8)])
    np.testing.assert_array_equal(extractor.extract([grey]), extractor.extract([np.dstack([grey] * 3)]))
    np.testing.assert_array_equal(extractor.extract([bgra]), extractor.extract([solid((255, 0, 0), 8)]))
    with pytest.raises(ValueError, match="uint8"):
        extractor.extract([np.zeros((4, 4, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="empty"):
        extractor.extract([np.zeros((0, 4, 3), dtype=np.uint8)])


def test_extract_is_thread_safe() -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(32)]
    extractor = HSVHistogram()
    serial = extractor.extract(images)
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = np.vstack(list(pool.map(lambda image: extractor.extract([image]), images)))
    np.testing.assert_array_equal(parallel, serial)


def test_jensen_shannon_has_no_nan_on_sparse_histograms() -> None:
    vectors = HSVHistogram().extract([solid((0, 0, 255)), solid((255, 0, 0)), solid((0, 0, 250))])
    prepared = JENSEN_SHANNON.prepare(vectors)
    index = faiss.IndexFlat(vectors.shape[1], JENSEN_SHANNON.faiss_metric)
    index.add(prepared)
    distances, ids = index.search(prepared[:1], 3)
    assert np.isfinite(distances).all()
    assert ids[0].tolist() == [0, 2, 1]  # itself, the other red, then blue
    assert 0.0 <= distances[0, -1] <= np.log(2) + 1e-6


def test_imagesearch_loads_the_plugin_without_problems() -> None:
    registry = PluginRegistry(
        extra_plugins=[("colorhist", imagesearch_colorhist)],
        load_entry_points=False,  # the installed copy would clash with this one
        env={"IMAGESEARCH_DISABLE_PLUGINS": "onnx_cnn"},
    )
    assert registry.problems == []
    assert registry.extractors["colorhist-hsv"].plugin == "colorhist"
    assert {"l1", "jensen_shannon"} <= set(registry.metrics)
    assert registry.extractors["colorhist-hsv"].item.default_metric in registry.metrics
