"""The default model on real photos: plausible ImageNet classes, near-duplicates found first."""

from __future__ import annotations

import numpy as np
import pytest

from imagesearch.plugins.cnn.labels import imagenet_classes, top_k
from tests.cnn_fixtures import (  # noqa: F401
    cosine_matrix,
    default_extractor,
    default_models_dir,
    distorted_copy,
    photos,
)

PLAUSIBLE_TOP1 = {
    "chelsea": {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"},
    "coffee": {"espresso", "cup", "coffee mug", "eggnog"},
    "china": {"palace", "monastery", "bell cote", "pagoda", "boathouse", "lakeside", "temple"},
    "flower": {"daisy", "pot", "vase", "bee", "ant", "cardoon"},
}


def test_class_names_are_imagenet_order():
    names = imagenet_classes()
    assert len(names) == 1000
    assert (names[0], names[281], names[967], names[999]) == ("tench", "tabby", "espresso", "toilet tissue")


@pytest.mark.parametrize("name", sorted(PLAUSIBLE_TOP1))
def test_top1_class_is_plausible(name, default_extractor, photos):  # noqa: F811
    (logits,) = default_extractor.classify([photos[name]])
    (best, probability), *_ = top_k(logits, 5)
    assert best in PLAUSIBLE_TOP1[name], top_k(logits, 5)
    assert probability > 0.1


def test_cat_is_a_cat_and_coffee_is_espresso(default_extractor, photos):  # noqa: F811
    """Stronger than 'plausible': the cat classes together dominate, espresso wins outright."""
    logits = default_extractor.classify([photos["chelsea"], photos["coffee"]])
    cat = dict(top_k(logits[0], 5))
    assert sum(cat.get(c, 0.0) for c in ("tabby", "tiger cat", "Egyptian cat")) > 0.8
    assert top_k(logits[1], 1)[0][0] == "espresso" and top_k(logits[1], 1)[0][1] > 0.8


def test_distorted_copies_retrieve_their_originals_first(default_extractor, photos):  # noqa: F811
    names = sorted(photos)
    originals = default_extractor.extract([photos[name] for name in names])
    queries = default_extractor.extract([distorted_copy(photos[name]) for name in names])
    similarity = cosine_matrix(queries, originals)
    assert list(np.argmax(similarity, axis=1)) == list(range(len(names)))
    # and by a margin: the original beats the best other photo clearly
    for row, _ in enumerate(names):
        others = np.delete(similarity[row], row)
        assert similarity[row, row] - others.max() > 0.1
