"""Everything the sync and async clients share: request building, response conversion, call options.

Each public operation is a pure function returning an ``Rpc``: which method to
call, the request message, and how to turn the response into a result type. The
two clients only differ in *how* they send it (blocking vs ``await``), so every
argument check, default and conversion lives here once and is unit-tested
without a server.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from imagesearch.client import _health
from imagesearch.client.errors import (
    ERROR_CLASSES,
    MESSAGE_TOO_LARGE,
    REQUEST_ID_HEADER,
    ErrorDetails,
    FieldViolation,
    ImageSearchError,
    ResourceExhausted,
)
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
    status_code,
)
from imagesearch.v1 import image_search_service_pb2 as pb

T = TypeVar("T")

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024

_SERVICE = pb.DESCRIPTOR.services_by_name["ImageSearchService"]


class CallOptions(TypedDict, total=False):
    """Per-call keyword options every client method accepts.

    ``timeout``: seconds (None: no deadline); defaults to the client's timeout.
    ``request_id``: sent as ``x-request-id``; a fresh uuid4 hex when omitted.
    ``metadata``: extra (key, value) headers for this call, after the client's own.
    ``wait_for_ready``: queue the call until the server is reachable instead of failing fast.
    """

    timeout: float | None
    request_id: str
    metadata: Sequence[tuple[str, str]]
    wait_for_ready: bool


CALL_OPTION_NAMES = frozenset(CallOptions.__annotations__)


@dataclass(frozen=True)
class Rpc(Generic[T]):
    """One call to make: the method, its request, and the conversion of its response."""

    method: MethodDescriptor
    request: Message
    convert: Callable[[Any], T]

    def result(self, response: Any, request_id: str) -> T:
        """The converted response. Errors returned in it (``search_batch``'s failed queries) get the
        call's request id: the server logged them under it, as it logs a raised error."""
        result = self.convert(response)
        for item in result if isinstance(result, list) else ():
            if isinstance(item, ImageSearchError):
                item.request_id = request_id
        return result

    def check_size(self, max_message_bytes: int, request_id: str) -> None:
        """ResourceExhausted naming the limit, before sending a request gRPC would refuse to send
        (with its own terse text and no reason)."""
        size = self.request.ByteSize()
        if size > max_message_bytes:
            raise ResourceExhausted(
                f"the {self.method.name} request is {size} bytes, more than the client's "
                f"max_message_bytes ({max_message_bytes}): nothing was sent. {_SMALLER.get(self.method.name, _SMALLER[''])}, "
                "or raise max_message_bytes on the client and the server",
                code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                details=ErrorDetails(
                    reason=MESSAGE_TOO_LARGE, metadata={"limit": str(max_message_bytes), "size": str(size)}
                ),
                request_id=request_id,
                sent=False,
            )


# What to send instead of a request over the limit, by method ("": any other).
_SMALLER = {
    "AddImages": "Send fewer or smaller images in one call (add_files splits an upload into chunks that fit)",
    "Search": "Send a smaller image (fewer pixels, or a JPEG)",
    "Classify": "Send a smaller image (fewer pixels, or a JPEG)",
    "SearchBatch": "Send fewer queries, or smaller images, in one call",
    "": "Send a smaller request",
}


def method_path(method: MethodDescriptor) -> str:
    """The HTTP/2 path of a method, e.g. ``/imagesearch.v1.ImageSearchService/Search``."""
    return f"/{method.containing_service.full_name}/{method.name}"


def codec(method: MethodDescriptor) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """The (request serializer, response deserializer) pair of a method."""
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    return request_type.SerializeToString, response_type.FromString


def _method(name: str) -> MethodDescriptor:
    return _SERVICE.methods_by_name[name]


ADD_IMAGES_STREAM = _method("AddImagesStream")


# ---------------------------------------------------------------------------------------------
# Channel and call settings


# Responses are not capped by the client: the server bounds them by its own limits, and a full page
# of hits with large metadata may be larger than max_message_bytes (docs/api.md, "Message size").
UNLIMITED = -1


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel arguments: the request size limit, any response size, and a user agent naming the SDK."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", UNLIMITED),
        ("grpc.primary_user_agent", "imagesearch-python"),
    ]


@dataclass(frozen=True)
class CallSettings:
    """What a client applies to every call unless the call's options override it."""

    timeout: float | None = DEFAULT_TIMEOUT
    metadata: tuple[tuple[str, str | bytes], ...] = ()

    def resolve(self, options: CallOptions, *, deadline: bool = True) -> tuple[dict[str, Any], str]:
        """The keyword arguments for a gRPC multicallable, and the request id they carry.

        ``deadline=False`` drops the client's default timeout (bulk uploads run as
        long as they need); a ``timeout`` in the call's options still applies.
        """
        unknown = sorted(set(options) - CALL_OPTION_NAMES)
        if unknown:  # a misspelt collection= or top_k= must not silently fall back to a default
            raise TypeError(
                f"unexpected keyword argument(s) {', '.join(unknown)}; the call options are "
                f"{', '.join(sorted(CALL_OPTION_NAMES))}"
            )
        request_id = options.get("request_id") or uuid.uuid4().hex
        metadata = (
            *self.metadata,
            *metadata_pairs(options.get("metadata", ())),
            header(REQUEST_ID_HEADER, request_id),
        )
        kwargs: dict[str, Any] = {
            "timeout": options.get("timeout", self.timeout if deadline else None),
            "metadata": metadata,
        }
        if "wait_for_ready" in options:
            kwargs["wait_for_ready"] = options["wait_for_ready"]
        return kwargs, request_id


def metadata_pairs(
    metadata: Mapping[str, str] | Sequence[tuple[str, str | bytes]] | None,
) -> tuple[tuple[str, str | bytes], ...]:
    """Metadata as gRPC wants it: (key, value) pairs with lower-case keys, each one checked."""
    if metadata is None:
        return ()
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    return tuple(header(key, value) for key, value in items)


_HEADER_KEY = re.compile(r"[0-9a-z_.-]+")


def header(key: str, value: str | bytes) -> tuple[str, str | bytes]:
    """One header as gRPC sends it, or ValueError before any call: gRPC itself fails such a call
    with a bare "Invalid metadata" that reads like a server error. Keys are lower-cased; a value
    is printable ASCII text, or bytes under a key ending in -bin."""
    key = key.lower()
    if not _HEADER_KEY.fullmatch(key):
        raise ValueError(f"metadata key {key!r} may hold only letters, digits, '-', '_' and '.'")
    binary = key.endswith("-bin")
    if binary != isinstance(value, bytes) or (
        isinstance(value, str) and not (value.isascii() and value.isprintable())
    ):
        raise ValueError(
            f"metadata {key!r}: a value is printable ASCII text, or bytes under a key ending in -bin; "
            f"got {value!r}"
        )
    return key, value


# ---------------------------------------------------------------------------------------------
# Small conversions


def _collection(name: str | None) -> str:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"collection must be a str or None, not {type(name).__name__} {name!r}")
    return name or ""


def _file_bytes(path: PathLike, what: str) -> bytes:
    """A file's bytes; an empty path is refused (it read the current directory: "Is a directory: '.'")."""
    if not os.fspath(path):
        raise ValueError(f"{what}: an empty path")
    return Path(path).read_bytes()


def _text_fields(item: ImageItem, where: str) -> None:
    """TypeError naming the field, for what protobuf refused with "bad argument type for built-in
    operation" (a metadata value 1: an outside test)."""
    wrong = [(f"{where}.{name}", value) for name, value in (("id", item.id), ("label", item.label))]
    wrong += [(f"{where}.metadata[{key!r}]", value) for key, value in dict(item.metadata).items()]
    wrong += [(f"{where}.metadata key", key) for key in dict(item.metadata)]
    for field, value in wrong:
        if not isinstance(value, str):
            raise TypeError(f"{field} must be a str, not {type(value).__name__} {value!r}")


def float_vector(values: VectorLike, what: str = "vector") -> pb.FloatVector:
    """The FloatVector message for ``values``, packed as ``float32_le``: what this client sends, and
    the fast form for code that calls the generated stubs itself. ValueError unless 1-D, non-empty."""
    array: npt.NDArray[np.float32] = np.asarray(values, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence of floats, got shape {array.shape}")
    # Packed: one copy, where ``values`` would build a Python float per value (FloatVector in the proto).
    return pb.FloatVector(float32_le=array.astype("<f4", copy=False).tobytes())


def _is_path(value: object) -> bool:
    return isinstance(value, str | os.PathLike)


def image_input(item: ImageItem | PathLike, *, where: str = "item") -> pb.ImageInput:
    """The ImageInput of an ImageItem, or of a file path (read now, id left to the server)."""
    if _is_path(item):
        item = ImageItem(content=_file_bytes(item, where))  # type: ignore[arg-type]
    if not isinstance(item, ImageItem):
        raise TypeError(f"{where} must be an ImageItem or a file path, not {type(item).__name__}")
    _text_fields(item, where)
    message = pb.ImageInput(id=item.id, label=item.label, metadata=dict(item.metadata))
    if item.content is not None:
        message.content = bytes(item.content)
    else:
        message.vector.CopyFrom(float_vector(item.vector, f"{where}.vector"))
    return message


def _params(value: Any, cls: type[Any], what: str) -> Any:
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown {what} parameter(s) {unknown}; expected some of {sorted(names)}")
        return cls(**value)
    raise TypeError(f"{what} must be a {cls.__name__} or a mapping, not {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# One function per RPC


def add_images(
    items: Iterable[ImageItem | PathLike], collection: str | None, skip_invalid: bool, skip_existing: bool
) -> Rpc[AddResult]:
    images = [image_input(item, where=f"items[{i}]") for i, item in enumerate(items)]
    request = pb.AddImagesRequest(
        collection=_collection(collection),
        images=images,
        skip_invalid=skip_invalid,
        skip_existing=skip_existing,
    )
    return Rpc(_method("AddImages"), request, AddResult.from_proto)


def _integer(name: str, value: int, bits: int = 32) -> int:
    """``value`` if it fits the request field's integer type, else ``TypeError`` / ``ValueError``
    naming ``name``: protobuf's own said only "Value out of range" (an outside test). The server
    checks the range that makes sense (``BAD_SEED``, ``BAD_TOP_K``, ...)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} {value!r}")
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if not low <= value <= high:
        raise ValueError(f"{name} is {value}, outside what the API carries ({bits}-bit: {low} to {high})")
    return int(value)


def search(
    image: bytes | PathLike | None,
    *,
    image_id: str | None,
    vector: VectorLike | None,
    top_k: int,
    labels: Iterable[str] | None,
    metric: str | None,
    exclude_query: bool,
    extractor: str | None,
    collection: str | None,
    mode: str | None = None,
    rerank: int = 0,
    extractor_version: str | None = None,
) -> Rpc[SearchResult]:
    if isinstance(labels, str):
        raise TypeError("labels must be a collection of strings, not a single string")
    if mode not in SEARCH_MODES:
        raise ValueError(f"mode must be one of {sorted(m for m in SEARCH_MODES if m)}, not {mode!r}")
    request = pb.SearchRequest(
        mode=SEARCH_MODES[mode],
        collection=_collection(collection),
        top_k=_integer("top_k", top_k),
        labels=list(labels or ()),  # None: no filter, like ()
        metric=metric or "",
        exclude_query=exclude_query,
        extractor=extractor or "",
        extractor_version=extractor_version or "",
    )
    if _integer("rerank", rerank) < 0:
        raise ValueError(f"rerank must be 0 (none) or the number of candidates to verify, not {rerank}")
    if rerank:
        request.rerank.CopyFrom(pb.Rerank(method=pb.RERANK_METHOD_GEOMETRIC, candidates=rerank))
    _set_query(request, image, image_id, vector)
    return Rpc(_method("Search"), request, SearchResult.from_proto)


def _set_query(
    request: pb.SearchRequest | pb.ClassifyRequest,
    image: bytes | PathLike | None,
    image_id: str | None,
    vector: VectorLike | None,
) -> None:
    """Fill the request's query oneof from exactly one of image, image_id or vector."""
    given = [
        name
        for name, value in (("image", image), ("image_id", image_id), ("vector", vector))
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(f"a query needs exactly one of image, image_id or vector; got {given or 'none'}")
    if image is not None:
        request.image = _file_bytes(image, "image") if _is_path(image) else bytes(image)  # type: ignore[arg-type]
    elif image_id is not None:
        request.image_id = image_id
    else:
        request.vector.CopyFrom(float_vector(vector))


SEARCH_MODES = {
    None: pb.SEARCH_MODE_UNSPECIFIED,
    "plain": pb.SEARCH_MODE_PLAIN,
    "bucketed": pb.SEARCH_MODE_BUCKETED,
}
CLASSIFY_MODES = {
    None: pb.CLASSIFY_MODE_UNSPECIFIED,
    "knn": pb.CLASSIFY_MODE_KNN,
    "centroid": pb.CLASSIFY_MODE_CENTROID,
}


def classify(
    image: bytes | PathLike | None,
    *,
    image_id: str | None,
    vector: VectorLike | None,
    neighbors: int,
    mode: str | None,
    exclude_query: bool,
    collection: str | None,
) -> Rpc[Classification]:
    if mode not in CLASSIFY_MODES:
        raise ValueError(f"mode must be one of {sorted(m for m in CLASSIFY_MODES if m)}, not {mode!r}")
    request = pb.ClassifyRequest(
        collection=_collection(collection),
        neighbors=_integer("neighbors", neighbors),
        mode=CLASSIFY_MODES[mode],
        exclude_query=exclude_query,
    )
    _set_query(request, image, image_id, vector)
    return Rpc(_method("Classify"), request, Classification.from_proto)


def search_batch(queries: Iterable[Query]) -> Rpc[list[SearchResult | ImageSearchError]]:
    requests = [search(**dataclasses.asdict(query)).request for query in queries]
    return Rpc(
        _method("SearchBatch"),
        pb.SearchBatchRequest(queries=requests),
        lambda response: [_batch_result(result) for result in response.results],
    )


def _batch_result(result: pb.SearchBatchResult) -> SearchResult | ImageSearchError:
    """A query's hits, or the exception a lone Search would have raised (returned, not raised)."""
    if result.code == 0:
        return SearchResult.from_proto(result.response)
    code = status_code(result.code)
    violations = (FieldViolation(result.field, result.message),) if result.field else ()
    details = ErrorDetails(reason=result.reason, field_violations=violations)
    return ERROR_CLASSES.get(code, ImageSearchError)(result.message, code=code, details=details)


def remove_images(ids: Iterable[str], collection: str | None, allow_missing: bool) -> Rpc[int]:
    if isinstance(ids, str):
        raise TypeError("ids must be a collection of strings, not a single string")
    request = pb.RemoveImagesRequest(
        collection=_collection(collection), ids=list(ids), allow_missing=allow_missing
    )
    return Rpc(_method("RemoveImages"), request, lambda response: response.removed_count)


def get_image(
    image_id: str, collection: str | None, include_original: bool, include_vector: bool
) -> Rpc[ImageRecord]:
    request = pb.GetImageRequest(
        collection=_collection(collection),
        id=image_id,
        include_original=include_original,
        include_vector=include_vector,
    )
    return Rpc(_method("GetImage"), request, lambda response: ImageRecord.from_proto(response.image))


def list_images(collection: str | None, page_size: int, page_token: str, label: str | None) -> Rpc[ImagePage]:
    request = pb.ListImagesRequest(
        collection=_collection(collection),
        page_size=_integer("page_size", page_size),
        page_token=page_token,
        label=label or "",
    )
    return Rpc(_method("ListImages"), request, ImagePage.from_proto)


STORAGES = {
    None: pb.VECTOR_STORAGE_UNSPECIFIED,
    "float32": pb.VECTOR_STORAGE_FLOAT32,
    "float16": pb.VECTOR_STORAGE_FLOAT16,
    "int8": pb.VECTOR_STORAGE_INT8,
}
"""The in-memory forms a flat index may keep its vectors in (None: the server's default, float32)."""


def create_collection(
    name: str,
    *,
    extractor: str | None,
    metric: str | None,
    index_type: IndexType | str,
    ivf: IvfParams | Mapping[str, int] | None,
    hnsw: HnswParams | Mapping[str, int] | None,
    store_originals: bool,
    description: str,
    storage: str | None = None,
    local_features: str | None = None,
) -> Rpc[CollectionInfo]:
    kind = IndexType.parse(index_type)
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {sorted(STORAGES, key=str)}, not {storage!r}")
    ivf_params = _params(ivf, IvfParams, "ivf")
    hnsw_params = _params(hnsw, HnswParams, "hnsw")
    if ivf_params is not None and kind is not IndexType.IVF:
        raise ValueError(f"ivf parameters need index_type='ivf', not {kind.value!r}")
    if hnsw_params is not None and kind is not IndexType.HNSW:
        raise ValueError(f"hnsw parameters need index_type='hnsw', not {kind.value!r}")
    collection = pb.Collection(
        name=name,
        extractor=extractor or "",
        metric=metric or "",
        index_type=kind.to_proto(),
        store_originals=store_originals,
        description=description,
        storage=STORAGES[storage],
        local_features=local_features or "",
    )
    if ivf_params is not None:
        collection.ivf.CopyFrom(ivf_params.to_proto())
    if hnsw_params is not None:
        collection.hnsw.CopyFrom(hnsw_params.to_proto())
    request = pb.CreateCollectionRequest(collection=collection)
    return Rpc(_method("CreateCollection"), request, lambda r: CollectionInfo.from_proto(r.collection))


def get_collection(name: str | None) -> Rpc[CollectionInfo]:
    request = pb.GetCollectionRequest(name=_collection(name))
    return Rpc(_method("GetCollection"), request, lambda r: CollectionInfo.from_proto(r.collection))


def list_collections(page_token: str = "") -> Rpc[tuple[list[CollectionInfo], str]]:
    """One page of collections and the next page's token ("" after the last)."""
    return Rpc(
        _method("ListCollections"),
        pb.ListCollectionsRequest(page_token=page_token),
        lambda r: ([CollectionInfo.from_proto(c) for c in r.collections], r.next_page_token),
    )


def unavailable_collections() -> Rpc[dict[str, str]]:
    """Collections the server could not open, name to reason (ListCollections' first page
    carries them all; one collection per page keeps the rest of the answer small)."""
    return Rpc(
        _method("ListCollections"),
        pb.ListCollectionsRequest(page_size=1),
        lambda r: {u.name: u.reason for u in r.unavailable},
    )


def delete_collection(name: str) -> Rpc[None]:
    if not name:
        raise ValueError("delete_collection needs a collection name")
    return Rpc(_method("DeleteCollection"), pb.DeleteCollectionRequest(name=name), lambda r: None)


def train_collection(name: str | None, model_size: int, seed: int) -> Rpc[TrainResult]:
    request = pb.TrainCollectionRequest(
        name=_collection(name), model_size=_integer("model_size", model_size), seed=_integer("seed", seed, 64)
    )
    return Rpc(_method("TrainCollection"), request, TrainResult.from_proto)


def list_plugins() -> Rpc[PluginList]:
    return Rpc(_method("ListPlugins"), pb.ListPluginsRequest(), PluginList.from_proto)


def health(service: str) -> Rpc[str]:
    return Rpc(_health.CHECK, _health.HealthCheckRequest(service=service), _health.status_name)
