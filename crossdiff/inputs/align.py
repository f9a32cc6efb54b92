"""Align two tokenizations of the same text by character end offsets (docs/design.md §3), and split
documents into chunks that fit both models' contexts.

Position i of A and position j of B are aligned when both tokens end at the same character: both
models have then read exactly the same text prefix. End offsets, not start offsets, because tokenizers
disagree on whether a leading space belongs to a token ("Ġword" vs "▁word" vs " " + "word"). Where
several tokens of one side end at the same character (byte-level or byte-fallback pieces of one
multibyte character, e.g. SmolLM2's 'Ġæ' 'Ĺ' '¥' for " 日"), only the last has read the whole character.

Letters in names: N tokens of one side, P aligned pairs, C candidate cut points.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..core.errors import CrossdiffError


class Tokens(NamedTuple):
    input_ids: np.ndarray
    """(N,) int64 token ids, special tokens included."""
    offsets: np.ndarray
    """(N, 2) int64 character [start, end) of each token in the text; (0, 0) for added tokens."""
    special_mask: np.ndarray
    """(N,) bool: special tokens (BOS, template tokens), which are never aligned (chat.ChatTokens
    adds why, for a conversation)."""


_IS_SPECIAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_special_table(tok) -> np.ndarray:
    """Bool lookup table over token ids: True for every special token id.

    Special tokens written literally in the text ("<start_of_turn>") are parsed as such by the
    tokenizer but not flagged by return_special_tokens_mask. Gemma has ~6k of them, hence the table,
    built once per tokenizer.
    """
    table = _IS_SPECIAL.get(tok)
    if table is None:
        ids = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
        table = np.zeros(max(len(tok), max(ids, default=-1) + 1), dtype=bool)  # len(tok): vocab + added
        table[sorted(ids)] = True
        _IS_SPECIAL[tok] = table
    return table


def tokenize(tok, text: str, add_special_tokens: bool = True) -> Tokens:
    """Tokenize `text` as the model expects it (its own special tokens: Gemma's BOS, none for SmolLM2;
    none added for a chat template's rendering, which writes its own)."""
    if not getattr(tok, "is_fast", False):
        raise CrossdiffError(f"{type(tok).__name__} is not a fast tokenizer; aligning needs offset mappings")
    enc = tok(
        text,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    ids_N = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets_N2 = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    special_N = np.asarray(enc["special_tokens_mask"], dtype=bool) | _is_special_table(tok)[ids_N]
    return Tokens(ids_N, offsets_N2, special_N)


@dataclass(frozen=True, eq=False)
class Alignment:
    idx_a: np.ndarray
    """(P,) int64 positions in A's token sequence, increasing."""
    idx_b: np.ndarray
    """(P,) int64 positions in B's; token idx_a[k] of A and idx_b[k] of B end at the same character."""
    end_char: np.ndarray
    """(P,) int64 the shared end offset."""
    n_text_a: int
    """Non-special tokens of A (the denominator of A's aligned fraction)."""
    n_text_b: int

    def __len__(self) -> int:
        return len(self.idx_a)

    @property
    def aligned_fraction_a(self) -> float:
        return len(self.idx_a) / self.n_text_a if self.n_text_a else 0.0

    @property
    def aligned_fraction_b(self) -> float:
        return len(self.idx_b) / self.n_text_b if self.n_text_b else 0.0


def align(offsets_a, offsets_b, special_a=None, special_b=None) -> Alignment:
    """Pair the positions of A and B whose tokens end at the same character.

    offsets_*: (N, 2) character [start, end) per token; special_*: optional (N,) bool masks. Special
    and zero-width tokens (BOS at (0, 0)) are never aligned. A side cut at its context limit simply
    has no tokens past the cut, so nothing there aligns. (If a cut falls between the byte pieces of
    one character, that side's last piece claims an end it has not fully read; split_document never
    cuts there.)
    """
    pos_a, end_a, n_a = _completing_tokens(offsets_a, special_a)
    pos_b, end_b, n_b = _completing_tokens(offsets_b, special_b)
    end_P, ia_P, ib_P = np.intersect1d(end_a, end_b, assume_unique=True, return_indices=True)
    return Alignment(pos_a[ia_P], pos_b[ib_P], end_P.astype(np.int64), n_a, n_b)


def _completing_tokens(offsets, special) -> tuple[np.ndarray, np.ndarray, int]:
    """(positions, ends, n_text): for each distinct end offset, the last text token ending there."""
    off_N2 = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    text_N = off_N2[:, 1] > off_N2[:, 0]
    if special is not None:
        text_N &= ~np.asarray(special, dtype=bool).reshape(-1)
    pos = np.flatnonzero(text_N)
    ends = off_N2[pos, 1]
    # First occurrence in the reversed array = last occurrence in the original.
    uniq_ends, first_in_rev = np.unique(ends[::-1], return_index=True)
    return pos[len(pos) - 1 - first_in_rev], uniq_ends, len(pos)


# ---------------------------------------------------------------- chunking

_WHITESPACE = np.array([ord(c) for c in " \t\n\r\x0b\x0c\xa0\u3000"], dtype=np.uint32)
_SENTENCE_END = np.array([ord(c) for c in ".!?"], dtype=np.uint32)
_CLOSING = np.array([ord(c) for c in "\"')]"], dtype=np.uint32)
_NEWLINE = ord("\n")
_MIN_FILL = 0.5  # a nicer cut point (paragraph, sentence, space) may shorten a chunk to half its budget
_MAX_SHRINKS = 8


class TextSide:
    """One tokenizer's view of a whole document: where its tokens end, and its token budget.
    (chat.ChatSide is the same for a conversation.)"""

    def __init__(self, tok, text: str, max_len: int):
        self.tok, self.max_len, self.text = tok, max_len, text
        self.whole_fits = True  # limit() reaching the end means the whole text fits: no check needed
        offsets_N2 = tokenize(tok, text).offsets
        # Literal special tokens in the text take room in the context, so they count here.
        self.ends_N = np.sort(offsets_N2[offsets_N2[:, 1] > offsets_N2[:, 0], 1])
        self.overhead = len(tokenize(tok, "").input_ids)  # tokens the tokenizer adds (Gemma: BOS)
        self.budget = max_len - self.overhead
        if self.budget < 1:
            raise CrossdiffError(
                f"context length {max_len} leaves no room for text after {self.overhead} special tokens"
            )

    def count(self, start: int, ends_C: np.ndarray) -> np.ndarray:
        """Tokens ending in (start, c] for each c: the token count of text[start:c]."""
        return np.searchsorted(self.ends_N, ends_C, side="right") - np.searchsorted(
            self.ends_N, start, side="right"
        )

    def limit(self, start: int, budget: int, text_len: int) -> int:
        """The furthest character such that text[start:limit] holds at most `budget` tokens."""
        k = int(np.searchsorted(self.ends_N, start, side="right")) + budget
        return int(self.ends_N[k] - 1) if k < len(self.ends_N) else text_len

    def overflow(self, start: int, end: int) -> int:
        """How many tokens text[start:end] is over the context length (<= 0: it fits)."""
        return len(self.tok(self.text[start:end], add_special_tokens=True)["input_ids"]) - self.max_len


def split_document(text: str, tok_a, tok_b, max_len_a: int, max_len_b: int) -> list[tuple[int, int]]:
    """Character spans covering `text` (only whitespace between them left out) such that each
    span, tokenized alone with each model's special tokens, fits that model's context length.

    Each tokenizer reads the whole document once; cuts go where both tokenizations have a token
    boundary, preferring paragraph breaks, then sentence ends, then spaces, as long as the chunk stays
    at least half full. Each chunk is re-tokenized once to check it (tokens at a cut can merge
    differently on their own) and shrunk in the rare case it overflows.
    """
    return split_sides(text, (TextSide(tok_a, text, max_len_a), TextSide(tok_b, text, max_len_b)))


def split_sides(text: str, sides) -> list[tuple[int, int]]:
    """split_document given both sides (TextSide, or chat.ChatSide for a conversation)."""
    cuts_C = np.union1d(np.intersect1d(sides[0].ends_N, sides[1].ends_N), [len(text)])
    scores_C = _cut_scores(text, cuts_C)
    spans: list[tuple[int, int]] = []
    start = _skip_space(text, 0)
    while start < len(text):
        end = _fitting_cut(text, start, sides, cuts_C, scores_C)
        spans.append((start, end))
        start = _skip_space(text, end)
    return spans


def _fitting_cut(text: str, start: int, sides, cuts_C, scores_C) -> int:
    """End of the chunk starting at `start`, verified by tokenizing it alone."""
    budgets = [s.budget for s in sides]
    for _ in range(_MAX_SHRINKS):
        end = _choose_cut(text, start, sides, budgets, cuts_C, scores_C)
        if start == 0 and end == len(text) and all(s.whole_fits for s in sides):
            return end  # the chunk is the whole text, whose tokenization fit the budget
        over = [s.overflow(start, end) for s in sides]
        if max(over) <= 0:
            return end
        budgets = [b - max(o, 0) - 2 if o > 0 else b for b, o in zip(budgets, over)]
        if min(budgets) < 1:
            break
    raise CrossdiffError(
        f"could not fit the text at character {start} into the context (a single token too long?)"
    )


def _choose_cut(text: str, start: int, sides, budgets: list[int], cuts_C, scores_C) -> int:
    limit = min(s.limit(start, b, len(text)) for s, b in zip(sides, budgets))
    if limit == len(text):
        return _rstrip(text, start, limit)  # the rest fits
    lo, hi = np.searchsorted(cuts_C, [start, limit], side="right")
    cand_C, score_C = cuts_C[lo:hi], scores_C[lo:hi]
    if len(cand_C) == 0:
        # No shared token boundary within budget (e.g. a long run one tokenizer keeps whole): cut
        # inside the run; the tokens at the cut then differ from the full text's, which is harmless.
        return _rstrip(text, start, max(limit, start + 1))
    fill_C = np.maximum(*(s.count(start, cand_C) / b for s, b in zip(sides, budgets)))
    ok = fill_C >= _MIN_FILL
    if not ok.any():
        return _rstrip(text, start, int(cand_C[-1]))
    cand_C, score_C = cand_C[ok], score_C[ok]
    best = np.flatnonzero(score_C == score_C.max())[-1]
    return _rstrip(text, start, int(cand_C[best]))


def _cut_scores(text: str, cuts_C: np.ndarray) -> np.ndarray:
    """3 paragraph break, 2 sentence end, 1 whitespace, 0 mid-word, for a cut before text[c]."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    padded = np.concatenate([np.zeros(2, np.uint32), codes, np.zeros(2, np.uint32)])
    b2, b1, a1, a2 = (padded[cuts_C + k] for k in range(4))  # text[c-2], text[c-1], text[c], text[c+1]
    nl1, nl2 = b1 == _NEWLINE, a1 == _NEWLINE
    paragraph = (nl1 & (b2 == _NEWLINE)) | (nl2 & (a2 == _NEWLINE)) | (nl1 & nl2)
    ended = np.isin(b1, _SENTENCE_END) | (np.isin(b1, _CLOSING) & np.isin(b2, _SENTENCE_END))
    space_after = np.isin(a1, _WHITESPACE) | (cuts_C == len(text))
    sentence = ended & space_after
    space = space_after | np.isin(b1, _WHITESPACE)
    return np.select([paragraph, sentence, space], [3, 2, 1], 0)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _rstrip(text: str, start: int, end: int) -> int:
    while end > start + 1 and text[end - 1].isspace():
        end -= 1
    return end
