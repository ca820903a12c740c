"""Limits that protect the server, deadlines, graceful drain, request ids, configuration."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from imagesearch.client import ImageItem, ImageSearchClient
from imagesearch.server import servicer
from imagesearch.server.app import run_server
from imagesearch.server.config import load_config
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.conftest import tiny_config
from tests.support.gate_plugin import GatePlugin
from tests.support.images import encode, pattern
from tests.support.stopping import stop_during
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor
from tests.support.waiting import until as wait_until

pytestmark = pytest.mark.e2e
DIM = TinyExtractor.dim


def gated_server(data_dir, **changes):
    plugin = GatePlugin()
    config = tiny_config(data_dir, default_extractor="gated", **changes)
    return plugin.extractor, run_server(config, extra_plugins=[("gate", plugin)])


def add_one(stub, image_id: str, **kwargs):
    request = pb.AddImagesRequest(images=[pb.ImageInput(id=image_id, content=encode(pattern(1)))])
    return stub.AddImages(request, **kwargs)


def test_concurrent_rpc_limit_answers_resource_exhausted_and_health_still_answers(data_dir):
    """Past ``max_concurrent_rpcs`` calls of the service: RESOURCE_EXHAUSTED with a reason and a
    retry hint. Health is not counted: gRPC's own limit counted it, so a client holding every slot
    had health checks refused and a load balancer pull an idle server (an outside test)."""
    gate, server = gated_server(data_dir, limits={"max_concurrent_rpcs": 1})
    with server as running, grpc.insecure_channel(running.target) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        first = stub.AddImages.future(
            pb.AddImagesRequest(images=[pb.ImageInput(id="a", content=encode(pattern(1)))])
        )
        assert gate.entered.wait(10)
        with pytest.raises(grpc.RpcError) as error:
            stub.ListCollections(pb.ListCollectionsRequest())
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = {d.type_url.rsplit("/", 1)[1]: d for d in rpc_status.from_call(error.value).details}
        assert "google.rpc.RetryInfo" in details and "TOO_MANY_CALLS" in str(
            details["google.rpc.ErrorInfo"].value
        )
        health = health_pb2_grpc.HealthStub(chan)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        gate.release.set()
        assert first.result(10).ids == ["a"]
        assert stub.ListCollections(
            pb.ListCollectionsRequest(), timeout=5
        ).collections  # the slot is free again


def test_health_watch_streams_are_capped_per_client(data_dir):
    """256 Watch streams from one channel held every call slot (an outside test): one client
    address may keep ``max_streams_per_peer`` open; past it RESOURCE_EXHAUSTED, TOO_MANY_STREAMS,
    while Check answers and a closed Watch frees its place."""
    config = tiny_config(data_dir).replace(limits={"max_streams_per_peer": 2})
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        health = health_pb2_grpc.HealthStub(chan)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
        assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.SERVING] * 2
        third = health.Watch(health_pb2.HealthCheckRequest())
        with pytest.raises(grpc.RpcError) as refused:
            next(third)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 health Watch streams are open" in refused.value.details()
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        watches[0].cancel()
        assert wait_until(lambda: _watch_opens(health))
        watches[1].cancel()


def _watch_opens(health: health_pb2_grpc.HealthStub) -> bool:
    watch = health.Watch(health_pb2.HealthCheckRequest())
    try:
        return next(watch).status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        watch.cancel()


def test_deadline_passed_during_extraction_stores_nothing(data_dir, caplog):
    gate, server = gated_server(data_dir)
    with (
        caplog.at_level(logging.INFO, logger=servicer.log.name),
        server as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        logging.getLogger().addHandler(caplog.handler)  # the server's start set the root's handlers
        stub = pb_grpc.ImageSearchServiceStub(chan)
        threading.Timer(0.6, gate.release.set).start()
        with pytest.raises(grpc.RpcError) as error:
            add_one(stub, "late", timeout=0.3, metadata=[("x-request-id", "late-add")])
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.6)  # the server finishes its side and must not commit
        assert stub.ListImages(pb.ListImagesRequest()).images == []
    # The access log says what the client saw, not CANCELLED (an outside test: operators were misled).
    (logged,) = [r for r in caplog.records if getattr(r, "request_id", "") == "late-add"]
    assert logged.status == "DEADLINE_EXCEEDED"


def test_a_search_by_vector_is_answered_while_every_worker_is_busy(data_dir):
    """A search by vector is planned on the event loop and batched on the index thread: a worker
    pool taken up by slow adds (here its one thread, held in extraction) does not delay it."""
    gate, server = gated_server(data_dir, workers=1)
    with server as running, grpc.insecure_channel(running.target) as chan:
        stub = pb_grpc.ImageSearchServiceStub(chan)
        vectors = np.eye(DIM, dtype=np.float32)[:4]
        stub.AddImages(
            pb.AddImagesRequest(
                images=[
                    pb.ImageInput(id=f"v{i}", vector=pb.FloatVector(values=v)) for i, v in enumerate(vectors)
                ]
            )
        )
        held = stub.AddImages.future(
            pb.AddImagesRequest(images=[pb.ImageInput(id="slow", content=encode(pattern(1)))])
        )
        try:
            assert gate.entered.wait(10), "the add never reached the extractor"
            found = stub.Search(
                pb.SearchRequest(vector=pb.FloatVector(values=vectors[2]), top_k=1), timeout=5
            )
            assert [hit.id for hit in found.hits] == ["v2"]
        finally:
            gate.release.set()
        assert held.result(10).ids == ["slow"]


def test_a_call_cancelled_at_its_deadline_is_logged_as_exceeding_it():
    """The client gives up at its deadline a few milliseconds before the server's copy of it passes
    (an outside test: 1-5 % of such calls were logged CANCELLED)."""
    assert servicer.cancelled_outcome(-0.001) == "DEADLINE_EXCEEDED"
    assert servicer.cancelled_outcome(0.008) == "DEADLINE_EXCEEDED"
    assert servicer.cancelled_outcome(0.5) == "CANCELLED"  # the client went away
    assert servicer.cancelled_outcome(None) == "CANCELLED"  # no deadline at all


def test_removals_and_collection_changes_past_the_deadline_commit_nothing(stub, monkeypatch):
    """Every call's deadline has already passed when the engine gets it (no race with a real clock)."""
    add_one(stub, "kept")
    stub.CreateCollection(pb.CreateCollectionRequest(collection=pb.Collection(name="kept")))
    monkeypatch.setattr(servicer, "_deadline", lambda context: time.monotonic() - 1)
    calls = [
        (stub.RemoveImages, pb.RemoveImagesRequest(ids=["kept"])),
        (stub.CreateCollection, pb.CreateCollectionRequest(collection=pb.Collection(name="late"))),
        (stub.DeleteCollection, pb.DeleteCollectionRequest(name="kept")),
    ]
    for call, request in calls:
        with pytest.raises(grpc.RpcError) as error:
            call(request)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, request
    assert [image.id for image in stub.ListImages(pb.ListImagesRequest()).images] == ["kept"]
    names = [c.name for c in stub.ListCollections(pb.ListCollectionsRequest()).collections]
    assert names == ["default", "kept"]


def test_stop_drains_in_flight_calls(data_dir):
    gate, server = gated_server(data_dir, shutdown_grace_s=10.0, shutdown_announce_s=1.0)
    results = {}
    with server as running:
        chan = grpc.insecure_channel(running.target)
        stub = pb_grpc.ImageSearchServiceStub(chan)
        health = health_pb2_grpc.HealthStub(chan)
        future = stub.AddImages.future(
            pb.AddImagesRequest(images=[pb.ImageInput(id="inflight", content=encode(pattern(2)))])
        )
        assert gate.entered.wait(10)

        def release_later() -> None:
            time.sleep(0.3)
            results["health"] = health.Check(health_pb2.HealthCheckRequest()).status
            time.sleep(1.2)  # past the announce period: server.stop() is now waiting on this call
            gate.release.set()

        threading.Thread(target=release_later).start()
    # run_server's exit waited for the call: it completed and was stored.
    assert future.result(5).ids == ["inflight"]
    assert results["health"] == health_pb2.HealthCheckResponse.NOT_SERVING
    chan.close()
    gate.release.set()
    _, server = gated_server(data_dir)
    with server as running, grpc.insecure_channel(running.target) as chan:
        images = pb_grpc.ImageSearchServiceStub(chan).ListImages(pb.ListImagesRequest()).images
        assert [i.id for i in images] == ["inflight"]


def test_an_open_health_watch_does_not_hold_the_stop(data_dir):
    """gRPC counts an open Watch as a call in flight: one (as clients' own health checking and Envoy
    keep) held every stop for the whole shutdown_grace_s (an outside test). The watcher is told
    NOT_SERVING at the announcement, and its stream ends when the server stops taking calls."""
    config = tiny_config(data_dir, shutdown_grace_s=30.0, shutdown_announce_s=0.2)
    seen: list[int] = []
    with run_server(config) as running:
        chan = grpc.insecure_channel(running.target)
        watch = health_pb2_grpc.HealthStub(chan).Watch(health_pb2.HealthCheckRequest())
        watcher = threading.Thread(target=lambda: seen.extend(reply.status for reply in watch))
        watcher.start()
        while not seen:
            time.sleep(0.01)
        stopping = time.monotonic()
    took = time.monotonic() - stopping
    watcher.join(10)
    chan.close()
    assert took < 10, f"the stop waited {took:.1f} s for the Watch"
    assert seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]


def test_request_id_is_echoed(stub):
    _, call = stub.ListCollections.with_call(
        pb.ListCollectionsRequest(), metadata=[("x-request-id", "abc123")]
    )
    assert ("x-request-id", "abc123") in call.trailing_metadata()
    _, call = stub.ListCollections.with_call(pb.ListCollectionsRequest())
    assert len(dict(call.trailing_metadata())["x-request-id"]) == 32
    trace = "t" * 100  # a trace id and a suffix: whole (64 characters were kept, without a word)
    _, call = stub.ListCollections.with_call(pb.ListCollectionsRequest(), metadata=[("x-request-id", trace)])
    assert dict(call.trailing_metadata())["x-request-id"] == trace
    _, call = stub.ListCollections.with_call(
        pb.ListCollectionsRequest(), metadata=[("x-request-id", "u" * 300)]
    )
    assert dict(call.trailing_metadata())["x-request-id"] == "u" * 256  # docs/api.md: cut past 256


def test_config_file_and_unknown_keys(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("port = 6000\nworkers = 3\n[limits]\nmax_top_k = 77\n")
    config = load_config(path, port=7000)
    assert (config.port, config.workers, config.limits.max_top_k) == (7000, 3, 77)
    path.write_text("[limits]\nmax_topk = 5\n")
    with pytest.raises(ValueError, match="unknown \\[limits\\] keys: max_topk"):
        load_config(path)
    path.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="unknown configuration keys: prot"):
        load_config(path)


def test_request_id_is_echoed_on_errors(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.GetImage(pb.GetImageRequest(id="missing"), metadata=[("x-request-id", "err-42")])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert ("x-request-id", "err-42") in error.value.trailing_metadata()
    assert rpc_status.from_call(error.value).details, "rich details survive next to the request id"


def test_a_search_listing_many_labels_is_read_off_the_event_loop(data_dir, monkeypatch):
    """Reading and checking a long label filter on the event loop held every health check (1.5
    million labels: 0.6 s, an outside test); past LOOP_MAX_LABELS the search runs on a worker."""
    with (
        run_server(tiny_config(data_dir), extra_plugins=[TINY_PLUGIN]) as running,
        grpc.insecure_channel(running.target) as chan,
    ):
        stub = pb_grpc.ImageSearchServiceStub(chan)
        vectors = np.eye(DIM, dtype=np.float32)[:3]
        stub.AddImages(
            pb.AddImagesRequest(
                images=[
                    pb.ImageInput(id=f"v{i}", label=f"l{i}", vector=pb.FloatVector(values=v))
                    for i, v in enumerate(vectors)
                ]
            )
        )
        on_loop: list[int] = []
        original = running.engine.search_async

        async def spied(query, deadline=None):
            on_loop.append(len(query.labels))
            return await original(query, deadline=deadline)

        monkeypatch.setattr(running.engine, "search_async", spied)
        many = [f"x{n}" for n in range(servicer.LOOP_MAX_LABELS)] + ["l1"]
        found = stub.Search(pb.SearchRequest(vector=pb.FloatVector(values=vectors[0]), labels=many, top_k=3))
        assert [hit.id for hit in found.hits] == ["v1"] and on_loop == []
        found = stub.Search(
            pb.SearchRequest(vector=pb.FloatVector(values=vectors[0]), labels=["l1"], top_k=3)
        )
        assert [hit.id for hit in found.hits] == ["v1"] and on_loop == [1]


def test_a_stop_during_an_adds_first_ivf_training_puts_the_training_off(data_dir, caplog) -> None:
    """SIGTERM while an add's first IVF k-means runs (after the add's commit, so the add must not
    fail): the k-means stops at its next iteration, the add is answered, and the server stops
    within its grace instead of when the k-means would have ended (8,192 lists over 20,000
    vectors, several seconds here; a large collection's, minutes: the watchdog's exit code 1).
    After the restart every vector is there, searched exactly (the next add trains:
    test_vector_index's postponed training)."""
    config = tiny_config(data_dir)
    rng = np.random.default_rng(5)
    base = rng.normal(size=(20_156, DIM)).astype(np.float32)
    ivf = {"nlist": 8192, "nprobe": 8192, "train_size": 20_000}
    items = [ImageItem(id=str(i), vector=v) for i, v in enumerate(base)]
    server = ExitStack()
    running = server.enter_context(run_server(config, extra_plugins=[TINY_PLUGIN]))
    with ImageSearchClient(running.target) as client:
        client.create_collection("lists", metric="l2", index_type="ivf", ivf=ivf)
        for start in range(0, 19_900, 256):
            client.add_images(items[start : min(start + 256, 19_900)], collection="lists")
        # 19,900 + 256 crosses train_size: the k-means starts after the commit (grace 2 s in tiny_config)
        stopped_after, outcome = stop_during(
            server, lambda: client.add_images(items[19_900:], collection="lists")
        )
    assert stopped_after < 4.0, f"the stop waited {stopped_after:.1f} s for the k-means"
    assert "IVF training of 20000 vectors postponed" in caplog.text
    assert getattr(outcome, "added_count", None) == 256, outcome
    with (
        run_server(config, extra_plugins=[TINY_PLUGIN]) as running,
        ImageSearchClient(running.target) as client,
    ):
        info = client.get_collection("lists")
        assert info.image_count == 20_156 and not info.index_trained and info.state_reason == ""
        held = base[: info.image_count].astype(np.float64)
        for query in rng.normal(size=(3, DIM)).astype(np.float32):
            expected = np.argsort(((held - query) ** 2).sum(axis=1), kind="stable")[:5]
            assert [hit.id for hit in client.search(vector=query, collection="lists", top_k=5).hits] == [
                str(i) for i in expected
            ]
