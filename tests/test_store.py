"""The store reader on synthetic data: exact round trips, complete and reproducible shuffles, clean errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.store import (
    Store,
    activation_stats,
    heldout_mask,
    normalisation,
    sum_of_squares,
    write_synthetic_store,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    n = 9000
    # Column 0 carries the row number so every row can be identified after shuffling.
    x_a = torch.randn(n, 6, generator=g) * 3
    x_b = torch.randn(n, 10, generator=g)
    x_a[:, 0] = torch.arange(n, dtype=torch.float32)  # exact in bf16 up to 256 only, so use x_b too
    x_b[:, 0] = torch.arange(n, dtype=torch.float32) % 256
    x_b[:, 1] = torch.div(torch.arange(n), 256, rounding_mode="floor").float()
    store = write_synthetic_store(
        tmp_path_factory.mktemp("s") / "store", x_a, x_b, scale_a=0.5, scale_b=2.0, shard_tokens=2000
    )
    return store, x_a, x_b


def _row_ids(x_b):
    return (x_b[:, 1] * 256 + x_b[:, 0]).round().long()


def test_random_access_round_trip(synthetic):
    store, x_a, x_b = synthetic
    idx = [8999, 0, 4500, 1999, 2000, 4500]
    raw_a, raw_b = store.get(idx, normalised=False)
    torch.testing.assert_close(raw_a, x_a[idx].bfloat16().float(), rtol=0, atol=0)
    torch.testing.assert_close(raw_b, x_b[idx].bfloat16().float(), rtol=0, atol=0)
    norm_a, norm_b = store.get(idx)
    torch.testing.assert_close(norm_a, raw_a * 0.5)
    torch.testing.assert_close(norm_b, raw_b * 2.0)
    assert store.rows(idx)["chunk"].tolist() == [i // 64 for i in idx]


def test_row_batches_walk_the_first_rows_in_order_with_their_split(synthetic):
    """Store.row_batches (what analyze, its examples and verify walk): the first max_rows rows in store
    order, across shards, each flagged held-out exactly when the store's split says so."""
    store, _, _ = synthetic
    held = np.zeros(store.n_tokens, dtype=bool)
    for s in range(len(store.meta["shards"])):
        held[store.offsets[s] + store.split_rows(s, "heldout")] = True
    walked = list(store.row_batches(700, max_rows=5000))
    rows = np.concatenate([r for r, _ in walked])
    assert rows.tolist() == list(range(5000)) and max(len(r) for r, _ in walked) <= 700
    assert np.array_equal(np.concatenate([h for _, h in walked]), held[:5000])
    only = np.concatenate([r for r, _ in store.row_batches(700, heldout_only=True)])
    assert only.tolist() == np.flatnonzero(held).tolist() and 0 < len(only) < store.n_tokens


def test_each_epoch_visits_every_train_row_once(synthetic):
    store, _, _ = synthetic
    seen = torch.cat(
        [_row_ids(b) for _, b in store.batches(500, seed=3, epochs=1, normalised=False, window_tokens=3000)]
    )
    chunk = np.arange(9000) // 64
    expected = np.nonzero(~heldout_mask(chunk))[0]
    assert sorted(seen.tolist()) == expected.tolist()
    assert seen.tolist() != sorted(seen.tolist())  # actually shuffled
    held = torch.cat(
        [
            _row_ids(b)
            for _, b in store.batches(500, split="heldout", shuffle=False, epochs=1, normalised=False)
        ]
    )
    assert held.tolist() == np.nonzero(heldout_mask(chunk))[0].tolist()
    assert store.split_size("train") + store.split_size("heldout") == store.n_tokens


def test_resume_skips_to_the_same_batches(synthetic):
    store, _, _ = synthetic
    stream = store.batches(512, seed=7, window_tokens=3000)
    first = [next(stream)[1] for _ in range(40)]  # crosses epochs (about 16 batches per epoch)
    resumed = store.batches(512, seed=7, start=23, window_tokens=3000)
    for i in range(23, 40):
        assert torch.equal(next(resumed)[1], first[i])
    other = next(store.batches(512, seed=8, window_tokens=3000))[1]
    assert not torch.equal(other, first[0])


def test_open_errors(tmp_path):
    with pytest.raises(CrossdiffError, match="no activation store"):
        Store.open(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "settings.json").write_text("{}")
    with pytest.raises(CrossdiffError, match="incomplete"):
        Store.open(tmp_path / "half")


def test_sum_of_squares_is_exact_enough_and_independent_of_threads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9000, 640, generator=g) * 37.0  # > 2 row blocks, float32 like a harvest
    ref = float((x.double() ** 2).sum())
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(sum_of_squares(x))
    finally:
        torch.set_num_threads(before)
    assert got[0] == got[1]  # bit for bit
    assert got[0] == pytest.approx(ref, rel=1e-12)
    assert sum_of_squares(x[:0]) == 0.0


def test_normalisation_centres_and_old_shards_keep_the_uncentred_rule():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9000, 64, generator=g) * 3.0 + torch.linspace(-40, 40, 64)  # a large constant offset
    shards = [{"n_tokens": len(p), **activation_stats(p, "a")} for p in x.split(4000)]
    got = normalisation(shards, "a", 64)
    centred = x.double() - x.double().mean(0)
    assert got["normalisation"] == "centred"
    assert got["scale"] == pytest.approx((64 / centred.pow(2).sum(1).mean()).sqrt().item(), rel=1e-9)
    assert got["mean_sq_norm"] == pytest.approx(x.double().pow(2).sum(1).mean().item(), rel=1e-9)
    old = [{k: v for k, v in s.items() if k != "sum_a"} for s in shards]
    for uncentred in (normalisation(old, "a", 64), normalisation(shards, "a", 64, centred=False)):
        assert uncentred["normalisation"] == "uncentred"
        assert uncentred["scale"] == pytest.approx(
            (64 / x.double().pow(2).sum(1).mean()).sqrt().item(), rel=1e-9
        )
