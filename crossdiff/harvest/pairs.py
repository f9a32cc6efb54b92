"""One batch of chunks through both models to their layers: the aligned pairs, masked (the first
aligned position, special and template tokens, massive-activation outliers), and the buffer that
turns them into shards. `cfg` here is the harvest's HarvestConfig (crossdiff/harvest/harvest.py,
which imports this module). Analysis repeats these masks where it reruns the models (splice.py,
heldout.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..inputs.models import (
    LanguageModel,
    batch_median_norm,
)
from ..inputs.store import (
    activation_stats,
    write_shard,
)
from .blocks import Item

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""--dtype -> the torch dtype shards store activations in."""


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: real tokens keep positions 0..L-1 in every model."""
    T = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BT[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BT[i, : len(s)] = 1
    return ids_BT, mask_BT


def _run(lm: LanguageModel, layer: int, encs) -> torch.Tensor:
    """The block's output for a batch of tokenised chunks, float32 on the CPU (bf16 models on CUDA)."""
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids_BT, mask_BT = _pad([list(e[0]) for e in encs], pad_id)
    return lm.hidden(ids_BT.to(lm.device), mask_BT.to(lm.device), layer).float().cpu()


def _process_batch(items: list[Item], lms, layers, cfg):
    from ..inputs.align import align

    batch = [it.chunk for it in items]
    enc_a, enc_b = [it.enc_a for it in items], [it.enc_b for it in items]
    h_a, h_b = _run(lms[0], layers[0], enc_a), _run(lms[1], layers[1], enc_b)
    med_a, med_b = batch_median_norm(h_a, enc_a), batch_median_norm(h_b, enc_b)
    counts: Counter = Counter()
    cols: dict[str, list] = {
        k: []
        for k in (
            "acts_a",
            "acts_b",
            "chunk",
            "doc",
            "pos_a",
            "pos_b",
            "tok_a",
            "tok_b",
            "char_start",
            "char_end",
        )
    }
    for i, c in enumerate(batch):
        (ids_a, off_a, sp_a, *_), (ids_b, off_b, sp_b, *_) = enc_a[i], enc_b[i]
        al = align(off_a, off_b, sp_a, sp_b)
        counts.update(_mask_reasons(enc_a[i], "a") + _mask_reasons(enc_b[i], "b"))
        counts.update(
            text_a=al.n_text_a,
            text_b=al.n_text_b,
            aligned=len(al.idx_a),
            unaligned_a=al.n_text_a - len(al.idx_a),
            unaligned_b=al.n_text_b - len(al.idx_b),
        )
        ia, ib = torch.as_tensor(al.idx_a, dtype=torch.long), torch.as_tensor(al.idx_b, dtype=torch.long)
        keep = torch.ones(len(ia), dtype=torch.bool)
        keep[:1] = False  # the first aligned position follows BOS alone in one model: massive activations
        counts["first_position"] += int(len(ia) > 0)
        xa, xb = h_a[i, ia], h_b[i, ib]
        out_a, out_b = (
            xa.norm(dim=-1) > cfg.outlier_factor * med_a,
            xb.norm(dim=-1) > cfg.outlier_factor * med_b,
        )
        counts["outlier_a"] += int((out_a & keep).sum())
        counts["outlier_b"] += int((out_b & keep & ~out_a).sum())
        keep &= ~out_a & ~out_b
        ia, ib = ia[keep], ib[keep]
        starts = np.minimum(np.asarray(off_a)[ia.numpy(), 0], np.asarray(off_b)[ib.numpy(), 0])
        n = len(ia)
        cols["acts_a"].append(xa[keep])
        cols["acts_b"].append(xb[keep])
        cols["chunk"].append(torch.full((n,), c.id, dtype=torch.long))
        cols["doc"].append(torch.full((n,), c.doc, dtype=torch.long))
        cols["pos_a"].append(ia.int())
        cols["pos_b"].append(ib.int())
        cols["tok_a"].append(torch.as_tensor(np.asarray(ids_a)[ia.numpy()], dtype=torch.int32))
        cols["tok_b"].append(torch.as_tensor(np.asarray(ids_b)[ib.numpy()], dtype=torch.int32))
        cols["char_start"].append(torch.as_tensor(starts, dtype=torch.int32))
        cols["char_end"].append(torch.as_tensor(np.asarray(al.end_char)[keep.numpy()], dtype=torch.int32))
    texts = [_chunk_record(c) for c in batch]
    return {k: torch.cat(v) for k, v in cols.items()}, texts, counts


def _mask_reasons(enc, key: str) -> Counter:
    """Never-aligned tokens of one side by reason: special tokens, chat-template text, and tokens
    spanning template and content (conversations only, chat.py)."""
    none = np.zeros(len(enc.input_ids), bool)
    template, boundary = getattr(enc, "template_mask", none), getattr(enc, "boundary_mask", none)
    return Counter(
        {
            f"special_{key}": int(np.sum(enc.special_mask & ~template & ~boundary)),
            f"template_{key}": int(np.sum(template)),
            f"boundary_{key}": int(np.sum(boundary)),
        }
    )


def _chunk_record(c) -> dict:
    """A chunk's line in the shard's texts.jsonl; a conversation chunk adds its messages' roles, turns
    and spans, which the report uses to show an example as a turn of the conversation."""
    out = {
        "chunk": c.id,
        "doc": c.doc,
        "index_in_doc": c.index_in_doc,
        "source": c.source,
        "char_offset": c.char_offset,
        "text": c.text,
    }
    if c.messages is not None:
        out["messages"] = [list(m) for m in c.messages]
    return out


class _ShardBuffer:
    """Rows waiting to be written, with the statistics the store's metadata needs."""

    def __init__(self):
        self.parts: list[dict[str, torch.Tensor]] = []
        self.texts: list[dict] = []
        self.counts: Counter = Counter()
        self.n = self.last_n = 0

    def add(self, cols: dict[str, torch.Tensor], texts: list[dict], counts: Counter) -> None:
        self.parts.append(cols)
        self.texts.extend(texts)
        self.counts.update(counts)
        self.last_n = len(cols["chunk"])
        self.n += self.last_n

    def flush(self, root: Path, index: int, nxt: dict | None, round_: int, limit: int | None, cfg) -> int:
        cols = {k: torch.cat([p[k] for p in self.parts]) for k in self.parts[0]}
        n = len(cols["chunk"]) if limit is None else min(limit, len(cols["chunk"]))
        cols = {k: v[:n] for k, v in cols.items()}
        kept_chunks = set(cols["chunk"].tolist())
        texts = [t for t in self.texts if t["chunk"] in kept_chunks]
        stats = {
            "next": nxt,  # where this rank's stream resumes (None: it had finished)
            "round": round_,
            "counts": dict(sorted(self.counts.items())),
            # Sums (of squares, per column) in float64 from the float32 activations, for the scale.
            **activation_stats(cols["acts_a"], "a"),
            **activation_stats(cols["acts_b"], "b"),
        }
        cols["acts_a"], cols["acts_b"] = (
            cols["acts_a"].to(STORAGE_DTYPES[cfg.dtype]),
            cols["acts_b"].to(STORAGE_DTYPES[cfg.dtype]),
        )
        write_shard(root, index, cols, texts, stats, heldout_frac=cfg.heldout_frac)
        self.__init__()
        return n
