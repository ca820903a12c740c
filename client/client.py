"""The blocking client: one method per API operation, typed results, typed errors.

Request building and response conversion live in ``_requests`` (shared with the
asyncio client); this module only sends calls and maps ``grpc.RpcError`` to
``imagesearch.client.errors``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Self, TypeVar, Unpack

import grpc

from imagesearch.client import _requests as R
from imagesearch.client._base import ClientBase
from imagesearch.client._requests import CallOptions
from imagesearch.client._upload import NOTHING_ADDED, PerFile, Progress, Upload
from imagesearch.client.errors import ImageSearchError, from_rpc_error
from imagesearch.client.types import (
    AddResult,
    Classification,
    CollectionInfo,
    HnswParams,
    ImageItem,
    ImagePage,
    ImageRecord,
    IndexType,
    IvfParams,
    PathLike,
    PluginList,
    Query,
    SearchResult,
    TrainResult,
    VectorLike,
)

T = TypeVar("T")


class ImageSearchClient(ClientBase):
    """A connection to an imagesearch server.

    ``target`` is ``host:port`` (None: ``127.0.0.1:50051``). ``timeout`` (seconds, None
    for none) applies to every call except ``add_files``. ``max_message_bytes`` bounds the
    requests sent (a larger one raises ResourceExhausted naming it, sending nothing) and
    should match the server's limit; responses of any size are accepted (the server
    bounds them by its limits). Pass ``credentials`` for TLS, or instead of
    a target a ready ``channel`` (which the client then does not close; a target or
    credentials given with it raise ValueError). ``metadata`` is sent with every call
    (e.g. an API key). Use it as a context manager, or call ``close()``; a call after
    it raises ValueError. Safe to share between threads.

    Every method also takes the keyword options of ``CallOptions``: ``timeout``,
    ``request_id`` (sent as ``x-request-id``; a fresh uuid4 hex otherwise),
    ``metadata`` and ``wait_for_ready``.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = R.DEFAULT_TIMEOUT,
        max_message_bytes: int = R.DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        metadata: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(
            grpc,
            target,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            credentials=credentials,
            channel=channel,
            metadata=metadata,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel (unless it was passed in); later calls raise ValueError."""
        if self._closing():
            self._channel.close()

    def __enter__(self) -> Self:
        self._check_open()  # a with block on a closed client fails at its start, not at a call
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- sending -----------------------------------------------------------------------------

    def _call(self, rpc: R.Rpc[T], options: CallOptions) -> T:
        kwargs, request_id = self._prepare(options, rpc)
        try:
            response = self._multicallable(rpc.method)(rpc.request, **kwargs)
        except grpc.RpcError as error:
            raise from_rpc_error(error, request_id=request_id) from error
        return rpc.result(response, request_id)

    # -- images ------------------------------------------------------------------------------

    def add_images(
        self,
        items: Iterable[ImageItem | PathLike],
        *,
        collection: str | None = None,
        skip_invalid: bool = False,
        skip_existing: bool = False,
        **options: Unpack[CallOptions],
    ) -> AddResult:
        """Add a batch of images in one call (at most the server's max batch size, 256 by default).

        Each item is an ``ImageItem`` (encoded ``content`` or a ``vector``) or a file
        path (read now; the server assigns the id). All-or-nothing: one bad image
        raises ``InvalidArgument`` naming it and nothing is stored — unless
        ``skip_invalid``, which stores the good ones and reports the bad ones in
        ``AddResult.results`` / ``AddResult.failed``. ``skip_existing``: an item whose id is
        already stored is left as it is and reported with code ALREADY_EXISTS instead of
        failing the batch (what makes a retry with your own ids idempotent).
        """
        return self._call(R.add_images(items, collection, skip_invalid, skip_existing), options)

    def add_files(
        self,
        paths: Iterable[PathLike],
        *,
        labels: PerFile = None,
        ids: PerFile = None,
        collection: str | None = None,
        skip_invalid: bool = False,
        skip_existing: bool = False,
        batch_size: int = 32,
        progress: Progress | None = None,
        **options: Unpack[CallOptions],
    ) -> AddResult:
        """Upload image files of any number through one AddImagesStream call.

        Files are read lazily and sent in chunks of at most ``batch_size`` images
        that stay below ``max_message_bytes``; the server commits each chunk as
        it arrives. ``labels`` / ``ids``: a list parallel to ``paths`` or a function
        of the path (``labels=lambda p: p.parent.name`` for folder-per-class). Without
        ``ids`` each file gets a fresh random id before anything is sent, and the upload
        runs with ``skip_existing``; if it fails, the error's ``upload_ids`` and
        ``details.stored`` say what it planned and what was stored, and
        ``add_files(paths, ids=error.upload_ids, skip_existing=True)`` finishes it, storing
        each image once. Every exception raised once the upload started carries ``upload_ids``,
        a KeyboardInterrupt too (then the call is cancelled; its type is kept). Each image's
        metadata records its ``path``.
        ``progress(sent, total)`` is called after each chunk is handed to gRPC.
        No default deadline applies (pass ``timeout=`` to set one). A file that
        is missing or too large fails before anything is sent.
        """
        kwargs, request_id = self._prepare(options, deadline=False)
        upload: Upload | None = self._upload(
            paths, labels, ids, collection, skip_invalid, skip_existing, batch_size, progress
        )
        while upload is not None:  # again within the limits a server names (each retry lowers one)
            if not upload.total:
                return NOTHING_ADDED
            # A future, not a blocking call: a Ctrl-C must be able to cancel the call, which a
            # blocking call leaves with its sending thread stuck.
            call = self._multicallable(R.ADD_IMAGES_STREAM).future(iter(upload), **kwargs)
            try:
                response = call.result()
            except grpc.RpcError as error:
                failure = upload.call_failed(error, request_id)
                upload = upload.in_smaller_chunks(failure)
                if upload is None:
                    raise failure from error
            except BaseException as error:  # Ctrl-C: stop sending; the same exception, carrying the ids
                call.cancel()
                upload.interrupted(error)
                raise
            else:
                return upload.result(response)
        raise AssertionError("unreachable: the loop returns or raises")

    def search(
        self,
        image: bytes | PathLike | None = None,
        *,
        image_id: str | None = None,
        vector: VectorLike | None = None,
        top_k: int = 0,
        labels: Iterable[str] | None = (),
        metric: str | None = None,
        exclude_query: bool = False,
        extractor: str | None = None,
        collection: str | None = None,
        mode: str | None = None,
        rerank: int = 0,
        extractor_version: str | None = None,
        **options: Unpack[CallOptions],
    ) -> SearchResult:
        """Find the ``top_k`` images most similar to one query, best first (0: the server's
        default, 10 unless its operator changed it).

        The query is exactly one of: ``image`` (encoded bytes, or a file path),
        ``image_id`` (an image already in the collection; ``exclude_query`` drops it
        from the hits) or ``vector``. ``labels`` restricts hits to those labels;
        ``metric`` overrides the collection's (flat indexes only); ``extractor``, when
        given, makes the search fail with ``FailedPrecondition`` if the collection
        was built with another extractor. ``mode="bucketed"`` first recognises the query's class
        (a vote of its nearest images' labels) and ranks only that class's images; the result's
        ``predicted_label`` and ``label_confidence`` say which class and how sure.
        ``rerank=N`` verifies the best N first-stage candidates geometrically (local features
        matched, RANSAC) and orders them by verified inliers (``hit.inliers``): for finding the
        same object or scene; the collection must keep local features. ``extractor_version``
        guards a ``vector`` query: it fails with ``FailedPrecondition`` if the collection now
        encodes with another version (after ``train_collection``).
        """
        rpc = R.search(
            image,
            image_id=image_id,
            vector=vector,
            top_k=top_k,
            labels=labels,
            metric=metric,
            exclude_query=exclude_query,
            extractor=extractor,
            collection=collection,
            mode=mode,
            rerank=rerank,
            extractor_version=extractor_version,
        )
        return self._call(rpc, options)

    def classify(
        self,
        image: bytes | PathLike | None = None,
        *,
        image_id: str | None = None,
        vector: VectorLike | None = None,
        neighbors: int = 0,
        mode: str | None = None,
        exclude_query: bool = False,
        collection: str | None = None,
        **options: Unpack[CallOptions],
    ) -> Classification:
        """Predict the query's class from the collection's labelled images (the query as in
        ``search``). ``mode="knn"`` (default): the ``neighbors`` (0: 10) nearest images (unlabelled ones abstain)
        vote with their similarity; ``"centroid"``: the most similar class mean wins.
        ``exclude_query`` with ``image_id`` leaves the image out of its own vote.
        """
        rpc = R.classify(
            image,
            image_id=image_id,
            vector=vector,
            neighbors=neighbors,
            mode=mode,
            exclude_query=exclude_query,
            collection=collection,
        )
        return self._call(rpc, options)

    def search_batch(
        self, queries: Iterable[Query], **options: Unpack[CallOptions]
    ) -> list[SearchResult | ImageSearchError]:
        """Run many searches in one call, in order; they share the server's batched index and
        extractor calls. Each query succeeds or fails on its own: a failed one is *returned* as
        the exception a lone ``search`` would have raised, so one bad query costs only itself.
        """
        return self._call(R.search_batch(queries), options)

    def remove_images(
        self,
        ids: Iterable[str],
        *,
        collection: str | None = None,
        allow_missing: bool = False,
        **options: Unpack[CallOptions],
    ) -> int:
        """Remove images by id; return how many were removed. Unknown ids raise ``NotFound`` unless ``allow_missing``."""
        return self._call(R.remove_images(ids, collection, allow_missing), options)

    def get_image(
        self,
        image_id: str,
        *,
        collection: str | None = None,
        include_original: bool = False,
        include_vector: bool = False,
        **options: Unpack[CallOptions],
    ) -> ImageRecord:
        """One image's record with its thumbnail; optionally the original bytes and the feature vector."""
        return self._call(R.get_image(image_id, collection, include_original, include_vector), options)

    def list_images(
        self,
        *,
        collection: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        label: str | None = None,
        **options: Unpack[CallOptions],
    ) -> ImagePage:
        """One page of a collection's images in insertion order (no thumbnails; use ``get_image``).

        ``page_size`` 0 means the server default (100). Pass the page's
        ``next_page_token`` to get the next one; ``iter_images`` does that for you.
        """
        return self._call(R.list_images(collection, page_size, page_token, label), options)

    def iter_images(
        self,
        *,
        collection: str | None = None,
        label: str | None = None,
        page_size: int = 0,
        **options: Unpack[CallOptions],
    ) -> Iterator[ImageRecord]:
        """Every image of a collection (optionally of one label), fetching pages as needed."""
        token = ""
        while True:
            page = self.list_images(
                collection=collection, page_size=page_size, page_token=token, label=label, **options
            )
            yield from page.images
            token = page.next_page_token
            if not token:
                return

    # -- collections -------------------------------------------------------------------------

    def create_collection(
        self,
        name: str,
        *,
        extractor: str | None = None,
        metric: str | None = None,
        index_type: IndexType | str = IndexType.FLAT,
        ivf: IvfParams | Mapping[str, int] | None = None,
        hnsw: HnswParams | Mapping[str, int] | None = None,
        store_originals: bool = False,
        description: str = "",
        storage: str | None = None,
        local_features: str | None = None,
        **options: Unpack[CallOptions],
    ) -> CollectionInfo:
        """Create a collection bound to one extractor, one metric and one index type.

        ``extractor`` None: the server's default; ``metric`` None: the extractor's
        default. ``ivf`` / ``hnsw`` (an ``IvfParams`` / ``HnswParams`` or a dict such as
        ``{"nlist": 64}``) only go with the matching ``index_type``. ``store_originals``
        keeps each image's bytes (for download and re-indexing). ``storage="float16"`` makes a flat
        index keep its vectors as float16: half the memory, recall@10 about 0.998; ``"int8"`` (cosine
        collections), a quarter, with hits re-scored exactly from float32 (docs/api.md).
        ``local_features="sift"`` keeps each image's SIFT keypoints too, so searches can re-rank
        by geometry (``search(rerank=50)``); SIFT extractors always keep them.
        """
        rpc = R.create_collection(
            name,
            extractor=extractor,
            metric=metric,
            index_type=index_type,
            ivf=ivf,
            hnsw=hnsw,
            store_originals=store_originals,
            description=description,
            storage=storage,
            local_features=local_features,
        )
        return self._call(rpc, options)

    def get_collection(self, name: str | None = None, **options: Unpack[CallOptions]) -> CollectionInfo:
        """Describe a collection (None: the default collection)."""
        return self._call(R.get_collection(name), options)

    def list_collections(self, **options: Unpack[CallOptions]) -> list[CollectionInfo]:
        """All collections, sorted by name."""
        collections, token = self._call(R.list_collections(), options)
        while token:
            page, token = self._call(R.list_collections(token), options)
            collections += page
        return collections

    def unavailable_collections(self, **options: Unpack[CallOptions]) -> dict[str, str]:
        """Collections on the server's disk that it could not open (a damaged or unwritable store,
        a copied directory, a missing metric plugin), name to reason and what to do; not in
        ``list_collections``. ``delete_collection`` clears one."""
        return self._call(R.unavailable_collections(), options)

    def delete_collection(self, name: str, **options: Unpack[CallOptions]) -> None:
        """Delete a collection and everything stored in it."""
        self._call(R.delete_collection(name), options)

    # -- server ------------------------------------------------------------------------------

    def train_collection(
        self, name: str | None = None, *, model_size: int = 0, seed: int = 0, **options: Unpack[CallOptions]
    ) -> TrainResult:
        """Refit a trainable extractor (a SIFT vocabulary) on the collection's own images and re-encode
        them all; the old model serves until the new one is committed. ``model_size`` 0: the
        extractor's default (e.g. vocabulary words). Raises ``FailedPrecondition`` when the
        extractor is not trainable or there are too few images, ``Aborted`` if a training runs.
        Long on big collections: give a generous ``timeout``."""
        return self._call(R.train_collection(name, model_size, seed), options)

    def list_plugins(self, **options: Unpack[CallOptions]) -> PluginList:
        """The feature extractors, local features and metrics the server has loaded, and plugins that failed."""
        return self._call(R.list_plugins(), options)

    def health(self, service: str = "", **options: Unpack[CallOptions]) -> str:
        """The grpc.health.v1 serving status: "SERVING", "NOT_SERVING", ... ("" asks about the whole server)."""
        return self._call(R.health(service), options)
