"""Sparsities as one table: how a crosscoder picks its active latents, in training and at inference.

A sparsity is a name in SPARSITIES: its training selection (a function over the batch's scaled
pre-activations) and a few flags the crosscoder, the trainer and the data-parallel trainer read
instead of comparing names. Adding one (e.g. JumpReLU) means one entry here.

The architecture is a separate setting: the exclusive fraction (0 = the standard crosscoder, > 0 =
the Dedicated Feature Crosscoder). The CLI's `--arch batchtopk|topk|l1|dfc` is a shorthand for the
pair (`arch_settings`).

Legend: B tokens, F all latents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..core.errors import CrossdiffError
from . import sparse

Select = Callable[..., sparse.Entries]
"""select(xw_BF, bias_F, norm_F, k, guess=None, shortcut=True) -> the active entries, row-major.

xw_BF are the encoder's matmul outputs (bias_F None: already biased); the selection ranks
ReLU(xw + bias)·norm_F. `guess` and `shortcut` are BatchTopK's exact-selection hints (sparse.py)."""


@dataclass(frozen=True)
class Sparsity:
    name: str
    select: Select
    """The training selection (also inference's before a threshold is learned)."""
    uses_k: bool
    """k, active latents per token, is a setting of this sparsity."""
    selects: bool
    """False: every positive pre-activation is active (encode = ReLU), nothing is ranked."""
    learns_threshold: bool
    """Inference keeps ReLU(f_pre)·Σ_m||d_m|| > θ once the trainer has learned θ (BatchTopK)."""
    l1_penalty: bool
    """The loss adds λ·Σ_i f_i Σ_m||d_m,i|| (TrainConfig.l1_coeff)."""
    couples_batch: bool
    """The selection depends on the other tokens of the batch: data-parallel training must select
    over the global batch (distributed.py), not per rank."""
    max_sparse_density: float = 1.0
    """Above this fraction of active entries the sparse training step falls back to the dense path
    (early L1 training is dense, where gathers are slower than GEMMs)."""


def _batch_topk(xw_BF: Tensor, bias_F, norm_F, k: int, guess=None, shortcut=True) -> sparse.Entries:
    return sparse.select_batch_topk(xw_BF, bias_F, norm_F, k * xw_BF.shape[0], guess, shortcut)


def _topk(xw_BF: Tensor, bias_F, norm_F, k: int, guess=None, shortcut=True) -> sparse.Entries:
    return sparse.select_topk(xw_BF, bias_F, norm_F, k)


def _positive(xw_BF: Tensor, bias_F, norm_F, k: int, guess=None, shortcut=True) -> sparse.Entries:
    return sparse.select_positive(xw_BF, bias_F)


SPARSITIES: dict[str, Sparsity] = {
    s.name: s
    for s in (
        Sparsity(  # the k·B largest over the batch (Bussmann et al. 2024); the learned θ at inference
            "batchtopk", _batch_topk, uses_k=True, selects=True, learns_threshold=True, l1_penalty=False,
            couples_batch=True,
        ),
        Sparsity(  # the k largest per token (Gao et al. 2024)
            "topk", _topk, uses_k=True, selects=True, learns_threshold=False, l1_penalty=False,
            couples_batch=False,
        ),
        Sparsity(  # every positive pre-activation, an L1 penalty in the loss (Anthropic 2024)
            "l1", _positive, uses_k=False, selects=False, learns_threshold=False, l1_penalty=True,
            couples_batch=False, max_sparse_density=0.05,
        ),
    )
}  # fmt: skip
NAMES = tuple(SPARSITIES)
DEFAULT_SPARSITY = "batchtopk"
"""The default sparsity, also of --arch dfc (the DFC paper's)."""
DFC = "dfc"
"""The --arch name of the Dedicated Feature Crosscoder (an exclusive fraction > 0)."""
DFC_EXCLUSIVE_FRAC = 0.05
"""--arch dfc's default exclusive fraction per model (the DFC paper's)."""


def get_sparsity(name: str) -> Sparsity:
    if name not in SPARSITIES:
        raise CrossdiffError(f"unknown sparsity {name!r}; use one of {', '.join(NAMES)}")
    return SPARSITIES[name]


def arch_settings(arch: str, sparsity: str | None = None, exclusive_frac: float | None = None) -> dict:
    """The {sparsity, exclusive_frac} an --arch name stands for, with explicitly given values.

    A sparsity name is the standard crosscoder with that sparsity; dfc is the DFC (default
    BatchTopK, DFC_EXCLUSIVE_FRAC exclusive latents per model)."""
    if arch == DFC:
        frac = DFC_EXCLUSIVE_FRAC if exclusive_frac is None else exclusive_frac
        if not frac > 0:
            raise CrossdiffError(
                f"--arch dfc needs --exclusive-frac > 0 (got {frac}); 0 is the standard crosscoder"
            )
        return {"sparsity": sparsity or DEFAULT_SPARSITY, "exclusive_frac": frac}
    get_sparsity(arch)
    if sparsity not in (None, arch):
        raise CrossdiffError(f"--sparsity {sparsity} applies only to --arch dfc (got --arch {arch})")
    if exclusive_frac:
        raise CrossdiffError(
            f"--exclusive-frac applies only to --arch dfc (--arch {arch} is the standard crosscoder)"
        )
    return {"sparsity": arch, "exclusive_frac": 0.0}


def arch_name(sparsity: str, exclusive_frac: float) -> str:
    """The --arch name of a (sparsity, exclusive fraction) pair, as eval.json reports it."""
    return DFC if exclusive_frac > 0 else sparsity
