"""Image sizes read from headers match what the decoder produces, for every accepted format."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from imagesearch.server.config import Limits
from imagesearch.server.errors import InvalidArgument
from imagesearch.server.image_header import HeaderError, read_header
from imagesearch.server.imaging import decode_image, make_thumbnail, reduction_flag
from tests.support.images import encode, pattern


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tiff"])
@pytest.mark.parametrize("size", [(37, 53), (480, 640)])
def test_header_size_matches_decoder(ext, size):
    data = encode(pattern(3, size=size), ext)
    header = read_header(data)
    decoded = cv2.imdecode(np.frombuffer(data, "uint8"), cv2.IMREAD_COLOR)
    assert (header.height, header.width) == decoded.shape[:2] == size


def test_grayscale_and_alpha_become_bgr():
    image = pattern(1)
    gray = encode(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    alpha = encode(cv2.cvtColor(image, cv2.COLOR_BGR2BGRA))
    for data in (gray, alpha):
        assert decode_image(data, Limits(), "image").pixels.shape == (*image.shape[:2], 3)


def test_unknown_formats_are_rejected():
    with pytest.raises(HeaderError, match="unrecognised"):
        read_header(b"P6\n10 10\n255\n" + b"\x00" * 300)


def test_large_jpeg_decodes_at_reduced_size():
    data = encode(pattern(4, size=(2000, 3000)), ".jpg")
    header = read_header(data)
    assert reduction_flag(header, 256) == cv2.IMREAD_REDUCED_COLOR_4
    decoded = decode_image(data, Limits(), "image", min_side=256).pixels
    assert decoded.shape[:2] == (500, 750)
    assert min(decode_image(data, Limits(), "image").pixels.shape[:2]) == 2000


def test_thumbnail_keeps_aspect_ratio():
    thumb = cv2.imdecode(np.frombuffer(make_thumbnail(pattern(1, (300, 600)), 256, 80), "uint8"), 1)
    assert thumb.shape[:2] == (128, 256)


def test_error_names_the_field():
    with pytest.raises(InvalidArgument) as error:
        decode_image(b"\xff\xd8\xff\xe0" + b"\x00" * 10, Limits(), "images[4].content")
    assert error.value.field == "images[4].content"
