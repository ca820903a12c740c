"""Retrieval quality of labelled queries: top-k accuracy, precision, recall, Jaccard, mAP, recognition.

Answers "how good is this extractor and metric on my data?" from what the server
returned, so it works with any server and ships with the client-only install
(NumPy only). The definitions, for one query of true class y (docs/evaluation.md
writes them out):

- Z_k: the first k hits returned, as positions in the server's ranking (ties in
  score keep the server's order; nothing here re-sorts). |Z_k| = min(k, hits
  returned), which is below k when the server returned fewer hits.
- Y: the collection's images of class y that could be found, the query itself
  excluded when it is in the collection. |Y| is ``QueryOutcome.relevant_count``.
- |Z_k ∩ Y|: how many of the first k hits have label y.
- top-k accuracy = 1 if some of the first k hits has label y, else 0.
- precision@k = |Z_k ∩ Y| / |Z_k| (0 when no hit came back).
- recall@k = |Z_k ∩ Y| / |Y|; a query with |Y| = 0 has no recall and is skipped
  (``Summary.recall_skipped`` counts them).
- Jaccard@k = |Z_k ∩ Y| / (|Z_k| + |Y| − |Z_k ∩ Y|); skipped when that union is
  empty (no hit and |Y| = 0).
- AP@K, K = the number of hits requested: (1 / min(|Y|, K)) Σ precision@i over the
  positions i ≤ K whose hit has label y; skipped when |Y| = 0. mAP is its mean.
- recognition accuracy: the fraction of classified queries whose predicted class
  (from Classify) is y.

Each mean is over the queries not skipped for that metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, Self

import numpy as np
import numpy.typing as npt

DEFAULT_KS = (1, 5, 10)


class _Labelled(Protocol):
    label: str


@dataclass(frozen=True)
class QueryOutcome:
    """What one query returned, and what it should have returned.

    ``hit_labels`` are the labels of the hits, best first, exactly in the server's
    order; ``relevant_count`` is |Y|, the number of class-``true_label`` images the
    query could have found. ``predicted_label`` is Classify's answer (None: not asked).
    """

    true_label: str
    hit_labels: tuple[str, ...]
    relevant_count: int
    predicted_label: str | None = None
    query_id: str = ""

    def __post_init__(self) -> None:
        if self.relevant_count < 0:
            raise ValueError(f"relevant_count must be >= 0, not {self.relevant_count}")

    @classmethod
    def from_hits(
        cls,
        true_label: str,
        hits: Iterable[_Labelled],
        relevant_count: int,
        *,
        predicted_label: str | None = None,
        query_id: str = "",
    ) -> Self:
        """From a search's hits (anything with ``.label``), keeping their order, ties included."""
        return cls(true_label, tuple(hit.label for hit in hits), relevant_count, predicted_label, query_id)

    def relevance(self) -> npt.NDArray[np.bool_]:
        """One flag per returned hit: does its label equal the query's class?"""
        return np.fromiter(
            (label == self.true_label for label in self.hit_labels), bool, len(self.hit_labels)
        )


def _found(outcome: QueryOutcome, k: int) -> tuple[int, int]:
    """(|Z_k ∩ Y|, |Z_k|) for the first k hits."""
    if k < 1:
        raise ValueError(f"k must be >= 1, not {k}")
    first = outcome.relevance()[:k]
    return int(first.sum()), len(first)


def top_k_accuracy(outcome: QueryOutcome, k: int) -> float:
    """1.0 when one of the first k hits has the query's class, else 0.0."""
    return 1.0 if _found(outcome, k)[0] else 0.0


def precision_at(outcome: QueryOutcome, k: int) -> float:
    """|Z_k ∩ Y| / |Z_k|: the share of the first k hits that are right (0.0 with no hits)."""
    relevant, returned = _found(outcome, k)
    return relevant / returned if returned else 0.0


def recall_at(outcome: QueryOutcome, k: int) -> float | None:
    """|Z_k ∩ Y| / |Y|: the share of findable images among the first k hits (None when |Y| = 0)."""
    if outcome.relevant_count == 0:
        return None
    return _found(outcome, k)[0] / outcome.relevant_count


def jaccard_at(outcome: QueryOutcome, k: int) -> float | None:
    """|Z_k ∩ Y| / |Z_k ∪ Y| (None when both sets are empty)."""
    relevant, returned = _found(outcome, k)
    union = returned + outcome.relevant_count - relevant
    return relevant / union if union else None


def average_precision(outcome: QueryOutcome, top_k: int) -> float | None:
    """AP@K with K = ``top_k``, the number of hits requested, normalised by min(|Y|, K).

    The normalisation makes a perfect ranking score 1.0 even when the class has
    more than K images. None when |Y| = 0 (there is nothing to find).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, not {top_k}")
    if outcome.relevant_count == 0:
        return None
    relevant = outcome.relevance()[:top_k]
    precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
    return float(precision[relevant].sum()) / min(outcome.relevant_count, top_k)


def _mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    kept = [value for value in values if value is not None]
    return float(np.mean(kept)) if kept else None


@dataclass(frozen=True)
class AtK:
    """The means over queries at one cut-off k (None: every query was skipped)."""

    k: int
    top_k_accuracy: float | None
    precision: float | None
    recall: float | None
    jaccard: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {
            "top_k_accuracy": self.top_k_accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "jaccard": self.jaccard,
        }


@dataclass(frozen=True)
class Summary:
    """Every metric of a set of queries, and how many queries each one skipped."""

    queries: int
    top_k: int
    at: tuple[AtK, ...]
    mean_average_precision: float | None
    recognition_accuracy: float | None
    classified: int
    """Queries with a predicted class (the denominator of ``recognition_accuracy``)."""
    recall_skipped: int
    """Queries with |Y| = 0: no recall@k and no AP."""
    jaccard_skipped: int
    """Queries with no hit and |Y| = 0: no Jaccard@k."""

    def at_k(self, k: int) -> AtK:
        for entry in self.at:
            if entry.k == k:
                return entry
        raise KeyError(f"no metrics at k={k}; computed for {[entry.k for entry in self.at]}")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready; the keys of ``at_k`` are strings because JSON object keys are."""
        return {
            "queries": self.queries,
            "top_k": self.top_k,
            "at_k": {str(entry.k): entry.to_dict() for entry in self.at},
            "map": self.mean_average_precision,
            "recognition_accuracy": self.recognition_accuracy,
            "classified": self.classified,
            "recall_skipped": self.recall_skipped,
            "jaccard_skipped": self.jaccard_skipped,
        }


def summarize(outcomes: Sequence[QueryOutcome], *, top_k: int, ks: Sequence[int] = DEFAULT_KS) -> Summary:
    """Mean metrics of ``outcomes`` at each k of ``ks``, mAP at ``top_k`` and recognition accuracy."""
    at = tuple(
        AtK(
            k,
            _mean(top_k_accuracy(outcome, k) for outcome in outcomes),
            _mean(precision_at(outcome, k) for outcome in outcomes),
            _mean(recall_at(outcome, k) for outcome in outcomes),
            _mean(jaccard_at(outcome, k) for outcome in outcomes),
        )
        for k in ks
    )
    classified = [outcome for outcome in outcomes if outcome.predicted_label is not None]
    return Summary(
        queries=len(outcomes),
        top_k=top_k,
        at=at,
        mean_average_precision=_mean(average_precision(outcome, top_k) for outcome in outcomes),
        recognition_accuracy=_mean(float(o.predicted_label == o.true_label) for o in classified),
        classified=len(classified),
        recall_skipped=sum(outcome.relevant_count == 0 for outcome in outcomes),
        jaccard_skipped=sum(not outcome.hit_labels and not outcome.relevant_count for outcome in outcomes),
    )


def precision_recall_curve(
    outcomes: Sequence[QueryOutcome], top_k: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mean precision@k and mean recall@k for k = 1..top_k: one point per cut-off, for a PR plot.

    A cut-off where every query was skipped (recall with |Y| = 0 everywhere) is NaN.
    """
    ks = range(1, top_k + 1)
    nan = float("nan")
    precision = [_mean(precision_at(outcome, k) for outcome in outcomes) for k in ks]
    recall = [_mean(recall_at(outcome, k) for outcome in outcomes) for k in ks]
    return (
        np.array([nan if value is None else value for value in precision]),
        np.array([nan if value is None else value for value in recall]),
    )


def worst_first(outcomes: Sequence[QueryOutcome], top_k: int) -> list[int]:
    """Indices of ``outcomes``, the worst-ranked queries first: lowest AP@K, then lowest precision@K.

    A query with nothing to find (|Y| = 0) cannot rank badly and sorts as AP 1.
    Equal queries keep their order (the sort is stable).
    """

    def badness(index: int) -> tuple[float, float]:
        outcome = outcomes[index]
        ap = average_precision(outcome, top_k)
        return (1.0 if ap is None else ap, precision_at(outcome, top_k))

    return sorted(range(len(outcomes)), key=badness)
