"""Crash harness: SIGKILL a real server at random moments under writes, restart it, check every invariant.

Each round the test issues writes (AddImages, AddImagesStream, RemoveImages,
CreateCollection/DeleteCollection of a scratch collection) on a flat, an IVF,
an HNSW and the default collection while a background thread kills the server
after a random 0.05-0.4 s. The server snapshots often (every 50 writes or
0.3 s), so kills land before, during and after snapshots. A write the client saw
acknowledged must survive; a write whose RPC failed at the kill is uncertain: it
may have landed or not, but only whole (a batch, a stream chunk, a removal, a
collection). After every restart the ledger of what the client knows is checked
against ListImages, GetImage, GetCollection, ListCollections and Search.

Choices (sizes, ids, vectors, kill delays) come from a fixed seed, so a failure
is reproducible up to thread timing: how many writes fit before a kill varies.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import grpc
import numpy as np
import pytest

from imagesearch.server.collection import SNAPSHOT_FILE
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import image_search_service_pb2_grpc as pb_grpc
from tests.support.images import encode, pattern
from tests.support.process import ServerProcess, tiny_server
from tests.support.tiny_plugin import TinyExtractor

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 20_240_917
ROUNDS = 24
DIM = TinyExtractor.dim
SERVER_OVERRIDES = ("snapshot_every_ops=50", "snapshot_interval_s=0.3")
KILL_DELAY_S = (0.05, 0.4)
# The snapshotter wakes every 0.5 s; without an idle spell most servers would die before their first snapshot,
# and every restart would rebuild the index from the store instead of loading a snapshot and replaying a tail.
IDLE_BEFORE_WRITES_S = (0.0, 0.6)
# Writes must fail soon after the kill; if they still succeed this long after it, the kill did not happen.
WRITE_GRACE_S = 5.0
RPC_TIMEOUT_S = 10.0
# Removals start only above the IVF train_size (40), so they hit a trained IVF index.
MIN_LIVE_FOR_REMOVALS = 48
# Keeps a search for everything under the server's max_top_k (1000) and each check quick.
MAX_LIVE = 220
SAMPLE = 6
SCRATCH = "scratch"
SCRATCH_OP_PROBABILITY = 0.03
# HNSW is approximate even for a stored vector (FAISS can leave nodes unreachable): measured self-recall@1 is
# about 98% on random 192-d vectors with m=8, so its top-1 check is an aggregate over all rounds.
HNSW_MIN_TOP1_RATE = 0.9

COLLECTIONS = [
    pb.Collection(name="default", metric="cosine", description="zero-setup collection"),
    pb.Collection(name="flat", metric="l2", index_type=pb.INDEX_TYPE_FLAT),
    pb.Collection(
        name="ivf",
        metric="l2",
        index_type=pb.INDEX_TYPE_IVF,
        ivf=pb.IvfParams(nlist=4, nprobe=4, train_size=40),
    ),
    pb.Collection(name="hnsw", metric="l2", index_type=pb.INDEX_TYPE_HNSW, hnsw=pb.HnswParams(m=8)),
]

Stub = pb_grpc.ImageSearchServiceStub


def scratch_spec(generation: int) -> pb.Collection:
    """The scratch collection of one generation; the description tells generations apart after a crash."""
    return pb.Collection(
        name=SCRATCH, metric="l2", index_type=pb.INDEX_TYPE_FLAT, description=f"gen {generation}"
    )


def tiny_vector(content: bytes) -> np.ndarray:
    """The vector the server's tiny-8x8 extractor computes for encoded bytes (deterministic, so exact)."""
    pixels = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR)
    return TinyExtractor().extract([pixels])[0]


def short(items: Any, limit: int = 5) -> str:
    """A failure message names a few offending ids, not thousands."""
    items = sorted(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{items[:limit]}{more}"


@dataclass
class Pending:
    """A write whose RPC failed at a kill. Each chunk lands whole or not at all; stream chunks in order."""

    kind: Literal["add", "remove"]
    chunks: list[list[str]]


@dataclass
class Ledger:
    """What the client knows about one collection; the server must agree with it after every restart."""

    spec: pb.Collection
    exists: bool | None = True  # None: a create or delete was in flight at the kill
    present: dict[str, np.ndarray] = field(default_factory=dict)  # acknowledged, not removed, with vectors
    gone: set[str] = field(default_factory=set)  # acknowledged removed, or lost at a kill: must never appear
    sent: set[str] = field(default_factory=set)  # every id ever sent: any other listed id is a phantom
    in_flight: dict[str, np.ndarray] = field(default_factory=dict)  # vectors of uncertain adds
    pending: list[Pending] = field(default_factory=list)
    # Acknowledged since the last check: the tail a restart replays on top of a snapshot.
    recent: list[str] = field(default_factory=list)
    broken: bool = False  # a violation was found: stop writing to it so one bug does not cascade

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def exact(self) -> bool:
        """Flat is exact and IVF probes all its lists (nprobe == nlist); only HNSW may miss a neighbour."""
        return self.spec.index_type != pb.INDEX_TYPE_HNSW

    def reset(self, spec: pb.Collection) -> None:
        """A new generation of the collection: nothing in it yet, and no id of an older one may show up."""
        self.spec = spec
        self.present, self.gone, self.sent, self.in_flight = {}, set(), set(), {}
        self.pending, self.recent = [], []


@dataclass
class Write:
    """One write RPC and what its acknowledgement, or its loss at a kill, means for the ledger."""

    ledger: Ledger
    label: str
    send: Callable[[Stub], Any]
    on_ack: Callable[[Any], None]
    on_loss: Callable[[], None]


class Killer(threading.Thread):
    """SIGKILLs the server after a delay, noting whether it had already died by itself (a crash)."""

    def __init__(self, server: ServerProcess, delay: float) -> None:
        super().__init__(name="killer", daemon=True)
        self.server, self.delay = server, delay
        self.crashed_with: int | None = None

    def run(self) -> None:
        time.sleep(self.delay)
        self.crashed_with = self.server.proc.poll()
        self.server.kill9()


def snapshot_marks(data_dir: Path) -> dict[str, tuple[int, int]]:
    """(mtime, inode) of each collection's snapshot file: a change between kills means a snapshot was written."""
    marks = {}
    for path in (data_dir / "collections").glob(f"*/{SNAPSHOT_FILE}"):
        stat = path.stat()
        marks[path.parent.name] = (stat.st_mtime_ns, stat.st_ino)
    return marks


def list_ids(stub: Stub, collection: str, page_size: int) -> tuple[list[str], int]:
    """Every id in a collection, following page tokens (so pagination itself is exercised), and total_size."""
    ids: list[str] = []
    token, total = "", 0
    while True:
        page = stub.ListImages(
            pb.ListImagesRequest(collection=collection, page_size=page_size, page_token=token),
            timeout=RPC_TIMEOUT_S,
        )
        ids += [image.id for image in page.images]
        total, token = page.total_size, page.next_page_token
        if not token:
            return ids, total


def list_collection_names(stub: Stub) -> list[str]:
    names: list[str] = []
    token = ""
    while True:
        page = stub.ListCollections(pb.ListCollectionsRequest(page_token=token), timeout=RPC_TIMEOUT_S)
        names += [c.name for c in page.collections]
        token = page.next_page_token
        if not token:
            return names


def spec_problems(want: pb.Collection, got: pb.Collection) -> list[str]:
    """A collection that exists after a crash must be the one that was created, not a half-made one."""
    pairs = [
        ("index_type", want.index_type or pb.INDEX_TYPE_FLAT, got.index_type),
        ("metric", want.metric, got.metric),
        ("dimension", DIM, got.dimension),
        ("description", want.description, got.description),
    ]
    if want.index_type == pb.INDEX_TYPE_IVF:
        pairs += [
            ("ivf.nlist", want.ivf.nlist, got.ivf.nlist),
            ("ivf.nprobe", want.ivf.nprobe, got.ivf.nprobe),
            ("ivf.train_size", want.ivf.train_size, got.ivf.train_size),
        ]
    if want.index_type == pb.INDEX_TYPE_HNSW:
        pairs.append(("hnsw.m", want.hnsw.m, got.hnsw.m))
    return [f"{name} is {have!r}, created with {wanted!r}" for name, wanted, have in pairs if wanted != have]


def resolve_pending(ledger: Ledger, listed: set[str], problems: list[str]) -> list[str]:
    """Settle uncertain writes from what the server holds; return the uncertain ids that landed.

    A half-applied batch, stream chunk or removal is a violation; so is a stream chunk that landed after
    an earlier chunk of the same stream was lost (chunks are committed in order).
    """
    landed: list[str] = []
    for write in ledger.pending:
        whole = []
        for chunk in write.chunks:
            here = [image_id in listed for image_id in chunk]
            if any(here) and not all(here):
                problems.append(f"half-applied {write.kind}: present {short(set(chunk) & listed)} of {chunk}")
            whole.append(all(here))
        if write.kind == "add" and any(later and not earlier for earlier, later in itertools.pairwise(whole)):
            problems.append(f"stream chunks landed out of order: {whole} for {write.chunks}")
        for image_id in itertools.chain.from_iterable(write.chunks):
            vector = ledger.in_flight.pop(image_id, None)
            if image_id in listed:
                if write.kind == "add":
                    ledger.present[image_id] = vector
                    landed.append(image_id)
            else:
                ledger.present.pop(image_id, None)
                ledger.gone.add(image_id)
    ledger.pending.clear()
    return landed


class CrashHarness:
    """Drives one data directory through kill/restart rounds and collects every violation it sees."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.rng = random.Random(SEED)
        self.vectors = np.random.default_rng(SEED)
        self.ledgers = [Ledger(spec) for spec in COLLECTIONS]
        self.scratch = Ledger(scratch_spec(0), exists=False)
        self.generation = 0
        self.ids = itertools.count()
        self.stats: Counter[str] = Counter()
        self.failures: list[str] = []
        self.warnings: list[str] = []
        self.failed_starts = 0
        self.round = 0
        self.hnsw_top1: list[bool] = []
        self.server: ServerProcess | None = None
        self.channel: grpc.Channel | None = None
        self.stub: Stub | None = None
        self.marks: dict[str, tuple[int, int]] = {}

    # -- bookkeeping -------------------------------------------------------------------
    def fail(self, message: str, ledger: Ledger | None = None) -> None:
        """Record a violation; quarantine the collection it concerns so the others keep being tested."""
        where = f" [{ledger.name}]" if ledger else ""
        self.failures.append(f"round {self.round}{where}: {message}")
        if ledger is not None:
            ledger.broken = True

    def all_ledgers(self) -> list[Ledger]:
        return [*self.ledgers, self.scratch]

    # -- server lifecycle -------------------------------------------------------------
    def start(self) -> bool:
        """Start on the same data dir. Every start must succeed; a failure is recorded, then retried once."""
        for attempt in (1, 2):
            try:
                self.server = tiny_server(self.data_dir, *SERVER_OVERRIDES)
            except RuntimeError as exc:
                self.failed_starts += 1
                self.fail(f"start attempt {attempt} failed: {str(exc)[-3000:]}")
                continue
            self.channel = grpc.insecure_channel(self.server.target)
            self.stub = pb_grpc.ImageSearchServiceStub(self.channel)
            return True
        return False

    def after_kill(self, killer: Killer, lost: Write | None) -> None:
        """Close the channel; note a crash the server had by itself and any error it logged."""
        assert self.server is not None and self.channel is not None
        self.channel.close()
        output = "".join(self.server.output)
        if killer.crashed_with is not None:
            suspect = lost.ledger if lost else None
            doing = lost.label if lost else "no write"
            self.fail(
                f"server died by itself (exit {killer.crashed_with}) during {doing}:\n{output[-3000:]}",
                suspect,
            )
        for line in self.server.output:
            if any(
                word in line for word in ("ERROR", "CRITICAL", "Traceback", "assertion", "Fatal", "Abort")
            ):
                self.fail(f"server logged: {line.rstrip()}")
            elif "WARNING" in line:
                self.warnings.append(f"round {self.round}: {line.rstrip()}")
        marks = snapshot_marks(self.data_dir)
        if marks != self.marks:
            self.stats["rounds with a snapshot"] += 1
        self.marks = marks

    # -- writes -----------------------------------------------------------------------
    def new_images(self, ledger: Ledger, count: int) -> list[tuple[pb.ImageInput, np.ndarray]]:
        """Fresh ids; encoded images on the default collection (extracted by the server), vectors elsewhere."""
        images = []
        for _ in range(count):
            number = next(self.ids)
            image_id = f"{ledger.name}-{self.generation}-{number}" if ledger is self.scratch else f"i{number}"
            if ledger.name == "default":
                content = encode(pattern(number))
                images.append((pb.ImageInput(id=image_id, content=content), tiny_vector(content)))
            else:
                vector = self.vectors.normal(size=DIM).astype(np.float32)
                images.append((pb.ImageInput(id=image_id, vector=pb.FloatVector(values=vector)), vector))
            ledger.sent.add(image_id)
        return images

    def add_write(self, ledger: Ledger, stream: bool) -> Write:
        chunks = [
            self.new_images(ledger, self.rng.randint(1, 6))
            for _ in range(self.rng.randint(2, 4) if stream else 1)
        ]
        ids = [[image.id for image, _ in chunk] for chunk in chunks]
        vectors = {image.id: vector for chunk in chunks for image, vector in chunk}
        name, kind = ledger.name, "stream" if stream else "add"

        def send(stub: Stub) -> Any:
            if stream:
                requests = (
                    pb.AddImagesStreamRequest(collection=name, images=[i for i, _ in c]) for c in chunks
                )
                return stub.AddImagesStream(requests, timeout=RPC_TIMEOUT_S)
            return stub.AddImages(
                pb.AddImagesRequest(collection=name, images=[i for i, _ in chunks[0]]), timeout=RPC_TIMEOUT_S
            )

        def on_ack(response: Any) -> None:
            flat = list(itertools.chain.from_iterable(ids))
            if list(response.ids) != flat or response.added_count != len(flat):
                self.fail(
                    f"{kind} acknowledged {list(response.ids)} ({response.added_count}), sent {flat}", ledger
                )
            ledger.present.update(vectors)
            ledger.recent += flat
            self.stats[f"acked {kind}s"] += 1
            self.stats["acked adds"] += len(flat)
            if name == "default":
                self.stats["acked content adds"] += len(flat)

        def on_loss() -> None:
            ledger.in_flight.update(vectors)
            ledger.pending.append(Pending("add", ids))
            self.stats["uncertain"] += len(vectors)

        return Write(ledger, f"{kind} of {ids} to {name}", send, on_ack, on_loss)

    def remove_write(self, ledger: Ledger) -> Write:
        ids = self.rng.sample(sorted(ledger.present), self.rng.randint(1, 6))

        def send(stub: Stub) -> Any:
            return stub.RemoveImages(
                pb.RemoveImagesRequest(collection=ledger.name, ids=ids), timeout=RPC_TIMEOUT_S
            )

        def on_ack(response: Any) -> None:
            if response.removed_count != len(ids):
                self.fail(f"removal of {ids} acknowledged {response.removed_count}", ledger)
            for image_id in ids:
                del ledger.present[image_id]
                ledger.gone.add(image_id)
            self.stats["acked removals"] += len(ids)

        def on_loss() -> None:
            ledger.pending.append(Pending("remove", [ids]))
            self.stats["uncertain"] += len(ids)

        return Write(ledger, f"removal of {ids} from {ledger.name}", send, on_ack, on_loss)

    def create_scratch_write(self) -> Write:
        """Re-create the scratch collection (same name, next generation): it must exist whole or not at all."""
        self.generation += 1
        spec = scratch_spec(self.generation)
        self.scratch.reset(spec)

        def on_ack(response: Any) -> None:
            self.scratch.exists = True
            for problem in spec_problems(spec, response.collection):
                self.fail(f"CreateCollection answered {problem}", self.scratch)
            self.stats["acked creates"] += 1

        def on_loss() -> None:
            self.scratch.exists = None
            self.stats["uncertain collection ops"] += 1

        return Write(
            self.scratch,
            f"creation of {SCRATCH} gen {self.generation}",
            lambda stub: stub.CreateCollection(
                pb.CreateCollectionRequest(collection=spec), timeout=RPC_TIMEOUT_S
            ),
            on_ack,
            on_loss,
        )

    def delete_scratch_write(self) -> Write:
        """Delete the scratch collection: once acknowledged it must stay gone after any crash."""

        def on_ack(_: Any) -> None:
            self.scratch.exists = False
            self.scratch.reset(self.scratch.spec)
            self.stats["acked deletes"] += 1

        def on_loss() -> None:
            self.scratch.exists = None
            self.stats["uncertain collection ops"] += 1

        return Write(
            self.scratch,
            f"deletion of {SCRATCH} gen {self.generation}",
            lambda stub: stub.DeleteCollection(
                pb.DeleteCollectionRequest(name=SCRATCH), timeout=RPC_TIMEOUT_S
            ),
            on_ack,
            on_loss,
        )

    def plan_write(self) -> Write:
        """Pick the next write: grow each collection past IVF training, then mix adds and removals."""
        scratch = self.scratch
        if not scratch.broken and self.rng.random() < SCRATCH_OP_PROBABILITY:
            if not scratch.exists:
                return self.create_scratch_write()
            if len(scratch.present) >= 8:
                return self.delete_scratch_write()
        writable = [ledger for ledger in self.all_ledgers() if ledger.exists and not ledger.broken]
        assert writable, "every collection is quarantined: nothing left to test\n" + "\n".join(self.failures)
        ledger = self.rng.choice(writable)
        live = len(ledger.present)
        if live >= MAX_LIVE or (live >= MIN_LIVE_FOR_REMOVALS and self.rng.random() < 0.45):
            return self.remove_write(ledger)
        return self.add_write(ledger, stream=self.rng.random() < 0.35)

    def write_until_killed(self) -> None:
        """Write until an RPC fails at the kill; that write is uncertain, every earlier one acknowledged."""
        assert self.server is not None and self.stub is not None
        time.sleep(self.rng.uniform(*IDLE_BEFORE_WRITES_S))
        killer = Killer(self.server, self.rng.uniform(*KILL_DELAY_S))
        killer.start()
        deadline = time.monotonic() + killer.delay + WRITE_GRACE_S
        lost: Write | None = None
        while time.monotonic() < deadline:
            write = self.plan_write()
            try:
                response = write.send(self.stub)
            except grpc.RpcError as error:
                lost = write
                write.on_loss()
                if error.code() != grpc.StatusCode.UNAVAILABLE:  # not the kill: the server refused the write
                    self.fail(f"{write.label} failed: {error.code().name}: {error.details()}", write.ledger)
                break
            write.on_ack(response)
        else:
            self.fail("writes kept succeeding after the SIGKILL")
        killer.join()
        self.after_kill(killer, lost)

    # -- checks -----------------------------------------------------------------------
    def check_catalog(self) -> None:
        """Collections exist exactly as acknowledged; an uncertain create or delete settles either way."""
        assert self.stub is not None
        names = list_collection_names(self.stub)
        if len(names) != len(set(names)):
            self.fail(f"ListCollections repeats names: {names}")
        for ledger in self.all_ledgers():
            here = ledger.name in names
            if ledger.exists is None:
                ledger.exists = here
                if not here:
                    ledger.reset(ledger.spec)
            elif ledger.exists != here and not ledger.broken:
                state = "acknowledged deleted, but exists" if here else "acknowledged, but missing"
                self.fail(f"collection {state} after restart", ledger)
        unknown = set(names) - {ledger.name for ledger in self.all_ledgers()}
        if unknown:
            self.fail(f"unknown collections appeared: {sorted(unknown)}")

    def check_collection(self, ledger: Ledger) -> list[str]:
        """Every invariant of one collection against the ledger; returns the violations."""
        assert self.stub is not None
        stub, name, problems = self.stub, ledger.name, []
        listed, total = list_ids(stub, name, page_size=self.rng.choice([7, 50, 1000]))
        repeated = [image_id for image_id, n in Counter(listed).items() if n > 1]
        if repeated:
            problems.append(f"ListImages repeats ids {short(repeated)}")
        here = set(listed)
        landed = resolve_pending(ledger, here, problems)
        if missing := set(ledger.present) - here:
            problems.append(f"acknowledged ids missing: {short(missing)}")
        if back := here & ledger.gone:
            problems.append(f"removed (or lost) ids present: {short(back)}")
        if phantoms := here - ledger.sent:
            problems.append(f"ids never sent present: {short(phantoms)}")
        info = stub.GetCollection(pb.GetCollectionRequest(name=name), timeout=RPC_TIMEOUT_S).collection
        if not info.image_count == total == len(listed):
            problems.append(f"image_count {info.image_count}, total_size {total}, listed {len(listed)}")
        problems += spec_problems(ledger.spec, info)
        if info.index_trained:
            self.stats["checks of a trained IVF"] += 1
        problems += self.check_vectors(ledger, landed)
        problems += self.check_search(ledger)
        return problems

    def check_vectors(self, ledger: Ledger, landed: list[str]) -> list[str]:
        """Stored vectors are exactly what was sent, for landed uncertain ids too (no half-written rows)."""
        assert self.stub is not None
        problems = []
        present = sorted(ledger.present)
        for image_id in landed + self.rng.sample(present, min(SAMPLE, len(present))):
            got = self.stub.GetImage(
                pb.GetImageRequest(collection=ledger.name, id=image_id, include_vector=True),
                timeout=RPC_TIMEOUT_S,
            ).image.vector.values
            if not np.array_equal(np.array(got, np.float32), ledger.present[image_id]):
                problems.append(f"GetImage({image_id}) vector differs from the one sent")
        for image_id in self.rng.sample(sorted(ledger.gone), min(2, len(ledger.gone))):
            try:
                self.stub.GetImage(
                    pb.GetImageRequest(collection=ledger.name, id=image_id), timeout=RPC_TIMEOUT_S
                )
                problems.append(f"GetImage({image_id}) found a removed image")
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        return problems

    def search(self, ledger: Ledger, vector: np.ndarray, top_k: int) -> list[pb.SearchHit]:
        assert self.stub is not None
        request = pb.SearchRequest(collection=ledger.name, vector=pb.FloatVector(values=vector), top_k=top_k)
        return list(self.stub.Search(request, timeout=RPC_TIMEOUT_S).hits)

    def check_search(self, ledger: Ledger) -> list[str]:
        """The index agrees with the store: a stored vector finds its own id, and no removed id is ever found."""
        present = sorted(ledger.present)
        if not present:
            return []
        problems = []
        recent = [image_id for image_id in ledger.recent if image_id in ledger.present][-SAMPLE // 2 :]
        for image_id in recent + self.rng.sample(present, min(SAMPLE // 2, len(present))):
            hits = self.search(ledger, ledger.present[image_id], top_k=1)
            top = hits[0] if hits else None
            if top is None or top.id not in ledger.present:
                problems.append(f"top hit for {image_id}'s vector is {top.id if top else None!r}, not stored")
            elif ledger.exact and top.id != image_id:
                problems.append(f"top hit for {image_id}'s vector is {top.id} (distance {top.distance})")
            elif ledger.exact and ledger.spec.metric == "l2" and abs(top.distance) > 1e-2:
                problems.append(f"{image_id}'s own vector is at distance {top.distance}")
            if not ledger.exact:
                self.hnsw_top1.append(top is not None and top.id == image_id)
        query = ledger.present[self.rng.choice(present)]
        found = [hit.id for hit in self.search(ledger, query, top_k=min(len(present), 1000))]
        if len(found) != len(set(found)):
            problems.append("a search for everything repeats ids")
        if stray := set(found) - set(ledger.present):
            problems.append(
                f"a search returned ids not in the store (removed: {short(stray & ledger.gone)}): {short(stray)}"
            )
        if ledger.exact and len(present) <= 1000 and set(found) != set(present):
            problems.append(f"a search for everything misses {short(set(present) - set(found))}")
        return problems

    def check_all(self) -> None:
        self.check_catalog()
        for ledger in self.all_ledgers():
            if ledger.exists and not ledger.broken:
                try:
                    problems = self.check_collection(ledger)
                except grpc.RpcError as error:  # e.g. a collection the server could not open
                    problems = [f"check failed: {error.code().name}: {error.details()}"]
                for problem in problems:
                    self.fail(problem, ledger)
            ledger.recent.clear()

    # -- the run ------------------------------------------------------------------------
    def setup(self) -> None:
        """Create the three collections before any kill (their creation is not what is under test)."""
        assert self.start() and self.stub is not None, "\n".join(self.failures)
        for spec in COLLECTIONS[1:]:
            self.stub.CreateCollection(pb.CreateCollectionRequest(collection=spec), timeout=RPC_TIMEOUT_S)

    def run(self, rounds: int) -> None:
        self.setup()
        for self.round in range(1, rounds + 1):
            self.write_until_killed()
            if not self.start():
                return
            self.check_all()

    def stop(self) -> None:
        if self.server is not None and self.server.proc.poll() is None:
            self.server.kill9()
        if self.channel is not None:
            self.channel.close()

    @property
    def hnsw_top1_rate(self) -> float:
        return sum(self.hnsw_top1) / max(1, len(self.hnsw_top1))

    def summary(self, elapsed: float) -> str:
        s = self.stats
        return (
            f"crash harness: {self.round} rounds, {s['acked adds']} acked adds, {s['acked removals']} acked "
            f"removals, {s['uncertain']} uncertain ids (+{s['uncertain collection ops']} collection ops), "
            f"{s['rounds with a snapshot']} rounds with a snapshot, {s['acked creates']}/{s['acked deletes']} "
            f"scratch creates/deletes, HNSW top-1 {self.hnsw_top1_rate:.0%} of {len(self.hnsw_top1)}, "
            f"{len(self.failures)} violations, {elapsed:.1f} s"
        )


def test_crash_harness(data_dir: Path) -> None:
    started = time.monotonic()
    harness = CrashHarness(data_dir)
    try:
        harness.run(ROUNDS)
    finally:
        harness.stop()
        print(harness.summary(time.monotonic() - started))
        for warning in harness.warnings[:10]:
            print(warning)
    assert harness.failed_starts == 0, "\n".join(harness.failures)
    assert not harness.failures, f"{len(harness.failures)} violations:\n" + "\n".join(harness.failures[:30])
    # The run must have exercised what it claims to test.
    assert harness.round == ROUNDS >= 20
    for kind in ("acked adds", "acked streams", "acked content adds", "acked removals", "acked deletes"):
        assert harness.stats[kind] > 0, kind
    assert harness.stats["acked creates"] >= 2, "the scratch collection was never re-created"
    assert harness.stats["checks of a trained IVF"] > 0, "removals never reached a trained IVF index"
    assert harness.stats["rounds with a snapshot"] >= ROUNDS // 4, "kills rarely came after a snapshot"
    assert harness.hnsw_top1, "HNSW was never searched"
    assert harness.hnsw_top1_rate >= HNSW_MIN_TOP1_RATE, "HNSW rarely finds a stored vector's own id"
