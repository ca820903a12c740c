"""The use cases: add, search, remove, get, list — validated, timed, protocol-free.

The servicer turns protobuf into the plain inputs of ``records`` and calls one
method per RPC; everything the API promises (all-or-nothing batches, per-item
results, limits, deadlines, stage timings) is decided here, once, so the
unary and the streaming upload behave identically. What an item must satisfy
is in ``item_checks``; decoding and extraction in ``extraction``; searches and
classifications are planned, batched and answered in ``searching``."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from imagesearch.plugins.manager import PluginRegistry
from imagesearch.plugins.types import TrainableExtractor
from imagesearch.server.budget import PixelBudget
from imagesearch.server.catalog import Catalog
from imagesearch.server.classify import (
    Classification,
)
from imagesearch.server.collection import (
    NAME_PATTERN,
    SKIPPED,
    Collection,
    CollectionInfo,
    TrainOutcome,
)
from imagesearch.server.config import ServerConfig
from imagesearch.server.errors import (
    AlreadyExists,
    ImageSearchError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    shown,
    store_damage_reported,
)
from imagesearch.server.extraction import Extraction
from imagesearch.server.imaging import DecodedImage
from imagesearch.server.item_checks import (
    check_batch_pixels,
    check_deadline,
    check_fields,
    check_vectors,
)
from imagesearch.server.page_tokens import decode_page_token, encode_page_token, row_position
from imagesearch.server.plugin_output import checked_count
from imagesearch.server.records import (
    AddOutcome,
    ClassifyQuery,
    ExtractorInfo,
    ImageItem,
    ItemResult,
    LocalFeaturesInfo,
    MetricInfo,
    NewCollection,
    PluginList,
    SearchOutcome,
    SearchQuery,
)
from imagesearch.server.searching import Searching
from imagesearch.server.store import ImageRow, NewImage
from imagesearch.server.vector_index import TrainingPostponed

log = logging.getLogger(__name__)
T = TypeVar("T")


def _already_stored(image_id: str, collection: Collection, prefix: str) -> AlreadyExists:
    return AlreadyExists(
        f"id {shown(image_id)} already exists in collection {collection.spec.name!r}",
        field=f"{prefix}.id",
        reason="IMAGE_EXISTS",
    )


def _left_as_it_is(error: AlreadyExists, prefix: str) -> AlreadyExists:
    """The per-item result of an id already stored, under skip_existing."""
    error.message = f"{prefix}: {error.message} (skip_existing: left as it is)"
    return error


MAX_SEED = 2**31 - 1  # FAISS k-means takes a C int


def _reports_store_damage(method: Callable[..., T]) -> Callable[..., T]:
    """A use case on one collection (its name first) that reports SQLite finding that collection's
    file corrupt as StoreDamaged, naming it: a stream then says what it stored before, as for any
    failure of ours."""

    @functools.wraps(method)
    def wrapped(self: Engine, collection_name: str, *args: Any, **kwargs: Any) -> T:
        with store_damage_reported(collection_name):
            return method(self, collection_name, *args, **kwargs)

    return wrapped


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class Engine:
    def __init__(self, config: ServerConfig, registry: PluginRegistry, catalog: Catalog) -> None:
        self.config = config
        self.limits = config.limits
        self.registry = registry
        self.catalog = catalog
        self._stopping = threading.Event()
        self.pixels = PixelBudget(config.limits.max_decoding_pixels)
        self.extraction = Extraction(config)  # decoding, thumbnails and extractor batches
        self.searching = Searching(config, catalog, self.extraction, self.pixels)

    # -- lifecycle ---------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """From now on, streams stop at their next chunk, saying what they stored."""
        self._stopping.set()

    def close(self) -> None:
        """Stop the index thread once no call is running (after the gRPC server has stopped)."""
        self.searching.close()
        self.extraction.close()

    def check_accepting_writes(self) -> None:
        """Unavailable once shutdown has begun: a long upload must not outlive the drain."""
        self._refuse_when_stopping(
            "the server is shutting down; resend the rest to a running server (with the same ids "
            "and skip_existing, anything already stored is left as it is)"
        )

    def _refuse_when_stopping(self, message: str) -> None:
        if self._stopping.is_set():
            raise Unavailable(message, reason="SHUTTING_DOWN")

    def _postpone_training_when_stopping(self) -> None:
        """An add's IVF training, which runs after its commit, is put off once shutdown has begun:
        the stop must not wait for a k-means that can take minutes (the next add trains)."""
        if self._stopping.is_set():
            raise TrainingPostponed("the server is stopping")

    def _training_still_wanted(self) -> None:
        """Unavailable once shutdown has begun: a training stops at its next step, uncommitted."""
        self._refuse_when_stopping(
            "the server is shutting down, so the training was abandoned and nothing changed; "
            "run it again on the restarted server"
        )

    # -- validation helpers -------------------------------------------------------------
    def _prepare(
        self,
        item: ImageItem,
        image_id: str,
        prefix: str,
        collection: Collection,
        min_side: int | None,
        vector: np.ndarray | InvalidArgument | None,
        decoding: Future[tuple[DecodedImage, bytes]] | None = None,
    ) -> tuple[NewImage, np.ndarray | None]:
        """Validate one image; decode it and make its thumbnail (or take what ``decoding``, started
        ahead, made). Returns the row (vector still missing for decoded images) and the decoded
        pixels (None for a precomputed vector, which ``item_checks.check_vectors`` has already checked with
        the rest of the batch)."""
        check_fields(item, prefix, self.limits)
        common = {
            "id": image_id,
            "label": item.label,
            "metadata": dict(item.metadata) if item.metadata else {},
        }
        if item.content is not None and item.vector is not None:
            raise InvalidArgument("give content or vector, not both", field=prefix, reason="BAD_SOURCE")
        if isinstance(vector, InvalidArgument):
            raise vector
        if vector is not None:
            if collection.spec.trainable:  # a trainable extractor re-encodes what it stores
                raise InvalidArgument(
                    f"collection {collection.spec.name!r} encodes {collection.spec.local_features} local "
                    "features, which a vector does not carry (TrainCollection re-encodes every image from "
                    "them): add the image itself",
                    field=f"{prefix}.vector",
                    reason="VECTOR_NOT_ACCEPTED",
                )
            return NewImage(vector=vector, **common), None
        if item.content is None:
            raise InvalidArgument("image has neither content nor vector", field=prefix, reason="NO_SOURCE")
        image, thumbnail = (
            decoding.result() if decoding else self.extraction.decode(item.content, prefix, min_side)
        )
        row = NewImage(
            vector=np.empty(0, np.float32),
            thumbnail=thumbnail,
            original=item.content if collection.spec.store_originals else None,
            width=image.width,
            height=image.height,
            **common,
        )
        return row, image.pixels

    # -- add -----------------------------------------------------------------------------
    @_reports_store_damage
    def add_images(
        self,
        collection_name: str,
        items: Sequence[ImageItem],
        *,
        skip_invalid: bool = False,
        skip_existing: bool = False,
        deadline: float | None = None,
        index_offset: int = 0,
        before_storing: Callable[[], None] | None = None,
        after_storing: Callable[[], None] | None = None,
        pinned: Collection | None = None,
    ) -> AddOutcome:
        """Validate, decode, extract and store a batch. ``before_storing`` runs right before the rows
        are stored, ``after_storing`` once they are committed (neither when no row is left);
        ``before_storing`` may wait, or raise to store nothing: a stream validates its next chunk
        while this one commits, and stores it only after this one (``streams.ChunkTurn``).
        ``pinned``: the collection a stream began with; NOT_FOUND if the name now holds another
        (deleted and created again since: its chunks must not go on into the new one)."""
        collection = self.catalog.get(collection_name)
        if pinned is not None and collection is not pinned:
            raise NotFound(f"collection {pinned.spec.name!r} was deleted", reason="COLLECTION_NOT_FOUND")
        collection.check_serving()
        if not items:
            raise InvalidArgument("no images in the request", field="images", reason="EMPTY_BATCH")
        if len(items) > self.limits.max_batch_size:
            raise ResourceExhausted(
                f"batch has {len(items)} images; the limit is {self.limits.max_batch_size}: split it "
                "(a stream's chunks too; the Python client's add_files does it by itself)",
                field="images",
                reason="BATCH_TOO_LARGE",
                metadata={"limit": str(self.limits.max_batch_size), "value": str(len(items))},
            )
        errors: dict[int, ImageSearchError] = {}
        rows: dict[int, NewImage] = {}
        decoded: dict[int, np.ndarray] = {}
        ids = [item.id or uuid.uuid4().hex for item in items]
        seen: dict[str, int] = {}
        min_side = self.extraction.min_side(collection)

        def fail(position: int, error: ImageSearchError) -> None:
            error.message = f"images[{position + index_offset}]: {error.message}"
            if not skip_invalid:
                raise error
            errors[position] = error

        decoding = check_batch_pixels((item.content for item in items), min_side, "images", self.limits)
        with self.pixels.hold(decoding):  # all calls together stay within max_decoding_pixels
            if any(item.content is not None for item in items):
                collection.check_extractor()  # FAILED_PRECONDITION before decoding anything
                collection.local_features  # noqa: B018  (raises when the server cannot extract them)
            existing = collection.existing_ids([item.id for item in items if item.id])
            kept: dict[int, ImageSearchError] = {}  # already stored, left as they are (skip_existing)
            given = [p for p, item in enumerate(items) if item.vector is not None and item.content is None]
            checked = check_vectors(
                [items[p].vector for p in given],
                collection,
                [f"images[{p + index_offset}].vector" for p in given],
                stored=True,
            )
            vectors = dict(zip(given, checked, strict=True))
            with self.extraction.decoding_ahead(items, ids, existing, index_offset, min_side) as decodings:
                for position, item in enumerate(items):
                    prefix = f"images[{position + index_offset}]"
                    try:
                        if ids[position] in seen:
                            raise AlreadyExists(
                                f"id {shown(ids[position])} appears twice in the batch (also at index "
                                f"{seen[ids[position]] + index_offset})",
                                field=f"{prefix}.id",
                                reason="DUPLICATE_ID",
                            )
                        seen[ids[position]] = position
                        if ids[position] in existing:
                            error = _already_stored(ids[position], collection, prefix)
                            if not skip_existing:
                                raise error
                            kept[position] = _left_as_it_is(error, prefix)
                            continue
                        rows[position], pixels = self._prepare(
                            item,
                            ids[position],
                            prefix,
                            collection,
                            min_side,
                            vectors.get(position),
                            decodings.get(position),
                        )
                        if pixels is not None:
                            decoded[position] = pixels
                    except ImageSearchError as error:
                        fail(position, error)
            check_deadline(deadline, "feature extraction")
            notes: dict[int, str] = {}
            if collection.spec.local_features:  # as the keypoint-less image's note below says
                for position in (p for p in given if p in rows):
                    notes[position] = (
                        f"added as a vector, without {collection.spec.local_features} local features: "
                        "stored, but geometric re-ranking cannot confirm it"
                    )
            if decoded:
                positions = list(decoded)
                vectors, features, version = self.extraction.vectors(
                    collection, [decoded[p] for p in positions]
                )
                local = collection.local_features
                for at, (position, vector) in enumerate(zip(positions, vectors, strict=True)):
                    found = features[at] if features is not None else None
                    rows[position] = dataclasses.replace(
                        rows[position], vector=vector, local=found, encoded_with=version
                    )
                    if local is not None and found is not None and checked_count(local, found) == 0:
                        notes[position] = (
                            f"no {local.name} keypoints found (flat or tiny image): stored, but geometric "
                            "re-ranking cannot confirm it"
                            + (
                                " and its vector is zero"
                                if isinstance(collection.extractor, TrainableExtractor)
                                else ""
                            )
                        )
            decoded.clear()  # the pixels are extracted: their budget goes back before storing
        # Outside the budget: a stream's chunk may wait here for the one before it, which may
        # itself be waiting for pixels (streams.ChunkTurn).
        check_deadline(deadline, "storing the batch")
        if rows:
            stored = sorted(rows)
            row_ids = collection.add(
                [rows[p] for p in stored],
                skip_existing=skip_existing,
                before_storing=before_storing,
                after_storing=after_storing,
                # Again once the writer lock is held: an add may wait there behind others' commits
                # (an outside test: adds stored up to 1.2 s after their deadline had passed).
                before_commit=functools.partial(check_deadline, deadline, "storing the batch"),
                training_wanted=self._postpone_training_when_stopping,
            )
            for position, row_id in zip(stored, row_ids, strict=True):
                if row_id == SKIPPED:  # another call stored this id after the check above
                    prefix = f"images[{position + index_offset}]"
                    kept[position] = _left_as_it_is(
                        _already_stored(ids[position], collection, prefix), prefix
                    )
        results = [
            ItemResult.failed(p + index_offset, "", errors[p])
            if p in errors
            else ItemResult.failed(p + index_offset, ids[p], kept[p])
            if p in kept
            else ItemResult(p + index_offset, ids[p], note=notes.get(p, ""))
            for p in range(len(items))
        ]
        return AddOutcome([r.id for r in results], results)

    # -- search (searching.py) ----------------------------------------------------------------
    def search(self, query: SearchQuery, deadline: float | None = None) -> SearchOutcome:
        return self.searching.search(query, deadline)

    def search_batch(
        self, queries: Sequence[SearchQuery], deadline: float | None = None
    ) -> list[SearchOutcome | ImageSearchError]:
        return self.searching.search_batch(queries, deadline)

    async def search_async(self, query: SearchQuery, deadline: float | None = None) -> SearchOutcome:
        return await self.searching.search_async(query, deadline)

    def classify(self, query: ClassifyQuery, deadline: float | None = None) -> Classification:
        return self.searching.classify(query, deadline)

    # -- the rest ---------------------------------------------------------------------------
    @_reports_store_damage
    def remove_images(
        self, collection_name: str, ids: Sequence[str], allow_missing: bool, deadline: float | None = None
    ) -> int:
        collection = self.catalog.get(collection_name)
        collection.check_serving()
        if not ids:
            raise InvalidArgument("no ids given", field="ids", reason="EMPTY_BATCH")
        if not allow_missing:
            missing = sorted(set(ids) - collection.existing_ids(list(ids)))
            if missing:
                listed = ", ".join(shown(m) for m in missing[:5])
                raise NotFound(
                    f"{len(missing)} id(s) not in collection {collection.spec.name!r}: {listed}"
                    " (nothing removed; set allow_missing to ignore them)",
                    field="ids",
                    reason="IMAGE_NOT_FOUND",
                )
        check_deadline(deadline, "removing the images")
        return collection.remove(
            list(dict.fromkeys(ids)),
            before_commit=functools.partial(check_deadline, deadline, "removing the images"),
        )

    @_reports_store_damage
    def get_image(
        self, collection_name: str, image_id: str, with_original: bool, with_vector: bool
    ) -> ImageRow:
        if not image_id:
            raise InvalidArgument("id is required", field="id", reason="BAD_ID")
        return self.catalog.get(collection_name).get(
            image_id, with_original=with_original, with_vector=with_vector
        )

    def _page_size(self, page_size: int) -> int:
        if page_size < 0:
            raise InvalidArgument("page_size must be >= 0", field="page_size", reason="BAD_PAGE_SIZE")
        return min(page_size or self.limits.default_page_size, self.limits.max_page_size)

    @_reports_store_damage
    def list_images(
        self, collection_name: str, page_size: int, page_token: str, label: str
    ) -> tuple[list[ImageRow], str, int]:
        collection = self.catalog.get(collection_name)
        size = self._page_size(page_size)
        # The store's identity too: a token from a deleted collection must not page a new one of the same name.
        scope = f"images\x00{collection.spec.name}\x00{collection.store.identity}\x00{label}"
        after = decode_page_token(page_token, scope)
        after_row_id = 0 if after is None else row_position(after)
        rows = collection.page(after_row_id, size + 1, label)
        more = len(rows) > size
        rows = rows[:size]
        token = encode_page_token(str(rows[-1].row_id), scope) if more else ""
        return rows, token, collection.count(label)

    # -- collections and plugins -----------------------------------------------------------
    def create_collection(self, wanted: NewCollection, deadline: float | None = None) -> CollectionInfo:
        """Create a collection; an empty extractor means the server's default extractor."""
        self._check_description(wanted.description)
        return self.catalog.create(
            wanted.name,
            extractor=wanted.extractor or self.config.default_extractor,
            metric=wanted.metric,
            index_type=wanted.index_type,
            params=wanted.params,
            store_originals=wanted.store_originals,
            description=wanted.description,
            storage=wanted.storage,
            local_features=wanted.local_features,
            before_commit=functools.partial(check_deadline, deadline, "creating the collection"),
        )

    def _check_description(self, description: str) -> None:
        """Refuse a description over the limit: every ListCollections page carries them all."""
        limit = self.limits.max_description_length
        if len(description) > limit:
            raise InvalidArgument(
                f"description is longer than {limit} characters",
                field="collection.description",
                reason="BAD_DESCRIPTION",
                metadata={"limit": str(limit), "value": str(len(description))},
            )

    def train_collection(self, name: str, model_size: int, seed: int) -> tuple[CollectionInfo, TrainOutcome]:
        """Refit the collection's trainable extractor on its own images and re-encode them all."""
        if not 0 <= seed <= MAX_SEED:
            raise InvalidArgument(
                f"seed is {seed}; it must be between 0 and {MAX_SEED}", field="seed", reason="BAD_SEED"
            )
        started = time.perf_counter()
        collection = self.catalog.get(name, "name")
        self.check_accepting_writes()
        outcome = collection.train(model_size, seed, still_wanted=self._training_still_wanted)
        return collection.info(), dataclasses.replace(outcome, train_ms=_ms(started))

    def get_collection(self, name: str) -> CollectionInfo:
        return self.catalog.get(name, "name").info()

    def delete_collection(self, name: str, deadline: float | None = None) -> None:
        if not name:
            raise InvalidArgument("name is required", field="name", reason="BAD_COLLECTION_NAME")
        check_deadline(deadline, "deleting the collection")
        self.catalog.delete(name)

    def collections(self) -> list[CollectionInfo]:
        """Every serving collection, sorted by name."""
        return [c.info() for c in self.catalog.list()]

    def list_collections(
        self, page_size: int, page_token: str
    ) -> tuple[list[CollectionInfo], str, dict[str, str]]:
        """Collections sorted by name, paginated by name (stable while collections come and go),
        and on the first page those that could not be opened, with why: an operator listing the
        server must see them, apart from the collections whose fields they cannot fill."""
        size = self._page_size(page_size)
        after = decode_page_token(page_token, "collections")
        if after is not None and not NAME_PATTERN.fullmatch(after):
            raise InvalidArgument("page_token is invalid", field="page_token", reason="BAD_PAGE_TOKEN")
        remaining = [c for c in self.catalog.list() if after is None or c.spec.name > after]
        infos: list[CollectionInfo] = []
        taken = 0  # of ``remaining``: a page is filled past collections deleted since the list
        for collection in remaining:
            if len(infos) == size:
                break
            taken += 1
            if (info := _info_unless_deleted(collection)) is not None:
                infos.append(info)
        token = (
            encode_page_token(infos[-1].spec.name, "collections") if infos and taken < len(remaining) else ""
        )
        unavailable = self.catalog.unavailable() if after is None else {}
        return infos, token, unavailable

    def list_plugins(self) -> PluginList:
        """What the plugins registered, and what went wrong loading them."""
        extractors = [
            ExtractorInfo(
                name=name,
                version=r.item.version,
                dim=r.item.dim,
                default_metric=r.item.default_metric,
                description=r.item.description,
                plugin=r.plugin,
                trainable=isinstance(r.item, TrainableExtractor),
                local_features=r.item.local_features if isinstance(r.item, TrainableExtractor) else "",
            )
            for name, r in sorted(self.registry.extractors.items())
        ]
        metrics = [
            MetricInfo(
                name=name,
                version=r.item.version,
                description=r.item.description,
                plugin=r.plugin,
                index_types=tuple(sorted(r.item.index_types)),
            )
            for name, r in sorted(self.registry.metrics.items())
        ]
        local = [
            LocalFeaturesInfo(name, r.item.version, r.item.description, r.plugin)
            for name, r in sorted(self.registry.local_features.items())
        ]
        return PluginList(
            extractors, metrics, tuple(self.registry.problems), local, tuple(self.registry.skipped)
        )


def _info_unless_deleted(collection: Collection) -> CollectionInfo | None:
    """A listed collection's info, or None if it was deleted since the list was taken: a listing
    leaves it out instead of failing for everyone (an outside test: NOT_FOUND for up to a fifth
    of listings while another client created and deleted a collection)."""
    try:
        return collection.info()
    except NotFound:
        return None
