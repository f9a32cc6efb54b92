"""Multi-stage commands (`crossdiff diff`, `crossdiff calibrate`): one progress display over the stages,
and a record of finished stages so that a rerun skips them.

FOLDER/stages.json maps each finished stage to {fingerprint, seconds, result}: the fingerprint of the
settings it ran with (the stage's key, crossdiff.core.manifest.StageKey: the settings its own folder's
manifest records, from the stage's module; a stage whose settings changed runs again), its wall time
and a small JSON summary. The folder's manifest (the multi-stage command's) marks the whole complete. Settings leave out where things are (crossdiff.core.config.where), so a
moved folder, or one named by another spelling of its path, skips its finished stages. Each stage also resumes on its own inside (harvest by shard, training by checkpoint), so a
kill mid-stage loses at most the stage's last unit of work.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from .config import fingerprint
from .fsutil import write_json_atomic
from .manifest import StageKey


@dataclass(frozen=True)
class Stage:
    name: str
    """Key in stages.json and the label of its progress line."""
    run: Callable[[], object]
    """Does the work; returns a JSON-able summary (or None), kept in stages.json."""
    settings: dict = field(default_factory=dict)
    """What the result depends on; a rerun with other settings runs the stage again."""
    done: Callable[[], bool] | None = None
    """Extra check that the stage's output is still there (a stage whose output was deleted reruns)."""
    after_change: bool = False
    """Run again whenever an earlier stage ran in this invocation (e.g. a report that shows them all)."""
    legacy: dict | None = None
    """The settings as crossdiff <= 0.1 fingerprinted them (with the folders' paths): a stage recorded
    that way is still finished, and its record is upgraded."""

    @property
    def key(self) -> StageKey:
        """The stage's key: its settings, and its legacy form's fingerprint accepted."""
        return StageKey(self.settings, accept=() if self.legacy is None else (fingerprint(self.legacy),))


class StageLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def finished(self, stage: Stage) -> bool:
        rec = self.done.get(stage.name)
        if not isinstance(rec, dict):
            return False
        key = stage.key
        if rec.get("fingerprint") != key.fingerprint:
            if rec.get("fingerprint") not in key.accept:
                return False
            self.done[stage.name] = {**rec, "fingerprint": key.fingerprint}  # recorded by an older version
            write_json_atomic(self.path, self.done)
        return stage.done is None or bool(stage.done())

    def record(self, stage: Stage, seconds: float, result) -> None:
        self.done[stage.name] = {
            "fingerprint": stage.key.fingerprint,
            "seconds": round(seconds, 1),
            "result": result,
        }
        write_json_atomic(self.path, self.done)

    def seconds(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.done.items() if isinstance(v, dict)}

    def results(self) -> dict:
        return {k: v.get("result") for k, v in self.done.items() if isinstance(v, dict)}


def run_stages(stages: list[Stage], log: StageLog, desc: str) -> int:
    """Run every stage not already finished, under one outer progress bar with an "[i/n] name" line
    per stage (the stages' own bars nest below it). Returns how many stages ran."""
    from tqdm.auto import tqdm

    n, ran = len(stages), 0
    with tqdm(total=n, desc=desc, unit="stage", dynamic_ncols=True, position=0) as bar:
        for i, stage in enumerate(stages, 1):
            bar.set_description(f"{desc} [{i}/{n}] {stage.name}")
            if log.finished(stage) and not (stage.after_change and ran):
                bar.write(f"[{i}/{n}] {stage.name}: already done", file=sys.stderr)
            else:
                t0 = time.perf_counter()
                with redirect_stdout(
                    sys.stderr
                ):  # stages print results (train's eval JSON): keep stdout clean
                    result = stage.run()
                log.record(stage, time.perf_counter() - t0, result)
                ran += 1
                bar.write(
                    f"[{i}/{n}] {stage.name}: done in {log.seconds()[stage.name]:.0f} s", file=sys.stderr
                )
            bar.update()
    return ran
