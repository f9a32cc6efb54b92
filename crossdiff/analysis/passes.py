"""The analysis's streaming passes over the store (crossdiff/analysis/analyze.py orchestrates them):
the functional share on held-out rows, then one pass gathering every per-latent statistic (FirstPass:
density, activation quantiles, top-k examples, histograms, held-out FVE, probe sums, Latent Scaling
sums) and the pass result (PassResult) the analysis caches as pass.pt. Memory is bounded by the batch, not the store.
`cfg` and `plan` are analyze's AnalyzeConfig and Plan (not imported: analyze imports its passes).

Legend: B rows of a batch, F latents, N firing entries, D one model's width.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ..coder.fve import FVE
from .evidence import (
    Histogram,
    TopK,
    decoder_rows,
)
from .probes import LatentScaling, ProbeEval, RidgeProbe


@torch.inference_mode()
def heldout_share(cc, store, cfg, device) -> np.ndarray:
    """Functional share (crossdiff.coder.functional) of every latent: on the held-out rows when it fires
    there at least min_heldout_fires times, else on every row it fires on, training rows included
    (NaN only where it never fires or helps neither model). A rare latent is still a candidate:
    a concept learned from 0.04% of the tokens may fire on no held-out row (docs/analysis.md), and
    verification finds it contexts in fresh text (analysis/scan.py). It decides candidates, whose
    probes the first pass fits, so it is measured before that pass."""
    from ..coder.functional import FunctionalShare

    held, every = FunctionalShare(cc, device), FunctionalShare(cc, device)
    for rows, held_B in _batches(store, cfg, heldout_only=False):
        x_a, x_b = (x.to(device) for x in store.get(rows))
        f_BF = cc.encode(x_a, x_b)
        every.update(x_a, x_b, f_BF)
        if held_B.any():
            h = torch.as_tensor(held_B, device=f_BF.device)
            held.update(x_a[h], x_b[h], f_BF[h])
    share_F = held.share_b(cfg.min_heldout_fires)
    return np.where(np.isfinite(share_F), share_F, every.share_b(1))


def _batches(store, cfg, heldout_only: bool):
    """The analysed rows in batches (Store.row_batches): the first --max-tokens rows of the store."""
    return store.row_batches(cfg.batch_size, cfg.max_tokens, heldout_only)


class FirstPass:
    """Everything gathered in the one pass over every analysed row."""

    def __init__(self, cc, plan, cfg, device):
        n_f = cc.cfg.n_latents
        self.cc, self.plan, self.device = cc, plan, device
        self.n = self.n_held = self.active = 0
        self.n_fire_F = torch.zeros(n_f, dtype=torch.int64, device=device)
        self.held_fire_F = torch.zeros(n_f, dtype=torch.int64, device=device)
        self.sum_F = torch.zeros(n_f, dtype=torch.float64, device=device)
        self.sumsq_F = torch.zeros(n_f, dtype=torch.float64, device=device)
        self.max_F = torch.zeros(n_f, device=device)
        self.topk = TopK(n_f, cfg.top_k, device)
        self.hist = Histogram(n_f, cfg.hist_bins, cfg.hist_min, cfg.hist_max, device)
        self.probe_b = RidgeProbe(cc.cfg.d_b, len(plan.probe_from_b))
        self.probe_a = RidgeProbe(cc.cfg.d_a, len(plan.probe_from_a))
        self.ids_b = torch.as_tensor(plan.probe_from_b, device=device)
        self.ids_a = torch.as_tensor(plan.probe_from_a, device=device)
        self.fve = {m: FVE() for m in "ab"}
        self.scaling = _latent_scaling(cc, plan, device) if plan.same_space else None

    def update(self, rows_B, held_B, x_a, x_b, f_BF) -> None:
        # Statistics from the firing (row, latent) entries only: f is sparse (L0 of k in F).
        rows_N, cols_N = f_BF.nonzero(as_tuple=True)
        vals_N = f_BF[rows_N, cols_N]
        n_f = f_BF.shape[1]
        self.n += f_BF.shape[0]
        self.active += len(vals_N)
        self.n_fire_F += torch.bincount(cols_N, minlength=n_f)
        self.held_fire_F += torch.bincount(cols_N[held_B[rows_N]], minlength=n_f)
        self.sum_F.index_add_(0, cols_N, vals_N.double())
        self.sumsq_F.index_add_(0, cols_N, vals_N.double().pow(2))
        batch_max_F = torch.zeros_like(self.max_F).scatter_reduce_(0, cols_N, vals_N.float(), "amax")
        self.max_F = torch.maximum(self.max_F, batch_max_F)
        self.topk.update(f_BF, rows_B, batch_max_F)
        self.hist.update_entries(cols_N, vals_N)
        train_B = ~held_B
        self.probe_b.update(x_b[train_B], f_BF[:, self.ids_b][train_B])
        self.probe_a.update(x_a[train_B], f_BF[:, self.ids_a][train_B])
        if self.scaling is not None:  # needs every row's residual
            hat_a, hat_b = self.cc.decode(f_BF)
            ids = self.scaling_ids
            self.scaling.update(f_BF[:, ids], x_a - hat_a, x_b - hat_b)
            hat_a, hat_b = hat_a[held_B], hat_b[held_B]
        elif bool(held_B.any()):
            hat_a, hat_b = self.cc.decode(f_BF[held_B])
        else:
            return
        self.n_held += int(held_B.sum())
        for m, x, hat in (("a", x_a[held_B], hat_a), ("b", x_b[held_B], hat_b)):
            self.fve[m].add(x, hat)

    @property
    def scaling_ids(self) -> torch.Tensor:
        return torch.cat([self.ids_b, self.ids_a])

    def fve_l0(self) -> tuple[float, float, float]:
        return self.fve["a"].value(), self.fve["b"].value(), self.active / max(self.n, 1)


def _latent_scaling(cc, plan, device) -> LatentScaling:
    """Accumulator for the probed latents (A-side ids then B-side ids, as FirstPass.scaling_ids)."""
    ids = np.concatenate([plan.probe_from_b, plan.probe_from_a])
    own_is_a = torch.as_tensor(plan.rel_norm[ids] < 0.5)
    dec_a, dec_b = decoder_rows(cc, ids, "a"), decoder_rows(cc, ids, "b")
    own = torch.where(own_is_a[:, None], dec_a, dec_b)
    u = own / own.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return LatentScaling(u.to(device), dec_a.to(device), dec_b.to(device), own_is_a)


@torch.inference_mode()
def run_passes(cc, store, plan, cfg, device) -> PassResult:
    """Pass 1 over every analysed row, then pass 2 over held-out rows to score the probes."""
    from tqdm.auto import tqdm

    first = FirstPass(cc, plan, cfg, device)
    total = min(cfg.max_tokens or store.n_tokens, store.n_tokens)
    with tqdm(total=total, unit="tok", desc="analyse", dynamic_ncols=True, mininterval=1.0) as bar:
        for rows, held in _batches(store, cfg, heldout_only=False):
            x_a, x_b = (x.to(device) for x in store.get(rows))
            f_BF = cc.encode(x_a, x_b)
            first.update(torch.as_tensor(rows), torch.as_tensor(held, device=device), x_a, x_b, f_BF)
            bar.update(len(rows))
    evals = {}
    p99_F = torch.as_tensor(first.hist.quantile(0.99), dtype=torch.float32)
    for key, probe, ids in (("b", first.probe_b, plan.probe_from_b), ("a", first.probe_a, plan.probe_from_a)):
        if probe.n_targets and probe.n:
            W, b = probe.solve(cfg.ridge)
            strong = cfg.strong * torch.nan_to_num(p99_F[torch.as_tensor(ids, dtype=torch.long)])
            evals[key] = ProbeEval(W, b, *probe.prediction_spread(W), strong_C=strong).to(device)
    for rows, _ in _batches(store, cfg, heldout_only=True):
        x_a, x_b = (x.to(device) for x in store.get(rows))
        f_BF = cc.encode(x_a, x_b)
        for key, x_other, ids in (("b", x_b, first.ids_b), ("a", x_a, first.ids_a)):
            if key in evals:
                evals[key].update(x_other, f_BF[:, ids])
    return _pass_result(first, plan, evals, cc, store)


@dataclass(frozen=True)
class PassResult:
    """What the passes gathered over the analysed rows (F latents, K top examples, H histogram bins).
    Cached as pass.pt (`as_dict`, its arrays as tensors; fields in this order)."""

    n_fire_F: np.ndarray
    """Firings of each latent."""
    held_fire_F: np.ndarray
    """Firings on held-out rows."""
    sum_F: np.ndarray
    """Sum of each latent's activations (float64)."""
    sumsq_F: np.ndarray
    """Sum of their squares (float64)."""
    max_F: np.ndarray
    """Largest activation."""
    n_tokens: int
    """Rows analysed."""
    n_heldout: int
    """Held-out rows among them."""
    top_values_KF: np.ndarray
    """The K largest activations of each latent (descending; 0 where fewer fired)."""
    top_rows_KF: np.ndarray
    """Their store rows (-1 where none)."""
    hist_counts_FH: np.ndarray
    """Log-spaced activation histogram of each latent."""
    hist_edges: np.ndarray
    """The histogram's H + 1 edges (normalised units)."""
    p99_F: np.ndarray
    """99th-percentile activation from the histogram."""
    r2_F: np.ndarray
    """Held-out R² of the probe of each probed latent's strong firings (NaN elsewhere)."""
    auroc_F: np.ndarray
    """Held-out AUROC of the same probes (NaN elsewhere)."""
    latent_scaling_F: np.ndarray
    """Latent Scaling of each probed latent in a shared activation space (NaN elsewhere)."""
    fve_a: float
    """Held-out fraction of variance explained, model A."""
    fve_b: float
    """Model B's."""
    l0: float
    """Mean firing latents per row."""

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict) -> PassResult:
        """From pass.pt's result (any crossdiff that wrote these keys)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


def _pass_result(first: FirstPass, plan, evals: dict, cc, store) -> PassResult:
    n_f = len(plan.side)
    r2, auc = np.full(n_f, np.nan), np.full(n_f, np.nan)
    for key, ids in (("b", plan.probe_from_b), ("a", plan.probe_from_a)):
        if key in evals:
            r2[ids], auc[ids], _ = evals[key].result()
    scaling = np.full(n_f, np.nan)
    if first.scaling is not None:
        ids = np.concatenate([plan.probe_from_b, plan.probe_from_a])
        scaling[ids] = first.scaling.result(store.scale_a, store.scale_b)
    fve_a, fve_b, l0 = first.fve_l0()
    cpu = {
        k: getattr(first, k).cpu().numpy() for k in ("n_fire_F", "held_fire_F", "sum_F", "sumsq_F", "max_F")
    }
    return PassResult(
        **cpu,
        n_tokens=first.n,
        n_heldout=first.n_held,
        top_values_KF=first.topk.values_KF.cpu().numpy(),
        top_rows_KF=first.topk.rows_KF.cpu().numpy(),
        hist_counts_FH=first.hist.counts_FH.cpu().numpy(),
        hist_edges=first.hist.edges_H1.numpy(),
        p99_F=first.hist.quantile(0.99),
        r2_F=r2,
        auroc_F=auc,
        latent_scaling_F=scaling,
        fve_a=fve_a,
        fve_b=fve_b,
        l0=l0,
    )
