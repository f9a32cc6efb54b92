"""features/<latent>.html: one latent's evidence, in the order a sceptic asks for it: its label and
verdict, what removing it does (against its nulls, per context), what each model predicts where it
fires, its examples (top, de-duplicated, outliers flagged; then sampled across its activation range,
coloured per token), its logit lens when coherent, its statistics, and steering."""

from __future__ import annotations

import math

from ..analysis.labels import context_key
from .figures import contexts_svg, dose_svg, null_svg
from .frame import (
    analysis_verdict_label,
    detection,
    figure,
    finite,
    model_name,
    num,
    page,
    read_json,
    side_label,
)
from .htmlkit import badge, data_table, esc, fmt, kv_table, render_any, visible_ws
from .terms import Terms

OUTLIER = 4.0  # an example above this × p99 is flagged (terms.py "outlier")
_MAX_TEXT = 2000  # characters of context kept on each side of an example's firing token
_LEVELS = 8  # activation colour classes .a1 .. .a8 (report.css; the CSP forbids inline styles)


def _clip(s, left: bool) -> str:
    s = "" if s is None else str(s)
    if len(s) <= _MAX_TEXT:
        return s
    return "…" + s[-_MAX_TEXT:] if left else s[:_MAX_TEXT] + "…"


def coloured_text(ex: dict, vmax: float) -> str:
    """The example's text with each aligned token coloured by the latent's activation on it
    ("acts" from analysis/examples.py), the firing token outlined; plain with <mark> without acts."""
    before, token, after = (str(ex.get(k) or "") for k in ("text_before", "text_token", "text_after"))
    acts = ex.get("acts") if isinstance(ex.get("acts"), list) else None
    if not acts or len(before) > _MAX_TEXT or len(after) > _MAX_TEXT:
        return f"{esc(_clip(before, True))}<mark>{esc(token)}</mark>{esc(_clip(after, False))}"
    text, out, at = before + token + after, [], 0
    fire = (len(before), len(before) + len(token))
    for s, e, v in sorted((int(a[0]), int(a[1]), float(a[2])) for a in acts if len(a) == 3):
        if s < at or e <= s:
            continue
        out.append(esc(text[at:s]))
        level = 0 if v <= 0 or vmax <= 0 else min(_LEVELS, max(1, math.ceil(_LEVELS * v / vmax)))
        cls = f"act a{level}" + (" fire" if (s, e) == fire else "")
        out.append(f'<span class="{cls}" title="activation {esc(fmt(v))}">{esc(text[s:e])}</span>')
        at = e
    out.append(esc(text[at:]))
    return "".join(out)


def example_html(ex: dict, data, vmax: float = 0.0, p99=None, count: int = 1) -> str:
    meta = [f"<b>activation {esc(fmt(ex.get('value')))}</b>"]
    if finite(p99) and finite(ex.get("value")) and ex["value"] > OUTLIER * p99:
        meta.append(f'<span class="badge outlier">outlier: {ex["value"] / p99:.0f}× p99</span>')
    if ex.get("quantile") is not None:
        meta.append(
            f"quantile {esc(fmt(round(100 * ex['quantile'])))}% of a sample of {esc(fmt(ex.get('sample_size')))}"
        )
    if count > 1:
        meta.append(f'<span class="badge dup">same context ×{count}</span>')
    meta += [f"{esc(k)} {esc(fmt(ex[k]))}" for k in ("source", "doc", "row") if ex.get(k) is not None]
    role = ""
    if ex.get("role"):  # a conversation: the example is a turn, shown with its speaker (evidence.py)
        meta.insert(1, f"<b>{esc(ex['role'])}</b> turn {esc(fmt(ex.get('turn')))}")
        role = f'<span class="who">{esc(str(ex["role"]).capitalize())}:</span> '
    toks = []
    for m in ("a", "b"):
        tokens = ex.get(f"tokens_{m}")
        if isinstance(tokens, list) and tokens:
            spans = "".join(
                f'<span class="tok{" hl" if isinstance(t, dict) and t.get("highlight") else ""}">'
                f"{visible_ws(t.get('text', '') if isinstance(t, dict) else t)}</span>"
                for t in tokens
            )
            name = model_name(data.cfg, data.summary, m) if data is not None else f"model {m}"
            who = f'<span class="who" title="{esc(name)}">{m.upper()} tokens</span>'
            toks.append(f'<div class="toks">{who}{spans}</div>')
    return (
        f'<div class="example"><div class="meta">{" · ".join(meta)}</div>'
        f'<div class="text">{role}{coloured_text(ex, vmax)}</div>{"".join(toks)}</div>'
    )


def examples_html(examples: list[dict], data, p99, vmax: float, limit: int) -> str:
    """Examples with identical contexts collapsed into one (its count shown)."""
    groups: dict[tuple, list[dict]] = {}
    for e in examples:
        groups.setdefault(context_key(e), []).append(e)
    shown = list(groups.values())[:limit]
    html = [example_html(g[0], data, vmax, p99, len(g)) for g in shown]
    return "".join(html) or '<p class="empty">No examples.</p>'


def lens_html(lens: dict, data, terms: Terms) -> str:
    m = str(lens.get("model", "")).lower()
    who = (
        f"model {m.upper()} ({model_name(data.cfg, data.summary, m)})"
        if m in ("a", "b")
        else "the unembedding"
    )
    tables = []
    for key in ("promoted", "suppressed"):
        pairs = [p for p in lens.get(key) or [] if isinstance(p, list | tuple) and p]
        body = "".join(
            f'<tr><td class="tokcell">{visible_ws(p[0])}</td><td class="num">{esc(num(p[1] if len(p) > 1 else None))}</td></tr>'
            for p in pairs
        )
        body = body or '<tr><td class="empty">none</td></tr>'
        tables.append(
            f'<table class="lens"><thead><tr><th>{key}</th><th>logit</th></tr></thead><tbody>{body}</tbody></table>'
        )
    lists = f'<div class="two">{"".join(tables)}</div>'
    if "units" not in lens:
        note = (f"Read through {who} in raw units (an older analysis): not comparable across models and not "
                "checked against random directions. Rerun crossdiff analyze for a lens in the model's own units.")  # fmt: skip
        return f"<details><summary>{esc(note)}</summary>{lists}</details>"
    if not lens.get("coherent"):
        note = (f"Not shown: read through {who}, its top token ({num(_first(lens), 2)}) does not beat the best "
                f"of 16 other latents' decoder directions at the same norm ({num(lens.get('null_top'), 2)}); it would be noise.")  # fmt: skip
        return f"<details><summary>{esc(note)}</summary>{lists}</details>" + terms.define("lens")
    note = f'<p class="muted">Read through {esc(who)}; the best of 16 other latents’ directions at the same norm reaches {esc(num(lens.get("null_top")))}.</p>'
    return note + lists + terms.define("lens")


def _first(lens: dict):
    p = lens.get("promoted") or []
    return p[0][1] if p and len(p[0]) > 1 else None


def _nulls(doc: dict) -> dict[str, list[float]]:
    ctx = [c for c in doc.get("contexts") or [] if isinstance(c, dict)]
    out = {}
    for key, name in (("random_shifts", "random"), ("dictionary_shifts", "dictionary")):
        rows = [c[key] for c in ctx if isinstance(c.get(key), list)]
        if rows and len(rows) == len(ctx) and len({len(r) for r in rows}) == 1:
            out[name] = [sum(col) / len(rows) for col in zip(*rows)]
    return out


def behaviour_html(latent: int, data, terms: Terms) -> str:
    b = data.behaviour.get(latent, {})
    keys = (
        "verdict",
        "shift",
        "z",
        "z_dictionary",
        "gap_closed",
        "null_mean",
        "null_std",
        "n_strong",
        "n_contexts",
        "first_order",
    )
    head = kv_table((k, b[k]) for k in keys if finite(b.get(k)) or isinstance(b.get(k), str) and b[k])
    doc = read_json(data.contexts[latent]) if latent in data.contexts else None
    parts = [head, terms.define("ell", "gap", "shift", "z", "z_dictionary", "gap_closed", "strong")]
    if not doc:
        return "".join(parts)
    nulls = _nulls(doc)
    figs = []
    if nulls and finite(b.get("shift")):
        figs.append(figure(null_svg(b["shift"], nulls), "Each grey dot: removing one null direction instead "
                           "(its shift averaged over the same contexts). Red: removing the latent."))  # fmt: skip
    if doc.get("contexts"):
        figs.append(figure(contexts_svg(doc["contexts"]), "Red: the latent's shift on one context; grey: the "
                           "range of the random directions' shifts there."))  # fmt: skip
    parts.append(f'<div class="plots">{"".join(figs)}</div>')
    rows = []
    for c in doc.get("contexts") or []:
        text = f"…{str(c.get('text_before', ''))[-80:]}⟦{c.get('scored', '')}⟧"
        rows.append([(text, esc(text)), c.get("f"), c.get("n_tokens"), c.get("l_own"), c.get("l_other"),
                     c.get("l_ablated"), c.get("shift"), c.get("first_order")])  # fmt: skip
    if rows:
        m = side_label(b.get("side") or doc.get("side")) or "own"
        cols = ["context (scored in ⟦ ⟧)", "f", "tokens", f"ℓ {m}", f"ℓ {'A' if m == 'B' else 'B'}",
                f"ℓ {m}, latent removed", "shift", "first order"]  # fmt: skip
        parts += [f'<div class="scroll">{data_table(cols, rows)}</div>', terms.define("ell", "gap")]
    return "".join(parts)


def _token_list(tokens) -> tuple[str, str]:
    """(sort key, cell html) of a list of [token, probability] pairs."""
    tokens = [t for t in tokens or [] if isinstance(t, list | tuple) and len(t) > 1]
    html = "<br>".join(f'<span class="tokcell">{visible_ws(t[0])}</span> {esc(num(t[1], 3))}' for t in tokens)
    return " ".join(str(t[0]) for t in tokens), html


def predictions_html(pred: dict, data) -> str:
    own = side_label(pred.get("side"))
    rows = []
    for c in pred.get("contexts") or []:
        before = str(c.get("text_before", ""))
        rows.append([(before, f'<div class="long">…{esc(before[-70:])}</div>'), _token_list(c.get("a")),
                     _token_list(c.get("b")), _token_list(c.get("ablated"))])  # fmt: skip
    cols = ["context (up to the firing token)", "A predicts", "B predicts", f"{own} with the latent removed"]
    parts = [
        f'<p class="muted">At the firing token of each verified context: each model\'s top next tokens with '
        f"their probabilities, and {esc(own)}'s once the latent is removed at every position. If removing it "
        f"moves {esc(own)} towards the other model, the last column looks more like the other model's.</p>",
        f'<div class="scroll">{data_table(cols, rows)}</div>',
    ]
    eff = pred.get("token_effects") or []
    if eff:
        erow = [
            [(str(t[0]), f'<span class="tokcell">{visible_ws(t[0])}</span>'), t[1]] for t in eff if len(t) > 1
        ]
        parts += [f"<h3>Token effects of removing it ({esc(own)}, mean Δ log p over the contexts)</h3>",
                  data_table(["token", "Δ log p (negative: the latent promotes it)"], erow)]  # fmt: skip
    return "".join(parts)


STEER_FIRST = ("strengths", "dlogprob", "dlogprob_null_mean", "dlogprob_null_std", "dlogprob_z", "kl",
               "kl_null_mean", "kl_null_std", "kl_z")  # fmt: skip


def steering_html(doc: dict) -> str:
    """Steering in the order steer.py writes its meaning (files are saved with sorted keys)."""
    if not isinstance(doc, dict):
        return render_any(doc)
    parts = []
    svg = dose_svg(doc)
    if svg:
        parts.append(figure(svg, "Red: Δ log p of the latent's contexts when its direction is added at strength α; "
                         "grey band: random directions of the same norm, mean ± 2 sd."))  # fmt: skip
    cols = [
        k
        for k in STEER_FIRST
        if isinstance(doc.get(k), list) and len(doc[k]) == len(doc.get("strengths") or [])
    ]
    if "strengths" in cols:
        parts.append(f'<div class="scroll">{data_table(cols, list(zip(*(doc[k] for k in cols))))}</div>')
    head = [
        k
        for k in ("verdict", "verdict_rule", "effect_size", "model", "layer", "typical_activation")
        if k in doc
    ]
    parts.append(kv_table((k, doc[k]) for k in head))
    rest = {k: v for k, v in doc.items() if k not in cols and k not in head}
    if rest:
        parts.append(
            f"<details><summary>Generations, null draws and the rest of the file</summary>{render_any(rest)}</details>"
        )
    return "".join(parts)


def feature_html(latent: int, feat: dict, data, row: dict | None, nav: tuple, max_examples: int) -> str:
    row, terms = row or {}, Terms()
    stats = feat.get("stats") if isinstance(feat.get("stats"), dict) else row
    side = row.get("side") or stats.get("side") or ""
    what = analysis_verdict_label(
        feat.get("verdict") or row.get("verdict"), side, feat.get("partition") or row.get("partition")
    )
    bv = (data.behaviour.get(latent) or {}).get("verdict")
    label = (data.labels.get(latent) or {}).get("label", "")
    det = detection(side, stats.get("probe_auroc"))
    parts = [
        '<header class="top"><div class="crumbs"><a href="../index.html">← crossdiff report</a></div>'
        f"<h1>Latent {latent}{' · ' + esc(label) if label else ''}</h1>"
        f'<p class="sub">{esc(what)}{" · " + badge(bv) if bv else ""}{" · " + esc(det) if det else ""}</p></header>',
    ]
    group = data.link_groups.get(latent)
    if group:
        others = ", ".join(f'<a href="{k}.html">{k}</a>' for k in group["members"][1:])
        parts.append(f"<p>Linked to what {side_label(group['side'])} says: “{esc(group['ngram'])}”; verified as one "
                     f"candidate{' with latents ' + others if others else ''}, removed together on the lead-up of the "
                     "n-gram's occurrences in the answers (docs/verification.md).</p>")  # fmt: skip
    examples = [e for e in feat.get("examples") or [] if isinstance(e, dict)]
    quant = [e for e in feat.get("quantile_examples") or [] if isinstance(e, dict)]
    p99, mx = stats.get("p99_act"), stats.get("max_act")
    if finite(p99) and finite(mx) and p99 > 0 and mx > OUTLIER * p99:
        parts.append(f'<p class="warn">Its top activation ({num(mx)}) is {mx / p99:.0f}× its 99th percentile '
                     f"({num(p99)}): the top examples are rare extremes; the sampled examples below show typical firings.</p>"
                     + terms.define("outlier"))  # fmt: skip
    if latent in data.behaviour or latent in data.contexts:
        parts += ["<h2>What removing it does</h2>", behaviour_html(latent, data, terms)]
    if latent in data.predictions:
        parts += [
            "<h2>What each model predicts where it fires</h2>",
            predictions_html(data.predictions[latent], data),
        ]
    vmax = max([e.get("value") for e in examples + quant if finite(e.get("value"))] or [0.0])
    if not feat:  # verified, with no evidence file: a linked n-gram's group the analysis did not select
        parts.append('<p class="muted">No top examples: the analysis writes them for its candidates. This '
                     "latent was verified because the answers link it to an n-gram; the contexts above are "
                     "that n-gram's occurrences in the answers (docs/answers.md).</p>")  # fmt: skip
    else:
        parts += [f"<h2>Top examples ({min(len(examples), max_examples)} of {len(examples)}, identical contexts collapsed)</h2>",
                  examples_html(examples, data, p99, vmax, max_examples)]  # fmt: skip
    if quant:
        parts += [f"<h2>Examples across its activation range ({len(quant)})</h2>",
                  '<p class="muted">Drawn at evenly spaced quantiles of a uniform random sample of its firings; '
                  "each token coloured by the latent's activation on it (darker: stronger; scale shared by the page).</p>",
                  examples_html(quant, data, p99, vmax, len(quant))]  # fmt: skip
    if isinstance(feat.get("logit_lens"), dict):
        parts += ["<h2>Logit lens</h2>", lens_html(feat["logit_lens"], data, terms)]
    parts += ['<div class="two"><div><h2>Statistics</h2>', kv_table((k, v) for k, v in stats.items() if k not in ("latent", "reason")),
              terms.define("density", "rel_norm", "auroc"), "</div><div><h2>Activation histogram</h2>",
              _feature_hist(feat.get("histogram")), "</div></div>"]  # fmt: skip
    steer = read_json(data.steering[latent]) if latent in data.steering else None
    if steer is not None:
        parts += ["<h2>Steering</h2>", steering_html(steer)]
    prev, nxt = nav
    parts.append(
        '<nav class="pager">'
        + (f'<a href="{prev}.html">← latent {prev}</a>' if prev is not None else "<span></span>")
        + (f'<a href="{nxt}.html">latent {nxt} →</a>' if nxt is not None else "<span></span>")
        + "</nav>"
    )
    return page(
        f"Latent {latent}{' · ' + label if label else ''} · crossdiff report", "\n".join(parts), "../assets/"
    )


def _feature_hist(h) -> str:
    from .plots import binned_histogram_svg

    if not isinstance(h, dict) or not h.get("counts"):
        return '<p class="empty">No histogram.</p>'
    try:
        edges, counts, label = hist_view([float(e) for e in h["edges"]], [float(c) for c in h["counts"]])
        svg = binned_histogram_svg(edges, counts, x_label=label, y_label="tokens", log_y=True, height=300)
    except (ValueError, TypeError, KeyError) as e:
        return f'<p class="empty">Histogram not drawable: {esc(e)}</p>'
    return figure(
        svg, "Activation when firing" + ("; log-spaced bins on a log axis." if "log" in label else ".")
    )


def hist_view(edges: list[float], counts: list[float]) -> tuple[list[float], list[float], str]:
    """Log-spaced edges (analyze uses 1e-3..1e3 for every latent) -> log10 axis; trim empty end bins."""
    label = "activation"
    if len(edges) > 2 and edges[0] > 0 and edges[-1] / edges[0] > 100:
        ratios = [b / a for a, b in zip(edges, edges[1:])]
        if max(ratios) / min(ratios) < 1.01:  # geometric spacing
            edges, label = [math.log10(e) for e in edges], "log10(activation)"
    nz = [i for i, c in enumerate(counts) if c > 0]
    if nz and len(edges) == len(counts) + 1:
        lo, hi = max(0, nz[0] - 1), min(len(counts), nz[-1] + 2)
        edges, counts = edges[lo : hi + 1], counts[lo:hi]
    return edges, counts, label
