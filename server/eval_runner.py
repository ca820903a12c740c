"""Measure each extractor × metric × search mode on a folder-per-class dataset, against a live server.

"How good is this on my data?" is answered by the server a user will run, through
the Python client, exactly as an application calls it: every extractor and metric
gets a fresh collection holding the indexed part of the dataset, the held-out images
search it (plain and bucketed) and are classified, and client/evaluation.py turns
the rankings into numbers. The collections are deleted at the end (unless kept).

    python -m imagesearch.server.eval_runner DATASET --target 127.0.0.1:50051 \\
        --metrics cosine,l2 --modes plain,bucketed --json eval.json --html eval.html

One ``Evaluation`` object feeds the terminal table, the JSON file and the HTML report
(a precision–recall plot and the worst queries with their hits), so they always agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import math
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import cv2
import grpc

from imagesearch.client import ImageSearchClient, ImageSearchError, NotFound
from imagesearch.client.datasets import (
    HOLDOUT,
    LEAVE_ONE_OUT,
    Dataset,
    LabelledImage,
    Relevance,
    Split,
    describe,
    holdout_split,
    leave_one_out,
    read_dataset,
)
from imagesearch.client.evaluation import (
    DEFAULT_KS,
    QueryOutcome,
    average_precision,
    precision_recall_curve,
    summarize,
    worst_first,
)
from imagesearch.client.folders import add_labelled
from imagesearch.server.client_cli import (
    add_server_arguments,
    fail,
    path_argument,
    server_error,
    signals_held,
    sigterm_unwinds,
    unwritable,
)
from imagesearch.server.contact_sheet import SheetItem
from imagesearch.server.dataset_builder import encode_jpeg, resize_long_side
from imagesearch.server.printable import printable
from imagesearch.server.progress import ProgressLine

PLAIN = "plain"
BUCKETED = "bucketed"
MODES = (PLAIN, BUCKETED)
THUMBNAIL_SIDE = 256

# ---------------------------------------------------------------------------------------------
# Progress


class Counted:
    """A ``ProgressLine`` fed one item at a time: the evaluation's phases count queries themselves."""

    def __init__(self, line: ProgressLine | None, total: int) -> None:
        self.line, self.total, self.done = line, total, 0

    def update(self, done: int) -> None:
        self.done = done
        if self.line is not None:
            self.line(done, self.total)

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)


@contextmanager
def progress(label: str, total: int, stream: TextIO | None) -> Iterator[Counted]:
    """One progress line per phase on ``stream`` (none when it is None), finished on exit."""
    line = ProgressLine(stream, label=f"{label:<30}") if stream is not None else None
    counted = Counted(line, total)
    try:
        yield counted
    finally:
        if line is not None:
            line(counted.done, total)
            line.close()


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. ``None`` as an extractor means the server's default one, as a metric the
    extractor's default. ``top_k`` 0 asks for max(ks) hits (K of AP@K)."""

    extractors: tuple[str | None, ...] = (None,)
    metrics: tuple[str | None, ...] = (None,)
    modes: tuple[str, ...] = (PLAIN,)
    ks: tuple[int, ...] = DEFAULT_KS
    top_k: int = 0
    neighbors: int = 0
    keep: bool = False
    worst: int = 5
    """Worst queries per run kept as image strips for the HTML report (0: none, no GetImage calls)."""
    strip_hits: int = 5
    """Hits shown per worst query (more when a wrong hit ranks lower)."""

    def __post_init__(self) -> None:
        """Refuse counts no run could use before any collection is made (an outside test:
        ``--neighbors -1`` made every Classify fail, and the run said nothing)."""
        for name, value, least in (
            ("top_k", self.top_k, 0),
            ("neighbors", self.neighbors, 0),
            ("worst", self.worst, 0),
            ("strip_hits", self.strip_hits, 1),
            *(("ks", k, 1) for k in self.ks),
        ):
            if value < least:
                raise ValueError(f"{name} must be at least {least}, not {value}")
        if not self.ks:
            raise ValueError("ks must name at least one cut-off")
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks must not repeat a cut-off, got {list(self.ks)}")
        if self.top_k and self.top_k < max(self.ks):
            raise ValueError(
                f"top_k must be 0 or at least the largest k, {max(self.ks)} (P@k needs k hits), not {self.top_k}"
            )
        if not self.modes:
            raise ValueError("modes must name at least one mode (plain, bucketed)")

    @property
    def k_max(self) -> int:
        return self.top_k or max(self.ks)

    def to_dict(self) -> dict[str, object]:
        return {
            "extractors": list(self.extractors),
            "metrics": list(self.metrics),
            "modes": list(self.modes),
            "ks": list(self.ks),
            "top_k": self.k_max,
            "neighbors": self.neighbors,
        }


@dataclass(frozen=True)
class HitRecord:
    id: str
    label: str
    score: float


@dataclass(frozen=True)
class QueryRecord:
    """One query's answer: its hits in the server's order and Classify's prediction."""

    id: str
    label: str
    relevant: int
    hits: tuple[HitRecord, ...]
    predicted_label: str | None = None
    confidence: float | None = None
    bucket_label: str | None = None
    """Bucketed search: the class the server chose to rank."""

    def outcome(self) -> QueryOutcome:
        return QueryOutcome.from_hits(
            self.label, self.hits, self.relevant, predicted_label=self.predicted_label, query_id=self.id
        )

    def to_dict(self, top_k: int) -> dict[str, object]:
        return {
            "id": self.id,
            "label": self.label,
            "relevant": self.relevant,
            "ap": average_precision(self.outcome(), top_k),
            "predicted_label": self.predicted_label,
            "confidence": self.confidence,
            "bucket_label": self.bucket_label,
            "hits": [{"id": hit.id, "label": hit.label, "score": hit.score} for hit in self.hits],
        }


@dataclass(frozen=True)
class Strip:
    """A badly ranked query and its first hits, as thumbnails for the report."""

    query: SheetItem
    hits: tuple[SheetItem, ...]


def _finite_or_none(values: Sequence[float]) -> list[float | None]:
    return [float(value) if math.isfinite(value) else None for value in values]


@dataclass
class RunResult:
    """One extractor × metric × mode: its numbers, its queries, or why it has none (``skipped``)."""

    extractor: str
    metric: str
    mode: str
    collection: str
    top_k: int
    ks: tuple[int, ...]
    indexed: int = 0
    queries: list[QueryRecord] = field(default_factory=list)
    failed_queries: list[dict[str, str]] = field(default_factory=list)
    skipped: str = ""
    notes: list[str] = field(default_factory=list)
    index_seconds: float = 0.0
    query_seconds: float = 0.0
    strips: list[Strip] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        return f"{self.extractor} / {self.metric} / {self.mode}"

    def outcomes(self) -> list[QueryOutcome]:
        return [query.outcome() for query in self.queries]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``summary`` and ``curve`` are None for a skipped run."""
        measured = not self.skipped
        return {
            "extractor": self.extractor,
            "metric": self.metric,
            "mode": self.mode,
            "collection": self.collection,
            "skipped": self.skipped,
            "notes": self.notes,
            "indexed": self.indexed,
            "index_seconds": self.index_seconds,
            "query_seconds": self.query_seconds,
            "summary": self._summary() if measured else None,
            "curve": self._curve() if measured else None,
            "failed_queries": self.failed_queries,
            "queries": [query.to_dict(self.top_k) for query in self.queries],
        }

    def _summary(self) -> dict[str, object]:
        return summarize(self.outcomes(), top_k=self.top_k, ks=self.ks).to_dict()

    def _curve(self) -> dict[str, list]:
        """Mean precision and recall at k = 1..top_k (None where no query counted)."""
        precision, recall = precision_recall_curve(self.outcomes(), self.top_k)
        return {
            "k": list(range(1, self.top_k + 1)),
            "precision": _finite_or_none(precision),
            "recall": _finite_or_none(recall),
        }


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}"


@dataclass
class Evaluation:
    """Everything one evaluation measured: the single source of the table, the JSON and the HTML."""

    dataset: dict[str, object]
    config: EvalConfig
    target: str
    runs: list[RunResult] = field(default_factory=list)
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    machine: str = field(default_factory=machine)

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "target": self.target,
            "machine": self.machine,
            "dataset": self.dataset,
            "config": self.config.to_dict(),
            "runs": [run.to_dict() for run in self.runs],
        }


# ---------------------------------------------------------------------------------------------
# Running


def supports_bucketed(client: ImageSearchClient) -> bool:
    """Whether this client can ask for a bucketed search (the server may still refuse it)."""
    return "mode" in inspect.signature(client.search).parameters


def supports_classify(client: ImageSearchClient) -> bool:
    return callable(getattr(client, "classify", None))


def _unimplemented(error: ImageSearchError) -> bool:
    return error.code is grpc.StatusCode.UNIMPLEMENTED


def _query_input(split: Split, image: LabelledImage) -> dict[str, Any]:
    """How a query is sent: by id, leaving itself out (leave-one-out), or as the file's bytes."""
    if split.queries_are_indexed:
        return {"image_id": image.id, "exclude_query": True}
    return {"image": image.path.read_bytes()}


def _check_names(client: ImageSearchClient, config: EvalConfig) -> None:
    """Fail before any work when the server lacks an extractor or metric, naming what it has."""
    plugins = client.list_plugins()
    for kind, names, known in (
        ("extractor", config.extractors, [item.name for item in plugins.extractors]),
        ("metric", config.metrics, [item.name for item in plugins.metrics]),
    ):
        for name in names:
            if name is not None and name not in known:
                raise ValueError(f"the server has no {kind} {name!r}; it has {', '.join(known) or 'none'}")
    unknown_modes = sorted(set(config.modes) - set(MODES))
    if unknown_modes:
        raise ValueError(f"unknown modes {unknown_modes}; choose from {', '.join(MODES)}")


def _index(
    client: ImageSearchClient, collection: str, images: Sequence[LabelledImage], stream: TextIO | None
) -> tuple[list[LabelledImage], list[str]]:
    """Upload the indexed images with their labels; return those the server stored, and why it
    refused each other one (``<id>: <reason>``)."""
    if not images:
        return [], []
    with progress(f"index {collection}", len(images), stream) as bar:
        result = add_labelled(
            client, images, collection=collection, progress=lambda sent, _total: bar.update(sent)
        )
    refused = [
        f"{printable(images[item.index].id)}: {item.reason or item.code.name}" for item in result.failed
    ]
    return [image for image, stored_id in zip(images, result.ids, strict=True) if stored_id], refused


def _classify(
    client: ImageSearchClient,
    collection: str,
    split: Split,
    config: EvalConfig,
    stream: TextIO | None,
    notes: list[str],
) -> dict[str, tuple[str, float]]:
    """Classify's (label, confidence) for every query it could answer; empty when unsupported."""
    if not supports_classify(client):
        notes.append("recognition accuracy not measured: this client has no classify()")
        return {}
    predictions: dict[str, tuple[str, float]] = {}
    failures: list[ImageSearchError] = []
    with progress(f"classify {collection}", len(split.queries), stream) as bar:
        for image in split.queries:
            try:
                answer = client.classify(
                    **_query_input(split, image), neighbors=config.neighbors, collection=collection
                )
            except ImageSearchError as error:
                if _unimplemented(error):
                    notes.append(f"recognition accuracy not measured: the server says {error.message}")
                    return {}
                failures.append(error)  # left out of the accuracy, and said so below
                bar.advance()
                continue
            predictions[image.id] = (answer.label, answer.confidence)
            bar.advance()
    if failures:
        notes.append(
            "recognition: " + _failures_note("Classify", failures, len(split.queries), "its accuracy")
        )
    return predictions


def _failures_note(call: str, failures: Sequence[ImageSearchError], total: int, left_out_of: str) -> str:
    """How many queries a call failed for, and the first reason: never a silent gap in the figures."""
    first = failures[0]
    return (
        f"{call} failed for {len(failures)} of {total} queries, left out of {left_out_of} "
        f"(first: {first.reason or first.code.name}: {first.message})"
    )


def _search_all(
    client: ImageSearchClient,
    run: RunResult,
    split: Split,
    relevance: Relevance,
    predictions: dict[str, tuple[str, float]],
    stream: TextIO | None,
) -> None:
    """Search with every query in ``run.mode`` and record the rankings (or why the run is skipped)."""
    mode_options = {"mode": BUCKETED} if run.mode == BUCKETED else {}
    if mode_options and not supports_bucketed(client):
        run.skipped = "bucketed search is not available: this client's search() has no `mode` argument"
        return
    started = time.perf_counter()
    failures: list[ImageSearchError] = []
    with progress(f"search {run.mode} {run.collection}", len(split.queries), stream) as bar:
        for image in split.queries:
            try:
                result = client.search(
                    **_query_input(split, image), top_k=run.top_k, collection=run.collection, **mode_options
                )
            except ImageSearchError as error:
                if _unimplemented(error):
                    run.skipped = f"the server does not implement this search: {error.message}"
                    return
                run.failed_queries.append({"id": image.id, "error": f"{error.code.name}: {error.message}"})
                failures.append(error)
                bar.advance()
                continue
            label, confidence = predictions.get(image.id, (None, None))
            hits = tuple(HitRecord(hit.id, hit.label, hit.score) for hit in result.hits)
            bucket = getattr(result, "predicted_label", None) if mode_options else None
            run.queries.append(
                QueryRecord(image.id, image.label, relevance.count(image), hits, label, confidence, bucket)
            )
            bar.advance()
    run.query_seconds = time.perf_counter() - started
    if failures:
        run.notes.append(_failures_note("Search", failures, len(split.queries), "every measure"))
    if mode_options and run.queries and not any(query.bucket_label for query in run.queries):
        run.notes.append("the server returned no predicted label: it may have ignored the bucketed mode")


def _query_thumbnail(
    client: ImageSearchClient, split: Split, image: LabelledImage, collection: str
) -> bytes | None:
    if split.queries_are_indexed:
        return client.get_image(image.id, collection=collection).thumbnail
    pixels = cv2.imread(str(image.path), cv2.IMREAD_COLOR)
    if pixels is None:
        return None
    return encode_jpeg(resize_long_side(pixels, min(THUMBNAIL_SIDE, max(pixels.shape[:2]))), 85)


def _strip(
    client: ImageSearchClient,
    run: RunResult,
    split: Split,
    image: LabelledImage,
    query: QueryRecord,
    hits_shown: int,
) -> Strip:
    """One query's thumbnail and its hits' thumbnails, each marked right or wrong: the first
    ``hits_shown``, or down to the last wrong one, so what went wrong is always in the picture."""
    outcome = query.outcome()
    right = outcome.relevance()
    ap = average_precision(outcome, run.top_k)
    lines = [
        f"class {query.label}",
        f"found {int(right.sum())} of {query.relevant}",
        f"AP@{run.top_k} {ap:.3f}",
    ]
    if query.predicted_label is not None:
        lines.append(f"classified as {query.predicted_label}")
    if query.bucket_label is not None:
        lines.append(f"bucket {query.bucket_label}")
    wrong = [rank for rank, ok in enumerate(right, 1) if not ok]
    hits = tuple(
        SheetItem(
            f"#{rank} {hit.id}",
            client.get_image(hit.id, collection=run.collection).thumbnail,
            [f"label {hit.label} " + ("✓" if hit.label == query.label else "✗"), f"score {hit.score:.4f}"],
        )
        for rank, hit in enumerate(query.hits[: max(hits_shown, *wrong, 0)], 1)
    )
    thumbnail = _query_thumbnail(client, split, image, run.collection)
    return Strip(SheetItem(f"query {query.id}", thumbnail, lines), hits)


def _strips(client: ImageSearchClient, run: RunResult, split: Split, config: EvalConfig) -> list[Strip]:
    """Up to ``config.worst`` of the worst-ranked queries (AP@K below 1 only), thumbnails fetched
    now, while the collection still exists."""
    by_id = {image.id: image for image in split.queries}
    strips: list[Strip] = []
    for index in worst_first(run.outcomes(), run.top_k)[: config.worst]:
        query = run.queries[index]
        ap = average_precision(query.outcome(), run.top_k)
        if ap is None or ap >= 1.0:
            break  # the rest ranked perfectly (or had nothing to find)
        strips.append(_strip(client, run, split, by_id[query.id], query, config.strip_hits))
    return strips


def _evaluate_collection(
    client: ImageSearchClient, collection: str, split: Split, config: EvalConfig, stream: TextIO | None
) -> list[RunResult]:
    """Index ``split`` into the (new, empty) ``collection``, classify once, search in every mode."""
    info = client.get_collection(collection)
    started = time.perf_counter()
    stored, refused = _index(client, collection, split.indexed, stream)
    index_seconds = time.perf_counter() - started
    notes: list[str] = []
    if len(stored) < len(split.indexed):
        missing = len(split.indexed) - len(stored)
        shown = "; ".join(refused[:3]) + ("; ..." if len(refused) > 3 else "")
        notes.append(
            f"{missing} image{'s' if missing > 1 else ''} could not be indexed"
            + (", so left out of the queries" if split.queries_are_indexed else "")
            + (f": {shown}" if shown else "")
        )
    if len({image.label for image in stored}) == 1:
        notes.append("one class only: recognition cannot be wrong, so its accuracy of 1.0 measures nothing")
    if split.queries_are_indexed:  # asked by id, one the server refused was "not found", hiding why
        kept = {image.id for image in stored}
        split = dataclasses.replace(split, queries=tuple(q for q in split.queries if q.id in kept))
    predictions = _classify(client, collection, split, config, stream, notes)
    runs = []
    for mode in config.modes:
        run = RunResult(
            info.extractor,
            info.metric,
            mode,
            collection,
            config.k_max,
            config.ks,
            indexed=len(stored),
            notes=list(notes),
            index_seconds=index_seconds,
        )
        _search_all(client, run, split, Relevance.of(stored), predictions, stream)
        if not run.skipped and config.worst:
            run.strips = _strips(client, run, split, config)
        runs.append(run)
    return runs


def evaluate(
    client: ImageSearchClient,
    dataset: Dataset,
    split: Split,
    config: EvalConfig = EvalConfig(),
    *,
    stream: TextIO | None = None,
) -> Evaluation:
    """Run every extractor × metric × mode of ``config`` on ``split`` and return the measurements.

    One collection per extractor × metric serves all modes (a mode only changes how the
    server searches, not what it stores), and Classify runs once per collection.
    Collections are named ``eval-<random>-<n>`` and deleted at the end unless ``config.keep``.
    Progress bars go to ``stream`` (None: no progress output).
    """
    _check_names(client, config)
    evaluation = Evaluation(describe(dataset, split), config, client.target)
    tag = secrets.token_hex(3)
    created: list[str] = []
    try:
        for extractor, metric in itertools.product(config.extractors, config.metrics):
            collection = f"eval-{tag}-{len(created)}"
            created.append(collection)  # before it exists: a signal during the call must not orphan it
            client.create_collection(
                collection, extractor=extractor, metric=metric, description="eval_runner"
            )
            evaluation.runs += _evaluate_collection(client, collection, split, config, stream)
    finally:
        if not config.keep:
            with signals_held():  # a second Ctrl-C or SIGTERM a moment after the first left them
                for collection in created:
                    with suppress(NotFound):
                        client.delete_collection(collection)
    return evaluation


# ---------------------------------------------------------------------------------------------
# Command line


def cut_offs(text: str) -> tuple[int, ...]:
    """``--ks``: whole numbers separated by commas, sorted, each once (EvalConfig checks the range)."""
    try:
        return tuple(sorted({int(k) for k in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"cut-offs are whole numbers separated by commas, such as 1,5,10; got {text!r}"
        ) from None


def _names(text: str | None) -> tuple[str | None, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip()) if text else (None,)


DESCRIPTION = (
    "Evaluate extractors, metrics and search modes on DATASET/<class>/<images> against a running "
    "imagesearch server (formulas: docs/evaluation.md)."
)


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    """``imagesearch eval DATASET ...``."""
    parser = commands.add_parser(
        "eval", help="measure extractors and metrics on a labelled folder", description=DESCRIPTION
    )
    add_eval_arguments(parser)
    parser.set_defaults(handler=main_with_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imagesearch.server.eval_runner", description=DESCRIPTION)
    add_eval_arguments(parser)
    return parser


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=path_argument, help="folder with one subfolder of images per class")
    add_server_arguments(parser, collection=False)
    parser.add_argument(
        "--extractors", "--extractor", help="comma-separated (default: the server's default extractor)"
    )
    parser.add_argument(
        "--metrics", "--metric", help="comma-separated, e.g. cosine,l2 (default: the extractor's)"
    )
    parser.add_argument(
        "--modes", "--mode", default="plain,bucketed", help="comma-separated: plain, bucketed"
    )
    parser.add_argument("--split", choices=(HOLDOUT, LEAVE_ONE_OUT), default=HOLDOUT)
    parser.add_argument("--fraction", type=float, default=0.2, help="held-out share of each class (0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out choice (0)")
    parser.add_argument("--ks", type=cut_offs, default=(1, 5, 10), help="cut-offs k (1,5,10)")
    parser.add_argument("--top-k", type=int, default=0, help="hits requested, K of AP@K (default: max k)")
    parser.add_argument("--neighbors", type=int, default=0, help="Classify's voting neighbours (0: server's)")
    parser.add_argument("--json", type=path_argument, help="write the results as JSON")
    parser.add_argument("--html", type=path_argument, help="write an HTML report (PR plot, worst queries)")
    parser.add_argument("--worst", type=int, default=5, help="worst queries shown per run in the HTML (5)")
    parser.add_argument("--keep", action="store_true", help="keep the evaluation collections")


def run_cli(args: argparse.Namespace, connect: Callable[[str], ImageSearchClient] = ImageSearchClient) -> int:
    for report in (args.json, args.html):  # before the evaluation, which can take hours
        if problem := unwritable(report):
            raise ValueError(problem)
    dataset = read_dataset(args.dataset)
    if not dataset.images:
        raise ValueError(f"no images in class folders under {args.dataset} (DATASET/<class>/<images>)")
    if args.split == HOLDOUT:
        split = holdout_split(dataset, args.fraction, args.seed)
        if not split.queries:  # known before the server is touched: it indexed all, then failed
            raise ValueError(
                f"no class under {args.dataset} has 2 images or more, so the holdout split leaves no query "
                "(a class of one image is only indexed): add images, or use --split leave-one-out"
            )
    else:
        split = leave_one_out(dataset)
    config = EvalConfig(
        extractors=_names(args.extractors),
        metrics=_names(args.metrics),
        modes=tuple(name for name in _names(args.modes) if name),
        ks=args.ks,
        top_k=args.top_k,
        neighbors=args.neighbors,
        keep=args.keep,
        worst=args.worst if args.html else min(args.worst, 0),  # a bad value is refused either way
    )
    with connect(args.target) as client, sigterm_unwinds():
        evaluation = evaluate(client, dataset, split, config, stream=sys.stderr)
    from imagesearch.server.eval_report import format_table, write_reports  # the report needs the runner

    print(format_table(evaluation))
    for path in write_reports(evaluation, args.json, args.html):
        print(f"wrote {path}")
    unmeasured = [run for run in evaluation.runs if not run.skipped and not run.queries]
    if unmeasured:  # every query failed: figures of nothing must not pass for a result
        notes = "; ".join(dict.fromkeys(note for run in unmeasured for note in run.notes if note))
        return fail(
            f"{len(unmeasured)} of {len(evaluation.runs)} runs measured no query"
            + (f": {notes}" if notes else " (no query could be asked)")
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_with_args(build_parser().parse_args(argv))


def main_with_args(args: argparse.Namespace) -> int:
    try:
        return run_cli(args)
    except ImageSearchError as error:
        return server_error(error, args.target)
    except (ValueError, OSError) as error:
        return fail(str(error))


if __name__ == "__main__":
    raise SystemExit(main())
