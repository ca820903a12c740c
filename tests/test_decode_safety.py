"""The decoder's three defences against images that lie about their size, and EXIF orientation.

1. the header check reads the size the decoder will read (a TIFF tag given twice is refused);
2. OpenCV's own cap (OPENCV_IO_MAX_IMAGE_PIXELS) equals the pixel limit, so an image whose
   header fools us still cannot make the decoder allocate more than the limit;
3. after decoding, the real size must be the header's (or its 90-degree turn under EXIF).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from imagesearch.server import imaging
from imagesearch.server.config import Limits
from imagesearch.server.errors import InvalidArgument
from imagesearch.server.imaging import check_decoder_cap, decode_image
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.support.hostile_images import tiff, with_exif_orientation
from tests.support.images import encode, pattern
from tests.support.process import REPO, tiny_server


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


@pytest.mark.e2e
def test_no_hostile_image_grows_the_server_past_its_pixel_budget(data_dir):
    """A real server process is sent images whose headers lie or that are huge; its peak RSS
    (VmHWM) may grow by no more than the decoded-pixel budget of one image plus a small constant."""
    server = tiny_server(data_dir, "limits.max_image_pixels=1000000")
    hostile = [
        tiff(12000, 12000, also_claim=(64, 64)),
        tiff(64, 64, also_claim=(12000, 12000)),
        tiff(12000, 12000),
        png_claiming(60000, 60000),
    ]
    try:
        with grpc.insecure_channel(
            server.target, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as chan:
            stub = pb_grpc.ImageSearchServiceStub(chan)
            stub.AddImages(pb.AddImagesRequest(images=[pb.ImageInput(id="warm", content=encode(pattern(1)))]))
            before = peak_rss_of(server.proc.pid)
            for data in hostile:
                for call, request in (
                    (stub.AddImages, pb.AddImagesRequest(images=[pb.ImageInput(content=data)])),
                    (stub.Search, pb.SearchRequest(image=data)),
                ):
                    with pytest.raises(grpc.RpcError) as caught:
                        call(request, timeout=10)
                    assert caught.value.code() in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    )
            grown = peak_rss_of(server.proc.pid) - before
        budget = 3 * 1_000_000  # one image at the limit, BGR
        assert grown < budget + 30 * 2**20, f"peak RSS grew by {grown >> 20} MB"
    finally:
        assert server.terminate() == 0


def peak_rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (the CRC fixed, so only the size lies)."""
    real = encode(pattern(1, size=(8, 8)))
    ihdr = struct.pack(">II", width, height) + real[24:29]
    return real[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + real[33:]
