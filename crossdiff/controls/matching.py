"""Match learned latents to planted ground-truth features, classify latents, score exclusivity.

Matching is one-to-one and by decoder cosine in each model's own space (a cosine *between* A's and
B's spaces means nothing across architectures, docs/design.md §5):

- a shared GT feature matches latent i when cos(d_A,i, u_A) ≥ τ **and** cos(d_B,i, u_B) ≥ τ
  (score: the smaller of the two);
- an A-only GT feature matches on A's decoder column alone (B-only on B's);
- a latent with no decoder vector for a model (a DFC exclusive latent) has cosine 0 there.

Assignment is **greedy by descending score** (not Hungarian; scipy is not a dependency): take the
best eligible (latent, feature) pair, remove both, repeat. Greedy can only lose to an optimal
assignment inside a conflict chain, which at τ ≥ 0.9 needs two GT features with cosine ≥
2τ² − 1 = 0.62 in one model — only the generator's twins come that close, and they stay below
twin_cos_max. Matching ignores classification: a GT A-only feature matched to a latent that is
classified shared counts as *missed* by exclusive recall.

Classification (`classify`) calls the analysis's own functions and restates no rule:
- "auto", the paper's rules (docs/design.md §5): a DFC by partition membership, a standard crosscoder
  by the relative decoder norm r = ||d_B|| / (||d_A|| + ||d_B||) (r ≤ t → A-only, r ≥ 1 − t → B-only);
- "analysis", the rule `crossdiff analyze` picks its candidates with
  (crossdiff.analysis.results.exclusive_sides): a DFC by partition, or a shared latent by its r or
  its functional share (crossdiff.coder.functional); a standard crosscoder by r;
- diagnostics: "union" (DFC: partition ∪ r), "functional" (DFC: partition ∪ share; a standard
  crosscoder by its share alone).

Verified metrics: `exclusive_metrics(..., verified_F=...)` also scores only the exclusive latents that
pass a verification: the toy benchmark's is the probe from the other model's activations
(crossdiff/controls/toybench.py `verify_run`; there are no models to ablate, so `crossdiff verify`
cannot run on synthetic data). Without `verified_F` those fields are None.

Legend: F learned latents, G ground-truth features, D one model's width, P eligible pairs.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch

from ..analysis.results import EXCLUSIVE_THRESHOLD, candidate_sides, exclusive_sides, partitions
from ..coder.functional import classify_by_share
from .synthetic import A_ONLY, B_ONLY, SHARED, GroundTruth

OTHER = SHARED  # class of a latent that is not exclusive (shared or in between)
DEFAULT_THRESHOLD = 0.9
ClassifyMethod = Literal["auto", "analysis", "partition", "union", "functional"]


class Matching(NamedTuple):
    latent_of_G: np.ndarray
    """Latent matched to each GT feature, -1 if none."""
    feature_of_F: np.ndarray
    """GT feature matched to each latent, -1 if none."""
    score_G: np.ndarray
    """Matching score of each GT feature (0 where unmatched)."""
    cos_a_FG: np.ndarray
    """Cosine of every latent's A decoder column with every GT feature's A direction."""
    cos_b_FG: np.ndarray
    threshold: float
    """The cosine threshold τ the matching used."""


def decoder_directions(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(dec_a_FD, dec_b_FD): every latent's decoder vector per model, zero rows where the latent has
    none (DFC exclusive latents), in normalised units."""
    part = model.partition
    n = part.n_latents
    with torch.no_grad():
        dec_a_FD = torch.zeros(n, model.cfg.d_a)
        dec_b_FD = torch.zeros(n, model.cfg.d_b)
        dec_a_FD[part.a_latents.start : part.a_latents.stop] = model.W_dec_a.detach().float().cpu()
        dec_b_FD[part.b_latents.start : part.b_latents.stop] = model.W_dec_b.detach().float().cpu()
    return dec_a_FD, dec_b_FD


def _cosines(x_FD: np.ndarray, y_GD: np.ndarray) -> np.ndarray:
    """Cosine of every row pair; 0 where either row is zero."""
    nx = np.linalg.norm(x_FD, axis=1, keepdims=True)
    ny = np.linalg.norm(y_GD, axis=1, keepdims=True)
    return (x_FD / np.where(nx > 0, nx, 1)) @ (y_GD / np.where(ny > 0, ny, 1)).T


def match(
    dec_a_FD,
    dec_b_FD,
    gt: GroundTruth,
    threshold: float = DEFAULT_THRESHOLD,
    candidates_F: np.ndarray | None = None,
) -> Matching:
    """One-to-one greedy matching of latents to GT features (module docstring); `candidates_F`
    (bool) restricts the latents that may match, e.g. to those alive on held-out data."""
    cos_a = _cosines(np.asarray(dec_a_FD, dtype=np.float64), gt.dirs_a_FD)
    cos_b = _cosines(np.asarray(dec_b_FD, dtype=np.float64), gt.dirs_b_FD)
    kind_G = gt.kind_F
    score_FG = np.where(kind_G == SHARED, np.minimum(cos_a, cos_b), np.where(kind_G == A_ONLY, cos_a, cos_b))
    eligible_FG = score_FG >= threshold
    if candidates_F is not None:
        eligible_FG &= np.asarray(candidates_F, dtype=bool)[:, None]
    lat_P, feat_P = np.nonzero(eligible_FG)
    # Descending score; ties broken by (latent, feature) so the result is deterministic.
    order = np.lexsort((feat_P, lat_P, -score_FG[lat_P, feat_P]))
    latent_of_G = np.full(len(kind_G), -1, dtype=np.int64)
    feature_of_F = np.full(score_FG.shape[0], -1, dtype=np.int64)
    score_G = np.zeros(len(kind_G))
    for i, g in zip(lat_P[order].tolist(), feat_P[order].tolist()):
        if feature_of_F[i] < 0 and latent_of_G[g] < 0:
            feature_of_F[i], latent_of_G[g], score_G[g] = g, i, score_FG[i, g]
    return Matching(latent_of_G, feature_of_F, score_G, cos_a, cos_b, threshold)


# ----------------------------------------------------------------------------- classification


def relative_norm(norm_a_F, norm_b_F) -> np.ndarray:
    """r = ||d_B|| / (||d_A|| + ||d_B||) (0.5 where both are zero)."""
    a, b = np.asarray(norm_a_F, dtype=np.float64), np.asarray(norm_b_F, dtype=np.float64)
    total = a + b
    return np.where(total > 0, b / np.where(total > 0, total, 1), 0.5)


def classes_of_sides(side_F) -> np.ndarray:
    """The analysis's sides ("a" / "b" / "") as matcher classes (A_ONLY / B_ONLY / OTHER)."""
    side_F = np.asarray(side_F)
    return np.where(side_F == "a", A_ONLY, np.where(side_F == "b", B_ONLY, OTHER)).astype(np.int64)


def classify(
    model, method: ClassifyMethod = "auto", share_F=None, threshold: float = EXCLUSIVE_THRESHOLD
) -> np.ndarray:
    """Class of every latent of a crosscoder (module docstring), at the analysis's threshold t.

    auto: the paper's rules (DFC: partition; standard: relative norm). analysis: the analysis's
    candidate rule, `exclusive_sides` with the functional share `share_F`. partition: partition
    membership alone. union: `exclusive_sides` without the share. functional: partition ∪ share
    (a standard crosscoder: the share alone).
    """
    part_F = partitions(model)  # the analysis's rule (results.candidate_sides) with no norm: partitions alone
    by_part_F = classes_of_sides(candidate_sides(part_F, np.full(len(part_F), np.nan), threshold))
    if method == "partition" or (method == "auto" and model.partition.is_dfc):
        return by_part_F
    if method in ("auto", "union"):
        return classes_of_sides(exclusive_sides(model, threshold)[0])
    if share_F is None:
        raise ValueError(f"classify(method={method!r}) needs the functional share share_F")
    if method == "analysis":
        return classes_of_sides(exclusive_sides(model, threshold, share_F)[0])
    by_share_F = classes_of_sides(classify_by_share(share_F, threshold))
    return np.where(by_part_F != OTHER, by_part_F, by_share_F)


# ----------------------------------------------------------------------------- metrics


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _exclusive_counts(m: Matching, class_F, gt: GroundTruth, alive_F, kind: int) -> dict:
    """Recall/precision counts for one model's exclusive class (`kind` is A_ONLY or B_ONLY)."""
    gt_G = gt.kind_F == kind
    matched_lat = m.latent_of_G[gt_G]
    found = int(((matched_lat >= 0) & (class_F[np.maximum(matched_lat, 0)] == kind)).sum())
    found_any = int((matched_lat >= 0).sum())  # learned at all, whatever the latent's class
    claimed_F = (class_F == kind) & alive_F
    matched_kind_F = np.where(m.feature_of_F >= 0, gt.kind_F[np.maximum(m.feature_of_F, 0)], -1)
    true_pos = int((claimed_F & (matched_kind_F == kind)).sum())
    # False positives by cause: a shared concept's direction in this model (the paper's failure
    # mode; "imbalanced" = planted weaker in the other model, the shrinkage case), a duplicate of
    # an exclusive feature already matched, or nothing planted.
    cos_FG = m.cos_a_FG if kind == A_ONLY else m.cos_b_FG
    fp_F = claimed_F & (matched_kind_F != kind)
    near_shared_F = (cos_FG[:, gt.kind_F == SHARED] >= m.threshold).any(1)
    near_imb_F = (cos_FG[:, (gt.kind_F == SHARED) & gt.imbalanced_F] >= m.threshold).any(1)
    near_excl_F = (cos_FG[:, gt_G] >= m.threshold).any(1)
    twins = gt_G & (gt.twin_of_F >= 0)
    twin_lat = m.latent_of_G[twins]
    return {
        "n_gt": int(gt_G.sum()),
        "found": found,
        "found_any_class": found_any,
        "claimed": int(claimed_F.sum()),
        "true_pos": true_pos,
        "found_twins": int(((twin_lat >= 0) & (class_F[np.maximum(twin_lat, 0)] == kind)).sum()),
        "n_twins": int(twins.sum()),
        "fp_shared": int((fp_F & near_shared_F).sum()),
        "fp_shared_imbalanced": int((fp_F & near_imb_F).sum()),
        "fp_duplicate": int((fp_F & ~near_shared_F & near_excl_F).sum()),
        "fp_unplanted": int((fp_F & ~near_shared_F & ~near_excl_F).sum()),
    }


def exclusive_metrics(
    m: Matching,
    class_F: np.ndarray,
    gt: GroundTruth,
    alive_F: np.ndarray | None = None,
    verified_F: np.ndarray | None = None,
) -> dict:
    """Exclusive recall and precision per model and pooled, shared recall, false-positive causes.

    Exclusive recall (A): share of GT A-only features matched to a latent classified A_ONLY.
    Exclusive precision (A): share of alive latents classified A_ONLY that are matched to a GT
    A-only feature (dead latents are never reported as findings, so they do not count). Pooled
    values add the A and B counts. Ratios with a zero denominator are None.
    `exclusive_matched_any_class` is the recall ceiling: GT exclusive features matched to any
    latent, whatever its class (the gap to exclusive_recall is features learned but misclassified).
    """
    n_latents = len(class_F)
    alive_F = np.ones(n_latents, dtype=bool) if alive_F is None else np.asarray(alive_F, dtype=bool)
    per = {"a": _exclusive_counts(m, class_F, gt, alive_F, A_ONLY)}
    per["b"] = _exclusive_counts(m, class_F, gt, alive_F, B_ONLY)
    shared_G = gt.kind_F == SHARED
    imb_G = shared_G & gt.imbalanced_F
    out: dict = {
        "exclusive_recall": _ratio(
            per["a"]["found"] + per["b"]["found"], per["a"]["n_gt"] + per["b"]["n_gt"]
        ),
        "exclusive_precision": _ratio(
            per["a"]["true_pos"] + per["b"]["true_pos"], per["a"]["claimed"] + per["b"]["claimed"]
        ),
        "exclusive_matched_any_class": _ratio(
            per["a"]["found_any_class"] + per["b"]["found_any_class"], per["a"]["n_gt"] + per["b"]["n_gt"]
        ),
        "shared_recall": _ratio(int((m.latent_of_G[shared_G] >= 0).sum()), int(shared_G.sum())),
        "shared_recall_imbalanced": _ratio(int((m.latent_of_G[imb_G] >= 0).sum()), int(imb_G.sum())),
        "dead_fraction_heldout": float(1 - alive_F.mean()) if n_latents else None,
        "threshold": m.threshold,
    }
    for key in ("a", "b"):
        c = per[key]
        out[f"exclusive_recall_{key}"] = _ratio(c["found"], c["n_gt"])
        out[f"exclusive_precision_{key}"] = _ratio(c["true_pos"], c["claimed"])
    out["counts"] = per
    out["exclusive_recall_verified"] = out["exclusive_precision_verified"] = None
    if verified_F is not None:
        class_v_F = np.where(np.asarray(verified_F, dtype=bool), class_F, OTHER)
        ver = exclusive_metrics(m, class_v_F, gt, alive_F)
        out["exclusive_recall_verified"] = ver["exclusive_recall"]
        out["exclusive_precision_verified"] = ver["exclusive_precision"]
    return out


def score_crosscoder(
    model,
    gt: GroundTruth,
    alive_F=None,
    threshold: float = DEFAULT_THRESHOLD,
    verified_F=None,
    method: ClassifyMethod = "auto",
) -> dict:
    """Match, classify and score a trained crosscoder against the ground truth in one call."""
    dec_a_FD, dec_b_FD = decoder_directions(model)
    m = match(dec_a_FD.numpy(), dec_b_FD.numpy(), gt, threshold, candidates_F=alive_F)
    return exclusive_metrics(m, classify(model, method), gt, alive_F, verified_F)
