"""Held-out text for verification (verify.py): the pair helpers every pass shares (both tokenisations
of one text, aligned; the harvest's masks; the crosscoder on the paired activations), and the one
pass over held-out chunks that gives every candidate's first-order estimate and the whole-diff share
(docs/verification.md, "First-order ranking and the whole-diff share").

Legend: T positions, D width, P kept aligned pairs, F latents, C candidates, S scored tokens, K segments.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def tokenize_pair(sides, text: str):
    from ..inputs.align import align, tokenize

    toks = tuple(tokenize(s.tokenizer, text) for s in sides)
    al = align(toks[0].offsets, toks[1].offsets, toks[0].special_mask, toks[1].special_mask)
    return toks, al


def targets(tok, lo: int, hi: int) -> np.ndarray:
    """Positions of the text tokens whose end lies in (lo, hi] (they cover exactly those characters
    when lo and hi end a token)."""
    ends = tok.offsets[:, 1]
    ok = (ends > lo) & (ends <= hi) & (tok.offsets[:, 1] > tok.offsets[:, 0]) & ~tok.special_mask
    return np.flatnonzero(ok & (np.arange(len(ends)) >= 1))


def keep_pairs(h_TD: tuple, toks, al, outlier_factor: float) -> np.ndarray:
    """(P,) bool: harvest's masks (harvest/pairs.py, _process_batch): no first pair, no norm outlier."""
    keep = np.ones(len(al), dtype=bool)
    keep[:1] = False
    from ..inputs.models import batch_median_norm  # the outlier reference harvest and splice use

    for h, tok, pos in zip(h_TD, toks, (al.idx_a, al.idx_b)):
        med = batch_median_norm(h.cpu()[None], [tok])
        keep &= (h.cpu()[torch.as_tensor(pos)].norm(dim=-1) <= outlier_factor * med).numpy()
    return keep


def encode_pairs(cc, h_a: Tensor, h_b: Tensor, pos_a, pos_b) -> Tensor:
    dev = cc.b_enc.device
    x_a = h_a[torch.as_tensor(pos_a)].to(dev, torch.float32)
    x_b = h_b[torch.as_tensor(pos_b)].to(dev, torch.float32)
    with torch.inference_mode():
        return cc.encode(*cc.normalise(x_a, x_b)).clone()


def heldout_pass(sides, cc, store, cands: list, cfg, factor: float) -> dict:
    """First-order shift towards the other model of every candidate, and the whole-diff share, on
    held-out chunks. Per text and side m: segments between consecutive aligned ends, w_k = sign(ℓ_other,k
    − ℓ_m,k), one backward of Σ_k w_k ℓ_m,k; a latent's estimate is Σ_t (−f_t u) · grad_t."""
    from ..inputs.variants import Window

    est = {c.latent: 0.0 for c in cands}
    fired = {c.latent: 0 for c in cands}  # firing positions: an estimate of 0 from no firing is no estimate
    n_tok = {"a": 0, "b": 0}
    gaps = {m: np.zeros(3) for m in "ab"}  # Σ|g| clean, spliced full, spliced without the side's candidates
    for chunk, text in store.heldout_chunks(cfg.heldout_tokens):
        window = Window(text, chunk, 0)
        toks, al = tokenize_pair(sides, text)
        if len(al) < 3:
            continue
        ends = al.end_char
        tgt = [targets(t, int(ends[0]), int(ends[-1])) for t in toks]
        if min(len(x) for x in tgt) == 0:
            continue
        ids = [torch.as_tensor(t.input_ids) for t in toks]
        plants = [
            s.plant.mask(window, t.offsets, t.special_mask) if s.plant else None for s, t in zip(sides, toks)
        ]
        outs = [
            s.forward(i_, torch.as_tensor(t_), plant_T=p, grad=True)
            for s, i_, t_, p in zip(sides, ids, tgt, plants)
        ]
        seg = [np.searchsorted(ends, t.offsets[x, 1], side="left") for t, x in zip(toks, tgt)]
        ell = [_segment_sums(o.logp_RS[0].detach(), s_, len(ends)) for o, s_ in zip(outs, seg)]
        keep = keep_pairs((outs[0].h_TD, outs[1].h_TD), toks, al, factor)
        pos = (al.idx_a[keep], al.idx_b[keep])
        f_PF = encode_pairs(cc, outs[0].h_TD, outs[1].h_TD, *pos).cpu()
        for m, own in (("a", 0), ("b", 1)):
            w_K = torch.as_tensor(np.sign(ell[1 - own] - ell[own]), dtype=torch.float32)
            J = (outs[own].logp_RS[0] * w_K[torch.as_tensor(seg[own])]).sum()
            grad_PD = torch.autograd.grad(J, outs[own].h_leaf, retain_graph=own == 0)[0][0].cpu()[pos[own]]
            mine = [c for c in cands if c.side == m]
            if mine:
                U_DC = torch.stack([c.u_D for c in mine], 1)
                f_PC = f_PF[:, [c.latent for c in mine]]
                for c, v, n in zip(
                    mine, (-(f_PC * (grad_PD @ U_DC))).sum(0).tolist(), (f_PC > 0).sum(0).tolist()
                ):
                    est[c.latent] += v
                    fired[c.latent] += n
            n_tok[m] += len(tgt[own])
            gaps[m] += _splice_gaps(
                sides[own],
                cc,
                m,
                ids[own],
                tgt[own],
                seg[own],
                pos[own],
                f_PF,
                outs[own].h_TD,
                ell,
                own,
                plants[own],
                [c.latent for c in mine],
            )
    share = {m: float((g[1] - g[2]) / g[1]) if g[1] > 0 else math.nan for m, g in gaps.items()}
    return {
        "first_order": {c.latent: est[c.latent] / max(n_tok[c.side], 1) for c in cands},
        "fired": fired,
        "whole": {
            m: {
                "gap_clean": g[0],
                "gap_spliced": g[1],
                "gap_without_candidates": g[2],
                "share": share[m],
                "n_tokens": n_tok[m],
            }
            for m, g in gaps.items()
        },
    }


def _segment_sums(logp_S: Tensor, seg_S: np.ndarray, n_seg: int) -> np.ndarray:
    return np.bincount(seg_S, weights=logp_S.double().cpu().numpy(), minlength=n_seg)


def _splice_gaps(side, cc, m, ids, tgt, seg, pos, f_PF, h_TD, ell, own, plant, mine) -> np.ndarray:
    """(Σ|g| clean, spliced with the reconstruction, spliced without the side's candidates)."""
    own_side = cc.side(m)
    W, b, scale, first = own_side.W_dec, own_side.b_dec, own_side.scale, own_side.first
    rows = slice(first, first + W.shape[0])
    f_own = f_PF[:, rows].to(W.device)
    with torch.inference_mode():
        full = (f_own @ W + b).cpu() / scale
        drop = torch.zeros(f_own.shape[1], dtype=torch.bool)
        idx = torch.as_tensor([j - first for j in mine if first <= j < first + W.shape[0]], dtype=torch.long)
        drop[idx] = True
        without = full - (f_own[:, drop.to(f_own.device)] @ W[drop.to(W.device)]).cpu() / scale
    deltas = torch.zeros(2, len(ids), h_TD.shape[1])
    deltas[0, pos] = full.float() - h_TD.cpu()[pos]
    deltas[1, pos] = without.float() - h_TD.cpu()[pos]
    out = side.forward(ids, torch.as_tensor(tgt), plant_T=plant, deltas_RTD=deltas)
    other = ell[1 - own]
    spliced = [_segment_sums(out.logp_RS[r], seg, len(other)) for r in range(2)]
    return np.array([np.abs(ell[own] - other).sum(), *(np.abs(s - other).sum() for s in spliced)])
