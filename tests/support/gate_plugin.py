"""An extractor that waits at a gate: lets tests hold a call in flight on purpose."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from imagesearch.plugins.hookspecs import hookimpl
from tests.support.tiny_plugin import TinyExtractor


class GateExtractor(TinyExtractor):
    name = "gated"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        self.entered.set()
        self.release.wait(30)
        return super().extract(images)


class GatePlugin:
    def __init__(self) -> None:
        self.extractor = GateExtractor()

    @hookimpl
    def register_extractors(self, register) -> None:
        register(self.extractor)
