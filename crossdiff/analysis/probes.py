"""Context signals for exclusive candidates (docs/verification.md): streaming ridge probes, AUROC and
Latent Scaling.

Can the other model *detect* where a candidate of A fires? A linear probe from x_B to f_i, fitted in
closed form from streamed sufficient statistics on the store's train split, scored on its held-out
split: AUROC of the candidate's *strong* firings (f ≥ strong · p99) against every other token, and R²
of the magnitude on those strong firings. Most firings of a BatchTopK latent are weak and scattered
over unrelated tokens, so "f > 0" measures the noise, not the feature. Detection is information for
the reader, never a rejection: two models reading the same text can both detect its topic, and the
difference between them is what a feature does (verify.py). Everything here streams: memory is O(D² + D·C) for a
probe and O(C·H) for the held-out evaluation, whatever the number of tokens.

Latent Scaling (Minder et al. 2025, arXiv 2504.02922 §3) applies only when both models share one
space (self-diffs, base/finetune pairs): it measures how much of a latent's own decoder direction the
*other* model's activation carries where the latent fires.

Legend: B tokens in a batch, D input width (+1 with the bias column), C probed latents (targets),
H score bins.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Held-out scores are binned on asinh((s - μ)/σ): fine (≈0.03σ) near the bulk of silent tokens and
# still resolving ~2% of the value tens of σ out, where a working probe puts the firing tokens.
AUROC_BINS = 1024
_ASINH_LIMIT = math.asinh(1e6)


class RidgeProbe:
    """y ≈ x W + b by ridge regression, from sums accumulated batch by batch (float64).

    Sums are taken about a shift (the first batch's mean): E[xx'] − μμ' loses precision when a
    dimension's mean dwarfs its spread, as in residual streams (a few large mean directions).
    """

    def __init__(self, d: int, n_targets: int):
        self.d, self.n_targets = d, n_targets
        self.n = 0
        self.shift_D: Tensor | None = None
        self.sum_x_D = torch.zeros(d, dtype=torch.float64)
        self.sum_xx_DD = torch.zeros(d, d, dtype=torch.float64)
        self.sum_y_C = torch.zeros(n_targets, dtype=torch.float64)
        self.sum_xy_DC = torch.zeros(d, n_targets, dtype=torch.float64)

    def update(self, x_BD: Tensor, y_BC: Tensor) -> None:
        if x_BD.shape[0] == 0:
            return
        if self.shift_D is None:
            self.shift_D = x_BD.double().mean(0)
        xs_BD = x_BD.float() - self.shift_D.to(x_BD.device, torch.float32)
        y_BC = y_BC.float()
        # One batch in float32 (≤ a few thousand terms), the running total in float64.
        self.sum_x_D += xs_BD.sum(0).double().cpu()
        self.sum_xx_DD += (xs_BD.T @ xs_BD).double().cpu()
        self.sum_y_C += y_BC.sum(0).double().cpu()
        self.sum_xy_DC += (xs_BD.T @ y_BC).double().cpu()
        self.n += x_BD.shape[0]

    def solve(self, alpha: float) -> tuple[Tensor, Tensor]:
        """(W_DC, b_C) minimising Σ||y − xW − b||² + λ||W||², λ = alpha · n · tr(Cov x)/D.

        The penalty is relative to the input's average variance so `alpha` means the same for any
        activation scale; the bias is not penalised (the problem is solved on centred statistics).
        """
        if self.n == 0:
            raise ValueError("no rows were accumulated")
        mean_x_D, mean_y_C = self.sum_x_D / self.n, self.sum_y_C / self.n
        cov_DD = self.sum_xx_DD / self.n - torch.outer(mean_x_D, mean_x_D)
        cross_DC = self.sum_xy_DC / self.n - torch.outer(mean_x_D, mean_y_C)
        lam = alpha * float(torch.trace(cov_DD)) / self.d
        eye_DD = torch.eye(self.d, dtype=torch.float64)
        W_DC = _spd_solve(cov_DD + max(lam, 1e-12) * eye_DD, cross_DC)
        b_C = mean_y_C - (mean_x_D + self.shift_D.cpu()) @ W_DC
        return W_DC, b_C

    def prediction_spread(self, W_DC: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation (C,) of the fitted prediction on the training rows."""
        mean_x_D = self.sum_x_D / self.n
        cov_DD = self.sum_xx_DD / self.n - torch.outer(mean_x_D, mean_x_D)
        mean_y_C = self.sum_y_C / self.n
        var_C = torch.einsum("dc,de,ec->c", W_DC, cov_DD, W_DC).clamp_min(0)
        return mean_y_C, var_C.sqrt()


def _spd_solve(A_DD: Tensor, B_DC: Tensor) -> Tensor:
    """Solve A X = B for symmetric positive definite A (Cholesky; lstsq if rounding breaks it)."""
    L, info = torch.linalg.cholesky_ex(A_DD)
    if int(info) == 0:
        return torch.cholesky_solve(B_DC, L)
    return torch.linalg.lstsq(A_DD, B_DC).solution


class ProbeEval:
    """Held-out R² and binned AUROC of C probes, accumulated batch by batch.

    R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)² over the held-out rows where the latent fires strongly (y ≥
    strong_C; ȳ their own mean: a probe must beat the constant). AUROC ranks those strong firings
    against every other token by the prediction ŷ, with scores binned per probe (ties within a bin
    count one half, as in the Mann–Whitney statistic). strong_C = 0 means every firing (y > 0).
    """

    def __init__(
        self,
        W_DC: Tensor,
        b_C: Tensor,
        center_C: Tensor,
        spread_C: Tensor,
        bins: int = AUROC_BINS,
        strong_C: Tensor | None = None,
    ):
        self.W_DC, self.b_C = W_DC.float(), b_C.float()
        self.strong_C = torch.zeros(W_DC.shape[1]) if strong_C is None else strong_C.float()
        self.center_C = center_C.float()
        self.spread_C = spread_C.float().clamp_min(1e-12)
        self.bins = bins
        n = W_DC.shape[1]
        self.sse_C = torch.zeros(n, dtype=torch.float64)
        self.sum_y_C = torch.zeros(n, dtype=torch.float64)
        self.sum_yy_C = torch.zeros(n, dtype=torch.float64)
        self.n = 0
        self.n_strong_C = torch.zeros(n, dtype=torch.int64)
        self.pos_CH = torch.zeros(n, bins, dtype=torch.int64)
        self.neg_CH = torch.zeros(n, bins, dtype=torch.int64)

    def to(self, device) -> ProbeEval:
        self.W_DC, self.b_C = self.W_DC.to(device), self.b_C.to(device)
        self.center_C, self.spread_C = self.center_C.to(device), self.spread_C.to(device)
        self.strong_C = self.strong_C.to(device)
        return self

    def update(self, x_BD: Tensor, y_BC: Tensor) -> None:
        if x_BD.shape[0] == 0:
            return
        pred_BC = x_BD.float() @ self.W_DC + self.b_C
        y_BC = y_BC.float()
        fires_BC = (y_BC > 0) & (y_BC >= self.strong_C)
        on_BC = fires_BC.to(y_BC.dtype)
        self.sse_C += ((y_BC - pred_BC).pow(2) * on_BC).sum(0).double().cpu()
        self.sum_y_C += (y_BC * on_BC).sum(0).double().cpu()
        self.sum_yy_C += (y_BC.pow(2) * on_BC).sum(0).double().cpu()
        self.n_strong_C += fires_BC.sum(0).cpu()
        self.n += x_BD.shape[0]
        t_BC = torch.asinh((pred_BC - self.center_C) / self.spread_C).clamp(-_ASINH_LIMIT, _ASINH_LIMIT)
        bin_BC = ((t_BC + _ASINH_LIMIT) * (self.bins / (2 * _ASINH_LIMIT))).long().clamp(0, self.bins - 1)
        flat_BC = (bin_BC + torch.arange(bin_BC.shape[1], device=bin_BC.device) * self.bins).cpu()
        fires_BC = fires_BC.cpu()
        self.pos_CH.view(-1).index_add_(0, flat_BC[fires_BC], torch.ones_like(flat_BC[fires_BC]))
        self.neg_CH.view(-1).index_add_(0, flat_BC[~fires_BC], torch.ones_like(flat_BC[~fires_BC]))

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(r2_C, auroc_C, n_strong_C); NaN where a latent never fires strongly (or always does) held
        out, and R² NaN with fewer than 2 strong firings."""
        n = self.n_strong_C.double().clamp_min(1)
        sst_C = self.sum_yy_C - self.sum_y_C.pow(2) / n
        ok_C = (sst_C > 0) & (self.n_strong_C >= 2)
        r2_C = torch.where(ok_C, 1 - self.sse_C / sst_C.clamp_min(1e-300), torch.nan)
        return r2_C.numpy(), binned_auroc(self.pos_CH, self.neg_CH), self.n_strong_C.numpy()


def binned_auroc(pos_CH: Tensor, neg_CH: Tensor) -> np.ndarray:
    """AUROC from per-bin counts of positives and negatives (bins in increasing score order).

    P(score_pos > score_neg) + ½ P(equal), counting scores in one bin as equal; NaN without both.
    """
    pos_CH, neg_CH = pos_CH.double(), neg_CH.double()
    neg_below_CH = neg_CH.cumsum(1) - neg_CH
    wins_C = (pos_CH * (neg_below_CH + 0.5 * neg_CH)).sum(1)
    pairs_C = pos_CH.sum(1) * neg_CH.sum(1)
    return torch.where(pairs_C > 0, wins_C / pairs_C.clamp_min(1), torch.nan).numpy()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact AUROC (Mann–Whitney U with mid-ranks for ties); NaN without both classes."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based average rank of each distinct score
    rank_sum = mid_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class LatentScaling:
    """Latent Scaling ν (Minder et al. 2025) for C latents, when A and B share one space.

    For latent j with own-model decoder d_j (unit direction u_j) and each model m, fit
    β_m = argmin_β Σ_x ||β f_j(x) u_j − y_m(x)||², with y_m = x_m − x̂_m + f_j d_j^m, the part of m's
    activation the rest of the crosscoder leaves unexplained plus j's own contribution (their "ε"
    variant, robust to latents that share the work with others). Closed form:
    β_m = (Σ f_j u_j·(x_m − x̂_m)) / Σ f_j² + u_j·d_j^m, converted to raw units by 1/scale_m.
    ν_j = β_other / β_own: ≈0 when the other model lacks the direction, ≈1 when it has it equally.
    """

    def __init__(self, u_CD: Tensor, dec_a_CD: Tensor, dec_b_CD: Tensor, own_is_a_C: Tensor):
        self.u_CD = u_CD.float()
        self.dot_a_C = (u_CD * dec_a_CD).sum(1).double().cpu()
        self.dot_b_C = (u_CD * dec_b_CD).sum(1).double().cpu()
        self.own_is_a_C = own_is_a_C.cpu()
        n = u_CD.shape[0]
        self.s1_a_C = torch.zeros(n, dtype=torch.float64)
        self.s1_b_C = torch.zeros(n, dtype=torch.float64)
        self.s2_C = torch.zeros(n, dtype=torch.float64)

    def update(self, f_BC: Tensor, resid_a_BD: Tensor, resid_b_BD: Tensor) -> None:
        """f for the C latents and each model's residual x − x̂ (normalised units)."""
        f_BC = f_BC.float()
        self.s1_a_C += (f_BC * (resid_a_BD.float() @ self.u_CD.T)).sum(0).double().cpu()
        self.s1_b_C += (f_BC * (resid_b_BD.float() @ self.u_CD.T)).sum(0).double().cpu()
        self.s2_C += f_BC.pow(2).sum(0).double().cpu()

    def betas(self, scale_a: float, scale_b: float) -> tuple[Tensor, Tensor]:
        """(β_A, β_B) per latent in raw units; NaN where the latent never fired."""
        s2_C = torch.where(self.s2_C > 0, self.s2_C, torch.nan)
        beta_a_C = (self.s1_a_C / s2_C + self.dot_a_C) / scale_a
        beta_b_C = (self.s1_b_C / s2_C + self.dot_b_C) / scale_b
        return beta_a_C, beta_b_C

    def result(self, scale_a: float, scale_b: float) -> np.ndarray:
        beta_a_C, beta_b_C = self.betas(scale_a, scale_b)
        own_C = torch.where(self.own_is_a_C, beta_a_C, beta_b_C)
        other_C = torch.where(self.own_is_a_C, beta_b_C, beta_a_C)
        return torch.where(own_C.abs() > 1e-12, other_C / own_C, torch.nan).numpy()


def verdict(side: str, n_fire: int) -> str:
    """The analysis's verdict of one latent: dead, shared, or an exclusive candidate of A or B
    (verify.py decides what a candidate does)."""
    if n_fire == 0:
        return "dead"
    return f"candidate_{side}" if side else "shared"


def detection_note(side: str, auroc: float, r2: float, threshold: float = 0.9) -> str:
    """Context information for a candidate: whether the other model detects its strong firings."""
    if not side or not np.isfinite(auroc):
        return ""
    other = "B" if side == "a" else "A"
    if auroc < threshold:
        return f"context not linearly detectable by {other} (AUROC {auroc:.2f} on strong firings)"
    return f"context detectable by {other} (AUROC {auroc:.2f}, magnitude R² {r2:.2f} on strong firings)"
