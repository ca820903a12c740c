"""RootSIFT local features: extraction and compact storage.

RootSIFT (Arandjelović & Zisserman 2012) is SIFT with each descriptor L1-normalised and
square-rooted, so that L2 distance between RootSIFT vectors compares them by the Hellinger
kernel, which matches better than Euclidean SIFT at no extra cost.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import cv2
import numpy as np

DESCRIPTOR_DIM = 128
KEYPOINT_FIELDS = 4  # x, y, size, angle
_MIN_SIDE = 16  # below this SIFT's pyramid has nothing to work with

PACK_VERSION = 1
_HEADER = struct.Struct("<BIII")  # version, width, height, keypoint count
BYTES_PER_KEYPOINT = KEYPOINT_FIELDS * 4 + DESCRIPTOR_DIM
"""144: float32 x, y, size, angle (16 B) + one uint8 per descriptor value (128 B).
1000 keypoints pack into 13 + 144 000 = 144 013 bytes."""
QUANTISATION_ERROR = 0.5 / 255
"""The largest error ``unpack`` introduces in any descriptor value (RootSIFT values lie in [0, 1])."""


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """The keypoints and RootSIFT descriptors of one image.

    ``keypoints`` is (n, 4) float32 ``x, y, size, angle`` in the pixel frame of the image as given
    (not the downscaled copy SIFT saw), so geometry can be compared across images of any size.
    ``descriptors`` is (n, 128) float32; ``image_size`` is ``(width, height)``.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        n = len(self.keypoints)
        if self.keypoints.shape != (n, KEYPOINT_FIELDS) or self.descriptors.shape != (n, DESCRIPTOR_DIM):
            raise ValueError(
                f"keypoints {self.keypoints.shape} and descriptors {self.descriptors.shape} "
                f"must be (n, {KEYPOINT_FIELDS}) and (n, {DESCRIPTOR_DIM})"
            )

    def __len__(self) -> int:
        return len(self.keypoints)

    @property
    def points(self) -> np.ndarray:
        """(n, 2) float32 keypoint coordinates, the input geometry estimation wants."""
        return np.ascontiguousarray(self.keypoints[:, :2])

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> LocalFeatures:
        return cls(
            np.zeros((0, KEYPOINT_FIELDS), np.float32),
            np.zeros((0, DESCRIPTOR_DIM), np.float32),
            image_size,
        )


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """L1-normalise each SIFT descriptor, then take the square root (rows come out L2-unit)."""
    descriptors = np.asarray(descriptors, dtype=np.float32)
    sums = np.abs(descriptors).sum(axis=1, keepdims=True)
    normalised = np.divide(descriptors, sums, out=np.zeros_like(descriptors), where=sums > 0)
    return np.sqrt(np.maximum(normalised, 0.0))


# -------------------------------------------------------------------------- extraction

_local = threading.local()


def _sift(max_keypoints: int) -> cv2.SIFT:
    """This thread's detector: cv2 detectors keep scratch state and are not documented thread-safe."""
    detectors: dict[int, cv2.SIFT] | None = getattr(_local, "detectors", None)
    if detectors is None:
        detectors = _local.detectors = {}
    if max_keypoints not in detectors:
        detectors[max_keypoints] = cv2.SIFT_create(nfeatures=max_keypoints)
    return detectors[max_keypoints]


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
    return cv2.cvtColor(image, code)


def _strongest(keypoints: np.ndarray, responses: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the ``limit`` strongest keypoints; ties broken by position so the order is stable."""
    order = np.lexsort((keypoints[:, 3], keypoints[:, 2], keypoints[:, 1], keypoints[:, 0], -responses))
    return order[:limit]


def extract_local(image_bgr: np.ndarray, max_side: int = 640, max_keypoints: int = 1000) -> LocalFeatures:
    """RootSIFT features of a BGR (or grey) uint8 image, at most ``max_keypoints``, strongest first.

    The image is shrunk (INTER_AREA) until its longest side is at most ``max_side``: SIFT's cost
    grows with pixels while matching gains little past that size. Keypoints are mapped back to the
    original frame. An image too small or too flat to have keypoints gives empty arrays.
    """
    height, width = image_bgr.shape[:2]
    if min(height, width) < _MIN_SIDE:
        return LocalFeatures.empty((width, height))
    grey = _grey(image_bgr)
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    found, descriptors = _sift(max_keypoints).detectAndCompute(grey, None)
    if not found or descriptors is None:
        return LocalFeatures.empty((width, height))
    keypoints = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in found], np.float32)
    responses = np.array([k.response for k in found], np.float32)
    keep = _strongest(keypoints, responses, max_keypoints)
    keypoints = keypoints[keep]
    # Pixel centres: x_original + 0.5 = (x_small + 0.5) * (width / small_width).
    sx, sy = width / grey.shape[1], height / grey.shape[0]
    keypoints[:, 0] = (keypoints[:, 0] + 0.5) * sx - 0.5
    keypoints[:, 1] = (keypoints[:, 1] + 0.5) * sy - 0.5
    keypoints[:, 2] *= (sx + sy) / 2
    return LocalFeatures(keypoints, root_sift(descriptors[keep]), (width, height))


# -------------------------------------------------------------------------- storage


def pack(features: LocalFeatures) -> bytes:
    """Serialise for storage: ``BYTES_PER_KEYPOINT`` bytes a keypoint plus a 13-byte header.

    Descriptors are quantised to uint8 (RootSIFT value × 255, rounded), which changes matching
    distances by well under the gaps the ratio test relies on; keypoints stay float32 because
    RANSAC's 5 px threshold needs sub-pixel positions in images of any size.
    """
    width, height = features.image_size
    header = _HEADER.pack(PACK_VERSION, width, height, len(features))
    quantised = np.clip(np.rint(features.descriptors * 255.0), 0, 255).astype(np.uint8)
    return header + features.keypoints.astype("<f4").tobytes() + quantised.tobytes()


def packed_count(data: bytes) -> int:
    """The keypoint count in ``pack``'s header, without unpacking the rest."""
    if len(data) < _HEADER.size:
        raise ValueError(f"packed features need at least {_HEADER.size} bytes, got {len(data)}")
    return int(_HEADER.unpack_from(data)[3])


def unpack(data: bytes) -> LocalFeatures:
    """Inverse of ``pack``; descriptor values come back within ``QUANTISATION_ERROR``."""
    if len(data) < _HEADER.size:
        raise ValueError(f"packed features need at least {_HEADER.size} bytes, got {len(data)}")
    version, width, height, count = _HEADER.unpack_from(data)
    if version != PACK_VERSION:
        raise ValueError(f"packed features have version {version}; this code reads {PACK_VERSION}")
    expected = _HEADER.size + count * BYTES_PER_KEYPOINT
    if len(data) != expected:
        raise ValueError(f"packed features for {count} keypoints need {expected} bytes, got {len(data)}")
    split = _HEADER.size + count * KEYPOINT_FIELDS * 4
    keypoints = np.frombuffer(data, "<f4", count * KEYPOINT_FIELDS, _HEADER.size)
    quantised = np.frombuffer(data, np.uint8, count * DESCRIPTOR_DIM, split)
    return LocalFeatures(
        keypoints.astype(np.float32).reshape(count, KEYPOINT_FIELDS),
        (quantised.astype(np.float32) / 255.0).reshape(count, DESCRIPTOR_DIM),
        (width, height),
    )
