"""Preprocessing: torchvision's geometry exactly, PIL's antialiased bilinear resize closely."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from imagesearch.plugins.cnn.preprocess import (
    center_crop,
    normalize,
    prepare_image,
    preprocess,
    resize_short_side,
    resized_size,
)
from imagesearch.plugins.cnn.recipes import TF_EFFICIENTNET_LITE, TORCHVISION_IMAGENET, Preprocessing
from imagesearch.server.config import Limits
from imagesearch.server.errors import InvalidArgument
from imagesearch.server.imaging import decode_image
from tests.cnn_fixtures import cosine_matrix, default_extractor, default_models_dir, jpeg_bytes, photos  # noqa: F401

# Measured (docs/models.md): mean |ours - PIL| per photo is 0.4-1.9 grey levels, and the
# EfficientNet-Lite0 embeddings of the two crops have cosine >= 0.994.
MEAN_ABS_TOLERANCE = 2.5
COSINE_TOLERANCE = 0.99


def pil_reference(rgb: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """torchvision's Resize + CenterCrop on a PIL image: PIL bilinear (antialiased) resize."""
    height, width = rgb.shape[:2]
    new_h, new_w = resized_size(height, width, spec.resize_short_side)
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
    return center_crop(resized, spec.crop_size)


def test_geometry_follows_torchvision():
    # torchvision: short side -> size, long side int(size * long / short) (truncated), crop offsets rounded.
    assert resized_size(300, 451, 256) == (256, 384)
    assert resized_size(451, 300, 256) == (384, 256)
    assert resized_size(427, 640, 232) == (232, 347)
    image = np.arange(5 * 8, dtype=np.uint8).reshape(5, 8, 1).repeat(3, axis=2)
    crop = center_crop(image, 3)
    assert crop.shape == (3, 3, 3)
    assert crop[0, 0, 0] == image[1, 2, 0]  # top = round(1.0) = 1, left = round(2.5) = 2 (banker's rounding)
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(image, 6)


@pytest.mark.parametrize("name", ["chelsea", "coffee", "china", "flower"])
def test_crop_matches_pil_reference_within_tolerance(name, photos, default_extractor):  # noqa: F811
    bgr = photos[name]
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    ours = prepare_image(bgr, TF_EFFICIENTNET_LITE)
    reference = pil_reference(rgb, TF_EFFICIENTNET_LITE)
    difference = np.abs(ours.astype(np.int16) - reference.astype(np.int16))

    assert ours.shape == reference.shape == (224, 224, 3)
    assert difference.mean() <= MEAN_ABS_TOLERANCE

    session_input = normalize(np.stack([ours, reference]), TF_EFFICIENTNET_LITE)
    from imagesearch.plugins.onnx_cnn import get_session

    session = get_session(default_extractor.onnx_path, default_extractor.sidecar, 1)
    (embeddings,) = session.run(["embedding"], {"input": session_input})
    assert cosine_matrix(embeddings[:1], embeddings[1:])[0, 0] >= COSINE_TOLERANCE


@pytest.mark.parametrize("name", ["coffee", "china"])
def test_area_shrinks_closer_to_pil_than_linear(name, photos):  # noqa: F811
    """Why INTER_AREA: plain bilinear without antialiasing drifts much further from the reference."""
    bgr = photos[name]
    spec = TF_EFFICIENTNET_LITE
    reference = pil_reference(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), spec)
    new_h, new_w = resized_size(*bgr.shape[:2], spec.resize_short_side)
    linear = center_crop(cv2.cvtColor(cv2.resize(bgr, (new_w, new_h)), cv2.COLOR_BGR2RGB), spec.crop_size)
    ours = prepare_image(bgr, spec)
    ours_error = np.abs(ours.astype(np.int16) - reference).mean()
    linear_error = np.abs(linear.astype(np.int16) - reference).mean()
    assert ours_error < 0.75 * linear_error


def test_enlarging_small_images_matches_pil(photos):  # noqa: F811
    small = cv2.resize(photos["coffee"], (150, 100), interpolation=cv2.INTER_AREA)
    reference = pil_reference(cv2.cvtColor(small, cv2.COLOR_BGR2RGB), TF_EFFICIENTNET_LITE)
    difference = np.abs(prepare_image(small, TF_EFFICIENTNET_LITE).astype(np.int16) - reference)
    assert difference.max() <= 1


def test_normalisation_and_layout():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    batch = preprocess([image, image], TORCHVISION_IMAGENET)
    assert batch.shape == (2, 3, 224, 224)
    assert batch.dtype == np.float32 and batch.flags.c_contiguous
    rgb = prepare_image(image, TORCHVISION_IMAGENET).astype(np.float64)
    # torchvision: ToTensor (x / 255) then Normalize(mean, std) with ImageNet's [0, 1] statistics
    expected = (rgb / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.abs(batch[0] - expected.transpose(2, 0, 1)).max() < 1e-5
    bgr_crop = center_crop(resize_short_side(image, 256), 224)
    assert np.array_equal(rgb[..., 0], bgr_crop[..., 2])  # channel order really is RGB


def test_preprocess_rejects_what_is_not_bgr_uint8():
    with pytest.raises(ValueError, match="image 1"):
        preprocess([np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10), np.uint8)], TF_EFFICIENTNET_LITE)
    with pytest.raises(ValueError, match="float32"):
        preprocess([np.zeros((10, 10, 3), np.float32)], TF_EFFICIENTNET_LITE)
    assert preprocess([], TF_EFFICIENTNET_LITE).shape == (0, 3, 224, 224)


def decode_reduced(data: bytes, min_side: int) -> np.ndarray:
    """The server's decode path, as the extractor sees it."""
    return decode_image(data, Limits(), "image", min_side).pixels


def test_decode_reduced_shrinks_large_jpegs_only_as_far_as_allowed(photos):  # noqa: F811
    large = cv2.resize(photos["china"], None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)  # 2560 x 1708
    data = jpeg_bytes(large, 92)
    assert decode_reduced(data, 256).shape == (427, 640, 3)  # 1/8 would leave 213 < 256, so 1/4
    assert decode_reduced(data, 512).shape == (854, 1280, 3)  # 1/4 would leave 427 < 512, so 1/2
    full = decode_reduced(data, 2000)
    assert full.shape[:2] == large.shape[:2]


def test_decode_reduced_other_formats_and_garbage(photos):  # noqa: F811
    ok, png = cv2.imencode(".png", photos["coffee"])
    assert ok
    assert (
        decode_reduced(png.tobytes(), 64).shape == photos["coffee"].shape
    )  # PNG has no cheap reduced decode
    with pytest.raises(InvalidArgument, match="not a decodable image"):
        decode_reduced(b"definitely not an image", 256)


def test_reduced_decoding_keeps_embeddings(photos, default_extractor):  # noqa: F811
    """Shrinking in the decoder to twice the resize target barely moves the embedding."""
    large = cv2.resize(photos["china"], None, fx=5, fy=5, interpolation=cv2.INTER_CUBIC)
    data = jpeg_bytes(large, 92)
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    reduced = decode_reduced(data, default_extractor.min_input_side)
    assert reduced.shape[0] < full.shape[0] // 2
    embeddings = default_extractor.extract([full, reduced])
    assert cosine_matrix(embeddings[:1], embeddings[1:])[0, 0] >= 0.99
