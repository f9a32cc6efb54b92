"""How often a finished 2-rank `crossdiff train` under torchrun still fails (a rank dying at exit).

    python bench/ddp_exit.py --runs 40 --load     # with a 2-thread GEMM loop competing for the cores

Each run is the CI test's tiny DDP training (tests/test_distributed.py) on 2 gloo CPU ranks; a run
fails when torchrun's exit status is non-zero. The first stderr of each failure is kept under
--keep. Prints `failures=F/R`. Used to measure the teardown fix in `distributed._destroy`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

LOAD = "import torch\ntorch.set_num_threads(2)\na = torch.randn(2000, 2000)\nwhile True:\n    a @ a\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--load", action="store_true", help="run a competing 2-thread GEMM loop")
    p.add_argument("--keep", default=None, help="folder for failing runs' stderr")
    args = p.parse_args()

    import test_distributed as t  # the CI test's store and command line
    import torch

    from crossdiff.inputs.store import write_synthetic_store

    root = Path(tempfile.mkdtemp(prefix="ddp-exit-"))
    g = torch.Generator().manual_seed(0)
    idx, mag = torch.randint(0, 48, (2048, 3), generator=g), torch.rand(2048, 3, generator=g) + 0.5
    dirs_a, dirs_b = torch.randn(48, t.D_A, generator=g), torch.randn(48, t.D_B, generator=g)
    bag = torch.nn.functional.embedding_bag
    x_a = bag(idx, dirs_a, mode="sum", per_sample_weights=mag) + 1.0
    x_b = bag(idx, dirs_b, mode="sum", per_sample_weights=mag) - 0.5
    store = root / "store"
    write_synthetic_store(store, 10 * x_a, x_b, scale_a=0.02, scale_b=0.2, shard_tokens=512, chunk_len=32)
    load = subprocess.Popen([sys.executable, "-c", LOAD]) if args.load else None
    failures = 0
    try:
        for i in range(args.runs):
            out = root / f"run{i}"
            got = t._torchrun(t._argv(store, out))
            if got.returncode != 0:
                failures += 1
                last = next((ln for ln in got.stderr.splitlines() if "terminate" in ln or "Error" in ln), "")
                print(f"run {i}: exit {got.returncode} {last}", flush=True)
                if args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    Path(args.keep, f"run{i}.stderr").write_text(got.stderr)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if load is not None:
            load.kill()
        shutil.rmtree(root, ignore_errors=True)
    print(f"failures={failures}/{args.runs} load={args.load}")


if __name__ == "__main__":
    main()
