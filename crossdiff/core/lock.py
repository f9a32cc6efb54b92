"""One writer per output folder or file: an advisory OS lock taken before anything is written.

`output_lock(path)` holds `flock(LOCK_EX)` on a lock file *beside* the output (`PARENT/.NAME.lock`, for
a folder or a file alike), so that deleting or replacing the output (a harvest with --overwrite, a
verification with other settings) never deletes the lock under its holder, and the output folder holds
only what the stage writes. Properties (docs/integrity.md):

- The kernel releases the lock when its holder dies, so a kill -9 leaves no stale lock: a leftover lock
  file is unlocked and the next writer takes it.
- A second writer does not wait: it ends at once with one line naming the output and the holder's PID
  (written into the lock file by the holder).
- Re-entrant within a process: a stage that runs other stages (the diff runs harvest, train ...) may
  take a lock it already holds; it is released when the outermost holder leaves.
- The lock is keyed by the output's real path, so two spellings of a folder (a symlink, a relative and
  an absolute path) are one lock.
- The lock file is removed on release. Removing a lock file is safe because a taker checks, after
  `flock` succeeds, that the path still names the inode it locked (else it retries).
- Readers do not lock: `writer_of(path)` tells whether another process is writing an output now, so a
  reader can refuse a half-written stage with one line instead of reading it.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import CrossdiffError

_HELD: dict[str, tuple[int, int]] = {}
"""Real path of an output -> (lock file descriptor, depth) for the locks this process holds."""
_RETRY_SECONDS = 0.5
"""How long a taker retries a lock held for an instant (a reader's `writer_of` probe), never longer."""


def lock_path(path: str | Path) -> Path:
    """The lock file of an output folder or file: `.NAME.lock` beside it, by its real path."""
    real = Path(os.path.realpath(Path(path).expanduser()))
    return real.parent / f".{real.name or 'root'}.lock"


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return pid if pid.isdigit() else "unknown"


def _busy(path: Path, pid: str) -> CrossdiffError:
    return CrossdiffError(
        f"{path} is being written by another crossdiff process (PID {pid}); wait for it to end "
        f"(or stop it) and rerun, or choose another output"
    )


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created (deepest last). An existing
    file where a folder is needed is a one-line error, not a FileExistsError traceback."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise CrossdiffError(
            f"{p} is a file, so nothing can be written under it; choose an output path whose folders are folders"
        )
    for m in reversed(missing):
        try:
            m.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            from .fsutil import explain_os_error

            _remove_empty(missing)
            raise explain_os_error(e, m) from e
    return list(reversed(missing))


def _remove_empty(folders: list[Path]) -> None:
    """Remove these folders (deepest first) if they are empty: what a failed command created."""
    for f in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            f.rmdir()
        except OSError:
            pass


def _acquire(path: Path, lock: Path) -> int:
    deadline = time.monotonic() + _RETRY_SECONDS
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            from .fsutil import explain_os_error, os_error_message

            if os_error_message(e, path) is None:
                raise
            raise explain_os_error(e, path) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            if time.monotonic() > deadline:
                raise _busy(path, _holder(lock)) from None
            time.sleep(0.05)
            continue
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and our flock: take the new one
            try:  # the PID only informs a second writer: a full disk must not stop the lock
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass
            return fd
        os.close(fd)


@contextmanager
def output_lock(path: str | Path):
    """Hold the one-writer lock of an output folder or file (see the module docstring). Missing parent
    folders are created for the lock file, and removed again if the command fails leaving them empty."""
    path = Path(path).expanduser()
    lock = lock_path(path)
    key = str(lock)
    if key in _HELD:  # re-entrant: a nested stage of this process
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield path
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    existed = path.exists()
    created = _make_parents(lock.parent)
    try:
        fd = _acquire(path, lock)
    except BaseException:
        _remove_empty(created)
        raise
    _HELD[key] = (fd, 1)
    ok = False
    try:
        yield path
        ok = True
    finally:
        del _HELD[key]
        try:
            os.unlink(lock)  # while still locked: a waiting taker sees the inode change and retries
        except OSError:
            pass
        os.close(fd)
        if not ok:
            _remove_empty(created + ([] if existed or not path.is_dir() else [path]))


def holds(path: str | Path) -> bool:
    """Whether this process holds the lock of an output."""
    return str(lock_path(path)) in _HELD


def writer_of(path: str | Path) -> str | None:
    """The PID of another process writing this output now (as text, "unknown" if unreadable), else None.
    Never creates a file; a lock this process holds is not "another" writer."""
    lock = lock_path(path)
    if str(lock) in _HELD:
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None  # no lock file: no writer
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return _holder(lock)
    finally:
        os.close(fd)  # closing drops the shared lock at once
    return None


def refuse_if_being_written(path: str | Path, what: str = "") -> None:
    """Raise the one-line error if another process is writing `path` now (readers call this)."""
    pid = writer_of(path)
    if pid is not None:
        raise CrossdiffError(
            f"{path}{what} is being written by another crossdiff process (PID {pid}); "
            "wait for it to end and rerun"
        )


def _main_rank() -> bool:
    """Under torchrun, rank 0 holds the lock for the whole job (the other ranks write under it)."""
    return os.environ.get("RANK", "0") == "0"


def writes(output: Callable[[object], str | Path | None], *, record: str | None = None):
    """Decorate a command `fn(cfg, ...)` so that it holds the lock of its output `output(cfg)` (None:
    none) for its whole run: one line at each command's definition. With `record` ("files": the
    folder's own files; "tree": its sub-folders' too), the folder's manifest is kept by the stage-folder
    protocol (crossdiff.core.manifest): marked incomplete on entry, written complete when fn returns.
    Stack the decorator for a command with several outputs."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(cfg, *args, **kwargs):
            target = output(cfg) if _main_rank() else None
            if target is None:
                return fn(cfg, *args, **kwargs)
            with output_lock(target) as path:
                if record is None or _HELD[str(lock_path(path))][1] > 1:  # the outer holder records
                    return fn(cfg, *args, **kwargs)
                return _recorded(fn, cfg, args, kwargs, path, record == "tree")

        return wrapper

    return deco


def _recorded(fn, cfg, args, kwargs, folder: Path, recursive: bool):
    from . import manifest
    from .config import settings

    with manifest.recording(folder, fn.__name__, settings(cfg), recursive):
        return fn(cfg, *args, **kwargs)
