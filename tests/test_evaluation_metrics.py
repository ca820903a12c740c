"""The retrieval metrics of client/evaluation.py on hand-made rankings whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imagesearch.client import SearchHit
from imagesearch.client.evaluation import (
    QueryOutcome,
    average_precision,
    jaccard_at,
    precision_at,
    precision_recall_curve,
    recall_at,
    summarize,
    top_k_accuracy,
    worst_first,
)


def outcome(true_label: str, hits: str, relevant: int, predicted: str | None = None) -> QueryOutcome:
    """``hits`` is one letter per returned hit, best first: "baa" = b, then a, then a."""
    return QueryOutcome(true_label, tuple(hits), relevant, predicted)


def test_ties_keep_the_servers_order():
    # Three hits with the same score: the server put "b" first, and the metrics must not re-sort.
    hits = [SearchHit(id=f"h{i}", score=0.5, distance=0.5, label=label) for i, label in enumerate("baa")]
    tied = QueryOutcome.from_hits("a", hits, relevant_count=2)
    assert tied.hit_labels == ("b", "a", "a")
    assert top_k_accuracy(tied, 1) == 0.0
    assert precision_at(tied, 1) == 0.0
    assert precision_at(tied, 2) == 0.5
    assert average_precision(tied, 3) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_k_larger_than_the_class():
    # |Y| = 2, ten hits returned, both relevant ones first.
    ranked = outcome("a", "aabbbbbbbb", relevant=2)
    assert top_k_accuracy(ranked, 1) == 1.0
    assert precision_at(ranked, 5) == pytest.approx(2 / 5)
    assert recall_at(ranked, 1) == pytest.approx(1 / 2)
    assert recall_at(ranked, 5) == 1.0
    assert jaccard_at(ranked, 5) == pytest.approx(2 / (5 + 2 - 2))
    assert jaccard_at(ranked, 10) == pytest.approx(2 / 10)
    assert average_precision(ranked, 10) == 1.0  # normalised by min(|Y|, K) = 2


def test_a_class_with_one_image():
    # |Y| = 1 and only three hits came back (fewer than k): |Z_5| = 3.
    single = outcome("a", "bab", relevant=1)
    assert top_k_accuracy(single, 1) == 0.0
    assert top_k_accuracy(single, 5) == 1.0
    assert precision_at(single, 5) == pytest.approx(1 / 3)
    assert recall_at(single, 5) == 1.0
    assert jaccard_at(single, 5) == pytest.approx(1 / (3 + 1 - 1))
    assert average_precision(single, 10) == pytest.approx(1 / 2)


def test_an_empty_result():
    empty = outcome("a", "", relevant=3)
    assert empty.relevance().shape == (0,)
    assert top_k_accuracy(empty, 10) == 0.0
    assert precision_at(empty, 5) == 0.0  # 0 hits: precision 0 by definition
    assert recall_at(empty, 5) == 0.0
    assert jaccard_at(empty, 5) == 0.0
    assert average_precision(empty, 10) == 0.0


def test_a_query_whose_class_has_no_other_image():
    alone = outcome("a", "bc", relevant=0)
    assert top_k_accuracy(alone, 5) == 0.0
    assert precision_at(alone, 5) == 0.0
    assert recall_at(alone, 5) is None  # skipped, not 0
    assert average_precision(alone, 10) is None
    assert jaccard_at(alone, 1) == 0.0  # 0 / (1 + 0 - 0)
    assert jaccard_at(outcome("a", "", relevant=0), 1) is None  # empty union: skipped


def test_average_precision_at_k_is_normalised_by_min_of_class_and_k():
    assert average_precision(outcome("a", "ababa", 3), 5) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # Five relevant images but only K = 3 requested: a perfect top 3 scores 1.
    assert average_precision(outcome("a", "aaa", 5), 3) == 1.0
    assert average_precision(outcome("a", "aba", 5), 3) == pytest.approx((1 + 2 / 3) / 3)
    # Hits past K are not counted even if the server sent them.
    assert average_precision(outcome("a", "bba", 1), 2) == 0.0


def test_summary_means_skips_and_recognition():
    outcomes = [
        outcome("a", "aab", 2, predicted="a"),  # perfect
        outcome("b", "abb", 2, predicted="a"),  # misclassified, relevant at 2 and 3
        outcome("c", "ab", 0, predicted=None),  # nothing to find, not classified
    ]
    summary = summarize(outcomes, top_k=3, ks=(1, 3))
    assert (summary.queries, summary.top_k, summary.classified) == (3, 3, 2)
    assert summary.recall_skipped == 1 and summary.jaccard_skipped == 0
    at1, at3 = summary.at_k(1), summary.at_k(3)
    assert at1.top_k_accuracy == pytest.approx(1 / 3)
    assert at3.top_k_accuracy == pytest.approx(2 / 3)
    assert at1.precision == pytest.approx(1 / 3)
    assert at3.precision == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert at1.recall == pytest.approx((1 / 2 + 0) / 2)  # the |Y| = 0 query is left out
    assert at3.recall == 1.0
    assert at3.jaccard == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert summary.mean_average_precision == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)
    assert summary.recognition_accuracy == pytest.approx(1 / 2)
    as_dict = summary.to_dict()
    assert as_dict["at_k"]["3"]["recall"] == at3.recall and as_dict["map"] == summary.mean_average_precision
    with pytest.raises(KeyError):
        summary.at_k(5)


def test_summary_of_nothing_is_all_none():
    summary = summarize([], top_k=10)
    assert summary.queries == 0
    assert summary.mean_average_precision is None and summary.recognition_accuracy is None
    assert all(entry.precision is None for entry in summary.at)


def test_precision_recall_curve_is_one_point_per_cut_off():
    precision, recall = precision_recall_curve([outcome("a", "aba", 2), outcome("b", "bb", 4)], top_k=3)
    np.testing.assert_allclose(precision, [1.0, (1 / 2 + 1) / 2, (2 / 3 + 1) / 2])
    np.testing.assert_allclose(recall, [(1 / 2 + 1 / 4) / 2, (1 / 2 + 2 / 4) / 2, (1 + 2 / 4) / 2])
    _, undefined = precision_recall_curve([outcome("a", "b", 0)], top_k=1)
    assert math.isnan(undefined[0])


def test_worst_first_orders_by_average_precision_then_precision():
    outcomes = [
        outcome("a", "aa", 2),  # AP 1
        outcome("a", "ba", 2),  # AP 1/4
        outcome("a", "bb", 0),  # nothing to find: sorts as AP 1
        outcome("a", "bb", 2),  # AP 0
        outcome("a", "ab", 2),  # AP 1/2
    ]
    assert worst_first(outcomes, top_k=2) == [3, 1, 4, 2, 0]


@pytest.mark.parametrize("bad_k", [0, -1])
def test_k_must_be_positive(bad_k):
    with pytest.raises(ValueError):
        precision_at(outcome("a", "a", 1), bad_k)
    with pytest.raises(ValueError):
        average_precision(outcome("a", "a", 1), bad_k)


def test_negative_relevant_count_is_refused():
    with pytest.raises(ValueError):
        outcome("a", "a", -1)
