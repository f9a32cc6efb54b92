"""The crosscoder: standard or Dedicated-Feature (DFC), with BatchTopK, TopK or L1 sparsity.

    f_pre = W_enc_A (x_A - b_dec_A) + W_enc_B (x_B - b_dec_B) + b_enc        f = sparsify(ReLU(f_pre))
    x̂_m  = W_dec_m f + b_dec_m

The crosscoder papers write f_pre = W_enc_A x_A + W_enc_B x_B + b_enc; the two are the same family
(b_enc absorbs W_enc b_dec) but not the same optimisation problem. Without centring, the data mean
(half the energy of real residual streams) adds the same W_enc·μ to every token, BatchTopK keeps
picking the same few latents for all tokens and the rest die (we measured 99% dead latents after
160 steps on the synthetic benchmark). Centring on b_dec is what OpenAI's TopK SAE (Gao et al. 2024)
and dictionary_learning's BatchTopK do.

Units: `encode`, `decode` and `forward` take and return **normalised** activations
(normalised = raw × scale, scale chosen so that E||x_m - mean_m||² = d_m, docs/design.md §4). Use `normalise` /
`denormalise` to convert; the scales travel in the checkpoint's cfg.json.

Layout (as in sparsify): one set of plain parameters per model, one row per latent for both the
encoder and the decoder: W_enc_a, W_dec_a are (M_a, d_a); W_enc_b, W_dec_b are (M_b, d_b). Row j of
W_dec_a is latent j's decoder vector for A (the column W_dec_A[:, j] of the usual matrix notation); rows make the sparse
kernels' gathers contiguous. The DFC partition lays latents out as [A-exclusive | shared |
B-exclusive]: A owns rows for latents [0, F - Eb), B for [Ea, F), so the weights an exclusive latent
must not have (A-exclusive in W_enc_b/W_dec_b, and the mirror) do not exist. A standard crosscoder
is the case Ea = Eb = 0.

Legend: B tokens, F all latents, M latents one model sees, D one model's width, N active entries,
E dead latents (AuxK).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..core.errors import CrossdiffError
from ..core.fsutil import write_bytes_atomic, write_json_atomic
from . import sparse
from .partition import Partition, _model
from .sparsity import DEFAULT_SPARSITY, DFC, SPARSITIES, Select, Sparsity, get_sparsity

FORMAT_VERSION = 1
WEIGHTS_FILE = "crosscoder.safetensors"
CONFIG_FILE = "cfg.json"


class ModelRecord(NamedTuple):
    """One model's entry of a crosscoder's config (`CrosscoderConfig.model`)."""

    id: str
    layer: int | None
    d: int
    """Width of its activations."""
    scale: float
    """Normalisation scale: normalised = raw × scale."""


@dataclass(frozen=True)
class CrosscoderConfig:
    """Architecture, saved with the weights as cfg.json (training settings live in TrainConfig)."""

    d_a: int
    """Width of model A's activations."""
    d_b: int
    """Width of model B's activations."""
    n_latents: int = 16384
    """Dictionary size D."""
    sparsity: str = DEFAULT_SPARSITY
    """A name in crossdiff.coder.sparsity.SPARSITIES: batchtopk (inference uses the learned threshold),
    topk (per token) or l1."""
    k: int = 32
    """Active latents per token for batchtopk/topk."""
    n_a_exclusive: int = 0
    """DFC: latents that read and write only model A (0 = standard crosscoder)."""
    n_b_exclusive: int = 0
    """DFC: latents that read and write only model B."""
    scale_a: float = 1.0
    """Normalisation scale of A: normalised = raw × scale_a."""
    scale_b: float = 1.0
    """Normalisation scale of B."""
    model_a: str = "model-a"
    """Model A's id (hub id or path) as recorded by the store."""
    model_b: str = "model-b"
    layer_a: int | None = None
    """Layer of A whose residual stream was harvested."""
    layer_b: int | None = None

    def __post_init__(self):
        if min(self.d_a, self.d_b) < 1 or self.n_latents < 1:
            raise CrossdiffError(
                f"widths and dictionary size must be positive, got d_a={self.d_a}, "
                f"d_b={self.d_b}, n_latents={self.n_latents}"
            )
        if get_sparsity(self.sparsity).uses_k and not 1 <= self.k <= self.n_latents:
            raise CrossdiffError(f"k={self.k} must be between 1 and the dictionary size {self.n_latents}")
        if self.n_a_exclusive < 0 or self.n_b_exclusive < 0:
            raise CrossdiffError("exclusive latent counts must be >= 0")
        if self.n_a_exclusive + self.n_b_exclusive >= self.n_latents:
            raise CrossdiffError(
                f"{self.n_a_exclusive}+{self.n_b_exclusive} exclusive latents leave no shared "
                f"latent out of {self.n_latents}; lower the exclusive fraction"
            )
        for name in ("scale_a", "scale_b"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise CrossdiffError(f"{name} must be a positive finite number, got {v}")

    @property
    def partition(self) -> Partition:
        return Partition(self.n_latents, self.n_a_exclusive, self.n_b_exclusive)

    def model(self, m: str) -> ModelRecord:
        """Model m's id, layer, width and scale."""
        m = _model(m)
        return ModelRecord(*(getattr(self, f"{k}_{m}") for k in ("model", "layer", "d", "scale")))

    @property
    def rule(self) -> Sparsity:
        """This crosscoder's entry of the sparsity table."""
        return SPARSITIES[self.sparsity]

    def to_dict(self) -> dict:
        part = self.partition
        return {
            "format_version": FORMAT_VERSION,
            "architecture": DFC if part.is_dfc else "crosscoder",
            **dataclasses.asdict(self),
            "partition": {
                "layout": ["a_exclusive", "shared", "b_exclusive"],
                "a_exclusive": len(part.a_exclusive),
                "shared": len(part.shared),
                "b_exclusive": len(part.b_exclusive),
            },
            "units": "normalised = raw * scale",
        }

    @classmethod
    def from_dict(cls, d: dict) -> CrosscoderConfig:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CrossdiffError(
                f"checkpoint format version {version!r} is not supported (this crossdiff "
                f"reads version {FORMAT_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check_store(self, store) -> None:
        """CrossdiffError unless `store` holds the same models, layers, widths and scales."""
        want = {
            "A": (self.model_a, self.layer_a, self.d_a, self.scale_a),
            "B": (self.model_b, self.layer_b, self.d_b, self.scale_b),
        }
        have = {
            "A": (store.model_a.get("id"), store.model_a.get("layer"), store.d_a, store.scale_a),
            "B": (store.model_b.get("id"), store.model_b.get("layer"), store.d_b, store.scale_b),
        }
        for m in "AB":
            (mid, layer, d, s), (smid, slayer, sd, ss) = want[m], have[m]
            if (mid, layer, d) != (smid, slayer, sd) or not math.isclose(s, ss, rel_tol=1e-6):
                why = (  # the same models and layer with another scale: another corpus or harvest
                    "its activations were harvested from other text"
                    if (mid, layer, d) == (smid, slayer, sd)
                    else "it holds other activations"
                )
                raise CrossdiffError(
                    f"checkpoint does not match the store for model {m}: checkpoint has {mid} layer {layer} "
                    f"width {d} scale {s:.6g}, store has {smid} layer {slayer} width {sd} scale {ss:.6g} "
                    f"({getattr(store, 'root', 'the store')}: {why}); pass --store with the store the "
                    "checkpoint was trained on (its run's train_config.json names it), or train on this one"
                )


class Reconstruction(NamedTuple):
    x_hat_a: Tensor
    x_hat_b: Tensor
    f: Tensor
    """Latent activations (B, F) as used at inference."""


class Activations(NamedTuple):
    """`Crosscoder.encode_entries`: the dense activations and their active entries (row-major)."""

    f: Tensor
    """(B, F), equal to `encode`."""
    rows_N: Tensor
    cols_N: Tensor
    vals_N: Tensor
    """f[rows_N, cols_N] (all > 0)."""


class TrainOutput(NamedTuple):
    loss: Tensor
    """Differentiable total loss: reconstruction (+ α·AuxK) (+ λ·L1)."""
    sse_a: Tensor
    """Σ over the batch of ||x_A - x̂_A||² (detached)."""
    sse_b: Tensor
    aux_loss: Tensor
    """AuxK loss before α (0 when no latent is dead)."""
    l0: float
    """Mean active latents per token."""
    fired_F: Tensor
    """Which latents fired in this batch (bool)."""
    cutoff: Tensor | None
    """BatchTopK: smallest kept decoder-norm-scaled value (the threshold EMA's sample)."""


class Side(NamedTuple):
    """One model's half of a crosscoder (`Crosscoder.side`): its parameters (views, not copies), its
    scale, and the latents with a row in them (row i is latent `latents.start + i`)."""

    W_enc: Tensor
    """(M, D)"""
    W_dec: Tensor
    """(M, D) in normalised units; divide by `scale` for raw units."""
    b_dec: Tensor
    """(D,)"""
    scale: float
    latents: range

    @property
    def first(self) -> int:
        """The latent of row 0."""
        return self.latents.start


class Crosscoder(nn.Module):
    """A crosscoder over two models of different widths; see the module docstring for units/layout."""

    def __init__(
        self,
        cfg: CrosscoderConfig,
        *,
        device=None,
        generator: torch.Generator | None = None,
        dec_init_norm: float = 0.1,
    ):
        super().__init__()
        self.cfg = cfg
        part = cfg.partition
        m_a, m_b = len(part.a_latents), len(part.b_latents)

        def p(*shape):
            return nn.Parameter(torch.zeros(*shape, device=device))

        self.W_enc_a, self.W_enc_b = p(m_a, cfg.d_a), p(m_b, cfg.d_b)
        self.b_enc = p(cfg.n_latents)
        self.W_dec_a, self.W_dec_b = p(m_a, cfg.d_a), p(m_b, cfg.d_b)
        self.b_dec_a, self.b_dec_b = p(cfg.d_a), p(cfg.d_b)
        # BatchTopK inference threshold θ on ReLU(f_pre)·Σ_m||d_m|| (< 0: not learned yet).
        self.register_buffer("threshold", torch.tensor(-1.0, device=device))
        if dec_init_norm > 0:
            self.reset_parameters(generator, dec_init_norm)

    @torch.no_grad()
    def reset_parameters(self, generator=None, dec_init_norm: float = 0.1) -> None:
        """Decoder rows: random directions of norm `dec_init_norm` per model (Anthropic 2024;
        dictionary_learning). Encoder = decoder transposed (Gao et al. 2024 §A.1). Biases zero."""
        for W_dec, W_enc in ((self.W_dec_a, self.W_enc_a), (self.W_dec_b, self.W_enc_b)):
            rand = torch.randn(W_dec.shape, generator=generator, device=W_dec.device)
            W_dec.copy_(rand * (dec_init_norm / rand.norm(dim=1, keepdim=True)))
            W_enc.copy_(W_dec)
        for b in (self.b_enc, self.b_dec_a, self.b_dec_b):
            b.zero_()

    @torch.no_grad()
    def init_decoder_bias(self, mean_a_D: Tensor, mean_b_D: Tensor) -> None:
        """b_dec_m = the data mean (normalised units) of a sample of the first batches."""
        self.b_dec_a.copy_(mean_a_D)
        self.b_dec_b.copy_(mean_b_D)

    @property
    def partition(self) -> Partition:
        return self.cfg.partition

    def side(self, m: str) -> Side:
        """Model m's parameters, scale and latents (m: "a" or "b")."""
        m = _model(m)
        return Side(
            *(getattr(self, f"{w}_{m}") for w in ("W_enc", "W_dec", "b_dec")),
            getattr(self.cfg, f"scale_{m}"),
            self.partition.latents(m),
        )

    # ------------------------------------------------------------------ units

    def normalise(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        """Raw model activations -> the crosscoder's normalised units."""
        return x_a * self.cfg.scale_a, x_b * self.cfg.scale_b

    def denormalise(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised units -> raw model activations (e.g. before steering a real model)."""
        return x_a / self.cfg.scale_a, x_b / self.cfg.scale_b

    # ------------------------------------------------------------------ inference

    def decoder_norms(self) -> tuple[Tensor, Tensor]:
        """(||d_A,i||, ||d_B,i||) for every latent i (F,), 0 where the row does not exist (DFC)."""
        n_f, ea = self.cfg.n_latents, self.cfg.n_a_exclusive
        norm_a_F = torch.nn.functional.pad(self.W_dec_a.norm(dim=1), (0, n_f - self.W_dec_a.shape[0]))
        norm_b_F = torch.nn.functional.pad(self.W_dec_b.norm(dim=1), (ea, 0))
        return norm_a_F, norm_b_F

    def pre_acts(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        """f_pre (B, F) = W_enc_A (x_A - b_dec_A) + W_enc_B (x_B - b_dec_B) + b_enc, dense, differentiable."""
        xc_a, xc_b = x_a - self.b_dec_a, x_b - self.b_dec_b
        return sparse.dense_preacts(
            xc_a, xc_b, self.W_enc_a, self.W_enc_b, self.b_enc, self.cfg.n_a_exclusive
        )

    def encode(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        """Latent activations (B, F) from normalised inputs, as used at inference.

        batchtopk: ReLU(f_pre) where ReLU(f_pre)·Σ_m||d_m|| > θ (per-batch BatchTopK if θ was never
        learned); topk: the per-token top k; l1: ReLU(f_pre).

        When no gradient is needed (no_grad / inference_mode, or nothing requires grad) this is the
        lean path: one (B, F) buffer, everything after the GEMMs in place. Otherwise (and under
        autocast) it is the differentiable formula `_encode_reference`; both give the same values
        to float rounding (tests/test_crosscoder.py).
        """
        if self._needs_graph(x_a, x_b):
            return self._encode_reference(x_a, x_b)
        return self._encode_nograd(x_a, x_b)[0]

    def encode_entries(self, x_a: Tensor, x_b: Tensor) -> Activations:
        """`encode` (never differentiable) plus its active entries, row-major (sorted by token, then
        latent): what `f.nonzero()` + a gather give, without torch's slow `nonzero` pass on CPU."""
        if sparse._autocast_on(x_a):
            with torch.no_grad():
                f_BF, entries = self._encode_reference(x_a, x_b), None
        else:
            f_BF, entries = self._encode_nograd(x_a, x_b)
        if entries is None:
            entries = sparse.nonzero_entries(f_BF)
        return Activations(f_BF, entries.rows_N, entries.cols_N, f_BF[entries.rows_N, entries.cols_N])

    def _needs_graph(self, x_a: Tensor, x_b: Tensor) -> bool:
        if sparse._autocast_on(x_a):  # keep autocast's dtype semantics: the reference formula
            return True
        if not torch.is_grad_enabled():
            return False
        return x_a.requires_grad or x_b.requires_grad or any(p.requires_grad for p in self.parameters())

    @torch.no_grad()
    def _encode_nograd(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, sparse.Entries | None]:
        """(f (B, F), the selected entries or None): the two encoder GEMMs write one buffer
        (`sparse.matmuls_nograd`), then b_enc, ReLU and the θ mask are applied in place by row blocks
        and TopK keeps its entries in place. The θ and L1 paths allocate no (B, F) temporary
        besides the output; the selections' own temporaries are in sparse.py."""
        cfg = self.cfg
        xc_a, xc_b = x_a - self.b_dec_a, x_b - self.b_dec_b
        f_BF = sparse.matmuls_nograd(xc_a, xc_b, self.W_enc_a, self.W_enc_b, cfg.n_latents, cfg.n_a_exclusive)
        if not cfg.rule.selects:
            return sparse.bias_relu_threshold_(f_BF, self.b_enc), None
        norm_a_F, norm_b_F = self.decoder_norms()
        norm_F = norm_a_F + norm_b_F
        if self._threshold_learned():
            return sparse.bias_relu_threshold_(f_BF, self.b_enc, norm_F, self.threshold), None
        # The selections rank ReLU(f_pre)·norm, so selecting on ReLU(f_pre) picks the same entries.
        entries = cfg.rule.select(sparse.bias_relu_threshold_(f_BF, self.b_enc), None, norm_F, cfg.k)
        return sparse.keep_entries_(f_BF, entries), entries

    def _encode_reference(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        """The plain differentiable formula (dense pre-activations, out-of-place masks)."""
        f_pre_BF = self.pre_acts(x_a, x_b)
        f_BF = f_pre_BF.relu()
        norm_a_F, norm_b_F = self.decoder_norms()
        norm_F = (norm_a_F + norm_b_F).detach()
        if not self.cfg.rule.selects:
            return f_BF
        if self._threshold_learned():
            return f_BF * (f_BF * norm_F > self.threshold)
        return f_BF * self._mask(self.cfg.rule.select(f_pre_BF.detach(), None, norm_F, self.cfg.k), f_BF)

    def _threshold_learned(self) -> bool:
        return self.cfg.rule.learns_threshold and bool(self.threshold >= 0)

    def decode(self, f_BF: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂_A, x̂_B) in normalised units from activations (B, F)."""
        return sparse.dense_decode(
            f_BF, self.W_dec_a, self.W_dec_b, self.b_dec_a, self.b_dec_b, self.cfg.n_a_exclusive
        )

    def forward(self, x_a: Tensor, x_b: Tensor) -> Reconstruction:
        f_BF = self.encode(x_a, x_b)
        return Reconstruction(*self.decode(f_BF), f_BF)

    # ------------------------------------------------------------------ training

    def training_forward(
        self,
        x_a: Tensor,
        x_b: Tensor,
        *,
        dead_F: Tensor | None = None,
        aux_k: int = 256,
        aux_alpha: float = 1 / 32,
        aux_per_partition: bool = False,
        l1_coeff: float = 0.0,
        sparse_kernels: bool = True,
        guess: float | None = None,
        select: Select | None = None,
    ) -> TrainOutput:
        """Loss and statistics for one batch (normalised units).

        sparse_kernels=True uses the sparse path (sparse.py); False the dense oracle. Both select the
        same latents and agree to float rounding (tests/test_sparse.py). `select` replaces the
        sparsity's own selection (data-parallel training: the global-batch BatchTopK of
        distributed.py). aux_per_partition: one AuxK term per DFC partition (`_auxk`).
        """
        select = select or self.cfg.rule.select
        n_tokens = x_a.shape[0]
        norm_a_F, norm_b_F = self.decoder_norms()
        norm_F = norm_a_F + norm_b_F  # BatchTopK ranking and L1 weight: Σ of per-model norms (§2)
        xc_a, xc_b = x_a - self.b_dec_a, x_b - self.b_dec_b  # the encoder reads centred inputs
        acts = self._sparse_acts(x_a, x_b, xc_a, xc_b, norm_F, guess, select) if sparse_kernels else None
        if acts is None:  # dense oracle (or an L1 batch too dense for gathers to pay off)
            acts = self._dense_acts(x_a, x_b, norm_F, select)
        entries, x_hat_a, x_hat_b, l1_sum, xw_BF = acts
        err_a, err_b = x_a - x_hat_a, x_b - x_hat_b
        sse_a, sse_b = err_a.pow(2).sum(), err_b.pow(2).sum()
        loss = (sse_a + sse_b) / n_tokens
        if self.cfg.rule.l1_penalty and l1_coeff > 0:
            loss = loss + l1_coeff * l1_sum / n_tokens
        aux = self._auxk(xc_a, xc_b, err_a, err_b, dead_F, aux_k, xw_BF, aux_per_partition)
        if aux_alpha > 0:
            loss = loss + aux_alpha * aux
        fired_F = torch.bincount(entries.cols_N, minlength=self.cfg.n_latents) > 0
        return TrainOutput(
            loss,
            sse_a.detach(),
            sse_b.detach(),
            aux.detach(),
            entries.rows_N.numel() / n_tokens,
            fired_F,
            entries.cutoff,
        )

    def _sparse_acts(self, x_a, x_b, xc_a, xc_b, norm_F, guess, select):
        """Sparse path: dense encoder matmul of the centred inputs without graph, then only the selected entries."""
        ea, n_f = self.cfg.n_a_exclusive, self.cfg.n_latents
        xw_BF = sparse.matmuls_nograd(xc_a, xc_b, self.W_enc_a, self.W_enc_b, n_f, ea)
        bias_F = self.b_enc.detach()
        entries = select(xw_BF, bias_F, norm_F.detach(), self.cfg.k, guess)
        if entries.rows_N.numel() > self.cfg.rule.max_sparse_density * xw_BF.numel():
            return None
        entries = sparse.with_latent_order(entries)
        enc = (self.W_enc_a, self.W_enc_b, self.b_enc, ea, self.b_dec_a, self.b_dec_b)
        vals_N = sparse.gather_preacts(xw_BF, entries, x_a, x_b, *enc)  # centres x on b_dec itself
        dec = (self.W_dec_a, self.W_dec_b, self.b_dec_a, self.b_dec_b)
        x_hat_a, x_hat_b = sparse.decode_pair(entries, vals_N, *dec, ea, xc_a.shape[0])
        return entries, x_hat_a, x_hat_b, (vals_N * norm_F[entries.cols_N]).sum(), xw_BF

    def _dense_acts(self, x_a, x_b, norm_F, select):
        """Dense oracle: f = ReLU(f_pre) masked to the selection, decoded by plain matmuls."""
        f_pre_BF = self.pre_acts(x_a, x_b)
        entries = select(f_pre_BF.detach(), None, norm_F.detach(), self.cfg.k, shortcut=False)  # plain top-k
        f_BF = f_pre_BF.relu() * self._mask(entries, f_pre_BF)
        x_hat_a, x_hat_b = self.decode(f_BF)
        return entries, x_hat_a, x_hat_b, (f_BF * norm_F).sum(), None

    @staticmethod
    def _mask(entries: sparse.Entries, like_BF: Tensor) -> Tensor:
        mask_BF = torch.zeros(like_BF.shape, dtype=torch.bool, device=like_BF.device)
        mask_BF[entries.rows_N, entries.cols_N] = True
        return mask_BF

    def _auxk(
        self, xc_a, xc_b, err_a, err_b, dead_F, aux_k, xw_BF=None, per_partition: bool = False
    ) -> Tensor:
        """AuxK (Gao et al. 2024 §A.2): the top-k_aux dead latents reconstruct the detached residual;
        the squared error is divided by the residual's variance so the loss is scale-free.

        per_partition (DFC): each partition's dead latents get their own AuxK term, summed: the
        A-exclusive ones model A's residual alone, the B-exclusive ones B's, the shared ones both,
        each with its own top-k_aux and its own variance. In one joint term (per_partition False,
        the behaviour before it existed) a dead exclusive latent competes with the dead shared
        latents for the same residual, which the shared ones explain in both models at once, and
        its revival signal is drowned (docs/training.md, "Exclusive partitions alive").

        Dense on the sub-dictionary of dead latents (same layout, so a dead A-exclusive latent still
        cannot reach x̂_B): k_aux is comparable to the number of dead latents E, and at that density
        GEMMs beat gathers (B·k_aux = 330k entries at d/2 = 320). The sparse path takes the dead
        latents' pre-activations from its no-grad buffer `xw_BF` (4 GEMMs of B x E x (d_A + d_B) per
        step instead of 6). Inputs are detached: AuxK trains the dead latents, not b_dec.
        """
        if dead_F is None or aux_k <= 0 or not bool(dead_F.any()):
            return xc_a.new_zeros(())
        xc_a, xc_b, err_a, err_b = xc_a.detach(), xc_b.detach(), err_a.detach(), err_b.detach()
        dead_E = dead_F.nonzero().squeeze(1)  # ascending, so [A-excl | shared | B-excl] is kept
        part = self.partition
        if not (per_partition and part.is_dfc):
            return self._auxk_group(dead_E, xc_a, xc_b, err_a, err_b, aux_k, xw_BF, "ab")
        total = xc_a.new_zeros(())
        for block, models in ((part.a_exclusive, "a"), (part.shared, "ab"), (part.b_exclusive, "b")):
            group_E = dead_E[(dead_E >= block.start) & (dead_E < block.stop)]
            if group_E.numel():
                total = total + self._auxk_group(group_E, xc_a, xc_b, err_a, err_b, aux_k, xw_BF, models)
        return total

    def _auxk_group(self, dead_E, xc_a, xc_b, err_a, err_b, aux_k, xw_BF, models: str) -> Tensor:
        """One AuxK term: the latents `dead_E` (ascending) reconstruct the residual of `models`
        ("a", "b" or "ab"), divided by that residual's variance."""
        ea, n_a = self.cfg.n_a_exclusive, self.W_enc_a.shape[0]
        rows_a, rows_b = dead_E[dead_E < n_a], dead_E[dead_E >= ea] - ea
        sub_ea = int((dead_E < ea).sum())
        if xw_BF is not None:
            enc = (self.W_enc_a, self.W_enc_b, self.b_enc)
            pre_BE = sparse.gather_columns(xw_BF, dead_E, xc_a, xc_b, *enc, ea)
        else:
            enc = (self.W_enc_a[rows_a], self.W_enc_b[rows_b], self.b_enc[dead_E])
            pre_BE = sparse.dense_preacts(xc_a, xc_b, *enc, sub_ea)
        top = pre_BE.detach().topk(min(aux_k, dead_E.numel()), dim=1, sorted=False).indices
        mask_BE = torch.zeros(pre_BE.shape, dtype=torch.bool, device=pre_BE.device).scatter_(1, top, True)
        f_BE = pre_BE.relu() * mask_BE
        e_hat_a, e_hat_b = sparse.dense_decode(
            f_BE, self.W_dec_a[rows_a], self.W_dec_b[rows_b], None, None, sub_ea
        )
        sse = var = xc_a.new_zeros(())
        for m, err, e_hat in (("a", err_a, e_hat_a), ("b", err_b, e_hat_b)):
            if m in models:
                sse = sse + (err - e_hat).pow(2).sum()
                var = var + (err - err.mean(0)).pow(2).sum()
        return (sse / var.clamp_min(1e-12)).nan_to_num(0.0)

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, path: str | Path) -> None:
        """Write `path/crosscoder.safetensors` and `path/cfg.json` (each file atomically)."""
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        meta = {"format_version": str(FORMAT_VERSION)}
        # bytes + our atomic writer: safetensors' save_file would recreate the file with mode 0600
        write_bytes_atomic(path / WEIGHTS_FILE, save(tensors, metadata=meta))
        write_json_atomic(path / CONFIG_FILE, self.cfg.to_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None) -> Crosscoder:
        """Load a checkpoint directory written by `save_pretrained` (or a training run's folder)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not (cfg_path.is_file() and weights_path.is_file()):
            raise CrossdiffError(
                f"no crosscoder checkpoint at {path} (expected {CONFIG_FILE} and {WEIGHTS_FILE})"
            )
        try:
            cfg = CrosscoderConfig.from_dict(json.loads(cfg_path.read_text()))
            tensors = load_file(str(weights_path), device="cpu")
        except (CrossdiffError, ValueError, TypeError, AttributeError, OSError, SafetensorError) as e:
            raise CrossdiffError(f"cannot read the checkpoint at {path}: {str(e).splitlines()[0]}") from e
        model = cls(cfg, dec_init_norm=0.0)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != got:
            raise CrossdiffError(
                f"the checkpoint at {path} is corrupt: its tensors {got} do not match "
                f"{CONFIG_FILE} (expected {expected})"
            )
        bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:  # damaged bytes, or saved from a diverged run: every later symptom would mislead
            raise CrossdiffError(
                f"the checkpoint at {path} holds non-finite values in {', '.join(sorted(bad))}; it is "
                "damaged: delete it (a training run then restarts) or restore it"
            )
        model.load_state_dict(tensors)
        return model.to(device) if device is not None else model
