"""`imagesearch add DIR`: import a folder-per-class tree (DIR/<label>/<files>) into a collection.

A thin shell over ``imagesearch.client.folders.add_folder``: a progress line on
stderr, a summary on stdout, and exit codes a script can act on: 0 every image
is stored, 1 some images were rejected (listed with reasons), 2 the import could
not run (bad folder, server unreachable, unknown collection). Running the same
command again is always safe: images already stored are skipped, not duplicated.
"""

from __future__ import annotations

import argparse
import sys

from imagesearch.client import AlreadyExists, ImageSearchClient, ImageSearchError, NotFound
from imagesearch.client.folders import FolderImport, FolderScan, add_folder, scan_folder
from imagesearch.server.client_cli import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    add_server_arguments,
    fail,
    path_argument,
    positive_int,
    server_error,
)
from imagesearch.server.printable import printable
from imagesearch.server.progress import ProgressLine

_LABELS_SHOWN = 10


def add_folder_command(commands: argparse._SubParsersAction) -> None:
    """Register `add` on the `imagesearch` command."""
    parser = commands.add_parser(
        "add",
        help="import a folder of images, one subfolder per label (safe to re-run)",
        description="Store every image under DIR once, labelled by its subfolder of DIR, with its "
        "relative path as id. Exit codes: 0 all stored, 1 some images rejected, 2 could not run.",
    )
    parser.add_argument(
        "directory", metavar="DIR", type=path_argument, help="folder with one subfolder per label"
    )
    add_server_arguments(parser)
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        metavar="N",
        help="images per streamed chunk (default 32; at most the server's max_batch_size)",
    )
    parser.set_defaults(handler=cmd_add)


def cmd_add(args: argparse.Namespace) -> int:
    try:
        scan = scan_folder(args.directory)
    except OSError as error:
        return fail(str(error))
    print(_plan(scan, args.collection or "default", args.target), flush=True)
    with ImageSearchClient(args.target) as client:
        try:
            _ensure_collection(client, args.collection)  # an unreachable server fails now, not mid-import
        except ImageSearchError as error:
            return server_error(error, args.target)
        return _import(client, scan, args)


def _ensure_collection(client: ImageSearchClient, name: str | None) -> None:
    """Use the named collection, creating it with the server's defaults (its default extractor and
    that extractor's metric, flat index) when it does not exist yet: a folder import is often the
    first thing done with a new collection."""
    try:
        client.get_collection(name)
    except NotFound:
        if name is None:
            raise
        try:
            created = client.create_collection(name)
        except AlreadyExists:  # another import made it meanwhile: use it (the loser exited 2)
            return
        print(
            f"created collection {name!r}: {created.extractor}, {created.metric}, {created.index_type.value}"
        )


def _import(client: ImageSearchClient, scan: FolderScan, args: argparse.Namespace) -> int:
    progress = ProgressLine(label="sent")  # handed to gRPC: the last chunks are stored after it reads 100 %
    try:
        outcome = add_folder(
            client, scan, collection=args.collection, progress=progress, batch_size=args.batch_size
        )
        holds = client.get_collection(args.collection).image_count
    except ImageSearchError as error:
        return _unfinished(progress, server_error(error, args.target, reached=True))
    except OSError as error:  # a file vanished or changed while it was being sent
        return _unfinished(progress, fail(str(error)))
    except KeyboardInterrupt:
        return _unfinished(progress, EXIT_INTERRUPTED)
    progress.close()
    print(_summary(outcome, args.collection or "default", holds))
    return EXIT_PARTIAL if outcome.failed else EXIT_OK


def _plan(scan: FolderScan, collection: str, target: str) -> str:
    counts = sorted(scan.labels.items())
    listed = ", ".join(f"{_shown(label) or '(none)'} {count}" for label, count in counts[:_LABELS_SHOWN])
    more = f", ... {len(counts) - _LABELS_SHOWN} more" if len(counts) > _LABELS_SHOWN else ""
    return (
        f"adding {len(scan.images)} images from {_shown(str(scan.directory))} to collection '{collection}' on {target}"
        + (f"\n  {len(counts)} labels: {listed}{more}" if counts else "")
    )


def _unfinished(progress: ProgressLine, code: int) -> int:
    progress.close()
    print(
        "the import did not finish: run the same command again to complete it "
        "(images already stored are skipped, never stored twice)",
        file=sys.stderr,
    )
    return code


def _summary(outcome: FolderImport, collection: str, holds: int) -> str:
    lines = [
        f"stored {outcome.stored}, already stored {outcome.already_stored}, "
        f"rejected {len(outcome.failed)}, not images {len(outcome.not_images)} (not sent)"
    ]
    if outcome.failed:
        lines.append("rejected images:")
        lines += [
            f"  {_shown(failure.id)}: {failure.reason}: {failure.message}" for failure in outcome.failed
        ]
    if outcome.not_images:
        lines.append("files that are not images (by extension):")
        lines += [
            f"  {_shown(path.relative_to(outcome.directory).as_posix())}" for path in outcome.not_images
        ]
    lines.append(f"collection '{collection}' holds {holds} images")
    return "\n".join(lines)


def _shown(name: str) -> str:
    """A file name that prints in any locale and on one line: bytes that are not UTF-8 as \\xNN
    escapes, control characters as theirs (a newline in a name printed it on two: an outside test)."""
    return printable(name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
