"""The decoder's three defences against images that lie about their size, and EXIF orientation.

1. the header check reads the size the decoder will read (a TIFF tag given twice is refused);
2. OpenCV's own cap (OPENCV_IO_MAX_IMAGE_PIXELS) equals the pixel limit, so an image whose
   header fools us still cannot make the decoder allocate more than the limit;
3. after decoding, the real size must be the header's (or its 90-degree turn under EXIF).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from imagesearch.server import imaging
from imagesearch.server.config import Limits
from imagesearch.server.errors import InvalidArgument
from imagesearch.server.imaging import check_decoder_cap, decode_image
from tests.support.hostile_images import tiff, with_exif_orientation
from tests.support.images import encode, pattern
from tests.support.process import REPO


def test_a_tiff_giving_its_size_twice_is_refused_before_decoding():
    data = tiff(12000, 12000, also_claim=(64, 64))
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match="appears twice") as caught:
        decode_image(data, Limits(), "image")
    assert caught.value.reason == "IMAGE_UNDECODABLE"
    assert time.monotonic() - started < 1


def peak_rss_mb(code: str) -> float:
    """Run ``code`` in a fresh interpreter (the server package imported first) and return its peak RSS."""
    script = (
        "import resource, imagesearch.server\n"
        + textwrap.dedent(code)
        + ("\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    return float(done.stdout.split()[-1])


def test_the_decoder_cap_bounds_memory_when_the_header_check_is_bypassed(tmp_path):
    """cv2.imdecode straight on a 144-megapixel TIFF (the header check skipped) allocates nothing big."""
    path = tmp_path / "big.tiff"
    path.write_bytes(tiff(12000, 12000))
    baseline = peak_rss_mb("import cv2, numpy")
    peak = peak_rss_mb(
        f"""
        import cv2, numpy
        data = numpy.fromfile({str(path)!r}, numpy.uint8)
        try:
            cv2.imdecode(data, cv2.IMREAD_COLOR)
            raise SystemExit("decoded a 144-megapixel image past the cap")
        except cv2.error:
            pass
        """
    )
    assert peak - baseline < 50, f"peak RSS grew by {peak - baseline:.0f} MB"


def test_a_pixel_limit_above_the_decoder_cap_is_refused():
    check_decoder_cap(Limits())
    with pytest.raises(ValueError, match="OPENCV_IO_MAX_IMAGE_PIXELS"):
        check_decoder_cap(Limits(max_image_pixels=10**9))


def test_exif_orientation_reports_the_upright_size():
    jpeg = encode(pattern(3, size=(60, 100)), ".jpg")  # 100 wide, 60 high
    turned = decode_image(with_exif_orientation(jpeg, 6), Limits(), "image")
    assert (turned.width, turned.height) == (60, 100)
    assert turned.pixels.shape[:2] == (100, 60)
    plain = decode_image(with_exif_orientation(jpeg, 1), Limits(), "image")
    assert (plain.width, plain.height) == (100, 60) and plain.pixels.shape[:2] == (60, 100)


def test_an_image_that_decodes_to_another_size_than_its_header_is_refused(monkeypatch):
    """Whatever a decoder reads that our header reader did not, the decoded size gives it away."""
    png = encode(pattern(4, size=(40, 50)))
    monkeypatch.setattr(imaging.cv2, "imdecode", lambda data, flags: np.zeros((4000, 50, 3), np.uint8))
    with pytest.raises(InvalidArgument, match="header says 50x40 but the image decodes to 50x4000"):
        decode_image(png, Limits(), "image")
