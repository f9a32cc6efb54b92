"""Derived stores for the calibration controls (docs/calibration.md): a complete store rewritten shard
by shard with one model's activations changed, everything else (rows, texts, split) kept.

    planted   x_A += v on the rows whose token lies on one of a list of words: a known concept,
              a fixed random direction at the layer's typical norm, planted in model A
    random    x_A += v' on pseudo-random rows (variants.random_rows: a seeded hash of the row's chunk
              and end character), a concept no model can detect from the text
    self      x_B := x_A (model A against itself; same activation space, so Latent Scaling applies)
    rotated   x_B := x_A R, R a random orthogonal matrix (A against a copy of A in another basis)

Row membership of `planted` (one rule, used everywhere): a row is *on a word* when its char_end lies in
(start, end] of a case-insensitive whole-word occurrence of one of the words in its chunk's text. The
rows are aligned pairs, so these are exactly the tokens of model A that end inside a word and that the
store kept; adding v there equals a forward hook adding v to A's block output on those tokens
(tests/test_calibrate.py checks this against the real model).

Layout and guarantees are a store's (crossdiff/inputs/store.py): each shard is written atomically, its .json
last; meta.json is written last; a rerun skips finished shards and finished stores. A column copied
from the base keeps the base's sums (so that model's scale is unchanged); a new column's sums are
computed in float64 from the values stored, and its scale follows (docs/design.md §4).

Legend: N rows of one shard, D model A's width.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import runfolder
from ..core.errors import CrossdiffError
from ..core.fsutil import write_bytes_atomic, write_json_atomic
from ..core.manifest import StageKey, begin, recording
from .store import (
    Store,
    activation_stats,
    completed_shards,
    file_record,
    normalisation,
    remove_partial_shards,
)
from .storefiles import shard_name

CONTROLS = ("planted", "random", "self", "rotated")
PLANTS = ("planted", "random")
FORMAT = 1

# ----------------------------------------------------------------------------- the planted word class


def word_pattern(words) -> re.Pattern:
    """Case-insensitive whole-word occurrences of any of `words` (longest alternative first)."""
    alts = sorted({w.strip() for w in words if w.strip()}, key=lambda w: (-len(w), w.lower()))
    if not alts:
        raise CrossdiffError("the word list is empty")
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, alts)) + r")(?!\w)", re.IGNORECASE)


def rows_on_words(text: str, char_end_N: np.ndarray, pattern: re.Pattern) -> np.ndarray:
    """(N,) bool: which rows of one chunk (by char_end) lie on a word: start < char_end <= end."""
    spans = np.array([m.span() for m in pattern.finditer(text)], dtype=np.int64).reshape(-1, 2)
    if not len(spans):
        return np.zeros(len(char_end_N), dtype=bool)
    k = np.searchsorted(spans[:, 0], char_end_N, side="left") - 1  # last span starting before the end
    return (k >= 0) & (char_end_N <= spans[np.maximum(k, 0), 1])


def chunk_rows_on_words(chunk_N, char_end_N, texts: dict, pattern: re.Pattern) -> np.ndarray:
    """(N,) bool over rows given by chunk id and char_end; `texts` maps chunk id -> {"text": ...}."""
    chunk_N, end_N = np.asarray(chunk_N), np.asarray(char_end_N).astype(np.int64)
    out = np.zeros(len(chunk_N), dtype=bool)
    for c in np.unique(chunk_N):
        sel = np.flatnonzero(chunk_N == c)
        if int(c) in texts:
            out[sel] = rows_on_words(texts[int(c)]["text"], end_N[sel], pattern)
    return out


def shard_planted_mask(store: Store, shard: int, pattern: re.Pattern) -> np.ndarray:
    """(N,) bool over one shard's rows: the rows on a word."""
    first = sum(s["n_tokens"] for s in store.meta["shards"][:shard])
    rows = store.rows(first + store.split_rows(shard, "all"))
    return chunk_rows_on_words(rows["chunk"], rows["char_end"], store.texts(shard), pattern)


def planted_mask(store: Store, pattern: re.Pattern) -> np.ndarray:
    """(n_tokens,) bool over the whole store (global row order)."""
    parts = [shard_planted_mask(store, s, pattern) for s in range(len(store.meta["shards"]))]
    store.release()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def plant_rows(store: Store, control: str, pattern: re.Pattern, seed: int) -> np.ndarray:
    """(n_tokens,) bool: the rows a plant control changes ("planted": on a word; "random": hashed)."""
    if control == "planted":
        return planted_mask(store, pattern)
    rows = store.rows(np.arange(store.n_tokens))
    store.release()
    return random_rows(rows["chunk"], rows["char_end"], seed)


def count_planted(store: Store, pattern: re.Pattern) -> dict:
    """Planted rows in all, and in the held-out split (where verification needs enough firings)."""
    n = n_held = 0
    for s in range(len(store.meta["shards"])):
        mask = shard_planted_mask(store, s, pattern)
        n += int(mask.sum())
        n_held += int(mask[store.split_rows(s, "heldout")].sum())
        store.release(s)
    return {"rows": n, "heldout_rows": n_held}


# ----------------------------------------------------------------------------- the random plant's rows

RANDOM_PLANT_RATE = 0.01
"""Share of rows the random plant marks: about the word plant's share of Brown (1.04%)."""


def random_rows(chunk_N, char_end_N, seed: int, rate: float = RANDOM_PLANT_RATE) -> np.ndarray:
    """(N,) bool: a seeded hash (splitmix64) of (chunk, end character) below `rate`. The choice
    depends only on where a token ends in its chunk, never on the text, so no model can predict it."""
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = (
            np.asarray(chunk_N, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            + np.asarray(char_end_N, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            + np.uint64(seed) * np.uint64(0x94D049BB133111EB)
        ) & mask
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < rate


# ----------------------------------------------------------------------------- random directions


def random_direction(d: int, seed: int) -> torch.Tensor:
    """(D,) float32 unit vector, a fixed function of (d, seed)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    return (v / v.norm()).float()


def random_rotation(d: int, seed: int) -> torch.Tensor:
    """(D, D) float32 orthogonal matrix, Haar-distributed: QR of a Gaussian with the signs of R's
    diagonal moved into Q (Mezzadri 2007), so the distribution does not depend on the QR convention."""
    g = torch.Generator().manual_seed(seed + 1_000_003)  # not the planted direction's stream
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().contiguous()


def planted_norm(store: Store) -> float:
    """The layer's typical norm in raw units: sqrt(E||x_A||²), the store's own statistic (the mean,
    not the median; stores without it: sqrt(d_A) / scale_A, the same number under their rule)."""
    if "mean_sq_norm" in store.model_a:
        return float(np.sqrt(store.model_a["mean_sq_norm"]))
    return float(np.sqrt(store.d_a) / store.scale_a)


# ----------------------------------------------------------------------------- the controls


@dataclass(frozen=True)
class Control:
    """How a derived store differs from its base."""

    name: str
    seed: int
    words: tuple[str, ...] = ()

    def __post_init__(self):
        if self.name not in CONTROLS:
            raise CrossdiffError(f"unknown control {self.name!r}; choose one of {', '.join(CONTROLS)}")
        if self.name == "planted" and not self.words:
            raise CrossdiffError("the planted control needs a non-empty word list")

    def settings(self, base: Store) -> dict:
        fingerprint = hashlib.sha1(json.dumps(base.meta, sort_keys=True).encode()).hexdigest()
        return {
            "format": FORMAT,
            "control": self.name,
            "seed": self.seed,
            "words": sorted(self.words) if self.name == "planted" else [],
            **({"rate": RANDOM_PLANT_RATE} if self.name == "random" else {}),
            "base_meta_sha1": fingerprint,  # not its path: a moved diff folder stays valid
        }


def transform_shard(control: Control, tensors: dict, texts: dict, extra: dict) -> dict:
    """The derived shard's tensors (a new dict; unchanged columns are the base's tensors)."""
    out = dict(tensors)
    acts_a = tensors["acts_a"]
    if control.name in PLANTS:
        chunk_N, end_N = tensors["chunk"].numpy(), tensors["char_end"].numpy()
        if control.name == "planted":
            mask = chunk_rows_on_words(chunk_N, end_N, texts, extra["pattern"])
        else:
            mask = random_rows(chunk_N, end_N, control.seed)
        mask_N = torch.from_numpy(mask)
        planted = acts_a.float() + mask_N[:, None].float() * extra["v_raw"]
        out["acts_a"] = torch.where(mask_N[:, None], planted.to(acts_a.dtype), acts_a)
    elif control.name == "self":
        out["acts_b"] = acts_a.clone()
        out["pos_b"], out["tok_b"] = tensors["pos_a"].clone(), tensors["tok_a"].clone()
    else:  # rotated
        out["acts_b"] = (acts_a.float() @ extra["rotation"]).to(acts_a.dtype)
        out["pos_b"], out["tok_b"] = tensors["pos_a"].clone(), tensors["tok_a"].clone()
    return out


def _changed(control: Control) -> dict[str, str | None]:
    """For each model key, where its column comes from: None (the base's own, sum kept), "a" (a copy
    of the base's A column, A's sum) or "new" (computed here, sum from the stored values)."""
    return {
        "planted": {"a": "new", "b": None},
        "random": {"a": "new", "b": None},
        "self": {"a": None, "b": "a"},
        "rotated": {"a": None, "b": "new"},
    }[control.name]


def _shard_stats(control: Control, base_stats: dict, tensors: dict) -> dict:
    stats = dict(base_stats)
    for key, source in _changed(control).items():
        if source == "a" and "sumsq_a" in base_stats:  # a copy of A's column carries A's sums
            for name in ("sumsq", "sum"):
                stats.pop(f"{name}_{key}", None)
                if f"{name}_a" in base_stats:
                    stats[f"{name}_{key}"] = base_stats[f"{name}_a"]
        elif source is not None:
            stats.update(activation_stats(tensors[f"acts_{key}"], key))
    return stats


def _models_meta(control: Control, base: Store, shards: list[dict]) -> dict:
    a, b = dict(base.model_a), dict(base.model_b)

    def rescaled(entry: dict, key: str) -> dict:
        # the base store's rule carries over: a control of an uncentred store stays uncentred
        centred = base.model_a.get("normalisation") == "centred"
        stats = normalisation(shards, key, int(entry["d_model"]), centred=centred)
        return {**entry, **stats}

    if control.name in PLANTS:
        return {"a": rescaled({**a, "id": f"{a['id']}+{control.name}"}, "a"), "b": b}
    if control.name == "self":
        return {"a": a, "b": dict(a)}  # same id and width: analysis detects the shared space
    return {"a": a, "b": rescaled({**a, "id": f"{a['id']}+rotated"}, "b")}


def derive_store(base: Store, out: str | Path, control: Control, *, overwrite: bool = False) -> Store:
    """Write (or finish) the derived store at `out` and return it opened."""
    out = Path(out)
    with recording(out, "calibrate"):  # run inside calibrate, under its lock
        settings = control.settings(base)
        other = "clear" if overwrite else "refuse"
        refuse = f"{out} holds a different derived store (other base, words or seed); pass --overwrite to replace it"
        meta = (runfolder.FILES["meta"],)
        if begin(out, _key(settings), meta, command="calibrate", other=other, refuse=refuse):
            return Store.open(out)
        if not runfolder.exists(out, "meta"):
            _write(base, out, control, settings)
    return Store.open(out)


def _key(settings: dict) -> StageKey:
    """A derived store's key: its settings; a store without a keyed manifest is judged by its
    settings.json (the same settings)."""

    def legacy(out: Path) -> bool | None:
        saved = runfolder.read_json(runfolder.path(out, "settings"))
        return None if saved is None else saved == settings

    return StageKey(settings, legacy=legacy)


def _write(base: Store, out: Path, control: Control, settings: dict) -> None:
    """The derived store's files, resuming after its last complete shard; meta.json last."""
    from safetensors.torch import load_file, save

    write_json_atomic(runfolder.path(out, "settings"), settings)
    extra = _extras(control, base, out)
    done = completed_shards(out)
    remove_partial_shards(out, len(done))
    src = base.root / "shards"
    for i, entry in enumerate(base.meta["shards"]):
        if i < len(done):
            continue
        name = entry["name"]
        tensors = transform_shard(control, load_file(src / f"{name}.safetensors"), base.texts(i), extra)
        stats = _shard_stats(control, json.loads((src / f"{name}.json").read_text()), tensors)
        data = save({k: v.contiguous() for k, v in tensors.items()})
        text = (src / f"{name}.texts.jsonl").read_bytes()
        # This store's own files, recorded as the harvest records them (store.write_shard).
        stats["files"] = {"safetensors": file_record(data), "texts.jsonl": file_record(text)}
        write_bytes_atomic(out / "shards" / f"{shard_name(i)}.safetensors", data)
        write_bytes_atomic(out / "shards" / f"{shard_name(i)}.texts.jsonl", text)
        write_json_atomic(out / "shards" / f"{shard_name(i)}.json", {**stats, "index": i})
    _copy_tokenizers(base.root, out, b_from="b" if control.name in PLANTS else "a")
    shards = completed_shards(out)
    meta = {
        **base.meta,
        "models": _models_meta(control, base, shards),
        "shards": [
            {**e, "name": shard_name(i), **({"files": s["files"]} if "files" in s else {})}
            for i, (e, s) in enumerate(zip(base.meta["shards"], shards))
        ],
        "derived": {"control": control.name, "base": str(base.root), **extra["meta"]},
    }
    write_json_atomic(runfolder.path(out, "meta"), meta)


def _extras(control: Control, base: Store, out: Path) -> dict:
    """Per-control constants (direction, rotation), saved next to the store for inspection."""
    from safetensors.torch import save

    if control.name in PLANTS:
        # The random plant gets its own direction: the two positive controls must not share one.
        unit = random_direction(base.d_a, control.seed + (control.name == "random"))
        norm = planted_norm(base)
        v_raw = unit * norm
        write_bytes_atomic(out / "direction.safetensors", save({"unit": unit, "v_raw": v_raw}))
        meta = {"seed": control.seed, "norm_raw": norm}
        if control.name == "random":
            return {"v_raw": v_raw, "meta": {**meta, "rate": RANDOM_PLANT_RATE}}
        pattern = word_pattern(control.words)
        return {"pattern": pattern, "v_raw": v_raw, "meta": {**meta, "words": sorted(control.words)}}
    if control.name == "rotated":
        rot = random_rotation(base.d_a, control.seed)
        write_bytes_atomic(out / "rotation.safetensors", save({"rotation": rot}))
        return {"rotation": rot, "meta": {"seed": control.seed}}
    return {"meta": {}}


def _copy_tokenizers(base: Path, out: Path, b_from: str) -> None:
    """tokenizers/a from the base's a, tokenizers/b from the base's `b_from` (each via a temp folder)."""
    for key, src_key in (("a", "a"), ("b", b_from)):
        src, dest = base / "tokenizers" / src_key, out / "tokenizers" / key
        if dest.is_dir() or not src.is_dir():
            continue
        tmp = out / "tokenizers" / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        tmp.rename(dest)


def load_direction(store: Store) -> torch.Tensor:
    """The planted store's unit direction (D,) (raw and normalised units share it: one scalar apart)."""
    from safetensors.torch import load_file

    return load_file(store.root / "direction.safetensors")["unit"]


def load_rotation(store: Store) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(store.root / "rotation.safetensors")["rotation"]
