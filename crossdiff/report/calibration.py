"""The index's control sections: seed stability (RUN/stability.json) and calibration
(`crossdiff calibrate`'s calibration.json, docs/calibration.md)."""

from __future__ import annotations

from pathlib import Path

from .frame import read_json
from .htmlkit import badge, data_table, esc, fmt, render_any


def stability_html(st: dict, labels: dict[int, dict] | None = None) -> str:
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
        name = ((labels or {}).get(latent) or {}).get("label", "") if isinstance(latent, int) else ""
        rows.append([link, name, f.get("model"), f.get("verdict"), f.get("score"), seeds, cos])
    cols = [
        "latent",
        "label",
        "model",
        "verdict",
        "score",
        "in seeds",
        "best cosines (* not exclusive there)",
    ]
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
