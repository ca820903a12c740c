"""The gRPC servicer: protobuf in, domain call, protobuf out; domain errors to status codes.

Nothing here decides behaviour. Each domain error class maps to exactly one
status code, with google.rpc rich details (BadRequest naming the field for
INVALID_ARGUMENT, ErrorInfo with a stable reason otherwise). Any other
exception is a bug: it is logged with the request id and reported as
INTERNAL, never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from imagesearch.client.types import status_code
from imagesearch.plugins.types import FLAT, HNSW, IVF
from imagesearch.server import errors
from imagesearch.server.classify import BUCKETED, CENTROID, KNN, PLAIN
from imagesearch.server.collection import Collection, CollectionInfo
from imagesearch.server.engine import Engine
from imagesearch.server.records import (
    AddOutcome,
    ClassifyQuery,
    ImageItem,
    NewCollection,
    SearchOutcome,
    SearchQuery,
)
from imagesearch.server.response_size import RESPONSE_FRAMING, max_response_bytes
from imagesearch.server.searching import GEOMETRIC
from imagesearch.server.store import ImageRow
from imagesearch.server.streams import CallLimit, ChunkOrder, ChunkTurn, StreamGuard
from imagesearch.server.vector_index import FLOAT16, FLOAT32, INT8
from imagesearch.server.vector_input import vector_input
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc

log = logging.getLogger("imagesearch.rpc")

ERROR_DOMAIN = "imagesearch.v1"


def status_of(error: errors.ImageSearchError) -> grpc.StatusCode:
    return status_code(error.code)


INDEX_TYPE_TO_PB = {FLAT: pb.INDEX_TYPE_FLAT, IVF: pb.INDEX_TYPE_IVF, HNSW: pb.INDEX_TYPE_HNSW}
INDEX_TYPE_FROM_PB = {pb.INDEX_TYPE_UNSPECIFIED: FLAT, **{v: k for k, v in INDEX_TYPE_TO_PB.items()}}
STORAGE_TO_PB = {
    FLOAT32: pb.VECTOR_STORAGE_FLOAT32,
    FLOAT16: pb.VECTOR_STORAGE_FLOAT16,
    INT8: pb.VECTOR_STORAGE_INT8,
}
STORAGE_FROM_PB = {pb.VECTOR_STORAGE_UNSPECIFIED: "", **{v: k for k, v in STORAGE_TO_PB.items()}}
RERANK_FROM_PB = {pb.RERANK_METHOD_UNSPECIFIED: "", pb.RERANK_METHOD_GEOMETRIC: GEOMETRIC}
SEARCH_MODE_FROM_PB = {
    pb.SEARCH_MODE_UNSPECIFIED: "",
    pb.SEARCH_MODE_PLAIN: PLAIN,
    pb.SEARCH_MODE_BUCKETED: BUCKETED,
}
CLASSIFY_MODE_TO_PB = {KNN: pb.CLASSIFY_MODE_KNN, CENTROID: pb.CLASSIFY_MODE_CENTROID}
CLASSIFY_MODE_FROM_PB = {pb.CLASSIFY_MODE_UNSPECIFIED: "", **{v: k for k, v in CLASSIFY_MODE_TO_PB.items()}}
REQUEST_ID_KEY = "x-request-id"
# A client gives up at its own deadline and cancels the call, a few milliseconds before the
# server's copy of that deadline passes (it started counting when the call arrived): a call
# cancelled this close to its deadline is logged DEADLINE_EXCEEDED (an outside test found 1-5 %
# of such calls logged CANCELLED at 71-80 ms of an 80 ms deadline).
DEADLINE_SLACK_S = 0.02


ADDED_COUNT_KEY = "imagesearch-added-count"
SERVICE = pb.DESCRIPTOR.services_by_name["ImageSearchService"]


class MalformedRequest:
    """What a request that is not a valid protobuf message parses to, so the handler can
    answer INVALID_ARGUMENT (grpc itself would answer INTERNAL, as if it were our bug)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def error(self) -> errors.InvalidArgument:
        return errors.InvalidArgument(
            f"the request is not a valid message: {self.problem}", reason="MALFORMED_REQUEST"
        )


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError: corrupt wire data or invalid UTF-8 in a string
            return MalformedRequest(str(exc))

    return parse_or_mark


def add_to_server(servicer: ImageSearchServicer, server: grpc.aio.Server) -> None:
    """Register every RPC of the service, parsing requests with ``_tolerant``."""
    handlers = {}
    for method in SERVICE.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = (
            grpc.stream_unary_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(request.FromString),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


class StreamFailure(Exception):
    """A domain error that ended a stream, with what the stream had committed before it."""

    def __init__(
        self, error: errors.ImageSearchError, progress: pb.AddImagesStreamResponse, collection: str | None
    ) -> None:
        super().__init__(error.message)
        self.error, self.progress, self.collection = error, progress, collection


def collection_named(request: Any) -> str | None:
    """The collection a unary request is about (``collection``, or ``name`` for the calls on a
    collection itself), for its errors' metadata; None for calls about no one collection."""
    for field in ("collection", "name"):
        value = getattr(request, field, None)
        if isinstance(value, str):
            return value
        if isinstance(value, pb.Collection):
            return value.name
    return None


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rpc_status(
    error: errors.ImageSearchError, extra: tuple[Any, ...] = (), collection: str | None = None
) -> status_pb2.Status:
    """The google.rpc.Status of a domain error: ErrorInfo (reason; metadata with the collection, the
    field and the error's own values such as a limit), BadRequest for a field, then ``extra``."""
    code = status_of(error)
    metadata = {**error.metadata}
    if collection is not None:
        name = (collection or "default")[: errors.SHOWN_CHARS]  # the name, not as a message quotes it
        metadata.setdefault("collection", name)
    if error.field:
        metadata.setdefault("field", error.field)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
    details = [_packed(info)]
    details += [_packed(message) for message in extra]
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(error.retry_after_s * 1e9))
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    return status_pb2.Status(code=code.value[0], message=error.message, details=details)


# A caller's request id longer than this is cut (it goes into every log line of the call); long
# enough for a trace id and a suffix (64 cut such ids without a word: an outside test).
MAX_REQUEST_ID = 256


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)[:MAX_REQUEST_ID]
    return uuid.uuid4().hex


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def cancelled_outcome(remaining_s: float | None) -> str:
    """What a cancelled call is logged as, from the time its deadline had left (None: no deadline)."""
    return "DEADLINE_EXCEEDED" if remaining_s is not None and remaining_s <= DEADLINE_SLACK_S else "CANCELLED"


def _with_request_id(status: grpc.Status, request_id: str) -> grpc.Status:
    """abort_with_status replaces the trailers, so the request id must ride in the status itself."""
    return status._replace(trailing_metadata=(*status.trailing_metadata, (REQUEST_ID_KEY, request_id)))


# What a caller can ask for instead of an answer past the send limit, by RPC ("": any other).
_SMALLER_ANSWER = {
    "Search": "Ask for fewer hits",
    "SearchBatch": "Ask for fewer hits or send fewer queries",
    "ListImages": "Ask for a smaller page",
    "GetImage": "Ask without the original or the vector",
    "": "Ask for less",
}


def _within_send_limit(response: Any, limit: int, rpc_name: str) -> Any:
    """``response``, or RESOURCE_EXHAUSTED if it is past the send limit. The limit covers what
    today's limits let anyone store, but rows stored under higher limits can be larger: gRPC then
    failed the send itself, with its own message, after the access log had said OK (an outside
    test lowered max_metadata_bytes over stored metadata)."""
    size = response.ByteSize() if isinstance(response, Message) else 0
    if size > limit:
        raise errors.ResourceExhausted(
            f"the answer is {size} bytes, past this server's send limit of {limit} (derived from its "
            f"limits; docs/api.md, Message size): what it holds was stored under higher limits. "
            f"{_SMALLER_ANSWER.get(rpc_name, _SMALLER_ANSWER[''])}, or have the operator raise the limits again",
            reason="RESPONSE_TOO_LARGE",
            metadata={"limit": str(limit), "value": str(size)},
        )
    return response


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an async handler: request id, structured access log, error mapping."""

    @functools.wraps(method)
    async def handler(self: ImageSearchServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        request_id = _request_id(context)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        started = time.perf_counter()
        outcome = "OK"
        try:
            if isinstance(request, MalformedRequest):
                raise request.error()
            with self._calls.admit():
                try:
                    return _within_send_limit(
                        await method(self, request, context), self._send_limit, method.__name__
                    )
                except sqlite3.DatabaseError as exc:  # a store damaged while serving: DATA_LOSS, not INTERNAL
                    if not errors.is_corruption(exc):
                        raise
                    raise errors.store_damaged(exc) from exc
        except (errors.ImageSearchError, StreamFailure) as caught:
            error, extra, trailers, named = caught, (), (), collection_named(request)
            if isinstance(caught, StreamFailure):
                error, extra, named = caught.error, (caught.progress,), caught.collection
                trailers = ((ADDED_COUNT_KEY, str(caught.progress.added_count)),)
            outcome = status_of(error).name
            if isinstance(error, errors.Internal):
                log.error(
                    "internal error", extra={"request_id": request_id, "rpc": method.__name__}, exc_info=True
                )
            message = to_rpc_status(error, extra, named)
            if isinstance(error, errors.Internal):  # the id finds the log line (docs/api.md)
                message.message = f"{message.message}; request id {request_id}"
            status = rpc_status.to_status(message)
            status = status._replace(trailing_metadata=(*status.trailing_metadata, *trailers))
            await context.abort_with_status(_with_request_id(status, request_id))
        except asyncio.CancelledError:  # the client went away, or its deadline passed (gRPC cancels then too)
            outcome = cancelled_outcome(context.time_remaining())
            raise
        except Exception as exc:  # a bug: report INTERNAL with the request id, never UNKNOWN
            outcome = "INTERNAL"
            log.exception("unhandled error", extra={"request_id": request_id, "rpc": method.__name__})
            status = status_pb2.Status(
                code=code_pb2.INTERNAL,
                message=f"internal error ({type(exc).__name__}); request id {request_id}",
                details=[_packed(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))],
            )
            await context.abort_with_status(_with_request_id(rpc_status.to_status(status), request_id))
        finally:
            if log.isEnabledFor(logging.INFO):  # else not even the record's fields are made
                log.info(
                    "rpc",
                    extra={
                        "request_id": request_id,
                        "rpc": method.__name__,
                        "status": outcome,
                        "ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )

    return handler


# -- conversions ---------------------------------------------------------------------------
def image_item(message: pb.ImageInput) -> ImageItem:
    source = message.WhichOneof("source")
    vector = None
    if source == "vector":
        given = message.vector
        vector = vector_input(given.values, given.float32_le)
    return ImageItem(
        id=message.id,
        content=message.content if source == "content" else None,
        vector=vector,
        label=message.label,
        metadata=dict(message.metadata) if message.metadata else {},
    )


def add_outcome(response: pb.AddImagesResponse | pb.AddImagesStreamResponse, outcome: AddOutcome) -> None:
    """Append a batch's ids, per-image results and count to ``response``. Results are added in
    place, a stored image's with its index and id only (its other fields are their defaults, and
    proto3 sends a default as if unset): a third of the time of building each and copying it in."""
    response.ids.extend(outcome.ids)
    add = response.results.add
    for r in outcome.results:
        if r.code == code_pb2.OK and not r.note:
            add(index=r.index, id=r.id)
        else:
            add(
                index=r.index,
                id=r.id,
                code=r.code,
                message=r.message,
                reason=r.reason,
                field=r.field,
                note=r.note,
            )
    response.added_count += outcome.added_count


def _timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(unix_seconds * 1e9))
    return stamp


def image_message(row: ImageRow, *, full: bool) -> pb.Image:
    message = pb.Image(
        id=row.id,
        label=row.label,
        metadata=row.metadata,
        width=row.width,
        height=row.height,
        create_time=_timestamp(row.created),
    )
    if full:
        if row.thumbnail:
            message.thumbnail = row.thumbnail
        if row.original:
            message.original = row.original
        if row.vector is not None:
            message.vector.values.extend(row.vector.tolist())
    return message


def collection_message(info: CollectionInfo) -> pb.Collection:
    spec = info.spec
    return pb.Collection(
        name=spec.name,
        extractor=spec.extractor,
        extractor_version=spec.extractor_version,
        metric=spec.metric,
        index_type=INDEX_TYPE_TO_PB[spec.index_type],
        ivf=pb.IvfParams(nlist=spec.nlist, nprobe=spec.nprobe, train_size=spec.train_size)
        if spec.index_type == IVF
        else None,
        hnsw=pb.HnswParams(m=spec.hnsw_m, ef_construction=spec.ef_construction, ef_search=spec.ef_search)
        if spec.index_type == HNSW
        else None,
        dimension=spec.dim,
        image_count=info.image_count,
        store_originals=spec.store_originals,
        storage=STORAGE_TO_PB[spec.storage],
        index_bytes=info.index_bytes,
        local_features=spec.local_features,
        local_features_bytes=info.local_features_bytes,
        description=spec.description,
        create_time=_timestamp(spec.created),
        index_trained=info.index_trained,
        state=pb.COLLECTION_STATE_READ_ONLY if info.read_only else pb.COLLECTION_STATE_READY,
        state_reason=info.state_reason,
    )


def query_source(request: pb.SearchRequest | pb.ClassifyRequest) -> dict[str, Any]:
    """The ``query`` oneof as the engine's image / image_id / vector (the unset ones None)."""
    kind = request.WhichOneof("query")
    return {
        "image": request.image if kind == "image" else None,
        "image_id": request.image_id if kind == "image_id" else None,
        "vector": vector_input(request.vector.values, request.vector.float32_le)
        if kind == "vector"
        else None,
    }


# A Search whose label filter lists more than this is read on a worker, not on the event loop:
# 1.5 million labels held the loop, and every health check, for 0.6 s (an outside test).
LOOP_MAX_LABELS = 64


def search_query(request: pb.SearchRequest) -> SearchQuery:
    return SearchQuery(
        collection=request.collection,
        **query_source(request),
        top_k=request.top_k,
        labels=list(request.labels),
        metric=request.metric,
        exclude_query=request.exclude_query,
        extractor=request.extractor,
        mode=SEARCH_MODE_FROM_PB.get(request.mode, str(request.mode)),
        rerank=RERANK_FROM_PB.get(request.rerank.method, str(request.rerank.method)),
        rerank_candidates=request.rerank.candidates,
        extractor_version=request.extractor_version,
    )


def classify_query(request: pb.ClassifyRequest) -> ClassifyQuery:
    return ClassifyQuery(
        collection=request.collection,
        **query_source(request),
        neighbors=request.neighbors,
        mode=CLASSIFY_MODE_FROM_PB.get(request.mode, str(request.mode)),
        exclude_query=request.exclude_query,
    )


def search_response(outcome: SearchOutcome) -> pb.SearchResponse:
    """Hits added in place, metadata only where there is some: a third of the time of building
    each hit apart and copying it in (on the event loop, once per search)."""
    timings = outcome.timings
    response = pb.SearchResponse(
        timings=pb.StageTimings(
            decode_ms=timings.decode_ms,
            extract_ms=timings.extract_ms,
            search_ms=timings.search_ms,
            total_ms=timings.total_ms,
            rerank_ms=timings.rerank_ms,
        ),
        metric=outcome.metric,
        predicted_label=outcome.predicted.label if outcome.predicted else "",
        label_confidence=outcome.predicted.confidence if outcome.predicted else 0.0,
    )
    add = response.hits.add
    for h in outcome.hits:
        hit = add(id=h.id, score=h.score, distance=h.distance, label=h.label, inliers=h.inliers)
        if h.metadata:
            hit.metadata.update(h.metadata)
    return response


def batch_result(outcome: SearchOutcome | errors.ImageSearchError) -> pb.SearchBatchResult:
    if isinstance(outcome, errors.ImageSearchError):
        return pb.SearchBatchResult(
            code=outcome.code, message=outcome.message, reason=outcome.reason, field=outcome.field or ""
        )
    return pb.SearchBatchResult(response=search_response(outcome))


BATCH_RESULT_RESERVE = 1024  # room kept for each result, enough for one refused as too large


def fit_batch_results(results: list[pb.SearchBatchResult], limit: int) -> list[pb.SearchBatchResult]:
    """The results in order, each one that would take the response past ``limit`` bytes replaced
    by a RESOURCE_EXHAUSTED result: every query fits in a response alone, a batch of them may not."""
    budget = limit - RESPONSE_FRAMING - len(results) * BATCH_RESULT_RESERVE
    fitted = []
    for position, result in enumerate(results):
        budget += BATCH_RESULT_RESERVE
        if result.ByteSize() > budget:
            result = batch_result(_too_large_for_batch(position, limit))
        budget -= result.ByteSize()
        fitted.append(result)
    return fitted


def _too_large_for_batch(position: int, limit: int) -> errors.ResourceExhausted:
    return errors.ResourceExhausted(
        f"queries[{position}]: its hits do not fit in this batch's response ({limit} bytes at most "
        "for all queries together); send it alone or in a smaller batch",
        field=f"queries[{position}]",
        reason="RESPONSE_TOO_LARGE",
    )


# Chunks of one AddImagesStream being stored at once: one committing, the next being validated and
# extracted meanwhile (more would only hold more memory: commits happen one at a time).
STREAM_CHUNKS_IN_FLIGHT = 2


@dataclass
class _StreamChunk:
    number: int  # 1 for the stream's first message
    task: asyncio.Future[AddOutcome]
    turn: ChunkTurn
    ids: set[str]


class _ChunkFailed(Exception):
    def __init__(self, number: int, error: errors.ImageSearchError) -> None:
        super().__init__(error.message)
        self.number, self.error = number, error


# Bytes of AddImagesStreamResponse a failed stream's status may carry. The status travels in the
# trailing metadata, base64-encoded, and gRPC clients refuse metadata past 8 KiB (soft) to 16 KiB
# (hard) by default: about 650 stored ids already passed it, and the client got RESOURCE_EXHAUSTED
# without a word of what was stored.
STATUS_PROGRESS_BYTES = 4096


def status_progress(response: pb.AddImagesStreamResponse) -> pb.AddImagesStreamResponse:
    """What a failed stream's status says it stored: all of ``response`` when that fits in
    STATUS_PROGRESS_BYTES; else its counts and the images not stored (``stored_ids_omitted``), as
    many as fit, every other image of the chunks before the failed one being stored."""
    if response.ByteSize() <= STATUS_PROGRESS_BYTES:
        return response
    slim = pb.AddImagesStreamResponse(
        added_count=response.added_count, chunk_count=response.chunk_count, stored_ids_omitted=True
    )
    for image_id, result in zip(response.ids, response.results, strict=True):
        if result.code == code_pb2.OK:
            continue
        if slim.ByteSize() + len(image_id) + result.ByteSize() + 8 > STATUS_PROGRESS_BYTES:
            break
        slim.ids.append(image_id)
        slim.results.append(result)
    return slim


async def _settle(chunk: _StreamChunk, response: pb.AddImagesStreamResponse) -> None:
    """Wait for a chunk's outcome and add it to the stream's response, or fail the stream with it."""
    try:
        outcome = await chunk.task
    except errors.ImageSearchError as error:
        raise _ChunkFailed(chunk.number, error) from error
    add_outcome(response, outcome)


async def _given_up(order: ChunkOrder, chunks: deque[_StreamChunk]) -> None:
    """At the stream's end, or after a failure (or the client going away): chunks not yet stored
    never will be, and the stream's status goes out only once they have given up, so it says all
    that was stored."""
    order.give_up()
    if chunks:
        await asyncio.gather(*(c.task for c in chunks), return_exceptions=True)


class ImageSearchServicer(pb_grpc.ImageSearchServiceServicer):
    """Every handler is a coroutine: waiting for a slow client or an idle stream holds no thread.
    Engine calls (decoding, extraction, FAISS, SQLite) run on the ``workers`` pool; the cheap
    reads on their own small pool, so they answer promptly while heavy work queues."""

    def __init__(self, engine: Engine, workers: Executor, reads: Executor, streams: StreamGuard) -> None:
        self.engine = engine
        self._workers, self._reads, self._streams = workers, reads, streams
        self._calls = CallLimit(engine.limits.max_concurrent_rpcs)  # health and reflection are not counted
        self._send_limit = max_response_bytes(engine.limits)  # the server's grpc.max_send_message_length

    async def _work(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._workers, functools.partial(call, *args, **kwargs)
        )

    async def _read(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._reads, functools.partial(call, *args))

    @rpc
    async def AddImages(
        self, request: pb.AddImagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddImagesResponse:
        outcome = await self._add(
            request.collection,
            request.images,
            skip_invalid=request.skip_invalid,
            skip_existing=request.skip_existing,
            deadline=_deadline(context),
        )
        response = pb.AddImagesResponse()
        add_outcome(response, outcome)
        return response

    async def _add(
        self,
        collection: str,
        images: Sequence[pb.ImageInput],
        turn: ChunkTurn | None = None,
        **options: Any,
    ) -> AddOutcome:
        """One batch of images, read from protobuf and stored on a worker thread: reading 256
        vectors takes about a millisecond (bench/bench_ingest_stages.py), which the event loop,
        answering health and cheap reads, should not spend. A stream's chunk stores in its ``turn``."""

        def add() -> AddOutcome:
            if turn is None:
                return self.engine.add_images(collection, [image_item(m) for m in images], **options)
            try:
                items = [image_item(m) for m in images]
                outcome = self.engine.add_images(
                    collection, items, before_storing=turn.wait, after_storing=turn.stored, **options
                )
            except BaseException:
                turn.finish(succeeded=False)
                raise
            turn.finish(succeeded=True)
            return outcome

        return await self._work(add)

    @rpc
    async def AddImagesStream(
        self, request_iterator: AsyncIterator[pb.AddImagesStreamRequest], context: grpc.aio.ServicerContext
    ) -> pb.AddImagesStreamResponse:
        """Chunks are stored one after the other, as they came; the next chunk is read, validated
        and extracted while the one before it commits (``ChunkOrder``), unless it repeats one of its
        ids (its check for stored ids must see that chunk's)."""
        response = pb.AddImagesStreamResponse()
        first: pb.AddImagesStreamRequest | None = None
        pinned: Collection | None = None
        in_flight: deque[_StreamChunk] = deque()
        order = ChunkOrder()
        # Chunks read; the chunk being read (what a failure is about); images in the chunks started.
        received = reading = stored_up_to = 0
        try:
            with self._streams.admit(context.peer()):
                try:
                    while True:
                        reading = received + 1  # the chunk a failure below is about
                        chunk = await self._streams.next_chunk(context)
                        if chunk is None:
                            break
                        received = reading
                        if isinstance(chunk, MalformedRequest):
                            raise chunk.error()
                        first = first or chunk
                        self.engine.check_accepting_writes()
                        if not chunk.images:
                            continue
                        if pinned is None:  # the stream adds to this collection, whatever is made under
                            pinned = self.engine.catalog.get(first.collection)  # its name later
                        ids = {image.id for image in chunk.images if image.id}
                        while in_flight and (
                            len(in_flight) >= STREAM_CHUNKS_IN_FLIGHT or any(ids & c.ids for c in in_flight)
                        ):
                            await _settle(in_flight.popleft(), response)
                        turn = order.turn()
                        task = asyncio.ensure_future(
                            self._add(
                                first.collection,
                                chunk.images,
                                skip_invalid=first.skip_invalid,
                                skip_existing=first.skip_existing,
                                deadline=_deadline(context),
                                index_offset=stored_up_to,
                                turn=turn,
                                pinned=pinned,
                            )
                        )
                        in_flight.append(_StreamChunk(received, task, turn, ids))
                        stored_up_to += len(chunk.images)
                except errors.ImageSearchError as error:  # reading or admitting chunk `reading` failed
                    while in_flight:  # the chunks before it are stored (or fail) first
                        await _settle(in_flight.popleft(), response)
                    raise _ChunkFailed(reading, error) from error
                while in_flight:
                    await _settle(in_flight.popleft(), response)
        except _ChunkFailed as failed:
            error = failed.error
            response.chunk_count = min(failed.number, received)  # an idle stream fails before its next chunk
            progress = status_progress(response)
            refused = sum(1 for result in response.results if result.code != code_pb2.OK)
            listed = (
                "their ids are in this status's AddImagesStreamResponse detail"
                if not progress.stored_ids_omitted
                else f"too many to list here: the detail lists {len(progress.results)} of the {refused} "
                "images not stored, and every other image of those chunks is stored"
            )
            error.message = f"chunk {failed.number}: {error.message} ({response.added_count} images from earlier chunks were stored; {listed})"
            raise StreamFailure(error, progress, first.collection if first is not None else None) from error
        finally:
            await _given_up(order, in_flight)
        response.chunk_count = received
        return response

    @rpc
    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        deadline = _deadline(context)
        if len(request.labels) > LOOP_MAX_LABELS:  # read and checked on a worker, as SearchBatch's
            outcome = await self._work(lambda: self.engine.search(search_query(request), deadline=deadline))
            return search_response(outcome)
        query = search_query(request)
        if self.engine.searching.searches_on_loop(query):
            outcome = await self.engine.search_async(query, deadline=deadline)
        else:
            outcome = await self._work(self.engine.search, query, deadline=deadline)
        return search_response(outcome)

    @rpc
    async def SearchBatch(
        self, request: pb.SearchBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchBatchResponse:
        deadline = _deadline(context)
        outcomes = await self._work(  # queries read on the worker too (see _add)
            lambda: self.engine.search_batch([search_query(q) for q in request.queries], deadline)
        )
        results = fit_batch_results([batch_result(o) for o in outcomes], self._send_limit)
        return pb.SearchBatchResponse(results=results)

    @rpc
    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        started = time.perf_counter()
        found = await self._work(self.engine.classify, classify_query(request), deadline=_deadline(context))
        return pb.ClassifyResponse(
            label=found.label,
            confidence=found.confidence,
            candidates=[pb.LabelScore(label=label, score=score) for label, score in found.candidates],
            mode=CLASSIFY_MODE_TO_PB[found.mode],
            timings=pb.StageTimings(total_ms=(time.perf_counter() - started) * 1000),
        )

    @rpc
    async def RemoveImages(
        self, request: pb.RemoveImagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveImagesResponse:
        removed = await self._work(
            self.engine.remove_images,
            request.collection,
            list(request.ids),
            request.allow_missing,
            deadline=_deadline(context),
        )
        return pb.RemoveImagesResponse(removed_count=removed)

    @rpc
    async def GetImage(
        self, request: pb.GetImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetImageResponse:
        row = await self._read(
            self.engine.get_image,
            request.collection,
            request.id,
            request.include_original,
            request.include_vector,
        )
        return pb.GetImageResponse(image=image_message(row, full=True))

    @rpc
    async def ListImages(
        self, request: pb.ListImagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListImagesResponse:
        rows, token, total = await self._read(
            self.engine.list_images, request.collection, request.page_size, request.page_token, request.label
        )
        return pb.ListImagesResponse(
            images=[image_message(r, full=False) for r in rows], next_page_token=token, total_size=total
        )

    @rpc
    async def CreateCollection(
        self, request: pb.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateCollectionResponse:
        wanted = request.collection
        info = await self._work(
            self.engine.create_collection,
            NewCollection(
                name=wanted.name,
                extractor=wanted.extractor,
                metric=wanted.metric,
                # An enum number this server does not know is passed on for the engine to refuse.
                index_type=INDEX_TYPE_FROM_PB.get(wanted.index_type, str(wanted.index_type)),
                params={
                    "nlist": wanted.ivf.nlist,
                    "nprobe": wanted.ivf.nprobe,
                    "train_size": wanted.ivf.train_size,
                    "hnsw_m": wanted.hnsw.m,
                    "ef_construction": wanted.hnsw.ef_construction,
                    "ef_search": wanted.hnsw.ef_search,
                },
                store_originals=wanted.store_originals,
                description=wanted.description,
                storage=STORAGE_FROM_PB.get(wanted.storage, str(wanted.storage)),
                local_features=wanted.local_features,
            ),
            deadline=_deadline(context),
        )
        return pb.CreateCollectionResponse(collection=collection_message(info))

    @rpc
    async def GetCollection(
        self, request: pb.GetCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCollectionResponse:
        info = await self._read(self.engine.get_collection, request.name)
        return pb.GetCollectionResponse(collection=collection_message(info))

    @rpc
    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCollectionsResponse:
        infos, token, unavailable = await self._read(
            self.engine.list_collections, request.page_size, request.page_token
        )
        return pb.ListCollectionsResponse(
            collections=[collection_message(info) for info in infos],
            next_page_token=token,
            unavailable=[pb.UnavailableCollection(name=n, reason=r) for n, r in unavailable.items()],
        )

    @rpc
    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCollectionResponse:
        await self._work(self.engine.delete_collection, request.name, deadline=_deadline(context))
        return pb.DeleteCollectionResponse()

    @rpc
    async def ListPlugins(
        self, request: pb.ListPluginsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPluginsResponse:
        plugins = self.engine.list_plugins()
        return pb.ListPluginsResponse(
            extractors=[
                pb.ExtractorInfo(
                    name=e.name,
                    version=e.version,
                    dimension=e.dim,
                    default_metric=e.default_metric,
                    description=e.description,
                    plugin=e.plugin,
                    trainable=e.trainable,
                    local_features=e.local_features,
                )
                for e in plugins.extractors
            ],
            metrics=[
                pb.MetricInfo(
                    name=m.name,
                    version=m.version,
                    description=m.description,
                    plugin=m.plugin,
                    index_types=[INDEX_TYPE_TO_PB[t] for t in m.index_types],
                )
                for m in plugins.metrics
            ],
            problems=plugins.problems,
            local_features=[
                pb.LocalFeaturesInfo(
                    name=f.name, version=f.version, description=f.description, plugin=f.plugin
                )
                for f in plugins.local_features
            ],
            skipped=plugins.skipped,
        )

    @rpc
    async def TrainCollection(
        self, request: pb.TrainCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainCollectionResponse:
        info, outcome = await self._work(
            self.engine.train_collection, request.name, request.model_size, request.seed
        )
        return pb.TrainCollectionResponse(
            collection=collection_message(info),
            previous_extractor_version=outcome.previous_version,
            training_images=outcome.training_images,
            reencoded_images=outcome.reencoded_images,
            train_ms=outcome.train_ms,
        )
