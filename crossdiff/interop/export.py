"""`crossdiff export RUN --to saelens|dictionary_learning|hub`: a run's crosscoder in another tool's format.

    saelens              OUT/a/, OUT/b/: each model's side as a SAELens SAE folder, raw units (saelens.py)
    dictionary_learning  OUT/: the crosscoder fork's save_pretrained folder (dictionary_learning.py)
    hub                  OUT/: the crossdiff folder as pushed to the Hub, with its model card (hub.py)

OUT defaults to RUN/export/<format>. Every file is written atomically; an export of the same run gives
the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..core.config import where
from ..core.errors import CrossdiffError

FORMATS = ("saelens", "dictionary_learning", "hub")


@dataclass(frozen=True)
class ExportConfig:
    """Write a run's crosscoder in another tool's format (docs/interop.md)."""

    run: str
    """Run folder (or crosscoder folder, or hub id) holding crosscoder.safetensors and cfg.json."""
    to: Literal["saelens", "dictionary_learning", "hub"] = "saelens"
    """saelens: one SAE folder per model, raw units; dictionary_learning: the crosscoder fork's checkpoint; hub: the folder crossdiff push uploads."""
    out: str | None = where(None)
    """Output folder (default: RUN/export/<format>)."""

    def __post_init__(self):
        if self.to not in FORMATS:
            raise CrossdiffError(f"--to must be one of {', '.join(FORMATS)}, got {self.to!r}")


def export(cfg: ExportConfig) -> Path:
    from .hub import load_crosscoder, resolve, stage_folder

    run = resolve(cfg.run)
    out = Path(cfg.out) if cfg.out else run / "export" / cfg.to
    cc = load_crosscoder(run)
    if cfg.to == "saelens":
        from .saelens import export_side

        for side in "ab":
            export_side(cc, side, out / side)
    elif cfg.to == "dictionary_learning":
        from .dictionary_learning import write_checkpoint

        write_checkpoint(cc, out, {"exported_from": str(cfg.run)})
    else:
        out.mkdir(parents=True, exist_ok=True)
        stage_folder(run, out)
    print(f"exported {cfg.run} as {cfg.to} to {out}")
    return out
