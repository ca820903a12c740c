"""Read an image's format and size from its header, without decoding it.

The pixel limit must be enforced before the decoder allocates the full
bitmap (a 100-byte PNG can claim 60000 x 60000 pixels), so we read the
dimensions ourselves for every format we accept. A format we cannot size is
rejected: accepting it would mean trusting the decoder with unbounded memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


class HeaderError(ValueError):
    """The bytes are not an image in a supported format, or its header is damaged."""


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise HeaderError("damaged JPEG header (marker expected)")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        if length < 2:
            raise HeaderError("damaged JPEG header (bad segment length)")
        pos += 2 + length
    raise HeaderError("truncated JPEG: no frame header found")


def _png(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise HeaderError("truncated PNG header")
    return struct.unpack(">II", data[16:24])


def _gif(data: bytes) -> tuple[int, int]:
    if len(data) < 10:
        raise HeaderError("truncated GIF header")
    return struct.unpack("<HH", data[6:10])


def _bmp(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise HeaderError("truncated BMP header")
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def _webp(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    raise HeaderError("truncated or unsupported WebP header")


def _tiff(data: bytes) -> tuple[int, int]:
    """Width and height from the first IFD, the one decoders read.

    A tag that appears twice is refused: libtiff takes one occurrence and a naive
    reader another, and a header that says 64x64 to us and 20000x20000 to libtiff
    would cost gigabytes past the pixel limit.
    """
    endian = "<" if data[:2] == b"II" else ">"
    try:
        (offset,) = struct.unpack(endian + "I", data[4:8])
        (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
        seen: set[int] = set()
        found: dict[int, int] = {}
        for index in range(count):
            entry = data[offset + 2 + 12 * index : offset + 14 + 12 * index]
            tag, kind = struct.unpack(endian + "HH", entry[:4])
            if tag in seen:
                raise HeaderError(f"damaged TIFF header (tag {tag} appears twice)")
            seen.add(tag)
            if tag in (256, 257):
                value = struct.unpack(
                    endian + ("H" if kind == 3 else "I"), entry[8 : 10 if kind == 3 else 12]
                )[0]
                found[tag] = value
        return found[256], found[257]
    except (struct.error, KeyError) as exc:
        raise HeaderError("truncated or damaged TIFF header") from exc


def read_header(data: bytes) -> ImageHeader:
    """Identify the format and size of encoded image bytes; HeaderError if we can't."""
    if len(data) < 8:
        raise HeaderError("too short to be an image")
    if data[:3] == b"\xff\xd8\xff":
        fmt, (width, height) = "jpeg", _jpeg(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        fmt, (width, height) = "png", _png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        fmt, (width, height) = "gif", _gif(data)
    elif data[:2] == b"BM":
        fmt, (width, height) = "bmp", _bmp(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt, (width, height) = "webp", _webp(data)
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        fmt, (width, height) = "tiff", _tiff(data)
    else:
        raise HeaderError("unrecognised image format (supported: JPEG, PNG, WebP, BMP, GIF, TIFF)")
    if width <= 0 or height <= 0:
        raise HeaderError(f"{fmt.upper()} header gives an empty size {width}x{height}")
    return ImageHeader(fmt, width, height)


def looks_complete(fmt: str, data: bytes) -> bool:
    """Whether the stream has its end marker: decoders happily return half an image otherwise."""
    if fmt == "jpeg":
        return data.rfind(b"\xff\xd9") > 2
    if fmt == "png":
        return data.rfind(b"IEND") > 8
    return True
