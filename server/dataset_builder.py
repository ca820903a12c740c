"""A labelled folder-per-class image set anyone can rebuild offline, for evaluations.

Evaluations need labelled photos, and nothing may be downloaded: the photos here
are the ones registry packages already ship (scikit-image, scikit-learn,
matplotlib; Debian's opencv-doc when installed). Each photo is one class; each
class holds the photo and seeded edited copies (crop, rotation, flip, light,
scale, blur, JPEG quality), i.e. the near-duplicates a retrieval system should
find. LICENSES.md in the output says where each photo comes from and under what
terms, as the shipping package states them.

    python -m imagesearch.server.dataset_builder OUT [--copies 9] [--seed 0] [--size 480]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np

from imagesearch.client.datasets import class_rng
from imagesearch.server.client_cli import path_argument

DEFAULT_COPIES = 9
DEFAULT_SEED = 0
DEFAULT_SIZE = 480
ORIGINAL_QUALITY = 95


@dataclass(frozen=True)
class Source:
    """One photo a package ships, and its licence as that package states it."""

    name: str
    """The class name (folder and file prefix)."""
    distribution: str
    """The package on PyPI / in Debian that ships the file."""
    module: str
    """The import name whose folder holds it ("" for a system path)."""
    file: str
    """Path of the file inside that folder (or absolute, for a system path)."""
    licence: str
    where: str
    """Where the licence statement was found."""

    def path(self) -> Path | None:
        """The file on this machine, or None when its package is not installed or lacks it."""
        if not self.module:
            path = Path(self.file)
        else:
            spec = importlib.util.find_spec(self.module)
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(next(iter(spec.submodule_search_locations))) / self.file
        return path if path.is_file() else None

    def version(self) -> str:
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return "system package"


def _skimage(name: str, file: str, licence: str) -> Source:
    """A photo of scikit-image's wheel; its licence is stated in the docstring of its loader."""
    where = f"docstring of skimage.data.{name}() (scikit-image 0.26.0)"
    return Source(name, "scikit-image", "skimage", f"data/{file}", licence, where)


_OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
_OPENCV_TERMS = (
    "Not stated per file: the package's copyright file covers its sample data only by its catch-all "
    "`Files: *` stanza (OpenCV contributors, Apache-2.0 AND BSD-3-Clause)."
)


def _opencv(name: str, file: str, origin: str = "") -> Source:
    """A sample photo of Debian's opencv-doc, used only when that package is installed.

    Only real photos of a scene: its calibration boards, synthetic shapes, logos and text pages are
    not a retrieval class, and of each pair (stereo views, flow frames, a copy with a pasted object)
    one view is kept, since two classes of one scene would count each other as wrong answers.
    """
    licence = f"{_OPENCV_TERMS} {origin}".strip()
    where = "/usr/share/doc/opencv-doc/copyright (opencv-doc 4.6.0+dfsg-12)"
    return Source(f"opencv_{name}", "opencv-doc", "", f"{_OPENCV_DATA}/{file}", licence, where)


_SKLEARN_README = "sklearn/datasets/images/README.txt (scikit-learn 1.9.1)"
_CC_BY_2 = "Creative Commons Attribution 2.0 (https://creativecommons.org/licenses/by/2.0/)"

SOURCES: tuple[Source, ...] = (
    _skimage(
        "astronaut",
        "astronaut.png",
        "No known copyright restrictions, released into the public domain (NASA Great Images database).",
    ),
    _skimage(
        "brick",
        "brick.png",
        "Creative Commons CC0 (CC0Textures, Bricks25); perspective-corrected, rotated, cropped and scaled by scikit-image.",
    ),
    _skimage("camera", "camera.png", "No copyright restrictions. CC0 by the photographer (Lav Varshney)."),
    _skimage(
        "chelsea", "chelsea.png", "No copyright restrictions. CC0 by the photographer (Stefan van der Walt)."
    ),
    _skimage(
        "clock",
        "clock_motion.png",
        "Released into the public domain by the photographer (Stefan van der Walt).",
    ),
    _skimage(
        "coffee",
        "coffee.png",
        "No copyright restrictions. CC0 by the photographer (Rachel Michetti); courtesy of Pikolo Espresso Bar.",
    ),
    _skimage("coins", "coins.png", "No known copyright restrictions (Brooklyn Museum Collection)."),
    _skimage(
        "grass",
        "grass.png",
        "Creative Commons CC0 (DeviantArt, linolafett, Grass-01); cropped and converted to greyscale by scikit-image.",
    ),
    _skimage(
        "gravel",
        "gravel.png",
        "Creative Commons CC0 (CC0Textures, Gravel04); rescaled, cropped and converted to greyscale by scikit-image.",
    ),
    _skimage(
        "hubble_deep_field",
        "hubble_deep_field.jpg",
        "NASA: may be freely used in the public domain (HubbleSite).",
    ),
    _skimage(
        "immunohistochemistry",
        "ihc.png",
        "No known copyright restrictions (Center for Microscopy And Molecular Imaging, CMMI).",
    ),
    _skimage(
        "retina",
        "retina.jpg",
        "Creative Commons CC0 1.0 Universal Public Domain Dedication (Wikimedia Commons, Mikael Häggström).",
    ),
    _skimage("rocket", "rocket.jpg", "Released in the public domain by SpaceX (DSCOVR launch on Falcon 9)."),
    Source(
        "china",
        "scikit-learn",
        "sklearn",
        "datasets/images/china.jpg",
        f"{_CC_BY_2}; attribution: danielbuechele (Flickr), retrieved 2011-08-21 by Robert Layton.",
        _SKLEARN_README,
    ),
    Source(
        "flower",
        "scikit-learn",
        "sklearn",
        "datasets/images/flower.jpg",
        f"{_CC_BY_2}; attribution: vultilion (Flickr; the README's attribution line says danielbuechele, its "
        "links point to vultilion), retrieved 2011-08-21 by Robert Layton.",
        _SKLEARN_README,
    ),
    Source(
        "grace_hopper",
        "matplotlib",
        "matplotlib",
        "mpl-data/sample_data/grace_hopper.jpg",
        "Not stated by the package: matplotlib's sample_data/README.txt and its LICENSE say nothing about "
        "this file. It is the US Navy's official portrait of Grace Hopper, believed to be a public-domain "
        "work of the US federal government; check that before redistributing the set.",
        "matplotlib 3.11.2: mpl-data/sample_data/README.txt, matplotlib-3.11.2.dist-info/LICENSE",
    ),
    _opencv("aero", "aero1.jpg"),
    _opencv("aloe", "aloeL.jpg", 'Believed to be a view of the Middlebury stereo data set "Aloe".'),
    _opencv("apple", "apple.jpg"),
    _opencv(
        "baboon",
        "baboon.jpg",
        'Believed to be the "Mandrill" of the USC-SIPI image database, whose maintainers do not '
        "know the copyright status of most of its images; check that before redistributing the set.",
    ),
    _opencv(
        "basketball",
        "basketball1.png",
        'Believed to be a frame of the Middlebury optical-flow sequence "Basketball".',
    ),
    _opencv("board", "board.jpg"),
    _opencv("books", "left.jpg"),
    _opencv("box_in_scene", "box_in_scene.png"),
    _opencv("building", "building.jpg"),
    _opencv("butterfly", "butterfly.jpg"),
    _opencv("chicky", "chicky_512.png"),
    _opencv("fruits", "fruits.jpg"),
    _opencv(
        "graf",
        "graf1.png",
        'Believed to be from the Oxford affine-covariant regions data set (sequence "graf").',
    ),
    _opencv("home", "home.jpg"),
    _opencv(
        "leuven",
        "leuvenA.jpg",
        'Believed to be from the Oxford affine-covariant regions data set (sequence "leuven").',
    ),
    _opencv(
        "messi",
        "messi5.jpg",
        "A press photo of Lionel Messi; photographer and terms unknown, probably not free: check that "
        "before redistributing the set.",
    ),
    _opencv("notebook", "ela_original.jpg"),
    _opencv("orange", "orange.jpg"),
    _opencv(
        "rubberwhale",
        "rubberwhale1.png",
        'Believed to be a frame of the Middlebury optical-flow sequence "RubberWhale".',
    ),
    _opencv("smarties", "smarties.png"),
    _opencv("squirrel", "squirrel_cls.jpg"),
    _opencv(
        "starry_night",
        "starry_night.jpg",
        "A reproduction of van Gogh's painting The Starry Night (1889, in the public domain); the "
        "terms of the reproduction are not stated.",
    ),
    _opencv("stuff", "stuff.jpg"),
)


@dataclass(frozen=True)
class Edit:
    """The random parameters of one edited copy, all drawn up front so the draws never depend on
    which edits happen to apply."""

    angle: float
    area: float
    aspect: float
    left: float
    top: float
    flip_horizontal: bool
    flip_vertical: bool
    scale: float
    contrast: float
    brightness: float
    blur_sigma: float
    quality: int

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Edit:
        return cls(
            angle=float(rng.uniform(-15.0, 15.0)),
            area=float(rng.uniform(0.6, 0.9)),
            aspect=float(math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))),
            left=float(rng.random()),
            top=float(rng.random()),
            flip_horizontal=bool(rng.random() < 0.5),
            flip_vertical=bool(rng.random() < 0.1),
            scale=float(rng.uniform(0.85, 1.15)),
            contrast=float(rng.uniform(0.75, 1.25)),
            brightness=float(rng.uniform(-25.0, 25.0)),
            blur_sigma=float(rng.uniform(0.3, 1.5)) if rng.random() < 0.5 else 0.0,
            quality=int(rng.integers(40, 91)),
        )

    def apply(self, image: np.ndarray, size: int) -> np.ndarray:
        """The edited copy of a BGR image, about ``size`` × ``scale`` pixels on its long side."""
        height, width = image.shape[:2]
        turn = cv2.getRotationMatrix2D((width / 2, height / 2), self.angle, 1.0)
        rotated = cv2.warpAffine(image, turn, (width, height), borderMode=cv2.BORDER_REFLECT_101)
        crop_w = min(width, max(1, round(width * math.sqrt(self.area * self.aspect))))
        crop_h = min(height, max(1, round(height * math.sqrt(self.area / self.aspect))))
        x, y = round(self.left * (width - crop_w)), round(self.top * (height - crop_h))
        edited = rotated[y : y + crop_h, x : x + crop_w]
        if self.flip_horizontal:
            edited = edited[:, ::-1]
        if self.flip_vertical:
            edited = edited[::-1]
        edited = resize_long_side(np.ascontiguousarray(edited), round(size * self.scale))
        mean = edited.mean()
        lit = (edited.astype(np.float32) - mean) * self.contrast + mean + self.brightness
        edited = np.clip(lit, 0, 255).astype(np.uint8)
        if self.blur_sigma:
            edited = cv2.GaussianBlur(edited, (0, 0), self.blur_sigma)
        return edited


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    factor = long_side / max(height, width)
    target = (max(1, round(width * factor)), max(1, round(height * factor)))
    shrinking = factor < 1
    return cv2.resize(image, target, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return encoded.tobytes()


def available_sources(classes: Sequence[str] | None = None) -> tuple[list[tuple[Source, Path]], list[str]]:
    """The sources present on this machine (restricted to ``classes`` when given), and the names missing."""
    wanted = [s for s in SOURCES if classes is None or s.name in classes]
    unknown = sorted(set(classes or ()) - {source.name for source in SOURCES})
    if unknown:
        raise ValueError(f"unknown classes {unknown}; known: {[source.name for source in SOURCES]}")
    found, missing = [], []
    for source in wanted:
        path = source.path()
        if path is None:
            missing.append(source.name)
        else:
            found.append((source, path))
    return found, missing


def licences_markdown(used: Sequence[Source], command: str) -> str:
    """LICENSES.md: the terms of every photo the set was built from, and how the set was made."""
    lines = [
        "# Sources and licences of this image set",
        "",
        f"Built by `imagesearch.server.dataset_builder` (`{command}`). Each class is one photo",
        "shipped by the package named below: `<class>-0.jpg` is the photo resized, the other files are",
        "seeded edits of it (crop, rotation, flip, brightness/contrast, scale, blur, JPEG quality).",
        "The edits are derivative works of the photo and carry its terms. The licences of the packages'",
        "code (BSD-3-Clause for scikit-image and scikit-learn, matplotlib's PSF-based licence) do not",
        "cover these data files; the statements below are the packages' own words about each file.",
        "",
        "| class | package | file | licence as stated | where it is stated |",
        "|---|---|---|---|---|",
    ]
    for source in used:
        lines.append(
            f"| {source.name} | {source.distribution} {source.version()} | `{source.file}` "
            f"| {source.licence} | {source.where} |"
        )
    return "\n".join(lines) + "\n"


def build_dataset(
    out: Path,
    copies: int = DEFAULT_COPIES,
    seed: int = DEFAULT_SEED,
    size: int = DEFAULT_SIZE,
    *,
    classes: Sequence[str] | None = None,
) -> dict[str, object]:
    """Write ``out/<class>/<class>-<i>.jpg`` (i = 0 the photo, 1..copies its edits) and LICENSES.md.

    The same arguments give the same bytes with the same NumPy and OpenCV versions:
    every random draw comes from a generator seeded by ``seed`` and the class name.
    ``out`` must not exist or be empty, so a set is never a mix of two builds.
    """
    if copies < 0 or size < 32:
        raise ValueError("copies must be >= 0 and size >= 32")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; remove it or choose another folder")
    found, missing = available_sources(classes)
    if not found:
        raise RuntimeError("no source photo is installed (scikit-image, scikit-learn or matplotlib)")
    out.mkdir(parents=True, exist_ok=True)
    for source, path in found:
        photo = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if photo is None:
            raise RuntimeError(f"OpenCV could not read {path}")
        rng = class_rng(seed, source.name)
        folder = out / source.name
        folder.mkdir()
        (folder / f"{source.name}-0.jpg").write_bytes(
            encode_jpeg(resize_long_side(photo, size), ORIGINAL_QUALITY)
        )
        for index in range(1, copies + 1):
            edit = Edit.draw(rng)
            (folder / f"{source.name}-{index}.jpg").write_bytes(
                encode_jpeg(edit.apply(photo, size), edit.quality)
            )
    command = f"--copies {copies} --seed {seed} --size {size}"
    if classes is not None:
        command += f" --classes {','.join(source.name for source, _ in found)}"
    (out / "LICENSES.md").write_text(licences_markdown([source for source, _ in found], command))
    return {
        "out": str(out),
        "classes": [source.name for source, _ in found],
        "missing_sources": missing,
        "images": len(found) * (copies + 1),
        "copies": copies,
        "seed": seed,
        "size": size,
    }


DESCRIPTION = "Write a seeded folder-per-class image set from photos that installed packages ship."


def add_dataset_command(commands: argparse._SubParsersAction) -> None:
    """``imagesearch dataset OUT ...``."""
    parser = commands.add_parser(
        "dataset", help="write the offline labelled image set", description=DESCRIPTION
    )
    add_dataset_arguments(parser)
    parser.set_defaults(handler=run_cli)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=path_argument, help="output folder (must not exist or be empty)")
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES, help="edited copies per photo (9)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (0)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="long side in pixels (480)")
    parser.add_argument("--classes", help="comma-separated subset of the classes (default: all installed)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imagesearch.server.dataset_builder", description=DESCRIPTION
    )
    add_dataset_arguments(parser)
    return run_cli(parser.parse_args(argv))


def run_cli(args: argparse.Namespace) -> int:
    classes = args.classes.split(",") if args.classes else None
    try:
        summary = build_dataset(args.out, args.copies, args.seed, args.size, classes=classes)
    except (FileExistsError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
