"""Synthetic test images: distinct, deterministic, encodable in any format."""

from __future__ import annotations

import cv2
import numpy as np


def pattern(seed: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A BGR image with random blobs and gradients; different seeds look different."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.zeros((h, w, 3), np.float32)
    for channel in range(3):
        fx, fy, phase = [*rng.uniform(0.5, 4, 2).tolist(), rng.uniform(0, 6.3)]
        image[..., channel] = 127 + 120 * np.sin(fx * x / w * 6.28 + fy * y / h * 6.28 + phase)
    for _ in range(4):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.circle(image, center, int(rng.integers(1, max(2, h // 3))), color, -1)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, ext: str = ".png", quality: int = 95) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(ext, image, params)
    assert ok
    return data.tobytes()


def variant(image: np.ndarray) -> np.ndarray:
    """A lightly edited copy: 90% crop, resized back, slightly brighter."""
    h, w = image.shape[:2]
    crop = image[h // 20 : h - h // 20, w // 20 : w - w // 20]
    return cv2.convertScaleAbs(cv2.resize(crop, (w, h)), alpha=1.05, beta=3)
