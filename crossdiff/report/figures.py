"""The evidence as pictures (static SVG, drawn here from the run's files; no plotting dependency).

null_svg        a candidate's shift against its null distributions (random directions, and the
                dictionary's own directions when measured): one dot per null direction
contexts_svg    the shift on each scored context, with the range of the random directions' shifts
dose_svg        steering dose-response: the latent's Δ log-prob per strength, the null's mean ± 2 sd band
map_svg         every candidate: firing density vs z, coloured by behavioural verdict; candidates
                never judged (too rare, not verified) on a strip below the axis
"""

from __future__ import annotations

import math
from html import escape

from .plots import _FONT, _axes, _Frame, _svg, nice_ticks

VERDICT_COLOURS = {
    "difference": "#d62728",
    "shared behaviour": "#2ca02c",
    "inert": "#7f7f7f",
    "too rare": "#c7a0d8",
    "not verified": "#ff9f40",
    "": "#bbbbbb",
}


def _range(values: list[float], pad: float = 0.08, include: tuple = ()) -> tuple[float, float]:
    vals = [v for v in [*values, *include] if math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    return lo - pad * span, hi + pad * span


def _dot(x: float, y: float, colour: str, tip: str, r: float = 3.5, opacity: float = 0.75) -> str:
    return (
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colour}" fill-opacity="{opacity}">'
        f"<title>{escape(tip)}</title></circle>"
    )


def _vline(fr: _Frame, x: float, colour: str, label: str) -> list[str]:
    px, top, bottom = fr.px(x), fr.margin[0], fr.height - fr.margin[2]
    right = px + 8 + 7 * len(label) < fr.width - fr.margin[1]  # else the label goes left of the line
    lx, anchor = (px + 4, "start") if right else (px - 4, "end")
    return [
        f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="{colour}" stroke-width="2.5"/>',
        f'<text x="{lx:.1f}" y="{top + 14}" text-anchor="{anchor}" fill="{colour}" {_FONT} font-weight="bold">{escape(label)}</text>',
    ]


def null_svg(shift: float, nulls: dict[str, list[float]], width: int = 560, height: int = 250) -> str:
    """`nulls`: {name: the null's per-direction mean shifts}; one row of dots per null."""
    names = [k for k, v in nulls.items() if v]
    allv = [v for k in names for v in nulls[k]]
    fr = _Frame(width, height, _range(allv, include=(shift, 0.0)), (0.0, len(names) + 0.0), (40, 20, 50, 110))
    title, x_label = "Shift: the latent vs its nulls", "shift towards the other model (nats / token)"
    body = _axes(fr, title, x_label, "", y_ticks=False)
    for i, name in enumerate(names):
        yc = fr.py(len(names) - i - 0.5)
        body.append(
            f'<text x="{fr.margin[3] - 8}" y="{yc + 4:.1f}" text-anchor="end" {_FONT}>{escape(name)}</text>'
        )
        for k, v in enumerate(nulls[name]):
            jitter = ((k * 7919) % 13 - 6) * 2.2
            body.append(_dot(fr.px(v), yc + jitter, "#7f7f7f", f"{name} direction {k}: {v:.4g}"))
    body += _vline(fr, shift, "#d62728", f"latent {shift:+.3g}")
    return _svg(width, height, body)


def contexts_svg(contexts: list[dict], width: int = 560, height: int = 280) -> str:
    """One column per context (largest shift first): the latent's shift (red) and the span of the
    random directions' shifts on that context (grey bar)."""
    ctx = sorted(
        (c for c in contexts if isinstance(c, dict) and isinstance(c.get("shift"), int | float)),
        key=lambda c: -c["shift"],
    )
    lows = [min(c.get("random_shifts") or [c["shift"]]) for c in ctx]
    highs = [max(c.get("random_shifts") or [c["shift"]]) for c in ctx]
    ys = [c["shift"] for c in ctx] + lows + highs
    fr = _Frame(width, height, (0.0, float(max(1, len(ctx)))), _range(ys, include=(0.0,)), (40, 20, 50, 60))
    body = _axes(
        fr, "Shift on each scored context", "contexts, largest shift first", "nats / token", x_ticks=False
    )
    y0 = fr.py(0.0)
    body.append(
        f'<line x1="{fr.margin[3]}" y1="{y0:.1f}" x2="{width - fr.margin[1]}" y2="{y0:.1f}" stroke="#444"/>'
    )
    for i, (c, lo, hi) in enumerate(zip(ctx, lows, highs)):
        x = fr.px(i + 0.5)
        body.append(
            f'<line x1="{x:.1f}" y1="{fr.py(lo):.1f}" x2="{x:.1f}" y2="{fr.py(hi):.1f}" stroke="#bbb" stroke-width="7">'
            f"<title>random directions: {lo:.3g} to {hi:.3g}</title></line>"
        )
        tip = f"…{str(c.get('text_before') or '')[-40:]}⟦{c.get('scored') or ''}⟧: shift {c['shift']:.3g}"
        body.append(_dot(x, fr.py(c["shift"]), "#d62728", tip, r=4, opacity=0.9))
    return _svg(width, height, body)


def dose_svg(doc: dict, width: int = 560, height: int = 300) -> str | None:
    """Steering dose-response from RUN/steering/<latent>.json (steer.py's strengths, dlogprob and its
    null mean / std per strength); None when the file lacks them."""
    xs, ys = doc.get("strengths"), doc.get("dlogprob")
    mu, sd = doc.get("dlogprob_null_mean"), doc.get("dlogprob_null_std")
    if not (isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys) >= 2):
        return None
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if isinstance(y, int | float) and math.isfinite(y)]
    band = []
    if isinstance(mu, list) and isinstance(sd, list) and len(mu) == len(sd) == len(xs):
        band = [(float(x), m - 2 * s, m + 2 * s) for x, m, s in zip(xs, mu, sd) if None not in (m, s)]
    fr = _Frame(
        width,
        height,
        _range([p[0] for p in pts], 0.04),
        _range([p[1] for p in pts] + [b for _, lo, hi in band for b in (lo, hi)]),
        (40, 20, 50, 64),
    )
    body = _axes(fr, "Steering dose-response", "strength α (× typical activation)", "Δ log p of its contexts")
    if band:
        poly = [f"{fr.px(x):.1f},{fr.py(hi):.1f}" for x, _, hi in band] + [
            f"{fr.px(x):.1f},{fr.py(lo):.1f}" for x, lo, _ in reversed(band)
        ]
        body.append(
            f'<polygon points="{" ".join(poly)}" fill="#999" fill-opacity="0.3"><title>random directions: mean ± 2 sd</title></polygon>'
        )
    path = " ".join(f"{fr.px(x):.1f},{fr.py(y):.1f}" for x, y in pts)
    body.append(f'<polyline points="{path}" fill="none" stroke="#d62728" stroke-width="2"/>')
    body += [_dot(fr.px(x), fr.py(y), "#d62728", f"α {x:g}: {y:.4g}", opacity=1) for x, y in pts]
    return _svg(width, height, body)


def map_svg(rows: list[dict], width: int = 620, height: int = 380) -> str:
    """Candidates: x = log10 density, y = behaviour z; the never-judged on a strip under the axis."""
    judged, strip = [], []
    for r in rows:
        d = r.get("density")
        if not (isinstance(d, int | float) and d > 0):
            continue
        z = r.get("behaviour_z")
        v = str(r.get("behaviour_verdict") or "")
        if isinstance(z, int | float) and math.isfinite(z):
            judged.append((math.log10(d), z, v, r))
        else:
            strip.append((math.log10(d), v or "not verified", r))
    xs = [p[0] for p in judged] + [p[0] for p in strip]
    zs = [p[1] for p in judged]
    fr = _Frame(width, height, _range(xs, 0.05), _range(zs, include=(0.0, 3.0)), (40, 20, 100, 96))
    body = _axes(
        fr,
        "Every candidate: how often it fires vs its evidence",
        "log10(density)",
        "z against random directions",
    )
    y3 = fr.py(3.0)
    body.append(
        f'<line x1="{fr.margin[3]}" y1="{y3:.1f}" x2="{width - fr.margin[1]}" y2="{y3:.1f}" stroke="#d62728" stroke-dasharray="4 3"/>'
    )
    body.append(
        f'<text x="{width - fr.margin[1] - 4}" y="{y3 - 4:.1f}" text-anchor="end" fill="#d62728" {_FONT}>z = 3</text>'
    )
    for x, z, v, r in judged:
        body.append(
            _dot(
                fr.px(x),
                fr.py(z),
                VERDICT_COLOURS.get(v, "#444"),
                f"latent {r.get('latent')}: {v}, z {z:.3g}",
            )
        )
    ys = fr.height - fr.margin[2] + 30
    body.append(f'<text x="{fr.margin[3] - 6}" y="{ys + 4}" text-anchor="end" {_FONT}>never judged:</text>')
    for k, (x, v, r) in enumerate(strip):
        body.append(
            _dot(
                fr.px(x),
                ys + ((k * 7919) % 7 - 3) * 2,
                VERDICT_COLOURS.get(v, "#bbb"),
                f"latent {r.get('latent')}: {v}",
            )
        )
    lx = fr.margin[3]
    for v in ("difference", "shared behaviour", "inert", "too rare", "not verified"):
        body.append(f'<circle cx="{lx + 4}" cy="{height - 36}" r="4" fill="{VERDICT_COLOURS[v]}"/>')
        body.append(f'<text x="{lx + 12}" y="{height - 32}" {_FONT}>{escape(v)}</text>')
        lx += 24 + 7 * len(v)
    return _svg(width, height, body)


__all__ = ["null_svg", "contexts_svg", "dose_svg", "map_svg", "nice_ticks", "VERDICT_COLOURS"]
