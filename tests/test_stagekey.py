"""The stage-folder protocol's skip-if-done (crossdiff.core.manifest: StageKey, begin, state) on a toy
stage that writes a few files under the lock's recording decorator, as every stage does: the same key
skips without recomputing, another key recomputes (or is kept, or refused with one line), an
incomplete manifest is never trusted and a killed run resumes under its key, a damaged file or record
is redone, and folders written before the manifest held a key are still recognised."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from crossdiff.core import manifest
from crossdiff.core.config import settings, where
from crossdiff.core.errors import CrossdiffError
from crossdiff.core.lock import writes
from crossdiff.core.manifest import StageKey, begin, state


@dataclass(frozen=True)
class Toy:
    out: str = where("")
    parts: int = 3
    value: str = "x"
    other: str = where("clear")
    fail_at: int | None = where(None)


RUNS: list[int] = []
"""Parts computed, in order, across calls (the counter that shows what a call recomputed)."""


@writes(lambda cfg: cfg.out, record="files")
def toy(cfg: Toy) -> str:
    folder = Path(cfg.out)
    key = StageKey(settings(cfg))
    refuse = f"{folder} holds a toy of other settings; choose another --out"
    if begin(folder, key, ("result.txt",), command="toy", other=cfg.other, keep=("kept.txt",), refuse=refuse):
        return "done"
    for i in range(cfg.parts):  # resumable units, like harvest's shards or train's checkpoints
        part = folder / f"part-{i}.txt"
        if part.is_file():
            continue
        if i == cfg.fail_at:
            raise KeyboardInterrupt  # a kill mid-stage: nothing after this runs (lock.writes re-raises)
        RUNS.append(i)
        part.write_text(f"{cfg.value}{i}")
    (folder / "result.txt").write_text(
        "".join((folder / f"part-{i}.txt").read_text() for i in range(cfg.parts))
    )
    return "computed"


@pytest.fixture(autouse=True)
def _counter():
    RUNS.clear()


def test_the_same_settings_skip_without_recomputing(tmp_path):
    cfg = Toy(out=str(tmp_path / "t"))
    assert toy(cfg) == "computed" and RUNS == [0, 1, 2]
    m = manifest.read(cfg.out)
    assert m["complete"] and m["protocol"] == manifest.KEYED
    assert m["fingerprint"] == StageKey(settings(cfg)).fingerprint and m["settings"] == settings(cfg)
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(cfg.out).iterdir()}
    RUNS.clear()
    assert (
        toy(Toy(out=str(tmp_path / "t"), other="refuse")) == "done" and RUNS == []
    )  # `where` fields: same key
    assert {p.name: p.stat().st_mtime_ns for p in Path(cfg.out).iterdir() if p.name != "manifest.json"} == {
        k: v for k, v in stamps.items() if k != "manifest.json"
    }
    assert manifest.read(cfg.out)["complete"]


def test_changed_settings_recompute_keep_or_refuse(tmp_path):
    folder = tmp_path / "t"
    toy(Toy(out=str(folder)))
    (folder / "kept.txt").write_text("the stage's reusable cache")
    os.utime(folder / "kept.txt", (1e9, 1e9))  # written before the refused call (not by it)
    RUNS.clear()
    with pytest.raises(CrossdiffError, match=r"^\S+ holds a toy of other settings; choose another --out$"):
        toy(Toy(out=str(folder), value="y", other="refuse"))
    assert (folder / "result.txt").read_text() == "x0x1x2" and manifest.read(folder)["complete"]
    assert toy(Toy(out=str(folder), value="y")) == "computed" and RUNS == [0, 1, 2]  # cleared
    assert (folder / "result.txt").read_text() == "y0y1y2" and (folder / "kept.txt").is_file()
    RUNS.clear()
    assert toy(Toy(out=str(folder), value="z", other="keep")) == "computed" and RUNS == []  # parts kept
    assert manifest.read(folder)["settings"]["value"] == "z"


def test_an_incomplete_manifest_is_not_trusted_and_a_killed_run_resumes(tmp_path):
    folder = tmp_path / "t"
    with pytest.raises(KeyboardInterrupt):
        toy(Toy(out=str(folder), fail_at=2))
    assert RUNS == [0, 1]
    m = manifest.read(folder)
    assert m["complete"] is False and m["fingerprint"] == StageKey(settings(Toy())).fingerprint
    assert state(folder, StageKey(settings(Toy()))) == "resume"
    assert state(folder, StageKey(settings(Toy(value="y")))) == "other"
    assert toy(Toy(out=str(folder))) == "computed" and RUNS == [0, 1, 2]  # parts 0 and 1 not redone
    assert (folder / "result.txt").read_text() == "x0x1x2"
    # every file there, but the manifest says incomplete (a kill between the last file and the manifest)
    manifest.start(folder)
    manifest._FOUND.clear()
    assert state(folder, StageKey(settings(Toy())), ("result.txt",)) == "resume"
    RUNS.clear()
    assert toy(Toy(out=str(folder))) == "computed" and RUNS == []


def test_a_damaged_file_or_record_is_redone(tmp_path):
    folder = tmp_path / "t"
    toy(Toy(out=str(folder)))
    (folder / "result.txt").write_text("x0x1")  # differs from its record
    assert state(folder, StageKey(settings(Toy())), ("result.txt",)) == "resume"
    assert toy(Toy(out=str(folder))) == "computed" and (folder / "result.txt").read_text() == "x0x1x2"
    (folder / "manifest.json").write_text('{"files": ')  # a damaged record: work of unknown settings
    assert state(folder, StageKey(settings(Toy()))) == "other"
    with pytest.raises(CrossdiffError, match=r"^\S+ holds a toy of other settings; choose another --out$"):
        toy(Toy(out=str(folder), other="refuse"))
    RUNS.clear()
    assert toy(Toy(out=str(folder))) == "computed" and RUNS == [0, 1, 2]
    assert manifest.read(folder)["complete"]


def test_folders_written_before_the_manifest_held_a_key(tmp_path):
    """A settings.json fingerprint (how analyze and verify recorded their key), an accepted older
    fingerprint, and a stage's own legacy reader (how a store records its settings)."""
    folder = tmp_path / "t"
    key = StageKey(settings(Toy()), accept=("0123456789abcdef",))
    folder.mkdir()
    assert state(folder, key, ("result.txt",)) == "new"
    (folder / "result.txt").write_text("x0x1x2")
    assert state(folder, key, ("result.txt",)) == "other"  # files with no record of their settings
    for fp, expect in (
        (key.fingerprint, "done"),
        ("0123456789abcdef", "done"),
        ("fedcba9876543210", "other"),
    ):
        (folder / "settings.json").write_text(json.dumps({"fingerprint": fp}))
        assert state(folder, key, ("result.txt",)) == expect
    (folder / "result.txt").unlink()
    (folder / "settings.json").write_text(json.dumps({"fingerprint": key.fingerprint}))
    assert state(folder, key, ("result.txt",)) == "resume"  # its settings, unfinished
    own = StageKey(settings(Toy()), legacy=lambda f: json.loads((f / "made.json").read_text())["v"] == "x")
    (folder / "made.json").write_text('{"v": "x"}')
    assert state(folder, own) == "done"
    (folder / "made.json").write_text('{"v": "y"}')
    assert state(folder, own) == "other"


def test_a_stage_failing_before_any_work_leaves_nothing(tmp_path):
    """The key `begin` records is all the folder holds: a failure removes it, and the new folder."""
    with pytest.raises(KeyboardInterrupt):
        toy(Toy(out=str(tmp_path / "t"), fail_at=0))
    assert not (tmp_path / "t").exists()


def test_a_damaged_store_record_is_one_line_and_changes_nothing(tmp_path):
    """A store's settings.json cut short (the record a store without a keyed manifest is judged by):
    the harvest refuses in one line, and the folder is untouched. A manifest cut short is judged by
    settings.json instead: other settings refused in one line, the same resumed (never taken as done)."""
    from crossdiff.harvest.harvest import HarvestConfig, _check_settings

    root = tmp_path / "store"
    root.mkdir()
    (root / "settings.json").write_text('{"corpus": ')
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(CrossdiffError, match=r"settings.json is not valid JSON") as e:
        _check_settings(root, HarvestConfig(out=str(root)), 1)
    assert "\n" not in str(e.value) and {p.name: p.read_bytes() for p in root.iterdir()} == before
    (root / "settings.json").write_text('{"corpus": "other.txt"}')
    (root / "manifest.json").write_text('{"files": ')
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(
        CrossdiffError, match=r"^\S+ holds a store made with other settings; pass --overwrite"
    ):
        _check_settings(root, HarvestConfig(out=str(root)), 1)
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    assert _check_settings(root, HarvestConfig(out=str(root), corpus="other.txt"), 1) == (False, False)
    assert manifest.read(root)["complete"] is False  # the key recorded again, for the resumed harvest


def test_check_takes_a_store_with_a_manifest_for_a_store(tmp_path, capsys):
    """A harvested store now has a manifest (its key) like a stage folder: `crossdiff check` still checks
    it as a store (its shards against meta.json's records)."""
    import torch

    from crossdiff.check import CheckConfig, check
    from crossdiff.inputs.store import write_synthetic_store

    root = tmp_path / "store"
    write_synthetic_store(root, torch.randn(64, 4), torch.randn(64, 6))
    manifest.finish(root, "harvest", {}, 0.0, None, recursive=False)
    check(CheckConfig(path=str(root)))
    assert "shards, 64 pairs" in capsys.readouterr().out
