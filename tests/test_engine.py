"""Engine below the gRPC layer: what the API promises, decided once for unary and streaming calls.

All-or-nothing batches versus per-item results, skip_existing, every limit and the
metadata it reports, deadlines, search inputs, pagination tokens and collection
defaults, each checked on a real Engine over a real Catalog (tiny test extractor,
built-in metrics) so a failure points at engine.py rather than the servicer.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imagesearch.plugins import hookimpl
from imagesearch.plugins.manager import PluginRegistry
from imagesearch.plugins.metrics import L2
from imagesearch.plugins.types import FLAT, HNSW, IVF
from imagesearch.server.catalog import Catalog
from imagesearch.server.collection import Collection, Hit
from imagesearch.server.config import ServerConfig
from imagesearch.server.engine import Engine
from imagesearch.server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    ImageSearchError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from imagesearch.server.records import (
    OK_CODE,
    ClassifyQuery,
    ImageItem,
    NewCollection,
    SearchOutcome,
    SearchQuery,
)
from imagesearch.server.searching import Searching
from imagesearch.server.vector_input import PackedVector
from tests.conftest import tiny_config
from tests.support.images import encode, pattern
from tests.support.tiny_plugin import TINY_PLUGIN, TinyExtractor

DIM = TinyExtractor.dim
NO_CNN = {"IMAGESEARCH_DISABLE_PLUGINS": "onnx_cnn"}
# Small limits, none equal to its default, so a test can tell "the limit" from "some constant".
LIMITS = {
    "max_batch_size": 8,
    "max_batch_pixels": 30_000,  # two 96x128 test images (12,288 pixels each) fit, three do not
    "default_top_k": 3,
    "max_top_k": 20,
    "default_page_size": 4,
    "max_page_size": 5,
    "max_description_length": 40,
}
PNG_PIXELS = 96 * 128


def registry(*plugins: tuple[str, object]) -> PluginRegistry:
    """Built-in metrics plus ``plugins``: no entry points and no CNN, so nothing slow or installed leaks in."""
    return PluginRegistry(list(plugins), load_entry_points=False, env=NO_CNN)


def config_for(tmp_path: Path) -> ServerConfig:
    """The test server's config (tiny default extractor) with this file's small LIMITS."""
    return tiny_config(tmp_path / "data", limits=LIMITS)


@contextmanager
def open_engine(tmp_path: Path, *plugins: tuple[str, object]) -> Iterator[Engine]:
    """An engine over ``tmp_path / "data"`` with these plugins; its catalog (which holds the
    data directory's lock) is closed on the way out, so the next one can open the same data."""
    config = config_for(tmp_path)
    loaded = registry(*plugins)
    catalog = Catalog(config.data_dir, loaded, config.limits)
    engine = Engine(config, loaded, catalog)
    try:
        yield engine
    finally:
        engine.close()
        catalog.close()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine over a fresh data directory, with collection ``c``: tiny extractor, l2, flat."""
    with open_engine(tmp_path, TINY_PLUGIN) as made:
        made.create_collection(NewCollection(name="c", metric="l2"))
        yield made


def vector(seed: int) -> list[float]:
    """A reproducible DIM-sized vector."""
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32).tolist()


def vector_items(start: int, count: int, labels: Sequence[str] = ("",)) -> list[ImageItem]:
    """Items ``v<start>``... with vectors seeded by their number and labels cycling through ``labels``."""
    return [
        ImageItem(id=f"v{n}", vector=vector(n), label=labels[n % len(labels)])
        for n in range(start, start + count)
    ]


def png(seed: int) -> bytes:
    """A distinct 128x96 PNG (PNG_PIXELS pixels)."""
    return encode(pattern(seed))


def stored_ids(engine: Engine, collection: str = "c") -> list[str]:
    """Every stored id in insertion order (one big page): what a failed batch must not change."""
    return [row.id for row in engine.catalog.get(collection).page(0, 1000)]


def raises(kind: type[ImageSearchError], reason: str, call: Callable[[], object]) -> ImageSearchError:
    """Run ``call``, expecting ``kind`` with ``reason``; return the error for further checks."""
    with pytest.raises(kind) as caught:
        call()
    assert caught.value.reason == reason, caught.value.message
    return caught.value


def search(engine: Engine, **fields: Any) -> list[str]:
    """Hit ids of a search on collection ``c``, best first."""
    return [hit.id for hit in engine.search(SearchQuery(collection="c", **fields)).hits]


# -- add_images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 100])
def test_one_bad_item_fails_the_whole_batch(engine: Engine, offset: int) -> None:
    items = vector_items(0, 3)
    items[1] = ImageItem(id="short", vector=[1.0, 2.0])
    error = raises(
        InvalidArgument,
        "DIMENSION_MISMATCH",
        lambda: engine.add_images("c", items, index_offset=offset),
    )
    assert error.field == f"images[{1 + offset}].vector"
    assert error.message.startswith(f"images[{1 + offset}]: ")
    assert stored_ids(engine) == []


def test_skip_invalid_stores_the_good_items_and_reports_each_bad_one(engine: Engine) -> None:
    items = [
        ImageItem(id="good-vector", vector=vector(0)),
        ImageItem(id="short", vector=[1.0]),
        ImageItem(id="both", vector=vector(1), content=png(1)),
        ImageItem(id="neither"),
        ImageItem(id="bad\nid", vector=vector(2)),
        ImageItem(id="nan", vector=[float("nan")] * DIM),
        ImageItem(id="garbage", content=b"not an image at all"),
        ImageItem(id="good-image", content=png(3), label="pic"),
    ]
    outcome = engine.add_images("c", items, skip_invalid=True, index_offset=10)
    expected = [
        (0, "", ""),
        (3, "DIMENSION_MISMATCH", "images[11].vector"),
        (3, "BAD_SOURCE", "images[12]"),
        (3, "NO_SOURCE", "images[13]"),
        (3, "BAD_ID", "images[14].id"),
        (3, "NON_FINITE_VECTOR", "images[15].vector"),
        (3, "IMAGE_UNDECODABLE", "images[16].content"),
        (0, "", ""),
    ]
    assert [(r.code, r.reason, r.field) for r in outcome.results] == expected
    assert [r.index for r in outcome.results] == list(range(10, 18))
    assert outcome.ids == ["good-vector", "", "", "", "", "", "", "good-image"]
    assert outcome.added_count == 2
    assert all(r.message.startswith(f"images[{r.index}]: ") for r in outcome.results if r.code != OK_CODE)
    assert stored_ids(engine) == ["good-vector", "good-image"]
    row = engine.get_image("c", "good-image", with_original=False, with_vector=True)
    assert (row.label, row.width, row.height) == ("pic", 128, 96) and row.thumbnail


def test_skip_invalid_keeps_each_vector_with_its_own_item(engine: Engine) -> None:
    """Vectors are checked as one matrix; refused ones in between must not shift the others."""
    items = [
        ImageItem(id="short", vector=[1.0]),
        ImageItem(id="v1", vector=vector(1)),
        ImageItem(id="nan", vector=[float("nan")] * DIM),
        ImageItem(id="image", content=png(0)),
        ImageItem(id="v3", vector=vector(3)),
    ]
    outcome = engine.add_images("c", items, skip_invalid=True)
    assert [r.reason for r in outcome.results] == ["DIMENSION_MISMATCH", "", "NON_FINITE_VECTOR", "", ""]
    for image_id, seed in (("v1", 1), ("v3", 3)):
        row = engine.get_image("c", image_id, with_original=False, with_vector=True)
        assert np.array_equal(row.vector, np.asarray(vector(seed), np.float32))


def test_skip_existing_leaves_stored_images_as_they_are(engine: Engine) -> None:
    engine.add_images("c", [ImageItem(id="v0", vector=vector(0), label="old")])
    again = [ImageItem(id="v0", vector=vector(99), label="new"), *vector_items(1, 1)]
    outcome = engine.add_images("c", again, skip_existing=True)
    kept, added = outcome.results
    assert (kept.code, kept.reason, kept.field, kept.id) == (6, "IMAGE_EXISTS", "images[0].id", "v0")
    assert "skip_existing" in kept.message
    assert added.code == OK_CODE and outcome.added_count == 1 and outcome.ids == ["v0", "v1"]
    row = engine.get_image("c", "v0", with_original=False, with_vector=True)
    assert row.label == "old" and np.array_equal(row.vector, np.asarray(vector(0), np.float32))
    only_existing = engine.add_images("c", vector_items(0, 2), skip_existing=True)
    assert (
        only_existing.added_count == 0 and [r.reason for r in only_existing.results] == ["IMAGE_EXISTS"] * 2
    )
    assert stored_ids(engine) == ["v0", "v1"]


def test_an_existing_id_without_skip_existing(engine: Engine) -> None:
    engine.add_images("c", vector_items(0, 1))
    error = raises(AlreadyExists, "IMAGE_EXISTS", lambda: engine.add_images("c", vector_items(0, 2)))
    assert error.field == "images[0].id" and error.code == 6
    assert stored_ids(engine) == ["v0"]
    outcome = engine.add_images("c", vector_items(0, 3), skip_invalid=True)  # a per-item failure instead
    assert [(r.id, r.reason) for r in outcome.results] == [("", "IMAGE_EXISTS"), ("v1", ""), ("v2", "")]
    assert outcome.added_count == 2 and stored_ids(engine) == ["v0", "v1", "v2"]


def test_a_batch_decodes_ahead_on_the_decoder_threads_only_what_it_will_store(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed import (ids already stored, skip_existing) must not decode them; a lone image
    is decoded by the call itself."""
    engine.add_images("c", [ImageItem(id="old", content=png(0))])
    monkeypatch.setattr(
        engine, "limits", dataclasses.replace(engine.limits, max_batch_pixels=10 * PNG_PIXELS)
    )
    decoded: list[tuple[str, str]] = []
    real_decode = engine.extraction.decode

    def recording(content: bytes, prefix: str, min_side: int | None):
        decoded.append((prefix, threading.current_thread().name))
        return real_decode(content, prefix, min_side)

    monkeypatch.setattr(engine.extraction, "decode", recording)
    items = [
        ImageItem(id="old", content=png(0)),
        ImageItem(id="a", content=png(1)),
        ImageItem(id="a", content=png(2)),  # a repeated id: refused, not decoded
        ImageItem(id="b", content=png(3)),
    ]
    outcome = engine.add_images("c", items, skip_invalid=True, skip_existing=True)
    assert [r.reason for r in outcome.results] == ["IMAGE_EXISTS", "", "DUPLICATE_ID", ""]
    assert sorted(prefix for prefix, _ in decoded) == ["images[1]", "images[3]"]
    assert all(thread.startswith("decode") for _, thread in decoded)
    decoded.clear()
    engine.add_images("c", [ImageItem(id="lone", content=png(4))])
    assert decoded == [("images[0]", threading.current_thread().name)]


def test_a_failed_batch_leaves_no_decode_running(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes ahead are cancelled or awaited before the call releases its pixel budget."""
    running = []
    real_decode = engine.extraction.decode

    def slow(content: bytes, prefix: str, min_side: int | None):
        running.append(prefix)
        time.sleep(0.05)
        try:
            return real_decode(content, prefix, min_side)
        finally:
            running.remove(prefix)

    monkeypatch.setattr(engine.extraction, "decode", slow)
    monkeypatch.setattr(
        engine, "limits", dataclasses.replace(engine.limits, max_batch_pixels=10 * PNG_PIXELS)
    )
    items = [ImageItem(id="bad\nid", content=png(0))] + [
        ImageItem(id=f"i{n}", content=png(n)) for n in range(1, 6)
    ]
    raises(InvalidArgument, "BAD_ID", lambda: engine.add_images("c", items))
    assert running == []
    assert stored_ids(engine) == []


def test_a_small_batch_does_not_wait_behind_a_large_batchs_decodes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call decodes its own images with its own pullers (server/parallel.py): a shared FIFO
    queue of every image made a 2-image call wait for all of another call's images."""
    real_decode = engine.extraction.decode
    big = [ImageItem(id=f"big{n}", content=png(n)) for n in range(8)]
    big_contents = {item.content for item in big}
    big_started = threading.Event()

    def slow(content: bytes, prefix: str, min_side: int | None):
        if content in big_contents:
            big_started.set()
            time.sleep(0.2)
        return real_decode(content, prefix, min_side)

    monkeypatch.setattr(engine.extraction, "decode", slow)
    monkeypatch.setattr(
        engine, "limits", dataclasses.replace(engine.limits, max_batch_pixels=10 * PNG_PIXELS)
    )
    adding = threading.Thread(target=engine.add_images, args=("c", big))
    adding.start()
    assert big_started.wait(10)
    started = time.perf_counter()
    engine.add_images(
        "c", [ImageItem(id="small1", content=png(100)), ImageItem(id="small2", content=png(100))]
    )
    took = time.perf_counter() - started
    adding.join(10)
    assert took < 0.5, f"the small call took {took:.2f} s; the large one's decodes take 0.8 s"
    assert len(stored_ids(engine)) == 10


def test_a_label_search_lists_equal_scores_in_the_order_they_were_stored(engine: Engine) -> None:
    """Duplicates under two labels, interleaved: the label gather keeps storage order whatever
    order SQLite returns the labels' rows in."""
    same = vector(7)
    engine.add_images("c", [ImageItem(id=f"d{n}", vector=same, label="ab"[n % 2]) for n in range(8)])
    for labels in (["b", "a"], ["a", "b"]):
        assert search(engine, vector=same, labels=labels, top_k=5) == ["d0", "d1", "d2", "d3", "d4"]


@pytest.mark.parametrize("skip_existing", [True, False])
def test_an_id_stored_by_another_call_after_the_check(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, skip_existing: bool
) -> None:
    """Two uploads of the same ids race: the engine's check runs before the writer lock, so an id
    can be committed in between. skip_existing still reports it per item and stores the rest;
    without it, the batch fails whole, as when the check sees the id."""
    engine.add_images("c", vector_items(1, 1))  # v1, committed "by the other call"
    monkeypatch.setattr(Collection, "existing_ids", lambda self, ids: set())  # the check ran before it
    batch = vector_items(0, 3)  # v0, v1, v2
    if not skip_existing:
        raises(AlreadyExists, "IMAGE_EXISTS", lambda: engine.add_images("c", batch))
        assert stored_ids(engine) == ["v1"]
        return
    outcome = engine.add_images("c", batch, skip_existing=True)
    assert [r.code for r in outcome.results] == [OK_CODE, AlreadyExists.code, OK_CODE]
    assert outcome.results[1].field == "images[1].id" and "skip_existing" in outcome.results[1].message
    assert sorted(stored_ids(engine)) == ["v0", "v1", "v2"]
    assert search(engine, vector=vector(2), top_k=1) == ["v2"]


def test_duplicate_ids_in_one_batch(engine: Engine) -> None:
    items = [*vector_items(0, 2), ImageItem(id="v0", vector=vector(5))]
    error = raises(AlreadyExists, "DUPLICATE_ID", lambda: engine.add_images("c", items))
    assert error.field == "images[2].id" and "index 0" in error.message
    assert stored_ids(engine) == []
    outcome = engine.add_images("c", items, skip_invalid=True)
    assert [r.reason for r in outcome.results] == ["", "", "DUPLICATE_ID"] and outcome.added_count == 2
    stored = engine.get_image("c", "v0", with_original=False, with_vector=True)
    assert np.array_equal(stored.vector, np.asarray(vector(0), np.float32)), "the first one wins"


def test_items_without_an_id_get_distinct_generated_ids(engine: Engine) -> None:
    outcome = engine.add_images("c", [ImageItem(vector=vector(0)), ImageItem(vector=vector(1))])
    first, second = outcome.ids
    assert first != second and all(len(i) == 32 and int(i, 16) >= 0 for i in outcome.ids)
    assert stored_ids(engine) == outcome.ids


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_batch_size_limit(engine: Engine, skip_invalid: bool) -> None:
    error = raises(
        ResourceExhausted,
        "BATCH_TOO_LARGE",
        lambda: engine.add_images("c", vector_items(0, 9), skip_invalid=skip_invalid),
    )
    assert (error.code, error.field, error.metadata) == (8, "images", {"limit": "8", "value": "9"})
    assert stored_ids(engine) == []
    assert engine.add_images("c", vector_items(0, 8), skip_invalid=skip_invalid).added_count == 8
    raises(InvalidArgument, "EMPTY_BATCH", lambda: engine.add_images("c", []))


def test_batch_pixel_limit(engine: Engine) -> None:
    """Counted from the headers before decoding; an undecodable item counts nothing."""
    three = [ImageItem(id=f"p{n}", content=png(n)) for n in range(3)]
    error = raises(ResourceExhausted, "BATCH_TOO_MANY_PIXELS", lambda: engine.add_images("c", three))
    assert error.metadata == {"limit": "30000", "value": str(3 * PNG_PIXELS)}
    assert stored_ids(engine) == []
    two_and_garbage = [*three[:2], ImageItem(id="junk", content=b"\x89PNG junk")]
    outcome = engine.add_images("c", two_and_garbage, skip_invalid=True)
    assert [r.reason for r in outcome.results] == ["", "", "IMAGE_UNDECODABLE"]
    assert stored_ids(engine) == ["p0", "p1"]


def test_a_past_deadline_stores_nothing(engine: Engine) -> None:
    past = time.monotonic() - 1
    for items in (vector_items(0, 2), [ImageItem(id="p", content=png(0))]):
        error = raises(
            DeadlineExceeded, "DEADLINE_EXCEEDED", lambda i=items: engine.add_images("c", i, deadline=past)
        )
        assert error.code == 4
    assert stored_ids(engine) == []
    assert engine.add_images("c", vector_items(0, 2), deadline=time.monotonic() + 60).added_count == 2
    raises(
        DeadlineExceeded,
        "DEADLINE_EXCEEDED",
        lambda: engine.search(SearchQuery(collection="c", vector=vector(0)), deadline=past),
    )


def test_shutdown_refuses_uploads_and_trainings_each_with_its_own_advice(engine: Engine) -> None:
    """A training has no ids to resend (an outside test: it got the upload's advice)."""
    engine.begin_shutdown()
    upload = raises(Unavailable, "SHUTTING_DOWN", engine.check_accepting_writes)
    training = raises(Unavailable, "SHUTTING_DOWN", engine._training_still_wanted)
    assert "skip_existing" in upload.message and "training was abandoned" in training.message


def test_a_deadline_that_passes_while_waiting_for_the_writer_stores_nothing(engine: Engine) -> None:
    """The deadline is checked again once the collection's writer lock is held (an outside test:
    adds waiting behind others' commits were stored up to 1.2 s after their deadline)."""
    engine.add_images("c", vector_items(0, 1))
    writer = engine.catalog.get("c")._writes
    outcomes: list[BaseException | object] = []

    def late(call) -> None:
        try:
            outcomes.append(call(deadline=time.monotonic() + 0.1))
        except BaseException as exc:  # what each call raised is the result
            outcomes.append(exc)

    calls = [
        functools.partial(engine.add_images, "c", vector_items(1, 2)),
        functools.partial(engine.remove_images, "c", ["v0"], False),
    ]
    with writer:  # another caller's commit, held for longer than the deadline
        threads = [threading.Thread(target=late, args=(call,)) for call in calls]
        for thread in threads:
            thread.start()
        time.sleep(0.4)
    for thread in threads:
        thread.join(10)
    assert [type(o) for o in outcomes] == [DeadlineExceeded, DeadlineExceeded]
    assert stored_ids(engine) == ["v0"]


# -- search ----------------------------------------------------------------------------------------


def l2_order(engine: Engine, query: Sequence[float], k: int, exclude: str = "") -> list[str]:
    """The exact L2 ranking of collection ``c``'s stored vectors: what a flat search must return."""
    rows = [r for r in engine.catalog.get("c").page(0, 1000) if r.id != exclude]
    vectors = np.stack([engine.catalog.get("c").vector_of(r.id)[1] for r in rows])
    distances = ((vectors - np.asarray(query, np.float32)) ** 2).sum(axis=1)
    return [rows[i].id for i in np.argsort(distances, kind="stable")[:k]]


def test_search_by_vector_with_top_k_default_and_bounds(engine: Engine) -> None:
    engine.add_images("c", vector_items(0, 8))
    query = vector(100)
    outcome = engine.search(SearchQuery(collection="c", vector=query))
    assert [h.id for h in outcome.hits] == l2_order(engine, query, 3), "top_k 0: the configured default"
    assert outcome.metric == "l2" and outcome.timings.total_ms >= outcome.timings.search_ms >= 0
    assert search(engine, vector=query, top_k=5) == l2_order(engine, query, 5)
    assert search(engine, vector=query, top_k=20) == l2_order(engine, query, 8)
    error = raises(InvalidArgument, "BAD_TOP_K", lambda: search(engine, vector=query, top_k=21))
    assert error.field == "top_k" and error.metadata == {"limit": "20", "value": "21"}
    raises(InvalidArgument, "BAD_TOP_K", lambda: search(engine, vector=query, top_k=-1))
    raises(InvalidArgument, "NO_QUERY", lambda: search(engine))
    raises(InvalidArgument, "DIMENSION_MISMATCH", lambda: search(engine, vector=[1.0, 2.0]))


def test_a_vector_search_on_the_event_loop_answers_and_refuses_as_on_a_worker(engine: Engine) -> None:
    """``search_async`` (the gRPC Search of a vector, no worker thread) gives the hits and the
    errors ``search`` gives, deadline included, and takes only the queries it can answer alone."""
    engine.add_images("c", vector_items(0, 8))
    engine.create_collection(NewCollection(name="cos", metric="cosine"))
    engine.add_images("cos", vector_items(0, 8))

    def both(**fields: Any) -> list[Any]:
        query = SearchQuery(**fields)
        assert Searching.searches_on_loop(query)
        found = []
        for call in (lambda: engine.search(query), lambda: asyncio.run(engine.search_async(query))):
            try:
                outcome = call()
                found.append([(h.id, h.score, h.distance, h.label, h.metadata) for h in outcome.hits])
                found[-1].append(outcome.metric)
            except ImageSearchError as error:
                found.append((type(error), error.reason, error.field, error.message))
        assert found[0] == found[1], fields
        return found[0]

    assert [hit[0] for hit in both(collection="c", vector=vector(100), top_k=5)[:5]] == l2_order(
        engine, vector(100), 5
    )
    both(collection="cos", vector=vector(3), top_k=4)
    both(collection="c", vector=vector(3), metric="cosine", labels=["x"])
    both(collection="c", vector=[1.0, 2.0])
    both(collection="c", vector=[float("nan")] * DIM)
    both(collection="c", vector=vector(1), top_k=21)
    both(collection="nope", vector=vector(1))
    both(collection="c", vector=vector(1), extractor_version="other")
    past = time.monotonic() - 1
    with pytest.raises(DeadlineExceeded):
        asyncio.run(engine.search_async(SearchQuery(collection="c", vector=vector(1)), deadline=past))
    assert not Searching.searches_on_loop(SearchQuery(collection="c", image_id="v1"))
    assert not Searching.searches_on_loop(SearchQuery(collection="c", vector=vector(1), mode="BUCKETED"))


def test_search_by_id_and_exclude_query(engine: Engine) -> None:
    engine.add_images("c", vector_items(0, 8))
    assert search(engine, image_id="v3")[0] == "v3"
    excluded = search(engine, image_id="v3", exclude_query=True)
    assert excluded == l2_order(engine, vector(3), 3, exclude="v3")
    raises(NotFound, "IMAGE_NOT_FOUND", lambda: search(engine, image_id="nope"))
    raises(InvalidArgument, "BAD_QUERY", lambda: search(engine, vector=vector(3), exclude_query=True))


def test_search_by_image(engine: Engine) -> None:
    engine.add_images("c", [ImageItem(id=f"p{n}", content=png(n)) for n in range(2)])
    engine.add_images("c", [ImageItem(id=f"q{n}", content=png(n)) for n in range(2, 4)])
    outcome = engine.search(SearchQuery(collection="c", image=png(2), top_k=4))
    assert outcome.hits[0].id == "q2" and len(outcome.hits) == 4
    assert outcome.timings.decode_ms > 0 and outcome.timings.extract_ms > 0
    raises(InvalidArgument, "IMAGE_UNDECODABLE", lambda: search(engine, image=b"nope"))


def test_search_metrics(engine: Engine) -> None:
    engine.add_images("c", vector_items(0, 6))
    error = raises(InvalidArgument, "UNKNOWN_METRIC", lambda: search(engine, vector=vector(0), metric="nope"))
    assert error.field == "metric"
    assert engine.search(SearchQuery(collection="c", vector=vector(9), metric="l2")).metric == "l2"
    outcome = engine.search(SearchQuery(collection="c", vector=vector(9), metric="cosine", top_k=6))
    assert outcome.metric == "cosine"
    scores = [h.score for h in outcome.hits]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)


def test_search_refuses_another_extractors_query(engine: Engine) -> None:
    engine.add_images("c", vector_items(0, 2))
    error = raises(
        FailedPrecondition,
        "EXTRACTOR_MISMATCH",
        lambda: search(engine, vector=vector(0), extractor="other"),
    )
    assert error.field == "extractor"
    assert search(engine, vector=vector(0), extractor=TinyExtractor.name)[0] == "v0"


def test_a_collection_whose_extractor_is_missing_takes_vectors_not_images(tmp_path: Path) -> None:
    """The extractor guard: refused before anything is decoded, while vectors still work."""
    with open_engine(tmp_path, TINY_PLUGIN) as engine:
        engine.create_collection(NewCollection(name="c", metric="l2"))
    with open_engine(tmp_path) as engine:  # the same data, served without the tiny plugin
        items = [*vector_items(0, 1), ImageItem(id="p", content=png(0))]
        raises(FailedPrecondition, "EXTRACTOR_UNAVAILABLE", lambda: engine.add_images("c", items))
        raises(
            FailedPrecondition,
            "EXTRACTOR_UNAVAILABLE",
            lambda: engine.add_images("c", items, skip_invalid=True),
        )
        assert stored_ids(engine) == []
        assert engine.add_images("c", vector_items(0, 2)).added_count == 2
        raises(FailedPrecondition, "EXTRACTOR_UNAVAILABLE", lambda: search(engine, image=png(0)))
        assert search(engine, vector=vector(1))[0] == "v1"


class OverrunExtractor(TinyExtractor):
    """The tiny extractor, except that each call lasts until ``until`` (a time.monotonic() value)
    has passed: a deadline that expires during extraction, deterministically."""

    name = "overrun-8x8"
    until = 0.0

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        while time.monotonic() <= self.until:
            time.sleep(0.005)
        return super().extract(images)


class OverrunPlugin:
    """Registers one given OverrunExtractor, so the test can set its ``until`` between calls."""

    def __init__(self, extractor: OverrunExtractor) -> None:
        self.extractor = extractor

    @hookimpl
    def register_extractors(self, register: Callable[[OverrunExtractor], None]) -> None:
        register(self.extractor)


def test_a_deadline_that_passes_during_extraction_stores_nothing(tmp_path: Path) -> None:
    """Checked again after the extractor ran: its vectors are thrown away, nothing is stored."""
    overrun = OverrunExtractor()
    with open_engine(tmp_path, ("overrun", OverrunPlugin(overrun))) as engine:
        engine.create_collection(NewCollection(name="o", extractor=overrun.name, metric="l2"))
        overrun.until = deadline = time.monotonic() + 0.1
        add = [ImageItem(id="p", content=png(0))]
        error = raises(
            DeadlineExceeded, "DEADLINE_EXCEEDED", lambda: engine.add_images("o", add, deadline=deadline)
        )
        assert "storing" in error.message
        assert stored_ids(engine, "o") == []
        overrun.until = deadline = time.monotonic() + 0.1
        query = SearchQuery(collection="o", image=png(0))
        error = raises(DeadlineExceeded, "DEADLINE_EXCEEDED", lambda: engine.search(query, deadline=deadline))
        assert "index search" in error.message


def test_search_batch_answers_each_query_as_if_it_were_alone(engine: Engine) -> None:
    """Queries of several collections, filters, metrics and k share index calls; each still gets
    exactly its own hits, and a failing query fails alone, named by its position."""
    engine.create_collection(NewCollection(name="h", metric="l2", index_type=HNSW))
    for name in ("c", "h"):
        engine.add_images(name, vector_items(0, 8, labels=("x", "y")))
    engine.add_images("c", [ImageItem(id="p", content=png(0))])
    queries = [
        SearchQuery(collection="c", vector=vector(50), top_k=2),
        SearchQuery(collection="c", image_id="v3", exclude_query=True, top_k=4),
        SearchQuery(collection="c", vector=vector(51), labels=("x",)),
        SearchQuery(collection="c", vector=vector(52), metric="cosine", top_k=5),
        SearchQuery(collection="h", image_id="v1", top_k=3),
        SearchQuery(collection="c", image=png(0), top_k=1),
        SearchQuery(collection="c", image_id="nope"),
        SearchQuery(collection="c", vector=vector(54), top_k=-1),
    ]
    outcomes = engine.search_batch(queries)
    good = [outcome for outcome in outcomes[:6] if isinstance(outcome, SearchOutcome)]
    assert len(good) == 6, outcomes[:6]
    missing, bad_k = outcomes[6:]
    for query, outcome in zip(queries, good, strict=False):
        alone = engine.search(query)
        assert [h.id for h in outcome.hits] == [h.id for h in alone.hits]
        # Equal up to float rounding: a batch may be answered with one BLAS product.
        assert [h.score for h in outcome.hits] == pytest.approx([h.score for h in alone.hits], rel=1e-5)
        assert outcome.metric == alone.metric and len(outcome.hits) == (query.top_k or 3)
    assert [h.id for h in good[5].hits] == ["p"]
    assert isinstance(missing, NotFound) and missing.reason == "IMAGE_NOT_FOUND"
    assert missing.field == "queries[6]" and missing.message.startswith("queries[6]: ")
    assert isinstance(bad_k, InvalidArgument) and bad_k.field == "queries[7].top_k"


def test_search_batch_size_limit(engine: Engine) -> None:
    queries = [SearchQuery(collection="c", vector=vector(n)) for n in range(9)]
    error = raises(ResourceExhausted, "BATCH_TOO_LARGE", lambda: engine.search_batch(queries))
    assert (error.field, error.metadata) == ("queries", {"limit": "8", "value": "9"})
    assert engine.search_batch([]) == []


def test_search_batch_query_images_share_the_per_call_pixel_limit(engine: Engine) -> None:
    """SearchBatch decodes all its query images at once, like an AddImages batch: refused from the
    headers before anything is decoded when together they pass max_batch_pixels."""
    engine.add_images("c", [ImageItem(id="p", content=png(0))])
    two = [SearchQuery(collection="c", image=png(n)) for n in range(2)]
    assert all(isinstance(outcome, SearchOutcome) for outcome in engine.search_batch(two))
    three = [SearchQuery(collection="c", image=png(n)) for n in range(3)]
    error = raises(ResourceExhausted, "BATCH_TOO_MANY_PIXELS", lambda: engine.search_batch(three))
    assert error.field == "queries"


def test_a_failing_search_group_fails_only_its_own_queries(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries of other collections batched with a group that breaks (a bug, not a client error)
    get their hits; the broken group's queries get INTERNAL."""
    engine.create_collection(NewCollection(name="d", metric="l2"))
    for name in ("c", "d"):
        engine.add_images(name, vector_items(0, 4))
    search_many = Collection.search_many

    def broken_in_d(collection: Collection, *args: Any, **kwargs: Any) -> list[list[Hit]]:
        if collection.spec.name == "d":
            raise RuntimeError("boom")
        return search_many(collection, *args, **kwargs)

    monkeypatch.setattr(Collection, "search_many", broken_in_d)
    good, broken = engine.search_batch(
        [SearchQuery(collection="c", vector=vector(1)), SearchQuery(collection="d", vector=vector(1))]
    )
    assert isinstance(good, SearchOutcome) and good.hits[0].id == "v1"
    assert isinstance(broken, Internal) and broken.reason == "SEARCH_FAILED"


def test_the_decoding_budget_is_given_back_whatever_happens(engine: Engine) -> None:
    """Each call holds its decoded pixels from a process-wide budget; a leak would starve
    every later call, so success and each kind of failure must return it."""
    full = engine.pixels.free
    assert full == engine.limits.max_decoding_pixels
    images = [ImageItem(id=f"p{n}", content=png(n)) for n in range(2)]
    engine.add_images("c", images)
    raises(AlreadyExists, "IMAGE_EXISTS", lambda: engine.add_images("c", images))
    raises(
        DeadlineExceeded,
        "DEADLINE_EXCEEDED",
        lambda: engine.add_images("c", [ImageItem(id="q", content=png(3))], deadline=time.monotonic() - 1),
    )
    engine.search(SearchQuery(collection="c", image=png(0)))
    raises(InvalidArgument, "IMAGE_UNDECODABLE", lambda: search(engine, image=b"\x89PNG\r\n\x1a\n broken"))
    assert engine.pixels.free == full


BAD_VECTORS = [
    ("nan", [float("nan")] + [0.0] * (DIM - 1), "NON_FINITE_VECTOR"),
    ("inf", [float("inf")] + [0.0] * (DIM - 1), "NON_FINITE_VECTOR"),
    ("huge", [2e18] + [0.0] * (DIM - 1), "VECTOR_OUT_OF_RANGE"),
    ("spread", [8e16] * DIM, "VECTOR_OUT_OF_RANGE"),  # each value small, the norm 1.1e18
]


@pytest.mark.parametrize(("values", "reason"), [v[1:] for v in BAD_VECTORS], ids=[v[0] for v in BAD_VECTORS])
def test_vectors_that_faiss_cannot_rank_are_refused(engine: Engine, values: list[float], reason: str) -> None:
    error = raises(
        InvalidArgument, reason, lambda: engine.add_images("c", [ImageItem(id="x", vector=values)])
    )
    assert error.field == "images[0].vector"
    assert stored_ids(engine) == []
    assert raises(InvalidArgument, reason, lambda: search(engine, vector=values)).field == "vector"


@pytest.mark.parametrize(("values", "reason"), [v[1:] for v in BAD_VECTORS], ids=[v[0] for v in BAD_VECTORS])
def test_packed_vectors_are_checked_like_listed_ones(
    engine: Engine, values: list[float], reason: str
) -> None:
    packed = PackedVector(np.asarray(values, dtype="<f4").tobytes())
    raises(InvalidArgument, reason, lambda: engine.add_images("c", [ImageItem(id="x", vector=packed)]))
    assert raises(InvalidArgument, reason, lambda: search(engine, vector=packed)).field == "vector"


def test_packed_vectors_store_and_search_like_listed_ones(engine: Engine) -> None:
    """The same floats sent packed give the same stored vectors, hits and scores."""
    engine.create_collection(NewCollection(name="p", metric="l2"))
    listed = vector_items(0, 6)
    packed = [
        ImageItem(id=item.id, vector=PackedVector(np.asarray(item.vector, "<f4").tobytes()))
        for item in listed
    ]
    engine.add_images("c", listed)
    engine.add_images("p", packed)
    query = vector(99)
    by_list = engine.search(SearchQuery(collection="c", vector=query)).hits
    by_packed = engine.search(
        SearchQuery(collection="p", vector=PackedVector(np.asarray(query, "<f4").tobytes()))
    ).hits
    assert [(h.id, h.score) for h in by_list] == [(h.id, h.score) for h in by_packed]
    assert np.array_equal(engine.catalog.get("p").vector_of("v3")[1], np.asarray(vector(3), np.float32))


def test_a_large_but_rankable_vector_is_accepted(engine: Engine) -> None:
    big = [9e17] + [0.0] * (DIM - 1)
    engine.add_images("c", [ImageItem(id="big", vector=big), *vector_items(0, 2)])
    assert search(engine, vector=big, top_k=1) == ["big"]


# -- remove, get, list -----------------------------------------------------------------------------


def test_remove_images_with_and_without_allow_missing(engine: Engine) -> None:
    engine.add_images("c", vector_items(0, 5))
    error = raises(
        NotFound,
        "IMAGE_NOT_FOUND",
        lambda: engine.remove_images("c", ["v0", "missing"], allow_missing=False),
    )
    assert error.field == "ids" and "'missing'" in error.message
    assert stored_ids(engine) == ["v0", "v1", "v2", "v3", "v4"], "nothing removed"
    assert engine.remove_images("c", ["v0", "missing"], allow_missing=True) == 1
    assert engine.remove_images("c", ["v1", "v1", "v2"], allow_missing=False) == 2
    assert stored_ids(engine) == ["v3", "v4"]
    assert sorted(search(engine, vector=vector(0), top_k=5)) == ["v3", "v4"]
    raises(InvalidArgument, "EMPTY_BATCH", lambda: engine.remove_images("c", [], allow_missing=True))


def test_get_image(engine: Engine) -> None:
    engine.add_images("c", [ImageItem(id="v0", vector=vector(0), metadata={"k": "v"})])
    row = engine.get_image("c", "v0", with_original=False, with_vector=False)
    assert row.metadata == {"k": "v"} and row.vector is None
    raises(
        InvalidArgument, "BAD_ID", lambda: engine.get_image("c", "", with_original=False, with_vector=False)
    )
    raises(
        NotFound,
        "IMAGE_NOT_FOUND",
        lambda: engine.get_image("c", "x", with_original=False, with_vector=False),
    )
    engine.create_collection(NewCollection(name="originals", store_originals=True))
    engine.add_images("originals", [ImageItem(id="p", content=png(0))])
    assert engine.get_image("originals", "p", with_original=True, with_vector=False).original == png(0)
    assert engine.get_image("c", "v0", with_original=True, with_vector=False).original is None


def list_all(engine: Engine, page_size: int, label: str = "") -> list[tuple[list[str], bool, int]]:
    """Follow next-page tokens to the end: each page's ids, whether it had a token, and the total.
    Gives up after 50 pages, so a token that never runs out fails the test instead of hanging it."""
    pages: list[tuple[list[str], bool, int]] = []
    token = ""
    for _ in range(50):
        rows, token, total = engine.list_images("c", page_size, token, label)
        pages.append(([r.id for r in rows], bool(token), total))
        if not token:
            return pages
    raise AssertionError(f"list_images never ran out: {pages[:4]}...")


def test_list_images_pagination(engine: Engine) -> None:
    engine.add_images("c", vector_items(0, 7, labels=("x", "y")))
    assert list_all(engine, 3) == [
        (["v0", "v1", "v2"], True, 7),
        (["v3", "v4", "v5"], True, 7),
        (["v6"], False, 7),
    ]
    assert list_all(engine, 2, label="x") == [(["v0", "v2"], True, 4), (["v4", "v6"], False, 4)]
    assert list_all(engine, 0)[0][0] == ["v0", "v1", "v2", "v3"], "page_size 0: the configured default"
    assert list_all(engine, 1000)[0][0] == ["v0", "v1", "v2", "v3", "v4"], "capped at max_page_size"
    raises(InvalidArgument, "BAD_PAGE_SIZE", lambda: engine.list_images("c", -1, "", ""))
    _, token, _ = engine.list_images("c", 3, "", "")
    engine.remove_images("c", ["v2", "v3"], allow_missing=False)  # around the page boundary
    rows, _, total = engine.list_images("c", 3, token, "")
    assert [r.id for r in rows] == ["v4", "v5", "v6"] and total == 5


def forged(token: str, position: str) -> str:
    """The same token pointing at another position: the format is readable, the scope key is not."""
    version, key, _ = base64.urlsafe_b64decode(token).decode().split(":", 2)
    return base64.urlsafe_b64encode(f"{version}:{key}:{position}".encode()).decode()


def test_page_tokens_are_bound_to_their_listing(engine: Engine) -> None:
    engine.add_images("c", vector_items(0, 6, labels=("x", "y")))
    engine.create_collection(NewCollection(name="other", metric="l2"))
    _, token, _ = engine.list_images("c", 2, "", "x")
    for collection, label, bad in (
        ("c", "y", token),  # another label filter
        ("c", "", token),  # no filter
        ("other", "x", token),  # another collection
        ("c", "x", "not-a-token"),
        ("c", "x", base64.urlsafe_b64encode(b"v1:0123456789ab:2").decode()),  # wrong scope key
        ("c", "x", forged(token, "abc")),
        ("c", "x", forged(token, "-1")),
        ("c", "x", forged(token, str(2**63))),
    ):
        error = raises(
            InvalidArgument,
            "BAD_PAGE_TOKEN",
            lambda c=collection, lab=label, t=bad: engine.list_images(c, 2, t, lab),
        )
        assert error.field == "page_token"
    rows, _, _ = engine.list_images("c", 2, forged(token, "1"), "x")
    assert [r.id for r in rows] == ["v2", "v4"], "a position is a row id: continue after row 1"
    # a token of a deleted collection does not page a new one of the same name (rows would be skipped)
    engine.add_images("other", vector_items(0, 3))
    _, stale, _ = engine.list_images("other", 1, "", "")
    engine.delete_collection("other")
    engine.create_collection(NewCollection(name="other", metric="l2"))
    engine.add_images("other", vector_items(10, 3))
    raises(InvalidArgument, "BAD_PAGE_TOKEN", lambda: engine.list_images("other", 1, stale, ""))


def test_a_collection_deleted_while_listed_is_left_out_not_an_error(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted between the catalog's list and its info (an outside test: NOT_FOUND for up to a
    fifth of ListCollections calls while another client created and deleted a collection)."""
    engine.create_collection(NewCollection(name="gone", metric="l2"))
    listed = engine.catalog.list()
    engine.delete_collection("gone")
    monkeypatch.setattr(engine.catalog, "list", lambda: listed)  # the list taken before the delete
    infos, token, _ = engine.list_collections(0, "")
    assert [c.spec.name for c in infos] == ["c"] and token == ""
    # A page of one is filled past it, not left empty with a token (an outside test: clients
    # that stop at an empty page stopped early).
    engine.create_collection(NewCollection(name="later", metric="l2"))
    monkeypatch.setattr(
        engine.catalog,
        "list",
        lambda: sorted([*listed, engine.catalog.get("later")], key=lambda c: c.spec.name),
    )
    first, token, _ = engine.list_collections(1, "")
    assert [c.spec.name for c in first] == ["c"] and token
    second, token, _ = engine.list_collections(1, token)
    assert [c.spec.name for c in second] == ["later"] and token == ""


def test_list_collections_pagination(engine: Engine) -> None:
    for name in ("e", "b", "d", "a"):
        engine.create_collection(NewCollection(name=name, metric="l2"))
    first, token, unavailable = engine.list_collections(2, "")
    assert [c.spec.name for c in first] == ["a", "b"] and token and unavailable == {}
    engine.delete_collection("b")
    engine.delete_collection("c")
    second, token, _ = engine.list_collections(2, token)
    assert [c.spec.name for c in second] == ["d", "e"] and token == ""
    everything, token, _ = engine.list_collections(0, "")
    assert [c.spec.name for c in everything] == ["a", "d", "e"] and token == ""
    assert [c.spec.name for c in engine.collections()] == ["a", "d", "e"]
    _, token, _ = engine.list_collections(1, "")
    for bad in ("junk", forged(token, "bad name"), forged(token, "keep\n")):
        error = raises(InvalidArgument, "BAD_PAGE_TOKEN", lambda t=bad: engine.list_collections(2, t))
        assert error.field == "page_token"
    raises(InvalidArgument, "BAD_PAGE_SIZE", lambda: engine.list_collections(-1, ""))


# -- collections, plugins, shutdown ----------------------------------------------------------------


def test_create_collection_defaults(engine: Engine) -> None:
    spec = engine.create_collection(NewCollection(name="d")).spec
    assert (spec.extractor, spec.extractor_version, spec.dim) == (TinyExtractor.name, "1", DIM)
    assert spec.metric == TinyExtractor.default_metric == "cosine"
    assert (spec.index_type, spec.store_originals) == (FLAT, False)
    ivf = engine.create_collection(
        NewCollection(name="i", metric="l2", index_type=IVF, params={"nlist": 4})
    ).spec
    assert (ivf.nlist, ivf.nprobe, ivf.train_size) == (4, 4, 39 * 4)
    hnsw = engine.create_collection(
        NewCollection(name="h", index_type=HNSW, params={"hnsw_m": 16, "ef_search": 0}, description="d")
    )
    assert (hnsw.spec.hnsw_m, hnsw.spec.ef_search, hnsw.spec.description) == (16, 64, "d")
    assert hnsw.image_count == 0 and not hnsw.read_only and hnsw.state_reason == ""


@pytest.mark.parametrize(
    ("wanted", "kind", "reason", "field"),
    [
        pytest.param(
            NewCollection(name="n", extractor="nope"),
            InvalidArgument,
            "UNKNOWN_EXTRACTOR",
            "extractor",
            id="extractor",
        ),
        pytest.param(
            NewCollection(name="n", metric="nope"), InvalidArgument, "UNKNOWN_METRIC", "metric", id="metric"
        ),
        pytest.param(
            NewCollection(name="n", index_type="lsh"),
            InvalidArgument,
            "UNKNOWN_INDEX_TYPE",
            "collection.index_type",
            id="index-type",
        ),
        pytest.param(
            NewCollection(name="n", index_type=IVF, params={"nlist": 4, "nprobe": 5}),
            InvalidArgument,
            "BAD_INDEX_PARAM",
            "collection.ivf.nprobe",
            id="nprobe-over-nlist",
        ),
        pytest.param(
            NewCollection(name="n", index_type=IVF, params={"nlist": 8, "train_size": 7}),
            InvalidArgument,
            "BAD_INDEX_PARAM",
            "collection.ivf.train_size",
            id="train-size-under-nlist",
        ),
        pytest.param(
            NewCollection(name="n", index_type=HNSW, params={"hnsw_m": 65}),
            InvalidArgument,
            "BAD_INDEX_PARAM",
            "collection.hnsw.m",
            id="hnsw-m",
        ),
        pytest.param(
            NewCollection(name="bad name"), InvalidArgument, "BAD_COLLECTION_NAME", "name", id="name"
        ),
        pytest.param(
            NewCollection(name="keep\n"), InvalidArgument, "BAD_COLLECTION_NAME", "name", id="newline"
        ),
        pytest.param(NewCollection(name="c"), AlreadyExists, "COLLECTION_EXISTS", "name", id="exists"),
        pytest.param(
            NewCollection(name="n", description="é" * 41),
            InvalidArgument,
            "BAD_DESCRIPTION",
            "collection.description",
            id="description",
        ),
    ],
)
def test_create_collection_errors_leave_nothing_behind(
    engine: Engine, wanted: NewCollection, kind: type[ImageSearchError], reason: str, field: str
) -> None:
    error = raises(kind, reason, lambda: engine.create_collection(wanted))
    assert error.field == field
    assert [c.spec.name for c in engine.collections()] == ["c"]
    assert sorted(p.name for p in (engine.config.data_dir / "collections").iterdir()) == ["c"]


def test_get_and_delete_collection(engine: Engine) -> None:
    engine.add_images("c", vector_items(0, 2))
    info = engine.get_collection("c")
    assert (info.spec.name, info.image_count) == ("c", 2)
    assert raises(NotFound, "COLLECTION_NOT_FOUND", lambda: engine.get_collection("x")).field == "name"
    # A name no collection can have is the caller's mistake, not a missing collection (an outside test).
    assert (
        raises(InvalidArgument, "BAD_COLLECTION_NAME", lambda: engine.get_collection("bad name!")).field
        == "name"
    )
    assert (
        raises(InvalidArgument, "BAD_COLLECTION_NAME", lambda: engine.delete_collection("x" * 65)).field
        == "name"
    )
    refused = raises(
        InvalidArgument, "BAD_COLLECTION_NAME", lambda: engine.add_images("a/b", vector_items(0, 1))
    )
    assert refused.field == "collection"
    raises(NotFound, "COLLECTION_NOT_FOUND", lambda: engine.get_collection(""))  # "" is "default"
    raises(InvalidArgument, "BAD_COLLECTION_NAME", lambda: engine.delete_collection(""))
    engine.delete_collection("c")
    assert not (engine.config.data_dir / "collections" / "c").exists()
    raises(NotFound, "COLLECTION_NOT_FOUND", lambda: engine.get_collection("c"))
    raises(NotFound, "COLLECTION_NOT_FOUND", lambda: engine.delete_collection("c"))
    raises(NotFound, "COLLECTION_NOT_FOUND", lambda: engine.add_images("c", vector_items(0, 1)))
    assert engine.create_collection(NewCollection(name="c")).image_count == 0, "the name is free again"


def test_list_plugins(engine: Engine) -> None:
    plugins = engine.list_plugins()
    (tiny,) = plugins.extractors
    assert (tiny.name, tiny.version, tiny.dim, tiny.default_metric) == (
        TinyExtractor.name,
        "1",
        DIM,
        "cosine",
    )
    assert (tiny.plugin, tiny.trainable) == ("tiny", False)
    assert [m.name for m in plugins.metrics] == ["cosine", "inner_product", "l2"]
    assert all(m.plugin == "metrics" and m.index_types == (FLAT, HNSW, IVF) for m in plugins.metrics)
    assert any("onnx_cnn" in skipped for skipped in plugins.skipped), "a blocked plugin is listed"
    assert not any("onnx_cnn" in problem for problem in plugins.problems), "left out on purpose: no problem"


def test_begin_shutdown_refuses_further_writes(engine: Engine) -> None:
    engine.check_accepting_writes()
    engine.begin_shutdown()
    error = raises(Unavailable, "SHUTTING_DOWN", engine.check_accepting_writes)
    assert error.code == 14


def test_reads_that_overlap_a_delete_answer_not_found_never_crash(tmp_path):
    """DeleteCollection closes the store's connections; a read racing it must get NotFound, not a
    read on a closed (freed) SQLite connection, which raised disk I/O errors and could segfault."""
    unexpected: list[str] = []
    stop = False
    with open_engine(tmp_path, TINY_PLUGIN) as engine:

        def reader() -> None:
            calls = (
                lambda: engine.get_collection("c"),
                lambda: engine.list_images("c", 4, "", ""),
                engine.collections,
            )
            while not stop:
                for call in calls:
                    try:
                        call()
                    except NotFound:
                        pass
                    except Exception as exc:  # any other failure is the bug
                        unexpected.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.0005)  # leave the GIL to the thread that creates and deletes

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(60):
                engine.create_collection(NewCollection(name="c", metric="l2"))
                engine.delete_collection("c")
        finally:
            stop = True
            for thread in threads:
                thread.join()
    assert unexpected == []


# -- limits and deadlines found by outside testing -------------------------------------------------


def test_a_description_at_the_limit_is_kept_and_one_over_reports_the_limit(engine: Engine) -> None:
    at_limit = "é" * LIMITS["max_description_length"]  # counted in characters, not UTF-8 bytes
    assert (
        engine.create_collection(NewCollection(name="d", description=at_limit)).spec.description == at_limit
    )
    over = NewCollection(name="e", description=at_limit + "x")
    error = raises(InvalidArgument, "BAD_DESCRIPTION", lambda: engine.create_collection(over))
    assert error.metadata == {"limit": "40", "value": "41"}
    assert "40 characters" in error.message


def test_metadata_is_limited_in_utf8_bytes_not_characters(engine: Engine) -> None:
    limit = engine.limits.max_metadata_bytes
    emoji = "\U0001f600"  # 4 bytes in UTF-8
    fits = {"k": emoji * ((limit - 1) // 4)}  # 1 + 4 x 4095 = 16,381 bytes
    over = {"k": emoji * ((limit - 1) // 4 + 1)}  # 16,385 bytes in 4,097 characters
    engine.add_images("c", [ImageItem(id="fits", vector=vector(0), metadata=fits)])
    error = raises(
        InvalidArgument,
        "METADATA_TOO_LARGE",
        lambda: engine.add_images("c", [ImageItem(id="over", vector=vector(1), metadata=over)]),
    )
    assert error.field == "images[0].metadata"
    assert error.metadata == {"limit": str(limit), "value": "16385"} and "16385 bytes" in error.message
    assert stored_ids(engine) == ["fits"]


@pytest.mark.parametrize(
    ("item", "reason", "said", "limit", "value"),
    [
        (ImageItem(id="x" * 257, vector=vector(0)), "BAD_ID", "id is 257 characters", "256", "257"),
        (
            ImageItem(id="l", label="y" * 300, vector=vector(0)),
            "BAD_LABEL",
            "label is 300 characters",
            "256",
            "300",
        ),
        (
            ImageItem(id="m", vector=vector(0), metadata={str(n): "" for n in range(65)}),
            "METADATA_TOO_LARGE",
            "metadata has 65 entries; the limit is 64 entries",
            "64",
            "65",
        ),
    ],
)
def test_each_field_limit_names_itself(
    engine: Engine, item: ImageItem, reason: str, said: str, limit: str, value: str
) -> None:
    """api.md promises ``limit`` and ``value`` for a limit passed; the id, label and metadata limits
    gave neither, and the metadata message did not say whether entries or bytes (an outside test)."""
    error = raises(InvalidArgument, reason, lambda: engine.add_images("c", [item]))
    assert said in error.message and error.metadata == {"limit": limit, "value": value}


def test_a_tiny_vector_is_its_own_nearest_neighbour_under_cosine(engine: Engine) -> None:
    """Its float32 squares underflow to 0: normalised in float32 it became a zero vector, scoring 0."""
    engine.create_collection(NewCollection(name="cos", metric="cosine"))
    base = np.array(vector(0), dtype=np.float32)
    tiny = base * np.float32(1e-25)  # norm ~1e-24, a normal float32
    items = [ImageItem(id="base", vector=base), ImageItem(id="other", vector=vector(1))]
    engine.add_images("cos", [*items, ImageItem(id="tiny", vector=tiny)])
    hits = engine.search(SearchQuery(collection="cos", image_id="tiny", top_k=3)).hits
    assert {hit.id for hit in hits[:2]} == {"tiny", "base"}
    assert [hit.score for hit in hits[:2]] == [pytest.approx(1, abs=1e-5)] * 2


def test_a_past_deadline_removes_creates_and_deletes_nothing(engine: Engine) -> None:
    engine.add_images("c", vector_items(0, 3))
    past = time.monotonic() - 1
    writes = [
        lambda: engine.remove_images("c", ["v0"], allow_missing=False, deadline=past),
        lambda: engine.create_collection(NewCollection(name="late"), deadline=past),
        lambda: engine.delete_collection("c", deadline=past),
    ]
    for write in writes:
        assert raises(DeadlineExceeded, "DEADLINE_EXCEEDED", write).code == 4
    assert stored_ids(engine) == ["v0", "v1", "v2"]
    assert [c.spec.name for c in engine.collections()] == ["c"]
    assert sorted(p.name for p in (engine.config.data_dir / "collections").iterdir()) == ["c"]
    future = time.monotonic() + 60
    assert engine.remove_images("c", ["v0"], allow_missing=False, deadline=future) == 1
    assert engine.create_collection(NewCollection(name="late"), deadline=future).spec.name == "late"
    engine.delete_collection("late", deadline=future)
    assert [c.spec.name for c in engine.collections()] == ["c"]


@pytest.mark.parametrize("neighbors", [-1, 21])
def test_classify_names_neighbors_when_it_is_out_of_range(engine: Engine, neighbors: int) -> None:
    query = ClassifyQuery(collection="c", vector=vector(0), neighbors=neighbors)
    error = raises(InvalidArgument, "BAD_TOP_K", lambda: engine.classify(query))
    assert error.field == "neighbors"
    assert error.message.startswith(f"neighbors {neighbors}" if neighbors > 0 else "neighbors must be >= 0")


class NaNScores:
    """A metric plugin whose scores turn NaN once ``broken`` (after start-up, where the registration
    spot-check saw sound ones): a plugin bug the engine must report, query by query."""

    def __init__(self) -> None:
        self.broken = False

    def score(self, distances: np.ndarray) -> np.ndarray:
        return np.full(np.shape(distances), np.nan) if self.broken else L2.to_score(distances)

    @hookimpl
    def register_metrics(self, register) -> None:
        register(dataclasses.replace(L2, name="nan-scores", to_score=self.score))


def test_nan_scores_are_internal_for_each_query_and_named_in_a_batch(tmp_path: Path) -> None:
    """METRIC_FAILED, like any error of one query of a batch, names the query (an outside reading
    of the code: it was the only one without ``queries[i]``)."""
    plugin = NaNScores()
    with open_engine(tmp_path, TINY_PLUGIN, ("nan-scores", plugin)) as engine:
        plugin.broken = True
        engine.create_collection(NewCollection(name="n", metric="nan-scores"))
        engine.add_images("n", vector_items(0, 4))
        query = SearchQuery(collection="n", vector=vector(1), top_k=2)
        with pytest.raises(Internal) as alone:
            engine.search(query)
        assert alone.value.reason == "METRIC_FAILED" and not alone.value.message.startswith("queries[")
        outcomes = engine.search_batch([query, query])
        assert [o.reason for o in outcomes] == ["METRIC_FAILED"] * 2  # type: ignore[union-attr]
        assert outcomes[1].message.startswith("queries[1]: ")  # type: ignore[union-attr]
