"""What a request's items must satisfy before anything is decoded, stored or searched: ids,
labels and metadata within the limits, vectors the index can use, and the pixels a batch's images
will decode to. Each check returns or raises the error the client sees; the engine decides
whether it fails the call or only the item (skip_invalid)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np

from imagesearch.server.collection import Collection, prepared_by
from imagesearch.server.config import Limits
from imagesearch.server.errors import DeadlineExceeded, ImageSearchError, InvalidArgument, ResourceExhausted
from imagesearch.server.image_header import HeaderError, read_header
from imagesearch.server.imaging import decoded_pixels
from imagesearch.server.printable import UNPRINTABLE  # refused in ids and labels
from imagesearch.server.records import ImageItem
from imagesearch.server.vector_index import FLOAT16
from imagesearch.server.vector_input import (
    MAX_VECTOR_NORM,
    VectorInput,
    as_matrix,
    read_vector,
)

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def check_deadline(deadline: float | None, stage: str) -> None:
    """``deadline`` is a time.monotonic() value; past it, stop before doing more work."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"deadline exceeded before {stage}", reason="DEADLINE_EXCEEDED")


def utf8_size(text: str) -> int:
    """The bytes ``text`` takes on the wire and in the store, which is what a byte limit bounds."""
    return len(text.encode("utf-8", "surrogatepass"))


def check_vector(values: VectorInput, collection: Collection, field_name: str) -> np.ndarray:
    """One vector as float32, or raise the error that refuses it."""
    checked = check_vectors([values], collection, [field_name])[0]
    if isinstance(checked, ImageSearchError):
        raise checked
    return checked


def check_vectors(
    values: Sequence[VectorInput], collection: Collection, fields: Sequence[str], *, stored: bool = False
) -> list[np.ndarray | InvalidArgument]:
    """Each vector as float32, or the error that refuses it; checked as one matrix (fast for batches).
    A vector to be ``stored`` must also fit the collection's storage (float16: components within
    ±65504 once prepared; a query is never stored, so it need not)."""
    dim = collection.spec.dim
    vectors = [read_vector(v, field) for v, field in zip(values, fields, strict=True)]
    fitting = [i for i, v in enumerate(vectors) if isinstance(v, np.ndarray) and v.shape == (dim,)]
    matrix = as_matrix([vectors[i] for i in fitting], dim)  # type: ignore[arg-type]  (fitting: arrays only)
    # Squares in float32: a norm within the bound squares to at most 1e36 < 3.4e38, one past it
    # overflows to inf or lands past the bound, and a NaN or infinity makes it NaN or inf: one
    # product accepts the usual batch; only a refused row needs to know which of the two it is.
    in_range = np.einsum("ij,ij->i", matrix, matrix) <= np.float32(MAX_VECTOR_NORM**2)
    finite = np.ones(len(matrix), bool) if in_range.all() else np.isfinite(matrix).all(axis=1)
    fits = _fits_storage(matrix, collection) if stored else np.ones(len(matrix), bool)
    # A malformed encoding is refused already; a vector of the wrong size is refused below.
    verdicts = [v if isinstance(v, InvalidArgument) else None for v in vectors]
    for row, i in enumerate(fitting):  # errors are built only for the vectors they refuse
        if not finite[row]:
            verdicts[i] = InvalidArgument(
                "vector contains NaN or infinity", field=fields[i], reason="NON_FINITE_VECTOR"
            )
        elif not in_range[row]:
            verdicts[i] = InvalidArgument(
                f"vector norm is over {MAX_VECTOR_NORM:.0e}: distances to it would overflow float32, "
                "so the index could never return it (scale it down)",
                field=fields[i],
                reason="VECTOR_OUT_OF_RANGE",
            )
        elif not fits[row]:
            verdicts[i] = InvalidArgument(
                f"collection {collection.spec.name!r} stores float16, which holds components up to "
                f"±{FLOAT16_MAX:.0f}; this vector has larger ones (scale it down, or use a float32 "
                "collection)",
                field=fields[i],
                reason="VECTOR_OUT_OF_RANGE",
            )
        else:
            verdicts[i] = matrix[row]  # the stacked copy: writable even when read from packed bytes
    return [
        verdict
        if verdict is not None
        else InvalidArgument(
            f"vector has {v.size} values; collection {collection.spec.name!r} has dimension {dim}",
            field=field,
            reason="DIMENSION_MISMATCH",
        )
        for verdict, v, field in zip(verdicts, vectors, fields, strict=True)
    ]


def _fits_storage(matrix: np.ndarray, collection: Collection) -> np.ndarray:
    """Which rows the collection's storage can hold: float16 turns components past its largest
    value into infinities, which lost those vectors from their own searches and reported inf
    scores (an outside test); the other storages hold any vector within MAX_VECTOR_NORM."""
    if collection.spec.storage != FLOAT16 or len(matrix) == 0:
        return np.ones(len(matrix), bool)
    return np.abs(prepared_by(collection.metric, matrix)).max(axis=1) <= FLOAT16_MAX


def check_fields(item: ImageItem, prefix: str, limits: Limits) -> None:
    """An item's id, label and metadata within the limits (its image or vector is checked apart).
    A limit passed names itself in the message and in ``limit`` and ``value`` (docs/api.md)."""
    for name, value, limit, reason in (
        ("id", item.id, limits.max_id_length, "BAD_ID"),
        ("label", item.label, limits.max_label_length, "BAD_LABEL"),
    ):
        if len(value) > limit:
            _over_limit(
                f"{name} is {len(value)} characters",
                "characters",
                limit,
                len(value),
                f"{prefix}.{name}",
                reason,
            )
        if UNPRINTABLE.search(value):
            raise InvalidArgument(
                f"{name} must be without control characters, line separators or bidirectional controls",
                field=f"{prefix}.{name}",
                reason=reason,
            )
    if not item.metadata:
        return
    field = f"{prefix}.metadata"
    if len(item.metadata) > limits.max_metadata_entries:
        entries = len(item.metadata)
        _over_limit(f"metadata has {entries} entries", "entries", limits.max_metadata_entries, entries, field)
    size = sum(utf8_size(k) + utf8_size(v) for k, v in item.metadata.items())
    if size > limits.max_metadata_bytes:
        _over_limit(
            f"metadata is {size} bytes (UTF-8 keys and values)",
            "bytes",
            limits.max_metadata_bytes,
            size,
            field,
        )


def _over_limit(
    said: str, unit: str, limit: int, value: int, field: str, reason: str = "METADATA_TOO_LARGE"
) -> None:
    raise InvalidArgument(
        f"{said}; the limit is {limit} {unit}",
        field=field,
        reason=reason,
        metadata={"limit": str(limit), "value": str(value)},
    )


def decoded_total(contents: Iterable[bytes | None], min_side: int | None, limits: Limits) -> int:
    """The pixels these images will decode to, read from their headers. Bad headers and images
    over the per-image limit count nothing: the per-image checks refuse and name them."""
    total = 0
    for content in contents:
        if content:
            try:
                header = read_header(content)
            except HeaderError:
                continue
            if header.pixels <= limits.max_image_pixels:
                total += decoded_pixels(header, min_side)
    return total


def check_batch_pixels(
    contents: Iterable[bytes | None], min_side: int | None, field: str, limits: Limits
) -> int:
    """Refuse a call whose images would together decode to more than the per-call budget
    (AddImages' images, SearchBatch's query images).

    Each image may be within the per-image limits while 256 of them are not: 256
    highly compressed 40-megapixel PNGs fit in one message and would need 30 GB.
    Read from the headers, before anything is decoded. Returns the total.
    """
    total = decoded_total(contents, min_side, limits)
    if total > limits.max_batch_pixels:
        raise ResourceExhausted(
            f"the batch decodes to {total} pixels; the limit is {limits.max_batch_pixels} "
            "(send fewer or smaller images per call)",
            field=field,
            reason="BATCH_TOO_MANY_PIXELS",
            metadata={"limit": str(limits.max_batch_pixels), "value": str(total)},
        )
    return total
