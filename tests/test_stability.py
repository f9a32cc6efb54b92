"""Seed stability: matching exclusive candidates across seeds by decoder cosine within one model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossdiff.analysis.stability import best_matches, format_table, seed_stability, shared_reappearance
from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
from crossdiff.core.errors import CrossdiffError


def _dfc(seed: int, n=64, ex=8) -> Crosscoder:
    cfg = CrosscoderConfig(d_a=24, d_b=32, n_latents=n, k=4, n_a_exclusive=ex, n_b_exclusive=ex)
    return Crosscoder(cfg, generator=torch.Generator().manual_seed(seed))


def _permuted(cc: Crosscoder, perm_a: np.ndarray) -> Crosscoder:
    """A copy whose A-exclusive latents are permuted (latent j of the copy = latent perm[j] of cc)."""
    out = Crosscoder(cc.cfg)
    out.load_state_dict(cc.state_dict())
    with torch.no_grad():
        ex = cc.cfg.n_a_exclusive
        out.W_dec_a[:ex] = cc.W_dec_a[torch.as_tensor(perm_a)]
    return out


def _cands(latents, side="a", verified=True):
    return [
        {"latent": str(j), "side": side, "verdict": f"candidate_{side}", "score": str(1.0 / (1 + j)),
         "behaviour_verdict": "difference" if verified else "inert"}
        for j in latents
    ]  # fmt: skip


def test_a_dictionary_matches_itself_and_finds_a_permutation():
    ref = _dfc(0)
    perm = np.random.default_rng(1).permutation(8)
    other = _permuted(ref, perm)
    match, cos = best_matches(ref, other, np.arange(8), "a")
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)
    np.testing.assert_array_equal(perm[match], np.arange(8))  # other's latent match[i] is ref's i
    table = seed_stability(ref, {1: other, 2: ref}, _cands(range(8)))
    assert table["n_runs"] == 3
    assert all(f["reappears_in"] == 2 and f["of"] == 2 for f in table["features"])
    assert table["summary"]["verified"]["reappear_all"] == 8


def test_unrelated_dictionaries_do_not_reappear():
    ref, other = _dfc(0), _dfc(7)
    table = seed_stability(ref, {1: other}, _cands(range(8)))
    # Random unit vectors in 24 dimensions: the best of 56 cosines is far below 0.7.
    assert all(f["reappears_in"] == 0 for f in table["features"])
    assert max(m["cosine"] for f in table["features"] for m in f["matches"]) < 0.7


def test_a_match_in_another_partition_does_not_count():
    """An A-exclusive direction that comes back as a *shared* latent is not a stable exclusive."""
    ref = _dfc(0)
    other = _permuted(ref, np.arange(8))
    with torch.no_grad():  # move A-exclusive latent 3's direction to shared latent 20 in the other seed
        other.W_dec_a[20] = ref.W_dec_a[3]
        other.W_dec_a[3] = -ref.W_dec_a[3]
    table = seed_stability(ref, {1: other}, _cands([3]))
    (f,) = table["features"]
    assert f["matched_in"] == 1 and f["reappears_in"] == 0
    assert f["matches"][0]["latent"] == 20 and not f["matches"][0]["exclusive"]
    assert "*" in format_table(table)


def test_b_side_uses_the_b_decoder():
    ref = _dfc(0)
    b_latents = np.arange(56, 64)  # the B-exclusive partition
    match, cos = best_matches(ref, ref, b_latents, "b")
    np.testing.assert_array_equal(match, b_latents)
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)
    with pytest.raises(CrossdiffError, match="no decoder row"):
        best_matches(ref, ref, np.array([0]), "b")  # A-exclusive latent 0 has no row in B


def test_shared_reappearance_counts_alive_shared_latents_that_come_back():
    """The baseline: the share of other seeds where a shared latent's decoder has cosine >= 0.7."""
    ref = _dfc(0)
    copy = _permuted(ref, np.arange(8))
    with torch.no_grad():  # in the copy, half the shared latents (8..55) point elsewhere in A only
        copy.W_dec_a[8:32] = _dfc(9).W_dec_a[8:32]
    both = shared_reappearance(ref, {1: copy, 2: ref}, n=1000)
    assert both["n"] == 48
    assert both["mean_reappear_a"] == pytest.approx((24 * 2 + 24 * 1) / (48 * 2))
    assert both["mean_reappear_b"] == 1.0  # B decoders untouched
    alive = np.zeros(64, dtype=bool)
    alive[[0, 9, 40, 41, 63]] = True  # only shared latents count: 9 (changed), 40 and 41 (kept)
    only = shared_reappearance(ref, {1: copy}, alive=alive)
    assert only["n"] == 3 and only["mean_reappear_a"] == pytest.approx(2 / 3)
    # unrelated dictionary: in 24 dimensions, the best of 56 random cosines rarely reaches 0.7
    assert shared_reappearance(ref, {1: _dfc(7)})["mean_reappear_a"] < 0.1
    assert shared_reappearance(ref, {1: copy}, alive=np.zeros(64, dtype=bool)) == {"n": 0}


def test_needs_another_seed():
    with pytest.raises(CrossdiffError, match="at least one other seed"):
        seed_stability(_dfc(0), {}, [])


def test_standard_crosscoder_side_comes_from_the_relative_norm():
    cfg = CrosscoderConfig(d_a=24, d_b=32, n_latents=16, k=4)
    ref = Crosscoder(cfg, generator=torch.Generator().manual_seed(0))
    other = Crosscoder(cfg)
    other.load_state_dict(ref.state_dict())
    with torch.no_grad():
        other.W_dec_b[5] = 0  # latent 5 writes only into A in the other seed: A-only there
    table = seed_stability(ref, {1: other}, _cands([5, 6]))
    by_latent = {f["latent"]: f for f in table["features"]}
    assert by_latent[5]["reappears_in"] == 1  # same A direction, and A-only in that seed
    assert by_latent[6]["matched_in"] == 1 and by_latent[6]["reappears_in"] == 0  # shared there


def test_report_section_lists_each_candidate_with_its_seed_count():
    from crossdiff.report.report import stability_html

    ref = _dfc(0)
    other = _permuted(ref, np.arange(8))
    table = seed_stability(ref, {1: other, 2: _dfc(5)}, _cands([1, 2]))
    html = stability_html(table)
    assert html.count('href="features/1.html"') == 1 and html.count('href="features/2.html"') == 1
    assert html.count(">2/3<") == 2  # seed 0 and the identical seed 1; not the unrelated seed 2


def test_the_diff_stage_reads_the_behavioural_verdicts(tmp_path):
    """crossdiff diff's stability stage marks a candidate verified when verify called it a difference
    (it read latents.csv without the joined behaviour.csv before, so nothing was ever verified)."""
    from crossdiff.analysis.results import BEHAVIOUR, write_stage
    from crossdiff.pipeline import _stability

    run = tmp_path / "run"
    ref = _dfc(0)
    ref.save_pretrained(run)
    _dfc(1).save_pretrained(tmp_path / "seed1")
    (run / "analysis").mkdir()
    head = "latent,partition,side,verdict,reason,score"
    rows = [f"{j},a_exclusive,a,candidate_a,,{1.0 / (1 + j)}" for j in range(2)]
    rows += [f"{j},shared,,shared,,NaN" for j in range(2, ref.cfg.n_latents)]
    (run / "analysis" / "latents.csv").write_text("\n".join([head, *rows]) + "\n")
    write_stage(
        run, BEHAVIOUR, {0: {"side": "a", "verdict": "difference"}, 1: {"side": "a", "verdict": "inert"}}
    )
    summary = _stability(run, {0: run, 1: tmp_path / "seed1"})
    table = json.loads((run / "stability.json").read_text())
    verified = {f["latent"]: f["verified"] for f in table["features"]}
    assert verified == {0: True, 1: False}
    assert summary["verified"]["n"] == 1


def test_a_match_counts_as_exclusive_by_its_functional_share_when_given():
    """A candidate found by the functional share (a DFC shared latent) reappears in a seed whose best
    match is a shared latent with a one-sided share, as the analysis would judge that seed."""
    ref = _dfc(0)
    other = Crosscoder(ref.cfg)
    other.load_state_dict(ref.state_dict())
    j = ref.partition.shared.start + 3  # a shared latent, balanced decoder norms
    cands = [{"latent": str(j), "side": "a", "verdict": "candidate_a", "score": "1.0"}]
    plain = seed_stability(ref, {1: other}, cands)
    assert plain["features"][0]["matches"][0]["cosine"] > 0.999
    assert plain["features"][0]["reappears_in"] == 0  # shared by partition and norm
    share = np.full(ref.cfg.n_latents, 0.5)
    share[j] = 0.02
    judged = seed_stability(ref, {1: other}, cands, shares={1: share})
    assert judged["features"][0]["reappears_in"] == 1
