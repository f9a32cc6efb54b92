"""Sparse training path: selection of active latents and autograd ops that touch only them.

With k active latents per token only the encoder forward has to be dense (docs/design.md §2;
docs/training.md, "The sparse training path"): the decoder forward, the decoder gradients and the
encoder weight gradient each cost O(k·d) per token when computed from the list of active (token, latent) entries. This module holds

- `matmuls_nograd`: the one dense matmul, written in place (no autograd graph, no extra passes);
- selections (BatchTopK, per-token TopK, positive entries for L1) returning the active entries in
  row-major order;
- `gather_preacts` / `sparse_decode`: torch.autograd.Functions whose backward uses only the entries
  (and `gather_columns` for AuxK's dead latents);
- `dense_preacts` / `dense_decode`: the plain dense implementation kept as the test oracle.

The sparse products run as embedding_bag (tuned for CPU) on CPU and as Triton kernels
(sparse_triton.py, imported only then) on CUDA; `_on_triton` picks, per call, by device.

Latent layout (DFC, crosscoder.py): [A-exclusive | shared | B-exclusive]. Model A reads/writes the
contiguous range [0, F - Eb), model B the range [Ea, F); a per-model tensor row j is latent j (A)
or latent Ea + j (B). Forbidden weights therefore do not exist.

Legend: B tokens, F all latents, M latents one model sees, D one model's width, N active entries,
E a subset of latents (AuxK's dead ones).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TRITON_ON_CPU = False
"""Run the CUDA path's kernels on CPU tensors too: the tests set it, with TRITON_INTERPRET=1, to run
them through Triton's interpreter (tests/test_sparse_triton.py). Never set in normal use."""


def _on_triton(t: Tensor) -> bool:
    return t.device.type == "cuda" or TRITON_ON_CPU


def _kernels():
    """crossdiff.coder.sparse_triton, imported on first use (it imports triton, which CPU installs lack)."""
    from . import sparse_triton

    return sparse_triton


class Entries(NamedTuple):
    """Active (token, latent) pairs in row-major order (sorted by token, then latent)."""

    rows_N: Tensor
    cols_N: Tensor
    cutoff: Tensor | None = None
    """Smallest kept decoder-norm-scaled value (BatchTopK), the sample for the threshold EMA."""
    by_latent_N: Tensor | None = None
    """Optional: the permutation sorting the entries by latent (stable), shared by the backward's
    four sparseᵀ @ dense products (`with_latent_order`)."""


def with_latent_order(entries: Entries) -> Entries:
    """`entries` with `by_latent_N` filled: one sort per step instead of four (~1 ms each at N = 32k)."""
    return entries._replace(by_latent_N=entries.cols_N.argsort(stable=True))


# ----------------------------------------------------------------------------- dense encoder


def matmuls_nograd(x_a_BD, x_b_BD, W_enc_a_MD, W_enc_b_MD, n_latents: int, n_a_exclusive: int) -> Tensor:
    """W_enc_A x_A + W_enc_B x_B as one (B, F) tensor — f_pre without b_enc — and no autograd graph.

    Two GEMMs write straight into the output (the second with beta=1). b_enc is left out on purpose:
    addmm would broadcast-copy it over all B·F entries first, a full extra pass (~8% of the step on
    CPU at D=16k); the selections fold it into their thresholds and `gather_preacts` adds it to the
    N kept entries instead.
    """
    with torch.no_grad():
        n_tokens, n_a = x_a_BD.shape[0], W_enc_a_MD.shape[0]
        dtype = torch.get_autocast_dtype(x_a_BD.device.type) if _autocast_on(x_a_BD) else W_enc_a_MD.dtype
        xw_BF = torch.empty(n_tokens, n_latents, dtype=dtype, device=x_a_BD.device)
        torch.mm(x_a_BD.to(dtype), W_enc_a_MD.to(dtype).T, out=xw_BF[:, :n_a])
        xw_BF[:, n_a:] = 0
        if n_a_exclusive:
            # B's range starts after the A-exclusive block, which B's GEMM must not touch.
            xw_BF[:, n_a_exclusive:].addmm_(x_b_BD.to(dtype), W_enc_b_MD.to(dtype).T)
        else:
            xw_BF.addmm_(x_b_BD.to(dtype), W_enc_b_MD.to(dtype).T)
        return xw_BF


def bias_relu_threshold_(
    f_BF: Tensor, bias_F: Tensor, norm_F: Tensor | None = None, threshold=None
) -> Tensor:
    """In place: f = ReLU(f + bias), then (threshold given) f *= (f·norm > threshold).

    The inference epilogue on the `matmuls_nograd` buffer. Same ops and rounding as the out-of-place
    formula, applied to row blocks of ~1 MB (CPU) so each block is read from memory once and the
    threshold's (B, F) float and bool temporaries shrink to one block.
    """
    block = max(1, (1 << 18 if f_BF.device.type == "cpu" else 1 << 26) // max(1, f_BF.shape[1]))
    for s in range(0, f_BF.shape[0], block):
        blk = f_BF[s : s + block]
        blk.add_(bias_F).relu_()
        if threshold is not None:
            blk.mul_(blk * norm_F > threshold)
    return f_BF


def keep_entries_(f_BF: Tensor, entries: Entries) -> Tensor:
    """In place: zero every entry of f except (rows, cols), i.e. f * mask without a (B, F) mask."""
    vals_N = f_BF[entries.rows_N, entries.cols_N]
    f_BF.zero_()
    f_BF[entries.rows_N, entries.cols_N] = vals_N
    return f_BF


def nonzero_entries(f_BF: Tensor) -> Entries:
    """Row-major (rows, cols) of the entries f > 0 (numpy's compare + flatnonzero on CPU, see `_above`)."""
    return Entries(*_above(f_BF, f_BF.new_zeros(f_BF.shape[1])))


def dense_preacts(x_a_BD, x_b_BD, W_enc_a_MD, W_enc_b_MD, b_enc_F, n_a_exclusive: int) -> Tensor:
    """Oracle: the same pre-activations with ordinary autograd (each model padded to F latents)."""
    n_latents = b_enc_F.shape[0]
    pre_a_BM = x_a_BD @ W_enc_a_MD.T
    pre_b_BM = x_b_BD @ W_enc_b_MD.T
    pad_a = F.pad(pre_a_BM, (0, n_latents - pre_a_BM.shape[1]))
    pad_b = F.pad(pre_b_BM, (n_a_exclusive, n_latents - n_a_exclusive - pre_b_BM.shape[1]))
    return pad_a + pad_b + b_enc_F


# ----------------------------------------------------------------------------- selections


def _row_major(rows_N: Tensor, cols_N: Tensor, n_latents: int) -> tuple[Tensor, Tensor]:
    order_N = (rows_N * n_latents + cols_N).argsort()
    return rows_N[order_N], cols_N[order_N]


def _with_bias(xw: Tensor, bias: Tensor | None) -> Tensor:
    return xw if bias is None else xw + bias


def select_batch_topk(
    xw_BF: Tensor,
    bias_F: Tensor | None,
    norm_F: Tensor,
    n_keep: int,
    guess: float | None = None,
    shortcut: bool = True,
) -> Entries:
    """The n_keep largest ReLU(f_pre)·norm over the whole batch (BatchTopK, Minder et al. 2025 §2.2),
    f_pre = xw + bias (bias None: xw already is f_pre).

    A top-k over all B·F values is slow (300 ms for 1024 x 16384 on one CPU core; 5 ms on an H200
    at 4096 x 65536). With `shortcut`, candidates above a guess of the cutoff are found in
    one comparison pass and only they are ranked. Guesses: the caller's (the trainer extrapolates the
    previous batches' cutoffs), then an estimate from every 16th token. Each attempt proves its own
    result (every value left out is at most the guess, below the kept minimum), and the full top-k
    remains the last resort, so the shortcut never changes which entries are selected (up to exact
    ties). shortcut=False is the plain reference.
    """
    n_tokens, n_latents = xw_BF.shape
    n_keep = min(n_keep, n_tokens * n_latents)
    if shortcut and n_keep > 0:
        bias0_F = torch.zeros_like(norm_F) if bias_F is None else bias_F.to(norm_F.dtype)
        guesses = [guess] if guess is not None and guess > 0 else []
        stride = 16 if n_tokens >= 64 else 0
        for g in guesses + ([None] if stride else []):
            if g is None:  # the cutoff of a 1/16 row sample, lowered by 20%
                sub = _scaled_topk(xw_BF[::stride], bias_F, norm_F, max(1, n_keep // stride))[1]
                g = 0.8 * float(sub.min()) if sub.numel() else 0.0
            entries = _try_guess(xw_BF, bias0_F, norm_F, n_keep, g) if g > 0 else None
            if entries is not None:
                return entries
    flat_N, vals_N = _scaled_topk(xw_BF, bias_F, norm_F, n_keep)
    cutoff = vals_N.min() if vals_N.numel() else norm_F.new_zeros(())
    return Entries(*_row_major(flat_N // n_latents, flat_N % n_latents, n_latents), cutoff)


def _scaled_topk(xw_BF, bias_F, norm_F, n_keep) -> tuple[Tensor, Tensor]:
    """Flat indices and values of the n_keep largest positive ReLU(xw + bias)·norm."""
    scaled_BF = _with_bias(xw_BF, bias_F).clamp_min(0) * norm_F  # bf16 xw promotes to fp32 here
    top = scaled_BF.view(-1).topk(min(n_keep, scaled_BF.numel()), sorted=False)
    keep_N = top.values > 0
    return top.indices[keep_N], top.values[keep_N]


def _try_guess(xw_BF, bias0_F, norm_F, n_keep: int, guess: float) -> Entries | None:
    """Exact BatchTopK from the candidates scaled > guess, or None if that cannot be proven."""
    live_F = norm_F > 0  # a latent without decoder has scaled value 0 and is never a candidate
    thr_F = torch.where(live_F, guess / norm_F.clamp_min(1e-30) - bias0_F, torch.inf)
    rows_N, cols_N = _above(xw_BF, thr_F)
    if rows_N.numel() < n_keep:
        return None
    scaled_N = (xw_BF.reshape(-1)[rows_N * xw_BF.shape[1] + cols_N] + bias0_F[cols_N]) * norm_F[cols_N]
    top = scaled_N.topk(n_keep, sorted=False)
    cutoff = top.values.min()
    # Left-out values satisfy xw <= thr, i.e. scaled <= (thr + bias)·norm, up to rounding of those
    # magnitudes (bias can dwarf guess/norm, hence the per-latent slack).
    slack_F = (thr_F.abs() + bias0_F.abs()) * norm_F * (8 * torch.finfo(norm_F.dtype).eps)
    if not cutoff > ((thr_F + bias0_F) * norm_F + slack_F)[live_F].max():
        return None
    keep_N = scaled_N >= cutoff
    if int(keep_N.sum()) == n_keep:  # no tie at the cutoff: the same set, and already row-major
        return Entries(rows_N[keep_N], cols_N[keep_N], cutoff)  # (saves a 1.5 ms sort per step)
    return Entries(*_row_major(rows_N[top.indices], cols_N[top.indices], xw_BF.shape[1]), cutoff)


def _above(xw_BF: Tensor, thr_F: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the entries with xw > thr, row-major.

    On CPU numpy's compare + flatnonzero is ~7x faster than torch's gt + nonzero (13 vs 94 ms for
    1024 x 16384 on one core); this pass is the selection's whole cost.
    """
    n_tokens, n_latents = xw_BF.shape
    if xw_BF.device.type == "cpu" and xw_BF.dtype in (torch.float32, torch.float64) and xw_BF.is_contiguous():
        xw, thr = xw_BF.detach().numpy(), thr_F.detach().to(xw_BF.dtype).numpy()
        # Row blocks whose bool mask stays in L2: 6.5 instead of 8.1 ms at 1024 x 16384 (random data).
        block = max(1, (1 << 19) // max(1, n_latents))
        flat = [np.flatnonzero(xw[s : s + block] > thr) + s * n_latents for s in range(0, n_tokens, block)]
        flat_N = torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64))
        return flat_N // n_latents, flat_N % n_latents
    return (xw_BF > thr_F).nonzero(as_tuple=True)


def select_topk(xw_BF: Tensor, bias_F: Tensor | None, norm_F: Tensor, k: int) -> Entries:
    """Per-token top-k of ReLU(f_pre)·norm (ranked like BatchTopK so the variants are comparable)."""
    n_tokens, n_latents = xw_BF.shape
    k = min(k, n_latents)
    # Row blocks (each row is ranked on its own): the scaled temporary is one block, not (B, F).
    block = max(1, (1 << 20 if xw_BF.device.type == "cpu" else 1 << 26) // max(1, n_latents))
    vals, idx = [], []
    for s in range(0, n_tokens, block):
        scaled = _with_bias(xw_BF[s : s + block], bias_F).clamp_min(0).to(norm_F.dtype).mul_(norm_F)
        top = scaled.topk(k, dim=1, sorted=False)
        vals.append(top.values)
        idx.append(top.indices)
    vals_BK, idx_BK = (
        (torch.cat(vals), torch.cat(idx))
        if vals
        else (xw_BF.new_zeros(0, k), xw_BF.new_zeros(0, k, dtype=torch.long))
    )
    rows_N = torch.arange(n_tokens, device=xw_BF.device).repeat_interleave(k)
    keep_N = vals_BK.reshape(-1) > 0
    return Entries(*_row_major(rows_N[keep_N], idx_BK.reshape(-1)[keep_N], n_latents))


def select_positive(xw_BF: Tensor, bias_F: Tensor | None) -> Entries:
    """Every entry with f_pre > 0 (the L1 crosscoder's active set; already row-major)."""
    thr_F = torch.zeros(xw_BF.shape[1], dtype=xw_BF.dtype) if bias_F is None else -bias_F
    return Entries(*_above(xw_BF, thr_F.to(xw_BF.device)))


# ----------------------------------------------------------------------------- sparse kernels


def _autocast_on(t: Tensor) -> bool:
    return t.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(t.device.type)


def _fp32(t: Tensor):
    """Sparse kernels run in the parameters' dtype (fp32) even under bf16 autocast: the bf16
    speed-up matters only for the dense GEMM."""
    return torch.autocast(t.device.type, enabled=False) if _autocast_on(t) else nullcontext()


def _bag_by_latent(rows_N, cols_N, weights_N, dense_BD, lo: int, hi: int, order_N=None) -> Tensor:
    """out[j] = Σ_{entries with col = lo+j} weight · dense[row], for j < hi-lo: sparseᵀ @ dense.

    One embedding_bag over the entries sorted by latent (bag = latent; `order_N`: the stable
    argsort of cols_N, if known): no (N, D) temporary and a deterministic summation order on CPU
    (needed for bitwise-identical resume).
    """
    if _on_triton(dense_BD):  # no host sync: offsets by searchsorted over the whole sorted list
        return _kernels().bag_by_latent(rows_N, cols_N, weights_N, dense_BD, lo, hi, order_N)
    order_N = cols_N.argsort(stable=True) if order_N is None else order_N
    sorted_N = cols_N[order_N]
    start, stop = torch.searchsorted(sorted_N, torch.tensor([lo, hi], device=cols_N.device)).tolist()
    order_N, sorted_N = order_N[start:stop], sorted_N[start:stop]
    return _bags(rows_N[order_N], dense_BD, _bag_offsets(sorted_N - lo, hi - lo), weights_N[order_N])


def _bag_offsets(sorted_keys_N: Tensor, n_bags: int) -> Tensor:
    """Start of each bag in keys sorted ascending (all in [0, n_bags)), plus the closing N.

    A count and a running sum instead of n_bags binary searches (`searchsorted`): 0.3 vs 0.9 ms
    for 16,384 bags over 32k keys on one core (bench/kernels.py); it runs four times per step.
    """
    counts = torch.bincount(sorted_keys_N, minlength=n_bags)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _bags(idx_N: Tensor, table_RD: Tensor, offsets_O1: Tensor, weights_N: Tensor) -> Tensor:
    """Weighted sums of `table` rows per bag (O bags, O + 1 offsets: the last one = N).

    The closing offset is passed (`include_last_offset`): CPU embedding_bag then skips building
    it, which shows when the output is in cache, not from DRAM (bench/kernels.py).
    """
    return F.embedding_bag(
        idx_N, table_RD, offsets_O1, mode="sum", per_sample_weights=weights_N, include_last_offset=True
    )


def _weighted_row_sum(W_MD: Tensor, rows_U: Tensor, weights_U: Tensor) -> Tensor:
    """Σ_u weights[u] · W[rows[u]] (D,): a GEMV that reads only the listed rows."""
    offsets = torch.tensor([0, rows_U.numel()], device=W_MD.device)
    return _bags(rows_U, W_MD, offsets, weights_U)[0]


def _bag_by_token(rows_N, cols_N, weights_N, W_MD, n_tokens: int, col_lo: int = 0, bias_D=None) -> Tensor:
    """out[b] = Σ_{entries of token b} weight · W[col - col_lo] (+ bias) (entries row-major): sparse @
    dense. On Triton, entries outside [col_lo, col_lo + M) are skipped; on CPU there are none
    (col_lo = 0)."""
    if _on_triton(W_MD):
        return _kernels().bag_by_token(rows_N, cols_N, weights_N, W_MD, n_tokens, bias_D, col_lo)
    assert col_lo == 0, "the CPU path decodes compacted entries"
    offsets_B1 = torch.searchsorted(rows_N, torch.arange(n_tokens + 1, device=rows_N.device))
    out_BD = _bags(cols_N, W_MD, offsets_B1, weights_N)
    return out_BD if bias_D is None else out_BD + bias_D


def _row_dots(
    rows_N, cols_N, A_BD, W_MD, n_tokens: int, sddmm: bool | None = None, col_lo: int = 0
) -> Tensor:
    """<A[row], W[col - col_lo]> per entry (SDDMM): the decoder's gradient w.r.t. the activations
    (on Triton 0 for the entries outside [col_lo, col_lo + M); on CPU there are none)."""
    if sddmm is None and _on_triton(W_MD):
        return _kernels().row_dots(rows_N, cols_N, A_BD, W_MD, col_lo)
    assert col_lo == 0, "the CPU path decodes compacted entries"
    sddmm = A_BD.device.type == "cpu" if sddmm is None else sddmm
    if sddmm and rows_N.numel():
        # MKL's sampled_addmm reads each row once; a gather + multiply writes 2·N·D floats.
        crow = torch.searchsorted(rows_N, torch.arange(n_tokens + 1, device=rows_N.device))
        with warnings.catch_warnings():  # "CSR support is in beta": the op itself is tested here
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                crow,
                cols_N,
                torch.zeros_like(rows_N, dtype=A_BD.dtype),
                (n_tokens, W_MD.shape[0]),
                check_invariants=False,
            )
            # zeros, not empty: beta=0 still multiplies (0 · NaN = NaN from uninitialised memory)
            return torch.sparse.sampled_addmm(pattern, A_BD, W_MD.T, beta=0.0).values()
    out_N = A_BD.new_empty(rows_N.shape[0])
    for s in range(0, rows_N.shape[0], 1 << 16):
        r, c = rows_N[s : s + (1 << 16)], cols_N[s : s + (1 << 16)]
        out_N[s : s + (1 << 16)] = (A_BD[r] * W_MD[c]).sum(-1)
    return out_N


class _GatherPreacts(torch.autograd.Function):
    """vals = xw[rows, cols] + b_enc[cols], differentiated w.r.t. the encoder using only the entries."""

    @staticmethod
    def forward(
        ctx,
        xw_BF,
        rows_N,
        cols_N,
        x_a_BD,
        x_b_BD,
        W_enc_a_MD,
        W_enc_b_MD,
        b_enc_F,
        n_a_excl,
        c_a_D,
        c_b_D,
        order_N,
    ):
        xc_a_BD = x_a_BD if c_a_D is None else x_a_BD - c_a_D
        xc_b_BD = x_b_BD if c_b_D is None else x_b_BD - c_b_D
        ctx.save_for_backward(rows_N, cols_N, xc_a_BD, xc_b_BD, W_enc_a_MD, W_enc_b_MD, order_N)
        ctx.n_a_excl, ctx.n_latents = n_a_excl, b_enc_F.shape[0]
        return xw_BF[rows_N, cols_N].to(b_enc_F.dtype) + b_enc_F[cols_N]

    @staticmethod
    def backward(ctx, grad_N):
        rows_N, cols_N, xc_a_BD, xc_b_BD, W_enc_a_MD, W_enc_b_MD, order_N = ctx.saved_tensors
        n_a, ea, n_f = W_enc_a_MD.shape[0], ctx.n_a_excl, ctx.n_latents
        need = ctx.needs_input_grad
        g = [None] * 12
        if (need[5] or need[6]) and order_N is None:
            order_N = cols_N.argsort(stable=True)
        with _fp32(grad_N):
            dt = W_enc_a_MD.dtype
            grad_N = grad_N.to(dt)
            if need[5]:  # dL/dW_enc_A[j] = Σ_{entries of latent j} grad · xc_A[row]
                g[5] = _bag_by_latent(rows_N, cols_N, grad_N, xc_a_BD.to(dt), 0, n_a, order_N)
            if need[6]:
                g[6] = _bag_by_latent(rows_N, cols_N, grad_N, xc_b_BD.to(dt), ea, n_f, order_N)
            if need[7] or need[9] or need[10]:  # dL/db_enc[j] = Σ_{entries of latent j} grad
                g[7] = torch.zeros(n_f, dtype=dt, device=grad_N.device).index_add_(0, cols_N, grad_N)
            # The centres (b_dec): dL/dc_A = -Σ_j dL/db_enc[j] · W_enc_A[j] over the latents with an
            # entry: one weighted sum of those rows (~40% of W_enc at D=16k, 1.5 ms per model) instead
            # of gathering N rows of W_enc into dL/dxc (B, D) (7 ms per model).
            if (need[9] or need[10]) and _on_triton(grad_N):  # same sum, only the rows with a gradient
                if need[9]:
                    g[9] = -_kernels().rowsum_nonzero(g[7][:n_a], W_enc_a_MD)
                if need[10]:
                    g[10] = -_kernels().rowsum_nonzero(g[7][ea:], W_enc_b_MD)
            elif need[9] or need[10]:
                lat_U = torch.unique(cols_N) if order_N is None else cols_N[order_N].unique_consecutive()
                if need[9]:
                    lat_a = lat_U[lat_U < n_a]
                    g[9] = -_weighted_row_sum(W_enc_a_MD, lat_a, g[7][lat_a])
                if need[10]:
                    lat_b = lat_U[lat_U >= ea]
                    g[10] = -_weighted_row_sum(W_enc_b_MD, lat_b - ea, g[7][lat_b])
            if need[3]:  # rarely needed (inputs are data): dL/dx_A = sparse @ W_enc_A
                m = cols_N < n_a
                g[3] = _bag_by_token(rows_N[m], cols_N[m], grad_N[m], W_enc_a_MD, xc_a_BD.shape[0])
            if need[4]:
                m = cols_N >= ea
                g[4] = _bag_by_token(rows_N[m], cols_N[m] - ea, grad_N[m], W_enc_b_MD, xc_b_BD.shape[0])
            if not need[7]:
                g[7] = None
        return tuple(g)


def gather_preacts(
    xw_BF,
    entries: Entries,
    x_a_BD,
    x_b_BD,
    W_enc_a_MD,
    W_enc_b_MD,
    b_enc_F,
    n_a_exclusive,
    c_a_D=None,
    c_b_D=None,
):
    """Active values f_pre[rows, cols] = xw[rows, cols] + b_enc[cols] (N,), differentiable w.r.t. the
    encoder at O(N·D) cost. The encoder reads x_m - c_m (c_m: the centres b_dec_m, or None for
    none) and xw_BF is `matmuls_nograd` of those centred inputs; the entries must have f_pre > 0,
    so ReLU's derivative is 1.
    """
    return _GatherPreacts.apply(
        xw_BF,
        entries.rows_N,
        entries.cols_N,
        x_a_BD,
        x_b_BD,
        W_enc_a_MD,
        W_enc_b_MD,
        b_enc_F,
        n_a_exclusive,
        c_a_D,
        c_b_D,
        entries.by_latent_N,
    )


class _GatherColumns(torch.autograd.Function):
    """pre = xw[:, cols] + b_enc[cols] for a set of latents, differentiated w.r.t. the encoder by one
    GEMM per model (inputs are treated as constants)."""

    @staticmethod
    def forward(ctx, xw_BF, cols_E, xc_a_BD, xc_b_BD, W_enc_a_MD, W_enc_b_MD, b_enc_F, n_a_excl):
        ctx.save_for_backward(cols_E, xc_a_BD, xc_b_BD)
        ctx.shapes, ctx.n_a_excl = (W_enc_a_MD.shape, W_enc_b_MD.shape, b_enc_F.shape), n_a_excl
        return xw_BF[:, cols_E].to(b_enc_F.dtype) + b_enc_F[cols_E]

    @staticmethod
    def backward(ctx, grad_BE):
        cols_E, xc_a_BD, xc_b_BD = ctx.saved_tensors
        (shape_a, shape_b, shape_f), ea = ctx.shapes, ctx.n_a_excl
        with _fp32(grad_BE):
            grad_BE = grad_BE.to(xc_a_BD.dtype)
            in_a, in_b = cols_E < shape_a[0], cols_E >= ea
            g_a = grad_BE.new_zeros(shape_a).index_copy_(0, cols_E[in_a], grad_BE[:, in_a].T @ xc_a_BD)
            g_b = grad_BE.new_zeros(shape_b).index_copy_(0, cols_E[in_b] - ea, grad_BE[:, in_b].T @ xc_b_BD)
            g_bias = grad_BE.new_zeros(shape_f).index_copy_(0, cols_E, grad_BE.sum(0))
        return None, None, None, None, g_a, g_b, g_bias, None


def gather_columns(xw_BF, cols_E, xc_a_BD, xc_b_BD, W_enc_a_MD, W_enc_b_MD, b_enc_F, n_a_exclusive):
    """Pre-activations (B, E) of the latents `cols_E` (ascending) from the no-grad `matmuls_nograd`
    buffer, differentiable w.r.t. W_enc and b_enc (AuxK on the sparse path: the forward is free)."""
    return _GatherColumns.apply(
        xw_BF, cols_E, xc_a_BD.detach(), xc_b_BD.detach(), W_enc_a_MD, W_enc_b_MD, b_enc_F, n_a_exclusive
    )


class _SparseDecode(torch.autograd.Function):
    """x̂ = sparse(B, M) @ W_dec (M, D) + b_dec for one model, entries row-major; latent j of the
    model is entry column col_lo + j (Triton skips the other entries; CPU has none, col_lo = 0)."""

    @staticmethod
    def forward(ctx, rows_N, cols_N, vals_N, W_dec_MD, b_dec_D, n_tokens, order_N, col_lo=0):
        with _fp32(vals_N):
            vals_N, W_MD = vals_N.to(W_dec_MD.dtype), W_dec_MD
            ctx.save_for_backward(rows_N, cols_N, vals_N, W_MD, order_N)
            ctx.n_tokens, ctx.has_bias, ctx.col_lo = n_tokens, b_dec_D is not None, col_lo
            return _bag_by_token(rows_N, cols_N, vals_N, W_MD, n_tokens, col_lo, b_dec_D)

    @staticmethod
    def backward(ctx, grad_BD):
        rows_N, cols_N, vals_N, W_MD, order_N = ctx.saved_tensors
        need, lo = ctx.needs_input_grad, ctx.col_lo
        g_vals = g_W = g_b = None
        with _fp32(grad_BD):
            grad_BD = grad_BD.to(W_MD.dtype).contiguous()
            if need[2]:
                g_vals = _row_dots(rows_N, cols_N, grad_BD, W_MD, ctx.n_tokens, col_lo=lo)
            if need[3]:
                g_W = _bag_by_latent(rows_N, cols_N, vals_N, grad_BD, lo, lo + W_MD.shape[0], order_N)
            if ctx.has_bias and need[4]:
                g_b = grad_BD.sum(0)
        return None, None, g_vals, g_W, g_b, None, None, None


def sparse_decode(
    rows_N, cols_N, vals_N, W_dec_MD, b_dec_D, n_tokens: int, order_N=None, col_lo: int = 0
) -> Tensor:
    """One model's reconstruction (B, D) from its active entries (row-major; order_N: their stable
    argsort by latent, if known). CPU: local latent indices. CUDA: col_lo + local index, and entries
    outside the model's range are ignored."""
    return _SparseDecode.apply(rows_N, cols_N, vals_N, W_dec_MD, b_dec_D, n_tokens, order_N, col_lo)


def decode_pair(entries: Entries, vals_N, W_dec_a_MD, W_dec_b_MD, b_dec_a_D, b_dec_b_D, n_a_excl, n_tokens):
    """(x̂_A, x̂_B): each model decodes only the entries in its latent range, so an A-exclusive latent
    cannot reach x̂_B (its row in W_dec_B does not exist)."""
    rows_N, cols_N, order_N = entries.rows_N, entries.cols_N, entries.by_latent_N
    if _on_triton(vals_N):  # the kernels skip out-of-range entries: no compaction, no host sync
        x_hat_a = sparse_decode(rows_N, cols_N, vals_N, W_dec_a_MD, b_dec_a_D, n_tokens, order_N, 0)
        x_hat_b = sparse_decode(rows_N, cols_N, vals_N, W_dec_b_MD, b_dec_b_D, n_tokens, order_N, n_a_excl)
        return x_hat_a, x_hat_b
    if n_a_excl == 0 and W_dec_a_MD.shape[0] == W_dec_b_MD.shape[0]:  # standard: both decode everything
        x_hat_a = sparse_decode(rows_N, cols_N, vals_N, W_dec_a_MD, b_dec_a_D, n_tokens, order_N)
        x_hat_b = sparse_decode(rows_N, cols_N, vals_N, W_dec_b_MD, b_dec_b_D, n_tokens, order_N)
        return x_hat_a, x_hat_b
    m_a = cols_N < W_dec_a_MD.shape[0]
    m_b = cols_N >= n_a_excl
    order_a = order_b = None
    if order_N is not None:  # A's entries come first in latent order, B's last: map to subset positions
        n_a, n_b = int(m_a.sum()), int(m_b.sum())
        order_a = (m_a.cumsum(0) - 1)[order_N[:n_a]]
        order_b = (m_b.cumsum(0) - 1)[order_N[order_N.numel() - n_b :]]
    x_hat_a = sparse_decode(rows_N[m_a], cols_N[m_a], vals_N[m_a], W_dec_a_MD, b_dec_a_D, n_tokens, order_a)
    x_hat_b = sparse_decode(
        rows_N[m_b], cols_N[m_b] - n_a_excl, vals_N[m_b], W_dec_b_MD, b_dec_b_D, n_tokens, order_b
    )
    return x_hat_a, x_hat_b


def dense_decode(f_BF, W_dec_a_MD, W_dec_b_MD, b_dec_a_D, b_dec_b_D, n_a_excl):
    """Oracle: x̂_m = f[:, model m's range] @ W_dec_m + b_dec_m."""
    x_hat_a = f_BF[:, : W_dec_a_MD.shape[0]] @ W_dec_a_MD
    x_hat_b = f_BF[:, n_a_excl:] @ W_dec_b_MD
    if b_dec_a_D is not None:
        x_hat_a, x_hat_b = x_hat_a + b_dec_a_D, x_hat_b + b_dec_b_D
    return x_hat_a, x_hat_b
