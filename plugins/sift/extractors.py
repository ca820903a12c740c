"""SIFT extractors: local RootSIFT descriptors aggregated into one global vector per image.

``sift-bovw`` (bag of visual words: tf-idf over the vocabulary, L2-normalised; dimension k) and
``sift-vlad`` (VLAD: residuals to the vocabulary's words, intra-normalised and power-law;
dimension 128·k). Both are cosine by default and stateless apart from the vocabulary, so
``extract`` is safe from many threads (features.py keeps one cv2.SIFT per thread). An image with
no keypoints (flat colour, tiny) gets the zero vector: stored and searchable, never an error.
The version names the vocabulary, so vectors of two vocabularies are never compared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from imagesearch.plugins import Extractor
from imagesearch.plugins.sift.encoding import bovw, vlad
from imagesearch.plugins.sift.features import extract_local
from imagesearch.plugins.sift.vocabulary import Vocabulary

DEFAULT_MAX_SIDE = 640
DEFAULT_MAX_KEYPOINTS = 1000


class SiftExtractor(Extractor):
    """One aggregation of RootSIFT over a vocabulary (``encode`` turns descriptors into the vector)."""

    default_metric = "cosine"

    def __init__(
        self,
        name: str,
        vocabulary: Vocabulary,
        encode: Callable[[np.ndarray, Vocabulary], np.ndarray],
        dim: int,
        what: str,
        *,
        max_side: int = DEFAULT_MAX_SIDE,
        max_keypoints: int = DEFAULT_MAX_KEYPOINTS,
    ) -> None:
        self.name, self.dim, self.vocabulary, self._encode = name, dim, vocabulary, encode
        self.version = f"1+{vocabulary.version}"
        self.max_side, self.max_keypoints = max_side, max_keypoints
        self.min_input_side = max_side // 2  # JPEGs may be decoded smaller: SIFT runs at max_side anyway
        self.description = (
            f"SIFT ({what}): RootSIFT, at most {max_keypoints} keypoints on a {max_side}-px long side, "
            f"{vocabulary.k}-word vocabulary {vocabulary.version}"
        )

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for row, image in enumerate(images):
            local = extract_local(image, self.max_side, self.max_keypoints)
            out[row] = self._encode(local.descriptors, self.vocabulary)
        return out


def sift_extractors(vocabulary: Vocabulary, **limits: int) -> list[SiftExtractor]:
    """The two SIFT extractors over ``vocabulary`` (limits: max_side, max_keypoints)."""
    return [
        SiftExtractor("sift-bovw", vocabulary, bovw, vocabulary.k, "bag of visual words, tf-idf", **limits),
        SiftExtractor("sift-vlad", vocabulary, vlad, vocabulary.k * 128, "VLAD", **limits),
    ]
