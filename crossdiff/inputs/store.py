"""The paired-activation store: shards of aligned (x_A, x_B) rows on disk, read with bounded memory.

Layout of a store directory (format 1):

    meta.json                  written last; its presence means the store is complete
    settings.json              the settings that made it (a rerun with other settings is refused)
    tokenizers/{a,b}/          each model's tokenizer, to show examples in both tokenisations
    shards/NNNNN.safetensors   acts_a [n, d_a], acts_b [n, d_b] (raw units, bf16), chunk, doc, pos_a,
                               pos_b, tok_a, tok_b, char_start, char_end (per row)
    shards/NNNNN.texts.jsonl   the text of every chunk in the shard (chunk id, doc id, source, text)
    shards/NNNNN.json          the shard's statistics and the byte size and sha256 of the two files
                               above; written after them, marks the shard complete

Activations are stored raw; `normalised = raw * scale` with one scalar per model chosen so that
E||x - mean||^2 = d_model (centred; stores written before the per-shard column sums existed keep
E||x||^2 = d_model, docs/design.md §4). Shards are read through numpy memory maps (the safetensors layout
is a JSON header followed by raw little-endian arrays), so random access and shuffled batches never
load a whole shard, let alone the store. Letters in names: N rows, D model width.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..core import runfolder
from ..core.errors import CrossdiffError
from ..core.fsutil import write_bytes_atomic, write_json_atomic
from .storefiles import (
    damaged,
    harvest_files_missing,
    safetensors_problem,
    shard_name,
    shard_problems,
)

FORMAT_VERSION = 1
HELDOUT_FRAC = 0.05
_ROW_COLUMNS = ("chunk", "doc", "pos_a", "pos_b", "tok_a", "tok_b", "char_start", "char_end")
_NP_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I64": np.int64, "I32": np.int32}


def heldout_mask(chunk_N: np.ndarray, frac: float = HELDOUT_FRAC) -> np.ndarray:
    """Held-out rows are whole chunks picked by a fixed hash, so no text is in both splits."""
    h = (chunk_N.astype(np.uint64) * np.uint64(2654435761) + np.uint64(40503)) % np.uint64(2**32)
    return h.astype(np.float64) / 2**32 < frac


# --- writing ---------------------------------------------------------------------------------------


def sum_of_squares(acts_ND: torch.Tensor) -> float:
    """Σ x² over a shard's activations in float64 (for the normalisation scale), in a fixed order:
    numpy's single-threaded pairwise sums over fixed row blocks. torch's parallel sum gave other
    last digits with 1 and 2 threads, so the same harvest wrote different scales."""
    total = 0.0
    for s in range(0, acts_ND.shape[0], 4096):
        block = acts_ND[s : s + 4096].detach().cpu().double().numpy()
        total += float(np.square(block).sum())
    return total


def column_sums(acts_ND: torch.Tensor) -> list[float]:
    """Σ x per column over a shard's activations in float64, in the fixed order of `sum_of_squares`
    (the same bits with any number of threads)."""
    total = np.zeros(acts_ND.shape[1], dtype=np.float64)
    for s in range(0, acts_ND.shape[0], 4096):
        total += acts_ND[s : s + 4096].detach().cpu().double().numpy().sum(axis=0)
    return total.tolist()


def activation_stats(acts_ND: torch.Tensor, key: str) -> dict:
    """A shard's statistics of one model's activations: what `normalisation` builds the scale from."""
    return {f"sumsq_{key}": sum_of_squares(acts_ND), f"sum_{key}": column_sums(acts_ND)}


COMPARABLE_NORMALISATIONS = ("centred", "given")
"""Normalisations under which the two models' losses are on one footing ("given": a synthetic store's
own scales); "uncentred" (or no record: an older store) is not."""


def comparable_losses(store) -> bool:
    """Whether both models of `store` (anything with model_a / model_b metadata) are normalised so
    that their reconstruction errors can be compared (docs/design.md §4)."""
    return all(m.get("normalisation") in COMPARABLE_NORMALISATIONS for m in (store.model_a, store.model_b))


def normalisation(shards: list[dict], key: str, d_model: int, *, centred: bool = True) -> dict:
    """One model's normalisation from its shards' statistics (docs/design.md §4).

    The scale makes the *centred* second moment E||x - mean||² equal d_model. The uncentred
    E||x||² = d_model (Anthropic 2024; the DFC paper) lets a model whose residual stream carries a
    large constant offset weigh far less in the crosscoder's loss: on the default pair Gemma-3's mean
    is 95% of its E||x||², so its centred variance came out 7.6x smaller than SmolLM2's after
    normalisation, and 96-98% of the DFC's B-exclusive latents died (docs/training.md,
    "Normalisation"). Shards without column sums (stores written before them), or centred=False,
    give the uncentred rule.
    """
    n = sum(s["n_tokens"] for s in shards)
    sumsq = sum(s[f"sumsq_{key}"] for s in shards)
    out = {"mean_sq_norm": sumsq / max(n, 1), "normalisation": "uncentred"}
    second = sumsq
    if centred and n and all(f"sum_{key}" in s for s in shards):
        total = np.sum([np.asarray(s[f"sum_{key}"], dtype=np.float64) for s in shards], axis=0)
        second = sumsq - float(total @ total) / n
        out.update(normalisation="centred", centred_mean_sq_norm=second / n)
    out["scale"] = float(np.sqrt(d_model * n / second)) if second > 0 else 1.0
    return out


def file_record(data: bytes) -> dict:
    """What a shard's .json records about one of its files: byte size and sha256 (the same digest
    as `sha256sum`; about as fast as writing the file, measured in docs/store.md)."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_shard(
    root: Path,
    index: int,
    tensors: dict[str, torch.Tensor],
    texts: list[dict],
    stats: dict,
    *,
    heldout_frac: float = HELDOUT_FRAC,
) -> dict:
    """Write one shard atomically; the .json written last marks it complete. Returns the stats."""
    from safetensors.torch import save

    shards = Path(root) / "shards"
    name = shard_name(index)
    chunk_N = tensors["chunk"].numpy()
    stats = dict(
        stats,
        index=index,
        n_tokens=int(chunk_N.shape[0]),
        n_heldout=int(heldout_mask(chunk_N, heldout_frac).sum()),
    )
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    data = save(tensors)
    text = "".join(json.dumps(t, sort_keys=True) + "\n" for t in texts).encode("utf-8")
    stats["files"] = {"safetensors": file_record(data), "texts.jsonl": file_record(text)}
    write_bytes_atomic(shards / f"{name}.safetensors", data)
    write_bytes_atomic(shards / f"{name}.texts.jsonl", text)
    write_json_atomic(shards / f"{name}.json", stats)
    return stats


def completed_shards(root: Path) -> list[dict]:
    """Stats of the complete shards 0..k-1, stopping at the first gap or the first shard whose files
    fail their size check (so a resumed harvest writes that one again instead of trusting it)."""
    out = []
    while (p := Path(root) / "shards" / f"{shard_name(len(out))}.json").is_file():
        try:
            stats = json.loads(p.read_text())
        except ValueError:
            break
        if shard_problems(root, stats, checksums=False):
            break
        out.append(stats)
    return out


def remove_partial_shards(root: Path, n_complete: int) -> None:
    """Delete files of shards >= n_complete and stray temporaries left by a killed writer."""
    shards = Path(root) / "shards"
    if not shards.is_dir():
        return
    for p in shards.iterdir():
        stem = p.name.split(".")[0]
        if p.name.startswith(".") or (stem.isdigit() and int(stem) >= n_complete):
            p.unlink()


def finalize(root: Path, meta: dict, *, heldout_frac: float = HELDOUT_FRAC) -> dict:
    """Add the per-shard table and totals to `meta`, write meta.json (the completion marker).

    `heldout_frac` must be the one the shards were written with (their n_heldout counts).
    """
    shards = completed_shards(root)
    meta = dict(meta)
    meta["format_version"] = FORMAT_VERSION
    meta["heldout_frac"] = heldout_frac
    meta["shards"] = [
        {"name": shard_name(s["index"]), "n_tokens": s["n_tokens"], "n_heldout": s["n_heldout"]}
        | ({"files": s["files"]} if "files" in s else {})
        for s in shards
    ]
    meta["n_tokens"] = sum(s["n_tokens"] for s in shards)
    if meta["n_tokens"] == 0:
        raise CrossdiffError(
            "no aligned tokens were produced; check that the corpus has text both tokenizers can read"
        )
    write_json_atomic(runfolder.path(root, "meta"), meta)
    return meta


def write_synthetic_store(
    path: str | Path,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    *,
    scale_a: float = 1.0,
    scale_b: float = 1.0,
    model_a: str = "synthetic-a",
    model_b: str = "synthetic-b",
    shard_tokens: int = 4096,
    chunk_len: int = 64,
) -> Store:
    """A valid store from tensors in raw units (for tests and synthetic benchmarks)."""
    from .. import __version__

    root = Path(path)
    n = x_a.shape[0]
    if x_b.shape[0] != n:
        raise CrossdiffError(f"x_a has {n} rows but x_b has {x_b.shape[0]}")
    for index, start in enumerate(range(0, n, shard_tokens)):
        rows = torch.arange(start, min(n, start + shard_tokens))
        chunk = rows // chunk_len
        tensors = {
            "acts_a": x_a[rows].to(torch.bfloat16),
            "acts_b": x_b[rows].to(torch.bfloat16),
            "chunk": chunk,
            "doc": chunk.clone(),
            **{c: (rows % chunk_len).to(torch.int32) for c in ("pos_a", "pos_b", "char_start", "char_end")},
            "tok_a": torch.zeros(len(rows), dtype=torch.int32),
            "tok_b": torch.zeros(len(rows), dtype=torch.int32),
        }
        write_shard(root, index, tensors, [], {})
    models = {}
    for key, spec, x, scale in (("a", model_a, x_a, scale_a), ("b", model_b, x_b, scale_b)):
        models[key] = {
            "id": spec,
            "layer": 0,
            "n_layers": 1,
            "d_model": int(x.shape[1]),
            "scale": float(scale),
            "normalisation": "given",  # the caller's scale
            "aligned_fraction": 1.0,
        }
    finalize(
        root,
        {
            "crossdiff_version": __version__,
            "models": models,
            "dtype": "bfloat16",
            "masked": {},
            "corpus": "synthetic",
        },
    )
    return Store.open(root)


# A normalised activation has E||x||² = d and rows above 10x the median norm are dropped at harvest,
# so no coordinate comes near this; random bytes read as bf16 exceed it in ~40% of values.
MAX_ABS_NORMALISED = 1e5


# --- reading ---------------------------------------------------------------------------------------


def _memmap_safetensors(path: Path, root: Path) -> dict[str, np.memmap]:
    problem = safetensors_problem(path)
    if problem:
        raise damaged(path, problem, root)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, _ = info["data_offsets"]
        out[name] = np.memmap(
            path,
            dtype=_NP_DTYPES[info["dtype"]],
            mode="r",
            offset=8 + header_len + begin,
            shape=tuple(info["shape"]),
        )
    return out


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    """A copy of memory-mapped rows as a tensor in storage precision (bf16 is stored as uint16)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16) if arr.dtype == np.uint16 else t


def _peak_abs(raw: torch.Tensor) -> float:
    """max |x| of a tensor in storage precision (NaN if any is NaN). For bf16 from the bit patterns:
    with the sign bit cleared they order like the values, NaN and inf highest; this integer pass is
    ~10x faster than abs().amax() in bf16 on a CPU."""
    if raw.numel() == 0:
        return 0.0
    if raw.dtype == torch.bfloat16:
        bits = (raw.view(torch.int16) & 0x7FFF).amax().reshape(1)
        return float(bits.view(torch.bfloat16).float())
    return float(raw.abs().amax())


class Store:
    """Read access to a complete store: shuffled batches for training, random access for analysis."""

    _MAX_OPEN = 8  # memory maps kept open at once (LRU); mapped pages count towards RSS

    def __init__(self, root: Path, meta: dict):
        self.root = root
        self.meta = meta
        self._open: OrderedDict[int, dict[str, np.memmap]] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path) -> Store:
        root = Path(path)
        meta_path = runfolder.path(root, "meta")
        if not meta_path.is_file():
            if runfolder.exists(root, "settings"):
                raise CrossdiffError(
                    f"the store {root} is incomplete (its harvest was interrupted); rerun the same harvest command to finish it"
                )
            raise CrossdiffError(
                f"no activation store at {root}; create one with `crossdiff harvest --out {root}`"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CrossdiffError(f"cannot read {meta_path}: {e}") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise CrossdiffError(
                f"{root} has store format {meta.get('format_version')}, this crossdiff reads {FORMAT_VERSION}; re-harvest it"
            )
        for entry in meta["shards"]:  # sizes only (one stat per file); `crossdiff check` reads the bytes
            for path, problem in shard_problems(root, entry, checksums=False):
                raise damaged(path, problem, root)
        for path in harvest_files_missing(root, meta):
            raise damaged(path, "missing", root)
        return cls(root, meta)

    @classmethod
    def open_recorded(cls, given: str | None, recorded: str, record: Path) -> Store:
        """The store given by --store, else the one whose path a run recorded in `record`; a recorded
        path that holds no store (a moved run, or a path relative to another folder) asks for --store."""
        if given is not None:
            return cls.open(given)
        root = Path(recorded)
        if not runfolder.exists(root, "meta") and not runfolder.exists(root, "settings"):
            raise CrossdiffError(
                f"{record} records the store {root}, which is not there (the run or the store was moved); "
                "pass --store with the store's path"
            )
        return cls.open(root)

    # metadata
    model_a = property(lambda self: self.meta["models"]["a"])
    model_b = property(lambda self: self.meta["models"]["b"])
    n_tokens = property(lambda self: int(self.meta["n_tokens"]))
    d_a = property(lambda self: int(self.model_a["d_model"]))
    d_b = property(lambda self: int(self.model_b["d_model"]))
    scale_a = property(lambda self: float(self.model_a["scale"]))
    scale_b = property(lambda self: float(self.model_b["scale"]))

    @property
    def outlier_factor(self) -> float:
        """The harvest's --outlier-factor (its settings.json), 10 for a store without one (synthetic):
        later stages drop the same massive-activation rows when they rerun the models."""
        return (runfolder.read(self.root, "settings") or {}).get("outlier_factor", 10.0)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Global row index of each shard's first row (plus the total at the end)."""
        return np.cumsum([0] + [s["n_tokens"] for s in self.meta["shards"]])

    def row_batches(self, batch_size: int, max_rows: int | None = None, heldout_only: bool = False):
        """(global rows, held-out flags) per batch of at most `batch_size`, shard by shard in store
        order, over the first `max_rows` rows (all: None); with `heldout_only`, their held-out rows."""
        limit = min(max_rows or self.n_tokens, self.n_tokens)
        for shard in range(len(self.meta["shards"])):
            n_s = int(min(self.offsets[shard + 1], limit) - self.offsets[shard])
            if n_s <= 0:
                break
            held_N = np.zeros(n_s, dtype=bool)
            h = self.split_rows(shard, "heldout")
            held_N[h[h < n_s]] = True
            local_N = np.flatnonzero(held_N) if heldout_only else np.arange(n_s)
            for i in range(0, len(local_N), batch_size):
                sel = local_N[i : i + batch_size]
                yield self.offsets[shard] + sel, held_N[sel]
            # Drop the shard's memory maps: pages read through them count in this process's RSS, and
            # up to _MAX_OPEN shards stay mapped; one at a time bounds it by one shard's bytes.
            self.release(shard)

    def heldout_chunks(self, max_rows: int):
        """(chunk id, text) of the held-out chunks in store order, each taken whole, while the aligned
        rows of those taken stay below `max_rows` (none for 0): the one walk over held-out text that
        verification and the splice-in evaluation share."""
        n = 0
        for shard in range(len(self.meta["shards"])):
            local_N = self.split_rows(shard, "heldout")
            if n >= max_rows:
                return
            if len(local_N) == 0:
                continue
            chunk_ids, counts = np.unique(
                self.rows(self.offsets[shard] + local_N)["chunk"], return_counts=True
            )
            texts = self.texts(shard)
            for c, k in zip(chunk_ids.tolist(), counts.tolist()):
                if c in texts and n < max_rows:
                    yield c, texts[c]["text"]
                    n += k

    def _shard(self, i: int) -> dict[str, np.memmap]:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        arrays = _memmap_safetensors(
            self.root / "shards" / f"{self.meta['shards'][i]['name']}.safetensors", self.root
        )
        self._open[i] = arrays
        if len(self._open) > self._MAX_OPEN:
            self._open.popitem(last=False)
        return arrays

    def release(self, shard: int | None = None) -> None:
        """Unmap one shard (or all): its pages leave this process's RSS (they stay in the page cache)."""
        if shard is None:
            self._open.clear()
        else:
            self._open.pop(shard, None)

    def _check_values(self, shard: int, raw_a: torch.Tensor, raw_b: torch.Tensor) -> None:
        """Stop at non-finite or impossible activations where they enter (training and analysis read
        through here), naming the shard: the bytes are damaged, whatever the later symptom would be."""
        for raw, scale in ((raw_a, self.scale_a), (raw_b, self.scale_b)):
            peak = _peak_abs(raw) * scale
            if not peak <= MAX_ABS_NORMALISED:  # also true for NaN
                path = self.root / "shards" / f"{self.meta['shards'][shard]['name']}.safetensors"
                raise damaged(
                    path,
                    f"it holds non-finite or impossible activations, max |x| = {peak:.3g} normalised",
                    self.root,
                )

    def _read(self, shard: int, rows: np.ndarray, normalised: bool) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = self._shard(shard)
        raw_a, raw_b = _to_torch(arrays["acts_a"][rows]), _to_torch(arrays["acts_b"][rows])
        self._check_values(shard, raw_a, raw_b)
        x_a, x_b = raw_a.float(), raw_b.float()
        if normalised:
            x_a, x_b = x_a * self.scale_a, x_b * self.scale_b
        return x_a, x_b

    def _locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_tokens):
            raise IndexError(f"row index out of range for a store of {self.n_tokens} rows")
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        return shard, idx - self.offsets[shard]

    def get(self, indices, *, normalised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows by global index, in the order given: (x_a [N, d_a], x_b [N, d_b]) float32."""
        shard_N, local_N = self._locate(indices)
        x_a, x_b = torch.empty(len(shard_N), self.d_a), torch.empty(len(shard_N), self.d_b)
        for s in np.unique(shard_N):
            sel = np.nonzero(shard_N == s)[0]
            order = np.argsort(local_N[sel], kind="stable")  # sorted reads are kinder to the page cache
            a, b = self._read(int(s), local_N[sel][order], normalised)
            x_a[torch.from_numpy(sel[order])], x_b[torch.from_numpy(sel[order])] = a, b
        return x_a, x_b

    def rows(self, indices) -> dict[str, np.ndarray]:
        """Per-row metadata (chunk, doc, positions, token ids, character span) by global index."""
        shard_N, local_N = self._locate(indices)
        out = {c: np.empty(len(shard_N), dtype=np.int64) for c in _ROW_COLUMNS}
        for s in np.unique(shard_N):
            sel = shard_N == s
            arrays = self._shard(int(s))
            for c in _ROW_COLUMNS:
                out[c][sel] = arrays[c][local_N[sel]]
        return out

    def texts(self, shard: int) -> dict[int, dict]:
        """chunk id -> {"doc", "source", "text", ...} for one shard."""
        path = self.root / "shards" / f"{self.meta['shards'][shard]['name']}.texts.jsonl"
        try:
            return {t["chunk"]: t for t in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
        except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
            raise damaged(path, f"unreadable: {type(e).__name__}", self.root) from e

    def shard_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right") - 1)

    def split_rows(self, shard: int, split: str) -> np.ndarray:
        """Local row indices of one shard that belong to `split` ("train", "heldout" or "all")."""
        if split == "all":
            return np.arange(self.meta["shards"][shard]["n_tokens"])
        mask = heldout_mask(
            np.asarray(self._shard(shard)["chunk"]), self.meta.get("heldout_frac", HELDOUT_FRAC)
        )
        return np.nonzero(mask if split == "heldout" else ~mask)[0]

    def split_size(self, split: str) -> int:
        held = sum(s["n_heldout"] for s in self.meta["shards"])
        return {"heldout": held, "train": self.n_tokens - held, "all": self.n_tokens}[split]

    def batches(
        self,
        batch_size: int,
        *,
        split: str = "train",
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
        epochs: int | None = None,
        normalised: bool = True,
        window_tokens: int = 1 << 17,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches (x_a [B, d_a], x_b [B, d_b]) from one endless stream of rows (or `epochs` passes).

        Each epoch shuffles the shard order, then rows inside windows of about `window_tokens` rows
        (memory stays at one window, in storage precision), seeded by (seed, epoch). Batch i is rows [i*B, (i+1)*B) of the
        stream, so `start` skips batches by counting rows, without reading them (resume).
        """
        if self.split_size(split) == 0:
            raise CrossdiffError(f"the store {self.root} has no {split} rows; harvest more tokens")
        scales = (self.scale_a, self.scale_b) if normalised else (1.0, 1.0)
        skip = start * batch_size
        carry: tuple[torch.Tensor, torch.Tensor] | None = None  # < batch_size leftover rows, float32
        epoch = 0
        while epochs is None or epoch < epochs:
            for shard_ids in self._windows(split, seed, epoch, shuffle, window_tokens):
                n_window = sum(self._split_count(s, split) for s in shard_ids)
                if skip >= n_window:
                    skip -= n_window
                    continue
                # The window stays in storage precision; rows are gathered and converted per batch,
                # so memory is one window of bf16 (no float32 or permuted copy of it).
                raw_a, raw_b = self._load_window(shard_ids, split)
                order = (
                    np.random.default_rng([seed, epoch, shard_ids[0]]).permutation(n_window)
                    if shuffle
                    else np.arange(n_window)
                )
                order = torch.from_numpy(order[skip:])
                skip = 0

                def take(idx, raw_a=raw_a, raw_b=raw_b):
                    return raw_a[idx].float() * scales[0], raw_b[idx].float() * scales[1]

                i = 0
                if carry is not None:
                    need = batch_size - carry[0].shape[0]
                    head = take(order[:need])
                    carry = (torch.cat([carry[0], head[0]]), torch.cat([carry[1], head[1]]))
                    i = need
                    if carry[0].shape[0] == batch_size:
                        yield carry
                        carry = None
                if carry is None:
                    while i + batch_size <= len(order):
                        yield take(order[i : i + batch_size])
                        i += batch_size
                    if i < len(order):
                        carry = take(order[i:])
            epoch += 1
        if carry is not None:
            yield carry

    def _split_count(self, shard: int, split: str) -> int:
        s = self.meta["shards"][shard]
        return {"heldout": s["n_heldout"], "train": s["n_tokens"] - s["n_heldout"], "all": s["n_tokens"]}[
            split
        ]

    def _windows(
        self, split: str, seed: int, epoch: int, shuffle: bool, window_tokens: int
    ) -> Iterator[tuple[int, ...]]:
        order = np.arange(len(self.meta["shards"]))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(order)
        window: list[int] = []
        n = 0
        for s in order.tolist():
            window.append(s)
            n += self._split_count(s, split)
            if n >= window_tokens:
                yield tuple(window)
                window, n = [], 0
        if window:
            yield tuple(window)

    def _load_window(self, shard_ids: tuple[int, ...], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's rows of these shards, in storage precision (bf16 or fp16)."""
        parts = []
        for s in shard_ids:
            arrays, rows = self._shard(s), self.split_rows(s, split)
            parts.append((_to_torch(arrays["acts_a"][rows]), _to_torch(arrays["acts_b"][rows])))
            self._check_values(s, *parts[-1])
            self.release(s)  # read once per epoch: keep its pages out of RSS
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
