"""Build the generic SIFT vocabulary the ``sift-*`` extractors start with (``make models``).

From the photos installed packages ship (the offline set's sources: server/dataset_builder.py),
so nothing is downloaded: RootSIFT from each, FAISS k-means over all of them, idf from
per-photo word counts. It is generic by construction; a collection's own images make a better
one: TrainCollection fits a vocabulary on a collection's own images.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from imagesearch.plugins.sift.features import extract_local
from imagesearch.plugins.sift.vocabulary import Vocabulary, fit_vocabulary
from imagesearch.plugins.sift_plugin import VOCABULARY_FILE
from imagesearch.server.dataset_builder import available_sources
from imagesearch.server.files import atomic_write_bytes

DEFAULT_WORDS = 32


def build_generic_vocabulary(
    out_dir: Path, words: int = DEFAULT_WORDS, seed: int = 0
) -> tuple[Path, Vocabulary]:
    """Fit and write ``out_dir/sift-vocabulary.bin``; RuntimeError when no photo is installed."""
    found, _ = available_sources()
    per_photo = []
    for _, path in found:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            per_photo.append(extract_local(image).descriptors)
    if not per_photo:
        raise RuntimeError("no bundled photo found to build a SIFT vocabulary from (install scikit-image)")
    vocabulary = fit_vocabulary(np.concatenate(per_photo), words, seed).fit_idf(per_photo)
    path = Path(out_dir) / VOCABULARY_FILE
    atomic_write_bytes(path, vocabulary.to_bytes())
    return path, vocabulary
