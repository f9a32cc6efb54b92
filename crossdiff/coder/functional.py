"""Functional share: how much of a latent's reconstruction each model actually uses.

A latent's relative decoder norm r = ||d_B|| / (||d_A|| + ||d_B||) reads the weights only: a B row that
never left its initialisation (nothing in B asks for it) still counts. The functional share reads the
data instead: how much removing the latent's write into a model raises that model's reconstruction
error,

    ΔSSE_m(i) = Σ_t ||e_m,t + f_t,i d_m,i||² − ||e_m,t||² = Σ_t 2 f_t,i (e_m,t · d_m,i) + f_t,i² ||d_m,i||²,
    share_B(i) = ΔSSE_B⁺(i) / (ΔSSE_A⁺(i) + ΔSSE_B⁺(i)),

with e = x − x̂ in normalised units and ΔSSE⁺ = max(ΔSSE, 0): a write that removing *lowers* the
error (a stale row: e_B carries −f d_B, so ΔSSE_B ≈ −Σ f² ||d_B||²) helps that model not at all.
share_B ≤ t is an A-only latent, ≥ 1 − t a B-only one (docs/benchmark.md; t = 0.1 by default);
NaN where neither model's error rises (a latent that never fires, or one that helps neither), and
where the latent fired fewer than `min_fires` times: a share measured on a handful of firings is
noise (on the toy benchmark, most latents with a one-sided share but no planted feature fire < 10
times in 65,536 tokens, docs/benchmark.md).

Only the firing (token, latent) entries contribute, so `FunctionalShare.update` works on them
directly (N entries × D) instead of a dense (B, F) product.

Legend: B tokens, F latents, M latents one model sees, D one model's width, N firing entries.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor


class FunctionalShare:
    """Streaming ΔSSE_A and ΔSSE_B (float64) of every latent of a crosscoder `cc` over batches."""

    def __init__(self, cc, device=None):
        self.cc = cc
        n_f = cc.cfg.n_latents
        self.dsse_a_F = torch.zeros(n_f, dtype=torch.float64, device=device)
        self.dsse_b_F = torch.zeros(n_f, dtype=torch.float64, device=device)
        self.n_fire_F = torch.zeros(n_f, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x_a: Tensor, x_b: Tensor, f_BF: Tensor, x_hat_a=None, x_hat_b=None) -> None:
        """Add one batch (normalised units); x̂ is decoded from f's firing entries when not given."""
        rows_N, cols_N = f_BF.nonzero(as_tuple=True)
        vals_N = f_BF[rows_N, cols_N].float()
        if x_hat_a is None or x_hat_b is None:
            x_hat_a, x_hat_b = self._decode_entries(f_BF.shape[0], rows_N, cols_N, vals_N)
        self.n_fire_F += torch.bincount(cols_N, minlength=len(self.n_fire_F))
        part = self.cc.partition
        # Row j of W_dec_a is latent j; row j of W_dec_b is latent j + n_a_exclusive (crosscoder.py).
        for x, x_hat, W_dec_MD, first, latents, acc_F in (
            (x_a, x_hat_a, self.cc.W_dec_a, 0, part.a_latents, self.dsse_a_F),
            (x_b, x_hat_b, self.cc.W_dec_b, part.n_a_exclusive, part.b_latents, self.dsse_b_F),
        ):
            own_N = (cols_N >= latents.start) & (cols_N < latents.stop)
            r_N, c_N, v_N = rows_N[own_N], cols_N[own_N], vals_N[own_N]
            d_ND = W_dec_MD.detach().float()[c_N - first]
            e_ND = (x - x_hat).float()[r_N]
            delta_N = 2 * v_N * (e_ND * d_ND).sum(1) + v_N.square() * d_ND.square().sum(1)
            acc_F.index_add_(0, c_N, delta_N.double())

    def _decode_entries(self, n_rows: int, rows_N, cols_N, vals_N) -> tuple[Tensor, Tensor]:
        """`cc.decode(f)` from the firing entries only (N × D work instead of a dense B × F × D product)."""
        part, out = self.cc.partition, []
        for W_dec_MD, b_dec_D, first, latents in (
            (self.cc.W_dec_a, self.cc.b_dec_a, 0, part.a_latents),
            (self.cc.W_dec_b, self.cc.b_dec_b, part.n_a_exclusive, part.b_latents),
        ):
            own_N = (cols_N >= latents.start) & (cols_N < latents.stop)
            W_dec_MD = W_dec_MD.detach().float()
            x_hat_BD = b_dec_D.detach().float().expand(n_rows, -1).clone()
            x_hat_BD.index_add_(0, rows_N[own_N], vals_N[own_N, None] * W_dec_MD[cols_N[own_N] - first])
            out.append(x_hat_BD)
        return out[0], out[1]

    def share_b(self, min_fires: int = 1) -> np.ndarray:
        """share_B per latent (F,), NaN where neither model's error rises without it or where it fired
        fewer than `min_fires` times."""
        share_F = share_from_deltas(self.dsse_a_F.cpu().numpy(), self.dsse_b_F.cpu().numpy())
        return np.where(self.n_fire_F.cpu().numpy() >= min_fires, share_F, np.nan)


def share_from_deltas(dsse_a_F, dsse_b_F) -> np.ndarray:
    """ΔSSE_B⁺ / (ΔSSE_A⁺ + ΔSSE_B⁺), NaN where both are ≤ 0."""
    a = np.clip(np.asarray(dsse_a_F, dtype=np.float64), 0, None)
    b = np.clip(np.asarray(dsse_b_F, dtype=np.float64), 0, None)
    total = a + b
    return np.where(total > 0, b / np.where(total > 0, total, 1.0), np.nan)


@torch.no_grad()
def functional_share(cc, batches: Iterable[tuple[Tensor, Tensor]], min_fires: int = 1) -> np.ndarray:
    """share_B of every latent over normalised (x_A, x_B) batches, with the inference encoder."""
    acc = None
    for x_a, x_b in batches:
        f_BF = cc.encode(x_a, x_b)
        if acc is None:
            acc = FunctionalShare(cc, f_BF.device)
        acc.update(x_a, x_b, f_BF)
    if acc is None:
        return np.full(cc.cfg.n_latents, np.nan)
    return acc.share_b(min_fires)


def classify_by_share(share_F, threshold: float) -> np.ndarray:
    """ "a" / "b" / "" per latent: share_B ≤ t is A-only, ≥ 1 − t B-only (NaN: neither)."""
    s = np.asarray(share_F, dtype=np.float64)
    side = np.full(len(s), "", dtype="<U1")
    with np.errstate(invalid="ignore"):
        side[s <= threshold] = "a"
        side[s >= 1 - threshold] = "b"
    return side


__all__ = ["FunctionalShare", "share_from_deltas", "functional_share", "classify_by_share"]
