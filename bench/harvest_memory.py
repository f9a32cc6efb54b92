"""Peak memory of a harvest at several corpus sizes, and store bytes per aligned token.

Each size runs `crossdiff harvest` in its own process; peak RSS comes from the kernel's accounting of
that child (os.wait4). Memory is bounded by design (one batch of activations plus one shard buffer), so
the peak should not grow with the number of tokens.

    .venv/bin/python bench/harvest_memory.py [--tokens 20000 200000] [--keep DIR] [--policy threshold]

`--policy threshold` runs the harvest with the allocator policy it had before crossdiff/core/runtime.py
made one policy per process (every block above 1 MiB mmap-ed and returned to the OS), to compare
peak memory with today's (`keep`, the default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# The old harvest policy, in place of crossdiff.core.runtime.apply_cpu_policy (patched before harvest.py
# imports it): a fixed 1 MiB mmap threshold.
THRESHOLD_POLICY = """
import ctypes, ctypes.util, sys
from crossdiff import cli
from crossdiff.core import runtime
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
runtime.apply_cpu_policy = lambda: bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
sys.exit(cli.main(sys.argv[1:]))
"""


def run(out: Path, tokens: int, policy: str = "keep") -> tuple[float, float, list[float]]:
    """(peak RSS MiB, seconds, RSS sampled at each quarter of the shards written)."""
    launch = ["-m", "crossdiff"] if policy == "keep" else ["-c", THRESHOLD_POLICY]
    args = [
        sys.executable,
        *launch,
        "harvest",
        "--out",
        str(out),
        "--max-tokens",
        str(tokens),
        "--device",
        "cpu",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[int, float]] = []  # (shards written so far, RSS)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaps the child once, with its rusage
        if pid:
            break
        shards = len(list((out / "shards").glob("*.json"))) if (out / "shards").is_dir() else 0
        samples.append((shards, _rss_mib(proc.pid)))
        time.sleep(1.0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"harvest of {tokens} tokens failed; run it by hand: {' '.join(args)}")
    last = max(s for s, _ in samples) or 1
    # Highest RSS seen while the first, second, third and last quarter of the shards were being written.
    quarters = [
        max(
            (r for s, r in samples if q * last / 4 <= s < (q + 1) * last / 4 or (q == 3 and s >= last)),
            default=float("nan"),
        )
        for q in range(4)
    ]
    return usage.ru_maxrss / 1024, time.perf_counter() - start, quarters  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[20000, 200000])
    p.add_argument("--keep", help="write the stores under this folder and keep them")
    p.add_argument(
        "--policy", choices=["keep", "threshold"], default="keep", help="allocator policy (see above)"
    )
    args = p.parse_args()
    root = Path(args.keep or tempfile.mkdtemp())
    print(
        f"{'tokens':>8s} {'peak RSS MiB':>13s} {'RSS by quarter of the run (MiB)':>32s} {'seconds':>8s} {'store bytes/token':>18s} {'activations only':>17s}"
    )
    for tokens in args.tokens:
        out = root / f"brown-{tokens}"
        rss, seconds, quarters = run(out, tokens, args.policy)
        meta = json.loads((out / "meta.json").read_text())
        shards = sum(f.stat().st_size for f in (out / "shards").iterdir())
        acts = 2 * (meta["models"]["a"]["d_model"] + meta["models"]["b"]["d_model"])
        q = " ".join(f"{r:7.0f}" for r in quarters)
        print(f"{tokens:8d} {rss:13.0f} {q:>32s} {seconds:8.0f} {shards / meta['n_tokens']:18.1f} {acts:17d}")


if __name__ == "__main__":
    main()
