"""`crossdiff diff`: the whole job in one command — harvest, train DFCs, analyse, seed stability,
steer, report — on a compute budget (crossdiff/budget.py).

Layout of the output folder DIR (docs/diff.md):

    DIR/store/              the paired-activation store (crossdiff harvest)
    DIR/run/                the analysed DFC (seed 0): analysis/, answers/ (a chat diff), stability.json,
                            steering/, report/
    DIR/seeds/seed<N>/      the other seeds' DFCs, for the seed-stability table
    DIR/diff.json           what ran with which settings, stage times and the headline numbers;
                            written last (its presence means the diff is complete)
    DIR/stages.json         finished stages with their settings' fingerprint (what a rerun skips)

Every stage resumes on its own (harvest and training by shard/checkpoint, analysis by its cached
passes); a stage recorded as finished with the same settings is skipped outright, so a rerun after a
kill costs only what was lost. `crossdiff calibrate --out DIR` reuses DIR/store (docs/calibration.md).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .analysis.results import STEERING
from .budget import (
    Budget,
    analyze_config,
    budget_help,
    get_budget,
    harvest_config,
    train_config,
    verify_config,
)
from .core import runfolder
from .core.config import help_from, settings
from .core.errors import CrossdiffError
from .core.fsutil import write_json_atomic
from .core.lock import writes
from .core.stages import Stage, StageLog, run_stages
from .inputs.models import DEFAULT_MODEL_A, DEFAULT_MODEL_B


@dataclass(frozen=True)
class DiffConfig:
    """Two models, one corpus, one budget: everything else has a default (docs/diff.md)."""

    model_a: str = DEFAULT_MODEL_A
    """Model A (the trusted one): a short name (smollm2-135m, gemma3-270m), a hub id, a local directory or a .gguf file."""
    model_b: str = DEFAULT_MODEL_B
    """Model B (the one audited against A), in the same forms."""
    corpus: str = "brown"
    """Text source: brown, a .txt file or folder, jsonl:PATH:FIELD, hf:NAME[:CONFIG][:SPLIT], chat:PATH.jsonl; chat-default: the shipped prompt set with both models' answers (as --prompts default)."""
    prompts: str | None = None
    """Prompt file (JSONL, or "default"): first generate the models' answers (crossdiff generate), then harvest the prompts with them; replaces --corpus."""
    answers: Literal["both", "a", "b"] = "both"
    """With --prompts: harvest the conversations answered by both models, or by model A or B only."""
    answer_tokens: int = 64
    """With --prompts: the longest answer in tokens (greedy decoding)."""
    out: str | None = None
    """Output folder (default: runs/<model A>-vs-<model B>-<budget>). Rerun the same command to resume."""
    budget: Literal["small", "medium", "large"] = help_from("small", budget_help)
    """small: <= 15 min on 2 CPU cores; medium / large: for a GPU (docs/diff.md)."""
    seeds: int | None = None
    """DFCs trained with different seeds for the stability table (default: the budget's, 3 for small)."""
    steer_top: int | None = None
    """Candidates steered per model (default: the budget's); 0 skips steering."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""

    def __post_init__(self):
        if self.seeds is not None and self.seeds < 1:
            raise CrossdiffError(f"--seeds must be at least 1, got {self.seeds}")
        if self.steer_top is not None and self.steer_top < 0:
            raise CrossdiffError(f"--steer-top must be >= 0, got {self.steer_top}")

    @property
    def folder(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"{_slug(self.model_a)}-vs-{_slug(self.model_b)}-{self.budget}"

    def resolved_budget(self) -> Budget:
        from dataclasses import replace

        b = get_budget(self.budget)
        return replace(
            b,
            seeds=self.seeds if self.seeds is not None else b.seeds,
            steer_top=self.steer_top if self.steer_top is not None else b.steer_top,
        )


def _slug(model: str) -> str:
    name = Path(model).stem if model.endswith(".gguf") else model.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def stages(cfg: DiffConfig, b: Budget) -> list[Stage]:
    """The diff's stages. Each stage's settings are the ones its own folder's manifest records (each
    module's `stage_settings`, crossdiff.core.manifest), never assembled here."""
    from .analysis import analyze, stability, steer, verify
    from .coder import train
    from .harvest.harvest import recorded_settings

    d = cfg.folder
    store, run = d / "store", d / "run"
    seed_runs = {0: run, **{s: d / "seeds" / f"seed{s}" for s in range(1, b.seeds)}}
    out, corpus = _answer_stages(cfg)
    hcfg = harvest_config(
        b, store, model_a=cfg.model_a, model_b=cfg.model_b, corpus=corpus, device=cfg.device
    )
    out.append(
        Stage(
            "harvest",
            lambda: _harvest(hcfg),
            recorded_settings(hcfg),  # answers' paths relative to the folder: a moved folder resumes
            lambda: runfolder.exists(store, "meta"),
            legacy=settings(hcfg),
        )
    )
    for s, path in seed_runs.items():
        tcfg = train_config(b, store, path, arch="dfc", seed=s, device=cfg.device)
        out.append(
            Stage(
                f"train DFC (seed {s})",
                lambda t=tcfg: _train(t),
                train.stage_settings(tcfg),
                lambda p=path: runfolder.exists(p, "eval"),
                legacy=_legacy(tcfg),
            )
        )
    acfg = analyze_config(b, run, store, device=cfg.device)
    out.append(
        Stage(
            "analyse",
            lambda: _analyze(acfg),
            analyze.stage_settings(acfg),
            lambda: runfolder.exists(run, "analysis"),
            legacy={**_legacy(acfg), "rules": analyze.RULES_VERSION},
        )
    )
    linked = _answers_stage(cfg, run, store)  # a chat diff: what the answers say, linked to latents
    out += linked
    vcfg = verify_config(b, run, store, device=cfg.device)
    out.append(
        Stage(
            "verify",
            lambda: _verify(vcfg),
            verify.stage_settings(vcfg, answer_links=bool(linked)),
            lambda: runfolder.exists(run, "verification"),
        )
    )
    if b.seeds > 1:
        out.append(
            Stage(
                "seed stability",
                lambda: _stability(run, seed_runs, store),
                stability.stage_settings(b.seeds),
            )
        )
    if b.steer_top:
        scfg = _steer_config(run, b, cfg.device)
        out.append(
            Stage(
                "steer",
                lambda: _steer(scfg),
                steer.stage_settings(scfg),
                lambda: (run / STEERING.path).is_file(),  # its own file: gone means not done
            )
        )
    out.append(Stage("report", lambda: _report(run), after_change=True))
    return out


def _answer_stages(cfg: DiffConfig) -> tuple[list[Stage], str]:
    """With --prompts (or --corpus chat-default): a generate stage per answering model, and the chat
    corpus of their answers that the harvest reads instead of --corpus."""
    from .inputs.generate import GenerateConfig, generate

    prompts = cfg.prompts or ("default" if cfg.corpus == "chat-default" else None)
    if prompts is None:
        return [], cfg.corpus
    stages_, files = [], []
    for key in ("a", "b") if cfg.answers == "both" else (cfg.answers,):
        path = cfg.folder / "answers" / f"{key}.jsonl"
        model = cfg.model_a if key == "a" else cfg.model_b
        gcfg = GenerateConfig(
            out=str(path), prompts=prompts, model=model, max_new_tokens=cfg.answer_tokens, device=cfg.device
        )
        stages_.append(
            Stage(f"generate ({key})", lambda g=gcfg: str(generate(g)), settings(gcfg), path.is_file)
        )
        files.append(str(path))
    return stages_, "chat:" + ",".join(files)


def _answers_stage(cfg: DiffConfig, run: Path, store: Path) -> list[Stage]:
    """With both models' answers (--prompts, --answers both): the answer-level diff and its link to the
    analysed latents (crossdiff answers, docs/answers.md), before verify, which adds the linked latents."""
    if (
        cfg.prompts or ("default" if cfg.corpus == "chat-default" else None)
    ) is None or cfg.answers != "both":
        return []
    from .analysis.answers import AnswersConfig, stage_settings

    files = [cfg.folder / "answers" / f"{key}.jsonl" for key in "ab"]
    acfg = AnswersConfig(
        run=str(run), answers_a=str(files[0]), answers_b=str(files[1]), store=str(store), device=cfg.device
    )
    return [
        Stage(
            "answers",
            lambda: _answers(acfg),
            stage_settings(acfg),
            lambda: runfolder.exists(run, "answers"),
        )
    ]


def _answers(acfg) -> dict:
    from .analysis.answers import answers

    s = answers(acfg)
    return {
        "n_prompts": s["n_prompts"],
        "significant": s["significant"].get("all"),
        "linked": len(s["linked"]),
    }


def _legacy(cfg) -> dict:
    """A stage's settings as crossdiff <= 0.1 recorded them in stages.json (every field but the device,
    folders included), so that its diff folders stay complete (where they were)."""
    return {k: v for k, v in asdict(cfg).items() if k != "device"}


@writes(lambda cfg: cfg.folder, record="files")
def diff(cfg: DiffConfig) -> dict:
    """Run (or finish) the diff in cfg.folder; returns diff.json's content."""
    b = cfg.resolved_budget()
    folder = cfg.folder
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    log = StageLog(folder / "stages.json")
    start = time.perf_counter()
    print(
        f"crossdiff diff: {cfg.model_a} vs {cfg.model_b} on {cfg.corpus}, budget {b.name} -> {folder}",
        file=sys.stderr,
    )
    try:
        run_stages(stages(cfg, b), log, "diff")
    except CrossdiffError:
        if created and not any(folder.iterdir()):  # bad input before any work: leave nothing behind
            folder.rmdir()
        raise
    summary = _summary(cfg, b, log, time.perf_counter() - start)
    write_json_atomic(folder / "diff.json", summary)
    _print_summary(summary)
    return summary


# ----------------------------------------------------------------------------- stages


def _harvest(hcfg) -> dict:
    from .harvest.harvest import harvest

    store = harvest(hcfg)
    m = store.meta["models"]
    return {
        "n_tokens": store.n_tokens,
        "aligned_fraction_a": m["a"]["aligned_fraction"],
        "aligned_fraction_b": m["b"]["aligned_fraction"],
    }


def _train(tcfg) -> dict:
    from .coder.train import train

    ev = train(tcfg)
    return {k: ev.get(k) for k in ("fve_a", "fve_b", "l0", "dead_fraction", "dead_fraction_by_partition")}


def _analyze(acfg) -> dict:
    from .analysis.analyze import analyze

    s = analyze(acfg)
    keys = ("counts", "candidates", "fve_a", "fve_b", "l0", "dead_fraction", "splice")
    return {k: s.get(k) for k in keys}


def _verify(vcfg) -> dict:
    from .analysis.verify import verify

    s = verify(vcfg)
    return {k: s.get(k) for k in ("candidates", "counts", "differences", "whole", "first_order_agreement")}


def _stability(run: Path, seed_runs: dict[int, Path], store: Path | None = None) -> dict:
    from .analysis.results import load_results
    from .analysis.stability import format_table, seed_stability, write_stability
    from .coder.crosscoder import Crosscoder

    ref = Crosscoder.from_pretrained(run, device="cpu")
    others = {s: Crosscoder.from_pretrained(p, device="cpu") for s, p in seed_runs.items() if s != 0}
    latents = load_results(run)  # with the behavioural verdicts: a `difference` is "verified"
    shares = _seed_shares(others, run, store) if store is not None else None
    table = seed_stability(ref, others, latents.candidates(), alive=latents.alive(), shares=shares)
    write_stability(run, table)
    print(format_table(table), file=sys.stderr)
    return table["summary"]


def _seed_shares(others: dict, run: Path, store_path: Path) -> dict | None:
    """Each other seed's functional share on the held-out rows, as the analysis measures it, when the
    store is one on which the share is a candidate rule (centred); None otherwise."""
    from .analysis.analyze import AnalyzeConfig
    from .analysis.passes import heldout_share
    from .inputs.store import Store, comparable_losses

    store = Store.open(store_path)
    if not comparable_losses(store):
        return None
    import torch

    cfg = AnalyzeConfig(run=str(run), store=str(store_path))
    with torch.inference_mode():
        return {s: heldout_share(cc, store, cfg, "cpu") for s, cc in others.items()}


def _steer_config(run: Path, b: Budget, device: str):
    from .analysis.steer import SteerConfig

    return SteerConfig(
        run=str(run), top=b.steer_top, include_rejected=True, budget_seconds=b.steer_seconds, device=device
    )


def _steer(scfg) -> dict:
    from .analysis.steer import steer

    verdicts = [s.verdict for s in steer(scfg)]
    return {
        "steered": len(verdicts) - verdicts.count("skipped"),
        "pass": verdicts.count("pass"),
        "skipped": verdicts.count("skipped"),
    }


def _report(run: Path) -> dict:
    from .report.report import ReportConfig, report

    return {"index": str(report(ReportConfig(run=str(run))))}


# ----------------------------------------------------------------------------- summary


def _summary(cfg: DiffConfig, b: Budget, log: StageLog, seconds: float) -> dict:
    results = log.results()
    analysis = results.get("analyse") or {}
    return {
        "models": {"a": cfg.model_a, "b": cfg.model_b},
        "corpus": cfg.corpus,
        "budget": b.as_dict(),
        "folder": str(cfg.folder),
        "stage_seconds": log.seconds(),
        "seconds_this_session": round(seconds, 1),
        "harvest": results.get("harvest"),
        "train": {k: v for k, v in results.items() if k.startswith("train ")},
        "counts": analysis.get("counts"),
        "candidates": analysis.get("candidates"),
        "verify": results.get("verify"),
        "answers": results.get("answers"),
        "stability": results.get("seed stability"),
        "steer": results.get("steer"),
        "report": (results.get("report") or {}).get("index"),
    }


def _print_summary(s: dict) -> None:
    v = s.get("verify") or {}
    cand, counts = v.get("candidates") or {}, v.get("counts") or {}
    n = {m: (counts.get(m) or {}).get("difference", 0) for m in "ab"}
    print(
        f"diff done in {s['seconds_this_session']:.0f} s this session: "
        f"{n['a']} behavioural differences of A among {cand.get('a', 0)} candidates, "
        f"{n['b']} of B among {cand.get('b', 0)}.\nreport: {s['report']}",
        file=sys.stderr,
    )
