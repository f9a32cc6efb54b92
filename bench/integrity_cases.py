"""The cases of docs/integrity.md's before/after table, run against one crossdiff source tree.

    python bench/integrity_cases.py --tree /path/to/crossdiff/checkout --work /tmp/cases [--real]
    python bench/integrity_cases.py --cost RUN/analysis RUN/report ...   # what hashing a folder costs

Each case runs real `python -m crossdiff` processes with PYTHONPATH=TREE (the tree under test; run it
once on the commit before and once after) and prints one markdown row: the case, the exit code(s), the
last line printed (stderr, else stdout), and what the case leaves behind. Two processes "started
together" are started in the same instant without waiting for each other. Synthetic stores and a tiny
trained DFC stand in for the real pair; with --real the cases that need the default models run too
(harvest and generate races, --layer-a 99, a moved --prompts folder), minutes each on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TRAIN = ["--latents", "256", "--k", "4", "--exclusive-frac", "0.25", "--tokens", str(64 * 300), "--batch-size", "64", "--dead-tokens", "256",
         "--heldout-tokens", "512", "--checkpoint-every", "100", "--log-every", "10"]  # fmt: skip
MAKE_STORE = """
import sys, torch
from crossdiff.inputs.store import write_synthetic_store
g = torch.Generator().manual_seed(int(sys.argv[2]))
write_synthetic_store(sys.argv[1], torch.randn(3000, 12, generator=g), torch.randn(3000, 10, generator=g),
                      shard_tokens=1000, chunk_len=32, scale_b=float(sys.argv[3]))
"""


class Runner:
    def __init__(self, tree: Path, work: Path):
        self.tree, self.work = tree, work
        self.env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "crossdiff", *map(str, args)]

    def run(self, *args: str) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        r = subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True, cwd=self.work)
        return r.returncode, _last(r.stderr or r.stdout), time.perf_counter() - t0

    def together(self, *args: str) -> list[tuple[int, str]]:
        procs = [
            subprocess.Popen(
                self.argv(*args),
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=self.work,
            )  # fmt: skip
            for _ in "ab"
        ]
        outs = [p.communicate() for p in procs]
        return [(p.returncode, _last(err) or _last(out)) for p, (out, err) in zip(procs, outs)]

    def python(self, code: str, *args: str) -> None:
        subprocess.run([sys.executable, "-c", code, *args], env=self.env, check=True, cwd=self.work)


def _last(text: str) -> str:
    lines = [x for x in text.replace("\r", "\n").splitlines() if x.strip() and "█" not in x and "%|" not in x]
    return lines[-1][:300] if lines else ""


def _line(results: list[tuple[int, str]]) -> str:
    """The line of a race worth showing: the refused one's, else the last process's."""
    refused = [x for c, x in results if c != 0 and x]
    return refused[0] if refused else next((x for _, x in reversed(results) if x), "")


def _left(*paths: Path) -> str:
    found = []
    for p in paths:
        if p.is_dir():
            names = sorted(x.name for x in p.iterdir())
            found.append(f"{p.name}/: {', '.join(names) if names else '(empty)'}")
        elif p.exists():
            found.append(p.name)
    return "; ".join(found) or "nothing"


def row(case: str, codes, line: str, left: str) -> None:
    codes = " / ".join(map(str, codes)) if isinstance(codes, (list, tuple)) else str(codes)
    print(f"| {case} | {codes} | `{line.replace('|', '/')}` | {left} |", flush=True)


def synthetic_cases(r: Runner) -> None:
    w = r.work
    r.python(MAKE_STORE, str(w / "store"), "0", "1.0")
    r.python(MAKE_STORE, str(w / "other"), "1", "0.5")  # same models and widths, another scale
    res = r.together("train", "--store", "store", "--out", "race", *TRAIN)
    steps = [json.loads(x)["step"] for x in (w / "race" / "metrics.jsonl").read_text().splitlines()]
    row("two `train` on one --out, started together", [c for c, _ in res], _line(res),
        f"metrics.jsonl: {len(steps)} lines for {len(set(steps))} steps")  # fmt: skip
    r.run("train", "--store", "store", "--out", "run", *TRAIN)
    r.run("analyze", "--run", "run", "--batch-size", "256")
    latents = w / "run" / "analysis" / "latents.csv"
    good = latents.read_bytes()
    rc, line, _ = r.run("report", "--run", "run")
    row("`report` on an intact run (reference)", rc, line, "run/report/")
    latents.write_bytes(good[: int(len(good) * 0.6)])
    rc, line, _ = r.run("report", "--run", "run")
    row("`report` on latents.csv cut at 60%", rc, line, "")
    rc, line, _ = r.run("check", "run")
    row("`check RUN` on latents.csv cut at 60%", rc, line, "")
    lines = good.decode().splitlines(keepends=True)
    latents.write_text("".join(lines[:5] + lines[6:]))
    rc, line, _ = r.run("report", "--run", "run")
    row("`report` on latents.csv with one row deleted", rc, line, "")
    latents.write_bytes(good)
    (w / "afile").write_text("x")
    rc, line, _ = r.run("generate", "--out", "afile/x.jsonl", "--limit", "1")
    row("`generate --out afile/x.jsonl` (afile is a file)", rc, line, _left(w / "afile"))
    rc, line, _ = r.run("train", "--store", "store", "--out", "lrinf", "--lr", "inf", *TRAIN)
    row("`train --lr inf`", rc, line, _left(w / "lrinf"))
    rc, line, _ = r.run("train", "--store", "store", "--out", "bs1", "--batch-size", "1", "--tokens", "400",
                        "--latents", "64", "--k", "4", "--log-every", "20")  # fmt: skip
    fve = [json.loads(x)["fve_a"] for x in (w / "bs1" / "metrics.jsonl").read_text().splitlines()]
    ev = json.loads((w / "bs1" / "eval.json").read_text())["fve_a"]
    row(
        "`train --batch-size 1`: metrics.jsonl FVE",
        rc,
        f"min fve_a logged {min(fve):.3g}, eval.json {ev:.3g}",
        "",
    )
    shutil.copytree(w / "run", w / "moved" / "run")
    shutil.copytree(w / "store", w / "moved" / "store2")
    summary = w / "moved" / "run" / "analysis" / "summary.json"
    s = json.loads(summary.read_text())
    s["store"]["path"] = "store2"  # recorded relative to the folder it was analysed from
    summary.write_text(json.dumps(s))
    (w / "moved" / "run" / "analysis" / "manifest.json").unlink(missing_ok=True)
    rc, line, _ = r.run("verify", "--run", "moved/run")
    row("`verify` on a moved run without --store", rc, line, "")
    rc, line, _ = r.run("analyze", "--run", "run", "--store", "other", "--out", "an-other")
    row("`analyze` with a store of another corpus", rc, line, _left(w / "an-other"))
    shutil.copytree(w / "store", w / "damaged")
    (w / "damaged" / "shards" / "00001.safetensors").unlink()
    rc, line, _ = r.run("train", "--store", "damaged", "--out", "on-damaged", *TRAIN)
    row("`train` on a damaged store (shard missing)", rc, line, _left(w / "on-damaged"))


def harvested_store_cases(r: Runner, store: Path) -> None:
    """A real store left without settings.json and tokenizers/ (as the harvest race left it)."""
    w = r.work
    bare = w / "bare"
    shutil.copytree(store, bare)
    shutil.rmtree(bare / "tokenizers")
    (bare / "settings.json").unlink()
    rc, line, _ = r.run("check", "bare")
    row("`check` on a harvested store without settings.json and tokenizers/", rc, line, "")
    rc, line, _ = r.run("train", "--store", "bare", "--out", "on-bare", *TRAIN)
    row("`train` on that store", rc, line, _left(w / "on-bare"))


H = [
    "--max-tokens",
    "1200",
    "--context-len",
    "128",
    "--batch-size",
    "4",
    "--shard-tokens",
    "300",
    "--device",
    "cpu",
]


def _real_corpus(w: Path) -> None:
    words = "the jury said election county city of in was and to a for that is on with as by".split()
    text = "\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(120)) + "." for i in range(12))
    (w / "c.txt").write_text(text)


def harvest_race(r: Runner) -> None:
    w = r.work
    res = r.together("harvest", "--out", "hs", "--corpus", "c.txt", *H)
    row("two `harvest` on one --out, started together", [c for c, _ in res], _line(res), _left(w / "hs"))
    rc, line, _ = r.run("check", "hs")
    row("then `check` on that store", rc, line, "")
    if (w / "hs" / "meta.json").is_file():
        harvested_store_cases(r, w / "hs")


def layer_99(r: Runner) -> None:
    rc, line, secs = r.run("harvest", "--out", "l99", "--corpus", "c.txt", "--layer-a", "99", *H)
    row(f"`harvest --layer-a 99` ({secs:.0f} s to fail)", rc, line, _left(r.work / "l99"))


def generate_race(r: Runner) -> None:
    w = r.work
    prompts = w / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Name a city that starts with {c}."}) + "\n" for c in "ABCD")
    )
    g = ["--prompts", "p.jsonl", "--model", "smollm2-135m", "--max-new-tokens", "2", "--device", "cpu"]
    res = r.together("generate", "--out", "g.jsonl", *g)
    n = len((w / "g.jsonl").read_text().splitlines())
    row("two `generate` on one --out, started together", [c for c, _ in res], _line(res),
        f"g.jsonl: {n} answers to 4 prompts")  # fmt: skip


def prompts_moved(r: Runner) -> None:
    w = r.work
    (w / "D" / "answers").mkdir(parents=True)
    (w / "D" / "answers" / "a.jsonl").write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
        )
        + "\n"
    )
    r.run("harvest", "--out", "D/store", "--corpus", "chat:D/answers/a.jsonl", *H)
    shutil.move(w / "D", w / "D2")
    rc, line, _ = r.run("harvest", "--out", "D2/store", "--corpus", "chat:D2/answers/a.jsonl", *H)
    row("a --prompts store's folder moved, harvest rerun", rc, line, "")


REAL = {"harvest": harvest_race, "layer": layer_99, "generate": generate_race, "prompts": prompts_moved}


def cost(folder: Path) -> None:
    """What recording and checking a stage folder costs: manifest.file_record over its files (what a
    command's completion hashes and `crossdiff check` re-reads), cold then warm page cache."""
    from crossdiff.core.manifest import file_record

    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    for label in ("first read", "again"):
        t0, c0 = time.perf_counter(), time.process_time()
        for p in files:
            file_record(p)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"{folder}: {len(files)} files, {size / 1e6:.1f} MB, {label}: {secs:.3f} s wall, {cpu:.3f} s CPU "
            f"({size / 1e6 / max(cpu, 1e-9):.0f} MB per CPU second)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cost", nargs="+", help="only time hashing these folders (run with this tree's crossdiff)"
    )
    parser.add_argument("--tree", help="crossdiff source tree to run (PYTHONPATH)")
    parser.add_argument("--work", help="empty scratch folder")
    parser.add_argument("--real", action="store_true", help="also the cases that load the default pair")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(REAL), help="only these cases with the default pair"
    )
    args = parser.parse_args()
    if args.cost:
        for folder in args.cost:
            cost(Path(folder))
        return
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(Path(args.tree).resolve(), work)
    print("| case | exit | last line | left behind |\n|---|---|---|---|", flush=True)
    if args.only:
        _real_corpus(work)
        for name in args.only:
            REAL[name](r)
        return
    synthetic_cases(r)
    if args.real:
        _real_corpus(work)
        for case in REAL.values():
            case(r)


if __name__ == "__main__":
    main()
