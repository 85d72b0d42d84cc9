"""Server-side SVG charts for the console: the dashboard's message volume, no JavaScript.

Role: turn buckets of counts (kanmon.records.stats) into an SVG line chart — one line
per series, a y axis from 0 to a round maximum, x labels at a few bucket starts.
Trusts: numbers and labels made by the caller (labels are XML-escaped anyway).
Never: emit a style attribute or a script (the console's CSP allows neither); colours
are presentation attributes and classes of the static stylesheet.
"""

from __future__ import annotations

from html import escape

SERIES = ("received", "delivered", "deferred", "bounced", "rejected")
COLOURS = {"received": "#3366cc", "delivered": "#109618", "deferred": "#ff9900", "bounced": "#dc3912",
           "rejected": "#990099"}


def nice_max(value: int) -> int:
    """The smallest of 1, 2, 5 x 10^n at or above value (at least 1)."""
    if value <= 1:
        return 1
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= value:
                return m * step
        step *= 10


def line_chart(points: list[dict], labels: list[str], title: str, *, width: int = 720, height: int = 220,
               series: tuple[str, ...] = SERIES, legend: dict[str, str] | None = None) -> str:
    """points: one dict per bucket with a count per series; labels: one per bucket."""
    left, right, top, bottom = 44, 10, 24, 36
    w, h = width - left - right, height - top - bottom
    n = len(points)
    top_value = nice_max(max((int(p.get(s, 0)) for p in points for s in series), default=0))

    def x(i: int) -> float:
        return left + (w * i / (n - 1) if n > 1 else w / 2)

    def y(v: float) -> float:
        return top + h - h * v / top_value

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
           f'<title>{escape(title)}</title>',
           f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#888"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#888"/>']
    for frac in (0, 0.5, 1):
        v = top_value * frac
        out.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end" class="axis">{int(v)}</text>')
    step = max(1, n // 6)
    for i in range(0, n, step):
        out.append(f'<text x="{x(i):.1f}" y="{top + h + 16}" text-anchor="middle" class="axis">{escape(labels[i])}</text>')
    for s in series:
        coords = " ".join(f"{x(i):.1f},{y(int(p.get(s, 0))):.1f}" for i, p in enumerate(points))
        if coords:
            out.append(f'<polyline class="series series-{s}" fill="none" stroke="{COLOURS.get(s, "#333")}" '
                       f'stroke-width="2" points="{coords}"/>')
    lx = left
    for s in series:
        name = escape((legend or {}).get(s, s))
        out.append(f'<rect x="{lx}" y="4" width="10" height="10" fill="{COLOURS.get(s, "#333")}"/>'
                   f'<text x="{lx + 14}" y="13" class="legend">{name}</text>')
        lx += 24 + sum(13 if ord(c) > 0x2000 else 7 for c in name)  # wide (CJK) characters take twice the room
    out.append("</svg>")
    return "".join(out)
