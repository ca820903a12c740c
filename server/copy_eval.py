"""Copy detection, measured through a running server: which method finds the photo a copy was made from.

The originals of a copy-detection set (server/copy_detection.py) are indexed once per method's
collection; every copy is a query whose one right answer is its source photo. Per method and
copy kind: mAP (with one relevant image, a query's average precision is 1 / its source's rank,
0 past ``top_k``), recall@1 and the share with the source in the top 2 (for a pasted copy the
photo it was pasted into is indexed too, so the top 2 is its fair bar).

Methods: SIFT-BoVW and SIFT-VLAD, each with the generic vocabulary and refitted on the indexed
photos (TrainCollection), each without and with geometric re-ranking; the CNN default; and the
hybrid, the CNN's candidates re-ranked by SIFT geometry.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from imagesearch.client import ImageItem, ImageSearchClient, NotFound
from imagesearch.server.copy_detection import COPY_KINDS, CopyQuery, CopySet

ALL = "all"
DEFAULT_RERANK = 10
DEFAULT_TOP_K = 10


@dataclass(frozen=True)
class Method:
    """One way of searching: a collection (extractor, trained or not) and a re-ranking depth."""

    name: str
    collection: str
    rerank: int = 0


@dataclass(frozen=True)
class Setup:
    """A collection every method of a family queries: created, filled, maybe trained."""

    collection: str
    extractor: str
    local_features: str = ""
    train: bool = False


@dataclass(frozen=True)
class Score:
    queries: int
    mean_ap: float
    recall_at_1: float
    top_2: float


@dataclass
class CopyReport:
    """Scores by method, then by copy kind (and ``all``); ``ranks`` keeps every query's rank."""

    methods: list[str]
    kinds: list[str]
    scores: dict[str, dict[str, Score]] = field(default_factory=dict)
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)  # method -> query path -> rank (0: missed)
    settings: dict[str, int | str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def setups_and_methods(depths: Sequence[int] = (DEFAULT_RERANK,)) -> tuple[list[Setup], list[Method]]:
    """The collections to build and the methods compared on them, each re-ranked at every depth."""
    setups = [
        Setup("copies-bovw", "sift-bovw"),
        Setup("copies-vlad", "sift-vlad"),
        Setup("copies-bovw-trained", "sift-bovw", train=True),
        Setup("copies-vlad-trained", "sift-vlad", train=True),
        Setup("copies-cnn", "efficientnet-lite0", local_features="sift"),
    ]
    families = [
        ("SIFT-BoVW", "copies-bovw"),
        ("SIFT-BoVW trained", "copies-bovw-trained"),
        ("SIFT-VLAD", "copies-vlad"),
        ("SIFT-VLAD trained", "copies-vlad-trained"),
        ("CNN", "copies-cnn"),
    ]
    methods = []
    for name, collection in families:
        methods.append(Method(name, collection))
        for depth in depths:
            suffix = f"SIFT rerank {depth} (hybrid)" if collection == "copies-cnn" else f"rerank {depth}"
            methods.append(Method(f"{name} + {suffix}", collection, depth))
    return setups, methods


def prepare(client: ImageSearchClient, copies: CopySet, setups: Sequence[Setup], seed: int = 0) -> None:
    """(Re)create each setup's collection with the set's originals (id = photo name); train if asked."""
    items = [
        ImageItem(id=name, content=path.read_bytes(), label=name) for name, path in copies.originals.items()
    ]
    for setup in setups:
        with contextlib.suppress(NotFound):
            client.delete_collection(setup.collection)
        client.create_collection(
            setup.collection, extractor=setup.extractor, local_features=setup.local_features or None
        )
        client.add_images(items, collection=setup.collection)
        if setup.train:
            client.train_collection(setup.collection, seed=seed, timeout=600)


def score(ranks: Sequence[int]) -> Score:
    """Scores of queries whose source came at ``rank`` (1-based; 0: not in the hits)."""
    count = len(ranks)
    if not count:
        return Score(0, 0.0, 0.0, 0.0)
    return Score(
        queries=count,
        mean_ap=sum(1 / r for r in ranks if r) / count,
        recall_at_1=sum(r == 1 for r in ranks) / count,
        top_2=sum(0 < r <= 2 for r in ranks) / count,
    )


def evaluate(
    client: ImageSearchClient,
    copies: CopySet,
    methods: Sequence[Method],
    *,
    top_k: int = DEFAULT_TOP_K,
    threads: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> CopyReport:
    """Search every copy with every method (``threads`` queries at a time) and score the ranks."""
    kinds = [kind for kind in COPY_KINDS if any(q.kind == kind for q in copies.queries)]
    report = CopyReport(
        [m.name for m in methods], kinds, settings={"top_k": top_k, "originals": len(copies.originals)}
    )
    jobs = [(method, query) for query in copies.queries for method in methods]
    done = 0

    def run(job: tuple[Method, CopyQuery]) -> tuple[Method, CopyQuery, int]:
        method, query = job
        hits = client.search(
            query.path.read_bytes(),
            collection=method.collection,
            top_k=top_k,
            rerank=method.rerank,
            timeout=120,
        ).ids
        return method, query, hits.index(query.source) + 1 if query.source in hits else 0

    with ThreadPoolExecutor(threads) as pool:
        for method, query, rank in pool.map(run, jobs):
            report.ranks.setdefault(method.name, {})[str(query.path.relative_to(copies.root))] = rank
            done += 1
            if progress is not None:
                progress(done, len(jobs))
    for method in methods:
        ranks = report.ranks.get(method.name, {})
        by_kind = {
            kind: score(
                [ranks[str(q.path.relative_to(copies.root))] for q in copies.queries if q.kind == kind]
            )
            for kind in kinds
        }
        by_kind[ALL] = score(list(ranks.values()))
        report.scores[method.name] = by_kind
    return report


def render_markdown(report: CopyReport) -> str:
    """Two tables, methods by copy kind: mAP, then recall@1 (top-2 for the pasted copies in brackets)."""
    header = "| method | " + " | ".join([*report.kinds, ALL]) + " |"
    rule = "|---|" + "---:|" * (len(report.kinds) + 1)

    def table(value: Callable[[str, Score], str]) -> list[str]:
        return [header, rule] + [
            f"| {method} | "
            + " | ".join(value(kind, report.scores[method][kind]) for kind in [*report.kinds, ALL])
            + " |"
            for method in report.methods
        ]

    def recall(kind: str, s: Score) -> str:
        return f"{s.recall_at_1:.2f} ({s.top_2:.2f})" if kind == "pasted40" else f"{s.recall_at_1:.2f}"

    return "\n".join(
        [
            "**mAP**",
            "",
            *table(lambda _, s: f"{s.mean_ap:.3f}"),
            "",
            "**recall@1** (pasted40: top-2 in brackets)",
            "",
            *table(recall),
        ]
    )
