"""Fuzzing the two paths hostile bytes reach first: request parsing and image decoding.

1. Random bytes and mutated valid requests (bit flips, truncations, splices,
   insertions) go raw to every RPC of a running server: whatever the bytes, the
   answer is a deliberate status, never UNKNOWN or INTERNAL, and the server
   keeps answering.
2. Mutated valid images of every supported format (byte flips, truncation, size
   fields in the header rewritten, up to sizes no decoder should attempt) go to
   ``decode_image``: it returns pixels within the limits or raises
   InvalidArgument / ResourceExhausted, nothing else.

The default run is small and deterministic so it belongs in the normal suite;
``IMAGESEARCH_FUZZ_EXAMPLES=5000`` (``make fuzz``) digs deeper.
"""

from __future__ import annotations

import base64
import contextlib
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagesearch.server.app import RunningServer, run_server
from imagesearch.server.config import Limits
from imagesearch.server.errors import InvalidArgument, ResourceExhausted
from imagesearch.server.imaging import decode_image
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.fuzzing import fuzz_examples
from tests.support.images import encode, pattern
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

EXAMPLES = fuzz_examples(60)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same inputs every run: a failure in CI reproduces on a laptop
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SERVICE = "/imagesearch.v1.ImageSearchService/"
CALL_TIMEOUT_S = 30.0  # far beyond any legitimate call on these tiny inputs: a timeout is a hang
SERVER_LIMITS = {
    "max_message_bytes": 1 << 20,
    "max_image_pixels": 200 * 200,
    "max_batch_size": 8,
    "max_top_k": 50,
}
NOT_DELIBERATE = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
DIM = TinyExtractor.dim


# -- mutations --------------------------------------------------------------------------------
Mutation = Callable[[st.DrawFn, bytearray, Sequence[bytes]], bytearray]


def _position(draw: st.DrawFn, data: bytearray, *, end: bool = False) -> int:
    """An index into ``data`` (or one past its end, for cuts and insertions)."""
    return draw(st.integers(0, len(data) if end else max(0, len(data) - 1)))


def flip_bits(draw: st.DrawFn, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    """One byte XORed with a mask: the classic single-event upset, and wire types/lengths gone wrong."""
    if data:
        data[_position(draw, data)] ^= draw(st.integers(1, 255))
    return data


def set_byte(draw: st.DrawFn, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    """A byte set to a boundary value: lengths and varints at 0, 0x7f, 0x80 and 0xff break parsers."""
    if data:
        data[_position(draw, data)] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]))
    return data


def truncate(draw: st.DrawFn, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    """Cut short, as a dropped connection or a broken client would."""
    return data[: _position(draw, data, end=True)]


def splice(draw: st.DrawFn, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    """The head of one message on the tail of another: valid pieces, nonsensical whole."""
    other = draw(st.sampled_from(seeds))
    return data[: _position(draw, data, end=True)] + other[draw(st.integers(0, len(other))) :]


def insert(draw: st.DrawFn, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    """Random bytes inserted: shifts every later field and length."""
    at = _position(draw, data, end=True)
    return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]


def repeat(draw: st.DrawFn, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    """A slice repeated: repeated fields, duplicate oneof members, duplicate map keys."""
    start = _position(draw, data, end=True)
    stop = draw(st.integers(start, len(data)))
    return data[:stop] + data[start:stop] * draw(st.integers(1, 4)) + data[stop:]


MUTATIONS: list[Mutation] = [flip_bits, set_byte, truncate, splice, insert, repeat]


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """A seed put through 1-4 mutations, or now and then plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        data = draw(st.sampled_from(MUTATIONS))(draw, data, seeds)
    return bytes(data)


# -- 1. requests against a running server ---------------------------------------------------------
def _ser(*messages: object) -> list[bytes]:
    """Seeds are wire bytes: mutations work below the protobuf API, where hostile clients do."""
    return [m.SerializeToString() for m in messages]  # type: ignore[attr-defined]


SMALL_PNG = encode(pattern(7, size=(24, 32)))
SMALL_JPEG = encode(pattern(8, size=(24, 32)), ".jpg")
VECTOR = pb.FloatVector(values=[0.25] * DIM)
TOKEN = base64.urlsafe_b64encode(b"v1:0123456789ab:1").decode()  # token-shaped; only a seed to mutate
IMAGES = [
    pb.ImageInput(id="fz-a", content=SMALL_PNG, label="cat", metadata={"k": "v"}),
    pb.ImageInput(id="fz-b", vector=VECTOR, label="dog"),
]
SEED_REQUESTS: dict[str, list[bytes]] = {
    "AddImages": _ser(
        pb.AddImagesRequest(collection="default", images=IMAGES, skip_invalid=True),
        pb.AddImagesRequest(images=[pb.ImageInput(content=SMALL_JPEG)]),
    ),
    "Search": _ser(
        pb.SearchRequest(image_id="seed", top_k=3, labels=["cat"], exclude_query=True),
        pb.SearchRequest(collection="default", vector=VECTOR, metric="l2"),
        pb.SearchRequest(image=SMALL_JPEG, extractor=TinyExtractor.name),
    ),
    "RemoveImages": _ser(pb.RemoveImagesRequest(ids=["fz-a", "missing"], allow_missing=True)),
    "GetImage": _ser(pb.GetImageRequest(id="seed", include_original=True, include_vector=True)),
    "ListImages": _ser(pb.ListImagesRequest(page_size=1, page_token=TOKEN, label="cat")),
    "CreateCollection": _ser(
        pb.CreateCollectionRequest(
            collection=pb.Collection(
                name="fz-hnsw",
                metric="l2",
                index_type=pb.INDEX_TYPE_HNSW,
                hnsw=pb.HnswParams(m=8, ef_construction=16, ef_search=16),
                description="fuzz",
            )
        ),
        pb.CreateCollectionRequest(
            collection=pb.Collection(
                name="fz-ivf", index_type=pb.INDEX_TYPE_IVF, ivf=pb.IvfParams(nlist=4, nprobe=2, train_size=8)
            )
        ),
        pb.CreateCollectionRequest(collection=pb.Collection(name="fz-flat", store_originals=True)),
    ),
    "GetCollection": _ser(pb.GetCollectionRequest(name="default")),
    "ListCollections": _ser(pb.ListCollectionsRequest(page_size=1, page_token=TOKEN)),
    "DeleteCollection": _ser(pb.DeleteCollectionRequest(name="fz-gone")),
    "ListPlugins": [b""],
}
STREAM_SEEDS = _ser(
    pb.AddImagesStreamRequest(collection="default", images=IMAGES, skip_invalid=True),
    pb.AddImagesStreamRequest(images=[pb.ImageInput(id="fz-s", content=SMALL_JPEG)]),
    pb.AddImagesStreamRequest(),
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for every example: damage one example does to it shows in the next ones."""
    config = tiny_config(tmp_path_factory.mktemp("fuzz") / "data", limits=SERVER_LIMITS)
    with run_server(config, extra_plugins=[TINY_PLUGIN]) as running:
        yield running


@pytest.fixture(scope="module")
def fuzz_channel(fuzz_server: RunningServer) -> Iterator[grpc.Channel]:
    """A raw channel, and an image 'seed' so mutated Search/GetImage requests can reach real data."""
    with grpc.insecure_channel(fuzz_server.target) as channel:
        stub = pb_grpc.ImageSearchServiceStub(channel)
        stub.AddImages(pb.AddImagesRequest(images=[pb.ImageInput(id="seed", content=SMALL_PNG)]))
        yield channel


def outcome(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status of a call, OK included: the fuzz tests judge codes, not exceptions."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def drop_new_collections(server: RunningServer, channel: grpc.Channel) -> None:
    """Delete what a mutated CreateCollection made: thousands of collections would exhaust file
    descriptors (a test artefact, not the finding we look for), and one accepted bad collection
    must not turn every later example into a failure."""
    stub = pb_grpc.ImageSearchServiceStub(channel)
    for collection in server.engine.catalog.list():
        if collection.spec.name != "default":
            stub.DeleteCollection(
                pb.DeleteCollectionRequest(name=collection.spec.name), timeout=CALL_TIMEOUT_S
            )


def assert_still_answering(channel: grpc.Channel) -> None:
    """Health and a state-free RPC both answer: the example did not wedge or kill the server."""
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    pb_grpc.ImageSearchServiceStub(channel).ListPlugins(pb.ListPluginsRequest(), timeout=CALL_TIMEOUT_S)


@st.composite
def unary_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """An RPC and a mutation of one of its seed requests."""
    method = draw(st.sampled_from(sorted(SEED_REQUESTS)))
    return method, draw(mutated(SEED_REQUESTS[method]))


@FUZZ
@given(request=unary_requests())
def test_mutated_requests_get_a_deliberate_status(
    fuzz_server: RunningServer, fuzz_channel: grpc.Channel, request: tuple[str, bytes]
) -> None:
    method, body = request
    code, message = outcome(lambda: fuzz_channel.unary_unary(SERVICE + method)(body, timeout=CALL_TIMEOUT_S))
    drop_new_collections(fuzz_server, fuzz_channel)
    assert code not in NOT_DELIBERATE, f"{method}({body!r}) -> {code.name}: {message[:300]}"
    assert_still_answering(fuzz_channel)


@FUZZ
@given(chunks=st.lists(mutated(STREAM_SEEDS), min_size=1, max_size=3))
def test_mutated_upload_streams_get_a_deliberate_status(
    fuzz_server: RunningServer, fuzz_channel: grpc.Channel, chunks: list[bytes]
) -> None:
    upload = fuzz_channel.stream_unary(SERVICE + "AddImagesStream")
    code, message = outcome(lambda: upload(iter(chunks), timeout=CALL_TIMEOUT_S))
    drop_new_collections(fuzz_server, fuzz_channel)
    assert code not in NOT_DELIBERATE, f"AddImagesStream({chunks!r}) -> {code.name}: {message[:300]}"
    assert_still_answering(fuzz_channel)


# -- 2. images against the decoder ----------------------------------------------------------------
DECODE_LIMITS = Limits(max_image_pixels=100_000)


def _encoded(ext: str, image: np.ndarray, *params: int) -> bytes:
    """cv2.imencode with encoder flags (tests.support.images.encode only knows JPEG quality)."""
    ok, data = cv2.imencode(ext, image, list(params))
    assert ok, ext
    return data.tobytes()


_BGR = pattern(5, size=(40, 56))
_GREY = cv2.cvtColor(_BGR, cv2.COLOR_BGR2GRAY)
_BGRA = cv2.cvtColor(_BGR, cv2.COLOR_BGR2BGRA)
IMAGE_SEEDS: dict[str, bytes] = {
    "png": encode(_BGR),
    "png-grey": _encoded(".png", _GREY),
    "png-alpha": _encoded(".png", _BGRA),
    "jpeg": encode(_BGR, ".jpg"),
    "jpeg-grey": _encoded(".jpg", _GREY),
    "jpeg-progressive": _encoded(".jpg", _BGR, cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
    "tiff": _encoded(".tiff", _BGR),
    "tiff-uncompressed": _encoded(".tiff", _BGR, cv2.IMWRITE_TIFF_COMPRESSION, 1),
    "bmp": encode(_BGR, ".bmp"),
    "gif": encode(_BGR, ".gif"),
    "webp-lossy": _encoded(".webp", _BGR, cv2.IMWRITE_WEBP_QUALITY, 80),
    "webp-lossless": _encoded(".webp", _BGR, cv2.IMWRITE_WEBP_QUALITY, 101),
}

SIZES = st.one_of(
    st.integers(0, 600),
    st.sampled_from([0x3FFF, 0x4000, 0x7FFF, 0xFFFF, 0x10000, 60000, 2**24 - 1, 2**31 - 1, 2**31, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)


def _png_size(draw: st.DrawFn, data: bytearray, width: int, height: int) -> None:
    """IHDR width/height; the CRC is usually fixed too, else libpng stops at the CRC, not the size."""
    data[16:24] = struct.pack(">II", width, height)
    if draw(st.booleans()):
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))


def _jpeg_size(draw: st.DrawFn, data: bytearray, width: int, height: int) -> None:
    """Every SOF segment's size (progressive files have one; a second one is a mutation's job)."""
    pos = 2
    while pos + 9 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[pos + 5 : pos + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
        if marker == 0xDA:  # entropy-coded data follows
            return
        pos += 2 + length


def _bmp_size(draw: st.DrawFn, data: bytearray, width: int, height: int) -> None:
    """Signed 32-bit fields: values from 2**31 up read as negative (a negative height is top-down)."""
    data[18:26] = struct.pack("<II", width, height)


def _gif_frame_offset(data: bytearray) -> int | None:
    """Where the first image descriptor's size starts, past the colour table and extensions."""
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < len(data) and data[pos] == 0x21:
        pos += 2
        while pos < len(data) and data[pos]:
            pos += data[pos] + 1
        pos += 1
    return pos + 5 if pos + 9 <= len(data) and data[pos] == 0x2C else None


def _gif_size(draw: st.DrawFn, data: bytearray, width: int, height: int) -> None:
    """The logical screen, the first frame, or both: readers size the canvas from one of them."""
    size = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    where = draw(st.sampled_from(["screen", "frame", "both"]))
    frame = _gif_frame_offset(data)
    if where in ("screen", "both"):
        data[6:10] = size
    if where in ("frame", "both") and frame is not None:
        data[frame : frame + 4] = size


def _webp_size(draw: st.DrawFn, data: bytearray, width: int, height: int) -> None:
    """The frame size of a lossy (VP8), lossless (VP8L) or extended (VP8X canvas) WebP, masked to its field."""
    chunk = bytes(data[12:16])
    if chunk == b"VP8 ":
        data[26:30] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
        bits |= ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
        data[21:25] = bits.to_bytes(4, "little")
    elif chunk == b"VP8X":
        data[24:30] = ((width - 1) & 0xFFFFFF).to_bytes(3, "little") + ((height - 1) & 0xFFFFFF).to_bytes(
            3, "little"
        )


def _tiff_size(draw: st.DrawFn, data: bytearray, width: int, height: int) -> None:
    """Rewrite ImageWidth/ImageLength, or turn another IFD entry into a second copy of one of them."""
    endian = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(endian + "I", data[4:8])
    if offset + 2 > len(data):
        return
    (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
    entries = [offset + 2 + 12 * i for i in range(count) if offset + 14 + 12 * i <= len(data)]
    if not entries:
        return
    if draw(st.booleans()):
        at = draw(st.sampled_from(entries))
        tag = draw(st.sampled_from([256, 257]))
        data[at : at + 12] = struct.pack(endian + "HHII", tag, 4, 1, width if tag == 256 else height)
        return
    for at in entries:
        tag, kind = struct.unpack(endian + "HH", data[at : at + 4])
        value = width if tag == 256 else height if tag == 257 else None
        if value is not None:
            packed = (
                struct.pack(endian + "H", value & 0xFFFF) if kind == 3 else struct.pack(endian + "I", value)
            )
            data[at + 8 : at + 8 + len(packed)] = packed


SIZE_WRITERS: dict[bytes, Callable[[st.DrawFn, bytearray, int, int], None]] = {
    b"\x89PNG": _png_size,
    b"\xff\xd8\xff": _jpeg_size,
    b"BM": _bmp_size,
    b"GIF8": _gif_size,
    b"RIFF": _webp_size,
    b"II*\x00": _tiff_size,
    b"MM\x00*": _tiff_size,
}


def rewrite_size(draw: st.DrawFn, data: bytearray, seeds: Sequence[bytes]) -> bytearray:
    """The header's width and height set to anything, up to sizes no decoder should try to allocate."""
    for magic, writer in SIZE_WRITERS.items():
        if data.startswith(magic):
            with contextlib.suppress(struct.error, IndexError):  # a header an earlier mutation broke
                writer(draw, data, draw(SIZES), draw(SIZES))
            break
    return data


IMAGE_MUTATIONS: list[Mutation] = [flip_bits, set_byte, truncate, insert, repeat, rewrite_size, rewrite_size]


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A valid image of some format put through 1-4 mutations, header size rewrites favoured."""
    seed = IMAGE_SEEDS[draw(st.sampled_from(sorted(IMAGE_SEEDS)))]
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        data = draw(st.sampled_from(IMAGE_MUTATIONS))(draw, data, [seed])
    return bytes(data)


def test_every_image_seed_decodes() -> None:
    """The mutations start from images the server accepts, or the fuzzing explores nothing."""
    for name, data in IMAGE_SEEDS.items():
        assert decode_image(data, DECODE_LIMITS, "image").pixels.shape == (40, 56, 3), name


@FUZZ
@given(data=damaged_images())
def test_damaged_images_decode_within_limits_or_fail_cleanly(data: bytes) -> None:
    try:
        decoded = decode_image(data, DECODE_LIMITS, "image")
    except (InvalidArgument, ResourceExhausted) as error:
        assert error.field == "image" and error.message
        return
    pixels = decoded.pixels
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, pixels.shape
    assert pixels.shape[0] * pixels.shape[1] <= DECODE_LIMITS.max_image_pixels, (
        f"decoded {pixels.shape[1]}x{pixels.shape[0]} past the {DECODE_LIMITS.max_image_pixels}-pixel "
        f"limit; the header said {decoded.header}"
    )
