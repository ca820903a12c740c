"""Crash-safe file writes: readers see the old file or the whole new one, never half of one.

The one writer for every file the project replaces in place: index snapshots,
ONNX models and their sidecars.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"
TEMP_PATTERN = f".*.*{TEMP_SUFFIX}"  # atomic_write's temp files: .<target name>.<random><suffix>


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], mode: int = 0o644) -> None:
    """Run ``write`` on a fresh temp file beside ``path``, fsync it, rename it over ``path`` and
    fsync the directory. On any failure the temp file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600; these files are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def remove_temp_files(directory: Path) -> list[tuple[Path, int]]:
    """Delete the temp files atomic_write left in ``directory`` when the process died mid-write
    (``kill -9`` during a snapshot leaves an index-sized one); returns each with its size.

    Call it only while no write can be running there (at start-up, under the data directory's
    lock): a live write's temp file looks the same.
    """
    removed = []
    for path in sorted(directory.glob(TEMP_PATTERN)):
        if path.is_file():
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            removed.append((path, size))
    return removed
