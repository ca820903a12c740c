"""Chunked streaming upload of image files through AddImagesStream.

Planned up front (every file stat-ed, chunk boundaries fixed by count and bytes)
and read lazily, so an import of any size needs one chunk of memory and fails
before sending anything when a file is missing or too large.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from imagesearch.client.errors import MESSAGE_TOO_LARGE, ImageSearchError, from_rpc_error
from imagesearch.client.types import AddResult, PathLike
from imagesearch.v1 import image_search_service_pb2 as pb

# Room left in a chunk for the collection name, field tags and length prefixes.
_CHUNK_HEADROOM = 1024
_ITEM_OVERHEAD = 16

E = TypeVar("E", bound=BaseException)

Progress = Callable[[int, int], None]
"""``progress(sent, total)``: images handed to gRPC so far, out of all images of the upload."""

PerFile = Sequence[str] | Callable[[Path], str] | None
"""A value per file: a sequence parallel to the paths, a function of the path, or None (empty)."""


NOTHING_ADDED = AddResult(ids=(), results=(), added_count=0, chunk_count=0)
"""What uploading no files adds (answered locally, without a call)."""


@dataclass(frozen=True)
class _File:
    path: Path
    size: int
    id: str
    label: str


def _per_file(values: PerFile, paths: Sequence[Path], what: str) -> list[str]:
    """One ``str`` per path. Anything else is refused, naming the first: gRPC took ``b"a"`` for
    ``"a"`` (so two files escaped the duplicate check) and failed an int mid-upload with a bare
    TypeError (an outside test)."""
    if values is None:
        return [""] * len(paths)
    if isinstance(values, str | bytes):
        raise TypeError(f"{what} must be a sequence or a function of the path, not a single string")
    if callable(values):
        values = [values(path) for path in paths]
    elif len(values) != len(paths):
        raise ValueError(f"{what} has {len(values)} entries for {len(paths)} paths")
    for position, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(
                f"{what}[{position}] is {type(value).__name__} {value!r}, not str (for {paths[position]}); "
                "nothing was sent"
            )
    return list(values)


def _check_distinct(ids: Sequence[str], paths: Sequence[Path]) -> None:
    """ValueError naming the first id given to two files. The server refuses an id twice in one
    request, but an upload is many: whether the two met in one chunk decided between a refusal and
    the second file being skipped as already stored (an outside test)."""
    first: dict[str, Path] = {}
    for image_id, path in zip(ids, paths, strict=True):
        if image_id and first.setdefault(image_id, path) is not path:
            raise ValueError(
                f"ids: {image_id!r} is given to both {first[image_id]} and {path}; nothing was sent"
            )


def server_limit(failure: BaseException, reason: str, ours: int) -> int | None:
    """The limit a server named when it refused an upload for ``reason`` (BATCH_TOO_LARGE: its
    ``max_batch_size``; MESSAGE_TOO_LARGE: its ``max_message_bytes``), if below ``ours``, else
    None. ``add_files`` then sends again within it: a server with a lowered limit refused every
    `imagesearch add` and `eval` at their defaults, for good, and "run the same command again"
    could not help (an outside test)."""
    if not isinstance(failure, ImageSearchError) or failure.reason != reason:
        return None
    limit = failure.details.metadata.get("limit", "")
    return int(limit) if limit.isdigit() and 0 < int(limit) < ours else None


class Upload:
    """A chunked AddImagesStream upload of files, planned up front and read lazily.

    Planning stats every file first, so a missing or oversized file fails before
    anything is sent. Chunks hold at most ``batch_size`` images and stay below the
    message limit. Iterating yields the stream's messages; an error while
    iterating (a file unreadable mid-stream, a failing ``progress`` callback, a
    KeyboardInterrupt from it) is kept in ``error`` and ends the stream cleanly:
    cancelling it would make the server drop the chunks gRPC had taken but not yet
    delivered. The client then raises that error, saying what the server stored
    (``result``). Whatever the client raises once the upload started carries
    ``upload_ids``, so the upload can be finished with each image stored once.
    """

    def __init__(
        self,
        paths: Iterable[PathLike],
        *,
        labels: PerFile,
        ids: PerFile,
        collection: str | None,
        skip_invalid: bool,
        skip_existing: bool,
        batch_size: int,
        max_message_bytes: int,
        progress: Progress | None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        files = [Path(p) for p in paths]
        label_list = _per_file(labels, files, "labels")
        # Every image gets its id before anything is sent, so a retry can name the same images:
        # with skip_existing, those already stored are left as they are (stored once, whatever failed).
        id_list = _per_file(ids, files, "ids") if ids is not None else [uuid.uuid4().hex for _ in files]
        _check_distinct(id_list, files)
        budget = max_message_bytes - _CHUNK_HEADROOM
        self.files = [
            _File(path, _file_size(path), file_id, label)
            for path, file_id, label in zip(files, id_list, label_list, strict=True)
        ]
        self.max_message_bytes = max_message_bytes
        over = self.first_over(max_message_bytes)
        if over is not None:
            raise ValueError(
                f"{over[0].path} needs {over[1]} bytes, more than one message may carry ({budget}); "
                "raise max_message_bytes on the client and the server, or shrink the image"
            )
        entries = [_entry_bytes(f) for f in self.files]
        self.collection = collection or ""
        self.skip_invalid = skip_invalid
        self.skip_existing = skip_existing or ids is None  # our own fresh ids cannot clash
        self.chunks = _chunk_sizes(entries, batch_size, budget)
        self.progress = progress
        self.batch_size = batch_size
        self.sent = 0
        self.error: BaseException | None = None

    @property
    def total(self) -> int:
        return len(self.files)

    def in_smaller_chunks(self, failure: BaseException) -> Upload | None:
        """This upload again, within the limits of a server that refused it as BATCH_TOO_LARGE or
        MESSAGE_TOO_LARGE (``server_limit``), with the same ids and options, when that stores each
        image once: the refusal stored nothing, or every id is fixed and already-stored ones are
        skipped. None otherwise, for any other failure, and when a file alone is over the server's
        message limit (``failure`` then names it)."""
        batch_size = server_limit(failure, "BATCH_TOO_LARGE", self.batch_size)
        message_bytes = server_limit(failure, MESSAGE_TOO_LARGE, self.max_message_bytes)
        stored = getattr(getattr(failure, "details", None), "stored", None)
        if batch_size is None and message_bytes is None:
            return None
        if message_bytes is not None and isinstance(failure, ImageSearchError):
            over = self.first_over(message_bytes)
            if over is not None:
                failure.message += (
                    f". {over[0].path} alone needs {over[1]} bytes: shrink it, or raise the server's limit"
                )
                return None
        nothing_stored = stored is not None and not stored.added_count  # the first chunk was refused
        if not nothing_stored and not (all(self.ids) and self.skip_existing):
            # Some chunks may be stored: sent again, images the server named would be stored twice,
            # and without skip_existing the caller's own would fail as taken.
            return None
        return Upload(
            [file.path for file in self.files],
            labels=[file.label for file in self.files],
            ids=list(self.ids),
            collection=self.collection or None,
            skip_invalid=self.skip_invalid,
            # The caller's choice: turned on, an id another image already held was skipped on a
            # server with a lower limit and refused on any other (an outside test).
            skip_existing=self.skip_existing,
            batch_size=batch_size or self.batch_size,
            max_message_bytes=message_bytes or self.max_message_bytes,
            progress=self.progress,
        )

    def first_over(self, max_message_bytes: int) -> tuple[_File, int] | None:
        """The first file that no message of ``max_message_bytes`` can carry, with its bytes."""
        budget = max_message_bytes - _CHUNK_HEADROOM
        return next(((f, size) for f in self.files if (size := _entry_bytes(f)) > budget), None)

    def __iter__(self) -> Iterator[pb.AddImagesStreamRequest]:
        # Ending the iterator closes the stream normally: every chunk sent is committed and the
        # server answers with what it stored, which the client reports with this error. A
        # KeyboardInterrupt from ``progress`` too: escaping gRPC's sending thread, it killed that
        # thread and left the call waiting for chunks that never came (an outside test).
        try:
            yield from self._messages()
        except GeneratorExit:  # the iterator is being closed: not an error of the upload
            raise
        except BaseException as error:
            self.error = error

    def _messages(self) -> Iterator[pb.AddImagesStreamRequest]:
        start = 0
        for size in self.chunks:
            images = [_file_input(f) for f in self.files[start : start + size]]
            yield pb.AddImagesStreamRequest(
                collection=self.collection,
                images=images,
                skip_invalid=self.skip_invalid,
                skip_existing=self.skip_existing,
            )
            start += size
            self.sent = start
            if self.progress is not None:
                self.progress(self.sent, self.total)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(f.id for f in self.files)

    def result(self, response: pb.AddImagesStreamResponse) -> AddResult:
        """What the upload stored; or, when a local error ended the stream early, that error, saying
        what the server stored before it (``error.stored``)."""
        stored = AddResult.from_proto(response)
        if self.error is None:
            return stored
        self.error.stored = stored  # type: ignore[attr-defined]
        raise self._resumable(
            self.error,
            f"{stored.added_count} of {self.total} images were stored before this error (error.stored).",
        )

    def call_failed(self, error: grpc.RpcError, request_id: str) -> BaseException:
        """What to raise for a failed call: the local error that broke the stream if there was one
        (the call then failed too), else the call's ImageSearchError, saying what was stored."""
        if self.error is not None:
            return self._resumable(
                self.error,
                f"{self.sent} of {self.total} images were handed to gRPC before this error, then the call failed "
                "as well: some may be stored.",
            )
        failure = from_rpc_error(error, request_id=request_id)
        stored = failure.details.stored
        count = stored.added_count if stored else "an unknown number"
        return self._resumable(
            failure, f"{count} of {self.total} images were stored before this error (error.details.stored)."
        )

    def interrupted(self, error: BaseException) -> BaseException:
        """``error`` (a KeyboardInterrupt, a cancelled task: the same object, its type unchanged)
        carrying ``upload_ids``: some chunks may be stored, and without the ids an upload that made
        its own could not be finished without storing them twice (an outside test)."""
        return self._resumable(
            error,
            f"the upload was interrupted after {self.sent} of {self.total} images were handed to gRPC: "
            "some of them may be stored.",
        )

    def _resumable(self, error: E, what: str) -> E:
        """``error`` with the upload's ids (``upload_ids``) and a note saying how to finish the upload."""
        error.upload_ids = self.ids  # type: ignore[attr-defined]
        error.add_note(
            f"imagesearch: {what} To finish, call add_files again with ids=error.upload_ids and "
            "skip_existing=True: images already stored are left as they are."
        )
        return error


def _file_size(path: Path) -> int:
    size = path.stat().st_size  # FileNotFoundError / PermissionError before anything is sent
    if not path.is_file():
        raise IsADirectoryError(f"not a regular file: {path}")
    return size


def _file_input(file: _File) -> pb.ImageInput:
    content = file.path.read_bytes()
    if len(content) != file.size:  # the chunk was sized for the planned bytes
        raise OSError(f"{file.path} changed size during the upload ({file.size} -> {len(content)} bytes)")
    return pb.ImageInput(id=file.id, content=content, label=file.label, metadata={"path": str(file.path)})


def _entry_bytes(file: _File) -> int:
    """Upper bound of the file's serialized ImageInput inside a chunk."""
    shell = pb.ImageInput(id=file.id, label=file.label, metadata={"path": str(file.path)})
    return shell.ByteSize() + file.size + _ITEM_OVERHEAD


def _chunk_sizes(entry_bytes: Sequence[int], batch_size: int, budget: int) -> list[int]:
    """Greedy split into consecutive chunks of at most ``batch_size`` entries and ``budget`` bytes."""
    chunks: list[int] = []
    count = used = 0
    for size in entry_bytes:
        if count and (count == batch_size or used + size > budget):
            chunks.append(count)
            count = used = 0
        count += 1
        used += size
    if count:
        chunks.append(count)
    return chunks
