"""Import a folder-per-class image tree (``DIR/<label>/<files>``) into a collection.

Each file's id is its path relative to the folder, so running the import again
(after an interruption, a crash, or on a folder that grew) stores every image
exactly once: what is already stored is skipped by the server, not duplicated.
Problems with single files are collected and reported, never abort the run.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imagesearch.client._upload import Progress, server_limit
from imagesearch.client.client import ImageSearchClient
from imagesearch.client.errors import MESSAGE_TOO_LARGE, ImageSearchError
from imagesearch.client.types import AddResult, PathLike

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""File name endings (any case) sent as images; every other file is listed as not an image."""

# Room in one message for a file's id, label and path next to its bytes: paths and ids stay well
# below this, so a file that passes this check never trips add_files' own (aborting) size check.
_MESSAGE_MARGIN = 16 * 1024


@dataclass(frozen=True)
class FolderImage:
    """One image file found in the folder, with the id and label it is stored under."""

    path: Path
    id: str
    label: str


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds: image files (sorted by id) and files that are not images."""

    directory: Path
    images: tuple[FolderImage, ...]
    not_images: tuple[Path, ...]

    @property
    def labels(self) -> Counter[str]:
        """Images per label ("" for files directly in the folder)."""
        return Counter(image.label for image in self.images)


@dataclass(frozen=True)
class FailedFile:
    """An image that was not stored: ``reason`` is the server's (e.g. IMAGE_UNDECODABLE) or a local one."""

    path: Path
    id: str
    reason: str
    message: str


@dataclass(frozen=True)
class FolderImport:
    """The outcome of ``add_folder``: counts of stored and already stored images, and what failed."""

    directory: Path
    stored: int
    already_stored: int
    failed: tuple[FailedFile, ...]
    not_images: tuple[Path, ...]

    @property
    def ok(self) -> bool:
        """True when every image is now in the collection (non-image files do not count)."""
        return not self.failed


def scan_folder(directory: PathLike) -> FolderScan:
    """List a folder's files recursively, skipping hidden ones (``.DS_Store``, ``.git/``).

    An image's label is the name of the folder directly under ``directory`` that holds
    it ("" for files directly in ``directory``); its id is its relative path with
    forward slashes. Raises ``NotADirectoryError`` / ``FileNotFoundError`` for a bad folder.
    """
    root = Path(directory).absolute()
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {directory}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {directory}")
    images: list[FolderImage] = []
    not_images: list[Path] = []
    for path in _files(root):
        relative = path.relative_to(root)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            label = relative.parts[0] if len(relative.parts) > 1 else ""
            images.append(FolderImage(path, relative.as_posix(), label))
        else:
            not_images.append(path)
    return FolderScan(root, tuple(images), tuple(not_images))


def _files(root: Path) -> list[Path]:
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found += (Path(folder, name) for name in names if not name.startswith("."))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def add_folder(
    client: ImageSearchClient,
    directory: PathLike | FolderScan,
    *,
    collection: str | None = None,
    progress: Progress | None = None,
    batch_size: int = 32,
) -> FolderImport:
    """Store every image of ``directory`` (or of a ``scan_folder`` result) once, labelled by its folder.

    Streams the images with ``client.add_files`` (``skip_existing`` and ``skip_invalid``):
    images already stored under their id are counted in ``already_stored``, images the
    server rejects (or that are unreadable or too large to send) are listed in ``failed``
    with a reason, files that are not images by extension are listed in ``not_images``
    and not sent. ``progress(sent, total)`` is passed on to ``add_files``. A server or
    connection error raises the client's ``ImageSearchError``; running the import
    again finishes it.
    """
    scan = directory if isinstance(directory, FolderScan) else scan_folder(directory)
    limit, whose = client.max_message_bytes, "the client's"
    while True:  # once more at most: within a server's lower message limit
        local_failures = {
            image.id: failure
            for image in scan.images
            if (failure := _local_problem(image, limit, whose)) is not None
        }
        sendable = [image for image in scan.images if image.id not in local_failures]
        try:
            result = add_labelled(
                client, sendable, collection=collection, progress=progress, batch_size=batch_size
            )
        except ImageSearchError as refused:
            # A file alone over the server's max_message_bytes: listed as too large, the rest sent
            # again (the ids are ours and skip_existing is set, so nothing is stored twice).
            lower = server_limit(refused, MESSAGE_TOO_LARGE, limit)
            if lower is None:
                raise
            limit, whose = lower, "the server's"
            continue
        return _summary(scan, sendable, result, tuple(local_failures.values()))


def add_labelled(
    client: ImageSearchClient,
    images: Sequence[FolderImage],
    *,
    collection: str | None,
    progress: Progress | None,
    batch_size: int = 32,
) -> AddResult:
    """Upload files under their own ids and labels: each stored once however often this runs
    (``skip_existing``), a bad one reported in the result and the rest stored (``skip_invalid``)."""
    return client.add_files(
        [image.path for image in images],
        ids=[image.id for image in images],
        labels=[image.label for image in images],
        collection=collection,
        skip_existing=True,
        skip_invalid=True,
        batch_size=batch_size,
        progress=progress,
    )


def is_utf8(name: str) -> bool:
    """Whether a file name can be an id (a protobuf string): bytes that are not UTF-8 cannot."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _local_problem(image: FolderImage, max_message_bytes: int, whose: str) -> FailedFile | None:
    """Why a file cannot be sent at all (add_files would refuse the whole upload for it)."""
    if not is_utf8(image.id):
        return FailedFile(image.path, image.id, "FILE_NAME_NOT_UTF8", "the file name is not valid UTF-8")
    try:
        size = image.path.stat().st_size
    except OSError as error:
        return FailedFile(image.path, image.id, "FILE_UNREADABLE", str(error))
    if not image.path.is_file():  # a FIFO, a device: add_files refused the whole upload, for good
        return FailedFile(image.path, image.id, "FILE_UNREADABLE", "not a regular file")
    if not os.access(image.path, os.R_OK):
        return FailedFile(image.path, image.id, "FILE_UNREADABLE", "permission denied")
    if size > max_message_bytes - _MESSAGE_MARGIN:
        return FailedFile(
            image.path,
            image.id,
            "FILE_TOO_LARGE",
            f"{size} bytes do not fit in one message ({max_message_bytes} bytes, {whose} max_message_bytes; "
            "raise max_message_bytes on the client and the server to send it)",
        )
    return None


def _summary(
    scan: FolderScan, sent: list[FolderImage], result: AddResult, local: tuple[FailedFile, ...]
) -> FolderImport:
    rejected: list[FailedFile] = []
    for item in result.failed:
        image = sent[item.index]
        message = item.message.removeprefix(f"images[{item.index}]: ")  # the id names the file
        rejected.append(FailedFile(image.path, image.id, item.reason or item.code.name, message))
    return FolderImport(
        directory=scan.directory,
        stored=result.added_count,
        already_stored=len(result.already_stored),
        failed=tuple(sorted((*local, *rejected), key=lambda failure: failure.id)),
        not_images=scan.not_images,
    )
