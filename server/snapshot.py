"""Crash-safe snapshots of a collection's FAISS index.

One file holds the index, its tombstones and the store sequence number it
covers, behind a magic, a JSON header and a CRC. It is written to a temp file,
fsynced, renamed over the old one and the directory fsynced, so a crash at any
instant leaves either the old snapshot or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from imagesearch.server.vector_index import IndexSpec, VectorIndex

MAGIC = b"IMAGESEARCH-INDEX\x01"


class SnapshotError(RuntimeError):
    """The snapshot is missing, damaged or belongs to another collection layout."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, chunks: list[bytes]) -> None:
    """Write ``chunks`` to ``path`` so that readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_snapshot(path: Path, index: VectorIndex, seq: int) -> None:
    data, tombstones = index.serialize()
    dead = tombstones.tobytes()
    header = json.dumps(
        {
            "seq": seq,
            "kind": index.spec.kind,
            "dim": index.spec.dim,
            "metric": index.spec.metric.name,
            "index_bytes": len(data),
            "tombstones": len(tombstones),
            "crc32": zlib.crc32(dead + data),
        }
    ).encode()
    atomic_write(path, [MAGIC, struct.pack("<I", len(header)), header, dead, data])


def read_snapshot(path: Path, spec: IndexSpec) -> tuple[VectorIndex, int]:
    """Load a snapshot; SnapshotError if it is absent, damaged or does not match ``spec``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise SnapshotError("no snapshot") from exc
    if not raw.startswith(MAGIC):
        raise SnapshotError("not an index snapshot (bad magic)")
    try:
        offset = len(MAGIC)
        (header_len,) = struct.unpack("<I", raw[offset : offset + 4])
        offset += 4
        header = json.loads(raw[offset : offset + header_len])
        offset += header_len
        dead_len = 8 * header["tombstones"]
        body = raw[offset : offset + dead_len + header["index_bytes"]]
    except (struct.error, ValueError, KeyError) as exc:
        raise SnapshotError(f"damaged snapshot header: {exc}") from exc
    if len(body) != dead_len + header["index_bytes"] or zlib.crc32(body) != header["crc32"]:
        raise SnapshotError("snapshot checksum mismatch (truncated or corrupted file)")
    if (header["kind"], header["dim"], header["metric"]) != (spec.kind, spec.dim, spec.metric.name):
        raise SnapshotError("snapshot was made for a different index layout")
    tombstones = np.frombuffer(body[:dead_len], dtype=np.int64)
    try:
        index = VectorIndex.deserialize(spec, body[dead_len:], tombstones)
    except Exception as exc:  # FAISS raises RuntimeError subclasses of its own
        raise SnapshotError(f"FAISS could not read the snapshot: {exc}") from exc
    return index, int(header["seq"])
