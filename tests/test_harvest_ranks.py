"""Harvest under torchrun (2 gloo ranks on CPU, the real default pair) and its plan.

The merged store of 2 ranks holds exactly the rows of a single-process harvest, activations bit for
bit (a block of documents is batched the same way on any rank); a killed 2-rank harvest resumes
byte-identical; another number of ranks is refused; --max-tokens is split exactly; the merge can be
repeated after a kill. Plus length batching and --heldout-frac.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from crossdiff.core.errors import CrossdiffError
from crossdiff.harvest import ranks as harvest_ranks
from crossdiff.harvest.blocks import Chunk, Resume, Schedule, padded_fraction, window_batches
from crossdiff.harvest.harvest import HarvestConfig
from crossdiff.inputs.corpus import open_corpus
from crossdiff.inputs.store import Store, heldout_mask, write_shard

REPO = Path(__file__).resolve().parents[1]
WORDS = "the jury said election county city of in was and to a for that is on with as by at 1961 café — “quoted”".split()
# Small blocks and windows so that 12 short documents make several rounds, windows and shards.
SETTINGS = dict(
    context_len=64, batch_size=2, shard_tokens=100, docs_per_block=2, sort_window=2, heldout_frac=0.25
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every process: the same arithmetic


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 140))) + "." for _ in range(12)]
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _args(out: Path, corpus: Path, **kw) -> list[str]:
    args = ["harvest", "--out", str(out), "--corpus", str(corpus), "--device", "cpu"]
    for k, v in {**SETTINGS, **kw}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _single(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "crossdiff", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def _torchrun_cmd(args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "crossdiff",
        *args,
    ]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def single(corpus_file, tmp_path_factory) -> Store:
    out = tmp_path_factory.mktemp("single") / "store"
    r = _single(_args(out, corpus_file))
    assert r.returncode == 0, r.stderr[-3000:]
    return Store.open(out)


@pytest.fixture(scope="module")
def two_ranks(corpus_file, tmp_path_factory) -> Store:
    out = tmp_path_factory.mktemp("ranks") / "store"
    r = _torchrun(_args(out, corpus_file))
    assert r.returncode == 0, r.stderr[-3000:]
    return Store.open(out)


def _sorted_rows(store: Store):
    idx = np.arange(store.n_tokens)
    rows = store.rows(idx)
    order = np.lexsort((rows["pos_a"], rows["chunk"]))
    x_a, x_b = store.get(idx[order], normalised=False)
    return {k: v[order] for k, v in rows.items()}, x_a, x_b


def _texts(store: Store) -> dict:
    out = {}
    for s in range(len(store.meta["shards"])):
        out.update(store.texts(s))
    return out


def test_two_ranks_hold_the_single_process_rows(single, two_ranks):
    assert two_ranks.n_tokens == single.n_tokens > 1000
    rows_1, a_1, b_1 = _sorted_rows(single)
    rows_2, a_2, b_2 = _sorted_rows(two_ranks)
    for col in ("chunk", "doc", "pos_a", "pos_b", "tok_a", "tok_b", "char_start", "char_end"):
        assert np.array_equal(rows_1[col], rows_2[col]), col
    # Exact: every block is batched identically on any rank, and each process runs one thread.
    assert torch.equal(a_1, a_2) and torch.equal(b_1, b_2)
    m_1, m_2 = single.meta, two_ranks.meta
    for key in "ab":  # one scale per model from the summed squares (summed in another order)
        assert m_2["models"][key]["scale"] == pytest.approx(m_1["models"][key]["scale"], rel=1e-12)
        assert m_2["models"][key]["aligned_fraction"] == m_1["models"][key]["aligned_fraction"]
    assert m_2["masked"] == m_1["masked"]
    assert two_ranks.split_size("heldout") == single.split_size("heldout")
    assert _texts(two_ranks) == _texts(single)
    assert (m_1["ranks"], m_2["ranks"]) == (1, 2)
    # The merged shards came from both ranks, renamed into one numbering; nothing else is left.
    stats = [json.loads((two_ranks.root / "shards" / f"{s['name']}.json").read_text()) for s in m_2["shards"]]
    assert [s["rank"] for s in stats] == sorted(s["rank"] for s in stats) and {s["rank"] for s in stats} == {
        0,
        1,
    }
    assert not (two_ranks.root / "ranks").exists()


def test_heldout_frac_reaches_shards_and_meta(single):
    assert single.meta["heldout_frac"] == 0.25
    for s, shard in enumerate(single.meta["shards"]):
        chunk = single.rows(np.arange(single.offsets[s], single.offsets[s + 1]))["chunk"]
        assert shard["n_heldout"] == int(heldout_mask(chunk, 0.25).sum())
    held = single.split_size("heldout")
    assert 0.1 < held / single.n_tokens < 0.45  # about a quarter of the chunks' rows


def _kill_when(proc: subprocess.Popen, path: Path, timeout: float = 240) -> None:
    """SIGKILL torchrun's workers (each in its own session) and torchrun once `path` exists."""
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_two_ranks_resume_byte_identical(two_ranks, corpus_file, tmp_path):
    out = tmp_path / "store"
    proc = subprocess.Popen(
        _torchrun_cmd(_args(out, corpus_file)),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _kill_when(proc, out / "ranks" / "1" / "shards" / "00001.json")
    assert not (out / "meta.json").exists() and (out / "ranks" / "1" / "shards" / "00001.json").exists()
    with pytest.raises(CrossdiffError, match="incomplete"):
        Store.open(out)
    r = _single(_args(out, corpus_file))  # another number of processes: refused in one line
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "started by 2 process(es)" in r.stderr and "--nproc-per-node 2" in r.stderr
    r = _torchrun(_args(out, corpus_file))
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p.relative_to(two_ranks.root) for p in two_ranks.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(two_ranks.root / rel, out / rel, shallow=False), f"{rel} differs"


def test_max_tokens_split_exactly_across_ranks(corpus_file, tmp_path):
    r = _torchrun(_args(tmp_path / "store", corpus_file, max_tokens=701))
    assert r.returncode == 0, r.stderr[-3000:]
    store = Store.open(tmp_path / "store")
    assert store.n_tokens == 701
    per_rank = [0, 0]
    for s in store.meta["shards"]:
        stats = json.loads((store.root / "shards" / f"{s['name']}.json").read_text())
        per_rank[stats["rank"]] += stats["n_tokens"]
    assert per_rank == [351, 350]


# --- the plan and the merge, without models ----------------------------------------------------------


def test_quota_shares_sum_exactly():
    for total in (1, 7, 701, 10**6):
        for world in (1, 2, 3, 8):
            shares = [harvest_ranks.quota(total, r, world) for r in range(world)]
            assert sum(shares) == total and max(shares) - min(shares) <= 1
    assert harvest_ranks.quota(None, 0, 2) is None


def _fake_rank_shards(root: Path, world: int) -> None:
    for r in range(world):
        for i in range(r + 2):
            n = 3 + i
            tensors = {
                "acts_a": torch.randn(n, 4).bfloat16(),
                "acts_b": torch.randn(n, 5).bfloat16(),
                "chunk": torch.arange(n) + 100 * r + 10 * i,
            }
            stats = {"next": None, "round": i, "sumsq_a": 1.0, "sumsq_b": 2.0, "counts": {}}
            write_shard(harvest_ranks.rank_dir(root, r), i, tensors, [], stats)


def test_merge_renames_and_can_be_repeated_after_a_kill(tmp_path, monkeypatch):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    torch.manual_seed(0)
    _fake_rank_shards(clean, 3)
    torch.manual_seed(0)
    _fake_rank_shards(killed, 3)
    harvest_ranks.merge(clean, 3)
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(src)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed in the middle of the renames
        real_replace(src, dst)

    monkeypatch.setattr(harvest_ranks.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        harvest_ranks.merge(killed, 3)
    monkeypatch.setattr(harvest_ranks.os, "replace", real_replace)
    harvest_ranks.merge(killed, 3)
    names = sorted(p.name for p in (clean / "shards").iterdir())
    assert names == sorted(p.name for p in (killed / "shards").iterdir())
    assert len(names) == 3 * (2 + 3 + 4)  # ranks 0, 1, 2 had 2, 3 and 4 shards
    for name in names:
        assert filecmp.cmp(clean / "shards" / name, killed / "shards" / name, shallow=False), name
    stats = json.loads((clean / "shards" / "00002.json").read_text())
    assert (stats["index"], stats["rank"], stats["rank_index"]) == (2, 1, 0)


class _ThreadSync:
    """gather_ints between threads, standing in for torch.distributed in plan tests."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def rank_view(self, rank: int):
        sync = self

        class View:
            def __init__(self):
                self.rank, self.world = rank, sync.world

            def gather_ints(self, values):
                sync.slots[rank] = list(values)
                sync.barrier.wait()
                out = list(sync.slots)
                sync.barrier.wait()
                return out

        return View()


def _plan(cfg, tokenizers, world: int, resumes=None, stop_after=None) -> list[list[tuple]]:
    """Every rank's (position, chunk ids of the batch), from plain Schedules run in threads."""
    corpus, sync = open_corpus(cfg.corpus), _ThreadSync(world)
    out: list[list[tuple]] = [[] for _ in range(world)]

    def run(r):
        schedule = Schedule(corpus, tokenizers, cfg, sync.rank_view(r), (resumes or {}).get(r, Resume()))
        for position, batch in schedule.batches():
            out[r].append((position, tuple(it.chunk.id for it in batch)))
            if stop_after is not None and len(out[r]) == stop_after[r]:
                schedule.finish()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_blocks_number_chunks_as_one_process_and_resume_anywhere(corpus_file, tokenizers_ab):
    cfg = HarvestConfig(out="unused", corpus=str(corpus_file), **SETTINGS)
    (one,) = _plan(cfg, tokenizers_ab, 1)
    a, b = _plan(cfg, tokenizers_ab, 2)
    batches = lambda plan: sorted(ids for _, ids in plan)  # noqa: E731
    assert batches(a + b) == batches(one)  # the same batches, split between the ranks
    ids = sorted(i for _, batch in one for i in batch)
    assert ids == list(range(len(ids)))  # every chunk once, numbered in corpus order
    # Restart each rank from a position it recorded (rank 1 two rounds ahead): the same remainder.
    ra, rb = 1, len(b) - 2
    assert a[ra - 1][0]["round"] < b[rb - 1][0]["round"]  # rank 1 replays earlier rounds for rank 0
    resumed = _plan(cfg, tokenizers_ab, 2, resumes={0: Resume(**a[ra - 1][0]), 1: Resume(**b[rb - 1][0])})
    assert resumed == [a[ra:], b[rb:]]
    # A rank that finishes early (its share of --max-tokens) only drops its own later batches.
    a3, b3 = _plan(cfg, tokenizers_ab, 2, stop_after={0: 3, 1: None})
    assert a3 == a[:3] and b3 == b


def test_length_batching_is_deterministic_and_saves_padding(tokenizers_ab):
    text = open_corpus("brown").iter_from(0)
    chunks = []
    for doc in (next(text) for _ in range(3)):
        for i, start in enumerate(range(0, len(doc.text) - 200, 700)):
            length = 80 + (i * 37) % 600  # chunks of varied lengths
            chunks.append(Chunk(doc.id, i, len(chunks), "brown", start, doc.text[start : start + length]))
    plain = window_batches(chunks, tokenizers_ab, 4, by_length=False)
    by_length = window_batches(chunks, tokenizers_ab, 4, by_length=True)
    again = window_batches(chunks, tokenizers_ab, 4, by_length=True)
    ids = lambda bs: [[it.chunk.id for it in b] for b in bs]  # noqa: E731
    assert ids(by_length) == ids(again)
    assert sorted(i for b in ids(by_length) for i in b) == list(range(len(chunks)))
    assert padded_fraction(by_length) < 0.5 * padded_fraction(plain)


def test_bad_plan_settings():
    for kw, message in ((dict(sort_window=0), "sort-window"), (dict(docs_per_block=0), "docs-per-block")):
        with pytest.raises(CrossdiffError, match=message):
            HarvestConfig(out="x", **kw)
    for frac in (0, 0.5, -0.1, 1.0):
        with pytest.raises(CrossdiffError, match="heldout-frac"):
            HarvestConfig(out="x", heldout_frac=frac)
