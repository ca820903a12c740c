"""Evaluating on a folder-per-class set: reading and splitting it, building the offline set, and a
whole evaluation against a real server with the default CNN (JSON and HTML agree, no collection left)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from imagesearch.client import ImageSearchClient, InvalidArgument
from imagesearch.client.datasets import (
    HOLDOUT,
    LEAVE_ONE_OUT,
    Dataset,
    Relevance,
    describe,
    holdout_split,
    leave_one_out,
    read_dataset,
)
from imagesearch.client.errors import ErrorDetails
from imagesearch.server import eval_report, eval_runner
from imagesearch.server.app import RunningServer, run_server
from imagesearch.server.config import ServerConfig
from imagesearch.server.dataset_builder import build_dataset
from tests.cnn_fixtures import default_models_dir  # noqa: F401

SMALL_CLASSES = ("chelsea", "coffee", "rocket", "china", "grass")


def _touch(path: Path, content: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


# ---------------------------------------------------------------------------------------------
# Reading and splitting


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "set"
    for name in ("b/2.jpg", "b/1.PNG", "b/nested/3.webp", "a/only.gif", "c/x.tiff", "c/y.bmp", "c/z.jpeg"):
        _touch(root / name)
    for name in ("README.txt", "b/notes.md", "b/.DS_Store", "c/.hidden/w.jpg"):
        _touch(root / name)
    _touch(root / ".git" / "HEAD")
    (root / "empty").mkdir()
    return root


def test_read_dataset_lists_classes_images_and_other_files(tree: Path):
    dataset = read_dataset(tree)
    assert dataset.classes == ("a", "b", "c")  # "empty" has no image, ".git" is hidden
    assert [image.id for image in dataset.images] == [
        "a/only.gif", "b/1.PNG", "b/2.jpg", "b/nested/3.webp", "c/x.tiff", "c/y.bmp", "c/z.jpeg",
    ]  # fmt: skip
    assert {image.label for image in dataset.images if image.id.startswith("b/")} == {"b"}
    others = sorted(path.relative_to(tree).as_posix() for path in dataset.other_files)
    assert others == ["README.txt", "b/notes.md"]  # hidden files are skipped, as `imagesearch add` does
    with pytest.raises(FileNotFoundError):
        read_dataset(tree / "missing")


def test_an_image_whose_name_is_not_utf8_is_left_out_not_fatal(tree: Path):
    """It cannot be sent as an id, and it failed the whole evaluation (an outside test)."""
    import os

    odd = os.fsencode(tree / "a") + b"/bad\xff.jpg"
    with open(odd, "wb") as file:
        file.write(b"x")
    dataset = read_dataset(tree)
    assert len(dataset.images) == 7 and all("bad" not in image.id for image in dataset.images)
    assert [os.fsencode(path) for path in dataset.other_files if "bad" in str(path)] == [odd]


def test_a_dataset_given_by_a_relative_path_lists_its_other_files(tree: Path, monkeypatch):
    """``imagesearch eval set`` from the folder above (an outside test: the report's listing of
    other files failed, relative root against absolute paths, and the run exited 2)."""
    monkeypatch.chdir(tree.parent)
    dataset = read_dataset("set")
    described = describe(dataset, leave_one_out(dataset))
    assert described["other_files_listed"] == ["README.txt", "b/notes.md"]
    assert described["root"] == str(tree) and described["images"] == 7


def test_holdout_split_is_seeded_stratified_and_keeps_singletons_indexed(tmp_path: Path):
    for label, count in (("big", 10), ("pair", 2), ("one", 1)):
        for index in range(count):
            _touch(tmp_path / label / f"{index}.jpg")
    dataset = read_dataset(tmp_path)
    split = holdout_split(dataset, fraction=0.2, seed=7)
    assert split.kind == HOLDOUT and not split.queries_are_indexed
    held = {label: [q for q in split.queries if q.label == label] for label in dataset.classes}
    assert (len(held["big"]), len(held["pair"]), len(held["one"])) == (2, 1, 0)
    assert set(split.indexed) | set(split.queries) == set(dataset.images)
    assert not set(split.indexed) & set(split.queries)
    assert holdout_split(dataset, 0.2, seed=7) == split
    assert {holdout_split(dataset, 0.2, seed=s).queries for s in range(6)} != {split.queries}
    # A class's choice does not depend on the other classes.
    only_big = Dataset(tmp_path, tuple(image for image in dataset.images if image.label == "big"))
    assert holdout_split(only_big, 0.2, seed=7).queries == tuple(held["big"])
    assert len(holdout_split(dataset, 0.95, seed=1).indexed) == 3  # at least one image stays per class
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            holdout_split(dataset, bad)


def test_leave_one_out_queries_everything_and_never_counts_the_query(tmp_path: Path):
    for label, count in (("a", 3), ("b", 1)):
        for index in range(count):
            _touch(tmp_path / label / f"{index}.jpg")
    split = leave_one_out(read_dataset(tmp_path))
    assert split.kind == LEAVE_ONE_OUT and split.queries_are_indexed
    assert split.queries == split.indexed
    relevance = Relevance.of(split.indexed)
    assert [relevance.count(query) for query in split.queries] == [2, 2, 2, 0]


# ---------------------------------------------------------------------------------------------
# The offline set


def test_offline_set_is_deterministic_and_licensed(tmp_path: Path):
    first = build_dataset(tmp_path / "one", copies=2, seed=3, size=64, classes=["chelsea", "coins"])
    build_dataset(tmp_path / "two", copies=2, seed=3, size=64, classes=["chelsea", "coins"])
    build_dataset(tmp_path / "three", copies=2, seed=4, size=64, classes=["chelsea", "coins"])
    assert first["classes"] == ["chelsea", "coins"] and first["images"] == 6

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.jpg")}

    one, two, three = (files(tmp_path / name) for name in ("one", "two", "three"))
    assert sorted(one) == [f"{c}/{c}-{i}.jpg" for c in ("chelsea", "coins") for i in range(3)]
    assert one == two
    assert one["chelsea/chelsea-0.jpg"] == three["chelsea/chelsea-0.jpg"]  # the original has no randomness
    assert one["chelsea/chelsea-1.jpg"] != three["chelsea/chelsea-1.jpg"]
    licences = (tmp_path / "one" / "LICENSES.md").read_text()
    assert "| chelsea | scikit-image" in licences and "CC0" in licences and "| coins |" in licences
    with pytest.raises(FileExistsError):
        build_dataset(tmp_path / "one", copies=1, seed=0, size=64)
    with pytest.raises(ValueError):
        build_dataset(tmp_path / "four", copies=1, seed=0, size=64, classes=["no-such-photo"])


# ---------------------------------------------------------------------------------------------
# Degrading on a client without Classify or bucketed search


class _OldClient:
    """A client from before Classify and search modes: only what the runner's checks touch."""

    def search(self, image=None, *, top_k=0, collection=None):  # pragma: no cover - never reached
        raise AssertionError("a bucketed search must not be sent without a mode argument")


def test_runner_reports_what_an_older_client_cannot_measure(tree: Path):
    split = holdout_split(read_dataset(tree), 0.5, seed=0)
    notes: list[str] = []
    assert eval_runner._classify(_OldClient(), "c", split, eval_runner.EvalConfig(), None, notes) == {}
    assert "no classify()" in notes[0]
    run = eval_runner.RunResult("x", "cosine", eval_runner.BUCKETED, "c", 10, (1, 5, 10))
    eval_runner._search_all(_OldClient(), run, split, Relevance.of(split.indexed), {}, None)
    assert "bucketed search is not available" in run.skipped
    assert run.to_dict()["summary"] is None


class _RefusingClassifier:
    """A client whose Classify refuses every query, as the server does a bad ``neighbors``."""

    def classify(self, image=None, *, image_id=None, neighbors=0, collection=None):
        raise InvalidArgument("neighbors must be at least 1", details=ErrorDetails(reason="BAD_TOP_K"))


def test_classify_failures_are_noted_not_swallowed(tree: Path):
    """An outside test: every Classify failed and the run reported recognition as not measured,
    without a word of why."""
    split = holdout_split(read_dataset(tree), 0.5, seed=0)
    notes: list[str] = []
    config = eval_runner.EvalConfig()
    assert eval_runner._classify(_RefusingClassifier(), "c", split, config, None, notes) == {}
    assert notes == [
        f"recognition: Classify failed for {len(split.queries)} of {len(split.queries)} queries, left out "
        "of its accuracy (first: BAD_TOP_K: neighbors must be at least 1)"
    ]


class _RefusingOneImage:
    """A client whose server refuses the first image of an upload (undecodable) and records the ids
    asked as queries."""

    def __init__(self, refuse_first: bool = True) -> None:
        self.asked: list[str] = []
        self.refuse_first = refuse_first

    def get_collection(self, name):
        return type("Info", (), {"extractor": "x", "metric": "cosine"})()

    def add_files(self, paths, *, ids, labels, collection, skip_existing, skip_invalid, batch_size, progress):
        from imagesearch.client.types import AddResult, ItemResult

        if not self.refuse_first:
            return AddResult(
                tuple(ids), tuple(ItemResult(n, i, grpc.StatusCode.OK) for n, i in enumerate(ids)), len(ids)
            )
        refused = ItemResult(0, "", grpc.StatusCode.INVALID_ARGUMENT, "undecodable", "IMAGE_UNDECODABLE")
        stored = [ItemResult(n, i, grpc.StatusCode.OK) for n, i in enumerate(ids) if n]
        return AddResult(("", *ids[1:]), (refused, *stored), len(stored))

    def classify(self, image=None, *, image_id=None, neighbors=0, collection=None, **options):
        raise InvalidArgument("not here", details=ErrorDetails(reason="BAD_QUERY"))

    def search(self, image=None, *, image_id=None, top_k=0, collection=None, **options):
        self.asked.append(image_id)
        from imagesearch.client.types import SearchResult, StageTimings

        return SearchResult((), StageTimings(0, 0, 0, 0), "cosine")


def test_an_image_the_server_refused_is_named_and_not_asked_as_a_query(tree: Path):
    """Leave-one-out asked it by id, and reported it "not found", hiding why (an outside test)."""
    split = eval_runner.leave_one_out(read_dataset(tree))
    client = _RefusingOneImage()
    config = eval_runner.EvalConfig(modes=(eval_runner.PLAIN,), worst=0)
    (run,) = eval_runner._evaluate_collection(client, "c", split, config, None)
    refused = split.indexed[0].id
    assert refused not in client.asked and len(client.asked) == len(split.queries) - 1
    assert (
        run.notes[0]
        == f"1 image could not be indexed, so left out of the queries: {refused}: IMAGE_UNDECODABLE"
    )


def test_a_single_class_says_its_recognition_measures_nothing(tmp_path: Path):
    """It reported recognition 1.0 without a word (an outside test)."""
    for name in ("cats/1.jpg", "cats/2.jpg", "cats/3.jpg"):
        _touch(tmp_path / "set" / name)
    split = eval_runner.leave_one_out(read_dataset(tmp_path / "set"))
    config = eval_runner.EvalConfig(modes=(eval_runner.PLAIN,), worst=0)
    (run,) = eval_runner._evaluate_collection(_RefusingOneImage(refuse_first=False), "c", split, config, None)
    assert any("one class only" in note for note in run.notes)


@pytest.mark.parametrize(
    "change",
    [
        {"neighbors": -1},
        {"top_k": -1},
        {"ks": (0, 5)},
        {"ks": ()},
        {"worst": -2},
        {"strip_hits": 0},
        {"ks": (5, 1, 5)},  # the same row twice
        {"top_k": 3},  # P@5 and P@10 from 3 hits
        {"modes": ()},  # an empty table
    ],
)
def test_eval_config_refuses_counts_no_run_could_use(change: dict):
    with pytest.raises(ValueError, match="must"):
        eval_runner.EvalConfig(**change)


class _RefusingSearcher:
    """A client whose Search refuses every query."""

    def search(self, image=None, *, image_id=None, top_k=0, collection=None, **options):
        raise InvalidArgument("top_k must be at most 1000", details=ErrorDetails(reason="BAD_TOP_K"))


def test_search_failures_are_noted_and_a_run_that_measured_nothing_fails_the_command(
    tree: Path, monkeypatch, capsys
):
    """An outside test: with every search refused, the table was all n/a and the command exited 0."""
    split = holdout_split(read_dataset(tree), 0.5, seed=0)
    run = eval_runner.RunResult("x", "cosine", eval_runner.PLAIN, "c", 10, (1, 5, 10))
    eval_runner._search_all(_RefusingSearcher(), run, split, Relevance.of(split.indexed), {}, None)
    assert run.queries == [] and len(run.failed_queries) == len(split.queries)
    assert run.notes == [
        f"Search failed for {len(split.queries)} of {len(split.queries)} queries, left out of every measure "
        "(first: BAD_TOP_K: top_k must be at most 1000)"
    ]

    def unmeasured(client, dataset, split, config, stream=None):
        return eval_runner.Evaluation({"classes": 3}, config, "here", runs=[run])

    class Connected:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(eval_runner, "evaluate", unmeasured)
    args = eval_runner.build_parser().parse_args([str(tree), "--modes", "plain"])
    assert eval_runner.run_cli(args, connect=lambda target: Connected()) == 2
    assert "1 of 1 runs measured no query: Search failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--worst", "-1"], "worst must be at least 0"),  # refused without --html too
        (["--modes", ""], "modes must name at least one mode"),
        (["--top-k", "3"], "top_k must be 0 or at least the largest k, 10"),
    ],
)
def test_the_cli_refuses_what_no_run_could_use(tree: Path, capsys, argv: list[str], says: str):
    assert eval_runner.main([str(tree), "--target", "127.0.0.1:1", *argv]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("ks", ["", "1,x", "5,,10"])
def test_the_cli_says_what_cut_offs_look_like(tree: Path, capsys, ks: str):
    """``--ks ''`` answered with Python's own int() message (an outside test)."""
    with pytest.raises(SystemExit) as exited:
        eval_runner.main([str(tree), "--target", "127.0.0.1:1", "--ks", ks])
    assert exited.value.code == 2
    assert (
        f"cut-offs are whole numbers separated by commas, such as 1,5,10; got {ks!r}"
        in capsys.readouterr().err
    )


def test_the_cli_sorts_cut_offs_and_keeps_each_once():
    assert eval_runner.build_parser().parse_args(["here", "--ks", "10, 1,5,5"]).ks == (1, 5, 10)


def test_the_cli_refuses_a_folder_without_images(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert eval_runner.main([str(tmp_path / "empty"), "--target", "127.0.0.1:1"]) == 2
    assert "no images in class folders" in capsys.readouterr().err


def test_a_holdout_with_no_query_is_refused_before_touching_the_server(tmp_path: Path, capsys):
    """Every class of one image: the holdout leaves no query. It indexed everything, then ended
    "measured no query: " with nothing after the colon (an outside test)."""
    for name in ("cats/1.jpg", "dogs/1.jpg"):
        _touch(tmp_path / "set" / name)
    assert eval_runner.main([str(tmp_path / "set"), "--target", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "the holdout split leaves no query" in err and "--split leave-one-out" in err
    assert "cannot reach" not in err  # nothing listens there: refused first


def test_the_cli_refuses_negative_neighbors_before_touching_the_server(tree: Path, capsys):
    """Exit 2 and one line, as for ``--fraction 0``; the target is never called (nothing listens)."""
    assert eval_runner.main([str(tree), "--target", "127.0.0.1:1", "--neighbors", "-1"]) == 2
    assert "neighbors must be at least 0, not -1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# End to end against a real server


@pytest.fixture
def cnn_server(tmp_path: Path, default_models_dir: Path) -> Iterator[RunningServer]:  # noqa: F811
    config = ServerConfig(
        port=0,
        data_dir=tmp_path / "data",
        models_dir=default_models_dir,
        log_format="text",
        shutdown_grace_s=2.0,
        shutdown_announce_s=0.0,
    )
    with run_server(config) as running:
        yield running


def _json_at(summary: dict, key: str) -> float | None:
    value = summary
    for part in key.split("."):
        value = value[part]
    return value


@pytest.mark.e2e
def test_evaluation_against_a_live_server(tmp_path: Path, cnn_server: RunningServer, capsys):
    dataset = tmp_path / "offline"
    build_dataset(dataset, copies=4, seed=0, size=160, classes=SMALL_CLASSES)
    with ImageSearchClient(cnn_server.target) as client:
        bucketed = eval_runner.supports_bucketed(client)
        classify = eval_runner.supports_classify(client)
    modes = "plain,bucketed" if bucketed else "plain"
    json_path, html_path = tmp_path / "eval.json", tmp_path / "eval.html"
    argv = [str(dataset), "--target", cnn_server.target, "--extractors", "efficientnet-lite0",
            "--metrics", "cosine,l2", "--modes", modes, "--json", str(json_path), "--html", str(html_path)]  # fmt: skip
    assert eval_runner.main(argv) == 0
    printed = capsys.readouterr()
    assert "efficientnet-lite0" in printed.out and "images/s" in printed.err

    report = json.loads(json_path.read_text())
    assert report["dataset"]["classes"] == 5 and report["dataset"]["queries"] == 5
    assert report["dataset"]["other_files_listed"] == ["LICENSES.md"]
    runs = {(run["metric"], run["mode"]): run for run in report["runs"]}
    expected = {(metric, mode) for metric in ("cosine", "l2") for mode in modes.split(",")}
    assert set(runs) == expected
    assert all(not run["skipped"] for run in runs.values())
    cosine = runs["cosine", "plain"]["summary"]
    assert cosine["queries"] == 5
    assert cosine["at_k"]["1"]["top_k_accuracy"] >= 0.9
    assert cosine["map"] >= 0.9
    if classify:
        assert cosine["recognition_accuracy"] >= 0.9

    # Every number in the HTML is the JSON's, exactly.
    page = html_path.read_text()
    cells = re.findall(r'data-run="(\d+)" data-key="([^"]+)" data-value="([^"]+)"', page)
    columns = eval_report.metric_columns(report["config"]["ks"])
    assert len(cells) == len(report["runs"]) * len(columns)
    for run_index, key, value in cells:
        in_json = _json_at(report["runs"][int(run_index)]["summary"], key)
        assert (None if value == "None" else float(value)) == in_json, (run_index, key)
    assert "data:image/png;base64," in page and (tmp_path / "eval-pr.png").stat().st_size > 1000

    with ImageSearchClient(cnn_server.target) as client:
        assert [c.name for c in client.list_collections() if c.name.startswith("eval-")] == []
