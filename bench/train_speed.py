"""Training speed of the sparse path vs the dense reference, in one process, on synthetic data.

    python bench/train_speed.py                                   # CPU: d=576/640, D=16384, k=32, B=1024
    python bench/train_speed.py --device cuda --d-a 4096 --d-b 4096 --latents 65536 --batch-size 4096
    python bench/train_speed.py --threads 1 --clock cpu           # on a shared machine: CPU time per step
    python bench/train_speed.py --contention 2                    # slowdown beside 2 busy processes

`--contention N` times the trainer's default (sparse) step with N competing busy processes (one
Python busy loop each) against the same step with them paused (SIGSTOP), alternating rounds in one
run, and prints `slowdown=X.XX` (contended / quiet wall time per step). With one busy process per
core, the fair share of the CPU is half, so 2.00 is the ideal.

Both modes run the trainer's own `train_step` (forward, backward, grad clip, fused Adam, dead-latent
counters, threshold EMA) on the same planted-feature batches, alternating rounds so that background
load hits both alike. Prints a table; the last line is `speedup=X.XX` (sparse / dense tokens/s).

`--write-store DIR --tokens N` instead writes a synthetic store of planted features (shared,
A-only and B-only directions, as in docs/design.md §5's planted controls) for quality runs of `crossdiff train`.

Legend: N tokens, F planted features, D one model's width.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from crossdiff.core import runtime  # noqa: E402

runtime.before_torch()  # the process-wide OpenMP settings of `crossdiff`, before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from crossdiff.coder.crosscoder import Crosscoder  # noqa: E402
from crossdiff.coder.sparsity import arch_settings  # noqa: E402
from crossdiff.coder.train import TrainConfig, _new_state, train_step  # noqa: E402
from crossdiff.core.runtime import apply_cpu_policy  # noqa: E402


def planted_pairs(
    n_tokens: int,
    d_a: int,
    d_b: int,
    *,
    n_features: int = 8192,
    exclusive_frac: float = 0.05,
    k_true: int = 24,
    noise: float = 0.05,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (x_A, x_B) built from sparse planted features laid out [A-only | shared | B-only].

    Feature frequencies follow a power law, magnitudes are exponential, and each model gets its own
    random direction per feature plus a mean offset, noise and an arbitrary raw scale (A ×7, B ×0.3)
    so that normalisation matters.
    """
    g = torch.Generator().manual_seed(seed)
    n_ex = round(n_features * exclusive_frac)
    n_sh = n_features - 2 * n_ex

    def directions(n_rows, d, zeros_before, zeros_after):
        dirs = torch.randn(n_rows, d, generator=g)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
        return torch.cat([torch.zeros(zeros_before, d), dirs, torch.zeros(zeros_after, d)])

    dirs_a_FD = directions(n_ex + n_sh, d_a, 0, n_ex)
    dirs_b_FD = directions(n_sh + n_ex, d_b, n_ex, 0)
    freq_F = (torch.arange(n_features) + 50.0).pow(-0.8)[torch.randperm(n_features, generator=g)]
    mean_a, mean_b = torch.randn(d_a, generator=g) * 0.3, torch.randn(d_b, generator=g) * 0.3
    out_a, out_b = [], []
    for start in range(0, n_tokens, 65536):
        n = min(65536, n_tokens - start)
        idx_NK = torch.multinomial(freq_F, n * k_true, replacement=True, generator=g).view(n, k_true)
        mag_NK = torch.empty(n, k_true).exponential_(1.0, generator=g) + 0.1
        x_a = F.embedding_bag(idx_NK, dirs_a_FD, mode="sum", per_sample_weights=mag_NK) + mean_a
        x_b = F.embedding_bag(idx_NK, dirs_b_FD, mode="sum", per_sample_weights=mag_NK) + mean_b
        x_a += noise * torch.randn(n, d_a, generator=g)
        x_b += noise * torch.randn(n, d_b, generator=g)
        out_a.append(x_a * 7.0)
        out_b.append(x_b * 0.3)
    return torch.cat(out_a), torch.cat(out_b)


def write_store(path: str, n_tokens: int, d_a: int, d_b: int, seed: int) -> None:
    from crossdiff.inputs.store import write_synthetic_store

    x_a, x_b = planted_pairs(n_tokens, d_a, d_b, seed=seed)
    scale_a = (d_a / x_a.pow(2).sum(1).mean()).sqrt().item()  # E||x·s||² = d (docs/design.md §4)
    scale_b = (d_b / x_b.pow(2).sum(1).mean()).sqrt().item()
    write_synthetic_store(path, x_a, x_b, scale_a=scale_a, scale_b=scale_b, shard_tokens=32768)
    print(f"wrote {n_tokens} tokens to {path} (scale_a={scale_a:.4g}, scale_b={scale_b:.4g})")


def _setup(args, modes: dict):
    """Normalised synthetic batches and one (TrainConfig, TrainState) per mode, same init."""
    device = torch.device(args.device)
    if device.type == "cpu" and args.tune_allocator:
        apply_cpu_policy()  # as `crossdiff train` does; applies to both modes alike
    x_a, x_b = planted_pairs(args.batch_size * args.n_batches, args.d_a, args.d_b)
    scale_a = (args.d_a / x_a.pow(2).sum(1).mean()).sqrt()
    scale_b = (args.d_b / x_b.pow(2).sum(1).mean()).sqrt()
    batches = [
        (a.to(device) * scale_a, b.to(device) * scale_b)
        for a, b in zip(x_a.split(args.batch_size), x_b.split(args.batch_size), strict=True)
    ]
    states = {}
    for mode, kw in modes.items():
        cfg = TrainConfig(
            store="-",
            out="-",
            **arch_settings(args.arch),
            latents=args.latents,
            k=args.k,
            batch_size=args.batch_size,
            tokens=10**12,
            warmup_steps=0,
            autocast=args.bf16,
            **kw,
        )

        class _Store:  # what crosscoder_config reads from a store
            d_a, d_b, scale_a, scale_b = args.d_a, args.d_b, 1.0, 1.0
            model_a, model_b = {"id": "synthetic-a", "layer": 0}, {"id": "synthetic-b", "layer": 0}

        model = Crosscoder(cfg.crosscoder_config(_Store), generator=torch.Generator().manual_seed(0))
        states[mode] = (cfg, _new_state(model, device))
    return batches, states


def bench(args) -> None:
    modes = {"dense reference": dict(sparse_kernels=False), "sparse": dict(sparse_kernels=True)}
    batches, states = _setup(args, modes)
    device, times = torch.device(args.device), {m: [] for m in modes}
    step = 0
    # --clock cpu: this process's CPU time, which leaves out the time other jobs hold the core
    # (meaningful with --threads 1 on CPU; with more threads it sums over them).
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for rnd in range(args.warmup_rounds + args.rounds):
        for mode, (cfg, st) in states.items():
            _sync(device)
            t0 = clock()
            for _ in range(args.steps):
                train_step(st, *batches[step % len(batches)], cfg)
                step += 1
            _sync(device)
            if rnd >= args.warmup_rounds:
                times[mode].append((clock() - t0) / args.steps)
    _report(args, times)


def contention(args) -> None:
    """Wall time per sparse step with N busy processes running vs paused, alternating rounds."""
    batches, states = _setup(args, {"sparse": dict(sparse_kernels=True)})
    cfg, st = states["sparse"]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contention)]
    times, step = {"quiet": [], "contended": []}, 0
    try:
        for rnd in range(args.warmup_rounds + args.rounds):
            for mode in ("quiet", "contended"):
                sig = signal.SIGCONT if mode == "contended" else signal.SIGSTOP
                for p in busy:
                    p.send_signal(sig)
                time.sleep(0.2)  # let the scheduler see the change
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    train_step(st, *batches[step % len(batches)], cfg)
                    step += 1
                if rnd >= args.warmup_rounds:
                    times[mode].append((time.perf_counter() - t0) / args.steps)
    finally:
        for p in busy:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
    print(
        f"contention={args.contention} busy processes on {os.cpu_count()} cores, threads={torch.get_num_threads()} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} d_a={args.d_a} d_b={args.d_b} D={args.latents} "
        f"k={args.k} batch={args.batch_size} arch={args.arch} rounds={args.rounds}x{args.steps} steps"
    )
    print(f"{'':<12}{'ms/step (median)':>18}{'min':>10}{'tokens/s':>12}")
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"{mode:<12}{med * 1e3:>18.1f}{min(ts) * 1e3:>10.1f}{args.batch_size / med:>12.0f}")
    print(f"slowdown={statistics.median(times['contended']) / statistics.median(times['quiet']):.2f}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _report(args, times: dict) -> None:
    print(
        f"device={args.device} threads={torch.get_num_threads()} tuned_allocator={args.tune_allocator} d_a={args.d_a} d_b={args.d_b} D={args.latents} "
        f"k={args.k} batch={args.batch_size} arch={args.arch} bf16={args.bf16 and args.device != 'cpu'} "
        f"rounds={args.rounds}x{args.steps} steps clock={args.clock}"
    )
    print(f"{'mode':<18}{'ms/step (median)':>18}{'min':>10}{'tokens/s':>12}")
    tps = {}
    for mode, ts in times.items():
        med = statistics.median(ts)
        tps[mode] = args.batch_size / med
        print(f"{mode:<18}{med * 1e3:>18.1f}{min(ts) * 1e3:>10.1f}{tps[mode]:>12.0f}")
    print(f"speedup={tps['sparse'] / tps['dense reference']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-a", type=int, default=576)
    p.add_argument("--d-b", type=int, default=640)
    p.add_argument("--latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--arch", default="batchtopk", choices=["batchtopk", "topk", "dfc"])
    p.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA"
    )
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per mode (alternating)")
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--n-batches", type=int, default=4, help="distinct synthetic batches cycled through")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: crossdiff's, the available cores)",
    )
    p.add_argument(
        "--tune-allocator",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep freed memory in the heap, as `crossdiff train` does on CPU",
    )
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (robust to other jobs with --threads 1)",
    )
    p.add_argument(
        "--contention",
        type=int,
        default=0,
        metavar="N",
        help="time the sparse step beside N busy processes vs without them; prints slowdown=",
    )
    p.add_argument("--write-store", metavar="DIR", help="write a synthetic planted-feature store instead")
    p.add_argument("--tokens", type=int, default=262144, help="tokens for --write-store")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.write_store:
        write_store(args.write_store, args.tokens, args.d_a, args.d_b, args.seed)
    elif args.contention:
        contention(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
