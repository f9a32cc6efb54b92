"""Steering to verify (docs/design.md §6): push a latent's decoder direction into a real model and measure.

`steer(SteerConfig(run=RUN, latent=I))` / `crossdiff steer --run RUN --latent I` writes
RUN/steering/<I>.json; `--top N` verifies the top N exclusive candidates of each model. Every steered
latent's verdict and effect go in RUN/steering/verdicts.csv (crossdiff.analysis.results joins it to the analysis
as `steer_verdict` / `steer_effect`). Schema and verdict rule: docs/steering.md.

Hooks are forward hooks on the crosscoder's block of the real HF model (`lm.blocks[layer]`), editing
its output, the residual stream the crosscoder was trained on. Edits (all in raw units, d_raw = d / scale):

    add     h + α · p99 · d_raw           α in units of the latent's typical (99th-percentile) activation
    ablate  h − f(h) · d_raw              remove the latent's reconstructed contribution
    clamp   h + (c · p99 − f(h)) · d_raw  hold the latent at c times its typical activation

Special tokens (BOS, template tokens) are never edited — the same tokens harvest never aligned, so the
crosscoder never saw them (align.tokenize). The mask comes from the token ids of each forward call, so
during `generate` with a KV cache, where the block sees only the new positions, it still lines up.

f(h) needs the encoder. A crosscoder's shared latent reads both models (x_A and x_B of the *same* text
at aligned tokens), which a single model's forward does not have, so ablate/clamp refuse shared latents.
An exclusive latent of model m reads only x_m (its weights in the other model do not exist), so its
f is exact from m's own activation — up to the sparsity rule: batchtopk's learned threshold is applied;
topk's per-token ranking (which depends on latents that read the other model) is not.

Legend: B sequences, T positions, D model width, V vocabulary, R random directions, S strengths.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..core.errors import CrossdiffError
from ..core.fsutil import write_json_atomic
from ..core.lock import writes
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
    run: str
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
    device: str = "cpu"
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


# ----------------------------------------------------------------------------- the latent's direction


@dataclass(frozen=True)
class LatentDirection:
    """One latent as seen by one model, with what the hooks need to compute and edit it."""

    latent: int
    model: str
    layer: int
    d_raw_D: Tensor
    """Decoder row in raw units (normalised row / scale)."""
    typical: float
    """Typical activation (p99, normalised latent units) that α is measured in."""
    exclusive: bool
    scale: float
    w_enc_D: Tensor
    b_enc: float
    b_dec_D: Tensor
    threshold: float
    """batchtopk: f counts only where f·‖d‖ > threshold (−1: no threshold)."""
    dec_norm: float

    def activation(self, h_BTD: Tensor) -> Tensor:
        """f (B, T) from the model's own raw activation; exact for exclusive latents only."""
        if not self.exclusive:
            raise CrossdiffError(
                f"latent {self.latent} is shared: its activation reads both models at aligned tokens, "
                "so ablating or clamping it needs paired text; steer it additively instead"
            )
        x = h_BTD.float() * self.scale - self.b_dec_D.to(h_BTD.device)
        f = (x @ self.w_enc_D.to(h_BTD.device) + self.b_enc).relu()
        return f * (f * self.dec_norm > self.threshold) if self.threshold >= 0 else f


def latent_direction(cc, latent: int, model: str | None = None, typical: float = 1.0) -> LatentDirection:
    """The latent's decoder direction in `model` ("a" / "b"; default its own or larger one)."""
    part, c = cc.partition, cc.cfg
    if not 0 <= latent < c.n_latents:
        raise CrossdiffError(f"latent {latent} is out of range: the crosscoder has {c.n_latents} latents")
    if model is None:
        if latent in part.a_exclusive or latent in part.b_exclusive:
            model = "a" if latent in part.a_exclusive else "b"
        else:
            na, nb = (float(n[latent]) for n in cc.decoder_norms())
            model = "a" if na >= nb else "b"
    W_enc, W_dec, b_dec, scale, own = cc.side(model)
    if latent not in own:
        raise CrossdiffError(
            f"latent {latent} is exclusive to the other model: it has no direction in {model}"
        )
    row = latent - own.start
    with torch.no_grad():
        return LatentDirection(
            latent=latent,
            model=model,
            layer=c.model(model).layer,
            d_raw_D=(W_dec[row] / scale).detach().float().cpu(),
            typical=float(typical),
            exclusive=latent not in part.shared,
            scale=scale,
            w_enc_D=W_enc[row].detach().float().cpu(),
            b_enc=float(cc.b_enc[latent]),
            b_dec_D=b_dec.detach().float().cpu(),
            threshold=float(cc.threshold) if c.rule.learns_threshold else -1.0,
            dec_norm=float(W_dec[row].norm()),
        )


# ----------------------------------------------------------------------------- hooks

Edit = Callable[[Tensor, Tensor], Tensor]  # (h_BTD, keep_BT bool) -> new h_BTD


def _special_table(lm) -> Tensor:
    from ..inputs.align import _is_special_table

    table = torch.from_numpy(_is_special_table(lm.tokenizer))
    vocab = max(len(table), int(lm.model.config.get_text_config().vocab_size))
    return torch.nn.functional.pad(table, (0, vocab - len(table))).to(lm.device)


@contextmanager
def steering(lm, layer: int, edit: Edit):
    """Apply `edit` to block `layer`'s output on every forward (generate included) until exit.

    keep_BT marks the non-special tokens of the current call's input_ids (only the new ones when a KV
    cache is in use); calls without input_ids (inputs_embeds) edit every position.
    """
    table, state = _special_table(lm), {}

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["keep"] = None if ids is None else ~table[ids]

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        keep = state.get("keep")
        if keep is None or keep.shape != h.shape[:2]:
            keep = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        new = edit(h, keep).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = [
        lm.model.register_forward_pre_hook(pre, with_kwargs=True),
        lm.blocks[layer].register_forward_hook(hook),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def add_edit(delta: Tensor) -> Edit:
    """h + delta at kept positions; delta is (D,) or per-sequence (B, D)."""

    def edit(h, keep):
        d = delta.to(h.device, torch.float32)
        d = d[:, None, :] if d.ndim == 2 else d
        return h + keep[..., None] * d

    return edit


def ablate_edit(direction: LatentDirection) -> Edit:
    """h − f(h)·d_raw: remove the latent's reconstructed contribution (exclusive latents only)."""
    return clamp_edit(direction, 0.0)


def clamp_edit(direction: LatentDirection, value: float) -> Edit:
    """h + (value·typical − f(h))·d_raw: hold the latent at `value` times its typical activation."""

    def edit(h, keep):
        f = direction.activation(h)
        target = value * direction.typical
        return h + (keep * (target - f))[..., None] * direction.d_raw_D.to(h.device)

    return edit


# ----------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Batch:
    ids_BT: Tensor
    mask_BT: Tensor
    scored_BK: Tensor
    """Which of the last K tokens of each (left-padded) sequence are scored continuation tokens."""


def encode_batch(lm, texts: list[str], prompt_lens: list[int] | None = None) -> Batch:
    """Left-padded batch (sequences end together); scored = non-special tokens starting at or after
    the prompt's end (position ≥ 1, so each has a predictor)."""
    from ..inputs.align import tokenize

    toks = [tokenize(lm.tokenizer, t) for t in texts]
    T = max(len(t.input_ids) for t in toks)
    ids = torch.full((len(texts), T), _pad_id(lm), dtype=torch.long)
    mask = torch.zeros((len(texts), T), dtype=torch.long)
    scored = torch.zeros((len(texts), T), dtype=torch.bool)
    for i, t in enumerate(toks):
        n = len(t.input_ids)
        ids[i, T - n :], mask[i, T - n :] = torch.from_numpy(t.input_ids), 1
        if prompt_lens is not None:
            s = (t.offsets[:, 0] >= prompt_lens[i]) & ~t.special_mask & (np.arange(n) >= 1)
            scored[i, T - n :] = torch.from_numpy(s)
    k = int(scored.any(0).nonzero().min()) if scored.any() else T - 1
    return Batch(ids.to(lm.device), mask.to(lm.device), scored[:, k:].to(lm.device))


def _pad_id(lm) -> int:
    tok = lm.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


@torch.inference_mode()
def _logprobs(lm, batch: Batch, keep_last: int) -> Tensor:
    """log-softmax of the logits at the last `keep_last` positions (B, keep_last, V), float32."""
    pos = (batch.mask_BT.cumsum(-1) - 1).clamp_min(0)
    out = lm.model(
        input_ids=batch.ids_BT,
        attention_mask=batch.mask_BT,
        position_ids=pos,
        use_cache=False,
        logits_to_keep=keep_last,
    )
    return out.logits.float().log_softmax(-1)


def continuation_logprob(lm, batch: Batch) -> Tensor:
    """Mean log-probability per scored token of each sequence (B,)."""
    K = batch.scored_BK.shape[1]
    lp = _logprobs(lm, batch, K + 1)[:, :-1]  # position t-1 predicts token t
    tok = lp.gather(-1, batch.ids_BT[:, -K:, None])[..., 0]
    n = batch.scored_BK.sum(1).clamp_min(1)
    return (tok * batch.scored_BK).sum(1) / n


def next_token_logprobs(lm, batch: Batch) -> Tensor:
    return _logprobs(lm, batch, 1)[:, -1]


def measure(lm, layer: int, deltas_RD: Tensor, contexts: Batch, neutral: Batch, base: tuple) -> tuple:
    """(Δlogprob (R,), KL (R,)) of each steering vector: mean over contexts of the change in continuation
    log-probability, and mean over neutral prompts of KL(base ‖ steered) of the next-token distribution."""
    dlp, kl = [], []
    for delta_D in deltas_RD:  # one vector at a time keeps Gemma's 262k-vocab logits small
        with steering(lm, layer, add_edit(delta_D)):
            lp = continuation_logprob(lm, contexts)
            nt = next_token_logprobs(lm, neutral)
        dlp.append((lp - base[0]).mean())
        kl.append((base[1].exp() * (base[1] - nt)).sum(-1).mean())
    return torch.stack(dlp).cpu().numpy(), torch.stack(kl).cpu().numpy()


def random_directions(d_raw_D: Tensor, n: int, seed: int) -> Tensor:
    """(n, D) Gaussian directions with the decoder row's raw norm, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d_raw_D.shape[0], generator=g)
    return r / r.norm(dim=1, keepdim=True) * d_raw_D.norm()


@torch.inference_mode()
def generate(lm, layer: int, prompts: list[str], delta_D: Tensor | None, new_tokens: int) -> list[str]:
    """Greedy continuations with `delta_D` added at every non-special position (prompt and new tokens);
    None: no hook at all."""
    tok = lm.tokenizer
    old, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True).to(lm.device)
    finally:
        tok.padding_side = old
    hooks = steering(lm, layer, add_edit(delta_D)) if delta_D is not None else nullcontext()
    with hooks:
        out = lm.model.generate(
            **enc,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=_pad_id(lm),
            top_p=None,
            top_k=None,
        )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


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


def record_verdicts(run: Path, results: dict[int, dict | None]) -> None:
    """Add (or update) these latents' verdicts in RUN/steering/verdicts.csv; None means skipped."""
    rows = read_stage(run, STEERING)
    for latent, r in results.items():
        rows[latent] = (
            {"verdict": "skipped", "effect": None}
            if r is None
            else {"verdict": r["verdict"], "effect": format(r["effect_size"], ".4g")}
        )
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


@writes(lambda cfg: Path(cfg.run) / "steering", record="tree")
def steer(cfg: SteerConfig, models=None) -> dict:
    """Run the command; returns {latent: its result, or None when the time budget skipped it}, one entry
    with --latent. With --top and nothing to steer (verified, but no candidate left to fill a slot), the
    steering folder records that (an empty verdicts.csv) and the result is {}."""
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
        record_verdicts(run, {cfg.latent: res})
        _print_result(res)
        return {cfg.latent: res}
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
        record_verdicts(run, {})  # done, with nothing steered
        return {}
    start, results, slowest = time.monotonic(), {}, 0.0
    for latent, m in tqdm(jobs, desc="steer", unit="latent", dynamic_ncols=True):
        t0 = time.monotonic()
        go = fits_budget(t0 - start, slowest, cfg.budget_seconds)
        results[latent] = steer_one(cc, run, latent, m, lms, rows, cfg) if go else None
        slowest = max(slowest, time.monotonic() - t0)
    record_verdicts(run, results)
    _print_table(results, jobs)
    return results


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


def _print_table(results: dict, jobs) -> None:
    print("model latent  effect_z  verdict")
    for latent, m in jobs:
        r = results[latent]
        eff = "-" if r is None else f"{r['effect_size']:8.2f}"
        print(f"{m:>5} {latent:>6}  {eff:>8}  {'skipped' if r is None else r['verdict']}")
