"""CNN feature-extraction throughput: in-process vs through the server, same model, same run.

For batch sizes 1, 8 and 32: images/s of ``extractor.extract`` on decoded images,
of decode (the server's ``decode_image``, one image per core at once) + extract on JPEG bytes, and of ``AddImages`` over
gRPC on localhost carrying the same JPEG bytes (decode + extract + index + store).
The ratio server / (decode + extract) is the cost of the server around the model.
Prints a table; writes bench/results/extract.{json,png}.

    .venv/bin/python bench/bench_extract.py [--model efficientnet-lite0] [--images 64]

The model comes from $IMAGESEARCH_MODELS (default var/models): run `make models` first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bar_plot, best_rate, machine, save
from imagesearch.plugins import onnx_cnn
from imagesearch.server.app import run_server
from imagesearch.server.config import Limits, ServerConfig, available_cpus, default_models_dir
from imagesearch.server.imaging import decode_image
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc

BATCH_SIZES = (1, 8, 32)
SERIES = ("extract (in-process)", "decode+extract (in-process)", "AddImages (gRPC)")


def sample_jpegs(count: int) -> list[bytes]:
    """Real photos (scikit-image, scikit-learn), varied by flips and shifts, as JPEG quality 90."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    photos = [data.chelsea(), data.coffee(), load_sample_image("china.jpg"), load_sample_image("flower.jpg")]
    jpegs = []
    for index in range(count):
        rgb = photos[index % len(photos)]
        variant = np.roll(rgb[:, ::-1] if (index // len(photos)) % 2 else rgb, 13 * index, axis=1)
        ok, encoded = cv2.imencode(
            ".jpg", cv2.cvtColor(variant, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
        )
        assert ok
        jpegs.append(encoded.tobytes())
    return jpegs


def batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--images", type=int, default=64, help="images per measurement (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds, best of each (default 5)")
    args = parser.parse_args()

    models = default_models_dir().resolve()
    extractors, problems = onnx_cnn.discover(models)
    extractor = {e.name: e for e in extractors}.get(args.model)
    if extractor is None:
        sys.exit(f"no model {args.model!r} in {models} ({'; '.join(problems) or 'run `make models`'})")
    jpegs = sample_jpegs(args.images)
    decoded = [decode_image(data, Limits(), "image", extractor.min_input_side).pixels for data in jpegs]
    for size in BATCH_SIZES:  # onnxruntime plans memory per input shape on first sight
        extractor.extract(decoded[:size])

    rates: dict[str, list[float]] = {name: [] for name in SERIES}
    decoders = ThreadPoolExecutor(max_workers=available_cpus())

    def decode(data: bytes) -> np.ndarray:
        return decode_image(data, Limits(), "image", extractor.min_input_side).pixels

    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(
            port=0, data_dir=Path(tmp), models_dir=models, default_extractor=args.model, log_level="WARNING"
        )
        with run_server(config) as running, grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.ImageSearchServiceStub(channel)
            stub.AddImages(pb.AddImagesRequest(images=[pb.ImageInput(id="warm-up", content=jpegs[0])]))
            run = iter(range(1_000_000))
            for size in BATCH_SIZES:
                image_batches, jpeg_batches = batches(decoded, size), batches(jpegs, size)

                def extract_only(image_batches: list = image_batches) -> int:
                    for batch in image_batches:
                        extractor.extract(batch)
                    return len(decoded)

                def decode_and_extract(jpeg_batches: list = jpeg_batches) -> int:
                    for batch in jpeg_batches:  # decoded one per core at once, as the server does
                        extractor.extract(list(decoders.map(decode, batch)))
                    return len(jpegs)

                def server_add(jpeg_batches: list = jpeg_batches) -> int:
                    prefix = next(run)
                    for start, batch in enumerate(jpeg_batches):
                        images = [
                            pb.ImageInput(id=f"{prefix}-{start}-{i}", content=data)
                            for i, data in enumerate(batch)
                        ]
                        stub.AddImages(pb.AddImagesRequest(images=images))
                    return len(jpegs)

                # Interleaved rounds, best of each: the machine is shared, so noise must hit all
                # three series alike rather than whichever happened to run during a busy spell.
                best = dict.fromkeys(SERIES, 0.0)
                for _ in range(args.repeats):
                    for name, work in zip(
                        SERIES, (extract_only, decode_and_extract, server_add), strict=True
                    ):
                        best[name] = max(best[name], best_rate(work, 1))
                for name in SERIES:
                    rates[name].append(best[name])

    print(f"machine: {machine()}")
    print(
        f"model: {extractor.name} {extractor.version} ({extractor.dim}-d), onnxruntime intra-op threads "
        f"{extractor.threads}, {args.images} JPEGs (~640x427, q90), best of {args.repeats} interleaved rounds"
    )
    header = "".join(f"{name:>30}" for name in SERIES)
    print(f"{'batch':>6}{header}{'server/in-process':>19}")
    for row, size in enumerate(BATCH_SIZES):
        values = [rates[name][row] for name in SERIES]
        cells = "".join(f"{value:>24.1f} img/s" for value in values)
        print(f"{size:>6}{cells}{values[2] / values[1]:>19.2f}")
    save(
        "extract",
        {
            "model": extractor.name,
            "version": extractor.version,
            "threads": extractor.threads,
            "images": args.images,
            "batch_sizes": list(BATCH_SIZES),
            "images_per_second": rates,
            "server_over_in_process": [
                s / p for s, p in zip(rates[SERIES[2]], rates[SERIES[1]], strict=True)
            ],
        },
    )
    path = bar_plot(
        "extract",
        f"{extractor.name} throughput by batch size ({extractor.threads} ORT threads)",
        [f"batch {size}" for size in BATCH_SIZES],
        rates,
        "images / second",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
