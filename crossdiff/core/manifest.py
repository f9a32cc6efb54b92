"""The stage-folder protocol: FOLDER/manifest.json, the record of what a command wrote there.

    {"command": "analyze", "fingerprint": <16 hex of the command's settings>, "settings": {...},
     "complete": true, "crossdiff_version": "...",
     "files": {"latents.csv": {"bytes": 91234, "sha256": "...", "rows": 1024}, ...}}

- Written last and atomically by `crossdiff.core.lock.writes` when the command returns, so its
  `complete: true` is the stage's completion marker. When a command starts in a folder whose manifest is
  complete, the manifest is first rewritten with `complete: false`; a command that fails having written
  nothing puts it back, one that wrote something leaves it incomplete (`check` then names the command
  that finishes it).
- `files` records every file the command wrote (its byte size, sha256, and for .csv / .jsonl its rows);
  files older than the command's start keep the record they had, so a rerun that finds its work done
  never records a file damaged since. Files of a folder written before this protocol carry no record
  and are read as before.
- Readers call `check_file` before trusting a file (one line naming the file and the repairing command
  when it differs from its record, or while another process writes the folder); `crossdiff check`
  calls `problems` for every stage folder of a run.
- Skip-if-done: a stage names what its results depend on (a `StageKey`: its settings, recorded, and a
  fingerprint of them and of its inputs) and calls `begin` first. `begin` answers "done with these
  settings?" from the manifest alone (complete, the key's fingerprint, the named files intact); when
  not, it clears another key's work (or keeps it, or refuses it with one line) and records the key in
  the still incomplete manifest, so that a killed run resumes under it. The manifest written when the
  command returns records the key complete.

Hashing costs about what reading costs: measured in docs/integrity.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import CrossdiffError
from .fsutil import write_json_atomic

MANIFEST = "manifest.json"
KEYED = 2
"""The manifest's "protocol" when its fingerprint is its stage's key (StageKey); manifests without it
fingerprinted the command's config settings only, and the stage's key lived in its settings.json."""
_ROWS = {".csv": 1, ".jsonl": 0}
"""Suffixes whose rows are recorded -> header lines not counted."""


@dataclass(frozen=True)
class StageKey:
    """What a stage's results depend on: recorded in its folder's manifest, compared by a rerun."""

    settings: dict
    """The stage's settings (its config's, crossdiff.core.config.settings, and its rules' versions):
    recorded in the manifest, and what a multi-stage command records for the stage (core/stages.py)."""
    inputs: object = None
    """What the stage reads (a checkpoint, a store), fingerprinted with the settings, not recorded."""
    accept: tuple[str, ...] = ()
    """Fingerprints an older crossdiff recorded for the same work (its settings.json's), still taken."""
    legacy: Callable[[Path], bool | None] | None = None
    """For a folder written before its manifest held a key: whether its own records say it holds work of
    these settings (True), of others (False) or say nothing (None). Default: FOLDER/settings.json's
    "fingerprint" is the key's or an accepted one (how analyze and verify recorded theirs)."""

    @property
    def fingerprint(self) -> str:
        from .config import fingerprint

        return fingerprint(self.settings if self.inputs is None else [self.settings, self.inputs])


def file_record(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, with "rows" for a .csv (data rows) or a .jsonl (lines)."""
    h, lines, size, rows = hashlib.sha256(), 0, 0, path.suffix in _ROWS
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            lines += block.count(b"\n") if rows else 0
            size += len(block)
    out = {"bytes": size, "sha256": h.hexdigest()}
    if rows:
        out["rows"] = max(lines - _ROWS[path.suffix], 0)
    return out


def _files(folder: Path, recursive: bool) -> list[Path]:
    """The files a manifest records: everything in the folder but itself, hidden names and temporaries;
    with `recursive`, in sub-folders too, except those with a manifest of their own (another stage's)."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name == MANIFEST or ".tmp" in p.name:
            continue
        if p.is_file():
            out.append(p)
        elif recursive and p.is_dir() and not (p / MANIFEST).exists():
            out += _files(p, True)
    return out


def read(folder: str | Path) -> dict | None:
    """The folder's manifest (None when there is none); an unreadable one is damage."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CrossdiffError(
            f"{path} is damaged ({type(e).__name__}); rerun the command that wrote its folder"
        ) from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CrossdiffError(f"{path} is damaged (not a manifest); rerun the command that wrote its folder")
    return data


_KEYS: dict[str, StageKey] = {}
"""Real path of a stage folder -> the key its running command declared (`begin`), for `finish`."""
_FOUND: dict[str, dict | None] = {}
"""Real path of a stage folder -> its manifest as the running command found it (`start` marks it
incomplete at once; `begin` judges the folder by what it was)."""


def _real(folder: str | Path) -> str:
    return os.path.realpath(Path(folder).expanduser())


def start(folder: Path) -> tuple[float, dict | None]:
    """Before a command writes into `folder`: (its start time, the manifest as it was), the manifest
    marked incomplete so that no reader takes a half-rewritten folder for a finished one."""
    began = time.time() - 1.0  # file times come from a coarser clock: a margin, never a miss
    try:
        old = read(folder)
    except CrossdiffError:
        old = None  # an unreadable manifest is replaced when the command completes
    _FOUND[_real(folder)] = old
    if old is not None and old.get("complete"):
        write_json_atomic(folder / MANIFEST, {**old, "complete": False})
    return began, old


def finish(folder: Path, command: str, cfg_settings: dict, began: float, old: dict | None, recursive: bool):
    """The manifest of a command that returned: every file recorded, `complete: true`, written last;
    its fingerprint the stage's key when the command declared one (`begin`), else its settings'."""
    from .config import fingerprint

    key = _KEYS.pop(_real(folder), None)
    _FOUND.pop(_real(folder), None)
    if not folder.is_dir():
        return
    before = (old or {}).get("files", {})
    files = {}
    for p in _files(folder, recursive):
        rel = p.relative_to(folder).as_posix()
        st = p.stat()
        if rel in before and st.st_mtime < began and st.st_size == before[rel].get("bytes"):
            files[rel] = before[rel]  # not written by this command: keep what it was recorded as
        elif st.st_mtime >= began or rel not in before:
            files[rel] = file_record(p)
        else:
            files[rel] = before[rel]  # a size differing from its record: damage, left for check to name
    if key is None:
        _write(folder, command, fingerprint(cfg_settings), cfg_settings, files, complete=True)
    else:
        _write(folder, command, key.fingerprint, key.settings, files, complete=True, keyed=True)


def _write(folder: Path, command: str, fp: str, settings: dict, files: dict, complete: bool, keyed=False):
    from .. import __version__

    write_json_atomic(
        folder / MANIFEST,
        {
            "command": command,
            "fingerprint": fp,
            "settings": settings,
            "complete": complete,
            **({"protocol": KEYED} if keyed else {}),
            "crossdiff_version": __version__,
            "files": files,
        },
    )


def abandon(folder: Path, began: float, old: dict | None) -> None:
    """After a failed command: put the old manifest back if the command wrote nothing in `folder`."""
    _KEYS.pop(_real(folder), None)
    _FOUND.pop(_real(folder), None)
    if old is None and folder.is_dir() and [p.name for p in folder.iterdir()] == [MANIFEST]:
        (folder / MANIFEST).unlink()  # only the key `begin` recorded: nothing to resume, leave nothing
    if old is None or not old.get("complete") or not folder.is_dir():
        return
    before = old.get("files", {})
    if all(_unchanged(p, before.get(p.relative_to(folder).as_posix()), began) for p in _files(folder, True)):
        write_json_atomic(folder / MANIFEST, old)


@contextmanager
def recording(folder: str | Path, command: str, cfg_settings: dict | None = None, recursive: bool = False):
    """Keep a stage folder's manifest around the code that writes it (`start`, then `finish` when it
    returns or `abandon` when it fails): what `crossdiff.core.lock.writes(..., record=...)` does for a
    command, for a stage run inside another command under that command's lock (a derived store)."""
    folder = Path(folder)
    began, old = start(folder) if folder.is_dir() else (time.time() - 1.0, None)
    try:
        yield
    except BaseException:
        abandon(folder, began, old)
        raise
    finish(folder, command, cfg_settings or {}, began, old, recursive)


def _unchanged(path: Path, record: dict | None, began: float) -> bool:
    """Not written since `began`: older than it, or (within the clock margin) still the bytes recorded."""
    st = path.stat()
    if st.st_mtime < began:
        return True
    return record is not None and record.get("bytes") == st.st_size and file_record(path) == record


def record_problem(path: Path, record: dict) -> str | None:
    """Why a file does not match its record (None when it does)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"{size:,} bytes, {record.get('bytes'):,} were written"
    now = file_record(path)
    if now["sha256"] != record.get("sha256"):
        rows = f"; {now['rows']:,} rows, {record['rows']:,} were written" if "rows" in record else ""
        return f"its sha256 differs from the one recorded when it was written{rows}"
    return None


def check_file(path: str | Path, repair: str) -> None:
    """Refuse, with one line naming `path` and `repair`, a file whose folder another process is writing
    now, whose stage did not complete, or that differs from its record. Files without a record (folders
    written before this protocol) pass."""
    from .lock import holds, refuse_if_being_written

    path = Path(path)
    folder = path.parent
    refuse_if_being_written(folder)
    manifest = read(folder)
    if manifest is None:
        return
    record = manifest["files"].get(path.name)
    if not manifest.get("complete") and not holds(folder):  # a stage may read its own folder
        raise CrossdiffError(
            f"{folder} was left half-written by an interrupted crossdiff {manifest.get('command', '')}; {repair}"
        )
    if record is None:
        return
    problem = record_problem(path, record)
    if problem:
        raise CrossdiffError(f"{path} is damaged ({problem}); {repair}")


# ----------------------------------------------------------------------------- skip-if-done

State = Literal["done", "resume", "other", "new"]


def state(folder: str | Path, key: StageKey, names: tuple[str, ...] = ()) -> State:
    """What `folder` holds for a stage of this key: "done" (complete with this key, the named files
    matching their records), "resume" (this key's work, unfinished or with a damaged file), "other"
    (another key's, or unreadable records) or "new" (nothing). Judged by the manifest as the running
    command found it."""
    folder = Path(folder)
    real = _real(folder)
    try:
        manifest = _FOUND[real] if real in _FOUND else read(folder)
        damaged = False
    except CrossdiffError:
        manifest, damaged = None, True
    if manifest is not None and manifest.get("protocol") == KEYED:
        if manifest.get("fingerprint") not in (key.fingerprint, *key.accept):
            return "other"
        return "done" if manifest.get("complete") and _intact(folder, manifest, names) else "resume"
    same = _legacy_same(folder, key)  # written before the manifest held a key
    if same is None:
        return "new" if not folder.is_dir() or not _files(folder, True) else "other"
    if not same:
        return "other"
    if manifest is None:
        complete = not damaged and all((folder / n).is_file() for n in names)
    else:
        complete = bool(manifest.get("complete")) and _intact(folder, manifest, names)
    return "done" if complete else "resume"


def _legacy_same(folder: Path, key: StageKey) -> bool | None:
    if not folder.is_dir():
        return None
    if key.legacy is not None:
        return key.legacy(folder)
    try:
        record = json.loads((folder / "settings.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return False  # unreadable: work of unknown settings
    if not isinstance(record, dict) or "fingerprint" not in record:
        return False
    return record["fingerprint"] in (key.fingerprint, *key.accept)


def _intact(folder: Path, manifest: dict, names: tuple[str, ...]) -> bool:
    records = manifest["files"]
    return all(n in records and record_problem(folder / n, records[n]) is None for n in names)


def begin(
    folder: str | Path,
    key: StageKey,
    names: tuple[str, ...] = (),
    *,
    command: str,
    other: Literal["clear", "keep", "refuse"] = "clear",
    keep: tuple[str, ...] = (),
    refuse: str | Callable[[], str] = "",
    resume: bool = True,
) -> bool:
    """A stage's skip-if-done, called before its work: True when `folder` is done with this key (the
    caller returns its results). Otherwise another key's work is cleared (all but `keep`), kept (the
    stage's caches check their own keys) or refused with the one line `refuse` (or what it returns), and
    the key is recorded in the folder's incomplete manifest, so that a kill resumes under it; the
    manifest written when the command returns (`finish`) records it complete. `command` names the stage in that manifest (what
    a reader of the half-written folder is told to rerun); `resume` False: the stage cannot resume, so
    its own unfinished work is cleared too."""
    folder = Path(folder)
    found = state(folder, key, names)
    _KEYS[_real(folder)] = key
    if found == "done":
        return True
    if found == "other" and other == "refuse":
        _KEYS.pop(_real(folder), None)
        raise CrossdiffError(refuse() if callable(refuse) else refuse)
    if (found == "other" and other == "clear") or (found == "resume" and not resume):
        _clear(folder, keep)
    if folder.exists() and not folder.is_dir():  # mkdir would say "exists"; the fix is another path
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        files = (read(folder) or {}).get("files", {})
    except CrossdiffError:
        files = {}
    _write(folder, command, key.fingerprint, key.settings, files, complete=False, keyed=True)
    return False


def _clear(folder: Path, keep: tuple[str, ...]) -> None:
    """Remove a folder's contents but the files named in `keep` (and hidden files: locks)."""
    for p in sorted(folder.iterdir()):
        if p.name in keep or p.name.startswith("."):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def problems(folder: Path) -> list[tuple[Path, str]]:
    """(file, what is wrong) for every file a folder's manifest records (reads every byte)."""
    try:
        manifest = read(folder)
    except CrossdiffError as e:
        return [(folder / MANIFEST, str(e).split("(")[1].split(")")[0])]
    if manifest is None:
        return []
    out = []
    if not manifest.get("complete"):
        out.append((folder, f"incomplete: its crossdiff {manifest.get('command', '')} was interrupted"))
    for rel, record in sorted(manifest["files"].items()):
        problem = record_problem(folder / rel, record)
        if problem:
            out.append((folder / rel, problem))
    return out


def hashed_bytes(folder: Path) -> int:
    """Bytes a `problems` pass reads (for the cost of checking, docs/integrity.md)."""
    m = read(folder) or {"files": {}}
    return sum(r.get("bytes", 0) for r in m["files"].values())


__all__ = [
    "MANIFEST",
    "StageKey",
    "file_record",
    "read",
    "start",
    "finish",
    "abandon",
    "check_file",
    "problems",
    "state",
    "begin",
    "recording",
]
