"""The asyncio client: the same methods as ``ImageSearchClient``, awaitable, over ``grpc.aio``.

Arguments, defaults, results and errors are identical to the blocking client's
(both build requests and convert responses with ``_requests``); see
``ImageSearchClient`` for each method's documentation. Create and use it inside
one running event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc
import grpc.aio

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


class AsyncImageSearchClient(ClientBase):
    """An asyncio connection to an imagesearch server; see ``ImageSearchClient`` for the arguments.

    Use ``async with AsyncImageSearchClient(...) as client:`` or ``await client.close()``.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = R.DEFAULT_TIMEOUT,
        max_message_bytes: int = R.DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
        metadata: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(
            grpc.aio,
            target,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            credentials=credentials,
            channel=channel,
            metadata=metadata,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channel (unless it was passed in); later calls raise ValueError."""
        if self._closing():
            await self._channel.close()

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- sending -----------------------------------------------------------------------------

    async def _call(self, rpc: R.Rpc[T], options: CallOptions) -> T:
        kwargs, request_id = self._prepare(options, rpc)
        try:
            response = await self._multicallable(rpc.method)(rpc.request, **kwargs)
        except grpc.RpcError as error:
            raise from_rpc_error(error, request_id=request_id) from error
        return rpc.result(response, request_id)

    # -- images ------------------------------------------------------------------------------

    async def add_images(
        self,
        items: Iterable[ImageItem | PathLike],
        *,
        collection: str | None = None,
        skip_invalid: bool = False,
        skip_existing: bool = False,
        **options: Unpack[CallOptions],
    ) -> AddResult:
        """See ``ImageSearchClient.add_images``."""
        return await self._call(R.add_images(items, collection, skip_invalid, skip_existing), options)

    async def add_files(
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
        """See ``ImageSearchClient.add_files``; files are read in a worker thread, off the event loop.
        A cancelled call raises its CancelledError carrying ``upload_ids`` (under ``asyncio.timeout``
        or ``wait_for``, the ``__cause__`` of their TimeoutError)."""
        kwargs, request_id = self._prepare(options, deadline=False)
        upload: Upload | None = self._upload(
            paths, labels, ids, collection, skip_invalid, skip_existing, batch_size, progress
        )
        while upload is not None:  # again within the limits a server names (each retry lowers one)
            if not upload.total:
                return NOTHING_ADDED
            try:
                response = await self._multicallable(R.ADD_IMAGES_STREAM)(_off_loop(iter(upload)), **kwargs)
            except grpc.RpcError as error:
                failure = upload.call_failed(error, request_id)
                upload = upload.in_smaller_chunks(failure)
                if upload is None:
                    raise failure from error
            except BaseException as error:  # a cancelled task (grpc.aio cancels the call): the same
                upload.interrupted(error)  # exception, carrying the ids to finish with
                raise
            else:
                return upload.result(response)
        raise AssertionError("unreachable: the loop returns or raises")

    async def search(
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
        """See ``ImageSearchClient.search``."""
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
        return await self._call(rpc, options)

    async def classify(
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
        """See ``ImageSearchClient.classify``."""
        rpc = R.classify(
            image,
            image_id=image_id,
            vector=vector,
            neighbors=neighbors,
            mode=mode,
            exclude_query=exclude_query,
            collection=collection,
        )
        return await self._call(rpc, options)

    async def search_batch(
        self, queries: Iterable[Query], **options: Unpack[CallOptions]
    ) -> list[SearchResult | ImageSearchError]:
        """See ``ImageSearchClient.search_batch``."""
        return await self._call(R.search_batch(queries), options)

    async def remove_images(
        self,
        ids: Iterable[str],
        *,
        collection: str | None = None,
        allow_missing: bool = False,
        **options: Unpack[CallOptions],
    ) -> int:
        """See ``ImageSearchClient.remove_images``."""
        return await self._call(R.remove_images(ids, collection, allow_missing), options)

    async def get_image(
        self,
        image_id: str,
        *,
        collection: str | None = None,
        include_original: bool = False,
        include_vector: bool = False,
        **options: Unpack[CallOptions],
    ) -> ImageRecord:
        """See ``ImageSearchClient.get_image``."""
        return await self._call(R.get_image(image_id, collection, include_original, include_vector), options)

    async def list_images(
        self,
        *,
        collection: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        label: str | None = None,
        **options: Unpack[CallOptions],
    ) -> ImagePage:
        """See ``ImageSearchClient.list_images``."""
        return await self._call(R.list_images(collection, page_size, page_token, label), options)

    async def iter_images(
        self,
        *,
        collection: str | None = None,
        label: str | None = None,
        page_size: int = 0,
        **options: Unpack[CallOptions],
    ) -> AsyncIterator[ImageRecord]:
        """See ``ImageSearchClient.iter_images``; use with ``async for``."""
        token = ""
        while True:
            page = await self.list_images(
                collection=collection, page_size=page_size, page_token=token, label=label, **options
            )
            for image in page.images:
                yield image
            token = page.next_page_token
            if not token:
                return

    # -- collections -------------------------------------------------------------------------

    async def create_collection(
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
        """See ``ImageSearchClient.create_collection``."""
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
        return await self._call(rpc, options)

    async def get_collection(self, name: str | None = None, **options: Unpack[CallOptions]) -> CollectionInfo:
        """See ``ImageSearchClient.get_collection``."""
        return await self._call(R.get_collection(name), options)

    async def list_collections(self, **options: Unpack[CallOptions]) -> list[CollectionInfo]:
        """See ``ImageSearchClient.list_collections``."""
        collections, token = await self._call(R.list_collections(), options)
        while token:
            page, token = await self._call(R.list_collections(token), options)
            collections += page
        return collections

    async def unavailable_collections(self, **options: Unpack[CallOptions]) -> dict[str, str]:
        """See ``ImageSearchClient.unavailable_collections``."""
        return await self._call(R.unavailable_collections(), options)

    async def delete_collection(self, name: str, **options: Unpack[CallOptions]) -> None:
        """See ``ImageSearchClient.delete_collection``."""
        await self._call(R.delete_collection(name), options)

    # -- server ------------------------------------------------------------------------------

    async def train_collection(
        self, name: str | None = None, *, model_size: int = 0, seed: int = 0, **options: Unpack[CallOptions]
    ) -> TrainResult:
        """See ``ImageSearchClient.train_collection``."""
        return await self._call(R.train_collection(name, model_size, seed), options)

    async def list_plugins(self, **options: Unpack[CallOptions]) -> PluginList:
        """See ``ImageSearchClient.list_plugins``."""
        return await self._call(R.list_plugins(), options)

    async def health(self, service: str = "", **options: Unpack[CallOptions]) -> str:
        """See ``ImageSearchClient.health``."""
        return await self._call(R.health(service), options)


async def _off_loop(chunks: Iterator[Any]) -> AsyncIterator[Any]:
    """Pull each chunk (which reads files) in a worker thread so the event loop stays responsive."""
    done = object()
    while True:
        chunk = await asyncio.to_thread(next, chunks, done)
        if chunk is done:
            return
        yield chunk
