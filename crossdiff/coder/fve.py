"""The fraction of variance explained, accumulated over batches: one definition for training's live
metrics (coder/runlog.py), its held-out evaluation (`evaluate`, eval.json) and the analysis
(analysis/analyze.py).

    FVE = 1 − Σ ||x − x̂||² / Σ ||x − mean||²,   mean over every row added (not per batch: a batch of
                                                 one row has no spread, and its FVE came out near −1e16)

Sums are in float64, added batch by batch in the order given, so two runs over the same rows give
the same bits. Legend: B rows, D one model's width.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ..core.errors import CrossdiffError


class FVE:
    """Running Σ||x − x̂||², Σ||x||² and Σx over the rows added."""

    def __init__(self):
        self.sse, self.sumsq, self.n = 0.0, 0.0, 0
        self.sum_D: Tensor | None = None

    def add(self, x_BD: Tensor, x_hat_BD: Tensor | None = None, *, sse: float | Tensor | None = None) -> None:
        """Rows x and their reconstruction (or, from a training step, its summed squared error `sse`)."""
        self.sse += float((x_BD - x_hat_BD).double().pow(2).sum()) if sse is None else float(sse)
        self.sumsq += float(x_BD.double().pow(2).sum())
        col_D = x_BD.detach().double().sum(0)
        self.sum_D = col_D if self.sum_D is None else self.sum_D + col_D
        self.n += x_BD.shape[0]

    def variance(self) -> float:
        """Σ ||x − mean||² over the rows added."""
        if self.sum_D is None:
            return 0.0
        return self.sumsq - float(self.sum_D.pow(2).sum()) / max(self.n, 1)

    def value(self) -> float:
        """The FVE; NaN without rows or without spread (nothing to explain)."""
        var = self.variance()
        return 1 - self.sse / var if self.n and var > 0 else math.nan


@torch.no_grad()
def evaluate(model, store, cfg, device) -> dict:
    """Held-out FVE per model (1 - Σ||x-x̂||² / Σ||x-mean||²), L0 and dead fraction, inference encoder;
    `cfg` is the run's TrainConfig (coder/train.py, which imports this module)."""
    batches = store.batches(min(cfg.batch_size, 1024), split="heldout", shuffle=False, epochs=1)
    fve = {m: FVE() for m in "ab"}
    fired_F = torch.zeros(model.cfg.n_latents, dtype=torch.bool, device=device)
    n = active = 0
    for x_a, x_b in _take(batches, cfg.heldout_tokens):
        x_a, x_b = x_a.to(device), x_b.to(device)
        f_BF = model.encode(x_a, x_b)
        x_hat = model.decode(f_BF)
        for m, x, xh in (("a", x_a, x_hat[0]), ("b", x_b, x_hat[1])):
            fve[m].add(x, xh)
        fired_F |= (f_BF > 0).any(0)
        active += int((f_BF > 0).sum())
        n += x_a.shape[0]
    if n == 0:
        raise CrossdiffError(f"the store {store.root} has no held-out tokens to evaluate on")
    dead = {
        name: float((~fired_F[r.start : r.stop]).float().mean()) if len(r) else None
        for name, r in model.partition.blocks()
    }
    return {
        "fve_a": fve["a"].value(),
        "fve_b": fve["b"].value(),
        "l0": active / n,
        "dead_fraction": float((~fired_F).float().mean()),
        "dead_fraction_by_partition": dead,
        "heldout_tokens": n,
        "threshold": float(model.threshold),
        "arch": cfg.arch,
        "sparsity": cfg.sparsity,
        "exclusive_latents": [model.cfg.n_a_exclusive, model.cfg.n_b_exclusive],
        "latents": cfg.latents,
        "k": cfg.k,
    }


def _take(batches: Iterator, n_tokens: int) -> Iterator:
    seen = 0
    for x_a, x_b in batches:
        if seen >= n_tokens:
            return
        keep = min(x_a.shape[0], n_tokens - seen)
        seen += keep
        yield x_a[:keep], x_b[:keep]


__all__ = ["FVE", "evaluate"]
