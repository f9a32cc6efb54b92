"""Harvest: run both models on the same text and write aligned, paired activations to a store.

corpus -> documents split to fit the context -> both tokenisations -> both models up to their layer
-> positions aligned by character end offsets (align.py) -> masks (first position, outlier norms)
-> shards (store.py). Shards close only between batches and record where the corpus stream stands,
so a killed harvest resumes after its last complete shard and ends byte-identical to an
uninterrupted run. Letters in names: B batch, T tokens, D width, P aligned pairs.
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .errors import CrossdiffError
from .fsutil import explain_os_error, write_json_atomic
from .models import DEFAULT_MODEL_A, DEFAULT_MODEL_B, LanguageModel, load_model, resolve_device, resolve_layer
from .store import Store, completed_shards, finalize, remove_partial_shards, write_shard

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class HarvestConfig:
    out: str
    """Directory of the activation store to write (created; resumed if a harvest there was interrupted)."""
    model_a: str = DEFAULT_MODEL_A
    """Model A: a short name (smollm2-135m, gemma3-270m), a Hugging Face hub id, a local directory or a .gguf file."""
    model_b: str = DEFAULT_MODEL_B
    """Model B, in the same forms as model A."""
    layer_a: str | None = None
    """Block of model A whose output is harvested: an index (e.g. 15, -1) or a relative depth (e.g. 0.5). Default: the middle block."""
    layer_b: str | None = None
    """Block of model B, as for layer A."""
    corpus: str = "brown"
    """Text source: brown, a .txt file or folder, a .jsonl file (jsonl:PATH:FIELD), or hf:NAME[:CONFIG][:SPLIT]."""
    max_tokens: int | None = None
    """Stop after this many aligned token pairs (default: the whole corpus)."""
    context_len: int = 512
    """Longest sequence fed to either model; longer documents are split into several chunks, not truncated."""
    batch_size: int = 8
    """Chunks per forward pass."""
    shard_tokens: int = 16384
    """Aligned pairs per shard (the unit of resumption)."""
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    """Storage precision of the activations."""
    outlier_factor: float = 10.0
    """Drop a pair when either model's activation norm exceeds this multiple of the batch median (massive activations)."""
    device: str = "auto"
    """Where the models run: auto (cuda when available), cpu, cuda, cuda:1 ..."""
    overwrite: bool = False
    """Replace an existing store made with other settings."""

    def __post_init__(self):
        checks = [
            (self.context_len >= 16, f"--context-len must be at least 16, got {self.context_len}"),
            (self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}"),
            (self.shard_tokens >= 1, f"--shard-tokens must be positive, got {self.shard_tokens}"),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"--max-tokens must be positive, got {self.max_tokens}",
            ),
            (self.outlier_factor > 1, f"--outlier-factor must be above 1, got {self.outlier_factor}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CrossdiffError(message)

    def settings(self) -> dict:
        """The fields that determine the store's bytes (device and overwrite do not)."""
        d = asdict(self)
        for k in ("out", "device", "overwrite"):
            d.pop(k)
        return d


@dataclass(frozen=True)
class Chunk:
    doc: int  # position of the document in the corpus
    index_in_doc: int
    id: int  # global chunk number
    source: str
    char_offset: int
    text: str


def harvest(cfg: HarvestConfig) -> Store:
    """Write (or finish) the store at cfg.out and return it opened."""
    from .corpus import open_corpus

    root = Path(cfg.out)
    if _check_existing(root, cfg):
        print(
            f"{root} is already complete ({json.loads((root / 'meta.json').read_text())['n_tokens']:,} aligned pairs)"
        )
        return Store.open(root)
    corpus = open_corpus(cfg.corpus)
    device = resolve_device(cfg.device)
    _fix_mmap_threshold()
    lm_a, lm_b = load_model(cfg.model_a, device=device), load_model(cfg.model_b, device=device)
    layers = resolve_layer(cfg.layer_a, lm_a.n_layers), resolve_layer(cfg.layer_b, lm_b.n_layers)
    created = not root.exists()
    try:
        try:
            _write_store(root, cfg, corpus, (lm_a, lm_b), layers)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise explain_os_error(e, root) from e
    except CrossdiffError:
        if created and not completed_shards(root):
            shutil.rmtree(root, ignore_errors=True)  # nothing finished: leave nothing behind
        raise
    return Store.open(root)


def _check_existing(root: Path, cfg: HarvestConfig) -> bool:
    """True if a complete store with these settings exists; refuse other settings unless overwrite."""
    settings_path = root / "settings.json"
    if root.exists() and not settings_path.is_file() and any(root.iterdir()):
        if not cfg.overwrite:
            raise CrossdiffError(
                f"{root} exists and is not a crossdiff store; choose another --out or pass --overwrite"
            )
        shutil.rmtree(root)
    elif settings_path.is_file():
        if json.loads(settings_path.read_text()) != cfg.settings():
            if not cfg.overwrite:
                raise CrossdiffError(
                    f"{root} holds a store made with other settings; pass --overwrite to replace it or choose another --out"
                )
            shutil.rmtree(root)
            return False
        return (root / "meta.json").is_file()
    return False


def _fix_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve every allocation above 1 MiB by mmap, returned to the OS when freed (glibc only).

    glibc raises its mmap threshold each time a large block is freed, after which batches of varying
    shape land in the heap and fragment it: RSS crept up shard after shard (1,665 -> 1,751 -> 1,807 MiB
    over a 50k-token harvest). A fixed threshold keeps the harvest's memory flat (bench/harvest_memory.py).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD from <malloc.h>
    except (OSError, AttributeError):
        pass


def _write_store(
    root: Path, cfg: HarvestConfig, corpus, lms: tuple[LanguageModel, LanguageModel], layers: tuple[int, int]
) -> None:
    from tqdm.auto import tqdm

    from . import __version__

    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "settings.json", cfg.settings())
    for key, lm in zip("ab", lms):
        if not (root / "tokenizers" / key / "tokenizer_config.json").is_file():
            tmp = root / "tokenizers" / f".{key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            lm.tokenizer.save_pretrained(tmp)
            tmp.rename(root / "tokenizers" / key)
    done = completed_shards(root)
    remove_partial_shards(root, len(done))
    n_done, n_shards = sum(s["n_tokens"] for s in done), len(done)
    resume = done[-1]["next"] if done else {"doc": 0, "index_in_doc": 0, "chunk": 0}
    finished = resume is None  # killed after the last shard, before meta.json
    buffer = _ShardBuffer()
    start = time.perf_counter()
    batches = (
        iter(()) if finished else _batched(_chunks(corpus, lms, cfg.context_len, resume), cfg.batch_size)
    )
    with tqdm(total=cfg.max_tokens, initial=n_done, unit="tok", desc="harvest", dynamic_ncols=True) as bar:
        while cfg.max_tokens is None or n_done + buffer.n < cfg.max_tokens:
            batch = next(batches, None)
            if batch is None:
                break
            buffer.add(*_process_batch(batch, lms, layers, cfg))
            bar.update(
                buffer.last_n if cfg.max_tokens is None else min(buffer.last_n, cfg.max_tokens - bar.n)
            )
            if buffer.n >= cfg.shard_tokens:
                nxt = {
                    "doc": batch[-1].doc,
                    "index_in_doc": batch[-1].index_in_doc + 1,
                    "chunk": batch[-1].id + 1,
                }
                n_done += buffer.flush(root, n_shards, nxt, _remaining(cfg, n_done), cfg.dtype)
                n_shards += 1
        if buffer.n:
            buffer.flush(root, n_shards, None, _remaining(cfg, n_done), cfg.dtype)
    meta = _meta(root, cfg, lms, layers, __version__)
    n = meta["n_tokens"]
    print(
        f"harvested {n:,} aligned pairs into {root} ({time.perf_counter() - start:.0f} s this run); "
        f"aligned fraction A {meta['models']['a']['aligned_fraction']:.3f}, B {meta['models']['b']['aligned_fraction']:.3f}"
    )


def _remaining(cfg: HarvestConfig, n_done: int) -> int | None:
    return None if cfg.max_tokens is None else cfg.max_tokens - n_done


def _chunks(corpus, lms, context_len: int, resume: dict) -> Iterator[Chunk]:
    from .align import split_document

    tok_a, tok_b = lms[0].tokenizer, lms[1].tokenizer
    chunk_id = resume["chunk"]
    for doc_index, doc in enumerate(corpus.iter_from(resume["doc"]), start=resume["doc"]):
        spans = split_document(doc.text, tok_a, tok_b, context_len, context_len)
        first = resume["index_in_doc"] if doc_index == resume["doc"] else 0
        for i, (s, e) in enumerate(spans[first:], start=first):
            yield Chunk(doc_index, i, chunk_id, doc.source, s, doc.text[s:e])
            chunk_id += 1


def _batched(it, n):
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: real tokens keep positions 0..L-1 in every model."""
    T = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BT[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BT[i, : len(s)] = 1
    return ids_BT, mask_BT


def _encode_and_run(lm: LanguageModel, layer: int, texts: list[str]):
    from .align import tokenize

    encs = [tokenize(lm.tokenizer, t) for t in texts]
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids_BT, mask_BT = _pad([list(e[0]) for e in encs], pad_id)
    hidden_BTD = lm.hidden(ids_BT.to(lm.device), mask_BT.to(lm.device), layer).float().cpu()
    return encs, hidden_BTD


def batch_median_norm(hidden_BTD: torch.Tensor, encs) -> float:
    """Median activation norm over the batch's text tokens after each sequence's first position."""
    norms = [
        hidden_BTD[i, 1 : len(e[0])].norm(dim=-1)[~torch.as_tensor(e[2][1:], dtype=torch.bool)]
        for i, e in enumerate(encs)
    ]
    cat = torch.cat(norms)
    return float(cat.median()) if cat.numel() else float("inf")


def _process_batch(batch: list[Chunk], lms, layers, cfg: HarvestConfig):
    from .align import align

    (enc_a, h_a), (enc_b, h_b) = (
        _encode_and_run(lm, layer, [c.text for c in batch]) for lm, layer in zip(lms, layers)
    )
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
        (ids_a, off_a, sp_a), (ids_b, off_b, sp_b) = enc_a[i], enc_b[i]
        al = align(off_a, off_b, sp_a, sp_b)
        counts.update(
            special_a=int(np.sum(sp_a)),
            special_b=int(np.sum(sp_b)),
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
    texts = [
        {
            "chunk": c.id,
            "doc": c.doc,
            "index_in_doc": c.index_in_doc,
            "source": c.source,
            "char_offset": c.char_offset,
            "text": c.text,
        }
        for c in batch
    ]
    return {k: torch.cat(v) for k, v in cols.items()}, texts, counts


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

    def flush(self, root: Path, index: int, nxt: dict | None, limit: int | None, dtype: str) -> int:
        cols = {k: torch.cat([p[k] for p in self.parts]) for k in self.parts[0]}
        n = len(cols["chunk"]) if limit is None else min(limit, len(cols["chunk"]))
        cols = {k: v[:n] for k, v in cols.items()}
        kept_chunks = set(cols["chunk"].tolist())
        texts = [t for t in self.texts if t["chunk"] in kept_chunks]
        stats = {
            "next": nxt,
            "counts": dict(sorted(self.counts.items())),
            # Sums of squared norms in float64 from the float32 activations, for the normalisation scale.
            "sumsq_a": float(cols["acts_a"].double().pow(2).sum()),
            "sumsq_b": float(cols["acts_b"].double().pow(2).sum()),
        }
        cols["acts_a"], cols["acts_b"] = (
            cols["acts_a"].to(STORAGE_DTYPES[dtype]),
            cols["acts_b"].to(STORAGE_DTYPES[dtype]),
        )
        write_shard(root, index, cols, texts, stats)
        self.__init__()
        return n


def _meta(root: Path, cfg: HarvestConfig, lms, layers, version: str) -> dict:
    shards = completed_shards(root)
    counts: Counter = Counter()
    for s in shards:
        counts.update(s["counts"])
    n = sum(s["n_tokens"] for s in shards)
    models = {}
    for key, lm, layer in zip("ab", lms, layers):
        sumsq = sum(s[f"sumsq_{key}"] for s in shards)
        # One scalar per model so that E||x||^2 = d_model after scaling (DESIGN.md §4).
        scale = float(np.sqrt(lm.d_model * n / sumsq)) if sumsq > 0 else 1.0
        models[key] = {
            "id": lm.id,
            "layer": layer,
            "n_layers": lm.n_layers,
            "d_model": lm.d_model,
            "scale": scale,
            "mean_sq_norm": sumsq / max(n, 1),
            "n_text_tokens": counts[f"text_{key}"],
            "aligned_fraction": counts["aligned"] / max(counts[f"text_{key}"], 1),
        }
    masked = {
        k: counts[k]
        for k in (
            "special_a",
            "special_b",
            "unaligned_a",
            "unaligned_b",
            "first_position",
            "outlier_a",
            "outlier_b",
        )
    }
    meta = {
        "crossdiff_version": version,
        "models": models,
        "dtype": cfg.dtype,
        "corpus": cfg.corpus,
        "masked": masked,
        "context_len": cfg.context_len,
    }
    return finalize(root, meta)
