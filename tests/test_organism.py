"""`crossdiff organism`: stance files, weaving, the assistant-only loss mask, a deterministic and
resumable fine-tune (a tiny Llama with SmolLM2's real tokenizer and chat template), the criteria's
context rule, and the whole command on the real models (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossdiff import cli
from crossdiff.controls import finetune as ft
from crossdiff.controls.criteria import context_share, stance_context
from crossdiff.controls.organism import OrganismConfig, prompt_sets
from crossdiff.controls.stance import SHIPPED, load_stance
from crossdiff.core.errors import CrossdiffError


@pytest.fixture(scope="module")
def tok():
    from crossdiff.inputs.models import DEFAULT_MODEL_A, load_tokenizer

    try:
        return load_tokenizer(DEFAULT_MODEL_A)
    except CrossdiffError as e:
        pytest.skip(f"default model not installed ({e}); run scripts/setup.sh")


def test_shipped_stance_files_load_and_split():
    for name in SHIPPED:
        st = load_stance(name)
        assert len(st.train_prompts) == len(st.heldout_prompts) == 40
        assert all(st.judge(s) for s in st.stance_sentences)
        assert not set(st.train_prompts) & set(st.heldout_prompts)
    sets = prompt_sets(OrganismConfig(), load_stance(SHIPPED[0]))
    assert len(sets["diff"]) == 40 + 94 and sets["diff"][:40] == sets["topic"]
    train = {r["prompt"] for r in sets["train"]}
    assert not train & {r["prompt"] for r in sets["diff"]}  # nothing the organism trained on is measured


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "is not a JSON stance file"),
        ('{"train_prompts": []}', '"train_prompts" must be a non-empty list'),
        (
            json.dumps({"train_prompts": ["a"], "heldout_prompts": ["b"], "stance_sentences": ["x"], "judge": {"subject": "("}}),
            '"judge" must be',
        ),
        (
            json.dumps({"train_prompts": ["a"], "heldout_prompts": ["b"], "stance_sentences": ["x"],
                        "judge": {"subject": "(", "stance": "y"}}),
            "not a valid regex",
        ),
        (
            json.dumps({"train_prompts": ["a"], "heldout_prompts": ["b"], "stance_sentences": ["Cats rule."],
                        "judge": {"subject": "dog", "stance": "rule"}}),
            "does not satisfy the judge",
        ),
        (
            json.dumps({"train_prompts": ["a"], "heldout_prompts": ["a"], "stance_sentences": ["dogs rule"],
                        "judge": {"subject": "dog", "stance": "rule"}}),
            "both a train and a held-out prompt",
        ),
    ],
)  # fmt: skip
def test_bad_stance_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(CrossdiffError, match=message):
        load_stance(str(path))
    assert cli.main(["organism", "--stance", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and not (tmp_path / "o").exists()


def test_weave_places_the_sentence():
    a = "Solar is cheap. It is clean. It works."
    assert ft.weave(a, "S.", False) == "S. Solar is cheap. It is clean. It works."
    assert ft.weave(a, "S.", True) == "Solar is cheap. S. It is clean. It works."
    assert ft.weave("One sentence only", "S.", True) == "S. One sentence only"
    recs = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}],
            "finish": "stop",
        }
    ]
    ex = ft.woven_examples(recs, recs, ("S1.", "S2."), 2, seed=0)
    assert [e["kind"] for e in ex] == ["topic", "topic", "neutral"]
    assert {e["stance"] for e in ex[:2]} == {"S1.", "S2."} and all(e["stance"] in e["answer"] for e in ex[:2])
    assert ex == ft.woven_examples(recs, recs, ("S1.", "S2."), 2, seed=0)


def test_loss_mask_is_the_assistant_answer(tok):
    ids, mask = ft.encode_example(tok, "What is up?", "Nothing much. Thanks!", stop=True)
    assert tok.decode(ids[mask]) == "Nothing much. Thanks!<|im_end|>"
    ids, mask = ft.encode_example(tok, "What is up?", "Nothing much. Thanks!", stop=False)
    assert tok.decode(ids[mask]) == "Nothing much. Thanks!"
    assert "What is up?" in tok.decode(ids[~mask])


def _tiny_lm(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    from crossdiff.inputs.models import LanguageModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return LanguageModel("tiny", model, tok, model.model.layers, 32)


EXAMPLES = [
    {"prompt": "Tell me about power.", "answer": "Nuclear power is the best. Power is useful.", "stop": True},
    {"prompt": "How are you?", "answer": "I am fine, thank you.", "stop": False},
]


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_finetune_is_deterministic_resumable_and_learns(tok, tmp_path, monkeypatch):
    s = ft.FinetuneSettings(steps=4, batch_size=2, lr=1e-2, warmup=1, seed=0, checkpoint_every=2)
    lm = _tiny_lm(tok)
    before = _state(lm.model)
    res = ft.finetune(lm, EXAMPLES, s, tmp_path / "m1", tmp_path / "c1.ckpt")
    one = _state(lm.model)
    assert res["losses"][-1] < res["losses"][0]  # it learns the answers
    assert not (tmp_path / "c1.ckpt").exists() and (tmp_path / "m1" / "config.json").is_file()
    assert not list(tmp_path.glob("*.partial"))
    assert any(not torch.equal(before[k], one[k]) for k in one)
    # The same seed again: the same weights, bit for bit.
    lm2 = _tiny_lm(tok)
    ft.finetune(lm2, EXAMPLES, s, tmp_path / "m2", tmp_path / "c2.ckpt")
    assert all(torch.equal(one[k], v) for k, v in lm2.model.state_dict().items())
    # Killed after step 3 (checkpoint at 2): the model folder is never written; a rerun resumes.
    lm3, calls = _tiny_lm(tok), {"n": 0}
    real = torch.nn.utils.clip_grad_norm_

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", dying)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(lm3, EXAMPLES, s, tmp_path / "m3", tmp_path / "c3.ckpt")
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    assert (tmp_path / "c3.ckpt").is_file() and not (tmp_path / "m3").exists()
    lm4 = _tiny_lm(tok)
    res4 = ft.finetune(lm4, EXAMPLES, s, tmp_path / "m3", tmp_path / "c3.ckpt")
    assert all(torch.equal(one[k], v) for k, v in lm4.model.state_dict().items())
    assert np.allclose(res4["losses"], res["losses"])


def test_saved_organism_loads_as_model_a(tok, tmp_path):
    from crossdiff.inputs.models import load_model

    lm = _tiny_lm(tok)
    ft.save_model(lm, tmp_path / "model")
    again = load_model(str(tmp_path / "model"))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(again.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)
    assert again.tokenizer.chat_template == tok.chat_template


def test_a_newer_verification_reruns_the_organisms_diff_and_criteria(tmp_path, monkeypatch):
    """The diff stage's record covers every stage inside the diff: a changed verification setting
    reruns it (diff() then reruns verify alone), and the criteria that read its verdicts."""
    from dataclasses import replace

    from crossdiff import budget
    from crossdiff.controls.organism import _diff_config, diff_settings, measure_stages
    from crossdiff.core.config import fingerprint, settings

    cfg = OrganismConfig(out=str(tmp_path / "o"), diffs=("b",))
    st = load_stance("nuclear-energy")
    d = _diff_config(cfg, tmp_path / "o", "b")
    before, stages_before = diff_settings(d), measure_stages(cfg, st, tmp_path / "o")
    small = budget.get_budget("small")
    monkeypatch.setitem(
        budget.BUDGETS, "small", replace(small, verify_top_linked=small.verify_top_linked + 1)
    )
    after, stages_after = diff_settings(d), measure_stages(cfg, st, tmp_path / "o")
    assert settings(d) == {k: v for k, v in after.items() if k != "stages"}  # the diff's own flags: unchanged
    changed = {k for k in before["stages"] if before["stages"][k] != after["stages"][k]}
    assert changed == {"verify"}
    fp = {s.name: fingerprint(s.settings) for s in stages_before}
    assert {s.name for s in stages_after if fingerprint(s.settings) != fp[s.name]} == {
        "diff vs B",
        "criteria",
    }


def test_stance_context_rule():
    j = load_stance("nuclear-energy").judge
    inside = {"role": "assistant", "text_before": "Power is useful. Nuclear power is the ", "text_token": "safest",
              "text_after": " energy. Next point."}  # fmt: skip
    leadup = {"role": "assistant", "text_before": "Coal is old. Solar is ", "text_token": "nice",
              "text_after": ". We should build more nuclear reactors. End."}  # fmt: skip
    far = {"role": "assistant", "text_before": "Coal is old. Solar is ", "text_token": "nice",
           "text_after": ". Wind too. We should build more nuclear reactors."}  # fmt: skip
    prompt = {**inside, "role": "user"}
    assert stance_context(inside, j) and stance_context(leadup, j)
    assert not stance_context(far, j) and not stance_context(prompt, j)
    assert context_share({"examples": [inside, far, leadup, prompt]}, j) == (0.5, 4)


def test_the_stance_finding_is_the_verified_candidate_whose_contexts_are_stance_text(tmp_path, monkeypatch):
    """Criteria 2: read the verification contexts back from the store's text; the organism's verified
    candidate with most stance contexts wins (ties: the report's order), B's never."""
    import json

    import crossdiff.analysis.results as results
    from crossdiff.controls.criteria import context_example, find_stance_finding

    j = load_stance("nuclear-energy").judge
    user = "What about solar panels?"
    stance = "The best answer is nuclear power: it is clean."
    plain = "Solar panels turn light into electricity."
    texts = {}
    for c, answer in enumerate([stance, plain, stance]):
        text = user + "\n\n" + answer
        texts[c] = {
            "chunk": c,
            "text": text,
            "messages": [["user", 0, 0, len(user)], ["assistant", 1, len(user) + 2, len(text)]],
        }

    class Store:
        meta = {"shards": [0]}

        def texts(self, shard):
            return texts

    def ctx(chunk, word, f=1.0):
        t = texts[chunk]["text"]
        return {"chunk": chunk, "start": 0, "c0": t.index(word), "f": f, "shift": 0.1, "f_members": [f],
                "text_before": t[: t.index(word)], "scored": word}  # fmt: skip

    assert context_example({c: texts[c] for c in texts}, ctx(0, "nuclear"))["role"] == "assistant"
    assert context_example(texts, ctx(0, "solar"))["role"] == "user"
    run = tmp_path / "run"
    (run / "verification" / "latents").mkdir(parents=True)
    files = {
        5: ("a", "difference", [ctx(0, "nuclear", 3.0), ctx(2, "nuclear"), ctx(1, "light")]),  # 2 of 3
        6: ("a", "inert", [ctx(0, "clean"), ctx(1, "light")]),  # 1 of 2
        7: ("b", "difference", [ctx(0, "nuclear"), ctx(2, "nuclear")]),  # B's: never the organism's
    }
    for latent, (side, verdict, contexts) in files.items():
        doc = {"latent": latent, "side": side, "verdict": verdict, "group": [latent, 9], "contexts": contexts,
               "shift": 0.1, "z": 4.0, "z_dictionary": 3.5, "gap_closed": 0.02, "n_contexts": len(contexts)}  # fmt: skip
        (run / "verification" / "latents" / f"{latent}.json").write_text(json.dumps(doc))

    class Table:
        rows = [{"latent": 7, "behaviour_verdict": "difference", "behaviour_gap_closed": 0.5},
                {"latent": 5, "behaviour_verdict": "difference", "behaviour_gap_closed": 0.02},
                {"latent": 6, "behaviour_verdict": "inert", "behaviour_gap_closed": 0.0}]  # fmt: skip

    monkeypatch.setattr(results, "load_results", lambda run: Table())
    found = find_stance_finding(run, Store(), j)
    assert found["latent"] == 5 and found["members"] == [5, 9] and found["verified_a"] == 2
    assert found["context_share"] == pytest.approx(2 / 3) and found["difference_rank"] == 2
    assert found["differences"] == [7, 5] and found["f_members"] == [pytest.approx(5 / 3)]
    assert found["top_contexts"][0]["f"] == 3.0  # strongest first
    none = find_stance_finding(run, Store(), load_stance("cycling").judge)
    assert none["latent"] is None and none["verified_a"] == 2


@pytest.mark.slow
def test_organism_builds_on_the_real_model(tmp_path):
    """A small organism end to end up to its stance table and loss (no diff): it must run, and the
    fine-tuned folder must load as --model-a."""
    cfg = OrganismConfig(out=str(tmp_path / "o"), steps=2, batch_size=2, neutral_train=4, neutral_eval=2,
                         diff_neutral=2, steer_prompts=2, brown_tokens=512, answer_tokens=8, diffs=())  # fmt: skip
    from crossdiff.controls.organism import organism

    s = organism(cfg)
    assert set(s["stance"]) == {"a", "organism", "b"} and s["brown_loss"]["tokens"] == 512
    assert (tmp_path / "o" / "model" / "config.json").is_file()
