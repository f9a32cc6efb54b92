"""One writer per output (crossdiff.core.lock): real processes started together on one output, kill -9 with
the lock held then a rerun, re-entrancy, and every writing command taking its lock before it writes.

The fast tests use the trainer on a synthetic store and a holder process that only holds a lock; the
ones that load the real default pair (harvest, generate, the diff) are marked slow where they take
minutes. Timings: docs/integrity.md.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crossdiff.core.errors import CrossdiffError
from crossdiff.core.lock import lock_path, output_lock, writer_of
from crossdiff.inputs.store import write_synthetic_store

REPO = Path(__file__).resolve().parents[1]
BUSY = "is being written by another crossdiff process (PID "


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _holder(path: Path) -> subprocess.Popen:
    """A process that takes the lock of `path` and holds it until killed; returns once it holds it."""
    code = (
        "import sys, time\nfrom crossdiff.core.lock import output_lock\n"
        f"with output_lock({str(path)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "crossdiff", *args]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _race(argv: list[str], target: Path) -> tuple[subprocess.Popen, str]:
    """Start two processes of one command on one output together. The first to take the lock is
    frozen (SIGSTOP) with it held, so the other meets it whatever the machine's load; the other must
    end with the lock's one line. Then the first goes on. Returns (the first, the other's stderr)."""
    procs = [
        subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in "ab"
    ]
    deadline = time.monotonic() + 600
    while (pid := writer_of(target)) is None or not pid.isdigit():
        assert all(p.poll() is None for p in procs), [p.stderr.read().decode()[-2000:] for p in procs]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first = next(p for p in procs if p.pid == int(pid))
    first.send_signal(signal.SIGSTOP)
    other = next(p for p in procs if p is not first)
    try:
        assert other.wait(timeout=600) == 2
        err = other.stderr.read().decode()
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=900) == 0, first.stderr.read().decode()[-2000:]
    first.stderr.close()
    other.stderr.close()
    lines = err.strip().splitlines()
    assert (
        lines[-1]
        == f"error: {target} {BUSY}{first.pid}); wait for it to end (or stop it) and rerun, or choose another output"
    )
    return first, err


# ----------------------------------------------------------------------------- the lock itself


def test_a_second_writer_ends_at_once_naming_the_output_and_the_holder(tmp_path):
    out = tmp_path / "out"
    proc = _holder(out)
    try:
        assert writer_of(out) == str(proc.pid)
        t0 = time.monotonic()
        with pytest.raises(CrossdiffError, match=f"{out} {BUSY.replace('(', '[(]')}{proc.pid}[)]"):
            with output_lock(out):
                pass
        assert time.monotonic() - t0 < 5  # at once: it does not wait for the holder
    finally:
        _kill(proc)


def test_kill_9_leaves_no_stale_lock_and_release_leaves_no_file(tmp_path):
    out = tmp_path / "out"
    proc = _holder(out)
    _kill(proc)
    assert lock_path(out).exists()  # the file stays after kill -9, but the kernel released the lock
    assert writer_of(out) is None
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists() and sorted(os.listdir(tmp_path)) == []


def test_reentrant_in_a_process_and_one_lock_for_every_spelling_of_a_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with output_lock(real):
        with output_lock(tmp_path / "link"):  # the same folder: re-entrant, no deadlock
            with output_lock(tmp_path / "." / "real"):
                pass
        assert lock_path(real).exists()  # still held by the outer holder
        code = f"from crossdiff.core.lock import writer_of; print(writer_of({str(tmp_path / 'link')!r}))"
        seen = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
        assert seen.stdout.strip() == str(os.getpid())
    assert not lock_path(real).exists()


def test_a_failed_command_leaves_no_folder_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(CrossdiffError, match="bad input"):
        with output_lock(out):
            raise CrossdiffError("bad input")
    assert not (tmp_path / "a").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CrossdiffError, match="afile is a file, so nothing can be written under it"):
        with output_lock(tmp_path / "afile" / "x.jsonl"):
            pass


# ----------------------------------------------------------------------------- every writing command


def _store(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(2048, 12, generator=g), torch.randn(2048, 10, generator=g)
    write_synthetic_store(path, x_a, x_b, shard_tokens=512, chunk_len=32)
    return path


TRAIN = ("--latents", "48", "--k", "4", "--tokens", str(64 * 40), "--batch-size", "64")
TRAIN += ("--checkpoint-every", "5", "--log-every", "2", "--dead-tokens", "128", "--heldout-tokens", "512")


@pytest.mark.parametrize(
    "argv, output",
    [
        (("harvest", "--out", "{t}/s", "--corpus", "{t}/none.txt"), "s"),
        (("train", "--store", "{t}/s", "--out", "{t}/r"), "r"),
        (("generate", "--out", "{t}/g.jsonl", "--limit", "1"), "g.jsonl"),
        (("diff", "--out", "{t}/d"), "d"),
        (("analyze", "--run", "{t}/r"), "r/analysis"),
        (("verify", "--run", "{t}/r"), "r/verification"),
        (("steer", "--run", "{t}/r", "--top", "1"), "r/steering"),
        (("report", "--run", "{t}/r"), "r/report"),
        (("calibrate", "--out", "{t}/d"), "d/calibration"),
        (("bench", "toy", "--out", "{t}/b"), "b"),
    ],
)
def test_every_writing_command_takes_its_lock_before_anything(tmp_path, monkeypatch, argv, output):
    """While another process holds the output's lock, the command ends at once (one line naming the
    output and the holder's PID) and writes nothing: the lock comes before any input is read."""
    from crossdiff import cli

    monkeypatch.setattr(cli, "_ALL_CONFIGS", True)
    target = tmp_path / output
    proc = _holder(target)
    try:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        args = [a.format(t=tmp_path) for a in argv]
        with pytest.raises(CrossdiffError, match=f"{target} {BUSY.replace('(', '[(]')}{proc.pid}[)]"):
            cfg = cli.config_from_args(cli._load(_command(args).config), cli.build_parser().parse_args(args))
            cli._load(_command(args).run)(cfg)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
    finally:
        _kill(proc)


def _command(args: list[str]):
    from crossdiff import cli

    name = " ".join(args[:2]) if args[0] == "bench" else args[0]
    return next(c for c in cli.COMMANDS if c.name == name)


def test_two_trainings_started_together_one_runs_one_refuses(tmp_path):
    """Two `crossdiff train` on one --out at once: one trains, the other ends with the lock's line; every
    metrics.jsonl step is written once and the run is byte-identical to a run alone."""
    store = _store(tmp_path / "s")
    _race(_cli("train", "--store", str(store), "--out", str(tmp_path / "r"), *TRAIN), tmp_path / "r")
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 41, 2))
    subprocess.run(_cli("train", "--store", str(store), "--out", str(tmp_path / "alone"), *TRAIN), env=_env(),
                   check=True, capture_output=True)  # fmt: skip
    alone, both = _tree(tmp_path / "alone"), _tree(tmp_path / "r")
    assert alone["crosscoder.safetensors"] == both["crosscoder.safetensors"]
    assert _same_metrics(alone["metrics.jsonl"], both["metrics.jsonl"])


def _same_metrics(a: bytes, b: bytes) -> bool:
    """metrics.jsonl lines but their timing column."""

    def strip(text: bytes):
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in text.splitlines()]

    return strip(a) == strip(b)


def test_train_killed_with_the_lock_held_then_rerun_is_byte_identical(tmp_path):
    from crossdiff.coder.train import KILL_ENV

    store = _store(tmp_path / "s")
    run = tmp_path / "r"
    argv = _cli("train", "--store", str(store), "--out", str(run), *TRAIN)
    killed = subprocess.run(argv, env=_env(**{KILL_ENV: "12"}), capture_output=True)
    assert killed.returncode == -signal.SIGKILL and lock_path(run).exists() and writer_of(run) is None
    subprocess.run(argv, env=_env(), check=True, capture_output=True)
    subprocess.run(_cli("train", "--store", str(store), "--out", str(tmp_path / "alone"), *TRAIN), env=_env(),
                   check=True, capture_output=True)  # fmt: skip
    a, b = _tree(tmp_path / "alone"), _tree(run)
    assert a["crosscoder.safetensors"] == b["crosscoder.safetensors"]
    assert _same_metrics(a["metrics.jsonl"], b["metrics.jsonl"])
    assert not lock_path(run).exists()


# ----------------------------------------------------------------------------- the real default pair


def _prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Name a city that starts with {chr(65 + i)}."}) + "\n"
                            for i in range(n)))  # fmt: skip
    return path


@pytest.mark.slow
def test_two_generates_started_together_answer_each_prompt_once(tmp_path, models_ab):
    prompts, out = _prompts(tmp_path / "p.jsonl", 4), tmp_path / "answers.jsonl"
    argv = _cli("generate", "--prompts", str(prompts), "--out", str(out), "--model", "smollm2-135m",
                "--max-new-tokens", "2", "--device", "cpu")  # fmt: skip
    _race(argv, out)
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == [0, 1, 2, 3]


@pytest.mark.slow
def test_generate_killed_with_the_lock_held_then_rerun_is_byte_identical(tmp_path, models_ab):
    prompts = _prompts(tmp_path / "p.jsonl", 6)
    runs = {}
    for name in ("killed", "alone"):
        out = tmp_path / f"{name}.jsonl"
        argv = _cli("generate", "--prompts", str(prompts), "--out", str(out), "--model", "smollm2-135m",
                    "--max-new-tokens", "2", "--batch-size", "1", "--device", "cpu")  # fmt: skip
        if name == "killed":
            proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not (out.is_file() and out.read_bytes().count(b"\n") >= 1):
                assert proc.poll() is None
                time.sleep(0.02)
            assert writer_of(out) == str(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(argv, env=_env(), check=True, capture_output=True)
        runs[name] = out.read_bytes()
    assert runs["killed"] == runs["alone"]


HARVEST = ("--max-tokens", "1200", "--context-len", "128", "--batch-size", "4", "--shard-tokens", "300",
           "--device", "cpu")  # fmt: skip


def _corpus(path: Path) -> Path:
    words = "the jury said election county city of in was and to a for that is on with as by".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(120)) + "." for i in range(12)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.mark.slow
def test_two_harvests_started_together_then_kill_9_and_rerun(tmp_path, models_ab):
    """Two harvests on one --out at once: one store, complete (settings.json and tokenizers included);
    then a harvest killed with its lock held and rerun ends byte-identical to that store."""
    corpus = _corpus(tmp_path / "c.txt")
    argv = {
        n: _cli("harvest", "--out", str(tmp_path / n), "--corpus", str(corpus), *HARVEST) for n in ("s", "k")
    }
    _race(argv["s"], tmp_path / "s")
    assert (tmp_path / "s" / "settings.json").is_file() and (tmp_path / "s" / "tokenizers" / "b").is_dir()
    proc = subprocess.Popen(argv["k"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (tmp_path / "k" / "shards" / "00000.json").exists():
        assert proc.poll() is None
        time.sleep(0.02)
    assert writer_of(tmp_path / "k") == str(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(argv["k"], env=_env(), check=True, capture_output=True)
    a, b = _tree(tmp_path / "s"), _tree(tmp_path / "k")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if k != "settings.json")  # settings.json holds no path: equal too
    assert filecmp.cmp(tmp_path / "s" / "meta.json", tmp_path / "k" / "meta.json", shallow=False)


DIFF_SCRIPT = """
import sys
from crossdiff import budget
from crossdiff.budget import Budget
from crossdiff.core.errors import CrossdiffError
from crossdiff.pipeline import DiffConfig, diff
budget.BUDGETS["tiny"] = Budget(
    name="tiny", harvest_tokens=1200, heldout_frac=0.2, latents=64, k=4, train_tokens=2048, batch_size=128,
    dead_tokens=512, lr=1e-3, seeds=1, steer_top=0, steer_seconds=10.0, splice_tokens=128, verify_top=1,
    verify_heldout_tokens=128,
)
try:
    diff(DiffConfig(out=sys.argv[1], corpus=sys.argv[2], budget="tiny", device="cpu"))
except CrossdiffError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.slow
def test_two_diffs_started_together_then_kill_9_and_rerun(tmp_path, models_ab):
    """Two diffs on one folder at once: one runs, the other ends at once with the lock's line; a diff
    killed with its lock held, rerun, ends with the same store, weights and latents.csv as the first."""
    corpus = _corpus(tmp_path / "c.txt")
    argv = {n: [sys.executable, "-c", DIFF_SCRIPT, str(tmp_path / n), str(corpus)] for n in ("d", "k")}
    _race(argv["d"], tmp_path / "d")
    proc = subprocess.Popen(argv["k"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (tmp_path / "k" / "run" / "metrics.jsonl").exists():
        assert proc.poll() is None
        time.sleep(0.05)
    assert writer_of(tmp_path / "k") == str(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(argv["k"], env=_env(), check=True, capture_output=True)
    for rel in ("store/meta.json", "run/crosscoder.safetensors", "run/analysis/latents.csv"):
        assert (tmp_path / "d" / rel).read_bytes() == (tmp_path / "k" / rel).read_bytes(), rel
