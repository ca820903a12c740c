"""Built-in plugin: the SIFT extractors (``sift-bovw``, ``sift-vlad``) over the generic vocabulary.

The vocabulary is a file in the models directory, ``sift-vocabulary.bin``, built by
``imagesearch model vocabulary`` (``make models`` does it) from photos that installed packages
ship, so a SIFT collection works with zero set-up. No vocabulary file: nothing is registered.
Settings from ``[plugins.sift]``: ``max_side`` and ``max_keypoints``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from imagesearch.plugins import Extractor, PluginContext, RegistrationProblems, hookimpl
from imagesearch.plugins.sift.extractors import sift_extractors
from imagesearch.plugins.sift.vocabulary import Vocabulary

log = logging.getLogger(__name__)

VOCABULARY_FILE = "sift-vocabulary.bin"


@hookimpl
def register_extractors(register: Callable[[Extractor], None], context: PluginContext) -> None:
    if context.models_dir is None:
        return
    path = context.models_dir / VOCABULARY_FILE
    if not path.is_file():
        log.info("no SIFT vocabulary at %s: no SIFT extractors (run `make models`)", path)
        return
    try:
        vocabulary = Vocabulary.from_bytes(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RegistrationProblems([f"unusable SIFT vocabulary {path}: {exc}"]) from exc
    limits = {key: int(context.config[key]) for key in ("max_side", "max_keypoints") if key in context.config}
    for extractor in sift_extractors(vocabulary, **limits):
        register(extractor)
