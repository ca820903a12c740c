"""The example plugin package, pip-installed and discovered exactly as a third-party plugin would be."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import faiss
import numpy as np
import pytest

from imagesearch.plugins.manager import ALLOW_ENV, BLOCK_ENV, PluginRegistry
from tests.plugin_fixtures import EXAMPLE_DIR, EXAMPLE_MODULE, EXAMPLE_PLUGIN, colorhist_plugin

__all__ = ["colorhist_plugin"]  # a fixture, imported for pytest to find

pytestmark = pytest.mark.usefixtures("colorhist_plugin")


@pytest.fixture(scope="module")
def registry() -> PluginRegistry:
    """What the server would load: built-ins plus every installed third-party plugin."""
    return PluginRegistry(env={BLOCK_ENV: "onnx_cnn"})


def colour_images(rng: np.random.Generator, bgr: tuple[int, int, int], count: int) -> list[np.ndarray]:
    """Noisy images around one colour, so histograms spread over neighbouring bins."""
    base = np.array(bgr, dtype=np.int16)
    return [np.clip(base + rng.integers(-40, 41, (24, 24, 3)), 0, 255).astype(np.uint8) for _ in range(count)]


def test_installed_as_a_distribution_with_an_entry_point() -> None:
    entry_points = metadata.entry_points(group="imagesearch")
    assert (EXAMPLE_PLUGIN, EXAMPLE_MODULE) in {(ep.name, ep.value) for ep in entry_points}
    assert metadata.distribution("imagesearch-colorhist").version == "0.2.0"


def test_registry_discovers_the_plugin_through_its_entry_point(registry: PluginRegistry) -> None:
    assert EXAMPLE_PLUGIN in sorted(registry.loaded)
    assert not [problem for problem in registry.problems if EXAMPLE_PLUGIN in problem]
    module_file = Path(registry.loaded[EXAMPLE_PLUGIN].__file__).resolve()
    assert not module_file.is_relative_to(EXAMPLE_DIR), "loaded the source tree, not the installed copy"
    assert registry.extractors["colorhist-hsv"].plugin == EXAMPLE_PLUGIN
    assert registry.metrics["l1"].plugin == EXAMPLE_PLUGIN
    assert registry.metrics["jensen_shannon"].plugin == EXAMPLE_PLUGIN
    extractor = registry.extractors["colorhist-hsv"].item
    assert (extractor.dim, extractor.default_metric) == (128, "l1")
    assert registry.metrics["l1"].item.faiss_metric == faiss.METRIC_L1
    # The built-ins are untouched by the third-party plugin.
    assert registry.metrics["l2"].plugin == "metrics"


@pytest.mark.parametrize(
    ("env", "loaded"),
    [
        ({ALLOW_ENV: EXAMPLE_PLUGIN, BLOCK_ENV: "onnx_cnn"}, True),
        ({ALLOW_ENV: "", BLOCK_ENV: "onnx_cnn"}, False),
        ({BLOCK_ENV: f"onnx_cnn,{EXAMPLE_PLUGIN}"}, False),
    ],
)
def test_env_vars_enable_and_disable_the_installed_plugin(env: dict[str, str], loaded: bool) -> None:
    registry = PluginRegistry(env=env)
    assert (EXAMPLE_PLUGIN in sorted(registry.loaded)) is loaded
    assert ("colorhist-hsv" in registry.extractors) is loaded
    assert "l2" in registry.metrics  # built-ins load either way
    assert any(EXAMPLE_PLUGIN in reason for reason in registry.skipped) is not loaded


def test_red_is_closer_to_red_than_to_blue_under_l1(registry: PluginRegistry) -> None:
    rng = np.random.default_rng(0)
    extractor, metric = registry.extractors["colorhist-hsv"].item, registry.metrics["l1"].item
    red_a, red_b = colour_images(rng, (30, 30, 220), 2)
    (blue,) = colour_images(rng, (220, 30, 30), 1)
    vectors = metric.prepare(extractor.extract([red_a, red_b, blue]))
    np.testing.assert_allclose(vectors.sum(axis=1), 1.0, rtol=1e-5)
    index = faiss.IndexFlat(extractor.dim, metric.faiss_metric)
    index.add(vectors[1:])
    raw, ids = index.search(vectors[:1], 2)
    scores = metric.to_score(metric.to_distance(raw))[0]
    assert ids[0].tolist() == [0, 1]  # the other red first, blue second
    assert scores[0] > scores[1]


def l1_reference(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    return np.abs(queries[:, None, :] - vectors[None, :, :]).sum(axis=2)


def jensen_shannon_reference(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    p, q = queries[:, None, :].astype(np.float64), vectors[None, :, :].astype(np.float64)
    m = (p + q) / 2
    return (0.5 * (p * np.log(p / m)).sum(axis=2) + 0.5 * (q * np.log(q / m)).sum(axis=2)).astype(np.float32)


@pytest.mark.parametrize(
    ("metric_name", "reference"), [("l1", l1_reference), ("jensen_shannon", jensen_shannon_reference)]
)
def test_metric_through_faiss_matches_numpy_brute_force(
    registry: PluginRegistry, metric_name: str, reference: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> None:
    """A flat FAISS index with the plugin's metric returns the brute-force nearest neighbours."""
    rng = np.random.default_rng(7)
    extractor, metric = registry.extractors["colorhist-hsv"].item, registry.metrics[metric_name].item
    images = [img for bgr in rng.integers(0, 256, (60, 3)) for img in colour_images(rng, tuple(bgr), 4)]
    vectors = metric.prepare(extractor.extract(images))
    queries, stored = vectors[:8], vectors[8:]
    ids = np.arange(len(stored), dtype=np.int64) + 1000  # non-contiguous ids, as the server uses
    index = faiss.IndexIDMap2(faiss.IndexFlat(extractor.dim, metric.faiss_metric))
    index.add_with_ids(stored, ids)
    k = 10
    raw, found = index.search(queries, k)

    expected = reference(queries, stored)
    distances = metric.to_distance(raw)
    # FAISS's k distances are the k smallest of the brute force ...
    np.testing.assert_allclose(distances, np.sort(expected, axis=1)[:, :k], atol=1e-4)
    # ... and each id is a distinct stored vector really at that distance, so the ids
    # equal the brute-force ids up to the order of exact ties (histograms are quantised).
    positions = found - 1000
    assert all(len(set(row)) == k for row in positions.tolist())
    np.testing.assert_allclose(np.take_along_axis(expected, positions, axis=1), distances, atol=1e-4)
    scores = metric.to_score(distances)
    assert (np.diff(scores, axis=1) <= 0).all(), "hits must come out by decreasing score"


def test_the_plugins_own_test_suite_passes() -> None:
    """The example's tests (what a plugin author runs) pass against this imagesearch."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=EXAMPLE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
