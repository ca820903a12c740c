"""Render search results as a self-contained HTML contact sheet.

Results people would rather see than read: the query next to its hits, each
with rank, id, label, score and distance, thumbnails inlined as data URIs so
the file can be mailed or opened offline. On load, the page records on <body>
how many of its images decoded (``data-images-loaded`` of ``data-images-total``),
so a headless browser can check that every thumbnail shows.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagesearch.client import SearchHit

# Leading bytes of the formats a browser shows; anything else is labelled JPEG (the server's thumbnails).
_MIME_BY_MAGIC = (  # what browsers show; anything else (a TIFF query) gets no broken picture
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG", "image/png"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
    (b"RIFF", "image/webp"),
)

# Counts the images that decoded once the page has loaded (for headless-browser checks).
_LOADED_SCRIPT = """<script>
addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
});
</script>"""


@dataclass(frozen=True)
class SheetItem:
    title: str
    thumbnail: bytes | None
    lines: Sequence[str] = ()


def hit_item(rank: int, hit: SearchHit, thumbnail: bytes | None) -> SheetItem:
    """The sheet cell of one search hit: rank and id, then label, score, distance and, for a
    geometrically re-ranked hit, its verified inliers."""
    lines = [f"label {hit.label}", f"score {hit.score:.4f}", f"distance {hit.distance:.4f}"]
    if hit.inliers:
        lines.append(f"{hit.inliers} inliers")
    return SheetItem(f"#{rank} {hit.id}", thumbnail, lines)


def _data_uri(image: bytes | None) -> str:
    """The image inlined, or "" when there is none or browsers cannot show its format (a TIFF
    query was inlined labelled image/jpeg: a broken picture in every browser, an outside test)."""
    mime = next((mime for magic, mime in _MIME_BY_MAGIC if image and image.startswith(magic)), "")
    return f"data:{mime};base64," + base64.b64encode(image).decode() if image and mime else ""


def cell(item: SheetItem, css_class: str) -> str:
    """One thumbnail with its caption, as the contact sheet and the evaluation report show it."""
    uri = _data_uri(item.thumbnail)
    image = f'<img src="{uri}" alt="{html.escape(item.title)}">' if uri else ""
    shown = (
        [*item.lines, "(no preview: a format browsers do not show)"]
        if item.thumbnail and not uri
        else item.lines
    )
    lines = "".join(f"<div>{html.escape(line)}</div>" for line in shown)
    return f'<figure class="{css_class}">{image}<figcaption><b>{html.escape(item.title)}</b>{lines}</figcaption></figure>'


def render_contact_sheet(title: str, query: SheetItem, hits: Sequence[SheetItem]) -> str:
    cells = "\n".join(cell(hit, "hit") for hit in hits)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; background: #fafafa; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; padding: 8px; background: white; border: 1px solid #ddd; width: 200px; }}
figure.query {{ border: 3px solid #2a6; }}
img {{ width: 200px; height: 200px; object-fit: contain; background: #eee; }}
figcaption {{ font-size: 12px; word-break: break-all; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="grid">{cell(query, "query")}</div>
<h2>{len(hits)} hits, most similar first</h2>
<div class="grid">
{cells}
</div>
{_LOADED_SCRIPT}
</body></html>
"""
