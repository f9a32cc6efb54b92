"""analysis/examples.py: the random sample of a latent's firings (uniform, independent of batching) and
the activations around an example (equal to encoding those rows directly)."""

from __future__ import annotations

import numpy as np
import torch
from test_analyze import _setup

from crossdiff.analysis.analyze import AnalyzeConfig
from crossdiff.analysis.examples import context_activations, quantile_picks, sample_firings
from crossdiff.analysis.passes import _batches
from crossdiff.coder.crosscoder import Crosscoder
from crossdiff.inputs.store import Store


def _all_f(cc, store) -> np.ndarray:
    x_a, x_b = store.get(np.arange(store.n_tokens))
    with torch.inference_mode():
        return cc.encode(x_a, x_b).numpy()


def test_the_sample_is_uniform_over_firings_and_independent_of_batching(tmp_path):
    store_path, run = _setup(tmp_path, "dfc")
    store, cc = Store.open(store_path), Crosscoder.from_pretrained(run).eval()
    f_NF = _all_f(cc, store)
    cfg = lambda b: AnalyzeConfig(run=str(run), batch_size=b)
    got = [
        sample_firings(cc, store, [0, 1, 7], 40, _batches(store, cfg(b), False), "cpu") for b in (500, 1700)
    ]
    assert got[0] == got[1]  # the sample depends on (row, latent) only
    for j in (0, 1):
        rows = got[0][j]
        assert len(rows) == 40 and all(f_NF[r, j] > 0 for r in rows)
        fired = f_NF[f_NF[:, j] > 0, j]
        sampled = f_NF[rows, j]
        # Not the top: a uniform sample's median sits inside the population's middle half.
        assert np.quantile(fired, 0.25) < np.median(sampled) < np.quantile(fired, 0.75)
        assert sampled.min() < np.quantile(fired, 0.25) and sampled.max() > np.quantile(fired, 0.75)
    assert got[0][7] == []  # a latent that never fires has no sample


def test_context_activations_equal_encoding_the_rows_and_stay_in_the_chunk(tmp_path):
    store_path, run = _setup(tmp_path, "dfc")
    store, cc = Store.open(store_path), Crosscoder.from_pretrained(run).eval()
    f_NF = _all_f(cc, store)
    rows = [int(r) for r in np.flatnonzero(f_NF[:, 0] > 0)[:5]] + [63, 64]
    spans = context_activations(cc, store, {0: rows}, window=3, device="cpu")
    chunk = store.rows(np.arange(store.n_tokens))["chunk"]
    for r in rows:
        got = spans[(0, r)]
        assert [q for q, *_ in got] == [q for q in range(max(0, r - 3), r + 4) if chunk[q] == chunk[r]]
        for q, _s, _e, v in got:
            assert v == np.float32(f_NF[q, 0]) or abs(v - f_NF[q, 0]) < 1e-5
    assert all(q <= 63 for q, *_ in spans[(0, 63)]) and all(
        q >= 64 for q, *_ in spans[(0, 64)]
    )  # chunk_len 64


def test_quantile_picks_span_the_range():
    pairs = [(float(v), 100 + v) for v in range(100)]
    picks = quantile_picks(pairs, 5)
    assert np.allclose([q for *_, q in picks], [0.95, 0.725, 0.5, 0.275, 0.05])
    assert [v for v, *_ in picks] == [95.0, 72.0, 50.0, 27.0, 5.0] and picks[0][1] == 195.0
    assert quantile_picks([], 5) == [] and len(quantile_picks(pairs[:2], 5)) == 2  # no row twice


def test_the_sample_sees_every_batch_whatever_the_progress_bar_draws():
    """examples.counted passes every batch on, also those on which the bar redraws (tqdm's update then
    returns True): the quantile examples' sample must not depend on how fast the machine is."""
    from crossdiff.analysis.examples import counted

    class Bar:
        n = 0

        def update(self, k):
            self.n += k
            return True  # a redraw on every batch, as on a slow machine

    batches = [(np.arange(i, i + 3), np.zeros(3, dtype=bool)) for i in range(0, 12, 3)]
    bar = Bar()
    assert [r.tolist() for r, _ in counted(iter(batches), bar)] == [r.tolist() for r, _ in batches]
    assert bar.n == 12
