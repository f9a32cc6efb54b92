"""Steering to verify (docs/design.md §6): push a latent's decoder direction into a real model and measure.

`steer(SteerConfig(run=RUN, latent=I))` / `crossdiff steer --run RUN --latent I` writes
RUN/steering/<I>.json; `--top N` verifies the top N exclusive candidates of each model. Every steered
latent's verdict and effect go in RUN/steering/verdicts.csv (crossdiff.analysis.results joins it to the analysis
as `steer_verdict` / `steer_effect`). Schema and verdict rule: docs/steering.md.

The hooks, their edits and the measurements through them: crossdiff/analysis/hooks.py.

Legend: B sequences, T positions, D model width, V vocabulary, R random directions, S strengths.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..core.config import where
from ..core.errors import CrossdiffError
from ..core.fsutil import write_json_atomic
from ..core.lock import writes
from .hooks import (
    Batch,
    LatentDirection,
    ablate_edit,
    continuation_logprob,
    encode_batch,
    generate,
    latent_direction,
    measure,
    next_token_logprobs,
    random_directions,
    steering,
)
from .results import STEERING, LatentTable, as_float, load_results, null_z, read_stage, write_stage

# Neutral prompts for the KL side-effect measure and for generations (short: CPU time is the budget).
NEUTRAL_PROMPTS = (
    "The weather today is",
    "My favourite food is",
    "In the morning I usually",
    "The book on the table",
    "She opened the door and",
    "Numbers like 3 and 7 are",
    "The history of the city",
    "He said that the meeting",
)
GENERATION_PROMPTS = NEUTRAL_PROMPTS[:2]


@dataclass(frozen=True)
class SteerConfig:
    run: str = where()
    """Training run folder (crosscoder checkpoint; analysis in RUN/analysis, output in RUN/steering)."""
    latent: int | None = None
    """Latent to steer (one latent); or use --top."""
    top: int | None = None
    """Batch verification: steer the top N behavioural differences of each model (crossdiff verify)."""
    include_rejected: bool = False
    """--top: fill the N slots of a model with its other exclusive candidates when it has fewer differences."""
    model: Literal["a", "b"] | None = None
    """Model to steer (default: the latent's own model; for a shared latent the one it writes more into)."""
    prompts: str | None = None
    """Text file of generation prompts, one per line (default: two built-in neutral prompts)."""
    strengths: tuple[float, ...] = (-4.0, 0.0, 2.0, 4.0, 8.0)
    """Steering strengths α, in units of the latent's 99th-percentile activation (0 = baseline)."""
    verdict_strength: float = 4.0
    """The strength whose effect size decides the verdict (added to --strengths if missing)."""
    n_random: int = 8
    """Random directions of equal raw norm, the null distribution (at least 5)."""
    z: float = 3.0
    """Pass when the latent's Δlogprob z-score against the random directions is at least this (the
    name and the z rule, results.null_z, are verify's)."""
    n_contexts: int = 8
    """Top-activation contexts (from features/<latent>.json) whose continuations are scored."""
    prompt_chars: int = 120
    """Characters of each context's text before the token kept as the prompt."""
    continuation_chars: int = 24
    """Characters of the continuation (the top token and the text after it) scored."""
    new_tokens: int = 24
    """Tokens generated (greedily) per prompt and strength."""
    budget_seconds: float | None = None
    """--top: start a latent only if it should end within this many seconds (judged by the slowest one
    so far); the rest are marked skipped."""
    seed: int = 0
    """Seed of the random null directions."""
    device: str = where("cpu")
    """Torch device for the models."""

    def __post_init__(self):
        if (self.latent is None) == (self.top is None):
            raise CrossdiffError(
                "pass exactly one of --latent I (one latent) or --top N (batch verification)"
            )
        if self.top is not None and self.top < 1:
            raise CrossdiffError(f"--top must be at least 1, got {self.top}")
        if self.latent is not None and self.latent < 0:
            raise CrossdiffError(f"--latent must be a latent index (0 or more), got {self.latent}")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise CrossdiffError(
                f"--prompts {self.prompts}: no such file; pass a text file with one prompt per line"
            )
        if self.n_random < 5:
            raise CrossdiffError(f"--n-random must be at least 5 for a usable null, got {self.n_random}")
        if not self.strengths or not all(math.isfinite(s) for s in self.strengths):
            raise CrossdiffError("--strengths must be finite numbers")
        if self.verdict_strength <= 0:
            raise CrossdiffError(f"--verdict-strength must be positive, got {self.verdict_strength}")
        if min(self.n_contexts, self.continuation_chars, self.new_tokens) < 1:
            raise CrossdiffError("--n-contexts, --continuation-chars and --new-tokens must be at least 1")

    @property
    def all_strengths(self) -> list[float]:
        return sorted({0.0, self.verdict_strength, *map(float, self.strengths)})


# ----------------------------------------------------------------------------- one latent


def contexts_from_features(doc: dict | None, n: int, prompt_chars: int, cont_chars: int) -> list[tuple]:
    """(prompt, continuation) pairs from a features/<latent>.json's top examples, distinct, top first."""
    out: list[tuple[str, str]] = []
    for ex in (doc or {}).get("examples", []):
        prompt = ex.get("text_before", "")[-prompt_chars:]
        cont = (ex.get("text_token", "") + ex.get("text_after", ""))[:cont_chars]
        if cont.strip() and (prompt, cont) not in out:
            out.append((prompt, cont))
        if len(out) == n:
            break
    return out


def steer_latent(
    lm, direction: LatentDirection, contexts: list[tuple], cfg: SteerConfig, prompts=None
) -> dict:
    """Measured effects of additive steering at each strength vs random directions, and generations."""
    if not contexts:
        raise CrossdiffError(
            f"latent {direction.latent} has no example contexts to score; run crossdiff analyze first"
        )
    layer, strengths = direction.layer, cfg.all_strengths
    ctx = encode_batch(lm, [p + c for p, c in contexts], [len(p) for p in contexts])
    neutral = encode_batch(lm, list(NEUTRAL_PROMPTS))
    with torch.inference_mode():
        base = (continuation_logprob(lm, ctx), next_token_logprobs(lm, neutral))
        own = _own_model_checks(lm, direction, ctx, base[0]) if direction.exclusive else {}
    unit_D = direction.d_raw_D * direction.typical  # α = 1
    dirs_RD = torch.cat([unit_D[None], random_directions(unit_D, cfg.n_random, cfg.seed)])
    dlp_SR, kl_SR = np.zeros((len(strengths), len(dirs_RD))), np.zeros((len(strengths), len(dirs_RD)))
    for s, alpha in enumerate(strengths):
        if alpha != 0:
            dlp_SR[s], kl_SR[s] = measure(lm, layer, alpha * dirs_RD, ctx, neutral, base)
    res = {
        "latent": direction.latent,
        "model": direction.model,
        "layer": layer,
        "typical_activation": direction.typical,
        "raw_norm_per_unit": float(unit_D.norm()),
        "strengths": strengths,
        **_stats("dlogprob", dlp_SR),
        **_stats("kl", kl_SR),
        "null": {
            "n_random": cfg.n_random,
            "seed": cfg.seed,
            "dlogprob": dlp_SR[:, 1:].tolist(),
            "kl": kl_SR[:, 1:].tolist(),
        },
        **own,
        "contexts": [{"prompt": p, "continuation": c} for p, c in contexts],
    }
    s = strengths.index(cfg.verdict_strength)
    effect = res["dlogprob_z"][s]
    beats_all = dlp_SR[s, 0] > dlp_SR[s, 1:].max()
    res["effect_size"] = effect
    res["verdict"] = "pass" if effect >= cfg.z and beats_all and dlp_SR[s, 0] > 0 else "fail"
    res["verdict_rule"] = (
        f"pass iff at α={cfg.verdict_strength:g} the latent's Δlogprob on its contexts is > 0, above every "
        f"one of {cfg.n_random} random directions of equal raw norm, and z ≥ {cfg.z:g} against them"
    )
    prompts = list(prompts or GENERATION_PROMPTS) + [contexts[0][0][-60:]]
    res["generations"] = [
        {"prompt": p, "strength": a, "text": t}
        for a in strengths
        for p, t in zip(prompts, generate(lm, layer, prompts, a * unit_D, cfg.new_tokens))
    ]
    return res


def _own_model_checks(lm, direction: LatentDirection, ctx: Batch, base_lp: Tensor) -> dict:
    """Exclusive latents only: does the latent fire on its contexts when read from the real model
    (max f over the last tokens, in units of its typical activation), and what does ablating it do?"""
    seen = []
    with steering(lm, direction.layer, lambda h, keep: seen.append(direction.activation(h) * keep) or h):
        continuation_logprob(lm, ctx)
    K = ctx.scored_BK.shape[1]
    fires = (seen[0][:, -K - 1 :].max(1).values / direction.typical).tolist()
    with steering(lm, direction.layer, ablate_edit(direction)):
        ablated = continuation_logprob(lm, ctx)
    return {
        "context_activation": fires,
        "ablation_dlogprob": float((ablated - base_lp).mean()),
    }


def _stats(name: str, x_SR: np.ndarray) -> dict:
    """Per strength: the latent's value, the null's mean and std (ddof 1) and the latent's z-score."""
    mean, std = x_SR[:, 1:].mean(1), x_SR[:, 1:].std(1, ddof=1)
    z = np.array([null_z(float(v), float(m), float(s)) for v, m, s in zip(x_SR[:, 0], mean, std)])
    return {
        name: x_SR[:, 0].tolist(),
        f"{name}_null_mean": mean.tolist(),
        f"{name}_null_std": std.tolist(),
        f"{name}_z": z.tolist(),
    }


# ----------------------------------------------------------------------------- run files


def _latent_rows(run: Path) -> list[dict]:
    """The analysis's rows (latent order), or [] before any analysis (one latent can still be steered
    from its feature file)."""
    if not (run / "analysis" / "latents.csv").is_file():
        return []
    return load_results(run).rows  # with crossdiff verify's behaviour_* columns joined


@dataclass(frozen=True)
class Steered:
    """One latent of a steering run: what `steer` returns for each latent it was asked to steer."""

    latent: int
    model: str
    """The model steered ("a" or "b")."""
    result: dict | None
    """Its measurement as RUN/steering/<latent>.json holds it (docs/steering.md); None when the time
    budget skipped it."""

    @property
    def verdict(self) -> str:
        """pass, fail, or skipped (the time budget ran out first)."""
        return "skipped" if self.result is None else self.result["verdict"]

    @property
    def effect_size(self) -> float | None:
        """The latent's Δlogprob z-score at the verdict strength (None when skipped)."""
        return None if self.result is None else self.result["effect_size"]


def record_verdicts(run: Path, steered: list[Steered]) -> None:
    """Add (or update) these latents' verdicts in RUN/steering/verdicts.csv."""
    rows = read_stage(run, STEERING)
    for s in steered:
        effect = None if s.effect_size is None else format(s.effect_size, ".4g")
        rows[s.latent] = {"verdict": s.verdict, "effect": effect}
    write_stage(run, STEERING, rows)


def typical_activation(latent: int, rows: list[dict], doc: dict | None) -> float:
    """p99_act from latents.csv; else the median of the top examples' activations (a high percentile)."""
    if latent < len(rows):
        try:
            v = float(rows[latent].get("p99_act", math.nan))
        except (TypeError, ValueError):
            v = math.nan
        if math.isfinite(v) and v > 0:
            return v
    vals = [ex["value"] for ex in (doc or {}).get("examples", []) if ex.get("value", 0) > 0]
    if vals:
        return float(np.median(vals))
    raise CrossdiffError(
        f"latent {latent} has no recorded activations; run crossdiff analyze on this run first"
    )


def _feature_doc(run: Path, latent: int) -> dict | None:
    import json

    path = run / "analysis" / "features" / f"{latent}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class _Models:
    """Each model loaded at most once, on first use."""

    def __init__(self, cc, device):
        self.cc, self.device, self.loaded = cc, device, {}

    def __getitem__(self, m: str):
        if m not in self.loaded:
            from ..inputs.models import load_model

            self.loaded[m] = load_model(getattr(self.cc.cfg, f"model_{m}"), device=self.device)
        return self.loaded[m]


def steer_one(cc, run: Path, latent: int, model: str | None, lms, rows, cfg: SteerConfig) -> dict:
    doc = _feature_doc(run, latent)
    typical = typical_activation(latent, rows, doc)
    direction = latent_direction(cc, latent, model, typical)
    if direction.layer is None:
        raise CrossdiffError(
            "the checkpoint records no layer for this model; retrain with a current crossdiff"
        )
    contexts = contexts_from_features(doc, cfg.n_contexts, cfg.prompt_chars, cfg.continuation_chars)
    prompts = None
    if cfg.prompts:
        lines = Path(cfg.prompts).read_text(encoding="utf-8").splitlines()
        prompts = [p for p in lines if p.strip()]
    res = steer_latent(lms[direction.model], direction, contexts, cfg, prompts)
    write_json_atomic(run / "steering" / f"{latent}.json", res)
    return res


def top_candidates(rows: list[dict], n: int, include_rejected: bool = False) -> list[tuple[int, str]]:
    """(latent, model) of the top `n` behavioural `difference`s of each model (crossdiff verify's
    column behaviour_verdict; most of the gap closed first), interleaved; with `include_rejected`, slots
    left free are filled with the model's other exclusive candidates (best score first). Every
    difference comes before every filler, so that a time budget spends itself on the differences."""
    table = LatentTable([], rows)
    diffs, fills = {}, {}
    for m in "ab":
        cands = table.candidates(m)
        picked = [r for r in cands if r.get("behaviour_verdict") == "difference"]
        picked.sort(key=lambda r: -_float(r.get("behaviour_gap_closed")))
        diffs[m] = [(int(r["latent"]), m) for r in picked[:n]]
        others = [r for r in cands if r.get("behaviour_verdict") != "difference"] if include_rejected else []
        fills[m] = [(int(r["latent"]), m) for r in others[: n - len(diffs[m])]]
    return _interleave(diffs["a"], diffs["b"]) + _interleave(fills["a"], fills["b"])


def _interleave(xs: list, ys: list) -> list:
    n = max(len(xs), len(ys))
    return [v for pair in zip(xs + [None] * n, ys + [None] * n) for v in pair if v is not None]


def _float(s) -> float:
    """A sort key: the number, -inf where there is none (a missing gap closed sorts last)."""
    v = as_float(s)
    return v if math.isfinite(v) else -math.inf


def stage_settings(cfg: SteerConfig) -> dict:
    """What `crossdiff diff`'s steering stage records: the settings a diff chooses (how many latents,
    the time budget; the rest are steer's defaults there) and the candidate rules' version (it steers
    the candidates). As pipeline.py assembled it until commit e790170, so finished diffs stay finished."""
    from .analyze import RULES_VERSION

    return {"top": cfg.top, "budget_seconds": cfg.budget_seconds, "rules": RULES_VERSION}


@writes(lambda cfg: Path(cfg.run) / "steering", record="tree")
def steer(cfg: SteerConfig, models=None) -> list[Steered]:
    """Run the command; returns one Steered per latent it was to steer (one with --latent), in order.
    With --top and nothing to steer (verified, but no candidate left to fill a slot), the steering folder
    records that (an empty verdicts.csv) and the list is empty."""
    from tqdm.auto import tqdm

    from ..coder.crosscoder import Crosscoder

    run = Path(cfg.run)
    from ..core.runtime import resolve_device

    device = resolve_device(cfg.device)
    cc = Crosscoder.from_pretrained(run, device=device)
    if cfg.latent is not None and cfg.latent >= cc.cfg.n_latents:  # before any model is loaded
        raise CrossdiffError(
            f"--latent {cfg.latent} is out of range: the crosscoder in {run} has latents 0..{cc.cfg.n_latents - 1}"
        )
    lms = models if models is not None else _Models(cc, device)
    rows = _latent_rows(run)
    if cfg.latent is not None:
        res = steer_one(cc, run, cfg.latent, cfg.model, lms, rows, cfg)
        steered = [Steered(cfg.latent, res["model"], res)]
        record_verdicts(run, steered)
        _print_result(res)
        return steered
    if not rows:
        raise CrossdiffError(f"{run / 'analysis' / 'latents.csv'} not found; run crossdiff analyze first")
    jobs = top_candidates(rows, cfg.top, cfg.include_rejected)
    if not jobs:
        if not cfg.include_rejected and not any(r.get("behaviour_verdict") for r in rows):
            raise CrossdiffError(
                f"{run} has no behavioural differences to steer (run crossdiff verify first)"
            )
        what = "exclusive candidates" if cfg.include_rejected else "behavioural differences"
        print(f"steer: nothing to steer ({run} has no {what})", file=sys.stderr)
        record_verdicts(run, [])  # done, with nothing steered
        return []
    start, steered, slowest = time.monotonic(), [], 0.0
    for latent, m in tqdm(jobs, desc="steer", unit="latent", dynamic_ncols=True):
        t0 = time.monotonic()
        go = fits_budget(t0 - start, slowest, cfg.budget_seconds)
        steered.append(Steered(latent, m, steer_one(cc, run, latent, m, lms, rows, cfg) if go else None))
        slowest = max(slowest, time.monotonic() - t0)
    record_verdicts(run, steered)
    _print_table(steered)
    return steered


def fits_budget(elapsed: float, slowest: float, budget: float | None) -> bool:
    """Start the next latent only if it should end within the budget, judged by the slowest latent so
    far (which includes loading a model): the budget is a limit, not a point after which to stop."""
    return budget is None or elapsed + slowest <= budget


def _print_result(res: dict) -> None:
    print(
        f"latent {res['latent']} (model {res['model']}): effect size z={res['effect_size']:.2f} -> {res['verdict']}"
    )
    for i, a in enumerate(res["strengths"]):
        print(
            f"  α={a:+g}  Δlogprob {res['dlogprob'][i]:+.3f} (null {res['dlogprob_null_mean'][i]:+.3f} "
            f"± {res['dlogprob_null_std'][i]:.3f}, z {res['dlogprob_z'][i]:+.2f})  KL {res['kl'][i]:.3f} "
            f"(null {res['kl_null_mean'][i]:.3f})"
        )


def _print_table(steered: list[Steered]) -> None:
    print("model latent  effect_z  verdict")
    for s in steered:
        eff = "-" if s.effect_size is None else f"{s.effect_size:8.2f}"
        print(f"{s.model:>5} {s.latent:>6}  {eff:>8}  {s.verdict}")
