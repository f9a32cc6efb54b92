"""crossdiff export --to saelens, loaded by SAELens itself (the dev extra installs sae-lens): its encode
and decode on raw activations equal crossdiff's side (crossdiff.interop.saelens.side_forward), and so
does the reconstruction FVE."""

from __future__ import annotations

import json

import pytest
import torch

from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
from crossdiff.interop.export import ExportConfig, export
from crossdiff.interop.saelens import side_forward, side_latents

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is in the dev extra (pip install -e .[dev])")

D_A, D_B, F, K, B = 12, 20, 128, 6, 512


def _crosscoder(sparsity: str, ea: int, eb: int) -> Crosscoder:
    cfg = CrosscoderConfig(
        d_a=D_A, d_b=D_B, n_latents=F, sparsity=sparsity, k=K, n_a_exclusive=ea, n_b_exclusive=eb,
        scale_a=0.21, scale_b=3.7, model_a="ma", model_b="mb", layer_a=4, layer_b=7,
    )  # fmt: skip
    cc = Crosscoder(cfg, generator=torch.Generator().manual_seed(0), dec_init_norm=0.3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cc.b_enc.copy_(torch.randn(F, generator=g) * 0.05)
        cc.b_dec_a.copy_(torch.randn(D_A, generator=g))
        cc.b_dec_b.copy_(torch.randn(D_B, generator=g))
        cc.threshold.fill_(0.02)
    return cc


def _raw(side: str, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D_A if side == "a" else D_B, generator=g) * (5.0 if side == "a" else 0.3) + 1.0


def _fve(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize(
    "sparsity, ea, eb, arch",
    [
        ("batchtopk", 0, 0, "jumprelu"),
        ("batchtopk", 10, 14, "jumprelu"),
        ("l1", 10, 14, "standard"),
        ("topk", 0, 0, "topk"),
    ],
)
def test_saelens_side_matches_crossdiff_in_raw_units(tmp_path, sparsity, ea, eb, arch):
    from sae_lens import SAE

    cc = _crosscoder(sparsity, ea, eb)
    cc.save_pretrained(tmp_path / "run")
    out = export(ExportConfig(run=str(tmp_path / "run"), to="saelens", out=str(tmp_path / "sae")))
    for side in "ab":
        sae = SAE.load_from_disk(out / side)
        assert sae.cfg.architecture() == arch and sae.cfg.d_sae == len(side_latents(cc, side))
        x = _raw(side)
        f_ref, x_ref = side_forward(cc, side, x)
        with torch.no_grad():
            f = sae.encode(x)
            x_hat = sae.decode(f)
        if arch == "topk":  # the export carries each latent's norm sum in its activation (saelens.py)
            norm_a, norm_b = cc.decoder_norms()
            f = f / (norm_a + norm_b)[list(side_latents(cc, side))]
        assert torch.equal(f > 0, f_ref > 0)
        assert 0 < int((f > 0).sum()) < f.numel()
        torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x_hat, x_ref, rtol=1e-4, atol=1e-4 * float(x.abs().max()))
        assert _fve(x, x_hat) == pytest.approx(_fve(x, x_ref), abs=1e-5)
        meta = json.loads((out / side / "cfg.json").read_text())["metadata"]
        assert meta["model_name"] == ("ma" if side == "a" else "mb") and meta["hook_layer"] == (
            4 if side == "a" else 7
        )


def test_saelens_export_is_byte_stable(tmp_path):
    cc = _crosscoder("batchtopk", 10, 14)
    cc.save_pretrained(tmp_path / "run")
    one = export(ExportConfig(run=str(tmp_path / "run"), to="saelens", out=str(tmp_path / "one")))
    two = export(ExportConfig(run=str(tmp_path / "run"), to="saelens", out=str(tmp_path / "two")))
    for side in "ab":
        for name in ("cfg.json", "sae_weights.safetensors"):
            assert (one / side / name).read_bytes() == (two / side / name).read_bytes()


def test_unlearned_batchtopk_threshold_is_refused(tmp_path):
    from crossdiff.core.errors import CrossdiffError

    cc = _crosscoder("batchtopk", 0, 0)
    cc.threshold.fill_(-1.0)
    cc.save_pretrained(tmp_path / "run")
    with pytest.raises(CrossdiffError, match="no learned threshold"):
        export(ExportConfig(run=str(tmp_path / "run"), to="saelens", out=str(tmp_path / "sae")))
    assert not (tmp_path / "sae").exists()
