"""Splice-in evaluation: how much of each model's next-token loss survives when the crosscoder's
reconstruction replaces the model's own activation.

On held-out chunks of the store: run both models to the layer, align the two tokenisations and mask
exactly as harvest does (first aligned position, norm outliers), encode the pairs with the
crosscoder (normalised units, the store's scales) and decode. Then, per model m, run the real
Hugging Face model three times with a forward hook on block `layer` — untouched (clean), with the
output at the aligned positions replaced by x̂_m / scale_m (splice), and set to 0 (zero) — and
compare next-token cross-entropy at those positions:

    loss_recovered = 1 − (L_splice − L_clean) / (L_zero − L_clean)

The model code is never reimplemented; a pre-hook on the LM head only selects the positions whose
logits are needed (Gemma's 262k-token head over a whole chunk would cost ~0.5 GB per sequence).

Legend: T tokens of one chunk, P aligned positions kept, D model width, V vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs.align import align, tokenize


@torch.no_grad()
def aligned_activations(lms, layers, text: str, outlier_factor: float):
    """(ids (a, b) each (1, T), raw activations (x_a (P, D_a), x_b (P, D_b)), positions (a, b) (P,)).

    The masks are harvest's (harvest/pairs.py, _process_batch): drop the first aligned pair, and pairs where
    either norm exceeds `outlier_factor` × the median (here of this one chunk, at harvest of its batch).
    """
    from ..inputs.models import batch_median_norm

    encs = [tokenize(lm.tokenizer, text) for lm in lms]
    ids = [torch.as_tensor(e.input_ids, dtype=torch.long)[None].to(lm.device) for e, lm in zip(encs, lms)]
    hs = [lm.hidden(i, torch.ones_like(i), layer)[0].float() for lm, i, layer in zip(lms, ids, layers)]
    al = align(encs[0].offsets, encs[1].offsets, encs[0].special_mask, encs[1].special_mask)
    pos_a = torch.as_tensor(al.idx_a, dtype=torch.long, device=hs[0].device)
    pos_b = torch.as_tensor(al.idx_b, dtype=torch.long, device=hs[1].device)
    keep_P = torch.ones(len(pos_a), dtype=torch.bool, device=hs[0].device)
    keep_P[:1] = False  # the first aligned position follows BOS alone in one model: massive activations
    for h_TD, pos, enc in ((hs[0], pos_a, encs[0]), (hs[1], pos_b, encs[1])):
        median = batch_median_norm(h_TD[None].cpu(), [enc])
        keep_P &= (h_TD[pos].norm(dim=-1) <= outlier_factor * median).to(keep_P.device)
    pos_a, pos_b = pos_a[keep_P], pos_b[keep_P.to(pos_b.device)]
    return ids, (hs[0][pos_a], hs[1][pos_b]), (pos_a, pos_b)


@torch.no_grad()
def next_token_loss(lm, ids_1T: Tensor, layer: int, pos_P: Tensor, replace_PD: Tensor | None = None):
    """(summed cross-entropy, count) of the predictions made at `pos_P` (of token p + 1).

    With `replace_PD`, block `layer`'s output at those positions is replaced by it (raw units)
    through a forward hook on the real module; positions without a next token are not scored.
    """
    T = ids_1T.shape[1]
    scored_S = pos_P[pos_P + 1 < T]

    def head_pre_hook(module, args):
        return (args[0][:, scored_S], *args[1:])

    def block_hook(module, args, output):
        h_1TD = (output[0] if isinstance(output, tuple) else output).clone()
        h_1TD[0, pos_P] = replace_PD.to(h_1TD.device, h_1TD.dtype)
        return (h_1TD, *output[1:]) if isinstance(output, tuple) else h_1TD

    handles = [lm.model.get_output_embeddings().register_forward_pre_hook(head_pre_hook)]
    if replace_PD is not None:
        handles.append(lm.blocks[layer].register_forward_hook(block_hook))
    try:
        logits_1SV = lm.model(input_ids=ids_1T, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    targets_S = ids_1T[0, scored_S + 1]
    loss = F.cross_entropy(logits_1SV[0].float(), targets_S, reduction="sum")
    return float(loss), int(scored_S.numel())


@torch.no_grad()
def splice_eval(crosscoder, lms, layers, texts: list[str], *, max_tokens: int, outlier_factor: float) -> dict:
    """{"a": {...}, "b": {...}} with mean clean/splice/zero losses, loss_recovered and n_tokens."""
    sums = {m: np.zeros(3) for m in "ab"}
    counts = {m: 0 for m in "ab"}
    for text in texts:
        if counts["a"] >= max_tokens:
            break
        ids, (x_a, x_b), positions = aligned_activations(lms, layers, text, outlier_factor)
        if x_a.shape[0] == 0:
            continue
        dev = crosscoder.b_enc.device
        f_PF = crosscoder.encode(*crosscoder.normalise(x_a.to(dev), x_b.to(dev)))
        hats = crosscoder.denormalise(*crosscoder.decode(f_PF))  # raw units: x̂ / scale
        for m, lm, layer, ids_1T, pos_P, hat_PD in zip("ab", lms, layers, ids, positions, hats):
            clean, n = next_token_loss(lm, ids_1T, layer, pos_P)
            spliced, _ = next_token_loss(lm, ids_1T, layer, pos_P, hat_PD)
            zero, _ = next_token_loss(lm, ids_1T, layer, pos_P, torch.zeros_like(hat_PD))
            sums[m] += (clean, spliced, zero)
            counts[m] += n
    return {m: _summarise(sums[m], counts[m]) for m in "ab"}


def _summarise(sums_3: np.ndarray, n: int) -> dict:
    if n == 0:
        nan = float("nan")
        return {"clean": nan, "splice": nan, "zero": nan, "loss_recovered": nan, "n_tokens": 0}
    clean, spliced, zero = (float(v) / n for v in sums_3)
    gap = zero - clean
    recovered = 1 - (spliced - clean) / gap if gap != 0 else float("nan")
    return {"clean": clean, "splice": spliced, "zero": zero, "loss_recovered": recovered, "n_tokens": n}
