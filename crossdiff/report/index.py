"""index.html: the headline, the differences, the map of every candidate, the summary, the table of
candidates, the controls and the run's details. Every term is defined once, where first used (terms.py)."""

from __future__ import annotations

import math

from ..analysis.results import VERDICTS
from .answers import answers_html
from .calibration import calibration_html, stability_html
from .figures import map_svg
from .frame import detection, figure, finite, model_name, page, r2_cell, run_title, short_model
from .headline import headline_html
from .htmlkit import badge, data_table, esc, fmt, fmt_bytes, is_num, kv_table
from .plots import bar_svg, histogram_svg
from .terms import Terms

COLUMN_HELP = {
    "latent": "Latent index; click it to open the latent's page",
    "label": "What the latent's strongest firings have in common, computed from its examples (analysis/labels.py)",
    "side": "The model the candidate is exclusive to",
    "behaviour_verdict": "Behavioural verdict (crossdiff verify): difference, shared behaviour, inert, too rare, not verified",
    "behaviour_shift": "Mean shift of its model towards the other when the latent is removed (nats per token)",
    "behaviour_z": "z of the shift against removing random directions of equal norm",
    "behaviour_z_dictionary": "z of the shift against removing other latents' decoder directions at equal norm (measured for differences)",
    "behaviour_gap_closed": "Fraction of the A-B gap on its contexts that removing it closes",
    "behaviour_n_strong": "Strong firings on held-out text (the verification needs at least 4 usable ones)",
    "behaviour_n_contexts": "Contexts the verification scored",
    "behaviour_first_order": "First-order (gradient × activation) estimate of the shift on held-out text, used to rank",
    "behaviour_n_group": "Latents removed together: the candidate and its near-duplicates (decoder cosine ≥ 0.9)",
    "density": "Fraction of analysed tokens on which the latent fires",
    "score": "Ranking score: the RMS norm of the latent's write into its own model",
    "rel_norm": "Relative decoder norm |d_B| / (|d_A| + |d_B|): 0 writes only into A, 1 only into B",
    "functional_share": "Share of the latent's reconstruction effect that lands in B (crossdiff/coder/functional.py)",
    "detection": "Whether a linear probe on the other model's activations detects the context of its strong firings (information only)",
    "probe_auroc": "AUROC of that probe on held-out strong firings",
    "probe_r2": "R² of a probe from the other model for the magnitude of the strong firings; < 0: worse than the mean",
    "mean_act": "Mean activation when firing",
    "p99_act": "99th percentile of the activation when firing",
    "max_act": "Largest activation seen",
    "dec_norm_a": "Decoder norm in model A (normalised units)",
    "dec_norm_b": "Decoder norm in model B (normalised units)",
    "latent_scaling": "Latent Scaling ratio (Minder et al. 2025; same-space pairs only)",
    "steer_verdict": "Steering verdict (crossdiff steer): pass, fail or skipped",
    "steer_effect": "Steering effect: z of the latent's effect against random directions",
    "partition": "DFC partition (a_exclusive, b_exclusive, shared; all shared for a standard crosscoder)",
    "verdict": "The analysis's class: candidate_a / candidate_b, shared or dead",
}
FIRST = ["latent", "label", "side", "behaviour_verdict", "behaviour_shift", "behaviour_z", "behaviour_z_dictionary",
         "behaviour_gap_closed", "behaviour_n_strong", "density", "score", "rel_norm", "functional_share",
         "detection", "probe_auroc", "probe_r2", "mean_act", "p99_act", "max_act", "steer_verdict",
         "steer_effect"]  # fmt: skip
HIDDEN = {"reason", "behaviour_side", "behaviour_null_mean", "behaviour_null_std", "behaviour_gap",
          "behaviour_first_order_contexts", "behaviour_dictionary_null_mean"}  # fmt: skip


def _stat(data, key: str):
    v = data.summary.get(key)
    return data.eval.get(key) if v is None else v


def _card(label: str, value: str, note: str = "") -> str:
    small = f" <small>{esc(note)}</small>" if note else ""
    return (
        f'<div class="card"><div class="k">{esc(label)}</div><div class="v">{esc(value)}{small}</div></div>'
    )


def summary_cards(data, terms: Terms) -> str:
    s, cfg = data.summary, data.cfg
    n_exc = (cfg.get("n_a_exclusive") or 0) + (cfg.get("n_b_exclusive") or 0)
    cards = [
        _card(
            "Latents",
            fmt(s.get("n_latents") or cfg.get("n_latents") or len(data.rows)),
            "DFC" if n_exc else "",
        ),
        _card("FVE A", fmt(_stat(data, "fve_a"))),
        _card("FVE B", fmt(_stat(data, "fve_b"))),
        _card("L0", fmt(_stat(data, "l0")), "latents per token"),
        _card("Never fired", fmt(_stat(data, "dead_fraction")), "of latents, on the analysed tokens"),
    ]
    if s.get("n_tokens_analysed") is not None:
        cards.append(_card("Tokens analysed", fmt(s["n_tokens_analysed"])))
    store = s.get("store") if isinstance(s.get("store"), dict) else {}
    for k, v in store.items():
        if k.endswith("bytes") and is_num(v):
            cards.append(_card("Store size", fmt_bytes(v)))
    splice = s.get("splice") if isinstance(s.get("splice"), dict) else {}
    for m, sp in splice.items():
        if isinstance(sp, dict) and "loss_recovered" in sp:
            cards.append(_card(f"Loss recovered {m.upper()}", fmt(sp["loss_recovered"]), "splice-in"))
    return f'<div class="cards">{"".join(cards)}</div>' + terms.define("fve", "l0", "dead", "splice")


def models_table(data) -> str:
    cfg, splice = data.cfg, data.summary.get("splice") or {}
    rows = []
    for m in ("a", "b"):
        sp = splice.get(m) if isinstance(splice, dict) and isinstance(splice.get(m), dict) else {}
        rows.append([m.upper(), model_name(cfg, data.summary, m), cfg.get(f"layer_{m}"), cfg.get(f"d_{m}"),
                     cfg.get(f"n_{m}_exclusive"), _stat(data, f"fve_{m}"), sp.get("loss_recovered")])  # fmt: skip
    cols = ["model", "id", "layer", "width", "exclusive latents", "FVE", "splice-in loss recovered"]
    return f'<div class="scroll">{data_table(cols, rows)}</div>'


def verdict_table(data) -> str:
    counts = data.summary.get("counts") if isinstance(data.summary.get("counts"), dict) else {}
    if not counts:
        for r in data.rows:
            counts[str(r.get("verdict"))] = counts.get(str(r.get("verdict")), 0) + 1
    order = [v for v in VERDICTS if v in counts] + [v for v in counts if v not in VERDICTS]
    return data_table(["analysis verdict", "latents"], [[(v, badge(v)), counts[v]] for v in order])


def splice_table(data) -> str:
    splice = data.summary.get("splice")
    if not isinstance(splice, dict) or not splice:
        return '<p class="empty">No splice-in evaluation in summary.json.</p>'
    per = {m: v for m, v in splice.items() if isinstance(v, dict)}
    if not per:
        return f'<p class="empty">Splice-in evaluation skipped: {esc(splice.get("skipped", ""))}</p>'
    keys = list(dict.fromkeys(k for v in per.values() for k in v))
    rows = [[m.upper(), *[v.get(k) for k in keys]] for m, v in per.items()]
    return data_table(["model", *keys], rows)


def plots_html(data) -> str:
    rel = [r["rel_norm"] for r in data.rows if finite(r.get("rel_norm"))]
    dens = [r.get("density") for r in data.rows]
    live = [math.log10(d) for d in dens if finite(d) and d > 0]
    dead = sum(1 for d in dens if is_num(d) and d == 0)
    size = {"width": 440, "height": 320}
    short = [f"{m.upper()}: {short_model(model_name(data.cfg, data.summary, m))[:24]}" for m in "ab"]
    figs = [
        figure(histogram_svg(rel, bins=50, value_range=(0.0, 1.0), log_y=True, y_label="latents",
                             title="Relative decoder norm", x_label="|d_B| / (|d_A| + |d_B|)", **size),
               "0: only model A's decoder is used; 1: only model B's. Exclusive DFC latents sit at the ends."),
        figure(histogram_svg(live, bins=40, y_label="latents", title="Latent density",
                             x_label="log10(fraction of tokens fired on)", **size),
               f"Latents that never fired ({dead}) are not drawn."),
        figure(bar_svg(short, [_stat(data, "fve_a"), _stat(data, "fve_b")], title="Fraction of variance explained",
                       y_label="FVE", y_range=(0.0, 1.0), **size), "Held-out reconstruction quality per model."),
    ]  # fmt: skip
    return f'<div class="plots">{"".join(figs)}</div>'


def _columns(data, cands: list[dict]) -> list[str]:
    """FIRST's order, then any other column; a column missing on every row is left out (named below)."""
    present = [c for c in FIRST if c in ("label", "detection") or c in data.columns]
    present += [
        c for c in data.columns if c not in present and c not in HIDDEN and c not in ("partition", "verdict")
    ]
    present += [c for c in ("partition", "verdict") if c in data.columns]
    return [
        c
        for c in present
        if c in ("label", "latent") or any(_value(data, r, c) not in (None, "") for r in cands)
    ]


def _value(data, r: dict, c: str):
    if c == "label":
        return (data.labels.get(int(r["latent"])) or {}).get("label", "")
    if c == "detection":
        return detection(r.get("side"), r.get("probe_auroc"))
    v = r.get(c)
    return None if isinstance(v, float) and math.isnan(v) else v


def candidates_table(data, cands: list[dict]) -> str:
    if not cands:
        return '<p class="empty">No exclusive candidates in latents.csv.</p>'
    cols = _columns(data, cands)
    dropped = [
        c for c in data.columns if c not in cols and c not in HIDDEN and c not in ("partition", "verdict")
    ]
    rows = []
    for r in cands:
        cells = []
        for c in cols:
            v = _value(data, r, c)
            if c == "latent" and is_num(v):  # an id, not a quantity: no thousands separator
                link = f'<a href="features/{v}.html">{v}</a>' if v in data.paged else str(v)
                cells.append((v, link))
            elif c in ("partition", "verdict", "behaviour_verdict") and v:
                cells.append((str(v), badge(v)))
            elif c == "side":
                cells.append(str(v or "").upper())
            elif c == "probe_r2":
                cells.append(r2_cell(v))
            elif isinstance(v, str) and len(v) > 24:
                cells.append((v, f'<div class="long">{esc(v)}</div>'))
            else:
                cells.append(v)
        rows.append(cells)
    titles = {
        c: COLUMN_HELP.get(c, f"{c}: a column of latents.csv or a later stage's file, as written")
        for c in cols
    }
    table = data_table(
        cols, rows, cls="sortable", table_id="candidates", titles=titles, sorted_by=("score", "descending")
    )
    toolbar = (
        '<div class="toolbar"><input type="search" placeholder="Filter rows (e.g. difference)" '
        'data-filter="candidates" data-count="candidates-count" aria-label="filter the candidates table">'
        f'<span id="candidates-count" class="muted">{len(cands)} rows</span></div>'
    )
    note = (
        f'<p class="muted">Columns with no value on any row: {esc(", ".join(dropped))}.</p>'
        if dropped
        else ""
    )
    return f'{toolbar}<div class="scroll tall">{table}</div>{note}'


def differences_table(data) -> str:
    rows = []
    for b in sorted(
        data.behaviour.values(), key=lambda b: -(b.get("gap_closed") if finite(b.get("gap_closed")) else -1)
    ):
        if b.get("verdict") != "difference":
            continue
        j = int(b["latent"])
        link = (str(j), f'<a href="features/{j}.html">{j}</a>' if j in data.paged else str(j))
        label = (data.labels.get(j) or {}).get("label", "")
        steer = next((r.get("steer_verdict") for r in data.rows if r.get("latent") == j), None)
        rows.append([link, (label, f'<div class="long">{esc(label)}</div>'), str(b.get("side", "")).upper(),
                     b.get("shift"), b.get("z"), b.get("z_dictionary"), b.get("gap_closed"), b.get("n_contexts"), steer])  # fmt: skip
    if not rows:
        return ""
    cols = [
        "latent",
        "label",
        "model",
        "shift (nats/token)",
        "z",
        "z against the dictionary",
        "gap closed",
        "contexts",
        "steering",
    ]
    return f'<div class="scroll">{data_table(cols, rows)}</div>'


def index_html(data, cands: list[dict]) -> str:
    a, b = model_name(data.cfg, data.summary, "a"), model_name(data.cfg, data.summary, "b")
    cfg, terms = data.cfg, Terms()
    layers = f"layers {fmt(cfg.get('layer_a'))} and {fmt(cfg.get('layer_b'))}"
    others = sorted(set(data.features) - {r["latent"] for r in cands})
    parts = [
        f'<header class="top"><h1>crossdiff report</h1><p class="sub">{esc(a)} (A) vs {esc(b)} (B), '
        f"{esc(layers)} · <code>{esc(run_title(data.run))}</code></p></header>",
        "<h2>What this diff found</h2>",
        headline_html(data, data.labels),
        terms.define(
            "candidate",
            "difference",
            "too rare",
            "not verified",
            "inert",
            "shared behaviour",
            "z",
            "ell",
            "z_dictionary",
            "gap",
            "shift",
            "gap_closed",
            "gap_share",
        ),  # fmt: skip
    ]
    if getattr(data, "answers", None):
        names = {"a": short_model(a), "b": short_model(b)}
        parts += [
            "<h2>What the models say</h2>",
            answers_html(
                data.answers,
                names,
                data.behaviour,
                data.paged,
                {g["ngram"]: list(g["members"]) for g in data.link_groups.values()},
            ),
        ]
    diffs = differences_table(data)
    if diffs:
        parts += ["<h2>Behavioural differences</h2>", diffs]
    if data.behaviour:
        parts += ["<h2>Where every candidate lies</h2>",
                  figure(map_svg(cands), "Each dot is a candidate. Above the dashed line (z = 3) the shift beats "
                         "random directions; the strip below the axis holds the candidates never judged, at their density."),
                  terms.define("density")]  # fmt: skip
    parts += [
        "<h2>Dictionary</h2>",
        summary_cards(data, terms),
        "<h3>Models</h3>",
        models_table(data),
        '<div class="two"><div><h3>Latents per analysis verdict</h3>',
        verdict_table(data),
        "</div><div><h3>Splice-in evaluation</h3>",
        splice_table(data),
        "</div></div>",
        plots_html(data),
        terms.define("rel_norm"),
        f"<h2>Candidates ({len(cands)})</h2>",
        '<p class="muted">The latents that may belong to one model only: an exclusive partition, a one-sided '
        "decoder norm or functional share, or a link to what one model says (the answers stage). Click a "
        "column header to sort, a latent to open its page. Hover a header for what the column means.</p>",
        candidates_table(data, cands),
        terms.define("auroc", "strong", "density"),
    ]
    if others:
        links = ", ".join(f'<a href="features/{i}.html">{i}</a>' for i in others)
        parts += ["<h3>Other latents with a page (shared references)</h3>", f"<p>{links}</p>"]
    if isinstance(data.stability, dict):
        parts += ["<h2>Seed stability</h2>", stability_html(data.stability, data.labels)]
    parts.append("<h2>Calibration</h2>")
    if data.calibration is not None:
        parts.append(calibration_html(data.calibration))
    else:
        parts.append(
            '<p class="empty">Not run: <code>crossdiff calibrate --out DIR</code> adds the controls (docs/calibration.md).</p>'
        )
    details = {k: v for k, v in data.summary.items() if k in ("thresholds", "run", "store")}
    ev = {
        (f"{k} (held-out sample of training's evaluation)" if k.startswith("dead_fraction") else k): v
        for k, v in data.eval.items()
    }
    details.update({"crosscoder (cfg.json)": data.cfg, "evaluation (eval.json)": ev})
    parts += ["<h2>Run details</h2>", "<details><summary>Thresholds, run settings, store and configuration</summary>",
              kv_table((k, v) for k, v in details.items() if v), "</details>"]  # fmt: skip
    return page(f"crossdiff report: {a} vs {b}", "\n".join(parts), "assets/")
