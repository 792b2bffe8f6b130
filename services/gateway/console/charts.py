"""Small server-side SVG charts (no chart library, no script): each is an ``<svg role="img">``
with a title and a text summary, so a screen reader gets the figures too."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, PAD = 560, 180, 36


def line_chart(
    points: Sequence[tuple[datetime, float]],
    *,
    title: str,
    unit: str,
    threshold: float | None = None,
) -> Markup:
    """Values over time as a line with dots; ``threshold`` as a dashed red line.

    Args:
        points: (time, value) pairs, any order.
        title: what is drawn, for the SVG's title and summary.
        unit: the values' unit, shown on the axis.
        threshold: a target line (e.g. the SLO's threshold), or None.
    """
    if not points:
        return Markup(f'<p class="nodata">{escape(title)}: no data yet.</p>')
    points = sorted(points)
    t0, t1 = points[0][0].timestamp(), points[-1][0].timestamp()
    top = max([v for _, v in points] + ([threshold] if threshold is not None else [])) or 1.0
    top *= 1.1

    def x(t: datetime) -> float:
        span = (t1 - t0) or 1.0
        return PAD + (t.timestamp() - t0) / span * (WIDTH - 2 * PAD)

    def y(v: float) -> float:
        return HEIGHT - PAD - v / top * (HEIGHT - 2 * PAD)

    path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
    dots = "".join(
        f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3"><title>{t:%H:%M:%S} {v:.3g} {escape(unit)}'
        "</title></circle>"
        for t, v in points
    )
    line = ""
    if threshold is not None:
        line = (
            f'<line class="threshold" x1="{PAD}" x2="{WIDTH - PAD}" y1="{y(threshold):.1f}" '
            f'y2="{y(threshold):.1f}"/><text x="{WIDTH - PAD}" y="{y(threshold) - 4:.1f}" '
            f'text-anchor="end">target {threshold:g} {escape(unit)}</text>'
        )
    latest = points[-1][1]
    summary = f"{title}: {len(points)} points, latest {latest:.3g} {unit}, highest {max(v for _, v in points):.3g} {unit}"
    return Markup(
        f'<figure class="chart"><svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(summary)}"><title>{escape(summary)}</title>'
        f'<line class="axis" x1="{PAD}" x2="{PAD}" y1="{PAD / 2}" y2="{HEIGHT - PAD}"/>'
        f'<line class="axis" x1="{PAD}" x2="{WIDTH - PAD}" y1="{HEIGHT - PAD}" y2="{HEIGHT - PAD}"/>'
        f'<text x="4" y="{PAD / 2 + 4}">{top / 1.1:.3g} {escape(unit)}</text>'
        f'<text x="{PAD}" y="{HEIGHT - 8}">{points[0][0]:%H:%M}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" text-anchor="end">{points[-1][0]:%H:%M}</text>'
        f'{line}<polyline class="series" points="{path}"/>{dots}</svg>'
        f"<figcaption>{escape(summary)}</figcaption></figure>"
    )


def burn_chart(rates: dict[str, float | None], *, title: str) -> Markup:
    """Error-budget burn rate per window as bars; 1 (spending exactly the budget) is marked,
    bars above it are red."""
    known = {name: rate for name, rate in rates.items() if rate is not None}
    if not known:
        return Markup(f'<p class="nodata">{escape(title)}: no data yet.</p>')
    top = max([*known.values(), 1.0]) * 1.15
    bar_w = (WIDTH - 2 * PAD) / len(rates)
    bars = []
    for i, (name, rate) in enumerate(rates.items()):
        bx = PAD + i * bar_w + 4
        if rate is not None:
            h = rate / top * (HEIGHT - 2 * PAD)
            cls = "bar burning" if rate > 1 else "bar"
            bars.append(
                f'<rect class="{cls}" x="{bx:.1f}" y="{HEIGHT - PAD - h:.1f}" '
                f'width="{bar_w - 8:.1f}" height="{h:.1f}"><title>{name}: {rate:.2f}x</title></rect>'
                f'<text x="{bx + (bar_w - 8) / 2:.1f}" y="{HEIGHT - PAD - h - 4:.1f}" '
                f'text-anchor="middle">{rate:.2g}x</text>'
            )
        bars.append(
            f'<text x="{bx + (bar_w - 8) / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">{name}</text>'
        )
    one = HEIGHT - PAD - 1 / top * (HEIGHT - 2 * PAD)
    summary = f"{title}: " + ", ".join(f"{n} {r:.2f}x" for n, r in known.items())
    return Markup(
        f'<figure class="chart"><svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(summary)}"><title>{escape(summary)}</title>{"".join(bars)}'
        f'<line class="threshold" x1="{PAD}" x2="{WIDTH - PAD}" y1="{one:.1f}" y2="{one:.1f}"/>'
        f'<text x="{PAD}" y="{one - 4:.1f}">1x = budget spent exactly over the window</text>'
        f"</svg><figcaption>{escape(summary)}</figcaption></figure>"
    )
