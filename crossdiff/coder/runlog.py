"""The records a training run keeps in its folder: metrics lines (the live meter, metrics.jsonl,
optional wandb / tensorboard) and checkpoints (written whole or not at all, the latest found again).
Also the run folder's key (train_config.json and the manifest's skip-if-done). The loop that writes
them is crossdiff/coder/train.py; `st` and `cfg` here are its TrainState and
TrainConfig (not imported: the loop imports its records, never the reverse)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..core import runfolder
from ..core.config import changed_settings, config_to_dict
from ..core.fsutil import write_json_atomic, write_text_atomic, write_with_atomic
from ..core.manifest import StageKey, begin
from .fve import FVE
from .sparsity import DEFAULT_SPARSITY, DFC

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


# ----------------------------------------------------------------------------- the run folder


def check_run_folder(cfg, run: Path, settings: dict) -> None:
    """The run's skip-if-done (crossdiff.core.manifest): refuse a folder holding another run (its
    settings differ) or something else. Where the folder and the store are, and how the run logs, are
    not settings: a moved folder, another spelling of its path or a moved store resume it.
    train_config.json (the run's config, which later stages read to find its store) is written for a
    new run and updated (the store's path) for an unfinished one; a finished run's is never touched."""
    key = StageKey(settings, legacy=lambda folder: _same_saved(cfg, folder))
    if begin(
        run,
        key,
        (runfolder.FILES["eval"],),
        command="train",
        other="refuse",
        refuse=lambda: _refusal(cfg, run),
    ):
        return
    if not runfolder.exists(run, "eval"):  # a run killed after its evaluation: nothing left to write
        write_json_atomic(run / "train_config.json", config_to_dict(cfg))


def _saved_settings(cfg, run: Path) -> dict | None:
    """The run's train_config.json in today's fields (None without one; one line when not JSON)."""
    saved = runfolder.read_json(run / "train_config.json")
    if saved is None:
        return None
    saved = upgrade_train_settings(saved)  # `arch` before sparsity/frac
    # Runs started before these defaults scaled with the run saved the value they used.
    for k, v in (("dead_tokens", "dead_window"), ("threshold_beta", "beta")):
        if k in saved and saved[k] == getattr(cfg, v):
            saved[k] = getattr(cfg, k)
    return saved


def _same_saved(cfg, run: Path) -> bool | None:
    """A run folder written before its manifest held its key: whether train_config.json has these settings."""
    saved = _saved_settings(cfg, run)
    return None if saved is None else not changed_settings(saved, cfg)


def _refusal(cfg, run: Path) -> str:
    saved = _saved_settings(cfg, run)
    if saved is None:
        return f"{run} exists and is not a crossdiff training run; choose another --out"
    detail = changed_settings(saved, cfg) or "its recorded key differs"
    return f"{run} holds a run with other settings ({detail}); use another --out or the same options"


def upgrade_train_settings(saved: dict) -> dict:
    """A train_config.json written by an older crossdiff, in today's fields:
    - before `sparsity` and `exclusive_frac` replaced `arch`: arch dfc was (sparsity or batchtopk,
      exclusive_frac); any other arch was that sparsity with exclusive_frac ignored (0)."""
    saved = dict(saved)
    if "arch" not in saved:
        return saved
    arch = saved.pop("arch")
    if arch == DFC:
        saved["sparsity"] = saved.get("sparsity") or DEFAULT_SPARSITY
    else:
        saved["sparsity"], saved["exclusive_frac"] = arch, 0.0
    return saved
