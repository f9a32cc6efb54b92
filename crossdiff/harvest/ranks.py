"""Several torchrun ranks, one store: a folder per rank while harvesting, merged by renaming.

    STORE/settings.json, tokenizers/   written by rank 0 before any rank starts
    STORE/ranks/world.json             {"world": N}: a rerun must use the same N
    STORE/ranks/R/shards/NNNNN.*       rank R's shards, numbered from 0, written and resumed exactly
                                       as a single-process store's (blocks.Resume)
    STORE/ranks/merge.json             rank 0's renaming plan, written before the first rename

After a barrier (every rank has finished), rank 0 moves the ranks' shard files into STORE/shards/
under one numbering (rank 0's shards first, then rank 1's ...) with `os.replace`: activation bytes
are never copied; only each shard's small .json is rewritten with its new index. Then meta.json is
computed from the merged shards' sums as for a single process (one scale per model from the summed
squared norms, the summed counts) and ranks/ is removed. Each step can be repeated after a kill:
the plan is fixed once written, and a shard whose .json is in STORE/shards/ has been moved.
The store folder must be on a file system every rank sees (one machine, or a shared mount).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..core.fsutil import write_json_atomic
from ..inputs.store import completed_shards, remove_partial_shards
from ..inputs.storefiles import shard_name


def rank_dir(root: Path, rank: int) -> Path:
    return Path(root) / "ranks" / str(rank)


def quota(max_tokens: int | None, rank: int, world: int) -> int | None:
    """This rank's share of --max-tokens; the shares sum to it exactly."""
    if max_tokens is None:
        return None
    return max_tokens // world + (rank < max_tokens % world)


def world_mismatch(root: Path, world: int) -> str | None:
    """Why an unfinished harvest at `root` cannot be resumed by `world` processes (None: it can)."""
    path = Path(root) / "ranks" / "world.json"
    started = json.loads(path.read_text())["world"] if path.is_file() else 1
    if started == world or (started == 1 and not completed_shards(root)):
        return None
    how = "as a single process" if started == 1 else f"with torchrun --nproc-per-node {started}"
    return (
        f"{root} is an unfinished harvest started by {started} process(es) and this run has {world}; "
        f"rerun it {how} to resume it, or pass --overwrite to start again"
    )


def has_shards(root: Path) -> bool:
    """Whether any finished work exists at `root` (the store's shards or a rank's)."""
    ranks = Path(root) / "ranks"
    rank_dirs = [p for p in ranks.iterdir() if p.is_dir()] if ranks.is_dir() else []
    return bool(completed_shards(root)) or any(completed_shards(p) for p in rank_dirs)


def start(root: Path, world: int) -> None:
    """Record N at the first launch (when STORE/shards/ holds no finished shard, see world_mismatch)."""
    path = Path(root) / "ranks" / "world.json"
    if not path.is_file():
        remove_partial_shards(root, 0)  # pieces of a single-process run killed before its first shard
        write_json_atomic(path, {"world": world})


def merging(root: Path) -> bool:
    return (Path(root) / "ranks" / "merge.json").is_file()


def merge(root: Path, world: int) -> None:
    """Move every rank's shards into STORE/shards/ under one numbering (repeatable after a kill)."""
    root = Path(root)
    plan_path = root / "ranks" / "merge.json"
    if not plan_path.is_file():
        moves: list[tuple[int, int, int]] = []  # (rank, index in the rank, index in the store)
        for r in range(world):
            moves += [
                (r, s["index"], len(moves) + k) for k, s in enumerate(completed_shards(rank_dir(root, r)))
            ]
        write_json_atomic(plan_path, {"world": world, "moves": moves})
    plan = json.loads(plan_path.read_text())
    dst = root / "shards"
    dst.mkdir(exist_ok=True)
    for stray in dst.glob(".*"):  # a temporary of a .json write cut short
        stray.unlink()
    for r, i, g in plan["moves"]:
        src, old, new = rank_dir(root, r) / "shards", shard_name(i), shard_name(g)
        if (dst / f"{new}.json").is_file():
            continue  # moved before the kill
        for ext in ("safetensors", "texts.jsonl"):
            if (src / f"{old}.{ext}").is_file():
                os.replace(src / f"{old}.{ext}", dst / f"{new}.{ext}")
        stats = json.loads((src / f"{old}.json").read_text())
        write_json_atomic(dst / f"{new}.json", {**stats, "index": g, "rank": r, "rank_index": i})
        (src / f"{old}.json").unlink()


def clean(root: Path) -> None:
    """Remove the (emptied) rank folders once meta.json is written."""
    shutil.rmtree(Path(root) / "ranks", ignore_errors=True)
