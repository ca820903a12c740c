"""Pixels and vectors for a request's images: decoding (a batch's images one per core, ahead of
its item-by-item checks), thumbnails, and feature extraction batched with other callers' images.
Searches and adds share one of these per server, so their images share the extractor's batches
and the decoder threads."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from imagesearch.plugins.types import TrainableExtractor
from imagesearch.server.batching import Batcher
from imagesearch.server.collection import Collection
from imagesearch.server.config import ServerConfig, available_cpus
from imagesearch.server.imaging import DecodedImage, decode_image, make_thumbnail
from imagesearch.server.parallel import Pulling
from imagesearch.server.plugin_output import checked_encode, checked_extract, checked_local_features
from imagesearch.server.records import ImageItem

log = logging.getLogger(__name__)


class Extraction:
    """Decodes, thumbnails and extracts; owns the extractors' batchers and the decoder threads."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # Concurrent images (searches by image and AddImages alike) go through their extractor
        # as one batch, one batcher per extractor.
        self._batchers: dict[int, Batcher[np.ndarray, np.ndarray]] = {}
        self._batchers_lock = threading.Lock()
        # A batch's images are decoded (and thumbnailed) one per core at once, ahead of the
        # call's own item-by-item checks: a JPEG decode releases the GIL (decoding_ahead).
        # Enough threads for every call running at once to have its own pullers.
        self._decoders = ThreadPoolExecutor(
            max_workers=config.workers * available_cpus(), thread_name_prefix="decode"
        )

    def close(self) -> None:
        self._decoders.shutdown(wait=True)

    def vectors(
        self, collection: Collection, images: list[np.ndarray], *, query: bool = False, rerank: bool = False
    ) -> tuple[np.ndarray, list[bytes] | None, str]:
        """Vectors for decoded images, their local features when the collection keeps some (for
        a ``query``, only when it is re-ranked or they make its vector; a re-ranked query's are
        denser) and the extractor version that made the vectors.

        A trainable extractor encodes the local features (one SIFT pass for both); any other
        runs on the pixels, batched with other callers' images when that helps it."""
        extractor = collection.extractor
        trainable = isinstance(extractor, TrainableExtractor)
        # A plain query of a collection whose vectors are not made from its local features needs
        # none: it is answered even when those features' plugin is gone (an outside test).
        wanted = bool(collection.spec.local_features) and (trainable or not query or rerank)
        local = collection.local_features if wanted else None
        features = checked_local_features(local, images, rerank) if local is not None else None
        if trainable and features is not None:
            vectors = np.stack(checked_encode(extractor, features))
        else:
            vectors = self._extract_batched(collection, images)
        return vectors, features, extractor.version

    def _extract_batched(self, collection: Collection, images: list[np.ndarray]) -> np.ndarray:
        """Vectors for decoded images, extracted together with other callers' images."""
        extractor = collection.extractor
        if not extractor.batches:
            return np.stack(checked_extract(extractor, images))
        with self._batchers_lock:
            batcher = self._batchers.get(id(extractor))
            if batcher is None:
                batcher = Batcher(
                    functools.partial(checked_extract, extractor),
                    self.config.extract_max_batch,
                    self.config.extract_max_wait_ms / 1000,
                )
                self._batchers[id(extractor)] = batcher
        return np.stack(batcher.submit_many(images))

    def min_side(self, collection: Collection) -> int | None:
        """How far a JPEG may be shrunk while decoding: enough for the extractor, the local features
        the collection keeps and the thumbnail (None: full size)."""
        extractor = collection.loaded_extractor
        wanted = extractor.min_input_side if extractor is not None else 0
        if wanted and collection.spec.local_features:
            local = collection.loaded_local_features
            wanted = max(wanted, local.min_input_side) if local is not None and local.min_input_side else 0
        return max(wanted, self.config.thumbnail_size) if wanted else None

    def decode(self, content: bytes, prefix: str, min_side: int | None) -> tuple[DecodedImage, bytes]:
        image = decode_image(content, self.config.limits, f"{prefix}.content", min_side)
        return image, make_thumbnail(image.pixels, self.config.thumbnail_size, self.config.thumbnail_quality)

    @contextlib.contextmanager
    def decoding_ahead(
        self,
        items: Sequence[ImageItem],
        ids: Sequence[str],
        existing: set[str],
        index_offset: int,
        min_side: int | None,
    ) -> Iterator[dict[int, Future[tuple[DecodedImage, bytes]]]]:
        """Decode a batch's images on one thread per core, in order, while the call checks its
        items in order (the item loop still meets each image's error at its own position).

        Only images the loop will decode: not an id already stored (a resumed import skips
        those without decoding them) nor a repeated id. A lone image is decoded in the call
        itself: there is nothing to overlap. The call's images stay in its own queue (its
        pullers take them one by one), so a small call never waits behind a large call's
        images. On leaving, decodes not started are cancelled and running ones awaited, so
        none outlives the call's hold on the pixel budget.
        """
        first: dict[str, int] = {}
        for position, image_id in enumerate(ids):
            first.setdefault(image_id, position)
        positions = [
            p
            for p, item in enumerate(items)
            if item.content is not None
            and item.vector is None
            and ids[p] not in existing
            and first[ids[p]] == p
        ]
        if len(positions) < 2:
            yield {}
            return
        job = Pulling(
            lambda p: self.decode(items[p].content, f"images[{p + index_offset}]", min_side),
            positions,
            stop_on_error=False,  # each image fails on its own (skip_invalid)
        )
        job.start_helpers(self._decoders, available_cpus())
        try:
            yield dict(zip(positions, job.futures, strict=True))
        finally:
            job.finish()
