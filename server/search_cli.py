"""`imagesearch search IMG`: the images of a collection most like a query file, as a table or a contact sheet.

Uses the client SDK only. Exit codes: 0 searched (even with no hits), 2 the search
could not run (unreadable query, server unreachable, unknown collection, an image
the server cannot decode).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from imagesearch.client import ImageSearchClient, ImageSearchError, NotFound, SearchHit, SearchResult
from imagesearch.server.client_cli import (
    EXIT_OK,
    add_server_arguments,
    fail,
    path_argument,
    positive_int,
    server_error,
    unwritable,
)
from imagesearch.server.contact_sheet import SheetItem, hit_item, render_contact_sheet
from imagesearch.server.printable import printable


def add_search_command(commands: argparse._SubParsersAction) -> None:
    """Register `search` on the `imagesearch` command."""
    parser = commands.add_parser(
        "search",
        help="find the images most like a query image (table; --html for a contact sheet)",
        description="Print the hits for a query image, best first: rank, id, label, score "
        "(higher is more similar). Exit codes: 0 searched, 2 could not search.",
    )
    parser.add_argument("image", metavar="IMG", type=path_argument, help="query image file")
    parser.add_argument(
        "-k",
        "--top-k",
        type=positive_int,
        default=0,
        metavar="N",
        help="number of hits (default: the server's, 10)",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="L",
        help="only hits with this label (repeat for several)",
    )
    parser.add_argument(
        "--bucketed",
        action="store_true",
        help="recognise the query's class first and rank only that class's images",
    )
    parser.add_argument(
        "--rerank",
        type=positive_int,
        default=0,
        metavar="N",
        help="verify the best N candidates geometrically (collections keeping local features) and "
        "order them by verified inliers",
    )
    add_server_arguments(parser)
    parser.add_argument(
        "--html",
        type=path_argument,
        metavar="OUT.html",
        help="also write a contact sheet: the query and hit thumbnails",
    )
    parser.set_defaults(handler=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    try:
        query = args.image.read_bytes()
    except OSError as error:
        return fail(f"cannot read the query image: {error}")
    if problem := unwritable(args.html):
        return fail(problem)
    try:
        with ImageSearchClient(args.target) as client:
            mode = "bucketed" if args.bucketed else None
            result = client.search(
                query,
                top_k=args.top_k,
                labels=args.label,
                collection=args.collection,
                mode=mode,
                rerank=args.rerank,
            )
            if args.bucketed:
                print(
                    f"recognised as {result.predicted_label or '(no labelled image)'!s} "
                    f"(confidence {result.label_confidence:.2f})"
                )
            print(format_hits(result.hits, inliers=bool(args.rerank)))
            if args.html:
                thumbnails = [_thumbnail(client, hit.id, args.collection) for hit in result]
                page = _sheet(args.image, query, result, thumbnails, args.collection or "default")
    except ImageSearchError as error:
        return server_error(error, args.target)
    if args.html:
        try:
            args.html.write_text(page, encoding="utf-8")
        except OSError as error:
            return fail(f"cannot write the contact sheet: {error}")
        print(f"contact sheet: {args.html.resolve()}")
    return EXIT_OK


def format_hits(hits: Sequence[SearchHit], *, inliers: bool = False) -> str:
    """A plain table, best first; ids may be long paths, so the id column fits the longest.
    ``inliers``: a column of geometrically verified matches (re-ranked searches)."""
    if not hits:
        return "no hits"
    ids, labels = [printable(hit.id) for hit in hits], [printable(hit.label) for hit in hits]
    id_width, label_width = max(2, *map(len, ids)), max(5, *map(len, labels))
    extra = f"  {'inliers':>7}" if inliers else ""
    rows = [f"{'rank':>4}  {'id':<{id_width}}  {'label':<{label_width}}  {'score':>7}{extra}"]
    rows += [
        f"{rank:>4}  {hit_id:<{id_width}}  {label:<{label_width}}  {hit.score:>7.4f}"
        + (f"  {hit.inliers:>7}" if inliers else "")
        for rank, (hit, hit_id, label) in enumerate(zip(hits, ids, labels, strict=True), 1)
    ]
    return "\n".join(rows)


def _thumbnail(client: ImageSearchClient, image_id: str, collection: str | None) -> bytes | None:
    """A hit's thumbnail, or None when it was removed since the search (the whole sheet failed
    with NOT_FOUND: an outside test, under concurrent removals)."""
    try:
        return client.get_image(image_id, collection=collection).thumbnail
    except NotFound:
        return None


def _sheet(
    path: Path, query: bytes, result: SearchResult, thumbnails: Sequence[bytes | None], collection: str
) -> str:
    return render_contact_sheet(
        f"imagesearch: {path.name} in collection '{collection}'",
        SheetItem("query", query, [path.name]),
        [
            hit_item(rank, hit, thumb)
            for rank, (hit, thumb) in enumerate(zip(result, thumbnails, strict=True), 1)
        ],
    )
