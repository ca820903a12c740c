"""A trainable extractor's state below the gRPC layer: bound per collection, refitted by
``Collection.train`` (all or nothing), restored on reopening, never mixed with another state.

A fake extractor keeps this fast and exact: local features are float32 vectors as bytes, the
"model" is one scale factor, encoding multiplies. A fit sets the scale to the number of images
it saw, so every state is distinguishable and every vector can be predicted.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from imagesearch.plugins.metrics import L2
from imagesearch.plugins.types import FitAbandoned, LocalFeatures, NotEnoughTrainingData, TrainableExtractor
from imagesearch.server import collection as collection_module
from imagesearch.server.collection import SNAPSHOT_FILE, Collection, CollectionSpec
from imagesearch.server.errors import Aborted, FailedPrecondition, Internal, Unavailable
from imagesearch.server.store import NewImage

DIM = 4


class Features(LocalFeatures):
    name, version = "raw", "1"

    def count(self, features: bytes) -> int:
        return len(features) // (4 * DIM)


class Scaled(TrainableExtractor):
    """Vectors = the first local feature × scale; the state is the scale."""

    name, default_metric, dim, base_version, local_features = "scaled", "l2", DIM, "1", "raw"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.version = f"1+{scale:g}"
        self.fitting = threading.Event()  # set while fit runs (a test holds it there)
        self.release = threading.Event()
        self.release.set()

    def state(self) -> bytes:
        return struct.pack("<f", self.scale)

    def with_state(self, state: bytes) -> Scaled:
        return Scaled(struct.unpack("<f", state)[0])

    def fit(self, features: Sequence[bytes], size: int = 0, seed: int = 0) -> bytes:
        if len(features) < 2:
            raise NotEnoughTrainingData(f"needs at least 2 images, got {len(features)}")
        self.fitting.set()
        self.release.wait(10)
        return struct.pack("<f", float(len(features)))

    def encode(self, features: Sequence[bytes]) -> np.ndarray:
        return np.stack([np.frombuffer(f, np.float32)[:DIM] * self.scale for f in features])


def raw(seed: int) -> bytes:
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32).tobytes()


def image(seed: int, extractor: Scaled) -> NewImage:
    local = raw(seed)
    return NewImage(
        id=f"img{seed}",
        label="",
        vector=extractor.encode([local])[0],
        local=local,
        encoded_with=extractor.version,
    )


SPEC = CollectionSpec(
    name="c",
    extractor="scaled",
    extractor_version="1+1",
    extractor_base_version="1",
    local_features="raw",
    local_features_version="1",
    metric="l2",
    dim=DIM,
)


@pytest.fixture
def registered() -> Scaled:
    return Scaled()


@pytest.fixture
def collection(tmp_path: Path, registered: Scaled) -> Collection:
    made = Collection.create(tmp_path / "c", SPEC, L2, registered, Features())
    made.add([image(seed, registered) for seed in range(5)])
    return made


def stored_vectors(collection: Collection) -> dict[str, np.ndarray]:
    return {row.id: collection.get(row.id, with_vector=True).vector for row in collection.page(0, 100)}


def test_training_reencodes_every_image_and_names_the_new_state(collection: Collection) -> None:
    outcome = collection.train(0, 0)
    assert (outcome.previous_version, outcome.training_images, outcome.reencoded_images) == ("1+1", 5, 5)
    assert collection.spec.extractor_version == collection.extractor.version == "1+5"
    for seed in range(5):
        expected = np.frombuffer(raw(seed), np.float32) * 5
        np.testing.assert_allclose(stored_vectors(collection)[f"img{seed}"], expected)
        assert collection.search(expected, 1)[0].id == f"img{seed}"


def test_the_state_is_restored_on_reopening_and_a_missing_one_refuses_images(
    collection: Collection, registered: Scaled
) -> None:
    collection.train(0, 0)
    collection.close()
    again = Collection(
        collection.directory, Collection.read_spec(collection.directory), L2, registered, Features()
    )
    assert again.extractor.version == "1+5" and again.spec.dim == DIM
    np.testing.assert_allclose(stored_vectors(again)["img0"], np.frombuffer(raw(0), np.float32) * 5)
    again.close()
    other_code = Scaled()
    other_code.base_version = "2"
    stranger = Collection(collection.directory, again.spec, L2, other_code, Features())
    with pytest.raises(FailedPrecondition, match="the server's scaled 2 cannot serve its stored state"):
        stranger.check_extractor()
    stranger.close()


def test_an_add_encoded_with_the_replaced_state_is_reencoded(
    collection: Collection, registered: Scaled
) -> None:
    late = image(99, registered)  # encoded by the state the collection had before training
    collection.train(0, 0)
    collection.add([late])
    expected = np.frombuffer(raw(99), np.float32) * 5
    np.testing.assert_allclose(stored_vectors(collection)["img99"], expected)
    hit = collection.search(expected, 1)[0]  # the index holds the re-encoded vector too
    assert hit.id == "img99" and hit.distance == pytest.approx(0, abs=1e-3)


def test_a_query_encoded_with_the_replaced_state_is_aborted(collection: Collection) -> None:
    collection.train(0, 0)
    query = np.zeros((1, DIM), np.float32)
    with pytest.raises(Aborted):
        collection.search_many(query, [1], version="1+1")
    assert collection.search_many(query, [1], version="1+5")[0]


def test_a_failed_commit_changes_nothing(collection: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    before = stored_vectors(collection)
    collection.snapshot()

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(collection.store, "reencode", crash)
    with pytest.raises(OSError):
        collection.train(0, 0)
    assert collection.extractor.version == "1+1"
    after = stored_vectors(collection)
    assert all(np.array_equal(before[key], after[key]) for key in before)
    assert collection.search(before["img3"], 1)[0].id == "img3"
    assert not (collection.directory / SNAPSHOT_FILE).exists()  # deleted first: a restart rebuilds
    monkeypatch.undo()
    collection.close()
    again = Collection(
        collection.directory, Collection.read_spec(collection.directory), L2, Scaled(), Features()
    )
    assert again.extractor.version == "1+1" and again.search(before["img3"], 1)[0].id == "img3"


def test_a_training_no_longer_wanted_is_abandoned_uncommitted(collection: Collection) -> None:
    """A server shutting down during the fit: the training stops at its next step and commits
    nothing (an outside test: a SIGTERM'd training committed at the end of the drain)."""
    before = stored_vectors(collection)
    collection.snapshot()
    stopping = threading.Event()

    def still_wanted() -> None:
        if stopping.is_set():
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")

    raised: list[BaseException] = []

    def train() -> None:
        try:
            collection.train(0, 0, still_wanted)
        except Unavailable as exc:
            raised.append(exc)

    fitted = collection.extractor
    assert isinstance(fitted, Scaled)
    fitted.release.clear()
    thread = threading.Thread(target=train)
    thread.start()
    assert fitted.fitting.wait(10)
    stopping.set()  # SIGTERM while k-means runs
    fitted.release.set()
    thread.join(10)
    assert [e.reason for e in raised] == ["SHUTTING_DOWN"]
    assert collection.extractor.version == collection.spec.extractor_version == "1+1"
    after = stored_vectors(collection)
    assert all(np.array_equal(before[key], after[key]) for key in before)
    assert (collection.directory / SNAPSHOT_FILE).exists()  # untouched: nothing was committed
    assert collection.train(0, 0).training_images == 5  # and the next training may run


def test_searches_go_on_while_the_new_index_is_built(
    collection: Collection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new index is built before the commit, outside the writer lock: built after it, under
    the lock, it held every search for as long as adding every vector takes."""
    old_query = np.frombuffer(raw(2), np.float32)
    add = collection_module.VectorIndex.add
    searched: list[str] = []

    def searched_meanwhile(index: collection_module.VectorIndex, *args: object) -> None:
        if index is not collection.index and not searched:
            done = threading.Event()  # a daemon thread: under the lock, it would wait for the build

            def search() -> None:
                searched.append(collection.search(old_query, 1)[0].id)
                done.set()

            threading.Thread(target=search, daemon=True).start()
            assert done.wait(timeout=10), "the search waited for the new index"
        add(index, *args)

    monkeypatch.setattr(collection_module.VectorIndex, "add", searched_meanwhile)
    collection.train(0, 0)
    monkeypatch.undo()
    assert searched == ["img2"]  # answered by the old state, whole
    assert collection.search(old_query * 5, 1)[0].id == "img2"
    assert collection.live_index().size == 5


def test_a_failed_index_build_commits_nothing(
    collection: Collection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built after the commit, a failed index turned the trained collection read-only."""
    before = stored_vectors(collection)
    collection.snapshot()

    def refused(index: collection_module.VectorIndex, *args: object) -> None:
        raise MemoryError("no room for a second index")

    monkeypatch.setattr(collection_module.VectorIndex, "add", refused)
    with pytest.raises(Internal, match=r"could not be built .*MemoryError.*not committed") as failed:
        collection.train(0, 0)
    monkeypatch.undo()
    assert failed.value.reason == "TRAINING_FAILED"
    assert collection.extractor.version == collection.spec.extractor_version == "1+1"
    assert collection.state_reason == "" and (collection.directory / SNAPSHOT_FILE).exists()
    after = stored_vectors(collection)
    assert all(np.array_equal(before[key], after[key]) for key in before)
    collection.add([image(7, collection.extractor)])  # still writable
    assert collection.train(0, 0).reencoded_images == 6


def test_an_ivf_collection_learns_its_lists_from_the_new_vectors_and_keeps_them(
    tmp_path: Path, registered: Scaled
) -> None:
    spec = dataclasses.replace(SPEC, index_type="ivf", nlist=2, nprobe=2, train_size=4)
    collection = Collection.create(tmp_path / "ivf", spec, L2, registered, Features())
    collection.add([image(seed, registered) for seed in range(6)])
    old_lists = collection.live_index().learnt
    assert old_lists is not None
    collection.train(0, 0)
    lists = collection.live_index().learnt
    assert lists is not None and not np.allclose(lists, old_lists)  # learnt from vectors × 6
    stored = collection.store.learnt()
    assert stored is not None and np.array_equal(stored, lists)
    expected = np.frombuffer(raw(4), np.float32) * 6
    assert collection.search(expected, 1)[0].id == "img4"
    collection.close()
    again = Collection(tmp_path / "ivf", Collection.read_spec(tmp_path / "ivf"), L2, registered, Features())
    assert np.array_equal(again.live_index().learnt, lists)
    assert again.search(expected, 1)[0].id == "img4"
    again.close()


def test_too_little_data_and_a_second_training_are_refused(tmp_path: Path, registered: Scaled) -> None:
    small = Collection.create(tmp_path / "small", SPEC, L2, registered, Features())
    small.add([image(0, registered)])
    with pytest.raises(FailedPrecondition, match="at least 2 images") as refused:
        small.train(0, 0)
    assert refused.value.reason == "NOT_ENOUGH_TRAINING_DATA"

    small.add([image(1, registered)])
    small.extractor.release.clear()
    first = threading.Thread(target=small.train, args=(0, 0))
    first.start()
    assert small.extractor.fitting.wait(10)
    with pytest.raises(Aborted, match="being trained"):
        small.train(0, 0)
    small.extractor.release.set()
    first.join(10)
    assert small.extractor.version == "1+2"


def test_removed_images_are_not_reencoded_back(collection: Collection) -> None:
    collection.remove(["img1"])
    outcome = collection.train(0, 0)
    assert outcome.reencoded_images == 4 and collection.count() == 4
    assert "img1" not in stored_vectors(collection)
    assert collection.local_features_of([2]) == {}  # row 2 (img1) is gone, its features with it
    assert set(collection.local_features_of([1, 3])) == {1, 3}


class Careless(Scaled):
    """Fits by raising ``raised``, or encodes into NaN once trained (``nan_after_fit``)."""

    raised: type[BaseException] | None = None
    nan_after_fit = False

    def fit(self, features: Sequence[bytes], size: int = 0, seed: int = 0) -> bytes:
        if self.raised is not None:
            raise self.raised("fit gave up")
        return super().fit(features, size, seed)

    def with_state(self, state: bytes) -> Scaled:
        trained = Careless(struct.unpack("<f", state)[0])
        trained.raised, trained.nan_after_fit = self.raised, self.nan_after_fit
        return trained

    def encode(self, features: Sequence[bytes]) -> np.ndarray:
        encoded = super().encode(features)
        return encoded * np.nan if self.nan_after_fit and self.scale != 1 else encoded


@pytest.mark.parametrize("careless", ["KeyboardInterrupt", "SystemExit", "NaN vectors"])
def test_a_careless_training_is_refused_by_name_and_changes_nothing(tmp_path: Path, careless: str) -> None:
    """``fit`` raising a KeyboardInterrupt reached the event loop, which stopped, and vectors that
    ``encode`` made NaN would have been committed, breaking the index at its rebuild: each is now
    INTERNAL naming the extractor, and the collection stays as it was (a second outside test)."""
    registered = Careless()
    if careless == "NaN vectors":
        registered.nan_after_fit = True
    else:
        registered.raised = KeyboardInterrupt if careless == "KeyboardInterrupt" else SystemExit
    made = Collection.create(tmp_path / "c", SPEC, L2, registered, Features())
    made.add([image(seed, registered) for seed in range(5)])
    before = stored_vectors(made)
    with pytest.raises(Internal, match="extractor 'scaled'") as refused:
        made.train(0, 0)
    assert refused.value.reason == "EXTRACTOR_FAILED" and made.spec.extractor_version == "1+1"
    after = stored_vectors(made)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert made.search(before["img0"], 1)[0].id == "img0"
    made.close()


class Iterating(Scaled):
    """A fit that iterates like k-means and asks ``still_wanted`` before each iteration, as the
    plugin API invites a long fit to; or one that raises ``FitAbandoned`` unasked (``rogue``)."""

    rogue = False

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale)
        self.iterations = 0

    def fit(
        self,
        features: Sequence[bytes],
        size: int = 0,
        seed: int = 0,
        still_wanted: Callable[[], None] | None = None,
    ) -> bytes:
        if self.rogue:
            raise FitAbandoned("nobody asked")
        assert still_wanted is not None  # the server passes it to a fit that takes it
        for _ in range(50):
            still_wanted()
            self.iterations += 1
        return struct.pack("<f", float(len(features)))

    def with_state(self, state: bytes) -> Iterating:
        return type(self)(struct.unpack("<f", state)[0])


class Rogue(Iterating):
    rogue = True


def test_a_long_fit_stops_between_its_iterations_when_the_server_stops(tmp_path: Path) -> None:
    """The server stopping during a fit that asks ``still_wanted``: the fit ends at its next
    iteration, not at its end (a 16,384-word vocabulary's k-means held a stop for minutes, past
    its watchdog), the training is refused as SHUTTING_DOWN and nothing is committed."""
    registered = Iterating()
    made = Collection.create(tmp_path / "c", SPEC, L2, registered, Features())
    made.add([image(seed, registered) for seed in range(5)])
    before = stored_vectors(made)
    asked = 0

    def still_wanted() -> None:
        nonlocal asked
        asked += 1
        if asked > 3:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")

    with pytest.raises(Unavailable) as stopped:
        made.train(0, 0, still_wanted)
    assert stopped.value.reason == "SHUTTING_DOWN" and asked == 4
    assert made.extractor.version == made.spec.extractor_version == "1+1"
    after = stored_vectors(made)
    assert all(np.array_equal(before[key], after[key]) for key in before)
    assert made.train(0, 0).training_images == 5  # wanted throughout: it runs to its end
    made.close()


def test_fit_abandoned_raised_unasked_is_the_plugins_failure(tmp_path: Path) -> None:
    registered = Rogue()
    made = Collection.create(tmp_path / "c", SPEC, L2, registered, Features())
    made.add([image(seed, registered) for seed in range(5)])
    with pytest.raises(Internal, match="extractor 'scaled'") as refused:
        made.train(0, 0)
    assert refused.value.reason == "EXTRACTOR_FAILED" and made.spec.extractor_version == "1+1"
    made.close()
