"""Triton kernels for the sparse training path on CUDA (sparse.py dispatches here by device).

The CPU path formulates the sparse products as `embedding_bag` calls, tuned for one core; on a GPU
those ran 33 ms of a 100 ms step (issue 15, H200, D = 65,536). The same three products here, each
one memory-bound pass with fp32 accumulation (fp64 for fp64 inputs), no atomics, a fixed summation
order (deterministic), every output element written exactly once:

- `segment_sum`: out[s] = Σ_{i in segment s} w[i] · table[idx[i]] (+ bias): the decoder forward
  (segments = tokens, table = W_dec) and the sparseᵀ·dense gradient products ∂W_dec, ∂W_enc
  (segments = latents, entries sorted by latent, table = the dense (B, D) activations or gradient).
  A program owns one segment and one D-tile and reduces (BLOCK_N, BLOCK_D) tiles of gathered rows,
  so BLOCK_N row loads are in flight at once; an empty segment writes zeros (or the bias).
- `row_dots`: <A[row], W[col]> per entry (SDDMM): the decoder's gradient w.r.t. the activations.
- `rowsum_nonzero`: Σ_j g[j] · W[j] over the rows with g[j] ≠ 0 (the centres' gradient): masked
  loads skip the other rows, split over row blocks into partial sums, then one small sum.

Entries outside a model's latent range [lo, lo + M) are skipped by mask, so the DFC's two models
decode from one row-major entry list without compacting it (compaction needs a host sync on CUDA),
and the offsets come from `searchsorted` (its output size is known on the host; `bincount`'s is not).

Importing this module imports triton: sparse.py does so only on the CUDA path (or in the tests,
which run these kernels on CPU tensors through Triton's interpreter, TRITON_INTERPRET=1).

Legend: N entries, S segments, D row width, B tokens, M latents one model sees, J rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _segment_sum_kernel(
    idx_ptr, w_ptr, off_ptr, table_ptr, bias_ptr, out_ptr,
    D, stride_t, stride_o, idx_lo, idx_hi,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask_D = d_D < D
    start = tl.load(off_ptr + seg)
    stop = tl.load(off_ptr + seg + 1)
    acc_D = tl.zeros([BLOCK_D], dtype=ACC)
    for s in range(start, stop, BLOCK_N):
        n_N = s + tl.arange(0, BLOCK_N)
        live_N = n_N < stop
        idx_N = tl.load(idx_ptr + n_N, mask=live_N, other=0)
        live_N = live_N & (idx_N >= idx_lo) & (idx_N < idx_hi)  # outside the model's range: skipped
        w_N = tl.load(w_ptr + n_N, mask=live_N, other=0.0).to(ACC)
        row_N = (idx_N - idx_lo).to(tl.int64)
        ptrs = table_ptr + row_N[:, None] * stride_t + d_D[None, :]
        rows_ND = tl.load(ptrs, mask=live_N[:, None] & dmask_D[None, :], other=0.0).to(ACC)
        acc_D += tl.sum(rows_ND * w_N[:, None], axis=0)
    if HAS_BIAS:
        acc_D += tl.load(bias_ptr + d_D, mask=dmask_D, other=0.0).to(ACC)
    tl.store(out_ptr + seg.to(tl.int64) * stride_o + d_D, acc_D.to(out_ptr.dtype.element_ty), mask=dmask_D)


@triton.jit
def _row_dots_kernel(
    rows_ptr, cols_ptr, a_ptr, w_ptr, out_ptr,
    N, D, stride_a, stride_w, col_lo, col_hi,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n_N = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live_N = n_N < N
    row_N = tl.load(rows_ptr + n_N, mask=live_N, other=0).to(tl.int64)
    col_N = tl.load(cols_ptr + n_N, mask=live_N, other=0)
    live_N = live_N & (col_N >= col_lo) & (col_N < col_hi)
    col_N = (col_N - col_lo).to(tl.int64)
    acc_N = tl.zeros([BLOCK_N], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d_D = d0 + tl.arange(0, BLOCK_D)
        m_ND = live_N[:, None] & (d_D < D)[None, :]
        a_ND = tl.load(a_ptr + row_N[:, None] * stride_a + d_D[None, :], mask=m_ND, other=0.0).to(ACC)
        w_ND = tl.load(w_ptr + col_N[:, None] * stride_w + d_D[None, :], mask=m_ND, other=0.0).to(ACC)
        acc_N += tl.sum(a_ND * w_ND, axis=1)
    tl.store(out_ptr + n_N, acc_N.to(out_ptr.dtype.element_ty), mask=n_N < N)


@triton.jit
def _rowsum_nonzero_kernel(
    g_ptr, w_ptr, part_ptr, J, D, stride_w, J_PER_PROG,
    ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_j = tl.program_id(0)
    d_D = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask_D = d_D < D
    j_stop = tl.minimum((pid_j + 1) * J_PER_PROG, J)
    acc_D = tl.zeros([BLOCK_D], dtype=ACC)
    for j0 in range(pid_j * J_PER_PROG, j_stop, BLOCK_J):
        j_J = j0 + tl.arange(0, BLOCK_J)
        g_J = tl.load(g_ptr + j_J, mask=j_J < j_stop, other=0.0).to(ACC)
        live_J = g_J != 0  # rows without a gradient are never read
        ptrs = w_ptr + j_J.to(tl.int64)[:, None] * stride_w + d_D[None, :]
        w_JD = tl.load(ptrs, mask=live_J[:, None] & dmask_D[None, :], other=0.0).to(ACC)
        acc_D += tl.sum(w_JD * g_J[:, None], axis=0)
    tl.store(part_ptr + pid_j.to(tl.int64) * D + d_D, acc_D.to(part_ptr.dtype.element_ty), mask=dmask_D)


# ----------------------------------------------------------------------------- launchers


def _acc(*tensors: Tensor):
    """fp64 accumulation for fp64 inputs (the tests' gradchecks), fp32 otherwise (bf16 and fp32)."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _rows(t: Tensor) -> Tensor:
    """A row-contiguous view (the kernels step rows by stride and columns by 1; 1-D inputs must be
    contiguous: entries from `nonzero(as_tuple=True)` on CUDA are strided views)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def segment_sum(
    idx_N, w_N, offsets_S1, table_RD, bias_D=None, idx_lo: int = 0, idx_hi: int | None = None, config=None
):
    """(S, D): out[s] = Σ_{i in [off[s], off[s+1]), idx_lo <= idx[i] < idx_hi} w[i] · table[idx[i] - idx_lo]
    (+ bias), in the table's dtype (accumulated in fp32 or fp64). config: (BLOCK_N, BLOCK_D, warps)
    instead of the defaults below (bench/gpu.py tries a few)."""
    table_RD, idx_N, w_N, offsets_S1 = (
        _rows(table_RD),
        idx_N.contiguous(),
        w_N.contiguous(),
        offsets_S1.contiguous(),
    )
    n_seg, (n_rows, d) = offsets_S1.numel() - 1, table_RD.shape
    idx_hi = idx_lo + n_rows if idx_hi is None else idx_hi
    out_SD = torch.empty(n_seg, d, dtype=table_RD.dtype, device=table_RD.device)
    if n_seg == 0 or d == 0:
        return out_SD
    # Tiles of at most 8192 elements (64 fp32 registers per thread at 4 warps); BLOCK_N follows the
    # mean segment length (k per token for the decoder, N/M per latent for the gradients).
    block_n = _pow2(-(-idx_N.numel() // n_seg), 4, 32)
    block_d = _pow2(d, 16, 8192 // block_n if block_n > 8 else 512)
    warps = 4
    if config is not None:
        block_n, block_d, warps = config
    grid = (n_seg, triton.cdiv(d, block_d))
    _segment_sum_kernel[grid](
        idx_N, w_N, offsets_S1, table_RD, table_RD if bias_D is None else bias_D, out_SD,
        d, table_RD.stride(0), out_SD.stride(0), idx_lo, idx_hi,
        HAS_BIAS=bias_D is not None, ACC=_acc(table_RD, w_N), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps,
    )  # fmt: skip
    return out_SD


def token_offsets(rows_N: Tensor, n_tokens: int) -> Tensor:
    """(B + 1,) start of each token's entries in row-major entries, plus the closing N."""
    return torch.searchsorted(rows_N.contiguous(), torch.arange(n_tokens + 1, device=rows_N.device))


def bag_by_token(rows_N, cols_N, w_N, W_MD, n_tokens: int, bias_D=None, col_lo: int = 0) -> Tensor:
    """(B, D): out[b] = Σ_{entries of token b with col in [col_lo, col_lo + M)} w · W[col - col_lo]
    (+ bias); entries row-major. The decoder forward."""
    return segment_sum(cols_N, w_N, token_offsets(rows_N, n_tokens), W_MD, bias_D, col_lo)


def bag_by_latent(rows_N, cols_N, w_N, dense_BD, lo: int, hi: int, order_N: Tensor | None = None) -> Tensor:
    """(hi - lo, D): out[j] = Σ_{entries with col = lo + j} w · dense[row] (sparseᵀ @ dense);
    order_N: the stable argsort of cols_N, if known."""
    order_N = cols_N.argsort(stable=True) if order_N is None else order_N
    sorted_N = cols_N[order_N]
    offsets = torch.searchsorted(sorted_N, torch.arange(lo, hi + 1, device=cols_N.device))
    return segment_sum(rows_N[order_N], w_N[order_N], offsets, dense_BD)


def row_dots(rows_N, cols_N, A_BD, W_MD, col_lo: int = 0) -> Tensor:
    """(N,): <A[row], W[col - col_lo]> per entry; 0 for entries outside [col_lo, col_lo + M)."""
    A_BD, W_MD, rows_N, cols_N = _rows(A_BD), _rows(W_MD), rows_N.contiguous(), cols_N.contiguous()
    n, d = rows_N.numel(), A_BD.shape[1]
    out_N = torch.empty(n, dtype=torch.promote_types(A_BD.dtype, W_MD.dtype), device=A_BD.device)
    if n == 0:
        return out_N
    block_d = _pow2(d, 16, 256)
    grid = (triton.cdiv(n, 16),)
    _row_dots_kernel[grid](
        rows_N, cols_N, A_BD, W_MD, out_N,
        n, d, A_BD.stride(0), W_MD.stride(0), col_lo, col_lo + W_MD.shape[0],
        ACC=_acc(A_BD, W_MD), BLOCK_N=16, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out_N


def rowsum_nonzero(g_J: Tensor, W_JD: Tensor) -> Tensor:
    """(D,): Σ_j g[j] · W[j], reading only the rows with g[j] ≠ 0 (a GEMV over the active rows)."""
    W_JD, g_J = _rows(W_JD), g_J.contiguous()
    n_rows, d = W_JD.shape
    if n_rows == 0 or d == 0:
        return W_JD.new_zeros(d)
    block_d = _pow2(d, 16, 256)
    per_prog = 512  # rows per program: ~2k programs at 65k rows x 4096 wide; partials are 0.1% of W
    n_parts = triton.cdiv(n_rows, per_prog)
    acc_dtype = torch.float64 if W_JD.dtype == torch.float64 else torch.float32
    part_PD = torch.empty(n_parts, d, dtype=acc_dtype, device=W_JD.device)
    _rowsum_nonzero_kernel[(n_parts, triton.cdiv(d, block_d))](
        g_J, W_JD, part_PD, n_rows, d, W_JD.stride(0), per_prog,
        ACC=_acc(W_JD, g_J), BLOCK_J=16, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return part_PD.sum(0).to(W_JD.dtype)
