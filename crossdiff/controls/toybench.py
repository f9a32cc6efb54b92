"""`crossdiff bench toy`: exclusive-feature recall and precision on synthetic ground truth.

For each seed: one synthetic store (crossdiff.controls.synthetic, the seed also picks the planted features),
then the standard BatchTopK crosscoder, the L1 crosscoder and the DFC at each exclusive fraction,
trained by `crossdiff.coder.train.train` and scored by `crossdiff.controls.matching` (classification by partition,
relative norm and the functional share of crossdiff.coder.functional). `--setting` names the sizes
(SETTINGS: default, wide). Output folder:

    stores/seed-S/            the synthetic store (+ synthetic.json: generator config and summary)
    runs/NAME-seed-S/         the training run (eval.json) + bench.json (this benchmark's record)
                              + analysis/ (crossdiff.analysis.analyze's verdicts: verified exclusive latents)
    results.json              {"runs": [...], "settings": ..., "ground_truth": ...}
    results.md                mean ± std over seeds per method, false-positive causes
    recall_precision.svg      exclusive recall vs precision, mean ± std over seeds
    relative_norms.svg        relative decoder norms of the standard crosscoders' alive latents

Resumable: a run whose folder has bench.json is skipped; one with eval.json is only re-scored; an
interrupted training resumes from its checkpoint (train's own resume). Verification (the analysis
stage's probes, run on the seed's store while it exists) is reused from RUN/analysis/ when its settings
match, so re-scoring needs no store.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from ..analysis.results import read_latents
from ..coder.sparsity import DEFAULT_SPARSITY, DFC, NAMES, arch_name
from ..core import config, runfolder
from ..core.errors import CrossdiffError
from ..core.fsutil import write_json_atomic
from ..core.lock import writes
from ..core.manifest import StageKey, begin, recording
from ..inputs.store import HELDOUT_FRAC

RECORD = "bench.json"
SCORE_VERSION = 9  # bump when the metrics change: finished runs are re-scored, not retrained
# Named sizes (`--setting`); a size given explicitly overrides its setting's value.
SETTINGS = {
    "default": dict(d_a=64, d_b=80, n_shared=256, n_a_only=32, n_b_only=32, latents=1024, k=4),
    # 4x the width and 4x the planted features (same superposition, 4.5 features per dimension, and
    # the same 3.2 latents per planted feature); expected L0 10.6, so k = 16. One width for both models.
    "wide": dict(d_a=256, d_b=256, n_shared=1024, n_a_only=128, n_b_only=128, latents=4096, k=16),
}
SIZED = tuple(SETTINGS["default"])
# Functional-share thresholds scored on every run (the threshold is chosen on the first seeds).
SHARE_SWEEP = (0.02, 0.05, 0.1, 0.2, 0.3)
# A share measured on fewer firings (held-out tokens) classifies nothing: analyze's min_heldout_fires.
SHARE_MIN_FIRES = 10
# Metrics also recorded for the analysis's candidate rule, as NAME_analysis.
ANALYSIS_METRICS = (
    "exclusive_recall", "exclusive_precision", "exclusive_recall_a", "exclusive_recall_b", "exclusive_precision_a",
    "exclusive_precision_b", "exclusive_recall_verified", "exclusive_precision_verified",
)  # fmt: skip


@dataclass(frozen=True)
class ToyBenchConfig:
    """Settings of the synthetic benchmark (generator details: crossdiff.controls.synthetic.SyntheticConfig)."""

    out: str
    """Output folder (stores, runs, results.json, results.md, plots). Rerun to resume."""
    setting: Literal["default", "wide"] = "default"
    """Named sizes: default (d 64/80, 256 shared + 32 + 32 planted, D 1024, k 4) or wide (d 256, 1024 shared
    + 128 + 128 planted, D 4096, k 16); --d-a, --latents, ... override single sizes."""
    seeds: int = 3
    """Seeds 0..N-1; each seed plants its own ground truth and seeds its training runs."""
    standard: tuple[str, ...] = ("batchtopk", "l1")
    """Standard crosscoders to run (batchtopk, l1; none: --standard with no value)."""
    dfc_fracs: tuple[float, ...] = (0.05, 0.1)
    """DFC exclusive fractions to run (each is the fraction of latents exclusive to A, and to B)."""
    dfc_sparsities: tuple[str, ...] = ("batchtopk",)
    """DFC sparsities to run at each fraction (batchtopk, the paper's; l1 adds DFC-L1 runs)."""
    latents: int | None = None
    """Dictionary size D of every crosscoder (default: the setting's)."""
    k: int | None = None
    """BatchTopK k (default: the setting's; 4 = the default setting's expected L0 3.6 rounded up)."""
    l1_coeff: float = 2.0
    """L1 crosscoder: sparsity penalty λ (gives L0 ≈ k on seed 0; docs/benchmark.md)."""
    tokens: int = 1_000_000
    """Training tokens per run."""
    batch_size: int = 1024
    """Tokens per optimizer step."""
    lr: float = 1e-2
    """Adam learning rate (the best held-out FVE of the BatchTopK crosscoder on seed 0; docs/benchmark.md)."""
    dead_tokens: int = 50_000
    """A latent silent for this many tokens is dead (AuxK)."""
    threshold_beta: float = 0.99
    """BatchTopK threshold EMA (short runs need a short memory)."""
    match_threshold: float = 0.9
    """Decoder cosine a latent needs, in each model where the feature exists, to match it."""
    eval_tokens: int = 65536
    """Held-out synthetic tokens used to decide which latents are alive."""
    d_a: int | None = None
    """Width of model A (default: the setting's)."""
    d_b: int | None = None
    """Width of model B (default: the setting's)."""
    n_shared: int | None = None
    """Planted shared features (default: the setting's)."""
    n_a_only: int | None = None
    """Planted A-only features (default: the setting's)."""
    n_b_only: int | None = None
    """Planted B-only features (default: the setting's)."""
    share_threshold: float = 0.1
    """Functional share: a latent with share_B <= t is classified A-only, >= 1 - t B-only (DFC: its
    shared-partition latents; crossdiff.coder.functional)."""
    threads: int = 1
    """Torch CPU threads (1 is fastest for these small matrices, and robust on a busy machine)."""
    device: str = "cpu"
    """Training device (cpu, cuda, auto)."""
    keep_stores: bool = False
    """Keep each seed's synthetic store (~300 MB at defaults) once its runs are done."""
    verify_tokens: int = 262144
    """Store rows (the first N) the verification analyses: probes from the other model are fitted on their
    train split and scored on their held-out split (5%); 0 skips verification (verified metrics null)."""

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise CrossdiffError(
                f"--setting: unknown setting {self.setting!r}; use one of {sorted(SETTINGS)}"
            )
        for name, value in SETTINGS[self.setting].items():  # construction: fill the sizes left unset
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if not 0 < self.share_threshold < 0.5:
            raise CrossdiffError(f"--share-threshold must be in (0, 0.5), got {self.share_threshold}")
        if self.seeds < 1 or self.threads < 1 or self.eval_tokens < 1:
            raise CrossdiffError("--seeds, --threads and --eval-tokens must be at least 1")
        if self.verify_tokens < 0:
            raise CrossdiffError(f"--verify-tokens must be >= 0, got {self.verify_tokens}")
        if not 0 < self.match_threshold <= 1:
            raise CrossdiffError(f"--match-threshold must be in (0, 1], got {self.match_threshold}")
        for arch in self.standard:
            if arch not in ("batchtopk", "l1"):
                raise CrossdiffError(f"--standard: unknown crosscoder {arch!r}; use batchtopk or l1")
        for sparsity in self.dfc_sparsities:
            if sparsity not in NAMES:
                raise CrossdiffError(
                    f"--dfc-sparsities: unknown sparsity {sparsity!r}; use one of {', '.join(NAMES)}"
                )
        for frac in self.dfc_fracs:
            if not 0 < frac < 0.5:
                raise CrossdiffError(f"--dfc-fracs values must be in (0, 0.5), got {frac}")

    def synthetic_config(self, seed: int):
        from .synthetic import SyntheticConfig

        return SyntheticConfig(
            d_a=self.d_a, d_b=self.d_b, n_shared=self.n_shared, n_a_only=self.n_a_only,
            n_b_only=self.n_b_only, seed=seed,
        )  # fmt: skip

    @property
    def store_tokens(self) -> int:
        """Enough rows for one pass over `tokens` training rows after the held-out split."""
        return int(math.ceil(self.tokens / (1 - HELDOUT_FRAC) * 1.02))

    def methods(self) -> list[Method]:
        out = [Method(arch, arch) for arch in self.standard]
        for sparsity in self.dfc_sparsities:
            prefix = DFC if sparsity == DEFAULT_SPARSITY else f"{DFC}-{sparsity}"
            out += [Method(f"{prefix}-{f:g}", sparsity, f) for f in self.dfc_fracs]
        return out


class Method(NamedTuple):
    name: str
    sparsity: str
    exclusive_frac: float | None = None
    """The DFC's exclusive fraction; None for the standard crosscoders."""

    @property
    def arch(self) -> str:
        return arch_name(self.sparsity, self.exclusive_frac or 0.0)


# ----------------------------------------------------------------------------- one seed's data


class SeedData:
    """One seed's generator, normalisation scales and (built only when a run must train) store."""

    def __init__(self, cfg: ToyBenchConfig, seed: int):
        from .synthetic import SyntheticPairs

        self.cfg, self.seed = cfg, seed
        self.gen = SyntheticPairs(cfg.synthetic_config(seed))
        self.root = Path(cfg.out) / "stores" / f"seed-{seed}"

    @property
    def scales(self) -> tuple[float, float]:
        """The store's normalisation scales (deterministic, so known without the store)."""
        return self.gen.norm_scales()

    def store_path(self) -> Path:
        """The seed's store, regenerated unless a complete one with the same settings exists (its key:
        the generator's config and summary and the token count, crossdiff.core.manifest)."""
        want = json.loads(json.dumps({**self.gen.describe(), "n_tokens": self.cfg.store_tokens}))
        spec = self.root / "synthetic.json"

        def legacy(root: Path) -> bool | None:  # a store written before its manifest held its key
            return None if not spec.is_file() else json.loads(spec.read_text()) == want

        key, meta = StageKey(want, legacy=legacy), (runfolder.FILES["meta"],)
        with recording(self.root, "bench toy"):
            if begin(self.root, key, meta, command="bench toy", resume=False):  # not resumable: redone
                return self.root
            _log(
                f"seed {self.seed}: writing a synthetic store of {self.cfg.store_tokens:,} tokens to {self.root}"
            )
            write_json_atomic(spec, want)  # the generator's description, beside the store
            self.gen.write_store(self.root, self.cfg.store_tokens)
        return self.root

    def remove_store(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------- one run


def train_config(cfg: ToyBenchConfig, store_path: Path, run: Path, method: Method, seed: int):
    from ..coder.train import TrainConfig

    return TrainConfig(
        store=str(store_path), out=str(run), sparsity=method.sparsity, latents=cfg.latents,
        k=cfg.k, exclusive_frac=method.exclusive_frac or 0.0, tokens=cfg.tokens, batch_size=cfg.batch_size,
        lr=cfg.lr, l1_coeff=cfg.l1_coeff, dead_tokens=cfg.dead_tokens, threshold_beta=cfg.threshold_beta,
        seed=seed, device=cfg.device, checkpoint_every=max(1, math.ceil(cfg.tokens / cfg.batch_size) // 4),
    )  # fmt: skip


def verify_settings(cfg: ToyBenchConfig) -> dict:
    """AnalyzeConfig settings of the verification: the verdict thresholds are analyze's defaults; only
    what verdicts do not need is cut (no models, splice, shared reference probes or evidence files)."""
    return dict(
        max_tokens=cfg.verify_tokens, batch_size=4096, top_k=1, shared_probes=0, shared_features=0,
        load_models=False, splice_tokens=0, hist_bins=2,
    )  # fmt: skip


def verify_run(cfg: ToyBenchConfig, data: SeedData, run: Path) -> tuple[np.ndarray | None, dict]:
    """(verified_F, info): which candidates the other side does not linearly detect (crossdiff.analysis.analyze's notes).

    Reuses RUN/analysis/ when it was written with the same settings after the weights; otherwise runs
    the analysis on the seed's store (regenerated if it is gone). (None, {}) when verification is off.
    """
    if cfg.verify_tokens == 0:
        return None, {}
    from ..analysis.analyze import AnalyzeConfig, analysed_settings, analyze

    want = verify_settings(cfg)
    out = run / "analysis"
    saved = analysed_settings(out)  # analyze's record: no store needed to know it is reusable
    fresh = (
        saved is not None
        and (out / "latents.csv").is_file()
        and all(saved.get(k) == v for k, v in want.items())
        and (out / "latents.csv").stat().st_mtime_ns >= (run / "crosscoder.safetensors").stat().st_mtime_ns
    )
    t0 = time.perf_counter()
    if not fresh:
        acfg = AnalyzeConfig(run=str(run), store=str(data.store_path()), device=cfg.device, **want)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            analyze(acfg)  # quiet: its progress bar and summary line would swamp the bench's log
    # Synthetic data has no model behaviour to verify (verify.py); what is left is the detection filter:
    # a candidate counts as "verified" here when the other side does not linearly detect its strong
    # firings. Information for comparison with the real pipeline's behavioural verdicts, not a rule.
    rows = [r for r in read_latents(out).rows]
    notes = [r["reason"] for r in rows if r["side"] and r["verdict"] != "dead"]
    info = {
        "rejected_rare": sum(n == "" for n in notes),  # too few strong held-out firings for a probe
        "rejected_predictable": sum(n.startswith("context detectable") for n in notes),
        "rejected_other": 0,
        "verify_seconds": None if fresh else time.perf_counter() - t0,
    }
    undetected = [
        r["reason"].startswith("context not linearly detectable") and r["verdict"] != "dead" for r in rows
    ]
    return np.array(undetected, dtype=bool), info


def score_run(
    cfg: ToyBenchConfig, data: SeedData, run: Path, verified_F: np.ndarray | None = None
) -> tuple[dict, np.ndarray]:
    """Matching metrics of a finished run, and the relative decoder norm of its alive latents."""
    from ..coder.crosscoder import Crosscoder
    from .matching import OTHER, classify, decoder_directions, exclusive_metrics, match, relative_norm

    model = Crosscoder.from_pretrained(run)
    alive_F, share_F = eval_pass(cfg, data, model)
    dec_a_FD, dec_b_FD = decoder_directions(model)
    m = match(dec_a_FD.numpy(), dec_b_FD.numpy(), data.gen.gt, cfg.match_threshold, candidates_F=alive_F)
    class_F = classify(model)  # the paper's rule: DFC by partition, standard by relative norm
    metrics = exclusive_metrics(m, class_F, data.gen.gt, alive_F, verified_F)
    metrics["counts_verified"] = None
    if verified_F is not None:  # the same counts, for the verified exclusive latents only
        class_v_F = np.where(verified_F, class_F, OTHER)
        metrics["counts_verified"] = exclusive_metrics(m, class_v_F, data.gen.gt, alive_F)["counts"]
    # The rule the analysis picks its candidates with (analysis.results.exclusive_sides), at its default t.
    by_analysis = exclusive_metrics(m, classify(model, "analysis", share_F), data.gen.gt, alive_F, verified_F)
    metrics.update(
        {f"{k}_analysis": by_analysis[k] for k in ANALYSIS_METRICS}, counts_analysis=by_analysis["counts"]
    )
    metrics["exclusive_recall_union"] = metrics["exclusive_precision_union"] = None
    if model.partition.is_dfc:  # diagnostic: partition ∪ relative norm (matching.classify)
        union = exclusive_metrics(m, classify(model, "union"), data.gen.gt, alive_F)
        metrics["exclusive_recall_union"] = union["exclusive_recall"]
        metrics["counts_union"] = union["counts"]
        metrics["exclusive_precision_union"] = union["exclusive_precision"]
    metrics.update(functional_metrics(cfg, model, m, data.gen.gt, alive_F, share_F))
    norm_a_F, norm_b_F = (n.detach().numpy() for n in model.decoder_norms())
    return metrics, relative_norm(norm_a_F, norm_b_F)[alive_F]


@torch.no_grad()
def eval_pass(cfg: ToyBenchConfig, data: SeedData, model) -> tuple[np.ndarray, np.ndarray]:
    """(alive_F, share_F) on the held-out synthetic tokens: which latents fire at least once (the
    inference encoder), and each latent's functional share (crossdiff.coder.functional; NaN below
    SHARE_MIN_FIRES firings)."""
    from ..coder.functional import FunctionalShare

    scale_a, scale_b = data.scales
    fired_F = torch.zeros(model.cfg.n_latents, dtype=torch.bool)
    acc = FunctionalShare(model)
    for x_a, x_b in data.gen.batches(cfg.eval_tokens, 4096, "eval"):
        x_a, x_b = x_a * scale_a, x_b * scale_b
        f_BF = model.encode(x_a, x_b)
        fired_F |= (f_BF > 0).any(0)
        acc.update(x_a, x_b, f_BF)
    return fired_F.numpy(), acc.share_b(SHARE_MIN_FIRES)


def functional_metrics(cfg: ToyBenchConfig, model, m, gt, alive_F, share_F) -> dict:
    """Exclusive recall and precision with the functional share (DFC: partition ∪ share; standard: share
    alone) at cfg.share_threshold, and over SHARE_SWEEP for it and for the analysis's rule (partition ∪
    r ∪ share, every part at the swept t, as `crossdiff analyze --exclusive-threshold t` would)."""
    from .matching import classify, exclusive_metrics

    def score(method: str, t: float, counts: bool = False) -> dict:
        res = exclusive_metrics(m, classify(model, method, share_F, t), gt, alive_F)
        out = {k: res[f"exclusive_{k}"] for k in ("recall", "precision", "recall_a", "recall_b")}
        return {**out, "counts": res["counts"]} if counts else out

    at_t = score("functional", cfg.share_threshold, counts=True)
    alive_share = share_F[alive_F]
    return {
        "exclusive_recall_functional": at_t["recall"],
        "exclusive_precision_functional": at_t["precision"],
        "counts_functional": at_t["counts"],
        "share_sweep": {
            method: {f"{t:g}": score(method, t) for t in SHARE_SWEEP} for method in ("functional", "analysis")
        },
        "functional_share_alive": [None if math.isnan(v) else round(float(v), 4) for v in alive_share],
    }


def run_one(cfg: ToyBenchConfig, data: SeedData, method: Method) -> dict:
    """Train (or resume) and score one (method, seed); returns its record (also saved as bench.json)."""
    from ..coder.runlog import upgrade_train_settings
    from ..coder.train import train

    run = Path(cfg.out) / "runs" / f"{method.name}-seed-{data.seed}"
    tcfg = train_config(cfg, data.root, run, method, data.seed)
    scoring = dict(
        match_threshold=cfg.match_threshold, eval_tokens=cfg.eval_tokens, score_version=SCORE_VERSION,
        verify_tokens=cfg.verify_tokens, share_threshold=cfg.share_threshold,
    )  # fmt: skip
    settings = {**config.settings(tcfg), **scoring}
    rec_path = run / RECORD
    if rec_path.is_file():
        record = json.loads(rec_path.read_text())
        saved = upgrade_train_settings(record.get("settings") or {})  # `arch` before sparsity/frac
        # A record of any version: its training settings read as TrainConfig's (see config.settings_of).
        if {**config.settings_of(type(tcfg), saved), **{k: saved.get(k) for k in scoring}} == settings:
            return record
    if runfolder.exists(run, "eval"):  # finished: re-score only (no store, no training)
        ev = runfolder.read(run, "eval")
    else:
        tcfg = train_config(cfg, data.store_path(), run, method, data.seed)
        with contextlib.redirect_stdout(io.StringIO()):  # train prints its eval.json; we summarise
            ev = train(tcfg)
    verified_F, verification = verify_run(cfg, data, run)
    t_score = time.perf_counter()
    metrics, rel_norm = score_run(cfg, data, run, verified_F)
    record = {
        "name": method.name, "arch": method.arch, "seed": data.seed, "exclusive_frac": method.exclusive_frac,
        "sparsity": tcfg.sparsity, **metrics,
        "fve_a": ev["fve_a"], "fve_b": ev["fve_b"], "l0": ev["l0"], "dead_fraction": ev["dead_fraction"],
        "relative_norms_alive": [round(float(r), 4) for r in rel_norm] if not method.exclusive_frac else None,
        "train_seconds": ev.get("seconds_this_session"), "score_seconds": time.perf_counter() - t_score,
        "verification": verification or None, "settings": settings,
    }  # fmt: skip
    write_json_atomic(rec_path, record)
    return record


# ----------------------------------------------------------------------------- the benchmark


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"


@writes(lambda cfg: cfg.out)
def run_toy_bench(cfg: ToyBenchConfig) -> dict:
    """Run every (method, seed) not yet done, then write results.json, results.md and the plots."""
    from .synthetic import SyntheticPairs

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    methods = cfg.methods()
    total, done = cfg.seeds * len(methods), 0
    records = []
    try:
        for seed in range(cfg.seeds):
            data = SeedData(cfg, seed)
            for method in methods:
                done += 1
                _log(f"[{done}/{total}] {method.name} seed {seed}")
                rec = run_one(cfg, data, method)
                _log(
                    f"[{done}/{total}] {method.name} seed {seed}: exclusive recall {_fmt(rec['exclusive_recall'])}, "
                    f"precision {_fmt(rec['exclusive_precision'])}, shared recall {_fmt(rec['shared_recall'])}, "
                    f"FVE {rec['fve_a']:.3f}/{rec['fve_b']:.3f} (training {rec['train_seconds'] or 0:.0f}s)"
                )
                records.append(rec)
            if not cfg.keep_stores:
                data.remove_store()
    finally:
        torch.set_num_threads(saved_threads)
    gt_summary = SyntheticPairs(cfg.synthetic_config(0)).describe()
    results = {"runs": records, "settings": asdict(cfg), "generator_seed0": gt_summary}
    from .toyreport import write_report

    write_report(out, results)
    elapsed = time.perf_counter() - t_start
    _log(
        f"done in {elapsed:.0f}s: {out / 'results.md'}, {out / 'results.json'}, {out / 'recall_precision.svg'}"
    )
    return results


__all__ = ["ToyBenchConfig", "run_toy_bench", "SeedData", "run_one", "score_run"]
