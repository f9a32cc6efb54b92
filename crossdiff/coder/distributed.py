"""Data-parallel training across `torchrun` ranks (torch.distributed).

    torchrun --nproc-per-node N -m crossdiff train --store STORE --out RUN ...

`from_env()` joins the process group when torchrun's WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU);
otherwise it returns None and everything runs single-process, unchanged.

Training is exact data parallelism: every rank reads the same global batch stream and keeps its own
slice of rows (`shard`), so the global batch — and the result — is that of single-process training,
up to the order of floating-point additions in the all-reduces:

- gradients: each rank's gradient of its local mean loss is weighted by n_local / n_global and
  summed (one all-reduce), which is the gradient of the global mean loss; clipping and Adam then
  run identically on every replica;
- BatchTopK: the selection is over the global batch. Each rank ranks its local scaled values,
  keeps its n_keep = k·B_global largest as candidates, all-gathers the candidate values and takes
  the global n_keep-th largest as the cutoff; a rank keeps its entries at or above it (the same set
  as a single top-k over the global batch, up to exact ties). The cutoff (the θ EMA's sample) is
  therefore the same on all ranks;
- dead-latent counters: the fired masks are OR-ed (all-reduce MAX) and the counters advance by the
  global batch size, so they stay identical.

One documented deviation: AuxK divides its squared error by the residual's variance; under data
parallelism each rank uses its own slice's variance (the mean of N ratios instead of one ratio of
sums). It is 0 until some latent is dead and weighted α = 1/32; the tests check exact equality with
AuxK inactive.

Only rank 0 writes the run folder (config, metrics, checkpoints, final weights, eval.json).

The process group itself (joining, leaving, the harvest's CPU exchanges) is crossdiff/core/torchrun.py;
this module adds training's collectives to its context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.torchrun import Group, join, local_device, shutdown
from . import sparse
from .sparsity import Select, Sparsity


@dataclass
class DistContext(Group):
    """A rank of data-parallel training: the group, and the global batch's collectives."""

    n_global: int = 0
    """Rows of the current global batch (set by `shard`)."""

    def shard(self, x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of a global batch: contiguous, near-equal slices in rank order."""
        self.n_global = x_a.shape[0]
        return x_a.tensor_split(self.world)[self.rank], x_b.tensor_split(self.world)[self.rank]

    def reduce_grads(self, params, n_local: int) -> None:
        """Gradient of the global mean loss from each rank's local-mean gradient (one all-reduce)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]) * (n_local / self.n_global)
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a bool tensor over ranks."""
        m = mask.to(torch.uint8)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return m.bool()

    def selection(self, rule: Sparsity) -> Select | None:
        """The selection to pass to `Crosscoder.training_forward` (its `select` argument): over the
        global batch for a sparsity that couples the batch's tokens (BatchTopK), None (the local
        selection, already exact) for per-token ones."""
        if not rule.couples_batch:
            return None

        def select(xw_BF, bias_F, norm_F, k: int, guess=None, shortcut=True) -> sparse.Entries:
            return self.select_batch_topk(xw_BF, bias_F, norm_F, k * self.n_global)

        return select

    def select_batch_topk(self, xw_BF, bias_F, norm_F, n_keep: int) -> sparse.Entries:
        """The n_keep largest ReLU(xw + bias)·norm over all ranks' rows; this rank's share of them."""
        n_latents = xw_BF.shape[1]
        flat_N, vals_N = sparse._scaled_topk(xw_BF, bias_F, norm_F, n_keep)  # local candidates (> 0)
        counts = [torch.zeros((), dtype=torch.long, device=vals_N.device) for _ in range(self.world)]
        dist.all_gather(counts, torch.tensor(vals_N.numel(), device=vals_N.device))
        width = int(max(int(c) for c in counts))
        padded = vals_N.new_zeros(width)  # 0 pads: candidates are > 0
        padded[: vals_N.numel()] = vals_N
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded)
        every = torch.cat(gathered)
        every = every[every > 0]
        if every.numel() == 0:
            cutoff = norm_F.new_zeros(())
            keep = torch.zeros_like(vals_N, dtype=torch.bool)
        else:
            cutoff = every.topk(min(n_keep, every.numel()), sorted=False).values.min()
            keep = vals_N >= cutoff
        flat_N = flat_N[keep]
        rows, cols = sparse._row_major(flat_N // n_latents, flat_N % n_latents, n_latents)
        return sparse.Entries(rows, cols, cutoff.to(norm_F.dtype))


def from_env(device_type: str | None = None) -> DistContext | None:
    """Join (or reuse) the torchrun process group for training; None when single-process."""
    return join(device_type, DistContext)


__all__ = ["DistContext", "from_env", "local_device", "shutdown"]
