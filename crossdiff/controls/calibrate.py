"""`crossdiff calibrate`: positive and negative controls that make "we found X" and "we found nothing"
trustworthy (docs/calibration.md), at the default settings of every stage.

    positive   plant a known concept in model A (derive.py: a fixed random direction at the layer's
               typical norm, added on the tokens of a word list; and a second one on pseudo-random
               tokens no model can detect), run train + analyse + verify on the planted A against B.
               Pass: an A-exclusive candidate recovers it (decoder cosine with the planted direction
               >= 0.9, at least half its top examples on the planted tokens) and behavioural
               verification (verify.py, on the real model A with the plant's hook) calls it a
               `difference`
    negative   diff A against itself and against a rotated copy of A (a rotation at the layer and its
               inverse right after: identical behaviour); every `difference` there is a false positive

Each control runs for the DFC and for the standard BatchTopK crosscoder, at the budget's size
(budget.py). Folder convention shared with `crossdiff diff`: DIR/store is the base store (reused when
complete, else harvested); this command writes

    DIR/calibration/manifest.json       words, seed, budget and base store (a rerun with others is refused)
    DIR/calibration/stores/<control>/   the derived stores (planted, self, rotated)
    DIR/calibration/<control>-<arch>/   training runs, each with its analysis/ and verification/
    DIR/calibration/stages.json         finished stages with their times (a rerun skips them)
    DIR/calibration.json                the results (schema in docs/calibration.md); written last

and regenerates DIR/run/report when DIR/run has been analysed, so the report shows the calibration.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..analysis.results import read_latents
from ..budget import (
    Budget,
    analyze_config,
    budget_help,
    get_budget,
    harvest_config,
    train_config,
    verify_config,
)
from ..core import runfolder
from ..core.config import help_from, settings, where
from ..core.errors import CrossdiffError
from ..core.fsutil import write_json_atomic
from ..core.lock import writes
from ..core.manifest import StageKey, begin
from ..core.stages import Stage, StageLog, run_stages
from ..inputs.models import DEFAULT_MODEL_A, DEFAULT_MODEL_B

ARCHS = ("dfc", "batchtopk")
CONTROLS = ("planted", "random", "self", "rotated")
COSINE_MIN = 0.9
"""A latent recovers the planted direction when its A decoder row has at least this cosine with it..."""
TOP_ON_WORDS_MIN = 0.5
"""...and at least this fraction of its top examples are planted rows; then it must verify as a `difference`."""

# Common concrete nouns, frequent in Brown (~0.8% of its tokens): enough planted rows for the held-out
# split to reach the verification's minimum number of firings at the small budget.
DEFAULT_WORDS = tuple(
    (
        "house home water car door room table street road city church school money book paper river "
        "dog floor wall fire food hand hands head eyes face wife mother father boy girl man men woman "
        "women children land office body ground"
    ).split()
)


@dataclass(frozen=True)
class CalibrateConfig:
    """Which diff folder to calibrate, which concept to plant, how much compute (docs/calibration.md)."""

    out: str = where()
    """Diff folder DIR (as for crossdiff diff): reuses DIR/store when complete, else harvests it there; writes DIR/calibration/ and DIR/calibration.json."""
    words: str | None = None
    """File of words to plant the concept on, one per line (# starts a comment). Default: 40 common concrete nouns."""
    model: str | None = None
    """Model A for a new harvest (default smollm2-135m); when DIR/store exists it must be the store's model A."""
    model_b: str | None = None
    """Model B for a new harvest (default gemma3-270m); when DIR/store exists it must be the store's model B."""
    corpus: str = "brown"
    """Text source of a new harvest: brown, a .txt file or folder, jsonl:PATH:FIELD, or hf:NAME[:CONFIG][:SPLIT]."""
    budget: Literal["small", "medium", "large"] = help_from("small", budget_help)
    """Compute budget of every stage (crossdiff/budget.py)."""
    archs: tuple[str, ...] = ARCHS
    """Crosscoders to calibrate: dfc (the method crossdiff diff uses) and/or batchtopk (the standard crosscoder)."""
    seed: int = 0
    """Seed of the planted direction, the rotation and the training runs."""
    dec_init_norm: float | None = None
    """Decoder-row norm at initialisation for the six trainings (default: the trainer's, 0.1)."""
    device: str = where("auto")
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    overwrite: bool = where(False)
    """Replace a calibration in DIR made with other settings (words, seed, budget or base store)."""

    def __post_init__(self):
        if (
            not self.archs
            or any(a not in ARCHS for a in self.archs)
            or len(set(self.archs)) != len(self.archs)
        ):
            raise CrossdiffError(
                f"--archs takes one or both of {' '.join(ARCHS)}, got {' '.join(self.archs)}"
            )


# ----------------------------------------------------------------------------- inputs


def read_words(path: str | None) -> tuple[str, ...]:
    """The word list: the file's non-empty, non-comment lines (deduplicated, case-insensitively)."""
    if path is None:
        return DEFAULT_WORDS
    p = Path(path)
    if not p.is_file():
        raise CrossdiffError(f"words file {p} not found; pass a text file with one word per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CrossdiffError(f"cannot read the words file {p}: {e}") from e
    seen, words = set(), []
    for line in lines:
        w = line.split("#", 1)[0].strip()
        if w and w.lower() not in seen:
            seen.add(w.lower())
            words.append(w)
    if not words:
        raise CrossdiffError(f"the words file {p} has no words (one per line; # starts a comment)")
    return tuple(words)


def base_store(cfg: CalibrateConfig, b: Budget):
    """(store, harvested): DIR/store opened when complete (models checked), else harvested with the
    budget's settings."""
    from ..harvest.harvest import harvest
    from ..inputs.store import Store

    path = Path(cfg.out) / "store"
    if runfolder.exists(path, "meta"):
        store = Store.open(path)
        for flag, want, key in (("--model", cfg.model, "a"), ("--model-b", cfg.model_b, "b")):
            have = store.meta["models"][key]["id"]
            if want is not None and want != have:
                raise CrossdiffError(
                    f"{path} holds model {key.upper()} {have!r}, not {want!r}; drop {flag} or choose another --out"
                )
        return store, False
    hcfg = harvest_config(
        b,
        path,
        model_a=cfg.model or DEFAULT_MODEL_A,
        model_b=cfg.model_b or DEFAULT_MODEL_B,
        corpus=cfg.corpus,
        device=cfg.device,
    )
    return harvest(hcfg), True


def calibration_settings(cfg: CalibrateConfig, b: Budget, store, words: tuple[str, ...]) -> dict:
    """What the results depend on: words, seed, the base store, and the train / analyse settings the
    budget gives (not the budget itself: its steering or seed-count fields do not matter here).
    Fields added later are left out at their defaults (crossdiff.core.config.added), so older calibrations
    stay valid."""
    tcfg = train_config(b, ".", ".", arch="dfc", seed=cfg.seed, dec_init_norm=cfg.dec_init_norm)
    analyze = settings(analyze_config(b, ".", ".", load_models=False))
    del analyze["splice_tokens"]  # the analyses here load no models, so nothing is spliced in
    return {
        "words": sorted(words),
        "seed": cfg.seed,
        "base_meta_sha1": hashlib.sha1(json.dumps(store.meta, sort_keys=True).encode()).hexdigest(),
        "train": settings(tcfg),
        "analyze": analyze,
    }


def _check_settings(folder: Path, settings: dict, overwrite: bool) -> None:
    """The calibration folder's key (crossdiff.core.manifest): a rerun with other settings is refused,
    or with --overwrite cleared; its stages (stages.json) then skip what is finished. A folder without a
    keyed manifest is judged by its settings.json, as crossdiff wrote it before."""

    def legacy(f: Path) -> bool | None:
        from ..coder.runlog import upgrade_train_settings

        saved = runfolder.read_json(f / "settings.json")
        if isinstance(saved, dict) and isinstance(saved.get("train"), dict):  # `arch` before sparsity/frac
            saved["train"] = upgrade_train_settings(saved["train"])
        return None if saved is None else saved == settings

    refuse = (
        f"{folder} holds a calibration made with other settings (words, seed, budget or base store); "
        "pass --overwrite to replace it"
    )
    other = "clear" if overwrite else "refuse"
    begin(folder, StageKey(settings, legacy=legacy), command="calibrate", other=other, refuse=refuse)


# ----------------------------------------------------------------------------- stages


def plan(cfg: CalibrateConfig, b: Budget, store, words: tuple[str, ...], folder: Path) -> list[Stage]:
    from ..analysis.analyze import RULES_VERSION, analyze
    from ..analysis.analyze import stage_settings as analyze_settings
    from ..analysis.verify import stage_settings as verify_settings
    from ..analysis.verify import verify
    from ..coder.train import train
    from ..inputs.derive import Control, derive_store

    stages = []
    for control in CONTROLS:
        path = folder / "stores" / control
        ctl = Control(control, cfg.seed, words if control == "planted" else ())
        stages.append(
            Stage(
                f"derive {control}",
                lambda p=path, c=ctl: derive_store(store, p, c) and None,
                done=lambda p=path: runfolder.exists(p, "meta"),
            )
        )
    for control in CONTROLS:
        path = folder / "stores" / control
        for arch in cfg.archs:
            run = folder / f"{control}-{arch}"
            tcfg = train_config(
                b, path, run, arch=arch, seed=cfg.seed, device=cfg.device, dec_init_norm=cfg.dec_init_norm
            )
            acfg = analyze_config(b, run, path, load_models=False, device=cfg.device)
            stages.append(
                Stage(
                    f"train {control}-{arch}",
                    lambda t=tcfg: train(t) and None,
                    done=lambda r=run: runfolder.exists(r, "eval"),
                )
            )
            stages.append(
                Stage(
                    f"analyse {control}-{arch}",
                    lambda a=acfg: analyze(a) and None,
                    analyze_settings(acfg),  # new candidate / verdict rules redo the analyses
                    done=lambda r=run: runfolder.exists(r, "analysis"),
                    legacy={"rules": RULES_VERSION},  # as stages.json recorded it before
                )
            )
            vcfg = verify_config(b, run, path, device=cfg.device)
            stages.append(
                Stage(
                    f"verify {control}-{arch}",
                    lambda v=vcfg: verify(v) and None,
                    verify_settings(vcfg, answer_links=False),
                    done=lambda r=run: runfolder.exists(r, "verification"),
                    legacy={"rules": RULES_VERSION, **settings(vcfg)},  # as stages.json recorded it before
                )
            )
    return stages


# ----------------------------------------------------------------------------- scoring


def decoder_cosines(run: Path, direction: torch.Tensor) -> np.ndarray:
    """(F,) cosine of each latent's A decoder row (normalised units) with the planted direction; 0
    where the latent has no A row. Direction only: the scale between raw and normalised cancels."""
    from ..analysis.evidence import decoder_rows
    from ..coder.crosscoder import Crosscoder

    cc = Crosscoder.from_pretrained(run, device="cpu")
    rows_FD = decoder_rows(cc, np.arange(cc.cfg.n_latents), "a").double()
    u_D = direction.double() / direction.double().norm()
    norms_F = rows_FD.norm(dim=1)
    return torch.where(norms_F > 0, rows_FD @ u_D / norms_F.clamp_min(1e-30), 0.0).numpy()


def _latent_info(run: Path, table: list[dict], cos_F: np.ndarray, planted_N: np.ndarray, j: int) -> dict:
    r = table[j]
    from ..analysis.analyze import top_rows

    rows = top_rows(run / "analysis", j)
    on = float(np.mean(planted_N[rows])) if rows else 0.0
    info = {"latent": j, "cosine": float(cos_F[j]), "top_on_words": on, "n_top": len(rows)}
    info.update({k: r[k] for k in ("partition", "verdict", "reason")})
    for k in (
        "probe_auroc",
        "probe_r2",
        "latent_scaling",
        "density",
        "rel_norm",
        "functional_share",
        "dec_norm_a",
        "dec_norm_b",
    ):
        info[k] = r[k] if math.isfinite(r[k]) else None
    return info


def positive_result(run: Path, direction: torch.Tensor, planted_N: np.ndarray) -> dict:
    """Discovery of the planted direction by an A-exclusive candidate, and its behavioural verdict."""
    from ..analysis.results import read_behaviour

    latents = read_latents(run / "analysis")
    table = latents.rows
    cos_F = decoder_cosines(run, direction)
    verdict = latents.column("verdict")
    a_side = latents.column("side") == "a"  # the analysis's A candidates
    behaviour = read_behaviour(run)

    def best(mask: np.ndarray) -> dict | None:
        ids = np.flatnonzero(mask)
        if not len(ids):
            return None
        info = _latent_info(run, table, cos_F, planted_N, int(ids[np.argmax(cos_F[ids])]))
        b = behaviour.get(info["latent"], {})
        info.update({k: b.get(k) for k in ("verdict", "shift", "z", "gap_closed", "n_contexts", "n_strong")})
        info["analysis_verdict"] = table[info["latent"]]["verdict"]
        return info

    candidate = best(a_side & (verdict != "dead"))
    found = candidate is not None and candidate["cosine"] >= COSINE_MIN
    found = found and candidate["top_on_words"] >= TOP_ON_WORDS_MIN
    verified = found and candidate.get("verdict") == "difference"
    return {
        "recovered": bool(found),
        "cosine": candidate["cosine"] if candidate else 0.0,
        "verified": bool(verified),
        "pass": bool(found and verified),
        "latent": candidate["latent"] if candidate else None,
        "top_on_words": candidate["top_on_words"] if candidate else None,
        "best_candidate": candidate,
        "best_overall": best(np.ones(len(table), dtype=bool)),
        "n_differences_a": sum(r["side"] == "a" and r["verdict"] == "difference" for r in behaviour.values()),
    }


def negative_result(runs: dict[str, Path]) -> dict:
    """`difference`s found in the self and rotated diffs (false positives), with the candidate counts."""
    from ..analysis.results import read_behaviour

    out = {}
    for control, run in runs.items():
        rows = read_behaviour(run).values()
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
        out[f"{control}_false_exclusive"] = counts.get("difference", 0)
        out[f"{control}_candidates"] = len(rows)
        out[f"{control}_counts"] = counts
    return out


def _verdicts(run: Path) -> dict[str, int]:
    """How many candidates got each behavioural verdict."""
    from ..analysis.results import read_behaviour

    out: dict[str, int] = {}
    for r in read_behaviour(run).values():
        out[r["verdict"]] = out.get(r["verdict"], 0) + 1
    return out


# ----------------------------------------------------------------------------- entry point


@writes(lambda cfg: Path(cfg.out) / "calibration.json")
@writes(lambda cfg: Path(cfg.out) / "calibration", record="files")
def calibrate(cfg: CalibrateConfig, budget: Budget | None = None) -> dict:
    """Run (or finish) the controls in cfg.out; returns calibration.json's content.

    `budget` overrides cfg.budget with an explicit Budget (tests use a tiny one).
    """
    from ..inputs.derive import count_planted, load_direction, plant_rows, planted_norm, word_pattern
    from ..inputs.store import Store

    start = time.perf_counter()
    b = budget or get_budget(cfg.budget)
    words = read_words(cfg.words)
    folder = Path(cfg.out) / "calibration"
    t0 = time.perf_counter()
    store, harvested = base_store(cfg, b)
    harvest_seconds = time.perf_counter() - t0
    pattern = word_pattern(words)
    planted = count_planted(store, pattern)
    if planted["rows"] == 0:
        raise CrossdiffError(
            f"none of the {len(words)} words occurs on a token of {store.root}; choose words that are in the corpus"
        )
    if planted["heldout_rows"] < 10:
        print(
            f"warning: only {planted['heldout_rows']} planted rows are held out; verification needs 10 firings "
            "there, so the planted latent cannot be verified (use more or more frequent words, or a larger budget)",
            file=sys.stderr,
        )
    _check_settings(folder, calibration_settings(cfg, b, store, words), cfg.overwrite)
    log = StageLog(folder / "stages.json")
    if harvested:  # a reused complete store (e.g. crossdiff diff's) costs nothing here
        log.record(Stage("harvest", lambda: None), harvest_seconds, None)
    print(
        f"crossdiff calibrate: {store.model_a['id']} vs {store.model_b['id']}, {store.n_tokens:,} tokens, "
        f"{planted['rows']:,} planted rows ({planted['heldout_rows']:,} held out), budget {b.name} -> {folder}",
        file=sys.stderr,
    )
    run_stages(plan(cfg, b, store, words, folder), log, "calibrate")

    plants = {
        c: (load_direction(Store.open(folder / "stores" / c)), plant_rows(store, c, pattern, cfg.seed))
        for c in ("planted", "random")
    }
    by_arch = {}
    for arch in cfg.archs:
        runs = {c: folder / f"{c}-{arch}" for c in CONTROLS}
        by_arch[arch] = {
            "positive": positive_result(runs["planted"], *plants["planted"]),
            "positive_random": positive_result(runs["random"], *plants["random"]),
            "negative": negative_result({c: runs[c] for c in ("self", "rotated")}),
            "verdicts": {c: _verdicts(r) for c, r in runs.items()},
        }
    result = {
        "positive": by_arch[cfg.archs[0]]["positive"],
        "positive_random": by_arch[cfg.archs[0]]["positive_random"],
        "negative": by_arch[cfg.archs[0]]["negative"],
        "by_arch": by_arch,
        "words": list(words),
        "n_planted_rows": planted["rows"],
        "n_planted_heldout_rows": planted["heldout_rows"],
        "planted_norm": planted_norm(store),
        "criteria": {"cosine_min": COSINE_MIN, "top_on_words_min": TOP_ON_WORDS_MIN},
        "models": {"a": store.model_a["id"], "b": store.model_b["id"]},
        "seed": cfg.seed,
        "budget": b.as_dict(),
        "base_store": str(store.root),
        "seconds": log.seconds(),
        "seconds_this_session": round(time.perf_counter() - start, 1),
    }
    from ..core.fsutil import jsonable

    result = jsonable(result)
    write_json_atomic(Path(cfg.out) / "calibration.json", result)
    _refresh_report(Path(cfg.out) / "run")
    print(summary_line(result), file=sys.stderr)
    return result


def _refresh_report(run: Path) -> None:
    if (run / "analysis" / "latents.csv").is_file():
        from ..report.report import ReportConfig, report

        report(ReportConfig(run=str(run)))


def summary_line(result: dict) -> str:
    def plant(p: dict) -> str:
        found = "recovered" if p["recovered"] else "NOT recovered"
        return f"{found} (cosine {p['cosine']:.2f}), {'verified' if p['verified'] else 'NOT verified'}"

    parts = []
    for arch, r in result["by_arch"].items():
        n = r["negative"]
        parts.append(
            f"{arch}: word plant {plant(r['positive'])}; random plant {plant(r['positive_random'])}; "
            f"false differences self {n['self_false_exclusive']}, rotated {n['rotated_false_exclusive']}"
        )
    return "calibration: " + "; ".join(parts)
