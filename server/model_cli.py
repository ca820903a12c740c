"""`imagesearch model list|export|verify`: manage the ONNX models the CNN extractors serve.

Export needs the ``export`` extra (torch); list and verify need only the server
dependencies, and verify adds an ONNX-vs-torch parity check when torch is there.
Each handler returns a process exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imagesearch.plugins import onnx_cnn
from imagesearch.plugins.cnn.labels import top_k
from imagesearch.plugins.cnn.preprocess import preprocess
from imagesearch.plugins.cnn.recipes import RECIPES
from imagesearch.server.client_cli import non_negative_int
from imagesearch.server.config import Limits, default_models_dir
from imagesearch.server.errors import ImageSearchError
from imagesearch.server.imaging import decode_image


def _models_dir(args: argparse.Namespace) -> Path:
    return Path(args.models) if args.models else default_models_dir()


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_list(args: argparse.Namespace) -> int:
    directory = _models_dir(args)
    extractors, problems = onnx_cnn.discover(directory)
    print(f"models in {directory}:")
    if not extractors:
        print("  (none; build the default with `imagesearch model export efficientnet-lite0`)")
    for extractor in extractors:
        sidecar = extractor.sidecar
        source = sidecar.source
        origin = source.get("tag") or source.get("file") or source.get("kind", "?")
        print(
            f"  {extractor.name:<22} dim {extractor.dim:<5} sha256 {sidecar.short_sha}  "
            f"{sidecar.size_bytes / 1e6:6.1f} MB  source {source.get('kind', '?')}:{origin}"
        )
    for problem in problems:
        print(f"  UNUSABLE {problem}")
    print("recipes available to export:")
    for recipe in RECIPES.values():
        if recipe.package_weights:
            weights = f"offline weights from {recipe.package_weights.requirement}"
        elif recipe.imagenet:
            weights = f"--weights FILE, or --weights imagenet ({recipe.imagenet.tag}, needs network)"
        else:
            weights = "--weights FILE"
        print(f"  {recipe.name:<22} dim {recipe.dim:<5} {weights}")
    return 1 if problems else 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from imagesearch.plugins.cnn.export import ExportError, export_recipe
    except ImportError as exc:
        return _error(
            f"export needs torch and onnx: pip install '<checkout>[export]' (distribution imagesearch-cbir) ({exc})"
        )
    if args.recipe not in RECIPES:
        return _error(f"unknown recipe {args.recipe!r}; known: {', '.join(RECIPES)}")
    out = Path(args.out) if args.out else default_models_dir()
    try:
        export_recipe(
            args.recipe,
            out,
            args.weights,
            name=args.name,
            resize_short_side=args.resize_short_side,
            progress=lambda message: print(message, flush=True),
        )
    except ExportError as exc:
        return _error(str(exc))
    return 0


def _parity(extractor: onnx_cnn.OnnxCnnExtractor, images: Sequence[np.ndarray]) -> str:
    try:
        import torch

        from imagesearch.plugins.cnn.export import reference_model
    except ImportError:
        return "parity: skipped (torch is not installed)"
    model, why = reference_model(extractor.sidecar)
    if model is None:
        return f"parity: skipped ({why})"
    with torch.no_grad():
        reference, _ = model(torch.from_numpy(preprocess(images, extractor.sidecar.preprocessing)))
    diff = float(np.max(np.abs(extractor.extract(images) - reference.numpy())))
    return f"parity: ONNX vs torch max |embedding diff| = {diff:.2e} ({why})"


def cmd_verify(args: argparse.Namespace) -> int:
    directory = _models_dir(args)
    extractors, problems = onnx_cnn.discover(directory)
    by_name = {extractor.name: extractor for extractor in extractors}
    if args.model not in by_name:
        hint = f"; unusable: {'; '.join(problems)}" if problems else ""
        return _error(f"no model {args.model!r} in {directory} (have: {', '.join(by_name) or 'none'}){hint}")
    extractor = by_name[args.model]
    images = []
    for path in args.images:
        try:
            images.append(
                decode_image(Path(path).read_bytes(), Limits(), path, extractor.min_input_side).pixels
            )
        except (OSError, ImageSearchError) as exc:
            return _error(f"{path}: {exc}")
    embeddings = extractor.extract(images)
    logits = extractor.classify(images) if extractor.has_logits else None
    print(f"{extractor.name} version {extractor.version}, dim {extractor.dim}")
    for index, path in enumerate(args.images):
        height, width = images[index].shape[:2]
        norm = float(np.linalg.norm(embeddings[index]))
        print(f"{path} (decoded {width}x{height}): embedding dim {embeddings.shape[1]}, L2 norm {norm:.3f}")
        if logits is not None:
            for name, probability in top_k(logits[index], args.top):
                print(f"  {probability:7.2%}  {name}")
    print(_parity(extractor, images))
    return 0


def cmd_vocabulary(args: argparse.Namespace) -> int:
    from imagesearch.server.sift_vocabulary import build_generic_vocabulary

    out = Path(args.out) if args.out else default_models_dir()
    try:
        path, vocabulary = build_generic_vocabulary(out, args.words, args.seed)
    except (RuntimeError, ValueError) as exc:
        return _error(str(exc))
    print(f"wrote {path}: {vocabulary.k} words, version {vocabulary.version}")
    return 0


def add_model_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `model` command (list, export, verify); each sets ``handler`` to a function returning an exit code."""
    model = subparsers.add_parser(
        "model", help="list, export and verify CNN models (ONNX); build the SIFT vocabulary"
    )
    commands = model.add_subparsers(
        dest="model_command", required=True, metavar="{list,export,vocabulary,verify}"
    )

    models_help = "models directory (default: $IMAGESEARCH_MODELS or var/models)"
    listing = commands.add_parser("list", help="models in the models directory, and recipes to export")
    listing.add_argument("--models", help=models_help)
    listing.set_defaults(handler=cmd_list)

    export = commands.add_parser("export", help="export a recipe's weights to ONNX + JSON sidecar")
    export.add_argument("recipe", metavar="NAME", help=f"recipe: {', '.join(RECIPES)}")
    export.add_argument(
        "--weights",
        help="torchvision-layout state dict (.pth/.safetensors), or 'imagenet' to download torchvision's "
        "IMAGENET1K weights (needs network); efficientnet-lite0 takes its weights from its pip package",
    )
    export.add_argument("--out", help="output directory (default: the models directory)")
    export.add_argument(
        "--name", help="model name (default: the recipe name); files are NAME.onnx and NAME.json"
    )
    export.add_argument(
        "--resize-short-side", type=int, help="override the resize before the centre crop (e.g. 232)"
    )
    export.set_defaults(handler=cmd_export)

    vocabulary = commands.add_parser(
        "vocabulary", help="build the generic SIFT vocabulary (sift-bovw, sift-vlad) from bundled photos"
    )
    vocabulary.add_argument("--out", help="output directory (default: the models directory)")
    vocabulary.add_argument("--words", type=int, default=32, help="vocabulary size k (default 32)")
    vocabulary.add_argument("--seed", type=non_negative_int, default=0, help="k-means seed (default 0)")
    vocabulary.set_defaults(handler=cmd_vocabulary)

    verify = commands.add_parser("verify", help="classify images (top-5) and check ONNX vs torch parity")
    verify.add_argument("model", metavar="NAME", help="model name in the models directory")
    verify.add_argument("images", metavar="IMAGE", nargs="+")
    verify.add_argument("--models", help=models_help)
    verify.add_argument("--top", type=int, default=5, help="how many classes to show (default 5)")
    verify.set_defaults(handler=cmd_verify)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagesearch", description="imagesearch model tools")
    add_model_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
