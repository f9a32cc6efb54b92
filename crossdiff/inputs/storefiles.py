"""A store's files on disk: their names, their records (sizes, sha256) and the checks against them, and
the command that repairs a store (its harvest rerun). Read by the store itself on every open (sizes
only), by `crossdiff check` (every byte) and by the harvest's resume.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import struct
from pathlib import Path

from ..core import runfolder
from ..core.errors import CrossdiffError


def shard_name(index: int) -> str:
    return f"{index:05d}"


SHARD_FILES = ("safetensors", "texts.jsonl")


def harvest_command(root: str | Path) -> str:
    """The command that finishes or repairs the store: the harvest rerun with its settings.json."""
    root = Path(root)
    try:
        settings = json.loads(runfolder.path(root, "settings").read_text())
    except (OSError, ValueError):
        return f"recreate {root} the way it was made (it has no readable settings.json)"
    parts = ["crossdiff", "harvest", "--out", shlex.quote(str(root))]
    for key, value in settings.items():
        if value is not None:  # a corpus path recorded relative to the store gets the store's folder
            value = str(value).replace("{store}/", f"{root}/")
            parts += [f"--{key.replace('_', '-')}", shlex.quote(value)]
    return " ".join(parts)


def damaged(path: Path, reason: str, root: Path) -> CrossdiffError:
    """The one-line error of every reader that meets a damaged store file."""
    return CrossdiffError(f"{path} is damaged ({reason}); repair the store with: {harvest_command(root)}")


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be complete (unreadable header, shorter than its header says)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                return f"header length {header_len:,} exceeds the file's {size:,} bytes"
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return "missing"
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable header: {type(e).__name__}"
    expected = 8 + header_len + end
    return None if size == expected else f"{size:,} bytes, its header describes {expected:,}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def shard_problems(root: Path, entry: dict, *, checksums: bool) -> list[tuple[Path, str]]:
    """(file, what is wrong) for a shard-table entry (meta.json) or a shard's own .json.

    Sizes and sha256 come from the record written with the shard; stores written before records
    existed (no "files") get the check their safetensors header allows (the size it describes)."""
    out = []
    name = entry.get("name", shard_name(entry.get("index", 0)))
    for ext in SHARD_FILES:
        path = Path(root) / "shards" / f"{name}.{ext}"
        record = entry.get("files", {}).get(ext)
        if not path.is_file():
            out.append((path, "missing"))
        elif record is None:
            problem = safetensors_problem(path) if ext == "safetensors" else None
            if problem:
                out.append((path, problem))
        elif (size := path.stat().st_size) != record["bytes"]:
            out.append((path, f"{size:,} bytes, {record['bytes']:,} were written"))
        elif checksums and sha256_file(path) != record["sha256"]:
            out.append((path, "its sha256 differs from the one recorded when it was written"))
    return out


def harvest_files_missing(root: Path, meta: dict) -> list[Path]:
    """settings.json and both tokenizers, if missing from a harvested store (any store but one of
    `write_synthetic_store`, whose corpus is "synthetic"): such a store is damaged, never synthetic."""
    if meta.get("corpus") == "synthetic":
        return []
    settings = runfolder.path(root, "settings")
    wanted = [settings] + [root / "tokenizers" / k / "tokenizer_config.json" for k in "ab"]
    return [p if p == settings else p.parent for p in wanted if not p.is_file()]


def store_problems(root: Path, meta: dict) -> list[tuple[int, Path, str]]:
    """(shard index, file, what is wrong) over a complete store: sizes and sha256 of every shard's
    files, and each shard's .json against meta.json's table. Reads the whole store once."""
    out = []
    for i, entry in enumerate(meta["shards"]):
        problems = shard_problems(root, entry, checksums=True)
        own = Path(root) / "shards" / f"{entry['name']}.json"
        try:
            stats = json.loads(own.read_text())
            if stats.get("files") != entry.get("files") or stats.get("n_tokens") != entry["n_tokens"]:
                problems.append((own, "it disagrees with meta.json"))
        except (OSError, ValueError) as e:
            problems.append((own, f"unreadable: {type(e).__name__}"))
        out += [(i, path, problem) for path, problem in problems]
    return out
