"""Peak memory of `crossdiff analyze` on a 1M-token store of the default widths (576/640), D = 16,384.

Harvesting 1M real tokens takes hours on 2 cores, so the store is synthetic (write_synthetic_store:
sparse planted features plus noise, bf16, ≈2.4 GB) and the crosscoder is a DFC trained for a few steps
(its weights do not change the cost of the analysis, only how many latents fire). Each measured
analysis runs `crossdiff analyze` in its own process; peak RSS is the kernel's accounting of that
child (os.wait4). Memory is bounded by design, so the peak should not grow with the number of tokens.

The store is built in a child process too, and this script never imports torch: Linux carries the
parent's RSS high-water mark into a vfork'ed child's ru_maxrss across exec, so a parent that had
held the 2.4 GB of store tensors would inflate every measurement after it.

    .venv/bin/python bench/analyze_memory.py [--tokens 1000000] [--analyse 100000 1000000] [--dir /tmp/x] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D_A, D_B, LATENTS = 576, 640, 16384


def build_store(path: Path, n_tokens: int, seed: int = 0) -> None:
    """Tokens are sparse sums of planted features (16 of 4096 per token) plus noise, in raw units."""
    import torch

    from crossdiff.inputs.store import write_synthetic_store

    g = torch.Generator().manual_seed(seed)
    n_f, k = 4096, 16
    dirs_a, dirs_b = torch.randn(n_f, D_A, generator=g), torch.randn(n_f, D_B, generator=g)
    dirs_a[3900:], dirs_b[:196] = 0, 0  # a few A-only and B-only features
    x_a = torch.empty(n_tokens, D_A, dtype=torch.bfloat16)
    x_b = torch.empty(n_tokens, D_B, dtype=torch.bfloat16)
    for i in range(0, n_tokens, 65536):
        n = min(65536, n_tokens - i)
        idx = torch.randint(0, n_f, (n, k), generator=g)
        mag = torch.rand(n, k, generator=g) + 0.5
        bag = torch.nn.functional.embedding_bag
        x_a[i : i + n] = bag(idx, dirs_a, mode="sum", per_sample_weights=mag) + 0.1 * torch.randn(
            n, D_A, generator=g
        )
        x_b[i : i + n] = 30 * bag(idx, dirs_b, mode="sum", per_sample_weights=mag)  # another scale
    write_synthetic_store(path, x_a, x_b, scale_a=1 / 4, scale_b=1 / 120, shard_tokens=16384, chunk_len=256)


def run_child(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed; run it by hand: {' '.join(args)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_000_000, help="rows in the synthetic store")
    p.add_argument(
        "--analyse", type=int, nargs="+", default=[100_000, 1_000_000], help="rows analysed per run"
    )
    p.add_argument("--dir", help="work folder (default: a new folder under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the store and run afterwards")
    p.add_argument("--build", help=argparse.SUPPRESS)  # internal: build the store at this path and exit
    args = p.parse_args()
    if args.build:
        return build_store(Path(args.build), args.tokens)
    root = Path(args.dir or tempfile.mkdtemp(prefix="analyze-memory-"))
    store, run = root / "store", root / "run"
    try:
        if not (store / "meta.json").is_file():
            t0 = time.perf_counter()
            run_child([sys.executable, __file__, "--build", str(store), "--tokens", str(args.tokens)])
            print(
                f"store: {args.tokens:,} tokens, {sum(f.stat().st_size for f in (store / 'shards').iterdir()) / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s"
            )
        train = [
            sys.executable,
            "-m",
            "crossdiff",
            "train",
            "--store",
            str(store),
            "--out",
            str(run),
            "--arch",
            "dfc",
        ]
        train += [
            "--latents",
            str(LATENTS),
            "--tokens",
            str(1024 * 32),
            "--batch-size",
            "1024",
            "--heldout-tokens",
            "8192",
        ]
        rss, sec = run_child(train)
        print(f"train (32 steps): peak RSS {rss:.0f} MiB, {sec:.0f} s")
        print(f"{'rows analysed':>14s} {'peak RSS MiB':>13s} {'seconds':>8s} {'rows/s':>8s}")
        for n in args.analyse:
            out = root / f"analysis-{n}"
            cmd = [sys.executable, "-m", "crossdiff", "analyze", "--run", str(run), "--store", str(store)]
            cmd += ["--out", str(out), "--max-tokens", str(n), "--device", "cpu"]
            rss, sec = run_child(cmd)
            summary = json.loads((out / "summary.json").read_text())
            print(
                f"{summary['n_tokens_analysed']:14,d} {rss:13.0f} {sec:8.0f} {summary['n_tokens_analysed'] / sec:8.0f}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
