"""Alignment by character end offsets and document chunking (docs/design.md §3).

Hand-made offset arrays pin down the rule; the real default tokenizers (fixture `tokenizers_ab`)
check it on the cases that motivated it: digits, Ġ vs ▁ spaces, byte pieces, emoji, CJK, BOS.
"""

from __future__ import annotations

import numpy as np
import pytest

from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.align import Alignment, align, split_document, tokenize


def _pairs(al: Alignment) -> list[tuple[int, int, int]]:
    return list(zip(al.idx_a.tolist(), al.idx_b.tolist(), al.end_char.tolist()))


# ---------------------------------------------------------------- hand-made offsets


def test_numbers_split_differently():
    # "in 1990." : A keeps " 1990" whole, B splits " 199" + "0".
    a = [(0, 2), (2, 7), (7, 8)]
    b = [(0, 2), (2, 6), (6, 7), (7, 8)]
    al = align(a, b)
    assert _pairs(al) == [(0, 0, 2), (1, 2, 7), (2, 3, 8)]
    assert (al.n_text_a, al.n_text_b) == (3, 4)
    assert al.aligned_fraction_a == 1.0 and al.aligned_fraction_b == 0.75
    assert al.idx_a.dtype == al.idx_b.dtype == al.end_char.dtype == np.int64


def test_leading_space_conventions_and_bos():
    # "a word": A 'a' 'Ġword'; B '<bos>' 'a' '▁word'; C 'a' '▁' 'word' (space as its own token).
    a = [(0, 1), (1, 6)]
    b = [(0, 0), (0, 1), (1, 6)]
    c = [(0, 1), (1, 2), (2, 6)]
    assert _pairs(align(a, b)) == [(0, 1, 1), (1, 2, 6)]
    assert _pairs(align(a, c)) == [(0, 0, 1), (1, 2, 6)]
    assert align(a, b).n_text_b == 2  # BOS is no text token


def test_byte_pieces_align_at_the_last_piece():
    # " 日" as SmolLM2 byte-level pieces 'Ġæ'(22,24) 'Ĺ'(23,24) '¥'(23,24) vs one '▁日' token.
    a = [(20, 22), (22, 24), (23, 24), (23, 24), (24, 25)]
    b = [(20, 22), (22, 24), (24, 25)]
    assert _pairs(align(a, b)) == [(0, 0, 22), (3, 1, 24), (4, 2, 25)]
    # Byte fallback on both sides (Gemma '<0xF0>' '<0x93>' ...): last piece with last piece.
    a = [(0, 1), (1, 2), (1, 2), (1, 2), (1, 2)]
    b = [(0, 0), (0, 1), (1, 2), (1, 2)]
    assert _pairs(align(a, b)) == [(0, 1, 1), (4, 3, 2)]


def test_special_tokens_never_align():
    # A literal template token with real offsets, flagged only by the mask; a (0, 0) token unflagged.
    a = [(0, 0), (0, 5), (5, 20), (20, 24)]
    b = [(0, 5), (5, 20), (20, 24)]
    sp_a = [True, False, True, False]
    sp_b = [False, True, False]
    al = align(a, b, sp_a, sp_b)
    assert _pairs(al) == [(1, 0, 5), (3, 2, 24)]
    assert (al.n_text_a, al.n_text_b) == (2, 2)
    assert _pairs(align([(0, 0), (0, 0), (0, 3)], [(0, 0), (0, 3)])) == [(2, 1, 3)]


def test_one_side_truncated_at_the_context_limit():
    a = [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15)]
    b_full = [(0, 0), (0, 6), (6, 12), (12, 15)]
    b_cut = b_full[:3]  # B's context ended after 12 characters
    full, cut = align(a, b_full), align(a, b_cut)
    assert _pairs(cut) == [(1, 1, 6), (3, 2, 12)]
    assert set(_pairs(cut)) <= set(_pairs(full))
    assert (cut.n_text_a, cut.n_text_b) == (5, 2)
    empty = align(a, [])
    assert len(empty) == 0 and empty.n_text_b == 0 and empty.aligned_fraction_b == 0.0


def _reference_align(offs_a, offs_b, sp_a, sp_b):
    """Python loops, written straight from the rule."""

    def last_per_end(offs, sp):
        best = {}
        for i, ((s, e), special) in enumerate(zip(offs, sp)):
            if not special and e > s:
                best[e] = i
        return best

    la, lb = last_per_end(offs_a, sp_a), last_per_end(offs_b, sp_b)
    return [(la[e], lb[e], e) for e in sorted(set(la) & set(lb))]


def _random_tokenization(rng, n_chars: int) -> tuple[list[tuple[int, int]], list[bool]]:
    cuts = np.sort(rng.choice(np.arange(1, n_chars), size=rng.integers(1, n_chars // 2), replace=False))
    bounds = [0, *cuts.tolist(), n_chars]
    offs, sp = [(0, 0)], [True]  # BOS
    for s, e in zip(bounds, bounds[1:]):
        pieces = int(rng.integers(1, 4)) if rng.random() < 0.2 else 1  # byte pieces sharing one end
        offs += [(s, e)] + [(e - 1, e)] * (pieces - 1)
        sp += [bool(rng.random() < 0.05)] * pieces  # sometimes a literal special token in the text
    return offs, sp


def test_matches_reference_on_random_tokenizations():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(4, 80))
        (oa, sa), (ob, sb) = _random_tokenization(rng, n), _random_tokenization(rng, n)
        al = align(oa, ob, sa, sb)
        assert _pairs(al) == _reference_align(oa, ob, sa, sb)
        assert np.all(np.diff(al.idx_a) > 0) and np.all(np.diff(al.idx_b) > 0)


# ---------------------------------------------------------------- real tokenizers

MIXED = 'In 1990, "naïve" café-goers paid $3.50 for 日本語 tea 🍵🎉!\n\nΣ  x  ≥ 𓀀 ꙮ 12345678 — done.'


def test_tokenize_uses_each_models_special_tokens(tokenizers_ab):
    smol, gemma = tokenizers_ab
    ta, tb = tokenize(smol, "Hello"), tokenize(gemma, "Hello")
    assert not ta.special_mask.any()  # SmolLM2 adds nothing
    assert tb.input_ids[0] == gemma.bos_token_id and tb.special_mask.tolist() == [True, False]
    assert tuple(tb.offsets[0]) == (0, 0)
    assert ta.offsets.shape == (len(ta.input_ids), 2) and ta.input_ids.dtype == np.int64
    # Template tokens written in the text are parsed as special tokens: flagged, never aligned.
    t = tokenize(gemma, "hi<start_of_turn>user")
    assert t.special_mask.sum() == 2 and "<start_of_turn>" in gemma.convert_ids_to_tokens(
        t.input_ids.tolist()
    )


def test_real_pairs_have_read_the_same_text(tokenizers_ab):
    encs = [tokenize(t, MIXED) for t in tokenizers_ab]
    al = align(encs[0].offsets, encs[1].offsets, encs[0].special_mask, encs[1].special_mask)
    assert 0 not in al.idx_b  # Gemma's BOS
    for tok, enc, idx in zip(tokenizers_ab, encs, (al.idx_a, al.idx_b)):
        for i, end in zip(idx.tolist(), al.end_char.tolist()):
            assert tok.decode(enc.input_ids[: i + 1].tolist(), skip_special_tokens=True) == MIXED[:end]
    # Nothing is missed: every end offset the two sides share is aligned.
    ends = [set(e.offsets[~e.special_mask, 1].tolist()) for e in encs]
    assert set(al.end_char.tolist()) == ends[0] & ends[1]
    assert al.aligned_fraction_a > 0.6 and al.aligned_fraction_b > 0.6


@pytest.mark.parametrize("piece", ["日", "🎉", "𓀀", "ꙮ", "1990", "  x"])
def test_real_multibyte_and_digits(tokenizers_ab, piece):
    text = f"the {piece} end"
    encs = [tokenize(t, text) for t in tokenizers_ab]
    al = align(encs[0].offsets, encs[1].offsets, encs[0].special_mask, encs[1].special_mask)
    piece_end = 4 + len(piece)
    assert piece_end in al.end_char.tolist() and len(text) in al.end_char.tolist()
    for enc, idx in zip(encs, (al.idx_a, al.idx_b)):
        k = al.end_char.tolist().index(piece_end)
        later = enc.offsets[idx[k] + 1 :, 1]
        assert not np.any(later == piece_end)  # the LAST piece ending there was taken


def test_real_truncation_aligns_only_the_kept_prefix(tokenizers_ab):
    text = " ".join(["The quick brown fox jumps over the lazy dog in 1987."] * 20)
    encs = [tokenize(t, text) for t in tokenizers_ab]
    full = align(encs[0].offsets, encs[1].offsets, encs[0].special_mask, encs[1].special_mask)
    cut_b = 64
    cut = align(encs[0].offsets, encs[1].offsets[:cut_b], encs[0].special_mask, encs[1].special_mask[:cut_b])
    assert len(cut) > 40 and cut.idx_b.max() < cut_b
    assert set(_pairs(cut)) == {p for p in _pairs(full) if p[1] < cut_b}


# ---------------------------------------------------------------- split_document


def _check_spans(text, spans, toks, max_lens):
    prev = 0
    for s, e in spans:
        assert prev <= s < e and text[prev:s].strip() == ""  # only whitespace left out
        assert not text[s].isspace() and not text[e - 1].isspace()
        for tok, m in zip(toks, max_lens):
            assert len(tokenize(tok, text[s:e]).input_ids) <= m
        prev = e
    assert text[prev:].strip() == ""


def _long_text(n_paragraphs: int = 12) -> str:
    rng = np.random.default_rng(1)
    words = (
        'the jury said 1990 naïve café 日本 🎉 Fulton $3.50 investigation (primary) "election" it\'s'.split()
    )
    paras = []
    for _ in range(n_paragraphs):
        sentences = [
            " ".join(rng.choice(words, size=rng.integers(5, 20))) + "." for _ in range(rng.integers(1, 6))
        ]
        paras.append(" ".join(sentences).capitalize())
    return "\n\n".join(paras)


def test_split_fits_both_contexts_and_covers_the_text(tokenizers_ab):
    text = _long_text()
    for max_lens in [(64, 64), (48, 200), (300, 40)]:
        spans = split_document(text, *tokenizers_ab, *max_lens)
        assert len(spans) > 1
        _check_spans(text, spans, tokenizers_ab, max_lens)
        assert split_document(text, *tokenizers_ab, *max_lens) == spans  # deterministic (resume)


def test_split_prefers_paragraphs_and_sentences(tokenizers_ab):
    text = _long_text(30)
    spans = split_document(text, *tokenizers_ab, 128, 128)
    ends = [e for _, e in spans[:-1]]
    # Every cut falls at a sentence end; most at a paragraph break.
    assert all(text[e - 1] == "." for e in ends)
    assert sum(text[e : e + 2] == "\n\n" for e in ends) >= len(ends) // 2


def test_split_short_and_blank_texts(tokenizers_ab):
    assert split_document("Hello there.", *tokenizers_ab, 512, 512) == [(0, 12)]
    assert split_document("  Hello there.\n", *tokenizers_ab, 512, 512) == [(2, 14)]
    assert split_document(" \n\n ", *tokenizers_ab, 512, 512) == []
    with pytest.raises(CrossdiffError, match="leaves no room"):
        split_document("Hello", *tokenizers_ab, 512, 1)  # Gemma needs its BOS


class _CharTokenizer:
    """A minimal fast-tokenizer stand-in: one token per character, plus `extra` tokens appended when
    the text does not end with '.' (a boundary effect only visible when a chunk is tokenized alone)."""

    is_fast = True
    added_tokens_decoder: dict = {}
    all_special_ids: list = []

    def __init__(self, extra: int = 0, run: str | None = None):
        self.extra, self.run = extra, run

    def __len__(self):
        return 1000

    def _offsets(self, text):
        if self.run is None:
            return [(i, i + 1) for i in range(len(text))]
        # A run of `run` characters is one token (as long words are for real tokenizers).
        offs, i = [], 0
        while i < len(text):
            j = i + 1
            while text[i] == self.run and j < len(text) and text[j] == self.run:
                j += 1
            offs.append((i, j))
            i = j
        return offs

    def __call__(
        self, text, add_special_tokens=True, return_offsets_mapping=False, return_special_tokens_mask=False
    ):
        offs = self._offsets(text)
        if text and not text.endswith("."):
            offs += [(len(text), len(text))] * self.extra
        out = {"input_ids": [ord(text[s]) % 1000 if e > s else 999 for s, e in offs]}
        if return_offsets_mapping:
            out["offset_mapping"] = offs
        if return_special_tokens_mask:
            out["special_tokens_mask"] = [0] * len(offs)
        return out


def test_split_shrinks_a_chunk_that_overflows_when_tokenized_alone():
    tok_a, tok_b = _CharTokenizer(extra=3), _CharTokenizer()
    text = "abcdefghij" * 30  # no space or period: the first choice is the full 40-character budget
    spans = split_document(text, tok_a, tok_b, 40, 60)
    _check_spans(text, spans, (tok_a, tok_b), (40, 60))
    assert 30 <= min(e - s for s, e in spans[:-1]) < 38  # shrunk a little, not to nothing


def test_split_cuts_inside_a_run_without_shared_boundaries():
    tok_a, tok_b = _CharTokenizer(), _CharTokenizer(run="x")
    text = "ab " + "x" * 50 + " cd"
    spans = split_document(text, tok_a, tok_b, 16, 16)
    _check_spans(text, spans, (tok_a, tok_b), (16, 16))
    assert "".join(text[s:e] for s, e in spans).replace(" ", "") == text.replace(" ", "")
