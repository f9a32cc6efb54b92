"""Evidence per latent: streaming top-k examples, activation histograms, the text of an example in
both tokenisations, and the logit lens of a decoder direction.

Everything that sees the activations streams with memory independent of the number of tokens:
`TopK` keeps K (value, row) pairs per latent, `Histogram` F × H counts on fixed log-spaced edges.
Examples are rendered afterwards from the store's row metadata and chunk texts, one shard's texts at
a time.

Legend: B tokens in a batch, F latents, K examples per latent, H histogram bins, D model width,
V vocabulary, L latents in one chunk (re-ranked, or read by the logit lens), N firing entries.
"""

from __future__ import annotations

from collections import defaultdict
from functools import reduce

import numpy as np
import torch
from torch import Tensor, nn


class TopK:
    """The K largest activations of every latent seen so far, with their global store rows."""

    def __init__(self, n_latents: int, k: int, device=None):
        self.k = k
        self.values_KF = torch.full((k, n_latents), -torch.inf, device=device)
        self.rows_KF = torch.full((k, n_latents), -1, dtype=torch.int64, device=device)

    def update(self, f_BF: Tensor, rows_B: Tensor, batch_max_F: Tensor | None = None) -> None:
        """Merge one batch; `batch_max_F` (each latent's max over the batch), if given, limits the
        work to latents whose max beats their current K-th value (after warm-up, few do)."""
        if batch_max_F is None:
            batch_max_F = f_BF.amax(0)
        cols_L = torch.nonzero(batch_max_F > self.values_KF[-1].clamp_min(0)).squeeze(1)
        if cols_L.numel() == 0:
            return
        k = min(self.k, f_BF.shape[0])
        vals_KL, idx_KL = f_BF[:, cols_L].topk(k, dim=0)
        # The batch's own top K merged with the running K: 2K candidates per latent.
        cat_vals = torch.cat([self.values_KF[:, cols_L], vals_KL.float()])
        cat_rows = torch.cat([self.rows_KF[:, cols_L], rows_B.to(idx_KL.device)[idx_KL]])
        top_KL, keep_KL = cat_vals.topk(self.k, dim=0)
        self.values_KF[:, cols_L] = top_KL
        self.rows_KF[:, cols_L] = cat_rows.gather(0, keep_KL)

    def examples(self, latent: int) -> list[tuple[float, int]]:
        """(value, row) pairs of one latent, largest first, firing (value > 0) only."""
        vals = self.values_KF[:, latent].tolist()
        rows = self.rows_KF[:, latent].tolist()
        return [(v, r) for v, r in zip(vals, rows) if v > 0 and r >= 0]


class Histogram:
    """Per-latent counts of firing activations (f > 0) on shared, fixed log-spaced bin edges.

    Values below the first edge land in the first bin and above the last edge in the last bin, so
    the counts of a latent always sum to the number of times it fired.
    """

    def __init__(self, n_latents: int, n_bins: int, lo: float, hi: float, device=None):
        self.edges_H1 = torch.logspace(np.log10(lo), np.log10(hi), n_bins + 1, dtype=torch.float64)
        self._inner = self.edges_H1[1:-1].float().to(device)
        self.n_bins = n_bins
        self.counts_FH = torch.zeros(n_latents, n_bins, dtype=torch.int64, device=device)

    def update(self, f_BF: Tensor) -> None:
        rows_N, cols_N = f_BF.nonzero(as_tuple=True)
        self.update_entries(cols_N, f_BF[rows_N, cols_N])

    def update_entries(self, cols_N: Tensor, vals_N: Tensor) -> None:
        """Count firing entries given as (latent, value) pairs."""
        bins_N = torch.searchsorted(self._inner, vals_N.float().contiguous(), right=True)
        self.counts_FH.view(-1).index_add_(0, cols_N * self.n_bins + bins_N, torch.ones_like(bins_N))

    def quantile(self, q: float) -> np.ndarray:
        """Approximate q-quantile of each latent's firing activations (log-linear within the bin)."""
        counts_FH = self.counts_FH.cpu().double()
        total_F = counts_FH.sum(1)
        cum_FH = counts_FH.cumsum(1)
        target_F = q * total_F
        bin_F = torch.searchsorted(cum_FH, target_F[:, None]).squeeze(1).clamp(max=self.n_bins - 1)
        below_F = cum_FH.gather(1, bin_F[:, None]).squeeze(1) - counts_FH.gather(1, bin_F[:, None]).squeeze(1)
        inbin_F = counts_FH.gather(1, bin_F[:, None]).squeeze(1)
        frac_F = ((target_F - below_F) / inbin_F.clamp_min(1)).clamp(0, 1)
        log_edges = self.edges_H1.log()
        log_q = log_edges[bin_F] + frac_F * (log_edges[bin_F + 1] - log_edges[bin_F])
        return torch.where(total_F > 0, log_q.exp(), torch.nan).numpy()


# ----------------------------------------------------------------------------- example text


def render_examples(
    store, picks: dict[int, list[tuple[float, int]]], tokenizers: dict, *, context_chars: int, window: int
) -> dict[int, list[dict]]:
    """latent -> its examples as JSON-ready dicts, from (value, row) picks.

    Rows are grouped by shard so each shard's texts are read once; each chunk is tokenised once per
    model (align.tokenize, as at harvest time) to show the tokens around pos_a / pos_b.
    """
    all_rows = sorted({r for ex in picks.values() for _, r in ex})
    if not all_rows:
        return {latent: [] for latent in picks}
    meta = store.rows(all_rows)
    info = {r: {c: int(meta[c][i]) for c in meta} for i, r in enumerate(all_rows)}
    by_shard: dict[int, list[int]] = defaultdict(list)
    for r in all_rows:
        by_shard[store.shard_of(r)].append(r)
    rendered: dict[int, dict] = {}
    for shard, rows in by_shard.items():
        texts = store.texts(shard)
        token_cache: dict[tuple[str, int], object] = {}
        for r in rows:
            rendered[r] = _render_row(info[r], texts, tokenizers, token_cache, context_chars, window)
    return {
        latent: [{"value": float(v), "row": int(r), **rendered[r]} for v, r in ex]
        for latent, ex in picks.items()
    }


def _render_row(
    row: dict, texts: dict, tokenizers: dict, cache: dict, context_chars: int, window: int
) -> dict:
    chunk = texts.get(row["chunk"])
    out = {
        "doc": row["doc"],
        "source": chunk["source"] if chunk else "",
        "chunk": row["chunk"],
        "pos_a": row["pos_a"],
        "pos_b": row["pos_b"],
        "text_before": "",
        "text_token": "",
        "text_after": "",
        "tokens_a": [],
        "tokens_b": [],
    }
    if chunk is None:  # synthetic stores have no text
        return out
    text, s, e = chunk["text"], row["char_start"], row["char_end"]
    lo = max(0, s - context_chars)
    messages = chunk.get("messages")  # a conversation chunk: the example stays inside its message
    if messages:
        m = next((m for m in messages if m[2] <= s < max(m[3], m[2] + 1)), messages[-1])
        out["role"], out["turn"] = m[0], m[1]
        lo = max(lo, m[2])
        out["text_after"] = text[e : min(e + context_chars, m[3])]
    else:
        out["text_after"] = text[e : e + context_chars]
    out["text_before"] = text[lo:s]
    out["text_token"] = text[s:e]
    for key in ("a", "b"):
        tok = tokenizers.get(key)
        if tok is not None:
            out[f"tokens_{key}"] = _token_window(tok, key, chunk, row[f"pos_{key}"], window, cache)
    return out


def _token_window(tok, key: str, chunk: dict, pos: int, window: int, cache: dict) -> list[dict]:
    from ..inputs.chat import encode_chunk

    if (key, chunk["chunk"]) not in cache:  # tokenised as at harvest time (a conversation: rendered)
        cache[(key, chunk["chunk"])] = encode_chunk(tok, chunk["text"], chunk.get("messages")).input_ids
    ids_N = cache[(key, chunk["chunk"])]
    lo, hi = max(0, pos - window), min(len(ids_N), pos + window + 1)
    return [{"text": tok.decode([int(ids_N[i])]), "highlight": i == pos} for i in range(lo, hi)]


# ----------------------------------------------------------------------------- logit lens

# Final norms in the architectures transformers ships (as models.BLOCK_PATHS); first match wins.
FINAL_NORM_PATHS = (
    "model.norm",  # Llama, Mistral, Qwen, Gemma, OLMo ...
    "model.language_model.norm",
    "transformer.ln_f",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",  # OPT
    "transformer.norm_f",  # MPT
    "backbone.norm_f",  # Mamba
)


def final_norm(model: nn.Module) -> nn.Module | None:
    for path in FINAL_NORM_PATHS:
        try:
            return reduce(getattr, path.split("."), model)
        except AttributeError:
            continue
    return None


@torch.no_grad()
def norm_gain(model: nn.Module, d_model: int) -> tuple[Tensor, bool]:
    """(γ_D, centre): the final norm's per-dimension gain, and whether it centres (LayerNorm).

    RMSNorm variants parameterise γ differently (Llama: w, Gemma: 1 + w); running the module on a
    vector of ones (RMS 1) reads the effective gain off without knowing the parameterisation.
    """
    norm = final_norm(model)
    dtype = next(model.parameters()).dtype
    if norm is None:
        return torch.ones(d_model), False
    if isinstance(norm, nn.LayerNorm):
        w = norm.weight if norm.weight is not None else torch.ones(d_model)
        return w.detach().float().cpu(), True
    ones = torch.ones(1, d_model, dtype=dtype, device=next(model.parameters()).device)
    return norm(ones).float().cpu().reshape(-1), False


@torch.no_grad()
def logit_lens(
    lm, dirs_raw_LD: Tensor, *, top: int = 10, chunk: int = 64, centre_vocab: bool = False
) -> list[dict[str, list[list]]]:
    """Tokens each raw-unit direction promotes and suppresses: W_U (γ ⊙ d), top `top` each way.

    A linear read-out: the final norm's 1/RMS depends on the whole residual and is left out, so the
    logits are in "per unit of residual RMS" units — comparable across latents of one model.
    centre_vocab: subtract each direction's mean over the vocabulary (softmax ignores it).
    """
    gain_D, centre = norm_gain(lm.model, lm.d_model)
    W_U_VD = lm.model.get_output_embeddings().weight
    out = []
    for i in range(0, dirs_raw_LD.shape[0], chunk):
        d_LD = dirs_raw_LD[i : i + chunk].float()
        if centre:
            d_LD = d_LD - d_LD.mean(1, keepdim=True)
        logits_LV = ((d_LD * gain_D).to(W_U_VD.device, W_U_VD.dtype) @ W_U_VD.T).float().cpu()
        if centre_vocab:
            logits_LV -= logits_LV.mean(1, keepdim=True)
        up_v, up_i = logits_LV.topk(top, dim=1)
        down_v, down_i = logits_LV.topk(top, dim=1, largest=False)
        for row in range(d_LD.shape[0]):
            out.append(
                {
                    "promoted": _named(lm.tokenizer, up_i[row], up_v[row]),
                    "suppressed": _named(lm.tokenizer, down_i[row], down_v[row]),
                }
            )
    return out


def _named(tok, ids: Tensor, vals: Tensor) -> list[list]:
    return [[tok.decode([int(i)]), float(v)] for i, v in zip(ids, vals)]


def decoder_rows(cc, ids, model: str) -> Tensor:
    """Decoder vectors (len(ids), D) of `model` in normalised units; zero rows where none exists
    (a DFC's exclusive latents have no row in the other model, crosscoder.py's layout)."""
    side = cc.side(model)
    W, first = side.W_dec.detach(), side.first
    out = torch.zeros(len(ids), W.shape[1], device=W.device)
    ids = np.asarray(ids, dtype=np.int64)
    ok = np.flatnonzero((ids >= first) & (ids < first + W.shape[0]))
    out[torch.as_tensor(ok)] = W[torch.as_tensor(ids[ok] - first)]
    return out.cpu()


def logit_lenses(
    cc, lms, by_model: dict[str, list[int]], typical_F=None, n_null: int = 16
) -> dict[int, dict]:
    """latent -> {"model", "promoted", "suppressed", ...} through the unembedding of the model named in
    `by_model` ({"a": [latents], "b": [...]}); empty without models.

    With `typical_F` (each latent's mean activation) the lens is in the model's own units: the logits
    its typical write f · d (normalised units, where the layer's centred residual has RMS 1 per
    dimension) would add after the final norm's gain on a residual of the layer's typical size,
    relative to the vocabulary's mean. Raw units (d / scale) are not comparable across models: on the
    default pair Gemma-3's residual is 12.6× SmolLM2's (docs/analysis.md), and its raw-unit lens read in the hundreds. `null_top` is
    the largest top logit of `n_null` other latents' decoder rows of the same model at the same norm;
    `coherent` says whether the latent's top token beats it (a lens no sharper than the dictionary's
    other directions says nothing about this latent)."""
    if lms is None:
        return {}
    out = {}
    for key, lm, scale in (("a", lms[0], cc.cfg.scale_a), ("b", lms[1], cc.cfg.scale_b)):
        ids = [int(j) for j in by_model.get(key, [])]
        if not ids:
            continue
        if typical_F is None:
            dirs_raw = decoder_rows(cc, ids, key) / scale  # raw units: d / scale (docs/design.md §4)
            for j, lens in zip(ids, logit_lens(lm, dirs_raw)):
                out[j] = {"model": key, **lens}
            continue
        typ = torch.as_tensor(np.nan_to_num(np.asarray(typical_F, dtype=float)[ids]), dtype=torch.float32)
        dirs_LD = decoder_rows(cc, ids, key) * typ[:, None]
        # The null: other latents' decoder rows of this model at unit norm. Isotropic random directions
        # are no null here: they load on the residual's few huge-gain dimensions, which the dictionary's
        # directions avoid (on the default pair their top logits were ~15× a latent's).
        own = cc.partition.latents(key)
        pick = np.random.default_rng(0).choice(
            np.arange(own.start, own.stop), min(n_null + 1, len(own)), replace=False
        )
        U_RD = decoder_rows(cc, pick, key)
        U_RD = U_RD / U_RD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        tops = [x["promoted"][0][1] for x in logit_lens(lm, U_RD, top=1, centre_vocab=True)]
        for j, d_D, lens in zip(ids, dirs_LD, logit_lens(lm, dirs_LD, centre_vocab=True)):
            others = [t for p, t in zip(pick, tops) if p != j][:n_null]
            null_top = float(d_D.norm()) * max(others, default=0.0)  # the lens is linear in the direction
            top = lens["promoted"][0][1] if lens["promoted"] else 0.0
            out[j] = {
                "model": key,
                **lens,
                "units": "logits for the mean activation, relative to the vocabulary mean",
                "typical_activation": float(typ[ids.index(j)]),
                "null_top": null_top,
                "coherent": bool(top > null_top > 0),
            }
    return out


def store_tokenizers(store) -> dict:
    """The tokenizers saved in the store at harvest time ({} for a synthetic store)."""
    paths = {key: store.root / "tokenizers" / key for key in "ab"}
    if not any(p.is_dir() for p in paths.values()):
        return {}  # and skip importing transformers (~2 s)
    from transformers import AutoTokenizer

    return {key: AutoTokenizer.from_pretrained(p) for key, p in paths.items() if p.is_dir()}
