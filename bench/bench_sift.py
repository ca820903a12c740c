"""SIFT collections: extraction throughput, search with geometric re-ranking, bytes stored, same run.

Prints, on 640x480 JPEGs made from the photos installed packages ship (seeded crops, flips and
quarter turns of them) and queries that are edited copies (small rotation, crop, brightness) of
indexed images:
1. extraction throughput: in-process decode + ``SiftLocalFeatures.extract`` + ``SiftExtractor.encode``
   (what AddImages computes) on 1 and 2 threads, and on 2 threads with OpenCV's own threads at 1,
   against AddImages into a ``sift-bovw`` collection from 1, 2 and 4 concurrent callers, batches
   of 16; the ratio server / best in-process setting;
2. search by image on N images for ``sift-bovw``, ``sift-vlad`` and EfficientNet-Lite0 + SIFT:
   stage one only and re-ranking 10, 50 and 100 candidates: client p50/p90/p99, the server's
   stage timings, recall@1 of the edited copies; the same queries' extraction in-process, and the
   50 candidates the server verified (``sift-bovw``) verified again in-process: serially, by
   ``SiftLocalFeatures.verify`` and on 2 threads at 1 OpenMP thread each;
3. bytes stored per image: local features, index, the SQLite files;
4. where the time goes: each step of extraction and verification timed in-process, and the
   50-candidate verification with RANSAC capped at 500 iterations or skipped below 20 matches.
Writes bench/results/sift.{json,png}. About 2.5 minutes on the 2-core VM when it is quiet, 4 when busy.

    .venv/bin/python bench/bench_sift.py [--images 320] [--queries 30] [--rounds 2] [--no-hybrid]

Needs the SIFT vocabulary (and the CNN for the hybrid) in $IMAGESEARCH_MODELS: `make models`.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, machine, percentile, save, save_figure
from imagesearch.client import ImageItem, ImageSearchClient
from imagesearch.plugins.sift.extractors import SiftLocalFeatures
from imagesearch.plugins.sift.features import extract_local, pack, unpack
from imagesearch.plugins.sift.geometry import (
    _MIN_HOMOGRAPHY_INLIERS,
    RANSAC_MAX_ITERS,
    RANSAC_THRESHOLD_PX,
    _plausible,
    ratio_matches,
    verify,
)
from imagesearch.server.app import run_server
from imagesearch.server.config import Limits, ServerConfig, default_models_dir
from imagesearch.server.dataset_builder import available_sources
from imagesearch.server.imaging import decode_image

WIDTH, HEIGHT = 640, 480
BATCH = 16
CALLERS = (1, 2, 4)
RERANKS = (0, 10, 50, 100)
CNN = "efficientnet-lite0"
VERIFIED = "sift-bovw"  # the collection whose re-ranking is also done in-process, step by step
VERIFY_SETTINGS = (
    "1 thread",
    "SiftLocalFeatures.verify (its 2 threads)",
    "2 threads at 1 OpenMP thread each",
)
SEED = 7
BREAKDOWN = "OpenCV's default: 2000 iterations, from 8 matches"
VARIANTS = {  # (max RANSAC iterations, min matches): OpenCV's default, the plugin's, two cheaper ones
    BREAKDOWN: (2000, 8),
    f"imagesearch: {RANSAC_MAX_ITERS} iterations, from {SiftLocalFeatures.min_inliers} matches": (
        RANSAC_MAX_ITERS,
        SiftLocalFeatures.min_inliers,
    ),
    "RANSAC up to 500 iterations": (500, 8),
    "RANSAC only from 20 matches": (2000, 20),
}


# ------------------------------------------------------------------------------ images


def photos() -> list[tuple[str, np.ndarray]]:
    """(name, BGR) of every photo the installed packages ship (dataset_builder's sources)."""
    found, _ = available_sources()
    loaded = [(source.name, cv2.imread(str(path), cv2.IMREAD_COLOR)) for source, path in found]
    return [(name, image) for name, image in loaded if image is not None]


def _crop_4_3(
    image: np.ndarray, rng: np.random.Generator, smallest: float, largest: float = 1.0
) -> np.ndarray:
    """A random 4:3 window, ``smallest``..``largest`` of the largest one's side, resized to 640x480."""
    height, width = image.shape[:2]
    full_w = min(width, height * 4 // 3)
    scale = rng.uniform(smallest, largest)
    w = max(32, int(full_w * scale))
    h = w * 3 // 4
    x = int(rng.integers(0, width - w + 1))
    y = int(rng.integers(0, height - h + 1))
    return cv2.resize(image[y : y + h, x : x + w], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


def indexed_images(count: int, seed: int) -> tuple[list[bytes], list[str]]:
    """``count`` 640x480 JPEGs (q90): photo i % len(photos), flipped or turned, then a random crop."""
    rng = np.random.default_rng(seed)
    sources = photos()
    jpegs, names = [], []
    for i in range(count):
        name, image = sources[i % len(sources)]
        if rng.random() < 0.5:
            image = cv2.flip(image, 1)
        turns = int(rng.integers(0, 4))
        if turns:
            image = np.ascontiguousarray(np.rot90(image, turns))
        jpegs.append(jpeg(_crop_4_3(image, rng, 0.45)))
        names.append(name)
    return jpegs, names


def edited_copy(data: bytes, rng: np.random.Generator) -> bytes:
    """A query: the image turned by up to 15 degrees, 60-90 % of its side cropped out, brighter or
    darker, JPEG q80."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    angle = float(rng.uniform(-15, 15))
    turn = cv2.getRotationMatrix2D((WIDTH / 2, HEIGHT / 2), angle, 1.0)
    image = cv2.warpAffine(image, turn, (WIDTH, HEIGHT), borderMode=cv2.BORDER_REFLECT)
    cropped = _crop_4_3(image, rng, 0.6, 0.9)
    shift = float(rng.uniform(-25, 25))
    cropped = np.clip(cropped.astype(np.float32) * float(rng.uniform(0.85, 1.15)) + shift, 0, 255)
    return jpeg(cropped.astype(np.uint8), 80)


# ------------------------------------------------------------------------------ throughput


def raw_rate(work: Callable[[bytes], object], jpegs: list[bytes], threads: int) -> float:
    """Images/s of ``work`` over every JPEG from ``threads`` threads (OpenCV releases the GIL)."""
    started = time.perf_counter()
    if threads == 1:
        for data in jpegs:
            work(data)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, jpegs))
    return len(jpegs) / (time.perf_counter() - started)


def server_rate(
    client: ImageSearchClient, collection: str, jpegs: list[bytes], callers: int, tag: str
) -> float:
    """Images/s of AddImages carrying ``jpegs`` in batches of 16 from ``callers`` threads."""
    batches = [
        [
            ImageItem(id=f"{tag}-{start + i}", content=data)
            for i, data in enumerate(jpegs[start : start + BATCH])
        ]
        for start in range(0, len(jpegs), BATCH)
    ]
    lock = threading.Lock()

    def caller() -> None:
        while True:
            with lock:
                if not batches:
                    return
                batch = batches.pop()
            client.add_images(batch, collection=collection)

    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        for future in [pool.submit(caller) for _ in range(callers)]:
            future.result()
    return len(jpegs) / (time.perf_counter() - started)


def add_all(client: ImageSearchClient, collection: str, jpegs: list[bytes], callers: int) -> float:
    """Index every JPEG (ids "0".."n-1") from ``callers`` threads; images/s."""
    batches = [
        [ImageItem(id=str(start + i), content=data) for i, data in enumerate(jpegs[start : start + BATCH])]
        for start in range(0, len(jpegs), BATCH)
    ]
    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(lambda batch: client.add_images(batch, collection=collection), batches))
    return len(jpegs) / (time.perf_counter() - started)


# ------------------------------------------------------------------------------ stages


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    return {"count": len(values), **{f"p{q}": percentile(values, q) for q in (0, 10, 50, 90, 100)}}


def _ms(work: Callable[[], object], repeat: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    return (time.perf_counter() - started) * 1000 / repeat


def stage_times(
    local, extractors: dict, jpegs: list[bytes], queries: list[bytes], sources: list[int], db: Path
) -> dict:
    """Median ms of each stage, in-process from one thread (OpenCV keeps its own threads; faiss at
    1 OpenMP thread unless named), over the first 15 queries and the images they were made from."""
    pairs = list(zip(queries[:15], sources[:15], strict=False))
    stages: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        stages.setdefault(name, []).append(value)

    min_side = extractors["sift-bovw"].min_input_side
    stored = {}
    for query, source in pairs:
        pixels = decode_image(query, Limits(), "q", min_side).pixels
        add(
            "decode JPEG",
            _ms(lambda pixels=pixels, query=query: decode_image(query, Limits(), "q", min_side)),
        )
        for side, keypoints, label in (
            (local.max_side, local.max_keypoints, "stored"),
            (local.max_side, local.query_keypoints, "query"),
            (480, local.max_keypoints, "stored, if max_side were 480"),
        ):
            add(
                f"SIFT detect+describe, {keypoints} keypoints ({label})",
                _ms(
                    lambda pixels=pixels, side=side, keypoints=keypoints: extract_local(
                        pixels, side, keypoints
                    )
                ),
            )
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # what cv2.setNumThreads(1) would cost a single query (process-wide)
        try:
            add(
                f"SIFT detect+describe, {local.max_keypoints} keypoints (stored), cv2.setNumThreads(1)",
                _ms(lambda pixels=pixels: extract_local(pixels, local.max_side, local.max_keypoints)),
            )
        finally:
            cv2.setNumThreads(cv_threads)
        found = extract_local(pixels, local.max_side, local.query_keypoints)
        add("pack (query)", _ms(lambda found=found: pack(found), 5))
        packed = pack(found)
        add("unpack (query)", _ms(lambda packed=packed: unpack(packed), 5))
        one = [local.extract([pixels])[0]]
        add("encode sift-bovw", _ms(lambda one=one: extractors["sift-bovw"].encode(one), 5))
        add("encode sift-vlad", _ms(lambda one=one: extractors["sift-vlad"].encode(one), 5))
        if source not in stored:
            stored[source] = local.extract([decode_image(jpegs[source], Limits(), "s", min_side).pixels])[0]
        candidate = unpack(stored[source])
        neighbour = decode_image(jpegs[(source + 1) % len(jpegs)], Limits(), "s", min_side).pixels
        other = unpack(local.extract([neighbour])[0])  # the next image is of another photo
        add("unpack (a candidate)", _ms(lambda data=stored[source]: unpack(data), 5))
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            add(
                f"faiss.knn query x candidate + ratio test, {threads} OpenMP thread{'s' if threads > 1 else ''}",
                _ms(lambda candidate=candidate, found=found: ratio_matches(found, candidate), 3),
            )
        faiss.omp_set_num_threads(1)
        matched = ratio_matches(found, candidate)
        if len(matched) >= 8:
            src, dst = found.points[matched[:, 0]], candidate.points[matched[:, 1]]
            add(
                "RANSAC findHomography (true match)",
                _ms(
                    lambda src=src, dst=dst: cv2.findHomography(src, dst, cv2.RANSAC, RANSAC_THRESHOLD_PX), 3
                ),
            )
        add(
            "verify, true match (1 thread)",
            _ms(lambda candidate=candidate, found=found: verify(found, candidate), 3),
        )
        add("verify, other image (1 thread)", _ms(lambda other=other, found=found: verify(found, other), 3))
    faiss.omp_set_num_threads(2)
    if db.is_file():  # the read a re-ranking of 50 candidates does, on the server's own file
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        rows = [r[0] for r in conn.execute("SELECT row_id FROM local_features LIMIT 400")]
        rng = np.random.default_rng(0)
        for _ in range(10):
            chosen = [int(r) for r in rng.choice(rows, min(50, len(rows)), replace=False)]
            marks = ",".join("?" * len(chosen))
            add(
                "SQLite read of 50 candidates' features",
                _ms(
                    lambda chosen=chosen, marks=marks: conn.execute(
                        f"SELECT row_id, data FROM local_features WHERE row_id IN ({marks})", chosen
                    ).fetchall()
                ),
            )
        conn.close()
    return {name: percentile(values, 50) for name, values in stages.items()}


def timed_verify(
    query, candidate, stages: dict, max_iters: int = 2000, min_matches: int = 8
) -> tuple[int, int]:
    """geometry.verify step by step (the same calls and thresholds; RANSAC capped at ``max_iters``),
    adding each step's ms to ``stages``. Returns (inliers, ratio-test matches)."""
    started = time.perf_counter()
    matched = ratio_matches(query, candidate)
    stages["faiss.knn + ratio test + one-to-one"] += (time.perf_counter() - started) * 1000
    if len(matched) < min_matches:
        return 0, len(matched)
    src, dst = query.points[matched[:, 0]], candidate.points[matched[:, 1]]
    started = time.perf_counter()
    homography, mask = cv2.findHomography(src, dst, cv2.RANSAC, RANSAC_THRESHOLD_PX, maxIters=max_iters)
    stages["RANSAC homography"] += (time.perf_counter() - started) * 1000
    stages["homography fits"] += 1
    inliers = 0
    if homography is not None and mask is not None and abs(homography[2, 2]) >= 1e-12:
        inliers = int(mask.sum())
        if inliers < _MIN_HOMOGRAPHY_INLIERS or not _plausible(homography[:2, :2] / homography[2, 2]):
            inliers = 0
    if inliers:
        return inliers, len(matched)
    started = time.perf_counter()
    model, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_THRESHOLD_PX, maxIters=max_iters
    )
    stages["RANSAC similarity (fallback)"] += (time.perf_counter() - started) * 1000
    if model is None or mask is None or not _plausible(model[:, :2]):
        return 0, len(matched)
    return int(mask.sum()), len(matched)


def verify_breakdown(
    features: bytes, candidates: list[bytes], ids: list[str], source: str, same: list[bool], acc: dict
) -> None:
    """One query's 50 candidates verified on one thread (1 OpenMP thread) by each of VARIANTS:
    total ms, whether the most inliers point at the source, and (OpenCV's default) the ms of each step and
    the matches and inliers of candidates of the query's photo (``same``) and of other photos."""
    threads_before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    stages = dict.fromkeys(
        (
            "unpack",
            "faiss.knn + ratio test + one-to-one",
            "RANSAC homography",
            "RANSAC similarity (fallback)",
            "homography fits",
        ),
        0.0,
    )
    started = time.perf_counter()
    query = unpack(features)
    unpacked = [unpack(data) for data in candidates]
    stages["unpack"] = (time.perf_counter() - started) * 1000
    for variant, (max_iters, min_matches) in VARIANTS.items():
        mine = dict.fromkeys(stages, 0.0)
        started = time.perf_counter()
        found = [timed_verify(query, c, mine, max_iters, min_matches) for c in unpacked]
        total = (time.perf_counter() - started) * 1000
        inliers = [f[0] for f in found]
        best = max(range(len(inliers)), key=lambda i: (inliers[i], -i)) if inliers else -1
        row = acc.setdefault(variant, {"ms": [], "top1": []})
        row["ms"].append(total + stages["unpack"])
        row["top1"].append(best >= 0 and ids[best] == source)  # the server's order: stable sort
        if variant == BREAKDOWN:
            mine["unpack"] = stages["unpack"]
            for name, value in mine.items():
                acc.setdefault("stages", {}).setdefault(name, []).append(value)
            for (count, matches), mine_photo in zip(found, same, strict=True):
                key = "same photo" if mine_photo else "other photos"
                pairs = acc.setdefault("candidates", {})
                pairs.setdefault(f"{key}: ratio-test matches", []).append(matches)
                pairs.setdefault(f"{key}: inliers", []).append(count)
    faiss.omp_set_num_threads(threads_before)


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320, help="images per collection (default 320)")
    parser.add_argument("--queries", type=int, default=30, help="edited copies searched (default 30)")
    parser.add_argument("--measure", type=int, default=64, help="JPEGs per throughput measurement (64)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved throughput rounds, best of each")
    parser.add_argument(
        "--verify-queries", type=int, default=15, help="queries whose 50 candidates are verified in-process"
    )
    parser.add_argument(
        "--no-hybrid", action="store_true", help="skip the EfficientNet-Lite0 + SIFT collection"
    )
    args = parser.parse_args()
    begun = time.perf_counter()

    models = default_models_dir().resolve()
    jpegs, names = indexed_images(args.images, SEED)
    rng = np.random.default_rng(SEED + 1)
    sources = [int(s) for s in rng.choice(args.images, args.queries, replace=False)]
    queries = [edited_copy(jpegs[s], rng) for s in sources]
    measured = jpegs[: args.measure]
    results: dict = {
        "machine": machine(),
        "images": args.images,
        "queries": args.queries,
        "verify_queries": min(args.verify_queries, args.queries),
        "photos": len(set(names)),
        "opencv": cv2.__version__,
        "faiss": faiss.__version__,
    }

    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(
            port=0,
            data_dir=Path(tmp) / "data",
            models_dir=models,
            default_extractor=CNN,
            create_default_collection=False,
            log_level="WARNING",
        )
        with run_server(config) as running, ImageSearchClient(running.target, timeout=600) as client:
            registry = running.engine.registry
            if "sift" not in registry.local_features:
                sys.exit(f"no SIFT vocabulary in {models}: run `make models`")
            local = registry.local_features["sift"].item
            extractors = {name: registry.extractors[name].item for name in ("sift-bovw", "sift-vlad")}
            bovw = extractors["sift-bovw"]
            min_side = max(bovw.min_input_side, config.thumbnail_size)  # the server decodes alike

            def in_process(data: bytes) -> np.ndarray:
                pixels = decode_image(data, Limits(), "image", min_side).pixels
                return bovw.encode(local.extract([pixels]))

            # --- 1. throughput, interleaved rounds, best of each
            client.create_collection("trials", extractor="sift-bovw")
            in_process(measured[0])
            client.add_images([ImageItem(id="warm-up", content=measured[0])], collection="trials")
            cv_threads = cv2.getNumThreads()
            settings = {
                "in-process, 1 thread": lambda: raw_rate(in_process, measured, 1),
                "in-process, 2 threads": lambda: raw_rate(in_process, measured, 2),
                "in-process, 2 threads, cv2.setNumThreads(1)": None,
                **{f"AddImages, {c} caller{'s' if c > 1 else ''} x {BATCH}": c for c in CALLERS},
            }
            best = dict.fromkeys(settings, 0.0)
            for round_ in range(args.rounds):
                for name, how in settings.items():
                    if how is None:
                        cv2.setNumThreads(1)
                        try:
                            rate = raw_rate(in_process, measured, 2)
                        finally:
                            cv2.setNumThreads(cv_threads)
                    elif isinstance(how, int):
                        rate = server_rate(client, "trials", measured, how, f"r{round_}c{how}")
                    else:
                        rate = how()
                    best[name] = max(best[name], rate)
            client.delete_collection("trials")
            raw_best = max(v for k, v in best.items() if k.startswith("in-process"))
            raw_best_default = max(best["in-process, 1 thread"], best["in-process, 2 threads"])
            server_best = max(v for k, v in best.items() if k.startswith("AddImages"))
            results["throughput"] = {
                "images_per_second": best,
                "opencv_threads": cv_threads,
                "server_over_in_process_best": server_best / raw_best,
                "server_over_in_process_1_or_2_threads": server_best / raw_best_default,
            }

            # --- 2. the collections, then searches
            kinds = {"sift-bovw": {"extractor": "sift-bovw"}, "sift-vlad": {"extractor": "sift-vlad"}}
            if not args.no_hybrid and CNN in registry.extractors:
                kinds[f"{CNN} + sift"] = {"extractor": CNN, "local_features": "sift"}
            best_callers = max(
                CALLERS, key=lambda c: best[f"AddImages, {c} caller{'s' if c > 1 else ''} x {BATCH}"]
            )
            collections = {}
            ingest = {}
            for index, (kind, spec) in enumerate(kinds.items()):
                name = f"c{index}"
                collections[kind] = name
                client.create_collection(name, **spec)
                ingest[kind] = add_all(client, name, jpegs, best_callers)
            results["ingest_images_per_second"] = ingest
            results["ingest_callers"] = best_callers

            searches: dict = {kind: {r: [] for r in RERANKS} for kind in kinds}
            raw_one, raw_query, query_keypoints, breakdown = [], [], [], {}
            raw_verify: dict = {VERIFIED: {setting: [] for setting in VERIFY_SETTINGS}}
            one_omp_thread = ThreadPoolExecutor(2, initializer=faiss.omp_set_num_threads, initargs=(1,))
            for name in collections.values():  # warm up each collection's path once
                client.search(queries[0], collection=name, top_k=10, rerank=10)
            for q, query in enumerate(queries):
                for kind, name in collections.items():
                    for rerank in RERANKS:
                        started = time.perf_counter()
                        result = client.search(query, collection=name, top_k=10, rerank=rerank)
                        total = (time.perf_counter() - started) * 1000
                        t = result.timings
                        first = result.hits[0].id if result.hits else ""
                        searches[kind][rerank].append(
                            {
                                "client_ms": total,
                                "decode_ms": t.decode_ms,
                                "extract_ms": t.extract_ms,
                                "search_ms": t.search_ms,
                                "rerank_ms": t.rerank_ms,
                                "server_ms": t.total_ms,
                                "top1": first == str(sources[q]),
                                "top1_same_photo": bool(first) and names[int(first)] == names[sources[q]],
                            }
                        )
                # The same work in-process: the query's features (stage one; denser for re-ranking) ...
                raw_one.append(_ms(lambda query=query: in_process(query)))
                started = time.perf_counter()
                pixels = decode_image(query, Limits(), "image", min_side).pixels
                features = local.extract([pixels], for_query=True)[0]
                raw_query.append((time.perf_counter() - started) * 1000)
                query_keypoints.append(local.count(features))
                if q >= args.verify_queries:
                    continue
                # ... and the verification of the 50 candidates the server re-ranked, read from its store.
                for kind in raw_verify:
                    name = collections[kind]
                    hits = client.search(query, collection=name, top_k=50).hits
                    collection = running.engine.catalog.get(name)
                    rows = [collection.vector_of(hit.id)[0] for hit in hits]
                    stored = collection.local_features_of(rows)
                    candidates = [stored[row] for row in rows]
                    query_unpacked = unpack(features)
                    threads_before = faiss.omp_get_max_threads()
                    faiss.omp_set_num_threads(1)
                    raw_verify[kind][VERIFY_SETTINGS[0]].append(
                        _ms(lambda c=candidates, u=query_unpacked: [verify(u, unpack(x)) for x in c])
                    )
                    faiss.omp_set_num_threads(threads_before)
                    raw_verify[kind][VERIFY_SETTINGS[1]].append(
                        _ms(lambda c=candidates, f=features: local.verify(f, c))
                    )
                    raw_verify[kind][VERIFY_SETTINGS[2]].append(
                        _ms(
                            lambda c=candidates, u=query_unpacked: list(
                                one_omp_thread.map(lambda x: verify(u, unpack(x)).inliers, c)
                            )
                        )
                    )
                    ids = [hit.id for hit in hits]
                    same = [names[int(i)] == names[sources[q]] for i in ids]
                    verify_breakdown(features, candidates, ids, str(sources[q]), same, breakdown)
            one_omp_thread.shutdown()
            results["in_process_p50_ms"] = {
                "stage one query (decode + SIFT 1000 + encode bovw)": percentile(raw_one, 50),
                "re-ranked query (decode + SIFT 2000)": percentile(raw_query, 50),
            }
            results["query_keypoints_mean"] = float(np.mean(query_keypoints))
            results["verify_50_breakdown"] = {
                "mean_ms_per_query": {
                    name: float(np.mean(v)) for name, v in breakdown.get("stages", {}).items()
                },
                "variants": {
                    variant: {
                        "p50_ms": percentile(breakdown[variant]["ms"], 50),
                        "mean_ms": float(np.mean(breakdown[variant]["ms"])),
                        "recall_at_1": float(np.mean(breakdown[variant]["top1"])),
                    }
                    for variant in VARIANTS
                    if variant in breakdown
                },
                "candidates": {
                    key: _quantiles(values) for key, values in breakdown.get("candidates", {}).items()
                },
            }
            results["verify_50_p50_ms"] = {
                kind: {setting: percentile(values, 50) for setting, values in settings.items()}
                for kind, settings in raw_verify.items()
            }
            summary: dict = {}
            for kind in kinds:
                summary[kind] = {}
                for rerank in RERANKS:
                    rows = searches[kind][rerank]

                    def p(field: str, q: float, rows: list = rows) -> float:
                        return percentile([row[field] for row in rows], q)

                    summary[kind][rerank] = {
                        "p50_ms": p("client_ms", 50),
                        "p90_ms": p("client_ms", 90),
                        "p99_ms": p("client_ms", 99),
                        "server_p50": {
                            f: p(f, 50)
                            for f in ("decode_ms", "extract_ms", "search_ms", "rerank_ms", "server_ms")
                        },
                        "recall_at_1": float(np.mean([row["top1"] for row in rows])),
                        "rerank_ms_p50_verified_queries": percentile(
                            [row["rerank_ms"] for row in rows[: args.verify_queries]], 50
                        ),
                        "same_photo_at_1": float(np.mean([row["top1_same_photo"] for row in rows])),
                    }
            results["search"] = summary

            # --- 3. bytes stored
            storage = {}
            for kind, name in collections.items():
                info = client.get_collection(name)
                directory = config.data_dir / "collections" / name
                sqlite_bytes = sum(
                    path.stat().st_size for path in directory.glob("store.sqlite3*") if path.is_file()
                )
                storage[kind] = {
                    "images": info.image_count,
                    "dimension": info.dimension,
                    "local_features_per_image": info.local_features_bytes / info.image_count,
                    "keypoints_per_image": (info.local_features_bytes / info.image_count - 13) / 144,
                    "index_per_image": info.index_bytes / info.image_count,
                    "sqlite_per_image": sqlite_bytes / info.image_count,
                }
            results["storage"] = storage

            # --- 4. stages, in-process
            db = config.data_dir / "collections" / collections["sift-bovw"] / "store.sqlite3"
            results["stages_ms"] = stage_times(local, extractors, jpegs, queries, sources, db)
            results["local"] = {
                "max_keypoints": local.max_keypoints,
                "query_keypoints": local.query_keypoints,
            }
            results["vocabulary_words"] = bovw.vocabulary.k
    results["seconds"] = time.perf_counter() - begun
    report(results)


def report(results: dict) -> None:
    print(f"machine: {results['machine']}; OpenCV {results['opencv']}, faiss {results['faiss']}")
    print(
        f"data: {results['images']} JPEGs 640x480 q90 from {results['photos']} photos (seeded crops, flips, "
        f"quarter turns); {results['queries']} queries: edited copies (+-15 deg, 60-90 % crop, brightness, q80); "
        f"vocabulary {results['vocabulary_words']} words; {results['local']['max_keypoints']} keypoints stored, "
        f"{results['local']['query_keypoints']} for a re-ranked query"
    )
    through = results["throughput"]
    print(
        f"\n1. SIFT extraction throughput (decode + extract + encode; OpenCV threads {through['opencv_threads']})"
    )
    for name, rate in through["images_per_second"].items():
        print(f"   {name:<46}{rate:8.1f} img/s")
    print(
        f"   server best / in-process best: {through['server_over_in_process_best']:.2f} "
        f"(against the best of 1 and 2 threads at OpenCV's default: "
        f"{through['server_over_in_process_1_or_2_threads']:.2f})"
    )
    print(
        f"   ingest of all {results['images']} images, {results['ingest_callers']} callers: "
        + ", ".join(f"{kind} {rate:.1f} img/s" for kind, rate in results["ingest_images_per_second"].items())
    )
    print(f"\n2. search by image, top-10, {results['queries']} queries, one caller (server p50 stage times)")
    print(
        f"   {'collection':<26}{'rerank':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'decode':>8}{'extract':>9}"
        f"{'search':>8}{'rerank':>8}{'R@1':>6}{'photo@1':>9}"
    )
    for kind, levels in results["search"].items():
        for rerank, s in levels.items():
            server = s["server_p50"]
            print(
                f"   {kind:<26}{rerank:>7}{s['p50_ms']:9.1f}{s['p90_ms']:9.1f}{s['p99_ms']:9.1f}"
                f"{server['decode_ms']:8.1f}{server['extract_ms']:9.1f}{server['search_ms']:8.2f}"
                f"{server['rerank_ms']:8.1f}{s['recall_at_1']:6.2f}{s['same_photo_at_1']:9.2f}"
            )
        added = levels[50]["p50_ms"] - levels[0]["p50_ms"]
        print(f"   {kind:<26}rerank 50 adds {added:.1f} ms to the p50")
    raw = results["in_process_p50_ms"]
    one = raw["stage one query (decode + SIFT 1000 + encode bovw)"]
    print(f"   in-process on the same queries, p50: {'; '.join(f'{k} {v:.1f} ms' for k, v in raw.items())}")
    for kind in ("sift-bovw", "sift-vlad"):
        stage_one = results["search"][kind][0]["p50_ms"]
        print(f"   {kind} stage one p50 / in-process stage one p50: {stage_one / one:.2f}")
    print(
        f"   verifying the 50 candidates the server re-ranks, in-process on the same candidates "
        f"(first {results['verify_queries']} queries), p50 ms:"
    )
    for kind, settings in results["verify_50_p50_ms"].items():
        server = results["search"][kind][50]["rerank_ms_p50_verified_queries"]
        cells = ", ".join(f"{setting} {ms:.1f}" for setting, ms in settings.items())
        print(
            f"   {kind:<26}server rerank_ms {server:.1f}; {cells}; server / best {server / min(settings.values()):.2f}"
        )
    print("\n3. bytes stored per image")
    print(
        f"   {'collection':<26}{'dim':>6}{'keypoints':>10}{'local features':>16}{'index':>10}{'SQLite files':>14}"
    )
    for kind, s in results["storage"].items():
        print(
            f"   {kind:<26}{s['dimension']:>6}{s['keypoints_per_image']:10.0f}{s['local_features_per_image']:16.0f}"
            f"{s['index_per_image']:10.0f}{s['sqlite_per_image']:14.0f}"
        )
    print(f"   (queries for re-ranking: {results['query_keypoints_mean']:.0f} keypoints on average)")
    print("\n4. stages in-process, one thread unless named (median ms)")
    for name, ms in results["stages_ms"].items():
        print(f"   {name:<68}{ms:8.2f}")
    b = results["verify_50_breakdown"]
    print(
        f"   verifying {VERIFIED}'s 50 candidates (the server's), 1 thread, mean ms a query: "
        + ", ".join(
            f"{name} {value:.1f}" if name != "homography fits" else f"{name} {value:.1f} of 50"
            for name, value in b["mean_ms_per_query"].items()
        )
    )
    for key, m in sorted(b["candidates"].items()):
        if m["count"]:
            print(
                f"   candidates of {key}: {m['count']} candidates, min {m['p0']:.0f}, p10 {m['p10']:.0f}, "
                f"median {m['p50']:.0f}, p90 {m['p90']:.0f}, max {m['p100']:.0f}"
            )
    for variant, v in b["variants"].items():
        print(
            f"   {variant:<54}p50 {v['p50_ms']:6.1f} ms, mean {v['mean_ms']:6.1f} ms a query, "
            f"recall@1 {v['recall_at_1']:.2f}"
        )
    print(f"\ntotal bench time {results['seconds']:.0f} s")
    save("sift", results)
    plot(results)
    print(f"wrote {RESULTS / 'sift.json'} and {RESULTS / 'sift.png'}")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    through = results["throughput"]["images_per_second"]
    left.barh(list(through), list(through.values()))
    left.invert_yaxis()
    left.set_xlabel("images / second")
    left.set_title("SIFT extraction throughput")
    left.tick_params(axis="y", labelsize=7)
    for kind, levels in results["search"].items():
        right.plot(list(levels), [s["p50_ms"] for s in levels.values()], "o-", label=kind)
    right.set_xlabel("candidates re-ranked (0: stage one only)")
    right.set_ylabel("p50 ms, client side")
    right.set_title(f"search by image, {results['images']} images")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False, ncol=3, fontsize=8)
    save_figure(fig, "sift")


if __name__ == "__main__":
    main()
