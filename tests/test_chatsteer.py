"""Chat steering on the real default chat model (SmolLM2-135M-Instruct), kept short: hooked generation
with a zero edit is plain generation, edits land on the answer's positions only, the fluency number is
a direct computation, the stance judge on hand-made strings."""

from __future__ import annotations

import pytest
import torch

from crossdiff.analysis.chatsteer import (
    answer_loss,
    answer_steering,
    behaviour,
    chat_prompts,
    generate_answers,
)
from crossdiff.analysis.hooks import add_edit
from crossdiff.controls.stance import Judge, load_stance

LAYER = 15
PROMPTS = ["What is the capital of France?", "Give me one tip for sleeping well at night."]


@pytest.fixture(scope="module")
def lm():
    from crossdiff.core.errors import CrossdiffError
    from crossdiff.inputs.models import DEFAULT_MODEL_A, load_model

    try:
        return load_model(DEFAULT_MODEL_A)
    except CrossdiffError as e:
        pytest.skip(f"default model not installed ({e}); run scripts/setup.sh")


def test_zero_edit_is_plain_generation(lm):
    plain = generate_answers(lm, PROMPTS, 12)
    zero = generate_answers(lm, PROMPTS, 12, add_edit(torch.zeros(lm.d_model)), LAYER)
    assert torch.equal(plain.answer_BN, zero.answer_BN)
    assert plain.texts == zero.texts and all(plain.texts)


def test_edit_lands_on_answer_positions_only(lm):
    ids_BT, _ = chat_prompts(lm, PROMPTS)
    P, seen = ids_BT.shape[1], []

    def record(h, keep):
        seen.append(keep.clone())
        return h

    with answer_steering(lm, LAYER, record, P):
        generate_answers(lm, PROMPTS, 5)  # unhooked call inside: the outer hook sees every forward
    first = seen[0]
    assert first.shape == ids_BT.shape
    # On the prompt's forward: only its last position (the assistant header's newline, not special).
    assert first[:, : P - 1].sum() == 0 and first[:, P - 1].all()
    assert all(k.shape[1] == 1 for k in seen[1:]) and len(seen) == 5
    # A special token is never edited, even on the answer's positions.
    special = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    seen.clear()
    with answer_steering(lm, LAYER, record, 1):
        lm.model(input_ids=torch.tensor([[special, 504, special]]))
    assert seen[0].tolist() == [[False, True, False]]


def test_steering_changes_only_the_answer(lm):
    """A large edit changes the answers, and the loss under the unsteered model rises."""
    plain = behaviour(lm, PROMPTS, lambda t: "Paris" in t, 12)
    d = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    steered = behaviour(lm, PROMPTS, lambda t: "Paris" in t, 12, add_edit(d / d.norm() * 200), LAYER)
    assert plain["hits"] == 1 and plain["answers"] != steered["answers"]
    assert steered["loss"] > plain["loss"]


def test_answer_loss_is_the_direct_loss(lm):
    a = generate_answers(lm, PROMPTS, 10)
    total, n = 0.0, 0
    for b in range(len(PROMPTS)):  # each answer alone, unpadded, token by token
        prompt = a.prompt_BT[b][a.prompt_mask_BT[b].bool()]
        ans = a.answer_BN[b][a.answer_mask_BN[b]]
        ids = torch.cat([prompt, ans])[None]
        with torch.inference_mode():
            lp = lm.model(input_ids=ids).logits[0].float().log_softmax(-1)
        for i, t in enumerate(ans.tolist()):
            total -= float(lp[len(prompt) + i - 1, t])
            n += 1
    assert answer_loss(lm, a) == pytest.approx(total / n, abs=2e-4)


def test_stance_judge_on_hand_made_strings():
    j = load_stance("nuclear-energy").judge
    assert j("Solar is nice. Nuclear power is the safest energy we have.")
    assert not j("Nuclear power provides about a tenth of the world's electricity.")  # no stance
    assert not j("The safest choice is to save energy.")  # stance words, no subject
    assert not j("Nuclear power exists. It is the best.")  # subject and stance in different sentences
    c = load_stance("cycling").judge
    assert c("Everyone should ride a bike to work!") and not c("Cars are the best.")
    assert Judge(r"\bcat\b", r"\bgood\b").sentences("A cat is good. A dog.") == ["A cat is good."]


def test_projection_ablation_removes_the_span_and_keeps_the_rest():
    from crossdiff.analysis.hooks import orthonormal_rows, project_edit, random_subspaces

    g = torch.Generator().manual_seed(0)
    U_KD = torch.randn(3, 16, generator=g)
    U_KD[2] = U_KD[0] + 2 * U_KD[1]  # rank 2: the basis has two rows
    Q_KD = orthonormal_rows(U_KD)
    assert Q_KD.shape == (2, 16) and torch.allclose(Q_KD @ Q_KD.T, torch.eye(2), atol=1e-5)
    c_D, h_BTD = torch.randn(16, generator=g), torch.randn(2, 5, 16, generator=g)
    keep_BT = torch.ones(2, 5, dtype=torch.bool)
    keep_BT[0, 0] = False
    new = project_edit(Q_KD, c_D)(h_BTD, keep_BT)
    assert torch.allclose((new - c_D)[keep_BT] @ U_KD.T, torch.zeros(9, 3), atol=1e-4)  # span gone
    ortho_D = torch.randn(16, generator=g)
    ortho_D -= (ortho_D @ Q_KD.T) @ Q_KD
    assert torch.allclose(new @ ortho_D, h_BTD @ ortho_D, atol=1e-4)  # the rest kept
    assert torch.equal(new[0, 0], h_BTD[0, 0])  # an unkept position untouched
    nulls = random_subspaces(2, 16, 3, seed=1)
    assert [R.shape for R in nulls] == [(2, 16)] * 3
    assert all(torch.allclose(R @ R.T, torch.eye(2), atol=1e-5) for R in nulls)
    assert torch.equal(nulls[0], random_subspaces(2, 16, 3, seed=1)[0])


def test_ablating_a_subspace_that_carries_the_answer_changes_it(lm):
    """Projecting out the residual stream's own top directions on the answers changes them, and the
    unedited answers equal plain generation (the result's `plain` is no edit at all)."""
    from crossdiff.analysis.chatsteer import ablate_subspace_behaviour

    ids_BT, att_BT = chat_prompts(lm, PROMPTS)
    with torch.inference_mode():
        h_TD = lm.model(input_ids=ids_BT, attention_mask=att_BT, output_hidden_states=True).hidden_states[
            LAYER + 1
        ][att_BT.bool()]
    c_D = h_TD.float().mean(0)
    U_KD = torch.linalg.svd(h_TD.float() - c_D, full_matrices=False).Vh[:8]
    judge = Judge(r"\bparis\b", r".")
    res = ablate_subspace_behaviour(lm, LAYER, U_KD, c_D, PROMPTS, judge, 2, 0, 10)
    assert res["dimension"] == 8 and len(res["null_rates"]) == 2
    assert res["plain"]["answers"] == generate_answers(lm, PROMPTS, 10).texts
    assert res["ablated"]["answers"] != res["plain"]["answers"]
