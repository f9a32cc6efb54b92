"""`crossdiff verify`: behavioural verification of exclusive candidates (docs/verification.md).

A difference between two models is what a feature *does*, not whether the other model can detect its
context (docs/design.md §5). For a candidate of A (B is the mirror image), on held-out contexts where
it fires strongly (f ≥ strong · p99), both models score the same following characters — from the
firing token's end c0 to the `ahead`-th aligned boundary after it, c1 — each with its own tokenizer:

    ℓ_A,k, ℓ_B,k   log p of segment k's characters under A and under B (nats), the segments being
                   the characters between consecutive aligned ends in (c0, c1] (each ends a token in
                   both tokenisations, so both sums cover exactly those characters)
    ℓ_A,k⁻         the same under A with the latent's contribution removed at the layer: h − f_t · d_A
                   at every aligned position t of the context (raw units; inputs/variants.py's hook)
    ℓ_A,k^r        the same with ‖f_t · d_A‖ · r removed instead, r a random unit direction (19 per
                   context, drawn afresh for each)

With the gaps g_k = ℓ_A,k − ℓ_B,k, a context's shift towards B is Σ_k (|g_k| − |g_k⁻|) / (scored tokens
of A): it is positive when the ablation brings A closer to B and can never be positive where A and B
agree (a self-diff). Per latent:

    shift       mean over contexts, nats per token
    z           (shift − mean of the null) / its standard deviation, the null being the R random
                shifts, each averaged over the same contexts
    gap_closed  Σ(|g_k| − |g_k⁻|) / Σ|g_k| over the contexts

Verdicts: `difference` (shift ≥ min_shift, z ≥ z against random directions and z_dictionary ≥ z against
directions the dictionary uses), `shared behaviour` (the mirror image: removing it moves A away from B),
`inert` (neither), `too rare` (fewer than min_contexts usable strong firings, held-out and in fresh text:
scan.py), `not verified` (beyond the `top` exact ablations per model, ordered so that these are the
least promising). Every budget counts work (tokens, contexts, ablations), never seconds.

Before the exact ablations, one pass over held-out text ranks every candidate by a first-order
estimate (gradient × activation: one backward per text gives every latent's estimate) and measures the
whole-diff figure: the share of the per-segment A–B gap that A's exclusive candidates account for (A's
layer spliced with its reconstruction, with and without them).

Writes RUN/verification/: behaviour.csv (one row per candidate), latents/<i>.json (the contexts of
each exactly verified latent), summary.json (counts, whole-diff share, first-order agreement); written
last, so its presence means complete. A rerun with the same settings resumes latent by latent.

Legend: T positions, D width, P kept aligned pairs, F latents, C candidates, R copies, S scored tokens,
K segments.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.config import fingerprint, settings, where
from ..core.errors import CrossdiffError
from ..core.fsutil import jsonable, write_json_atomic
from ..core.lock import writes
from ..core.manifest import StageKey, begin
from .ablation import (
    Candidate,
    alive_mask,
    candidates,
    dictionary_directions,
    heldout_contexts,
    strong_rows,
    verify_latent,
    with_dictionary_null,
)
from .answerlink import answer_sources, link_priority, ngram_contexts, ngram_groups, read_linked
from .heldout import heldout_pass
from .results import BEHAVIOUR, open_analysed, write_stage

METHOD = 4
"""Version of the measure (2: per-segment gaps, fresh random directions per context; 3: and the
dictionary null of each difference; 4: the verdict needs both nulls, rare candidates get contexts from
fresh text, budgets in work units); in the fingerprint."""
LINK_RULES = 3
"""How the latents linked to the answers are verified (1: beside the others, within --top; 2: their own
budget --top-linked, ablated with their link group, within an n-gram the latent with most contexts
first; 3: one candidate per linked n-gram, its group led by its first latent, scored on the n-gram's
own occurrences in the answers); in the fingerprint of a run that has them."""
VERDICTS = ("difference", "shared behaviour", "inert", "too rare", "not verified")
COLUMNS = ("latent", *BEHAVIOUR.columns)


@dataclass(frozen=True)
class VerifyConfig:
    """Which run to verify and how (docs/verification.md)."""

    run: str = where()
    """Training run folder, analysed (RUN/analysis/latents.csv); writes RUN/verification/."""
    store: str | None = where(None)
    """Paired-activation store (default: the one the analysis used)."""
    device: str = where("auto")
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    strong: float = 0.3
    """A strong firing: f >= strong × the latent's p99 activation (docs/verification.md)."""
    n_contexts: int = 16
    """Held-out strong firings scored per latent (the strongest, at most one per chunk)."""
    min_contexts: int = 4
    """Fewer usable strong held-out firings than this: `too rare`."""
    n_random: int = 19
    """Random directions of the decoder row's norm ablated on the same contexts: the null."""
    z: float = 3.0
    """|z| needed for `difference` / `shared behaviour`, against random directions and against the
    dictionary's directions (docs/verification.md, "The verdict's null")."""
    min_shift: float = 0.01
    """|shift| (nats per token) needed besides z: smaller effects are `inert`."""
    ahead: int = 4
    """Aligned boundaries after the firing token whose characters are scored."""
    prefix_chars: int = 256
    """Characters of the chunk kept before the firing token."""
    heldout_tokens: int = 2048
    """Held-out aligned tokens for the first-order ranking and the whole-diff share (0: skip)."""
    top: int | None = None
    """Exact ablations for at most N candidates per model, the most promising first (default: all)."""
    top_linked: int | None = 4
    """Exact ablations, besides --top, for at most N per model of the latents that only the answers
    stage's link made candidates: those of the n-gram that most sets the model's answers apart first
    (docs/verification.md; default: all)."""
    link_groups: bool = True
    """The latents linked to one n-gram in one model are one candidate, removed together on the n-gram's
    lead-up where the model says it (docs/verification.md); off: each linked latent alone, on its own
    strongest firings, with its duplicates."""
    scan_tokens: int = 50_000
    """Aligned tokens of fresh text (the corpus beyond the harvest) scanned for the strong firings of
    candidates with fewer than --n-contexts held-out ones (0: no scan; docs/verification.md)."""
    warn_seconds: float | None = None
    """Warn when verification takes longer than this; time never changes a verdict."""
    seed: int = 0
    """Seed of the random null directions."""
    duplicate_cosine: float = 0.9
    """Alive latents whose decoder row in the candidate's model has at least this cosine with the
    candidate's are ablated with it: a concept that several duplicate latents carry (1: the candidate alone)."""

    def __post_init__(self):
        checks = [
            (0 < self.strong <= 1, f"--strong must be in (0, 1], got {self.strong}"),
            (self.n_contexts >= 1, "--n-contexts must be at least 1"),
            (1 <= self.min_contexts <= self.n_contexts, "need 1 <= --min-contexts <= --n-contexts"),
            (self.n_random >= 3, f"--n-random must be at least 3 for a null, got {self.n_random}"),
            (self.z > 0 and self.min_shift >= 0, "--z must be positive and --min-shift >= 0"),
            (self.ahead >= 1 and self.prefix_chars >= 0, "--ahead must be >= 1, --prefix-chars >= 0"),
            (self.heldout_tokens >= 0, "--heldout-tokens must be >= 0"),
            (self.top is None or self.top >= 0, "--top must be >= 0"),
            (self.top_linked is None or self.top_linked >= 0, "--top-linked must be >= 0"),
            (self.scan_tokens >= 0, "--scan-tokens must be >= 0"),
            (0 < self.duplicate_cosine <= 1, "--duplicate-cosine must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise CrossdiffError(message)


# ----------------------------------------------------------------------------- candidates


# ----------------------------------------------------------------------------- orchestration


@writes(lambda cfg: Path(cfg.run) / "verification", record="tree")
def verify(cfg: VerifyConfig) -> dict:
    """Verify (or finish verifying) the run's candidates; returns summary.json's content."""
    from ..core.runtime import apply_cpu_policy, resolve_device
    from ..inputs.variants import sides_for_store

    run, cc, store, table = _open(cfg)
    out = run / "verification"
    key = stage_key(cfg, run, store)
    # Results of another key are cleared; the fresh-text scan is kept (reused when it depends on nothing
    # that changed: scan.scan checks its key), and so are the finished latents (_exact reuses those of
    # this run's measure key and removes the others).
    if begin(out, key, ("behaviour.csv", "summary.json"), command="verify", keep=("scan.json", "latents")):
        print(f"{out} is already complete; nothing to do. Results: {out / 'summary.json'}")
        return json.loads((out / "summary.json").read_text())
    # The config as run, for predictions.py (which keys its cache to the fingerprint); not a skip record.
    write_json_atomic(out / "settings.json", {"fingerprint": key.fingerprint, "settings": asdict(cfg)})
    device = resolve_device(cfg.device)
    apply_cpu_policy()  # once per process (crossdiff/core/runtime.py)
    cc = cc.to(device).eval().requires_grad_(False)
    linked, groups, by_ngram = _linked(run, cfg)
    cands = candidates(cc, table, cfg.duplicate_cosine, linked, groups)
    factor = store.outlier_factor
    start = time.perf_counter()  # reported, and warns; it decides nothing
    sides = sides_for_store(store, device=str(device))
    strong = strong_rows(cc, store, cands, cfg, device)
    held = _cached(out / "heldout.json", lambda: heldout_pass(sides, cc, store, cands, cfg, factor))
    first = {int(k): v for k, v in held["first_order"].items()}
    contexts, fresh = gather_contexts(sides, cc, store, cands, strong, cfg, factor, out, by_ngram)
    fired = {int(k): v for k, v in held.get("fired", {}).items()}
    priority = {j: v for j, v in link_priority(run).items() if j in linked}
    order = ablation_order(cands, first, fired, contexts, cfg.min_contexts, priority)
    results = _exact(sides, cc, store, order, contexts, cfg, factor, out, alive_mask(cc, table), priority,
                     measure_key(cfg, key))  # fmt: skip
    rows = [_row(c, strong.get(c.latent, {}), fresh, first.get(c.latent, math.nan), results.get(c.latent), cfg,
                 len(contexts.get(c.latent, []))) for c in cands]  # fmt: skip
    write_stage(run, BEHAVIOUR, {r["latent"]: {k: _fmt(r[k]) for k in COLUMNS} for r in rows})
    seconds = time.perf_counter() - start
    # JSON has no NaN: undefined figures (a correlation of fewer than 3 points) are null.
    summary = jsonable(_summary(rows, results, held, cfg, seconds, fresh.state if fresh else None))
    write_json_atomic(out / "summary.json", summary)
    print(summary_line(summary))
    if cfg.warn_seconds is not None and seconds > cfg.warn_seconds:
        print(
            f"verify: warning: took {seconds:.0f} s (> {cfg.warn_seconds:.0f} s); the verdicts do not depend on it"
        )
    return summary


def _linked(run: Path, cfg: VerifyConfig) -> tuple[dict, dict | None, dict]:
    """(latent -> side of the linked latents that are candidates, their groups or None, leader -> its
    n-gram group (answerlink.ngram_groups) when each n-gram's group is one candidate)."""
    if not cfg.link_groups:
        return read_linked(run), None, {}
    by_ngram = ngram_groups(run)
    linked = {j: g["side"] for j, g in by_ngram.items()}
    return linked, {j: g["members"] for j, g in by_ngram.items()}, by_ngram


def gather_contexts(
    sides, cc, store, cands, strong: dict, cfg: VerifyConfig, factor: float, out: Path, by_ngram=None
):
    """({latent: its contexts, held-out first, then fresh ones from the scan}, the scan or None). A
    linked n-gram's group (`by_ngram`: leader -> answerlink.ngram_groups entry) gets the n-gram's own
    occurrences in its model's answers instead."""
    from .scan import scan

    by_ngram = by_ngram or {}
    sources = answer_sources(cfg.run) if by_ngram else {}
    held = {
        c.latent: ngram_contexts(store, sources, c.side, by_ngram[c.latent]["ngram"], cfg.n_contexts)
        if c.latent in by_ngram
        else heldout_contexts(store, strong.get(c.latent, {}).get("rows", []))
        for c in cands
    }
    wanted = {
        c: cfg.n_contexts - len(held[c.latent])
        for c in cands
        if len(held[c.latent]) < cfg.n_contexts and c.latent not in by_ngram
    }
    if not wanted:
        return held, None
    fresh = scan(
        sides, cc, store, wanted, cfg, factor, out / "scan.json", key=_inputs_key(Path(cfg.run), store)
    )
    return {j: rows + fresh.contexts(j) for j, rows in held.items()}, fresh


def ablation_order(
    cands: list[Candidate],
    first: dict,
    fired: dict,
    contexts: dict,
    min_contexts: int = 1,
    linked: dict[int, tuple] | None = None,
) -> list[Candidate]:
    """Candidates with at least `min_contexts` contexts (fewer: `too rare`, not scored), the most
    promising first, so that `not verified` (beyond --top) are the least: a positive first-order
    estimate (predicted to move its model towards the other), largest first; then the latents the
    first-order pass could not judge (no firing in its held-out text), most strong contexts first; then
    the negative estimates, closest to 0 first. The latents that only the answer link made candidates
    (`linked`: latent -> answerlink.link_priority) follow, in their own order."""
    linked = linked or {}

    def key(c: Candidate):
        est = first.get(c.latent, math.nan)
        n = len(contexts.get(c.latent, []))
        if fired.get(c.latent, 1) == 0 or not math.isfinite(est):
            return (1, -n, c.latent)
        return (0 if est > 0 else 2, -est, c.latent)

    usable = [c for c in cands if len(contexts.get(c.latent, [])) >= min_contexts]
    ranked = sorted((c for c in usable if c.latent not in linked), key=key)
    return ranked + _linked_order([c for c in usable if c.latent in linked], linked, contexts)


def _linked_order(cands: list[Candidate], linked: dict[int, tuple], contexts: dict) -> list[Candidate]:
    """The linked latents in link_priority's order, except that within an n-gram the latents with
    the most scorable contexts come first: each is ablated with its whole link group, so the group is
    measured where one of its members fires most often (its first latent by coverage and lift may
    have too few strong firings to be scored at all)."""
    by_ngram: dict[tuple, list[Candidate]] = {}
    for c in cands:
        by_ngram.setdefault((c.side, linked[c.latent][2]), []).append(c)
    keyed = []
    for members in by_ngram.values():
        members.sort(key=lambda c: (-len(contexts.get(c.latent, [])), linked[c.latent]))
        keyed += [((i, *linked[c.latent][1:]), c) for i, c in enumerate(members)]
    return [c for _, c in sorted(keyed, key=lambda t: t[0])]


BUDGETS = ("top", "top_linked", "warn_seconds")
"""Settings that say how much to measure, not how: a rerun that changes only these reuses every latent
already measured (`measure_key`), so `--top N` after a smaller N adds ablations instead of redoing them."""


def measure_key(cfg: VerifyConfig, key: StageKey) -> str:
    """What one latent's exact result depends on: every setting but the budgets, and the stage key's
    inputs (the store, checkpoint and analysis, the linked latents) with the rules that group them."""
    kept = {k: v for k, v in settings(cfg).items() if k not in BUDGETS}
    return fingerprint([kept, key.inputs, LINK_RULES])


def _exact(
    sides, cc, store, order, contexts: dict, cfg, factor, out: Path, alive_F, linked=None, measure=None
) -> dict:
    """Exact ablations in `order`, at most `top` per side of the analysis's candidates and at most
    `top_linked` per side of the latents only the answer link added (`linked`; too rare ones count
    against neither), each judged against random directions and then, when the random null calls it a
    difference or shared behaviour, against the dictionary's directions (both decide the verdict). A
    latent's file from a run with the same `measure` key (other budgets) is reused, not measured again."""
    from tqdm.auto import tqdm

    linked = linked or {}
    done, spent = {}, {}
    for c in tqdm(order, desc="verify", unit="latent", dynamic_ncols=True):
        budget = (c.side, c.latent in linked)
        limit = cfg.top_linked if c.latent in linked else cfg.top
        if limit is not None and spent.get(budget, 0) >= limit:
            continue
        path = out / "latents" / f"{c.latent}.json"
        reuse = json.loads(path.read_text()) if path.is_file() else None
        if reuse is not None and reuse.get("measure") == measure:
            done[c.latent] = reuse
        else:
            rows = contexts[c.latent][: cfg.n_contexts]
            res = {"latent": c.latent, "side": c.side, "group": list(c.members), "linked": c.latent in linked,
                   "measure": measure}  # fmt: skip
            res.update(verify_latent(sides, cc, store, c, rows, cfg, factor))
            if res["verdict"] in ("difference", "shared behaviour"):
                ND = dictionary_directions(cc, c, alive_F)
                res = with_dictionary_null(sides, cc, store, c, rows, cfg, factor, ND, res)
            done[c.latent] = jsonable(res)
            write_json_atomic(path, done[c.latent])
        if done[c.latent]["verdict"] != "too rare":
            spent[budget] = spent.get(budget, 0) + 1
    for path in (out / "latents").glob("*.json") if (out / "latents").is_dir() else ():
        if path.stem not in {str(j) for j in done}:  # another measure's, or beyond this budget
            path.unlink()
    return done


def _row(
    c: Candidate, strong: dict, fresh, first: float, res: dict | None, cfg: VerifyConfig, n_ctx: int
) -> dict:
    row = {k: math.nan for k in COLUMNS}
    n_fresh = fresh.state["n_strong"].get(str(c.latent), 0) if fresh else 0
    row.update(
        latent=c.latent,
        side=c.side,
        n_strong=strong.get("n", 0) + n_fresh,
        n_fresh=n_fresh,
        first_order=first,
        n_group=len(c.members),
    )
    if res is not None:
        row.update({k: res[k] for k in COLUMNS if k in res})
    else:
        row["verdict"] = "too rare" if n_ctx < cfg.min_contexts else "not verified"
    return row


def _open(cfg: VerifyConfig):
    """(run, crosscoder, store, the analysis's latents table) of a run whose models can be loaded."""
    run, cc, store, table, _ = open_analysed(cfg.run, cfg.store)
    if not (store.root / "tokenizers").is_dir() or store.meta.get("corpus") == "synthetic":
        raise CrossdiffError(f"{store.root} is a synthetic store: there are no models to verify behaviour on")
    return run, cc, store, table


def stage_settings(cfg: VerifyConfig, answer_links: bool) -> dict:
    """What verification's results depend on besides its inputs: its settings, the candidate rules',
    the method's and (with latents linked to answers) the link rules' versions (its manifest records
    them; `crossdiff diff` and `calibrate` record the same for their stage)."""
    from .analyze import RULES_VERSION

    links = {"answer_links": LINK_RULES} if answer_links else {}
    return {**settings(cfg), "rules": RULES_VERSION, "method": METHOD, **links}


def stage_key(cfg: VerifyConfig, run: Path, store) -> StageKey:
    """The key (crossdiff.core.manifest): the settings, the store, the checkpoint's and analysis's bytes
    (not where they are) and the linked latents; the fingerprint an older crossdiff recorded for the
    same in settings.json is accepted."""
    linked = sorted(read_linked(run).items())  # the latents the answers stage adds (answerlink.py)
    inputs = _inputs_key(run, store)
    older = fingerprint([settings(cfg), inputs] + ([LINK_RULES, linked] if linked else []))
    return StageKey(stage_settings(cfg, bool(linked)), [inputs, linked], accept=(older,))


def _inputs_key(run: Path, store) -> str:
    """The method, the store and the checkpoint's and analysis's bytes: what the fresh-text scan reads
    through, whatever the verification's own settings."""
    weights = (run / "crosscoder.safetensors").read_bytes()
    latents = (run / "analysis" / "latents.csv").read_bytes()  # the candidates and their p99
    return fingerprint([METHOD, store.meta, hashlib.sha1(weights + latents).hexdigest()])


def _cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    result = jsonable(compute())
    write_json_atomic(path, result)
    return result


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _summary(
    rows: list[dict], results: dict, held: dict, cfg: VerifyConfig, seconds: float, scan=None
) -> dict:
    counts = {m: {v: sum(r["side"] == m and r["verdict"] == v for r in rows) for v in VERDICTS} for m in "ab"}
    pairs = [(c["first_order"], c["shift"]) for r in results.values() for c in r.get("contexts", [])]
    latent_pairs = [
        (r["first_order"], r["shift"])
        for r in rows
        if math.isfinite(r["first_order"]) and math.isfinite(r["shift"])
    ]
    ranked = sorted((r for r in rows if r["verdict"] == "difference"), key=lambda r: -r["gap_closed"])
    return {
        "candidates": {m: sum(r["side"] == m for r in rows) for m in "ab"},
        "counts": counts,
        "differences": [
            {k: r[k] for k in ("latent", "side", "shift", "z", "z_dictionary", "gap_closed", "n_contexts")}
            for r in ranked
        ],
        "work": {  # the budgets' units: what was done, the same on any machine
            "exact_ablations": len(results),
            "exact_ablations_linked": sum(r.get("linked", False) for r in results.values()),
            "contexts_scored": sum(len(r.get("contexts", [])) for r in results.values()),
            "scan_tokens": scan["tokens"] if scan else 0,
            "scan_stopped": scan["stopped"] if scan else "not needed",
        },
        "whole": held["whole"],
        "first_order_agreement": {
            "contexts": len(pairs),
            "pearson_contexts": _corr(pairs),
            "latents": len(latent_pairs),
            "spearman_latents_heldout_vs_exact": _corr(latent_pairs, rank=True),
        },
        "settings": asdict(cfg),
        "seconds": round(seconds, 1),
    }


def _corr(pairs: list[tuple], rank: bool = False) -> float:
    if len(pairs) < 3:
        return math.nan
    x, y = (np.asarray(v, dtype=np.float64) for v in zip(*pairs))
    if rank:
        x, y = (np.argsort(np.argsort(v)).astype(np.float64) for v in (x, y))
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def summary_line(s: dict) -> str:
    parts = []
    for m in "ab":
        c = s["counts"][m]
        parts.append(
            f"{m.upper()}: {s['candidates'][m]} candidates, {c['difference']} difference, "
            f"{c['shared behaviour']} shared behaviour, {c['inert']} inert, {c['too rare']} too rare, "
            f"{c['not verified']} not verified"
        )
    whole = s["whole"]
    share = ", ".join(
        f"{m.upper()} {'n/a' if whole[m]['share'] is None else format(whole[m]['share'], '.3f')}"
        for m in "ab"
        if m in whole
    )
    return "verify: " + "; ".join(parts) + f"; share of the gap explained by the candidates: {share}"
