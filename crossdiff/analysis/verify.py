"""`crossdiff verify`: behavioural verification of exclusive candidates (docs/verification.md).

A difference between two models is what a feature *does*, not whether the other model can detect its
context (docs/design.md §5). For a candidate of A (B is the mirror image), on held-out contexts where
it fires strongly (f ≥ strong · p99), both models score the same following characters — from the
firing token's end c0 to the `ahead`-th aligned boundary after it, c1 — each with its own tokenizer:

    ℓ_A,k, ℓ_B,k   log p of segment k's characters under A and under B (nats), the segments being
                   the characters between consecutive aligned ends in (c0, c1] (each ends a token in
                   both tokenisations, so both sums cover exactly those characters)
    ℓ_A,k⁻         the same under A with the latent's contribution removed at the layer: h − f_t · d_A
                   at every aligned position t of the context (raw units; inputs/variants.py's hook)
    ℓ_A,k^r        the same with ‖f_t · d_A‖ · r removed instead, r a random unit direction (19 per
                   context, drawn afresh for each)

With the gaps g_k = ℓ_A,k − ℓ_B,k, a context's shift towards B is Σ_k (|g_k| − |g_k⁻|) / (scored tokens
of A): it is positive when the ablation brings A closer to B and can never be positive where A and B
agree (a self-diff). Per latent:

    shift       mean over contexts, nats per token
    z           (shift − mean of the null) / its standard deviation, the null being the R random
                shifts, each averaged over the same contexts
    gap_closed  Σ(|g_k| − |g_k⁻|) / Σ|g_k| over the contexts

Verdicts: `difference` (shift ≥ min_shift, z ≥ z against random directions and z_dictionary ≥ z against
directions the dictionary uses), `shared behaviour` (the mirror image: removing it moves A away from B),
`inert` (neither), `too rare` (fewer than min_contexts usable strong firings, held-out and in fresh text:
scan.py), `not verified` (beyond the `top` exact ablations per model, ordered so that these are the
least promising). Every budget counts work (tokens, contexts, ablations), never seconds.

Before the exact ablations, one pass over held-out text ranks every candidate by a first-order
estimate (gradient × activation: one backward per text gives every latent's estimate) and measures the
whole-diff figure: the share of the per-segment A–B gap that A's exclusive candidates account for (A's
layer spliced with its reconstruction, with and without them).

Writes RUN/verification/: behaviour.csv (one row per candidate), latents/<i>.json (the contexts of
each exactly verified latent), summary.json (counts, whole-diff share, first-order agreement); written
last, so its presence means complete. A rerun with the same settings resumes latent by latent.

Legend: T positions, D width, P kept aligned pairs, F latents, C candidates, R copies, S scored tokens,
K segments.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core import runfolder
from ..core.config import fingerprint, settings, where
from ..core.errors import CrossdiffError
from ..core.fsutil import jsonable, write_bytes_atomic, write_json_atomic
from ..core.lock import writes
from ..core.manifest import intact
from .answerlink import read_linked, with_linked
from .heldout import _segment_sums, encode_pairs, heldout_pass, keep_pairs, targets, tokenize_pair
from .results import BEHAVIOUR, as_float, null_z, read_latents, write_stage

METHOD = 4
"""Version of the measure (2: per-segment gaps, fresh random directions per context; 3: and the
dictionary null of each difference; 4: the verdict needs both nulls, rare candidates get contexts from
fresh text, budgets in work units); in the fingerprint."""
VERDICTS = ("difference", "shared behaviour", "inert", "too rare", "not verified")
COLUMNS = ("latent", *BEHAVIOUR.columns)


@dataclass(frozen=True)
class VerifyConfig:
    """Which run to verify and how (docs/verification.md)."""

    run: str = where()
    """Training run folder, analysed (RUN/analysis/latents.csv); writes RUN/verification/."""
    store: str | None = where(None)
    """Paired-activation store (default: the one the analysis used)."""
    device: str = where("auto")
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    strong: float = 0.3
    """A strong firing: f >= strong × the latent's p99 activation (docs/verification.md)."""
    n_contexts: int = 16
    """Held-out strong firings scored per latent (the strongest, at most one per chunk)."""
    min_contexts: int = 4
    """Fewer usable strong held-out firings than this: `too rare`."""
    n_random: int = 19
    """Random directions of the decoder row's norm ablated on the same contexts: the null."""
    z: float = 3.0
    """|z| needed for `difference` / `shared behaviour`, against random directions and against the
    dictionary's directions (docs/verification.md, "The verdict's null")."""
    min_shift: float = 0.01
    """|shift| (nats per token) needed besides z: smaller effects are `inert`."""
    ahead: int = 4
    """Aligned boundaries after the firing token whose characters are scored."""
    prefix_chars: int = 256
    """Characters of the chunk kept before the firing token."""
    heldout_tokens: int = 2048
    """Held-out aligned tokens for the first-order ranking and the whole-diff share (0: skip)."""
    top: int | None = None
    """Exact ablations for at most N candidates per model, the most promising first (default: all)."""
    scan_tokens: int = 50_000
    """Aligned tokens of fresh text (the corpus beyond the harvest) scanned for the strong firings of
    candidates with fewer than --n-contexts held-out ones (0: no scan; docs/verification.md)."""
    warn_seconds: float | None = None
    """Warn when verification takes longer than this; time never changes a verdict."""
    seed: int = 0
    """Seed of the random null directions."""
    duplicate_cosine: float = 0.9
    """Alive latents whose decoder row in the candidate's model has at least this cosine with the
    candidate's are ablated with it: a concept that several duplicate latents carry (1: the candidate alone)."""

    def __post_init__(self):
        checks = [
            (0 < self.strong <= 1, f"--strong must be in (0, 1], got {self.strong}"),
            (self.n_contexts >= 1, "--n-contexts must be at least 1"),
            (1 <= self.min_contexts <= self.n_contexts, "need 1 <= --min-contexts <= --n-contexts"),
            (self.n_random >= 3, f"--n-random must be at least 3 for a null, got {self.n_random}"),
            (self.z > 0 and self.min_shift >= 0, "--z must be positive and --min-shift >= 0"),
            (self.ahead >= 1 and self.prefix_chars >= 0, "--ahead must be >= 1, --prefix-chars >= 0"),
            (self.heldout_tokens >= 0, "--heldout-tokens must be >= 0"),
            (self.top is None or self.top >= 0, "--top must be >= 0"),
            (self.scan_tokens >= 0, "--scan-tokens must be >= 0"),
            (0 < self.duplicate_cosine <= 1, "--duplicate-cosine must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise CrossdiffError(message)


# ----------------------------------------------------------------------------- candidates


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
    cc, table, duplicate_cosine: float = 1.0, linked: dict[int, str] | None = None
) -> list[Candidate]:
    """The analysis's alive exclusive candidates (its `side` column) with their decoder rows in raw
    units, each with its group: the alive latents (any partition) whose decoder row in the candidate's
    model has cosine >= `duplicate_cosine` with its own. `linked` (latent -> side; answerlink.read_linked)
    adds the latents tied to an n-gram of the answers, whatever their partition or share."""
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


def strong_rows(cc, store, cands: list[Candidate], cfg: VerifyConfig, device) -> dict[int, dict]:
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


def window_for(text: str, chunk: int, c0: int, cfg: VerifyConfig, lookahead: int = 80):
    """The slice of a chunk around a firing token that ends at c0: from a word start about
    prefix_chars before it to `lookahead` characters after it."""
    from ..inputs.variants import Window

    start = max(0, c0 - cfg.prefix_chars)
    if start > 0:
        space = next((i for i in range(start, c0) if text[i].isspace()), None)
        start = space + 1 if space is not None else start
    return Window(text[start : min(len(text), c0 + lookahead)], chunk, start), c0 - start


def score_context(sides, cc, cand: Candidate, window, c0: int, dirs_RD: Tensor, factor: float, ahead: int):
    """One context's measurements, or None when the firing does not reproduce in the window."""
    own = "ab".index(cand.side)
    toks, al = tokenize_pair(sides, window.text)
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
    if not keep[k0]:
        return None
    pos_a, pos_b = al.idx_a[keep], al.idx_b[keep]
    f_PG = encode_pairs(cc, h[0], h[1], pos_a, pos_b)[:, list(cand.members)].cpu()
    f_at = float(f_PG[int(keep[:k0].sum()), 0])
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


def verify_latent(sides, cc, store, cand: Candidate, rows: list, cfg: VerifyConfig, factor: float) -> dict:
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


def both_nulls(res: dict, cfg: VerifyConfig) -> str:
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


def heldout_contexts(store, picks: list) -> list[dict]:
    """Held-out strong firings [(f, row)] as contexts: {f, row, chunk, c0, text} (c0: the token's end)."""
    if not picks:
        return []
    meta = store.rows([row for _, row in picks])
    texts: dict[int, dict] = {}
    out = []
    for k, (f, row) in enumerate(picks):
        shard = store.shard_of(int(row))
        if shard not in texts:
            texts[shard] = store.texts(shard)
        chunk = int(meta["chunk"][k])
        out.append(
            {
                "f": f,
                "row": int(row),
                "chunk": chunk,
                "c0": int(meta["char_end"][k]),
                "text": texts[shard][chunk]["text"],
            }
        )
    return out


def _score_rows(
    sides, cc, store, cand: Candidate, rows: list, cfg: VerifyConfig, factor: float, draw
) -> list:
    """score_context on each context of `rows` (heldout_contexts dicts), with the null directions
    draw(k) of context k."""
    contexts = []
    for k, src in enumerate(rows):
        window, c0w = window_for(src["text"], src["chunk"], src["c0"], cfg)
        ctx = score_context(sides, cc, cand, window, c0w, draw(k), factor, cfg.ahead)
        if ctx is not None:
            contexts.append({"row": src["row"], "fresh": src["row"] is None, **ctx})
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


def summarise(contexts: list[dict], cfg: VerifyConfig) -> dict:
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


# ----------------------------------------------------------------------------- orchestration


@writes(lambda cfg: Path(cfg.run) / "verification", record="tree")
def verify(cfg: VerifyConfig) -> dict:
    """Verify (or finish verifying) the run's candidates; returns summary.json's content."""
    from ..core.runtime import apply_cpu_policy, resolve_device
    from ..inputs.variants import sides_for_store

    run, cc, store, table = _open(cfg)
    out = run / "verification"
    fingerprint = _fingerprint(cfg, run, store)
    settings_path = out / "settings.json"
    same = settings_path.is_file() and json.loads(settings_path.read_text()).get("fingerprint") == fingerprint
    if same and (out / "summary.json").is_file() and intact(out, ("behaviour.csv", "summary.json")):
        print(f"{out} is already complete; nothing to do. Results: {out / 'summary.json'}")
        return json.loads((out / "summary.json").read_text())
    if not same and out.exists():
        import shutil

        # Results of other settings or another checkpoint; the fresh-text scan is kept, and reused
        # when it depends on nothing that changed (scan.scan checks its key).
        kept = (out / "scan.json").read_bytes() if (out / "scan.json").is_file() else None
        shutil.rmtree(out)
        if kept is not None:
            write_bytes_atomic(out / "scan.json", kept)
    write_json_atomic(settings_path, {"fingerprint": fingerprint, "settings": asdict(cfg)})
    device = resolve_device(cfg.device)
    apply_cpu_policy()  # once per process (crossdiff/core/runtime.py)
    cc = cc.to(device).eval().requires_grad_(False)
    cands = candidates(cc, table, cfg.duplicate_cosine, read_linked(run))
    factor = store.outlier_factor
    start = time.perf_counter()  # reported, and warns; it decides nothing
    sides = sides_for_store(store, device=str(device))
    strong = strong_rows(cc, store, cands, cfg, device)
    held = _cached(out / "heldout.json", lambda: heldout_pass(sides, cc, store, cands, cfg, factor))
    first = {int(k): v for k, v in held["first_order"].items()}
    contexts, fresh = gather_contexts(sides, cc, store, cands, strong, cfg, factor, out)
    fired = {int(k): v for k, v in held.get("fired", {}).items()}
    order = ablation_order(cands, first, fired, contexts, cfg.min_contexts)
    results = _exact(sides, cc, store, order, contexts, cfg, factor, out, alive_mask(cc, table))
    rows = [_row(c, strong.get(c.latent, {}), fresh, first.get(c.latent, math.nan), results.get(c.latent), cfg)
            for c in cands]  # fmt: skip
    write_stage(run, BEHAVIOUR, {r["latent"]: {k: _fmt(r[k]) for k in COLUMNS} for r in rows})
    seconds = time.perf_counter() - start
    # JSON has no NaN: undefined figures (a correlation of fewer than 3 points) are null.
    summary = jsonable(_summary(rows, results, held, cfg, seconds, fresh.state if fresh else None))
    write_json_atomic(out / "summary.json", summary)
    print(summary_line(summary))
    if cfg.warn_seconds is not None and seconds > cfg.warn_seconds:
        print(
            f"verify: warning: took {seconds:.0f} s (> {cfg.warn_seconds:.0f} s); the verdicts do not depend on it"
        )
    return summary


def gather_contexts(sides, cc, store, cands, strong: dict, cfg: VerifyConfig, factor: float, out: Path):
    """({latent: its contexts, held-out first, then fresh ones from the scan}, the scan or None)."""
    from .scan import scan

    held = {c.latent: heldout_contexts(store, strong.get(c.latent, {}).get("rows", [])) for c in cands}
    wanted = {c: cfg.n_contexts - len(held[c.latent]) for c in cands if len(held[c.latent]) < cfg.n_contexts}
    if not wanted:
        return held, None
    fresh = scan(
        sides, cc, store, wanted, cfg, factor, out / "scan.json", key=_inputs_key(Path(cfg.run), store)
    )
    return {j: rows + fresh.contexts(j) for j, rows in held.items()}, fresh


def ablation_order(
    cands: list[Candidate], first: dict, fired: dict, contexts: dict, min_contexts: int = 1
) -> list[Candidate]:
    """Candidates with at least `min_contexts` contexts (fewer: `too rare`, not scored), the most promising first, so that `not verified` (beyond --top) are
    the least: a positive first-order estimate (predicted to move its model towards the other),
    largest first; then the latents the first-order pass could not judge (no firing in its held-out
    text), most strong contexts first; then the negative estimates, closest to 0 first."""

    def key(c: Candidate):
        est = first.get(c.latent, math.nan)
        n = len(contexts.get(c.latent, []))
        if fired.get(c.latent, 1) == 0 or not math.isfinite(est):
            return (1, -n, c.latent)
        return (0 if est > 0 else 2, -est, c.latent)

    return sorted((c for c in cands if len(contexts.get(c.latent, [])) >= min_contexts), key=key)


def _exact(sides, cc, store, order, contexts: dict, cfg, factor, out: Path, alive_F) -> dict:
    """Exact ablations in `order`, at most `top` per side (too rare ones do not count), each judged
    against random directions and then, when the random null calls it a difference or shared
    behaviour, against the dictionary's directions (both decide the verdict)."""
    from tqdm.auto import tqdm

    done, per_side = {}, {"a": 0, "b": 0}
    for c in tqdm(order, desc="verify", unit="latent", dynamic_ncols=True):
        if cfg.top is not None and per_side[c.side] >= cfg.top:
            continue
        path = out / "latents" / f"{c.latent}.json"
        if path.is_file():
            done[c.latent] = json.loads(path.read_text())
        else:
            rows = contexts[c.latent][: cfg.n_contexts]
            res = {"latent": c.latent, "side": c.side, "group": list(c.members)}
            res.update(verify_latent(sides, cc, store, c, rows, cfg, factor))
            if res["verdict"] in ("difference", "shared behaviour"):
                ND = dictionary_directions(cc, c, alive_F)
                res = with_dictionary_null(sides, cc, store, c, rows, cfg, factor, ND, res)
            done[c.latent] = jsonable(res)
            write_json_atomic(path, done[c.latent])
        if done[c.latent]["verdict"] != "too rare":
            per_side[c.side] += 1
    return done


def _row(c: Candidate, strong: dict, fresh, first: float, res: dict | None, cfg: VerifyConfig) -> dict:
    row = {k: math.nan for k in COLUMNS}
    n_fresh = fresh.state["n_strong"].get(str(c.latent), 0) if fresh else 0
    n_ctx = len(strong.get("rows", [])) + (len(fresh.contexts(c.latent)) if fresh else 0)
    row.update(
        latent=c.latent,
        side=c.side,
        n_strong=strong.get("n", 0) + n_fresh,
        n_fresh=n_fresh,
        first_order=first,
        n_group=len(c.members),
    )
    if res is not None:
        row.update({k: res[k] for k in COLUMNS if k in res})
    else:
        row["verdict"] = "too rare" if n_ctx < cfg.min_contexts else "not verified"
    return row


def open_analysed(run: str | Path, store_path: str | None):
    """(run, crosscoder, store, the analysis's latents table, its summary.json) of an analysed run;
    the store given, or the one the analysis recorded."""
    from ..coder.crosscoder import Crosscoder
    from ..inputs.store import Store

    run = Path(run)
    summary = runfolder.read(run, "analysis")
    if summary is None:
        raise CrossdiffError(f"{run} has no finished analysis; run crossdiff analyze --run {run} first")
    cc = Crosscoder.from_pretrained(run)
    store = Store.open_recorded(store_path, summary["store"]["path"], runfolder.path(run, "analysis"))
    cc.cfg.check_store(store)
    return run, cc, store, read_latents(run / "analysis"), summary


def _open(cfg: VerifyConfig):
    """(run, crosscoder, store, the analysis's latents table) of a run whose models can be loaded."""
    run, cc, store, table, _ = open_analysed(cfg.run, cfg.store)
    if not (store.root / "tokenizers").is_dir() or store.meta.get("corpus") == "synthetic":
        raise CrossdiffError(f"{store.root} is a synthetic store: there are no models to verify behaviour on")
    return run, cc, store, table


def _fingerprint(cfg: VerifyConfig, run: Path, store) -> str:
    """The settings, the store and the checkpoint's and analysis's bytes (not where they are)."""
    linked = sorted(read_linked(run).items())  # the latents the answers stage adds (answerlink.py)
    return fingerprint([settings(cfg), _inputs_key(run, store)] + ([linked] if linked else []))


def _inputs_key(run: Path, store) -> str:
    """The method, the store and the checkpoint's and analysis's bytes: what the fresh-text scan reads
    through, whatever the verification's own settings."""
    weights = (run / "crosscoder.safetensors").read_bytes()
    latents = (run / "analysis" / "latents.csv").read_bytes()  # the candidates and their p99
    return fingerprint([METHOD, store.meta, hashlib.sha1(weights + latents).hexdigest()])


def _cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    result = jsonable(compute())
    write_json_atomic(path, result)
    return result


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _summary(
    rows: list[dict], results: dict, held: dict, cfg: VerifyConfig, seconds: float, scan=None
) -> dict:
    counts = {m: {v: sum(r["side"] == m and r["verdict"] == v for r in rows) for v in VERDICTS} for m in "ab"}
    pairs = [(c["first_order"], c["shift"]) for r in results.values() for c in r.get("contexts", [])]
    latent_pairs = [
        (r["first_order"], r["shift"])
        for r in rows
        if math.isfinite(r["first_order"]) and math.isfinite(r["shift"])
    ]
    ranked = sorted((r for r in rows if r["verdict"] == "difference"), key=lambda r: -r["gap_closed"])
    return {
        "candidates": {m: sum(r["side"] == m for r in rows) for m in "ab"},
        "counts": counts,
        "differences": [
            {k: r[k] for k in ("latent", "side", "shift", "z", "z_dictionary", "gap_closed", "n_contexts")}
            for r in ranked
        ],
        "work": {  # the budgets' units: what was done, the same on any machine
            "exact_ablations": len(results),
            "contexts_scored": sum(len(r.get("contexts", [])) for r in results.values()),
            "scan_tokens": scan["tokens"] if scan else 0,
            "scan_stopped": scan["stopped"] if scan else "not needed",
        },
        "whole": held["whole"],
        "first_order_agreement": {
            "contexts": len(pairs),
            "pearson_contexts": _corr(pairs),
            "latents": len(latent_pairs),
            "spearman_latents_heldout_vs_exact": _corr(latent_pairs, rank=True),
        },
        "settings": asdict(cfg),
        "seconds": round(seconds, 1),
    }


def _corr(pairs: list[tuple], rank: bool = False) -> float:
    if len(pairs) < 3:
        return math.nan
    x, y = (np.asarray(v, dtype=np.float64) for v in zip(*pairs))
    if rank:
        x, y = (np.argsort(np.argsort(v)).astype(np.float64) for v in (x, y))
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def summary_line(s: dict) -> str:
    parts = []
    for m in "ab":
        c = s["counts"][m]
        parts.append(
            f"{m.upper()}: {s['candidates'][m]} candidates, {c['difference']} difference, "
            f"{c['shared behaviour']} shared behaviour, {c['inert']} inert, {c['too rare']} too rare, "
            f"{c['not verified']} not verified"
        )
    whole = s["whole"]
    share = ", ".join(
        f"{m.upper()} {'n/a' if whole[m]['share'] is None else format(whole[m]['share'], '.3f')}"
        for m in "ab"
        if m in whole
    )
    return "verify: " + "; ".join(parts) + f"; share of the gap explained by the candidates: {share}"
