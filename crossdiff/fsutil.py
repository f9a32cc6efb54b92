"""Atomic file writes: every file is written to a temporary name in its final folder, then renamed.

A killed process therefore leaves either the old file, the complete new one, or a `*.tmp-*` file
that readers ignore — never a truncated file under the real name.
"""

from __future__ import annotations

import errno
import json
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        if e.errno != errno.ENOSPC:
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


def explain_os_error(e: OSError, path: Path) -> CrossdiffError:
    """The one-line message for a full disk."""
    return CrossdiffError(
        f"no space left on the device while writing {path}; free some disk space and rerun the same "
        "command (finished work is kept)"
    )
