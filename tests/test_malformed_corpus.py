"""A corpus of malformed requests, replayed byte for byte against a real server.

Every case is data: the RPC, the exact request bytes (a serialized message or
hand-made wire bytes no well-behaved client would send), the status code and
ErrorInfo reason the API promises. Each is sent through a raw channel, so the
server sees exactly those bytes, and must answer with that status, never
UNKNOWN or INTERNAL, with a short message (a huge input is never echoed back
whole), and without storing anything. The server must still serve afterwards.
To add a case, append a ``Case`` to ``CORPUS``.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from imagesearch.server.app import SERVICE_NAME, RunningServer, run_server
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.images import encode, pattern
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

try:
    from imagesearch.server.page_tokens import _scope_key
except ImportError:  # moved or renamed again: v1 tokens carry this key, so forge it the same way

    def _scope_key(scope: str) -> str:
        return hashlib.sha256(scope.encode()).hexdigest()[:12]


pytestmark = pytest.mark.e2e
Code = grpc.StatusCode
SERVICE = "/imagesearch.v1.ImageSearchService/"
STREAM_METHODS = {"AddImagesStream"}
MIB = 1 << 20
LIMITS = {
    "max_message_bytes": 4 * MIB,  # room for a 1 MB id, so its NOT_FOUND is the server's, not gRPC's
    "max_image_bytes": 1 * MIB,
    "max_image_pixels": 200 * 200,
    "max_batch_pixels": 100_000,
    "max_batch_size": 8,
    "max_top_k": 50,
}
MAX_MESSAGE_CHARS = 1024  # what a client may log or show; a huge input must be shown truncated
MAX_TRAILER_BYTES = 4096  # the status details repeat the message; HTTP/2 caps headers at 16 KiB
CALL_TIMEOUT_S = 30.0
DIM = TinyExtractor.dim
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Case:
    """One malformed request and the answer the API promises for it."""

    name: str
    method: str  # an RPC of ImageSearchService, e.g. "Search"
    # a tuple is the chunks of a client stream; a callable builds the bytes when the case is sent
    # (forged page tokens carry the server's store identity, known once the server runs)
    request: bytes | tuple[bytes, ...] | Callable[[], bytes]
    code: grpc.StatusCode
    reason: str | None = None  # ErrorInfo.reason; None: not checked (e.g. gRPC's own errors)
    max_seconds: float = 10.0

    @property
    def path(self) -> str:
        return SERVICE + self.method


# -- hand-made wire bytes -------------------------------------------------------------------
def varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int32/enum values take ten bytes, as on the wire."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) carrying raw bytes, valid UTF-8 or not."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def field_varint(number: int, value: int) -> bytes:
    """A varint field (wire type 0): how out-of-range enum values reach the server."""
    return varint(number << 3) + varint(value)


def vector_bytes(values: list[float]) -> bytes:
    """A FloatVector message: field 1, packed little-endian float32."""
    return field_bytes(1, struct.pack(f"<{len(values)}f", *values))


def collection_request(index_type: int | None = None, **fields: object) -> bytes:
    """CreateCollectionRequest; ``index_type`` is hand-encoded so out-of-range enum values can be sent."""
    message = pb.Collection(**fields).SerializeToString()
    if index_type is not None:
        message += field_varint(5, index_type)
    return field_bytes(1, message)


def ser(message: object) -> bytes:
    """The wire bytes of a well-formed message whose values are what is wrong."""
    return message.SerializeToString()  # type: ignore[attr-defined]


# -- forged page tokens ---------------------------------------------------------------------
def page_token(scope: str, position: object) -> str:
    """A token in the server's v1 format for ``scope`` with any position: well-formed, but forged."""
    return base64.urlsafe_b64encode(f"v1:{_scope_key(scope)}:{position}".encode()).decode()


COLLECTIONS_SCOPE = "collections"
DEFAULT_STORE: dict[str, str] = {}  # the default collection's store identity, set by corpus_stub


def images_scope(label: str = "") -> str:
    """The server's ListImages token scope for the default collection (engine.list_images)."""
    return f"images\x00default\x00{DEFAULT_STORE['identity']}\x00{label}"


# -- hostile images -------------------------------------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (with a valid CRC) claims a huge size: a decompression bomb's calling card."""
    real = encode(pattern(1, size=(8, 8)))
    ihdr = struct.pack(">II", width, height) + real[24:29]
    return real[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + real[33:]


def tiff_with_two_sizes(first: int, second: int) -> bytes:
    """A 64x64 grey TIFF whose one IFD holds ImageWidth and ImageLength twice: ``first``, then ``second``.

    Readers disagree on which copy wins (libtiff keeps one, a naive header scan
    another), so the size checked against the pixel limit need not be the size
    the decoder allocates. The only safe answer is to refuse the file.
    """
    side = 64
    pixels = bytes(range(side)) * side
    entries = [
        (256, first),
        (256, second),
        (257, first),
        (257, second),
        (258, 8),  # BitsPerSample
        (259, 1),  # Compression: none
        (262, 1),  # Photometric: black is zero
        (273, None),  # StripOffsets: filled in below
        (277, 1),  # SamplesPerPixel
        (278, side),  # RowsPerStrip
        (279, len(pixels)),  # StripByteCounts
    ]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, value in entries:
        value = data_offset if value is None else value
        ifd += struct.pack("<HHII", tag, 4, 1, value)  # LONG, count 1
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + pixels


SEED_PNG = encode(pattern(0))
GOOD_PNG = encode(pattern(5))
BAD_IMAGES: dict[str, tuple[bytes, grpc.StatusCode, str]] = {
    "empty": (b"", Code.INVALID_ARGUMENT, "IMAGE_EMPTY"),
    "garbage": (b"hello, this is not an image", Code.INVALID_ARGUMENT, "IMAGE_UNDECODABLE"),
    "truncated-jpeg": (encode(pattern(2), ".jpg")[:600], Code.INVALID_ARGUMENT, "IMAGE_TRUNCATED"),
    "truncated-png": (encode(pattern(2))[:200], Code.INVALID_ARGUMENT, "IMAGE_TRUNCATED"),
    "corrupt-png": (
        encode(pattern(2))[:60] + b"\x00" * 400 + b"IEND",
        Code.INVALID_ARGUMENT,
        "IMAGE_UNDECODABLE",
    ),
    "png-claiming-60000x60000": (
        png_claiming(60000, 60000),
        Code.RESOURCE_EXHAUSTED,
        "IMAGE_TOO_MANY_PIXELS",
    ),
    "over-pixel-limit": (
        encode(pattern(3, size=(300, 300))),
        Code.RESOURCE_EXHAUSTED,
        "IMAGE_TOO_MANY_PIXELS",
    ),
    "tiff-two-sizes-big-first": (tiff_with_two_sizes(20000, 64), Code.INVALID_ARGUMENT, "IMAGE_UNDECODABLE"),
    "tiff-two-sizes-small-first": (
        tiff_with_two_sizes(64, 20000),
        Code.INVALID_ARGUMENT,
        "IMAGE_UNDECODABLE",
    ),
}


def add(*images: pb.ImageInput, collection: str = "") -> bytes:
    """An AddImagesRequest batch: most cases are one bad image, or a good one and a bad one."""
    return ser(pb.AddImagesRequest(collection=collection, images=list(images)))


def vec(values: list[float]) -> pb.FloatVector:
    """A FloatVector; Python floats go on the wire as float32, so 3e38 stays finite and 1e39 would not."""
    return pb.FloatVector(values=values)


def image_cases() -> list[Case]:
    """Each bad image as the second of a batch (all-or-nothing) and as a query image."""
    cases = []
    for name, (data, code, reason) in BAD_IMAGES.items():
        seconds = 2.0 if name.startswith("tiff-") else 10.0
        batch = add(pb.ImageInput(id="good", content=GOOD_PNG), pb.ImageInput(id="bad", content=data))
        cases.append(Case(f"add-image-{name}", "AddImages", batch, code, reason, seconds))
        query = ser(pb.SearchRequest(image=data))
        cases.append(Case(f"search-image-{name}", "Search", query, code, reason, seconds))
    return cases


def ivf(**params: int) -> bytes:
    """CreateCollection of an IVF index with these parameters (one name: it must never get created)."""
    return collection_request(name="ivf-case", index_type=pb.INDEX_TYPE_IVF, ivf=pb.IvfParams(**params))


def hnsw(**params: int) -> bytes:
    """CreateCollection of an HNSW index with these parameters (one name: it must never get created)."""
    return collection_request(name="hnsw-case", index_type=pb.INDEX_TYPE_HNSW, hnsw=pb.HnswParams(**params))


def create(name: str, **fields: object) -> bytes:
    """CreateCollection of a collection named ``name``."""
    return collection_request(name=name, **fields)


HUGE_VALUES = [3e38, -3e38] * (DIM // 2)  # finite float32, but their squares and sums overflow
INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED = (
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.RESOURCE_EXHAUSTED,
)
ALREADY_EXISTS, FAILED_PRECONDITION = Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION
MALFORMED = "MALFORMED_REQUEST"

CORPUS: list[Case] = [
    # -- not protobuf at all, or protobuf cut short ----------------------------------------
    Case("search-not-protobuf", "Search", b"\xff\xff\xff\xff", INVALID_ARGUMENT, MALFORMED),
    Case("add-images-not-protobuf", "AddImages", b"\xff\xff\xff\xff", INVALID_ARGUMENT, MALFORMED),
    Case("get-image-truncated-varint", "GetImage", b"\x18\x80\x80\x80", INVALID_ARGUMENT, MALFORMED),
    Case("list-images-length-past-end", "ListImages", b"\x0a\x10abc", INVALID_ARGUMENT, MALFORMED),
    Case(
        "create-collection-truncated-submessage",
        "CreateCollection",
        create("cut", description="x" * 40)[:-5],
        INVALID_ARGUMENT,
        MALFORMED,
    ),
    Case("list-collections-field-number-zero", "ListCollections", b"\x00\x01", INVALID_ARGUMENT, MALFORMED),
    Case("remove-images-stray-end-group", "RemoveImages", b"\x0c", INVALID_ARGUMENT, MALFORMED),
    Case(
        "delete-collection-eleven-byte-varint",
        "DeleteCollection",
        b"\x08" + b"\xff" * 10 + b"\x01",
        INVALID_ARGUMENT,
        MALFORMED,
    ),
    Case(
        "search-truncated-packed-vector",
        "Search",
        ser(pb.SearchRequest(vector=vec([0.5] * DIM)))[:-3],
        INVALID_ARGUMENT,
        MALFORMED,
    ),
    Case("stream-chunk-not-protobuf", "AddImagesStream", (b"\xff\xff\xff\xff",), INVALID_ARGUMENT, MALFORMED),
    # -- invalid UTF-8 in string fields (proto3 strings must be UTF-8) ---------------------
    Case(
        "get-image-invalid-utf8",
        "GetImage",
        field_bytes(1, b"\xc3\x28") + field_bytes(2, b"\xff\xfe"),
        INVALID_ARGUMENT,
        MALFORMED,
    ),
    Case("search-image-id-invalid-utf8", "Search", field_bytes(3, b"seed\xff"), INVALID_ARGUMENT, MALFORMED),
    Case(
        "create-collection-name-overlong-utf8",
        "CreateCollection",
        field_bytes(1, field_bytes(1, b"\xc0\xaf")),
        INVALID_ARGUMENT,
        MALFORMED,
    ),
    Case(
        "add-images-metadata-key-surrogate",
        "AddImages",
        field_bytes(
            2,
            field_bytes(1, b"m")
            + field_bytes(3, vector_bytes([0.5] * DIM))
            + field_bytes(5, field_bytes(1, b"\xed\xa0\x80") + field_bytes(2, b"v")),
        ),
        INVALID_ARGUMENT,
        MALFORMED,
    ),
    Case(
        "list-images-label-invalid-utf8", "ListImages", field_bytes(4, b"\x80"), INVALID_ARGUMENT, MALFORMED
    ),
    Case(
        "stream-collection-invalid-utf8",
        "AddImagesStream",
        (field_bytes(1, b"\xfe"),),
        INVALID_ARGUMENT,
        MALFORMED,
    ),
    # -- forged and foreign page tokens ---------------------------------------------------
    *[
        Case(
            f"list-images-token-{label}",
            "ListImages",
            lambda position=position: ser(
                pb.ListImagesRequest(page_token=page_token(images_scope(), position))
            ),
            INVALID_ARGUMENT,
            "BAD_PAGE_TOKEN",
        )
        for label, position in [("huge", 10**30), ("negative", -1), ("non-numeric", "abc")]
    ],
    *[
        Case(
            f"list-collections-token-{label}",
            "ListCollections",
            ser(pb.ListCollectionsRequest(page_token=page_token(COLLECTIONS_SCOPE, position))),
            INVALID_ARGUMENT,
            "BAD_PAGE_TOKEN",
        )
        # A ListCollections position is a collection name: 10**30 is one (31 digits) and continues the
        # listing after it, which is harmless; 10**70 is longer than any name can be.
        for label, position in [("huge", 10**70), ("negative", -1), ("not-a-name", "bad name!")]
    ],
    Case(
        "list-images-token-of-another-listing",
        "ListImages",
        lambda: ser(pb.ListImagesRequest(page_token=page_token(images_scope("cats"), 1))),
        INVALID_ARGUMENT,
        "BAD_PAGE_TOKEN",
    ),
    Case(
        "list-collections-token-of-an-image-listing",
        "ListCollections",
        lambda: ser(pb.ListCollectionsRequest(page_token=page_token(images_scope(), 1))),
        INVALID_ARGUMENT,
        "BAD_PAGE_TOKEN",
    ),
    Case(
        "list-images-token-not-base64",
        "ListImages",
        ser(pb.ListImagesRequest(page_token="%%%")),
        INVALID_ARGUMENT,
        "BAD_PAGE_TOKEN",
    ),
    Case(
        "list-images-token-not-a-token",
        "ListImages",
        ser(pb.ListImagesRequest(page_token="bm90IGEgdG9rZW4=")),
        INVALID_ARGUMENT,
        "BAD_PAGE_TOKEN",
    ),
    Case(
        "list-images-negative-page-size",
        "ListImages",
        ser(pb.ListImagesRequest(page_size=-1)),
        INVALID_ARGUMENT,
        "BAD_PAGE_SIZE",
    ),
    Case(
        "list-collections-negative-page-size",
        "ListCollections",
        ser(pb.ListCollectionsRequest(page_size=-5)),
        INVALID_ARGUMENT,
        "BAD_PAGE_SIZE",
    ),
    Case(
        "list-images-unknown-collection",
        "ListImages",
        ser(pb.ListImagesRequest(collection="nope")),
        NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    ),
    # -- ids ----------------------------------------------------------------------------------
    Case(
        "get-image-1mb-id",
        "GetImage",
        ser(pb.GetImageRequest(id="x" * MIB)),
        NOT_FOUND,
        "IMAGE_NOT_FOUND",
    ),
    Case("get-image-no-id", "GetImage", ser(pb.GetImageRequest()), INVALID_ARGUMENT, "BAD_ID"),
    Case(
        "get-image-unknown-id",
        "GetImage",
        ser(pb.GetImageRequest(id="missing")),
        NOT_FOUND,
        "IMAGE_NOT_FOUND",
    ),
    Case(
        "get-image-unknown-collection",
        "GetImage",
        ser(pb.GetImageRequest(collection="nope", id="seed")),
        NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    ),
    *[
        Case(
            f"add-id-{label}",
            "AddImages",
            add(pb.ImageInput(id=image_id, vector=vec([0.5] * DIM))),
            INVALID_ARGUMENT,
            "BAD_ID",
        )
        for label, image_id in [
            ("with-newline", "a\nb"),
            ("with-nul", "a\x00b"),
            ("with-tab", "\t"),
            ("with-carriage-return", "a\r"),
            ("257-chars", "i" * 257),
        ]
    ],
    Case(
        "add-duplicate-ids-in-batch",
        "AddImages",
        add(pb.ImageInput(id="twice", content=GOOD_PNG), pb.ImageInput(id="twice", content=GOOD_PNG)),
        ALREADY_EXISTS,
        "DUPLICATE_ID",
    ),
    Case(
        "add-existing-id",
        "AddImages",
        add(pb.ImageInput(id="seed", content=GOOD_PNG)),
        ALREADY_EXISTS,
        "IMAGE_EXISTS",
    ),
    Case("remove-no-ids", "RemoveImages", ser(pb.RemoveImagesRequest()), INVALID_ARGUMENT, "EMPTY_BATCH"),
    Case(
        "remove-unknown-ids",
        "RemoveImages",
        ser(pb.RemoveImagesRequest(ids=["seed", "missing"])),
        NOT_FOUND,
        "IMAGE_NOT_FOUND",
    ),
    Case(
        "remove-unknown-collection",
        "RemoveImages",
        ser(pb.RemoveImagesRequest(collection="nope", ids=["seed"])),
        NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    ),
    # -- collections ----------------------------------------------------------------------------
    *[
        Case(
            f"create-name-{label}", "CreateCollection", create(name), INVALID_ARGUMENT, "BAD_COLLECTION_NAME"
        )
        for label, name in [
            ("trailing-newline", "keep\n"),
            ("with-spaces", "bad name!"),
            ("65-chars", "c" * 65),
            ("leading-dash", "-x"),
            ("empty", ""),
            ("path-traversal", "../escape"),
            ("non-ascii", "café"),
        ]
    ],
    Case(
        "create-unknown-extractor",
        "CreateCollection",
        create("x1", extractor="nope"),
        INVALID_ARGUMENT,
        "UNKNOWN_EXTRACTOR",
    ),
    Case(
        "create-unknown-metric",
        "CreateCollection",
        create("x2", metric="manhattan"),
        INVALID_ARGUMENT,
        "UNKNOWN_METRIC",
    ),
    Case("create-existing", "CreateCollection", create("default"), ALREADY_EXISTS, "COLLECTION_EXISTS"),
    Case(
        "create-index-type-7",
        "CreateCollection",
        collection_request(name="x3", index_type=7),
        INVALID_ARGUMENT,
        "UNKNOWN_INDEX_TYPE",
    ),
    Case(
        "create-index-type-negative",
        "CreateCollection",
        collection_request(name="x4", index_type=-1),
        INVALID_ARGUMENT,
        "UNKNOWN_INDEX_TYPE",
    ),
    Case(
        "create-ivf-nlist-above-train-size",
        "CreateCollection",
        ivf(nlist=1000, train_size=10),
        INVALID_ARGUMENT,
        "BAD_INDEX_PARAM",
    ),
    Case("create-hnsw-m-100000", "CreateCollection", hnsw(m=100_000), INVALID_ARGUMENT, "BAD_INDEX_PARAM"),
    *[
        Case(
            f"create-ivf-{key}-int32-max",
            "CreateCollection",
            ivf(**{key: INT32_MAX}),
            INVALID_ARGUMENT,
            "BAD_INDEX_PARAM",
        )
        for key in ("nlist", "nprobe", "train_size")
    ],
    *[
        Case(
            f"create-hnsw-{key}-int32-max",
            "CreateCollection",
            hnsw(**{key: INT32_MAX}),
            INVALID_ARGUMENT,
            "BAD_INDEX_PARAM",
        )
        for key in ("m", "ef_construction", "ef_search")
    ],
    *[
        Case(f"create-ivf-{key}-negative", "CreateCollection", ivf(**{key: -1}), INVALID_ARGUMENT)
        for key in ("nlist", "nprobe", "train_size")
    ],
    *[
        Case(f"create-hnsw-{key}-negative", "CreateCollection", hnsw(**{key: -8}), INVALID_ARGUMENT)
        for key in ("m", "ef_construction", "ef_search")
    ],
    Case(
        "get-collection-unknown",
        "GetCollection",
        ser(pb.GetCollectionRequest(name="nope")),
        NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    ),
    Case(
        "delete-collection-unknown",
        "DeleteCollection",
        ser(pb.DeleteCollectionRequest(name="nope")),
        NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    ),
    Case(
        "delete-collection-no-name",
        "DeleteCollection",
        ser(pb.DeleteCollectionRequest()),
        INVALID_ARGUMENT,
        "BAD_COLLECTION_NAME",
    ),
    # -- vectors ------------------------------------------------------------------------------
    Case(
        "add-vector-3e38",
        "AddImages",
        add(pb.ImageInput(id="huge", vector=vec(HUGE_VALUES))),
        INVALID_ARGUMENT,
        "VECTOR_OUT_OF_RANGE",
    ),
    Case(
        "search-vector-3e38",
        "Search",
        ser(pb.SearchRequest(vector=vec(HUGE_VALUES))),
        INVALID_ARGUMENT,
        "VECTOR_OUT_OF_RANGE",
    ),
    Case(
        "search-vector-one-3e38",
        "Search",
        ser(pb.SearchRequest(vector=vec([3e38] + [0.5] * (DIM - 1)))),
        INVALID_ARGUMENT,
        "VECTOR_OUT_OF_RANGE",
    ),
    Case(
        "stream-vector-3e38",
        "AddImagesStream",
        (ser(pb.AddImagesStreamRequest(images=[pb.ImageInput(id="huge", vector=vec(HUGE_VALUES))])),),
        INVALID_ARGUMENT,
        "VECTOR_OUT_OF_RANGE",
    ),
    *[
        Case(
            f"{rpc.lower()}-vector-{label}",
            rpc,
            add(pb.ImageInput(id="nf", vector=vec(values)))
            if rpc == "AddImages"
            else ser(pb.SearchRequest(vector=vec(values))),
            INVALID_ARGUMENT,
            "NON_FINITE_VECTOR",
        )
        for rpc in ("AddImages", "Search")
        for label, values in [
            ("nan", [float("nan")] * DIM),
            ("inf", [0.5] * (DIM - 1) + [float("inf")]),
            ("minus-inf", [float("-inf")] + [0.5] * (DIM - 1)),
        ]
    ],
    Case(
        "add-vector-wrong-dimension",
        "AddImages",
        add(
            pb.ImageInput(id="ok", vector=vec([0.5] * DIM)), pb.ImageInput(id="short", vector=vec([0.5] * 3))
        ),
        INVALID_ARGUMENT,
        "DIMENSION_MISMATCH",
    ),
    Case(
        "search-vector-wrong-dimension",
        "Search",
        ser(pb.SearchRequest(vector=vec([1.0, 2.0]))),
        INVALID_ARGUMENT,
        "DIMENSION_MISMATCH",
    ),
    # the packed form (float32_le) refuses what the listed form refuses, and its own malformations
    Case(
        "search-packed-vector-nan",
        "Search",
        ser(
            pb.SearchRequest(vector=pb.FloatVector(float32_le=struct.pack(f"<{DIM}f", *[float("nan")] * DIM)))
        ),
        INVALID_ARGUMENT,
        "NON_FINITE_VECTOR",
    ),
    Case(
        "add-packed-vector-odd-length",
        "AddImages",
        add(pb.ImageInput(id="odd", vector=pb.FloatVector(float32_le=b"\0" * (4 * DIM + 1)))),
        INVALID_ARGUMENT,
        "BAD_VECTOR_ENCODING",
    ),
    Case(
        "stream-packed-vector-and-values",
        "AddImagesStream",
        (
            ser(
                pb.AddImagesStreamRequest(
                    images=[
                        pb.ImageInput(
                            id="both", vector=pb.FloatVector(values=[0.5] * DIM, float32_le=b"\0" * 4)
                        )
                    ]
                )
            ),
        ),
        INVALID_ARGUMENT,
        "BAD_VECTOR_ENCODING",
    ),
    Case(
        "search-packed-vector-wrong-dimension",
        "Search",
        ser(pb.SearchRequest(vector=pb.FloatVector(float32_le=b"\0" * 8))),
        INVALID_ARGUMENT,
        "DIMENSION_MISMATCH",
    ),
    Case(
        "search-empty-vector",
        "Search",
        ser(pb.SearchRequest(vector=vec([]))),
        INVALID_ARGUMENT,
        "DIMENSION_MISMATCH",
    ),
    # -- batches and sources -------------------------------------------------------------------
    Case("add-empty-batch", "AddImages", add(), INVALID_ARGUMENT, "EMPTY_BATCH"),
    Case(
        "add-batch-over-size-limit",
        "AddImages",
        add(*[pb.ImageInput(id=f"b{i}", vector=vec([0.5] * DIM)) for i in range(9)]),
        RESOURCE_EXHAUSTED,
        "BATCH_TOO_LARGE",
    ),
    Case(
        "add-batch-over-pixel-budget",
        "AddImages",
        add(*[pb.ImageInput(id=f"p{i}", content=encode(pattern(i, size=(150, 150)))) for i in range(5)]),
        RESOURCE_EXHAUSTED,
        "BATCH_TOO_MANY_PIXELS",
    ),
    Case(
        "add-image-over-byte-limit",
        "AddImages",
        add(pb.ImageInput(id="big", content=SEED_PNG + b"\x00" * (3 * MIB // 2))),
        RESOURCE_EXHAUSTED,
        "IMAGE_TOO_LARGE",
    ),
    Case(
        "add-message-over-size-limit",
        "AddImages",
        add(pb.ImageInput(id="huge", content=b"\xff\xd8\xff" + b"\x00" * (5 * MIB))),
        RESOURCE_EXHAUSTED,
    ),
    Case(
        "add-neither-content-nor-vector",
        "AddImages",
        add(pb.ImageInput(id="nothing")),
        INVALID_ARGUMENT,
        "NO_SOURCE",
    ),
    # ``source`` is a oneof: on the wire both may appear and the last one wins, so the server
    # must judge the last one (here: a bad one), never the first, nor a mix of both.
    Case(
        "add-content-then-short-vector",
        "AddImages",
        field_bytes(
            2, field_bytes(1, b"both") + field_bytes(2, GOOD_PNG) + field_bytes(3, vector_bytes([0.5] * 3))
        ),
        INVALID_ARGUMENT,
        "DIMENSION_MISMATCH",
    ),
    Case(
        "add-vector-then-garbage-content",
        "AddImages",
        field_bytes(
            2, field_bytes(1, b"both") + field_bytes(3, vector_bytes([0.5] * DIM)) + field_bytes(2, b"junk")
        ),
        INVALID_ARGUMENT,
        "IMAGE_UNDECODABLE",
    ),
    Case(
        "add-unknown-collection",
        "AddImages",
        add(pb.ImageInput(id="a", content=GOOD_PNG), collection="nope"),
        NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    ),
    # Unprintable ids and labels: a newline in a label forged a row of `imagesearch search`'s
    # table, ESC sequences cleared the screen, U+202E showed "g\u202egnp.exe" as "gexe.png".
    *(
        Case(
            f"add-{field}-holding-{name}",
            "AddImages",
            add(pb.ImageInput(vector=vec([0.5] * DIM), **{"id": "u", field: f"cats{char}x"})),
            INVALID_ARGUMENT,
            f"BAD_{field.upper()}",
        )
        for field in ("id", "label")
        for name, char in (
            ("newline", "\n"),
            ("escape", "\x1b"),
            ("delete", "\x7f"),
            ("next-line", "\x85"),
            ("line-separator", "\u2028"),
            ("right-to-left-override", "\u202e"),
        )
    ),
    Case(
        "add-label-257-chars",
        "AddImages",
        add(pb.ImageInput(id="l", vector=vec([0.5] * DIM), label="l" * 257)),
        INVALID_ARGUMENT,
        "BAD_LABEL",
    ),
    Case(
        "add-metadata-65-entries",
        "AddImages",
        add(pb.ImageInput(id="m", vector=vec([0.5] * DIM), metadata={f"k{i}": "v" for i in range(65)})),
        INVALID_ARGUMENT,
        "METADATA_TOO_LARGE",
    ),
    Case(
        "add-metadata-17-kib",
        "AddImages",
        add(pb.ImageInput(id="m", vector=vec([0.5] * DIM), metadata={"k": "v" * 17 * 1024})),
        INVALID_ARGUMENT,
        "METADATA_TOO_LARGE",
    ),
    Case(
        "stream-bad-image",
        "AddImagesStream",
        (ser(pb.AddImagesStreamRequest(images=[pb.ImageInput(id="g", content=b"not an image at all")])),),
        INVALID_ARGUMENT,
        "IMAGE_UNDECODABLE",
    ),
    Case(
        "stream-chunk-over-batch-limit",
        "AddImagesStream",
        (
            ser(
                pb.AddImagesStreamRequest(
                    images=[pb.ImageInput(id=f"s{i}", vector=vec([0.5] * DIM)) for i in range(9)]
                )
            ),
        ),
        RESOURCE_EXHAUSTED,
        "BATCH_TOO_LARGE",
    ),
    Case(
        "stream-unknown-collection",
        "AddImagesStream",
        (
            ser(
                pb.AddImagesStreamRequest(collection="nope", images=[pb.ImageInput(id="a", content=GOOD_PNG)])
            ),
        ),
        NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    ),
    # -- search -----------------------------------------------------------------------------
    Case(
        "search-unknown-collection",
        "Search",
        ser(pb.SearchRequest(collection="nope", image_id="seed")),
        NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    ),
    Case(
        "search-unknown-image-id",
        "Search",
        ser(pb.SearchRequest(image_id="missing")),
        NOT_FOUND,
        "IMAGE_NOT_FOUND",
    ),
    Case(
        "search-unknown-metric",
        "Search",
        ser(pb.SearchRequest(image_id="seed", metric="manhattan")),
        INVALID_ARGUMENT,
        "UNKNOWN_METRIC",
    ),
    *[
        Case(
            f"search-top-k-{label}",
            "Search",
            ser(pb.SearchRequest(image_id="seed", top_k=k)),
            INVALID_ARGUMENT,
            "BAD_TOP_K",
        )
        for label, k in [
            ("negative", -1),
            ("over-limit", 51),
            ("int32-max", INT32_MAX),
            ("int32-min", -(2**31)),
        ]
    ],
    Case("search-no-query", "Search", ser(pb.SearchRequest()), INVALID_ARGUMENT, "NO_QUERY"),
    Case(
        "search-other-extractor",
        "Search",
        ser(pb.SearchRequest(image_id="seed", extractor="resnet50")),
        FAILED_PRECONDITION,
        "EXTRACTOR_MISMATCH",
    ),
    Case(
        "search-exclude-query-without-image-id",
        "Search",
        ser(pb.SearchRequest(vector=vec([0.5] * DIM), exclude_query=True)),
        INVALID_ARGUMENT,
        "BAD_QUERY",
    ),
    Case(
        "search-metric-override-on-hnsw",
        "Search",
        ser(pb.SearchRequest(collection="graph", image_id="g", metric="l2")),
        FAILED_PRECONDITION,
        "METRIC_OVERRIDE_UNSUPPORTED",
    ),
    # -- local features, re-ranking and training (the default collection keeps no local features) --
    Case(
        "search-rerank-without-local-features",
        "Search",
        ser(
            pb.SearchRequest(
                image_id="seed", rerank=pb.Rerank(method=pb.RERANK_METHOD_GEOMETRIC, candidates=10)
            )
        ),
        FAILED_PRECONDITION,
        "RERANK_UNAVAILABLE",
    ),
    Case(
        "search-rerank-unknown-method",
        "Search",
        ser(pb.SearchRequest(image_id="seed", rerank=pb.Rerank(method=7, candidates=10))),
        INVALID_ARGUMENT,
        "BAD_MODE",
    ),
    Case(
        "search-vector-of-another-extractor-version",
        "Search",
        ser(pb.SearchRequest(vector=vec([0.5] * DIM), extractor_version="0+" + "f" * 1000)),
        FAILED_PRECONDITION,
        "EXTRACTOR_VERSION_MISMATCH",
    ),
    Case(
        "train-unknown-collection",
        "TrainCollection",
        ser(pb.TrainCollectionRequest(name="nope")),
        NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    ),
    Case(
        "train-not-trainable",
        "TrainCollection",
        ser(pb.TrainCollectionRequest()),
        FAILED_PRECONDITION,
        "NOT_TRAINABLE",
    ),
    *[
        Case(
            f"train-seed-{label}",
            "TrainCollection",
            ser(pb.TrainCollectionRequest(seed=seed)),
            INVALID_ARGUMENT,
            "BAD_SEED",
        )
        for label, seed in [("negative", -1), ("over-int32", 2**31), ("int64-max", 2**63 - 1)]
    ],
    Case(
        "create-unknown-local-features",
        "CreateCollection",
        create("orb-case", local_features="orb" * 1000),
        INVALID_ARGUMENT,
        "UNKNOWN_LOCAL_FEATURES",
    ),
    *image_cases(),
]


# -- replaying ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the whole corpus: a case that breaks it shows up in every later case."""
    config = tiny_config(tmp_path_factory.mktemp("corpus") / "data", limits=LIMITS)
    with run_server(config, extra_plugins=[TINY_PLUGIN]) as running:
        yield running


@pytest.fixture(scope="module")
def raw_channel(corpus_server: RunningServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 64 * MIB)]
    with grpc.insecure_channel(corpus_server.target, options=options) as channel:
        yield channel


@pytest.fixture(scope="module")
def corpus_stub(raw_channel: grpc.Channel, corpus_server: RunningServer) -> pb_grpc.ImageSearchServiceStub:
    """A typed stub over the same channel, with the state the cases refer to: 'seed' and 'graph'."""
    DEFAULT_STORE["identity"] = corpus_server.engine.catalog.get("default").store.identity
    stub = pb_grpc.ImageSearchServiceStub(raw_channel)
    stub.AddImages(pb.AddImagesRequest(images=[pb.ImageInput(id="seed", content=SEED_PNG)]))
    graph = pb.Collection(name="graph", index_type=pb.INDEX_TYPE_HNSW)
    stub.CreateCollection(pb.CreateCollectionRequest(collection=graph))
    stub.AddImages(
        pb.AddImagesRequest(collection="graph", images=[pb.ImageInput(id="g", vector=vec([0.5] * DIM))])
    )
    return stub


State = dict[str, tuple[int, frozenset[str]]]


def stored_state(stub: pb_grpc.ImageSearchServiceStub) -> State | str:
    """Every collection with its ListImages count and ids: what a rejected request must not change.

    A listing that fails is returned as text, so it fails the case that broke it, with the reason.
    """
    state: State = {}
    try:
        for collection in stub.ListCollections(pb.ListCollectionsRequest(page_size=1000)).collections:
            listing = stub.ListImages(pb.ListImagesRequest(collection=collection.name, page_size=1000))
            state[collection.name] = (listing.total_size, frozenset(image.id for image in listing.images))
    except grpc.RpcError as error:
        return f"listing failed: {error.code().name} {error.details()}"
    return state


def undo(server: RunningServer, stub: pb_grpc.ImageSearchServiceStub, before: State) -> None:
    """Remove what a wrongly accepted case stored, so one server bug fails one case, not every later one.

    Collection names come from the in-process catalog, not ListCollections: an accepted bad
    collection can be exactly what makes ListCollections fail.
    """
    for name in {c.spec.name for c in server.engine.catalog.list()} - before.keys():
        stub.DeleteCollection(pb.DeleteCollectionRequest(name=name))
    for name, (_, ids) in before.items():
        listing = stub.ListImages(pb.ListImagesRequest(collection=name, page_size=1000))
        extra = sorted({image.id for image in listing.images} - ids)
        if extra:
            stub.RemoveImages(pb.RemoveImagesRequest(collection=name, ids=extra, allow_missing=True))


def change(before: State, after: State | str) -> str:
    """What a case changed, in words, for the failure message."""
    if isinstance(after, str):
        return after
    words = [f"new collection {name!r}" for name in sorted(after.keys() - before.keys())]
    words += [f"collection {name!r} gone" for name in sorted(before.keys() - after.keys())]
    for name in sorted(after.keys() & before.keys()):
        (old_count, old_ids), (new_count, new_ids) = before[name], after[name]
        if (old_count, old_ids) != (new_count, new_ids):
            added = sorted(new_ids - old_ids)[:3]
            words.append(f"{name!r}: {old_count} -> {new_count} images, new ids {[i[:40] for i in added]}")
    return "; ".join(words)


def replay(channel: grpc.Channel, case: Case) -> grpc.RpcError | None:
    """Send the case's bytes unchanged (no serializer) and return the error, or None if it succeeded."""
    try:
        if case.method in STREAM_METHODS:
            assert isinstance(case.request, tuple)
            channel.stream_unary(case.path)(iter(case.request), timeout=CALL_TIMEOUT_S)
        else:
            request = case.request() if callable(case.request) else case.request
            assert isinstance(request, bytes)
            channel.unary_unary(case.path)(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return error
    return None


def error_reason(error: grpc.RpcError) -> str | None:
    """The ErrorInfo reason of the rich status, None when the error has no rich status (gRPC's own)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return None


def trailer_bytes(error: grpc.RpcError) -> int:
    """Size of the trailers, where the rich status repeats the message: a huge echo breaks HTTP/2."""
    return sum(len(key) + len(value) for key, value in error.trailing_metadata() or ())  # type: ignore[attr-defined]


def test_case_names_are_unique() -> None:
    names = [case.name for case in CORPUS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_malformed_request(
    corpus_server: RunningServer,
    raw_channel: grpc.Channel,
    corpus_stub: pb_grpc.ImageSearchServiceStub,
    case: Case,
) -> None:
    before = stored_state(corpus_stub)
    assert isinstance(before, dict), f"before the case: {before}"
    started = time.monotonic()
    error = replay(raw_channel, case)
    elapsed = time.monotonic() - started
    after = stored_state(corpus_stub)
    undo(corpus_server, corpus_stub, before)

    stored = "" if after == before else f", and it changed what is stored ({change(before, after)})"
    assert error is not None, f"accepted{stored}; expected {case.code.name} {case.reason or ''}"
    code, message = error.code(), error.details() or ""
    seen = f"{code.name} {error_reason(error)!r}: {message[:300]!r}"
    assert code not in (Code.UNKNOWN, Code.INTERNAL), seen
    assert code == case.code, seen
    if case.reason is not None:
        assert error_reason(error) == case.reason, seen
    assert len(message) <= MAX_MESSAGE_CHARS, f"{len(message)}-character message: {message[:200]!r}..."
    assert trailer_bytes(error) <= MAX_TRAILER_BYTES, f"{trailer_bytes(error)} bytes of trailers"
    assert elapsed < case.max_seconds, f"took {elapsed:.2f} s"
    assert after == before, f"a rejected request changed what is stored: {change(before, after)}"


def test_forged_tokens_use_the_servers_format(corpus_stub: pb_grpc.ImageSearchServiceStub) -> None:
    """The token cases test the position check only if a forged token with a sane position is accepted."""
    listing = corpus_stub.ListImages(pb.ListImagesRequest(page_token=page_token(images_scope(), 0)))
    assert "seed" in [image.id for image in listing.images]
    corpus_stub.ListCollections(pb.ListCollectionsRequest(page_token=page_token(COLLECTIONS_SCOPE, "a")))


def test_still_serving_after_the_corpus(
    raw_channel: grpc.Channel, corpus_stub: pb_grpc.ImageSearchServiceStub
) -> None:
    """Runs last (pytest keeps file order): health and a search still work after every case above."""
    health = health_pb2_grpc.HealthStub(raw_channel)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    hits = corpus_stub.Search(pb.SearchRequest(image_id="seed", top_k=1), timeout=5).hits
    assert [hit.id for hit in hits] == ["seed"]
    assert corpus_stub.Search(pb.SearchRequest(image=GOOD_PNG, top_k=1), timeout=5).hits
