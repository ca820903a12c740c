"""A tiny, fast, real extractor for server tests: the image shrunk to 8x8 colour pixels.

Similar images give similar vectors (what the server tests rely on) in
microseconds, so the end-to-end tests of storage, indexing and the API do not
pay for a CNN. The CNN itself has its own tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from imagesearch.plugins import Extractor, hookimpl

SIDE = 8


class TinyExtractor(Extractor):
    name = "tiny-8x8"
    version = "1"
    dim = SIDE * SIDE * 3
    default_metric = "cosine"
    description = "8x8 colour thumbnail, centred (test extractor)"

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for row, image in enumerate(images):
            small = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
            out[row] = small - small.mean()
        return out


class TinyPlugin:
    @hookimpl
    def register_extractors(self, register) -> None:
        register(TinyExtractor())


TINY_PLUGIN = ("tiny", TinyPlugin())
