"""Splice-in evaluation on the real default pair: splicing a model's own activation back in leaves the loss
bit-identical, zero-ablation hurts, a perfect reconstruction recovers all the loss, and the positions are
harvest's (aligned, first pair and outliers masked).

Legend: T tokens, P aligned positions kept, D width.
"""

from __future__ import annotations

import pytest
import torch

from crossdiff.analysis.splice import aligned_activations, next_token_loss, splice_eval
from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig

TEXTS = [
    "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election "
    "produced no evidence that any irregularities took place.",
    "The jury further said in term-end presentments that the City Executive Committee, which had "
    "over-all charge of the election, deserves the praise and thanks of the City of Atlanta.",
]


@pytest.fixture(scope="module")
def layers(models_ab):
    return tuple(lm.n_layers // 2 for lm in models_ab)


def test_positions_are_aligned_and_masked_like_harvest(models_ab, layers):
    from crossdiff.inputs.align import align, tokenize

    ids, (x_a, x_b), (pos_a, pos_b) = aligned_activations(models_ab, layers, TEXTS[0], outlier_factor=10.0)
    ta, tb = (tokenize(lm.tokenizer, TEXTS[0]) for lm in models_ab)
    al = align(ta.offsets, tb.offsets, ta.special_mask, tb.special_mask)
    assert pos_a[0] != al.idx_a[0]  # the first aligned pair is dropped (massive activations)
    assert len(pos_a) == len(al) - 1  # and on ordinary text no outlier is
    assert (ta.offsets[pos_a.numpy(), 1] == tb.offsets[pos_b.numpy(), 1]).all()
    assert x_a.shape == (len(pos_a), 576) and x_b.shape == (len(pos_b), 640)
    h_a = models_ab[0].hidden(ids[0], torch.ones_like(ids[0]), layers[0])[0]
    assert torch.equal(x_a, h_a[pos_a].float())


@pytest.mark.parametrize("which", [0, 1])
def test_splicing_the_original_activation_leaves_the_loss_exactly_clean(models_ab, layers, which):
    ids, xs, positions = aligned_activations(models_ab, layers, TEXTS[1], outlier_factor=10.0)
    lm, layer, pos = models_ab[which], layers[which], positions[which]
    clean, n = next_token_loss(lm, ids[which], layer, pos)
    same, n_same = next_token_loss(lm, ids[which], layer, pos, xs[which])
    zero, _ = next_token_loss(lm, ids[which], layer, pos, torch.zeros_like(xs[which]))
    assert n == n_same == len(pos) - int(pos[-1] == ids[which].shape[1] - 1) and n > 10
    assert same == clean  # bit-identical: the hook itself changes nothing
    assert zero > clean + 1.0
    # the scored losses are the plain model's next-token losses at those positions
    with torch.no_grad():
        logits = lm.model(input_ids=ids[which]).logits[0]
    scored = pos[pos + 1 < ids[which].shape[1]]
    ref = torch.nn.functional.cross_entropy(logits[scored], ids[which][0, scored + 1], reduction="sum")
    assert clean == pytest.approx(float(ref), rel=1e-5)


class _Perfect:
    """A stand-in crosscoder whose reconstruction is exact: normalise -> encode -> decode -> denormalise."""

    b_enc = torch.zeros(1)

    def normalise(self, x_a, x_b):
        return x_a * 0.5, x_b * 4.0

    def encode(self, x_a, x_b):
        return torch.cat([x_a, x_b], 1)

    def decode(self, f):
        return f[:, :576], f[:, 576:]

    def denormalise(self, x_a, x_b):
        return x_a / 0.5, x_b / 4.0


def test_splice_eval_perfect_and_random_crosscoders(models_ab, layers):
    perfect = splice_eval(_Perfect(), models_ab, layers, TEXTS, max_tokens=10_000, outlier_factor=10.0)
    for m in "ab":
        r = perfect[m]
        assert set(r) == {"clean", "splice", "zero", "loss_recovered", "n_tokens"}
        assert r["splice"] == r["clean"] and r["loss_recovered"] == 1.0 and r["zero"] > r["clean"]
        assert r["n_tokens"] > 40
    cfg = CrosscoderConfig(d_a=576, d_b=640, n_latents=64, sparsity="topk", k=8, scale_a=0.3, scale_b=0.02)
    random_cc = Crosscoder(cfg, generator=torch.Generator().manual_seed(0))
    out = splice_eval(random_cc, models_ab, layers, TEXTS[:1], max_tokens=10_000, outlier_factor=10.0)
    for m in "ab":
        r = out[m]
        assert r["clean"] == pytest.approx(perfect[m]["clean"], rel=0.5)  # one text of two
        assert r["loss_recovered"] == pytest.approx(1 - (r["splice"] - r["clean"]) / (r["zero"] - r["clean"]))
        assert r["splice"] > r["clean"]  # an untrained crosscoder loses information
