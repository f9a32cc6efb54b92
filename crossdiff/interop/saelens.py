"""One model's side of a crosscoder as a SAELens SAE folder (cfg.json + sae_weights.safetensors), in that
model's raw activation units.

The side of model m is the crosscoder read from x_m alone: the latents m sees (a DFC's m-exclusive and
shared ones, in crossdiff's order), with the other model's input term left out, i.e. crossdiff's own
encode with the other input at its b_dec (`side_forward`):

    f = sparsify(ReLU(W_enc_m (x_m·s - b_dec_m) + b_enc))        x̂_m = (W_dec_m f + b_dec_m) / s

With s = scale_m folded in, SAELens' (x - b_dec) @ W_enc + b_enc, f @ W_dec + b_dec reads raw x:
W_enc = (s·W_enc_m)ᵀ, b_dec = b_dec_m / s, W_dec = W_dec_m / s, b_enc as is. Sparsity, per architecture:
batchtopk with its learned θ -> "jumprelu" with threshold_i = θ / (||d_A,i|| + ||d_B,i||) (f·norm > θ is
f > θ/norm); l1 -> "standard" (ReLU); topk -> "topk" with each latent's activation multiplied by its
norm sum (W_enc columns and b_enc × norm_i, W_dec rows / norm_i), so that SAELens' plain per-token top k
ranks as crossdiff does. The side alone is an SAE of model m, not the crosscoder: what the other model's
input added to each pre-activation is gone (its FVE is measured in docs/interop.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..coder.crosscoder import Crosscoder
from ..core.errors import CrossdiffError
from ..core.fsutil import write_bytes_atomic, write_json_atomic

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
ARCHITECTURES = {"batchtopk": "jumprelu", "l1": "standard", "topk": "topk"}


def side_latents(cc: Crosscoder, side: str) -> range:
    """Crossdiff's latents that model `side` ("a" / "b") reads and writes, in order."""
    return cc.partition.latents(side)


@torch.no_grad()
def side_forward(cc: Crosscoder, side: str, x_raw: Tensor) -> tuple[Tensor, Tensor]:
    """(f of the side's latents, x̂ in raw units) by crossdiff's own encode/decode, the other input at its
    b_dec so that it adds nothing to any pre-activation."""
    n = x_raw.shape[0]
    if side == "a":
        y_a, y_b = x_raw * cc.cfg.scale_a, cc.b_dec_b.expand(n, -1)
    else:
        y_a, y_b = cc.b_dec_a.expand(n, -1), x_raw * cc.cfg.scale_b
    f_BF = cc.encode(y_a, y_b)
    x_hat_a, x_hat_b = cc.denormalise(*cc.decode(f_BF))
    return f_BF[:, list(side_latents(cc, side))], {"a": x_hat_a, "b": x_hat_b}[side]


def sae_tensors(cc: Crosscoder, side: str) -> tuple[dict[str, Tensor], str]:
    """(SAELens state dict in raw units, its architecture name) for one side."""
    cfg = cc.cfg
    arch = ARCHITECTURES.get(cfg.sparsity)
    if arch is None:
        raise CrossdiffError(f"SAELens has no architecture for the {cfg.sparsity} sparsity")
    ids = list(side_latents(cc, side))
    W_enc, W_dec, b_dec, s, _ = cc.side(side)
    norm_a_F, norm_b_F = cc.decoder_norms()
    norm_M = (norm_a_F + norm_b_F)[ids].double()
    w_enc = W_enc.detach().double().T * s  # (d, M)
    b_enc = cc.b_enc.detach().double()[ids]
    w_dec = W_dec.detach().double() / s  # (M, d)
    out = {"b_dec": b_dec.detach().double() / s}
    if arch == "topk":  # rank f·norm with a plain top k: carry the norm in the activation itself
        w_enc, b_enc, w_dec = w_enc * norm_M, b_enc * norm_M, w_dec / norm_M.clamp_min(1e-30)[:, None]
    if arch == "jumprelu":
        theta = float(cc.threshold)
        if theta < 0:
            raise CrossdiffError(
                "this BatchTopK crosscoder has no learned threshold (θ < 0), so its selection is per batch, which "
                "SAELens cannot run; train it past the threshold's start"
            )
        out["threshold"] = torch.where(norm_M > 0, theta / norm_M.clamp_min(1e-30), math.inf)
    out.update(W_enc=w_enc, b_enc=b_enc, W_dec=w_dec)
    return {k: v.float().contiguous() for k, v in out.items()}, arch


def sae_config(cc: Crosscoder, side: str, arch: str) -> dict:
    """SAELens cfg.json (its SAEConfig.to_dict fields) and metadata naming the model and hook."""
    cfg = cc.cfg
    model, layer, d, scale = cfg.model(side)
    out = {
        "architecture": arch,
        "d_in": d,
        "d_sae": len(side_latents(cc, side)),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the normalisation is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            "model_name": model,
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_layer": layer,
            "crossdiff_side": side,
            "crossdiff_latents": [side_latents(cc, side).start, side_latents(cc, side).stop],
            "crossdiff_scale": scale,
        },
    }
    if arch == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
        out["metadata"]["activations"] = "crossdiff activation × (||d_A|| + ||d_B||)"
    return out


def export_side(cc: Crosscoder, side: str, out: str | Path) -> Path:
    """Write one side's SAELens folder; returns it."""
    from safetensors.torch import save

    out = Path(out)
    tensors, arch = sae_tensors(cc, side)
    config = sae_config(cc, side, arch)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / WEIGHTS, save(tensors))
    write_json_atomic(out / CONFIG, config)
    return out
