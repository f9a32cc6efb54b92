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
