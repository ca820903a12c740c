"""A bounded load test: 16 threads mix adds, searches, searches by image and removals against a
real server process for a fixed time; only documented back-pressure may fail, the final count is
what the acknowledged writes say, and the server's memory returns near its starting level."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.support.images import encode, pattern
from tests.support.process import tiny_server
from tests.support.tiny_plugin import TinyExtractor

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
THREADS, DURATION_S, WARM_UP_S = 16, 15.0, 4.0
BACK_PRESSURE = {grpc.StatusCode.RESOURCE_EXHAUSTED}
PHOTOS = [encode(pattern(i, size=(120, 160)), ".jpg") for i in range(8)]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Worker:
    """One caller: adds a batch of its own ids, searches (by vector, id and image), removes what it
    added two rounds ago, so the collection stays about the same size and memory can settle."""

    def __init__(self, number: int, target: str, stop: threading.Event) -> None:
        self.number, self.stop = number, stop
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ImageSearchServiceStub(self.channel)
        self.rng = np.random.default_rng(number)
        self.added: list[list[str]] = []
        self.acked_adds = self.acked_removals = 0
        self.codes: Counter[str] = Counter()

    def call(self, method, request):
        try:
            response = method(request, timeout=20)
        except grpc.RpcError as error:
            self.codes[error.code().name] += 1
            if error.code() not in BACK_PRESSURE:
                raise
            return None
        self.codes["OK"] += 1
        return response

    def run(self) -> None:
        round_ = 0
        while not self.stop.is_set():
            ids = [f"w{self.number}-{round_}-{i}" for i in range(16)]
            vectors = self.rng.normal(size=(16, TinyExtractor.dim)).astype(np.float32)
            images = [
                pb.ImageInput(id=i, vector=pb.FloatVector(values=v.tolist()))
                for i, v in zip(ids, vectors, strict=True)
            ]
            if self.call(self.stub.AddImages, pb.AddImagesRequest(images=images)) is not None:
                self.added.append(ids)
                self.acked_adds += len(ids)
            self.call(self.stub.Search, pb.SearchRequest(vector=images[0].vector, top_k=10))
            self.call(self.stub.Search, pb.SearchRequest(image=PHOTOS[round_ % len(PHOTOS)], top_k=5))
            if self.added:
                self.call(self.stub.Search, pb.SearchRequest(image_id=self.added[-1][0], top_k=3))
            if len(self.added) > 2:
                doomed = self.added.pop(0)
                if self.call(self.stub.RemoveImages, pb.RemoveImagesRequest(ids=doomed)) is not None:
                    self.acked_removals += len(doomed)
                else:
                    self.added.insert(0, doomed)
            round_ += 1
        self.channel.close()


def test_mixed_load_from_16_threads(data_dir):
    server = tiny_server(data_dir, "workers=16")
    try:
        stop = threading.Event()
        workers = [Worker(n, server.target, stop) for n in range(THREADS)]
        with ThreadPoolExecutor(THREADS) as pool:
            running = [pool.submit(w.run) for w in workers]
            time.sleep(WARM_UP_S)
            start_rss = rss_bytes(server.proc.pid)
            time.sleep(DURATION_S - WARM_UP_S)
            stop.set()
            for future in running:
                future.result()  # re-raises any status other than back-pressure
        time.sleep(1.0)
        end_rss = rss_bytes(server.proc.pid)
        with grpc.insecure_channel(server.target) as chan:
            count = (
                pb_grpc.ImageSearchServiceStub(chan)
                .GetCollection(pb.GetCollectionRequest())
                .collection.image_count
            )
        codes = sum((w.codes for w in workers), Counter())
        adds, removals = sum(w.acked_adds for w in workers), sum(w.acked_removals for w in workers)
        print(
            f"calls {dict(codes)}; adds {adds}, removals {removals}; RSS {start_rss >> 20} -> {end_rss >> 20} MB"
        )
        assert count == adds - removals
        assert codes["OK"] > 200, "the server answered too little under load"
        assert end_rss <= 1.10 * start_rss, f"RSS grew from {start_rss >> 20} MB to {end_rss >> 20} MB"
    finally:
        assert server.terminate() == 0
