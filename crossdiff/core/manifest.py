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

Hashing costs about what reading costs: measured in docs/integrity.md.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .errors import CrossdiffError
from .fsutil import write_json_atomic

MANIFEST = "manifest.json"
_ROWS = {".csv": 1, ".jsonl": 0}
"""Suffixes whose rows are recorded -> header lines not counted."""


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


def start(folder: Path) -> tuple[float, dict | None]:
    """Before a command writes into `folder`: (its start time, the manifest as it was), the manifest
    marked incomplete so that no reader takes a half-rewritten folder for a finished one."""
    began = time.time() - 1.0  # file times come from a coarser clock: a margin, never a miss
    try:
        old = read(folder)
    except CrossdiffError:
        old = None  # an unreadable manifest is replaced when the command completes
    if old is not None and old.get("complete"):
        write_json_atomic(folder / MANIFEST, {**old, "complete": False})
    return began, old


def finish(folder: Path, command: str, cfg_settings: dict, began: float, old: dict | None, recursive: bool):
    """The manifest of a command that returned: every file recorded, `complete: true`, written last."""
    from .. import __version__
    from .config import fingerprint

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
    write_json_atomic(
        folder / MANIFEST,
        {
            "command": command,
            "fingerprint": fingerprint(cfg_settings),
            "settings": cfg_settings,
            "complete": True,
            "crossdiff_version": __version__,
            "files": files,
        },
    )


def abandon(folder: Path, began: float, old: dict | None) -> None:
    """After a failed command: put the old manifest back if the command wrote nothing in `folder`."""
    if old is None or not old.get("complete") or not folder.is_dir():
        return
    before = old.get("files", {})
    if all(_unchanged(p, before.get(p.relative_to(folder).as_posix()), began) for p in _files(folder, True)):
        write_json_atomic(folder / MANIFEST, old)


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


def intact(folder: str | Path, names: tuple[str, ...]) -> bool:
    """Whether a folder's manifest is complete and these files match their records (True for a folder
    written before this protocol, which has none): what a stage's skip-if-done adds to its own check,
    so that a rerun repairs a damaged file instead of calling the stage finished."""
    try:
        manifest = read(folder)
    except CrossdiffError:
        return False
    if manifest is None:
        return True
    from .lock import holds

    records = manifest["files"]
    complete = manifest.get("complete") or holds(folder)  # the stage's own rerun marked it incomplete
    return bool(complete) and all(
        n in records and record_problem(Path(folder) / n, records[n]) is None for n in names
    )


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


__all__ = ["MANIFEST", "file_record", "read", "start", "finish", "abandon", "check_file", "problems"]
