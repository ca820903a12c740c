"""Searches run concurrently with each other and with writes, without errors or torn results."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from imagesearch.v1 import image_search_service_pb2 as pb
from tests.support.images import encode, pattern

pytestmark = pytest.mark.e2e


def test_concurrent_searches_and_writes(stub):
    images = {i: encode(pattern(i)) for i in range(60)}
    stub.AddImages(
        pb.AddImagesRequest(images=[pb.ImageInput(id=f"img{i}", content=images[i]) for i in range(20)])
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def searcher(seed: int) -> int:
        done = 0
        while not stop.is_set():
            i = (seed * 7 + done) % 20
            try:
                hits = stub.Search(pb.SearchRequest(image=images[i], top_k=5)).hits
                assert hits[0].id == f"img{i}", hits[0].id
                assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            except BaseException as exc:
                errors.append(exc)
                return done
            done += 1
        return done

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(searcher, seed) for seed in range(4)]
        for start in range(20, 60, 5):
            batch = [pb.ImageInput(id=f"img{i}", content=images[i]) for i in range(start, start + 5)]
            stub.AddImages(pb.AddImagesRequest(images=batch))
            stub.RemoveImages(pb.RemoveImagesRequest(ids=[f"img{start}"]))
        stop.set()
        counts = [f.result() for f in futures]
    assert not errors, errors[:3]
    assert sum(counts) > 0
    listed = stub.ListImages(pb.ListImagesRequest(page_size=100))
    assert listed.total_size == 60 - 8
