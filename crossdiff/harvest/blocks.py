"""The harvest's work plan: which chunks go into which batch, on which rank, and where to resume.

    documents -> blocks of `docs_per_block` consecutive documents; block k goes to rank k mod N,
    so round t is blocks tN .. tN+N-1, one per rank
    -> each rank splits its block into chunks (align.split_document); one all-gather of N chunk
    counts per round numbers every chunk exactly as a single process would (chunks in corpus order)
    -> the block's chunks, in windows of `sort_window` batches, are tokenised and sorted by length
    -> batches with little padding.

Why blocks of documents and not chunks dealt round-robin: numbering a chunk needs the chunk counts
of every document before it, and splitting documents (both tokenizers over the whole text, then
each chunk checked) costs twice the tokenisation of their chunks (Brown: 15 s vs 7 s,
bench/align_stats.py). Dealt chunk by chunk, every rank would split every document; dealt by
block, each rank splits only its own and learns the others' counts from the all-gather. A block is
processed the same way whatever N is (same windows, same batches, so the same activations bit for
bit), so an N-rank store holds exactly the rows of a single-process one; only their shards differ.
The price is one synchronisation per round: a rank whose block was quick waits for the slowest.

Resuming: a shard records the position after its last batch, {round, chunk (the round's first
global chunk number), window, batch}; everything before that position is written, so a rerun
re-splits the block, re-tokenises that window, sorts it the same way and skips `batch` batches.
Ranks resume from different rounds: all restart at the earliest, and a rank replays the rounds it
had finished by splitting its blocks again for their chunk counts, without running the models.
A rank that has written its share of --max-tokens keeps splitting its blocks (it would otherwise only
wait) until every rank has, so chunk numbers stay the corpus-order ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple, Protocol

from ..inputs.align import Tokens, split_document
from ..inputs.chat import chunk_messages, encode_chunk, split_conversation


@dataclass(frozen=True)
class Chunk:
    doc: int  # position of the document in the corpus
    index_in_doc: int
    id: int  # global chunk number (corpus order)
    source: str
    char_offset: int
    text: str
    messages: tuple | None = None
    """A conversation chunk's chat.Message spans in `text` (None: plain text)."""


class Item(NamedTuple):
    """A chunk tokenised by both models."""

    chunk: Chunk
    enc_a: Tokens
    enc_b: Tokens


class Sync(Protocol):
    rank: int
    world: int

    def gather_ints(self, values: list[int]) -> list[list[int]]: ...


class Solo:
    """The single-process stand-in for crossdiff.core.torchrun.Group."""

    rank, world = 0, 1

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        return [list(values)]


@dataclass(frozen=True)
class Resume:
    """Where a rank's stream restarts, read from its last complete shard."""

    round: int = 0
    """First round whose batches this rank still has to run."""
    chunk: int = 0
    """Global number of that round's first chunk."""
    window: int = 0
    batch: int = 0
    done_round: int | None = None
    """The round during which this rank finished (it then runs no more batches), or None."""

    @classmethod
    def from_shards(cls, shards: list[dict], quota: int | None) -> Resume:
        if quota == 0:  # more ranks than --max-tokens: nothing to do from the start
            return cls(done_round=-1)
        if not shards:
            return cls()
        last = shards[-1]
        if last["next"] is None:
            return cls(round=last["round"] + 1, done_round=last["round"])
        return cls(**last["next"])


class Schedule:
    """This rank's batches, in lockstep with the other ranks (one `gather_ints` per round)."""

    def __init__(self, corpus, tokenizers, cfg, sync: Sync, resume: Resume):
        self.corpus, self.tokenizers, self.cfg, self.sync, self.resume = corpus, tokenizers, cfg, sync, resume
        self.done_round = resume.done_round
        self.round = resume.round

    def finish(self) -> None:
        """This rank is done (its share of --max-tokens is written); it keeps joining the exchanges."""
        self.done_round = self.round

    def batches(self) -> Iterator[tuple[dict, list[Item]]]:
        """(position after the batch, batch); after `finish`, the rest of the rounds without batches."""
        for round_base, chunks in self._blocks():
            for position, batch in self._block_batches(round_base, chunks):
                yield position, batch
                if self.done_round is not None:
                    break

    def _active(self, t: int) -> bool:
        """Whether this rank still ran batches in round t (a replay must send what the first run sent)."""
        return self.done_round is None or t <= self.done_round

    def _blocks(self) -> Iterator[tuple[int, list[Chunk]]]:
        """(global number of the round's first chunk, this rank's numbered chunks) per round it runs."""
        sync, per_block = self.sync, self.cfg.docs_per_block
        t = min(v[0] for v in sync.gather_ints([self.resume.round]))
        docs = self._own_blocks(t)
        round_base: int | None = None
        while True:
            self.round = t
            active = self._active(t)
            if not active and sync.world == 1:
                return  # alone and finished: no one needs this block's chunk count
            block = next(docs)  # read and split even when finished: the others' chunk numbers need it
            spans = [self._split(doc) for doc in block]
            n = sum(len(s) for s in spans)
            counts = sync.gather_ints([n, int(len(block) < per_block), int(active)])
            if not any(c[2] for c in counts):
                return  # every rank has finished
            if t == self.resume.round:
                round_base = self.resume.chunk
            if round_base is not None and t >= self.resume.round and active:
                first = round_base + sum(c[0] for c in counts[: sync.rank])
                yield round_base, _numbered(block, spans, first)
            if round_base is not None:
                round_base += sum(c[0] for c in counts)
            if any(c[1] for c in counts):
                return  # some block was short: the corpus ends in this round
            t += 1

    def _own_blocks(self, t: int) -> Iterator[list]:
        """This rank's blocks of documents from round t on (the others' documents are read but not
        converted)."""
        n, r, per_block = self.sync.world, self.sync.rank, self.cfg.docs_per_block
        docs = self.corpus.iter_strided((t * n + r) * per_block, per_block, (n - 1) * per_block)
        while True:
            yield list(islice(docs, per_block))

    def _split(self, doc) -> list[tuple[int, int]]:
        tok_a, tok_b = self.tokenizers
        n = self.cfg.context_len
        if doc.messages is not None:
            return split_conversation(doc.text, doc.messages, tok_a, tok_b, n, n)
        return split_document(doc.text, tok_a, tok_b, n, n)

    def _block_batches(self, round_base: int, chunks: list[Chunk]) -> Iterator[tuple[dict, list[Item]]]:
        size = self.cfg.sort_window * self.cfg.batch_size
        n_windows = -(-len(chunks) // size)
        resuming = self.round == self.resume.round
        start_w, skip = (self.resume.window, self.resume.batch) if resuming else (0, 0)
        for w in range(start_w, n_windows):
            batches = window_batches(
                chunks[w * size : (w + 1) * size],
                self.tokenizers,
                self.cfg.batch_size,
                self.cfg.sort_window > 1,
            )
            for b in range(skip, len(batches)):
                after = (w, b + 1) if b + 1 < len(batches) else (w + 1, 0)
                yield (
                    {"round": self.round, "chunk": round_base, "window": after[0], "batch": after[1]},
                    batches[b],
                )
            skip = 0


def _numbered(block, spans, first: int) -> list[Chunk]:
    out = []
    for doc, doc_spans in zip(block, spans):
        for i, (s, e) in enumerate(doc_spans):
            msgs = None if doc.messages is None else chunk_messages(doc.messages, s, e)
            out.append(Chunk(doc.id, i, first + len(out), doc.source, s, doc.text[s:e], msgs))
    return out


def window_batches(chunks: list[Chunk], tokenizers, batch_size: int, by_length: bool) -> list[list[Item]]:
    """Tokenise a window of chunks and cut it into batches, shortest chunks first when `by_length`.

    The sort is stable (ties keep corpus order), so a window always gives the same batches.
    """
    tok_a, tok_b = tokenizers
    items = [
        Item(c, encode_chunk(tok_a, c.text, c.messages), encode_chunk(tok_b, c.text, c.messages))
        for c in chunks
    ]
    if by_length:
        items.sort(key=lambda it: len(it.enc_a.input_ids) + len(it.enc_b.input_ids))
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def padded_fraction(batches: list[list[Item]]) -> float:
    """Share of the positions fed to the models (both together) that are padding."""
    real = padded = 0
    for batch in batches:
        for key in ("enc_a", "enc_b"):
            lengths = [len(getattr(it, key).input_ids) for it in batch]
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
    return 1 - real / max(padded, 1)
