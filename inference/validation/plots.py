"""Small SVG plots for the validation report (no plotting library: the node ships none).

Each function returns a complete SVG document; :func:`data_uri` embeds it as an ``<img>`` source so the
report is one self-contained file.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape

__all__ = ["calibration_svg", "confusion_svg", "data_uri", "histogram_svg", "interval_svg"]

_FONT = 'font-family="sans-serif"'


def data_uri(svg: str) -> str:
    """``data:image/svg+xml;base64,...`` of an SVG document."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _svg(width: int, height: int, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>"
    )


def _text(x: float, y: float, s: str, anchor: str = "middle", extra: str = "", size: int = 12) -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {_FONT} font-size="{size}" {extra}>{escape(s)}</text>'


def confusion_svg(title: str, matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """A confusion matrix: rows truth, columns prediction, cells shaded by their share of the row."""
    k = len(labels)
    cell, left, top = 70, 110, 60
    width, height = left + k * cell + 20, top + k * cell + 40
    body = [_text(width / 2, 18, title, extra='font-weight="bold"'),
            _text(left + k * cell / 2, 40, "model"),
            _text(14, top + k * cell / 2, "labels", extra=f'transform="rotate(-90 14 {top + k * cell / 2})"')]
    for j, lab in enumerate(labels):
        body.append(_text(left + j * cell + cell / 2, top - 6, lab, size=10))
    for i, row in enumerate(matrix):
        body.append(_text(left - 6, top + i * cell + cell / 2 + 4, labels[i], anchor="end", size=10))
        total = sum(row) or 1
        for j, v in enumerate(row):
            share = v / total
            shade = int(255 - 180 * share)
            body.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                        f'fill="rgb({shade},{shade},255)" stroke="#555"/>')
            body.append(_text(left + j * cell + cell / 2, top + i * cell + cell / 2 + 4, str(v)))
    return _svg(width, height, body)


def interval_svg(
    title: str, series: Sequence[tuple[str, str, Sequence[tuple[str, float | None, float | None, float | None]]]]
) -> str:
    """Points with 95 % interval bars on a 0..1 axis, per category (level): ``series`` is
    ``[(name, colour, [(category, value, low, high), ...]), ...]``; undefined values are marked "n/a"."""
    cats = list(dict.fromkeys(c for _, _, pts in series for c, *_ in pts))
    left, top, plot_h = 50, 40, 200
    step = 70
    width = max(320, left + step * max(len(cats), 1) + 40)
    height = top + plot_h + 60
    body = [_text(width / 2, 18, title, extra='font-weight="bold"')]
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - t)
        body.append(f'<line x1="{left}" x2="{width - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        body.append(_text(left - 6, y + 4, f"{t:.2f}", anchor="end", size=10))
    for ci, cat in enumerate(cats):
        body.append(_text(left + step * ci + step / 2, top + plot_h + 16, cat, size=10))
    for si, (name, colour, pts) in enumerate(series):
        offset = (si - (len(series) - 1) / 2) * 14
        for cat, value, low, high in pts:
            x = left + step * cats.index(cat) + step / 2 + offset
            if value is None:
                body.append(_text(x, top + plot_h - 4, "n/a", size=9, extra=f'fill="{colour}"'))
                continue
            if low is not None and high is not None:
                y1, y2 = top + plot_h * (1 - low), top + plot_h * (1 - high)
                body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" stroke="{colour}" '
                            'stroke-width="2"/>')
            body.append(f'<circle cx="{x:.1f}" cy="{top + plot_h * (1 - value):.1f}" r="4" fill="{colour}"/>')
        lx = left + si * 120
        body.append(f'<circle cx="{lx}" cy="{height - 14}" r="4" fill="{colour}"/>')
        body.append(_text(lx + 8, height - 10, name, anchor="start"))
    return _svg(width, height, body)


def calibration_svg(title: str, bins: Sequence[dict[str, float]]) -> str:
    """Reliability diagram: mean predicted probability against the observed frequency, per bin."""
    left, top, size = 50, 40, 220
    width, height = left + size + 30, top + size + 50
    body = [_text(width / 2, 18, title, extra='font-weight="bold"'),
            f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#999"/>',
            f'<line x1="{left}" y1="{top + size}" x2="{left + size}" y2="{top}" stroke="#bbb" stroke-dasharray="4"/>',
            _text(left + size / 2, top + size + 30, "predicted P(moderate or worse)"),
            _text(14, top + size / 2, "observed", extra=f'transform="rotate(-90 14 {top + size / 2})"')]
    pts = [(left + size * b["mean_predicted"], top + size * (1 - b["observed"])) for b in bins]
    if len(pts) > 1:
        body.append('<polyline fill="none" stroke="#c33" stroke-width="2" points="'
                    + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
    for (x, y), b in zip(pts, bins, strict=True):
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#c33"/>')
        body.append(_text(x + 6, y - 6, f"n={int(b['n'])}", anchor="start", size=9))
    return _svg(width, height, body)


def histogram_svg(title: str, values: Sequence[float], unit: str = "mm") -> str:
    """Histogram of non-negative values (10 bins from 0 to the largest)."""
    left, top, plot_w, plot_h = 50, 40, 300, 180
    width, height = left + plot_w + 30, top + plot_h + 50
    body = [_text(width / 2, 18, title, extra='font-weight="bold"')]
    hi = max(max(values, default=1.0), 1e-6)
    nbins = 10
    counts = [0] * nbins
    for v in values:
        counts[min(int(v / hi * nbins), nbins - 1)] += 1
    peak = max(counts) or 1
    bw = plot_w / nbins
    for i, c in enumerate(counts):
        h = plot_h * c / peak
        body.append(f'<rect x="{left + i * bw:.1f}" y="{top + plot_h - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" '
                    'fill="#4a7"/>')
        if c:
            body.append(_text(left + i * bw + bw / 2, top + plot_h - h - 4, str(c), size=10))
    body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#333"/>')
    body.append(_text(left, top + plot_h + 16, "0", size=10))
    body.append(_text(left + plot_w, top + plot_h + 16, f"{hi:.1f}", size=10))
    body.append(_text(left + plot_w / 2, top + plot_h + 36, f"distance ({unit}), n={len(values)}"))
    return _svg(width, height, body)
