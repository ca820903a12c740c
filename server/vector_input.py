"""Vectors as clients send them: a list of floats, or the same floats packed as bytes.

``FloatVector.float32_le`` exists because a list of floats is the expensive form
on both ends: a Python client builds one float object per value and the server
converts each back. Packed bytes are one copy on the client and a zero-copy view
here. Reading either form has one home, so every RPC that takes a vector accepts
both and refuses a malformed one with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imagesearch.server.errors import InvalidArgument

# Squared L2 distances and inner products of vectors up to this norm stay far inside float32
# (|a - b|^2 <= 4e36 < 3.4e38), so FAISS can rank them; beyond it a stored vector is unreachable.
MAX_VECTOR_NORM = 1e18


def within_index_range(vectors: np.ndarray) -> bool:
    """Whether every row is finite with a norm FAISS can compute distances for."""
    rows = np.atleast_2d(vectors).astype(np.float64)
    return bool(np.all(np.isfinite(rows)) and np.all(np.einsum("ij,ij->i", rows, rows) <= MAX_VECTOR_NORM**2))


LITTLE_ENDIAN_FLOAT32 = np.dtype("<f4")


class PackedVector:
    """``float32_le`` bytes as received; ``with_values`` records that ``values`` was set as well.
    A plain slotted class: one is made per vector of a batch, and a frozen dataclass's ``__init__``
    costs several times as much."""

    __slots__ = ("data", "with_values")

    def __init__(self, data: bytes, with_values: bool = False) -> None:
        self.data = data
        self.with_values = with_values


VectorInput = Sequence[float] | np.ndarray | PackedVector


def vector_input(values: Sequence[float], float32_le: bytes) -> VectorInput:
    """The vector a FloatVector message carries, in the form it was sent (read by ``read_vector``)."""
    if float32_le:
        return PackedVector(float32_le, with_values=len(values) > 0)
    return values


def read_vector(value: VectorInput, field: str) -> np.ndarray | InvalidArgument:
    """The vector as float32 (a view of packed bytes, no copy), or the error that refuses its encoding.

    The error is returned, not raised, so that one malformed vector in a batch fails alone.
    """
    if not isinstance(value, PackedVector):
        return np.asarray(value, dtype=np.float32)
    if value.with_values:
        return InvalidArgument(
            "set the vector's values or float32_le, not both", field=field, reason="BAD_VECTOR_ENCODING"
        )
    if len(value.data) % LITTLE_ENDIAN_FLOAT32.itemsize:
        return InvalidArgument(
            f"float32_le has {len(value.data)} bytes, not a multiple of 4 (one little-endian float32 per value)",
            field=f"{field}.float32_le",
            reason="BAD_VECTOR_ENCODING",
        )
    return np.frombuffer(value.data, dtype=LITTLE_ENDIAN_FLOAT32)


def as_matrix(rows: Sequence[np.ndarray], dim: int) -> np.ndarray:
    """Float32 vectors of ``dim`` values each as one new (len(rows), dim) matrix, by one
    concatenation: ``np.stack`` makes a view of every row first (256 rows of 1280, best of 100:
    0.108 against 0.144 ms, bench/bench_ingest_stages.py). Rows of any other size are refused,
    not regrouped."""
    if any(row.shape != (dim,) for row in rows):
        raise ValueError(f"every row must have shape ({dim},)")
    if not rows:
        return np.zeros((0, dim), np.float32)
    return np.concatenate(rows, dtype=np.float32).reshape(len(rows), dim)
