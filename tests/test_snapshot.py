"""Index snapshots below the gRPC layer: round trip, every kind of damage refused (so the
collection rebuilds from its store), and a write that costs no second copy of the index."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from imagesearch.plugins.metrics import COSINE, L2
from imagesearch.plugins.types import FLAT, HNSW, IVF
from imagesearch.server.snapshot import MAGIC, EarlierSnapshot, SnapshotError, read_snapshot, write_snapshot
from imagesearch.server.vector_index import IndexSpec, VectorIndex
from tests.support.process import REPO

DIM = 8


def filled(kind: str) -> VectorIndex:
    spec = IndexSpec(kind=kind, dim=DIM, metric=L2, nlist=2, nprobe=2, train_size=20, hnsw_m=4)
    index = VectorIndex(spec)
    rng = np.random.default_rng(0)
    index.add(np.arange(10, 60), rng.normal(size=(50, DIM)).astype(np.float32))
    index.remove(np.array([11, 12]))
    return index


STORE = "c0ffee"  # a store identity
TOKEN = b"\x01" * 8  # the token the store keeps for the snapshot's last change


def kept(seq: int) -> bytes:  # the store's tokens, as CollectionStore.commit_token gives them
    return TOKEN


@pytest.mark.parametrize("kind", [FLAT, IVF, HNSW])
def test_round_trip_keeps_ids_vectors_tombstones_and_seq(tmp_path, kind):
    index = filled(kind)
    write_snapshot(tmp_path / "s", index, seq=77, store=STORE, commit=TOKEN)
    loaded, seq = read_snapshot(tmp_path / "s", index.spec, STORE, 77, kept)
    assert seq == 77 and loaded.size == index.size == 48 and loaded.trained == index.trained
    assert sorted(loaded.ids().tolist()) == sorted(index.ids().tolist())
    assert loaded.tombstones.tolist() == index.tombstones.tolist()
    query = np.random.default_rng(1).normal(size=(3, DIM)).astype(np.float32)
    assert np.array_equal(loaded.search(query, 5)[1], index.search(query, 5)[1])


def damaged(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    elif how == "flipped":
        data[len(data) // 2] ^= 0xFF
    elif how == "trailing":
        data += b"x"
    elif how == "old-version":
        data[len(MAGIC) - 1] = 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("how", "says"),
    [("truncated", "truncated"), ("flipped", "checksum"), ("trailing", "trailing"), ("old-version", "magic")],
)
def test_damage_is_refused_never_loaded(tmp_path, how, says):
    index = filled(FLAT)
    write_snapshot(tmp_path / "s", index, seq=5, store=STORE, commit=TOKEN)
    damaged(tmp_path / "s", how)
    with pytest.raises(SnapshotError, match=says):
        read_snapshot(tmp_path / "s", index.spec, STORE, 5, kept)


def test_a_snapshot_of_another_layout_is_refused(tmp_path):
    index = filled(FLAT)
    write_snapshot(tmp_path / "s", index, seq=5, store=STORE, commit=TOKEN)
    for other in (
        IndexSpec(kind=FLAT, dim=DIM, metric=COSINE),
        IndexSpec(kind=HNSW, dim=DIM, metric=L2),
        IndexSpec(kind=FLAT, dim=DIM + 1, metric=L2),
    ):
        with pytest.raises(SnapshotError, match="different index layout"):
            read_snapshot(tmp_path / "s", other, STORE, 5, kept)


def test_an_ivf_snapshot_of_the_old_idmap_layout_is_refused(tmp_path):
    """Snapshots of IndexIDMap2-around-IVF carry ids that removals scrambled: rebuild, never load."""
    index = filled(IVF)
    legacy = faiss.IndexIDMap2(faiss.IndexIVFFlat(faiss.IndexFlatL2(DIM), DIM, 2))
    with pytest.raises(ValueError, match="does not fit"):
        VectorIndex(index.spec, legacy).check_layout()


def test_a_snapshot_of_another_store_or_newer_than_the_store_is_refused(tmp_path):
    """A snapshot copied from another collection, or left beside a store restored from an older
    copy (it covers writes the store does not have), is not this store's past: rebuild instead."""
    index = filled(FLAT)
    write_snapshot(tmp_path / "s", index, seq=5, store=STORE, commit=TOKEN)
    with pytest.raises(SnapshotError, match="another store"):
        read_snapshot(tmp_path / "s", index.spec, "other-store", 5, kept)
    with pytest.raises(SnapshotError, match="restored from an older copy"):
        read_snapshot(tmp_path / "s", index.spec, STORE, 4, kept)
    assert read_snapshot(tmp_path / "s", index.spec, STORE, 9, kept)[1] == 5  # older than the store: replayed


def test_missing_snapshot(tmp_path):
    with pytest.raises(SnapshotError, match="no snapshot"):
        read_snapshot(tmp_path / "absent", filled(FLAT).spec, STORE, 0, kept)


MEMORY_PROBE = """
import numpy as np
from pathlib import Path
from imagesearch.plugins.metrics import L2
from imagesearch.server.snapshot import read_snapshot, write_snapshot
from imagesearch.server.vector_index import IndexSpec, VectorIndex

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def peak_extra(action):
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    action()
    return status("VmHWM:") - before

spec = IndexSpec(kind="flat", dim=1024, metric=L2)
index = VectorIndex(spec)
rng = np.random.default_rng(0)
for start in range(0, 40_000, 5_000):
    index.add(np.arange(start, start + 5_000), rng.random((5_000, 1024), dtype=np.float32))
size = 40_000 * 1024 * 4
path = Path({path!r})
write = peak_extra(lambda: write_snapshot(path, index, 1, "store", b"t"))
del index
read = peak_extra(lambda: read_snapshot(path, spec, "store", 1, lambda seq: b"t"))
print(size, write, read)
"""


@pytest.mark.slow
def test_a_snapshot_costs_a_small_fraction_of_the_index_in_extra_memory(tmp_path):
    """Writing streams the index to disk: extra memory stays under 10% of its size (it was 2x).
    Reading builds the index once (1x) plus small buffers."""
    script = textwrap.dedent(MEMORY_PROBE).replace("{path!r}", repr(str(tmp_path / "s")))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    size, write, read = (int(v) for v in done.stdout.split())
    assert write < 0.1 * size, f"writing a {size >> 20} MB index took {write >> 20} MB more at its peak"
    assert read < 1.1 * size, f"reading a {size >> 20} MB index took {read >> 20} MB at its peak"


def test_a_snapshot_of_another_history_or_without_one_is_refused(tmp_path):
    """The store keeps a token for each change; a snapshot records its last change's. Another
    history of the store (a second backup restored) has another, and a snapshot of a version
    that recorded none cannot show which history it covers: one passed another's as the store's
    (an outside test), so it is rebuilt once."""
    import json
    import struct

    index = filled(FLAT)
    write_snapshot(tmp_path / "s", index, seq=5, store=STORE, commit=TOKEN)
    with pytest.raises(SnapshotError, match="not the store's own"):
        read_snapshot(tmp_path / "s", index.spec, STORE, 5, lambda seq: b"\x02" * 8)
    with pytest.raises(SnapshotError, match="not the store's own"):
        read_snapshot(tmp_path / "s", index.spec, STORE, 5, lambda seq: None)
    data = (tmp_path / "s").read_bytes()
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    header = json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + length])
    del header["commit"]  # as the previous version wrote it
    older = json.dumps(header).encode()
    rest = data[len(MAGIC) + 4 + length :]
    (tmp_path / "s").write_bytes(MAGIC + struct.pack("<I", len(older)) + older + rest)
    with pytest.raises(EarlierSnapshot, match="before snapshots recorded the history"):  # logged at INFO
        read_snapshot(tmp_path / "s", index.spec, STORE, 5, kept)
