"""FloatVector's two encodings read the same, and a malformed packed vector is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from imagesearch.server.errors import InvalidArgument
from imagesearch.server.vector_input import PackedVector, as_matrix, read_vector, vector_input


def test_packed_and_listed_values_read_the_same_floats() -> None:
    values = np.array([0.1, -2.5, 3e-39, 1e30], dtype=np.float32)  # a subnormal and a large value too
    listed = read_vector(vector_input(values.tolist(), b""), "vector")
    packed = read_vector(vector_input([], values.astype("<f4").tobytes()), "vector")
    assert isinstance(listed, np.ndarray) and isinstance(packed, np.ndarray)
    assert packed.dtype == np.float32 and np.array_equal(listed, packed) and np.array_equal(packed, values)


def test_packed_bytes_are_read_without_a_copy() -> None:
    data = np.arange(4, dtype="<f4").tobytes()
    packed = read_vector(PackedVector(data), "vector")
    assert isinstance(packed, np.ndarray) and not packed.flags.owndata


@pytest.mark.parametrize(
    ("value", "field", "text"),
    [
        (PackedVector(b"\0" * 6), "images[2].vector.float32_le", "6 bytes, not a multiple of 4"),
        (PackedVector(b"\0" * 4, with_values=True), "images[2].vector", "not both"),
    ],
    ids=["odd-length", "both-forms"],
)
def test_malformed_packed_vectors_are_returned_as_errors(value: PackedVector, field: str, text: str) -> None:
    error = read_vector(value, "images[2].vector")
    assert isinstance(error, InvalidArgument)
    assert (error.field, error.reason) == (field, "BAD_VECTOR_ENCODING") and text in error.message


def test_an_empty_message_reads_as_an_empty_vector() -> None:
    """Neither form set: zero values, which the engine refuses as a dimension mismatch."""
    empty = read_vector(vector_input([], b""), "vector")
    assert isinstance(empty, np.ndarray) and empty.size == 0


def test_as_matrix_equals_np_stack_and_is_a_writable_copy() -> None:
    rows = [np.frombuffer(np.arange(i, i + 4, dtype="<f4").tobytes(), dtype="<f4") for i in range(5)]
    matrix = as_matrix(rows, 4)
    assert matrix.dtype == np.float32 and matrix.flags.writeable and matrix.flags.c_contiguous
    assert np.array_equal(matrix, np.stack(rows))
    assert as_matrix([], 7).shape == (0, 7)


def test_as_matrix_refuses_rows_that_would_regroup() -> None:
    """Rows of 3 and 5 values hold 8, which a reshape to (2, 4) would silently regroup."""
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        as_matrix([np.zeros(3, np.float32), np.zeros(5, np.float32)], 4)
