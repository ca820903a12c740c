"""The plugin system: one test per hook, the built-ins, and every way a plugin can go wrong.

Third-party plugins are simulated the way Python sees an installed package: a
module plus a ``*.dist-info`` folder with an ``entry_points.txt`` on sys.path,
so discovery goes through importlib.metadata exactly as it would in production.
tests/test_plugin_docs.py checks that each hook has a ``test_hook_<name>`` here.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import pytest

from imagesearch.plugins.hookspecs import hookimpl
from imagesearch.plugins.manager import (
    ALLOW_ENV,
    BLOCK_ENV,
    DEFAULT_PLUGINS,
    ENTRY_POINT_GROUP,
    PluginConflictError,
    PluginRegistry,
    Registered,
)
from imagesearch.plugins.types import (
    ALL_INDEX_TYPES,
    Extractor,
    LocalFeatures,
    Metric,
    TrainableExtractor,
    inverse_distance_score,
    l2_normalize,
)
from imagesearch.server.item_checks import MAX_VECTOR_NORM

# The CNN plugin needs exported models; these tests are about the plugin machinery.
NO_CNN = {BLOCK_ENV: "onnx_cnn"}


@dataclass
class FakeExtractor(Extractor):
    name: str
    dim: int = 4
    version: str = "1"
    default_metric: str = "l2"
    description: str = "test extractor"

    def extract(self, images: list[np.ndarray]) -> np.ndarray:
        return np.asarray([image.reshape(-1)[: self.dim] for image in images], dtype=np.float32)


class Nameless(Extractor):
    """Subclasses the base but sets none of the required attributes."""


class NoExtract(Extractor):
    """Sets every required attribute but keeps the base class's ``extract``, which raises."""

    name, version, dim, default_metric = "lazy", "1", 4, "l2"


class NoVersion(Extractor):
    """Its repr, ``<tests.test_plugins.NoVersion object at 0x...>``, is what messages used to show."""

    name, version, dim, default_metric = "unversioned", None, 4, "l2"

    def extract(self, images: list[np.ndarray]) -> np.ndarray:
        return np.zeros((len(images), 4), np.float32)


class Dots(LocalFeatures):
    """Local features implementing their three methods."""

    name, version = "dots", "1"

    def extract(self, images: list[np.ndarray], *, for_query: bool = False) -> list[bytes]:
        return [b""] * len(images)

    def count(self, features: bytes) -> int:
        return 0

    def verify(self, query: bytes, candidates: list[bytes]) -> list[int]:
        return [0] * len(candidates)


class BareFeatures(LocalFeatures):
    name, version = "bare", "1"


class DotsEncoder(TrainableExtractor):
    """A trainable extractor implementing everything it must."""

    name, version, dim, default_metric = "dots-bovw", "1+0", 4, "l2"
    base_version, local_features = "1", "dots"

    def extract(self, images: list[np.ndarray]) -> np.ndarray:
        return np.zeros((len(images), 4), np.float32)

    def encode(self, features: list[bytes]) -> np.ndarray:
        return np.zeros((len(features), 4), np.float32)

    def state(self) -> bytes:
        return b""

    def with_state(self, state: bytes) -> DotsEncoder:
        return self

    def fit(self, features: list[bytes], size: int = 0, seed: int = 0) -> bytes:
        return b""


class UnfittableEncoder(TrainableExtractor):
    """Extracts, but leaves the trainable members to the base class."""

    name, version, dim, default_metric = "unfittable", "1+0", 4, "l2"
    base_version, local_features = "1", "dots"

    def extract(self, images: list[np.ndarray]) -> np.ndarray:
        return np.zeros((len(images), 4), np.float32)


def metric(name: str, faiss_metric: int = faiss.METRIC_L2) -> Metric:
    return Metric(name=name, faiss_metric=faiss_metric, description="test", to_score=inverse_distance_score)


class Plugin:
    """A plugin object registering fixed extractors and metrics (pluggy accepts any object)."""

    def __init__(
        self,
        extractors: tuple[object, ...] = (),
        metrics: tuple[object, ...] = (),
        local_features: tuple[object, ...] = (),
    ) -> None:
        self._extractors, self._metrics, self._local = extractors, metrics, local_features

    @hookimpl
    def register_extractors(self, register: Callable[[object], None]) -> None:
        for extractor in self._extractors:
            register(extractor)

    @hookimpl
    def register_metrics(self, register: Callable[[object], None]) -> None:
        for item in self._metrics:
            register(item)

    @hookimpl
    def register_local_features(self, register: Callable[[object], None]) -> None:
        for item in self._local:
            register(item)


def make_registry(*plugins: tuple[str, object], env: dict[str, str] | None = None) -> PluginRegistry:
    """Built-ins plus the given plugins; no installed third-party plugins."""
    return PluginRegistry(extra_plugins=plugins, load_entry_points=False, env={**NO_CNN, **(env or {})})


_unique = itertools.count()


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], str]]:
    """Install a fake third-party plugin: ``install(plugin_name, module_source)`` -> module name."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def install(plugin_name: str, source: str) -> str:
        module = f"fake_imagesearch_plugin_{next(_unique)}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        dist_info = site / f"{module}-1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{plugin_name} = {module}\n")
        modules.append(module)
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)


GOOD_THIRD_PARTY = """
    import faiss
    from imagesearch.plugins.hookspecs import hookimpl
    from imagesearch.plugins.types import Metric

    @hookimpl
    def register_metrics(register):
        register(Metric(name="{metric}", faiss_metric=faiss.METRIC_L1, description="", to_score=lambda d: -d))
"""


# -- one test per hook ---------------------------------------------------------------------------


def test_hook_register_extractors() -> None:
    extractor = FakeExtractor("fake")
    registry = make_registry(("fakes", Plugin(extractors=(extractor,))))
    assert registry.problems == []
    assert registry.extractors["fake"] == Registered(extractor, "fakes")
    assert registry.extractors["fake"].item is extractor
    images = [np.arange(12, dtype=np.uint8).reshape(2, 2, 3)]
    np.testing.assert_array_equal(registry.extractors["fake"].item.extract(images), [[0, 1, 2, 3]])
    assert "missing" not in registry.extractors


def test_hook_register_local_features() -> None:
    """Local features register under their name; a trainable extractor without its features is dropped."""

    class Orphan(DotsEncoder):
        name, local_features = "orphan-bovw", "stripes"

    features = Dots()
    registry = make_registry(
        ("dots", Plugin(extractors=(DotsEncoder(), Orphan()), local_features=(features,)))
    )
    assert registry.local_features["dots"] == Registered(features, "dots")
    assert "dots-bovw" in registry.extractors and "orphan-bovw" not in registry.extractors
    assert any("orphan-bovw" in problem and "stripes" in problem for problem in registry.problems)


def test_hook_register_metrics() -> None:
    """A plugin adds a FAISS metric imagesearch does not ship (L-infinity) and it searches correctly."""
    linf = Metric(
        name="linf",
        faiss_metric=faiss.METRIC_Linf,
        description="largest coordinate difference",
        to_score=inverse_distance_score,
    )
    registry = make_registry(("chebyshev", Plugin(metrics=(linf,))))
    assert registry.problems == []
    assert registry.metrics["linf"] == Registered(linf, "chebyshev")
    assert "missing" not in registry.metrics

    rng = np.random.default_rng(3)
    stored, queries = rng.random((300, 16), dtype=np.float32), rng.random((5, 16), dtype=np.float32)
    chosen = registry.metrics["linf"].item
    index = faiss.IndexFlat(16, chosen.faiss_metric)
    index.add(chosen.prepare(stored))
    raw, ids = index.search(chosen.prepare(queries), 5)
    expected = np.abs(queries[:, None, :] - stored[None, :, :]).max(axis=2)
    np.testing.assert_array_equal(ids, np.argsort(expected, axis=1)[:, :5])
    np.testing.assert_allclose(chosen.to_distance(raw), np.sort(expected, axis=1)[:, :5], atol=1e-5)


# -- built-ins -----------------------------------------------------------------------------------


def test_default_plugins_are_ordinary_modules_registered_under_their_names() -> None:
    registry = make_registry()
    assert sorted(registry.loaded) == sorted(set(DEFAULT_PLUGINS) - {"onnx_cnn"})
    assert registry.loaded["metrics"].__name__ == DEFAULT_PLUGINS["metrics"]
    assert {name: r.plugin for name, r in registry.metrics.items()} == {
        "l2": "metrics",
        "inner_product": "metrics",
        "cosine": "metrics",
    }


def test_all_default_plugins_load_without_problems() -> None:
    registry = PluginRegistry(load_entry_points=False, env={})
    assert registry.problems == []
    assert set(DEFAULT_PLUGINS) <= set(sorted(registry.loaded))


def _l2(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(q[:, None, :] - x[None, :, :], axis=2)


def _dot(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    return q @ x.T


def _cos(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    return _dot(q, x) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(x, axis=1))


@pytest.mark.parametrize(
    ("name", "faiss_metric", "higher_is_closer", "reference", "score_of"),
    [
        ("l2", faiss.METRIC_L2, False, _l2, lambda d: 1 / (1 + d)),
        ("inner_product", faiss.METRIC_INNER_PRODUCT, True, _dot, lambda d: d),
        ("cosine", faiss.METRIC_INNER_PRODUCT, True, _cos, lambda d: d),
    ],
)
def test_builtin_metric_maps_to_faiss_and_scores_consistently(
    name: str,
    faiss_metric: int,
    higher_is_closer: bool,
    reference: Callable[[np.ndarray, np.ndarray], np.ndarray],
    score_of: Callable[[np.ndarray], np.ndarray],
) -> None:
    """FAISS through the metric equals the NumPy definition; scores are higher-is-better."""
    chosen = make_registry().metrics[name].item
    assert chosen.faiss_metric == faiss_metric
    assert chosen.index_types == ALL_INDEX_TYPES

    rng = np.random.default_rng(11)
    stored = rng.normal(size=(400, 12)).astype(np.float32) * rng.uniform(0.5, 3, (400, 1)).astype(np.float32)
    queries = rng.normal(size=(6, 12)).astype(np.float32)
    index = faiss.IndexFlat(12, chosen.faiss_metric)
    index.add(chosen.prepare(stored))
    raw, ids = index.search(chosen.prepare(queries), 8)
    distance = chosen.to_distance(raw)
    score = chosen.to_score(distance)

    expected = reference(queries.astype(np.float64), stored.astype(np.float64))
    order = np.argsort(-expected if higher_is_closer else expected, axis=1)[:, :8]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(distance, np.take_along_axis(expected, order, axis=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(score, score_of(distance), rtol=1e-6)
    assert (np.diff(score, axis=1) <= 0).all(), "FAISS order must be decreasing score"


def test_cosine_ignores_vector_length_and_scores_identical_direction_one() -> None:
    cosine, l2 = make_registry().metrics["cosine"].item, make_registry().metrics["l2"].item
    vectors = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(cosine.prepare(vectors), [[0.6, 0.8], [0.0, 0.0]])  # zero rows stay zero
    index = faiss.IndexFlat(2, cosine.faiss_metric)
    index.add(cosine.prepare(vectors[:1]))
    raw, _ = index.search(cosine.prepare(vectors[:1] * 10), 1)
    assert cosine.to_score(cosine.to_distance(raw))[0, 0] == pytest.approx(1.0)
    # float32 rounding of unit vectors' products never leaves the promised [-1, 1]
    rounded = np.array([1.0000002, -1.0000002, 0.5], dtype=np.float32)
    assert cosine.to_distance(rounded).tolist() == [1.0, -1.0, 0.5]
    assert l2.to_score(l2.to_distance(np.array([0.0], dtype=np.float32)))[0] == 1.0
    # FAISS L2 returns squared distances, possibly a hair below zero: reported as a true distance.
    np.testing.assert_allclose(l2.to_distance(np.array([9.0, -1e-7], dtype=np.float32)), [3.0, 0.0])


# -- broken plugins are reported by name; the rest still load --------------------------------------


class RaisingPlugin:
    @hookimpl
    def register_metrics(self, register: Callable[[object], None]) -> None:
        register(metric("half_registered"))
        raise RuntimeError("boom")


def test_a_raising_hook_is_reported_and_contributes_nothing() -> None:
    registry = make_registry(("raiser", RaisingPlugin()), ("good", Plugin(metrics=(metric("good_metric"),))))
    assert registry.problems == ["plugin 'raiser' failed in register_metrics: RuntimeError: boom"]
    assert "half_registered" not in registry.metrics  # all or nothing per plugin and hook
    assert registry.metrics["good_metric"].plugin == "good"
    assert "l2" in registry.metrics


def _registering(kind: str, *objects: object) -> Plugin:
    """A plugin registering ``objects`` through the hook of ``kind``: extractors, metrics, local_features."""
    return Plugin(**{kind: objects})


def _with(**changes: object) -> Metric:
    """A sound test metric with some fields changed, as a careless plugin might set them."""
    return replace(metric("m"), **changes)


INVALID_OBJECTS = [  # (the hook's kind, what the plugin registers, what the message must say)
    ("extractors", object(), "extractor (class object) is not a subclass of imagesearch.plugins.Extractor"),
    ("extractors", Nameless(), "extractor (class Nameless) lacks name, version, dim, default_metric"),
    ("extractors", FakeExtractor("zero", dim=0), "extractor 'zero' (class FakeExtractor) has invalid dim 0"),
    ("extractors", FakeExtractor("float", dim=2.5), "invalid dim 2.5"),  # type: ignore[arg-type]
    ("extractors", FakeExtractor("bool", dim=True), "invalid dim True"),
    (
        "extractors",
        FakeExtractor("huge", dim=10**12),
        "invalid dim 1000000000000: a positive integer up to 1048576",
    ),
    ("extractors", FakeExtractor(""), "no usable name"),
    ("extractors", FakeExtractor("v", version=2), "version must be a str"),  # type: ignore[arg-type]
    ("extractors", NoVersion(), "extractor 'unversioned' (class NoVersion): version must be a str"),
    ("extractors", NoExtract(), "extractor 'lazy' (class NoExtract) does not implement extract"),
    (
        "extractors",
        UnfittableEncoder(),
        "(class UnfittableEncoder) does not implement state, with_state, fit, encode",
    ),
    (
        "local_features",
        BareFeatures(),
        "local features 'bare' (class BareFeatures) does not implement extract, count, verify",
    ),
    ("metrics", "l1", "metric (class str) is not an imagesearch.plugins.types.Metric"),
    ("metrics", _with(index_types=frozenset({"annoy"})), "index_types must be"),
    (
        "metrics",
        _with(to_score=None),
        "metric 'm' (class Metric): to_score must be a function of NumPy arrays, got None",
    ),
    (
        "metrics",
        _with(to_distance="abs"),
        "metric 'm' (class Metric): to_distance must be a function of NumPy arrays, got 'abs'",
    ),
    (
        "metrics",
        _with(prepare=None),
        "metric 'm' (class Metric): prepare must be a function of NumPy arrays, got None",
    ),
    (
        "metrics",
        _with(faiss_metric=12345),
        "metric 'm' (class Metric): faiss_metric must be one of faiss.METRIC_",
    ),
    ("metrics", _with(faiss_metric=True), "got True"),  # True == METRIC_L2, but a bool says a mistake
    ("metrics", _with(faiss_metric=np.int64(1)), "faiss_metric must be"),  # FAISS's constructors refuse it
]


@pytest.mark.parametrize(("kind", "registered", "reason"), INVALID_OBJECTS)
def test_an_invalid_registered_object_is_reported(kind: str, registered: object, reason: str) -> None:
    """Each was accepted and failed every request (outside tests), or was named by its repr."""
    good = FakeExtractor("good")
    registry = make_registry(("bad", _registering(kind, registered)), ("fine", Plugin(extractors=(good,))))
    (problem,) = registry.problems
    assert problem.startswith(f"plugin 'bad' failed in register_{kind}: TypeError")
    assert reason in problem
    assert " object at 0x" not in problem  # the class is named, not the repr
    assert registry.extractors["good"].item is good


def _nan_beyond_10(distances: np.ndarray) -> np.ndarray:
    return np.where(distances > 10, np.nan, -distances)


SCORE_SPOT_CHECK = [  # (the metric's changed fields, the exception, what the message must say)
    (
        {"to_score": lambda d: np.sin(7 * d)},  # the outside test's: the best match came last
        "ValueError",
        "to_score must shrink as FAISS's raw distance grows (higher score = more similar), "
        "but raw 0 scores 0 and raw 0.1 scores 0.644",
    ),
    ({"to_score": lambda d: d}, "ValueError", "to_score must shrink as FAISS's raw distance grows"),
    (
        {"faiss_metric": faiss.METRIC_INNER_PRODUCT, "to_score": lambda s: -s},
        "ValueError",
        "to_score must grow as FAISS's raw similarity grows",
    ),
    (
        {"to_score": lambda d: np.full(np.shape(d), np.nan)},
        "ValueError",
        "to_score gives NaN for raw value 0",
    ),
    ({"to_score": _nan_beyond_10}, "ValueError", "to_score gives NaN for raw value 13.3"),
    ({"to_distance": lambda raw: raw * np.nan}, "ValueError", "to_distance gives NaN for raw value 0"),
    ({"to_score": np.ones_like}, "ValueError", "gives every raw value from 0 to 1000 the same score, 1"),
    (
        {"to_score": lambda d: math.exp(-d)},  # the outside test's: refused by every search
        "TypeError",
        "to_score failed on a 1-D float32 array of 34 values: TypeError: ",
    ),
    ({"to_distance": math.sqrt}, "TypeError", "Metric functions receive NumPy arrays, not single numbers"),
    (
        {"to_score": lambda d: float(np.mean(d))},
        "TypeError",
        "to_score turned a float32 array of shape (34,) into float64 values of shape (); "
        "it must return one number per value",
    ),
    ({"to_score": lambda d: d.astype(str)}, "TypeError", "into <U"),
    (  # an empty collection's search scores no hits
        {"to_score": lambda d: d.max() - d},
        "TypeError",
        "to_score failed on a 1-D float32 array of 0 values: ValueError: zero-size array",
    ),
]


@pytest.mark.parametrize(("changes", "error", "reason"), SCORE_SPOT_CHECK)
def test_a_metric_whose_scores_fail_the_spot_check_is_refused(changes: dict, error: str, reason: str) -> None:
    """to_score(to_distance(raw)) on a fixed increasing float32 array of raw values: scores in FAISS's
    order (FAISS keeps the best raw values, the server sorts them by score), never NaN, not constant."""
    registry = make_registry(("bad", Plugin(metrics=(_with(**changes),))))
    (problem,) = registry.problems
    assert problem.startswith(
        f"plugin 'bad' failed in register_metrics: {error}: metric 'm' (class Metric): "
    )
    assert reason in problem
    assert "m" not in registry.metrics


def _faiss_metric_types() -> list[tuple[str, int]]:
    return sorted((name, value) for name, value in vars(faiss).items() if name.startswith("METRIC_"))


@pytest.mark.parametrize(("name", "faiss_metric"), _faiss_metric_types())
def test_every_faiss_metric_type_is_accepted_with_a_score_in_its_direction(
    name: str, faiss_metric: int
) -> None:
    """The spot-check samples each metric type's own range: a distance scored by 1 / (1 + d), a
    similarity scored by itself, and a score clipped flat at the ends (cosine's) all pass."""
    similarity = faiss.is_similarity_metric(faiss_metric)
    scores = [lambda s: s, lambda s: np.clip(s, -1, 1)] if similarity else [inverse_distance_score]
    metrics = tuple(
        Metric(name=f"{name}-{n}", faiss_metric=faiss_metric, description="", to_score=score)
        for n, score in enumerate(scores)
    )
    registry = make_registry(("all", Plugin(metrics=metrics)))
    assert registry.problems == []
    assert all(m.name in registry.metrics for m in metrics)


def test_a_numpy_integer_dim_is_accepted_and_stored_as_an_int() -> None:
    extractor = FakeExtractor("numpy-dim", dim=np.int64(4))  # type: ignore[arg-type]
    registry = make_registry(("np", Plugin(extractors=(extractor,))))
    assert registry.problems == []
    assert type(registry.extractors["numpy-dim"].item.dim) is int and extractor.dim == 4


class UnknownHookPlugin:
    @hookimpl
    def register_index_backends(self, register: Callable[[object], None]) -> None:
        raise AssertionError("never called")

    @hookimpl
    def register_metrics(self, register: Callable[[object], None]) -> None:
        register(metric("from_unknown_hook_plugin"))


def test_a_plugin_implementing_an_unknown_hook_is_reported_and_unloaded() -> None:
    registry = make_registry(("future", UnknownHookPlugin()))
    (problem,) = registry.problems
    assert problem.startswith("plugin 'future' implements an unknown hook")
    assert "register_index_backends" in problem
    assert "future" not in sorted(registry.loaded)
    assert "from_unknown_hook_plugin" not in registry.metrics
    assert "l2" in registry.metrics


class WrongSignaturePlugin:
    @hookimpl
    def register_metrics(self, add: Callable[[object], None]) -> None:
        raise AssertionError("never called")


class ForgotHookimplPlugin:
    def register_metrics(self, register: Callable[[object], None]) -> None:
        raise AssertionError("never called")


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (WrongSignaturePlugin(), "plugin 'oops' failed to load: PluginValidationError"),
        (ForgotHookimplPlugin(), "plugin 'oops' implements no imagesearch hook"),
    ],
)
def test_a_malformed_plugin_is_reported(plugin: object, message: str) -> None:
    registry = make_registry(("oops", plugin))
    (problem,) = registry.problems
    assert problem.startswith(message)
    assert "l2" in registry.metrics


def test_an_extractor_whose_default_metric_is_missing_is_reported() -> None:
    registry = make_registry(("orphan", Plugin(extractors=(FakeExtractor("e", default_metric="nope"),))))
    assert registry.problems == [
        "extractor 'e' (plugin 'orphan') defaults to metric 'nope', which no loaded plugin registers"
    ]
    assert "e" in registry.extractors  # still usable with an explicit metric


def test_a_third_party_plugin_that_fails_to_import_is_reported_by_name(third_party) -> None:
    third_party("broken", "import does_not_exist_anywhere\n")
    third_party("working", GOOD_THIRD_PARTY.format(metric="working_metric"))
    registry = PluginRegistry(env={**NO_CNN, ALLOW_ENV: "broken,working"})
    assert registry.problems == [
        "plugin 'broken' failed to load: ModuleNotFoundError: No module named 'does_not_exist_anywhere'"
    ]
    assert registry.metrics["working_metric"].plugin == "working"
    assert "l2" in registry.metrics


def test_a_third_party_plugin_named_like_a_builtin_is_refused(third_party) -> None:
    third_party("metrics", GOOD_THIRD_PARTY.format(metric="impostor"))
    registry = PluginRegistry(env={**NO_CNN, ALLOW_ENV: "metrics"})
    (problem,) = registry.problems
    assert problem.startswith("plugin 'metrics' (fake_imagesearch_plugin_")
    assert "clashes with a loaded plugin's name" in problem
    assert "impostor" not in registry.metrics
    assert registry.metrics["l2"].plugin == "metrics"


# -- allow-list and block-list ---------------------------------------------------------------------


def test_third_party_plugins_are_discovered_through_the_entry_point_group(third_party) -> None:
    module = third_party("alpha", GOOD_THIRD_PARTY.format(metric="alpha_metric"))
    registry = PluginRegistry(env={**NO_CNN, ALLOW_ENV: "alpha"})
    assert registry.problems == []
    assert registry.metrics["alpha_metric"].plugin == "alpha"
    assert registry.loaded["alpha"].__name__ == module


def test_the_allow_list_loads_only_the_named_third_party_plugins(third_party) -> None:
    third_party("alpha", GOOD_THIRD_PARTY.format(metric="alpha_metric"))
    third_party("beta", GOOD_THIRD_PARTY.format(metric="beta_metric"))
    registry = PluginRegistry(env={**NO_CNN, ALLOW_ENV: " alpha , "})
    assert "alpha_metric" in registry.metrics
    assert "beta_metric" not in registry.metrics
    assert f"plugin 'beta' is not in {ALLOW_ENV}" in registry.skipped
    assert "l2" in registry.metrics  # the allow-list governs third-party plugins only

    nothing = PluginRegistry(env={**NO_CNN, ALLOW_ENV: ""})
    assert not {"alpha_metric", "beta_metric"} & set(nothing.metrics)
    assert sorted(nothing.loaded) == sorted(set(DEFAULT_PLUGINS) - {"onnx_cnn"})  # the built-ins


def test_a_misspelt_allow_list_entry_is_reported(third_party) -> None:
    third_party("alpha", GOOD_THIRD_PARTY.format(metric="alpha_metric"))
    registry = PluginRegistry(env={**NO_CNN, ALLOW_ENV: "alpah"})
    assert registry.problems == [f"plugin 'alpah' is named in {ALLOW_ENV} but no such plugin is installed"]
    assert "alpha_metric" not in registry.metrics


def test_the_block_list_stops_builtin_and_third_party_plugins(third_party) -> None:
    third_party("alpha", GOOD_THIRD_PARTY.format(metric="alpha_metric"))
    third_party("beta", GOOD_THIRD_PARTY.format(metric="beta_metric"))
    registry = PluginRegistry(env={ALLOW_ENV: "alpha,beta", BLOCK_ENV: "onnx_cnn,metrics,sift,alpha"})
    assert registry.problems == []
    assert set(registry.metrics) == {"beta_metric"}
    assert sorted(registry.loaded) == ["beta"]
    blocked = {
        f"plugin {name!r} is blocked by {BLOCK_ENV}" for name in ("onnx_cnn", "metrics", "sift", "alpha")
    }
    assert blocked <= set(registry.skipped)


def test_env_vars_are_read_from_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BLOCK_ENV, "metrics,onnx_cnn")
    monkeypatch.setenv(ALLOW_ENV, "")
    registry = PluginRegistry(extra_plugins=[("mine", Plugin(metrics=(metric("mine"),)))])
    assert set(registry.metrics) == {"mine"}


# -- duplicate names stop start-up, naming both plugins --------------------------------------------


def test_two_plugins_registering_one_extractor_name_is_a_conflict() -> None:
    first, second = Plugin(extractors=(FakeExtractor("same"),)), Plugin(extractors=(FakeExtractor("same"),))
    with pytest.raises(PluginConflictError) as caught:
        make_registry(("first", first), ("second", second))
    message = str(caught.value)
    assert "extractor 'same'" in message
    assert "'first'" in message and "'second'" in message
    assert BLOCK_ENV in message  # says how to resolve it
    # ... and following that advice works.
    assert make_registry(("first", first), ("second", second), env={BLOCK_ENV: "onnx_cnn,second"}).extractors[
        "same"
    ] == Registered(first._extractors[0], "first")


def test_a_plugin_re_registering_a_builtin_metric_is_a_conflict() -> None:
    with pytest.raises(
        PluginConflictError, match=r"metric 'l2' is registered by both plugin 'metrics' and plugin 'shadow'"
    ):
        make_registry(("shadow", Plugin(metrics=(metric("l2"),))))


def test_a_plugin_registering_a_name_twice_is_a_conflict() -> None:
    with pytest.raises(PluginConflictError, match="plugin 'twice' and plugin 'twice'"):
        make_registry(("twice", Plugin(metrics=(metric("m"), metric("m")))))


class SwallowingPlugin:
    """Catches everything register raises: the conflict must surface anyway."""

    @hookimpl
    def register_metrics(self, register: Callable[[object], None]) -> None:
        with contextlib.suppress(Exception):
            register(metric("cosine"))


def test_a_plugin_cannot_swallow_a_conflict() -> None:
    with pytest.raises(PluginConflictError, match="metric 'cosine'"):
        make_registry(("sneaky", SwallowingPlugin()))


def test_registration_problems_keep_what_was_registered():
    """A hook may register what works, then raise RegistrationProblems for the rest."""
    from imagesearch.plugins.types import RegistrationProblems

    class PartlyBroken:
        @hookimpl
        def register_extractors(self, register):
            register(_PartialExtractor())
            raise RegistrationProblems(["model a.onnx is corrupt", "model b.onnx has no sidecar"])

    registry = PluginRegistry([("partly", PartlyBroken())], load_entry_points=False)
    assert registry.extractors["partial"].plugin == "partly"
    assert any("partly" in p and "a.onnx is corrupt" in p for p in registry.problems)
    assert any("b.onnx has no sidecar" in p for p in registry.problems)


class _PartialExtractor(Extractor):
    name, version, dim, default_metric, description = "partial", "1", 4, "cosine", "test"

    def extract(self, images):
        raise NotImplementedError


@pytest.mark.parametrize(
    "norm",
    [1e-36, 3.6e-24, 1.0, MAX_VECTOR_NORM, 1e38],
    ids=["near-float32-min", "tiny", "unit", "largest-accepted", "near-float32-max"],
)
def test_l2_normalize_keeps_the_direction_of_any_finite_float32_vector(norm: float) -> None:
    """Squared in float32, tiny rows underflow to zero vectors and huge ones overflow to inf."""
    direction = np.random.default_rng(0).normal(size=(3, 64))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    rows = (direction * norm).astype(np.float32)
    unit = l2_normalize(rows)
    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, direction, atol=1e-6)


def test_l2_normalize_leaves_zero_rows_zero() -> None:
    rows = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    assert l2_normalize(rows).tolist() == [[0.0, 0.0], [0.6000000238418579, 0.800000011920929]]


def test_l2_normalize_is_within_an_ulp_of_exact_zeroes_a_nan_row_and_ignores_the_batch() -> None:
    """The fast path divides by the float32 norm: within a few ulps of the float64 division, a
    row's result the same alone as in any batch, and a row whose norm is NaN zeroed (NaN is not >
    the lower bound, so it takes the masked path)."""
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(256, 64)).astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))[:, None]
    unit = l2_normalize(rows)
    np.testing.assert_array_max_ulp(unit, (rows / norms).astype(np.float32), maxulp=2)
    assert all(np.array_equal(l2_normalize(rows[i : i + 1])[0], unit[i]) for i in range(0, 256, 17))
    # ... also beside rows that take the careful path (zero, tiny, huge: an outside test found the
    # whole batch switching to the float64 division, and a query's scores moving by an ulp)
    for odd in ([0.0] * 64, [1e-35] + [0.0] * 63, [3e37] * 64):
        beside = l2_normalize(np.vstack([rows[:5], np.array([odd], np.float32)]))
        assert np.array_equal(beside[:5], unit[:5])
    with_nan = np.array([[np.nan, 1.0], [3.0, 4.0]], dtype=np.float32)
    assert l2_normalize(with_nan).tolist() == [[0.0, 0.0], [0.6000000238418579, 0.800000011920929]]
