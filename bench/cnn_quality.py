"""The measurements behind docs/models.md for the CNN extractor: preprocessing, decoding, threads, INT8.

    .venv/bin/python bench/cnn_quality.py [--sections preprocess,decode,threads,runs,int8]

- preprocess: our OpenCV crop vs torchvision's PIL path (and torch's antialiased
  bilinear), in grey levels and as embedding cosine; plain INTER_LINEAR for contrast.
- decode: JPEG reduced decoding (libjpeg 1/2, 1/4, 1/8) vs full decoding, shrinking
  to the resize target or to twice it: decode time and embedding cosine.
- threads: images/s for 1 and 2 intra-op threads, spinning on/off, 1/2/8 callers.
- runs: images per onnxruntime run (1, 8, 32) on one thread, and a batch of 32 through
  the extractor image by image on one worker per core, in two halves, or as one run.
- int8: onnxruntime dynamic INT8 quantisation vs fp32: cosine, top-1 agreement,
  near-duplicate retrieval, speed.

Needs the default model in $IMAGESEARCH_MODELS (`make models`); writes bench/results/cnn_quality.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, save
from imagesearch.plugins import onnx_cnn
from imagesearch.plugins.cnn.preprocess import (
    center_crop,
    normalize,
    prepare_image,
    resized_size,
)
from imagesearch.server.config import Limits, default_models_dir
from imagesearch.server.imaging import decode_image
from tests.cnn_fixtures import distorted_copy


def photos() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_image

    rgb = {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
    }
    return {name: cv2.cvtColor(image, cv2.COLOR_RGB2BGR) for name, image in rgb.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def session(path: Path, threads: int = 2, spinning: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def section_preprocess(extractor: onnx_cnn.OnnxCnnExtractor) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    spec = extractor.sidecar.preprocessing
    run = session(extractor.onnx_path)

    def embed(crop: np.ndarray) -> np.ndarray:
        return run.run(["embedding"], {"input": normalize(crop[None], spec)})[0][0]

    def geometry(rgb: np.ndarray) -> tuple[int, int]:
        return resized_size(rgb.shape[0], rgb.shape[1], spec.resize_short_side)

    def pil(rgb: np.ndarray) -> np.ndarray:
        new_h, new_w = geometry(rgb)
        return center_crop(
            np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR)), spec.crop_size
        )

    def torch_antialias(rgb: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
        out = F.interpolate(tensor, size=geometry(rgb), mode="bilinear", antialias=True, align_corners=False)
        return center_crop(
            out.round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8), spec.crop_size
        )

    def linear(rgb: np.ndarray) -> np.ndarray:
        new_h, new_w = geometry(rgb)
        return center_crop(cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR), spec.crop_size)

    cases = photos()
    cases["china x5 (3200x2135)"] = cv2.resize(
        cases["china"], None, fx=5, fy=5, interpolation=cv2.INTER_CUBIC
    )
    cases["coffee 150x100 (enlarged)"] = cv2.resize(cases["coffee"], (150, 100), interpolation=cv2.INTER_AREA)
    rows = []
    print(f"\npreprocessing vs reference (grey levels 0-255; cosine of {extractor.name} embeddings)")
    print(
        f"{'image':28}{'reference':>10}{'ours mean':>10}{'max':>5}{'cos':>9}{'LINEAR mean':>12}{'max':>5}{'cos':>9}"
    )
    for name, bgr in cases.items():
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        ours, plain = prepare_image(bgr, spec), linear(rgb)
        for ref_name, reference in (("PIL", pil(rgb)), ("torch-aa", torch_antialias(rgb))):
            d_ours = np.abs(ours.astype(np.int16) - reference)
            d_lin = np.abs(plain.astype(np.int16) - reference)
            row = {
                "image": name,
                "reference": ref_name,
                "ours_mean": float(d_ours.mean()),
                "ours_max": int(d_ours.max()),
                "ours_cos": cosine(embed(ours), embed(reference)),
                "linear_mean": float(d_lin.mean()),
                "linear_max": int(d_lin.max()),
                "linear_cos": cosine(embed(plain), embed(reference)),
            }
            rows.append(row)
            print(
                f"{name:28}{ref_name:>10}{row['ours_mean']:>10.2f}{row['ours_max']:>5}{row['ours_cos']:>9.5f}"
                f"{row['linear_mean']:>12.2f}{row['linear_max']:>5}{row['linear_cos']:>9.5f}"
            )
    return rows


def section_decode(extractor: onnx_cnn.OnnxCnnExtractor) -> list[dict]:
    target = extractor.sidecar.preprocessing.resize_short_side
    rows = []
    print(f"\nreduced JPEG decoding (q92) vs full decoding; resize target {target}")
    print(f"{'image':26}{'full ms':>9}{'to':>6}{'ms':>7}{'cos':>9}{'to':>6}{'ms':>7}{'cos':>9}")
    for name, bgr in photos().items():
        for factor in (3, 5, 8):
            large = cv2.resize(bgr, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
            data = cv2.imencode(".jpg", large, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
            started = time.perf_counter()
            full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            full_ms = (time.perf_counter() - started) * 1e3
            row = {"image": f"{name} x{factor} {large.shape[1]}x{large.shape[0]}", "full_ms": full_ms}
            line = f"{row['image']:26}{full_ms:>9.1f}"
            for min_side in (target, 2 * target):
                started = time.perf_counter()
                reduced = decode_image(data, Limits(), "image", min_side).pixels
                elapsed = (time.perf_counter() - started) * 1e3
                full_vec, reduced_vec = extractor.extract([full, reduced])
                similarity = cosine(full_vec, reduced_vec)
                row[f"min_side_{min_side}"] = {
                    "short_side": min(reduced.shape[:2]),
                    "ms": elapsed,
                    "cos": similarity,
                }
                line += f"{min(reduced.shape[:2]):>6}{elapsed:>7.1f}{similarity:>9.5f}"
            rows.append(row)
            print(line)
    return rows


def _rate(run, batch: np.ndarray, callers: int, repeats: int = 6) -> float:
    def work() -> None:
        for _ in range(repeats):
            run.run(["embedding"], {"input": batch})

    threads = [threading.Thread(target=work) for _ in range(callers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return callers * repeats * len(batch) / (time.perf_counter() - started)


def section_threads(extractor: onnx_cnn.OnnxCnnExtractor) -> list[dict]:
    batch = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    rows = []
    print("\nonnxruntime intra-op threads (batch 8, images/s, best of 2)")
    print(f"{'threads':>8}{'spinning':>10}{'1 caller':>10}{'2 callers':>11}{'8 callers':>11}")
    for threads in (1, 2):
        for spinning in (True, False):
            run = session(extractor.onnx_path, threads, spinning)
            run.run(["embedding"], {"input": batch})
            rates = {c: max(_rate(run, batch, c) for _ in range(2)) for c in (1, 2, 8)}
            rows.append({"threads": threads, "spinning": spinning, "rates": rates})
            print(f"{threads:>8}{spinning!s:>10}{rates[1]:>10.1f}{rates[2]:>11.1f}{rates[8]:>11.1f}")
    return rows


def _median_rate(work, images: int, repeats: int = 5) -> float:
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return images / sorted(times)[repeats // 2]


def section_runs(extractor: onnx_cnn.OnnxCnnExtractor) -> list[dict]:
    """Why a batch runs image by image (DEFAULT_MAX_BATCH = 1), one worker per core."""
    batch = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
    run = session(extractor.onnx_path, threads=1)
    rows = []
    print("\nimages per onnxruntime run, one intra-op thread, 32 images (images/s, median of 5)")
    for size in (1, 8, 32):
        rate = _median_rate(
            lambda size=size: [
                run.run(["embedding"], {"input": batch[i : i + size]}) for i in range(0, 32, size)
            ],
            32,
        )
        rows.append({"what": f"runs of {size}, 1 thread", "img_s": rate})
        print(f"  runs of {size:>2}: {rate:6.1f}")
    images = [photo for photo in photos().values() for _ in range(6)][:32]
    threads = extractor.threads
    print(f"\na batch of 32 photos through the extractor ({threads} cores; images/s, median of 5)")
    for label, max_batch in (
        ("image by image, one worker per core (the default)", 1),
        ("two halves, one worker per core", 16),
        (f"one run on {threads} intra-op threads", 32),
    ):
        candidate = onnx_cnn.OnnxCnnExtractor(
            extractor.sidecar, extractor.onnx_path, max_batch=max_batch, threads=threads
        )
        rate = _median_rate(lambda candidate=candidate: candidate.extract(images), len(images))
        rows.append({"what": label, "img_s": rate})
        print(f"  {label:52}{rate:6.1f}")
    return rows


def section_int8(extractor: onnx_cnn.OnnxCnnExtractor) -> list[dict]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = list(photos().values())
    images += [distorted_copy(image) for image in images]
    batch = np.concatenate(
        [
            normalize(
                prepare_image(i, extractor.sidecar.preprocessing)[None], extractor.sidecar.preprocessing
            )
            for i in images
        ]
    )
    reference = session(extractor.onnx_path)
    ref_embedding, ref_logits = reference.run(None, {"input": batch})
    count = len(images) // 2
    rows = []
    print(f"\ndynamic INT8 quantisation vs fp32 ({len(images)} images: {count} photos + near-duplicates)")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(extractor.onnx_path), str(prepared))
        for weight_type in (QuantType.QInt8, QuantType.QUInt8):
            path = Path(tmp) / f"{weight_type.name}.onnx"
            quantize_dynamic(str(prepared), str(path), weight_type=weight_type)
            run = session(path)
            embedding, logits = run.run(None, {"input": batch})
            cos = [cosine(a, b) for a, b in zip(embedding, ref_embedding, strict=True)]
            unit = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
            retrieval = bool((np.argmax(unit[count:] @ unit[:count].T, axis=1) == np.arange(count)).all())
            row = {
                "weights": weight_type.name,
                "size_mb": path.stat().st_size / 1e6,
                "cos_min": min(cos),
                "cos_mean": float(np.mean(cos)),
                "top1_agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
                "duplicates_found": retrieval,
                "int8_img_s": _rate(run, batch[:8], 1),
                "fp32_img_s": _rate(reference, batch[:8], 1),
            }
            rows.append(row)
            print(
                f"{row['weights']}: {row['size_mb']:.1f} MB, cos vs fp32 min {row['cos_min']:.3f} mean "
                f"{row['cos_mean']:.3f}, top-1 agreement {row['top1_agreement']:.0%}, near-duplicates found: "
                f"{retrieval}, {row['int8_img_s']:.1f} img/s vs fp32 {row['fp32_img_s']:.1f}"
            )
    return rows


SECTIONS = {
    "preprocess": section_preprocess,
    "decode": section_decode,
    "threads": section_threads,
    "runs": section_runs,
    "int8": section_int8,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args()
    extractors, problems = onnx_cnn.discover(default_models_dir())
    extractor = {e.name: e for e in extractors}.get(args.model)
    if extractor is None:
        sys.exit(
            f"no model {args.model!r} in {default_models_dir()} ({'; '.join(problems) or 'run `make models`'})"
        )
    print(f"machine: {machine()}\nmodel: {extractor.name} {extractor.version}")
    results = {name: SECTIONS[name](extractor) for name in args.sections.split(",")}
    print(f"wrote {save('cnn_quality', {'model': extractor.name, 'version': extractor.version, **results})}")


if __name__ == "__main__":
    main()
