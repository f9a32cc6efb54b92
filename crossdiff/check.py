"""`crossdiff check STORE|RUN`: read every file of a store or a training run and report damage.

A store is checked against the byte sizes and sha256 its harvest recorded for each shard (stores
written before those records get the size their safetensors headers describe); a run folder's
weights, checkpoints and JSON files are opened the way their readers open them. Each damaged file
gets one line naming it and the command that repairs it; the command exits 2 when anything is
damaged. Readers check sizes on open (store.Store.open); only this command reads every byte.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from .core import runfolder
from .core.errors import CrossdiffError
from .core.manifest import MANIFEST
from .inputs.storefiles import harvest_command, harvest_files_missing, safetensors_problem, store_problems


@dataclass(frozen=True)
class CheckConfig:
    path: str
    """A store (made by crossdiff harvest) or a training run folder (made by crossdiff train)."""


def check(cfg: CheckConfig) -> list[str]:
    """Print one line per damaged file (with its repair command); raise if there is any."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise CrossdiffError(f"{root} is not a folder; pass a store or a training run folder")
    # A store has a manifest too (its key, crossdiff.core.manifest): told apart by its own files.
    store_files = (
        runfolder.exists(root, "meta") or (root / "shards").is_dir() or (root / "tokenizers").is_dir()
    )
    stage_folder = (root / MANIFEST).is_file() and not runfolder.exists(root, "cfg") and not store_files
    if not stage_folder and (runfolder.exists(root, "settings") or runfolder.exists(root, "meta")):
        lines, what = check_store(root)
    elif (root / "train_config.json").is_file() or runfolder.exists(root, "cfg"):
        lines, what = check_run(root)
    elif (root / "stages.json").is_file():  # a diff or calibration folder: its store and every run
        lines, what = check_diff(root)
    elif (root / MANIFEST).is_file():  # one stage folder (RUN/analysis, RUN/verification ...)
        lines, what = check_stage_folders(root, [root])
    else:
        raise CrossdiffError(
            f"{root} is neither an activation store nor a training run folder (no meta.json, "
            "settings.json, train_config.json or cfg.json)"
        )
    for line in lines:
        print(line)
    if lines:
        raise CrossdiffError(f"{len(lines)} damaged file(s) in {root}; run the commands above to repair them")
    print(f"{root}: {what}, no damage found")
    return lines


def check_store(root: Path) -> tuple[list[str], str]:
    repair = harvest_command(root)
    if not runfolder.exists(root, "meta"):
        return [f"incomplete: {root} (its harvest was interrupted); finish it with: {repair}"], ""
    try:
        meta = json.loads(runfolder.path(root, "meta").read_text())
        shards = meta["shards"]
    except (OSError, ValueError, KeyError) as e:
        return [f"damaged: {root / 'meta.json'} ({type(e).__name__}); repair: {repair} --overwrite"], ""
    lines = [
        f"damaged: {path} ({problem}); repair: {repair}" for _, path, problem in store_problems(root, meta)
    ]
    if not runfolder.exists(root, "settings"):
        repair = (
            f"crossdiff harvest --out {shlex.quote(str(root))} with the options that made it (meta.json: "
            f"models {meta.get('models', {}).get('a', {}).get('id')} and {meta.get('models', {}).get('b', {}).get('id')}, corpus "
            f"{meta.get('corpus')})"
        )
    for path in harvest_files_missing(root, meta):  # harvested, not synthetic: damaged
        lines.append(f"damaged: {path} (missing); repair: {repair} --overwrite")
    json_files = [runfolder.path(root, "settings"), *sorted((root / "tokenizers").glob("*/*.json"))]
    for path in (p for p in json_files if p.is_file()):  # the tokenizers' files and settings are JSON
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            lines.append(f"damaged: {path} (unreadable: {type(e).__name__}); repair: {repair} --overwrite")
    recorded = all("files" in s for s in shards)
    detail = "sizes and sha256" if recorded else "sizes (a store written before checksums were recorded)"
    return lines, f"{len(shards)} shards, {meta['n_tokens']:,} pairs: {detail} match"


def check_diff(root: Path) -> tuple[list[str], str]:
    """A `crossdiff diff` (or calibration) folder: every store and run folder below it, and its records."""
    lines, parts = [], []
    for store in sorted(
        p.parent for p in root.rglob(runfolder.FILES["meta"]) if (p.parent / "shards").is_dir()
    ):
        found, what = check_store(store)
        lines += found
        parts.append(f"{store.relative_to(root)}: {what}")
    runs = sorted(p.parent for p in root.rglob(runfolder.FILES["cfg"]) if "checkpoints" not in p.parts)
    for run in runs:
        found, _ = check_run(run)
        lines += found
    found, what = check_stage_folders(root, [root])
    return lines + found, "; ".join(parts + [f"{len(runs)} run folder(s) checked", what])


def train_command(run: Path) -> str:
    """The train command recorded in RUN/train_config.json (rerunning it resumes or restarts the run)."""
    try:
        settings = json.loads((run / "train_config.json").read_text())
    except (OSError, ValueError):
        return f"the crossdiff train command that made {run}"
    parts = ["crossdiff", "train"]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def check_run(run: Path) -> tuple[list[str], str]:
    """The final weights (if written), the latest checkpoint and the JSON files of a run folder."""
    retrain = train_command(run)
    lines = []
    if runfolder.exists(run, "cfg") or (run / "crosscoder.safetensors").is_file():
        problem = _checkpoint_problem(run)
        if problem:
            lines.append(f"damaged: {problem}; repair: rm {shlex.quote(str(run / 'eval.json'))}; {retrain}")
    for ckpt in sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []:
        problem = _checkpoint_problem(ckpt) or _state_problem(ckpt)
        if problem:
            lines.append(
                f"damaged: {problem}; repair: rm -r {shlex.quote(str(ckpt))}; {retrain} (restarts the run)"
            )
    for name in ("train_config.json", runfolder.FILES["eval"]):
        if (run / name).is_file():
            try:
                json.loads((run / name).read_text())
            except (OSError, ValueError) as e:
                lines.append(
                    f"damaged: {run / name} ({type(e).__name__}); repair: rm {run / name}; {retrain}"
                )
    state = "finished" if runfolder.exists(run, "eval") else "unfinished"
    stage_lines, what = check_stage_folders(run, [run] + [run / name for name in STAGE_FOLDERS])
    return lines + stage_lines, f"{state} run, weights and checkpoints readable and finite; {what}"


STAGE_FOLDERS = ("analysis", "answers", "verification", "predictions", "steering", "report")
"""A run's folders written by later stages, each with its manifest (crossdiff.core.manifest)."""
REPAIRS = {
    "analysis": "crossdiff analyze --run {run}",
    "answers": "crossdiff answers --run {run}",
    "verification": "crossdiff verify --run {run}",
    "predictions": "crossdiff report --run {run} (after deleting the damaged file)",
    "steering": "crossdiff steer --run {run} (after deleting the damaged file)",
    "report": "crossdiff report --run {run}",
}


def check_stage_folders(run: Path, folders: list[Path]) -> tuple[list[str], str]:
    """Every file the stages' manifests record, against its size and sha256 (reads every byte)."""
    from .core.manifest import problems, read

    lines, n_files, unrecorded = [], 0, []
    for folder in folders:
        if not folder.is_dir():
            continue
        try:
            manifest = read(folder)
        except CrossdiffError:
            manifest = None
        if manifest is None and folder != run:
            unrecorded.append(folder.name)
            continue
        n_files += len((manifest or {}).get("files", {}))
        rerun = REPAIRS.get(folder.name, f"the crossdiff command that wrote {folder}").format(
            run=shlex.quote(str(folder.parent))
        )
        if folder == run:
            rerun = train_command(run)
        lines += [f"damaged: {path} ({problem}); repair: {rerun}" for path, problem in problems(folder)]
    what = f"{n_files} recorded files match their sha256"
    if unrecorded:
        what += f" ({', '.join(unrecorded)}: written before records existed, not checked)"
    return lines, what


def _checkpoint_problem(folder: Path) -> str | None:
    """Why a crosscoder checkpoint folder cannot be used (None when it loads with finite weights)."""
    import torch

    from .coder.crosscoder import Crosscoder

    weights = folder / "crosscoder.safetensors"
    problem = safetensors_problem(weights)
    if problem:
        return f"{weights} ({problem})"
    try:
        model = Crosscoder.from_pretrained(folder)
    except CrossdiffError as e:
        return f"{folder} ({e})"
    bad = [n for n, p in model.state_dict().items() if not torch.isfinite(p).all()]
    return f"{weights} (non-finite values in {', '.join(bad)})" if bad else None


def _state_problem(ckpt: Path) -> str | None:
    import torch

    path = ckpt / "trainer_state.pt"
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure means the file is unusable
        return f"{path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None
