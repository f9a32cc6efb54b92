"""`crossdiff report`: a static HTML report of an analysed run, readable from disk (no server, no network).

Layout written to RUN/report/ (built in a temporary folder next to it, then renamed into place):
    index.html               summary, plots, the sortable table of exclusive candidates, calibration
    features/<latent>.html   one page per feature: top examples, activation histogram, logit lens, steering
    assets/report.css, assets/report.js   shared style and the table-sorting script (crossdiff/report/templates)

Inputs (all written by `crossdiff train` / `crossdiff analyze`; every key is optional except the
analysis folder and its latents.csv): RUN/cfg.json, RUN/eval.json, RUN/analysis/{latents.csv,
summary.json, features/<latent>.json}, read through crossdiff.analysis.results (which joins
RUN/steering/verdicts.csv by latent id), and, when present, RUN/steering/<latent>.json and
RUN/calibration.json (or the diff folder's, RUN/../calibration.json, from `crossdiff calibrate`; a
table of the controls, docs/calibration.md), the steering files rendered generically since their schema may
grow. docs/report.md has details.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..analysis.results import VERDICTS, is_candidate, load_results
from ..analysis.verify import read_behaviour
from ..core.errors import CrossdiffError
from ..core.lock import writes
from .htmlkit import badge, data_table, esc, fmt, fmt_bytes, is_num, kv_table, render_any, visible_ws
from .plots import bar_svg, binned_histogram_svg, histogram_svg

ASSETS = ("report.css", "report.js")
COLUMN_HELP = {
    "latent": "Latent index; click it to open the feature's page",
    "partition": "DFC partition (a_exclusive, b_exclusive, shared; all shared for a standard crosscoder)",
    "side": "The model a candidate is exclusive to (a or b), by its partition or relative norm; empty otherwise",
    "verdict": "The analysis's class: candidate_a / candidate_b (exclusive candidates), shared or dead",
    "reason": "Whether the other model detects the context of the candidate's strong firings (information only)",
    "behaviour_verdict": "Behavioural verdict (crossdiff verify): difference, shared behaviour, inert, too rare, not verified",
    "behaviour_shift": "Mean shift of its model towards the other when the latent is ablated (nats per token)",
    "behaviour_z": "z of the shift against ablating random directions of equal norm",
    "behaviour_z_dictionary": "For a difference: z of the shift against ablating other latents' decoder directions at equal norm (information)",
    "behaviour_gap_closed": "Fraction of the A-B gap on its contexts that ablating it closes",
    "behaviour_first_order": "First-order (gradient x activation) estimate of the shift on held-out text",
    "score": "Ranking score (the exclusive decoder norm for a DFC)",
    "rel_norm": "Relative decoder norm |d_B| / (|d_A| + |d_B|): <= 0.1 A-only, >= 0.9 B-only",
    "dec_norm_a": "Decoder norm in model A (normalised units)",
    "dec_norm_b": "Decoder norm in model B (normalised units)",
    "density": "Fraction of analysed tokens on which the latent fires",
    "mean_act": "Mean activation when firing",
    "max_act": "Largest activation seen",
    "p99_act": "99th percentile of the activation when firing",
    "probe_r2": "R² of a probe from the other model for the magnitude of the strong firings (context information)",
    "probe_auroc": "AUROC of a probe from the other model for the strong firings (context information)",
    "latent_scaling": "Latent Scaling ratio (Minder et al. 2025; same-space pairs only)",
    "steer_verdict": "Steering verdict (crossdiff steer, RUN/steering/verdicts.csv): pass, fail or skipped",
    "steer_effect": "Steering effect size: z-score of the latent's effect against random directions",
}
_MAX_TEXT = 2000  # characters of context kept on each side of an example's firing token


@dataclass(frozen=True)
class ReportConfig:
    """Where the analysed run is; the report is written to RUN/report/."""

    run: str
    """Run folder made by `crossdiff train` and analysed by `crossdiff analyze`; the report goes in RUN/report."""
    max_examples: int = 20
    """Top examples shown on each feature page."""

    def __post_init__(self):
        if self.max_examples < 1:
            raise CrossdiffError(f"--max-examples must be at least 1, got {self.max_examples}")


@dataclass(frozen=True)
class RunData:
    """Everything the report reads, loaded once (feature and steering files are read page by page)."""

    run: Path
    cfg: dict
    eval: dict
    summary: dict
    columns: list[str]
    rows: list[dict]
    calibration: dict | list | None
    stability: dict | None
    features: dict[int, Path]
    steering: dict[int, Path]
    behaviour: dict[int, dict]
    """crossdiff verify's row per candidate (verification/behaviour.csv), {} without a verification."""
    verification: dict | None
    """verification/summary.json."""
    contexts: dict[int, Path]
    """verification/latents/<latent>.json: the scored contexts of each exactly verified latent."""


# ----------------------------------------------------------------------------- loading


def read_json(path: Path):
    """The parsed file, or None when it does not exist; a one-line error when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CrossdiffError(f"{path} is not valid JSON ({e}); rerun the command that wrote it") from e


def _numbered_json(folder: Path) -> dict[int, Path]:
    """{latent: path} for the <latent>.json files of a folder (other names are ignored)."""
    if not folder.is_dir():
        return {}
    return {int(p.stem): p for p in folder.glob("*.json") if re.fullmatch(r"\d+", p.stem)}


def load_run(run: str | Path) -> RunData:
    run = Path(run)
    if not run.is_dir():
        raise CrossdiffError(f"run folder {run} not found; pass the --out folder of crossdiff train")
    analysis = run / "analysis"
    if not analysis.is_dir():
        raise CrossdiffError(f"{analysis} not found; run crossdiff analyze first")
    latents = load_results(run)  # latents.csv joined with the later stages' files (steering)
    columns, rows = latents.columns, latents.rows
    return RunData(
        run=run,
        cfg=read_json(run / "cfg.json") or {},
        eval=read_json(run / "eval.json") or {},
        summary=read_json(analysis / "summary.json") or {},
        columns=columns,
        rows=rows,
        calibration=read_calibration(run),
        stability=read_json(run / "stability.json"),
        features=_numbered_json(analysis / "features"),
        steering=_numbered_json(run / "steering"),
        behaviour=read_behaviour(run),
        verification=read_json(run / "verification" / "summary.json"),
        contexts=_numbered_json(run / "verification" / "latents"),
    )


def _score_order(rows: list[dict]) -> list[dict]:
    """Highest score first; rows without a finite score last, in file order."""

    def key(r):
        s = r.get("score")
        ok = is_num(s) and math.isfinite(s)
        return (0, -s) if ok else (1, 0.0)

    return sorted(rows, key=key)


# ----------------------------------------------------------------------------- page frame


def page(title: str, body: str, assets: str) -> str:
    """A complete HTML document; `assets` is the relative path to the assets folder."""
    from .. import __version__

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    # Defence in depth behind escaping: no inline script runs and nothing may be fetched from a network.
    csp = "default-src 'none'; script-src 'self' file:; style-src 'self' file:; img-src 'self' file: data:"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="stylesheet" href="{assets}report.css">
</head>
<body>
<main>
{body}
<footer>Generated by crossdiff {esc(__version__)} on {when}. Static report: opens from disk, fetches nothing.</footer>
</main>
<script src="{assets}report.js"></script>
</body>
</html>
"""


def figure(svg: str, caption: str = "") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure class="plot">{svg}{cap}</figure>'


def _model_name(data: RunData, m: str) -> str:
    return str(data.cfg.get(f"model_{m}") or data.summary.get("run", {}).get(f"model_{m}") or f"model {m}")


def _stat(data: RunData, key: str):
    """A headline metric from summary.json, else eval.json."""
    v = data.summary.get(key)
    return data.eval.get(key) if v is None else v


# ----------------------------------------------------------------------------- index page


def _card(label: str, value: str, note: str = "") -> str:
    small = f" <small>{esc(note)}</small>" if note else ""
    return (
        f'<div class="card"><div class="k">{esc(label)}</div><div class="v">{esc(value)}{small}</div></div>'
    )


def _counts(data: RunData) -> dict:
    counts = data.summary.get("counts")
    if isinstance(counts, dict) and counts:
        return counts
    out: dict[str, int] = {}
    for r in data.rows:
        out[str(r.get("verdict"))] = out.get(str(r.get("verdict")), 0) + 1
    return out


def summary_cards(data: RunData) -> str:
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
        _card("L0", fmt(_stat(data, "l0")), "per token"),
        _card("Dead fraction", fmt(_stat(data, "dead_fraction"))),
    ]
    if s.get("n_tokens_analysed") is not None:
        cards.append(_card("Tokens analysed", fmt(s["n_tokens_analysed"])))
    store = s.get("store") if isinstance(s.get("store"), dict) else {}
    for k, v in store.items():
        if k.endswith("bytes") and is_num(v):
            cards.append(_card("Store size", fmt_bytes(v)))
        elif k in ("n_tokens", "tokens") and is_num(v):
            cards.append(_card("Store tokens", fmt(v)))
    cand = s.get("candidates") or {}
    v = data.verification or {}
    for m in ("a", "b"):
        n_diff = ((v.get("counts") or {}).get(m) or {}).get("difference")
        if m in cand:
            cards.append(
                _card(f"Exclusive to {m.upper()}", f"{fmt(cand.get(m))} → {fmt(n_diff)}", "differences")
            )
        share = ((v.get("whole") or {}).get(m) or {}).get("share")
        if share is not None:
            cards.append(_card(f"Gap share {m.upper()}", fmt(share), "explained by its candidates"))
    splice = s.get("splice") if isinstance(s.get("splice"), dict) else {}
    for m, sp in splice.items():
        if isinstance(sp, dict) and "loss_recovered" in sp:
            cards.append(_card(f"Loss recovered {m.upper()}", fmt(sp["loss_recovered"]), "splice-in"))
    return f'<div class="cards">{"".join(cards)}</div>'


def models_table(data: RunData) -> str:
    cfg, splice = data.cfg, data.summary.get("splice") or {}
    rows = []
    for m in ("a", "b"):
        sp = splice.get(m) if isinstance(splice, dict) and isinstance(splice.get(m), dict) else {}
        rows.append(
            [
                m.upper(),
                _model_name(data, m),
                cfg.get(f"layer_{m}"),
                cfg.get(f"d_{m}"),
                cfg.get(f"n_{m}_exclusive"),
                _stat(data, f"fve_{m}"),
                sp.get("loss_recovered"),
            ]
        )
    cols = ["model", "id", "layer", "width", "exclusive latents", "FVE", "splice-in loss recovered"]
    return f'<div class="scroll">{data_table(cols, rows)}</div>'


def verdict_table(data: RunData) -> str:
    counts = _counts(data)
    order = [v for v in VERDICTS if v in counts] + [v for v in counts if v not in VERDICTS]
    rows = [[(v, badge(v)), counts[v]] for v in order]
    return data_table(["verdict", "latents"], rows)


def splice_table(data: RunData) -> str:
    splice = data.summary.get("splice")
    if not isinstance(splice, dict) or not splice:
        return '<p class="empty">No splice-in evaluation in summary.json.</p>'
    per = {m: v for m, v in splice.items() if isinstance(v, dict)}
    keys = list(dict.fromkeys(k for v in per.values() for k in v))
    rows = [[m.upper(), *[v.get(k) for k in keys]] for m, v in per.items()]
    note = (
        '<p class="muted">Model loss with its activations replaced by the crosscoder reconstruction '
        "(splice), by zeros (zero), and unchanged (clean); loss recovered = (zero − splice) / (zero − clean).</p>"
    )
    return note + data_table(["model", *keys], rows)


def plots_html(data: RunData) -> str:
    rel = [r["rel_norm"] for r in data.rows if is_num(r.get("rel_norm")) and math.isfinite(r["rel_norm"])]
    dens = [r.get("density") for r in data.rows]
    live = [math.log10(d) for d in dens if is_num(d) and math.isfinite(d) and d > 0]
    dead = sum(1 for d in dens if is_num(d) and d == 0)
    size = {"width": 440, "height": 320}  # three side by side on a laptop screen, text still legible
    short = [f"{m.upper()}: {_model_name(data, m).rstrip('/').rsplit('/', 1)[-1][:24]}" for m in ("a", "b")]
    figs = [
        figure(
            histogram_svg(rel, bins=50, value_range=(0.0, 1.0), log_y=True, y_label="latents",
                          title="Relative decoder norm", x_label="|d_B| / (|d_A| + |d_B|)", **size),
            "0: only model A's decoder is used; 1: only model B's. Exclusive DFC latents sit at the ends.",
        ),
        figure(
            histogram_svg(live, bins=40, y_label="latents", title="Latent density",
                          x_label="log10(fraction of tokens fired on)", **size),
            f"Latents that never fired ({dead}) are not drawn.",
        ),
        figure(
            bar_svg(short, [_stat(data, "fve_a"), _stat(data, "fve_b")], title="Fraction of variance explained",
                    y_label="FVE", y_range=(0.0, 1.0), **size),
            "Held-out reconstruction quality per model.",
        ),
    ]  # fmt: skip
    return f'<div class="plots">{"".join(figs)}</div>'


def candidates_table(data: RunData, cands: list[dict]) -> str:
    if not cands:
        return '<p class="empty">No exclusive candidates in latents.csv.</p>'
    cols = data.columns
    rows = []
    for r in cands:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "latent" and is_num(v):  # an id, not a quantity: no thousands separator
                link = f'<a href="features/{v}.html">{v}</a>' if v in data.features else str(v)
                cells.append((v, link))
            elif c in ("partition", "verdict", "behaviour_verdict") and v is not None:
                cells.append((str(v), badge(v)))
            elif isinstance(v, str) and len(v) > 24:
                cells.append((v, f'<div class="long">{esc(v)}</div>'))
            else:
                cells.append(v)
        rows.append(cells)
    table = data_table(
        cols,
        rows,
        cls="sortable",
        table_id="candidates",
        titles=COLUMN_HELP,
        sorted_by=("score", "descending"),
    )
    toolbar = (
        '<div class="toolbar"><input type="search" placeholder="Filter rows (e.g. difference)" '
        'data-filter="candidates" data-count="candidates-count" aria-label="filter the candidates table">'
        f'<span id="candidates-count" class="muted">{len(cands)} rows</span></div>'
    )
    return f'{toolbar}<div class="scroll tall">{table}</div>'


def index_html(data: RunData, cands: list[dict]) -> str:
    a, b = _model_name(data, "a"), _model_name(data, "b")
    cfg = data.cfg
    layers = f"layers {fmt(cfg.get('layer_a'))} and {fmt(cfg.get('layer_b'))}"
    others = sorted(set(data.features) - {r["latent"] for r in cands})
    parts = [
        f'<header class="top"><h1>crossdiff report</h1><p class="sub">{esc(a)} (A) vs {esc(b)} (B), '
        f"{esc(layers)} · run <code>{esc(data.run.resolve().name)}</code></p></header>",
        "<h2>Summary</h2>",
        summary_cards(data),
        f"<h2>Behavioural differences ({len(differences(data))})</h2>",
        differences_html(data),
        "<h3>Models</h3>",
        models_table(data),
        '<div class="two"><div><h3>Latents per verdict</h3>',
        verdict_table(data),
        "</div><div><h3>Splice-in evaluation</h3>",
        splice_table(data),
        "</div></div>",
        "<h2>Plots</h2>",
        plots_html(data),
        f"<h2>Exclusive candidates ({len(cands)})</h2>",
        '<p class="muted">Every exclusive candidate with its behavioural verdict (crossdiff verify). '
        "Click a column header to sort, a latent to open its page (examples, contexts, logit lens, steering).</p>",
        candidates_table(data, cands),
    ]
    if others:
        links = ", ".join(f'<a href="features/{i}.html">{i}</a>' for i in others)
        parts += ["<h3>Other feature pages</h3>", f"<p>{links}</p>"]
    if isinstance(data.stability, dict):
        parts += ["<h2>Seed stability</h2>", stability_html(data.stability)]
    if data.calibration is not None:
        parts += ["<h2>Calibration</h2>", calibration_html(data.calibration)]
    details = {k: v for k, v in data.summary.items() if k in ("thresholds", "run", "store")}
    details.update({"crosscoder (cfg.json)": data.cfg, "evaluation (eval.json)": data.eval})
    parts += [
        "<h2>Run details</h2>",
        "<details><summary>Thresholds, run settings, store and configuration</summary>",
        kv_table((k, v) for k, v in details.items() if v),
        "</details>",
    ]
    return page(f"crossdiff report: {a} vs {b}", "\n".join(parts), "assets/")


# ----------------------------------------------------------------------------- differences


def differences(data: RunData) -> list[dict]:
    """Candidates verified as a behavioural `difference`, most of the gap closed first."""
    rows = [b for b in data.behaviour.values() if b.get("verdict") == "difference"]
    return sorted(rows, key=lambda b: -(b.get("gap_closed") if is_num(b.get("gap_closed")) else -math.inf))


def _promoted(data: RunData, latent: int) -> str:
    feat = read_json(data.features[latent]) if latent in data.features else None
    lens = (feat or {}).get("logit_lens") or {}
    return " ".join(repr(t[0] if isinstance(t, list) else t) for t in (lens.get("promoted") or [])[:5])


def _first_context(data: RunData, latent: int) -> str:
    doc = read_json(data.contexts[latent]) if latent in data.contexts else None
    ctxs = (doc or {}).get("contexts") or []
    if not ctxs:
        return ""
    c = max(ctxs, key=lambda c: c.get("shift", 0))
    return f"…{c.get('text_before', '')[-60:]}⟦{c.get('scored', '')}⟧"


def differences_html(data: RunData) -> str:
    """What the verification found, ranked by the share of the A–B gap each difference closes."""
    v = data.verification
    if v is None:
        return '<p class="empty">Not verified yet: run <code>crossdiff verify --run RUN</code>.</p>'
    whole = v.get("whole") or {}
    intro = (
        '<p class="muted">A candidate is a <b>difference</b> when removing it from its model at the layer '
        "moves that model's log-probabilities of the following text towards the other model's, by more "
        "than removing random directions of the same norm does (z ≥ 3; docs/verification.md). Whole diff: "
        + "; ".join(
            f"{m.upper()}'s candidates account for {esc(fmt((whole.get(m) or {}).get('share')))} of the "
            "per-segment gap on held-out text"
            for m in "ab"
            if m in whole
        )
        + ".</p>"
    )
    rows = []
    for b in differences(data):
        j = int(b["latent"])
        steer = read_json(data.steering[j]) if j in data.steering else None
        link = (str(j), f'<a href="features/{j}.html">{j}</a>' if j in data.features else str(j))
        rows.append([link, str(b.get("side", "")).upper(), b.get("shift"), b.get("z"), b.get("gap_closed"),
                     b.get("n_contexts"), _promoted(data, j), (_first_context(data, j), esc(_first_context(data, j))),
                     (steer or {}).get("verdict")])  # fmt: skip
    if not rows:
        return intro + '<p class="empty">No candidate verified as a difference.</p>'
    cols = ["latent", "model", "shift (nats/token)", "z", "gap closed", "contexts", "promotes",
            "context (scored text in ⟦ ⟧)", "steering"]  # fmt: skip
    return intro + f'<div class="scroll">{data_table(cols, rows)}</div>'


# ----------------------------------------------------------------------------- seed stability


def stability_html(st: dict) -> str:
    """RUN/stability.json (crossdiff/analysis/stability.py): in how many seeds each exclusive candidate reappears."""
    n_runs, thr = st.get("n_runs"), st.get("threshold")
    base = st.get("baseline_shared") or {}
    intro = (
        f'<p class="muted">Each exclusive candidate of this run matched in the other {esc(fmt(len(st.get("seeds") or [])))} '
        f"seed(s) by decoder cosine within its own model; it reappears in a seed when the best match has cosine ≥ "
        f"{esc(fmt(thr))} and is exclusive to the same model there. Baseline: a sample of "
        f"{esc(fmt(base.get('n')))} alive shared latents reappears (A decoder) at a mean rate of "
        f"{esc(fmt(base.get('mean_reappear_a')))}.</p>"
    )
    rows = []
    for f in st.get("features") or []:
        if not isinstance(f, dict):
            continue
        matches = f.get("matches") or []
        cos = " ".join(f"{fmt(m.get('cosine'))}{'' if m.get('exclusive') else '*'}" for m in matches)
        latent = f.get("latent")
        link = (str(latent), f'<a href="features/{esc(latent)}.html">{esc(latent)}</a>')
        seeds = f"{1 + int(f.get('reappears_in') or 0)}/{n_runs}"
        rows.append([link, f.get("model"), f.get("verdict"), f.get("score"), seeds, cos])
    cols = ["latent", "model", "verdict", "score", "in seeds", "best cosines (* not exclusive there)"]
    return intro + f'<div class="scroll">{data_table(cols, rows)}</div>'


# ----------------------------------------------------------------------------- calibration

ARCH_NAMES = {"dfc": "DFC", "batchtopk": "standard crosscoder (BatchTopK)"}
_MATCH_KEYS = ("latent", "cosine", "top_on_words", "partition", "analysis_verdict", "verdict", "shift", "z",
               "n_strong", "probe_auroc", "density", "rel_norm")  # fmt: skip


def read_calibration(run: Path):
    """`crossdiff calibrate`'s results: RUN/calibration.json, else the diff folder's (RUN/../)."""
    for path in (run / "calibration.json", run.parent / "calibration.json"):
        found = read_json(path)
        if found is not None:
            return found
    return None


def calibration_html(cal) -> str:
    """The controls' table (docs/calibration.md), the latents closest to each planted direction, then
    the whole file; a calibration.json of another shape is rendered generically."""
    by_arch = cal.get("by_arch") if isinstance(cal, dict) else None
    if not isinstance(by_arch, dict) or not by_arch:
        return render_any(cal)
    crit = cal.get("criteria") or {}
    words = cal.get("words") or []
    intro = (
        '<p class="muted">Controls from <code>crossdiff calibrate</code>, at the default settings. Positive: a '
        f"random direction of norm {esc(fmt(cal.get('planted_norm')))} (raw units) added to model A at the "
        f"layer on {esc(fmt(cal.get('n_planted_rows')))} tokens of {len(words)} words, and another on "
        "pseudo-random tokens; each must be recovered by an A-exclusive candidate (decoder cosine ≥ "
        f"{esc(fmt(crit.get('cosine_min', 0.9)))}, ≥ {esc(fmt(crit.get('top_on_words_min', 0.5)))} of its top "
        "examples on the planted tokens) and verified as a behavioural difference. Negative: A against "
        "itself and against a rotated copy of A (identical behaviour) must verify no difference.</p>"
    )
    rows, matches = [], []
    order = [a for a in ARCH_NAMES if a in by_arch] + [a for a in by_arch if a not in ARCH_NAMES]
    for arch in order:
        res = by_arch[arch]
        if not isinstance(res, dict):
            continue
        neg, name = res.get("negative") or {}, ARCH_NAMES.get(arch, arch)
        cells = [name]
        for key in ("positive", "positive_random"):
            pos = res.get(key) or {}
            ok = bool(pos.get("recovered")) and bool(pos.get("verified"))
            cells += [
                (str(ok), badge("pass") if ok else badge("fail")),
                pos.get("cosine"),
                pos.get("verified"),
            ]
            for label, k in (("best candidate", "best_candidate"), ("best of all latents", "best_overall")):
                m = pos.get(k)
                if isinstance(m, dict):
                    matches.append([name, key.replace("positive", "plant").replace("_", " "), label,
                                    *[m.get(c) for c in _MATCH_KEYS]])  # fmt: skip
        cells += [neg.get("self_false_exclusive"), neg.get("rotated_false_exclusive")]
        rows.append(cells)
    cols = ["crosscoder", "word plant", "cosine", "verified", "random plant", "cosine", "verified",
            "self-diff false differences", "rotated-diff false differences"]  # fmt: skip
    parts = [intro, f'<div class="scroll">{data_table(cols, rows)}</div>']
    if matches:
        parts += [
            "<h3>Latents closest to the planted directions</h3>",
            '<p class="muted">Where a miss happened: no A-side candidate close to the direction means '
            "discovery failed; a close candidate that is not a difference means verification failed.</p>",
            f'<div class="scroll">{data_table(["crosscoder", "plant", "which", *_MATCH_KEYS], matches)}</div>',
        ]
    parts.append(f"<details><summary>calibration.json</summary>{render_any(cal)}</details>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- feature pages


def _clip(s, left: bool) -> str:
    s = "" if s is None else str(s)
    if len(s) <= _MAX_TEXT:
        return s
    return "…" + s[-_MAX_TEXT:] if left else s[:_MAX_TEXT] + "…"


def example_html(ex: dict, data: RunData) -> str:
    meta = [f"<b>activation {esc(fmt(ex.get('value')))}</b>"]
    meta += [f"{esc(k)} {esc(fmt(ex[k]))}" for k in ("source", "doc", "row") if ex.get(k) is not None]
    role = ""
    if ex.get("role"):  # a conversation: the example is a turn, shown with its speaker (evidence.py)
        meta.insert(1, f"<b>{esc(ex['role'])}</b> turn {esc(fmt(ex.get('turn')))}")
        role = f'<span class="who">{esc(str(ex["role"]).capitalize())}:</span> '
    text = role + (
        f"{esc(_clip(ex.get('text_before'), True))}<mark>{esc(ex.get('text_token') or '')}</mark>"
        f"{esc(_clip(ex.get('text_after'), False))}"
    )
    toks = []
    for m in ("a", "b"):
        tokens = ex.get(f"tokens_{m}")
        if isinstance(tokens, list) and tokens:
            spans = "".join(
                f'<span class="tok{" hl" if isinstance(t, dict) and t.get("highlight") else ""}">'
                f"{visible_ws(t.get('text', '') if isinstance(t, dict) else t)}</span>"
                for t in tokens
            )
            who = f'<span class="who" title="{esc(_model_name(data, m))}">{m.upper()} tokens</span>'
            toks.append(f'<div class="toks">{who}{spans}</div>')
    return (
        f'<div class="example"><div class="meta">{" · ".join(meta)}</div>'
        f'<div class="text">{text}</div>{"".join(toks)}</div>'
    )


def lens_html(lens: dict, data: RunData) -> str:
    m = str(lens.get("model", "")).lower()
    who = f"model {m.upper()} ({_model_name(data, m)})" if m in ("a", "b") else "the unembedding"
    out = [f'<p class="muted">Decoder direction read through {esc(who)}.</p><div class="two">']
    for key in ("promoted", "suppressed"):
        pairs = lens.get(key) or []
        rows = [
            f'<tr><td class="tokcell">{visible_ws(p[0])}</td>{"".join(_num_td(x) for x in p[1:2])}</tr>'
            for p in pairs
            if isinstance(p, list | tuple) and p
        ]
        body = "".join(rows) or '<tr><td class="empty">none</td></tr>'
        out.append(
            f'<table class="lens"><thead><tr><th>{key}</th><th>logit</th></tr></thead><tbody>{body}</tbody></table>'
        )
    return "".join(out) + "</div>"


def _num_td(v) -> str:
    return f'<td class="num">{esc(fmt(v))}</td>'


def feature_html(
    latent: int, feat: dict, data: RunData, row: dict | None, nav: tuple, max_examples: int
) -> str:
    partition = feat.get("partition") or (row or {}).get("partition")
    verdict = feat.get("verdict") or (row or {}).get("verdict")
    stats = feat.get("stats") if isinstance(feat.get("stats"), dict) else row or {}
    badges = " ".join(badge(x) for x in (partition, verdict) if x)
    reason = stats.get("reason") or (row or {}).get("reason")
    parts = [
        '<header class="top"><div class="crumbs"><a href="../index.html">← crossdiff report</a></div>'
        f"<h1>Latent {latent} {badges}</h1>"
        f'<p class="sub">{esc(_model_name(data, "a"))} (A) vs {esc(_model_name(data, "b"))} (B)'
        + (f" · {esc(reason)}" if reason else "")
        + "</p></header>",
        '<div class="two"><div><h2>Statistics</h2>',
        kv_table((k, v) for k, v in stats.items() if k != "latent"),
        "</div><div><h2>Activation histogram</h2>",
        _feature_hist(feat.get("histogram")),
        "</div></div>",
    ]
    if isinstance(feat.get("logit_lens"), dict):
        parts += ["<h2>Logit lens</h2>", lens_html(feat["logit_lens"], data)]
    examples = [e for e in feat.get("examples") or [] if isinstance(e, dict)]
    parts.append(f"<h2>Top examples ({min(len(examples), max_examples)} of {len(examples)})</h2>")
    parts += [example_html(e, data) for e in examples[:max_examples]] or ['<p class="empty">No examples.</p>']
    if latent in data.behaviour or latent in data.contexts:
        parts += ["<h2>Behaviour</h2>", behaviour_html(latent, data)]
    steer = read_json(data.steering[latent]) if latent in data.steering else None
    if steer is not None:
        parts += ["<h2>Steering</h2>", render_any(steer)]
    prev, nxt = nav
    parts.append(
        '<nav class="pager">'
        + (f'<a href="{prev}.html">← latent {prev}</a>' if prev is not None else "<span></span>")
        + (f'<a href="{nxt}.html">latent {nxt} →</a>' if nxt is not None else "<span></span>")
        + "</nav>"
    )
    return page(f"Latent {latent} · crossdiff report", "\n".join(parts), "../assets/")


def behaviour_html(latent: int, data: RunData) -> str:
    """The latent's behavioural verdict and each scored context: ℓ of its model, of the other, and
    of its model with the latent removed."""
    b = data.behaviour.get(latent, {})
    head = kv_table((k, b.get(k)) for k in ("verdict", "shift", "z", "gap_closed", "null_mean", "null_std",
                                              "z_dictionary", "dictionary_null_mean", "n_strong", "n_contexts", "first_order"))  # fmt: skip
    doc = read_json(data.contexts[latent]) if latent in data.contexts else None
    rows = []
    for c in (doc or {}).get("contexts") or []:
        text = f"…{c.get('text_before', '')[-80:]}⟦{c.get('scored', '')}⟧"
        rows.append([(text, esc(text)), c.get("f"), c.get("n_tokens"), c.get("l_own"), c.get("l_other"),
                     c.get("l_ablated"), c.get("shift"), c.get("first_order")])  # fmt: skip
    if not rows:
        return head
    cols = ["context (scored in ⟦ ⟧)", "f", "tokens", "ℓ own", "ℓ other", "ℓ own, ablated", "shift",
            "first order"]  # fmt: skip
    return head + f'<div class="scroll">{data_table(cols, rows)}</div>'


def _feature_hist(h) -> str:
    if not isinstance(h, dict) or not h.get("counts"):
        return '<p class="empty">No histogram.</p>'
    try:
        edges, counts, label = _hist_view([float(e) for e in h["edges"]], [float(c) for c in h["counts"]])
        svg = binned_histogram_svg(edges, counts, x_label=label, y_label="tokens", log_y=True, height=300)
    except (ValueError, TypeError, KeyError) as e:
        return f'<p class="empty">Histogram not drawable: {esc(e)}</p>'
    return figure(
        svg, "Activation when firing" + ("; log-spaced bins on a log axis." if "log" in label else ".")
    )


def _hist_view(edges: list[float], counts: list[float]) -> tuple[list[float], list[float], str]:
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


# ----------------------------------------------------------------------------- writing


def _write_pages(data: RunData, cands: list[dict], out: Path, max_examples: int) -> None:
    (out / "assets").mkdir(parents=True)
    for name in ASSETS:
        (out / "assets" / name).write_bytes((resources.files(__package__) / "templates" / name).read_bytes())
    (out / "index.html").write_text(index_html(data, cands), encoding="utf-8")
    cand_ids = [r["latent"] for r in cands]
    order = [i for i in cand_ids if i in data.features] + sorted(set(data.features) - set(cand_ids))
    rows = {r["latent"]: r for r in data.rows}
    (out / "features").mkdir()
    for k, latent in enumerate(order):
        feat = read_json(data.features[latent])
        if not isinstance(feat, dict):
            raise CrossdiffError(f"{data.features[latent]} is not a JSON object; rerun crossdiff analyze")
        nav = (order[k - 1] if k else None, order[k + 1] if k + 1 < len(order) else None)
        html = feature_html(latent, feat, data, rows.get(latent), nav, max_examples)
        (out / "features" / f"{latent}.html").write_text(html, encoding="utf-8")


def _replace_dir(new: Path, dest: Path) -> None:
    """Put the finished folder `new` at `dest`; an old report is moved aside first, then deleted."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@writes(lambda cfg: Path(cfg.run) / "report", record="tree")
def report(cfg: ReportConfig) -> Path:
    """Write RUN/report/ and return the path of its index.html."""
    data = load_run(cfg.run)
    cands = _score_order([r for r in data.rows if is_candidate(r)])
    dest = data.run / "report"
    for stale in data.run.glob(f".{dest.name}.old-*"):  # left by a run killed mid-swap
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=data.run))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a report is meant to be shared
        _write_pages(data, cands, tmp, cfg.max_examples)
        _replace_dir(tmp, dest)
    except OSError as e:
        raise CrossdiffError(f"could not write the report to {dest}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index = dest / "index.html"
    print(f"report: {index} ({len(cands)} candidates, {len(data.features)} feature pages)", file=sys.stderr)
    return index
