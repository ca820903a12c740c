"""kill -9 during TrainCollection: the collection restarts whole, with the old vocabulary or the
new one (never a mix), every image stored, and it still finds a copy of its photos."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from imagesearch.client import ImageItem, ImageSearchClient, ImageSearchError
from imagesearch.server.dataset_builder import available_sources, encode_jpeg, resize_long_side
from tests.support.process import tiny_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DELAYS_S = (0.05, 0.4, 1.0, 2.0)  # into the training: sampling, k-means, encoding, commit or after


def photos() -> dict[str, bytes]:
    found, _ = available_sources()
    images = {source.name: cv2.imread(str(path), cv2.IMREAD_COLOR) for source, path in found}
    return {
        name: encode_jpeg(resize_long_side(image, 480), 90)
        for name, image in images.items()
        if image is not None
    }


def check(client: ImageSearchClient, images: dict[str, bytes]) -> str:
    """Every image present with a vector of the collection's dimension, each encoded with the
    collection's current vocabulary (its own bytes, encoded now, match its stored vector exactly:
    a vector from another vocabulary would not), and a rotated copy found. Returns the version."""
    info = client.get_collection("c")
    assert info.image_count == len(images) and not info.read_only, info
    for name, content in images.items():
        vector = client.get_image(name, collection="c", include_vector=True).vector
        assert vector is not None and vector.shape == (info.dimension,)
        if vector.any():
            hit = client.search(content, collection="c", top_k=1).hits[0]
            assert hit.id == name and hit.score > 0.9999, (name, hit)
    name = "chelsea" if "chelsea" in images else sorted(images)[0]
    turned = cv2.rotate(cv2.imdecode(np.frombuffer(images[name], np.uint8), 1), cv2.ROTATE_90_CLOCKWISE)
    assert client.search(encode_jpeg(turned, 80), collection="c", top_k=3, rerank=10).hits[0].id == name
    return info.extractor_version


def test_kill_9_during_training_loses_nothing(tmp_path: Path) -> None:
    images = photos()
    data_dir = tmp_path / "data"
    server = tiny_server(data_dir)
    try:
        with ImageSearchClient(server.target) as client:
            client.create_collection("c", extractor="sift-bovw")
            client.add_images(
                [ImageItem(id=n, content=c, label=n) for n, c in images.items()], collection="c"
            )
            version = check(client, images)
        outcomes = []
        for round_number, delay in enumerate(DELAYS_S):
            with ImageSearchClient(server.target) as client:

                def train(client: ImageSearchClient = client, seed: int = round_number) -> None:
                    with contextlib.suppress(ImageSearchError):  # the kill cuts the call: the restart tells
                        client.train_collection("c", model_size=1024, seed=seed, timeout=120)

                worker = threading.Thread(target=train)
                worker.start()
                threading.Event().wait(delay)
                server.kill9()
                worker.join(30)
            server = tiny_server(data_dir)
            with ImageSearchClient(server.target) as client:
                after = check(client, images)
            outcomes.append("unchanged" if after == version else "trained")
            version = after
        print("state after kill -9, by delay:", dict(zip(DELAYS_S, outcomes, strict=True)))
    finally:
        server.kill9()
