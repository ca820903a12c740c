"""The copy-detection set (server/copy_detection.py): every kind for every installed photo, the
same bytes for the same seed, copies that are what their kind says, a manifest that round-trips."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from imagesearch.server.copy_detection import (
    COPY_KINDS,
    CopySet,
    build_copy_set,
    load_copy_set,
    read_photo,
)
from imagesearch.server.dataset_builder import available_sources, encode_jpeg

SUBSET = ["chelsea", "coffee", "camera"]


@pytest.fixture(scope="module")
def copy_set(tmp_path_factory: pytest.TempPathFactory) -> CopySet:
    return build_copy_set(tmp_path_factory.mktemp("copies"), seed=0)


def decoded(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


def query(copy_set: CopySet, source: str, kind: str) -> np.ndarray:
    (path,) = [q.path for q in copy_set.queries if q.source == source and q.kind == kind]
    return decoded(path)


def files(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def test_every_kind_for_every_installed_photo(copy_set: CopySet) -> None:
    names = [source.name for source, _ in available_sources()[0]]
    assert list(copy_set.originals) == names
    pairs = [(q.source, q.kind) for q in copy_set.queries]
    assert sorted(pairs) == sorted(itertools.product(names, COPY_KINDS))
    for name, path in copy_set.originals.items():
        assert path == copy_set.root / "originals" / f"{name}.jpg"
        assert max(decoded(path).shape[:2]) == 640
    for q in copy_set.queries:
        assert q.path == copy_set.root / "queries" / q.kind / f"{q.source}.jpg"
        assert decoded(q.path).ndim == 3


def test_same_seed_same_bytes_other_seed_other_bytes(copy_set: CopySet, tmp_path: Path) -> None:
    build_copy_set(tmp_path / "again", seed=0)
    assert files(tmp_path / "again") == files(copy_set.root)
    other = files(build_copy_set(tmp_path / "other", seed=1, sources=SUBSET).root)
    same = files(build_copy_set(tmp_path / "same", seed=0, sources=SUBSET).root)
    assert other.keys() == same.keys()
    # The originals and the rotations draw nothing at random; crops, warps and pastes do.
    assert other["originals/chelsea.jpg"] == same["originals/chelsea.jpg"]
    for kind in ("crop25", "perspective", "pasted40"):
        assert other[f"queries/{kind}/chelsea.jpg"] != same[f"queries/{kind}/chelsea.jpg"], kind


def test_rebuilding_in_place_keeps_files_and_drops_stale_ones(tmp_path: Path) -> None:
    root = tmp_path / "set"
    build_copy_set(root, seed=0, sources=SUBSET)
    before = {path: path.stat().st_mtime_ns for path in root.rglob("*.jpg")}
    build_copy_set(root, seed=0, sources=SUBSET)
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*.jpg")} == before
    build_copy_set(root, seed=0, sources=SUBSET[:2])
    assert not list(root.rglob("camera.jpg"))
    assert set(load_copy_set(root).originals) == set(SUBSET[:2])


def test_crop_keeps_a_quarter_of_the_area(copy_set: CopySet) -> None:
    for name, path in copy_set.originals.items():
        original, crop = decoded(path), query(copy_set, name, "crop25")
        (height, width), (crop_height, crop_width) = original.shape[:2], crop.shape[:2]
        assert (crop_height, crop_width) == (height // 2, width // 2)
        assert 0.24 < crop_height * crop_width / (height * width) <= 0.25
        assert cv2.matchTemplate(original, crop, cv2.TM_CCOEFF_NORMED).max() > 0.95, name


def test_rotation_and_warp_keep_the_photo_size(copy_set: CopySet) -> None:
    for name, path in copy_set.originals.items():
        original = decoded(path)
        turned = query(copy_set, name, "rotate90")
        assert np.abs(turned.astype(int) - np.rot90(original, -1)).mean() < 5, name
        warped = query(copy_set, name, "perspective")
        assert warped.shape == original.shape and not np.array_equal(warped, original)


def test_pasted_copy_holds_the_photo_at_40_percent_in_another_photo(copy_set: CopySet) -> None:
    for q in (q for q in copy_set.queries if q.kind == "pasted40"):
        assert q.background in copy_set.originals and q.background != q.source
        background = decoded(copy_set.originals[q.background])
        pasted = decoded(q.path)
        assert pasted.shape == background.shape
        small = cv2.resize(
            decoded(copy_set.originals[q.source]), None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA
        )
        scores = cv2.matchTemplate(pasted, small, cv2.TM_CCOEFF_NORMED)
        _, best, _, (x, y) = cv2.minMaxLoc(scores)
        assert best > 0.95, (q.source, best)
        height, width = small.shape[:2]
        inside = np.abs(pasted[y : y + height, x : x + width].astype(int) - small).mean()
        outside = np.abs(pasted.astype(int) - background)
        outside[y : y + height, x : x + width] = 0
        assert inside < 6 and outside.sum() / (outside.size - small.size) < 1, q.source


def test_jpeg_and_blur_copies_are_remade_exactly(copy_set: CopySet) -> None:
    found = {source.name: path for source, path in available_sources()[0]}
    for name in copy_set.originals:
        photo = read_photo(found[name])
        low = query(copy_set, name, "jpeg20")
        assert low.shape == photo.shape
        assert (copy_set.root / f"queries/jpeg20/{name}.jpg").read_bytes() == encode_jpeg(photo, 20)
        blurred = encode_jpeg(cv2.GaussianBlur(photo, (0, 0), 2.0), 95)
        assert (copy_set.root / f"queries/blur/{name}.jpg").read_bytes() == blurred


def test_manifest_round_trip(copy_set: CopySet) -> None:
    assert load_copy_set(copy_set.root) == copy_set
    moved = copy_set.root.parent / "moved"
    copy_set.root.rename(moved)
    try:
        loaded = load_copy_set(moved)
        assert loaded.root == moved and all(q.path.is_file() for q in loaded.queries)
        assert [q.source for q in loaded.queries] == [q.source for q in copy_set.queries]
    finally:
        moved.rename(copy_set.root)


def test_refuses_unknown_photos_and_a_set_of_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown classes"):
        build_copy_set(tmp_path, sources=["no-such-photo"])
    with pytest.raises(ValueError, match="at least two"):
        build_copy_set(tmp_path, sources=["chelsea"])
