"""Hub-ready crosscoder folders: one loader for a local folder or a Hugging Face hub id, and `crossdiff push`.

A crosscoder folder is what `crossdiff train` leaves (crosscoder.safetensors, cfg.json, eval.json) plus a
model card (card.py). `resolve` turns a reference into a local folder, downloading a hub id once into the
Hugging Face cache; everything else (`load_crosscoder`, `crossdiff import`) reads that folder, so a local
path and a hub id go through the same code. `push` stages the folder (weights, configs, the analysis and
verification summaries, the card) and uploads it with huggingface_hub.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..coder.crosscoder import CONFIG_FILE, WEIGHTS_FILE, Crosscoder
from ..core.config import where
from ..core.errors import CrossdiffError
from ..core.fsutil import write_text_atomic
from ..core.runfolder import FILES
from .card import CARD, model_card

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
FOLDER_FILES = (WEIGHTS_FILE, CONFIG_FILE, FILES["eval"], FILES["import"])
SUMMARIES = (FILES["analysis"], FILES["verification"])


def resolve(ref: str | Path, revision: str | None = None) -> Path:
    """A local file or folder as is; else a hub id ("owner/name"), downloaded (or found in the cache)."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if not HUB_ID.fullmatch(str(ref)):
        raise CrossdiffError(
            f"{ref} is neither an existing file or folder nor a Hugging Face hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(ref), revision=revision))
    except Exception as e:  # network, authentication, missing repo: all end as one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CrossdiffError(
            f"cannot download {ref} from the Hugging Face hub ({first}); check the id, your network and "
            "`huggingface-cli login` for a private repository"
        ) from e


def load_crosscoder(ref: str | Path, *, revision: str | None = None, device=None) -> Crosscoder:
    """A crossdiff crosscoder from a local folder or a hub id (the same code path after `resolve`)."""
    return Crosscoder.from_pretrained(resolve(ref, revision), device=device)


def stage_folder(run: str | Path, dest: str | Path) -> Path:
    """Copy what the Hub gets into `dest`: weights, configs, summaries and a fresh model card."""
    run, dest = Path(run), Path(dest)
    if not (run / WEIGHTS_FILE).is_file():
        raise CrossdiffError(f"{run} has no {WEIGHTS_FILE}; pass a trained or imported run folder")
    Crosscoder.from_pretrained(run)  # a damaged checkpoint is refused before anything is uploaded
    for name in (*FOLDER_FILES, *SUMMARIES):
        if (run / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / name, dest / name)
    write_text_atomic(dest / CARD, model_card(run))
    return dest


@dataclass(frozen=True)
class PushConfig:
    """Upload a run's crosscoder folder (weights, configs, summaries, model card) to the Hugging Face hub."""

    run: str
    """Run folder (crossdiff train --out, or crossdiff import --out)."""
    repo_id: str
    """Hub repository to create or update, owner/name."""
    private: bool = where(True)
    """Create the repository as private."""
    revision: str | None = where(None)
    """Branch to push to (default: main)."""

    def __post_init__(self):
        if not HUB_ID.fullmatch(self.repo_id):
            raise CrossdiffError(f"--repo-id must look like owner/name, got {self.repo_id!r}")


def push(cfg: PushConfig) -> str:
    """Create the repository if needed and upload the staged folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="crossdiff-push-") as tmp:
        folder = stage_folder(cfg.run, tmp)
        try:
            api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
            info = api.upload_folder(
                repo_id=cfg.repo_id,
                folder_path=str(folder),
                revision=cfg.revision,
                commit_message=f"crossdiff: crosscoder from {Path(cfg.run).name}",
            )
        except Exception as e:  # no token, no permission, no network: one line with the fix
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CrossdiffError(
                f"cannot upload to {cfg.repo_id} ({first}); log in with `huggingface-cli login` (a token with "
                "write access) and check that you may write to that namespace"
            ) from e
    url = str(getattr(info, "commit_url", info))
    print(f"pushed {cfg.run} to {cfg.repo_id}: {url}")
    return url
