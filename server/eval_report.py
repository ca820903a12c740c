"""The evaluation's reports: a terminal table, the JSON file and an HTML page with a precision-recall
plot and the worst queries as image strips, all rendered from one ``Evaluation`` so they agree."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imagesearch.server.contact_sheet import cell
from imagesearch.server.eval_runner import Evaluation

# ---------------------------------------------------------------------------------------------
# Reporting


_AT_K = (("top-{k}", "top_k_accuracy"), ("P@{k}", "precision"), ("R@{k}", "recall"), ("J@{k}", "jaccard"))


def metric_columns(ks: Sequence[int]) -> list[tuple[str, str]]:
    """(header, key path into a summary dict) of every number the reports show, in order."""
    columns = []
    for name, key in _AT_K:
        columns += [(name.format(k=k), f"at_k.{k}.{key}") for k in ks]
    return [*columns, ("mAP", "map"), ("recognition", "recognition_accuracy")]


def lookup(summary: dict[str, Any], path: str) -> float | None:
    value: Any = summary
    for part in path.split("."):
        value = value[part]
    return value


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


_TABLE_HEADER = ("extractor", "metric", "mode", "queries", "k", "top-k", "P@k", "R@k", "J@k", "mAP", "recog")


def _table_rows(run: dict[str, Any], ks: Sequence[int]) -> list[list[str]]:
    """A run's rows: one per k; the run's name, query count, mAP and recognition on the first."""
    summary = run["summary"]
    rows = []
    for k in ks:
        first = not rows
        name = [run["extractor"], run["metric"], run["mode"], str(summary["queries"])] if first else [""] * 4
        at_k = [_number(lookup(summary, f"at_k.{k}.{key}")) for _, key in _AT_K]
        overall = [_number(summary["map"]), _number(summary["recognition_accuracy"])] if first else ["", ""]
        rows.append([*name, str(k), *at_k, *overall])
    return rows


def format_table(evaluation: Evaluation) -> str:
    """The terminal table, then one line per skipped run saying why."""
    data = evaluation.to_dict()
    rows = [list(_TABLE_HEADER)]
    skipped = []
    for run in data["runs"]:
        if run["summary"] is None:
            skipped.append(f"{run['extractor']} / {run['metric']} / {run['mode']}: skipped, {run['skipped']}")
        else:
            rows += _table_rows(run, data["config"]["ks"])
    widths = [max(len(row[column]) for row in rows) for column in range(len(_TABLE_HEADER))]
    lines = [
        "  ".join(
            cell.ljust(w) if c < 3 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    notes = [
        f"{run['extractor']} / {run['metric']} / {run['mode']}: {note}"
        for run in data["runs"]
        for note in run["notes"]
    ]
    footer = f"mAP is AP@{data['config']['top_k']}; recog = recognition accuracy (Classify)."
    return "\n".join([*lines, *skipped, *notes, footer])


def pr_plot_png(evaluation: Evaluation) -> bytes | None:
    """The precision–recall curves (one point per cut-off k) as a PNG; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    runs = [run for run in evaluation.to_dict()["runs"] if run["curve"]]
    if not runs:
        return None
    figure = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for run in runs:
        curve = run["curve"]
        points = [
            (r, p) for r, p in zip(curve["recall"], curve["precision"], strict=True) if None not in (r, p)
        ]
        if points:
            recall, precision = zip(*points, strict=True)
            name = f"{run['extractor']} / {run['metric']} / {run['mode']}"
            axes.plot(recall, precision, marker="o", markersize=3, label=name)
    axes.set_xlabel("mean recall@k")
    axes.set_ylabel("mean precision@k")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.set_title(f"precision–recall, k = 1..{evaluation.config.k_max}")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # a run with no point has no line (matplotlib warned)
        axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; background: #fafafa; }
table { border-collapse: collapse; font-size: 13px; } th, td { border: 1px solid #ccc; padding: 3px 6px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.strip { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 14px; align-items: flex-start; }
figure { margin: 0; padding: 6px; background: white; border: 1px solid #ddd; width: 140px; }
figure.query { border: 3px solid #c63; }
img { width: 140px; height: 140px; object-fit: contain; background: #eee; }
figcaption { font-size: 11px; word-break: break-all; }
"""


def _summary_table(data: dict[str, Any]) -> str:
    """Every number of every run; each cell carries its exact value and key, so it can be checked."""
    columns = metric_columns(data["config"]["ks"])
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in columns)
    rows = []
    for index, run in enumerate(data["runs"]):
        name = "".join(f"<td>{html.escape(str(run[key]))}</td>" for key in ("extractor", "metric", "mode"))
        summary = run["summary"]
        if summary is None:
            cells = f'<td colspan="{len(columns) + 1}">skipped: {html.escape(run["skipped"])}</td>'
        else:
            cells = f'<td class="n">{summary["queries"]}</td>' + "".join(
                f'<td class="n" data-run="{index}" data-key="{key}" data-value="{lookup(summary, key)!r}">'
                f"{_number(lookup(summary, key))}</td>"
                for _, key in columns
            )
        rows.append(f"<tr>{name}{cells}</tr>")
    return (
        "<table><tr><th>extractor</th><th>metric</th><th>mode</th><th>queries</th>"
        f"{head}</tr>\n" + "\n".join(rows) + "</table>"
    )


def render_html(evaluation: Evaluation, plot_png: bytes | None = None) -> str:
    """A self-contained report: the numbers, the PR plot and the worst queries as image strips."""
    data = evaluation.to_dict()
    dataset = data["dataset"]
    parts = [
        f"<h1>Retrieval evaluation of {html.escape(str(dataset['root']))}</h1>",
        f"<p>{dataset['classes']} classes, {dataset['images']} images ({dataset['other_files']} other files "
        f"ignored); split {dataset['split']}: {dataset['indexed']} indexed, {dataset['queries']} queries. "
        f"Server {html.escape(data['target'])}, {html.escape(data['started'])}, "
        f"{html.escape(data['machine'])}. mAP is AP@{data['config']['top_k']}; "
        "definitions in docs/evaluation.md.</p>",
        _summary_table(data),
    ]
    for run in data["runs"]:
        parts += [f"<p><i>{html.escape(note)}</i></p>" for note in run["notes"]]
    if plot_png:
        uri = "data:image/png;base64," + base64.b64encode(plot_png).decode()
        parts.append(
            f'<h2>Precision–recall</h2><img style="width:640px;height:auto" src="{uri}" alt="PR plot">'
        )
    for run in evaluation.runs:
        if run.skipped or not evaluation.config.worst:
            continue
        parts.append(f"<h2>Worst queries: {html.escape(run.name)}</h2>")
        if not run.strips:
            parts.append(f"<p>None: AP@{run.top_k} is 1 for every query.</p>")
        parts += [
            '<div class="strip">'
            + cell(s.query, "query")
            + "".join(cell(h, "hit") for h in s.hits)
            + "</div>"
            for s in run.strips
        ]
    body = "\n".join(parts)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>imagesearch evaluation</title>'
        f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_reports(evaluation: Evaluation, json_path: Path | None, html_path: Path | None) -> list[Path]:
    """Write the JSON and the HTML (plus the PR plot as a PNG beside it); return the files written."""
    written = []
    if json_path is not None:
        json_path.write_text(json.dumps(evaluation.to_dict(), indent=2, allow_nan=False))
        written.append(json_path)
    if html_path is not None:
        plot = pr_plot_png(evaluation)
        if plot:
            plot_path = html_path.with_name(f"{html_path.stem}-pr.png")
            plot_path.write_bytes(plot)
            written.append(plot_path)
        html_path.write_text(render_html(evaluation, plot))
        written.append(html_path)
    return written
