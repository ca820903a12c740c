"""An in-process fake imagesearch server for client tests: real gRPC, scripted answers.

It implements the API with tiny deterministic rules (echo ids, synthesize hits
from the request, page through N synthetic images) and fails like the real server
does — ``abort_with_status`` with google.rpc rich details — so the client's
request building, response conversion and error mapping are tested over the
wire without faiss, OpenCV or models. Uses only grpcio + grpcio-status, so the
packaging test can run it with every server dependency blocked.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc

DOMAIN = "imagesearch.v1"
LISTED_IMAGES = 25  # ListImages serves this many synthetic images
DETAILS_KEY = "grpc-status-details-bin"  # where google.rpc.Status travels (the gRPC convention)


def abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str = "",
    fields: dict[str, str] | None = None,
    status_code: int | None = None,
) -> None:
    """Abort like the server: BadRequest for field errors, ErrorInfo for a reason.

    ``status_code`` puts a different code in the rich status than on the call
    (a broken server), which the client must survive.
    """
    status = status_pb2.Status(code=code.value[0] if status_code is None else status_code, message=message)
    if fields:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=name, description=text)
                for name, text in fields.items()
            ]
        )
        status.details.append(_pack(bad_request))
    if reason:
        status.details.append(
            _pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"k": "v"}))
        )
    # Like the real server, echo the request id (cut to 64 characters) in the trailers.
    sent = dict(context.invocation_metadata()).get("x-request-id", "")
    echo = (("x-request-id", sent[:64]),) if sent else ()
    if status_code is None:
        rich = rpc_status.to_status(status)
        trailers = (*rich.trailing_metadata, *echo)
    else:  # to_status would take the code from the rich status; send the call's own code instead
        trailers = ((DETAILS_KEY, status.SerializeToString()), *echo)
    context.abort_with_status(_RawStatus(code=code, details=message, trailing_metadata=trailers))


@dataclass(frozen=True)
class _RawStatus(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


@dataclass
class Call:
    """One recorded call: method name, invocation metadata and request(s)."""

    method: str
    metadata: dict[str, str]
    request: Any


@dataclass
class FakeServicer(pb_grpc.ImageSearchServiceServicer):
    """Scripted behaviour; every call is recorded in ``calls`` (thread-safe)."""

    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, method: str, context: grpc.ServicerContext, request: Any) -> None:
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        with self.lock:
            self.calls.append(Call(method, metadata, request))

    def last(self, method: str) -> Call:
        with self.lock:
            return next(call for call in reversed(self.calls) if call.method == method)

    # -- images --------------------------------------------------------------------------------

    def AddImages(self, request: pb.AddImagesRequest, context: grpc.ServicerContext) -> pb.AddImagesResponse:
        self._record("AddImages", context, request)
        bad = [i for i, image in enumerate(request.images) if image.content == b"bad"]
        if bad and not request.skip_invalid:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"image {bad[0]} is not a decodable image",
                fields={f"images[{i}].content": "not a decodable image" for i in bad},
            )
        response = pb.AddImagesResponse()
        for i, image in enumerate(request.images):
            if i in bad:
                response.ids.append("")
                response.results.add(index=i, code=code_pb2.INVALID_ARGUMENT, message="not a decodable image")
            else:
                image_id = image.id or f"auto-{i}"
                response.ids.append(image_id)
                response.results.add(index=i, id=image_id, code=code_pb2.OK)
                response.added_count += 1
        return response

    def AddImagesStream(
        self, request_iterator: Iterator[pb.AddImagesStreamRequest], context: grpc.ServicerContext
    ) -> pb.AddImagesStreamResponse:
        chunks = list(request_iterator)
        self._record("AddImagesStream", context, chunks)
        response = pb.AddImagesStreamResponse(chunk_count=len(chunks))
        index = 0
        for chunk in chunks:
            for image in chunk.images:
                image_id = image.id or f"auto-{index}"
                response.ids.append(image_id)
                response.results.add(index=index, id=image_id, code=code_pb2.OK)
                response.added_count += 1
                index += 1
        return response

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        """Hits echo the request: one per top_k, labels cycled, the query kind in metadata."""
        self._record("Search", context, request)
        if request.image_id == "missing":
            abort(context, grpc.StatusCode.NOT_FOUND, "no image 'missing'", reason="IMAGE_NOT_FOUND")
        if request.image_id == "slow":
            time.sleep(2.0)
        if request.top_k > 1000:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "top_k is too large",
                fields={"top_k": "must be at most 1000"},
            )
        kind = request.WhichOneof("query")
        hits = []
        for i in range(request.top_k or 10):
            label = request.labels[i % len(request.labels)] if request.labels else ""
            hits.append(
                pb.SearchHit(
                    id=f"hit-{i}", score=1.0 - i / 100, distance=i / 10, label=label, metadata={"query": kind}
                )
            )
        timings = pb.StageTimings(decode_ms=1.5, extract_ms=2.5, search_ms=0.5, total_ms=5.0)
        return pb.SearchResponse(hits=hits, timings=timings, metric=request.metric or "cosine")

    def GetImage(self, request: pb.GetImageRequest, context: grpc.ServicerContext) -> pb.GetImageResponse:
        self._record("GetImage", context, request)
        if request.id == "missing":
            abort(context, grpc.StatusCode.NOT_FOUND, "no image 'missing'", reason="IMAGE_NOT_FOUND")
        image = pb.Image(
            id=request.id, label="cat", metadata={"a": "b"}, thumbnail=b"\xff\xd8thumb", width=64, height=48
        )
        image.create_time.FromNanoseconds(1_700_000_000_500_000_000)
        if request.include_original:
            image.original = b"original-bytes"
        if request.include_vector:
            image.vector.values.extend([0.25, -1.0, 3.5])
        return pb.GetImageResponse(image=image)

    def ListImages(
        self, request: pb.ListImagesRequest, context: grpc.ServicerContext
    ) -> pb.ListImagesResponse:
        self._record("ListImages", context, request)
        start = int(request.page_token or 0)
        size = request.page_size or 100
        end = min(start + size, LISTED_IMAGES)
        images = [pb.Image(id=f"img-{i}", label=request.label) for i in range(start, end)]
        token = str(end) if end < LISTED_IMAGES else ""
        return pb.ListImagesResponse(images=images, next_page_token=token, total_size=LISTED_IMAGES)

    # RemoveImages is deliberately not implemented: the client must map UNIMPLEMENTED.

    # -- collections ---------------------------------------------------------------------------

    def CreateCollection(
        self, request: pb.CreateCollectionRequest, context: grpc.ServicerContext
    ) -> pb.CreateCollectionResponse:
        self._record("CreateCollection", context, request)
        if request.collection.name == "taken":
            abort(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                "collection 'taken' exists",
                reason="COLLECTION_EXISTS",
            )
        collection = pb.Collection()
        collection.CopyFrom(request.collection)
        collection.extractor_version = "1"
        collection.dimension = 128
        collection.create_time.FromSeconds(1_700_000_000)
        return pb.CreateCollectionResponse(collection=collection)

    def GetCollection(
        self, request: pb.GetCollectionRequest, context: grpc.ServicerContext
    ) -> pb.GetCollectionResponse:
        self._record("GetCollection", context, request)
        if request.name == "inconsistent":
            abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                "rich status disagrees with the call",
                reason="SHOULD_BE_IGNORED",
                status_code=code_pb2.INTERNAL,
            )
        return pb.GetCollectionResponse(collection=pb.Collection(name=request.name or "default", dimension=3))

    def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.ServicerContext
    ) -> pb.ListCollectionsResponse:
        self._record("ListCollections", context, request)
        return pb.ListCollectionsResponse(
            collections=[
                pb.Collection(name="a", index_type=pb.INDEX_TYPE_HNSW, hnsw=pb.HnswParams(m=16)),
                pb.Collection(
                    name="b", index_type=pb.INDEX_TYPE_IVF, ivf=pb.IvfParams(nlist=8), index_trained=True
                ),
            ]
        )

    def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteCollectionResponse:
        self._record("DeleteCollection", context, request)
        if request.name == "busy":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "plain abort without rich details")
        return pb.DeleteCollectionResponse()

    def ListPlugins(
        self, request: pb.ListPluginsRequest, context: grpc.ServicerContext
    ) -> pb.ListPluginsResponse:
        self._record("ListPlugins", context, request)
        return pb.ListPluginsResponse(
            extractors=[
                pb.ExtractorInfo(name="sift", version="2", dimension=512, default_metric="l2", trainable=True)
            ],
            metrics=[
                pb.MetricInfo(
                    name="cosine", version="1", index_types=[pb.INDEX_TYPE_FLAT, pb.INDEX_TYPE_HNSW]
                ),
            ],
            problems=["broken-plugin: ImportError"],
            skipped=["plugin 'colorhist' is blocked by IMAGESEARCH_DISABLE_PLUGINS"],
        )


def _add_health(server: grpc.Server) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("imagesearch.v1.ImageSearchService", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


@contextlib.contextmanager
def fake_server(*, with_health: bool = True) -> Iterator[tuple[FakeServicer, str]]:
    """Serve a FakeServicer on a free 127.0.0.1 port; yield (servicer, target)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    servicer = FakeServicer()
    pb_grpc.add_ImageSearchServiceServicer_to_server(servicer, server)
    if with_health:
        _add_health(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
