"""Aligned fraction of two tokenizers over a corpus, without running any model.

    .venv/bin/python bench/align_stats.py                       # default pair on Brown, context 512
    .venv/bin/python bench/align_stats.py --corpus notes.txt --tok-a DIR_A --tok-b DIR_B

Splits each document as harvest does (split_document), tokenizes each chunk with both tokenizers,
aligns them, and prints per-model aligned fraction, token counts, the most frequent unaligned tokens
(with a few characters of context) and the time taken.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

from crossdiff.inputs.align import align, split_document, tokenize
from crossdiff.inputs.corpus import open_corpus


def load_tokenizer(spec: str):
    try:
        from crossdiff.inputs.models import load_tokenizer as load
    except ImportError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec)
    return load(spec)


class Stats:
    """Counts over all chunks, per side (index 0 = A, 1 = B)."""

    def __init__(self):
        self.totals: Counter = Counter()
        self.missed = (Counter(), Counter())  # unaligned token text -> count
        self.kinds = (Counter(), Counter())  # cause of misalignment -> count
        self.examples: tuple[dict, dict] = (
            {},
            {},
        )  # unaligned token text -> text around its first occurrence
        self.seconds: Counter = Counter()

    def add_document(self, text: str, toks, context_len: int) -> None:
        t0 = time.perf_counter()
        spans = split_document(text, *toks, context_len, context_len)
        self.seconds["split_document"] += time.perf_counter() - t0
        for s, e in spans:
            chunk = text[s:e]
            t1 = time.perf_counter()
            enc = [tokenize(t, chunk) for t in toks]
            t2 = time.perf_counter()
            al = align(enc[0].offsets, enc[1].offsets, enc[0].special_mask, enc[1].special_mask)
            self.seconds["align"] += time.perf_counter() - t2
            self.seconds["tokenize chunks"] += t2 - t1
            self.totals.update(chunks=1, pairs=len(al), text_a=al.n_text_a, text_b=al.n_text_b)
            self.totals.update(
                special_a=int(enc[0].special_mask.sum()), special_b=int(enc[1].special_mask.sum())
            )
            for side, (tk, idx) in enumerate(zip(enc, (al.idx_a, al.idx_b))):
                _count_missed(self.missed[side], self.kinds[side], self.examples[side], chunk, tk, idx)
        self.totals["docs"] += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="brown")
    p.add_argument("--tok-a", default="smollm2-135m")
    p.add_argument("--tok-b", default="gemma3-270m")
    p.add_argument("--context-len", type=int, default=512)
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--top", type=int, default=15, help="unaligned tokens to list per model")
    args = p.parse_args()

    toks = load_tokenizer(args.tok_a), load_tokenizer(args.tok_b)
    stats = Stats()
    start = time.perf_counter()
    for doc in open_corpus(args.corpus):
        if args.max_docs is not None and doc.id >= args.max_docs:
            break
        stats.add_document(doc.text, toks, args.context_len)
    report(stats, args, time.perf_counter() - start)


def report(st: Stats, args, wall: float) -> None:
    t = st.totals
    print(f"corpus {args.corpus}: {t['docs']} documents, {t['chunks']} chunks (context {args.context_len})")
    names = (args.tok_a, args.tok_b)
    for side, name in enumerate(names):
        n_text, n_special = t[f"text_{'ab'[side]}"], t[f"special_{'ab'[side]}"]
        print(
            f"  {'AB'[side]} {name}: {n_text:,} text tokens (+{n_special:,} special), "
            f"{t['pairs']:,} aligned, aligned fraction {t['pairs'] / max(n_text, 1):.4f}"
        )
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in st.seconds.items())
    print(
        f"time: {wall:.1f} s total ({parts}; align {1e6 * st.seconds['align'] / max(t['chunks'], 1):.0f} us/chunk)"
    )
    for side, name in enumerate(names):
        n_text = t[f"text_{'ab'[side]}"]
        print(f"unaligned tokens of {name} by cause (share of its text tokens):")
        for why, n in st.kinds[side].most_common():
            print(f"  {n:9,}  {n / max(n_text, 1):7.2%}  {why}")
    for side, name in enumerate(names):
        print(f"most frequent unaligned tokens of {name} (count, token text, an example in context):")
        for piece, n in st.missed[side].most_common(args.top):
            print(f"  {n:7,}  {piece!r:14} {st.examples[side][piece]!r}")


def _count_missed(counter: Counter, kinds: Counter, examples: dict, text: str, tk, idx: np.ndarray) -> None:
    text_N = ~tk.special_mask & (tk.offsets[:, 1] > tk.offsets[:, 0])
    text_N[idx] = False
    for s, e in tk.offsets[text_N].tolist():
        piece = text[s:e]
        counter[piece] += 1
        examples.setdefault(piece, text[max(s - 12, 0) : e + 12])
        kinds[_why(text, piece, e)] += 1


def _why(text: str, piece: str, end: int) -> str:
    if piece.isspace():
        return "whitespace run split differently (e.g. '\\n'+'\\n' vs '\\n\\n')"
    if end < len(text) and text[end - 1].isalnum() and text[end].isalnum():
        return "ends inside a word the other tokenizer keeps whole"
    if text[end - 1] == "'" or text[end - 1 : end + 1] in ("'s", "'t"):
        return "apostrophe split differently ('s vs ' + s)"
    return "other (punctuation, digits, byte pieces)"


if __name__ == "__main__":
    main()
