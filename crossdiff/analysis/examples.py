"""Examples as researchers read them: firings sampled across the activation range, and the latent's
activation on every token of an example's context (for per-token colouring in the report).

Top-k examples show only the extreme; a reader also needs typical firings. `sample_firings` keeps a
uniform random sample of every listed latent's firings in one streaming pass: each (row, latent) firing
gets a pseudo-random priority from a hash of the pair, and the `n` highest priorities are kept
(`evidence.TopK` on the priorities). The sample depends only on the store and the crosscoder, never on
batch order or machine load. `quantile_picks` then takes the sampled firings at evenly spaced quantiles
of their activation.

`context_activations` encodes the store rows around each example (same chunk, `window` aligned pairs
each side) and records the latent's activation on each, as character spans relative to the start of
the example's shown text: [[start, end, activation], ...].

Legend: B rows in a batch, L listed latents, N sampled rows.
"""

from __future__ import annotations

import numpy as np
import torch

_MUL = 0x9E3779B97F4A7C15 - (1 << 64)  # the golden-ratio constant as a signed int64 (torch has no uint64 ops)


def _priority(rows_B: torch.Tensor, ids_L: torch.Tensor) -> torch.Tensor:
    """(B, L) pseudo-random numbers in (0, 1] from (row, latent): a splitmix64-style integer hash."""
    x = rows_B[:, None].to(torch.int64) * 1_000_003 + ids_L[None, :].to(torch.int64)
    x = x * _MUL  # int64 multiplication wraps, as the hash needs
    x = x ^ (x >> 31)
    x = x * 0x2545F4914F6CDD1D
    x = x ^ (x >> 29)
    return ((x & ((1 << 24) - 1)).double() + 1.0) / float(1 << 24)


@torch.inference_mode()
def sample_firings(cc, store, latents, n: int, batches, device) -> dict[int, list[int]]:
    """latent -> the rows of a uniform random sample of (at most) n of its firings, over `batches`
    ((rows, held-out flags) pairs, as Store.row_batches yields them)."""
    from .evidence import TopK

    ids_L = torch.as_tensor([int(j) for j in latents], dtype=torch.int64, device=device)
    if len(ids_L) == 0 or n < 1:
        return {}
    top = TopK(len(ids_L), n, device)
    for rows, _ in batches:
        x_a, x_b = (x.to(device) for x in store.get(rows))
        f_BL = cc.encode(x_a, x_b)[:, ids_L]
        rows_B = torch.as_tensor(rows, device=device)
        pri_BL = torch.where(f_BL > 0, _priority(rows_B, ids_L).to(f_BL.dtype), 0.0)
        top.update(pri_BL, rows_B)
    return {int(j): sorted(r for _, r in top.examples(k)) for k, j in enumerate(ids_L.tolist())}


def counted(batches, bar):
    """Every (rows, flags) batch, each counted on the progress bar. (The bar's `update` returns True when
    it redraws, about once a second: a filter on it dropped those batches, so the sample depended on
    the machine's speed.)"""
    for rows, held in batches:
        bar.update(len(rows))
        yield rows, held


def quantile_picks(values_rows: list[tuple[float, int]], n: int) -> list[tuple[float, int, float]]:
    """n of the (value, row) pairs at evenly spaced quantiles of their values, as (value, row, quantile);
    highest first."""
    pairs = sorted(values_rows)
    if not pairs or n < 1:
        return []
    qs = np.linspace(0.05, 0.95, n) if n > 1 else np.array([0.5])
    picked, seen = [], set()
    for q in qs:
        i = min(len(pairs) - 1, int(q * len(pairs) + 1e-9))  # linspace gives 0.49999999999999994
        if i not in seen:
            seen.add(i)
            picked.append((*pairs[i], float(q)))
    return picked[::-1]


@torch.inference_mode()
def context_activations(cc, store, wanted: dict[int, list[int]], window: int, device) -> dict[tuple, list]:
    """(latent, row) -> [(row', char_start, char_end, activation)] for the rows of the same chunk within
    `window` rows either side of `row` (the store keeps a chunk's aligned pairs in order)."""
    centre = sorted({r for rows in wanted.values() for r in rows})
    if not centre:
        return {}
    lo = np.maximum(np.asarray(centre) - window, 0)
    hi = np.minimum(np.asarray(centre) + window, store.n_tokens - 1)
    need = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(lo, hi)]))
    meta = store.rows(need)
    at = {int(r): i for i, r in enumerate(need)}
    ids = sorted(wanted)
    col = {j: k for k, j in enumerate(ids)}
    f_NL = np.zeros((len(need), len(ids)), dtype=np.float32)
    for i in range(0, len(need), 1024):
        x_a, x_b = (x.to(device) for x in store.get(need[i : i + 1024]))
        f_NL[i : i + 1024] = cc.encode(x_a, x_b)[:, torch.as_tensor(ids, device=device)].float().cpu().numpy()
    out = {}
    for j, rows in wanted.items():
        for r in rows:
            chunk, spans = meta["chunk"][at[r]], []
            for q in range(max(0, r - window), min(store.n_tokens - 1, r + window) + 1):
                k = at[q]
                if meta["chunk"][k] == chunk:
                    spans.append(
                        (q, int(meta["char_start"][k]), int(meta["char_end"][k]), float(f_NL[k, col[j]]))
                    )
            out[(j, r)] = spans
    return out


def attach_activations(example: dict, spans: list, char_start: int) -> dict:
    """The example with "acts": [[start, end, activation]] relative to the start of its text_before
    (which ends at the firing token's char_start), only the spans inside the shown text."""
    origin = char_start - len(example.get("text_before") or "")
    shown = len(example.get("text_before") or "") + len(example.get("text_token") or "")
    shown += len(example.get("text_after") or "")
    acts = [
        [s - origin, e - origin, round(v, 4)]
        for _, s, e, v in spans
        if s - origin >= 0 and e - origin <= shown
    ]
    return {**example, "acts": acts}


def enrich(
    examples: dict[int, list[dict]], cc, store, tokenizers: dict, cfg, n_quantile: int, window: int = 24
):
    """(top examples with "acts", quantile examples with "acts" and "quantile") per latent of `examples`,
    for analyze.write_features: one extra encoder pass over the analysed rows (the sample), and the
    rows around each shown example."""
    from .evidence import render_examples

    device = cc.b_enc.device
    latents = sorted(examples)
    from tqdm.auto import tqdm

    total = min(cfg.max_tokens or store.n_tokens, store.n_tokens)
    with tqdm(total=total, unit="tok", desc="examples", dynamic_ncols=True, mininterval=1.0) as bar:
        batches = counted(store.row_batches(cfg.batch_size, cfg.max_tokens), bar)
        sample = sample_firings(cc, store, latents, 8 * n_quantile, batches, device)
    values = context_activations(cc, store, sample, 0, device)  # the sampled rows' own activations
    picks = {}
    for j in latents:
        vr = [(sp[0][3], r) for r in sample.get(j, []) if (sp := values.get((j, r))) and sp[0][3] > 0]
        picks[j] = quantile_picks(vr, n_quantile)
    # Context activations only for the examples shown: the top ones and the quantile picks.
    wanted = {j: sorted({int(e["row"]) for e in examples[j]} | {r for _, r, _ in picks[j]}) for j in latents}
    spans = context_activations(cc, store, wanted, window, device)
    centre = {key: next((s for s in sp if s[0] == key[1]), None) for key, sp in spans.items()}
    shown = render_examples(
        store,
        {j: [(v, r) for v, r, _ in p] for j, p in picks.items()},
        tokenizers,
        context_chars=cfg.context_chars,
        window=cfg.context_tokens,
    )

    def acts(j, e):
        c = centre.get((j, int(e["row"])))
        return attach_activations(e, spans[(j, int(e["row"]))], c[1]) if c is not None else e

    top = {j: [acts(j, e) for e in examples[j]] for j in latents}
    quant = {
        j: [
            {**acts(j, e), "quantile": q, "sample_size": len(sample.get(j, []))}
            for e, (_, _, q) in zip(shown[j], picks[j])
        ]
        for j in latents
    }
    return top, quant
