"""The synthetic generator's ground truth is what it claims: who has which feature, how often it fires,
how the hard cases are placed, and that streams are seeded and reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossdiff.controls.synthetic import A_ONLY, B_ONLY, SHARED, SyntheticConfig, SyntheticPairs
from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.store import Store

SMALL = dict(d_a=16, d_b=20, n_shared=40, n_a_only=8, n_b_only=8, chunk_tokens=4096)


@pytest.fixture(scope="module")
def gen():
    return SyntheticPairs(SyntheticConfig(**SMALL, seed=3))


def test_directions_exist_only_in_the_models_that_have_the_feature(gen):
    gt = gen.gt
    assert [len(gt.indices(k)) for k in (SHARED, A_ONLY, B_ONLY)] == [40, 8, 8]
    norm_a, norm_b = np.linalg.norm(gt.dirs_a_FD, axis=1), np.linalg.norm(gt.dirs_b_FD, axis=1)
    np.testing.assert_allclose(norm_a[gt.has_a_F], 1.0, atol=1e-12)
    np.testing.assert_allclose(norm_b[gt.has_b_F], 1.0, atol=1e-12)
    assert (norm_a[~gt.has_a_F] == 0).all() and (norm_b[~gt.has_b_F] == 0).all()
    assert (gt.strength_a_F[~gt.has_a_F] == 0).all() and (gt.strength_b_F[~gt.has_b_F] == 0).all()
    assert (gt.strength_a_F[gt.has_a_F] > 0).all() and (gt.strength_b_F[gt.has_b_F] > 0).all()
    np.testing.assert_array_equal(gt.relative_norm_F()[gt.kind_F == A_ONLY], 0.0)
    np.testing.assert_array_equal(gt.relative_norm_F()[gt.kind_F == B_ONLY], 1.0)


def test_hard_cases_are_placed_as_configured(gen):
    cfg, gt = gen.cfg, gen.gt
    twins = np.nonzero(gt.twin_of_F >= 0)[0]
    assert len(twins) == round(cfg.twin_frac * 8) * 2
    for t in twins:
        partner = gt.twin_of_F[t]
        assert gt.kind_F[partner] == SHARED
        dirs = gt.dirs_a_FD if gt.kind_F[t] == A_ONLY else gt.dirs_b_FD
        assert cfg.twin_cos_min - 1e-9 <= dirs[t] @ dirs[partner] <= cfg.twin_cos_max + 1e-9
    assert len(set(gt.twin_of_F[twins].tolist())) == len(twins)  # distinct partners
    imb = np.nonzero(gt.imbalanced_F)[0]
    assert len(imb) == round(cfg.imbalanced_frac * 40) and (gt.kind_F[imb] == SHARED).all()
    weak_over_strong = np.minimum(gt.strength_a_F[imb], gt.strength_b_F[imb]) / np.maximum(
        gt.strength_a_F[imb], gt.strength_b_F[imb]
    )
    assert (
        (weak_over_strong >= cfg.imbalance_min - 1e-12) & (weak_over_strong <= cfg.imbalance_max + 1e-12)
    ).all()
    assert (gt.strength_b_F[imb] < gt.strength_a_F[imb]).any() and (
        gt.strength_a_F[imb] < gt.strength_b_F[imb]
    ).any()
    sizes = np.bincount(gt.group_F[gt.group_F >= 0])
    assert len(sizes) > 0 and (sizes == cfg.group_size).all()
    assert gt.base_freq_F.max() == pytest.approx(cfg.freq_max) and gt.base_freq_F.min() == pytest.approx(
        cfg.freq_min
    )


def test_switching_off_a_only_features_leaves_b_exactly_unchanged(gen):
    gt = gen.gt
    full = gen.chunk(0)
    no_a_only = gen.chunk(0, disabled_F=gt.indices(A_ONLY))
    no_b_only = gen.chunk(0, disabled_F=gt.indices(B_ONLY))
    no_shared = gen.chunk(0, disabled_F=gt.indices(SHARED))
    assert torch.equal(no_a_only.x_b_ND, full.x_b_ND)
    assert torch.equal(no_b_only.x_a_ND, full.x_a_ND)
    # ...and the checks can fail: each switch-off does change its own model, and shared ones both.
    assert not torch.equal(no_a_only.x_a_ND, full.x_a_ND)
    assert not torch.equal(no_b_only.x_b_ND, full.x_b_ND)
    assert not torch.equal(no_shared.x_a_ND, full.x_a_ND) and not torch.equal(no_shared.x_b_ND, full.x_b_ND)


def test_activations_are_exactly_the_planted_sum_without_noise_or_jitter():
    gen = SyntheticPairs(SyntheticConfig(**SMALL, noise_frac=0.0, act_jitter=0.0, seed=1))
    gt, cfg = gen.gt, gen.cfg
    ch = gen.chunk(2, "eval")
    codes = ch.codes_NF.double().numpy()
    want_a = (codes @ (gt.dirs_a_FD * gt.strength_a_F[:, None]) + gt.mean_a_D) * cfg.raw_gain_a
    want_b = (codes @ (gt.dirs_b_FD * gt.strength_b_F[:, None]) + gt.mean_b_D) * cfg.raw_gain_b
    np.testing.assert_allclose(ch.x_a_ND.numpy(), want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ch.x_b_ND.numpy(), want_b, rtol=1e-5, atol=1e-5)


def test_firing_frequencies_and_co_firing_match_the_ground_truth(gen):
    fires = torch.cat([gen.chunk(i).codes_NF > 0 for i in range(8)]).numpy()
    n, gt = fires.shape[0], gen.gt
    emp_F = fires.mean(0)
    sd_F = np.sqrt(gt.freq_F * (1 - gt.freq_F) / n)
    assert (np.abs(emp_F - gt.freq_F) < 5 * sd_F + 1e-4).all()
    assert gt.expected_l0 == pytest.approx(fires.sum(1).mean(), rel=0.02)
    # Members of one group co-fire far more often than independence predicts.
    g = gt.group_F[gt.group_F >= 0][0]
    i, j = np.nonzero(gt.group_F == g)[0][:2]
    assert (fires[:, i] & fires[:, j]).mean() > 3 * emp_F[i] * emp_F[j]


def test_streams_are_seeded_split_and_independent_of_batch_size():
    cfg = SyntheticConfig(**SMALL, seed=5)
    a, b = SyntheticPairs(cfg), SyntheticPairs(cfg)
    assert torch.equal(a.chunk(1).x_a_ND, b.chunk(1).x_a_ND)
    assert not torch.equal(a.chunk(1).x_a_ND, a.chunk(1, "eval").x_a_ND)
    other = SyntheticPairs(SyntheticConfig(**SMALL, seed=6))
    assert not np.array_equal(other.gt.dirs_a_FD, a.gt.dirs_a_FD)
    small = torch.cat([x for x, _ in a.batches(5000, 333)])
    big = torch.cat([x for x, _ in a.batches(5000, 4096)])
    assert small.shape == (5000, 16) and torch.equal(small, big)


def test_norm_scales_and_store(tmp_path):
    gen = SyntheticPairs(SyntheticConfig(**SMALL, seed=2))
    scale_a, scale_b = gen.norm_scales(16384)
    x_a, x_b = next(gen.batches(16384, 16384, "eval"))
    assert (x_a * scale_a).pow(2).sum(1).mean() == pytest.approx(16, rel=0.05)
    assert (x_b * scale_b).pow(2).sum(1).mean() == pytest.approx(20, rel=0.05)
    store = gen.write_store(tmp_path / "store", 6000)
    assert isinstance(store, Store) and (store.n_tokens, store.d_a, store.d_b) == (6000, 16, 20)
    assert store.scale_a == pytest.approx(gen.norm_scales()[0])
    raw_a, raw_b = store.get([0, 5999], normalised=False)
    want_a, want_b = next(gen.batches(6000, 6000))
    torch.testing.assert_close(raw_a, want_a[[0, 5999]].bfloat16().float(), rtol=0, atol=0)
    torch.testing.assert_close(raw_b, want_b[[0, 5999]].bfloat16().float(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad", [dict(freq_min=0.5, freq_max=0.1), dict(twin_cos_max=1.0), dict(imbalance_max=2.0), dict(d_a=0)]
)
def test_invalid_configs_are_refused(bad):
    with pytest.raises(CrossdiffError):
        SyntheticConfig(**{**SMALL, **bad})
