"""Small inline SVG charts for suite pages: pass/fail per run and a measurement over time.

Server-side SVG keeps the charts readable without JavaScript and without any external library; every
label is escaped, every number is formatted by us.
"""

from __future__ import annotations

import html

from markupsafe import Markup

from sitegen.text import format_number, visible

# viewBox sizes close to the size they show at, so text stays ~11px: bars span the page, plots half of it
BARS_W, PLOT_W, HEIGHT = 1160, 560, 140
_PAD_LEFT, _PAD_BOTTOM, _PAD_TOP = 58, 18, 8
_MAX_BAR = 28


def _text(value: object) -> str:
    return html.escape(visible(str(value)), quote=True)


def result_bars(runs: list[dict], href: str) -> Markup:
    """Stacked pass/fail/skip bars, one per run (oldest left); ``href`` has a ``{id}`` placeholder."""
    if not runs:
        return Markup("")
    top = max(sum(run["counts"].values()) for run in runs) or 1
    plot_h = HEIGHT - _PAD_BOTTOM - _PAD_TOP
    width = BARS_W
    step = (width - _PAD_LEFT) / len(runs)
    bar = max(1.0, min(_MAX_BAR, step * 0.8))
    parts = [
        f'<svg class="chart bars" viewBox="0 0 {width} {HEIGHT}" role="img" '
        f'aria-label="results per run, oldest first">',
        f'<text x="{_PAD_LEFT - 6}" y="{_PAD_TOP + 8}" class="axis" text-anchor="end">{top}</text>',
        f'<text x="{_PAD_LEFT - 6}" y="{HEIGHT - _PAD_BOTTOM}" class="axis" text-anchor="end">0</text>',
        f'<line x1="{_PAD_LEFT}" y1="{HEIGHT - _PAD_BOTTOM}" x2="{width}" y2="{HEIGHT - _PAD_BOTTOM}" class="grid"/>',
    ]
    for index, run in enumerate(runs):
        x = _PAD_LEFT + index * step + (step - bar) / 2
        y = HEIGHT - _PAD_BOTTOM
        counts = run["counts"]
        title = (
            f"job {run['id']}: {counts.get('pass', 0)} pass, {counts.get('fail', 0)} fail, {counts.get('skip', 0)} skip"
        )
        parts.append(f'<a href="{_text(href.format(id=run["id"]))}"><title>{_text(title)}</title>')
        for kind in ("pass", "fail", "skip", "unknown"):
            count = counts.get(kind, 0)
            if not count:
                continue
            height = plot_h * count / top
            y -= height
            parts.append(f'<rect class="{kind}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{height:.1f}"/>')
        parts.append("</a>")
    first, last = runs[0]["id"], runs[-1]["id"]
    parts.append(f'<text x="{_PAD_LEFT}" y="{HEIGHT - 4}" class="axis">job {first}</text>')
    parts.append(f'<text x="{width}" y="{HEIGHT - 4}" class="axis" text-anchor="end">job {last}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def measurement_plot(points: list[tuple[int, float]], units: str, href: str) -> Markup:
    """A line of one case's measurement across runs (oldest left), each point linking to its job."""
    if not points:
        return Markup("")
    values = [value for _, value in points]
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 1, high + 1
    width = PLOT_W
    plot_h = HEIGHT - _PAD_BOTTOM - _PAD_TOP
    step = (width - _PAD_LEFT - 10) / max(1, len(points) - 1)

    def xy(index: int, value: float) -> tuple[float, float]:
        x = _PAD_LEFT + 5 + (index * step if len(points) > 1 else (width - _PAD_LEFT) / 2)
        return x, _PAD_TOP + plot_h * (high - value) / (high - low)

    coords = [xy(i, v) for i, (_, v) in enumerate(points)]
    unit = f" {units}" if units else ""
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {HEIGHT}" role="img" aria-label="measurement per run">',
        f'<text x="{_PAD_LEFT - 6}" y="{_PAD_TOP + 8}" class="axis" text-anchor="end">'
        f"{_text(format_number(high))}</text>",
        f'<text x="{_PAD_LEFT - 6}" y="{HEIGHT - _PAD_BOTTOM}" class="axis" text-anchor="end">'
        f"{_text(format_number(low))}</text>",
        f'<line x1="{_PAD_LEFT}" y1="{HEIGHT - _PAD_BOTTOM}" x2="{width}" y2="{HEIGHT - _PAD_BOTTOM}" class="grid"/>',
        '<polyline class="line" points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>',
    ]
    for (job_id, value), (x, y) in zip(points, coords, strict=True):
        parts.append(
            f'<a href="{_text(href.format(id=job_id))}"><circle cx="{x:.1f}" cy="{y:.1f}" r="3">'
            f"<title>job {job_id}: {_text(format_number(value))}{_text(unit)}</title></circle></a>"
        )
    parts.append(f'<text x="{_PAD_LEFT}" y="{HEIGHT - 4}" class="axis">job {points[0][0]}</text>')
    parts.append(f'<text x="{width}" y="{HEIGHT - 4}" class="axis" text-anchor="end">job {points[-1][0]}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
