"""Byte identity of two code versions on one store: a refactor must not change a single output byte.

Harvests a small store of the default pair once (with the `--before` code; or copies `--store`), trains one small DFC per
seed once (the shared checkpoints), then runs, for each code version into its own copy of the seed-0
run: a short `crossdiff train` of its own (`--retrain-tokens`; its crosscoder.safetensors and eval.json
are compared across the versions),
`crossdiff analyze`, `crossdiff verify` (a small --top and --scan-tokens), the seed-stability stage
(`crossdiff diff`'s, on the two seeds) and `crossdiff steer --top 1`. Then compares, byte for byte,
analysis/latents.csv, verification/behaviour.csv, stability.json, steering/verdicts.csv and the
trained weights (eval.json and metrics.jsonl field by field, less their wall times), and the verdict
counts of verification/summary.json. Exit status 0 when every one is identical, 1 otherwise (one line per
file either way).

    python bench/refactor_identity.py --before /path/to/old/checkout --after . --work /tmp/tidy-ident \\
        [--store runs/smollm2-135m-vs-gemma3-270m-small/store]

Each step is skipped when its output exists, so a rerun after a code change repeats only the
per-version steps of the versions whose folders were removed (`--fresh after` removes the after copy).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

COMPARED = (
    "crosscoder.safetensors",
    "eval.json",
    "metrics.jsonl",
    "analysis/latents.csv",
    "verification/behaviour.csv",
    "stability.json",
    "steering/verdicts.csv",
)

_STABILITY = """
import sys
from pathlib import Path
from crossdiff import pipeline
run, other, store = (Path(a) for a in sys.argv[1:4])
pipeline._stability(run, {0: run, 1: other}, store)
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="repository root of the code before the change")
    p.add_argument("--after", required=True, help="repository root of the code after the change")
    p.add_argument("--work", required=True, help="scratch folder (store, checkpoints, one copy per version)")
    p.add_argument("--tokens", type=int, default=30_000, help="aligned pairs harvested")
    p.add_argument(
        "--store", default=None,
        help="an existing store to copy instead of harvesting (e.g. a finished diff's DIR/store)",
    )  # fmt: skip
    p.add_argument("--latents", type=int, default=256)
    p.add_argument(
        "--train-tokens", type=int, default=150_000, help="training tokens of the shared checkpoints"
    )
    p.add_argument(
        "--retrain-tokens", type=int, default=40_000,
        help="training tokens of each version's own run (its bytes compared across versions)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=1, help="verify --top")
    p.add_argument("--scan-tokens", type=int, default=0, help="verify --scan-tokens")
    p.add_argument("--fresh", choices=("none", "after", "both"), default="none")
    p.add_argument(
        "--only", choices=("before", "after"), default=None,
        help="run one version's steps and stop (two processes can run the versions side by side); "
        "a later call without --only compares",
    )  # fmt: skip
    return p.parse_args(argv)


def crossdiff(root: str, *args: str, script: str | None = None) -> None:
    """Run `python -m crossdiff ARGS` (or a script) with `root`'s crossdiff first on the path."""
    env = {**os.environ, "PYTHONPATH": str(Path(root).resolve())}
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "crossdiff", *args]
    print(
        f"$ PYTHONPATH={env['PYTHONPATH']} python {' '.join(cmd[1:] if not script else args)}",
        file=sys.stderr,
    )
    subprocess.run(cmd, env=env, check=True, cwd="/tmp")


def train_args(
    a: argparse.Namespace, store: Path, out: Path, seed: int, tokens: int | None = None
) -> list[str]:
    return [
        "train", "--store", str(store), "--out", str(out), "--arch", "dfc", "--latents", str(a.latents),
        "--k", "16", "--tokens", str(tokens or a.train_tokens), "--batch-size", "512", "--dead-tokens", "20000",
        "--lr", "6e-3", "--seed", str(seed), "--device", "cpu",
    ]  # fmt: skip


def shared(a: argparse.Namespace, work: Path) -> tuple[Path, list[Path]]:
    """The store and the seed checkpoints, made once with the before code."""
    store = work / "store"
    if a.store and not store.exists():
        shutil.copytree(a.store, store)
    if not (store / "meta.json").is_file():
        crossdiff(
            a.before, "harvest", "--out", str(store), "--max-tokens", str(a.tokens),
            "--heldout-frac", "0.1", "--device", "cpu",
        )  # fmt: skip
    seeds = [work / f"seed{s}" for s in (0, 1)]
    for s, run in enumerate(seeds):
        if not (run / "eval.json").is_file():
            crossdiff(a.before, *train_args(a, store, run, s))
    return store, seeds


def per_version(a: argparse.Namespace, root: str, store: Path, seeds: list[Path], out: Path) -> None:
    """Train seed 0 again, then analyse, verify, stability and steer a copy of the shared seed-0 run."""
    retrained = out / "trained"
    if not (retrained / "eval.json").is_file():
        crossdiff(root, *train_args(a, store, retrained, 0, a.retrain_tokens))
    run = out / "run"
    if not run.exists():
        run.mkdir(parents=True)
        for name in ("crosscoder.safetensors", "cfg.json", "eval.json"):
            shutil.copy2(seeds[0] / name, run / name)
    if not (run / "analysis" / "latents.csv").is_file():
        crossdiff(
            root, "analyze", "--run", str(run), "--store", str(store), "--device", "cpu",
            "--splice-tokens", "512", "--shared-features", "4", "--shared-probes", "16",
        )  # fmt: skip
    if not (run / "verification" / "behaviour.csv").is_file():
        crossdiff(
            root, "verify", "--run", str(run), "--store", str(store), "--device", "cpu", "--top", str(a.top),
            "--scan-tokens", str(a.scan_tokens), "--heldout-tokens", "256", "--n-random", "8", "--n-contexts", "6",
        )  # fmt: skip
    if not (run / "stability.json").is_file():
        crossdiff(root, str(run), str(seeds[1]), str(store), script=_STABILITY)
    if not (run / "steering" / "verdicts.csv").is_file():
        crossdiff(
            root, "steer", "--run", str(run), "--top", "1", "--include-rejected", "--device", "cpu",
            "--strengths", "0", "4", "--n-contexts", "4", "--new-tokens", "4", "--n-random", "5",
        )  # fmt: skip


TIMES = ("seconds_this_session", "tokens_per_s")
"""Wall times inside the training records: the only fields that may differ (they measure the machine)."""


def same_bytes(b: Path, c: Path) -> bool:
    """Byte identity; for the training records (eval.json, metrics.jsonl), of every field but TIMES."""
    if b.name not in ("eval.json", "metrics.jsonl"):
        return filecmp.cmp(b, c, shallow=False)
    rows = [
        [json.loads(p.read_text())]
        if p.suffix == ".json"
        else [json.loads(ln) for ln in p.read_text().splitlines() if ln]
        for p in (b, c)
    ]
    strip = [[{k: v for k, v in r.items() if k not in TIMES} for r in rs] for rs in rows]
    return json.dumps(strip[0], sort_keys=True) == json.dumps(strip[1], sort_keys=True)


def counts(run: Path) -> dict:
    return json.loads((run / "verification" / "summary.json").read_text()).get("counts")


def compare(before: Path, after: Path) -> bool:
    same = True
    pairs = [(before / "trained" / n, after / "trained" / n) for n in COMPARED[:3]]
    pairs += [(before / "run" / n, after / "run" / n) for n in COMPARED[3:]]
    for b, c in pairs:
        ok = b.is_file() and c.is_file() and same_bytes(b, c)
        same &= ok
        print(f"{'identical' if ok else 'DIFFERENT'}  {c.relative_to(after)}  ({b.stat().st_size:,} bytes)")
    cb, ca = counts(before / "run"), counts(after / "run")
    same &= cb == ca
    print(f"{'identical' if cb == ca else 'DIFFERENT'}  verdict counts {json.dumps(ca, sort_keys=True)}")
    return same


def main(argv=None) -> int:
    a = parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for v in {"after": ("after",), "both": ("before", "after")}.get(a.fresh, ()):
        shutil.rmtree(work / v, ignore_errors=True)
    store, seeds = shared(a, work)
    for name, root in (("before", a.before), ("after", a.after)):
        if a.only in (None, name):
            per_version(a, root, store, seeds, work / name)
    if a.only:
        return 0
    return 0 if compare(work / "before", work / "after") else 1


if __name__ == "__main__":
    sys.exit(main())
