"""The hook specifications every imagesearch plugin implements a subset of.

Hooks receive a `register` callable owned by the host, instead of returning
objects, so the host sees every registration with its plugin name and can
refuse duplicates with a clear start-up error (the simonw/llm pattern). A hook
that declares a `context` argument also gets the host's PluginContext (the
models directory, the plugin's own config table); pluggy passes only the
arguments an implementation declares, so `context` is optional.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from imagesearch.plugins.types import PluginContext

PROJECT_NAME = "imagesearch"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_extractors(register: Callable[..., None], context: PluginContext) -> None:
    """Register feature extractors: call ``register(extractor)`` once per extractor.

    An extractor turns a batch of decoded images into one float32 vector each;
    see :class:`imagesearch.plugins.Extractor` for the interface.
    """


@hookspec
def register_metrics(register: Callable[..., None], context: PluginContext) -> None:
    """Register distance metrics: call ``register(metric)`` once per metric.

    A metric tells FAISS how to compare vectors and how to turn its raw value
    into a score where higher means more similar; see
    :class:`imagesearch.plugins.types.Metric`.
    """


@hookspec
def register_local_features(register: Callable[..., None], context: PluginContext) -> None:
    """Register local-feature kinds: call ``register(local_features)`` once per kind.

    Local features (keypoints and descriptors) are kept with collections that ask for them
    and re-rank search candidates by geometric verification; trainable extractors encode
    them. See :class:`imagesearch.plugins.LocalFeatures`.
    """
