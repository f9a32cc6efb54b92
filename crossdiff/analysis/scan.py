"""Strong firings of rare candidates in fresh text: the corpus beyond the harvest (docs/verification.md,
"Too rare means rare in the world").

A candidate with fewer strong held-out firings than verification scores (`n_contexts`) is not yet
rare in the world, only in a held-out split of ~10k tokens. Before it is called `too rare`, the
documents the harvest never read (the store's corpus from the document after the last one in the
store) are split into chunks as the harvest splits them, run through both models to their layers
(the store's sides: a control's plant or rotation included), aligned, masked as the harvest masks
(no first pair, no norm outlier) and encoded by the crosscoder. Every strong firing (f >= strong ·
p99) of a candidate that needs contexts is counted; the strongest, at most one per chunk, are kept
with their chunk's text, so that verification scores them like held-out contexts.

The scan stops at the first of: every candidate has `n_contexts` contexts (held-out + fresh), the
token budget (`scan_tokens` aligned pairs) is spent, the corpus ends. Its work is counted in tokens,
never seconds, so the same inputs find the same contexts on any machine. Its state (the next
document, tokens scanned, counts, kept firings and their texts) is saved atomically after each
document to RUN/verification/scan.json: a killed scan resumes at the document where it stopped and
finds exactly what an uninterrupted one finds; a finished one is read back.

Legend: T positions, D width, P kept aligned pairs, C candidates needing contexts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..core.fsutil import write_json_atomic


def fresh_start(store) -> tuple[int, int]:
    """(first document the harvest did not read, first unused chunk id): one past the store's largest."""
    last_doc, last_chunk = -1, -1
    for shard in range(len(store.meta["shards"])):
        for chunk, rec in store.texts(shard).items():
            last_doc, last_chunk = max(last_doc, int(rec["doc"])), max(last_chunk, int(chunk))
    return last_doc + 1, last_chunk + 1


def layer_activations(side, ids_T: torch.Tensor, plant_T: np.ndarray | None) -> torch.Tensor:
    """(T, D) the side's layer activation in the crosscoder's coordinates (what Side.forward taps),
    float32 on the CPU; the blocks above the layer never run."""
    mask_1T = torch.ones(1, len(ids_T), dtype=torch.long, device=side.lm.device)
    h_TD = side.lm.hidden(ids_T[None].to(side.lm.device), mask_1T, side.layer)[0].float()
    if side.plant is not None and plant_T is not None and plant_T.any():
        h_TD = h_TD + torch.as_tensor(plant_T, device=h_TD.device)[:, None] * side.plant.v_raw_D.to(
            h_TD.device
        )
    if side.rotation_DD is not None:
        h_TD = h_TD @ side.rotation_DD.to(h_TD.device)
    return h_TD.cpu()


class FreshScan:
    """The scan's state: what it has read and the strong firings it keeps (JSON-serialisable)."""

    def __init__(self, state: dict):
        self.state = state

    @classmethod
    def new(cls, doc: int, chunk: int, need: dict[int, int], key: str = "") -> FreshScan:
        return cls(
            {
                "key": key,  # what the scan depends on (scan's `key` argument)
                "doc": doc,  # next document to read
                "chunk": chunk,  # next fresh chunk id
                "tokens": 0,  # aligned pairs scanned (kept by the harvest's masks)
                "complete": False,
                "stopped": "",
                "need": {str(j): n for j, n in need.items()},  # contexts still wanted per latent
                "n_strong": {str(j): 0 for j in need},  # strong fresh firings per latent
                "chunks": {str(j): 0 for j in need},  # fresh chunks with a strong firing per latent
                "picks": {str(j): [] for j in need},  # [f, chunk, c0], strongest first, <= need
                "texts": {},  # chunk id -> its text, for the chunks some pick uses
            }
        )

    def satisfied(self) -> bool:
        return all(self.state["chunks"][j] >= n for j, n in self.state["need"].items())

    def add_chunk(
        self, chunk: int, text: str, f_PC: torch.Tensor, floor_C: torch.Tensor, ends_P, ids
    ) -> None:
        """Count one chunk's strong firings of the latents `ids` (columns of f_PC) and keep the best."""
        s = self.state
        strong_PC = f_PC >= floor_C
        used = False
        for c, j in enumerate(ids):
            hit = torch.nonzero(strong_PC[:, c]).flatten()
            if len(hit) == 0:
                continue
            key = str(j)
            s["n_strong"][key] += len(hit)
            s["chunks"][key] += 1
            best = int(hit[torch.argmax(f_PC[hit, c])])
            picks = s["picks"][key] + [[float(f_PC[best, c]), chunk, int(ends_P[best])]]
            picks.sort(key=lambda p: (-p[0], p[1]))
            s["picks"][key] = picks[: s["need"][key]]
            used = used or any(p[1] == chunk for p in s["picks"][key])
        if used:
            s["texts"][str(chunk)] = text
        kept = {p[1] for picks in s["picks"].values() for p in picks}
        s["texts"] = {k: v for k, v in s["texts"].items() if int(k) in kept}

    def contexts(self, latent: int) -> list[dict]:
        """The kept fresh firings of a latent as verification contexts, strongest first."""
        s = self.state
        return [
            {"f": f, "chunk": chunk, "c0": c0, "text": s["texts"][str(chunk)], "row": None}
            for f, chunk, c0 in s["picks"].get(str(latent), [])
        ]


def scan(sides, cc, store, wanted: dict, cfg, factor: float, path: Path, key: str = "") -> FreshScan:
    """Scan fresh text for the latents of `wanted` ({Candidate: contexts still needed}) until each has
    them or cfg.scan_tokens aligned pairs are read; resumes from / saves to `path` (module docstring).
    `key` names everything else the result depends on (checkpoint, store): a saved scan of another
    key or for other latents or thresholds is started afresh."""
    from tqdm.auto import tqdm

    from ..inputs.align import split_document
    from ..inputs.corpus import open_corpus

    need = {c.latent: n for c, n in wanted.items() if n > 0}
    key = f"{key}|strong={cfg.strong}|tokens={cfg.scan_tokens}|" + ",".join(
        f"{c.latent}:{c.p99!r}" for c in sorted(wanted, key=lambda c: c.latent)
    )
    saved = json.loads(path.read_text()) if path.is_file() else {}
    same = saved.get("key") == key and saved.get("need") == {str(j): n for j, n in need.items()}
    run = FreshScan(saved) if same else FreshScan.new(*fresh_start(store), need, key)
    s = run.state
    if s["complete"]:
        return run
    if not need or cfg.scan_tokens == 0:
        return _finish(run, path, "nothing to scan" if not need else "--scan-tokens 0")
    try:
        corpus = open_corpus(store.meta.get("corpus", ""))
    except Exception as e:  # a corpus that is gone or unreadable: verification goes on without the scan
        return _finish(run, path, f"corpus not readable ({str(e).splitlines()[0]})")
    by_id = {c.latent: c for c in wanted}
    ids = [int(j) for j in s["need"]]
    floor_C = torch.as_tensor([cfg.strong * by_id[j].p99 for j in ids], dtype=torch.float32)
    n_ctx = int(store.meta.get("context_len", 512))
    tok_a, tok_b = (side.tokenizer for side in sides)
    bar = tqdm(total=cfg.scan_tokens, initial=s["tokens"], unit="tok", desc="scan", dynamic_ncols=True)
    with bar, torch.inference_mode():
        for doc in corpus.iter_from(s["doc"]):
            for start, end in split_document(doc.text, tok_a, tok_b, n_ctx, n_ctx):
                text = doc.text[start:end]
                n = _scan_chunk(run, sides, cc, text, s["chunk"], ids, floor_C, factor)
                s["chunk"] += 1
                s["tokens"] += n
                bar.update(n)
                if s["tokens"] >= cfg.scan_tokens:
                    return _finish(run, path, "token budget")
            s["doc"] = doc.id + 1
            if run.satisfied():
                return _finish(run, path, "enough contexts")
            write_json_atomic(path, s)  # resume point: the next document
    return _finish(run, path, "end of corpus")


def _scan_chunk(run: FreshScan, sides, cc, text: str, chunk: int, ids, floor_C, factor) -> int:
    """Aligned pairs of one chunk kept by the harvest's masks; their strong firings go into `run`."""
    from ..inputs.variants import Window
    from .heldout import encode_pairs, keep_pairs, tokenize_pair

    toks, al = tokenize_pair(sides, text)
    if len(al) < 2:
        return 0
    window = Window(text, chunk, 0)
    h = [
        layer_activations(
            side,
            torch.as_tensor(t.input_ids),
            side.plant.mask(window, t.offsets, t.special_mask) if side.plant else None,
        )
        for side, t in zip(sides, toks)
    ]
    keep_P = keep_pairs(tuple(h), toks, al, factor)
    if not keep_P.any():
        return 0
    f_PF = encode_pairs(cc, h[0], h[1], al.idx_a[keep_P], al.idx_b[keep_P]).cpu()
    run.add_chunk(chunk, text, f_PF[:, ids], floor_C, al.end_char[keep_P], ids)
    return int(keep_P.sum())


def _finish(run: FreshScan, path: Path, why: str) -> FreshScan:
    run.state["complete"], run.state["stopped"] = True, why
    write_json_atomic(path, run.state)
    return run
