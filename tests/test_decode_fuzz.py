"""Mutated and truncated images never crash the decoder path: a result or a clear domain error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagesearch.server.config import Limits
from imagesearch.server.errors import InvalidArgument, ResourceExhausted
from imagesearch.server.imaging import decode_image
from tests.support.fuzzing import fuzz_examples
from tests.support.images import encode, pattern

SEEDS = {ext: encode(pattern(5, size=(40, 56)), ext) for ext in (".jpg", ".png", ".webp", ".bmp", ".tiff")}
LIMITS = Limits(max_image_pixels=4_000_000)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@settings(max_examples=fuzz_examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_damaged_images_decode_or_fail_cleanly(data):
    try:
        decoded = decode_image(data, LIMITS, "image", min_side=16)
    except (InvalidArgument, ResourceExhausted) as error:
        assert error.field == "image" and error.message
    else:
        assert decoded.pixels.ndim == 3 and decoded.pixels.shape[2] == 3
        assert decoded.pixels.shape[0] * decoded.pixels.shape[1] <= LIMITS.max_image_pixels


@pytest.mark.parametrize("ext", sorted(SEEDS))
def test_every_truncation_of_a_valid_image_is_rejected(ext):
    """Half an image is an error, never a silently half-grey picture in the index."""
    data = SEEDS[ext]
    accepted = []
    cuts = [*range(0, len(data) - 16, max(1, len(data) // 60)), *range(len(data) - 16, len(data))]
    for cut in cuts:
        try:
            decode_image(data[:cut], LIMITS, "image")
            accepted.append(cut)
        except InvalidArgument:
            pass
    assert accepted == [], f"{ext}: truncated to {accepted} bytes of {len(data)} and still decoded"
