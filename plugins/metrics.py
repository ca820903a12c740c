"""Built-in metrics: l2, inner_product and cosine, each a FAISS metric plus a score."""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from imagesearch.plugins import ALL_INDEX_TYPES, Metric, hookimpl, inverse_distance_score, l2_normalize


def _sqrt_nonnegative(squared: np.ndarray) -> np.ndarray:
    # FAISS can return tiny negative squared distances through rounding.
    return np.sqrt(np.maximum(squared, 0.0))


def _same(values: np.ndarray) -> np.ndarray:
    return values


L2 = Metric(
    name="l2",
    faiss_metric=faiss.METRIC_L2,
    description="Euclidean distance; distance = ||a - b||, score = 1 / (1 + distance).",
    to_distance=_sqrt_nonnegative,
    to_score=inverse_distance_score,
    index_types=ALL_INDEX_TYPES,
)

INNER_PRODUCT = Metric(
    name="inner_product",
    faiss_metric=faiss.METRIC_INNER_PRODUCT,
    description="Dot product of the raw vectors; distance = score = a . b.",
    to_score=_same,
    index_types=ALL_INDEX_TYPES,
)


def _cosine_range(products: np.ndarray) -> np.ndarray:
    """Products of unit vectors, kept in [-1, 1]: float32 rounding puts a vector at 1.0000002 from
    itself, outside the range the API promises."""
    return np.clip(products, -1.0, 1.0)


COSINE = Metric(
    name="cosine",
    faiss_metric=faiss.METRIC_INNER_PRODUCT,
    description="Cosine similarity (vectors L2-normalised, then inner product); "
    "distance = score = cos(a, b) in [-1, 1].",
    prepare=l2_normalize,
    to_distance=_cosine_range,
    to_score=_same,
    index_types=ALL_INDEX_TYPES,
)

BUILTIN_METRICS = (L2, INNER_PRODUCT, COSINE)


@hookimpl
def register_metrics(register: Callable[[Metric], None]) -> None:
    for metric in BUILTIN_METRICS:
        register(metric)
