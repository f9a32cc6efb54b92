"""The model card of a crosscoder folder (README.md, with the Hub's YAML header): what it was trained on
and what the analysis and the verification found, read from the run's own files.

Sources, all optional except cfg.json: cfg.json (models, layers, widths, partition, sparsity), eval.json
(training tokens, held-out FVE), analysis/summary.json (FVE, dead fraction, candidates, verdicts, the
store), verification/summary.json (behavioural verdicts), the store's meta.json (corpus, tokens), the
diff folder's diff.json (budget) and import.json (where an imported crosscoder came from).
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import CrossdiffError
from ..core.runfolder import read_or_empty

CARD = "README.md"


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None or isinstance(v, str) else format(v, spec)


def card_facts(run: str | Path) -> dict:
    """Everything the card states, gathered from the run folder (and its store and diff folder)."""
    run = Path(run)
    cfg = read_or_empty(run, "cfg")
    if not cfg:
        raise CrossdiffError(
            f"{run} has no readable cfg.json; pass a crosscoder folder (crossdiff train --out)"
        )
    analysis = read_or_empty(run, "analysis")
    store_path = (analysis.get("store") or {}).get("path")
    meta = read_or_empty(store_path, "meta") if store_path else {}
    diff = read_or_empty(run.parent, "diff")
    return {
        "cfg": cfg,
        "eval": read_or_empty(run, "eval"),
        "analysis": analysis,
        "verification": read_or_empty(run, "verification"),
        "corpus": meta.get("corpus") or diff.get("corpus"),
        "store_tokens": meta.get("n_tokens"),
        "budget": (diff.get("budget") or {}).get("name"),
        "imported": read_or_empty(run, "import"),
    }


def _verdict_lines(facts: dict) -> list[str]:
    analysis, verification = facts["analysis"], facts["verification"]
    lines = []
    if analysis:
        counts = ", ".join(f"{k} {v}" for k, v in (analysis.get("counts") or {}).items())
        lines.append(f"| analysis verdicts (latents) | {counts} |")
    if verification:
        for m in "ab":
            c = (verification.get("counts") or {}).get(m, {})
            lines.append(
                f"| verification, model {m.upper()} | {', '.join(f'{k} {v}' for k, v in c.items())} |"
            )
    return lines


def model_card(run: str | Path) -> str:
    """README.md for the crosscoder folder of `run` (YAML header for the Hub, then a table of facts)."""
    f = card_facts(run)
    cfg, ev, an = f["cfg"], f["eval"], f["analysis"]
    part = cfg.get("partition", {})
    fve_a = an.get("fve_a", ev.get("fve_a"))
    fve_b = an.get("fve_b", ev.get("fve_b"))
    header = [
        "---",
        "library_name: crossdiff",
        "tags:",
        "- crosscoder",
        "- model-diffing",
        "- sparse-autoencoder",
    ]
    header += ["base_model:", f"- {cfg['model_a']}", f"- {cfg['model_b']}", "---", ""]
    rows = [
        f"| model A | {cfg['model_a']}, layer {cfg.get('layer_a')}, width {cfg['d_a']} |",
        f"| model B | {cfg['model_b']}, layer {cfg.get('layer_b')}, width {cfg['d_b']} |",
        f"| architecture | {cfg.get('architecture')}, {cfg.get('sparsity')} (k={cfg.get('k')}), "
        f"{cfg['n_latents']} latents: {part.get('a_exclusive', 0)} A-exclusive, {part.get('shared')} shared, "
        f"{part.get('b_exclusive', 0)} B-exclusive |",
        f"| corpus | {f['corpus'] or 'n/a'} ({_fmt(f['store_tokens'], ',')} aligned tokens in the store) |",
        f"| budget | {f['budget'] or 'n/a'}; {_fmt(ev.get('tokens_trained'), ',')} training tokens |",
        f"| held-out FVE | A {_fmt(fve_a)}, B {_fmt(fve_b)} |",
        f"| dead latents | {_fmt(an.get('dead_fraction'), '.1%')} |",
        *_verdict_lines(f),
    ]
    if f["imported"]:
        rows.append(f"| imported from | {f['imported'].get('source')} ({f['imported'].get('format')}) |")
    body = [
        f"# Crosscoder: {cfg['model_a']} vs {cfg['model_b']}",
        "",
        "A crossdiff crosscoder (docs/interop.md in the crossdiff repository). Inputs are normalised "
        f"activations: normalised = raw × scale (scale_a {cfg['scale_a']:.6g}, scale_b {cfg['scale_b']:.6g}).",
        "",
        "| | |",
        "|---|---|",
        *rows,
        "",
        'Load it with `crossdiff.interop.hub.load_crosscoder("<this repo id or folder>")`; analyse it with '
        "`crossdiff import <repo id> --out RUN --store STORE` and `crossdiff analyze --run RUN --store STORE`.",
        "",
    ]
    return "\n".join(header + body)
