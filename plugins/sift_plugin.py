"""Built-in plugin: SIFT local features (``sift``) and the extractors encoding them (``sift-bovw``,
``sift-vlad``) over the generic vocabulary, which each new collection starts with.

The vocabulary is a file in the models directory, ``sift-vocabulary.bin``, built by
``imagesearch model vocabulary`` (``make models`` does it) from photos that installed packages
ship, so a SIFT collection works with zero set-up. No vocabulary file: only the local features.
Settings from ``[plugins.sift]``: ``max_side``, ``max_keypoints`` (stored per image) and
``query_keypoints`` (extracted from a query image for geometric re-ranking) and ``vlad_pca_dim``
(when > 0, TrainCollection on a ``sift-vlad`` collection also fits a PCA to that many dimensions);
any other key, or a value of the wrong type or range, stops start-up (PluginContext.settings).
"""

from __future__ import annotations

from collections.abc import Callable

from imagesearch.plugins import (
    Extractor,
    LocalFeatures,
    PluginContext,
    RegistrationProblems,
    Setting,
    hookimpl,
)
from imagesearch.plugins.sift.extractors import SiftExtractor, SiftLocalFeatures, sift_plugins
from imagesearch.plugins.sift.vocabulary import Vocabulary

VOCABULARY_FILE = "sift-vocabulary.bin"


SETTINGS = {  # [plugins.sift]: any other key, or a value outside these, stops start-up
    "max_side": Setting(int, low=1),
    "max_keypoints": Setting(int, low=1),
    "query_keypoints": Setting(int, low=1),
    "vlad_pca_dim": Setting(int, low=0, note="0: no PCA"),
}


def _load(context: PluginContext) -> tuple[SiftLocalFeatures, list[SiftExtractor]]:
    """The plugin's objects, built once per models directory and settings (both hooks share them).

    The ``sift`` local features need no vocabulary, so they are offered without one: a CNN
    collection that keeps them for re-ranking must not lose its image queries when the file goes
    (an outside test). Only the extractors that encode them over the vocabulary need it."""
    limits = context.settings(SETTINGS)  # checked first: a bad table is an error with or without models
    path = context.models_dir / VOCABULARY_FILE if context.models_dir is not None else None
    try:
        vocabulary = Vocabulary.from_bytes(path.read_bytes()) if path is not None and path.is_file() else None
    except (OSError, ValueError) as exc:
        raise RegistrationProblems([f"unusable SIFT vocabulary {path}: {exc}"]) from exc
    key = (str(path), vocabulary.version if vocabulary else "", tuple(sorted(limits.items())))
    if key not in _built:  # one set of objects for both hooks: the extractors use the registered features
        if vocabulary is not None:
            _built[key] = sift_plugins(vocabulary, **limits)
        else:
            local_limits = {name: value for name, value in limits.items() if name != "vlad_pca_dim"}
            _built[key] = (SiftLocalFeatures(**local_limits), [])
    return _built[key]


_built: dict[tuple, tuple[SiftLocalFeatures, list[SiftExtractor]]] = {}


@hookimpl
def register_local_features(register: Callable[[LocalFeatures], None], context: PluginContext) -> None:
    register(_load(context)[0])


@hookimpl
def register_extractors(register: Callable[[Extractor], None], context: PluginContext) -> None:
    """The extractors over the vocabulary; without it, none, and a problem saying why when the
    models directory exists (as for a broken model file): a collection made with them said only
    "not loaded", and ListPlugins nothing (an outside test)."""
    extractors = _load(context)[1]
    for extractor in extractors:
        register(extractor)
    if not extractors and context.models_dir is not None and context.models_dir.is_dir():
        raise RegistrationProblems(
            [
                f"sift-bovw and sift-vlad are not offered: no SIFT vocabulary at "
                f"{context.models_dir / VOCABULARY_FILE} (`imagesearch model vocabulary` builds it; "
                "`make models` does); the sift local features are offered without it"
            ]
        )
