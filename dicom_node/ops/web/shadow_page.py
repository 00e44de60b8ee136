"""The shadow-mode page ``/shadow``: running agreement of the node's findings with the site's results.

It shows counts and agreement per condition, per condition and level, and per ISO week (a table and a
small inline SVG of the weekly agreement) — **no identifier at all**, not even the study digests; the
rows themselves stay in the job store.  It answers as :mod:`dicom_node.ops.web.auth` allows (a token,
else loopback clients), like the other pages about results.
"""

from __future__ import annotations

import html

from dicom_node.jobs.model import JobStore
from dicom_node.shadow import Agreement, ShadowSummary, summarise

__all__ = ["shadow_page", "week_svg"]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:.9em;margin-bottom:1.2em}th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3;text-align:left}td.n{text-align:right}small{color:#666}
"""


def _pct(a: Agreement) -> str:
    return "–" if a.ratio is None else f"{100 * a.ratio:.1f} %"


def _row(cells: list[str], a: Agreement, cls: str) -> str:
    head = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
    return (f'<tr class="{cls}">{head}<td class="n">{a.n}</td><td class="n">{a.agree}</td>'
            f'<td class="n ratio">{_pct(a)}</td></tr>')


def week_svg(weeks: dict[str, Agreement], *, width: int = 480, height: int = 120) -> str:
    """A small inline SVG of the agreement per week (one point per week, 0 to 100 %)."""
    if not weeks:
        return ""
    items = [(w, a) for w, a in weeks.items() if a.ratio is not None]
    pad = 24
    step = (width - 2 * pad) / max(len(items) - 1, 1)
    pts = [(pad + i * step, pad + (1 - (a.ratio or 0.0)) * (height - 2 * pad)) for i, (_, a) in enumerate(items)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"><title>{html.escape(w)}: {_pct(a)} of {a.n}</title>'
                   "</circle>" for (x, y), (w, a) in zip(pts, items, strict=True))
    return (f'<svg id="trend" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="agreement per week">'
            f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" '
            f'stroke="#ddd"/><text x="2" y="{pad + 4}" font-size="10">100%</text>'
            f'<text x="2" y="{height - pad + 4}" font-size="10">0%</text>'
            f'<polyline points="{line}" fill="none" stroke="#1d4f91"/>{dots}</svg>')


def shadow_page(store: JobStore, *, enabled: bool) -> str:
    """The HTML of ``/shadow`` (``enabled``: whether ``[shadow] labels_dir`` is set)."""
    s: ShadowSummary = summarise(store.shadow_rows())
    head = "<tr><th>{}</th><th>compared</th><th>agree</th><th>agreement</th></tr>"
    conditions = "\n".join(_row([c], a, "condition") for c, a in s.by_condition.items())
    levels = "\n".join(_row([c, lv], a, "level") for (c, lv), a in s.by_level.items())
    weeks = "\n".join(_row([w], a, "week") for w, a in s.by_week.items())
    state = ("on: label files are read from <code>[shadow] labels_dir</code>" if enabled
             else "off (<code>[shadow] labels_dir</code> is not set)")
    empty = '<p id="empty">No comparisons yet.</p>' if not s.total.n else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spinemed-node shadow mode</title><style>{_STYLE}</style></head>
<body><h1>spinemed-node — shadow mode</h1>
<p><small>Agreement of the node's grades (normal/mild, moderate, severe) with the site's own results, per
labelled condition and level. Shadow mode is {state}. No identifiers: counts only.
<a href="/jobs">jobs</a> · <a href="/metrics">metrics</a></small></p>
{empty}
<table id="total">{head.format("in all")}
{_row([f"{s.studies} studies"], s.total, "total")}</table>
<h2>Per condition</h2>
<table id="conditions">{head.format("condition")}
{conditions}</table>
<h2>Per condition and level</h2>
<table id="levels"><tr><th>condition</th><th>level</th><th>compared</th><th>agree</th><th>agreement</th></tr>
{levels}</table>
<h2>Per ISO week</h2>
{week_svg(s.by_week)}
<table id="weeks">{head.format("week")}
{weeks}</table>
</body></html>
"""
