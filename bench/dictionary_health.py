"""Dictionary health of one training budget: dead latents, FVE, L0 and seed stability of shared latents.

Trains `--seeds` DFCs (seeds 0 … N−1) with the given settings on one store, as `crossdiff diff`
trains its seeds, then reports per seed the held-out evaluation (eval.json: FVE, L0, dead fraction
on the held-out split), the dead fraction over the whole store (the analysis's definition: never
fires on any row), and, as the seed-stability stage does, how often an alive shared latent of seed 0
reappears (decoder cosine >= 0.7 in the same model) in the other seeds
(`stability.shared_reappearance`, all alive shared latents rather than a sample of 512).
Runs resume (the trainer's checkpoints); finished seeds are reused. docs/diff.md has the grid.

    python bench/dictionary_health.py --store STORE --out /tmp/health/d2048 --latents 2048 --k 32 \\
        --tokens 1200000 --seeds 3 --dead-tokens 100000 --lr 1e-3 --decay-frac 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from crossdiff.analysis.stability import shared_reappearance
from crossdiff.coder.crosscoder import Crosscoder
from crossdiff.coder.sparsity import arch_settings
from crossdiff.coder.train import TrainConfig, train
from crossdiff.inputs.store import Store


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="one run folder per seed is made inside")
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=400_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dead-tokens", type=int, default=100_000)
    p.add_argument("--decay-frac", type=float, default=0.2)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--threshold-beta", type=float, default=0.999)
    p.add_argument("--dec-init-norm", type=float, default=0.1, help="decoder row norm at initialisation")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.7, help="decoder cosine for a reappearance")
    p.add_argument(
        "--train-only", type=int, default=None, metavar="SEED",
        help="train this one seed and exit (to run seeds in parallel processes; then rerun without it)",
    )  # fmt: skip
    return p.parse_args(argv)


def train_config(args, seed: int) -> TrainConfig:
    return TrainConfig(
        store=args.store,
        out=str(Path(args.out) / f"seed{seed}"),
        **arch_settings("dfc"),
        latents=args.latents,
        k=args.k,
        tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        dead_tokens=args.dead_tokens,
        decay_frac=args.decay_frac,
        warmup_steps=args.warmup_steps,
        threshold_beta=args.threshold_beta,
        dec_init_norm=args.dec_init_norm,
        seed=seed,
        device="cpu",
        checkpoint_every=max(1, args.tokens // args.batch_size // 4),
    )


@torch.no_grad()
def fired_anywhere(cc: Crosscoder, store: Store, batch_size: int = 1024) -> np.ndarray:
    """(D,) bool: the latent fires (inference encoder) on at least one row of the whole store."""
    fired_F = torch.zeros(cc.cfg.n_latents, dtype=torch.bool)
    for x_a, x_b in store.batches(batch_size, split="all", shuffle=False, epochs=1):
        fired_F |= (cc.encode(x_a, x_b) > 0).any(0)
    return fired_F.numpy()


def train_seed(args, seed: int) -> dict:
    """Train (or reuse) one seed; its time is kept in RUN/timing.json (written when it trains)."""
    cfg = train_config(args, seed)
    timing = Path(cfg.out) / "timing.json"
    fresh = not (Path(cfg.out) / "eval.json").is_file()
    t0, c0 = time.perf_counter(), time.process_time()
    ev = train(cfg)
    if fresh:  # CPU seconds (all threads) stand in for the quiet-machine time on a shared machine
        seconds = {"train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - c0}
        timing.write_text(json.dumps(seconds))
    return {**ev, **(json.loads(timing.read_text()) if timing.is_file() else {})}


def measure(args) -> dict:
    store = Store.open(args.store)
    seeds, ccs, alive = [], {}, {}
    for s in range(args.seeds):
        ev = train_seed(args, s)
        cc = Crosscoder.from_pretrained(train_config(args, s).out, device="cpu")
        ccs[s], alive[s] = cc, fired_anywhere(cc, store)
        seeds.append(
            {
                "seed": s,
                "train_seconds": ev.get("train_seconds"),
                "train_cpu_seconds": ev.get("train_cpu_seconds"),
                "fve_a": ev["fve_a"],
                "fve_b": ev["fve_b"],
                "l0": ev["l0"],
                "dead_heldout": ev["dead_fraction"],
                "dead_heldout_by_partition": ev["dead_fraction_by_partition"],
                "dead_store": float(1 - alive[s].mean()),
            }
        )
    reappear = None
    if args.seeds > 1:
        others = {s: cc for s, cc in ccs.items() if s != 0}
        reappear = shared_reappearance(ccs[0], others, threshold=args.threshold, n=10**9, alive=alive[0])
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("store", "out")},
        "store_rows": store.n_tokens,
        "train_rows": store.split_size("train"),
        "tokens_per_latent": args.tokens / args.latents,
        "epochs": args.tokens / store.split_size("train"),
        "seeds": seeds,
        "mean": {
            key: float(np.mean([r[key] for r in seeds]))
            for key in ("fve_a", "fve_b", "l0", "dead_heldout", "dead_store")
        },
        "shared_reappearance": reappear,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.train_only is not None:
        train_seed(args, args.train_only)
        return
    result = measure(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "health.json").write_text(json.dumps(result, indent=2))
    m, r = result["mean"], result["shared_reappearance"] or {}
    times = [(round(s["train_seconds"] or 0), round(s["train_cpu_seconds"] or 0)) for s in result["seeds"]]
    print(
        f"D={args.latents} k={args.k} tokens={args.tokens:,} ({result['tokens_per_latent']:.0f}/latent, "
        f"{result['epochs']:.1f} epochs) lr={args.lr:g} decay={args.decay_frac} dead_tokens={args.dead_tokens:,}\n"
        f"  FVE A {m['fve_a']:.3f} B {m['fve_b']:.3f}  L0 {m['l0']:.1f}  dead held-out {m['dead_heldout']:.3f}"
        f"  dead store {m['dead_store']:.3f}  shared reappear A {r.get('mean_reappear_a', float('nan')):.3f}"
        f" B {r.get('mean_reappear_b', float('nan')):.3f} (n={r.get('n')})  train (wall s, CPU s) per seed {times}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
