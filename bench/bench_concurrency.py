"""Many callers at once: the asyncio server with micro-batching against the raw libraries, same run.

Prints, on 20,000 x 1280 flat cosine vectors (bring-your-own vectors):
1. one caller, search by vector: server p50 against raw FAISS p50 at 1 and at 2 threads, and
   against the kernel the server uses for a lone query (NumPy sgemv) run raw;
2. 1..32 concurrent callers: server queries/s, p50, p99, against raw FAISS answering batches of
   that many queries at its best thread count (the most any server could get out of FAISS);
3. 16 callers searching by image (the default CNN): images/s against one caller, and against
   onnxruntime extracting batches of 16 in-process;
4. 64 idle AddImagesStream calls open: health and search latency against idle;
5. durable ingest of the 20,000 vectors in batches of 256, by AddImages one batch after the other
   and by one AddImagesStream, against a bare SQLite insert of the same rows with the same
   durability (WAL, synchronous=FULL, one commit per batch) at its best page size, and what
   moving such a batch costs: refused by the server, and through gRPC alone to a bare server; and
   the floor under the server's stream: the same stream into a process that does only the least
   any durable server must (bench.common.MinimalPipeline);
and plots queries/s and p99 against callers (bench/results/concurrency.png).

The server runs in its own process (bench/server_process.py), as it is deployed: clients in the
server's process would add their Python work to the server's GIL.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cv2
import faiss
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    RESULTS,
    add_data_arguments,
    bare_insert_rate,
    bare_store,
    machine,
    p50_ms,
    percentile,
    random_data,
    save,
    save_figure,
)
from bench.server_process import bare_grpc_process, pipeline_process, server_process
from imagesearch.client import float_vector
from imagesearch.plugins import l2_normalize, onnx_cnn
from imagesearch.server.config import Limits, ServerConfig, default_models_dir
from imagesearch.server.imaging import decode_image
from imagesearch.server.vector_index import BLAS_THRESHOLD, WHEEL_BLAS_THRESHOLD
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc

MODEL = "efficientnet-lite0"
BARE_PAGE_SIZES = (
    16384,
    32768,
)  # the store's for 1280-d rows, and the largest (each more written before the stream slows it)
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` processes that keep a core busy each, for the duration: the server sharing its
    cores with other work, as on a shared host (where FAISS's spinning OpenMP threads made 16
    callers slower than one; docs/operations.md, OMP_WAIT_POLICY)."""
    context = multiprocessing.get_context("spawn")
    spinners = [context.Process(target=_spin, daemon=True) for _ in range(count)]
    for spinner in spinners:
        spinner.start()
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.join()


def latencies(call: Callable[[int], object], callers: int, seconds: float) -> tuple[float, list[float]]:
    """Run ``call(i)`` from ``callers`` threads for ``seconds``; return (calls/s, latencies in ms)."""
    stop, times, lock = threading.Event(), [], threading.Lock()

    def loop(worker: int) -> None:
        i = worker
        mine = []
        while not stop.is_set():
            started = time.perf_counter()
            call(i)
            mine.append((time.perf_counter() - started) * 1000)
            i += callers
        with lock:
            times.extend(mine)

    with ThreadPoolExecutor(callers) as pool:
        started = time.perf_counter()
        for worker in range(callers):
            pool.submit(loop, worker)
        time.sleep(seconds)
        stop.set()
    return len(times) / (time.perf_counter() - started), times


def index_vectors(index: faiss.IndexFlat) -> np.ndarray:
    """A flat index's vectors as a NumPy view (no copy)."""
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def raw_faiss(base: np.ndarray, queries: np.ndarray, callers: list[int]) -> dict:
    """Raw FAISS at its best: single-query p50 at 1 and 2 threads, each at the better of the wheel's
    BLAS threshold and the server's; batches of c queries at 2 threads and the better threshold."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(l2_normalize(base))
    prepared = l2_normalize(queries)
    thresholds = (WHEEL_BLAS_THRESHOLD, BLAS_THRESHOLD)

    def p50(batch: int, pause_s: float = 0.0) -> float:
        times = []
        for start in range(0, min(len(prepared), 40 * batch if batch > 1 else 200), batch):
            if pause_s:
                time.sleep(pause_s)
            started = time.perf_counter()
            index.search(prepared[start : start + batch], 10)
            times.append((time.perf_counter() - started) * 1000)
        return percentile(times, 50)

    by_threshold: dict[str, float] = {}  # "batch/threads/threshold" -> p50 ms, to show both paths

    def best(batch: int, threads: int, pause_s: float = 0.0) -> float:
        faiss.omp_set_num_threads(threads)
        found = []
        for threshold in thresholds:
            faiss.cvar.distance_compute_blas_threshold = threshold
            found.append(p50(batch, pause_s))
            if not pause_s:
                by_threshold[f"{batch}/{threads}/{threshold}"] = found[-1]
        return min(found)

    def gemv_p50(pause_s: float) -> float:  # the kernel the server uses for a lone query (vector_index)
        base = index_vectors(index)
        times = []
        for query in prepared[:200]:
            if pause_s:
                time.sleep(pause_s)
            started = time.perf_counter()
            scores = base @ query
            np.argpartition(-scores, 9)[:10]
            times.append((time.perf_counter() - started) * 1000)
        return percentile(times, 50)

    try:
        single = {threads: best(1, threads) for threads in (1, 2)}
        gemv = {"back_to_back": gemv_p50(0.0), "after_pause": gemv_p50(0.002)}
        # A server never calls FAISS back to back: one caller's queries are a round trip apart, and
        # on this VM an index scan after a pause is slower (cores and caches go cold). The same
        # queries with a 2 ms sleep before each: what the transport leaves FAISS.
        paused = min(best(1, threads, 0.002) for threads in (1, 2))
        batched = {}
        for c in callers:
            batch_ms = best(c, 2)
            batched[c] = {"qps": c * 1000 / batch_ms, "p50_ms": batch_ms}
    finally:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return {
        "single_p50_ms": single,
        "single_after_pause_p50_ms": paused,
        "single_gemv_p50_ms": gemv,
        "batched": batched,
        "p50_ms_by_batch_threads_threshold": by_threshold,
    }


def storage_figures(base: np.ndarray, queries: np.ndarray) -> dict:
    """float16 against float32 storage of the same flat index: recall@10 and single-query scan time."""
    prepared, asked = l2_normalize(base), l2_normalize(queries[:200])
    full = faiss.IndexFlatIP(base.shape[1])
    half = faiss.IndexScalarQuantizer(
        base.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    figures = {}
    for name, index in (("float32", full), ("float16", half)):
        index.add(prepared)
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            times = []
            for q in asked:
                started = time.perf_counter()
                index.search(q[None], 10)
                times.append((time.perf_counter() - started) * 1000)
            figures[f"{name}_p50_ms_{threads}t"] = percentile(times, 50)
    faiss.omp_set_num_threads(2)
    _, truth = full.search(asked, 10)
    _, found = half.search(asked, 10)
    figures["float16_recall_at_10"] = float(
        np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    )
    best = {
        name: min(figures[f"{name}_p50_ms_1t"], figures[f"{name}_p50_ms_2t"])
        for name in ("float32", "float16")
    }
    figures["float16_scan_time_ratio"] = best["float16"] / best["float32"]
    return figures


def bare_sqlite_rate(vectors: np.ndarray, directory: Path, page_size: int) -> float:
    """Rows/s of the same rows inserted into the store's own schema with the store's durability
    (WAL, synchronous=FULL, one commit per 256) by one executemany per batch, and nothing else."""
    conn = bare_store(directory / f"bare-{page_size}.sqlite3", page_size)
    try:
        return bare_insert_rate(conn, vectors)
    finally:
        conn.close()


def stream_ingest_rate(
    stub: pb_grpc.ImageSearchServiceStub, requests: list[pb.AddImagesRequest], dim: int
) -> float:
    """Vectors/s of the same batches sent as the chunks of one AddImagesStream (the bulk path:
    the server checks a chunk while the one before it commits), into a collection of its own."""
    name = "vec-stream"
    stub.CreateCollection(
        pb.CreateCollectionRequest(collection=pb.Collection(name=name, extractor=f"vectors-{dim}"))
    )
    chunks = [pb.AddImagesStreamRequest(collection=name, images=r.images) for r in requests]
    started = time.perf_counter()
    response = stub.AddImagesStream(iter(chunks))
    elapsed = time.perf_counter() - started
    assert response.added_count == sum(len(r.images) for r in requests), response.added_count
    stub.DeleteCollection(pb.DeleteCollectionRequest(name=name))
    return response.added_count / elapsed


def per_call_floor(
    stub: pb_grpc.ImageSearchServiceStub,
    health: health_pb2_grpc.HealthStub,
    base: np.ndarray,
    query_messages: list[pb.FloatVector],
    dim: int,
) -> dict[str, float]:
    """Calls/s from 16 callers of an empty call (health) and of a search whose scan costs nothing
    (256 vectors): what each call costs the server and the two cores apart from the scan."""
    name = "vec-small"
    stub.CreateCollection(
        pb.CreateCollectionRequest(collection=pb.Collection(name=name, extractor=f"vectors-{dim}"))
    )
    stub.AddImages(
        pb.AddImagesRequest(
            collection=name,
            images=[pb.ImageInput(id=str(i), vector=float_vector(v)) for i, v in enumerate(base[:256])],
        )
    )

    def search_small(i: int) -> object:
        return stub.Search(
            pb.SearchRequest(collection=name, vector=query_messages[i % len(query_messages)], top_k=10)
        )

    floor = {
        "health_16_callers_per_s": latencies(lambda i: health.Check(health_pb2.HealthCheckRequest()), 16, 2)[
            0
        ],
        "small_search_16_callers_per_s": latencies(search_small, 16, 3)[0],
    }
    stub.DeleteCollection(pb.DeleteCollectionRequest(name=name))
    return floor


def transport_ms(stub: pb_grpc.ImageSearchServiceStub, requests: list[pb.AddImagesRequest]) -> float:
    """p50 round trip of the same batches sent to a collection that does not exist: what moving and
    parsing 256 x 1280 floats costs before the server does any work (it answers NOT_FOUND)."""
    times = []
    for request in requests:
        missing = pb.AddImagesRequest(collection="no-such-collection", images=request.images)
        started = time.perf_counter()
        try:
            stub.AddImages(missing)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 50)


def grpc_alone_ms(requests: list[pb.AddImagesRequest]) -> float:
    """p50 round trip of the same batches to a server in its own process that answers without
    parsing them (bench/server_process.py): what gRPC alone costs, the client's serialising
    included. Any server's durable add of such a batch costs at least this plus the insert."""
    with (
        bare_grpc_process(OPTIONS) as bare,
        grpc.insecure_channel(bare.target, options=OPTIONS) as channel,
    ):
        add = channel.unary_unary(
            "/imagesearch.v1.ImageSearchService/AddImages",
            request_serializer=pb.AddImagesRequest.SerializeToString,
            response_deserializer=bytes,
        )
        for request in requests[:3]:  # the connection's windows grow on the first large messages
            add(request)
        return p50_ms(add, requests)


def minimal_stream_rate(requests: list[pb.AddImagesRequest], directory: Path) -> float:
    """Vectors/s of the same batches sent as one stream to a gRPC server in its own process that
    only does the least any durable server must (``bench.common.MinimalPipeline``: parse, check,
    normalise, commit, index): the floor under the server's own stream, gRPC's cost included."""
    with (
        pipeline_process(OPTIONS, directory) as floor,
        grpc.insecure_channel(floor.target, options=OPTIONS) as channel,
    ):
        ingest = channel.stream_unary(
            "/imagesearch.v1.ImageSearchService/AddImagesStream",
            request_serializer=pb.AddImagesRequest.SerializeToString,
            response_deserializer=bytes,
        )
        ingest(iter(requests[:3]))  # the connection's windows grow on the first large messages
        started = time.perf_counter()
        ingest(iter(requests))
        return sum(len(r.images) for r in requests) / (time.perf_counter() - started)


def sample_jpegs(count: int) -> list[bytes]:
    """Real photos shipped by scikit-image, cropped and resized to ~640x480 JPEGs."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field()]
    jpegs = []
    for i in range(count):
        rgb = photos[i % len(photos)]
        h, w = rgb.shape[:2]
        crop = rgb[(i * 7) % (h // 8) :, (i * 11) % (w // 8) :]
        bgr = cv2.resize(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), (640, 480))
        jpegs.append(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return jpegs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, queries=2000)
    parser.add_argument("--callers", default="1,2,4,8,16,32")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--idle-streams", type=int, default=64)
    defaults = ServerConfig()
    parser.add_argument("--batch-max-wait-ms", type=float, default=defaults.batch_max_wait_ms)
    parser.add_argument("--extract-max-wait-ms", type=float, default=defaults.extract_max_wait_ms)
    parser.add_argument(
        "--gemv-max-queries",
        type=int,
        default=None,
        help="override server/vector_index.py's GEMV_MAX_QUERIES (0: every search through FAISS)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the server's process only (repeatable); e.g. "
        "GOMP_SPINCOUNT=300000 gives FAISS's OpenMP threads libgomp's default spinning back",
    )
    parser.add_argument(
        "--busy-processes",
        type=int,
        default=0,
        help="processes keeping a core busy each while the searches by vector are measured (a shared host)",
    )
    args = parser.parse_args()
    server_env = dict(item.split("=", 1) for item in args.server_env)
    callers = [int(c) for c in args.callers.split(",")]
    base, queries = random_data(args)
    query_messages = [float_vector(q) for q in queries]
    results: dict = {
        "n": args.n,
        "dim": args.dim,
        "machine": machine(),
        "server_env": server_env,
        "busy_processes": args.busy_processes,
    }

    raw = raw_faiss(base, queries, callers)
    results["raw_faiss"] = raw
    results["storage"] = storage_figures(base, queries)
    models = default_models_dir().resolve()
    extractors = {e.name: e for e in onnx_cnn.discover(models)[0]}
    jpegs = sample_jpegs(64)
    have_cnn = MODEL in extractors
    if have_cnn:
        decoded = [decode_image(j, Limits(), "image").pixels for j in jpegs[:16]]
        extractors[MODEL].extract(decoded)  # warm up
        started = time.perf_counter()
        for _ in range(3):
            extractors[MODEL].extract(decoded)
        results["raw_onnxruntime_batch16_img_s"] = 48 / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp:
        config = ServerConfig(
            port=0,
            data_dir=Path(tmp) / "data",
            models_dir=models,
            default_extractor=MODEL,
            log_level="WARNING",
            workers=64,
            batch_max_wait_ms=args.batch_max_wait_ms,
            extract_max_wait_ms=args.extract_max_wait_ms,
        ).replace(limits={"max_streams_per_peer": args.idle_streams + 8})
        with (
            server_process(
                config, vector_dim=args.dim, gemv_max_queries=args.gemv_max_queries, env=server_env
            ) as running,
            grpc.insecure_channel(running.target, options=OPTIONS) as channel,
        ):
            stub = pb_grpc.ImageSearchServiceStub(channel)
            stub.CreateCollection(
                pb.CreateCollectionRequest(
                    collection=pb.Collection(name="vec", extractor=f"vectors-{args.dim}")
                )
            )
            requests = [  # built before the clock starts: the client's protobuf work is not the server's
                pb.AddImagesRequest(
                    collection="vec",
                    images=[
                        pb.ImageInput(id=str(start + i), vector=float_vector(v))
                        for i, v in enumerate(base[start : start + 256])
                    ],
                )
                for start in range(0, args.n, 256)
            ]
            started = time.perf_counter()
            for request in requests:
                stub.AddImages(request)
            elapsed = time.perf_counter() - started
            running.snapshot()  # now, not during the measurements below (each pays for its own)
            bare = {size: bare_sqlite_rate(base, Path(tmp), size) for size in BARE_PAGE_SIZES}
            results["ingest"] = {
                "server_vectors_s": args.n / elapsed,
                "server_ms_per_batch": elapsed * 1000 / len(requests),
                "stream_vectors_s": stream_ingest_rate(stub, requests, args.dim),
                "transport_ms_per_batch": transport_ms(stub, requests[:30]),
                "grpc_alone_ms_per_batch": grpc_alone_ms(requests[:30]),
                "minimal_stream_vectors_s": minimal_stream_rate(requests, Path(tmp)),
                "bare_sqlite_rows_s_by_page_size": bare,
                "bare_sqlite_rows_s": max(bare.values()),
            }

            server_timings: list[tuple[float, float]] = []  # (total_ms, search_ms) the server reports

            def search_vector(i: int) -> object:
                response = stub.Search(
                    pb.SearchRequest(collection="vec", vector=query_messages[i % len(queries)], top_k=10)
                )
                server_timings.append((response.timings.total_ms, response.timings.search_ms))
                return response

            def measure_level(c: int) -> None:
                batches, items = running.batcher_counts()
                server_timings.clear()
                qps, times = latencies(search_vector, c, args.seconds)
                if c == 1:  # where a lone search's time goes, by the server's own account
                    results["lone_server_p50_ms"] = {
                        "total": percentile([t for t, _ in server_timings], 50),
                        "search": percentile([s for _, s in server_timings], 50),
                    }
                batches_now, items_now = running.batcher_counts()
                levels[c] = {
                    "qps": qps,
                    "p50_ms": percentile(times, 50),
                    "p99_ms": percentile(times, 99),
                    "mean_batch": (items_now - items) / max(1, batches_now - batches),
                }

            levels: dict[int, dict] = {}
            with busy_processes(args.busy_processes):  # other work on the same cores, if asked for
                for c in callers:
                    measure_level(c)
            results["server_by_vector"] = levels
            health = health_pb2_grpc.HealthStub(channel)
            _, empty = latencies(lambda i: health.Check(health_pb2.HealthCheckRequest()), 1, 2)
            results["empty_rpc_p50_ms"] = percentile(empty, 50)  # the transport's floor for one call
            if 16 in callers:
                results["per_call_floor"] = per_call_floor(stub, health, base, query_messages, args.dim)

            if have_cnn:

                def search_image(i: int) -> object:
                    return stub.Search(pb.SearchRequest(image=jpegs[i % len(jpegs)], top_k=10))

                stub.AddImages(pb.AddImagesRequest(images=[pb.ImageInput(content=j) for j in jpegs[:32]]))
                results["server_by_image"] = {
                    c: dict(zip(("img_s", "p50_ms"), (r[0], percentile(r[1], 50)), strict=True))
                    for c in (1, 16)
                    for r in [latencies(search_image, c, args.seconds)]
                }

            _, idle = latencies(search_vector, 1, 2)
            release = threading.Event()

            def silent():
                yield pb.AddImagesStreamRequest(collection="vec")
                release.wait(120)

            streams = [stub.AddImagesStream.future(silent()) for _ in range(args.idle_streams)]
            time.sleep(1.0)
            health_ms = []
            for _ in range(20):
                started = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest())
                health_ms.append((time.perf_counter() - started) * 1000)
            _, busy = latencies(search_vector, 1, 2)
            release.set()
            for s in streams:
                s.result(timeout=30)
            results["idle_streams"] = {
                "streams": args.idle_streams,
                "health_p50_ms": percentile(health_ms, 50),
                "health_max_ms": max(health_ms),
                "search_p50_idle_ms": percentile(idle, 50),
                "search_p50_with_streams_ms": percentile(busy, 50),
            }
    report(results, callers)


def report(results: dict, callers: list[int]) -> None:
    raw, levels = results["raw_faiss"], results["server_by_vector"]
    best_single = min(raw["single_p50_ms"].values())
    print(f"machine: {results['machine']}")
    print(f"data: {results['n']} x {results['dim']} flat cosine, top-10")
    if results["server_env"]:
        print(f"server environment: {' '.join(f'{k}={v}' for k, v in results['server_env'].items())}")
    if results["busy_processes"]:
        print(f"searches by vector measured beside {results['busy_processes']} busy process(es)")
    print(
        f"1 caller, search by vector: server p50 {levels[1]['p50_ms']:.2f} ms; raw FAISS p50 "
        f"{raw['single_p50_ms'][1]:.2f} ms (1 thread), {raw['single_p50_ms'][2]:.2f} ms (2 threads); "
        f"ratio to the best {levels[1]['p50_ms'] / best_single:.2f}"
    )
    print(
        f"  the server's kernel for a lone query, raw (NumPy sgemv + top 10, every core): p50 "
        f"{raw['single_gemv_p50_ms']['back_to_back']:.2f} ms, {raw['single_gemv_p50_ms']['after_pause']:.2f} ms "
        f"after a 2 ms pause; server / raw sgemv {levels[1]['p50_ms'] / raw['single_gemv_p50_ms']['back_to_back']:.2f}"
    )
    print(
        f"  for comparison: raw FAISS after a 2 ms pause p50 {raw['single_after_pause_p50_ms']:.2f} ms; "
        f"an empty gRPC call (health check) p50 {results['empty_rpc_p50_ms']:.2f} ms"
    )
    if "lone_server_p50_ms" in results:
        lone = results["lone_server_p50_ms"]
        print(
            f"  where that caller's time goes (p50 of the timings each response carries): in the server "
            f"{lone['total']:.2f} ms, of which the search {lone['search']:.2f} ms (hand-off to the index "
            f"thread, the scan, exact ranking, the hits' rows); the round trip the rest, "
            f"{levels[1]['p50_ms'] - lone['total']:.2f} ms"
        )
    paths = raw["p50_ms_by_batch_threads_threshold"]
    print(
        "  raw FAISS p50 ms by BLAS threshold (batch/threads/threshold): "
        + ", ".join(f"{key} {ms:.2f}" for key, ms in paths.items() if key.split("/")[0] in ("1", "16"))
    )
    print(
        f"{'callers':>8}{'server q/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'p99/p50':>9}{'mean batch':>12}"
        f"{'raw FAISS batched q/s':>23}"
    )
    for c in callers:
        s, r = levels[c], raw["batched"][c]
        print(
            f"{c:8d}{s['qps']:12.1f}{s['p50_ms']:9.2f}{s['p99_ms']:9.2f}{s['p99_ms'] / s['p50_ms']:9.2f}"
            f"{s['mean_batch']:12.1f}{r['qps']:23.1f}"
        )
    if 16 in levels:
        print(
            f"16 callers vs 1 caller, search by vector: {levels[16]['qps'] / levels[1]['qps']:.2f}x queries/s"
        )
        floor = results["per_call_floor"]
        print(
            f"  16 callers, per call apart from the scan: an empty call (health) {floor['health_16_callers_per_s']:.0f}/s "
            f"({1000 / floor['health_16_callers_per_s']:.2f} ms a call); a search of 256 vectors "
            f"{floor['small_search_16_callers_per_s']:.0f}/s ({1000 / floor['small_search_16_callers_per_s']:.2f} ms); "
            f"of 20,000 vectors {1000 / levels[16]['qps']:.2f} ms"
        )
    if "server_by_image" in results:
        by_image = results["server_by_image"]
        print(
            f"search by image: 1 caller {by_image[1]['img_s']:.1f} img/s, 16 callers {by_image[16]['img_s']:.1f} img/s "
            f"({by_image[16]['img_s'] / by_image[1]['img_s']:.2f}x); onnxruntime in-process, batches of 16: "
            f"{results['raw_onnxruntime_batch16_img_s']:.1f} img/s"
        )
    idle = results["idle_streams"]
    print(
        f"{idle['streams']} idle streams open: health p50 {idle['health_p50_ms']:.2f} ms (max {idle['health_max_ms']:.2f}); "
        f"search p50 {idle['search_p50_with_streams_ms']:.2f} ms vs {idle['search_p50_idle_ms']:.2f} ms idle"
    )
    storage = results["storage"]
    print(
        f"float16 storage: recall@10 {storage['float16_recall_at_10']:.4f} against float32; single-query scan "
        f"{storage['float16_scan_time_ratio']:.2f}x float32's (best thread setting of each)"
    )
    ingest = results["ingest"]
    bare = ingest["bare_sqlite_rows_s"]
    pages = ", ".join(
        f"{rate:.0f} at {size // 1024} KiB"
        for size, rate in ingest["bare_sqlite_rows_s_by_page_size"].items()
    )
    print(
        f"durable ingest, batches of 256: server {ingest['server_vectors_s']:.0f} vectors/s by AddImages, "
        f"{ingest['stream_vectors_s']:.0f} by one AddImagesStream; bare SQLite at its best page size "
        f"{bare:.0f} rows/s ({pages} pages); ratios {ingest['server_vectors_s'] / bare:.2f} and "
        f"{ingest['stream_vectors_s'] / bare:.2f}; by AddImages "
        f"{ingest['server_ms_per_batch']:.2f} ms a batch, of which moving and parsing it (a refused batch's "
        f"round trip) {ingest['transport_ms_per_batch']:.2f} ms, gRPC alone (the same bytes, unparsed, to a bare "
        f"server) {ingest['grpc_alone_ms_per_batch']:.2f} ms; the bare insert {256000 / ingest['bare_sqlite_rows_s']:.2f} ms; "
        f"the least any durable server does (parse, check, normalise, commit, index) behind one gRPC stream "
        f"{ingest['minimal_stream_vectors_s']:.0f} vectors/s ({ingest['minimal_stream_vectors_s'] / bare:.2f})"
    )
    save("concurrency", results)
    plot(results, callers)
    print(f"wrote {RESULTS / 'concurrency.png'}")


def plot(results: dict, callers: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels, raw = results["server_by_vector"], results["raw_faiss"]["batched"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot(callers, [levels[c]["qps"] for c in callers], "o-", label="server (gRPC, batched)")
    left.plot(callers, [raw[c]["qps"] for c in callers], "s--", label="raw FAISS, batch = callers")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent callers")
    left.set_ylabel("queries / second")
    left.set_title("throughput")
    right.plot(callers, [levels[c]["p99_ms"] for c in callers], "o-", label="server p99")
    right.plot(callers, [levels[c]["p50_ms"] for c in callers], "^-", label="server p50")
    right.plot(callers, [raw[c]["p50_ms"] for c in callers], "s--", label="raw FAISS batch time")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent callers")
    right.set_ylabel("ms")
    right.set_title("latency")
    for ax in (left, right):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False, ncol=2, fontsize=8)
    fig.suptitle(f"search by vector, {results['n']} x {results['dim']} flat cosine, top-10")
    save_figure(fig, "concurrency")


if __name__ == "__main__":
    main()
