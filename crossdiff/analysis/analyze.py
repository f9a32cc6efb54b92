"""Analysis of a trained crosscoder: per-latent statistics, exclusive candidates, context probes and evidence.

`analyze(AnalyzeConfig(run=RUN, store=STORE))` / `crossdiff analyze --run RUN --store STORE`
writes RUN/analysis/ (schema: docs/analysis.md):

    latents.csv            one row per latent: partition, verdict (dead / shared / candidate_a /
                           candidate_b), note, score, decoder norms, activation statistics, probe
                           R²/AUROC on strong firings (context information), Latent Scaling
    features/<latent>.json top examples in both tokenisations, histogram, logit lens
    summary.json           counts, FVE, L0, splice-in losses, thresholds; written last = complete
    pass.pt, splice.json   the expensive stages' results, reused by a rerun with the same settings

Stages: (1) one streaming pass over the store (every analysed row): firing statistics, histograms,
running top-k, held-out FVE, train-split probe statistics, Latent Scaling sums; (2) a pass over the
held-out rows only to score the probes fitted after (1) on each candidate's strong firings
(f ≥ strong · p99, p99 known after (1)); (3) verdicts and scores;
(4) splice-in losses (splice.py) and the logit lens, when the models can be loaded; (5) files.

Legend: B tokens in a batch, F latents, C probed latents of one side, D one model's width.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import manifest, runfolder
from ..core.config import config_to_dict, fingerprint, in_part, settings, where
from ..core.errors import CrossdiffError
from ..core.fsutil import jsonable, write_json_atomic, write_with_atomic
from ..core.lock import writes
from ..core.manifest import StageKey, begin
from ..inputs.store import comparable_losses
from .evidence import (
    logit_lenses,
    render_examples,
    store_tokenizers,
)
from .passes import (
    PassResult,
    heldout_share,
    run_passes,
)
from .probes import detection_note, verdict
from .results import COLUMNS, EXCLUSIVE_THRESHOLD, VERDICTS, exclusive_sides, partitions, write_latents
from .splice import splice_eval

THRESHOLDS = "exclusive_threshold strong ridge".split()
# Version of the candidate and verdict rules: part of every fingerprint, so that a rerun after a
# change of the rules redoes finished analyses. 2: the relative-norm rule covers a DFC's shared latents.
# 3: probes target strong firings and only inform; candidates are judged by behaviour (verify.py).
# 4: the functional share is a column, not a candidate rule (make_plan).
# 5: on centred stores the functional share is a candidate rule for a DFC's shared latents.
# 6: a latent too rare on the held-out rows gets its functional share from every row it fires on.
RULES_VERSION = 6
PASS_FILE = "pass.pt"
"""The cached statistics pass (private to analyze; `top_rows` reads it for other stages)."""


@dataclass(frozen=True)
class AnalyzeConfig:
    """What to analyse and how strictly to verify exclusive candidates (docs/analysis.md)."""

    run: str = where()
    """Training run folder (or checkpoint directory) holding crosscoder.safetensors and cfg.json."""
    store: str | None = where(None)
    """Paired-activation store to analyse (default: the store the run was trained on)."""
    out: str | None = where(None)
    """Output folder (default: RUN/analysis). A rerun with the same settings skips finished work."""
    device: str = where("auto")
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    top_k: int = in_part(20, "pass")
    """Top-activating examples kept per latent."""
    max_tokens: int | None = in_part(None, "pass", "share")
    """Analyse only the first N rows of the store (default: all)."""
    batch_size: int = in_part(1024, "pass", "share")
    """Rows per encoder batch; memory grows with batch size × latents."""
    exclusive_threshold: float = in_part(EXCLUSIVE_THRESHOLD, "pass")
    """Relative decoder norm r <= t makes an A-only candidate, r >= 1 - t a B-only one (docs/design.md §5; in a DFC
    besides the exclusive partitions)."""
    shared_probes: int = in_part(256, "pass")
    """Shared latents (relative norm 0.4-0.6) probed too, as a reference: they should be predictable from either side."""
    ridge: float = in_part(1e-3, "pass")
    """Ridge penalty of the probes, relative to the input's mean variance."""
    min_heldout_fires: int = in_part(10, "share", "pass")
    """The functional share (crossdiff.coder.functional) is measured on held-out rows for latents firing at least this often there, on every row (training rows too) for rarer ones."""
    strong: float = in_part(0.3, "pass")
    """The probes' target: a candidate's strong firings, f >= strong × its p99 activation (docs/verification.md)."""
    same_space: bool | None = in_part(None, "pass")
    """A and B share one activation space (self-diff, base/finetune): compute Latent Scaling. Default: same model id and width."""
    load_models: bool | None = in_part(None, "splice")
    """Load both models for the logit lens and the splice-in evaluation. Default: yes unless the store is synthetic."""
    splice_tokens: int = in_part(4096, "splice")
    """Held-out aligned tokens for the splice-in evaluation (0 skips it)."""
    shared_features: int = 50
    """Also write evidence files for this many shared latents, best score first."""
    hist_bins: int = in_part(64, "pass")
    """Log-spaced activation histogram bins per latent."""
    hist_min: float = in_part(1e-3, "pass")
    """Lower edge of the histogram (normalised units); smaller activations count in the first bin."""
    hist_max: float = in_part(1e3, "pass")
    """Upper edge of the histogram; larger activations count in the last bin."""
    context_chars: int = 160
    """Characters of text shown on each side of an example's token."""
    context_tokens: int = 8
    """Tokens shown on each side of an example's token, in each model's tokenisation."""
    quantile_examples: int = 10
    """Examples per latent drawn at evenly spaced quantiles of a random sample of its firings (0: none)."""
    seed: int = in_part(0, "pass")
    """Seed of the random sample of shared reference latents."""

    def __post_init__(self):
        checks = [
            (self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.max_tokens is None or self.max_tokens >= 1, "--max-tokens must be positive"),
            (0 < self.exclusive_threshold < 0.5, "--exclusive-threshold must be in (0, 0.5)"),
            (self.shared_probes >= 0 and self.shared_features >= 0, "counts must be >= 0"),
            (self.ridge > 0, f"--ridge must be positive, got {self.ridge}"),
            (0 < self.strong <= 1, f"--strong must be in (0, 1], got {self.strong}"),
            (self.min_heldout_fires >= 1, "--min-heldout-fires must be at least 1"),
            (self.splice_tokens >= 0, "--splice-tokens must be >= 0"),
            (self.hist_bins >= 2 and 0 < self.hist_min < self.hist_max, "need 0 < --hist-min < --hist-max"),
            (self.context_chars >= 0 and self.context_tokens >= 0, "context sizes must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise CrossdiffError(message)


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Plan:
    """What is known from the weights alone: partitions, norms, candidates, what to probe."""

    partition: np.ndarray  # (F,) "a_exclusive" | "b_exclusive" | "shared"
    dec_norm_a: np.ndarray  # (F,) ||d_A,i|| in normalised units, 0 where the row does not exist
    dec_norm_b: np.ndarray
    rel_norm: np.ndarray  # (F,) ||d_B|| / (||d_A|| + ||d_B||)
    side: np.ndarray  # (F,) "a" / "b" for exclusive candidates, "" otherwise
    probe_from_b: np.ndarray  # latents whose probe reads x_B: A-side candidates, A-leaning shared refs
    probe_from_a: np.ndarray
    shared_refs: np.ndarray
    same_space: bool
    functional_share: np.ndarray | None = (
        None  # (F,) share_B on the held-out rows (crossdiff.coder.functional)
    )


def make_plan(cc, store, cfg: AnalyzeConfig, share_F: np.ndarray | None = None) -> Plan:
    # The functional share makes a DFC's shared latent a candidate (share_B <= t or >= 1 - t,
    # docs/design.md §5) on a centred store only. Under the older uncentred normalisation one model's
    # writes are systematically smaller in ΔSSE (Gemma-3's 7.6x on the default pair: median share_B
    # 0.08 over the shared latents, so 585 of 837 would pass); centred, the median is 0.37 and 6 of
    # 666 pass (docs/analysis.md).
    by_share = share_F if comparable_losses(store) else None
    side, rel, norm_a, norm_b = exclusive_sides(cc, cfg.exclusive_threshold, by_share)
    partition = partitions(cc)
    others = (side == "") & np.isfinite(rel)
    pool = np.flatnonzero(others & (rel >= 0.4) & (rel <= 0.6))  # the shared band of docs/design.md §5
    pool = pool if len(pool) else np.flatnonzero(others)
    rng = np.random.default_rng(cfg.seed)
    refs = np.sort(rng.choice(pool, min(cfg.shared_probes, len(pool)), replace=False))
    # A shared reference is probed from the model it leans away from (the harder direction).
    from_b = np.union1d(np.flatnonzero(side == "a"), refs[rel[refs] < 0.5])
    from_a = np.union1d(np.flatnonzero(side == "b"), refs[rel[refs] >= 0.5])
    same = _same_space(cfg, store)
    return Plan(partition, norm_a, norm_b, rel, side, from_b, from_a, refs, same, share_F)


def _same_space(cfg: AnalyzeConfig, store) -> bool:
    if cfg.same_space is None:
        return store.model_a.get("id") == store.model_b.get("id") and store.d_a == store.d_b
    if cfg.same_space and store.d_a != store.d_b:
        raise CrossdiffError(f"--same-space needs equal widths, but A has {store.d_a} and B has {store.d_b}")
    return cfg.same_space


# ----------------------------------------------------------------------------- verdicts


def latent_table(plan: Plan, res: PassResult, cfg: AnalyzeConfig) -> dict[str, np.ndarray]:
    """Every column of latents.csv, as arrays of length F."""
    n, n_fire, n_f = max(res.n_tokens, 1), res.n_fire_F, len(plan.side)
    fired = n_fire > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_act = np.where(fired, res.sum_F / n_fire, np.nan)
        rms_F = np.sqrt(res.sumsq_F / n)
        max_act = np.where(fired, res.max_F, np.nan)
        p99 = np.minimum(res.p99_F, max_act)
    r2, auc, ls = res.r2_F, res.auroc_F, res.latent_scaling_F
    verdicts = [verdict(s, int(k)) for s, k in zip(plan.side, n_fire)]
    notes = [
        detection_note(s, float(a), float(b)) if k else "" for s, a, b, k in zip(plan.side, auc, r2, n_fire)
    ]
    # Score = RMS norm of the latent's write into its own model (||d_own|| · sqrt(E f²): strength and
    # density in one number). Detection by the other model no longer discounts it: what a candidate
    # does is judged by verify.py.
    own = np.where(
        plan.side == "a",
        plan.dec_norm_a,
        np.where(plan.side == "b", plan.dec_norm_b, np.hypot(plan.dec_norm_a, plan.dec_norm_b)),
    )
    score = own * rms_F
    return {
        "latent": np.arange(len(plan.side)),
        "partition": plan.partition,
        "side": plan.side,
        "verdict": np.array(verdicts, dtype=object),
        "reason": np.array(notes, dtype=object),
        "score": np.where(fired, score, 0.0),
        "rel_norm": plan.rel_norm,
        "functional_share": plan.functional_share
        if plan.functional_share is not None
        else np.full(n_f, np.nan),
        "dec_norm_a": plan.dec_norm_a,
        "dec_norm_b": plan.dec_norm_b,
        "density": n_fire / n,
        "mean_act": mean_act,
        "max_act": max_act,
        "p99_act": p99,
        "probe_r2": np.where(fired, r2, np.nan),
        "probe_auroc": np.where(fired, auc, np.nan),
        "latent_scaling": np.where(fired, ls, np.nan),
    }


# ----------------------------------------------------------------------------- outputs


def feature_latents(table: dict, plan: Plan, n_shared: int) -> np.ndarray:
    """Non-dead exclusive candidates (verified or not) and the best `n_shared` shared latents."""
    alive = table["verdict"] != "dead"
    candidates = np.flatnonzero(alive & (plan.side != ""))
    shared = np.flatnonzero(table["verdict"] == "shared")
    best = shared[np.argsort(-table["score"][shared], kind="stable")[:n_shared]]
    return np.union1d(candidates, best)


def lens_model(plan: Plan, latent: int) -> str:
    """The model whose unembedding reads a latent: its own side, or its larger decoder."""
    if plan.side[latent]:
        return plan.side[latent]
    return "a" if plan.dec_norm_a[latent] >= plan.dec_norm_b[latent] else "b"


def write_features(
    out: Path, latents, table, plan, res: PassResult, store, cc, lms, cfg: AnalyzeConfig
) -> None:
    """features/<latent>.json for each latent in `latents` (each file atomically)."""
    picks = {}
    for j in latents:
        vals, rows = res.top_values_KF[:, j], res.top_rows_KF[:, j]
        picks[int(j)] = [(float(v), int(r)) for v, r in zip(vals, rows) if v > 0 and r >= 0]
    examples = render_examples(
        store, picks, store_tokenizers(store), context_chars=cfg.context_chars, window=cfg.context_tokens
    )
    quantile: dict = {}
    if cfg.quantile_examples:  # quantile-sampled examples, per-token activations (examples.py)
        from .examples import enrich

        examples, quantile = enrich(examples, cc, store, store_tokenizers(store), cfg, cfg.quantile_examples)
    by_model = {k: [int(j) for j in latents if lens_model(plan, int(j)) == k] for k in "ab"}
    lens = logit_lenses(cc, lms, by_model, table["mean_act"])
    edges = res.hist_edges.tolist()
    for j in latents:
        j = int(j)
        doc = {
            "latent": j,
            "partition": table["partition"][j],
            "verdict": table["verdict"][j],
            "stats": {c: table[c][j] for c in COLUMNS},
            "examples": examples[j],
            "quantile_examples": quantile.get(j, []),
            "histogram": {"edges": edges, "counts": res.hist_counts_FH[j].tolist()},
            "logit_lens": lens.get(j),
        }
        write_json_atomic(out / "features" / f"{j}.json", jsonable(doc))


def summary_json(table, plan, res: PassResult, splice: dict, cc, store, cfg: AnalyzeConfig) -> dict:
    verdicts = table["verdict"]
    alive = verdicts != "dead"
    refs = plan.shared_refs[alive[plan.shared_refs]]
    model = lambda m: {k: m.get(k) for k in ("id", "layer", "n_layers", "d_model", "scale")}
    return {
        "n_latents": len(verdicts),
        "counts": {v: int((verdicts == v).sum()) for v in VERDICTS},
        "candidates": {k: int(((plan.side == k) & alive).sum()) for k in "ab"},
        "fve_a": res.fve_a,
        "fve_b": res.fve_b,
        "l0": res.l0,
        "dead_fraction": float((~alive).mean()),
        "n_tokens_analysed": int(res.n_tokens),
        "thresholds": {k: getattr(cfg, k) for k in THRESHOLDS},
        "splice": splice,
        "run": {**config_to_dict(cfg), "crosscoder": cc.cfg.to_dict()},
        "store": dict(
            path=str(store.root), n_tokens=store.n_tokens, a=model(store.model_a), b=model(store.model_b)
        ),
        "shared_reference": {
            "n": len(refs),
            "median_r2": _median(table["probe_r2"][refs]),
            "median_auroc": _median(table["probe_auroc"][refs]),
        },
        "same_space": plan.same_space,
    }


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else math.nan


# ----------------------------------------------------------------------------- orchestration


def stage_settings(cfg: AnalyzeConfig) -> dict:
    """What the analysis's results depend on besides its inputs: its settings and the rules' version
    (its manifest records them; `crossdiff diff` and `calibrate` record the same for their stage)."""
    return {**settings(cfg), "rules": RULES_VERSION}


def stage_key(cfg: AnalyzeConfig, run: Path, store) -> StageKey:
    """The analysis's key (crossdiff.core.manifest): its settings, the checkpoint and the store."""
    return StageKey(stage_settings(cfg), _inputs(run, store), accept=_fingerprints(cfg, run, store))


def analysed_settings(out: str | Path) -> dict | None:
    """The settings a finished analysis in `out` was made with (None when there is none, or it is
    unfinished): its manifest's key, or for one written before the manifest held it, its settings.json's
    config. For a stage that reuses an analysis without its inputs (the toy benchmark's, once its store
    is gone), never to decide this stage's own skip-if-done (`stage_key` does)."""
    out = Path(out)
    try:
        found = manifest.read(out)
    except CrossdiffError:
        return None
    if found is not None and found.get("protocol") == manifest.KEYED:
        return found["settings"] if found.get("complete") else None
    if not (out / "summary.json").is_file() or (found is not None and not found.get("complete")):
        return None
    return (_load_json(out / "settings.json") or {}).get("settings")


def _inputs(run: Path, store) -> list:
    """The checkpoint (its cfg.json, the weights' size and time) and the store's meta."""
    stat = (run / "crosscoder.safetensors").stat()
    return [runfolder.path(run, "cfg").read_text(), stat.st_size, stat.st_mtime_ns, store.meta]


def _fingerprints(cfg: AnalyzeConfig, run: Path, store, part: str | None = None) -> tuple[str, str]:
    """(fingerprint, the same as crossdiff <= 0.1 wrote it) of the settings (those of `part`, or all),
    the checkpoint and the store: the keys of the cached parts, and of a whole analysis as its
    settings.json recorded it before its manifest did (still accepted: no reanalysis on upgrade)."""
    cfg_text, size, mtime_ns, meta = _inputs(run, store)
    inputs = [settings(cfg, part), cfg_text, size, mtime_ns, meta, RULES_VERSION]
    legacy = hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return fingerprint(inputs), legacy


def _cached(path: Path, fingerprints: tuple[str, ...], compute, save, load):
    """Reuse a stage's result saved at `path` with one of these fingerprints; else compute and save it."""
    if path.is_file():
        saved = load(path)
        if saved.get("fingerprint") in fingerprints:
            return saved["result"]
    result = compute()
    save(path, {"fingerprint": fingerprints[0], "result": result})
    return result


def _save_pt(path: Path, obj) -> None:
    """Arrays as tensors, so that torch.load(weights_only=True) reads them back without pickle."""
    res = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in obj["result"].items()}
    write_with_atomic(path, lambda p: torch.save({**obj, "result": res}, p))


def _load_pt(path: Path):
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # an unreadable stage file is recomputed, never trusted
        return {}
    saved["result"] = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in saved["result"].items()}
    return saved


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def top_rows(analysis: Path, latent: int) -> list[int]:
    """Store rows of a latent's top examples: its features/<latent>.json, else the cached pass (pass.pt,
    this module's own file: other stages read it through here)."""
    feat = Path(analysis) / "features" / f"{latent}.json"
    if feat.is_file():
        return [int(e["row"]) for e in json.loads(feat.read_text()).get("examples", [])]
    saved = torch.load(Path(analysis) / PASS_FILE, weights_only=True)["result"]
    vals, rows = saved["top_values_KF"][:, latent], saved["top_rows_KF"][:, latent]
    return [int(r) for v, r in zip(vals.tolist(), rows.tolist()) if v > 0 and r >= 0]


def _models_or_reason(store, cfg: AnalyzeConfig, device) -> tuple[tuple | None, str]:
    """Both LanguageModels, or None and why they are not loaded."""
    if cfg.load_models is False:
        return None, "models not loaded (--no-load-models)"
    synthetic = store.meta.get("corpus") == "synthetic"  # a harvested store lacking tokenizers is damaged
    if cfg.load_models is None and synthetic:
        return None, "synthetic store: no models to load"
    from ..inputs.models import load_model

    return (
        load_model(store.model_a["id"], device=str(device)),
        load_model(store.model_b["id"], device=str(device)),
    ), ""


def _splice(cc, store, lms, reason: str, cfg: AnalyzeConfig) -> dict:
    if lms is None:
        return {"skipped": reason}
    if cfg.splice_tokens == 0:
        return {"skipped": "--splice-tokens 0"}
    factor = store.outlier_factor
    layers = (store.model_a["layer"], store.model_b["layer"])
    texts = [text for _, text in store.heldout_chunks(cfg.splice_tokens)]
    return splice_eval(cc, lms, layers, texts, max_tokens=cfg.splice_tokens, outlier_factor=factor)


def _open_inputs(cfg: AnalyzeConfig):
    from ..coder.crosscoder import Crosscoder
    from ..inputs.store import Store

    run = Path(cfg.run)
    cc = Crosscoder.from_pretrained(run)
    store_path = cfg.store
    if store_path is None:
        train_cfg = run / "train_config.json"
        if not train_cfg.is_file():
            raise CrossdiffError(f"{run} has no train_config.json to find its store; pass --store")
        store_path = json.loads(train_cfg.read_text())["store"]
    store = Store.open_recorded(cfg.store, store_path, run / "train_config.json")
    cc.cfg.check_store(store)
    return run, cc, store


@writes(lambda cfg: cfg.out or Path(cfg.run) / "analysis", record="tree")
def analyze(cfg: AnalyzeConfig) -> dict:
    """Analyse (or finish analysing, or report) the run; returns summary.json's content."""
    from ..core.runtime import apply_cpu_policy, resolve_device

    run, cc, store = _open_inputs(cfg)
    out = Path(cfg.out) if cfg.out else run / "analysis"
    _same_space(cfg, store)  # a bad --same-space fails before the first file is written
    key = stage_key(cfg, run, store)
    if begin(out, key, ("latents.csv", "summary.json"), command="analyze", other="keep"):
        print(f"{out} is already complete; nothing to do. Results: {out / 'summary.json'}")
        return json.loads((out / "summary.json").read_text())
    # Another key's (or an unfinished) analysis: its cached parts check their own keys (_cached).
    (out / "summary.json").unlink(missing_ok=True)
    (out / "settings.json").unlink(missing_ok=True)  # an older crossdiff's record; the manifest's now
    shutil.rmtree(out / "features", ignore_errors=True)  # derived files of other settings
    device = resolve_device(cfg.device)
    apply_cpu_policy()  # once per process (crossdiff/core/runtime.py)
    cc = cc.to(device).eval().requires_grad_(False)
    share = _cached(
        out / "share.pt",
        _fingerprints(cfg, run, store, "share"),
        lambda: {"share_F": heldout_share(cc, store, cfg, device)},
        _save_pt,
        _load_pt,
    )["share_F"]
    plan = make_plan(cc, store, cfg, share)
    res = PassResult.from_dict(
        _cached(
            out / PASS_FILE,
            _fingerprints(cfg, run, store, "pass"),
            lambda: run_passes(cc, store, plan, cfg, device).as_dict(),
            _save_pt,
            _load_pt,
        )
    )
    table = latent_table(plan, res, cfg)
    lms, reason = _models_or_reason(store, cfg, device)
    splice = _cached(
        out / "splice.json",
        _fingerprints(cfg, run, store, "splice"),
        lambda: jsonable(_splice(cc, store, lms, reason, cfg)),
        write_json_atomic,
        _load_json,
    )
    write_features(
        out, feature_latents(table, plan, cfg.shared_features), table, plan, res, store, cc, lms, cfg
    )
    write_latents(out, table)
    summary = jsonable(summary_json(table, plan, res, splice, cc, store, cfg))
    write_json_atomic(out / "summary.json", summary)
    counts = summary["counts"]
    print(
        f"analysed {summary['n_tokens_analysed']:,} tokens: {summary['candidates']['a']} exclusive candidates "
        f"of A and {summary['candidates']['b']} of B ({counts['dead']} dead latents); crossdiff verify "
        f"judges what they do. Results: {out}"
    )
    return summary
