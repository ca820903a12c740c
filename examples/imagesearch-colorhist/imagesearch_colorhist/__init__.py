"""imagesearch-colorhist: an HSV colour-histogram extractor and histogram distances.

An example third-party imagesearch plugin. Colour histograms ignore shape
entirely, which makes them cheap, model-free and a good baseline for "find
images with the same palette". This module is the plugin object itself: the
entry point in pyproject.toml names it, and imagesearch calls its two hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import faiss
import numpy as np

from imagesearch.plugins import FLAT, Extractor, Metric, hookimpl, inverse_distance_score

__version__ = "0.2.0"

# Bins per HSV channel: hue matters most for "same colours", so it gets the most bins.
HUE_BINS, SATURATION_BINS, VALUE_BINS = 8, 4, 4
# OpenCV's 8-bit HSV ranges: hue in [0, 180), saturation and value in [0, 256).
_HSV_RANGES = [0, 180, 0, 256, 0, 256]


def _as_bgr(image: np.ndarray) -> np.ndarray:
    """Accept BGR (what the server passes), plus grey and BGRA for direct callers."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise ValueError(f"expected an (h, w, 3) BGR image, got shape {image.shape}")


class HSVHistogram(Extractor):
    """A joint hue x saturation x value histogram, L1-normalised (the bins sum to 1).

    Normalising makes images of different sizes comparable and turns each
    vector into a probability distribution, which is what the L1 and
    Jensen-Shannon metrics below expect. Stateless, so ``extract`` is safe to
    call from many server threads at once.
    """

    name = "colorhist-hsv"
    # Bump whenever the output changes (bins, colour space): collections refuse to mix versions.
    version = "1"
    dim = HUE_BINS * SATURATION_BINS * VALUE_BINS
    default_metric = "l1"
    description = (
        f"HSV colour histogram, {HUE_BINS}x{SATURATION_BINS}x{VALUE_BINS} bins, L1-normalised; "
        "compares palettes, ignores shape."
    )

    def histogram(self, image: np.ndarray) -> np.ndarray:
        """The normalised histogram of one BGR image, shape (dim,)."""
        bgr = _as_bgr(image)
        if bgr.shape[0] == 0 or bgr.shape[1] == 0:
            raise ValueError("cannot take the histogram of an empty image")
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        bins = [HUE_BINS, SATURATION_BINS, VALUE_BINS]
        counts = cv2.calcHist([hsv], [0, 1, 2], None, bins, _HSV_RANGES).reshape(-1)
        return counts / np.float32(bgr.shape[0] * bgr.shape[1])

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """One histogram per image: float32 of shape (len(images), dim)."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for row, image in enumerate(images):
            out[row] = self.histogram(image)
        return out


def _as_distribution(vectors: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """Non-negative rows that sum to 1, with no zero bins.

    FAISS's Jensen-Shannon computes x * log(m / x), which is NaN for an empty
    bin, and histograms are mostly empty bins; a tiny floor avoids that and
    moves the distance by far less than the differences it measures.
    """
    vectors = np.maximum(np.asarray(vectors, dtype=np.float32), 0.0) + np.float32(floor)
    return vectors / vectors.sum(axis=1, keepdims=True)


L1 = Metric(
    name="l1",
    faiss_metric=faiss.METRIC_L1,
    description="Manhattan distance; distance = sum |a - b| (0 to 2 between normalised histograms), "
    "score = 1 / (1 + distance). Flat indexes only.",
    to_score=inverse_distance_score,
    version="1",
    index_types=frozenset({FLAT}),
)

JENSEN_SHANNON = Metric(
    name="jensen_shannon",
    faiss_metric=faiss.METRIC_JensenShannon,
    description="Jensen-Shannon divergence (natural log, 0 to ln 2) between vectors made into "
    "distributions (negatives clipped, bins floored at 1e-6, rows summing to 1); "
    "score = 1 / (1 + distance). Flat indexes only.",
    prepare=_as_distribution,
    to_score=inverse_distance_score,
    version="1",
    index_types=frozenset({FLAT}),
)


@hookimpl
def register_extractors(register: Callable[[HSVHistogram], None]) -> None:
    register(HSVHistogram())


@hookimpl
def register_metrics(register: Callable[[Metric], None]) -> None:
    register(L1)
    register(JENSEN_SHANNON)
