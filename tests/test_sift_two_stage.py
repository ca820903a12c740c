"""SIFT two-stage retrieval through the real server: local features kept with the collection,
TrainCollection (versioned, restored on restart, never mixed), geometric re-ranking of SIFT and
CNN candidates (the hybrid), and the bad input around them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np
import pytest

from imagesearch.client import (
    FailedPrecondition,
    ImageItem,
    ImageSearchClient,
    InvalidArgument,
    Unavailable,
)
from imagesearch.server.app import RunningServer, run_server
from imagesearch.server.dataset_builder import available_sources, encode_jpeg, resize_long_side
from tests.conftest import tiny_config
from tests.support.stopping import stop_during
from tests.support.tiny_plugin import TINY_PLUGIN

pytestmark = pytest.mark.e2e


def photos() -> dict[str, np.ndarray]:
    """Every photo installed packages ship, 480 px on the long side (BGR)."""
    found, _ = available_sources()
    loaded = {source.name: cv2.imread(str(path), cv2.IMREAD_COLOR) for source, path in found}
    return {name: resize_long_side(image, 480) for name, image in loaded.items() if image is not None}


def pasted(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``image`` at 40% scale in the middle of ``background``: a copy a CNN embedding misses."""
    small = cv2.resize(image, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)
    out = cv2.resize(background, (640, 480), interpolation=cv2.INTER_AREA)
    y, x = (out.shape[0] - small.shape[0]) // 3, (out.shape[1] - small.shape[1]) // 2
    out[y : y + small.shape[0], x : x + small.shape[1]] = small
    return out


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {name: encode_jpeg(image, 90) for name, image in photos().items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("two-stage") / "data"
    with run_server(tiny_config(data_dir), extra_plugins=[TINY_PLUGIN]) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[ImageSearchClient]:
    with ImageSearchClient(server.target) as connected:
        yield connected


def fill(client: ImageSearchClient, name: str, images: dict[str, bytes], **create) -> None:
    client.create_collection(name, **create)
    client.add_images(
        [ImageItem(id=key, content=data, label=key) for key, data in images.items()], collection=name
    )


def test_plugins_list_the_local_features_and_what_encodes_them(client: ImageSearchClient) -> None:
    plugins = client.list_plugins()
    assert [f.name for f in plugins.local_features] == ["sift"]
    assert "RootSIFT" in plugins.local_features[0].description
    for name in ("sift-bovw", "sift-vlad"):
        info = plugins.extractor(name)
        assert info.trainable and info.local_features == "sift"
    assert not plugins.extractor("efficientnet-lite0").trainable


def test_a_sift_collection_keeps_local_features_and_reports_their_size(
    client: ImageSearchClient, images: dict[str, bytes]
) -> None:
    fill(client, "kept", images, extractor="sift-bovw")
    info = client.get_collection("kept")
    assert info.local_features == "sift"
    # 144 bytes a keypoint, at most 1000 keypoints an image, a 13-byte header.
    assert 13 * len(images) < info.local_features_bytes <= len(images) * (13 + 144 * 1000)
    client.remove_images(["astronaut"], collection="kept")
    assert client.get_collection("kept").local_features_bytes < info.local_features_bytes


def test_geometric_rerank_finds_pasted_copies_and_reports_inliers(
    client: ImageSearchClient, images: dict[str, bytes]
) -> None:
    fill(client, "rerank", images, extractor="sift-vlad")
    names = sorted(images)
    found = 0
    for at, name in enumerate(names):
        background = cv2.imdecode(
            np.frombuffer(images[names[(at + 1) % len(names)]], np.uint8), cv2.IMREAD_COLOR
        )
        query = encode_jpeg(pasted(cv2.imdecode(np.frombuffer(images[name], np.uint8), 1), background), 90)
        result = client.search(query, collection="rerank", top_k=2, rerank=len(images))
        inliers = [hit.inliers for hit in result.hits]
        verified = [n for n in inliers if n >= 10]  # SiftLocalFeatures.min_inliers: evidence, ranked first
        assert inliers[: len(verified)] == sorted(verified, reverse=True)
        assert result.timings.rerank_ms > 0
        found += name in result.ids
    assert found >= 0.9 * len(names), f"pasted source in the top 2 for {found} of {len(names)}"
    plain = client.search(images[names[0]], collection="rerank", top_k=3)
    assert all(hit.inliers == 0 for hit in plain.hits) and plain.timings.rerank_ms == 0


def test_the_hybrid_reranks_cnn_candidates_by_geometry(
    client: ImageSearchClient, images: dict[str, bytes]
) -> None:
    fill(client, "hybrid", images, extractor="efficientnet-lite0", local_features="sift")
    info = client.get_collection("hybrid")
    assert info.local_features == "sift" and info.local_features_bytes > 0
    name = sorted(images)[0]
    by_id = client.search(image_id=name, collection="hybrid", top_k=3, rerank=10)
    assert by_id.hits[0].id == name and by_id.hits[0].inliers > 20
    assert by_id.hits[1].inliers < by_id.hits[0].inliers


def test_a_hybrid_without_its_local_features_plugin_says_so_and_still_answers_plain_queries(
    tmp_path: Path, images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restarted with the sift plugin disabled, a CNN collection keeping SIFT features reported
    READY with no state_reason while it refused every image search, re-ranked or not (an outside
    test). A plain query needs no local features; adds and re-ranking do, and GetCollection says so."""
    config = tiny_config(tmp_path / "data")
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        fill(client, "hybrid", images, extractor="tiny-8x8", local_features="sift")
    query = images[sorted(images)[0]]
    monkeypatch.setenv("IMAGESEARCH_DISABLE_PLUGINS", "sift")
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        info = client.get_collection("hybrid")
        assert "re-ranking are refused: local features 'sift'" in info.state_reason
        assert client.search(query, collection="hybrid", top_k=3).hits[0].id == sorted(images)[0]
        with pytest.raises(FailedPrecondition) as refused:
            client.search(query, collection="hybrid", top_k=3, rerank=10)
        assert refused.value.reason == "LOCAL_FEATURES_UNAVAILABLE"
        with pytest.raises(FailedPrecondition):
            client.add_images([ImageItem(id="new", content=query)], collection="hybrid")


def test_rerank_needs_local_features_and_an_image(
    client: ImageSearchClient, images: dict[str, bytes]
) -> None:
    client.create_collection("plain-cnn", extractor="efficientnet-lite0")
    with pytest.raises(FailedPrecondition) as refused:
        client.search(next(iter(images.values())), collection="plain-cnn", rerank=10)
    assert refused.value.reason == "RERANK_UNAVAILABLE" and "local_features" in str(refused.value)
    client.create_collection("vlad-bad", extractor="sift-vlad")
    with pytest.raises(InvalidArgument):
        client.search(vector=np.zeros(32 * 128, np.float32), collection="vlad-bad", rerank=10)
    with pytest.raises(InvalidArgument) as too_many:
        client.search(next(iter(images.values())), collection="vlad-bad", rerank=100_000)
    assert too_many.value.field_violations[0].field == "rerank.candidates"
    with pytest.raises(InvalidArgument) as vector:
        client.add_images([ImageItem(id="v", vector=np.ones(32 * 128, np.float32))], collection="vlad-bad")
    assert vector.value.reason == "VECTOR_NOT_ACCEPTED"
    with pytest.raises(InvalidArgument) as mismatch:
        client.create_collection("vlad-orb", extractor="sift-vlad", local_features="orb")
    assert mismatch.value.reason == "LOCAL_FEATURES_MISMATCH"
    with pytest.raises(InvalidArgument) as unknown:
        client.create_collection("cnn-orb", extractor="efficientnet-lite0", local_features="orb")
    assert unknown.value.reason == "UNKNOWN_LOCAL_FEATURES" and "sift" in str(unknown.value)


def test_an_image_without_keypoints_is_stored_with_a_note(client: ImageSearchClient) -> None:
    client.create_collection("flat-colour", extractor="sift-bovw")
    flat = encode_jpeg(np.full((64, 64, 3), 128, np.uint8), 90)
    result = client.add_images([ImageItem(id="flat", content=flat)], collection="flat-colour")
    assert result.added_count == 1 and "no sift keypoints" in result.results[0].note
    record = client.get_image("flat", collection="flat-colour", include_vector=True)
    assert record.vector is not None and not record.vector.any()
    assert client.search(flat, collection="flat-colour", rerank=5).hits[0].inliers == 0


def test_a_vector_added_where_images_keep_local_features_says_it_has_none(client: ImageSearchClient) -> None:
    """It can never be re-ranked; it was stored without a word (an outside test)."""
    client.create_collection("cnn-sift-vector", extractor="efficientnet-lite0", local_features="sift")
    vector = ImageItem(id="v", vector=np.ones(1280, np.float32))
    result = client.add_images([vector], collection="cnn-sift-vector")
    assert result.added_count == 1 and "without sift local features" in result.results[0].note


def test_training_with_too_few_images_says_how_many_are_needed(client: ImageSearchClient, images) -> None:
    client.create_collection("too-few", extractor="sift-bovw")
    client.add_images([ImageItem(id="one", content=next(iter(images.values())))], collection="too-few")
    with pytest.raises(FailedPrecondition) as refused:
        client.train_collection("too-few")
    assert refused.value.reason == "NOT_ENOUGH_TRAINING_DATA"
    assert "at least 2 images" in str(refused.value)
    for size in (-1, 16_385, 2**31 - 1):  # past sift-bovw's max_model_size: refused before any fit
        with pytest.raises(InvalidArgument) as too_big:
            client.train_collection("too-few", model_size=size)
        assert too_big.value.reason == "BAD_MODEL_SIZE" and "16384" in str(too_big.value)
    with pytest.raises(FailedPrecondition) as not_trainable:
        client.train_collection("default")  # the tiny test extractor: nothing to fit
    assert not_trainable.value.reason == "NOT_TRAINABLE"


def names(client: ImageSearchClient) -> set[str]:
    return {info.name for info in client.list_collections()}


def test_training_refits_reencodes_and_survives_a_restart(tmp_path: Path, images: dict[str, bytes]) -> None:
    config = tiny_config(tmp_path / "data")
    query = encode_jpeg(
        cv2.rotate(cv2.imdecode(np.frombuffer(images["chelsea"], np.uint8), 1), cv2.ROTATE_90_CLOCKWISE), 80
    )
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        fill(client, "trained", images, extractor="sift-bovw")
        before = client.get_collection("trained")
        old_vector = client.get_image("chelsea", collection="trained", include_vector=True).vector
        trained = client.train_collection("trained", model_size=256, seed=7)
        after = trained.collection
        assert trained.previous_extractor_version == before.extractor_version != after.extractor_version
        assert after.dimension == 256 and after.image_count == len(images)
        assert trained.reencoded_images == len(images) == trained.training_images
        new_vector = client.get_image("chelsea", collection="trained", include_vector=True).vector
        assert new_vector is not None and new_vector.shape == (256,) and old_vector.shape == (32,)
        with pytest.raises(FailedPrecondition) as stale:
            client.search(vector=new_vector, collection="trained", extractor_version=before.extractor_version)
        assert stale.value.reason == "EXTRACTOR_VERSION_MISMATCH"
        assert client.search(
            vector=new_vector, collection="trained", extractor_version=after.extractor_version
        )
        hits = client.search(query, collection="trained", top_k=5, rerank=10).hits
        assert hits[0].id == "chelsea"
        client.add_images([ImageItem(id="late", content=images["coffee"])], collection="trained")
        assert client.get_image("late", collection="trained", include_vector=True).vector.shape == (256,)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        restored = client.get_collection("trained")
        assert restored.extractor_version == after.extractor_version and restored.dimension == 256
        again = client.search(query, collection="trained", top_k=5, rerank=10).hits
        assert [(h.id, h.inliers) for h in again] == [(h.id, h.inliers) for h in hits]
        # The same images and seed give the same vocabulary, so the same version.
        client.remove_images(["late"], collection="trained")
        assert client.train_collection("trained", model_size=256, seed=7).collection.extractor_version == (
            after.extractor_version
        )


def test_a_stop_during_a_long_vocabulary_fit_ends_the_fit_at_once(
    tmp_path: Path, images: dict[str, bytes]
) -> None:
    """SIGTERM while TrainCollection fits a large vocabulary: the k-means stops at its next
    iteration, so the server stops within its grace, not when the fit would have ended (a
    16,384-word fit is minutes: the stop's watchdog gave up first, exit code 1). The training is
    refused as SHUTTING_DOWN and the collection keeps its vocabulary across the restart."""
    config = tiny_config(tmp_path / "data")
    server = ExitStack()
    running = server.enter_context(run_server(config, extra_plugins=[TINY_PLUGIN]))
    with ImageSearchClient(running.target) as client:  # outlives the server: its call must end
        fill(client, "big", images, extractor="sift-bovw")
        before = client.get_collection("big").extractor_version
        # 6,000 words over the ~27,000 descriptors of these photos: ~10 s here (grace 2 s in tiny_config)
        stopped_after, outcome = stop_during(
            server, lambda: client.train_collection("big", model_size=6000, seed=1)
        )
    assert stopped_after < 4.0, f"the stop waited {stopped_after:.1f} s for the fit"
    assert isinstance(outcome, Unavailable) and outcome.reason == "SHUTTING_DOWN", outcome
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        assert client.get_collection("big").extractor_version == before


def test_the_train_and_search_commands(
    client: ImageSearchClient, server: RunningServer, images: dict[str, bytes], tmp_path: Path, capsys
) -> None:
    from imagesearch.server.cli import main

    fill(client, "cli", images, extractor="sift-vlad")
    assert main(["train", "--collection", "cli", "--words", "16", "--target", server.target]) == 0
    out = capsys.readouterr().out
    assert f"fitted on {len(images)} images" in out and "dimension 2048" in out
    assert client.get_collection("cli").dimension == 16 * 128
    query = tmp_path / "q.jpg"
    query.write_bytes(images["chelsea"])
    assert (
        main(
            [
                "search",
                str(query),
                "--collection",
                "cli",
                "--rerank",
                "5",
                "-k",
                "2",
                "--target",
                server.target,
            ]
        )
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-1] == "inliers" and table[1].split()[1] == "chelsea"
    assert main(["train", "--collection", "too-few-cli", "--target", server.target]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def test_vlad_reduced_by_pca_when_configured(tmp_path: Path, images: dict[str, bytes]) -> None:
    config = tiny_config(tmp_path / "data", plugins={"sift": {"vlad_pca_dim": 8}})
    query = encode_jpeg(
        cv2.rotate(cv2.imdecode(np.frombuffer(images["chelsea"], np.uint8), 1), cv2.ROTATE_90_CLOCKWISE), 80
    )
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        client.create_collection("few", extractor="sift-vlad")
        client.add_images([ImageItem(id=k, content=images[k]) for k in sorted(images)[:3]], collection="few")
        with pytest.raises(FailedPrecondition, match="8-d PCA of VLAD needs at least 8 images"):
            client.train_collection("few", model_size=4)
        fill(client, "pca", images, extractor="sift-vlad")
        trained = client.train_collection("pca", model_size=16).collection
        assert trained.dimension == 8 and ".pca8-" in trained.extractor_version
        vector = client.get_image("chelsea", collection="pca", include_vector=True).vector
        assert vector.shape == (8,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-4
        assert client.search(query, collection="pca", top_k=3, rerank=10).hits[0].id == "chelsea"


def test_search_batch_reranks_each_query_as_search_does(
    client: ImageSearchClient, images: dict[str, bytes]
) -> None:
    from imagesearch.client import Query

    if "batch" not in names(client):
        fill(client, "batch", images, extractor="sift-vlad")
    chosen = sorted(images)[:3]
    alone = [client.search(images[name], collection="batch", top_k=3, rerank=10) for name in chosen]
    together = client.search_batch(
        [Query(image=images[n], collection="batch", top_k=3, rerank=10) for n in chosen]
    )
    assert [[(h.id, h.inliers) for h in r.hits] for r in together] == [
        [(h.id, h.inliers) for h in r.hits] for r in alone
    ]
    assert all(r.hits[0].inliers >= 10 for r in together)


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_training_rebuilds_approximate_indexes_at_the_new_dimension(
    client: ImageSearchClient, images: dict[str, bytes], index_type: str
) -> None:
    params = {"ivf": {"nlist": 4, "nprobe": 4, "train_size": 8}} if index_type == "ivf" else {}
    name = f"approx-{index_type}"
    fill(client, name, images, extractor="sift-bovw", index_type=index_type, **params)
    trained = client.train_collection(name, model_size=128).collection
    assert trained.dimension == 128 and trained.image_count == len(images) and not trained.read_only
    assert trained.index_trained == (index_type == "ivf")
    query = encode_jpeg(
        cv2.rotate(cv2.imdecode(np.frombuffer(images["coffee"], np.uint8), 1), cv2.ROTATE_180), 85
    )
    assert client.search(query, collection=name, top_k=3, rerank=10).hits[0].id == "coffee"


def test_training_under_concurrent_adds_and_searches_never_mixes_vocabularies(
    client: ImageSearchClient, server: RunningServer, images: dict[str, bytes]
) -> None:
    """Adds and re-ranked image searches run while the collection is retrained: every call succeeds
    (a query encoded with the replaced vocabulary is encoded again from its local features), and
    afterwards every image, added before, during or after, is encoded with the final vocabulary
    (its own bytes, encoded now, find it with cosine 1)."""

    from imagesearch.client import Aborted

    fill(client, "busy", images, extractor="sift-bovw")
    flipped = {
        f"{name}-flip": encode_jpeg(cv2.flip(cv2.imdecode(np.frombuffer(data, np.uint8), 1), 0), 90)
        for name, data in sorted(images.items())[:12]
    }
    stop, failures, aborted = threading.Event(), [], []

    def searcher() -> None:
        with ImageSearchClient(server.target) as own:
            while not stop.is_set():
                try:
                    own.search(images["chelsea"], collection="busy", top_k=3, rerank=10)
                except Aborted as error:
                    aborted.append(error.reason)
                except Exception as error:  # any other failure fails the test
                    failures.append(error)

    def adder() -> None:
        with ImageSearchClient(server.target) as own:
            for key, data in flipped.items():
                try:
                    own.add_images([ImageItem(id=key, content=data)], collection="busy")
                except Exception as error:
                    failures.append(error)

    workers = [threading.Thread(target=searcher) for _ in range(2)] + [threading.Thread(target=adder)]
    for worker in workers:
        worker.start()
    trained = client.train_collection("busy", model_size=512, seed=3)
    workers[-1].join(60)
    stop.set()
    for worker in workers:
        worker.join(60)
    assert not failures, failures
    assert not aborted, aborted
    info = client.get_collection("busy")
    assert info.extractor_version == trained.collection.extractor_version and info.dimension == 512
    assert info.image_count == len(images) + len(flipped)
    for key, data in {**images, **flipped}.items():
        vector = client.get_image(key, collection="busy", include_vector=True).vector
        assert vector.shape == (512,)
        if vector.any():
            hit = client.search(data, collection="busy", top_k=1).hits[0]
            assert hit.score > 0.9999, (key, hit)
