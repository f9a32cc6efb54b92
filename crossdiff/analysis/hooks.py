"""A latent's direction in a real model, and the hooks that push it in or take it out there
(steering, crossdiff/analysis/steer.py; chat steering, analysis/chatsteer.py).

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

Legend: B sequences, T positions, D model width, V vocabulary, R random directions.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..core.errors import CrossdiffError

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


def project_edit(Q_KD: Tensor, c_D: Tensor) -> Edit:
    """h − (h − c) Q^T Q: remove the centred activation's component in the span of Q's orthonormal
    rows (a group of latents' decoder directions). This needs no encoder, so it also ablates shared
    latents during generation, where the other model's text does not exist; it removes everything
    the model writes along those directions there, which the same edit on random subspaces of equal
    dimension controls for (chatsteer.ablate_subspace_behaviour)."""

    def edit(h, keep):
        Q = Q_KD.to(h.device, torch.float32)
        x = h.float() - c_D.to(h.device, torch.float32)
        return h - keep[..., None] * ((x @ Q.T) @ Q)

    return edit


def orthonormal_rows(U_KD: Tensor) -> Tensor:
    """(K', D) orthonormal rows spanning U's rows (K' = its rank), by a reduced QR."""
    Q, R = torch.linalg.qr(U_KD.double().T)
    keep = R.diagonal().abs() > 1e-5 * R.diagonal().abs().max()  # float32 rows: rank to its rounding
    return Q.T[keep].float()


def random_subspaces(k: int, d: int, n: int, seed: int) -> list[Tensor]:
    """`n` random (k, d) orthonormal bases from a seeded generator: the null of a k-dimensional ablation."""
    g = torch.Generator().manual_seed(seed)
    return [orthonormal_rows(torch.randn(k, d, generator=g)) for _ in range(n)]


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
