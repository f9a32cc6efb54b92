"""What each model predicts where a difference fires, and what removing the latent changes.

For every latent `crossdiff verify` calls a `difference`, on the contexts it scored
(RUN/verification/latents/<latent>.json, the same windows: verify.window_for), at the firing token:

    a, b      each model's top next tokens with their probabilities (each in its own tokenizer; the
              firing token ends a token in both tokenisations, so both predict what follows the same
              characters)
    ablated   the owning model's top next tokens with the latent (and its duplicates, as verify ablates
              them) removed at every aligned position of the window: h − f_t · d (raw units)
    token_effects   over the contexts, the owning model's tokens whose log-probability changes most
              when the latent is removed (mean Δ log p; negative: the latent promotes the token)

It needs both models and the store, so it runs after verification; `crossdiff report` runs it
(ReportConfig.predictions) when they can be loaded and renders without it otherwise. Writes
RUN/predictions/<latent>.json (atomically; a folder of its own, one writer: `predict` holds its lock),
keyed to verification's fingerprint: a rerun after a new verification recomputes it, otherwise it is
reused.

Legend: T positions, D width, V vocabulary, P kept aligned pairs, K shown tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from ..core import runfolder
from ..core.errors import CrossdiffError
from ..core.fsutil import write_json_atomic
from ..core.lock import writes

FOLDER = "predictions"


@dataclass(frozen=True)
class PredictConfig:
    """Which run, and how many tokens and contexts to show."""

    run: str
    """Run folder, verified (RUN/verification/)."""
    top: int = 5
    """Next tokens shown per model and context."""
    n_contexts: int = 8
    """Contexts per difference (the verification's, in its order)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""


def read_predictions(run: str | Path) -> dict[int, dict]:
    """{latent: predictions document} for the differences measured; {} when none were."""
    folder = Path(run) / FOLDER
    out = {}
    for p in folder.glob("*.json") if folder.is_dir() else []:
        if p.stem.isdigit():
            try:
                out[int(p.stem)] = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a damaged file is recomputed by the next predict()
    return out


def _differences(run: Path) -> list[dict]:
    from .results import read_behaviour

    return [b for b in read_behaviour(run).values() if b.get("verdict") == "difference"]


def _verify_config(run: Path):
    from .verify import VerifyConfig

    saved = runfolder.read(run, "verification_settings")
    names = {f.name for f in fields(VerifyConfig)}
    return VerifyConfig(**{k: v for k, v in (saved.get("settings") or {}).items() if k in names}), saved


def _top(logp_V: torch.Tensor, tok, k: int) -> list[list]:
    vals, ids = logp_V.topk(k)
    return [[tok.decode([int(i)]), round(float(math.exp(v)), 5)] for v, i in zip(vals, ids)]


class _Logits:
    """Captures the unembedding's output (the logits Side.forward computes at its target positions)."""

    def __init__(self, lm):
        self.lm, self.out = lm, None
        cfg = getattr(lm.model, "config", None)
        cap = getattr(cfg, "final_logit_softcapping", None) or getattr(
            getattr(cfg, "text_config", None), "final_logit_softcapping", None
        )
        self.cap = float(cap) if cap else None

    def __enter__(self):
        def hook(module, args, output):
            self.out = output.detach().float()

        self.handle = self.lm.model.get_output_embeddings().register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def logp(self) -> torch.Tensor:
        x = self.out[:, -1]  # (R, V): the one target position asked for
        if self.cap:  # Gemma-2 style soft-capping happens after the unembedding
            x = self.cap * torch.tanh(x / self.cap)
        return x.log_softmax(-1).cpu()


def _firing(f_PG, keep, k0: int, anchor: str) -> float:
    """The candidate's activation at the firing token; an n-gram context: the group's strongest up to it."""
    if anchor == "firing":
        return float(f_PG[int(keep[:k0].sum()), 0])
    n = int(keep[: k0 + 1].sum())
    return float(f_PG[:n].max()) if n else 0.0


def context_predictions(sides, cc, cand, window, c0: int, factor: float, top: int, anchor: str = "firing"):
    """One context: both models' next tokens at the firing token (an n-gram context: at the token before
    the n-gram), and the owner's with the latent (group) removed up to there; None when the firing does
    not reproduce (ablation.score_context's conditions)."""
    from .heldout import encode_pairs, keep_pairs, tokenize_pair

    own = "ab".index(cand.side)
    toks, al = tokenize_pair(sides, window.text)
    hit = np.flatnonzero(al.end_char == c0)
    if len(hit) == 0:
        return None
    k0 = int(hit[0])
    at = (int(al.idx_a[k0]), int(al.idx_b[k0]))
    if any(p + 1 >= len(t.input_ids) for p, t in zip(at, toks)):
        return None
    ids = [torch.as_tensor(t.input_ids) for t in toks]
    plants = [
        s.plant.mask(window, t.offsets, t.special_mask) if s.plant else None for s, t in zip(sides, toks)
    ]
    outs, logp = [], []
    for m in (0, 1):
        with _Logits(sides[m].lm) as cap:
            outs.append(sides[m].forward(ids[m], torch.as_tensor([at[m] + 1]), plant_T=plants[m]))
        logp.append(cap.logp()[0])
    keep = keep_pairs((outs[0].h_TD, outs[1].h_TD), toks, al, factor)
    if not keep[k0] and anchor == "firing":
        return None
    pos_a, pos_b = al.idx_a[keep], al.idx_b[keep]
    f_PG = encode_pairs(cc, outs[0].h_TD, outs[1].h_TD, pos_a, pos_b)[:, list(cand.members)].cpu()
    deltas = torch.zeros(1, len(ids[own]), cand.rows_GD.shape[1])
    deltas[0, torch.as_tensor(pos_a if own == 0 else pos_b)] = -(f_PG @ cand.rows_GD)
    with _Logits(sides[own].lm) as cap:
        sides[own].forward(ids[own], torch.as_tensor([at[own] + 1]), plant_T=plants[own], deltas_RTD=deltas)
    ablated = cap.logp()[0]
    tok = [s.tokenizer for s in sides]
    return {
        "text_before": window.text[max(0, c0 - 80) : c0],
        "f": _firing(f_PG, keep, k0, anchor),
        "a": _top(logp[0], tok[0], top),
        "b": _top(logp[1], tok[1], top),
        "ablated": _top(ablated, tok[own], top),
    }, (ablated - logp[own])


def predict_latent(sides, cc, store, cand, doc: dict, vcfg, cfg: PredictConfig, factor: float) -> dict:
    """The predictions document of one difference from its verification contexts."""
    from .ablation import ChunkTexts, window_for

    contexts, delta = [], None
    texts = ChunkTexts(store)
    for c in (doc.get("contexts") or [])[: cfg.n_contexts]:
        chunk = int(c["chunk"])
        text = texts.get(chunk, c.get("row"))["text"]
        window, c0w = window_for(text, chunk, int(c["start"]) + int(c["c0"]), vcfg)
        got = context_predictions(sides, cc, cand, window, c0w, factor, cfg.top, c.get("anchor", "firing"))
        if got is None:
            continue
        contexts.append(got[0])
        delta = got[1] if delta is None else delta + got[1]
    effects = []
    if delta is not None:
        mean_V = delta / len(contexts)
        tok = sides["ab".index(cand.side)].tokenizer
        for sign in (False, True):  # promoted (falls when removed) first, then suppressed
            vals, ids = mean_V.topk(cfg.top, largest=sign)
            effects += [[tok.decode([int(i)]), round(float(v), 4)] for v, i in zip(vals, ids)]
    return {"latent": cand.latent, "side": cand.side, "contexts": contexts, "token_effects": effects}


@writes(lambda cfg: Path(cfg.run) / FOLDER, record="tree")
def predict(cfg: PredictConfig) -> dict[int, dict]:
    """Compute (or reuse) the predictions of every difference of a verified run."""
    from ..core.runtime import resolve_device
    from ..inputs.variants import sides_for_store
    from .ablation import candidates
    from .verify import _linked, _open

    run = Path(cfg.run)
    diffs = _differences(run)
    if not diffs:
        return {}
    vcfg, saved = _verify_config(run)
    # The run as it is now (a copied or moved run folder keeps its verification settings' old paths).
    store = vcfg.store if vcfg.store and Path(vcfg.store).is_dir() else None
    vcfg = replace(vcfg, run=str(run), store=store)
    have = read_predictions(run)
    todo = [
        int(b["latent"])
        for b in diffs
        if have.get(int(b["latent"]), {}).get("fingerprint") != saved.get("fingerprint")
    ]
    if not todo:
        return have
    run, cc, store, table = _open(vcfg)
    device = resolve_device(cfg.device)
    cc = cc.to(device).eval().requires_grad_(False)
    linked, groups, _ = _linked(run, vcfg)  # the groups verification removed together
    cands = {c.latent: c for c in candidates(cc, table, vcfg.duplicate_cosine, linked, groups)}
    sides = sides_for_store(store, device=str(device))
    factor = store.outlier_factor
    for j in todo:
        path = run / "verification" / "latents" / f"{j}.json"
        if j not in cands or not path.is_file():
            continue
        doc = json.loads(path.read_text())
        with torch.inference_mode():
            res = predict_latent(sides, cc, store, cands[j], doc, vcfg, cfg, factor)
        res["fingerprint"] = saved.get("fingerprint")
        write_json_atomic(run / FOLDER / f"{j}.json", res)
        have[j] = res
    return have


def try_predict(cfg: PredictConfig) -> str:
    """predict(), or why it could not run (models, store or verification missing): never raises for
    those, so that the report renders without predictions."""
    if not runfolder.exists(cfg.run, "verification_settings"):
        return "not verified"
    try:
        n = len(predict(cfg))
    except Exception as e:  # noqa: BLE001 - the report must render without predictions, whatever failed
        first = str(e).splitlines()[0] if str(e) else ""
        return (
            f"not computed ({type(e).__name__}: {first})"
            if not isinstance(e, CrossdiffError)
            else f"not computed: {first}"
        )
    return f"{n} differences"
