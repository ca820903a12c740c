"""Crash-safe snapshots of a collection's FAISS index, streamed to and from disk.

Layout: magic, a length-prefixed JSON header (sequence number covered, index
layout, tombstone count), the tombstones, the FAISS index bytes, then a trailer
with the index's byte count and a CRC32 of everything after the header. The
index is written by FAISS straight into the file in 1 MiB pieces and read back
the same way, so a snapshot costs the index's memory once, not twice: no
serialised copy of the whole index is ever held in memory.

The file is written to a temp name, fsynced, renamed over the old one and the
directory fsynced, so a crash at any instant leaves either the old snapshot or
the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

from imagesearch.server.files import atomic_write
from imagesearch.server.vector_index import IndexSpec, VectorIndex

MAGIC = b"IMAGESEARCH-INDEX\x02"  # \x01 held a serialised copy; it is rebuilt from the store
TRAILER = struct.Struct("<QI4s")  # index bytes, crc32, end marker
END = b"END."
CHUNK = 1 << 20


class SnapshotError(RuntimeError):
    """The snapshot is missing, damaged or belongs to another collection layout."""


class EarlierSnapshot(SnapshotError):
    """A snapshot of an earlier version, which recorded no history token: rebuilt once, as an
    upgrade's expected step rather than a fault."""


class _CrcWriter:
    """FAISS's write callback: pass bytes to the file, keeping their count and CRC."""

    def __init__(self, handle: BinaryIO, crc: int) -> None:
        self.handle, self.crc, self.count = handle, crc, 0

    def __call__(self, data: bytes) -> int:
        self.handle.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.count += len(data)
        return len(data)


def write_snapshot(path: Path, index: VectorIndex, seq: int, store: str, commit: bytes) -> None:
    """Persist ``index`` as covering the store's writes up to ``seq``; ``store`` is that store's
    identity and ``commit`` the token it keeps for ``seq`` (``CollectionStore.snapshot_token``),
    both checked when the snapshot is loaded."""
    dead = index.tombstones.tobytes()
    header = json.dumps(
        {
            "seq": seq,
            "store": store,
            "commit": commit.hex(),
            "kind": index.spec.kind,
            "dim": index.spec.dim,
            "metric": index.spec.metric.name,
            "tombstones": len(dead) // 8,
        }
    ).encode()

    def write(handle: BinaryIO) -> None:
        handle.write(MAGIC + struct.pack("<I", len(header)) + header + dead)
        sink = _CrcWriter(handle, zlib.crc32(dead))
        faiss.write_index(index.faiss_index, faiss.PyCallbackIOWriter(sink, CHUNK))
        handle.write(TRAILER.pack(sink.count, sink.crc, END))

    atomic_write(path, write)


def _read_exact(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise SnapshotError("snapshot is truncated")
    return data


def _verify_body(handle: BinaryIO, start: int, end: int) -> int:
    """CRC32 of the file between ``start`` and ``end``, read in pieces."""
    handle.seek(start)
    crc, remaining = 0, end - start
    while remaining:
        piece = _read_exact(handle, min(CHUNK, remaining))
        crc = zlib.crc32(piece, crc)
        remaining -= len(piece)
    return crc


def read_snapshot(
    path: Path,
    spec: IndexSpec,
    store: str,
    last_seq: int,
    commit_at: Callable[[int], bytes | None],
    learnt: np.ndarray | None = None,
) -> tuple[VectorIndex, int]:
    """Load a snapshot; SnapshotError if it is absent, damaged, does not match ``spec``, or is not
    a past state of this store: another store's, newer than its last write ``last_seq`` (the store
    was restored from an older copy), or of another history of it (the token of the change it
    covers last is not the store's, ``commit_at``: restored from another backup), or made by a
    version that recorded no such token: one of another history passed as the store's (an outside
    test), so it is rebuilt once. ``learnt``:
    what the index learnt, kept by the store, for an index snapshotted before it trained
    (``VectorIndex``)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115  closed below
    except FileNotFoundError as exc:
        raise SnapshotError("no snapshot") from exc
    except OSError as exc:  # a directory in its place, no permission: rebuilt from the store like any damage
        raise SnapshotError(f"snapshot cannot be read: {exc}") from exc
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if handle.read(len(MAGIC)) != MAGIC:
            raise SnapshotError("not an index snapshot of this version (bad magic)")
        try:
            (header_len,) = struct.unpack("<I", _read_exact(handle, 4))
            header = json.loads(_read_exact(handle, header_len))
            dead_len = 8 * int(header["tombstones"])
            body_start = handle.tell()
            handle.seek(size - TRAILER.size)
            index_bytes, crc, end = TRAILER.unpack(_read_exact(handle, TRAILER.size))
        except (struct.error, ValueError, KeyError, OSError) as exc:
            raise SnapshotError(f"damaged snapshot header: {exc}") from exc
        if end != END or body_start + dead_len + index_bytes + TRAILER.size != size:
            raise SnapshotError("snapshot is truncated or has trailing garbage")
        if _verify_body(handle, body_start, size - TRAILER.size) != crc:
            raise SnapshotError("snapshot checksum mismatch (corrupted file)")
        if (header["kind"], header["dim"], header["metric"]) != (spec.kind, spec.dim, spec.metric.name):
            raise SnapshotError("snapshot was made for a different index layout")
        if header.get("store", store) != store:
            raise SnapshotError("snapshot was made from another store (copied from another collection?)")
        if int(header["seq"]) > last_seq:
            raise SnapshotError(
                f"snapshot covers writes up to {header['seq']} but the store's last is {last_seq} "
                "(the store was restored from an older copy?)"
            )
        if not header.get("commit"):
            raise EarlierSnapshot(
                "snapshot made before snapshots recorded the history they cover (an earlier version): "
                "it cannot show it is this store's"
            )
        if (commit_at(int(header["seq"])) or b"").hex() != header["commit"]:
            raise SnapshotError(
                f"snapshot covers writes up to {header['seq']}, which are not the store's own (the store "
                "was restored from a copy of another point in its history?)"
            )
        handle.seek(body_start)
        tombstones = _read_exact(handle, dead_len)
        try:
            loaded = faiss.read_index(faiss.PyCallbackIOReader(handle.read, CHUNK))
            index = VectorIndex(spec, loaded, np.frombuffer(tombstones, dtype=np.int64), learnt)
            index.check_layout()
        except (RuntimeError, ValueError) as exc:  # FAISS raises RuntimeError subclasses of its own
            raise SnapshotError(f"FAISS could not read the snapshot: {exc}") from exc
    return index, int(header["seq"])
