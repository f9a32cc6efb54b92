"""Micro-measurements behind the sparse training path's kernel choices (docs/training.md).

    python bench/kernels.py                 # 1 thread, the CPU benchmark's shapes
    python bench/kernels.py --threads 2

Each row times one operation of a sparse step at the shapes of `bench/train_speed.py` (B = 1024
tokens, D = 16,384 latents, d = 576, N = k·B = 32,768 active entries drawn with power-law latent
frequencies) next to the alternative it replaced or the memory pass that bounds it. Before every
call a 400 MB buffer is rewritten so the operands come from DRAM, as they do inside a training
step, where each step touches ~1.5 GB. Rounds alternate over all rows; the median is printed.

Legend: B tokens, M latents, D one model's width, N active entries.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from crossdiff.coder import sparse  # noqa: E402
from crossdiff.core.runtime import apply_cpu_policy  # noqa: E402


def entries(n_tokens: int, n_latents: int, n_entries: int, seed: int = 0):
    """Row-major (rows, cols) with power-law latent frequencies, like a trained BatchTopK batch."""
    g = torch.Generator().manual_seed(seed)
    freq = (torch.arange(n_latents) + 20.0).pow(-1.0)[torch.randperm(n_latents, generator=g)]
    cols = torch.multinomial(freq, n_entries, replacement=True, generator=g)
    rows = torch.randint(0, n_tokens, (n_entries,), generator=g)
    order = (rows * n_latents + cols).argsort()
    return rows[order], cols[order], torch.randn(n_entries, generator=g)


def cases(B: int, M: int, D: int, N: int) -> dict:
    rows, cols, w = entries(B, M, N)
    dense_BD, W_MD = torch.randn(B, D), torch.randn(M, D)
    by_latent = cols.argsort(stable=True)
    sorted_N, rows_l, w_l = cols[by_latent], rows[by_latent], w[by_latent]
    offsets_M = torch.searchsorted(sorted_N, torch.arange(M))
    offsets_M1 = torch.cat([offsets_M, torch.tensor([N])])
    xw_BM = torch.randn(B, M)
    thr_M = torch.full((M,), 2.7)  # ~0.35% of N(0, 1) values: like a guessed BatchTopK cutoff
    xw_np, thr_np = xw_BM.numpy(), thr_M.numpy()
    params = [torch.nn.Parameter(torch.randn(M, d)) for d in (D, D + 64, D, D + 64)]
    for p in params:
        p.grad = torch.randn_like(p)
    fused = torch.optim.Adam(params, lr=1e-3, fused=True)
    foreach = torch.optim.Adam(params, lr=1e-3, foreach=True)
    pattern = torch.sparse_csr_tensor(
        torch.searchsorted(rows, torch.arange(B + 1)), cols, torch.zeros(N), (B, M), check_invariants=False
    )
    x_BD, W_enc_MD = torch.randn(B, D), torch.randn(M, D)
    x_bf, W_bf = x_BD.bfloat16(), W_enc_MD.bfloat16()
    return {
        "encoder GEMM (B, D) @ (D, M), fp32 (used)": lambda: x_BD @ W_enc_MD.T,
        "encoder GEMM (B, D) @ (D, M), bf16": lambda: x_bf @ W_bf.T,
        "sparseT@dense: embedding_bag, offsets without the last": lambda: F.embedding_bag(
            rows_l, dense_BD, offsets_M, mode="sum", per_sample_weights=w_l
        ),
        "sparseT@dense: embedding_bag, include_last_offset (used)": lambda: F.embedding_bag(
            rows_l, dense_BD, offsets_M1, mode="sum", per_sample_weights=w_l, include_last_offset=True
        ),
        "sparseT@dense: CSR @ dense": lambda: (
            torch.sparse_csr_tensor(offsets_M1, rows_l, w_l, (M, B), check_invariants=False) @ dense_BD
        ),
        "bag offsets: searchsorted over M latents": lambda: torch.searchsorted(sorted_N, torch.arange(M + 1)),
        "bag offsets: bincount + cumsum (used)": lambda: sparse._bag_offsets(sorted_N, M),
        "SDDMM: sampled_addmm (used)": lambda: torch.sparse.sampled_addmm(
            pattern, dense_BD, W_MD.T, beta=0.0
        ),
        "SDDMM: gather + multiply": lambda: (dense_BD[rows] * W_MD[cols]).sum(-1),
        "candidates: numpy compare + flatnonzero (used)": lambda: sparse._above(xw_BM, thr_M),
        "candidates: torch gt + nonzero": lambda: (xw_BM > thr_M).nonzero(as_tuple=True),
        "candidates: numpy compare only (no index list)": lambda: [
            np.greater(xw_np[s : s + 32], thr_np) for s in range(0, B, 32)
        ],
        "BatchTopK: full topk over B x M": lambda: xw_BM.view(-1).topk(32 * B, sorted=False),
        "floor: write (M, D) zeros": lambda: torch.zeros(M, D),
        "floor: read (M, D) (vector_norm)": lambda: torch.linalg.vector_norm(W_MD),
        "decoder norms: (M, D) row norms": lambda: W_MD.norm(dim=1),
        "Adam, 4 x (M, ~D) params: fused (used)": fused.step,
        "Adam, 4 x (M, ~D) params: foreach": foreach.step,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--latents", type=int, default=16384)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--evict-mb", type=int, default=400, help="buffer rewritten before each call")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    apply_cpu_policy()
    import warnings

    warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
    fns = cases(args.batch_size, args.latents, args.d, args.k * args.batch_size)
    evict = torch.ones(args.evict_mb * (1 << 18))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(args.rounds + 1):
        for name, fn in fns.items():
            evict.add_(1.0)
            t0 = time.perf_counter()
            fn()
            if rnd:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    print(
        f"threads={args.threads} B={args.batch_size} M={args.latents} D={args.d} "
        f"N={args.k * args.batch_size} rounds={args.rounds} (median ms, operands from DRAM)"
    )
    gemm_flop = 2 * args.batch_size * args.latents * args.d
    for name, ts in times.items():
        rate = f"  ({gemm_flop / statistics.median(ts) / 1e9:.0f} GFLOP/s)" if "GEMM" in name else ""
        print(f"{statistics.median(ts) * 1e3:9.2f}  {name}{rate}")


if __name__ == "__main__":
    main()
