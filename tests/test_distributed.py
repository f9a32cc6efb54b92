"""Data-parallel training under torchrun (2 gloo ranks on CPU) equals single-process training.

The global batch stream is the same; each rank trains on half of every batch, gradients are
all-reduced, BatchTopK selects over the global batch. Weights agree up to the order of additions
in the all-reduce. Legend: N tokens, D one model's width.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossdiff import cli
from crossdiff.coder.train import KILL_ENV
from crossdiff.inputs.store import write_synthetic_store

REPO = Path(__file__).resolve().parents[1]
D_A, D_B = 24, 20

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    idx_NK = torch.randint(0, 48, (2048, 3), generator=g)
    mag_NK = torch.rand(2048, 3, generator=g) + 0.5
    dirs_a, dirs_b = torch.randn(48, D_A, generator=g), torch.randn(48, D_B, generator=g)
    bag = torch.nn.functional.embedding_bag
    x_a = bag(idx_NK, dirs_a, mode="sum", per_sample_weights=mag_NK) + 1.0
    x_b = bag(idx_NK, dirs_b, mode="sum", per_sample_weights=mag_NK) - 0.5
    path = tmp_path_factory.mktemp("stores") / "synthetic"
    write_synthetic_store(path, 10 * x_a, x_b, scale_a=0.02, scale_b=0.2, shard_tokens=512, chunk_len=32)
    return path


def _argv(store, out, **opts) -> list[str]:
    base = dict(latents=96, k=4, tokens=64 * 12, batch_size=64, checkpoint_every=5, log_every=4)
    # AuxK off (a dead window longer than the run): its loss is normalised per rank's batch, so it is
    # not one process's; the short-run default (a quarter of the run) would switch it on.
    base.update(heldout_tokens=512, lr=3e-3, dead_tokens=10_000_000, **opts)
    argv = ["train", "--store", str(store), "--out", str(out)]
    for key, val in base.items():
        argv += [f"--{key.replace('_', '-')}", str(val)]
    return argv


def _torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, "-m", "crossdiff", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def _assert_same_run(ref: Path, got: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "crosscoder.safetensors")), load_file(str(got / "crosscoder.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    ev_a, ev_b = (json.loads((r / "eval.json").read_text()) for r in (ref, got))
    assert ev_a["tokens_trained"] == ev_b["tokens_trained"]
    for key in ("fve_a", "fve_b", "l0", "threshold"):
        assert ev_b[key] == pytest.approx(ev_a[key], rel=1e-3, abs=1e-4), key
    assert ev_a["threshold"] > 0  # the θ EMA was learned (from the global cutoffs)


def test_two_ranks_equal_one_process_batchtopk(store_path, tmp_path):
    assert cli.main(_argv(store_path, tmp_path / "ref")) == 0
    got = _torchrun(_argv(store_path, tmp_path / "ddp"))
    assert got.returncode == 0, got.stderr[-3000:]
    _assert_same_run(tmp_path / "ref", tmp_path / "ddp")
    rows = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]  # rank 0 alone wrote the metrics


def test_single_process_checkpoint_resumed_by_two_ranks_dfc(store_path, tmp_path):
    """DFC: killed after step 8 (checkpoint at 5) single-process, resumed on 2 ranks: same result."""
    opts = dict(arch="dfc", exclusive_frac=0.1)
    assert cli.main(_argv(store_path, tmp_path / "ref", **opts)) == 0
    cmd = [sys.executable, "-m", "crossdiff", *_argv(store_path, tmp_path / "run", **opts)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_ENV: "8"}
    killed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _torchrun(_argv(store_path, tmp_path / "run", **opts))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 5" in resumed.stderr
    _assert_same_run(tmp_path / "ref", tmp_path / "run")
