"""Behavioural verification (crossdiff/analysis/verify.py) and the runnable sides of a diff (crossdiff/inputs/variants.py),
on the real default pair: hooks that change nothing change nothing, the rotated copy behaves exactly
like the model, the planted side is the derived store's model, both models score exactly the same
characters, and the verdict rule (a self-diff can never show a difference).

Legend: T positions, D width, R copies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossdiff.analysis.ablation import summarise
from crossdiff.analysis.heldout import targets, tokenize_pair
from crossdiff.analysis.verify import VerifyConfig
from crossdiff.inputs.derive import (
    RANDOM_PLANT_RATE,
    random_direction,
    random_rotation,
    random_rows,
    word_pattern,
)
from crossdiff.inputs.variants import Plant, Side, Window

TEXT = "The old house by the river had a red door. My mother said the dog slept in the kitchen all day."


def _ids(lm, text=TEXT):
    from crossdiff.inputs.align import tokenize

    tok = tokenize(lm.tokenizer, text)
    return tok, torch.as_tensor(tok.input_ids)


def test_side_without_edits_equals_the_plain_model(models_ab):
    lm = models_ab[0]
    tok, ids = _ids(lm)
    tgt = torch.arange(1, len(ids))
    with torch.no_grad():
        plain = lm.model(input_ids=ids[None]).logits[0].float().log_softmax(-1)
    ref = plain[tgt - 1].gather(-1, ids[tgt, None])[:, 0]
    out = Side(lm, 15).forward(ids, tgt, deltas_RTD=torch.zeros(3, len(ids), lm.d_model))
    assert out.logp_RS.shape == (3, len(tgt))
    torch.testing.assert_close(out.logp_RS, ref.expand(3, -1), atol=1e-4, rtol=0)
    with lm.tap(15, stop=True) as cap, torch.no_grad():
        try:
            lm.model(input_ids=ids[None])
        except Exception:
            pass
    torch.testing.assert_close(out.h_TD, cap[0][0].float(), atol=1e-3, rtol=1e-3)  # batch 3 vs 1 GEMMs


def test_rotated_copy_behaves_like_the_model_and_reads_h_times_r(models_ab):
    lm = models_ab[0]
    _, ids = _ids(lm)
    tgt = torch.arange(1, len(ids))
    R = random_rotation(lm.d_model, 3)
    plain, rot = Side(lm, 10).forward(ids, tgt), Side(lm, 10, rotation_DD=R).forward(ids, tgt)
    torch.testing.assert_close(rot.logp_RS, plain.logp_RS, atol=2e-3, rtol=0)
    torch.testing.assert_close(rot.h_TD, plain.h_TD @ R, atol=1e-3, rtol=1e-4)
    # An edit in the rotated coordinates is the rotated-back edit in the model's own.
    delta = torch.randn(1, len(ids), lm.d_model)
    a = Side(lm, 10, rotation_DD=R).forward(ids, tgt, deltas_RTD=delta)
    b = Side(lm, 10).forward(ids, tgt, deltas_RTD=delta @ R.T)
    torch.testing.assert_close(a.logp_RS, b.logp_RS, atol=2e-3, rtol=0)


def test_planted_side_adds_v_on_the_word_tokens_only(models_ab):
    lm = models_ab[0]
    tok, ids = _ids(lm)
    v = random_direction(lm.d_model, 0) * 50
    plant = Plant("words", v, pattern=word_pattern(["house", "river", "dog"]))
    mask = plant.mask(Window(TEXT, 0, 0), tok.offsets, tok.special_mask)
    words = {TEXT[s:e].strip() for (s, e), m in zip(tok.offsets, mask) if m}
    assert words and words <= {"house", "river", "dog", "h", "ouse", "riv", "er"}
    tgt = torch.arange(1, len(ids))
    plain = Side(lm, 12).forward(ids, tgt)
    planted = Side(lm, 12, plant=plant).forward(ids, tgt, plant_T=mask)
    diff_TD = planted.h_TD - plain.h_TD
    torch.testing.assert_close(
        diff_TD[torch.as_tensor(mask)], v.expand(int(mask.sum()), -1), atol=1e-3, rtol=0
    )
    assert float(diff_TD[torch.as_tensor(~mask)].abs().max()) == 0.0
    assert not torch.allclose(planted.logp_RS, plain.logp_RS, atol=1e-2)  # it has behaviour


def test_random_rows_are_a_seeded_rate_independent_of_text():
    chunk, end = np.repeat(np.arange(200), 500), np.tile(np.arange(500), 200)
    a, b = random_rows(chunk, end, 0), random_rows(chunk, end, 1)
    assert abs(a.mean() - RANDOM_PLANT_RATE) < 0.002 and abs(b.mean() - RANDOM_PLANT_RATE) < 0.002
    assert (a == random_rows(chunk, end, 0)).all() and (a & b).sum() < 0.05 * a.sum()


def test_both_models_score_exactly_the_same_characters(models_ab):
    sides = [Side(lm, 5) for lm in models_ab]
    toks, al = tokenize_pair(sides, TEXT)
    ends = al.end_char
    for lo, hi in [(int(ends[2]), int(ends[6])), (int(ends[5]), int(ends[9]))]:
        spans = []
        for tok in toks:
            t = targets(tok, lo, hi)
            covered = "".join(TEXT[s:e] for s, e in tok.offsets[t])
            spans.append(covered)
            assert tok.offsets[t[0], 0] <= lo + 1 and tok.offsets[t[-1], 1] == hi
        assert spans[0].strip() == spans[1].strip() == TEXT[lo:hi].strip()


def _ctx(shift, randoms, gap=1.0, n=4):
    return {"shift": shift, "random_shifts": randoms, "gap": gap, "n_tokens": n, "first_order": shift}


def test_verdicts_from_shifts_against_the_random_null():
    cfg = VerifyConfig(run=".")
    rng = np.random.default_rng(0)
    null = lambda: (rng.normal(-0.01, 0.01, cfg.n_random)).tolist()
    assert summarise([_ctx(0.3, null()) for _ in range(8)], cfg)["verdict"] == "difference"
    assert summarise([_ctx(-0.3, null()) for _ in range(8)], cfg)["verdict"] == "shared behaviour"
    assert summarise([_ctx(-0.01, null()) for _ in range(8)], cfg)["verdict"] == "inert"
    assert summarise([_ctx(0.3, null()) for _ in range(3)], cfg)["verdict"] == "too rare"
    s = summarise([_ctx(0.3, null(), gap=0.6) for _ in range(8)], cfg)
    assert s["gap_closed"] == pytest.approx(0.5)


def test_self_diff_gap_zero_is_never_a_difference():
    # A equals B: g = 0, so |g| − |g⁻| = −|Δ| ≤ 0 for the latent whatever it does.
    cfg = VerifyConfig(run=".")
    ctxs = [_ctx(-abs(d), [-0.5] * cfg.n_random, gap=0.0) for d in np.linspace(0, 0.02, 8)]
    assert summarise(ctxs, cfg)["verdict"] != "difference"


def _two_latent_coders(d_a: int, d_b: int, u_D: torch.Tensor):
    """A crosscoder whose latent 1 writes u into A, and one where latents 1 and 2 are duplicates
    (the same encoder row, decoder rows u/3 and 2u/3): the same concept carried by two latents."""
    from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig

    g = torch.Generator().manual_seed(0)
    out = []
    for split in (False, True):
        cc = Crosscoder(CrosscoderConfig(d_a=d_a, d_b=d_b, n_latents=4, k=2), generator=g)
        with torch.no_grad():
            for p in (cc.W_enc_a, cc.W_enc_b, cc.W_dec_a, cc.W_dec_b, cc.b_dec_a, cc.b_dec_b, cc.b_enc):
                p.zero_()
            cc.b_enc[1:3] = 1.0  # latents 1 and 2 fire with f = 1 everywhere
            cc.W_enc_a[1:3, 0] = 1e-3  # and depend a little on the activation
            cc.W_dec_a[1] = u_D / 3 if split else u_D
            cc.W_dec_a[2] = 2 * u_D / 3 if split else 0.0
            cc.W_dec_a[0] = torch.randn(d_a, generator=g)  # unrelated
            cc.threshold.fill_(0.0)
        out.append(cc.eval().requires_grad_(False))
    return out


def test_a_group_of_duplicates_is_ablated_as_one_latent(models_ab):
    from crossdiff.analysis.ablation import Candidate, duplicates, score_context

    sides = [Side(lm, 5) for lm in models_ab]
    u_D = torch.randn(models_ab[0].d_model, generator=torch.Generator().manual_seed(1)) * 2.0
    single, split = _two_latent_coders(models_ab[0].d_model, models_ab[1].d_model, u_D)
    alive_F = torch.tensor([True, True, True, False])
    assert duplicates(split, "a", 1, alive_F, 0.9) == (1, 2)  # latent 0 unrelated, 3 dead
    assert duplicates(single, "a", 1, alive_F, 0.9) == (1,)
    _, al = tokenize_pair(sides, TEXT)
    c0 = int(al.end_char[6])
    dirs_RD = torch.nn.functional.normalize(
        torch.randn(3, len(u_D), generator=torch.Generator().manual_seed(2))
    )
    window = Window(TEXT, 0, 0)
    one = score_context(sides, single, Candidate(1, "a", 1.0, u_D), window, c0, dirs_RD, 10.0, 4)
    both = Candidate(1, "a", 1.0, u_D / 3, (1, 2), torch.stack([u_D / 3, 2 * u_D / 3]))
    two = score_context(sides, split, both, window, c0, dirs_RD, 10.0, 4)
    alone = score_context(sides, split, Candidate(1, "a", 1.0, u_D / 3), window, c0, dirs_RD, 10.0, 4)
    assert one is not None and two is not None and alone is not None
    # The group removes what the single latent removes; the candidate alone removes a third of it.
    assert two["l_ablated"] == pytest.approx(one["l_ablated"], abs=1e-3)
    assert two["random_shifts"] == pytest.approx(one["random_shifts"], abs=1e-4)
    assert two["first_order"] == pytest.approx(one["first_order"], rel=1e-4)
    assert abs(alone["l_ablated"] - one["l_ablated"]) > 10 * abs(two["l_ablated"] - one["l_ablated"])
    # The record is self-consistent: the segments add up to the context's log-probs and give its shift.
    seg = {k: np.array(v) for k, v in one["segments"].items()}
    assert seg["own"].sum() == pytest.approx(one["l_own"])
    assert seg["other"].sum() == pytest.approx(one["l_other"])
    assert seg["ablated"].sum() == pytest.approx(one["l_ablated"])
    closed = np.abs(seg["own"] - seg["other"]).sum() - np.abs(seg["ablated"] - seg["other"]).sum()
    assert one["shift"] == pytest.approx(closed / one["n_tokens"])
    assert one["gap"] == pytest.approx(np.abs(seg["own"] - seg["other"]).sum() / one["n_tokens"])


def test_a_null_direction_along_the_latent_reproduces_its_own_ablation(models_ab):
    # The null removes ||c_t|| r at each position; with r the latent's own unit direction that is
    # exactly c_t = f_t u, so the "random" shift must equal the latent's shift.
    from crossdiff.analysis.ablation import Candidate, score_context

    sides = [Side(lm, 5) for lm in models_ab]
    u_D = torch.randn(models_ab[0].d_model, generator=torch.Generator().manual_seed(1)) * 2.0
    single, _ = _two_latent_coders(models_ab[0].d_model, models_ab[1].d_model, u_D)
    _, al = tokenize_pair(sides, TEXT)
    other = torch.randn(len(u_D), generator=torch.Generator().manual_seed(3))
    dirs_RD = torch.nn.functional.normalize(torch.stack([u_D, other]))
    ctx = score_context(sides, single, Candidate(1, "a", 1.0, u_D), Window(TEXT, 0, 0), int(al.end_char[6]),
                        dirs_RD, 10.0, 4)  # fmt: skip
    assert ctx is not None and abs(ctx["shift"]) > 0
    assert ctx["random_shifts"][0] == pytest.approx(ctx["shift"], abs=1e-5)
    assert ctx["random_shifts"][1] != pytest.approx(ctx["shift"], abs=1e-3)


def test_an_ngram_context_is_scored_from_the_last_aligned_end_before_it(models_ab):
    """An n-gram anchor (verify's LINK_RULES 3) starts where a word starts, which need not end a token:
    its context starts at the last aligned end at or before it, whatever fires there, and the group is
    removed on the lead-up only. The model is causal, so the n-gram's first segment is ablated exactly
    as when the group is removed everywhere, and the later ones differ."""
    from crossdiff.analysis.ablation import Candidate, score_context

    sides = [Side(lm, 5) for lm in models_ab]
    u_D = torch.randn(models_ab[0].d_model, generator=torch.Generator().manual_seed(1)) * 2.0
    _, split = _two_latent_coders(models_ab[0].d_model, models_ab[1].d_model, u_D)
    both = Candidate(1, "a", 1.0, u_D / 3, (1, 2), torch.stack([u_D / 3, 2 * u_D / 3]))
    _, al = tokenize_pair(sides, TEXT)
    start = TEXT.index("river")  # " river": the aligned end before it is "the"'s
    snapped = int(al.end_char[al.end_char <= start][-1])
    assert snapped < start
    dirs_RD = torch.nn.functional.normalize(
        torch.randn(3, len(u_D), generator=torch.Generator().manual_seed(2))
    )
    w = Window(TEXT, 0, 0)
    ngram = score_context(sides, split, both, w, start, dirs_RD, 10.0, 4, anchor="ngram")
    firing = score_context(sides, split, both, w, snapped, dirs_RD, 10.0, 4)
    assert ngram is not None and ngram["c0"] == snapped and ngram["scored"].startswith(" river")
    for k in ("l_own", "l_other", "n_tokens"):
        assert ngram[k] == pytest.approx(firing[k], abs=1e-6)
    first, rest = (np.array(ngram["segments"]["ablated"]), np.array(firing["segments"]["ablated"]))
    assert first[0] == pytest.approx(rest[0], abs=1e-4) and np.abs(first[1:] - rest[1:]).max() > 1e-3
    # f: the group's strongest activation on the lead-up (both members fire everywhere)
    assert ngram["f"] == pytest.approx(max(ngram["f_members"])) and min(ngram["f_members"]) > 0
    assert score_context(sides, split, both, w, start, dirs_RD, 10.0, 4) is None  # not an aligned end


def test_dictionary_directions_are_the_other_alive_rows_of_the_candidates_model():
    from crossdiff.analysis.ablation import Candidate, dictionary_directions, dictionary_null
    from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig

    cc = Crosscoder(CrosscoderConfig(d_a=8, d_b=6, n_latents=64, k=4, n_a_exclusive=8, n_b_exclusive=8, scale_b=2.0),
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    ea, eb = cc.partition.n_a_exclusive, cc.partition.n_b_exclusive
    alive = torch.ones(64, dtype=torch.bool)
    alive[[5, ea + 3, 63]] = False  # dead: an A-exclusive, a shared and a B-exclusive latent
    cand = Candidate(ea + 1, "b", 1.0, torch.zeros(6), (ea + 1, ea + 2), torch.zeros(2, 6))
    U = dictionary_directions(cc, cand, alive)
    # B rows exist for the shared and B-exclusive latents; minus 2 dead ones and the group of 2.
    assert U.shape == (64 - ea - 2 - 2, 6)
    assert torch.allclose(U.norm(dim=1), torch.ones(len(U)))
    W = torch.nn.functional.normalize(cc.W_dec_b.detach().float() / cc.cfg.scale_b)
    kept = [j - ea for j in range(ea, 64) if alive[j] and j not in (ea + 1, ea + 2)]
    assert torch.allclose(U, W[kept], atol=1e-6)
    assert eb > 0
    ctxs = [{"dictionary_shifts": [-0.2, 0.0, 0.2]}, {"dictionary_shifts": [-0.2, 0.0, 0.2]}]
    got = dictionary_null(ctxs, 0.4)
    assert got["dictionary_null_mean"] == pytest.approx(0.0) and got["z_dictionary"] == pytest.approx(2.0)
