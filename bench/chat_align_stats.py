"""Aligned fraction and masked tokens by reason on a conversation corpus, without running any model.

Splits and encodes each conversation as the harvest does (chat.split_conversation, chat.encode_chunk),
aligns, and counts per side: content tokens, aligned pairs, and the never-aligned tokens by reason
(special, template, boundary), with the aligned fraction by role. The harvest's meta.json has the same
counts plus the masks that need activations (first position, outliers).

    .venv/bin/python bench/chat_align_stats.py --corpus chat:A.jsonl,B.jsonl [--context-len 512]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np

from crossdiff.harvest.pairs import _mask_reasons
from crossdiff.inputs.align import align
from crossdiff.inputs.chat import chunk_messages, encode_chunk, split_conversation
from crossdiff.inputs.corpus import open_corpus
from crossdiff.inputs.models import DEFAULT_MODEL_A, DEFAULT_MODEL_B, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="chat-default")
    p.add_argument("--tok-a", default=DEFAULT_MODEL_A)
    p.add_argument("--tok-b", default=DEFAULT_MODEL_B)
    p.add_argument("--context-len", type=int, default=512)
    args = p.parse_args()
    toks = load_tokenizer(args.tok_a), load_tokenizer(args.tok_b)
    counts, by_role = Counter(), Counter()
    start = time.perf_counter()
    for doc in open_corpus(args.corpus):
        counts["conversations"] += 1
        for s, e in split_conversation(doc.text, doc.messages, *toks, args.context_len, args.context_len):
            counts["chunks"] += 1
            msgs = chunk_messages(doc.messages, s, e)
            enc = [encode_chunk(t, doc.text[s:e], msgs) for t in toks]
            al = align(enc[0].offsets, enc[1].offsets, enc[0].special_mask, enc[1].special_mask)
            counts.update(_mask_reasons(enc[0], "a"))
            counts.update(_mask_reasons(enc[1], "b"))
            counts.update(text_a=al.n_text_a, text_b=al.n_text_b, aligned=len(al))
            ends = [m.end for m in msgs]
            for key, e_N in (("a", enc[0]), ("b", enc[1])):
                content = ~e_N.special_mask
                role_N = np.searchsorted(ends, e_N.offsets[content, 1], side="left")
                by_role.update(f"text_{key}_{msgs[i].role}" for i in role_N)
            for i in np.searchsorted(ends, al.end_char, side="left"):
                by_role[f"aligned_{msgs[i].role}"] += 1
    out = {
        "corpus": args.corpus,
        "seconds": round(time.perf_counter() - start, 1),
        **dict(sorted(counts.items())),
        "aligned_fraction_a": round(counts["aligned"] / counts["text_a"], 4),
        "aligned_fraction_b": round(counts["aligned"] / counts["text_b"], 4),
        "by_role": {
            role: {
                k: round(by_role[f"aligned_{role}"] / by_role[f"text_{k}_{role}"], 4)
                for k in "ab"
                if by_role[f"text_{k}_{role}"]
            }
            for role in sorted({k.split("_")[-1] for k in by_role})
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
