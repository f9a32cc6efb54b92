"""`crossdiff bench toy`'s results: mean ± std over seeds, the markdown tables and the plots.

Reads the per-run records that crossdiff.controls.toybench writes (bench.json) and writes results.json,
results.md, recall_precision.svg and relative_norms.svg.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.fsutil import write_json_atomic, write_text_atomic

SUMMARY_METRICS = (
    "exclusive_recall", "exclusive_precision", "exclusive_matched_any_class", "exclusive_recall_a", "exclusive_recall_b",
    "exclusive_precision_a", "exclusive_precision_b", "shared_recall", "shared_recall_imbalanced",
    "fve_a", "fve_b", "l0", "dead_fraction_heldout", "exclusive_recall_union", "exclusive_precision_union",
    "exclusive_recall_verified", "exclusive_precision_verified", "exclusive_recall_functional",
    "exclusive_precision_functional", "exclusive_recall_analysis", "exclusive_precision_analysis",
    "exclusive_recall_a_analysis", "exclusive_recall_b_analysis", "exclusive_recall_verified_analysis",
    "exclusive_precision_verified_analysis",
)  # fmt: skip
FP_CAUSES = ("fp_shared", "fp_shared_imbalanced", "fp_duplicate", "fp_unplanted")


def _mean_std(values) -> tuple[float | None, float | None, int]:
    """Mean and sample std (ddof=1) of the defined values, and how many there were."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def summarise(records: list[dict]) -> list[dict]:
    """One row per method: mean, std and n over seeds of each metric, plus summed FP counts."""
    rows = []
    for name in dict.fromkeys(r["name"] for r in records):
        runs = [r for r in records if r["name"] == name]
        row = {
            "name": name,
            "arch": runs[0]["arch"],
            "exclusive_frac": runs[0]["exclusive_frac"],
            "seeds": len(runs),
            "share_threshold": runs[0]["settings"].get("share_threshold"),
        }
        for key in SUMMARY_METRICS:
            row[key] = dict(zip(("mean", "std", "n"), _mean_std(r.get(key) for r in runs)))
        for key in (
            "counts",
            "counts_analysis",
            "counts_union",
            "counts_functional",
        ):  # summed: seeds, models
            have = all(r.get(key) for r in runs)
            names = ("claimed", "true_pos", "n_twins", "found_twins", *FP_CAUSES)
            total = {c: sum(r[key][side][c] for r in runs for side in "ab") for c in names} if have else None
            row[f"{key}_total"] = total
        ver = [(r.get("verification"), r.get("counts_verified")) for r in runs]
        row["verification_total"] = None
        if all(v and c for v, c in ver):  # summed over seeds (and both models for the counts)
            row["verification_total"] = {
                **{k: sum(v[k] for v, _ in ver) for k in ("rejected_rare", "rejected_predictable", "rejected_other")},
                **{k: sum(c[side][k] for _, c in ver for side in "ab") for k in ("claimed", "true_pos", *FP_CAUSES)},
            }  # fmt: skip
        rows.append(row)
    return rows


def _cell(stat: dict, n_seeds: int) -> str:
    if stat["mean"] is None:
        return "–"
    text = f"{stat['mean']:.2f} ± {stat['std']:.2f}"
    return text if stat["n"] == n_seeds else f"{text} (n={stat['n']})"


def markdown_table(rows: list[dict]) -> str:
    """The main table (mean ± std over seeds) and the false-positive breakdown (summed over seeds)."""
    cols = [("exclusive_recall", "excl. recall"), ("exclusive_precision", "excl. precision"),
            ("exclusive_recall_analysis", "excl. recall (analysis rule)"),
            ("exclusive_precision_analysis", "excl. precision (analysis rule)"),
            ("exclusive_recall_verified", "excl. recall (verified)"),
            ("exclusive_precision_verified", "excl. precision (verified)"),
            ("exclusive_matched_any_class", "excl. learned (any class)"),
            ("exclusive_recall_a", "recall A"), ("exclusive_recall_b", "recall B"),
            ("shared_recall", "shared recall"), ("shared_recall_imbalanced", "shared recall (imbalanced)"),
            ("fve_a", "FVE A"), ("fve_b", "FVE B"), ("l0", "L0"), ("dead_fraction_heldout", "dead")]  # fmt: skip
    lines = ["Exclusive recall and precision by the paper's rule (DFC: partition; standard: relative norm r ≤ 0.1 / "
             "≥ 0.9) and by the analysis rule (`crossdiff analyze`'s candidates, crossdiff.analysis.results."
             "exclusive_sides at t = 0.1: DFC partition ∪ r ∪ functional share; standard: r):", "",
             "| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_cell(r[k], r["seeds"]) for k, _ in cols) + " |")
    lines += ["", "False positives (latents classified exclusive, alive, matching no planted exclusive feature"
              " of their model), summed over seeds and both models:", "",
              "| method | classified exclusive | true positives | shared concept | of which imbalanced | "
              "duplicate | unplanted | twins found / planted |", "|---" * 8 + "|"]  # fmt: skip
    rules = (("", "counts_total"), (" (analysis rule)", "counts_analysis_total"), (" (∪ r)", "counts_union_total"),
             (" (share)", "counts_functional_total"))  # fmt: skip
    for r, (label, key) in ((r, rule) for r in rows for rule in rules if r.get(rule[1])):
        c = r[key]
        lines.append(
            f"| {r['name']}{label} | {c['claimed']} | {c['true_pos']} | {c['fp_shared']} | {c['fp_shared_imbalanced']} | "
            f"{c['fp_duplicate']} | {c['fp_unplanted']} | {c['found_twins']} / {c['n_twins']} |"
        )
    ver = [r for r in rows if r["verification_total"]]
    if ver:
        lines += ["", "Verification (crossdiff.analysis.analyze's verdicts on the seed's store: a candidate is rejected when it "
                  "fires < 10 times held out, or a linear probe from the other model predicts it with held-out "
                  "R² ≥ 0.5 or AUROC ≥ 0.9), alive candidates summed over seeds and both models:", "",
                  "| method | classified exclusive → verified | rejected: too rare | rejected: predictable | "
                  "true positives → verified | FP shared concept → verified | FP imbalanced → verified | "
                  "FP duplicate → verified | FP unplanted → verified |", "|---" * 9 + "|"]  # fmt: skip
        for r in ver:
            c, v = r["counts_total"], r["verification_total"]
            arrow = " | ".join(f"{c[k]} → {v[k]}" for k in ("true_pos", *FP_CAUSES))
            lines.append(
                f"| {r['name']} | {c['claimed']} → {v['claimed']} | {v['rejected_rare']} | "
                f"{v['rejected_predictable']} | {arrow} |"
            )
    lines += ["", f"Functional share (crossdiff.coder.functional) at t = {rows[0].get('share_threshold', '–')}: a latent with "
              "share_B ≤ t is A-only, ≥ 1 − t B-only (DFC: exclusive partitions ∪ shared-partition latents by "
              "share; standard: share alone, a diagnostic):", "",
              "| method | excl. recall (share) | excl. precision (share) |", "|---|---|---|"]  # fmt: skip
    for r in rows:
        rec, prec = (
            _cell(r[k], r["seeds"]) for k in ("exclusive_recall_functional", "exclusive_precision_functional")
        )
        lines.append(f"| {r['name']} | {rec} | {prec} |")
    dfc = [r for r in rows if r["exclusive_frac"]]
    if dfc:
        lines += ["", "DFC classified by partition ∪ relative norm (a shared-partition latent with r ≤ 0.1 or "
                  "r ≥ 0.9 also counts as exclusive; a diagnostic, not the paper's rule):", "",
                  "| method | excl. recall (∪ r) | excl. precision (∪ r) |", "|---|---|---|"]  # fmt: skip
        for r in dfc:
            rec, prec = (
                _cell(r[k], r["seeds"]) for k in ("exclusive_recall_union", "exclusive_precision_union")
            )
            lines.append(f"| {r['name']} | {rec} | {prec} |")
    return "\n".join(lines) + "\n"


def _f1(res: dict) -> float:
    r, p = res["recall"] or 0.0, res["precision"] or 0.0
    return 2 * r * p / (r + p) if r + p else 0.0


def threshold_table(records: list[dict]) -> str:
    """The share threshold chosen on seed 0 (best F1 of pooled exclusive recall and precision) per
    method and rule, and every rule's recall / precision on the other seeds (mean ± std)."""
    rest = sorted({r["seed"] for r in records} - {0})
    if not rest or not any(r["seed"] == 0 for r in records):
        return ""
    lines = ["", f"Share threshold chosen on seed 0 (best F1), reported on seeds {', '.join(map(str, rest))}:", "",
             "| method | rule | t (seed 0) | excl. recall | excl. precision |", "|---|---|---|---|---|"]  # fmt: skip
    for name in dict.fromkeys(r["name"] for r in records):
        runs = [r for r in records if r["name"] == name]
        seed0, others = [r for r in runs if r["seed"] == 0], [r for r in runs if r["seed"] in rest]
        if not seed0 or not others or "share_sweep" not in seed0[0]:
            continue
        dfc = bool(runs[0]["exclusive_frac"])
        base = [("partition" if dfc else "relative norm", "exclusive_recall", "exclusive_precision", "–")]
        if dfc:
            base.append(("partition ∪ r", "exclusive_recall_union", "exclusive_precision_union", "–"))
        for rule, rk, pk, t in base:
            rec, prec = (_cell(dict(zip(("mean", "std", "n"), _mean_std(o[k] for o in others))), len(others))
                         for k in (rk, pk))  # fmt: skip
            lines.append(f"| {name} | {rule} | {t} | {rec} | {prec} |")
        rules = [("functional", "partition ∪ share" if dfc else "share")]
        rules += [("analysis", "analysis rule (partition ∪ r ∪ share)")] if dfc else []
        for method, rule in rules:
            sweep0 = seed0[0]["share_sweep"][method]
            t = max(sweep0, key=lambda k: (_f1(sweep0[k]), -float(k)))
            rec, prec = (_cell(dict(zip(("mean", "std", "n"), _mean_std(o["share_sweep"][method][t][k] for o in others))),
                               len(others)) for k in ("recall", "precision"))  # fmt: skip
            lines.append(f"| {name} | {rule} | {t} | {rec} | {prec} |")
    return "\n".join(lines) + "\n"


def _arrows_svg(svg: str, pairs: list[tuple[tuple[float, float], tuple[float, float], str]], **frame) -> str:
    """Add an arrow per ((x0, y0), (x1, y1), color) in data coordinates to a scatter_svg picture."""
    from ..report.plots import _Frame

    fr = _Frame(frame["width"], frame["height"], frame["x_range"], frame["y_range"])
    body = []
    for i, ((x0, y0), (x1, y1), color) in enumerate(pairs):
        body.append(
            f'<marker id="arrow{i}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="{color}"/></marker>'
        )
        body.append(
            f'<line x1="{fr.px(x0):.1f}" y1="{fr.py(y0):.1f}" x2="{fr.px(x1):.1f}" y2="{fr.py(y1):.1f}" '
            f'stroke="{color}" stroke-width="1.5" stroke-dasharray="4 2" marker-end="url(#arrow{i})"/>'
        )
    if not body:
        return svg
    head, tail = svg.rsplit("</svg>", 1)
    return (
        head
        + "<defs>"
        + "".join(b for b in body if b.startswith("<marker"))
        + "</defs>\n"
        + "\n".join(b for b in body if b.startswith("<line"))
        + "\n</svg>"
        + tail
    )


def write_report(out: Path, results: dict) -> None:
    """results.json, results.md, recall_precision.svg and relative_norms.svg in `out`."""
    from ..report.plots import PALETTE, Point, histogram_svg, scatter_svg

    rows = summarise(results["runs"])
    results = {**results, "summary": rows}
    write_json_atomic(out / "results.json", results)
    s = results["settings"]
    head = (f"# Synthetic exclusive-feature benchmark\n\nSetting {s['setting']}: d_A = {s['d_a']}, d_B = {s['d_b']}, "
            f"{s['n_shared']} shared + {s['n_a_only']} A-only + {s['n_b_only']} B-only planted features; "
            f"{s['seeds']} seeds, D = {s['latents']}, "
            f"k = {s['k']}, {s['tokens']:,} training tokens per run, match threshold τ = {s['match_threshold']}."
            " Mean ± std over seeds.\n\n")  # fmt: skip
    write_text_atomic(out / "results.md", head + markdown_table(rows) + threshold_table(results["runs"]))
    color = {r["name"]: PALETTE[i % len(PALETTE)] for i, r in enumerate(rows)}
    verified = [r for r in rows if r["exclusive_precision_verified"]["mean"] is not None
                and r["exclusive_recall_verified"]["mean"] is not None]  # fmt: skip
    points = [
        Point(r["name"], r["exclusive_precision"]["mean"], r["exclusive_recall"]["mean"],
              r["exclusive_precision"]["std"] or 0.0, r["exclusive_recall"]["std"] or 0.0, color=color[r["name"]])
        for r in rows
    ] + [
        Point(f"{r['name']} verified", r["exclusive_precision_verified"]["mean"],
              r["exclusive_recall_verified"]["mean"], r["exclusive_precision_verified"]["std"] or 0.0,
              r["exclusive_recall_verified"]["std"] or 0.0, color=color[r["name"]])
        for r in verified
    ] + [
        Point(f"{r['name']} ∪ r", r["exclusive_precision_union"]["mean"], r["exclusive_recall_union"]["mean"],
              r["exclusive_precision_union"]["std"] or 0.0, r["exclusive_recall_union"]["std"] or 0.0,
              color="#999999")
        for r in rows if r["exclusive_frac"]
    ] + [
        Point(f"{r['name']} analysis rule", r["exclusive_precision_analysis"]["mean"],
              r["exclusive_recall_analysis"]["mean"], r["exclusive_precision_analysis"]["std"] or 0.0,
              r["exclusive_recall_analysis"]["std"] or 0.0, color="#555555")
        for r in rows if r["exclusive_frac"] and r["exclusive_recall_analysis"]["mean"] is not None
        and r["exclusive_precision_analysis"]["mean"] is not None
    ]  # fmt: skip
    frame = dict(width=600, height=460, x_range=(0.0, 1.05), y_range=(0.0, 1.05))
    svg = scatter_svg(
        points, title="Exclusive recall vs precision, before → after verification (mean ± std over seeds)",
        x_label="exclusive precision", y_label="exclusive recall", **frame)  # fmt: skip
    arrows = [
        ((r["exclusive_precision"]["mean"], r["exclusive_recall"]["mean"]),
         (r["exclusive_precision_verified"]["mean"], r["exclusive_recall_verified"]["mean"]), color[r["name"]])
        for r in verified if r["exclusive_precision"]["mean"] is not None
    ]  # fmt: skip
    write_text_atomic(out / "recall_precision.svg", _arrows_svg(svg, arrows, **frame))
    rel = [v for r in results["runs"] if not r["exclusive_frac"] for v in r["relative_norms_alive"] or []]
    write_text_atomic(out / "relative_norms.svg", histogram_svg(
        rel, bins=40, value_range=(0.0, 1.0), log_y=True, y_label="alive latents",
        title="Standard BatchTopK crosscoder: relative decoder norm (all seeds)",
        x_label="r = |d_B| / (|d_A| + |d_B|)  (≤ 0.1: A-only, ≥ 0.9: B-only)"))  # fmt: skip
