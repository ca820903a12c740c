"""Many callers at once on the asyncio server: batched answers equal one-by-one answers, idle
streams hold nothing that others need, and back-pressure is a clear status with a retry hint."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from imagesearch.client import ImageSearchClient, InvalidArgument, Query, from_rpc_error
from imagesearch.server.app import run_server
from imagesearch.server.engine import Engine
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.images import encode, pattern
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

pytestmark = pytest.mark.e2e
DIM = TinyExtractor.dim
INDEXES = {
    "flat": pb.Collection(name="flat", metric="l2"),
    "ivf": pb.Collection(
        name="ivf",
        metric="l2",
        index_type=pb.INDEX_TYPE_IVF,
        ivf=pb.IvfParams(nlist=8, nprobe=3, train_size=200),
    ),
    "hnsw": pb.Collection(
        name="hnsw", metric="cosine", index_type=pb.INDEX_TYPE_HNSW, hnsw=pb.HnswParams(m=16)
    ),
}


def vector(values: np.ndarray) -> pb.FloatVector:
    return pb.FloatVector(values=values.tolist())


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Iterator[tuple[str, np.ndarray, Engine]]:
    """A server with a flat, a trained IVF and an HNSW collection of the same 600 vectors."""
    config = tiny_config(tmp_path_factory.mktemp("many") / "data", workers=32)
    rng = np.random.default_rng(11)
    base = rng.normal(size=(600, DIM)).astype(np.float32)
    labels = [f"l{i % 3}" for i in range(600)]
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        stub = pb_grpc.ImageSearchServiceStub(chan)
        for wanted in INDEXES.values():
            stub.CreateCollection(pb.CreateCollectionRequest(collection=wanted))
            for start in range(0, 600, 200):
                images = [
                    pb.ImageInput(id=f"v{i}", vector=vector(base[i]), label=labels[i])
                    for i in range(start, start + 200)
                ]
                stub.AddImages(pb.AddImagesRequest(collection=wanted.name, images=images))
        yield running.target, base, running.engine


def queries(base: np.ndarray) -> list[pb.SearchRequest]:
    """A mix of options, so that batches hold several groups: k, labels, exclusion, metric override."""
    rng = np.random.default_rng(5)
    made = []
    for i in range(48):
        request = pb.SearchRequest(top_k=int(rng.choice([1, 5, 10, 25])))
        if i % 3 == 0:
            request.image_id = f"v{i * 7}"
            request.exclude_query = bool(i % 2)
        else:
            request.vector.CopyFrom(vector(base[i] + rng.normal(scale=0.1, size=DIM).astype(np.float32)))
        if i % 4 == 1:
            request.labels.append(f"l{i % 3}")
        made.append(request)
    return made


def answer(response: pb.SearchResponse) -> list[tuple[str, float]]:
    return [(hit.id, round(hit.score, 5)) for hit in response.hits]


@pytest.mark.parametrize("name", sorted(INDEXES))
def test_batched_answers_equal_one_by_one_answers(filled, name):
    target, base, _ = filled
    asked = [
        pb.SearchRequest(collection=name, **{f.name: v for f, v in q.ListFields()}) for q in queries(base)
    ]
    with grpc.insecure_channel(target) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        alone = [answer(stub.Search(q)) for q in asked]
        with ThreadPoolExecutor(16) as pool:
            together = [answer(r) for r in pool.map(stub.Search, asked)]
        in_one_call = stub.SearchBatch(pb.SearchBatchRequest(queries=asked))
    assert together == alone
    assert [answer(r.response) for r in in_one_call.results] == alone
    assert all(r.code == 0 for r in in_one_call.results)


def test_concurrent_searches_are_answered_in_shared_batches(filled, monkeypatch):
    """Each index call is made to take 20 ms, as a large collection's would: callers arriving
    meanwhile must be answered together by the next call, not one by one."""
    target, base, engine = filled
    run = engine.searching.searches.run
    monkeypatch.setattr(engine.searching.searches, "run", lambda items: (time.sleep(0.02), run(items))[1])
    asked = [pb.SearchRequest(collection="flat", vector=vector(row), top_k=5) for row in base[:200]]
    batches, items = engine.searching.searches.batches, engine.searching.searches.items
    with grpc.insecure_channel(target) as chan, ThreadPoolExecutor(32) as pool:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        hits = list(pool.map(lambda q: stub.Search(q).hits[0].id, asked))
    assert hits == [f"v{i}" for i in range(200)]
    assert engine.searching.searches.items - items == 200
    assert engine.searching.searches.batches - batches <= 40, "32 concurrent callers must share index calls"


def test_callers_in_a_loop_keep_sharing_full_batches(filled, monkeypatch):
    """Eight callers that each search again as soon as they are answered: every batch after the
    first should hold (nearly) all of them, not alternating halves (the first caller back used to
    start a batch alone while the other seven queued behind it)."""
    target, base, engine = filled
    run = engine.searching.searches.run
    monkeypatch.setattr(engine.searching.searches, "run", lambda items: (time.sleep(0.01), run(items))[1])
    batches, items = engine.searching.searches.batches, engine.searching.searches.items

    def caller(worker: int) -> None:
        with grpc.insecure_channel(target) as chan:
            stub = pb_grpc.ImageSearchServiceStub(chan)
            for i in range(15):
                row = worker * 15 + i
                asked = pb.SearchRequest(collection="flat", vector=vector(base[row]), top_k=3)
                assert stub.Search(asked).hits[0].id == f"v{row}"

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(caller, range(8)))
    mean = (engine.searching.searches.items - items) / (engine.searching.searches.batches - batches)
    assert mean >= 6, f"8 callers in a loop made batches of {mean:.1f} on average"


def test_a_search_batch_reports_each_query_on_its_own(filled):
    target, base, _ = filled
    asked = [
        pb.SearchRequest(collection="flat", vector=vector(base[3]), top_k=1),
        pb.SearchRequest(collection="flat", vector=pb.FloatVector(values=[1.0, 2.0])),
        pb.SearchRequest(collection="nope", image_id="v1"),
        pb.SearchRequest(collection="flat", image=b"not an image"),
    ]
    with grpc.insecure_channel(target) as chan:
        results = (
            pb_grpc.ImageSearchServiceStub(chan).SearchBatch(pb.SearchBatchRequest(queries=asked)).results
        )
    assert [r.response.hits[0].id for r in results[:1]] == ["v3"]
    assert [(r.code, r.reason) for r in results[1:]] == [
        (grpc.StatusCode.INVALID_ARGUMENT.value[0], "DIMENSION_MISMATCH"),
        (grpc.StatusCode.NOT_FOUND.value[0], "COLLECTION_NOT_FOUND"),
        (grpc.StatusCode.INVALID_ARGUMENT.value[0], "IMAGE_UNDECODABLE"),
    ]
    assert results[1].field == "queries[1].vector" and results[1].message.startswith("queries[1]: ")


def idle_stream(stub, release: threading.Event) -> grpc.Future:
    """An AddImagesStream that sends one small chunk, then nothing until ``release``."""

    def chunks() -> Iterator[pb.AddImagesStreamRequest]:
        yield pb.AddImagesStreamRequest()
        release.wait(30)

    return stub.AddImagesStream.future(chunks())


def test_idle_streams_hold_no_thread_and_past_the_cap_are_refused_with_a_retry_hint(data_dir):
    limits = {"max_streams_per_peer": 8}
    config = tiny_config(data_dir, workers=2, limits=limits)
    release = threading.Event()
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        stub = pb_grpc.ImageSearchServiceStub(chan)
        stub.AddImages(pb.AddImagesRequest(images=[pb.ImageInput(id="a", content=encode(pattern(1)))]))
        streams = [idle_stream(stub, release) for _ in range(8)]  # four times the worker threads
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as caught:
            idle_stream(stub, release).result(timeout=5)
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 8" in error.details()
        retry = [
            d for d in rpc_status.from_call(error).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
        ]
        assert retry, "back-pressure says when to retry"
        assert from_rpc_error(error).retry_delay == 1.0  # and the Python client reads it (an outside test)
        health = health_pb2_grpc.HealthStub(chan)
        started = time.perf_counter()
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        hits = stub.Search(pb.SearchRequest(image_id="a", top_k=1), timeout=5).hits
        assert hits[0].id == "a" and time.perf_counter() - started < 2
        release.set()
        assert all(s.result(timeout=10).chunk_count == 1 for s in streams)


def test_a_stream_silent_too_long_is_closed_saying_what_it_stored(data_dir):
    config = tiny_config(data_dir, limits={"stream_idle_timeout_s": 0.5})
    release = threading.Event()

    def chunks() -> Iterator[pb.AddImagesStreamRequest]:
        yield pb.AddImagesStreamRequest(images=[pb.ImageInput(id="first", content=encode(pattern(2)))])
        release.wait(10)

    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.ImageSearchServiceStub(chan).AddImagesStream(chunks(), timeout=10)
        release.set()
    error = caught.value
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "sent nothing for 0.5 s" in error.details()
    assert error.details().startswith("chunk 2:"), "the chunk that never came, not the one stored"
    progress = [d for d in rpc_status.from_call(error).details if d.Is(pb.AddImagesStreamResponse.DESCRIPTOR)]
    stored = pb.AddImagesStreamResponse()
    progress[0].Unpack(stored)
    assert list(stored.ids) == ["first"] and stored.chunk_count == 1


def test_a_float16_collection_serves_restarts_and_reports_its_bytes(data_dir):
    rng = np.random.default_rng(2)
    base = rng.normal(size=(250, DIM)).astype(np.float32)
    images = [pb.ImageInput(id=f"h{i}", vector=vector(row)) for i, row in enumerate(base)]
    half = pb.Collection(name="half", metric="l2", storage=pb.VECTOR_STORAGE_FLOAT16)
    full = pb.Collection(name="full", metric="l2")
    config = tiny_config(data_dir)
    for _ in range(2):  # the second pass loads the snapshot written at the first stop
        with (
            run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
            grpc.insecure_channel(running.target) as chan,
        ):
            stub = pb_grpc.ImageSearchServiceStub(chan)
            for wanted in (half, full):
                if wanted.name not in {
                    c.name for c in stub.ListCollections(pb.ListCollectionsRequest()).collections
                }:
                    stub.CreateCollection(pb.CreateCollectionRequest(collection=wanted))
                    stub.AddImages(pb.AddImagesRequest(collection=wanted.name, images=images))
            info = {
                n: stub.GetCollection(pb.GetCollectionRequest(name=n)).collection for n in ("half", "full")
            }
            assert info["half"].storage == pb.VECTOR_STORAGE_FLOAT16
            assert info["half"].index_bytes < 0.6 * info["full"].index_bytes
            for i in (0, 150, 249):
                query = pb.SearchRequest(collection="half", vector=vector(base[i]), top_k=1)
                assert stub.Search(query).hits[0].id == f"h{i}"
            override = pb.SearchRequest(collection="half", vector=vector(base[7]), top_k=1, metric="cosine")
            assert stub.Search(override).hits[0].id == "h7"
    hnsw = pb.Collection(name="x", index_type=pb.INDEX_TYPE_HNSW, storage=pb.VECTOR_STORAGE_FLOAT16)
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
        pytest.raises(grpc.RpcError) as caught,
    ):
        pb_grpc.ImageSearchServiceStub(chan).CreateCollection(pb.CreateCollectionRequest(collection=hnsw))
    assert (
        caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "for flat indexes" in caught.value.details()
    )


def test_an_int8_collection_rescores_and_restarts(data_dir):
    """Through the server: int8 (a quarter of float32's bytes), hits and scores equal to a float32
    collection's, the same after a restart from the snapshot; refused for an l2 collection."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(1100, DIM)).astype(np.float32)
    images = [pb.ImageInput(id=f"q{i}", vector=vector(row), label="ab"[i % 2]) for i, row in enumerate(base)]
    queries = [vector(row) for row in rng.normal(size=(12, DIM)).astype(np.float32)]
    config = tiny_config(data_dir)
    answers = []
    for restart in range(2):
        with (
            run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
            grpc.insecure_channel(running.target) as chan,
        ):
            stub = pb_grpc.ImageSearchServiceStub(chan)
            if not restart:
                for name, storage in (("small", pb.VECTOR_STORAGE_INT8), ("full", pb.VECTOR_STORAGE_FLOAT32)):
                    created = pb.Collection(name=name, metric="cosine", storage=storage)
                    stub.CreateCollection(pb.CreateCollectionRequest(collection=created))
                    for start in range(0, len(images), 256):
                        stub.AddImages(
                            pb.AddImagesRequest(collection=name, images=images[start : start + 256])
                        )
            info = {
                n: stub.GetCollection(pb.GetCollectionRequest(name=n)).collection for n in ("small", "full")
            }
            assert info["small"].storage == pb.VECTOR_STORAGE_INT8
            assert info["small"].index_bytes < 0.3 * info["full"].index_bytes
            found = []
            for query in queries:
                for labels in ([], ["a"]):
                    hits = {
                        n: stub.Search(
                            pb.SearchRequest(collection=n, vector=query, top_k=10, labels=labels)
                        ).hits
                        for n in ("small", "full")
                    }
                    assert [h.id for h in hits["small"]] == [h.id for h in hits["full"]]
                    assert [h.score for h in hits["small"]] == pytest.approx(
                        [h.score for h in hits["full"]], abs=1e-5
                    )
                    found.append([h.id for h in hits["small"]])
            answers.append(found)
            l2 = pb.Collection(name="l2", metric="l2", storage=pb.VECTOR_STORAGE_INT8)
            with pytest.raises(grpc.RpcError) as caught:
                stub.CreateCollection(pb.CreateCollectionRequest(collection=l2))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "int8 is for cosine collections" in caught.value.details()
    assert answers[0] == answers[1]


def test_the_python_client_runs_a_search_batch(filled):
    target, base, _ = filled
    with ImageSearchClient(target) as client:
        results = client.search_batch(
            [
                Query(vector=base[4], top_k=2, collection="flat"),
                Query(image_id="v9", exclude_query=True, top_k=1, collection="ivf"),
                Query(vector=[1.0, 2.0], collection="flat"),
            ]
        )
    assert results[0].ids[0] == "v4" and len(results[0].hits) == 2
    assert results[1].ids != ["v9"] and len(results[1].hits) == 1
    assert isinstance(results[2], InvalidArgument) and results[2].reason == "DIMENSION_MISMATCH"
    assert results[2].field_violations[0].field == "queries[2].vector"


@pytest.mark.parametrize("name", sorted(INDEXES))
def test_bucketed_search_keeps_to_one_label_on_every_index_kind(filled, name):
    """Flat gathers the label's vectors by id; IVF and HNSW filter with an id selector."""
    target, base, _ = filled
    with ImageSearchClient(target) as client:
        result = client.search(vector=base[10], top_k=20, mode="bucketed", collection=name)
    assert result.predicted_label in {"l0", "l1", "l2"} and 0 < result.label_confidence <= 1
    assert len(result) == 20 and {hit.label for hit in result} == {result.predicted_label}


@pytest.mark.parametrize(
    "collection",
    [
        pb.Collection(name="c", metric="cosine", storage=pb.VECTOR_STORAGE_INT8),
        pb.Collection(
            name="c",
            metric="cosine",
            index_type=pb.INDEX_TYPE_HNSW,
            hnsw=pb.HnswParams(m=4, ef_construction=16, ef_search=16),
        ),
    ],
    ids=["int8", "hnsw"],
)
def test_hits_that_follow_the_count_asked_do_not_follow_other_callers_counts(stub, collection):
    """int8 re-scores a pool that grows with the count asked for, and HNSW's beam widens with it
    past ef_search: a query batched with a larger top_k, or with one that excludes itself (which
    asks one more), must still get the hits it gets alone (an outside test: most int8 queries
    and some HNSW queries got others)."""
    rng = np.random.default_rng(9)
    center = rng.normal(size=DIM)
    base = (center + 0.2 * rng.normal(size=(1000, DIM))).astype(np.float32)  # near neighbours
    stub.CreateCollection(pb.CreateCollectionRequest(collection=collection))
    for start in range(0, len(base), 250):
        images = [pb.ImageInput(id=f"v{i}", vector=vector(base[i])) for i in range(start, start + 250)]
        stub.AddImages(pb.AddImagesRequest(collection="c", images=images))
    differ = []
    for i in range(20):
        query = pb.SearchRequest(collection="c", image_id=f"v{i}", top_k=30)
        for other in (
            pb.SearchRequest(collection="c", image_id=f"v{i + 100}", top_k=100),
            pb.SearchRequest(collection="c", image_id=f"v{i + 100}", top_k=30, exclude_query=True),
        ):
            together = stub.SearchBatch(pb.SearchBatchRequest(queries=[query, other])).results[0].response
            if answer(together) != answer(stub.Search(query)):
                differ.append((i, other.top_k, other.exclude_query))
    assert differ == []


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
def test_a_float16_collection_refuses_vectors_it_cannot_hold(stub, metric):
    """float16 holds components up to 65504: larger ones became infinities, which lost those
    vectors from their own searches (l2) and reported inf scores (inner product): an outside
    test. They are refused, item by item; a query is never stored, so it may hold them."""
    half = pb.Collection(name="half", metric=metric, storage=pb.VECTOR_STORAGE_FLOAT16)
    stub.CreateCollection(pb.CreateCollectionRequest(collection=half))
    rng = np.random.default_rng(8)
    small = rng.normal(size=(3, DIM)).astype(np.float32)
    large = small[0] * 1e5
    images = [pb.ImageInput(id=f"s{i}", vector=vector(v)) for i, v in enumerate(small)]
    with pytest.raises(grpc.RpcError) as refused:
        stub.AddImages(
            pb.AddImagesRequest(
                collection="half", images=[*images, pb.ImageInput(id="big", vector=vector(large))]
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("images[3]: ") and "65504" in refused.value.details()
    response = stub.AddImages(
        pb.AddImagesRequest(
            collection="half",
            images=[*images, pb.ImageInput(id="big", vector=vector(large))],
            skip_invalid=True,
        )
    )
    assert response.added_count == 3 and response.results[3].reason == "VECTOR_OUT_OF_RANGE"
    hits = stub.Search(pb.SearchRequest(collection="half", vector=vector(large), top_k=3)).hits
    assert len(hits) == 3 and all(np.isfinite(h.score) for h in hits)


@pytest.mark.parametrize(
    "collection",
    [
        pb.Collection(name="c", metric="cosine", storage=pb.VECTOR_STORAGE_FLOAT16),
        pb.Collection(
            name="c",
            metric="cosine",
            index_type=pb.INDEX_TYPE_IVF,
            ivf=pb.IvfParams(nlist=4, nprobe=4, train_size=100),
        ),
    ],
    ids=["float16", "ivf"],
)
def test_a_stored_copy_is_chosen_alone_as_in_a_batch(stub, collection):
    """Where scores tie, FAISS's heap keeps other copies for another count: a vector stored twice
    gave its first copy alone and its second when a top_k 30 query shared the batch (an outside
    test, float16: every query)."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(200, DIM)).astype(np.float32)
    stub.CreateCollection(pb.CreateCollectionRequest(collection=collection))
    images = [pb.ImageInput(id=f"v{i}", vector=vector(v)) for i, v in enumerate(base)]
    images += [pb.ImageInput(id=f"copy{i}", vector=vector(v)) for i, v in enumerate(base[:20])]
    stub.AddImages(pb.AddImagesRequest(collection="c", images=images))
    for i in range(20):
        near = base[i] + 0.01 * rng.normal(size=DIM).astype(np.float32)
        query = pb.SearchRequest(collection="c", vector=vector(near), top_k=1)
        other = pb.SearchRequest(collection="c", vector=vector(base[i + 50]), top_k=30)
        together = stub.SearchBatch(pb.SearchBatchRequest(queries=[query, other])).results[0].response
        assert answer(together) == answer(stub.Search(query)), i
