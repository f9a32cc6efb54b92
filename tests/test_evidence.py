"""Evidence: streaming top-k equals a full sort, histogram counts equal firing counts, examples show the
firing token in both tokenisations, and the logit lens equals a direct read-out through the final norm.

Legend: N tokens, F latents, K examples, D width, V vocabulary.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossdiff.analysis.evidence import Histogram, TopK, logit_lens, norm_gain, render_examples


def _sparse_acts(n=1000, f=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    vals = torch.rand(n, f, generator=g) * 10 ** (4 * torch.rand(n, f, generator=g) - 3)
    return vals * (torch.rand(n, f, generator=g) < 0.2)


@pytest.mark.parametrize("sizes", [(128,), (7, 300, 3, 590, 100)])
def test_streaming_top_k_equals_full_sort(sizes):
    f_NF = _sparse_acts()
    k = 12
    top = TopK(f_NF.shape[1], k)
    start = 0
    for size in sizes * 10:
        if start >= len(f_NF):
            break
        part = f_NF[start : start + size]
        top.update(part, torch.arange(start, start + len(part)))
        start += len(part)
    seen = f_NF[:start]
    for j in range(f_NF.shape[1]):
        order = torch.argsort(seen[:, j], descending=True)[:k]
        expected = [(float(seen[i, j]), int(i)) for i in order if seen[i, j] > 0]
        assert top.examples(j) == expected


def test_histogram_counts_sum_to_firing_counts_and_bins_are_right():
    f_NF = _sparse_acts(seed=1)
    hist = Histogram(f_NF.shape[1], n_bins=16, lo=1e-2, hi=1e2)
    for i in range(0, len(f_NF), 333):
        hist.update(f_NF[i : i + 333])
    assert hist.counts_FH.sum(1).tolist() == (f_NF > 0).sum(0).tolist()
    # values outside [lo, hi] land in the end bins; inside, np.histogram agrees
    edges = hist.edges_H1.numpy()
    for j in range(3):
        v = f_NF[:, j][f_NF[:, j] > 0].double().numpy().clip(edges[0], edges[-1] * (1 - 1e-12))
        ref, _ = np.histogram(v, bins=edges)
        np.testing.assert_array_equal(hist.counts_FH[j].numpy(), ref)


def test_histogram_quantile_within_one_bin_of_the_exact_one():
    f_NF = _sparse_acts(n=4000, seed=2)
    hist = Histogram(f_NF.shape[1], n_bins=64, lo=1e-3, hi=1e3)
    hist.update(f_NF)
    p99 = hist.quantile(0.99)
    ratio = 10 ** (6 / 64)  # one bin's width
    for j in range(f_NF.shape[1]):
        v = f_NF[:, j][f_NF[:, j] > 0].numpy()
        exact = np.quantile(v, 0.99)
        assert exact / ratio <= p99[j] <= exact * ratio
    assert np.isnan(Histogram(3, 8, 1e-3, 1e3).quantile(0.99)).all()


class _FakeStore:
    """The three store methods render_examples uses, over one shard of hand-made rows."""

    def __init__(self, text, rows):
        self._text, self._rows = text, rows

    def rows(self, indices):
        return {c: np.array([self._rows[i][c] for i in indices]) for c in self._rows[0]}

    def shard_of(self, index):
        return 0

    def texts(self, shard):
        return {5: {"chunk": 5, "doc": 2, "source": "brown:ca01", "text": self._text}}


def test_examples_highlight_the_token_in_both_tokenisations(tokenizers_ab):
    from crossdiff.inputs.align import align, tokenize

    text = "The jury said the election, in Atlanta's 1961 primary, was conducted well."
    tok_a, tok_b = tokenizers_ab
    ta, tb = tokenize(tok_a, text), tokenize(tok_b, text)
    al = align(ta.offsets, tb.offsets, ta.special_mask, tb.special_mask)
    rows = []
    for ia, ib, end in zip(al.idx_a, al.idx_b, al.end_char):
        start = min(ta.offsets[ia, 0], tb.offsets[ib, 0])
        rows.append(
            dict(chunk=5, doc=2, pos_a=ia, pos_b=ib, char_start=start, char_end=end, tok_a=0, tok_b=0)
        )
    store = _FakeStore(text, rows)
    k = next(i for i, r in enumerate(rows) if text[r["char_start"] : r["char_end"]].strip() == "election")
    out = render_examples(store, {3: [(2.5, k)]}, {"a": tok_a, "b": tok_b}, context_chars=12, window=3)
    (ex,) = out[3]
    assert ex["value"] == 2.5 and ex["row"] == k and ex["doc"] == 2 and ex["source"] == "brown:ca01"
    assert ex["text_token"].strip() == "election"
    assert ex["text_before"] == text[max(0, rows[k]["char_start"] - 12) : rows[k]["char_start"]]
    assert ex["text_after"] == text[rows[k]["char_end"] : rows[k]["char_end"] + 12]
    for key in ("tokens_a", "tokens_b"):
        hl = [t for t in ex[key] if t["highlight"]]
        assert len(hl) == 1 and hl[0]["text"].strip() == "election"
        assert len(ex[key]) == 7  # 3 tokens either side


def test_examples_without_text_are_empty_not_errors():
    store = _FakeStore(
        "", [dict(chunk=9, doc=9, pos_a=1, pos_b=1, char_start=0, char_end=1, tok_a=0, tok_b=0)]
    )
    (ex,) = render_examples(store, {0: [(1.0, 0)]}, {}, context_chars=5, window=2)[0]
    assert ex["text_token"] == "" and ex["tokens_a"] == [] and ex["doc"] == 9


def _tiny_lm(kind, tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from crossdiff.inputs.models import LanguageModel, find_blocks

    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=8))
    with torch.no_grad():
        model.model.norm.weight.uniform_(-0.5, 2.0)
    return LanguageModel(kind, model.eval(), tokenizer, find_blocks(model), 16)


@pytest.mark.parametrize("kind, which", [("llama", 0), ("gemma", 1)])
def test_logit_lens_reads_through_the_final_norm_gain(tokenizers_ab, kind, which):
    lm = _tiny_lm(kind, tokenizers_ab[which])
    w = lm.model.model.norm.weight.detach()
    gain, centre = norm_gain(lm.model, 16)
    expected_gain = w if kind == "llama" else 1 + w  # Llama scales by w, Gemma by (1 + w)
    torch.testing.assert_close(gain, expected_gain, rtol=1e-5, atol=1e-5)
    assert not centre
    dirs_LD = torch.randn(3, 16)
    out = logit_lens(lm, dirs_LD, top=5)
    W_U = lm.model.get_output_embeddings().weight.detach()
    for d_D, lens in zip(dirs_LD, out):
        logits_V = W_U @ (d_D * expected_gain)
        top_ids = logits_V.topk(5).indices
        bottom_ids = logits_V.topk(5, largest=False).indices
        assert [t for t, _ in lens["promoted"]] == [lm.tokenizer.decode([int(i)]) for i in top_ids]
        assert [t for t, _ in lens["suppressed"]] == [lm.tokenizer.decode([int(i)]) for i in bottom_ids]
        assert lens["promoted"][0][1] == pytest.approx(float(logits_V.max()), rel=1e-4)
