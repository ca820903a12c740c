"""Hand-built images whose headers lie, for the decoder's defences (see server/imaging.py)."""

from __future__ import annotations

import struct
import zlib


def _deflated_zeros(count: int, chunk: int = 1 << 22) -> bytes:
    """``count`` zero bytes deflated, built in pieces so the test never holds them all."""
    packer = zlib.compressobj(9)
    out = [packer.compress(bytes(min(chunk, count - start))) for start in range(0, count, chunk)]
    return b"".join(out) + packer.flush()


def tiff(width: int, height: int, *, also_claim: tuple[int, int] | None = None) -> bytes:
    """A grey, deflate-compressed one-strip TIFF of ``width`` x ``height`` zero pixels.

    With ``also_claim``, the width and height tags appear a second time with other
    values: libtiff reads the first pair, a naive header reader the last.
    """
    strip = _deflated_zeros(width * height)
    entries = [(256, width), (257, height)]
    if also_claim is not None:
        entries += [(256, also_claim[0]), (257, also_claim[1])]
    entries += [(258, 8), (259, 8), (262, 1), (273, 0), (277, 1), (278, height), (279, len(strip))]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, value in entries:
        ifd += struct.pack("<HHII", tag, 4, 1, data_offset if tag == 273 else value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + strip


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment whose Orientation tag is ``orientation`` (6 = turn 90 CW)."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    body = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]
