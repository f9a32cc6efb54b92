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


def _beta(text: str) -> float | None:
    return None if text == "auto" else float(text)


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
    p.add_argument(
        "--threshold-beta", type=_beta, default=0.999,
        help="θ EMA factor; auto: the trainer's default, as `crossdiff diff` trains (1 - 10/steps when less than 0.999)",
    )  # fmt: skip
    p.add_argument("--dec-init-norm", type=float, default=0.1, help="decoder row norm at initialisation")
    p.add_argument(
        "--aux-per-partition", action=argparse.BooleanOptionalAction, default=True,
        help="one AuxK term per DFC partition (--no-aux-per-partition: one joint AuxK, the old objective)",
    )  # fmt: skip
    p.add_argument(
        "--exclusive-dead-tokens", type=int, default=None, help="AuxK dead window of exclusive latents"
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threshold", type=float, default=0.7, help="decoder cosine for a reappearance")
    p.add_argument(
        "--at-checkpoint", action="store_true",
        help="train nothing: measure each seed's latest checkpoint (its final weights once finished), e.g. "
        "while the runs still train in other processes",
    )  # fmt: skip
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
        aux_per_partition=args.aux_per_partition,
        exclusive_dead_tokens=args.exclusive_dead_tokens,
        seed=seed,
        device="cpu",
        checkpoint_every=max(1, args.tokens // args.batch_size // 4),
    )


@torch.no_grad()
def fire_counts(cc: Crosscoder, store: Store, batch_size: int = 1024) -> np.ndarray:
    """(D,) int: how many rows of the whole store each latent fires on (inference encoder)."""
    count_F = torch.zeros(cc.cfg.n_latents, dtype=torch.long)
    for x_a, x_b in store.batches(batch_size, split="all", shuffle=False, epochs=1):
        count_F += (cc.encode(x_a, x_b) > 0).sum(0)
    return count_F.numpy()


PARTS = ("a_exclusive", "shared", "b_exclusive")


def by_partition(cc: Crosscoder, value_F: np.ndarray, reduce) -> dict:
    """reduce(value_F[partition]) for each partition of `cc` (None where a partition is empty)."""
    part = cc.partition
    ranges = dict(zip(PARTS, (part.a_exclusive, part.shared, part.b_exclusive)))
    return {k: (float(reduce(value_F[r.start : r.stop])) if len(r) else None) for k, r in ranges.items()}


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


def checkpoint_seed(args, seed: int, store: Store) -> tuple[dict, Crosscoder]:
    """(the held-out evaluation, the crosscoder) of one seed's latest checkpoint, or of its final weights."""
    from crossdiff.coder.fve import evaluate
    from crossdiff.coder.runlog import latest_checkpoint

    cfg = train_config(args, seed)
    run = Path(cfg.out)
    path = run if (run / "eval.json").is_file() else latest_checkpoint(run)
    if path is None:
        raise SystemExit(f"{run} has no checkpoint yet")
    cc = Crosscoder.from_pretrained(path, device="cpu")
    steps = (
        json.loads((run / "eval.json").read_text())["steps"] if path == run else int(path.name.split("-")[1])
    )
    return {**evaluate(cc, store, cfg, torch.device("cpu")), "steps": steps}, cc


def measure(args) -> dict:
    store = Store.open(args.store)
    seeds, ccs, alive = [], {}, {}
    for s in range(args.seeds):
        ev, cc = checkpoint_seed(args, s, store) if args.at_checkpoint else (train_seed(args, s), None)
        cc = cc or Crosscoder.from_pretrained(train_config(args, s).out, device="cpu")
        counts = fire_counts(cc, store)
        ccs[s], alive[s] = cc, counts > 0
        seeds.append(
            {
                "seed": s,
                "steps": ev.get("steps"),
                "train_seconds": ev.get("train_seconds"),
                "train_cpu_seconds": ev.get("train_cpu_seconds"),
                "fve_a": ev["fve_a"],
                "fve_b": ev["fve_b"],
                "l0": ev["l0"],
                "dead_heldout": ev["dead_fraction"],
                "dead_heldout_by_partition": ev["dead_fraction_by_partition"],
                "dead_store": float(1 - alive[s].mean()),
                "dead_store_by_partition": by_partition(cc, counts == 0, np.mean),
                "median_fires_store_by_partition": by_partition(cc, counts, np.median),
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
        "mean_by_partition": {
            key: {p: _mean_defined(r[key][p] for r in seeds) for p in PARTS}
            for key in ("dead_heldout_by_partition", "dead_store_by_partition")
        },
        "shared_reappearance": reappear,
    }


def _mean_defined(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _parts(d: dict) -> str:
    return " / ".join("–" if d[p] is None else f"{d[p]:.0%}" for p in PARTS)


def _parts_n(d: dict) -> str:
    return " / ".join("–" if d[p] is None else f"{d[p]:.0f}" for p in PARTS)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.train_only is not None:
        train_seed(args, args.train_only)
        return
    result = measure(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "health-checkpoint.json" if args.at_checkpoint else "health.json"
    (Path(args.out) / name).write_text(json.dumps(result, indent=2))
    m, r = result["mean"], result["shared_reappearance"] or {}
    times = [(round(s["train_seconds"] or 0), round(s["train_cpu_seconds"] or 0)) for s in result["seeds"]]
    print(
        f"D={args.latents} k={args.k} tokens={args.tokens:,} ({result['tokens_per_latent']:.0f}/latent, "
        f"{result['epochs']:.1f} epochs) lr={args.lr:g} decay={args.decay_frac} dead_tokens={args.dead_tokens:,}\n"
        f"  FVE A {m['fve_a']:.3f} B {m['fve_b']:.3f}  L0 {m['l0']:.1f}  dead held-out {m['dead_heldout']:.3f}"
        f"  dead store {m['dead_store']:.3f}  shared reappear A {r.get('mean_reappear_a', float('nan')):.3f}"
        f" B {r.get('mean_reappear_b', float('nan')):.3f} (n={r.get('n')})  train (wall s, CPU s) per seed {times}\n"
        + "".join(
            f"  seed {row['seed']} (step {row['steps']}): dead A-excl / shared / B-excl held out {_parts(row['dead_heldout_by_partition'])},"
            f" store {_parts(row['dead_store_by_partition'])}; median store firings"
            f" {_parts_n(row['median_fires_store_by_partition'])}; FVE {row['fve_a']:.3f} / {row['fve_b']:.3f}\n"
            for row in result["seeds"]
        ),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
