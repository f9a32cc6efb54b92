"""Harvest: run both models on the same text and write aligned, paired activations to a store.

corpus -> documents split to fit the context -> both tokenisations -> both models up to their layer
-> positions aligned by character end offsets (align.py) -> masks (first position, outlier norms)
-> shards (store.py). Which chunks form a batch, on which torchrun rank, and where a rerun resumes is
blocks.py (blocks of documents dealt to ranks, windows of chunks sorted by length);
ranks.py merges the ranks' shards into one store. Shards close only between batches and
record where the stream stands, so a killed harvest resumes after its last complete shard and ends
byte-identical to an uninterrupted run. Letters in names: B batch, T tokens, D width, P aligned pairs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..core import runfolder
from ..core.config import fingerprint, settings, settings_of, where
from ..core.errors import CrossdiffError
from ..core.fsutil import explain_os_error, os_error_message, write_json_atomic
from ..core.lock import writes
from ..core.manifest import StageKey, begin, state
from ..core.runtime import apply_cpu_policy, resolve_device
from ..inputs.models import (
    DEFAULT_MODEL_A,
    DEFAULT_MODEL_B,
    LanguageModel,
    layer_for,
    load_model,
    resolve_model_dir,
)
from ..inputs.store import (
    HELDOUT_FRAC,
    Store,
    completed_shards,
    finalize,
    normalisation,
    remove_partial_shards,
)
from ..inputs.storefiles import store_problems
from . import ranks
from .blocks import Resume, Schedule, Solo, Sync
from .pairs import (
    _process_batch,
    _ShardBuffer,
)


@dataclass(frozen=True)
class HarvestConfig:
    out: str = where()
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
    sort_window: int = 64
    """Batches' worth of consecutive chunks sorted by token length before batching, so batches carry little padding (1: corpus order)."""
    docs_per_block: int = 64
    """Documents per block: blocks are dealt to torchrun ranks in turn, and length sorting never crosses one, so the rows do not depend on the number of ranks."""
    shard_tokens: int = 16384
    """Aligned pairs per shard (the unit of resumption)."""
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    """Storage precision of the activations."""
    outlier_factor: float = 10.0
    """Drop a pair when either model's activation norm exceeds this multiple of the batch median (massive activations)."""
    heldout_frac: float = HELDOUT_FRAC
    """Share of chunks held out for evaluation and verification probes, chosen by a fixed hash of the chunk id."""
    device: str = where("auto")
    """Where the models run: auto (cuda when available), cpu, cuda, cuda:1 ..."""
    overwrite: bool = where(False)
    """Replace an existing store made with other settings."""

    def __post_init__(self):
        checks = [
            (self.context_len >= 16, f"--context-len must be at least 16, got {self.context_len}"),
            (self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}"),
            (self.sort_window >= 1, f"--sort-window must be positive, got {self.sort_window}"),
            (self.docs_per_block >= 1, f"--docs-per-block must be positive, got {self.docs_per_block}"),
            (self.shard_tokens >= 1, f"--shard-tokens must be positive, got {self.shard_tokens}"),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"--max-tokens must be positive, got {self.max_tokens}",
            ),
            (self.outlier_factor > 1, f"--outlier-factor must be above 1, got {self.outlier_factor}"),
            (
                0 < self.heldout_frac < 0.5,
                f"--heldout-frac must be between 0 and 0.5 (exclusive), got {self.heldout_frac}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise CrossdiffError(message)


@writes(lambda cfg: cfg.out, record="files")
def harvest(cfg: HarvestConfig) -> Store:
    """Write (or finish) the store at cfg.out and return it opened.

    Under `torchrun --nproc-per-node N` (WORLD_SIZE > 1) each rank harvests its share of the corpus
    into STORE/ranks/R/ and rank 0 then merges the shards into the one store (ranks.py).
    """
    from ..core import torchrun

    device = resolve_device(torchrun.local_device(cfg.device))
    ctx = torchrun.join(device.type)
    try:
        store = _harvest(cfg, device, ctx)
    except BaseException:
        torchrun.leave(ctx)  # no final barrier: the other ranks may be waiting in an exchange
        raise
    torchrun.shutdown(ctx)
    return store


def _harvest(cfg: HarvestConfig, device, ctx) -> Store:
    from ..inputs.corpus import open_corpus

    root, world = Path(cfg.out), 1 if ctx is None else ctx.world
    verdict: str | tuple[bool, bool] | None = None
    if ctx is None or ctx.is_main:
        try:  # (already complete, folder created by this run, damaged shards), or the one-line refusal
            verdict = _check_existing(root, cfg, world)
        except CrossdiffError as e:
            verdict = str(e)
    if ctx is not None:
        verdict = ctx.broadcast_object(verdict)
    if isinstance(verdict, str):
        raise CrossdiffError(verdict)
    complete, bad, created = verdict
    if complete and not bad:
        if ctx is None or ctx.is_main:
            shutil.rmtree(root / "ranks", ignore_errors=True)  # left by a merge killed at its very end
            meta = runfolder.read(root, "meta")
            print(
                f"{root} is already complete ({meta['n_tokens']:,} aligned pairs, {len(meta['shards'])} shards verified)"
            )
        return Store.open(root)
    if bad and ctx is not None:
        raise CrossdiffError(
            f"{root} has damaged shards; rerun this harvest in one process (without torchrun) to re-harvest them"
        )
    resolve_model_dir(cfg.model_a), resolve_model_dir(cfg.model_b)  # names and files before any work
    corpus = open_corpus(cfg.corpus)
    apply_cpu_policy()  # one allocator policy per process (crossdiff/core/runtime.py)
    layer_for(cfg.model_a, cfg.layer_a, "--layer-a"), layer_for(cfg.model_b, cfg.layer_b, "--layer-b")
    lm_a, lm_b = load_model(cfg.model_a, device=device), load_model(cfg.model_b, device=device)
    layers = (
        layer_for(cfg.model_a, cfg.layer_a, "--layer-a", lm_a.n_layers),
        layer_for(cfg.model_b, cfg.layer_b, "--layer-b", lm_b.n_layers),
    )
    try:
        try:
            if bad:
                _repair(root, cfg, corpus, (lm_a, lm_b), layers, bad)
            elif ctx is None:
                _write_store(root, cfg, corpus, (lm_a, lm_b), layers)
            else:
                _write_ranks(root, cfg, corpus, (lm_a, lm_b), layers, ctx)
        except OSError as e:
            if os_error_message(e) is None:
                raise
            raise explain_os_error(e, root if e.errno == errno.ENOSPC else e.filename or root) from e
    except CrossdiffError:
        if (ctx is None or ctx.is_main) and created and not ranks.has_shards(root):
            shutil.rmtree(root, ignore_errors=True)  # nothing finished: leave nothing behind
        raise
    return Store.open(root)


def _check_existing(root: Path, cfg: HarvestConfig, world: int) -> tuple[bool, list[int], bool]:
    """(a complete store with these settings exists, its damaged shards, the folder holds nothing of an
    earlier harvest); refuse other settings unless overwrite."""
    complete, created = _check_settings(root, cfg, world)
    return complete, (damaged_shards(root) if complete else []), created


def damaged_shards(root: Path) -> list[int]:
    """Indices of a complete store's shards that fail their size or sha256 check, each damaged file
    reported on stderr. A harvest rerun re-harvests them."""
    meta = runfolder.read(root, "meta")
    problems = store_problems(root, meta)
    for _, path, problem in problems:
        print(f"damaged: {path} ({problem})", file=sys.stderr)
    bad = sorted({i for i, _, _ in problems})
    if bad and meta.get("ranks", 1) > 1:
        raise CrossdiffError(
            f"{root} has {len(bad)} damaged shard(s) and was harvested by {meta['ranks']} processes, whose "
            "shards cannot be re-harvested one by one; pass --overwrite to harvest it again"
        )
    return bad


def _repair(root: Path, cfg: HarvestConfig, corpus, lms, layers, bad: list[int]) -> None:
    """Re-harvest damaged shards in place (each from where the shard before it left the stream, so
    the bytes are the ones first written), then meta.json again."""
    start, meta = time.perf_counter(), runfolder.read(root, "meta")
    for index in bad:
        print(f"re-harvesting shard {meta['shards'][index]['name']} of {root}", file=sys.stderr)
        _write_shards(root, cfg, corpus, lms, layers, Solo(), cfg.max_tokens, False, only=index)
        stats = json.loads((root / "shards" / f"{meta['shards'][index]['name']}.json").read_text())
        if stats["n_tokens"] != meta["shards"][index]["n_tokens"]:
            raise CrossdiffError(
                f"shard {index} of {root} came out different when harvested again (the models or "
                "libraries changed since); pass --overwrite to harvest the whole store again"
            )
    _report(_meta(root, cfg, lms, layers, world=1), root, start, lms)


def stage_key(cfg: HarvestConfig) -> StageKey:
    """The store's key (crossdiff.core.manifest): its recorded settings (also accepted as recorded
    before 0.2, with the corpus's own path); a store without a keyed manifest is judged by its
    settings.json."""

    def legacy(root: Path) -> bool | None:
        path = runfolder.path(root, "settings")
        if not path.is_file():
            return None
        saved = settings_of(HarvestConfig, runfolder.read_json(path))
        return saved in (recorded_settings(cfg), settings(cfg))

    return StageKey(recorded_settings(cfg), accept=(fingerprint(settings(cfg)),), legacy=legacy)


def _check_settings(root: Path, cfg: HarvestConfig, world: int) -> tuple[bool, bool]:
    """(a complete store with these settings exists, the folder holds nothing of an earlier harvest);
    refuse other settings unless overwrite. A store is complete once its meta.json is written."""
    created, key, meta = not root.exists(), stage_key(cfg), (runfolder.FILES["meta"],)
    found = state(root, key, meta)
    if found == "resume" and not runfolder.exists(root, "meta"):
        problem = ranks.world_mismatch(root, world)
        if problem and not cfg.overwrite:
            raise CrossdiffError(problem)
        if problem:
            shutil.rmtree(root)
            created = True
    other = "clear" if cfg.overwrite else "refuse"
    if begin(root, key, meta, command="harvest", other=other, refuse=lambda: _refusal(root)):
        return True, False
    return runfolder.exists(root, "meta"), created or found == "other"


def _refusal(root: Path) -> str:
    if runfolder.exists(root, "settings"):
        return f"{root} holds a store made with other settings; pass --overwrite to replace it or choose another --out"
    return f"{root} exists and is not a crossdiff store; choose another --out or pass --overwrite"


STORE_DIR = "{store}/"
"""How settings.json writes the store's own folder at the head of a corpus path (storefiles.harvest_command
puts the folder back)."""


def recorded_settings(cfg: HarvestConfig) -> dict:
    """The settings as the store records them: a chat corpus file inside the store's parent folder (a
    diff's answers/) relative to the store, so that the folder resumes after a move or under a symlink
    (paths inside a run folder are recorded relative to it)."""
    out = settings(cfg)
    if not cfg.corpus.startswith("chat:"):
        return out
    store = Path(os.path.realpath(cfg.out))
    paths = []
    for p in cfg.corpus[len("chat:") :].split(","):
        real = Path(os.path.realpath(p))
        paths.append(STORE_DIR + os.path.relpath(real, store) if real.is_relative_to(store.parent) else p)
    return {**out, "corpus": "chat:" + ",".join(paths)}


def _prepare(root: Path, cfg: HarvestConfig, lms) -> None:
    """The store's folder, settings.json and both tokenizers (before any shard)."""
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(runfolder.path(root, "settings"), recorded_settings(cfg))
    for key, lm in zip("ab", lms):
        if not (root / "tokenizers" / key / "tokenizer_config.json").is_file():
            tmp = root / "tokenizers" / f".{key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                lm.tokenizer.save_pretrained(tmp)
                tmp.rename(root / "tokenizers" / key)
            except Exception as e:  # the Rust tokenizers raise a bare Exception "... (os error 28)"
                code = re.search(r"\(os error (\d+)\)", str(e))
                if code is None or isinstance(e, OSError):
                    raise
                raise OSError(int(code.group(1)), str(e), str(root / "tokenizers" / key)) from e
            finally:  # a full disk must not leave a half-written tokenizer folder behind
                shutil.rmtree(tmp, ignore_errors=True)


def _write_store(
    root: Path, cfg: HarvestConfig, corpus, lms: tuple[LanguageModel, LanguageModel], layers: tuple[int, int]
) -> None:
    """Single process: shards straight into the store, then meta.json."""
    start = time.perf_counter()
    _prepare(root, cfg, lms)
    _write_shards(root, cfg, corpus, lms, layers, Solo(), cfg.max_tokens, show_progress=True)
    _report(_meta(root, cfg, lms, layers, world=1), root, start, lms)


def _write_ranks(root: Path, cfg: HarvestConfig, corpus, lms, layers, ctx) -> None:
    """torchrun: every rank fills STORE/ranks/R/, then rank 0 merges and writes meta.json."""
    start = time.perf_counter()
    if ctx.is_main:
        _prepare(root, cfg, lms)
        ranks.start(root, ctx.world)
    ctx.wait_all()
    if not ranks.merging(root):  # a merge already under way means every rank had finished
        quota = ranks.quota(cfg.max_tokens, ctx.rank, ctx.world)
        folder = ranks.rank_dir(root, ctx.rank)
        _write_shards(folder, cfg, corpus, lms, layers, ctx, quota, show_progress=ctx.is_main)
    ctx.wait_all()
    error = None
    if ctx.is_main:
        try:
            ranks.merge(root, ctx.world)
            meta = _meta(root, cfg, lms, layers, world=ctx.world)
            ranks.clean(root)
            _report(meta, root, start, lms)
        except CrossdiffError as e:
            error = str(e)
        except OSError as e:
            if os_error_message(e) is None:
                raise
            error = str(explain_os_error(e, root if e.errno == errno.ENOSPC else e.filename or root))
    error = ctx.broadcast_object(error)  # every rank ends with rank 0's one-line error, if any
    if error is not None:
        raise CrossdiffError(error)


def _report(meta: dict, root: Path, start: float, lms) -> None:
    a, b = meta["models"]["a"]["aligned_fraction"], meta["models"]["b"]["aligned_fraction"]
    print(
        f"harvested {meta['n_tokens']:,} aligned pairs into {root} ({time.perf_counter() - start:.0f} s this run); "
        f"aligned fraction A {a:.3f}, B {b:.3f}"
    )
    warning = aligned_fraction_warning(a, b, lms[0].tokenizer, lms[1].tokenizer)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


# Plain English prose: what the pair's aligned fraction is compared with (the tokenizers' best case).
ENGLISH_REFERENCE = (
    "The committee met on Tuesday morning to discuss the new budget for the city's public libraries. "
    "Several members argued that the reading rooms should stay open later in the evening, because many "
    "students and workers cannot visit before six o'clock. Others worried about the cost of heating the "
    "old buildings during the winter months. After a long debate, they agreed to try longer hours at "
    "two branches for one year and to report the number of visitors to the council in the spring."
)
ALIGNED_WARNING_RATIO = 0.7
"""Warn when a model's aligned fraction is below this share of the pair's on ENGLISH_REFERENCE
(the default pair: 0.98 on Brown and on the reference; 0.31-0.34 on Chinese or emoji text)."""


def aligned_fraction_warning(frac_a: float, frac_b: float, tok_a, tok_b) -> str | None:
    """A warning when the two tokenizers align this corpus far worse than plain English, with why."""
    from ..inputs.align import align, tokenize

    enc_a, enc_b = tokenize(tok_a, ENGLISH_REFERENCE), tokenize(tok_b, ENGLISH_REFERENCE)
    al = align(enc_a.offsets, enc_b.offsets, enc_a.special_mask, enc_b.special_mask)
    ref_a, ref_b = al.aligned_fraction_a, al.aligned_fraction_b
    low = [
        f"{frac:.0%} of model {m}'s text tokens were aligned, against {ref:.0%} for the same tokenizers on English prose"
        for m, frac, ref in (("A", frac_a, ref_a), ("B", frac_b, ref_b))
        if frac < ALIGNED_WARNING_RATIO * ref
    ]
    if not low:
        return None
    return (
        f"only {' and '.join(low)}. The tokenizers split this text (typically Chinese, Japanese, emoji or "
        "other scripts outside their main vocabulary) into byte pieces whose ends rarely coincide, so most "
        "positions are dropped and the store samples only the token ends both models share; expect few "
        "pairs per token of text and check that they cover what you want to compare"
    )


def _write_shards(
    folder: Path,
    cfg: HarvestConfig,
    corpus,
    lms,
    layers,
    sync: Sync,
    quota: int | None,
    show_progress: bool,
    only: int | None = None,
) -> None:
    """This rank's shards: its batches (blocks.Schedule) until its quota or the corpus ends.

    With `only` = k, shard k alone is written again, from where shard k - 1 left the stream."""
    from tqdm.auto import tqdm

    done = completed_shards(folder)
    if only is None:
        remove_partial_shards(folder, len(done))
    else:
        done = done[:only]
    n_done, n_shards = sum(s["n_tokens"] for s in done), len(done)
    schedule = Schedule(
        corpus, (lms[0].tokenizer, lms[1].tokenizer), cfg, sync, Resume.from_shards(done, quota)
    )
    buffer = _ShardBuffer()
    desc = "harvest" if sync.world == 1 else f"harvest (rank 0 of {sync.world})"
    bar = tqdm(
        total=quota, initial=n_done, unit="tok", desc=desc, dynamic_ncols=True, disable=not show_progress
    )
    with bar:
        for position, batch in schedule.batches():
            buffer.add(*_process_batch(batch, lms, layers, cfg))
            bar.update(buffer.last_n if quota is None else min(buffer.last_n, quota - bar.n))
            if quota is not None and n_done + buffer.n >= quota:
                schedule.finish()  # no more batches; the remaining rounds only exchange chunk counts
                n_done += buffer.flush(folder, n_shards, None, schedule.round, quota - n_done, cfg)
                n_shards += 1
            elif buffer.n >= cfg.shard_tokens:
                n_done += buffer.flush(folder, n_shards, position, schedule.round, None, cfg)
                n_shards += 1
            if only is not None and n_shards > only:
                return
        if buffer.n:  # the corpus ended
            buffer.flush(folder, n_shards, None, schedule.round, None, cfg)


def _meta(root: Path, cfg: HarvestConfig, lms, layers, world: int) -> dict:
    from .. import __version__

    shards = completed_shards(root)
    counts: Counter = Counter()
    for s in shards:
        counts.update(s["counts"])
    models = {}
    for key, lm, layer in zip("ab", lms, layers):
        models[key] = {
            "id": lm.id,
            "layer": layer,
            "n_layers": lm.n_layers,
            "d_model": lm.d_model,
            **normalisation(shards, key, lm.d_model),  # one scalar per model (docs/design.md §4)
            "n_text_tokens": counts[f"text_{key}"],
            "aligned_fraction": counts["aligned"] / max(counts[f"text_{key}"], 1),
        }
    masked = {
        k: counts[k]
        for k in (
            "special_a",
            "special_b",
            "template_a",
            "template_b",
            "boundary_a",
            "boundary_b",
            "unaligned_a",
            "unaligned_b",
            "first_position",
            "outlier_a",
            "outlier_b",
        )
    }
    meta = {
        "crossdiff_version": __version__,
        "models": models,
        "dtype": cfg.dtype,
        "corpus": cfg.corpus,
        "masked": masked,
        "context_len": cfg.context_len,
        "ranks": world,
    }
    return finalize(root, meta, heldout_frac=cfg.heldout_frac)
