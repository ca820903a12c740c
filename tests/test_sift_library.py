"""The SIFT library layer (plugins/sift): RootSIFT extraction and storage, the vocabulary,
BoVW/VLAD encodings and geometric re-ranking, on real photos bundled with scikit-image.

Copy-detection cases are generated from the photos with a fixed seed: pasted at 40% scale into
a photo outside the candidate set, rotated 90°, cropped to 25% of the area, perspective-warped,
by the copy functions of the copy-detection set (server/copy_detection.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from imagesearch.plugins.sift.encoding import PCA, bovw, fit_pca, vlad
from imagesearch.plugins.sift.features import (
    BYTES_PER_KEYPOINT,
    QUANTISATION_ERROR,
    LocalFeatures,
    extract_local,
    pack,
    unpack,
)
from imagesearch.plugins.sift.geometry import rerank, verify
from imagesearch.plugins.sift.vocabulary import Vocabulary, fit_vocabulary
from imagesearch.server.copy_detection import cropped, edited, pasted, rotated, skimage_photo, warped

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")
# Disjoint from PHOTOS: backgrounds for pasted copies and the vocabulary's training set, so
# neither a background nor the vocabulary has seen the photos being looked for.
OTHERS = ("hubble_deep_field", "retina", "gravel", "moon", "brick", "clock", "cell", "grass")
SEED = 8
# Queries get twice the stored keypoint budget. The strongest 1000 keypoints of chelsea pasted
# into gravel are nearly all gravel: 2 inliers for the source, ranked level with unrelated photos.
# With 2000 it gets 18 against at most 4; queries are never stored, so only matching time grows.
QUERY_KEYPOINTS = 2000


# -------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: skimage_photo(name) for name in PHOTOS}


@pytest.fixture(scope="module")
def originals(photos: dict[str, np.ndarray]) -> dict[str, LocalFeatures]:
    return {name: extract_local(image) for name, image in photos.items()}


@pytest.fixture(scope="module")
def others() -> list[np.ndarray]:
    return [skimage_photo(name) for name in OTHERS]


@pytest.fixture(scope="module")
def vocabulary(others: list[np.ndarray]) -> Vocabulary:
    per_image = [extract_local(image).descriptors for image in others]
    return fit_vocabulary(np.concatenate(per_image), k=32, seed=SEED).fit_idf(per_image)


# -------------------------------------------------------------------------- (a) extraction and storage


def test_extraction_caps_keypoints_strongest_first(photos: dict[str, np.ndarray]) -> None:
    full = extract_local(photos["astronaut"])
    capped = extract_local(photos["astronaut"], max_keypoints=100)
    assert len(full) == 1000 and len(capped) == 100
    assert full.keypoints.dtype == np.float32 and full.descriptors.dtype == np.float32
    assert full.descriptors.shape == (1000, 128)
    np.testing.assert_allclose(np.linalg.norm(full.descriptors, axis=1), 1.0, atol=1e-5)  # RootSIFT rows
    assert (full.descriptors >= 0).all()


def test_keypoints_are_in_the_original_frame(photos: dict[str, np.ndarray]) -> None:
    image = photos["coffee"]  # 600 × 400
    native = extract_local(image)
    upscaled = extract_local(cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC), max_side=600)
    assert upscaled.image_size == (1200, 800)
    assert upscaled.keypoints[:, 0].max() > 600 and upscaled.keypoints[:, 1].max() > 400
    # The upscaled image is shrunk back to 600 px, so its keypoints are the native ones × 2.
    distances = np.linalg.norm(upscaled.points[:, None] / 2 - native.points[None], axis=2).min(axis=1)
    assert np.median(distances) < 1.0
    ratio = np.median(upscaled.keypoints[:100, 2]) / np.median(native.keypoints[:100, 2])
    assert 1.6 < ratio < 2.4


@pytest.mark.parametrize(
    "image",
    [np.full((300, 400, 3), 90, np.uint8), np.zeros((5, 7, 3), np.uint8), np.zeros((0, 0, 3), np.uint8)],
    ids=["flat", "tiny", "zero-size"],
)
def test_no_keypoints_gives_empty_arrays(image: np.ndarray) -> None:
    features = extract_local(image)
    assert len(features) == 0
    assert features.keypoints.shape == (0, 4) and features.descriptors.shape == (0, 128)
    assert features.image_size == (image.shape[1], image.shape[0])


def same(a: LocalFeatures, b: LocalFeatures) -> bool:
    return (
        a.image_size == b.image_size
        and np.array_equal(a.keypoints, b.keypoints)
        and np.array_equal(a.descriptors, b.descriptors)
    )


def test_extraction_is_deterministic_and_thread_safe(photos: dict[str, np.ndarray]) -> None:
    images = list(photos.values())[:4]
    expected = [extract_local(image) for image in images]
    assert all(same(extract_local(image), want) for image, want in zip(images, expected, strict=True))
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            results = list(pool.map(extract_local, images))
            assert all(same(got, want) for got, want in zip(results, expected, strict=True))


def test_pack_round_trip(originals: dict[str, LocalFeatures]) -> None:
    features = originals["astronaut"]
    data = pack(features)
    assert len(data) == 13 + 1000 * BYTES_PER_KEYPOINT == 144_013
    back = unpack(data)
    assert back.image_size == features.image_size
    np.testing.assert_array_equal(back.keypoints, features.keypoints)
    assert np.abs(back.descriptors - features.descriptors).max() <= QUANTISATION_ERROR + 1e-7
    empty = unpack(pack(LocalFeatures.empty((3, 4))))
    assert len(empty) == 0 and empty.image_size == (3, 4)
    with pytest.raises(ValueError, match="version"):
        unpack(b"\x09" + data[1:])
    with pytest.raises(ValueError, match="bytes"):
        unpack(data[:-1])


# -------------------------------------------------------------------------- (b) vocabulary


def test_vocabulary_refuses_too_few_descriptors() -> None:
    descriptors = np.random.default_rng(SEED).random((20, 128), dtype=np.float32)
    with pytest.raises(ValueError, match=r"at least 32 descriptors.*got 20"):
        fit_vocabulary(descriptors, k=32, seed=SEED)


def test_vocabulary_round_trips_through_bytes(vocabulary: Vocabulary) -> None:
    assert vocabulary.centroids.shape == (32, 128) and vocabulary.idf.shape == (32,)
    assert (vocabulary.idf >= 0).all() and vocabulary.idf.max() > 0
    back = Vocabulary.from_bytes(vocabulary.to_bytes())
    assert back.version == vocabulary.version and len(vocabulary.version) == 16
    np.testing.assert_array_equal(back.centroids, vocabulary.centroids)
    np.testing.assert_array_equal(back.idf, vocabulary.idf)
    with pytest.raises(ValueError, match="bytes"):
        Vocabulary.from_bytes(vocabulary.to_bytes()[:-4])


def test_vocabulary_fit_is_seeded(others: list[np.ndarray]) -> None:
    descriptors = extract_local(others[0]).descriptors
    first = fit_vocabulary(descriptors, k=8, seed=1, niter=5)
    assert fit_vocabulary(descriptors, k=8, seed=1, niter=5).version == first.version
    assert fit_vocabulary(descriptors, k=8, seed=2, niter=5).version != first.version
    # BoVW vectors depend on idf too: new idf weights are a new version.
    assert first.fit_idf([descriptors[:40], descriptors[40:]]).version != first.version


def test_assign_matches_brute_force(vocabulary: Vocabulary, originals: dict[str, LocalFeatures]) -> None:
    descriptors = originals["chelsea"].descriptors
    distances = ((descriptors[:, None, :] - vocabulary.centroids[None]) ** 2).sum(axis=2)
    labels = vocabulary.assign(descriptors)
    chosen = distances[np.arange(len(labels)), labels]
    np.testing.assert_allclose(chosen, distances.min(axis=1), rtol=1e-4, atol=1e-5)  # equal up to ties
    assert (labels == distances.argmin(axis=1)).mean() > 0.99
    assert vocabulary.assign(np.zeros((0, 128), np.float32)).shape == (0,)


# -------------------------------------------------------------------------- (c) encodings


@pytest.mark.parametrize("encode, dim", [(bovw, 32), (vlad, 32 * 128)], ids=["bovw", "vlad"])
def test_encoding_shape_norm_and_determinism(
    encode: Callable[[np.ndarray, Vocabulary], np.ndarray],
    dim: int,
    vocabulary: Vocabulary,
    originals: dict[str, LocalFeatures],
    photos: dict[str, np.ndarray],
) -> None:
    vector = encode(originals["rocket"].descriptors, vocabulary)
    assert vector.shape == (dim,) and vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    again = encode(extract_local(photos["rocket"]).descriptors, vocabulary)
    np.testing.assert_array_equal(again, vector)
    empty = encode(np.zeros((0, 128), np.float32), vocabulary)
    assert empty.shape == (dim,) and not empty.any()


def test_vlad_finds_edited_copies(
    vocabulary: Vocabulary, originals: dict[str, LocalFeatures], photos: dict[str, np.ndarray]
) -> None:
    names = list(originals)
    stored = np.stack([vlad(originals[name].descriptors, vocabulary) for name in names])
    found = 0
    for row, name in enumerate(names):
        query = vlad(extract_local(edited(photos[name])).descriptors, vocabulary)
        cosines = stored @ query
        found += int(np.argmax(cosines) == row)
        print(
            f"VLAD {name}: cosine to original {cosines[row]:.3f}, best other {np.delete(cosines, row).max():.3f}"
        )
    assert found >= 0.8 * len(names), f"VLAD found {found}/{len(names)} edited copies"


def test_pca_projects_normalises_and_round_trips(
    vocabulary: Vocabulary, originals: dict[str, LocalFeatures]
) -> None:
    vectors = np.stack([vlad(f.descriptors, vocabulary) for f in originals.values()])
    pca = fit_pca(vectors, 4)
    projected = pca.apply(vectors)
    assert projected.shape == (len(vectors), 4)
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(PCA.from_bytes(pca.to_bytes()).apply(vectors), projected)
    with pytest.raises(ValueError, match="at least 8 training vectors"):
        fit_pca(vectors, 8)


# -------------------------------------------------------------------------- (d) geometric verification

COPIES = ("pasted", "rotated", "cropped", "warped")


@pytest.fixture(scope="module")
def copy_ranks(
    photos: dict[str, np.ndarray], originals: dict[str, LocalFeatures], others: list[np.ndarray]
) -> dict[str, list[tuple[int, int]]]:
    """For each copy type and photo: how many other originals score at least as many inliers as
    the source (0 = the source is strictly first), and the source's inliers."""
    rng = np.random.default_rng(SEED)
    candidates = list(originals.items())
    ranks: dict[str, list[tuple[int, int]]] = {kind: [] for kind in COPIES}
    for index, (name, image) in enumerate(photos.items()):
        copies = {
            "pasted": pasted(image, others[index % len(others)], rng),
            "rotated": rotated(image, rng),
            "cropped": cropped(image, rng),
            "warped": warped(image, rng),
        }
        for kind, copy in copies.items():
            ranking = rerank(extract_local(copy, max_keypoints=QUERY_KEYPOINTS), candidates)
            (source_inliers,) = [inliers for key, inliers in ranking if key == name]
            ahead = sum(1 for key, inliers in ranking if key != name and inliers >= source_inliers)
            ranks[kind].append((ahead, source_inliers))
    return ranks


@pytest.mark.parametrize("kind", COPIES)
def test_rerank_puts_the_source_first(kind: str, copy_ranks: dict[str, list[tuple[int, int]]]) -> None:
    ranks = copy_ranks[kind]
    rate = sum(ahead == 0 for ahead, _ in ranks) / len(ranks)
    print(f"{kind}: source strictly first for {rate:.0%}; (others ahead, source inliers): {ranks}")
    assert rate >= 0.9, f"{kind}: source first for {rate:.0%}; (others ahead, source inliers): {ranks}"


def test_unrelated_photos_get_few_inliers(originals: dict[str, LocalFeatures]) -> None:
    for a, b in itertools.combinations(originals, 2):
        result = verify(originals[a], originals[b])
        assert result.inliers < 12, f"{a} vs {b}: {result}"


def test_verify_reports_method_and_counts(
    originals: dict[str, LocalFeatures], photos: dict[str, np.ndarray]
) -> None:
    itself = verify(originals["astronaut"], originals["astronaut"])
    assert itself.method == "homography" and itself.inliers >= 0.9 * itself.matches > 500
    nothing = verify(originals["astronaut"], LocalFeatures.empty((10, 10)))
    assert (nothing.inliers, nothing.method, nothing.matches) == (0, "none", 0)


def test_rerank_is_stable_for_ties(originals: dict[str, LocalFeatures]) -> None:
    empty = LocalFeatures.empty((10, 10))
    ranking = rerank(originals["coffee"], [("x", empty), ("coffee", originals["coffee"]), ("y", empty)])
    assert [key for key, _ in ranking] == ["coffee", "x", "y"]
    assert ranking[1][1] == ranking[2][1] == 0


def test_a_vocabulary_fitted_on_few_descriptors_warns_in_the_log_not_on_stderr(capfd, caplog) -> None:
    """FAISS's own 'WARNING clustering ...' went straight to stderr, into a JSON log stream."""
    import logging

    descriptors = np.random.default_rng(SEED).random((200, 128), dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="imagesearch.plugins.sift.vocabulary"):
        fit_vocabulary(descriptors, k=32, seed=SEED)
    assert "WARNING clustering" not in capfd.readouterr().err
    assert "clustering 200 descriptors into 32 visual words: 1248 or more" in caplog.text


# -------------------------------------------------------------------------- (d) a collection's state


def test_a_collection_encodes_the_keypoints_its_state_was_made_with(
    vocabulary: Vocabulary, originals: dict[str, LocalFeatures]
) -> None:
    """The keypoints an image encodes are the collection's, kept in its state: read from the
    server's max_keypoints, lowering the setting cut every stored image's features at the next
    training (an outside test: 39 images held 30,703 keypoints, the training read 10,237) and
    made queries encode sparser than the images they were compared with."""
    from imagesearch.plugins import NotEnoughTrainingData
    from imagesearch.plugins.sift.extractors import STATE_MAGIC, pack_state, sift_plugins, unpack_state

    made = {e.name: e for e in sift_plugins(vocabulary)[1]}["sift-bovw"]  # created at the default 1000
    lowered = {e.name: e for e in sift_plugins(vocabulary, max_keypoints=300)[1]}["sift-bovw"]
    assert made.version == f"1+{vocabulary.version}"  # the default is not named: versions stay
    assert lowered.version == f"1+{vocabulary.version}.kp300"
    served = lowered.with_state(made.state())  # its collection, on a server whose setting is lower
    assert (served.encoded_keypoints, served.version) == (1000, made.version)
    stored = [pack(features) for features in originals.values()]
    np.testing.assert_array_equal(served.encode(stored), made.encode(stored))
    assert unpack_state(made.state())[2] == 1000

    words = sum(min(len(f.descriptors), 1000) for f in originals.values()) // 4  # all it has, 4 a word
    assert words > sum(min(len(f.descriptors), 300) for f in originals.values()) // 4
    fitted = served.with_state(served.fit(stored, size=words, seed=0))  # the 300 cut had too few
    assert fitted.encoded_keypoints == 1000 and fitted.vocabulary.k == words
    with pytest.raises(NotEnoughTrainingData, match="at most 300 an image"):
        lowered.fit(stored, size=words, seed=0)

    # A state from before the cap was kept: encoded at the server's setting, its version unchanged.
    legacy = pack_state(vocabulary, None)
    assert legacy.startswith(STATE_MAGIC) and unpack_state(legacy)[2] is None
    old = lowered.with_state(legacy)
    assert (old.encoded_keypoints, old.version) == (300, made.version)
    assert unpack_state(vocabulary.to_bytes())[2] is None  # the first states: a bare vocabulary
