"""`crossdiff import`: a crosscoder trained elsewhere becomes a crossdiff run folder.

    crossdiff import CHECKPOINT --out RUN --store STORE [--input-units store|raw|scales]

RUN then holds crosscoder.safetensors and cfg.json (what `crossdiff train` writes) and import.json (where
it came from, how its units and latent order were mapped); `crossdiff analyze --run RUN --store STORE`,
`verify`, `steer` and `report` work on it unchanged. Sources (a local path or a hub id, hub.resolve):
a dictionary_learning fork checkpoint (dictionary_learning.py) or a crossdiff crosscoder folder (copied
byte for byte).

What a fork checkpoint cannot say, the user must: the models and layers (the store names them), and,
unless the checkpoint carries the fork's activation normaliser or was exported by crossdiff, what its
inputs were (--input-units). A BatchTopK crosscoder ranks latents by f · (||d_A|| + ||d_B||), which no
per-side change of units preserves unless both sides change by one factor; when its units are not the
store's up to one common factor, RUN/store/ is written: a view of the store (links to its files) whose
meta.json records the checkpoint's scales, and the run analyses that.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..coder.crosscoder import CONFIG_FILE, WEIGHTS_FILE, Crosscoder, CrosscoderConfig
from ..core import runfolder
from ..core.config import where
from ..core.errors import CrossdiffError
from ..core.fsutil import write_json_atomic
from . import dictionary_learning as dl
from .hub import resolve

IMPORT_FILE = runfolder.FILES["import"]
VIEW = "store"


@dataclass(frozen=True)
class ImportConfig:
    """A crosscoder from elsewhere as a crossdiff run folder (docs/interop.md)."""

    source: str
    """Checkpoint to import: a dictionary_learning fork checkpoint (model_final.pt, checkpoint_N.pt, or a save_pretrained folder with model.safetensors), a crossdiff crosscoder folder, or a Hugging Face hub id of either."""
    out: str = where()
    """New run folder to write; then crossdiff analyze --run OUT --store STORE."""
    store: str | None = where(None)
    """The store of the activations it was trained on (models, layers, widths, normalisation); or give --model-a/--model-b/--layer-a/--layer-b."""
    model_a: str | None = None
    """Without --store: model A (its hub id or path, as a store records it)."""
    model_b: str | None = None
    """Without --store: model B."""
    layer_a: int | None = None
    """Without --store: model A's layer."""
    layer_b: int | None = None
    """Without --store: model B's layer."""
    d_a: int | None = None
    """Without --store: model A's width (default: the checkpoint's width)."""
    d_b: int | None = None
    """Without --store: model B's width (default: the checkpoint's width)."""
    input_units: Literal["store", "raw", "scales"] | None = None
    """What the checkpoint's inputs were, when it does not record it: store (the store's normalised activations, raw × its scales), raw (raw residual-stream activations), scales (raw × --scale-a / --scale-b)."""
    scale_a: float | None = None
    """With --input-units scales: the checkpoint's input for model A = raw activation × this."""
    scale_b: float | None = None
    """With --input-units scales: the same for model B."""
    n_a_exclusive: int | None = None
    """DFC: A-exclusive latents, when the checkpoint does not record its partition."""
    n_b_exclusive: int | None = None
    """DFC: B-exclusive latents, when the checkpoint does not record its partition."""
    revision: str | None = where(None)
    """Hub revision (branch, tag or commit) when SOURCE is a hub id."""

    def __post_init__(self):
        if (self.input_units == "scales") != (self.scale_a is not None and self.scale_b is not None):
            raise CrossdiffError(
                "--input-units scales goes with both --scale-a and --scale-b (and they need it)"
            )
        for v in (self.scale_a, self.scale_b):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise CrossdiffError(f"scales must be positive finite numbers, got {v}")


def import_crosscoder(cfg: ImportConfig) -> Path:
    """Write the run folder cfg.out; returns it."""
    from ..inputs.store import Store

    out = Path(cfg.out)
    if (out / WEIGHTS_FILE).exists() or (out / CONFIG_FILE).exists():
        raise CrossdiffError(f"{out} already holds a crosscoder; choose a new --out folder or delete it")
    source = resolve(cfg.source, cfg.revision)
    store = Store.open(cfg.store) if cfg.store else None
    if (source / CONFIG_FILE).is_file() and (source / WEIGHTS_FILE).is_file():
        return _copy_crossdiff(source, out, store, cfg)
    ckpt = dl.read_checkpoint(source, cfg.n_a_exclusive, cfg.n_b_exclusive)
    if ckpt.n_a_exclusive or ckpt.n_b_exclusive:
        dl.check_forbidden_zero(ckpt)
    ids = _identity(cfg, ckpt, store)
    dl.check_padding_zero(ckpt, ids["d_a"], ids["d_b"])
    units = _units(cfg, ckpt, store)
    scales, view = _scales(ckpt, units, store, ids)
    # k is the fork's for BatchTopK; its ReLU CrossCoder has none (a crossdiff export records it)
    k = ckpt.sidecar.get("crossdiff_cfg", {}).get("k", min(32, ckpt.n_latents))
    k = int(ckpt.tensors["k"]) if ckpt.sparsity == "batchtopk" else k
    cc_cfg = CrosscoderConfig(
        n_latents=ckpt.n_latents,
        sparsity=ckpt.sparsity,
        k=k,
        n_a_exclusive=ckpt.n_a_exclusive,
        n_b_exclusive=ckpt.n_b_exclusive,
        scale_a=scales[0],
        scale_b=scales[1],
        **ids,
    )
    cc = dl.to_crosscoder(ckpt, cc_cfg, units)
    out.mkdir(parents=True, exist_ok=True)
    store_path = write_view(store, out / VIEW, scales) if view else (store.root if store else None)
    cc.save_pretrained(out)
    record = {
        "source": str(cfg.source),
        "format": f"dictionary_learning {ckpt.dict_class}",
        "file": ckpt.path.name,
        "input_units": {"gain": list(units.gain), "mean": [m is not None for m in units.mean]},
        "latent_order": "crossdiff [A-exclusive | shared | B-exclusive] = fork latents "
        f"[0, {ckpt.n_a_exclusive}) + [{ckpt.n_a_exclusive + ckpt.n_b_exclusive}, {ckpt.n_latents}) + "
        f"[{ckpt.n_a_exclusive}, {ckpt.n_a_exclusive + ckpt.n_b_exclusive})",
        "store": str(store_path) if store_path else None,
        "store_view": view,
    }
    write_json_atomic(out / IMPORT_FILE, record)
    _print_next(out, store_path)
    return out


def _copy_crossdiff(source: Path, out: Path, store, cfg: ImportConfig) -> Path:
    cc = Crosscoder.from_pretrained(source)  # refuses a damaged folder before anything is copied
    if store is not None:
        cc.cfg.check_store(store)
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, CONFIG_FILE, runfolder.FILES["eval"]):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    write_json_atomic(
        out / IMPORT_FILE, {"source": str(cfg.source), "format": "crossdiff", "store": cfg.store}
    )
    _print_next(out, store.root if store else None)
    return out


def _identity(cfg: ImportConfig, ckpt: dl.ForkCheckpoint, store) -> dict:
    """Models, layers and widths: from the store, else the options, else a crossdiff export's record."""
    rec = ckpt.sidecar.get("crossdiff_cfg", {})
    if store is not None:
        a, b = store.model_a, store.model_b
        ids = dict(model_a=a["id"], model_b=b["id"], layer_a=a["layer"], layer_b=b["layer"])
        ids.update(d_a=store.d_a, d_b=store.d_b)
        differ = {k: (rec[k], v) for k, v in ids.items() if k in rec and rec[k] != v}
        if differ:  # a crossdiff export records what it was trained on
            raise CrossdiffError(
                f"the checkpoint was exported from a crosscoder of other models or layers than {store.root} "
                f"holds ({', '.join(f'{k}: {x} vs {y}' for k, (x, y) in differ.items())}); pass its own store"
            )
        return ids
    ids = {
        k: getattr(cfg, k) if getattr(cfg, k) is not None else rec.get(k)
        for k in ("model_a", "model_b", "layer_a", "layer_b")
    }
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise CrossdiffError(
            "the checkpoint does not say which models and layers it was trained on; pass --store STORE, or "
            f"--{' --'.join(k.replace('_', '-') for k in missing)}"
        )
    ids["d_a"] = cfg.d_a or rec.get("d_a") or ckpt.width
    ids["d_b"] = cfg.d_b or rec.get("d_b") or ckpt.width
    return ids


def _units(cfg: ImportConfig, ckpt: dl.ForkCheckpoint, store) -> dl.Units:
    """The fork's input units: its own normaliser when it has one, else what the user states."""
    own = ckpt.units()
    if own is not None:
        if cfg.input_units is not None:
            raise CrossdiffError(
                "the checkpoint carries its own activation normaliser (its inputs are known); drop --input-units"
            )
        return own
    if cfg.input_units is None:
        raise CrossdiffError(
            "the checkpoint does not record how its inputs were scaled; pass --input-units store (trained on the "
            "store's normalised activations), raw (raw activations) or scales with --scale-a X --scale-b Y"
        )
    if cfg.input_units == "store":
        if store is None:
            raise CrossdiffError("--input-units store needs --store")
        return dl.Units((store.scale_a, store.scale_b))
    if cfg.input_units == "raw":
        return dl.Units((1.0, 1.0))
    return dl.Units((cfg.scale_a, cfg.scale_b))


def _scales(ckpt: dl.ForkCheckpoint, units: dl.Units, store, ids: dict) -> tuple[tuple[float, float], bool]:
    """(crossdiff's scales, whether a store view is needed): the store's when the checkpoint's units are
    the store's up to one common factor (or the sparsity ranks nothing), else the checkpoint's own."""
    if store is None:
        rec = ckpt.sidecar.get("crossdiff_cfg", {})
        own = (rec.get("scale_a"), rec.get("scale_b"))
        if None not in own and all(dl.unit_ratio(g, s) == 1.0 for g, s in zip(units.gain, own)):
            return own, False  # a crossdiff export: its float64 scales, not the fork's float32 copy
        return units.gain, False
    want = (store.scale_a, store.scale_b)
    ratios = [dl.unit_ratio(g, s) for g, s in zip(units.gain, want)]
    if ckpt.sparsity != "batchtopk" or math.isclose(ratios[0], ratios[1], rel_tol=1e-6):
        return want, False
    return units.gain, True


def write_view(store, dest: Path, scales: tuple[float, float]) -> Path:
    """A store at `dest` that reads `store`'s files through links, with other normalisation scales."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in store.root.iterdir():
        if entry.name != runfolder.FILES["meta"] and not (dest / entry.name).exists():
            (dest / entry.name).symlink_to(entry.resolve())
    meta = runfolder.read(store.root, "meta")
    for key, scale in zip("ab", scales):
        # "imported": not one of the normalisations whose losses compare across models (inputs/store.py)
        meta["models"][key].update(scale=float(scale), normalisation="imported")
    meta["view_of"] = str(store.root.resolve())
    write_json_atomic(runfolder.path(dest, "meta"), meta)
    return dest


def _print_next(out: Path, store_path) -> None:
    store_arg = f" --store {store_path}" if store_path else " --store STORE"
    print(
        f"imported into {out}; next: crossdiff analyze --run {out}{store_arg}, then crossdiff verify --run {out}"
    )
