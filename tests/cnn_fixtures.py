"""Fixtures for the CNN extractor tests: the default model, real photos, helpers.

Import the fixtures you use into a test module (``from tests.cnn_fixtures import ...``).
The default model comes from $IMAGESEARCH_MODELS when `make models` built it
there; otherwise it is exported once per test session into a temp dir (the
export itself is memoised here, because a session fixture imported into several
modules is instantiated once per module).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from imagesearch.plugins.onnx_cnn import OnnxCnnExtractor, discover
from imagesearch.server.config import MODELS_ENV

DEFAULT_MODEL = "efficientnet-lite0"
_exported: dict[str, Path] = {}


def _default_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get(MODELS_ENV)
    if configured:
        directory = Path(configured)
        if (directory / f"{DEFAULT_MODEL}.onnx").is_file() and (
            directory / f"{DEFAULT_MODEL}.json"
        ).is_file():
            return directory
    if DEFAULT_MODEL not in _exported:
        from imagesearch.plugins.cnn.export import export_recipe

        directory = tmp_path_factory.mktemp("default-model")
        export_recipe(DEFAULT_MODEL, directory, progress=lambda message: None)
        _exported[DEFAULT_MODEL] = directory
    return _exported[DEFAULT_MODEL]


@pytest.fixture(scope="session")
def default_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding efficientnet-lite0.onnx + .json (possibly among other models)."""
    return _default_models_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def default_extractor(default_models_dir: Path) -> OnnxCnnExtractor:
    extractors, _ = discover(default_models_dir)
    by_name = {extractor.name: extractor for extractor in extractors}
    return by_name[DEFAULT_MODEL]


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos shipped by scikit-image and scikit-learn, as BGR uint8."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    return {
        "chelsea": _bgr(data.chelsea()),
        "coffee": _bgr(data.coffee()),
        "china": _bgr(load_sample_image("china.jpg")),
        "flower": _bgr(load_sample_image("flower.jpg")),
    }


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


def distorted_copy(image: np.ndarray) -> np.ndarray:
    """Resized to 60%, JPEG quality 30, then the central 80% cropped: a near-duplicate."""
    height, width = image.shape[:2]
    small = cv2.resize(image, (int(width * 0.6), int(height * 0.6)), interpolation=cv2.INTER_AREA)
    decoded = cv2.imdecode(np.frombuffer(jpeg_bytes(small, 30), dtype=np.uint8), cv2.IMREAD_COLOR)
    h, w = decoded.shape[:2]
    top, left = int(h * 0.1), int(w * 0.1)
    return np.ascontiguousarray(decoded[top : h - top, left : w - left])


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T
