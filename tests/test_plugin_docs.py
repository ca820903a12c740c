"""docs/plugins.md stays true: every hook documented and tested, every interface member described,
and the code on the page runs (the datasette test_docs.py idea)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import types
from pathlib import Path

import faiss
import numpy as np
import pluggy
import pytest

from imagesearch.plugins import Extractor, LocalFeatures, Metric, PluginContext, TrainableExtractor, hookspecs
from imagesearch.plugins.manager import (
    ALLOW_ENV,
    BLOCK_ENV,
    DEFAULT_PLUGINS,
    ENTRY_POINT_GROUP,
    PluginRegistry,
)
from imagesearch.plugins.metrics import BUILTIN_METRICS
from imagesearch.plugins.registration_checks import METRIC_FUNCTIONS

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "plugins.md").read_text()
PLUGIN_TESTS = ROOT / "tests" / "test_plugins.py"

HOOKS = sorted(
    name
    for name, value in vars(hookspecs).items()
    if callable(value) and hasattr(value, f"{hookspecs.PROJECT_NAME}_spec")
)
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC, flags=re.DOTALL | re.MULTILINE)


def hook_signature(hook: str) -> str:
    return f"{hook}({', '.join(inspect.signature(getattr(hookspecs, hook)).parameters)})"


def section(heading_text: str) -> str:
    """The body of the markdown section whose heading contains ``heading_text``."""
    match = re.search(rf"^(#+) .*{re.escape(heading_text)}.*$", DOC, flags=re.MULTILINE)
    assert match, f"docs/plugins.md has no heading containing {heading_text!r}"
    level = len(match.group(1))
    rest = DOC[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.MULTILINE)
    return rest[: end.start() if end else len(rest)]


def block_starting_with(first_line: str) -> str:
    (code,) = [block for block in PYTHON_BLOCKS if block.startswith(first_line + "\n")]
    return code


def test_the_hookspecs_are_found_as_pluggy_sees_them() -> None:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    assert HOOKS
    assert sorted(name for name in vars(manager.hook) if not name.startswith("_")) == HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_documented_section(hook: str) -> None:
    body = section(f"`{hook_signature(hook)}`")
    assert "When called" in body
    assert "What to register" in body
    assert re.search(rf"@hookimpl\ndef {hook}\(register\)", body), f"{hook}: no example implementation"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook: str) -> None:
    tree = ast.parse(PLUGIN_TESTS.read_text())
    tests = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert f"test_hook_{hook}" in tests, f"tests/test_plugins.py needs test_hook_{hook}"


def _members(protocol: type) -> list[str]:
    """Attributes and public methods a protocol itself declares (not inherited)."""
    methods = [name for name, value in vars(protocol).items() if inspect.isfunction(value)]
    return [*inspect.get_annotations(protocol), *(name for name in methods if not name.startswith("_"))]


INTERFACES = {
    "The Extractor interface": _members(Extractor),
    "Trainable extractors": _members(TrainableExtractor),
    "The LocalFeatures interface": _members(LocalFeatures),
    "The Metric interface": [field.name for field in dataclasses.fields(Metric)],
    "Hook reference": [field.name for field in dataclasses.fields(PluginContext)],
}


@pytest.mark.parametrize(
    ("heading", "member"),
    [(heading, member) for heading, members in INTERFACES.items() for member in members],
)
def test_every_interface_member_has_a_table_row(heading: str, member: str) -> None:
    rows = re.findall(r"^\| `(\w+)", section(heading), flags=re.MULTILINE)
    assert member in rows, f"docs/plugins.md, section {heading!r}: no table row for `{member}`"


@pytest.mark.parametrize("member", METRIC_FUNCTIONS)
def test_every_metric_function_says_it_receives_arrays(member: str) -> None:
    """A ``math.exp(-d)`` to_score registered fine and failed every search: the page never said the
    functions get NumPy arrays (an outside test). Each has a row saying which array it receives."""
    rows = re.findall(rf"^\| `{member}` +\| (.*?) \|", section("The Metric interface"), flags=re.MULTILINE)
    assert any("array" in row and "float32" in row for row in rows), (
        f"`{member}`: what array does it receive?"
    )


@pytest.mark.parametrize(
    "name",
    [ALLOW_ENV, BLOCK_ENV, *DEFAULT_PLUGINS, *(metric.name for metric in BUILTIN_METRICS)],
)
def test_settings_and_builtin_names_are_documented(name: str) -> None:
    assert f"`{name}`" in DOC


def test_the_entry_point_group_is_documented() -> None:
    assert f"[project.entry-points.{ENTRY_POINT_GROUP}]" in DOC


def test_every_python_example_compiles() -> None:
    assert len(PYTHON_BLOCKS) >= 4
    for number, code in enumerate(PYTHON_BLOCKS):
        compile(code, f"docs/plugins.md python block {number}", "exec")


def test_the_one_file_plugin_and_its_documented_tests_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's example plugin loads through PluginRegistry and passes the page's example tests."""
    plugin = types.ModuleType("imagesearch_meancolor")
    exec(compile(block_starting_with("# imagesearch_meancolor.py"), "docs/plugins.md", "exec"), vars(plugin))
    monkeypatch.setitem(sys.modules, "imagesearch_meancolor", plugin)

    namespace: dict[str, object] = {}
    exec(compile(block_starting_with("# tests/test_meancolor.py"), "docs/plugins.md", "exec"), namespace)
    documented_tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(documented_tests) == 2
    for documented_test in documented_tests:
        documented_test()

    # The extractor and metric also work together as the server would use them.
    registry = PluginRegistry(
        extra_plugins=[("meancolor", plugin)], load_entry_points=False, env={BLOCK_ENV: "onnx_cnn"}
    )
    extractor = registry.extractors["mean-bgr"].item
    metric = registry.metrics[extractor.default_metric].item
    red, dark_red, blue = (
        np.full((8, 8, 3), bgr, np.uint8) for bgr in [(0, 0, 255), (0, 0, 200), (255, 0, 0)]
    )
    vectors = metric.prepare(extractor.extract([red, dark_red, blue]))
    index = faiss.IndexFlat(extractor.dim, metric.faiss_metric)
    index.add(vectors[1:])
    raw, ids = index.search(vectors[:1], 2)
    assert ids[0].tolist() == [0, 1]  # dark red before blue
    np.testing.assert_allclose(metric.to_distance(raw)[0], [55 / 255, 1.0], rtol=1e-5)


def test_the_orb_example_reranks_a_collection_through_a_real_server(tmp_path: Path) -> None:
    """No SIFT special case: a third party's local features give any collection geometric re-ranking."""
    import cv2

    from imagesearch.client import ImageItem, ImageSearchClient
    from imagesearch.server.app import run_server
    from imagesearch.server.dataset_builder import available_sources, encode_jpeg, resize_long_side
    from tests.conftest import tiny_config
    from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

    plugin = types.ModuleType("imagesearch_orb")
    exec(compile(block_starting_with("# imagesearch_orb.py"), "docs/plugins.md", "exec"), vars(plugin))
    found, _ = available_sources()
    photos = {
        source.name: resize_long_side(cv2.imread(str(path), cv2.IMREAD_COLOR), 480)
        for source, path in found[:8]
    }
    config = tiny_config(tmp_path / "data")
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN, ("orb", plugin)]) as running,
        ImageSearchClient(running.target) as client,
    ):
        assert [f.name for f in client.list_plugins().local_features] == ["orb", "sift"]
        client.create_collection("orb", extractor=TinyExtractor.name, local_features="orb")
        client.add_images(
            [ImageItem(id=name, content=encode_jpeg(image, 90)) for name, image in photos.items()],
            collection="orb",
        )
        checked = [name for name, image in photos.items() if textured(image)]
        assert len(checked) >= 4
        for name in checked:
            turned = encode_jpeg(cv2.rotate(photos[name], cv2.ROTATE_90_CLOCKWISE), 85)
            hits = client.search(turned, collection="orb", top_k=1, rerank=len(photos)).hits
            assert hits[0].id == name and hits[0].inliers >= 8, (name, hits)


def textured(image: np.ndarray) -> bool:
    """Photos with too little texture for 500 ORB keypoints are no test of the interface."""
    import cv2

    return len(cv2.ORB_create(500).detect(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), None)) >= 200
