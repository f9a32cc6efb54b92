"""The JSON files that stages read from one another, by name: one table of where they are, one reader.

    RUN/cfg.json                     the crosscoder's architecture (crossdiff train / import; coder/crosscoder.py)
    RUN/eval.json                    held-out evaluation, written last by crossdiff train (coder/train.py)
    RUN/analysis/summary.json        crossdiff analyze (analysis/analyze.py)
    RUN/verification/summary.json    crossdiff verify (analysis/verify.py)
    RUN/verification/settings.json   crossdiff verify's config as run (predictions.py rebuilds it)
    RUN/answers/summary.json         crossdiff answers (analysis/answers.py)
    RUN/stability.json               crossdiff diff's seed-stability stage (analysis/stability.py)
    RUN/import.json                  where an imported crosscoder came from (crossdiff import; interop/importer.py)
    DIR/diff.json                    crossdiff diff's record of the whole diff (pipeline.py), DIR = RUN/..
    STORE/meta.json                  the store's record: models, scales, shards (inputs/store.py)
    STORE/settings.json              the harvest's settings (harvest/harvest.py; a control's, inputs/derive.py)

The module that writes a file names it through `path` too, so a file's place is written once. It
lives in core, below every stage, because readers sit in every layer (a store's meta.json is read by
harvest, interop, check and the controls; a run's summaries by analysis, interop and report).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CrossdiffError

FILES = {
    "cfg": "cfg.json",
    "eval": "eval.json",
    "analysis": "analysis/summary.json",
    "verification": "verification/summary.json",
    "verification_settings": "verification/settings.json",
    "answers": "answers/summary.json",
    "stability": "stability.json",
    "import": "import.json",
    "diff": "diff.json",
    "meta": "meta.json",
    "settings": "settings.json",
}
"""Name -> path relative to its folder (a run folder; a store for meta and settings; a diff folder for diff)."""


def path(folder: str | Path, name: str) -> Path:
    """Where file `name` (a key of FILES) of `folder` is."""
    return Path(folder) / FILES[name]


def exists(folder: str | Path, name: str) -> bool:
    return path(folder, name).is_file()


def read(folder: str | Path, name: str, default=None):
    """File `name` of `folder` parsed, or `default` when it does not exist; a file that is not JSON is
    one line naming it."""
    return read_json(path(folder, name), default)


def read_json(p: Path, default=None):
    """The JSON file at `p` parsed, or `default` when it does not exist; a one-line error when it is
    not JSON."""
    try:
        return json.loads(Path(p).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CrossdiffError(f"{p} is not valid JSON ({e}); rerun the command that wrote it") from e


def read_or_empty(folder: str | Path, name: str) -> dict:
    """File `name` parsed, {} when it is missing or unreadable (for optional facts, e.g. a model card's)."""
    try:
        return read(folder, name, {})
    except (OSError, CrossdiffError):
        return {}


__all__ = ["FILES", "path", "exists", "read", "read_or_empty"]
