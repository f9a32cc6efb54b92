"""The crosscoder forks of dictionary_learning: their checkpoint layout, read into crossdiff's and written from it.

dictionary_learning on PyPI has no crosscoder. Its forks do: `CrossCoder` and `BatchTopKCrossCoder` in
science-of-finetuning/crosscoder_learning, and those plus `DedicatedFeatureCrossCoder` /
`DedicatedFeatureBatchTopKCrossCoder` in the DFC paper's trainer (superkaiba/dfc_learning). Both keep
the layout below in `dictionary_learning/dictionary.py` (docs/interop.md names the commits read):

    encoder.weight (L=2, D, F)   f = ReLU(Σ_l u_l · encoder.weight[l] + encoder.bias)      (no centring)
    encoder.bias (F,)
    decoder.weight (2, F, D)     û_l = f · decoder.weight[l] + decoder.bias[l]
    decoder.bias (2, D)
    code_normalization_id ()     1 = CROSSCODER: BatchTopK ranks f · Σ_l ||decoder.weight[l, i]||
    activation_mean, activation_std (2, D); activation_global_scale (2,); target_rms ()
                                 the optional normaliser, u_l = (x_l - mean_l) · global_scale_l (NaN mean: none)
    k (), threshold ()           BatchTopKCrossCoder: inference keeps f where f · Σ_l norms > threshold
    _partition_config            DFC (.pt only): {"dict_size", "model_a_exclusive_pct", "model_b_exclusive_pct"};
                                 exclusive counts int(F · pct), latents laid out [A-excl | B-excl | shared],
                                 forbidden weights stored as zeros (masked gradients)

One width D for both models: a pair of different widths is stored zero-padded to the larger one.
Files: a training run writes `model_final.pt` / `checkpoint_N.pt` (torch.save of the state dict) beside
`config.json` ({"trainer": {"dict_class", "k", ...}}); `save_pretrained` and the Hub write
`model.safetensors` beside `config.json` (the constructor's arguments and "dict_class").

Mapping to crossdiff (module docstring of crossdiff/coder/crosscoder.py), per side l, with the fork's input
u_l = (x_l - m_l)·g_l (raw x) and crossdiff's y_l = x_l·s_l, ρ_l = g_l / s_l:

    W_enc_l = ρ_l · encoder.weight[l]ᵀ   W_dec_l = decoder.weight[l] / ρ_l   b_dec_l = decoder.bias[l] / ρ_l + m_l·s_l
    b_enc = encoder.bias + Σ_l W_enc_l (b_dec_l - m_l·s_l)          threshold θ / ρ  (BatchTopK needs ρ_a = ρ_b)

Legend: L layers (the two models), D the fork's width, F latents.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..coder.crosscoder import Crosscoder, CrosscoderConfig
from ..core.errors import CrossdiffError
from ..core.fsutil import write_bytes_atomic, write_json_atomic

CROSSCODER_NORM_ID = 1
"""CodeNormalization.CROSSCODER (the enum's first auto() value): BatchTopK ranks f · Σ_l ||d_l||, as crossdiff."""
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SIDECAR = "crossdiff_export.json"
"""What crossdiff adds to its exports: the run's cfg.json, its exact b_enc and its threshold, which the
fork has no slot for (its encoder does not centre on b_dec; its ReLU CrossCoder has no threshold), so
that importing an export gives back the same bytes."""
TRAIN_FILES = ("model_final.pt",)
CLASSES = {
    "CrossCoder": ("l1", False),
    "BatchTopKCrossCoder": ("batchtopk", False),
    "DedicatedFeatureCrossCoder": ("l1", True),
    "DedicatedFeatureBatchTopKCrossCoder": ("batchtopk", True),
}


@dataclass(frozen=True)
class Units:
    """How the fork's inputs relate to raw activations, per side: u = (x - mean) · gain."""

    gain: tuple[float, float]
    mean: tuple[Tensor | None, Tensor | None] = (None, None)


@dataclass
class ForkCheckpoint:
    """A fork checkpoint as read: float32 tensors, the class it was saved from, its DFC partition."""

    tensors: dict[str, Tensor]
    dict_class: str
    n_a_exclusive: int = 0
    n_b_exclusive: int = 0
    sidecar: dict = field(default_factory=dict)
    path: Path = Path(".")

    @property
    def width(self) -> int:
        return int(self.tensors["encoder.weight"].shape[1])

    @property
    def n_latents(self) -> int:
        return int(self.tensors["encoder.weight"].shape[2])

    @property
    def sparsity(self) -> str:
        return CLASSES[self.dict_class][0]

    def units(self) -> Units | None:
        """The fork's activation normaliser as Units, None when it has none (NaN statistics)."""
        mean = self.tensors.get("activation_mean")
        if mean is None or bool(torch.isnan(mean).any()):
            return None
        gain = self.tensors["activation_global_scale"].double()
        means = tuple(m if bool(m.any()) else None for m in mean)  # a zero mean shifts nothing (-0.0 stays)
        return Units((float(gain[0]), float(gain[1])), means)


# ----------------------------------------------------------------------------- reading


def _load_pt(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or format errors: any of them means an unusable file
        raise CrossdiffError(f"cannot read {path} as a torch state dict: {str(e).splitlines()[0]}") from e


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CrossdiffError(f"cannot read {path}: {str(e).splitlines()[0]}") from e


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CrossdiffError(f"cannot read {path}: {e}") from e


def _files(path: Path) -> tuple[Path, dict]:
    """(weights file, the config.json beside it) of a checkpoint file or folder."""
    if path.is_file():
        return path, _read_json(path.parent / CONFIG)
    for name in (WEIGHTS, *TRAIN_FILES):
        if (path / name).is_file():
            return path / name, _read_json(path / CONFIG)
    raise CrossdiffError(
        f"no dictionary_learning checkpoint in {path} (expected {WEIGHTS} or model_final.pt); pass the "
        "checkpoint file itself (e.g. checkpoint_N.pt)"
    )


def _dict_class(config: dict, state: dict, sidecar: dict) -> str:
    """The class named by config.json (the Hub's "dict_class" or the trainer's) or crossdiff_export.json, else
    the one the state dict's keys and the constructor's arguments imply."""
    name = (
        config.get("dict_class") or config.get("trainer", {}).get("dict_class") or sidecar.get("dict_class")
    )
    if name is None:
        dfc = "_partition_config" in state or "model_a_exclusive_pct" in config
        name = ("DedicatedFeature" if dfc else "") + ("BatchTopKCrossCoder" if "k" in state else "CrossCoder")
    if name not in CLASSES:
        raise CrossdiffError(
            f"the checkpoint is a dictionary_learning {name}; crossdiff imports {', '.join(CLASSES)}"
        )
    return name


def _partition(config: dict, state: dict, n_f: int, dfc: bool) -> tuple[int, int]:
    """The fork's exclusive counts: int(F · pct) as its FeaturePartition.from_percentages computes them."""
    part = state.pop("_partition_config", None) or {**config.get("trainer", {}), **config}
    if not dfc:
        return 0, 0
    pcts = part.get("model_a_exclusive_pct"), part.get("model_b_exclusive_pct")
    if None in pcts:
        raise CrossdiffError(
            "the checkpoint is a DFC but records no partition (model_a_exclusive_pct / model_b_exclusive_pct); "
            "pass --n-a-exclusive and --n-b-exclusive"
        )
    return int(n_f * pcts[0]), int(n_f * pcts[1])


def read_checkpoint(path: str | Path, n_a_exclusive: int | None = None, n_b_exclusive: int | None = None):
    """Read a fork checkpoint (file or folder); `n_*_exclusive` override the DFC partition it records."""
    weights, config = _files(Path(path))
    state = _load_safetensors(weights) if weights.suffix == ".safetensors" else _load_pt(weights)
    if isinstance(state, dict) and any(str(k).startswith("_orig_mod.") for k in state):
        state = {k.split("_orig_mod.", 1)[-1]: v for k, v in state.items()}  # saved under torch.compile
    if not isinstance(state, dict) or "encoder.weight" not in state:
        keys = list(state)[:3] if isinstance(state, dict) else type(state).__name__
        raise CrossdiffError(f"{weights} is not a crosscoder state dict (keys {keys}...)")
    sidecar = _read_json(weights.parent / SIDECAR)
    name = _dict_class(config, state, sidecar)
    sparsity, dfc = CLASSES[name]
    dfc = dfc or n_a_exclusive is not None or n_b_exclusive is not None
    enc = state["encoder.weight"]
    if enc.dim() != 3 or enc.shape[0] != 2:
        raise CrossdiffError(
            f"{weights} has encoder.weight of shape {tuple(enc.shape)}; a two-model crosscoder has (2, D, F)"
        )
    n_f = int(enc.shape[2])
    ea, eb = _partition(config, state, n_f, dfc and n_a_exclusive is None)
    ea = ea if n_a_exclusive is None else n_a_exclusive
    eb = eb if n_b_exclusive is None else n_b_exclusive
    tensors = {
        k: v.float() if v.is_floating_point() else v for k, v in state.items() if isinstance(v, Tensor)
    }
    ckpt = ForkCheckpoint(tensors, name, ea, eb, sidecar, weights)
    _check_layout(ckpt, config)
    return ckpt


def _check_layout(ckpt: ForkCheckpoint, config: dict) -> None:
    t, d, n_f = ckpt.tensors, ckpt.width, ckpt.n_latents
    want = {"encoder.bias": (n_f,), "decoder.weight": (2, n_f, d), "decoder.bias": (2, d)}
    for name, shape in want.items():
        if name not in t or tuple(t[name].shape) != shape:
            got = tuple(t[name].shape) if name in t else "missing"
            raise CrossdiffError(f"{ckpt.path}: {name} is {got}, expected {shape} for (D={d}, F={n_f})")
    norm_id = int(t.get("code_normalization_id", torch.tensor(CROSSCODER_NORM_ID)))
    if ckpt.sparsity == "batchtopk" and norm_id != CROSSCODER_NORM_ID:
        raise CrossdiffError(
            f"{ckpt.path} ranks BatchTopK by code normalisation {norm_id}; crossdiff imports only CROSSCODER (1), "
            "the sum of the two decoder norms"
        )
    if ckpt.sparsity == "batchtopk" and t["threshold"].numel() != 1:
        raise CrossdiffError(f"{ckpt.path} has one threshold per layer (decoupled code); crossdiff has one")
    layers = config.get("encoder_layers") or config.get("trainer", {}).get("encoder_layers")
    if layers not in (None, [0, 1]):
        raise CrossdiffError(f"{ckpt.path} encodes from layers {layers} only; crossdiff reads both models")
    if ckpt.n_a_exclusive < 0 or ckpt.n_b_exclusive < 0 or ckpt.n_a_exclusive + ckpt.n_b_exclusive >= n_f:
        raise CrossdiffError(
            f"exclusive counts {ckpt.n_a_exclusive} + {ckpt.n_b_exclusive} do not fit {n_f} latents"
        )


# ----------------------------------------------------------------------------- partitions


def fork_index(n_f: int, ea: int, eb: int) -> Tensor:
    """fork_index[j] = the fork's latent for crossdiff latent j: crossdiff lays a DFC out
    [A-excl | shared | B-excl], the fork [A-excl | B-excl | shared]."""
    return torch.cat([torch.arange(ea), torch.arange(ea + eb, n_f), torch.arange(ea, ea + eb)])


def forbidden_weights(ckpt: ForkCheckpoint) -> dict[str, Tensor]:
    """The weights a DFC must not have, by name: A's read and write of B-exclusive latents and the mirror."""
    ea, eb, t = ckpt.n_a_exclusive, ckpt.n_b_exclusive, ckpt.tensors
    b_excl, a_excl = slice(ea, ea + eb), slice(0, ea)
    return {
        "encoder.weight[0][:, B-exclusive]": t["encoder.weight"][0][:, b_excl],
        "encoder.weight[1][:, A-exclusive]": t["encoder.weight"][1][:, a_excl],
        "decoder.weight[0][B-exclusive]": t["decoder.weight"][0][b_excl],
        "decoder.weight[1][A-exclusive]": t["decoder.weight"][1][a_excl],
    }


def check_forbidden_zero(ckpt: ForkCheckpoint) -> None:
    """CrossdiffError unless every forbidden weight of the DFC is exactly zero."""
    bad = {k: v for k, v in forbidden_weights(ckpt).items() if v.numel() and bool((v != 0).any())}
    if bad:
        detail = "; ".join(
            f"{k}: {int((v != 0).sum()):,} nonzero, max |w| {float(v.abs().max()):.3g}"
            for k, v in bad.items()
        )
        raise CrossdiffError(
            f"{ckpt.path} is not a valid DFC for partition ({ckpt.n_a_exclusive} A-exclusive, "
            f"{ckpt.n_b_exclusive} B-exclusive): forbidden weights are not zero ({detail}); "
            "check the partition sizes (--n-a-exclusive / --n-b-exclusive) or import it as a standard crosscoder"
        )


def check_padding_zero(ckpt: ForkCheckpoint, d_a: int, d_b: int) -> None:
    """A narrower model's columns beyond its width must be unused (zero in encoder and decoder)."""
    t = ckpt.tensors
    for layer, d in ((0, d_a), (1, d_b)):
        if d > ckpt.width:
            raise CrossdiffError(f"model {'AB'[layer]} has width {d} but the checkpoint only {ckpt.width}")
        pads = (
            t["encoder.weight"][layer, d:],
            t["decoder.weight"][layer, :, d:],
            t["decoder.bias"][layer, d:],
        )
        if any(bool((p != 0).any()) for p in pads):
            raise CrossdiffError(
                f"model {'AB'[layer]} has width {d} but the checkpoint uses columns beyond it (width "
                f"{ckpt.width}); name the store or the models it was trained on"
            )


# ----------------------------------------------------------------------------- to crossdiff


def unit_ratio(gain: float, scale: float) -> float:
    """ρ = gain / scale, exactly 1 within float32 rounding: the fork stores its scale as float32, crossdiff as
    a float64, so a crossdiff export comes back with ρ = 1 and unchanged weights."""
    rho = gain / scale
    return 1.0 if abs(rho - 1.0) <= 2.0**-23 else rho


def to_crosscoder(ckpt: ForkCheckpoint, cfg: CrosscoderConfig, units: Units) -> Crosscoder:
    """The fork's crosscoder as crossdiff's, in the normalised units y = raw × cfg.scale_* (formulas above)."""
    d_w, order = (cfg.d_a, cfg.d_b), fork_index(ckpt.n_latents, ckpt.n_a_exclusive, ckpt.n_b_exclusive)
    rho = (unit_ratio(units.gain[0], cfg.scale_a), unit_ratio(units.gain[1], cfg.scale_b))
    if ckpt.sparsity == "batchtopk" and not math.isclose(rho[0], rho[1], rel_tol=1e-6):
        raise CrossdiffError(
            "internal: BatchTopK needs one unit ratio for both models"
        )  # importer prevents it
    t64 = {k: v.double() for k, v in ckpt.tensors.items() if v.is_floating_point()}
    cc = Crosscoder(cfg, dec_init_norm=0.0)
    part = cfg.partition
    lat = (order[list(part.a_latents)], order[list(part.b_latents)])
    enc_bias = t64["encoder.bias"][order]
    for side, (W_enc, W_dec, b_dec) in enumerate(
        ((cc.W_enc_a, cc.W_dec_a, cc.b_dec_a), (cc.W_enc_b, cc.W_dec_b, cc.b_dec_b))
    ):
        d, ids = d_w[side], lat[side]
        scale = (cfg.scale_a, cfg.scale_b)[side]
        w_enc = rho[side] * t64["encoder.weight"][side, :d, ids].T
        w_dec = t64["decoder.weight"][side][ids, :d] / rho[side]
        m = units.mean[side]
        shift = m[:d].double() * scale if m is not None else 0.0
        bias = t64["decoder.bias"][side, :d] / rho[side] + shift
        cols = list(part.a_latents) if side == 0 else list(part.b_latents)
        enc_bias[cols] += w_enc @ (bias - shift)
        b_dec.data.copy_(bias)
        W_enc.data.copy_(w_enc)
        W_dec.data.copy_(w_dec)
    cc.b_enc.data.copy_(enc_bias)
    if ckpt.sparsity == "batchtopk":
        theta = float(ckpt.tensors["threshold"])
        cc.threshold.fill_(theta / rho[0] if theta >= 0 else -1.0)
    _exact_biases(cc, ckpt)
    return cc


def _exact_biases(cc: Crosscoder, ckpt: ForkCheckpoint) -> None:
    """Use the exact b_enc a crossdiff export recorded, when the fork's bias still agrees with it (the
    checkpoint was not trained further): the fold above is exact only to float rounding."""
    if "threshold" not in ckpt.tensors and "threshold" in ckpt.sidecar:  # the fork's CrossCoder has none
        cc.threshold.fill_(ckpt.sidecar["threshold"])
    exact = ckpt.sidecar.get("b_enc")
    if exact is None or len(exact) != cc.cfg.n_latents:
        return
    exact_F = torch.tensor(exact, dtype=torch.float32)
    if torch.allclose(cc.b_enc.data, exact_F, rtol=1e-5, atol=1e-5 * float(exact_F.abs().max().clamp_min(1))):
        cc.b_enc.data.copy_(exact_F)


# ----------------------------------------------------------------------------- from crossdiff


def fork_tensors(cc: Crosscoder) -> dict[str, Tensor]:
    """crossdiff's crosscoder as the fork's state dict, in raw units through the fork's normaliser
    (mean 0, global scale = crossdiff's scale), zero-padded to the wider model."""
    cfg, part = cc.cfg, cc.cfg.partition
    d, n_f = max(cfg.d_a, cfg.d_b), cfg.n_latents
    order = fork_index(n_f, cfg.n_a_exclusive, cfg.n_b_exclusive)
    enc = torch.zeros(2, d, n_f, dtype=torch.float64)
    dec = torch.zeros(2, n_f, d, dtype=torch.float64)
    dec_bias = torch.zeros(2, d, dtype=torch.float32)
    bias_F = cc.b_enc.detach().double().clone()
    sides = (
        (cc.W_enc_a, cc.W_dec_a, cc.b_dec_a, part.a_latents),
        (cc.W_enc_b, cc.W_dec_b, cc.b_dec_b, part.b_latents),
    )
    for side, (W_enc, W_dec, b_dec, latents) in enumerate(sides):
        width, ids = W_enc.shape[1], order[list(latents)]
        enc[side, :width, ids] = W_enc.detach().double().T
        dec[side, ids, :width] = W_dec.detach().double()
        dec_bias[side, :width] = b_dec.detach()
        bias_F[list(latents)] -= W_enc.detach().double() @ b_dec.detach().double()  # the fork does not centre
    fork_bias = torch.empty(n_f, dtype=torch.float64)
    fork_bias[order] = bias_F
    scales = torch.tensor([cfg.scale_a, cfg.scale_b], dtype=torch.float32)
    # Per-dimension std: uniform over each model's own columns, so that Σ std² = 1 / scale²; the fork
    # recomputes its global scale from it only when constructed with statistics, else loads the buffer.
    std = torch.zeros(2, d)
    for side, width in enumerate((cfg.d_a, cfg.d_b)):
        std[side, :width] = 1.0 / (float(scales[side]) * math.sqrt(width))
    out = {
        "target_rms": torch.tensor(1.0),
        "activation_mean": torch.zeros(2, d),
        "activation_std": std,
        "activation_global_scale": scales,
        "encoder.weight": enc.float(),
        "encoder.bias": fork_bias.float(),
        "decoder.weight": dec.float(),
        "decoder.bias": dec_bias,
        "code_normalization_id": torch.tensor(CROSSCODER_NORM_ID),
    }
    if cfg.rule.selects:
        out["k"] = torch.tensor(cfg.k, dtype=torch.int32)
        out["threshold"] = cc.threshold.detach().float().reshape(())
    return {k: v.contiguous() for k, v in out.items()}


def _pct(n: int, n_f: int) -> float:
    """A fraction p with int(n_f · p) == n (the fork recomputes the count that way)."""
    p = n / n_f
    while int(n_f * p) < n:
        p = math.nextafter(p, 1.0)
    return p


def fork_class(cc: Crosscoder) -> str:
    """The fork's class for this crosscoder."""
    cfg = cc.cfg
    if cfg.sparsity not in ("batchtopk", "l1"):
        raise CrossdiffError(
            f"the fork has no {cfg.sparsity} crosscoder (it has BatchTopK and ReLU/L1); export a batchtopk or l1 run"
        )
    dfc = "DedicatedFeature" if cfg.partition.is_dfc else ""
    return dfc + ("BatchTopKCrossCoder" if cfg.sparsity == "batchtopk" else "CrossCoder")


def fork_config(cc: Crosscoder) -> dict:
    """config.json of the fork's save_pretrained: its constructor's arguments. Not "dict_class": the DFC
    trainer's loader passes every key to the constructor, which refuses it (crossdiff_export.json names it)."""
    cfg = cc.cfg
    fork_class(cc)  # refuses a sparsity the fork lacks
    out = {
        "activation_dim": max(cfg.d_a, cfg.d_b),
        "dict_size": cfg.n_latents,
        "num_layers": 2,
        "code_normalization": "CROSSCODER",
    }
    if cfg.sparsity == "batchtopk":
        out["k"] = cfg.k
    if cfg.partition.is_dfc:
        out["model_a_exclusive_pct"] = _pct(cfg.n_a_exclusive, cfg.n_latents)
        out["model_b_exclusive_pct"] = _pct(cfg.n_b_exclusive, cfg.n_latents)
    return out


def write_checkpoint(cc: Crosscoder, out: str | Path, provenance: dict) -> Path:
    """The fork's checkpoint folder plus crossdiff_export.json: a standard crosscoder as save_pretrained writes it
    (model.safetensors, config.json; the Hub's layout), a DFC as its trainer does (model_final.pt, the state
    dict with _partition_config: the DFC classes' own safetensors loading fails on that entry)."""
    import io

    from safetensors.torch import save

    out = Path(out)
    config = fork_config(cc)  # refuses a sparsity the fork lacks before anything is written
    tensors = fork_tensors(cc)
    out.mkdir(parents=True, exist_ok=True)
    if cc.cfg.partition.is_dfc:
        state = dict(tensors)
        state["_partition_config"] = {
            "dict_size": cc.cfg.n_latents,
            "model_a_exclusive_pct": config["model_a_exclusive_pct"],
            "model_b_exclusive_pct": config["model_b_exclusive_pct"],
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        write_bytes_atomic(out / TRAIN_FILES[0], buf.getvalue())
    else:
        write_bytes_atomic(out / WEIGHTS, save(tensors, metadata={"format": "pt"}))
        write_json_atomic(out / CONFIG, config)
    sidecar = {
        **provenance,
        "dict_class": fork_class(cc),
        "crossdiff_cfg": cc.cfg.to_dict(),
        "b_enc": [float(v) for v in cc.b_enc.detach().float()],
        "threshold": float(cc.threshold),
    }
    write_json_atomic(out / SIDECAR, sidecar)
    return out
