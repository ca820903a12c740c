"""What plugins return, checked where it enters the server, before anything is stored: vectors
(numbers, the extractor's shape, finite and within the index's range), local features (one
``bytes`` per image), keypoint counts and inlier counts (whole numbers that fit the API's int32).
Each refusal, and any exception inside the plugin call, is INTERNAL naming the plugin object, with
the reason of its kind (``errors.plugin_failure``). (Metrics: ``collection.prepared_by`` and
``collection.scored_by``.)"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imagesearch.plugins.types import Extractor, LocalFeatures
from imagesearch.server.errors import Internal, plugin_failure
from imagesearch.server.vector_input import within_index_range

MAX_COUNT = 2**31 - 1  # inliers and keypoints travel as int32 (SearchHit.inliers)


def checked_extract(extractor: Extractor, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run an extractor and refuse output the index could not use (a plugin bug: INTERNAL)."""
    with plugin_failure(f"extractor {extractor.name!r}", "EXTRACTOR_FAILED"):
        output = extractor.extract(images)
    return checked_vectors(extractor, output, len(images))


def checked_vectors(extractor: Extractor, output: np.ndarray, count: int) -> list[np.ndarray]:
    """An extractor's output for ``count`` images, refused if the index could not use it: numbers
    only (an array of strings became one vector for every image: an outside test), of the
    extractor's shape, finite and within the index's range."""
    wrong = ""
    with plugin_failure(f"extractor {extractor.name!r}", "EXTRACTOR_FAILED"):
        raw = np.asarray(output)  # a ragged list raises here
    if raw.dtype.kind not in "iuf":
        wrong = f"values of type {raw.dtype}, not numbers"
    else:
        vectors = raw.astype(np.float32, copy=False)
        if vectors.shape != (count, extractor.dim):
            wrong = f"shape {vectors.shape}, not ({count}, {extractor.dim})"
        elif not within_index_range(vectors):
            wrong = "non-finite values, or values too large for the index"
    if wrong:
        raise Internal(
            f"extractor {extractor.name!r} returned {wrong} for {count} images", reason="EXTRACTOR_FAILED"
        )
    return list(vectors)


def checked_local_features(
    local: LocalFeatures, images: Sequence[np.ndarray], for_query: bool
) -> list[bytes]:
    """Local features for ``images``, refused unless one ``bytes`` each: anything else was stored,
    then failed every re-ranking, even once the plugin was fixed (an outside test)."""
    with plugin_failure(f"local features {local.name!r}", "LOCAL_FEATURES_FAILED"):
        features = local.extract(images, for_query=for_query)
    if not isinstance(features, list | tuple) or len(features) != len(images):
        wrong = f"{type(features).__name__} of {len(features) if hasattr(features, '__len__') else '?'} items"
    else:
        wrong = next((type(f).__name__ for f in features if not isinstance(f, bytes)), "")
    if wrong:
        raise Internal(
            f"local features {local.name!r} returned {wrong} for {len(images)} images, not one bytes each",
            reason="LOCAL_FEATURES_FAILED",
        )
    return list(features)


def checked_inliers(local: LocalFeatures, query: bytes, candidates: Sequence[bytes]) -> list[int]:
    """``local.verify``'s inlier counts, refused unless one ``_whole`` number per candidate."""
    with plugin_failure(f"local features {local.name!r}", "LOCAL_FEATURES_FAILED"):
        counts = local.verify(query, candidates)
    try:
        inliers = [_whole(n) for n in counts] if len(counts) == len(candidates) else [None]
    except TypeError:  # no length, not iterable
        inliers = [None]
    if None in inliers:
        raise Internal(
            f"local features {local.name!r} verified {len(candidates)} candidates into "
            f"{_shown_counts(counts)}, not one whole number from 0 to {MAX_COUNT} each",
            reason="LOCAL_FEATURES_FAILED",
        )
    return inliers  # type: ignore[return-value]


def checked_count(local: LocalFeatures, features: bytes) -> int:
    """``local.count``: how many keypoints ``features`` hold, refused unless ``_whole`` (NaN, text
    and negatives were taken as they came: an outside test)."""
    with plugin_failure(f"local features {local.name!r}", "LOCAL_FEATURES_FAILED"):
        count = local.count(features)
    whole = _whole(count)
    if whole is None:
        raise Internal(
            f"local features {local.name!r} counted {_shown_counts(count)} keypoints, not a whole number "
            f"from 0 to {MAX_COUNT}",
            reason="LOCAL_FEATURES_FAILED",
        )
    return whole


def _whole(value: object) -> int | None:
    """``value`` as an int if it is a whole number from 0 to MAX_COUNT (2.0 and np.int64 are), else None."""
    try:
        whole = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):  # NaN, None, text
        return None
    return whole if whole == value and 0 <= whole <= MAX_COUNT else None


def _shown_counts(counts: object) -> str:
    text = repr(counts)
    return text if len(text) <= 80 else text[:77] + "..."


def checked_encode(extractor: Extractor, features: Sequence[bytes]) -> list[np.ndarray]:
    """A trainable extractor's vectors for serialised local features, checked as ``checked_vectors``."""
    with plugin_failure(f"extractor {extractor.name!r}", "EXTRACTOR_FAILED"):
        encoded = extractor.encode(features)  # type: ignore[attr-defined]
    return checked_vectors(extractor, encoded, len(features))
