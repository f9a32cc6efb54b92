"""Compute budgets of `crossdiff diff` and `crossdiff calibrate`: how much data, how big a dictionary.

One table, so that the diff, the calibration controls and the docs agree. `small` is the default and
is sized to finish the whole diff in at most 15 minutes on 2 CPU cores (docs/diff.md has the measured
stage times); `medium` and `large` are for a GPU (or patience).

Choices for `small`, measured on the default pair (Brown, SmolLM2-135M vs Gemma-3-270M):
- 100k aligned pairs with 10% of chunks held out: verification needs >= 10 held-out firings, so a
  5% held-out share leaves most candidates "too rare to verify" at this size.
- D = 1024 latents, k = 32, 1.2M training tokens (~1,170 per latent, ~13 passes over the store), lr
  6e-3 with linear decay over the last 20%, AuxK dead after 100k tokens. On a centred store (docs/
  design.md §4) this leaves ~7% of the latents dead, and an alive shared latent comes back in another
  seed ~53% of the time; with 600k tokens 46%, 900k 50% (at lr 1e-3, the earlier default, 11%; 3e-3
  28%; 1e-2 39% with 16% dead; k = 16 57% with 20% dead) (`bench/dictionary_health.py`, docs/diff.md
  "Choosing the small budget"). The previous D = 4096 with 400k tokens (~100 per latent) left 49% of
  the latents dead.
- AuxK needs `dead_tokens` well below the training length, or it never switches on and the DFC's
  exclusive slots all die (measured on a 200k Brown store, D=4096, 200k tokens: 100% of both
  exclusive partitions dead with the 10M-token default).

`medium` and `large` give ~1,000 or more training tokens per latent (several passes over their
stores: stability rose with training length in the small grid); their AuxK windows stay at most a
quarter of the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .core.errors import CrossdiffError


@dataclass(frozen=True)
class Budget:
    name: str
    harvest_tokens: int
    """Aligned pairs harvested."""
    heldout_frac: float
    """Share of chunks held out from training (evaluation and verification probes)."""
    latents: int
    k: int
    train_tokens: int
    batch_size: int
    dead_tokens: int
    """AuxK: a latent silent for this many training tokens is dead."""
    lr: float | None
    seeds: int
    """DFCs trained with different seeds for the seed-stability table (seed 0 is analysed)."""
    steer_top: int
    """Candidates steered per model."""
    steer_seconds: float | None
    """Stop starting new steering jobs after this long."""
    splice_tokens: int = 4096
    """Held-out tokens for the analysis's splice-in evaluation (runs both models)."""
    decay_frac: float = 0.2
    """Linear learning-rate decay to 0 over this final share of the training steps."""
    verify_top: int | None = 8
    """Candidates per model whose behaviour is verified by exact ablations (the most promising first;
    a count of work, never seconds: the same verdicts on a busy and a quiet machine)."""
    verify_top_linked: int | None = 4
    """Besides verify_top: latents per model that only the answers stage's link made candidates
    (docs/verification.md, "Latents linked to the answers")."""
    verify_scan_tokens: int = 50_000
    """Aligned tokens of fresh text scanned for rare candidates' strong firings (docs/verification.md)."""
    verify_heldout_tokens: int = 2048
    """Held-out aligned tokens of the first-order ranking and the whole-diff share."""

    @property
    def tokens_per_latent(self) -> float:
        """Training tokens per latent of the dictionary (how far from convergence it can be)."""
        return self.train_tokens / self.latents

    def as_dict(self) -> dict:
        return asdict(self)


BUDGETS = {
    b.name: b
    for b in (
        # small: verification takes the time steering had (both against random directions; the
        # verdict now comes from ablation, steering is evidence), docs/diff.md
        Budget("small", 100_000, 0.10, 1024, 32, 1_200_000, 1024, 100_000, 6e-3, 3, 2, 60.0, verify_top=8),
        Budget(
            "medium",
            1_000_000,
            0.05,
            16384,
            32,
            16_000_000,
            4096,
            1_000_000,
            None,
            3,
            5,
            900.0,
            verify_top=32,
            verify_top_linked=16,
            verify_scan_tokens=250_000,
        ),
        Budget(
            "large",
            10_000_000,
            0.05,
            32768,
            32,
            50_000_000,
            4096,
            10_000_000,
            None,
            5,
            10,
            None,
            verify_top=None,
            verify_top_linked=None,
            verify_scan_tokens=1_000_000,
        ),
    )
}


def budget_help() -> str:
    """The budgets' sizes in one line, for the --help of every --budget option."""
    return "; ".join(
        f"{b.name}: {b.harvest_tokens:,} tokens, {b.latents:,} latents, {b.seeds} seeds"
        for b in BUDGETS.values()
    )


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise CrossdiffError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[name]


# ----------------------------------------------------------------------------- stage configs


def harvest_config(b: Budget, out, *, model_a: str, model_b: str, corpus: str, device: str = "auto"):
    from .harvest.harvest import HarvestConfig

    return HarvestConfig(
        out=str(out),
        model_a=model_a,
        model_b=model_b,
        corpus=corpus,
        max_tokens=b.harvest_tokens,
        heldout_frac=b.heldout_frac,
        device=device,
    )


def train_config(
    b: Budget, store, out, *, arch: str = "dfc", seed: int = 0, device: str = "auto", dec_init_norm=None
):
    from .coder.sparsity import arch_settings
    from .coder.train import TrainConfig

    extra = {} if dec_init_norm is None else {"dec_init_norm": dec_init_norm}
    return TrainConfig(
        **extra,
        store=str(store),
        out=str(out),
        **arch_settings(arch),
        latents=b.latents,
        k=b.k,
        tokens=b.train_tokens,
        batch_size=b.batch_size,
        dead_tokens=b.dead_tokens,
        lr=b.lr,
        decay_frac=b.decay_frac,
        seed=seed,
        device=device,
        checkpoint_every=max(1, b.train_tokens // b.batch_size // 4),
    )


def analyze_config(b: Budget, run, store, *, load_models: bool | None = None, device: str = "auto"):
    from .analysis.analyze import AnalyzeConfig

    return AnalyzeConfig(
        run=str(run), store=str(store), load_models=load_models, splice_tokens=b.splice_tokens, device=device
    )


def verify_config(b: Budget, run, store, *, device: str = "auto"):
    from .analysis.verify import VerifyConfig

    return VerifyConfig(
        run=str(run),
        store=str(store),
        top=b.verify_top,
        top_linked=b.verify_top_linked,
        scan_tokens=b.verify_scan_tokens,
        heldout_tokens=b.verify_heldout_tokens,
        device=device,
    )
