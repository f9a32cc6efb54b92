"""Small SVG plots written as text: no plotting dependency, embeddable as-is in the HTML report.

`scatter_svg` draws labelled points with optional error bars (e.g. recall vs precision per method,
mean ± std over seeds); `histogram_svg` draws a histogram (e.g. relative decoder norms);
`binned_histogram_svg` draws one already binned elsewhere (edges + counts); `bar_svg` draws one bar per
label (e.g. FVE per model). All return an SVG string; write it with `crossdiff.core.fsutil.write_text_atomic`
or embed it in HTML as-is (all text is escaped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_FONT = 'font-family="sans-serif" font-size="12"'
_CHAR_W, _LINE_H = 6.6, 14  # rough text metrics at font-size 12, for label placement


@dataclass(frozen=True)
class Point:
    label: str
    x: float | None
    y: float | None
    x_err: float = 0.0
    """Half-width of the horizontal error bar (e.g. one standard deviation)."""
    y_err: float = 0.0
    color: str | None = None


@dataclass(frozen=True)
class _Frame:
    """Maps data coordinates to pixels inside the plotting area."""

    width: int
    height: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    margin: tuple[int, int, int, int] = (40, 20, 66, 60)  # top, right, bottom, left

    def px(self, x: float) -> float:
        lo, hi = self.x_range
        left, right = self.margin[3], self.width - self.margin[1]
        return left + (x - lo) / ((hi - lo) or 1) * (right - left)

    def clamp_x(self, x: float) -> float:
        return min(max(x, self.x_range[0]), self.x_range[1])

    def clamp_y(self, y: float) -> float:
        return min(max(y, self.y_range[0]), self.y_range[1])

    def py(self, y: float) -> float:
        lo, hi = self.y_range
        top, bottom = self.margin[0], self.height - self.margin[2]
        return bottom - (y - lo) / ((hi - lo) or 1) * (bottom - top)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 × 10^k)."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda st: abs((hi - lo) / st - n))
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}"


def _axes(
    fr: _Frame, title: str, x_label: str, y_label: str, x_ticks: bool = True, y_ticks: bool = True
) -> list[str]:
    left, top = fr.margin[3], fr.margin[0]
    right, bottom = fr.width - fr.margin[1], fr.height - fr.margin[2]
    out = [
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#888"/>'
    ]
    for t in nice_ticks(*fr.x_range) if x_ticks else []:
        x = fr.px(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" {_FONT}>{_fmt(t)}</text>')
    for t in nice_ticks(*fr.y_range) if y_ticks else []:
        y = fr.py(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" {_FONT}>{_fmt(t)}</text>')
    cx, cy = (left + right) / 2, (top + bottom) / 2
    out.append(
        f'<text x="{cx:.1f}" y="{top - 14}" text-anchor="middle" {_FONT} font-weight="bold">{escape(title)}</text>'
    )
    out.append(
        f'<text x="{cx:.1f}" y="{fr.height - 12}" text-anchor="middle" {_FONT}>{escape(x_label)}</text>'
    )
    out.append(
        f'<text x="16" y="{cy:.1f}" text-anchor="middle" transform="rotate(-90 16 {cy:.1f})" {_FONT}>'
        f"{escape(y_label)}</text>"
    )
    return out


def _svg(width: int, height: int, body: list[str]) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">\n<rect width="100%" height="100%" fill="white"/>'
    )
    return "\n".join([head, *body, "</svg>"]) + "\n"


def _place_label(x: float, y: float, text: str, placed: list, right_edge: float):
    """Right of the point (left if it would leave the picture); shifted by whole lines (0, +1, -1,
    +2, ...) until it overlaps no label placed before. Returns the text's (x, baseline y)."""
    w = len(text) * _CHAR_W
    left = x + 7 if x + 7 + w <= right_edge else x - 7 - w
    for shift in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        box = (left, y - 10 + shift * _LINE_H, w, _LINE_H)
        if not any(_overlap(box, b) for b in placed):
            break
    placed.append(box)
    return box[0], box[1] + _LINE_H - 3


def _overlap(p, q) -> bool:
    return p[0] < q[0] + q[2] and q[0] < p[0] + p[2] and p[1] < q[1] + q[3] and q[1] < p[1] + p[3]


def scatter_svg(
    points: Sequence[Point],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    x_range: tuple[float, float] = (0.0, 1.05),
    y_range: tuple[float, float] = (0.0, 1.05),
    width: int = 600,
    height: int = 460,
) -> str:
    """Labelled points with error bars; points with a missing coordinate are listed, not drawn."""
    fr = _Frame(width, height, x_range, y_range)
    body = _axes(fr, title, x_label, y_label)
    placed: list[tuple[float, float, float, float]] = []
    missing = []
    for i, p in enumerate(points):
        if p.x is None or p.y is None or not (math.isfinite(p.x) and math.isfinite(p.y)):
            missing.append(p.label)
            continue
        color = p.color or PALETTE[i % len(PALETTE)]
        x, y = fr.px(p.x), fr.py(p.y)
        if p.x_err:  # error bars are clipped to the frame
            x0, x1 = fr.px(fr.clamp_x(p.x - p.x_err)), fr.px(fr.clamp_x(p.x + p.x_err))
            body.append(f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="{color}"/>')
        if p.y_err:
            y0, y1 = fr.py(fr.clamp_y(p.y - p.y_err)), fr.py(fr.clamp_y(p.y + p.y_err))
            body.append(f'<line x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y1:.1f}" stroke="{color}"/>')
        body.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{color}"><title>{escape(p.label)}</title></circle>'
        )
        lx, ly = _place_label(x, y, p.label, placed, right_edge=width - 2)
        body.append(f'<text x="{lx:.1f}" y="{ly:.1f}" fill="{color}" {_FONT}>{escape(p.label)}</text>')
    if missing:
        note = "not drawn (undefined): " + ", ".join(missing)
        body.append(f'<text x="{fr.margin[3]}" y="{height - 10}" {_FONT} fill="#666">{escape(note)}</text>')
    return _svg(width, height, body)


def histogram_svg(
    values: Sequence[float],
    *,
    bins: int = 20,
    value_range: tuple[float, float] | None = None,
    title: str = "",
    x_label: str = "",
    y_label: str = "count",
    color: str = PALETTE[0],
    log_y: bool = False,
    width: int = 600,
    height: int = 360,
) -> str:
    """A histogram of `values` in `bins` equal bins over `value_range` (default: min..max)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    lo, hi = value_range or ((min(vals), max(vals)) if vals else (0.0, 1.0))
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = [0] * bins
    for v in vals:
        if lo <= v <= hi:
            counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    return binned_histogram_svg(
        edges,
        counts,
        title=title,
        x_label=x_label,
        y_label=y_label,
        color=color,
        log_y=log_y,
        width=width,
        height=height,
    )


def binned_histogram_svg(
    edges: Sequence[float],
    counts: Sequence[float],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "count",
    color: str = PALETTE[0],
    log_y: bool = False,
    width: int = 600,
    height: int = 360,
) -> str:
    """A histogram binned elsewhere: bin i spans edges[i]..edges[i + 1] (len(edges) == len(counts) + 1)."""
    edges = [float(e) for e in edges]
    counts = [float(c) if c is not None and math.isfinite(float(c)) else 0.0 for c in counts]
    if len(edges) != len(counts) + 1 or not all(math.isfinite(e) for e in edges) or len(edges) < 2:
        raise ValueError(
            f"need len(edges) == len(counts) + 1 finite edges, got {len(edges)} and {len(counts)}"
        )
    lo, hi = edges[0], edges[-1]
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    shown = [math.log10(1 + c) for c in counts] if log_y else counts
    top = max(shown) if any(shown) else 1
    fr = _Frame(width, height, (lo, hi), (0.0, top * 1.05))
    body = _axes(fr, title, x_label, f"log10(1 + {y_label})" if log_y else y_label)
    for e0, e1, c, h in zip(edges, edges[1:], counts, shown):
        x0, x1 = fr.px(e0), fr.px(e1)
        y = fr.py(h)
        body.append(
            f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(0.5, x1 - x0 - 1):.1f}" height="{fr.py(0) - y:.1f}" '
            f'fill="{color}"><title>{_fmt(e0)} to {_fmt(e1)}: {_fmt(c)}</title></rect>'
        )
    return _svg(width, height, body)


def bar_svg(
    labels: Sequence[str],
    values: Sequence[float | None],
    *,
    title: str = "",
    y_label: str = "",
    y_range: tuple[float, float] | None = None,
    colors: Sequence[str] = PALETTE,
    width: int = 420,
    height: int = 360,
) -> str:
    """One vertical bar per label with its value printed above it; a missing value is labelled n/a."""
    vals = [float(v) if v is not None and math.isfinite(float(v)) else None for v in values]
    finite = [v for v in vals if v is not None]
    lo, hi = y_range or (min(0.0, *finite) if finite else 0.0, max(1.0, *finite) if finite else 1.0)
    fr = _Frame(width, height, (0.0, float(max(1, len(labels)))), (lo, hi))
    body = _axes(fr, title, "", y_label, x_ticks=False)
    bottom = fr.height - fr.margin[2]
    for i, (label, v) in enumerate(zip(labels, vals)):
        x0, x1 = fr.px(i + 0.2), fr.px(i + 0.8)
        cx = (x0 + x1) / 2
        body.append(
            f'<text x="{cx:.1f}" y="{bottom + 16}" text-anchor="middle" {_FONT}>{escape(label)}</text>'
        )
        if v is None:
            body.append(
                f'<text x="{cx:.1f}" y="{bottom - 6}" text-anchor="middle" {_FONT} fill="#666">n/a</text>'
            )
            continue
        y, y0 = fr.py(min(max(v, lo), hi)), fr.py(min(max(0.0, lo), hi))
        body.append(
            f'<rect x="{x0:.1f}" y="{min(y, y0):.1f}" width="{x1 - x0:.1f}" height="{abs(y0 - y):.1f}" '
            f'fill="{colors[i % len(colors)]}"><title>{escape(label)}: {v:.4g}</title></rect>'
        )
        body.append(
            f'<text x="{cx:.1f}" y="{min(y, y0) - 5:.1f}" text-anchor="middle" {_FONT}>{v:.3g}</text>'
        )
    return _svg(width, height, body)
