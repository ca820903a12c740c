"""Folder-per-class datasets (DATASET/<class>/<image files>) and the splits an evaluation queries with.

The layout most labelled image sets already have, so evaluating needs no
conversion step. Reading never fails on stray files: anything that is not an
image by its extension is counted and listed, so the user sees what was left
out. Splits are seeded per class, so adding a class does not reshuffle the
others. Stdlib and NumPy only: this ships with the client-only install.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

from imagesearch.client.folders import FolderImage, is_utf8, scan_folder
from imagesearch.client.types import PathLike

HOLDOUT = "holdout"
LEAVE_ONE_OUT = "leave-one-out"


LabelledImage = FolderImage
"""One image file and its class; ``id`` is its path relative to the dataset root with ``/``
separators (the same on every machine, so a kept collection can be matched to files)."""


@dataclass(frozen=True)
class Dataset:
    """Every image of a folder-per-class dataset, sorted by class then path, and the files left out."""

    root: Path
    images: tuple[LabelledImage, ...]
    other_files: tuple[Path, ...] = ()
    """Files that are not images by extension, files outside any class folder, and files whose
    names are not UTF-8 (they cannot be sent as ids)."""

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes that hold at least one image, sorted."""
        return tuple(sorted({image.label for image in self.images}))

    def by_class(self) -> dict[str, list[LabelledImage]]:
        """Each class's images in path order."""
        groups: dict[str, list[LabelledImage]] = {label: [] for label in self.classes}
        for image in self.images:
            groups[image.label].append(image)
        return groups


def read_dataset(root: PathLike) -> Dataset:
    """Read ``root`` as ``imagesearch add`` does (``client.folders.scan_folder``): each immediate,
    non-hidden subfolder is a class, holding every image below it. Files that are not images and
    images directly in ``root`` (they have no class) land in ``other_files``."""
    scan = scan_folder(root)
    # A name that is not UTF-8 cannot be an id: one failed the whole evaluation (an outside test);
    # `imagesearch add` lists such a file and goes on.
    usable = {image.id: bool(image.label) and is_utf8(image.id) for image in scan.images}
    images = [image for image in scan.images if usable[image.id]]
    left_out = [image.path for image in scan.images if not usable[image.id]]
    ordered = sorted(images, key=lambda image: (image.label, image.id))
    return Dataset(scan.directory, tuple(ordered), tuple(sorted([*left_out, *scan.not_images])))


def class_rng(seed: int, name: str) -> np.random.Generator:
    """A generator for one class, from the run's seed and the class name: deterministic, and
    independent of which other classes exist or in which order they are processed."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


@dataclass(frozen=True)
class Split:
    """What goes into the collection (``indexed``) and what is searched with (``queries``).

    In leave-one-out every query is itself indexed: it is searched by id with
    ``exclude_query`` so it never finds itself.
    """

    kind: str
    indexed: tuple[LabelledImage, ...]
    queries: tuple[LabelledImage, ...]

    @property
    def queries_are_indexed(self) -> bool:
        return self.kind == LEAVE_ONE_OUT


def holdout_split(dataset: Dataset, fraction: float = 0.2, seed: int = 0) -> Split:
    """Hold out about ``fraction`` of each class as queries, chosen at random (seeded per class).

    A class of n ≥ 2 images gives round(fraction·n) queries, at least 1 and at most
    n − 1, so each query has something to find; a class of one image is only indexed.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1 (exclusive), not {fraction}")
    indexed: list[LabelledImage] = []
    queries: list[LabelledImage] = []
    for label, members in dataset.by_class().items():
        count = len(members)
        held = min(count - 1, max(1, round(fraction * count)))
        chosen = set(class_rng(seed, label).permutation(count)[:held].tolist()) if count >= 2 else set()
        for position, image in enumerate(members):
            (queries if position in chosen else indexed).append(image)
    return Split(HOLDOUT, tuple(indexed), tuple(queries))


def leave_one_out(dataset: Dataset) -> Split:
    """Every image is indexed and every image is a query against all the others."""
    return Split(LEAVE_ONE_OUT, dataset.images, dataset.images)


@dataclass(frozen=True)
class Relevance:
    """How many images of a query's class it can find (|Y|) among the images actually stored."""

    per_label: Counter[str]
    ids: frozenset[str]

    @classmethod
    def of(cls, stored: Iterable[LabelledImage]) -> Self:
        stored = list(stored)
        return cls(Counter(image.label for image in stored), frozenset(image.id for image in stored))

    def count(self, query: LabelledImage) -> int:
        """Stored images of the query's class, not counting the query itself."""
        return self.per_label[query.label] - (query.id in self.ids)


def describe(dataset: Dataset, split: Split, *, listed: int = 20) -> dict[str, object]:
    """A JSON-ready account of the dataset and the split (the first ``listed`` other files named)."""
    sizes: Sequence[int] = [len(members) for members in dataset.by_class().values()]
    return {
        "root": str(dataset.root),
        "classes": len(dataset.classes),
        "images": len(dataset.images),
        "smallest_class": min(sizes, default=0),
        "largest_class": max(sizes, default=0),
        "other_files": len(dataset.other_files),
        "other_files_listed": [str(path.relative_to(dataset.root)) for path in dataset.other_files[:listed]],
        "split": split.kind,
        "indexed": len(split.indexed),
        "queries": len(split.queries),
    }
