"""Seed stability (docs/design.md §5): does an exclusive feature come back when the crosscoder is retrained?

`seed_stability(reference, others)` matches every exclusive candidate of the reference run (the
analysed one) against each other seed's dictionary by decoder cosine *within the candidate's own
model* (cosines across the two models are meaningless: different bases). A candidate reappears in a
seed when its best match there has cosine >= `threshold` and is itself exclusive to the same model
(a DFC's partition; a standard crosscoder's relative decoder norm). Alive shared latents are matched
the same way as a baseline: how stable is an ordinary latent of this dictionary?

Writes RUN/stability.json (docs/diff.md has the schema); the report shows it as a table.
Legend: C candidates, M latents with a row in one model, D width.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core import runfolder
from ..core.errors import CrossdiffError
from ..core.fsutil import write_json_atomic
from .results import as_float, exclusive_sides, load_results

DEFAULT_THRESHOLD = 0.7


def _decoder(cc, model: str) -> tuple[torch.Tensor, np.ndarray]:
    """Unit decoder rows of `model` (M, D) and the latent index of each row."""
    side = cc.side(model)
    W, latents = side.W_dec.detach().float().cpu(), side.latents
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12), np.arange(latents.start, latents.stop)


def _side_of(cc, latents: np.ndarray, threshold: float, share_F: np.ndarray | None = None) -> np.ndarray:
    """ "a" / "b" / "" for each latent: the analysis's candidate rule (crossdiff.analysis.results), with
    the functional share of that crosscoder's latents when given (the rule on centred stores)."""
    return exclusive_sides(cc, threshold, share_F)[0][latents]


def read_candidates(run: Path) -> list[dict]:
    """Alive exclusive candidates of an analysed run, best score first, with crossdiff verify's columns
    joined (a candidate is "verified" when its behavioural verdict is `difference`)."""
    return load_results(run).candidates()


def best_matches(ref_cc, other_cc, latents: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray]:
    """For each reference latent (rows of `model`), the other dictionary's best latent and cosine."""
    U_ref, idx_ref = _decoder(ref_cc, model)
    U_oth, idx_oth = _decoder(other_cc, model)
    pos = np.searchsorted(idx_ref, latents)
    if len(latents) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    if np.any(pos >= len(idx_ref)) or np.any(idx_ref[np.minimum(pos, len(idx_ref) - 1)] != latents):
        raise CrossdiffError(f"some latents have no decoder row in model {model.upper()}")
    cos_CM = U_ref[torch.as_tensor(pos)] @ U_oth.T
    best, j = cos_CM.max(dim=1)
    return idx_oth[j.numpy()], best.double().numpy()


def seed_stability(
    reference,
    others: dict[int, object],
    candidates: list[dict],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    exclusive_threshold: float = 0.1,
    shared_sample: int = 512,
    alive: np.ndarray | None = None,
    seed: int = 0,
    shares: dict[int, np.ndarray] | None = None,
) -> dict:
    """The stability table. `others` maps seed -> crosscoder; `candidates`: rows of the analysis's
    candidates (crossdiff.analysis.results.LatentTable.candidates, or read_candidates); `shares` maps
    seed -> that crosscoder's functional share per latent, so that a match counts as exclusive by the
    same rule as the analysis's candidates (without it: partition and relative norm only)."""
    if not others:
        raise CrossdiffError("seed stability needs at least one other seed")
    features = []
    for model in "ab":
        cands = [c for c in candidates if c["side"] == model]
        latents = np.array([int(c["latent"]) for c in cands], dtype=np.int64)
        per_seed = {}
        for s, cc in others.items():
            match, cos = best_matches(reference, cc, latents, model)
            share_F = (shares or {}).get(s)
            per_seed[s] = (match, cos, _side_of(cc, match, exclusive_threshold, share_F))
        for i, c in enumerate(cands):
            matches = []
            for s, (match, cos, side) in per_seed.items():
                ok = bool(cos[i] >= threshold and side[i] == model)
                matches.append(
                    {
                        "seed": s,
                        "latent": int(match[i]),
                        "cosine": float(cos[i]),
                        "exclusive": side[i] == model,
                        "reappears": ok,
                    }
                )
            features.append(
                {
                    "latent": int(c["latent"]),
                    "model": model,
                    "verified": c.get("behaviour_verdict") == "difference",
                    "verdict": c["verdict"],
                    "reason": c.get("reason", ""),
                    "score": as_float(c["score"]),
                    "reappears_in": sum(m["reappears"] for m in matches),
                    "matched_in": sum(m["cosine"] >= threshold for m in matches),
                    "of": len(matches),
                    "matches": matches,
                }
            )
    features.sort(key=lambda f: (not f["verified"], -np.nan_to_num(f["score"], nan=-np.inf)))
    return {
        "threshold": threshold,
        "seeds": sorted(others),
        "n_runs": len(others) + 1,
        "features": features,
        "baseline_shared": shared_reappearance(
            reference, others, threshold=threshold, n=shared_sample, alive=alive, seed=seed
        ),
        "summary": _summary(features, len(others)),
    }


def shared_reappearance(
    reference,
    others: dict[int, object],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    n: int = 512,
    alive: np.ndarray | None = None,
    seed: int = 0,
) -> dict:
    """How often an ordinary latent comes back: the mean share of other seeds in which a shared latent
    of `reference` (a random sample of `n`, alive ones only when `alive` is given) has a decoder
    cosine >= `threshold` in the same model, per model; the partition of the match is not checked.
    """
    shared = np.array(list(reference.partition.shared), dtype=np.int64)
    if alive is not None:
        shared = shared[alive[shared]]
    if len(shared) == 0:
        return {"n": 0}
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(shared, min(n, len(shared)), replace=False))
    out = {"n": int(len(sample))}
    for model in "ab":
        hits = np.zeros(len(sample))
        for cc in others.values():
            _, cos = best_matches(reference, cc, sample, model)
            hits += cos >= threshold
        out[f"mean_reappear_{model}"] = float(hits.mean() / len(others))
    return out


def _summary(features: list[dict], n_other: int) -> dict:
    out = {}
    for key, sel in (("verified", True), ("rejected", False)):
        fs = [f for f in features if f["verified"] is sel]
        out[key] = {
            "n": len(fs),
            "reappear_all": sum(f["reappears_in"] == n_other for f in fs),
            # in at least 2 of the n_other + 1 runs (the reference and one other seed)
            "reappear_any": sum(f["reappears_in"] >= 1 for f in fs),
            "reappear_none": sum(f["reappears_in"] == 0 for f in fs),
            "mean_reappear": float(np.mean([f["reappears_in"] / n_other for f in fs])) if fs else None,
        }
    return out


MATCHING = 2
"""Version of the seed matching: 2, the other seeds judged by the functional-share rule too."""


def stage_settings(seeds: int) -> dict:
    """What the seed-stability table depends on: the seeds, the candidate rules' version (it reads the
    candidates and their verdicts) and the matching's (what `crossdiff diff` records for the stage)."""
    from .analyze import RULES_VERSION

    return {"seeds": seeds, "rules": RULES_VERSION, "matching": MATCHING}


def write_stability(run: Path, table: dict) -> Path:
    path = runfolder.path(run, "stability")
    write_json_atomic(path, table)
    return path


def format_table(table: dict, limit: int = 20) -> str:
    """A plain-text table of the first `limit` features (verified first)."""
    n = table["n_runs"]
    lines = [f"model latent  verified  in seeds (of {n})  best cosines"]
    for f in table["features"][:limit]:
        cos = " ".join(f"{m['cosine']:.2f}{'' if m['exclusive'] else '*'}" for m in f["matches"])
        lines.append(
            f"{f['model']:>5} {f['latent']:>6}  {'yes' if f['verified'] else 'no':>8}  "
            f"{1 + f['reappears_in']:>4}/{n:<13} {cos}"
        )
    if len(table["features"]) > limit:
        lines.append(f"... {len(table['features']) - limit} more in stability.json")
    lines.append("(* = best match not exclusive to the same model in that seed)")
    return "\n".join(lines)
