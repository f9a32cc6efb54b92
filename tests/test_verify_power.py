"""Verification with power (docs/verification.md): a rare latent's statistics are defined where it
fires, the fresh-text scan finds what the store's models would have written there and resumes to the
same result after a kill, the budgets count work so that no verdict depends on time, the exact
ablations left out are the least promising, and a verdict needs both nulls.

Legend: N tokens, D width, T positions.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from crossdiff.analysis import scan as scan_mod
from crossdiff.analysis import verify as verify_mod
from crossdiff.analysis.ablation import Candidate
from crossdiff.analysis.verify import VerifyConfig

# ----------------------------------------------------------------------------- rare statistics


def test_a_rare_latent_gets_its_functional_share_from_the_rows_it_fires_on(tmp_path):
    """A concept that never fires on a held-out row (the issue's planted word class) still gets a share,
    from the training rows; a frequent latent keeps its held-out share."""
    from test_analyze import _handmade, _planted

    from crossdiff.analysis.analyze import AnalyzeConfig
    from crossdiff.analysis.passes import heldout_share
    from crossdiff.coder.functional import FunctionalShare
    from crossdiff.inputs.store import Store, heldout_mask, write_synthetic_store

    x_a, x_b = _planted()
    held_N = heldout_mask(np.arange(len(x_a)) // 64)
    x_a[torch.as_tensor(held_N), 0] = 0.0  # latent 0's A-only concept: training rows only
    store = write_synthetic_store(tmp_path / "s", x_a, x_b, shard_tokens=3000, chunk_len=64)
    store = Store.open(tmp_path / "s")
    cc = _handmade("dfc")
    share_F = heldout_share(cc, store, AnalyzeConfig(run=".", store="."), "cpu")
    # Held-out only (the rule before): no share for latent 0.
    acc = FunctionalShare(cc)
    rows = np.flatnonzero(held_N)
    acc.update(*store.get(rows), cc.encode(*store.get(rows)))
    held_F = acc.share_b(10)
    assert np.isnan(held_F[0]) and np.isfinite(share_F[0]) and share_F[0] <= 0.1
    frequent = np.isfinite(held_F)
    assert frequent.sum() >= 4
    np.testing.assert_allclose(share_F[frequent], held_F[frequent], rtol=1e-9)


# ----------------------------------------------------------------------------- work, not seconds


def _cand(j, side="a"):
    return Candidate(j, side, 1.0, torch.zeros(4))


def test_verdicts_do_not_depend_on_time(tmp_path, monkeypatch):
    """The same candidates get the same exact ablations and verdicts whether the clock crawls or races."""
    cands = [_cand(j, "a" if j < 6 else "b") for j in range(10)]
    contexts = {c.latent: [{"f": 1.0}] * 4 for c in cands}

    def fake_latent(sides, cc, store, c, rows, cfg, factor):
        return {"verdict": "inert" if c.latent % 3 else "too rare", "n_contexts": len(rows), "contexts": []}

    monkeypatch.setattr(verify_mod, "verify_latent", fake_latent)
    cfg = VerifyConfig(run=".", top=3)
    got = []
    for step in (1e-6, 1e4):  # each perf_counter / time call moves the clock on by `step` seconds
        clock = itertools.count(0.0, step)
        monkeypatch.setattr(time, "perf_counter", lambda c=clock: float(next(c)))
        monkeypatch.setattr(time, "time", lambda c=clock: float(next(c)))
        out = tmp_path / f"v{step}"
        got.append(verify_mod._exact(None, None, None, cands, contexts, cfg, 1.0, out, None))
    assert got[0] == got[1]
    # 3 judged per side; `too rare` (latents 0, 3, 6, 9) does not use up the budget.
    judged = {j for j, r in got[0].items() if r["verdict"] != "too rare"}
    assert judged == {1, 2, 4, 7, 8}


def test_no_setting_of_verify_or_the_budgets_is_in_seconds_except_a_warning():
    import dataclasses

    from crossdiff.budget import Budget, verify_config

    names = {f.name for f in dataclasses.fields(VerifyConfig)}
    assert "budget_seconds" not in names and "warn_seconds" in names
    assert not any("verify" in f.name and "seconds" in f.name for f in dataclasses.fields(Budget))
    from crossdiff.budget import get_budget

    v = verify_config(get_budget("small"), "run", "store")
    assert v.warn_seconds is None and v.scan_tokens == get_budget("small").verify_scan_tokens


def test_the_ablations_left_out_are_the_least_promising():
    cands = [_cand(j) for j in range(6)]
    first = {0: 0.02, 1: -0.01, 2: 0.0, 3: 0.05, 4: -0.001, 5: 0.0}
    fired = {0: 5, 1: 3, 2: 0, 3: 9, 4: 2, 5: 0}  # 2 and 5 never fired in the first-order pass
    contexts = {0: [1] * 16, 1: [1] * 16, 2: [1] * 5, 3: [1] * 16, 4: [1] * 16, 5: [1] * 9}
    order = [c.latent for c in verify_mod.ablation_order(cands, first, fired, contexts)]
    assert order == [3, 0, 5, 2, 4, 1]
    contexts[5] = [1] * 3  # fewer than min_contexts: never ablated (too rare)
    assert 5 not in [c.latent for c in verify_mod.ablation_order(cands, first, fired, contexts, 4)]


def test_latents_linked_to_the_answers_have_an_ablation_budget_of_their_own(tmp_path, monkeypatch):
    """The analysis's candidates spend --top, the latents only the answer link added spend --top-linked
    (in the link's order, after the others: the first latent of every n-gram before the second of any,
    within an n-gram the one with most contexts first); too rare ones spend neither."""
    cands = [_cand(j, "a") for j in range(8)]
    first = {j: 0.01 * (j + 1) for j in range(4)}  # 0-3: the analysis's candidates, 3 most promising
    fired = {j: 5 for j in range(4)}
    contexts = {j: [{"f": 1.0}] * (8 if j == 6 else 4) for j in range(8)}
    # link_priority's keys: (place in its n-gram, -ratio, n-gram, -coverage, -lift, latent)
    linked = {4: (0, -3.0, "x", -1.0, -9.0, 4), 6: (1, -3.0, "x", -1.0, -2.0, 6),
              5: (0, -1.0, "y", -1.0, -5.0, 5), 7: (0, -0.5, "z", -0.9, -5.0, 7)}  # fmt: skip
    order = [c.latent for c in verify_mod.ablation_order(cands, first, fired, contexts, 4, linked)]
    assert order == [3, 2, 1, 0, 6, 5, 7, 4]  # 6 has the most contexts of "x": it measures x's group

    def fake_latent(sides, cc, store, c, rows, cfg, factor):
        return {"verdict": "too rare" if c.latent == 6 else "inert", "n_contexts": len(rows), "contexts": []}

    monkeypatch.setattr(verify_mod, "verify_latent", fake_latent)
    ordered = verify_mod.ablation_order(cands, first, fired, contexts, 4, linked)
    got = verify_mod._exact(None, None, None, ordered, contexts, VerifyConfig(run=".", top=1, top_linked=2),
                            1.0, tmp_path / "v", None, linked)  # fmt: skip
    assert sorted(got) == [3, 5, 6, 7]  # 6 is too rare: 5 and 7 fill the linked budget of 2
    assert [got[j]["linked"] for j in (3, 5, 7)] == [False, True, True]
    none = verify_mod._exact(None, None, None, ordered, contexts, VerifyConfig(run=".", top=1, top_linked=0),
                             1.0, tmp_path / "w", None, linked)  # fmt: skip
    assert sorted(none) == [3]


def test_a_larger_budget_adds_ablations_and_reuses_those_of_the_same_measure(tmp_path, monkeypatch):
    """`--top N` after a smaller N measures only the latents not measured yet; a latent measured under
    another measure key (a setting that changes results) is measured again; files beyond the budget or
    of another measure are not left beside the results."""
    cands = [_cand(j, "a") for j in range(6)]
    first = {j: 0.1 * (6 - j) for j in range(6)}
    contexts = {j: [{"f": 1.0}] * 4 for j in range(6)}
    measured = []

    def fake_latent(sides, cc, store, c, rows, cfg, factor):
        measured.append(c.latent)
        return {"verdict": "inert", "n_contexts": len(rows), "contexts": []}

    monkeypatch.setattr(verify_mod, "verify_latent", fake_latent)
    order = verify_mod.ablation_order(cands, first, {j: 5 for j in range(6)}, contexts, 4)
    out = tmp_path / "v"

    def run(top, measure):
        return verify_mod._exact(None, None, None, order, contexts, VerifyConfig(run=".", top=top), 1.0, out,
                                 None, None, measure)  # fmt: skip

    assert sorted(run(2, "m1")) == [0, 1] and measured == [0, 1]
    assert sorted(run(4, "m1")) == [0, 1, 2, 3] and measured == [0, 1, 2, 3]  # 0 and 1 reused
    assert sorted(run(2, "m2")) == [0, 1] and measured == [0, 1, 2, 3, 0, 1]  # another measure: again
    assert sorted(p.stem for p in (out / "latents").glob("*.json")) == ["0", "1"]  # 2, 3: m1's, gone
    assert all(json.loads((out / "latents" / f"{j}.json").read_text())["measure"] == "m2" for j in (0, 1))


def test_the_measure_key_ignores_the_budgets_only():
    from crossdiff.core.config import settings

    kept = {k for k in settings(VerifyConfig(run=".")) if k not in verify_mod.BUDGETS}
    assert {"top", "top_linked", "warn_seconds"}.isdisjoint(kept) and {
        "n_contexts",
        "n_random",
        "seed",
        "z",
    } <= kept


def test_a_difference_needs_both_nulls():
    cfg = VerifyConfig(run=".")
    from crossdiff.analysis.ablation import both_nulls as both

    assert both({"verdict": "difference", "z": 5.0, "z_dictionary": 3.1}, cfg) == "difference"
    assert both({"verdict": "difference", "z": 5.0, "z_dictionary": 2.9}, cfg) == "inert"
    assert both({"verdict": "difference", "z": 5.0, "z_dictionary": float("nan")}, cfg) == "inert"
    assert both({"verdict": "shared behaviour", "z": -5.0, "z_dictionary": -3.5}, cfg) == "shared behaviour"
    assert both({"verdict": "shared behaviour", "z": -5.0, "z_dictionary": -1.0}, cfg) == "inert"
    assert both({"verdict": "difference", "z": 5.0}, cfg) == "difference"  # no dictionary null possible


# ----------------------------------------------------------------------------- the fresh-text scan


def test_layer_activations_are_what_the_verification_reads(models_ab):
    """The scan's activations (blocks above the layer never run) equal Side.forward's tap, for the
    plain model, a planted one and a rotated one."""
    from crossdiff.inputs.align import tokenize
    from crossdiff.inputs.derive import random_direction, random_rotation
    from crossdiff.inputs.variants import Plant, Side

    lm = models_ab[0]
    tok = tokenize(lm.tokenizer, "The river ran past the old mill and the house by the road.")
    ids = torch.as_tensor(tok.input_ids)
    plant_T = np.zeros(len(ids), dtype=bool)
    plant_T[[2, 5]] = True
    v = random_direction(lm.d_model, 0) * 5.0
    for side in (
        Side(lm, 7),
        Side(lm, 7, plant=Plant("random", v, seed=1)),
        Side(lm, 7, rotation_DD=random_rotation(lm.d_model, 2)),
    ):
        ref = side.forward(ids, torch.arange(1, len(ids)), plant_T=plant_T).h_TD
        got = scan_mod.layer_activations(side, ids, plant_T)
        torch.testing.assert_close(got, ref.cpu(), atol=1e-4, rtol=1e-4)


DOCS = [
    "The house by the river had a red door, and the dog slept by the fire all day long.",
    "My mother said that the children walked to school along the road past the church.",
    "Water ran down the street after the storm; the men came out to look at the ground.",
    "A book of paper lay on the table in the office, and the boy read it by the window.",
    "The city was quiet at night. Her father drove the car home through the empty streets.",
]


def _fresh_setup(tmp_path: Path, models_ab):
    from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
    from crossdiff.inputs.variants import Side

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(DOCS))
    lm_a, lm_b = models_ab
    # The store read document 0 (chunk 4 the last one it numbered): the scan starts at document 1.
    texts = {4: {"doc": 0, "text": DOCS[0]}, 2: {"doc": 0, "text": DOCS[0]}}
    store = SimpleNamespace(
        meta={"corpus": f"text:{corpus}", "shards": [{}], "context_len": 64}, texts=lambda shard: texts
    )
    cfg = CrosscoderConfig(d_a=lm_a.d_model, d_b=lm_b.d_model, n_latents=24, sparsity="topk", k=3)
    cc = Crosscoder(cfg, generator=torch.Generator().manual_seed(0)).eval().requires_grad_(False)
    sides = (Side(lm_a, 5), Side(lm_b, 3))
    return store, cc, sides


def test_the_scan_starts_after_the_harvest_and_resumes_to_the_same_result(tmp_path, models_ab, monkeypatch):
    store, cc, sides = _fresh_setup(tmp_path, models_ab)
    assert scan_mod.fresh_start(store) == (1, 5)
    cfg = VerifyConfig(run=".", strong=1.0, n_contexts=3, min_contexts=2, scan_tokens=10_000)
    wanted = {Candidate(j, "a", 1e-6, torch.zeros(1)): 3 for j in range(24)}  # every firing is strong
    whole = scan_mod.scan(sides, cc, store, wanted, cfg, 10.0, tmp_path / "whole.json")
    s = whole.state
    assert s["complete"] and s["stopped"] in ("end of corpus", "enough contexts") and s["tokens"] > 40
    assert {p[1] for picks in s["picks"].values() for p in picks} <= set(range(5, 5 + len(DOCS)))
    for j, picks in s["picks"].items():  # strongest first, one per chunk, each in its chunk's text
        assert [p[0] for p in picks] == sorted((p[0] for p in picks), reverse=True)
        assert len({p[1] for p in picks}) == len(picks) <= s["chunks"][j] <= s["n_strong"][j]
        assert all(0 < p[2] <= len(s["texts"][str(p[1])]) for p in picks)
    assert sum(s["n_strong"].values()) == 3 * s["tokens"]  # top-3 coder: 3 firings per kept pair

    # A finished scan is read back, not repeated; one of other inputs (key) is not reused.
    def no_work(*args):
        raise AssertionError("scanned again")

    monkeypatch.setattr(scan_mod, "_scan_chunk", no_work)
    assert scan_mod.scan(sides, cc, store, wanted, cfg, 10.0, tmp_path / "whole.json").state == s
    with pytest.raises(AssertionError, match="scanned again"):
        scan_mod.scan(sides, cc, store, wanted, cfg, 10.0, tmp_path / "whole.json", key="other checkpoint")
    monkeypatch.undo()
    # Killed in the middle of document 3: the rerun resumes at document 3 and ends identically.
    calls = {"n": 0}
    real = scan_mod._scan_chunk

    def dying(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(scan_mod, "_scan_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        scan_mod.scan(sides, cc, store, wanted, cfg, 10.0, tmp_path / "killed.json")
    saved = json.loads((tmp_path / "killed.json").read_text())
    assert saved["doc"] == 3 and not saved["complete"]
    monkeypatch.setattr(scan_mod, "_scan_chunk", real)
    again = scan_mod.scan(sides, cc, store, wanted, cfg, 10.0, tmp_path / "killed.json")
    assert again.state == s
    # A token budget stops it early, at the same place every time.
    small = VerifyConfig(run=".", strong=1.0, n_contexts=3, min_contexts=2, scan_tokens=30)
    one = scan_mod.scan(sides, cc, store, wanted, small, 10.0, tmp_path / "b1.json").state
    assert one["stopped"] == "token budget" and 30 <= one["tokens"] < s["tokens"]
    assert scan_mod.scan(sides, cc, store, wanted, small, 10.0, tmp_path / "b2.json").state == one


def test_copies_edited_at_the_layer_equal_each_edit_run_alone(models_ab):
    """Side.forward runs the blocks below the layer once and broadcasts the edits there: each copy's
    log-probabilities equal those of its edit run as the only copy."""
    from crossdiff.inputs.align import tokenize
    from crossdiff.inputs.variants import Side

    for lm, layer in zip(models_ab, (5, 3)):
        tok = tokenize(lm.tokenizer, DOCS[0])
        ids = torch.as_tensor(tok.input_ids)
        tgt = torch.arange(3, len(ids))
        deltas_RTD = torch.randn(3, len(ids), lm.d_model, generator=torch.Generator().manual_seed(0))
        side = Side(lm, layer)
        together = side.forward(ids, tgt, deltas_RTD=deltas_RTD).logp_RS
        for r in range(3):
            alone = side.forward(ids, tgt, deltas_RTD=deltas_RTD[r : r + 1]).logp_RS[0]
            torch.testing.assert_close(together[r], alone, atol=2e-4, rtol=0)
        assert (together[0] - together[1]).abs().max() > 1e-2  # the edits do differ
