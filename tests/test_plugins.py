"""The plugin system: one test per hook, the built-ins, and every way a plugin can go wrong.

Third-party plugins are simulated the way Python sees an installed package: a
module plus a ``*.dist-info`` folder with an ``entry_points.txt`` on sys.path,
so discovery goes through importlib.metadata exactly as it would in production.
tests/test_plugin_docs.py checks that each hook has a ``test_hook_<name>`` here.
"""

from __future__ import annotations

import contextlib
import itertools
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


def metric(name: str, faiss_metric: int = faiss.METRIC_L2) -> Metric:
    return Metric(name=name, faiss_metric=faiss_metric, description="test", to_score=abs)


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

    class Features(LocalFeatures):
        name, version = "dots", "1"

    class Encoder(TrainableExtractor):
        name, version, dim, default_metric = "dots-bovw", "1+0", 4, "l2"
        base_version, local_features = "1", "dots"

    class Orphan(Encoder):
        name, local_features = "orphan-bovw", "stripes"

    features = Features()
    registry = make_registry(("dots", Plugin(extractors=(Encoder(), Orphan()), local_features=(features,))))
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


@pytest.mark.parametrize(
    ("extractors", "metrics", "reason"),
    [
        ((object(),), (), "is not a subclass of imagesearch.plugins.Extractor"),
        ((Nameless(),), (), "lacks name, version, dim, default_metric"),
        ((FakeExtractor("zero", dim=0),), (), "invalid dim 0"),
        ((FakeExtractor("float", dim=2.5),), (), "invalid dim 2.5"),  # type: ignore[arg-type]
        ((FakeExtractor(""),), (), "no usable name"),
        ((FakeExtractor("v", version=2),), (), "version must be a str"),  # type: ignore[arg-type]
        ((), ("l1",), "is not an imagesearch.plugins.types.Metric"),
        ((), (replace(metric("m"), index_types=frozenset({"annoy"})),), "index_types must be"),
    ],
)
def test_an_invalid_registered_object_is_reported(extractors: tuple, metrics: tuple, reason: str) -> None:
    hook = "register_extractors" if extractors else "register_metrics"
    good = FakeExtractor("good")
    registry = make_registry(("bad", Plugin(extractors, metrics)), ("fine", Plugin(extractors=(good,))))
    (problem,) = registry.problems
    assert problem.startswith(f"plugin 'bad' failed in {hook}: TypeError")
    assert reason in problem
    assert registry.extractors["good"].item is good


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
