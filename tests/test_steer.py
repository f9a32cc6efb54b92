"""Steering hooks and verification on the real default model (SmolLM2, layer 15), kept short."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from crossdiff import cli
from crossdiff.analysis.hooks import ablate_edit, add_edit, encode_batch, generate, latent_direction, steering
from crossdiff.analysis.steer import SteerConfig, steer, steer_latent
from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
from crossdiff.core.errors import CrossdiffError

LAYER_A, LAYER_B = 15, 9
PARIS = [("I love the city of", " Paris"), ("We flew to", " Paris"), ("Next summer we visit", " Paris")]
FAST = dict(strengths=(0.0, 4.0), n_random=5, new_tokens=4, n_contexts=3)


@pytest.fixture(scope="module")
def lm(models_ab):
    return models_ab[0]


def _crosscoder(sparsity="batchtopk") -> Crosscoder:
    cfg = CrosscoderConfig(
        d_a=576, d_b=640, n_latents=8, k=2, n_a_exclusive=2, n_b_exclusive=2, sparsity=sparsity,
        model_a="smollm2-135m", model_b="gemma3-270m", layer_a=LAYER_A, layer_b=LAYER_B, scale_a=0.5,
    )  # fmt: skip
    return Crosscoder(cfg, generator=torch.Generator().manual_seed(0))


def _logits(lm, text="The cat sat on the mat"):
    enc = lm.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        return lm.model(**enc).logits


def _paris_gradient(lm) -> torch.Tensor:
    """A direction known to raise log p(" Paris"): its gradient w.r.t. the layer's residual."""
    batch = encode_batch(lm, [p + c for p, c in PARIS], [len(p) for p, _ in PARIS])
    saved = []

    def hook(module, args, out):
        saved.append(out.detach().requires_grad_())
        return saved[-1]

    handle = lm.blocks[LAYER_A].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            pos = (batch.mask_BT.cumsum(-1) - 1).clamp_min(0)
            out = lm.model(input_ids=batch.ids_BT, attention_mask=batch.mask_BT, position_ids=pos)
            out.logits[:, -2].log_softmax(-1)[:, batch.ids_BT[0, -1]].sum().backward()
    finally:
        handle.remove()
    g = saved[0].grad.sum((0, 1))
    return g / g.norm()


def test_zero_strength_is_bit_identical_and_removal_restores(lm, one_thread):
    base = _logits(lm)
    # transformers may have installed its own output-capturing hooks earlier in the session: compare sets.
    hooks_before = (dict(lm.blocks[LAYER_A]._forward_hooks), dict(lm.model._forward_pre_hooks))
    d = latent_direction(_crosscoder(), 0, "a", typical=3.0)
    with steering(lm, LAYER_A, add_edit(0.0 * d.d_raw_D)):
        assert torch.equal(_logits(lm), base)
    with steering(lm, LAYER_A, add_edit(50.0 * d.d_raw_D)):
        assert not torch.equal(_logits(lm), base)
    assert (dict(lm.blocks[LAYER_A]._forward_hooks), dict(lm.model._forward_pre_hooks)) == hooks_before
    assert torch.equal(_logits(lm), base)


def test_special_tokens_are_never_edited(models_ab, one_thread):
    gemma = models_ab[1]  # Gemma prepends BOS; SmolLM2 has none
    enc = gemma.tokenizer("Hello world", return_tensors="pt")
    seen = []
    with steering(gemma, LAYER_B, lambda h, keep: seen.append(keep) or h):
        with torch.inference_mode():
            gemma.model(**enc)
    assert seen[0][0].tolist() == [False] + [True] * (enc["input_ids"].shape[1] - 1)


def test_ablation_matches_the_crosscoder_for_exclusive_latents(lm):
    cc = _crosscoder("l1")
    x_a, x_b = torch.randn(5, 576), torch.randn(5, 640)
    with torch.no_grad():
        cc.b_enc.fill_(0.5)
        f = cc.encode(x_a * cc.cfg.scale_a, x_b * cc.cfg.scale_b)
    d = latent_direction(cc, 1, typical=1.0)
    assert d.model == "a" and d.exclusive
    torch.testing.assert_close(d.activation(x_a[None])[0], f[:, 1])
    out = ablate_edit(d)(x_a[None], torch.ones(1, 5, dtype=torch.bool))[0]
    torch.testing.assert_close(out, x_a - f[:, 1:2] * cc.W_dec_a[1] / cc.cfg.scale_a)
    with pytest.raises(CrossdiffError, match="paired text"):
        latent_direction(cc, 3, "a").activation(x_a[None])  # shared latent


def test_planted_direction_passes_random_latent_fails(lm, one_thread):
    cc = _crosscoder()
    with torch.no_grad():
        cc.W_dec_a[0] = _paris_gradient(lm) * cc.cfg.scale_a  # raw norm 1
    cfg = SteerConfig(run="unused", latent=0, **FAST)
    planted = steer_latent(lm, latent_direction(cc, 0, "a", typical=5.0), PARIS, cfg)
    assert planted["verdict"] == "pass" and planted["effect_size"] > 3
    i = planted["strengths"].index(4.0)
    assert planted["dlogprob"][i] > max(planted["null"]["dlogprob"][i])
    rand = latent_direction(cc, 1, "a", typical=5.0 * cc.cfg.scale_a / float(cc.W_dec_a[1].detach().norm()))
    random = steer_latent(lm, rand, PARIS, cfg)
    assert random["verdict"] == "fail" and abs(random["dlogprob"][i]) < planted["dlogprob"][i] / 3
    assert {"prompt", "strength", "text"} <= set(planted["generations"][0])
    assert len(planted["context_activation"]) == len(PARIS) and "ablation_dlogprob" in planted


def test_generation_is_steered_and_deterministic(lm, one_thread):
    delta = 8.0 * _paris_gradient(lm)
    a = generate(lm, LAYER_A, ["I love the city of", "Hi"], delta, 4)
    assert a == generate(lm, LAYER_A, ["I love the city of", "Hi"], delta, 4)
    assert a[0].startswith(" Paris")
    assert generate(lm, LAYER_A, ["Hi"], 0 * delta, 4) == generate(lm, LAYER_A, ["Hi"], None, 4)


def test_cli_single_and_top(tmp_path, models_ab, monkeypatch, one_thread):
    run = tmp_path / "run"
    cc = _crosscoder()
    cc.save_pretrained(run)
    feats = run / "analysis" / "features"
    feats.mkdir(parents=True)
    cols = "latent,partition,verdict,score,p99_act"
    rows = ["0,a_exclusive,candidate_a,2.0,4.0", "1,a_exclusive,candidate_a,1.0,4.0"]
    rows += [f"{i},shared,shared,0.5,1.0" for i in range(2, 6)]
    rows += ["6,b_exclusive,candidate_b,1.0,4.0", "7,b_exclusive,candidate_b,3.0,4.0"]
    (run / "analysis" / "latents.csv").write_text("\n".join([cols, *rows]) + "\n")
    # --top steers the behavioural differences (crossdiff verify), most of the gap closed first
    (run / "verification").mkdir()
    behaviour = ["latent,side,verdict,gap_closed", "0,a,difference,0.3", "1,a,inert,", "6,b,difference,0.2"]
    (run / "verification" / "behaviour.csv").write_text("\n".join([*behaviour, "7,b,inert,"]) + "\n")
    ex = [{"value": 3.0, "text_before": p, "text_token": c, "text_after": ""} for p, c in PARIS]
    for i in (0, 1, 6):
        (feats / f"{i}.json").write_text(json.dumps({"latent": i, "examples": ex}))
    monkeypatch.setattr(
        "crossdiff.inputs.models.load_model", lambda spec, **kw: models_ab[spec != "smollm2-135m"]
    )
    common = ["--run", str(run), "--strengths", "0", "4", "--n-random", "5", "--new-tokens", "2"]
    assert cli.main(["steer", *common, "--latent", "0"]) == 0
    doc = json.loads((run / "steering" / "0.json").read_text())
    assert doc["verdict"] in ("pass", "fail") and len(doc["strengths"]) == len(doc["dlogprob_z"]) == 2
    verdicts = run / "steering" / "verdicts.csv"  # steering's own file; latents.csv is never rewritten
    analysis = (run / "analysis" / "latents.csv").read_bytes()
    assert verdicts.read_text().splitlines()[1].split(",")[:2] == ["0", doc["verdict"]]
    assert cli.main(["steer", *common, "--top", "1", "--budget-seconds", "0"]) == 0
    assert verdicts.read_text().splitlines() == ["latent,verdict,effect", "0,skipped,", "6,skipped,"]
    assert cli.main(["steer", *common, "--top", "1"]) == 0
    lines = verdicts.read_text().splitlines()
    assert [ln.split(",")[0] for ln in lines[1:]] == ["0", "6"]  # the rejected 7 is not steered
    assert all(ln.split(",")[1] in ("pass", "fail") and ln.split(",")[2] for ln in lines[1:])
    assert (run / "analysis" / "latents.csv").read_bytes() == analysis


class _NoModels:
    def __getitem__(self, m):
        raise AssertionError("a model was loaded before the arguments were checked")


def test_bad_latent_and_prompts_fail_in_one_line_before_any_model_loads(tmp_path):
    run = tmp_path / "run"
    _crosscoder().save_pretrained(run)
    with pytest.raises(CrossdiffError, match=r"^--latent must be a latent index \(0 or more\), got -1$"):
        SteerConfig(run=str(run), latent=-1)
    with pytest.raises(CrossdiffError, match="--prompts .*missing.txt: no such file"):
        SteerConfig(run=str(run), latent=1, prompts=str(tmp_path / "missing.txt"))
    with pytest.raises(CrossdiffError, match=r"--latent 8 is out of range: .* has latents 0\.\.7$"):
        steer(SteerConfig(run=str(run), latent=8), models=_NoModels())


def test_nothing_to_steer_is_steerings_own_record(tmp_path):
    """--top on a run without candidates: steer itself writes the empty verdicts.csv that marks the stage
    done (the diff no longer writes it for steer); without a verification it still asks for one."""
    run = tmp_path / "run"
    _crosscoder().save_pretrained(run)
    (run / "analysis").mkdir()
    rows = [f"{i},shared,shared,0.5,1.0" for i in range(8)]
    (run / "analysis" / "latents.csv").write_text(
        "\n".join(["latent,partition,verdict,score,p99_act", *rows]) + "\n"
    )
    with pytest.raises(CrossdiffError, match="run crossdiff verify first"):
        steer(SteerConfig(run=str(run), top=1), models=_NoModels())
    assert steer(SteerConfig(run=str(run), top=1, include_rejected=True), models=_NoModels()) == []
    assert (run / "steering" / "verdicts.csv").read_text() == "latent,verdict,effect\n"


def test_a_latent_starts_only_if_it_should_end_within_the_budget():
    from crossdiff.analysis.steer import fits_budget

    assert fits_budget(0.0, 0.0, None) and fits_budget(1e9, 1e9, None)  # no budget
    assert fits_budget(0.0, 0.0, 60.0)  # the first latent
    assert fits_budget(20.0, 40.0, 60.0) and not fits_budget(21.0, 40.0, 60.0)  # 21 + 40 > 60
    assert not fits_budget(1e-6, 0.0, 0.0)  # a zero budget starts nothing


def test_differences_are_steered_before_the_candidates_that_fill_free_slots():
    from crossdiff.analysis.steer import top_candidates

    def row(latent, side, verdict, gap=0.0, score=1.0):
        return {"latent": latent, "partition": "shared", "side": side, "verdict": f"candidate_{side}",
                "score": score, "behaviour_verdict": verdict, "behaviour_gap_closed": gap}  # fmt: skip

    rows = [row(1, "a", "inert", score=9.0), row(2, "a", "too rare", score=8.0), row(3, "b", "difference", 0.1),
            row(4, "b", "difference", 0.3), row(5, "b", "inert"), row(6, "a", "difference", 0.2)]  # fmt: skip
    assert top_candidates(rows, 2) == [(6, "a"), (4, "b"), (3, "b")]
    # Fillers (best score first) take the slots a model's differences leave, after every difference.
    assert top_candidates(rows, 2, include_rejected=True) == [(6, "a"), (4, "b"), (3, "b"), (1, "a")]


def test_steer_and_verify_give_one_z_against_a_null_even_with_no_spread():
    """Steer's per-strength z and verify's z are one rule (results.null_z): the same z for the same
    numbers, 0 on a spread-less null the value equals, ±inf off it (it was 0 in steer, ±inf in verify)."""
    from crossdiff.analysis.ablation import _z_against
    from crossdiff.analysis.steer import _stats

    rows = [[0.5, 0.125, 0.25, 0.375, 0.125, 0.25], [0.5, 0.25, 0.25, 0.25, 0.25, 0.25], [0.25] * 6]
    z_steer = _stats("x", np.array(rows))["x_z"]
    z_verify = [_z_against(r[0], [{"null": r[1:]}], "null")[0] for r in rows]
    assert z_steer == z_verify
    assert z_steer[1] == math.inf and z_steer[2] == 0.0 and 0 < z_steer[0] < math.inf
    assert SteerConfig.__dataclass_fields__["z"].default == 3.0  # the option is --z, as verify's
