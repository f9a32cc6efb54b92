"""The functional share (crossdiff.coder.functional) against a brute-force reference (remove the latent,
recompute the error), on planted one-sided features whose other-model row never learned anything,
and the classification rules built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
from crossdiff.coder.functional import FunctionalShare, classify_by_share, functional_share, share_from_deltas
from crossdiff.controls.matching import classify
from crossdiff.controls.synthetic import A_ONLY, B_ONLY, SHARED, SyntheticConfig, SyntheticPairs


def _brute_force_deltas(cc, x_a, x_b, f_BF) -> tuple[np.ndarray, np.ndarray]:
    """ΔSSE_m(i) by definition: SSE of model m with latent i's activations zeroed, minus SSE with them."""
    hat_a, hat_b = cc.decode(f_BF)
    sse_a, sse_b = (x_a - hat_a).double().pow(2).sum(), (x_b - hat_b).double().pow(2).sum()
    out_a, out_b = [], []
    for i in range(f_BF.shape[1]):
        g_BF = f_BF.clone()
        g_BF[:, i] = 0
        ha, hb = cc.decode(g_BF)
        out_a.append(float((x_a - ha).double().pow(2).sum() - sse_a))
        out_b.append(float((x_b - hb).double().pow(2).sum() - sse_b))
    return np.array(out_a), np.array(out_b)


@pytest.mark.parametrize("n_a_excl,n_b_excl", [(0, 0), (3, 2)])
@torch.no_grad()
def test_deltas_equal_removing_the_latent_and_recomputing_the_error(n_a_excl, n_b_excl):
    torch.manual_seed(0)
    cfg = CrosscoderConfig(d_a=7, d_b=9, n_latents=16, k=5, sparsity="topk", n_a_exclusive=n_a_excl,
                           n_b_exclusive=n_b_excl)  # fmt: skip
    cc = Crosscoder(cfg, dec_init_norm=1.0)
    for p in (cc.b_dec_a, cc.b_dec_b, cc.b_enc):
        p.normal_()
    acc = FunctionalShare(cc)
    want_a, want_b, fires = np.zeros(16), np.zeros(16), np.zeros(16)
    for _ in range(3):  # streaming: the sums over batches equal the brute force summed over batches
        x_a, x_b = torch.randn(50, 7), torch.randn(50, 9)
        f_BF = cc.encode(x_a, x_b)
        acc.update(x_a, x_b, f_BF)
        fires += (f_BF > 0).sum(0).numpy()
        da, db = _brute_force_deltas(cc, x_a, x_b, f_BF)
        want_a, want_b = want_a + da, want_b + db
    assert (want_a != 0).sum() > 5 and (want_a < 0).any()  # the reference is not trivial
    np.testing.assert_allclose(acc.dsse_a_F.numpy(), want_a, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(acc.dsse_b_F.numpy(), want_b, rtol=1e-4, atol=1e-3)
    # Exclusive latents have no row in the other model: removing them cannot change its error.
    assert (acc.dsse_b_F[:n_a_excl] == 0).all() and (acc.dsse_a_F[16 - n_b_excl :] == 0).all()
    share = acc.share_b()
    np.testing.assert_allclose(share, share_from_deltas(want_a, want_b), rtol=1e-4, atol=1e-4)
    counts = acc.n_fire_F.numpy()
    np.testing.assert_array_equal(counts, fires)
    few = counts < np.median(counts)
    assert few.any() and np.isnan(acc.share_b(int(np.median(counts)))[few]).all()
    np.testing.assert_array_equal(acc.share_b(int(np.median(counts)))[~few], share[~few])
    batches = [(torch.randn(20, 7), torch.randn(20, 9)) for _ in range(2)]
    ref = FunctionalShare(cc)
    for x_a, x_b in batches:
        ref.update(x_a, x_b, cc.encode(x_a, x_b))
    np.testing.assert_array_equal(functional_share(cc, batches), ref.share_b())


def test_share_clamps_negative_deltas_and_is_nan_when_nothing_helps():
    share = share_from_deltas([4.0, 4.0, -1.0, 0.0, 2.0], [1.0, -3.0, 5.0, 0.0, 2.0])
    np.testing.assert_allclose(share[[0, 1, 2, 4]], [0.2, 0.0, 1.0, 0.5])
    assert np.isnan(share[3])
    assert list(classify_by_share([0.05, 0.1, 0.5, 0.9, np.nan], 0.1)) == ["a", "a", "", "b", ""]


@torch.no_grad()
def test_planted_one_sided_latents_have_a_one_sided_share_even_with_a_stale_other_row():
    """A crosscoder that holds the planted features exactly (latent i = feature i, f = its true
    activation), except that each exclusive feature also has a row in the other model that never
    learned anything: a random direction at 0.3× its own row's norm. The relative norm (0.23) calls
    those latents shared; removing the stale row *lowers* the other model's error, so their share
    is one-sided."""
    cfg = SyntheticConfig(d_a=32, d_b=40, n_shared=48, n_a_only=8, n_b_only=8, seed=3)
    gen = SyntheticPairs(cfg)
    gt, (scale_a, scale_b) = gen.gt, gen.norm_scales()
    gain_a, gain_b = scale_a * cfg.raw_gain_a, scale_b * cfg.raw_gain_b
    n = cfg.n_features
    cc = Crosscoder(CrosscoderConfig(d_a=cfg.d_a, d_b=cfg.d_b, n_latents=n, sparsity="l1"), dec_init_norm=0)
    dec_a = torch.from_numpy(gt.dirs_a_FD * gt.strength_a_F[:, None] * gain_a).float()
    dec_b = torch.from_numpy(gt.dirs_b_FD * gt.strength_b_F[:, None] * gain_b).float()
    rng = torch.Generator().manual_seed(0)
    stale_a, stale_b = (
        torch.nn.functional.normalize(torch.randn(n, d, generator=rng), dim=1) for d in (cfg.d_a, cfg.d_b)
    )
    a_only, b_only = torch.from_numpy(gt.kind_F == A_ONLY), torch.from_numpy(gt.kind_F == B_ONLY)
    dec_b[a_only] = stale_b[a_only] * 0.3 * dec_a[a_only].norm(dim=1, keepdim=True)
    dec_a[b_only] = stale_a[b_only] * 0.3 * dec_b[b_only].norm(dim=1, keepdim=True)
    cc.W_dec_a.copy_(dec_a)
    cc.W_dec_b.copy_(dec_b)
    cc.b_dec_a.copy_(torch.from_numpy(gt.mean_a_D * gain_a))
    cc.b_dec_b.copy_(torch.from_numpy(gt.mean_b_D * gain_b))
    acc = FunctionalShare(cc)
    for index in range(2):
        ch = gen.chunk(index, "eval")
        acc.update(ch.x_a_ND * scale_a, ch.x_b_ND * scale_b, ch.codes_NF)
    share = acc.share_b()
    rel = (dec_b.norm(dim=1) / (dec_a.norm(dim=1) + dec_b.norm(dim=1))).numpy()
    assert np.allclose(rel[a_only.numpy()], 0.3 / 1.3) and np.allclose(rel[b_only.numpy()], 1 / 1.3)
    assert (share[a_only.numpy()] <= 0.1).all(), share[a_only.numpy()]
    assert (share[b_only.numpy()] >= 0.9).all(), share[b_only.numpy()]
    ordinary = (gt.kind_F == SHARED) & ~gt.imbalanced_F
    assert ((share[ordinary] > 0.1) & (share[ordinary] < 0.9)).mean() > 0.9
    class_F = classify(cc, "functional", share)  # a standard crosscoder: by its share alone
    assert (class_F[a_only.numpy()] == A_ONLY).all() and (class_F[b_only.numpy()] == B_ONLY).all()
    assert (classify(cc, "auto")[a_only.numpy()] == SHARED).all()  # the relative norm misses them


@torch.no_grad()
def test_decoding_from_the_firing_entries_equals_the_crosscoders_decode():
    torch.manual_seed(1)
    cfg = CrosscoderConfig(d_a=5, d_b=6, n_latents=12, k=3, sparsity="topk", n_a_exclusive=2, n_b_exclusive=3)
    cc = Crosscoder(cfg, dec_init_norm=1.0)
    cc.b_dec_a.normal_()
    cc.b_dec_b.normal_()
    x_a, x_b = torch.randn(40, 5), torch.randn(40, 6)
    f_BF = cc.encode(x_a, x_b)
    rows_N, cols_N = f_BF.nonzero(as_tuple=True)
    got = FunctionalShare(cc)._decode_entries(40, rows_N, cols_N, f_BF[rows_N, cols_N])
    for g, want in zip(got, cc.decode(f_BF)):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
