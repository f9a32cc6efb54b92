"""Synthetic paired activations with a known answer: which concepts A has, B has, or both have.

Only data whose ground truth is known can tell when a crosscoder finds model-exclusive features and
when it invents them (the DFC paper validates on a toy setting and calls the method "oversensitive").
Each token is a sparse sum of planted features rendered separately into each model's space:

    x_A = Σ_{i ∈ A's features} c_i · j_A,i · s_A,i · u_A,i + μ_A + ε_A          (likewise x_B)

- shared features have a direction u_A,i in A's space and an *independent* one u_B,i in B's
  (different architectures share no basis, docs/design.md §5); A-only features have no B direction at all,
  so B's activations are computed without them (switching them off leaves x_B bit-for-bit equal);
- firing probabilities follow a power law over a random ranking of all features;
- the shared activation c_i is the same concept in both models, seen through per-model jitter j
  (the two models' activations of one concept are correlated, not equal);
- hard cases (defaults in SyntheticConfig, chosen up front, see docs/benchmark.md):
  * imbalanced shared features, far weaker in one model (the setting in which L1 crosscoders shrink
    the weak side to zero, Minder et al. 2025 "complete shrinkage"); their true relative norm stays
    outside the exclusive thresholds, so calling one exclusive is always an error;
  * co-firing groups of features (which may mix shared and exclusive ones);
  * "twin" exclusive features placed at a high cosine to a shared feature's direction.

Everything is seeded: the ground truth by (seed), each chunk of tokens by (seed, split, chunk), so
streams are reproducible, splits are disjoint and any chunk can be regenerated alone. Output is in
raw units (`raw_gain_*` makes them arbitrary); `norm_scales` estimates the store's normalisation.

Legend: N tokens, F ground-truth features, D one model's width, G co-firing groups, M group members,
E firing (token, feature) entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..core.errors import CrossdiffError

SHARED, A_ONLY, B_ONLY = 0, 1, 2
KIND_NAMES = {SHARED: "shared", A_ONLY: "a_only", B_ONLY: "b_only"}
SPLITS = {"train": 0, "eval": 1, "calib": 2}
_GAMMA_SHAPE = 2.0  # activation magnitudes ~ Gamma(2, mean 1): few near-zero values, a long right tail


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and hard cases of the synthetic ground truth (docs/design.md §5 planted controls, at scale)."""

    d_a: int = 64
    """Width of model A's activations."""
    d_b: int = 80
    """Width of model B's activations (different from A's, as across architectures)."""
    n_shared: int = 256
    """Features both models represent."""
    n_a_only: int = 32
    """Features only A represents."""
    n_b_only: int = 32
    """Features only B represents."""
    freq_max: float = 0.25
    """Firing probability of the most frequent feature (power law down to --freq-min)."""
    freq_min: float = 0.003
    """Firing probability of the rarest feature (before co-firing adds to it)."""
    strength_min: float = 0.5
    """Per-feature strength is log-uniform in [strength_min, strength_max]."""
    strength_max: float = 2.0
    """Upper end of the per-feature strength range."""
    strength_jitter: float = 0.2
    """Ordinary shared features: log-normal sd of their B/A strength ratio."""
    imbalanced_frac: float = 0.15
    """Share of shared features far weaker in one model (half weak in A, half weak in B)."""
    imbalance_min: float = 0.15
    """Imbalanced features: weak/strong strength ratio is log-uniform in [imbalance_min, imbalance_max]."""
    imbalance_max: float = 0.5
    """Upper end of the imbalance ratio."""
    twin_frac: float = 0.25
    """Share of exclusive features placed close to a shared feature's direction in their model."""
    twin_cos_min: float = 0.5
    """Twins: cosine to their shared partner is uniform in [twin_cos_min, twin_cos_max]."""
    twin_cos_max: float = 0.8
    """Upper end of the twin cosine (kept below the matching threshold 0.9)."""
    grouped_frac: float = 0.2
    """Share of all features that belong to a co-firing group."""
    group_size: int = 3
    """Features per co-firing group."""
    group_fire_prob: float = 0.8
    """When a group's event happens, each member fires with this probability."""
    act_jitter: float = 0.1
    """Log-normal sd of the per-model factor on each activation (the two models' views differ)."""
    noise_frac: float = 0.05
    """Isotropic Gaussian noise power as a fraction of each model's expected signal power."""
    mean_offset: float = 0.5
    """Norm of a constant per-model offset, relative to the signal's RMS norm (the decoder bias's job)."""
    raw_gain_a: float = 4.0
    """Raw-unit gain of A (arbitrary, so that the store's normalisation matters)."""
    raw_gain_b: float = 0.25
    """Raw-unit gain of B."""
    seed: int = 0
    """Seed of the ground truth and of every token stream."""
    chunk_tokens: int = 16384
    """Tokens generated per seeded chunk (the unit of reproducibility)."""

    def __post_init__(self):
        def bad(msg):
            raise CrossdiffError(msg)

        for name in ("d_a", "d_b", "n_shared", "group_size", "chunk_tokens"):
            if getattr(self, name) < 1:
                bad(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_a_only < 0 or self.n_b_only < 0:
            bad("n_a_only and n_b_only must be >= 0")
        if not 0 < self.freq_min <= self.freq_max <= 1:
            bad(f"need 0 < freq_min <= freq_max <= 1, got {self.freq_min}, {self.freq_max}")
        if not 0 < self.strength_min <= self.strength_max:
            bad("need 0 < strength_min <= strength_max")
        if not 0 < self.imbalance_min <= self.imbalance_max <= 1:
            bad("need 0 < imbalance_min <= imbalance_max <= 1")
        if not -1 < self.twin_cos_min <= self.twin_cos_max < 1:
            bad("need -1 < twin_cos_min <= twin_cos_max < 1")
        for name in ("imbalanced_frac", "twin_frac", "grouped_frac", "group_fire_prob", "noise_frac"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.strength_jitter, self.act_jitter, self.mean_offset) < 0:
            bad("strength_jitter, act_jitter and mean_offset must be >= 0")
        if min(self.raw_gain_a, self.raw_gain_b) <= 0:
            bad("raw gains must be positive")
        n_twins = round(self.twin_frac * self.n_a_only) + round(self.twin_frac * self.n_b_only)
        if n_twins > self.n_shared:
            bad(f"{n_twins} twin features need as many distinct shared partners; raise n_shared")

    @property
    def n_features(self) -> int:
        return self.n_shared + self.n_a_only + self.n_b_only


@dataclass(frozen=True)
class GroundTruth:
    """The planted features, laid out [shared | A-only | B-only]; arrays are indexed by feature."""

    kind_F: np.ndarray
    """SHARED, A_ONLY or B_ONLY."""
    dirs_a_FD: np.ndarray
    """Unit direction in A's space (zero row for B-only features)."""
    dirs_b_FD: np.ndarray
    """Unit direction in B's space (zero row for A-only features)."""
    strength_a_F: np.ndarray
    """Strength in A, generator units (0 for B-only)."""
    strength_b_F: np.ndarray
    base_freq_F: np.ndarray
    """Power-law firing probability of the feature alone."""
    freq_F: np.ndarray
    """Marginal firing probability including its co-firing group."""
    group_F: np.ndarray
    """Co-firing group id, -1 if none."""
    group_freq_G: np.ndarray
    """Probability of each group's event."""
    twin_of_F: np.ndarray
    """Exclusive twins: the shared feature they are close to, -1 otherwise."""
    imbalanced_F: np.ndarray
    """Shared features far weaker in one model."""
    mean_a_D: np.ndarray
    mean_b_D: np.ndarray
    noise_a: float
    """Noise standard deviation per dimension of A, generator units."""
    noise_b: float

    def indices(self, kind: int) -> np.ndarray:
        return np.nonzero(self.kind_F == kind)[0]

    @property
    def has_a_F(self) -> np.ndarray:
        return self.kind_F != B_ONLY

    @property
    def has_b_F(self) -> np.ndarray:
        return self.kind_F != A_ONLY

    @property
    def expected_l0(self) -> float:
        """Mean number of features firing per token (a shared feature counts once)."""
        return float(self.freq_F.sum())

    def relative_norm_F(self, gain_a: float = 1.0, gain_b: float = 1.0) -> np.ndarray:
        """True r = s_B / (s_A + s_B) with each model's strengths multiplied by its gain (e.g. the
        raw gain times the store's normalisation scale): 0 for A-only, 1 for B-only (docs/design.md §5)."""
        s_a, s_b = self.strength_a_F * gain_a, self.strength_b_F * gain_b
        return s_b / (s_a + s_b)

    def summary(self) -> dict:
        kinds = {name: int((self.kind_F == k).sum()) for k, name in KIND_NAMES.items()}
        return {
            **kinds,
            "expected_l0": self.expected_l0,
            "imbalanced": int(self.imbalanced_F.sum()),
            "twins": int((self.twin_of_F >= 0).sum()),
            "grouped": int((self.group_F >= 0).sum()),
            "freq_range": [float(self.freq_F.min()), float(self.freq_F.max())],
        }


class Chunk(NamedTuple):
    x_a_ND: torch.Tensor
    """Raw activations of A (float32)."""
    x_b_ND: torch.Tensor
    codes_NF: torch.Tensor
    """Feature activations c_i (before per-model jitter and strength); 0 where not firing."""


# ----------------------------------------------------------------------------- ground truth


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _place_twins(rng, dirs_FD, twins, partners, cos_min, cos_max) -> None:
    """Rotate each twin's direction to cosine c with its partner: c·u_p + sqrt(1-c²)·w, w ⟂ u_p."""
    for t, p in zip(twins, partners):
        c = rng.uniform(cos_min, cos_max)
        w = dirs_FD[t] - (dirs_FD[t] @ dirs_FD[p]) * dirs_FD[p]
        dirs_FD[t] = c * dirs_FD[p] + math.sqrt(1 - c * c) * w / np.linalg.norm(w)


def _strengths(cfg: SyntheticConfig, rng, kind_F) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = cfg.n_features
    base_F = np.exp(rng.uniform(math.log(cfg.strength_min), math.log(cfg.strength_max), n))
    ratio_F = np.exp(cfg.strength_jitter * rng.standard_normal(n))  # B/A strength of a shared feature
    shared = np.nonzero(kind_F == SHARED)[0]
    imbalanced = rng.choice(shared, round(cfg.imbalanced_frac * len(shared)), replace=False)
    weak_F = np.exp(rng.uniform(math.log(cfg.imbalance_min), math.log(cfg.imbalance_max), n))
    half = len(imbalanced) // 2
    ratio_F[imbalanced[:half]] = weak_F[imbalanced[:half]]  # the first half is weak in B
    strength_a_F = np.where(kind_F == B_ONLY, 0.0, base_F)
    strength_b_F = np.where(kind_F == A_ONLY, 0.0, np.where(kind_F == SHARED, base_F * ratio_F, base_F))
    # Weak-in-A features keep the base strength in B and divide it in A, so both halves are alike.
    weak_a = imbalanced[half:]
    strength_a_F[weak_a], strength_b_F[weak_a] = base_F[weak_a] * weak_F[weak_a], base_F[weak_a]
    imbalanced_F = np.zeros(n, dtype=bool)
    imbalanced_F[imbalanced] = True
    return strength_a_F, strength_b_F, imbalanced_F


def _groups(cfg: SyntheticConfig, rng, base_freq_F) -> tuple[np.ndarray, np.ndarray]:
    n_groups = round(cfg.grouped_frac * cfg.n_features) // cfg.group_size
    members = rng.permutation(cfg.n_features)[: n_groups * cfg.group_size]
    group_F = np.full(cfg.n_features, -1, dtype=np.int64)
    group_F[members] = np.repeat(np.arange(n_groups), cfg.group_size)
    # A group's event is as frequent as its median member, so co-firing is common but not dominant.
    group_freq_G = np.array([np.median(base_freq_F[group_F == g]) for g in range(n_groups)])
    return group_F, group_freq_G


def make_ground_truth(cfg: SyntheticConfig) -> GroundTruth:
    """The planted features for cfg.seed (deterministic)."""
    rng = np.random.default_rng([cfg.seed, 7919])
    n = cfg.n_features
    kind_F = np.repeat([SHARED, A_ONLY, B_ONLY], [cfg.n_shared, cfg.n_a_only, cfg.n_b_only])
    dirs_a_FD, dirs_b_FD = _unit_rows(rng, n, cfg.d_a), _unit_rows(rng, n, cfg.d_b)
    twin_of_F = np.full(n, -1, dtype=np.int64)
    n_tw_a, n_tw_b = round(cfg.twin_frac * cfg.n_a_only), round(cfg.twin_frac * cfg.n_b_only)
    partners = rng.choice(cfg.n_shared, n_tw_a + n_tw_b, replace=False)
    twins_a = cfg.n_shared + np.arange(n_tw_a)
    twins_b = cfg.n_shared + cfg.n_a_only + np.arange(n_tw_b)
    twin_of_F[twins_a], twin_of_F[twins_b] = partners[:n_tw_a], partners[n_tw_a:]
    _place_twins(rng, dirs_a_FD, twins_a, partners[:n_tw_a], cfg.twin_cos_min, cfg.twin_cos_max)
    _place_twins(rng, dirs_b_FD, twins_b, partners[n_tw_a:], cfg.twin_cos_min, cfg.twin_cos_max)
    dirs_a_FD[kind_F == B_ONLY] = 0.0
    dirs_b_FD[kind_F == A_ONLY] = 0.0
    strength_a_F, strength_b_F, imbalanced_F = _strengths(cfg, rng, kind_F)
    # Power law over a random ranking: p(rank) = freq_max · (1 + rank)^-α, α set by freq_min.
    alpha = math.log(cfg.freq_max / cfg.freq_min) / math.log(n) if n > 1 else 0.0
    base_freq_F = cfg.freq_max * (1.0 + rng.permutation(n)) ** -alpha
    group_F, group_freq_G = _groups(cfg, rng, base_freq_F)
    event_F = np.zeros(n)
    event_F[group_F >= 0] = group_freq_G[group_F[group_F >= 0]] * cfg.group_fire_prob
    freq_F = 1 - (1 - base_freq_F) * (1 - event_F)
    # Signal power per token (cross terms ignored): Σ p_i E[c²] E[j²] s_i²; it sets noise and offset.
    second_moment = (1 + 1 / _GAMMA_SHAPE) * math.exp(2 * cfg.act_jitter**2)
    power_a = float((freq_F * strength_a_F**2).sum() * second_moment)
    power_b = float((freq_F * strength_b_F**2).sum() * second_moment)
    mean_a_D = _unit_rows(rng, 1, cfg.d_a)[0] * cfg.mean_offset * math.sqrt(power_a)
    mean_b_D = _unit_rows(rng, 1, cfg.d_b)[0] * cfg.mean_offset * math.sqrt(power_b)
    return GroundTruth(
        kind_F=kind_F, dirs_a_FD=dirs_a_FD, dirs_b_FD=dirs_b_FD, strength_a_F=strength_a_F,
        strength_b_F=strength_b_F, base_freq_F=base_freq_F, freq_F=freq_F, group_F=group_F,
        group_freq_G=group_freq_G, twin_of_F=twin_of_F, imbalanced_F=imbalanced_F, mean_a_D=mean_a_D,
        mean_b_D=mean_b_D, noise_a=math.sqrt(cfg.noise_frac * power_a / cfg.d_a),
        noise_b=math.sqrt(cfg.noise_frac * power_b / cfg.d_b),
    )  # fmt: skip


# ----------------------------------------------------------------------------- token streams


class _Entries(NamedTuple):
    rows_E: np.ndarray
    cols_E: np.ndarray
    mags_E: np.ndarray
    jit_a_E: np.ndarray
    jit_b_E: np.ndarray


class SyntheticPairs:
    """A seeded source of paired activations for one SyntheticConfig."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        self.gt = make_ground_truth(cfg)
        gt = self.gt
        # Generator-unit feature vectors s_i·u_i; rendering a model reads only the rows of the
        # features it has (`_render`'s keep mask), so the others are not inputs to it at all.
        self._W_a = torch.from_numpy(gt.dirs_a_FD * gt.strength_a_F[:, None]).float()
        self._W_b = torch.from_numpy(gt.dirs_b_FD * gt.strength_b_F[:, None]).float()
        self._mean_a, self._mean_b = (
            torch.from_numpy(gt.mean_a_D).float(),
            torch.from_numpy(gt.mean_b_D).float(),
        )
        self._members = np.nonzero(gt.group_F >= 0)[0]
        self._scales: dict[int, tuple[float, float]] = {}

    def _entries(self, rng: np.random.Generator, n: int) -> _Entries:
        """The firing (token, feature) pairs of n tokens with their magnitudes and per-model jitter."""
        gt, cfg = self.gt, self.cfg
        fire_NF = rng.random((n, cfg.n_features), dtype=np.float32) < gt.base_freq_F.astype(np.float32)
        if len(self._members):
            event_NG = rng.random((n, len(gt.group_freq_G)), dtype=np.float32) < gt.group_freq_G
            coin_NM = rng.random((n, len(self._members)), dtype=np.float32) < cfg.group_fire_prob
            fire_NF[:, self._members] |= event_NG[:, gt.group_F[self._members]] & coin_NM
        rows_E, cols_E = np.nonzero(fire_NF)
        mags_E = rng.standard_gamma(_GAMMA_SHAPE, len(rows_E), dtype=np.float32) / _GAMMA_SHAPE
        jit_a_E = np.exp(cfg.act_jitter * rng.standard_normal(len(rows_E), dtype=np.float32))
        jit_b_E = np.exp(cfg.act_jitter * rng.standard_normal(len(rows_E), dtype=np.float32))
        return _Entries(rows_E, cols_E, mags_E, jit_a_E, jit_b_E)

    @staticmethod
    def _render(n: int, rows_E, cols_E, vals_E, W_FD: torch.Tensor, keep_E: np.ndarray) -> torch.Tensor:
        """Σ over kept entries of val · W[col] into row `row`: only the model's own features take part
        (a dense scatter + GEMM is faster on CPU than index_add_ over the entries)."""
        codes_NF = torch.zeros(n, W_FD.shape[0])
        codes_NF[rows_E[keep_E], cols_E[keep_E]] = torch.from_numpy(vals_E[keep_E])
        return codes_NF @ W_FD

    def chunk(self, index: int, split: str = "train", disabled_F: np.ndarray | None = None) -> Chunk:
        """Chunk `index` of a split (cfg.chunk_tokens tokens), optionally with features switched off.

        Switching features off changes no random draw, only drops their entries, so a test can
        compare the same tokens with and without them.
        """
        if split not in SPLITS:
            raise CrossdiffError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
        cfg, gt, n = self.cfg, self.gt, self.cfg.chunk_tokens
        base = [cfg.seed, SPLITS[split], index]
        e = self._entries(np.random.default_rng([*base, 0]), n)
        on_E = np.ones(len(e.rows_E), dtype=bool)
        if disabled_F is not None:
            off_F = np.zeros(cfg.n_features, dtype=bool)
            off_F[np.asarray(disabled_F)] = True
            on_E = ~off_F[e.cols_E]
        x_a = self._render(
            n, e.rows_E, e.cols_E, e.mags_E * e.jit_a_E, self._W_a, on_E & gt.has_a_F[e.cols_E]
        )
        x_b = self._render(
            n, e.rows_E, e.cols_E, e.mags_E * e.jit_b_E, self._W_b, on_E & gt.has_b_F[e.cols_E]
        )
        noise_a = np.random.default_rng([*base, 1]).standard_normal((n, cfg.d_a), dtype=np.float32)
        noise_b = np.random.default_rng([*base, 2]).standard_normal((n, cfg.d_b), dtype=np.float32)
        x_a += self._mean_a + gt.noise_a * torch.from_numpy(noise_a)
        x_b += self._mean_b + gt.noise_b * torch.from_numpy(noise_b)
        codes_NF = torch.zeros(n, cfg.n_features)
        codes_NF[e.rows_E[on_E], e.cols_E[on_E]] = torch.from_numpy(e.mags_E[on_E])
        return Chunk(x_a * cfg.raw_gain_a, x_b * cfg.raw_gain_b, codes_NF)

    def batches(
        self, n_tokens: int, batch_size: int, split: str = "train"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Raw (x_A, x_B) batches of the first `n_tokens` tokens of a split, one chunk in memory at a
        time; the token stream does not depend on batch_size."""
        left, index = n_tokens, 0
        carry_a, carry_b = torch.empty(0, self.cfg.d_a), torch.empty(0, self.cfg.d_b)
        while left > 0:
            ch = self.chunk(index, split)
            take = min(left, ch.x_a_ND.shape[0])
            carry_a, carry_b = torch.cat([carry_a, ch.x_a_ND[:take]]), torch.cat([carry_b, ch.x_b_ND[:take]])
            left, index = left - take, index + 1
            while carry_a.shape[0] >= batch_size or (left == 0 and carry_a.shape[0]):
                yield carry_a[:batch_size], carry_b[:batch_size]
                carry_a, carry_b = carry_a[batch_size:], carry_b[batch_size:]

    def norm_scales(self, n_tokens: int = 65536) -> tuple[float, float]:
        """Store scales so that E||scale·x_m||² = d_m (docs/design.md §4), on the "calib" split (memoised)."""
        if n_tokens in self._scales:
            return self._scales[n_tokens]
        sq_a = sq_b = 0.0
        for x_a, x_b in self.batches(n_tokens, self.cfg.chunk_tokens, split="calib"):
            sq_a += float(x_a.double().pow(2).sum())
            sq_b += float(x_b.double().pow(2).sum())
        self._scales[n_tokens] = (
            math.sqrt(self.cfg.d_a * n_tokens / sq_a),
            math.sqrt(self.cfg.d_b * n_tokens / sq_b),
        )
        return self._scales[n_tokens]

    def write_store(self, path: str | Path, n_tokens: int):
        """A store (crossdiff.inputs.store format) of the first `n_tokens` "train" tokens, normalised by
        `norm_scales`. Activations are kept in bf16 while collecting (the store's own dtype), which
        is the one full copy write_synthetic_store needs."""
        from ..inputs.store import write_synthetic_store

        scale_a, scale_b = self.norm_scales()
        x_a = torch.empty(n_tokens, self.cfg.d_a, dtype=torch.bfloat16)
        x_b = torch.empty(n_tokens, self.cfg.d_b, dtype=torch.bfloat16)
        start = 0
        for a, b in self.batches(n_tokens, self.cfg.chunk_tokens):
            x_a[start : start + len(a)], x_b[start : start + len(a)] = a, b
            start += len(a)
        return write_synthetic_store(
            path, x_a, x_b, scale_a=scale_a, scale_b=scale_b, model_a=f"synthetic-a-seed{self.cfg.seed}",
            model_b=f"synthetic-b-seed{self.cfg.seed}", shard_tokens=65536,  # few files: fewer fsyncs
        )  # fmt: skip

    def describe(self) -> dict:
        """Config and ground-truth summary as JSON-ready values."""
        return {"config": asdict(self.cfg), "ground_truth": self.gt.summary()}
