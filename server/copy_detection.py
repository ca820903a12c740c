"""A deterministic copy-detection set: does near-duplicate retrieval find the photo a copy came from?

Every photo that installed packages ship (``available_sources()`` of dataset_builder) is its own
class. Each gets one copy of every kind in ``COPY_KINDS``: a 25% crop, a 90° turn, a perspective
warp, a paste at 40% scale into another photo of the set, a JPEG at quality 20 and a blur. Copies
are queries; the originals are what gets indexed. Since the background of a pasted copy is indexed
too, the source is expected in the top 2 for that kind, and first for the others.

On disk: ``originals/<name>.jpg`` (quality 95), ``queries/<kind>/<name>.jpg`` and ``manifest.json``.
Every random draw of a photo comes from a generator seeded by the seed and the photo's name, so the
same seed writes the same bytes (with the same NumPy and OpenCV), and one photo's copies do not
change when another package adds or drops photos (except which background a paste lands in).

The copy functions are also the test suite's (tests/test_sift_library.py), so the cases the SIFT
library is tested on and the ones it is evaluated on are made one way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from imagesearch.client.datasets import class_rng
from imagesearch.server.dataset_builder import (
    ORIGINAL_QUALITY,
    available_sources,
    encode_jpeg,
    resize_long_side,
)

COPY_KINDS = ("crop25", "rotate90", "perspective", "pasted40", "jpeg20", "blur")
DEFAULT_SEED = 0
DEFAULT_LONG_SIDE = 640
PASTE_SCALE = 0.4
LOW_QUALITY = 20
BLUR_SIGMA = 2.0
"""Gaussian sigma at a long side of 640 px; scaled with the photo so the blur looks the same."""
MANIFEST = "manifest.json"

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


# -------------------------------------------------------------------------- loading


def skimage_photo(name: str, max_side: int = DEFAULT_LONG_SIDE) -> np.ndarray:
    """A photo bundled with scikit-image (``skimage.data.<name>()``) as BGR uint8, shrunk (never
    enlarged) to at most ``max_side``: the tests also use bundled photos SOURCES leaves out (moon,
    cell), and keep their native size. scikit-image is a dev dependency, hence the late import."""
    import skimage.data

    image = getattr(skimage.data, name)()
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR if image.ndim == 2 else cv2.COLOR_RGB2BGR)
    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale < 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return image


def read_photo(path: Path, long_side: int = DEFAULT_LONG_SIDE) -> np.ndarray:
    """A photo file as BGR uint8 with exactly ``long_side`` pixels on its long side, so copy sizes
    (a 40% paste, a sigma in pixels) mean the same for every photo."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError(f"OpenCV could not read {path}")
    return resize_long_side(image, long_side)


# -------------------------------------------------------------------------- copies


def pasted(image: np.ndarray, background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` at 40% scale pasted at a random position into ``background``."""
    small = cv2.resize(image, None, fx=PASTE_SCALE, fy=PASTE_SCALE, interpolation=cv2.INTER_AREA)
    canvas = background.copy()
    h, w = small.shape[:2]
    y = int(rng.integers(0, canvas.shape[0] - h + 1))
    x = int(rng.integers(0, canvas.shape[1] - w + 1))
    canvas[y : y + h, x : x + w] = small
    return canvas


def rotated(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Turned 90° clockwise (``rng`` unused: every copy function takes one)."""
    return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)


def cropped(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random half-width, half-height window: 25% of the area."""
    h, w = image.shape[:2]
    y, x = int(rng.integers(0, h - h // 2 + 1)), int(rng.integers(0, w - w // 2 + 1))
    return image[y : y + h // 2, x : x + w // 2]


def warped(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A perspective warp: each corner pulled inwards by up to 15% of the side."""
    h, w = image.shape[:2]
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    inward = np.float32([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    moved = corners + inward * rng.uniform(0, 0.15, (4, 2)).astype(np.float32) * np.float32([w, h])
    return cv2.warpPerspective(image, cv2.getPerspectiveTransform(corners, moved), (w, h))


def blurred(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian blur of sigma 2 at 640 px, in proportion at other sizes."""
    sigma = BLUR_SIGMA * max(image.shape[:2]) / DEFAULT_LONG_SIDE
    return cv2.GaussianBlur(image, (0, 0), sigma)


def unchanged(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The photo as it is: the copy is its encoding (jpeg20)."""
    return image


def edited(image: np.ndarray) -> np.ndarray:
    """A near-duplicate: 85% crop, shrunk to 80%, brighter and more contrasted, JPEG at quality 70."""
    h, w = image.shape[:2]
    crop = image[h // 20 : h - h // 10, w // 10 : w - w // 20]
    small = cv2.resize(crop, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    jpeg = encode_jpeg(cv2.convertScaleAbs(small, alpha=1.15, beta=10), 70)
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)


TRANSFORMS: dict[str, Transform] = {
    "crop25": cropped,
    "rotate90": rotated,
    "perspective": warped,
    "jpeg20": unchanged,
    "blur": blurred,
}
"""The kinds made from the photo alone; pasted40 also needs a background."""
QUALITY = {"jpeg20": LOW_QUALITY}
"""JPEG quality of a query file; every other kind is written at ORIGINAL_QUALITY so compression
adds as little as possible to its edit."""


# -------------------------------------------------------------------------- the set


@dataclass(frozen=True)
class CopyQuery:
    """One copy: its file, the photo it was made from and how; ``background`` is the photo a
    pasted40 copy was pasted into (the other right answer), "" for the other kinds."""

    path: Path
    source: str
    kind: str
    background: str = ""


@dataclass(frozen=True)
class CopySet:
    """A built set: ``originals`` (class name -> file) are indexed, ``queries`` searched with."""

    root: Path
    seed: int
    originals: dict[str, Path]
    queries: list[CopyQuery]


def _write(path: Path, data: bytes) -> None:
    """Write only what changed, so rebuilding a set in place leaves identical files untouched."""
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _background(name: str, photos: dict[str, np.ndarray], rng: np.random.Generator) -> str:
    """Another photo of the set that the 40% copy of ``name`` fits into."""
    height, width = (math.ceil(side * PASTE_SCALE) for side in photos[name].shape[:2])
    fits = [
        other
        for other, image in photos.items()
        if other != name and image.shape[0] >= height and image.shape[1] >= width
    ]
    if not fits:
        raise ValueError(f"no other photo can take a {PASTE_SCALE:.0%} copy of {name}; need two or more")
    return fits[int(rng.integers(len(fits)))]


def build_copy_set(
    out_dir: Path,
    seed: int = DEFAULT_SEED,
    long_side: int = DEFAULT_LONG_SIDE,
    sources: Sequence[str] | None = None,
) -> CopySet:
    """Write the set under ``out_dir`` from the installed photos (``sources``: a subset of
    SOURCES' names; all installed by default) and return it.

    Rebuilding in place is idempotent: the same seed rewrites no file, another seed replaces them,
    and JPEGs of photos no longer in the set are removed so the folder is never a mix of builds.
    """
    out_dir = Path(out_dir)
    found, _ = available_sources(sources)
    photos = {source.name: read_photo(path, long_side) for source, path in found}
    if len(photos) < 2:
        raise ValueError("a copy-detection set needs at least two installed photos (one is a background)")
    originals: dict[str, Path] = {}
    queries: list[CopyQuery] = []
    for name, image in photos.items():
        rng = class_rng(seed, name)
        originals[name] = out_dir / "originals" / f"{name}.jpg"
        _write(originals[name], encode_jpeg(image, ORIGINAL_QUALITY))
        for kind in COPY_KINDS:
            background = ""
            if kind == "pasted40":
                background = _background(name, photos, rng)
                copy = pasted(image, photos[background], rng)
            else:
                copy = TRANSFORMS[kind](image, rng)
            query = CopyQuery(out_dir / "queries" / kind / f"{name}.jpg", name, kind, background)
            _write(query.path, encode_jpeg(np.ascontiguousarray(copy), QUALITY.get(kind, ORIGINAL_QUALITY)))
            queries.append(query)
    written = set(originals.values()) | {query.path for query in queries}
    for stale in [*out_dir.glob("originals/*.jpg"), *out_dir.glob("queries/*/*.jpg")]:
        if stale not in written:
            stale.unlink()
    copy_set = CopySet(out_dir, seed, originals, queries)
    _write(out_dir / MANIFEST, _manifest(copy_set, long_side).encode())
    return copy_set


def _manifest(copy_set: CopySet, long_side: int) -> str:
    """manifest.json: paths relative to the set's root, so the folder can be moved."""

    def relative(path: Path) -> str:
        return path.relative_to(copy_set.root).as_posix()

    manifest = {
        "seed": copy_set.seed,
        "long_side": long_side,
        "kinds": list(COPY_KINDS),
        "originals": {name: relative(path) for name, path in copy_set.originals.items()},
        "queries": [{**asdict(query), "path": relative(query.path)} for query in copy_set.queries],
    }
    return json.dumps(manifest, indent=2) + "\n"


def load_copy_set(root: Path) -> CopySet:
    """The set that ``build_copy_set`` wrote under ``root``, from its manifest.json."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    originals = {name: root / path for name, path in manifest["originals"].items()}
    queries = [CopyQuery(**{**query, "path": root / query["path"]}) for query in manifest["queries"]]
    return CopySet(root, manifest["seed"], originals, queries)
