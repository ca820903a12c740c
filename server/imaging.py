"""Decode client images safely and make thumbnails.

Order matters: size from the header first (cheap, bounded), then the limit
checks, then the decode, so a hostile image costs us a few bytes of parsing,
not gigabytes of RAM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from imagesearch.server.config import Limits
from imagesearch.server.errors import InvalidArgument, ResourceExhausted
from imagesearch.server.image_header import HeaderError, ImageHeader, looks_complete, read_header

# OPENCV_IO_MAX_IMAGE_PIXELS, OpenCV's own guard behind this module's header check, is set in
# imagesearch/server/__init__.py before anything imports cv2; the server refuses a pixel limit
# above it (check_decoder_cap), so a header that lies to us still cannot make the decoder
# allocate more than the limit.
DECODER_CAP_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"


def check_decoder_cap(limits: Limits) -> None:
    """Refuse to start with a pixel limit OpenCV's own cap would not back up."""
    cap = int(os.environ.get(DECODER_CAP_ENV, "0") or 0)
    if cap and limits.max_image_pixels > cap:
        raise ValueError(
            f"max_image_pixels is {limits.max_image_pixels} but the decoder's cap {DECODER_CAP_ENV} is "
            f"{cap}: set {DECODER_CAP_ENV}={limits.max_image_pixels} in the environment as well"
        )


_REDUCED_FLAGS = {
    8: cv2.IMREAD_REDUCED_COLOR_8,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    1: cv2.IMREAD_COLOR,
}


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # BGR uint8 (h, w, 3), turned upright by its EXIF orientation
    header: ImageHeader
    width: int  # the upright full-resolution size (the header's, swapped for a 90-degree EXIF turn)
    height: int


def check_image(data: bytes, limits: Limits, field: str) -> ImageHeader:
    """Validate size, format and completeness without decoding; return the header."""
    if not data:
        raise InvalidArgument("image is empty (0 bytes)", field=field, reason="IMAGE_EMPTY")
    if len(data) > limits.max_image_bytes:
        raise ResourceExhausted(
            f"image is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes",
            field=field,
            reason="IMAGE_TOO_LARGE",
            metadata={"limit": str(limits.max_image_bytes), "value": str(len(data))},
        )
    try:
        header = read_header(data)
    except HeaderError as exc:
        raise InvalidArgument(
            f"not a decodable image: {exc}", field=field, reason="IMAGE_UNDECODABLE"
        ) from exc
    if header.pixels > limits.max_image_pixels:
        raise ResourceExhausted(
            f"image is {header.width}x{header.height} = {header.pixels} pixels; "
            f"the limit is {limits.max_image_pixels} pixels",
            field=field,
            reason="IMAGE_TOO_MANY_PIXELS",
            metadata={"limit": str(limits.max_image_pixels), "value": str(header.pixels)},
        )
    if not looks_complete(header.format, data):
        raise InvalidArgument(
            f"truncated {header.format.upper()} image (end marker missing)",
            field=field,
            reason="IMAGE_TRUNCATED",
        )
    return header


def reduction_factor(header: ImageHeader, min_side: int | None) -> int:
    """The largest of 8, 4, 2 that still leaves the short side >= min_side (JPEG only), else 1.

    JPEG decodes at 1/2, 1/4 or 1/8 scale almost for free (DCT scaling), which
    makes large photos several times cheaper to ingest.
    """
    if min_side and header.format == "jpeg":
        short = min(header.width, header.height)
        for factor in (8, 4, 2):
            if short // factor >= min_side:
                return factor
    return 1


def reduction_flag(header: ImageHeader, min_side: int | None) -> int:
    """The OpenCV read flag for ``reduction_factor``."""
    return _REDUCED_FLAGS[reduction_factor(header, min_side)]


def decoded_shape(header: ImageHeader, min_side: int | None) -> tuple[int, int]:
    """(height, width) the decoder will produce before any EXIF turn (libjpeg rounds scaled sizes up)."""
    factor = reduction_factor(header, min_side)
    return -(-header.height // factor), -(-header.width // factor)


def decoded_pixels(header: ImageHeader, min_side: int | None) -> int:
    """How many pixels decoding will allocate: what a batch's memory budget counts."""
    height, width = decoded_shape(header, min_side)
    return height * width


def decode_image(data: bytes, limits: Limits, field: str, min_side: int | None = None) -> DecodedImage:
    """Check then decode to BGR uint8; every failure is an InvalidArgument/ResourceExhausted naming ``field``."""
    header = check_image(data, limits, field)
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        pixels = cv2.imdecode(buffer, reduction_flag(header, min_side))
    except cv2.error as exc:
        raise InvalidArgument(
            f"image could not be decoded: {exc}", field=field, reason="IMAGE_UNDECODABLE"
        ) from exc
    if pixels is None or pixels.size == 0:
        raise InvalidArgument(
            f"{header.format.upper()} image could not be decoded (corrupt data)",
            field=field,
            reason="IMAGE_UNDECODABLE",
        )
    expected = decoded_shape(header, min_side)
    if pixels.shape[:2] == expected:
        width, height = header.width, header.height
    elif pixels.shape[:2] == expected[::-1]:  # EXIF orientation turned it by 90 degrees
        width, height = header.height, header.width
    else:  # the header we checked is not the one the decoder read: never trust such an image
        raise InvalidArgument(
            f"{header.format.upper()} header says {header.width}x{header.height} but the image decodes to "
            f"{pixels.shape[1]}x{pixels.shape[0]}",
            field=field,
            reason="IMAGE_UNDECODABLE",
        )
    if pixels.ndim == 2:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    return DecodedImage(np.ascontiguousarray(pixels), header, width, height)


def shrink_to_fit(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the longest side is at most ``max_side``, keeping the aspect ratio.

    Halve with pyrDown (a Gaussian, so no aliasing) while the image is still at
    least twice too big, then finish with a bilinear step: thumbnail quality for
    a fifth of the cost of INTER_AREA at a fractional scale (1 ms per photo).
    """
    while max(pixels.shape[:2]) >= 2 * max_side:
        pixels = cv2.pyrDown(pixels)
    height, width = pixels.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)


def make_thumbnail(pixels: np.ndarray, max_side: int, quality: int) -> bytes:
    """A JPEG whose longest side is at most ``max_side``, for result pages and GetImage."""
    pixels = shrink_to_fit(pixels, max_side)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InvalidArgument("thumbnail could not be encoded", reason="THUMBNAIL_FAILED")
    return encoded.tobytes()
