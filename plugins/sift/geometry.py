"""Geometric verification: how many descriptor matches agree on one transform between two images.

The second retrieval stage. Global vectors find candidates that share visual words; only a
consistent geometric mapping shows that the query actually contains the candidate (cropped,
rotated, rescaled, warped or pasted into another picture), so candidates are re-ranked by it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import cv2
import faiss
import numpy as np

from imagesearch.plugins.sift.features import LocalFeatures

RANSAC_THRESHOLD_PX = 5.0
RANSAC_MAX_ITERS = 1000
"""OpenCV's default is 2000. A true match has a high inlier ratio, so RANSAC's confidence test stops
it after a few dozen samples; only candidates with no consistent transform run to the cap, and on
them the second thousand samples finds nothing the first did not (bench/bench_sift.py)."""
_MIN_HOMOGRAPHY_INLIERS = 8  # 8 degrees of freedom: fewer agreeing points is no evidence
_AREA_SCALE = (1e-3, 1e3)  # area ratio a real match may have; outside it, points collapse or explode

Method = Literal["homography", "affine", "none"]
Id = TypeVar("Id", bound=Hashable)


@dataclass(frozen=True)
class Verification:
    """``inliers``: RANSAC inliers of the accepted model; ``matches``: ratio-test matches fed to it."""

    inliers: int
    method: Method
    matches: int


def ratio_matches(query: LocalFeatures, candidate: LocalFeatures, ratio: float = 0.8) -> np.ndarray:
    """(m, 2) int indices (query, candidate) of matches passing Lowe's ratio test.

    A query descriptor matches its nearest candidate descriptor only when that is clearly nearer
    than the second nearest (distance < ratio × second distance): repeated structure is ambiguous
    and would only feed RANSAC outliers. Each candidate keypoint keeps only its closest match.
    The two nearest neighbours come from FAISS's exact search (one matrix product, no Python
    object per match, unlike OpenCV's BFMatcher.knnMatch), which re-ranking many candidates feels.
    """
    if len(query) == 0 or len(candidate) < 2:
        return np.zeros((0, 2), np.int64)
    squared, nearest = faiss.knn(
        np.ascontiguousarray(query.descriptors, np.float32),
        np.ascontiguousarray(candidate.descriptors, np.float32),
        2,
    )
    distances = np.sqrt(np.maximum(squared, 0.0))
    keep = distances[:, 0] < ratio * distances[:, 1]
    rows = np.flatnonzero(keep)
    scored = np.column_stack([distances[rows, 0], rows, nearest[rows, 0]]).astype(np.float64)
    return _one_to_one(scored.reshape(-1, 3))


def _one_to_one(scored: np.ndarray) -> np.ndarray:
    """Keep the closest match of each candidate keypoint, in query order.

    Without this, many query keypoints (texture, noise) piling onto one candidate keypoint look to
    RANSAC like a transform that shrinks everything to a point, and count as inliers.
    """
    by_distance = scored[np.argsort(scored[:, 0], kind="stable")]
    _, first = np.unique(by_distance[:, 2], return_index=True)
    kept = by_distance[first]
    return kept[np.argsort(kept[:, 1], kind="stable"), 1:].astype(np.int64)


def _plausible(linear: np.ndarray) -> bool:
    """Whether a 2×2 linear part keeps orientation and a believable area ratio.

    A negative determinant mirrors the image (a copy of a photo is not mirrored); one near 0 or
    huge collapses the points onto a line or a dot, which RANSAC readily fits to clustered
    false matches.
    """
    determinant = float(np.linalg.det(linear))
    return _AREA_SCALE[0] < determinant < _AREA_SCALE[1]


def _homography_inliers(src: np.ndarray, dst: np.ndarray) -> int:
    """Inliers of a RANSAC homography, or 0 when it fails or is degenerate."""
    homography, mask = cv2.findHomography(
        src, dst, cv2.RANSAC, RANSAC_THRESHOLD_PX, maxIters=RANSAC_MAX_ITERS
    )
    if homography is None or mask is None or abs(homography[2, 2]) < 1e-12:
        return 0
    inliers = int(mask.sum())
    if inliers < _MIN_HOMOGRAPHY_INLIERS or not _plausible(homography[:2, :2] / homography[2, 2]):
        return 0
    return inliers


def _similarity_inliers(src: np.ndarray, dst: np.ndarray) -> int:
    """Inliers of a RANSAC rotation + uniform scale + translation, or 0 when it fails or is degenerate."""
    model, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_THRESHOLD_PX, maxIters=RANSAC_MAX_ITERS
    )
    if model is None or mask is None or not _plausible(model[:, :2]):
        return 0
    return int(mask.sum())


def verify(
    query: LocalFeatures, candidate: LocalFeatures, ratio: float = 0.8, min_matches: int = 8
) -> Verification:
    """Match descriptors, then count the matches one transform explains.

    A homography first (it covers perspective); when RANSAC finds none, or only a degenerate one,
    a 4-degree-of-freedom similarity, which needs fewer points and suits small overlaps. Fewer
    than ``min_matches`` ratio-test matches is reported as 0 inliers without fitting anything.
    """
    matched = ratio_matches(query, candidate, ratio)
    if len(matched) < min_matches:
        return Verification(0, "none", len(matched))
    src = query.points[matched[:, 0]]
    dst = candidate.points[matched[:, 1]]
    inliers = _homography_inliers(src, dst)
    if inliers:
        return Verification(inliers, "homography", len(matched))
    inliers = _similarity_inliers(src, dst)
    return Verification(inliers, "affine" if inliers else "none", len(matched))


def rerank(
    query: LocalFeatures,
    candidates: Sequence[tuple[Id, LocalFeatures]],
    ratio: float = 0.8,
    min_matches: int = 8,
) -> list[tuple[Id, int]]:
    """``(id, inliers)`` for each candidate, most inliers first; ties keep the candidates' order
    (the first stage's ranking)."""
    scored = [(key, verify(query, features, ratio, min_matches).inliers) for key, features in candidates]
    return sorted(scored, key=lambda item: -item[1])
