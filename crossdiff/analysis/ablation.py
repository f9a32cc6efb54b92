"""One candidate's ablation, measured: its contexts (held-out and fresh), each context's shift towards
the other model against random directions and the dictionary's directions, and the latent's verdict
from them. The measure and its formulas are crossdiff verify's (analysis/verify.py's docstring,
docs/verification.md); verify orders the candidates, spends the budget and writes the files. `cfg` is
verify's VerifyConfig (not imported: verify imports its measure).

Legend: T positions, D width, P kept aligned pairs, F latents, C candidates, R copies, S scored tokens,
K segments, M rows of one model's decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .answerlink import with_linked
from .heldout import _segment_sums, encode_pairs, keep_pairs, targets, tokenize_pair
from .results import as_float, null_z


@dataclass(frozen=True)
class Candidate:
    latent: int
    side: str  # "a" / "b": the model the latent belongs to
    p99: float
    u_D: Tensor  # decoder row in raw units, the crosscoder's coordinates of its model
    group: tuple[int, ...] = ()
    """The latents ablated together: the candidate first, then its duplicates (VerifyConfig.duplicate_cosine)."""
    U_GD: Tensor | None = None  # the group's decoder rows in raw units (None: the candidate alone)

    @property
    def members(self) -> tuple[int, ...]:
        return self.group or (self.latent,)

    @property
    def rows_GD(self) -> Tensor:
        return self.U_GD if self.U_GD is not None else self.u_D[None]


def candidates(
    cc,
    table,
    duplicate_cosine: float = 1.0,
    linked: dict[int, str] | None = None,
    groups: dict[int, tuple[int, ...]] | None = None,
) -> list[Candidate]:
    """The analysis's alive exclusive candidates (its `side` column) with their decoder rows in raw
    units, each with its group: the alive latents (any partition) whose decoder row in the candidate's
    model has cosine >= `duplicate_cosine` with its own. `linked` (latent -> side; answerlink.read_linked)
    adds the latents tied to an n-gram of the answers, whatever their partition or share; `groups`
    (leader -> members, answerlink.ngram_groups) adds to a linked latent's group the other alive latents
    linked to its n-gram."""
    from .evidence import decoder_rows

    alive = alive_mask(cc, table)
    out = []
    for row in with_linked(table, linked):
        p99 = as_float(row.get("p99_act"))
        if not math.isfinite(p99) or p99 <= 0:
            continue
        m, j = row["side"], int(row["latent"])
        scale = cc.side(m).scale
        u = decoder_rows(cc, [j], m)[0]
        group = duplicates(cc, m, j, alive, duplicate_cosine)
        group += tuple(k for k in (groups or {}).get(j, ()) if alive[k] and k not in group)
        U = (decoder_rows(cc, list(group), m) / scale).float() if len(group) > 1 else None
        out.append(Candidate(j, m, p99, (u / scale).float(), group if U is not None else (), U))
    return sorted(out, key=lambda c: c.latent)


def alive_mask(cc, table) -> Tensor:
    """(F,) bool: the latents the analysis did not find dead."""
    alive = torch.zeros(cc.cfg.n_latents, dtype=torch.bool)
    alive[[int(r["latent"]) for r in table.rows if r.get("verdict") != "dead"]] = True
    return alive


def duplicates(cc, m: str, j: int, alive_F: Tensor, min_cosine: float) -> tuple[int, ...]:
    """Latent j and the alive latents whose decoder row in model m has cosine >= min_cosine with j's,
    most similar first (read from the weights in place: no copy of the decoder)."""
    side = cc.side(m)
    W, first = side.W_dec.detach(), side.first
    u = W[j - first]
    cos_M = (W @ u) / (W.norm(dim=1) * u.norm()).clamp_min(1e-12)
    ids_M = torch.arange(first, first + W.shape[0], device=W.device)
    hit = (cos_M >= min_cosine) & alive_F.to(W.device)[ids_M] & (ids_M != j)
    order = torch.argsort(-cos_M[hit], stable=True)
    return (j, *ids_M[hit][order].tolist())


def strong_rows(cc, store, cands: list[Candidate], cfg, device) -> dict[int, dict]:
    """latent -> {"n": strong held-out firings, "rows": [(f, row)] strongest first, one per chunk}."""
    from .evidence import TopK

    if not cands:
        return {}
    ids = torch.as_tensor([c.latent for c in cands], device=device)
    floor = torch.as_tensor([cfg.strong * c.p99 for c in cands], device=device)
    counts = torch.zeros(len(cands), dtype=torch.int64, device=device)
    top = TopK(len(cands), 4 * cfg.n_contexts, device)
    with torch.inference_mode():
        for rows, _ in store.row_batches(1024, heldout_only=True):
            x_a, x_b = (x.to(device) for x in store.get(rows))
            f_BC = cc.encode(x_a, x_b)[:, ids]
            strong_BC = f_BC >= floor
            counts += strong_BC.sum(0)
            top.update(torch.where(strong_BC, f_BC, 0.0), torch.as_tensor(rows, device=device))
    out = {}
    for k, c in enumerate(cands):
        picks, chunks = [], set()
        pairs = top.examples(k)
        meta = store.rows([r for _, r in pairs]) if pairs else {"chunk": []}
        for (v, r), chunk in zip(pairs, meta["chunk"]):
            if int(chunk) not in chunks and len(picks) < cfg.n_contexts:
                chunks.add(int(chunk))
                picks.append((v, r))
        out[c.latent] = {"n": int(counts[k]), "rows": picks}
    return out


# ----------------------------------------------------------------------------- one context


def window_for(text: str, chunk: int, c0: int, cfg, lookahead: int = 80):
    """The slice of a chunk around a firing token that ends at c0: from a word start about
    prefix_chars before it to `lookahead` characters after it."""
    from ..inputs.variants import Window

    start = max(0, c0 - cfg.prefix_chars)
    if start > 0:
        space = next((i for i in range(start, c0) if text[i].isspace()), None)
        start = space + 1 if space is not None else start
    return Window(text[start : min(len(text), c0 + lookahead)], chunk, start), c0 - start


def score_context(
    sides,
    cc,
    cand: Candidate,
    window,
    c0: int,
    dirs_RD: Tensor,
    factor: float,
    ahead: int,
    anchor: str = "firing",
):
    """One context's measurements, or None when the firing does not reproduce in the window.

    anchor "firing": c0 ends the token where the candidate fires strongly. anchor "ngram": c0 starts an
    n-gram of the answers (answerlink.ngram_contexts); the scored span starts at the last aligned end
    at or before it, the group is removed on the positions up to there (the n-gram's lead-up), and the
    context counts when any member of the group fires on them."""
    own = "ab".index(cand.side)
    toks, al = tokenize_pair(sides, window.text)
    if anchor == "ngram":
        before = al.end_char[al.end_char <= c0]
        if not len(before):
            return None
        c0 = int(before[-1])
    # Scored span: up to the `ahead`-th aligned end after c0, never the last token of either side
    # (a word cut by the window's end tokenises differently).
    last = min(int(t.offsets[-1, 1]) for t in toks)
    after = al.end_char[(al.end_char > c0) & (al.end_char < last)]
    if not (al.end_char == c0).any() or len(after) == 0:
        return None
    c1 = int(after[min(len(after), ahead) - 1])
    tgt = [targets(t, c0, c1) for t in toks]
    if min(len(x) for x in tgt) == 0:
        return None
    plants = [
        s.plant.mask(window, t.offsets, t.special_mask) if s.plant else None for s, t in zip(sides, toks)
    ]
    ids = [torch.as_tensor(t.input_ids) for t in toks]
    other = sides[1 - own].forward(ids[1 - own], torch.as_tensor(tgt[1 - own]), plant_T=plants[1 - own])
    clean = sides[own].forward(ids[own], torch.as_tensor(tgt[own]), plant_T=plants[own], grad=True)
    h = (clean.h_TD, other.h_TD) if own == 0 else (other.h_TD, clean.h_TD)
    keep = keep_pairs(h, toks, al, factor)
    k0 = int(np.flatnonzero(al.end_char == c0)[0])
    if not keep[k0] and anchor == "firing":
        return None
    pos_a, pos_b = al.idx_a[keep], al.idx_b[keep]
    f_PG = encode_pairs(cc, h[0], h[1], pos_a, pos_b)[:, list(cand.members)].cpu()
    # An n-gram's group is removed on its lead-up only (where the link saw it fire: up to c0, the
    # position that predicts the n-gram); a firing context removes the candidate everywhere.
    upto_P = torch.as_tensor(al.end_char[keep] <= (c0 if anchor == "ngram" else c1))
    if anchor == "ngram":
        f_PG = f_PG * upto_P[:, None]
    # each member's strongest activation where it is removed (the group's steering strength)
    f_members = f_PG[upto_P].amax(0) if upto_P.any() else torch.zeros(f_PG.shape[1])
    f_at = float(f_PG[int(keep[:k0].sum()), 0]) if anchor == "firing" else float(f_members.max())
    if f_at <= 0:
        return None
    c_PD = f_PG @ cand.rows_GD  # what the candidate (with its duplicates) writes at each position
    # Segments: the characters between consecutive aligned ends in (c0, c1]; both models score each.
    ends_K = al.end_char[(al.end_char > c0) & (al.end_char <= c1)]
    seg = [np.searchsorted(ends_K, t.offsets[x, 1], side="left") for t, x in zip(toks, tgt)]
    l_own = _segment_sums(clean.logp_RS[0].detach(), seg[own], len(ends_K))
    l_other = _segment_sums(other.logp_RS[0], seg[1 - own], len(ends_K))
    # First-order estimate of the shift: Σ_k w_k Δℓ_k with w_k = sign(ℓ_other,k − ℓ_own,k) and
    # Δℓ ≈ Σ_t (−c_t) · ∂ℓ/∂h_t, from the clean run's graph.
    w_S = torch.as_tensor(np.sign(l_other - l_own)[seg[own]], dtype=clean.logp_RS.dtype)
    pos_own = torch.as_tensor(pos_a if own == 0 else pos_b)
    grad_TD = torch.autograd.grad((clean.logp_RS[0] * w_S).sum(), clean.h_leaf)[0][0]
    first_order = float(-(c_PD * grad_TD.cpu()[pos_own]).sum())
    # Exact: copy 0 removes c_t, copies 1..R remove ||c_t|| r (r a random unit direction). Positions
    # after the last target change no scored log-probability (the model is causal): cut.
    n_in = int(tgt[own].max()) + 1
    deltas = torch.zeros(1 + len(dirs_RD), len(ids[own]), c_PD.shape[1])
    deltas[0, pos_own] = -c_PD
    deltas[1:, pos_own] = -c_PD.norm(dim=1)[None, :, None] * dirs_RD[:, None, :]
    plant_in = None if plants[own] is None else plants[own][:n_in]
    abl = sides[own].forward(
        ids[own][:n_in], torch.as_tensor(tgt[own]), plant_T=plant_in, deltas_RTD=deltas[:, :n_in]
    )
    l_abl_RK = np.stack([_segment_sums(abl.logp_RS[r], seg[own], len(ends_K)) for r in range(len(deltas))])
    n = len(tgt[own])
    gap = np.abs(l_own - l_other).sum()  # Σ_k |g_k|
    closed_R = gap - np.abs(l_abl_RK - l_other[None]).sum(1)  # Σ_k |g_k| − |g⁻_k| per copy
    return {
        "chunk": window.chunk,
        "start": window.start,
        "c0": c0,
        "c1": c1,
        "text_before": window.text[max(0, c0 - 80) : c0],
        "scored": window.text[c0:c1],
        "f": f_at,
        "f_members": f_members.tolist(),
        "n_tokens": n,
        "l_own": float(l_own.sum()),
        "l_other": float(l_other.sum()),
        "l_ablated": float(l_abl_RK[0].sum()),
        "shift": float(closed_R[0]) / n,
        "random_shifts": (closed_R[1:] / n).tolist(),
        "first_order": first_order / n,
        "gap": float(gap) / n,
        "segments": {"own": l_own.tolist(), "other": l_other.tolist(), "ablated": l_abl_RK[0].tolist()},
    }


# ----------------------------------------------------------------------------- one latent


def verify_latent(sides, cc, store, cand: Candidate, rows: list, cfg, factor: float) -> dict:
    """Score the latent's strong contexts (`rows`: heldout_contexts and scan.FreshScan.contexts dicts);
    its summary and verdict against the random null, with the contexts."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + cand.latent)

    def gaussian(_k):
        r = torch.randn(cfg.n_random, len(cand.u_D), generator=g)
        return r / r.norm(dim=1, keepdim=True)  # unit: each ablation removes ||c_t|| along it

    # Fresh directions per context, so that under the null the contexts are independent draws.
    contexts = _score_rows(sides, cc, store, cand, rows, cfg, factor, gaussian)
    return {**summarise(contexts, cfg), "contexts": contexts}


def with_dictionary_null(
    sides, cc, store, cand: Candidate, rows: list, cfg, factor, dictionary_ND, res
) -> dict:
    """`res` (a verify_latent result) with its contexts scored again against directions the dictionary
    uses (`dictionary_ND`, see dictionary_directions), and its verdict by both nulls: a `difference`
    (or `shared behaviour`) whose z_dictionary does not reach cfg.z becomes `inert`. With fewer such
    directions than n_random there is no dictionary null and the random one decides alone."""
    if len(dictionary_ND) < cfg.n_random:
        return res
    h = torch.Generator().manual_seed(cfg.seed * 1_000_003 + cand.latent + 1)
    pick = lambda _k: dictionary_ND[torch.randperm(len(dictionary_ND), generator=h)[: cfg.n_random]]
    again = {_key(c): c for c in _score_rows(sides, cc, store, cand, rows, cfg, factor, pick)}
    contexts = [{**c, "dictionary_shifts": again[_key(c)]["random_shifts"]} for c in res["contexts"]]
    out = {**res, **dictionary_null(contexts, res["shift"]), "contexts": contexts}
    return {**out, "verdict": both_nulls(out, cfg)}


def both_nulls(res: dict, cfg) -> str:
    """The verdict when z (random directions) and z_dictionary (the dictionary's) must both reach cfg.z."""
    zd = res.get("z_dictionary")
    if res["verdict"] == "difference" and zd is not None and not zd >= cfg.z:
        return "inert"
    if res["verdict"] == "shared behaviour" and zd is not None and not zd <= -cfg.z:
        return "inert"
    return res["verdict"]


def _key(context: dict) -> tuple[int, int]:
    """A scored context's firing: its chunk and the firing token's end in the chunk."""
    return int(context["chunk"]), int(context["start"]) + int(context["c0"])


class ChunkTexts:
    """A store chunk's text record (store.texts: "text", "messages", ...) by its id, each shard's texts
    read once: through the shard of one of its rows when known (a firing context), else shard by shard
    until found (an n-gram context has no row). `get` returns None for a chunk the store lacks."""

    def __init__(self, store):
        self.store, self.shards, self.read = store, {}, 0

    def get(self, chunk: int, row=None) -> dict | None:
        if row is not None:
            shard = self.store.shard_of(int(row))
            self.shards.setdefault(shard, self.store.texts(shard))
            return self.shards[shard].get(chunk)
        n_shards = len(self.store.meta["shards"])
        while not any(chunk in t for t in self.shards.values()) and self.read < n_shards:
            self.shards.setdefault(self.read, self.store.texts(self.read))
            self.read += 1
        return next((t[chunk] for t in self.shards.values() if chunk in t), None)


def heldout_contexts(store, picks: list) -> list[dict]:
    """Held-out strong firings [(f, row)] as contexts: {f, row, chunk, c0, text} (c0: the token's end)."""
    if not picks:
        return []
    meta = store.rows([row for _, row in picks])
    texts = ChunkTexts(store)
    out = []
    for k, (f, row) in enumerate(picks):
        chunk = int(meta["chunk"][k])
        out.append(
            {
                "f": f,
                "row": int(row),
                "chunk": chunk,
                "c0": int(meta["char_end"][k]),
                "text": texts.get(chunk, row)["text"],
            }
        )
    return out


def _score_rows(sides, cc, store, cand: Candidate, rows: list, cfg, factor: float, draw) -> list:
    """score_context on each context of `rows` (heldout_contexts dicts), with the null directions
    draw(k) of context k."""
    contexts = []
    for k, src in enumerate(rows):
        window, c0w = window_for(src["text"], src["chunk"], src["c0"], cfg)
        anchor = src.get("anchor", "firing")
        ctx = score_context(sides, cc, cand, window, c0w, draw(k), factor, cfg.ahead, anchor)
        if ctx is not None:
            fresh = src.get("fresh", src["row"] is None)
            contexts.append({"row": src["row"], "fresh": fresh, "anchor": anchor, **ctx})
    return contexts


def dictionary_directions(cc, cand: Candidate, alive_F: Tensor) -> Tensor:
    """(M, D) unit vectors in raw units: the decoder rows, in the candidate's model, of the alive
    latents outside its group. Ablating these at the candidate's norm is a null of directions the
    model's dictionary uses, where a random direction is one nothing uses (docs/verification.md)."""
    from .evidence import decoder_rows

    side = cc.side(cand.side)
    keep = alive_F.cpu().clone()
    keep[list(cand.members)] = False
    ids = [j for j in side.latents if keep[j]]
    if not ids:
        return torch.zeros(0, len(cand.u_D))
    U = (decoder_rows(cc, ids, cand.side) / side.scale).float()
    return U / U.norm(dim=1, keepdim=True).clamp_min(1e-12)


def dictionary_null(contexts: list[dict], shift: float) -> dict:
    """z of `shift` against the dictionary directions' shifts (each averaged over the same contexts)."""
    z, mu, _ = _z_against(shift, contexts, "dictionary_shifts")
    return {"z_dictionary": z, "dictionary_null_mean": mu}


def _z_against(shift: float, contexts: list[dict], key: str) -> tuple[float, float, float]:
    """(z, mean, std) of `shift` against the null whose R draws are contexts' `key` lists averaged
    over the contexts (one mean per null direction index)."""
    null_R = np.mean([c[key] for c in contexts], axis=0)
    mu, sd = float(null_R.mean()), float(null_R.std(ddof=1))
    return null_z(shift, mu, sd), mu, sd


def summarise(contexts: list[dict], cfg) -> dict:
    """A latent's shift, z, gap closed and verdict from its scored contexts."""
    n = len(contexts)
    if n < cfg.min_contexts:
        return {"verdict": "too rare", "n_contexts": n}
    shift = float(np.mean([c["shift"] for c in contexts]))
    z, mu, sd = _z_against(shift, contexts, "random_shifts")
    gaps = np.array([c["gap"] * c["n_tokens"] for c in contexts])
    closed = np.array([c["shift"] * c["n_tokens"] for c in contexts])
    verdict = "inert"
    if shift >= cfg.min_shift and z >= cfg.z:
        verdict = "difference"
    elif shift <= -cfg.min_shift and z <= -cfg.z:
        verdict = "shared behaviour"
    return {
        "verdict": verdict,
        "n_contexts": n,
        "shift": shift,
        "z": z,
        "gap_closed": float(closed.sum() / gaps.sum()) if gaps.sum() > 0 else 0.0,
        "null_mean": mu,
        "null_std": sd,
        "gap": float(np.mean([c["gap"] for c in contexts])),
        "first_order_contexts": float(np.mean([c["first_order"] for c in contexts])),
    }
