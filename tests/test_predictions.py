"""analysis/predictions.py on the real default pair: each model's next tokens at a firing token are the
plain model's, removing a latent that writes nothing changes nothing, and the token effects are the
ablated minus the clean log-probabilities."""

from __future__ import annotations

import math

import torch
from test_verify import TEXT, _two_latent_coders

from crossdiff.analysis.ablation import Candidate
from crossdiff.analysis.heldout import tokenize_pair
from crossdiff.analysis.predictions import context_predictions
from crossdiff.inputs.variants import Side, Window


def _plain_logp(lm, text_ids, pos: int) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.as_tensor(text_ids)[None]).logits[0, pos].float().log_softmax(-1)


def _plain_top(lm, text_ids, pos: int, k: int) -> list[list]:
    vals, ids = _plain_logp(lm, text_ids, pos).topk(k)
    return [[lm.tokenizer.decode([int(i)]), math.exp(float(v))] for v, i in zip(vals, ids)]


def test_predictions_are_the_models_own_and_removing_nothing_changes_nothing(models_ab):
    sides = [Side(lm, 5) for lm in models_ab]
    d_a = models_ab[0].d_model
    u_D = torch.randn(d_a, generator=torch.Generator().manual_seed(1)) * 4.0
    single, _ = _two_latent_coders(d_a, models_ab[1].d_model, u_D)
    toks, al = tokenize_pair(sides, TEXT)
    k0 = 6
    c0 = int(al.end_char[k0])
    window = Window(TEXT, 0, 0)
    res, delta_V = context_predictions(sides, single, Candidate(1, "a", 1.0, u_D), window, c0, 10.0, top=5)
    for m, key, pos in ((0, "a", al.idx_a[k0]), (1, "b", al.idx_b[k0])):
        ref = _plain_top(models_ab[m], toks[m].input_ids, int(pos), 5)
        assert [t for t, _ in res[key]] == [t for t, _ in ref]
        assert [p for _, p in res[key]] == [round(p, 5) for _, p in ref] or all(
            abs(p - q) < 1e-3 for (_, p), (_, q) in zip(res[key], ref)
        )
    assert res["f"] > 0 and res["ablated"] != res["a"]  # u writes 4 × a random unit vector: it matters
    # Δ log p is ablated minus clean: the ablated top token's probability follows from it.
    clean_V = _plain_logp(models_ab[0], toks[0].input_ids, int(al.idx_a[k0]))
    top_id = int((clean_V + delta_V).argmax())
    assert models_ab[0].tokenizer.decode([top_id]) == res["ablated"][0][0]
    assert abs(math.exp(float(clean_V[top_id] + delta_V[top_id])) - res["ablated"][0][1]) < 2e-3
    # A latent whose decoder row is zero: removing it is the identity.
    zero, _ = _two_latent_coders(d_a, models_ab[1].d_model, torch.zeros(d_a))
    res0, delta0 = context_predictions(
        sides, zero, Candidate(1, "a", 1.0, torch.zeros(d_a)), window, c0, 10.0, top=5
    )
    assert res0["ablated"] == res0["a"] and float(delta0.abs().max()) < 1e-5
