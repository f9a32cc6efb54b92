"""The Crosscoder module: layout, DFC isolation, inference encode/decode, units, checkpoints, errors."""

import json
import subprocess
import sys

import pytest
import torch

from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig, Partition
from crossdiff.core.errors import CrossdiffError

D_A, D_B = 24, 20


pytestmark = pytest.mark.usefixtures("one_thread")


def _dfc(sparsity="batchtopk", **kw) -> Crosscoder:
    cfg = CrosscoderConfig(
        d_a=D_A,
        d_b=D_B,
        n_latents=100,
        sparsity=sparsity,
        k=4,
        n_a_exclusive=6,
        n_b_exclusive=9,
        scale_a=3.0,
        scale_b=0.25,
        model_a="a/model",
        model_b="b/model",
        layer_a=5,
        layer_b=7,
        **kw,
    )
    return Crosscoder(cfg, generator=torch.Generator().manual_seed(0))


def test_public_import_is_lazy():
    code = "import sys, crossdiff; assert 'torch' not in sys.modules; from crossdiff import Crosscoder; print(crossdiff.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.1.0"


def test_partition_ranges_and_layout():
    part = Partition.from_fractions(200, 0.05)
    assert (part.a_exclusive, part.shared, part.b_exclusive) == (
        range(0, 10),
        range(10, 190),
        range(190, 200),
    )
    assert part.a_latents == range(0, 190) and part.b_latents == range(10, 200)
    assert Partition(50).shared == range(0, 50) and not Partition(50).is_dfc


@pytest.mark.parametrize("n_latents", [16384, 32768, 65536, 3 * 16384, 131072])
@pytest.mark.parametrize("frac", [0.001, 0.01, 0.05, 0.1, 0.25, 0.45])
def test_large_partitions_are_64_aligned(n_latents, frac):
    part = Partition.from_fractions(n_latents, frac)
    exact = round(n_latents * frac)
    bounds = (part.a_exclusive.stop, part.shared.stop, len(part.a_latents), part.b_latents.start)
    assert all(b % 64 == 0 for b in bounds), bounds  # every GEMM's width and column offset
    for n in (part.n_a_exclusive, part.n_b_exclusive):  # rounded up by less than one block
        assert exact <= n < exact + 64 and n % 64 == 0
    assert len(part.shared) > 0


def test_partition_rounding_examples():
    assert Partition.from_fractions(65536, 0.05).n_a_exclusive == 3328  # 3,277 exact
    assert Partition.from_fractions(16384, 0.05).n_b_exclusive == 832  # 819 exact
    # small or unaligned dictionaries keep the exact count (the fraction would move too much)
    assert Partition.from_fractions(4096, 0.05).n_a_exclusive == 205
    assert Partition.from_fractions(1024, 0.1).n_a_exclusive == 102
    assert Partition.from_fractions(16384 + 32, 0.05).n_a_exclusive == 821
    assert Partition.from_fractions(16384, 0.4999).n_a_exclusive == 8190  # aligned would leave none shared


def test_aligned_dfc_has_no_forbidden_weights(tmp_path):
    cfg = CrosscoderConfig(d_a=4, d_b=3, n_latents=16384, **_excl(Partition.from_fractions(16384, 0.05)))
    m = Crosscoder(cfg, generator=torch.Generator().manual_seed(0))
    assert m.W_enc_a.shape == m.W_dec_a.shape == (16384 - 832, 4)
    assert m.W_enc_b.shape == m.W_dec_b.shape == (16384 - 832, 3)
    x_a, x_b = torch.randn(8, 4), torch.randn(8, 3)
    f = m.encode(x_a, x_b)
    f_hi = f.clone()
    f_hi[:, :832] += 1.0  # A-exclusive activations do not reach x̂_B
    assert torch.equal(m.decode(f)[1], m.decode(f_hi)[1])
    m.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "cfg.json").read_text())
    assert (saved["n_a_exclusive"], saved["partition"]["shared"]) == (832, 16384 - 2 * 832)


def test_old_checkpoint_keeps_its_unaligned_partition(tmp_path):
    """A cfg.json written before partitions were aligned (819 = round(5% of 16,384)) loads as it is."""
    old = CrosscoderConfig(d_a=4, d_b=3, n_latents=16384, n_a_exclusive=819, n_b_exclusive=819)
    Crosscoder(old, generator=torch.Generator().manual_seed(0)).save_pretrained(tmp_path / "old")
    text = (tmp_path / "old" / "cfg.json").read_text()
    assert '"n_a_exclusive": 819' in text and '"a_exclusive": 819' in text
    m = Crosscoder.from_pretrained(tmp_path / "old")
    assert (m.partition.n_a_exclusive, m.partition.n_b_exclusive) == (819, 819)
    assert m.W_enc_b.shape[0] == m.W_dec_a.shape[0] == 16384 - 819
    assert m.partition != Partition.from_fractions(16384, 0.05)  # today's rule would give 832


def _excl(part: Partition) -> dict:
    return {"n_a_exclusive": part.n_a_exclusive, "n_b_exclusive": part.n_b_exclusive}


def test_dfc_forbidden_weights_do_not_exist():
    m = _dfc()
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "W_enc_a": (91, D_A),
        "W_dec_a": (91, D_A),
        "W_enc_b": (94, D_B),
        "W_dec_b": (94, D_B),
        "b_enc": (100,),
        "b_dec_a": (D_A,),
        "b_dec_b": (D_B,),
        "threshold": (),
    }
    norm_a, norm_b = m.decoder_norms()
    assert not norm_b[m.partition.a_exclusive.start : m.partition.a_exclusive.stop].any()
    assert not norm_a[m.partition.b_exclusive.start : m.partition.b_exclusive.stop].any()


def test_side_is_each_models_own_parameters_scale_and_latents():
    """`side(m)` is the one accessor the analysis reads a model's half through: its rows are the latents
    `decoder_norms` gives a norm in that model, and its tensors are the parameters themselves."""
    m = _dfc()
    norms = dict(zip("ab", m.decoder_norms()))
    for key, d, scale, layer in (("a", D_A, 3.0, 5), ("b", D_B, 0.25, 7)):
        side = m.side(key)
        assert side.W_dec is getattr(m, f"W_dec_{key}") and side.W_enc is getattr(m, f"W_enc_{key}")
        assert side.b_dec is getattr(m, f"b_dec_{key}") and side.scale == scale
        assert side.latents == m.partition.latents(key) and len(side.latents) == side.W_dec.shape[0]
        rows = torch.as_tensor(list(side.latents))
        assert torch.equal(norms[key][rows], side.W_dec.norm(dim=1))
        assert m.cfg.model(key) == (f"{key}/model", layer, d, scale)
    assert m.side("a").first == 0 and m.side("b").first == 6
    with pytest.raises(ValueError):
        m.side("c")


def test_init_follows_the_literature():
    m = _dfc()
    torch.testing.assert_close(m.W_dec_a.norm(dim=1), torch.full((91,), 0.1))
    torch.testing.assert_close(m.W_dec_b.norm(dim=1), torch.full((94,), 0.1))
    assert torch.equal(m.W_enc_a, m.W_dec_a) and torch.equal(m.W_enc_b, m.W_dec_b)
    assert not m.b_enc.any() and not m.b_dec_a.any() and float(m.threshold) == -1.0


def test_dfc_exclusive_latents_read_and_write_one_model():
    m = _dfc("l1")  # l1: encode is plain ReLU, so every dependence is visible
    with torch.no_grad():
        m.b_enc.fill_(0.5)
    part = m.partition
    a_ex, b_ex = (
        slice(part.a_exclusive.start, part.a_exclusive.stop),
        slice(part.b_exclusive.start, part.b_exclusive.stop),
    )
    x_a, x_b = torch.randn(16, D_A), torch.randn(16, D_B)
    f = m.encode(x_a, x_b)
    f_pa = m.encode(x_a + torch.randn(16, D_A), x_b)  # perturb x_A only
    assert not torch.equal(f[:, a_ex], f_pa[:, a_ex]) and torch.equal(f[:, b_ex], f_pa[:, b_ex])
    f_pb = m.encode(x_a, x_b + torch.randn(16, D_B))  # perturb x_B only
    assert torch.equal(f[:, a_ex], f_pb[:, a_ex]) and not torch.equal(f[:, b_ex], f_pb[:, b_ex])
    # x̂_B does not depend on A-exclusive latents at all (bitwise), nor x̂_A on B-exclusive ones.
    g = f.clone()
    g[:, a_ex] = torch.rand_like(g[:, a_ex]) * 100
    g[:, b_ex] = torch.rand_like(g[:, b_ex]) * 100
    (xa0, xb0), (xa1, xb1) = m.decode(f), m.decode(g)
    assert not torch.equal(xa0, xa1) and not torch.equal(xb0, xb1)
    h = f.clone()
    h[:, a_ex] = g[:, a_ex]
    assert torch.equal(m.decode(h)[1], xb0)
    h = f.clone()
    h[:, b_ex] = g[:, b_ex]
    assert torch.equal(m.decode(h)[0], xa0)
    f_req = f.detach().requires_grad_(True)
    m.decode(f_req)[1].sum().backward()
    assert not f_req.grad[:, a_ex].any() and f_req.grad[:, part.shared.start].any()


def test_encode_variants():
    x_a, x_b = torch.randn(32, D_A), torch.randn(32, D_B)
    topk = _dfc("topk")
    assert ((topk.encode(x_a, x_b) > 0).sum(1) <= 4).all()
    bt = _dfc("batchtopk")
    assert int((bt.encode(x_a, x_b) > 0).sum()) == 4 * 32  # θ not learned yet: per-batch top k·B
    bt.threshold.fill_(1e9)
    assert not bt.encode(x_a, x_b).any()
    bt.threshold.fill_(0.0)
    norm = sum(bt.decoder_norms())
    f = bt.encode(x_a, x_b)
    assert torch.equal(f > 0, bt.pre_acts(x_a, x_b).relu() * norm > 0)
    rec = bt(x_a, x_b)
    assert rec.x_hat_a.shape == (32, D_A) and rec.x_hat_b.shape == (32, D_B) and rec.f.shape == (32, 100)


def test_normalise_round_trip_uses_the_stored_scales():
    m = _dfc()
    x_a, x_b = torch.randn(5, D_A), torch.randn(5, D_B)
    n_a, n_b = m.normalise(x_a, x_b)
    torch.testing.assert_close(n_a, x_a * 3.0)
    torch.testing.assert_close(n_b, x_b * 0.25)
    back_a, back_b = m.denormalise(n_a, n_b)
    torch.testing.assert_close(back_a, x_a)
    torch.testing.assert_close(back_b, x_b)


def test_save_and_load_round_trip(tmp_path):
    m = _dfc()
    with torch.no_grad():
        m.b_dec_a.normal_()
        m.threshold.fill_(0.75)
    m.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["cfg.json", "crosscoder.safetensors"]
    cfg = json.loads((tmp_path / "ckpt" / "cfg.json").read_text())
    assert cfg["format_version"] == 1 and cfg["architecture"] == "dfc"
    assert cfg["partition"] == {
        "layout": ["a_exclusive", "shared", "b_exclusive"],
        "a_exclusive": 6,
        "shared": 85,
        "b_exclusive": 9,
    }
    assert (cfg["d_a"], cfg["d_b"], cfg["scale_a"], cfg["model_b"], cfg["layer_b"]) == (
        D_A,
        D_B,
        3.0,
        "b/model",
        7,
    )
    loaded = Crosscoder.from_pretrained(tmp_path / "ckpt")
    assert loaded.cfg == m.cfg
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x_a, x_b = torch.randn(8, D_A), torch.randn(8, D_B)
    assert torch.equal(loaded.encode(x_a, x_b), m.encode(x_a, x_b))


def test_unreadable_checkpoints_raise_one_line_errors(tmp_path):
    with pytest.raises(CrossdiffError, match="no crosscoder checkpoint"):
        Crosscoder.from_pretrained(tmp_path / "missing")
    good = tmp_path / "good"
    _dfc().save_pretrained(good)
    cases = {
        "garbage weights": lambda d: (d / "crosscoder.safetensors").write_bytes(b"\x00garbage" * 10),
        "truncated weights": lambda d: (d / "crosscoder.safetensors").write_bytes(
            (good / "crosscoder.safetensors").read_bytes()[:500]
        ),
        "bad json": lambda d: (d / "cfg.json").write_text("{not json"),
        "json list": lambda d: (d / "cfg.json").write_text("[1, 2]"),
        "future format": lambda d: (d / "cfg.json").write_text(
            json.dumps({**json.loads((good / "cfg.json").read_text()), "format_version": 99})
        ),
        "wrong widths": lambda d: (d / "cfg.json").write_text(
            json.dumps({**json.loads((good / "cfg.json").read_text()), "d_a": 7})
        ),
    }
    for name, corrupt in cases.items():
        d = tmp_path / name.replace(" ", "_")
        _dfc().save_pretrained(d)
        corrupt(d)
        with pytest.raises(CrossdiffError) as e:
            Crosscoder.from_pretrained(d)
        assert "\n" not in str(e.value) and str(d) in str(e.value), name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=101), "k=101"),
        (dict(k=0), "k=0"),
        (dict(n_a_exclusive=50, n_b_exclusive=50), "no shared"),
        (dict(n_a_exclusive=-1), ">= 0"),
        (dict(scale_a=0.0), "scale_a"),
        (dict(sparsity="relu"), "unknown sparsity"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(CrossdiffError, match=match):
        CrosscoderConfig(**{**dict(d_a=4, d_b=5, n_latents=100), **kwargs})


def test_check_store_names_the_mismatch():
    class FakeStore:
        d_a, d_b, scale_a, scale_b = D_A, D_B, 3.0, 0.25
        model_a, model_b = {"id": "a/model", "layer": 5}, {"id": "b/model", "layer": 7}

    cfg = _dfc().cfg
    cfg.check_store(FakeStore)
    FakeStore.d_b = 21
    with pytest.raises(CrossdiffError, match="model B.*width 20.*width 21"):
        cfg.check_store(FakeStore)
    FakeStore.d_b, FakeStore.model_a = D_B, {"id": "other", "layer": 5}
    with pytest.raises(CrossdiffError, match="model A"):
        cfg.check_store(FakeStore)


def _reference_encode(m: Crosscoder, x_a, x_b):
    """The pre-optimisation `encode`, written out: both models padded to F latents and added."""
    part, n_f = m.partition, m.cfg.n_latents
    pre_a = (x_a - m.b_dec_a) @ m.W_enc_a.T
    pre_b = (x_b - m.b_dec_b) @ m.W_enc_b.T
    f_pre = (
        torch.nn.functional.pad(pre_a, (0, n_f - pre_a.shape[1]))
        + torch.nn.functional.pad(pre_b, (part.b_latents.start, 0))
        + m.b_enc
    )
    f = f_pre.relu()
    norm = m.W_dec_a.new_zeros(n_f)
    norm[part.a_latents.start : part.a_latents.stop] += m.W_dec_a.norm(dim=1)
    norm[part.b_latents.start : part.b_latents.stop] += m.W_dec_b.norm(dim=1)
    if m.cfg.sparsity == "l1":
        return f
    if m.cfg.sparsity == "batchtopk" and m.threshold >= 0:
        return f * (f * norm > m.threshold)
    scaled = f * norm
    if m.cfg.sparsity == "topk":
        keep = torch.zeros_like(f, dtype=torch.bool).scatter_(1, scaled.topk(m.cfg.k, dim=1).indices, True)
    else:  # per-batch BatchTopK: the k·B largest over the whole batch
        flat = scaled.reshape(-1).topk(m.cfg.k * f.shape[0]).indices
        keep = torch.zeros(f.numel(), dtype=torch.bool).index_fill_(0, flat, True).view_as(f)
    return f * (keep & (scaled > 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparsity", ["batchtopk", "batchtopk-theta", "topk", "l1"])
@pytest.mark.parametrize("excl", [(0, 0), (6, 9)], ids=["standard", "dfc"])
def test_lean_encode_equals_the_reference_formula(sparsity, excl, dtype):
    g = torch.Generator().manual_seed(3)
    for n_tokens, d_a, d_b, n_latents, k in [(1, 24, 20, 100, 4), (37, 8, 13, 64, 3), (200, 16, 16, 300, 7)]:
        cfg = CrosscoderConfig(
            d_a=d_a,
            d_b=d_b,
            n_latents=n_latents,
            sparsity=sparsity.removesuffix("-theta"),
            k=k,
            n_a_exclusive=excl[0],
            n_b_exclusive=excl[1],
        )
        m = Crosscoder(cfg, generator=g).to(dtype)
        with torch.no_grad():
            for p in m.parameters():  # off the symmetric init: biases and exclusive rows all matter
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=dtype))
        x_a = torch.randn(n_tokens, d_a, generator=g, dtype=dtype)
        x_b = torch.randn(n_tokens, d_b, generator=g, dtype=dtype)
        with torch.no_grad():
            if sparsity == "batchtopk-theta":
                m.threshold.fill_(
                    float((_reference_encode(m, x_a, x_b) * sum(m.decoder_norms())).quantile(0.9))
                )
            want = _reference_encode(m, x_a, x_b)
        assert m._needs_graph(x_a, x_b)  # grad mode on and parameters require grad
        with torch.no_grad():
            assert not m._needs_graph(x_a, x_b)
            got = m.encode(x_a, x_b)
        with torch.inference_mode():
            got_inf = m.encode(x_a, x_b)
            act = m.encode_entries(x_a, x_b)
        got_grad = m.encode(x_a, x_b)  # the differentiable path
        assert got_grad.requires_grad and not got.requires_grad
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        for f in (got, got_inf, got_grad.detach(), act.f):
            assert f.shape == want.shape and f.dtype == want.dtype and f.is_contiguous()
            assert torch.equal(f > 0, want > 0), (sparsity, n_tokens)
            torch.testing.assert_close(f, want, **tol)
        assert (want > 0).any()
        rows, cols = (want > 0).nonzero(as_tuple=True)
        assert torch.equal(act.rows_N, rows) and torch.equal(act.cols_N, cols)
        assert torch.equal(act.vals_N, act.f[rows, cols])
