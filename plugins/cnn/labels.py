"""ImageNet-1k class names, and turning logits into a readable top-k."""

from __future__ import annotations

from functools import cache
from importlib import resources

import numpy as np


@cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 class names in classifier index order (see plugins/data/IMAGENET_CLASSES_LICENSE.md)."""
    text = resources.files("imagesearch.plugins.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt has {len(names)} names, expected 1000")
    return names


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
    """The k most probable ImageNet classes of one logits row, with softmax probabilities."""
    probabilities = softmax(np.asarray(logits, dtype=np.float64))
    names = imagenet_classes()
    order = np.argsort(-probabilities)[:k]
    return [(names[i], float(probabilities[i])) for i in order]
