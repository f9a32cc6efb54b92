"""The fraction of variance explained, accumulated over batches: one definition for training's live
metrics and held-out evaluation (coder/train.py) and the analysis (analysis/analyze.py).

    FVE = 1 − Σ ||x − x̂||² / Σ ||x − mean||²,   mean over every row added (not per batch: a batch of
                                                 one row has no spread, and its FVE came out near −1e16)

Sums are in float64, added batch by batch in the order given, so two runs over the same rows give
the same bits. Legend: B rows, D one model's width.
"""

from __future__ import annotations

import math

from torch import Tensor


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


__all__ = ["FVE"]
