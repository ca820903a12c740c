"""Image preprocessing for the CNN extractors, in OpenCV + NumPy only (no torch, no PIL at serve time).

Geometry follows torchvision exactly: the short side is resized to
``resize_short_side`` with the long side truncated (``int(size * long / short)``),
then a centre crop whose offsets are ``round((h - crop) / 2)``.

Interpolation: torchvision resizes PIL images with PIL's bilinear filter, which
is antialiased (its support grows with the scale factor). OpenCV's INTER_LINEAR
is not antialiased and aliases badly when shrinking photos by 4x or more, so we
use INTER_AREA (a box filter, also antialiased) to shrink and INTER_LINEAR to
enlarge. The residual difference to the PIL reference is measured by
tests/test_cnn_preprocess.py and reported in docs/models.md.
"""

from __future__ import annotations

from collections.abc import Sequence

# isort: off
import cv2

# isort: on
import numpy as np

from imagesearch.plugins.cnn.recipes import AREA_DOWN_LINEAR_UP, Preprocessing


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) after scaling the short side to ``short_side``, as torchvision computes it."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def resize_short_side(
    image: np.ndarray, short_side: int, interpolation: str = AREA_DOWN_LINEAR_UP
) -> np.ndarray:
    if interpolation != AREA_DOWN_LINEAR_UP:
        raise ValueError(f"unsupported interpolation {interpolation!r}")
    height, width = image.shape[:2]
    new_h, new_w = resized_size(height, width, short_side)
    if (new_h, new_w) == (height, width):
        return image
    shrinking = new_h * new_w < height * width
    flag = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=flag)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """A ``size`` x ``size`` view from the middle; the image must be at least that large."""
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image")
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return image[top : top + size, left : left + size]


def check_bgr(image: np.ndarray, index: int = 0) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image {index}: expected a BGR uint8 array of shape (h, w, 3), got {dtype} {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image {index}: empty image {image.shape}")


def prepare_image(image: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """One BGR uint8 image -> the recipe's crop as uint8 HWC in the model's colour order."""
    crop = center_crop(resize_short_side(image, spec.resize_short_side, spec.interpolation), spec.crop_size)
    if spec.colour_order == "RGB":
        return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(crop)


def normalize(crops: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 (n, h, w, 3) -> float32 (n, 3, h, w) with ``(x - mean) / std`` per channel."""
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    # Transpose the uint8 view and convert in one C-order copy, then work in place:
    # 6x faster than converting first and transposing the float copy.
    batch = crops.transpose(0, 3, 1, 2).astype(np.float32, order="C")
    batch -= mean
    batch /= std
    return batch


def preprocess(images: Sequence[np.ndarray], spec: Preprocessing) -> np.ndarray:
    """BGR uint8 images of any size -> the network input batch, float32 NCHW."""
    crops = []
    for index, image in enumerate(images):
        check_bgr(image, index)
        crops.append(prepare_image(image, spec))
    if not crops:
        return np.zeros((0, 3, spec.crop_size, spec.crop_size), dtype=np.float32)
    return normalize(np.stack(crops), spec)
