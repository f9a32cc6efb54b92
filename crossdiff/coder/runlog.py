"""The records a training run keeps in its folder: metrics lines (the live meter, metrics.jsonl,
optional wandb / tensorboard) and checkpoints (written whole or not at all, the latest found again).
The loop that writes them is crossdiff/coder/train.py; `st` and `cfg` here are its TrainState and
TrainConfig (not imported: the loop imports its records, never the reverse)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..core.config import config_to_dict
from ..core.fsutil import write_text_atomic, write_with_atomic
from .fve import FVE

STATE_FILE = "trainer_state.pt"
"""The trainer's state in a checkpoint folder (beside the crosscoder's files)."""


class Meter:
    """Running sums between two metrics lines (live FVE is on the training batches)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.fve = {m: FVE() for m in "ab"}  # about the mean of every row since the last line
        self.t0, self.n_tokens = time.perf_counter(), 0

    def add(self, out, x_a, x_b) -> None:
        vals = {
            "loss": out.loss.detach(),
            "aux_loss": out.aux_loss,
        }
        for k, v in vals.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.fve["a"].add(x_a, sse=out.sse_a)
        self.fve["b"].add(x_b, sse=out.sse_b)
        self.sums["l0_tokens"] = self.sums.get("l0_tokens", 0.0) + out.l0 * x_a.shape[0]
        self.sums["steps"] = self.sums.get("steps", 0) + 1
        self.n_tokens += x_a.shape[0]

    def flush(self, st, cfg, dead_F: torch.Tensor) -> dict:
        s, n = self.sums, max(1, self.n_tokens)
        row = {
            "step": st.step,
            "tokens": st.step * cfg.batch_size,
            "lr": cfg.lr_at(st.step - 1),
            "loss": s["loss"] / s["steps"],
            "aux_loss": s["aux_loss"] / s["steps"],
            "fve_a": self.fve["a"].value(),
            "fve_b": self.fve["b"].value(),
            "l0": s["l0_tokens"] / n,
            "threshold": float(st.model.threshold),
            "dead_fraction": float(dead_F.float().mean()),
            **{
                f"dead_fraction_{name}": float(dead_F[r.start : r.stop].float().mean())
                for name, r in st.model.partition.blocks()
                if len(r) and st.model.partition.is_dfc
            },
            "tokens_per_s": n / (time.perf_counter() - self.t0),
        }
        self.__init__()
        return row


class MetricsLog:
    """metrics.jsonl plus optional wandb/tensorboard, imported lazily (no-op when not installed)."""

    def __init__(self, run: Path, cfg, resume_step: int):
        self.path = run / "metrics.jsonl"
        if self.path.exists():  # drop lines newer than the checkpoint we resume from
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln)["step"] <= resume_step
            ]
            write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))
        self.backend = _optional_backend(cfg, run)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self.backend is not None:
            self.backend(row)


def _optional_backend(cfg, run: Path):
    try:
        if cfg.logger == "wandb":
            import wandb

            wandb.init(
                project="crossdiff", name=run.name, config=config_to_dict(cfg), resume="allow", id=run.name
            )
            return lambda row: wandb.log(row, step=row["step"])
        if cfg.logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run / "tensorboard"))
            return lambda row: [writer.add_scalar(k, v, row["step"]) for k, v in row.items() if k != "step"]
    except ImportError:
        print(
            f"warning: --logger {cfg.logger} is not installed; logging to metrics.jsonl only", file=sys.stderr
        )
    return None


def save_checkpoint(run: Path, st) -> Path:
    """Write checkpoints/step-N via a temporary folder renamed into place; then drop older ones."""
    ckpts = run / "checkpoints"
    final, tmp = ckpts / f"step-{st.step:09d}", ckpts / f".tmp-step-{st.step:09d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        st.model.save_pretrained(tmp)
        # Through a file object: torch.save to a path turns a full disk into an opaque RuntimeError.
        write_with_atomic(tmp / STATE_FILE, lambda p: _save_torch(st.state_dict(), p))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:  # a failed write (full disk) leaves no half-written checkpoint folder
        shutil.rmtree(tmp, ignore_errors=True)
    for old in ckpts.iterdir():
        if old != final and (old.name.startswith("step-") or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _save_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
    return found[-1] if found else None


def kept_note(run: Path) -> str:
    """What a failed run keeps: its last checkpoint (a rerun resumes from it), or nothing."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return "no checkpoint had been written, so nothing of this run is kept"
    return f"the last good checkpoint is kept ({ckpt.name}; rerun the same command to resume from it)"
