"""Recognise a query's class from the collection's own labelled images.

Two ways, both from what the collection already holds (no model to train):

- ``knn`` (the default): the query's nearest images vote for their label (unlabelled ones abstain), each with its
  similarity (scores below zero count as zero). A class in a user's folder is often several
  looks (a "shoes" folder holds boots and sandals); neighbours follow that, where a class mean
  would sit between the looks, near none of them. It also reuses the retrieval index: no state.
- ``centroid``: the class whose mean vector is most similar wins. Cheaper for a large collection
  with few classes, and robust to a few mislabelled images; kept as an option.

Either way ``confidence`` is the winner's share of the (positive) similarity mass, in [0, 1],
and ``candidates`` lists every class that got a share, best first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

KNN, CENTROID = "knn", "centroid"
CLASSIFY_MODES = (KNN, CENTROID)
PLAIN, BUCKETED = "plain", "bucketed"
SEARCH_MODES = (PLAIN, BUCKETED)
DEFAULT_NEIGHBORS = 10


@dataclass(frozen=True)
class Classification:
    label: str  # "" when nothing labelled was found
    confidence: float
    candidates: list[tuple[str, float]]
    mode: str


def shares(scored: Iterable[tuple[str, float]], mode: str) -> Classification:
    """Add up (label, similarity) pairs per label and turn the sums into shares of the total.

    Unlabelled images do not vote; a similarity below zero counts as zero, and every labelled
    voter adds at least a hair, so a class found only at zero similarity still ranks.
    """
    mass: dict[str, float] = {}
    for label, score in scored:
        if label:
            mass[label] = mass.get(label, 0.0) + max(float(score), 0.0) + 1e-9
    total = sum(mass.values())
    if not mass:
        return Classification("", 0.0, [], mode)
    ranked = sorted(((label, value / total) for label, value in mass.items()), key=lambda p: (-p[1], p[0]))
    return Classification(ranked[0][0], ranked[0][1], ranked, mode)
