"""Training a crosscoder (standard or DFC) on a paired-activation store, restartable at any point.

`train(TrainConfig(...))` / `crossdiff train --store STORE --out RUN ...`. The loop (`fit`) takes a
plain iterator of normalised (x_A, x_B) batches and never touches models or tokenizers.

Run folder (docs/training.md): train_config.json, checkpoints/step-N/ (the latest one),
metrics.jsonl, the final crosscoder.safetensors + cfg.json, and eval.json (written last = done).

Resume: rerunning the same command continues from the latest checkpoint (weights, Adam state, step,
data position, RNG, dead-latent counters, threshold EMA); on CPU the result is bitwise identical to
an uninterrupted run (tests/test_train.py kills a run with SIGKILL to check).

Legend: B tokens, F all latents, D one model's width.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ..core import runfolder
from ..core.config import Shorthand, added, settings, where
from ..core.errors import CrossdiffError
from ..core.fsutil import write_json_atomic
from ..core.lock import writes
from ..core.runtime import apply_cpu_policy, resolve_device
from .crosscoder import Crosscoder, CrosscoderConfig, Partition
from .distributed import DistContext
from .fve import evaluate
from .runlog import (
    STATE_FILE,
    Meter,
    MetricsLog,
    check_run_folder,
    kept_note,
    latest_checkpoint,
    save_checkpoint,
)
from .sparsity import (
    DEFAULT_SPARSITY,
    DFC,
    DFC_EXCLUSIVE_FRAC,
    NAMES,
    Select,
    arch_name,
    arch_settings,
    get_sparsity,
)

# Test hook: SIGKILL ourselves right after this step (tests/test_train.py proves resume with it).
KILL_ENV = "CROSSDIFF_TEST_SIGKILL_AFTER_STEP"


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the architecture itself is saved with the weights (CrosscoderConfig)."""

    store: str = where()
    """Paired-activation store to train on (made by `crossdiff harvest`)."""
    out: str = where()
    """Run folder: checkpoints, metrics.jsonl, eval.json and the final crosscoder. Rerun to resume."""
    sparsity: Literal[NAMES] = DEFAULT_SPARSITY
    """How latents are selected (crossdiff/coder/sparsity.py): batchtopk, topk (per token) or l1."""
    exclusive_frac: float = 0.0
    """Fraction of latents exclusive to A, and the same fraction exclusive to B; the rest are shared.
    0 is the standard crosscoder, > 0 the DFC (Dedicated Feature Crosscoder; sizes rounded up to multiples of 64 latents from
    16,384 latents on; cfg.json holds the real ones)."""
    latents: int = 16384
    """Dictionary size D."""
    k: int = 32
    """Active latents per token (batchtopk, topk)."""
    tokens: int = 50_000_000
    """Training tokens."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    lr: float | None = None
    """Adam learning rate (default 2e-4 / sqrt(D / 2^14), the DFC author's rule)."""
    warmup_steps: int | None = None
    """Linear learning-rate warm-up (default min(1000, 5% of the steps))."""
    decay_frac: float = 0.2
    """Linear learning-rate decay to 0 over this final fraction of training (dictionary_learning)."""
    l1_coeff: float = 2.0
    """l1: weight λ of Σ_i f_i Σ_m ||d_m,i|| (warmed up linearly over the first 5% of steps)."""
    aux_k: int | None = None
    """AuxK: dead latents used to model the residual (default half the wider model's width)."""
    aux_alpha: float = 1 / 32
    """AuxK loss weight α (0 disables AuxK)."""
    aux_per_partition: bool = added(False)
    """DFC: one AuxK term per partition (the dead A-exclusive latents model A's residual alone, the
    B-exclusive ones B's, the shared ones both), so that the exclusive partitions get their own revival
    signal. Off by default: alone it did not revive the exclusive partitions on the default pair; with
    --exclusive-dead-tokens 10000 it lowered their dead share (docs/training.md, "Exclusive partitions
    alive"). No effect on a standard crosscoder."""
    dead_tokens: int | None = None
    """A latent that has not fired for this many training tokens is dead (AuxK). Default: 10M, or a
    quarter of --tokens when that is less (a window longer than the run never revives a latent)."""
    exclusive_dead_tokens: int | None = added(None)
    """DFC: the AuxK dead window of the exclusive latents (default: --dead-tokens). A shorter one keeps
    AuxK training an exclusive latent that fires only now and then (docs/training.md, "Exclusive
    partitions alive")."""
    threshold_beta: float | None = None
    """batchtopk: EMA factor of the inference threshold θ (mean of each batch's smallest kept value).
    Default: 0.999, or 1 - 10/steps when that is less (a memory of a tenth of the run)."""
    init_tokens: int = 65536
    """Tokens averaged to initialise the decoder biases (the data mean)."""
    dec_init_norm: float = added(0.1)
    """Norm of every decoder row at initialisation, per model, normalised units (Anthropic 2024). A
    model's side of a latent that training leaves unused keeps about this norm, which sets a floor
    on relative decoder norms at short budgets (docs/calibration.md)."""
    heldout_tokens: int = 262144
    """At most this many held-out tokens for the final evaluation."""
    checkpoint_every: int = where(1000)
    """Steps between checkpoints (the latest complete one is kept)."""
    log_every: int = where(50)
    """Steps between lines of metrics.jsonl."""
    seed: int = 0
    """Seed of the initialisation and the data order."""
    device: str = where("auto")
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    autocast: bool = True
    """bf16 autocast for the dense matmuls on CUDA (no effect on CPU)."""
    sparse_kernels: bool = True
    """Sparse decoder/encoder-gradient path; --no-sparse-kernels runs the dense reference."""
    logger: Literal["none", "wandb", "tensorboard"] = where("none")
    """Also log to wandb or tensorboard (skipped with a warning if not installed)."""

    CLI_SHORTHANDS: ClassVar[tuple[Shorthand, ...]] = (
        Shorthand(
            "arch",
            "Shorthand for --sparsity and --exclusive-frac: a sparsity name is the standard crosscoder "
            f"with that sparsity, dfc the DFC (--sparsity batchtopk, --exclusive-frac {DFC_EXCLUSIVE_FRAC} "
            "unless given).",
            (*NAMES, DFC),
            lambda arch, given: {
                **given,
                **arch_settings(arch, given.get("sparsity"), given.get("exclusive_frac")),
            },
        ),
    )

    def __post_init__(self):
        def bad(msg):
            raise CrossdiffError(msg)

        get_sparsity(self.sparsity)
        for name in "latents k tokens batch_size checkpoint_every log_every init_tokens heldout_tokens dead_tokens exclusive_dead_tokens".split():
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if get_sparsity(self.sparsity).uses_k and self.k > self.latents:
            bad(f"k={self.k} exceeds the dictionary size {self.latents}; lower --k or raise --latents")
        if not 0 <= self.exclusive_frac < 0.5:
            bad(
                f"--exclusive-frac must be in [0, 0.5) so that shared latents remain, got {self.exclusive_frac}"
            )
        if self.exclusive_frac > 0 and round(self.latents * self.exclusive_frac) < 1:
            bad(f"--exclusive-frac {self.exclusive_frac} gives no exclusive latent out of {self.latents}")
        if self.lr is not None and not self.lr > 0:
            bad(f"--lr must be positive, got {self.lr}")
        for name in "lr dec_init_norm aux_alpha l1_coeff".split():  # inf passes "> 0" but trains nothing
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                bad(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad("--warmup-steps must be >= 0")
        if not 0 <= self.decay_frac < 1 or not 0 <= self.beta < 1:
            bad("--decay-frac and --threshold-beta must be in [0, 1)")
        if not self.dec_init_norm > 0:
            bad(f"--dec-init-norm must be positive, got {self.dec_init_norm}")
        if self.aux_alpha < 0 or self.l1_coeff < 0 or (self.aux_k is not None and self.aux_k < 1):
            bad("--aux-alpha and --l1-coeff must be >= 0 and --aux-k >= 1")

    @property
    def arch(self) -> str:
        """The --arch name of this run (eval.json's "arch")."""
        return arch_name(self.sparsity, self.exclusive_frac)

    @property
    def total_steps(self) -> int:
        return math.ceil(self.tokens / self.batch_size)

    # Defaults sized for 50M tokens shrink with shorter runs (docs/training.md, "Short runs").
    @property
    def dead_window(self) -> int:
        return self.dead_tokens if self.dead_tokens is not None else min(10_000_000, max(1, self.tokens // 4))

    def dead_windows(self, part: Partition, device=None) -> torch.Tensor:
        """(F,) the AuxK dead window of every latent, in training tokens."""
        window_F = torch.full((part.n_latents,), self.dead_window, dtype=torch.long, device=device)
        if self.exclusive_dead_tokens is not None:
            for r in (part.a_exclusive, part.b_exclusive):
                window_F[r.start : r.stop] = self.exclusive_dead_tokens
        return window_F

    @property
    def beta(self) -> float:
        return (
            self.threshold_beta
            if self.threshold_beta is not None
            else min(0.999, max(0.0, 1 - 10 / self.total_steps))
        )

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.total_steps // 20)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, constant, then linear decay to 0 over the last `decay_frac` of steps."""
        base = self.lr if self.lr is not None else 2e-4 / math.sqrt(self.latents / 2**14)
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        left = self.total_steps - step
        decay = min(1.0, left / (self.decay_frac * self.total_steps)) if self.decay_frac else 1.0
        return base * warm * decay

    def l1_at(self, step: int) -> float:
        ramp = max(1, self.total_steps // 20)  # Anthropic (2024 April update): ramp λ over 5% of steps
        return self.l1_coeff * min(1.0, (step + 1) / ramp)

    def crosscoder_config(self, store) -> CrosscoderConfig:
        part = Partition.from_fractions(self.latents, self.exclusive_frac)
        return CrosscoderConfig(
            d_a=store.d_a,
            d_b=store.d_b,
            n_latents=self.latents,
            sparsity=self.sparsity,
            k=self.k,
            n_a_exclusive=part.n_a_exclusive,
            n_b_exclusive=part.n_b_exclusive,
            scale_a=store.scale_a,
            scale_b=store.scale_b,
            model_a=store.model_a.get("id", "model-a"),
            model_b=store.model_b.get("id", "model-b"),
            layer_a=store.model_a.get("layer"),
            layer_b=store.model_b.get("layer"),
        )


@dataclass
class TrainState:
    """Everything a resumed run needs besides the data (which is re-read from `step`)."""

    model: Crosscoder
    opt: torch.optim.Optimizer
    step: int = 0
    since_fired_F: torch.Tensor | None = None
    """Training tokens since each latent last fired (AuxK's dead-latent test)."""
    theta_ema: float = 0.0
    theta_n: int = 0
    last_cutoff: float | None = None
    guess: float | None = None
    """Extrapolated lower bound of the next BatchTopK cutoff: the exact-selection hint (sparse.py)."""
    dist: DistContext | None = None
    """Data-parallel context under torchrun (crossdiff/coder/distributed.py); None when single-process."""
    select: Select | None = None
    """The training selection when not the sparsity's own (the global-batch BatchTopK under torchrun)."""

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "since_fired": self.since_fired_F.cpu(),
            "theta_ema": self.theta_ema,
            "theta_n": self.theta_n,
            "guess": self.guess,
            "last_cutoff": self.last_cutoff,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, d: dict) -> None:
        self.step, self.theta_ema, self.theta_n = d["step"], d["theta_ema"], d["theta_n"]
        self.guess, self.last_cutoff = d["guess"], d["last_cutoff"]
        self.opt.load_state_dict(d["optimizer"])
        self.since_fired_F = d["since_fired"].to(self.since_fired_F.device)
        torch.set_rng_state(d["rng_cpu"])
        if d["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(d["rng_cuda"])


# ----------------------------------------------------------------------------- the loop


def train_step(st: TrainState, x_a, x_b, cfg: TrainConfig):
    """One optimizer step; returns the model's TrainOutput."""
    for group in st.opt.param_groups:
        group["lr"] = cfg.lr_at(st.step)
    device = x_a.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.autocast and device == "cuda"):
        aux_k = cfg.aux_k or max(x_a.shape[1], x_b.shape[1]) // 2
        out = st.model.training_forward(
            x_a, x_b, dead_F=_dead(st, cfg), aux_k=aux_k, aux_alpha=cfg.aux_alpha,
            aux_per_partition=cfg.aux_per_partition, l1_coeff=cfg.l1_at(st.step),
            sparse_kernels=cfg.sparse_kernels, guess=st.guess, select=st.select,
        )  # fmt: skip
    if not torch.isfinite(out.loss):
        raise CrossdiffError(
            f"the loss became non-finite at step {st.step} on finite data (training diverged; try a lower "
            "--lr)"
        )
    out.loss.backward()
    fired_F, n_tokens = out.fired_F, x_a.shape[0]
    if st.dist is not None:  # global-batch gradient, fired mask and token count on every replica
        st.dist.reduce_grads(st.model.parameters(), n_tokens)
        fired_F, n_tokens = st.dist.any(fired_F), st.dist.n_global
    clip_grad_norm(st.opt, 1.0)
    st.opt.step()
    st.opt.zero_grad(set_to_none=True)
    st.since_fired_F += n_tokens
    st.since_fired_F[fired_F] = 0
    if out.cutoff is not None:
        _track_cutoff(st, float(out.cutoff), cfg)
    st.step += 1
    return out


def _dead(st: TrainState, cfg: TrainConfig) -> torch.Tensor:
    """(F,) bool: the latents AuxK counts as dead now."""
    return st.since_fired_F >= cfg.dead_windows(st.model.partition, st.since_fired_F.device)


def _track_cutoff(st: TrainState, cutoff: float, cfg: TrainConfig) -> None:
    """Update the selection hint and the inference threshold θ from this batch's BatchTopK cutoff."""
    # The cutoff drifts by up to ~10%/step early in training: extrapolate the last ratio and keep
    # a 3% margin (sparse.select_batch_topk proves or rejects the guess).
    trend = min(max(cutoff / st.last_cutoff, 0.8), 1.25) if st.last_cutoff else 1.0
    st.guess, st.last_cutoff = 0.97 * cutoff * trend, cutoff
    # θ: bias-corrected EMA of the cutoff, started after warm-up (dictionary_learning starts it at
    # step 1000) so that the random-init phase does not drag it down.
    if st.step >= cfg.warmup:
        beta = cfg.beta
        st.theta_ema, st.theta_n = beta * st.theta_ema + (1 - beta) * cutoff, st.theta_n + 1
        st.model.threshold.fill_(st.theta_ema / (1 - beta**st.theta_n))


def clip_grad_norm(opt: torch.optim.Optimizer, max_norm: float) -> None:
    """Scale all gradients by min(1, max_norm / ||g||) (torch.nn.utils.clip_grad_norm_'s rule).

    With fused Adam the factor goes to the kernel through `grad_scale` (which it divides the
    gradients by: the protocol GradScaler uses), saving a read-write pass over every gradient.
    """
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    inv_coef = (norm / max_norm).clamp_min(1.0)
    if opt.defaults.get("fused"):
        opt.grad_scale = inv_coef
    else:
        torch._foreach_div_(grads, inv_coef)


def fit(st: TrainState, batches: Iterable, cfg: TrainConfig, run: Path, log: MetricsLog) -> None:
    """Train until cfg.total_steps on an iterator of normalised (x_A, x_B) batches."""
    from tqdm.auto import tqdm

    device = st.since_fired_F.device
    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    meter = Meter()
    with tqdm(
        total=cfg.total_steps,
        initial=st.step,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not st.is_main,
    ) as bar:
        for x_a, x_b in batches:
            if st.step >= cfg.total_steps:
                break
            x_a, x_b = x_a.to(device, non_blocking=True), x_b.to(device, non_blocking=True)
            if not (torch.isfinite(x_a).all() and torch.isfinite(x_b).all()):
                raise CrossdiffError(
                    f"the training batch at step {st.step} contains NaN or inf values (check the "
                    f"store); {kept_note(run)}"
                )
            if st.dist is not None:  # this rank's rows of the global batch
                x_a, x_b = st.dist.shard(x_a, x_b)
            try:
                out = train_step(st, x_a, x_b, cfg)
            except CrossdiffError as e:
                raise CrossdiffError(f"{e}; {kept_note(run)}") from None
            meter.add(out, x_a, x_b)
            bar.update(1)
            if (st.step % cfg.log_every == 0 or st.step == cfg.total_steps) and st.is_main:
                row = meter.flush(
                    st, cfg, _dead(st, cfg)
                )  # under torchrun: rank 0's slice, tokens/s of all ranks
                row["tokens_per_s"] *= st.dist.world if st.dist is not None else 1
                log.write(row)
                bar.set_postfix(
                    tok_s=f"{row['tokens_per_s']:.0f}",
                    fve_a=f"{row['fve_a']:.3f}",
                    fve_b=f"{row['fve_b']:.3f}",
                    l0=f"{row['l0']:.1f}",
                )
            if (st.step % cfg.checkpoint_every == 0 or st.step == cfg.total_steps) and st.is_main:
                save_checkpoint(run, st)
            if st.step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- run folder


def _new_state(model: Crosscoder, device) -> TrainState:
    model.to(device)
    try:  # fused Adam: one kernel per step, ~10x faster than foreach on CPU at 40M parameters
        opt = torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.999))
    since = torch.zeros(model.cfg.n_latents, dtype=torch.long, device=device)
    return TrainState(model, opt, since_fired_F=since)


def _resume(ckpt: Path, store, device) -> TrainState:
    model = Crosscoder.from_pretrained(ckpt)
    model.cfg.check_store(store)
    st = _new_state(model, device)
    try:
        st.load_state_dict(torch.load(ckpt / STATE_FILE, map_location=device, weights_only=True))
    except Exception as e:  # any failure here means the file is unusable
        raise CrossdiffError(
            f"cannot read the trainer state in {ckpt}: {str(e).splitlines()[0] if str(e) else e!r}; "
            f"delete {ckpt} to restart the run from scratch"
        ) from e
    return st


def _initialise(cfg: TrainConfig, store, device) -> TrainState:
    generator = torch.Generator().manual_seed(cfg.seed)
    model = Crosscoder(cfg.crosscoder_config(store), generator=generator, dec_init_norm=cfg.dec_init_norm)
    sum_a, sum_b, n = (
        torch.zeros(store.d_a, dtype=torch.float64),
        torch.zeros(store.d_b, dtype=torch.float64),
        0,
    )
    for x_a, x_b in store.batches(cfg.batch_size, split="train", seed=cfg.seed):
        sum_a, sum_b, n = sum_a + x_a.double().sum(0), sum_b + x_b.double().sum(0), n + x_a.shape[0]
        if n >= cfg.init_tokens:
            break
    model.init_decoder_bias((sum_a / n).float(), (sum_b / n).float())
    torch.manual_seed(cfg.seed)
    return _new_state(model, device)


# ----------------------------------------------------------------------------- entry point


def stage_settings(cfg: TrainConfig) -> dict:
    """What a run's results depend on (its manifest records them; `crossdiff diff` records the same)."""
    return settings(cfg)


@writes(lambda cfg: cfg.out, record="files")
def train(cfg: TrainConfig) -> dict:
    """Train (or resume, or report an already finished run); returns the held-out evaluation."""
    from ..inputs.store import Store
    from . import distributed

    run, device = Path(cfg.out), resolve_device(distributed.local_device(cfg.device))
    ctx = distributed.from_env(device.type)  # torchrun: join the group (None when single-process)
    created = not run.exists()
    try:
        if ctx is None or ctx.is_main:
            check_run_folder(cfg, run, stage_settings(cfg))
        if ctx is not None:
            ctx.barrier()
            if cfg.batch_size < ctx.world:
                raise CrossdiffError(f"--batch-size {cfg.batch_size} is below the {ctx.world} ranks")
        if (ctx is None or ctx.is_main) and not runfolder.exists(run, "eval"):
            for warning in short_run_warnings(cfg):
                print(f"warning: {warning}", file=sys.stderr)
        if runfolder.exists(run, "eval"):
            print(
                f"{run} is already finished ({cfg.tokens:,} tokens); nothing to do. Results: {runfolder.path(run, 'eval')}"
            )
            return runfolder.read(run, "eval")
        store = Store.open(cfg.store)
        if (ctx is None or ctx.is_main) and (warning := uncentred_store_warning(store)):
            print(f"warning: {warning}", file=sys.stderr)
        return _train(cfg, run, store, device, ctx)
    except CrossdiffError:
        if created and (ctx is None or ctx.is_main) and latest_checkpoint(run) is None:
            shutil.rmtree(run, ignore_errors=True)  # nothing a rerun could resume: leave nothing behind
        raise
    finally:
        distributed.shutdown(ctx)


SHORT_RUN_STEPS = 200
"""Fewer optimizer steps than this draw a warning (the small diff budget trains 1,172: 1.2M tokens at
batch 1,024, crossdiff/budget.py)."""


def short_run_warnings(cfg: TrainConfig) -> list[str]:
    """What will not take effect in a run this short, and what to change."""
    out = []
    if cfg.total_steps < SHORT_RUN_STEPS:
        out.append(
            f"{cfg.total_steps} optimizer steps ({cfg.tokens:,} tokens at --batch-size {cfg.batch_size}) are "
            f"too few to train a useful crosscoder; raise --tokens or lower --batch-size to get at least "
            f"{SHORT_RUN_STEPS} steps (defaults scaled to this run: AuxK dead window {cfg.dead_window:,} "
            f"tokens, threshold EMA factor {cfg.beta:.3g}, warm-up {cfg.warmup} steps)"
        )
    if cfg.dead_tokens is not None and cfg.dead_tokens >= cfg.tokens and cfg.aux_alpha > 0:
        out.append(
            f"--dead-tokens {cfg.dead_tokens:,} is not below --tokens {cfg.tokens:,}: no latent can count as "
            f"dead, so AuxK never revives one; leave it out (default: a quarter of --tokens) or lower it"
        )
    if cfg.warmup_steps is not None and cfg.warmup_steps >= cfg.total_steps:
        out.append(
            f"--warmup-steps {cfg.warmup_steps} covers the whole run of {cfg.total_steps} steps: the learning "
            "rate never reaches its value; leave it out (default: 5% of the steps) or lower it"
        )
    return out


def uncentred_store_warning(store) -> str | None:
    """A store harvested before centred normalisation (docs/design.md §4) may weigh one model far less."""
    from ..inputs.store import COMPARABLE_NORMALISATIONS

    models = (("A", store.model_a), ("B", store.model_b))
    old = [k for k, m in models if m.get("normalisation") not in COMPARABLE_NORMALISATIONS]
    if not old:
        return None
    return (
        f"{store.root} normalises model {' and '.join(old)} by E||x||^2 (an older crossdiff): a model with a large "
        "constant offset then weighs less in the loss and its exclusive latents die; re-harvest it for "
        "centred normalisation (docs/design.md §4)"
    )


def _train(cfg: TrainConfig, run: Path, store, device, ctx) -> dict:
    apply_cpu_policy()  # once per process (crossdiff/core/runtime.py)
    ckpt = latest_checkpoint(run)
    st = _resume(ckpt, store, device) if ckpt else _initialise(cfg, store, device)
    if ctx is not None:  # replicas start identical (same seed or checkpoint); select globally
        st.dist, st.select = ctx, ctx.selection(st.model.cfg.rule)
    if ckpt and st.is_main:
        print(f"resuming {run} from step {st.step} of {cfg.total_steps}", file=sys.stderr)
    log = MetricsLog(run, cfg, st.step) if st.is_main else None
    t0 = time.perf_counter()
    fit(st, store.batches(cfg.batch_size, split="train", seed=cfg.seed, start=st.step), cfg, run, log)
    if not st.is_main:  # rank 0 alone writes the weights and evaluates
        return {}
    st.model.save_pretrained(run)
    result = evaluate(st.model, store, cfg, device)
    result.update(
        tokens_trained=st.step * cfg.batch_size, steps=st.step, seconds_this_session=time.perf_counter() - t0
    )
    write_json_atomic(runfolder.path(run, "eval"), result)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


__all__ = ["TrainConfig", "TrainState", "train", "fit", "train_step", "evaluate"]
