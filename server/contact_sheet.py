"""Render search results as a self-contained HTML contact sheet.

Results people would rather see than read: the query next to its hits, each
with rank, id, label, score and distance, thumbnails inlined as data URIs so
the file can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SheetItem:
    title: str
    thumbnail: bytes | None
    lines: Sequence[str] = ()


def _data_uri(jpeg: bytes | None) -> str:
    if not jpeg:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def _cell(item: SheetItem, css_class: str) -> str:
    image = (
        f'<img src="{_data_uri(item.thumbnail)}" alt="{html.escape(item.title)}">' if item.thumbnail else ""
    )
    lines = "".join(f"<div>{html.escape(line)}</div>" for line in item.lines)
    return f'<figure class="{css_class}">{image}<figcaption><b>{html.escape(item.title)}</b>{lines}</figcaption></figure>'


def render_contact_sheet(title: str, query: SheetItem, hits: Sequence[SheetItem]) -> str:
    cells = "\n".join(_cell(hit, "hit") for hit in hits)
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
<div class="grid">{_cell(query, "query")}</div>
<h2>{len(hits)} hits, most similar first</h2>
<div class="grid">
{cells}
</div></body></html>
"""
