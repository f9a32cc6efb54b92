"""Verification signals against direct references: ridge vs lstsq, AUROC vs brute force, binned vs exact
AUROC, Latent Scaling vs lstsq, and the verdict rule.

Legend: N rows, D input width, C targets (probed latents).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crossdiff.analysis.probes import (
    LatentScaling,
    ProbeEval,
    RidgeProbe,
    auroc,
    binned_auroc,
    detection_note,
    verdict,
)


def _data(n=700, d=9, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Large means against small spreads, as in residual streams: the shifted sums must cope.
    mean_D = torch.linspace(-40, 60, d)
    x_ND = torch.randn(n, d, generator=g) * 0.5 + mean_D
    w_DC = torch.randn(d, c, generator=g)
    y_NC = ((x_ND - mean_D) @ w_DC + 0.3 * torch.randn(n, c, generator=g) - 0.5).relu()
    return x_ND, y_NC


def _streamed(x_ND, y_NC, batch=64) -> RidgeProbe:
    probe = RidgeProbe(x_ND.shape[1], y_NC.shape[1])
    for i in range(0, len(x_ND), batch):
        probe.update(x_ND[i : i + batch], y_NC[i : i + batch])
    return probe


@pytest.mark.parametrize("alpha", [1e-3, 0.3])
def test_ridge_matches_lstsq_on_the_augmented_system(alpha):
    x_ND, y_NC = _data()
    W_DC, b_C = _streamed(x_ND, y_NC).solve(alpha)
    x, y = x_ND.double(), y_NC.double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    n, d = x.shape
    lam = alpha * float(torch.trace(xc.T @ xc / n)) / d
    # min ||yc - xc W||²/n + λ||W||²  <=>  lstsq on [xc; sqrt(nλ) I] W = [yc; 0]
    A = torch.cat([xc, math.sqrt(n * lam) * torch.eye(d, dtype=torch.float64)])
    B = torch.cat([yc, torch.zeros(d, y.shape[1], dtype=torch.float64)])
    ref_W = torch.linalg.lstsq(A, B).solution
    torch.testing.assert_close(W_DC, ref_W, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b_C, y.mean(0) - x.mean(0) @ ref_W, rtol=1e-6, atol=1e-6)


def test_tiny_ridge_equals_ordinary_least_squares_with_bias():
    x_ND, y_NC = _data(seed=1)
    W_DC, b_C = _streamed(x_ND, y_NC, batch=100).solve(1e-12)
    X = torch.cat([x_ND.double(), torch.ones(len(x_ND), 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(X, y_NC.double()).solution
    torch.testing.assert_close(W_DC, ref[:-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_C, ref[-1], rtol=1e-5, atol=1e-4)


def test_probe_eval_r2_and_auroc_match_direct_computation():
    x_ND, y_NC = _data(n=1200, seed=2)
    probe = _streamed(x_ND[:800], y_NC[:800])
    W_DC, b_C = probe.solve(1e-3)
    ev = ProbeEval(W_DC, b_C, *probe.prediction_spread(W_DC))
    for i in range(800, 1200, 97):
        ev.update(x_ND[i : min(i + 97, 1200)], y_NC[i : min(i + 97, 1200)])
    r2_C, auc_C, fires_C = ev.result()
    x, y = x_ND[800:].double(), y_NC[800:].double()
    pred = x @ W_DC + b_C
    for c in range(y.shape[1]):  # R² over the rows where the latent fires (strong_C = 0)
        on = y[:, c] > 0
        yc, pc = y[on, c], pred[on, c]
        ref_r2 = 1 - ((yc - pc) ** 2).sum() / ((yc - yc.mean()) ** 2).sum()
        assert r2_C[c] == pytest.approx(float(ref_r2), rel=1e-4)
    for c in range(y.shape[1]):
        assert abs(auc_C[c] - auroc(pred[:, c].numpy(), (y[:, c] > 0).numpy())) < 2e-3
    assert fires_C.tolist() == (y > 0).sum(0).tolist()


def _brute_auroc(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_brute_force_pairs_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=200).astype(float)  # many ties
    labels = rng.random(200) < 0.3 + 0.05 * scores
    assert auroc(scores, labels) == pytest.approx(_brute_auroc(scores, labels), abs=1e-12)
    # binned with one bin per distinct score is exact too
    pos = torch.as_tensor(np.bincount(scores[labels].astype(int), minlength=6))[None]
    neg = torch.as_tensor(np.bincount(scores[~labels].astype(int), minlength=6))[None]
    assert binned_auroc(pos, neg)[0] == pytest.approx(_brute_auroc(scores, labels), abs=1e-12)


def test_auroc_is_nan_without_both_classes():
    assert math.isnan(auroc(np.arange(5.0), np.zeros(5, bool)))
    assert np.isnan(binned_auroc(torch.tensor([[0, 0]]), torch.tensor([[3, 1]]))[0])


def test_latent_scaling_matches_lstsq_per_model():
    g = torch.Generator().manual_seed(3)
    n, d, c = 400, 6, 2
    f_NC = torch.rand(n, c, generator=g) * (torch.rand(n, c, generator=g) < 0.3)
    dec_a_CD, dec_b_CD = torch.randn(c, d, generator=g), torch.randn(c, d, generator=g)
    resid_a, resid_b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    own_is_a = torch.tensor([True, False])
    own = torch.where(own_is_a[:, None], dec_a_CD, dec_b_CD)
    u_CD = own / own.norm(dim=1, keepdim=True)
    ls = LatentScaling(u_CD, dec_a_CD, dec_b_CD, own_is_a)
    for i in range(0, n, 128):
        ls.update(f_NC[i : i + 128], resid_a[i : i + 128], resid_b[i : i + 128])
    scale_a, scale_b = 0.5, 4.0
    beta_a, beta_b = ls.betas(scale_a, scale_b)
    for j in range(c):
        for beta, resid, dec, s in (
            (beta_a, resid_a, dec_a_CD, scale_a),
            (beta_b, resid_b, dec_b_CD, scale_b),
        ):
            y_ND = (resid + f_NC[:, j : j + 1] * dec[j]) / s  # the ε target in raw units
            X = (f_NC[:, j : j + 1] * u_CD[j]).reshape(-1, 1).double()
            ref = torch.linalg.lstsq(X, y_ND.reshape(-1, 1).double()).solution.item()
            assert float(beta[j]) == pytest.approx(ref, rel=1e-5)
    nu = ls.result(scale_a, scale_b)
    assert nu[0] == pytest.approx(float(beta_b[0] / beta_a[0]))
    assert nu[1] == pytest.approx(float(beta_a[1] / beta_b[1]))


@pytest.mark.parametrize(
    "args, expected",
    [(("a", 0), "dead"), (("", 50), "shared"), (("a", 50), "candidate_a"), (("b", 3), "candidate_b")],
)
def test_verdict_rule(args, expected):
    assert verdict(*args) == expected


def test_detection_note_informs_and_never_rejects():
    assert detection_note("a", 0.97, 0.41).startswith("context detectable by B (AUROC 0.97")
    assert detection_note("b", 0.95, 0.2).startswith("context detectable by A")
    assert detection_note("a", 0.7, 0.0).startswith("context not linearly detectable by B")
    assert detection_note("", 0.99, 0.9) == "" and detection_note("a", math.nan, math.nan) == ""


def test_auroc_and_r2_target_the_strong_firings():
    # y fires weakly (0.05) on noise tokens and strongly (1-2) on "signal" tokens; the probe sees the
    # signal only. Against "f > 0" its AUROC is diluted; against f >= 0.3 (strong) it is near 1.
    g = torch.Generator().manual_seed(0)
    n = 20000
    signal = torch.rand(n, generator=g) < 0.05
    noise = (torch.rand(n, generator=g) < 0.2) & ~signal
    y = torch.where(signal, 1 + torch.rand(n, generator=g), torch.where(noise, torch.full((n,), 0.05), 0.0))
    x = torch.stack(
        [signal.float() * (1 + 0.1 * torch.randn(n, generator=g)), torch.randn(n, generator=g)], 1
    )
    W, b = torch.tensor([[1.0], [0.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    center, spread = torch.zeros(1), torch.ones(1)
    every, strong = (
        ProbeEval(W, b, center, spread),
        ProbeEval(W, b, center, spread, strong_C=torch.tensor([0.3])),
    )
    for e in (every, strong):
        e.update(x, y[:, None])
    r2_s, auc_s, n_s = strong.result()
    _, auc_all, _ = every.result()
    assert int(n_s[0]) == int(signal.sum()) and auc_s[0] > 0.99 and auc_all[0] < 0.8
    y_s, pred_s = y[signal].double(), x[signal, 0].double()
    ref = 1 - ((y_s - pred_s) ** 2).sum() / ((y_s - y_s.mean()) ** 2).sum()
    assert r2_s[0] == pytest.approx(float(ref), rel=1e-4)  # float32 batch sums
