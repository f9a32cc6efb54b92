"""Atomic file writes: every file is written to a temporary name in its final folder, then renamed.

A killed process therefore leaves either the old file, the complete new one, or a `*.tmp-*` file
that readers ignore — never a truncated file under the real name.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import CrossdiffError


def crossdiff_home() -> Path:
    """Where converted models and corpora are cached ($CROSSDIFF_HOME, default ~/.cache/crossdiff)."""
    return Path(os.environ.get("CROSSDIFF_HOME", Path.home() / ".cache" / "crossdiff"))


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        if os_error_message(e, path) is None:
            raise
        raise explain_os_error(e, path) from e
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        if os_error_message(e, path) is None:
            raise
        raise explain_os_error(e, path) from e
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_with_atomic(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and rename the result to `path` (for libraries that write by path)."""
    with atomic_path(path) as tmp:
        writer(Path(tmp))


def _unlink_quietly(p: str | Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


# errno -> (what happened, how to fix it): the operating-system errors a user can cause and fix.
# Anything else is a bug and keeps its traceback (crossdiff.cli).
_OS_ERRORS = {
    errno.ENOSPC: (
        "no space left on the device",
        "free some disk space and rerun the same command (finished work is kept)",
    ),
    errno.EDQUOT: (
        "disk quota exceeded",
        "free some space or raise the quota, then rerun the same command (finished work is kept)",
    ),
    errno.EROFS: ("the file system is read-only", "choose a folder on a writable disk"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to, or change its permissions"),
    errno.ENOTDIR: (
        "a file stands where a folder is needed",
        "choose a path whose folders are folders, not files",
    ),
    errno.EISDIR: ("it is a folder where a file is needed", "pass the path of a file"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and rerun the same command"),
    errno.EIO: (
        "input/output error (a failing disk or network mount)",
        "check the disk, then rerun the same command",
    ),
}


def os_error_message(e: OSError, path: str | Path | None = None) -> str | None:
    """One line for an operating-system error the user can fix (with the path and the fix), else None."""
    if e.errno not in _OS_ERRORS:
        return None
    what, fix = _OS_ERRORS[e.errno]
    where = path if path is not None else e.filename
    if e.errno == errno.ENOSPC:
        return f"{what} while writing {where}; {fix}"
    return f"{where}: {what}; {fix}" if where is not None else f"{what}; {fix}"


def explain_os_error(e: OSError, path: str | Path | None = None) -> CrossdiffError:
    """The one-line CrossdiffError for an operating-system error (see os_error_message)."""
    return CrossdiffError(os_error_message(e, path) or f"{path}: {e.strerror or e}")


def jsonable(v):
    """JSON-ready: numpy scalars to Python, NaN/inf to null (strict JSON parsers reject NaN)."""
    import numpy as np

    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
