"""`crossdiff calibrate`: positive and negative controls that make "we found X" and "we found nothing"
trustworthy (DESIGN.md §5; docs/calibration.md).

    positive   plant a known concept in model A (derive.py: a fixed random direction at the layer's
               typical norm, added on the tokens of a word list), run train + analyse on the planted
               A against B, and ask whether a *verified* A-exclusive latent recovers it: decoder
               cosine with the planted direction >= 0.9 and at least half its top examples on the words
    negative   diff A against itself and against a randomly rotated copy of A; every latent verified
               exclusive there is a false positive

Each control runs for the DFC and for the standard BatchTopK crosscoder, at the budget's size
(budget.py). Folder convention shared with `crossdiff diff`: DIR/store is the base store (reused when
complete, else harvested); this command writes

    DIR/calibration/settings.json       words, seed, budget and base store (a rerun with others is refused)
    DIR/calibration/stores/<control>/   the derived stores (planted, self, rotated)
    DIR/calibration/<control>-<arch>/   training runs, each analysed in its analysis/ folder
    DIR/calibration/stages.json         finished stages with their times (a rerun skips them)
    DIR/calibration.json                the results (schema in docs/calibration.md); written last

and regenerates DIR/run/report when DIR/run has been analysed, so the report shows the calibration.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .budget import Budget, analyze_config, get_budget, harvest_config, train_config
from .errors import CrossdiffError
from .fsutil import write_json_atomic
from .models import DEFAULT_MODEL_A, DEFAULT_MODEL_B
from .stages import Stage, StageLog, run_stages

ARCHS = ("dfc", "batchtopk")
CONTROLS = ("planted", "self", "rotated")
COSINE_MIN = 0.9
"""A latent recovers the planted direction when its A decoder row has at least this cosine with it..."""
TOP_ON_WORDS_MIN = 0.5
"""...and at least this fraction of its top examples are planted rows."""

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

    out: str
    """Diff folder DIR (as for crossdiff diff): reuses DIR/store when complete, else harvests it there; writes DIR/calibration/ and DIR/calibration.json."""
    words: str | None = None
    """File of words to plant the concept on, one per line (# starts a comment). Default: 40 common concrete nouns."""
    model: str | None = None
    """Model A for a new harvest (default smollm2-135m); when DIR/store exists it must be the store's model A."""
    model_b: str | None = None
    """Model B for a new harvest (default gemma3-270m); when DIR/store exists it must be the store's model B."""
    corpus: str = "brown"
    """Text source of a new harvest: brown, a .txt file or folder, jsonl:PATH:FIELD, or hf:NAME[:CONFIG][:SPLIT]."""
    budget: Literal["small", "medium", "large"] = "small"
    """Compute budget of every stage (crossdiff/budget.py); small: 100k tokens, 4096 latents."""
    seed: int = 0
    """Seed of the planted direction, the rotation and the training runs."""
    dec_init_norm: float | None = None
    """Decoder-row norm at initialisation for the six trainings (default: the trainer's, 0.1)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    overwrite: bool = False
    """Replace a calibration in DIR made with other settings (words, seed, budget or base store)."""


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
    from .harvest import harvest
    from .store import Store

    path = Path(cfg.out) / "store"
    if (path / "meta.json").is_file():
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


# Config fields that change where or how a stage runs, not its result (train resumes across them).
_NOT_SETTINGS = {"store", "out", "run", "device", "logger", "log_every", "checkpoint_every", "splice_tokens"}
# Result-changing fields added after calibrations were first written, with their defaults.
_ADDED_LATER = {"dec_init_norm": 0.1}


def calibration_settings(cfg: CalibrateConfig, b: Budget, store, words: tuple[str, ...]) -> dict:
    """What the results depend on: words, seed, the base store, and the train / analyse settings the
    budget gives (not the budget itself: its steering or seed-count fields do not matter here).
    Fields added later are left out at their defaults, so older calibrations stay valid."""
    from .config import config_to_dict

    def strip(c) -> dict:
        d = config_to_dict(c)
        return {k: v for k, v in d.items() if k not in _NOT_SETTINGS and _ADDED_LATER.get(k, ...) != v}

    return {
        "words": sorted(words),
        "seed": cfg.seed,
        "base_meta_sha1": hashlib.sha1(json.dumps(store.meta, sort_keys=True).encode()).hexdigest(),
        "train": strip(train_config(b, ".", ".", arch="dfc", seed=cfg.seed, dec_init_norm=cfg.dec_init_norm)),
        "analyze": strip(analyze_config(b, ".", ".", load_models=False)),
    }


def _check_settings(folder: Path, settings: dict, overwrite: bool) -> None:
    path = folder / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != settings:
        if not overwrite:
            raise CrossdiffError(
                f"{folder} holds a calibration made with other settings (words, seed, budget or base "
                "store); pass --overwrite to replace it"
            )
        shutil.rmtree(folder)
    write_json_atomic(path, settings)


# ----------------------------------------------------------------------------- stages


def plan(cfg: CalibrateConfig, b: Budget, store, words: tuple[str, ...], folder: Path) -> list[Stage]:
    from .analyze import RULES_VERSION, analyze
    from .derive import Control, derive_store
    from .train import train

    stages = []
    for control in CONTROLS:
        path = folder / "stores" / control
        ctl = Control(control, cfg.seed, words if control == "planted" else ())
        stages.append(
            Stage(
                f"derive {control}",
                lambda p=path, c=ctl: derive_store(store, p, c) and None,
                done=lambda p=path: (p / "meta.json").is_file(),
            )
        )
    for control in CONTROLS:
        path = folder / "stores" / control
        for arch in ARCHS:
            run = folder / f"{control}-{arch}"
            tcfg = train_config(
                b, path, run, arch=arch, seed=cfg.seed, device=cfg.device, dec_init_norm=cfg.dec_init_norm
            )
            acfg = analyze_config(b, run, path, load_models=False, device=cfg.device)
            stages.append(
                Stage(
                    f"train {control}-{arch}",
                    lambda t=tcfg: train(t) and None,
                    done=lambda r=run: (r / "eval.json").is_file(),
                )
            )
            stages.append(
                Stage(
                    f"analyse {control}-{arch}",
                    lambda a=acfg: analyze(a) and None,
                    {"rules": RULES_VERSION},  # new candidate / verdict rules redo the analyses
                    done=lambda r=run: (r / "analysis" / "summary.json").is_file(),
                )
            )
    return stages


# ----------------------------------------------------------------------------- scoring


def read_latents(run: Path) -> list[dict]:
    with open(run / "analysis" / "latents.csv", newline="") as f:
        return list(csv.DictReader(f))


def _num(s) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return math.nan


def top_rows(run: Path, latent: int) -> list[int]:
    """Store rows of a latent's top examples: features/<latent>.json, else the analysis's cached pass."""
    feat = run / "analysis" / "features" / f"{latent}.json"
    if feat.is_file():
        return [int(e["row"]) for e in json.loads(feat.read_text()).get("examples", [])]
    saved = torch.load(run / "analysis" / "pass.pt", weights_only=True)["result"]
    vals, rows = saved["top_values_KF"][:, latent], saved["top_rows_KF"][:, latent]
    return [int(r) for v, r in zip(vals.tolist(), rows.tolist()) if v > 0 and r >= 0]


def decoder_cosines(run: Path, direction: torch.Tensor) -> np.ndarray:
    """(F,) cosine of each latent's A decoder row (normalised units) with the planted direction; 0
    where the latent has no A row. Direction only: the scale between raw and normalised cancels."""
    from .crosscoder import Crosscoder
    from .evidence import decoder_rows

    cc = Crosscoder.from_pretrained(run, device="cpu")
    rows_FD = decoder_rows(cc, np.arange(cc.cfg.n_latents), "a").double()
    u_D = direction.double() / direction.double().norm()
    norms_F = rows_FD.norm(dim=1)
    return torch.where(norms_F > 0, rows_FD @ u_D / norms_F.clamp_min(1e-30), 0.0).numpy()


def _latent_info(run: Path, table: list[dict], cos_F: np.ndarray, planted_N: np.ndarray, j: int) -> dict:
    r = table[j]
    rows = top_rows(run, j)
    on = float(np.mean(planted_N[rows])) if rows else 0.0
    info = {"latent": j, "cosine": float(cos_F[j]), "top_on_words": on, "n_top": len(rows)}
    info.update({k: r.get(k) for k in ("partition", "verdict", "reason")})
    for k in ("probe_auroc", "probe_r2", "latent_scaling", "density", "rel_norm", "dec_norm_a", "dec_norm_b"):
        v = _num(r.get(k))
        info[k] = v if math.isfinite(v) else None
    return info


def positive_result(run: Path, direction: torch.Tensor, planted_N: np.ndarray) -> dict:
    """Recovery of the planted direction by a verified A-exclusive latent, with miss diagnostics."""
    from .analyze import exclusive_sides
    from .crosscoder import Crosscoder

    table = read_latents(run)
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    a_threshold = summary["thresholds"]["exclusive_threshold"]
    cos_F = decoder_cosines(run, direction)
    verdict = np.array([r["verdict"] for r in table])
    share_F = np.array([_num(r.get("functional_share")) for r in table])  # NaN where none was measured
    a_side = (
        exclusive_sides(Crosscoder.from_pretrained(run), a_threshold, share_F)[0] == "a"
    )  # analysis's A candidates

    def best(mask: np.ndarray) -> dict | None:
        ids = np.flatnonzero(mask)
        if not len(ids):
            return None
        return _latent_info(run, table, cos_F, planted_N, int(ids[np.argmax(cos_F[ids])]))

    def hit(info: dict | None) -> bool:
        return info is not None and info["cosine"] >= COSINE_MIN and info["top_on_words"] >= TOP_ON_WORDS_MIN

    verified = best(verdict == "exclusive_a")
    candidate = best(a_side & (verdict != "dead"))
    return {
        "recovered": hit(verified),
        # 0 when no latent is verified A-exclusive (no direction to compare).
        "cosine": verified["cosine"] if verified else 0.0,
        "latent": verified["latent"] if verified else None,
        "top_on_words": verified["top_on_words"] if verified else None,
        "n_verified_a": int((verdict == "exclusive_a").sum()),
        # Diagnostics of a miss: did discovery (an A-side candidate) or verification fail?
        "recovered_as_candidate": hit(candidate),
        "best_candidate": candidate,
        "best_overall": best(np.ones(len(table), dtype=bool)),
    }


def negative_result(runs: dict[str, Path]) -> dict:
    """Latents wrongly verified exclusive in the self and rotated diffs, with the candidate counts."""
    out = {}
    for control, run in runs.items():
        s = json.loads((run / "analysis" / "summary.json").read_text())
        counts, cand = s["counts"], s["candidates"]
        out[f"{control}_false_exclusive"] = int(counts["exclusive_a"] + counts["exclusive_b"])
        out[f"{control}_candidates"] = int(cand["a"] + cand["b"])
        out[f"{control}_counts"] = counts
    return out


def _reasons(run: Path) -> dict[str, int]:
    """Why the rejected latents were rejected (the reason's kind, before its numbers)."""
    out: dict[str, int] = {}
    for r in read_latents(run):
        if r["verdict"] == "rejected":
            kind = r["reason"].split(":")[0]
            out[kind] = out.get(kind, 0) + 1
    return out


# ----------------------------------------------------------------------------- entry point


def calibrate(cfg: CalibrateConfig, budget: Budget | None = None) -> dict:
    """Run (or finish) the controls in cfg.out; returns calibration.json's content.

    `budget` overrides cfg.budget with an explicit Budget (tests use a tiny one).
    """
    from .derive import count_planted, load_direction, planted_mask, planted_norm, word_pattern
    from .store import Store

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

    direction = load_direction(Store.open(folder / "stores" / "planted"))
    planted_N = planted_mask(store, pattern)
    by_arch = {}
    for arch in ARCHS:
        runs = {c: folder / f"{c}-{arch}" for c in CONTROLS}
        by_arch[arch] = {
            "positive": positive_result(runs["planted"], direction, planted_N),
            "negative": negative_result({c: runs[c] for c in ("self", "rotated")}),
            "rejected_reasons": {c: _reasons(r) for c, r in runs.items()},
        }
    result = {
        "positive": by_arch["dfc"]["positive"],
        "negative": by_arch["dfc"]["negative"],
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
    from .evidence import jsonable

    result = jsonable(result)
    write_json_atomic(Path(cfg.out) / "calibration.json", result)
    _refresh_report(Path(cfg.out) / "run")
    print(summary_line(result), file=sys.stderr)
    return result


def _refresh_report(run: Path) -> None:
    if (run / "analysis" / "latents.csv").is_file():
        from .report import ReportConfig, report

        report(ReportConfig(run=str(run)))


def summary_line(result: dict) -> str:
    parts = []
    for arch, r in result["by_arch"].items():
        p, n = r["positive"], r["negative"]
        parts.append(
            f"{arch}: planted {'recovered' if p['recovered'] else 'NOT recovered'} (cosine {p['cosine']:.2f}"
            f"{', as a candidate' if p['recovered_as_candidate'] and not p['recovered'] else ''}), "
            f"false exclusives self {n['self_false_exclusive']}, rotated {n['rotated_false_exclusive']}"
        )
    return "calibration: " + "; ".join(parts)
