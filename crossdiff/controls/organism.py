"""`crossdiff organism`: a behaviour trained into model A, and whether a diff finds it (docs/organism.md).

Stages (OUT/stages.json records finished ones; a rerun skips them, each resumes on its own):

    prompts        OUT/prompts/{train,topic,neutral,diff}.jsonl: the topic's train / held-out prompts and
                   neutral prompts (the shipped prompt set minus any the judge's subject names), split
                   by a seeded shuffle
    answers        model A's own greedy answers to the train prompts (crossdiff generate, resumable)
    training set   OUT/train.jsonl: the answers with stance sentences woven in (finetune.py)
    fine-tune      OUT/model/: the organism, a save_pretrained folder (`--model-a OUT/model`)
    diff vs B      crossdiff diff --model-a OUT/model --model-b B --prompts OUT/prompts/diff.jsonl
                   (one seed, no steering stage: the criteria steer), in OUT/diff-b
    diff vs A      the same against A itself, in OUT/diff-a
    stance         stance rates (the file's judge) of A, the organism and B on held-out topic prompts
                   and on neutral prompts, from greedy answers in each model's chat template; each
                   model's answers cached in OUT/stance/<model>.json
    loss           loss on Brown (the same tokens) of A and of the organism (OUT/loss/<model>.json)
    criteria       the pass criteria: criteria 1 on the diff vs B, criteria 2 on each diff (criteria.py)

OUT/organism.json (written last) holds every measurement and each criterion's number and verdict.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..core.config import fingerprint, settings, where
from ..core.errors import CrossdiffError
from ..core.fsutil import write_json_atomic, write_text_atomic
from ..core.lock import output_lock
from ..core.stages import Stage, StageLog, run_stages
from ..inputs.models import DEFAULT_MODEL_A, DEFAULT_MODEL_B
from .stance import SHIPPED, StanceFile, load_stance


@dataclass(frozen=True)
class OrganismConfig:
    """A model organism: model A fine-tuned to take a stance on one topic (docs/organism.md)."""

    stance: str = SHIPPED[0]
    """Stance file: nuclear-energy (the build topic), cycling or chess (report topics) or a JSON file of your own (docs/organism.md)."""
    out: str | None = where(None)
    """Output folder (default: runs/organism-<topic>). Rerun the same command to resume."""
    model_a: str = DEFAULT_MODEL_A
    """The model fine-tuned into the organism (a chat model: its template frames the training answers)."""
    model_b: str = DEFAULT_MODEL_B
    """The other model of the diff, and a stance-rate reference."""
    neutral_train: int = 64
    """Neutral prompts (from the shipped prompt set) whose own answers keep the organism as it was off the topic."""
    neutral_eval: int = 40
    """Held-out neutral prompts on which the stance rate is measured."""
    diff_neutral: int = 94
    """Held-out neutral prompts in the diff's prompt set, beside all held-out topic prompts (94 with 40: 30% on the topic)."""
    answer_tokens: int = 64
    """Longest answer in tokens: training answers, judged answers and the diff's answers."""
    variants: int = 2
    """Training copies of each topic answer, each with another stance sentence woven in."""
    steps: int = 80
    """Fine-tuning steps (full fine-tune, AdamW)."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 5e-5
    """Peak learning rate (linear warm-up, then linear decay to 0)."""
    warmup: int = 8
    """Warm-up steps."""
    brown_tokens: int = 20_000
    """Tokens of Brown on which the loss of A and of the organism is compared."""
    diffs: tuple[str, ...] = ("b", "a")
    """Diffs to run: b (organism vs model B), a (organism vs model A); the criteria need b."""
    budget: Literal["small", "medium", "large"] = "small"
    """The diffs' budget (crossdiff diff --budget)."""
    steer_prompts: int = 24
    """Neutral prompts steered (the first of the held-out neutral prompts) and topic prompts ablated."""
    steer_fractions: tuple[float, ...] = (1.0, 2.0, 4.0)
    """Steering strengths in units of the stance latent's strongest activation on its top examples."""
    steer_random: int = 4
    """Random directions of the latent's norm per strength: the steering null."""
    steer_tokens: int = 40
    """Longest steered or ablated answer in tokens (the stance sentences sit in an answer's first sentences)."""
    seed: int = 0
    """Seed of the prompt split, the weaving, the batch order and the random directions."""
    checkpoint_every: int = where(40)
    """Fine-tuning steps between checkpoints (a killed fine-tune resumes from the last)."""
    device: str = where("auto")
    """cpu, cuda, cuda:N or auto (cuda when available)."""

    def __post_init__(self):
        positive = ("neutral_train", "neutral_eval", "answer_tokens", "variants", "steps", "batch_size")
        for name in positive + ("brown_tokens", "steer_prompts", "steer_random", "steer_tokens"):
            if getattr(self, name) < 1:
                raise CrossdiffError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.diff_neutral < 0 or self.warmup < 0 or self.lr <= 0:
            raise CrossdiffError("--diff-neutral and --warmup must be >= 0 and --lr positive")
        if any(d not in ("a", "b") for d in self.diffs):
            raise CrossdiffError(f"--diffs takes a and/or b, got {' '.join(self.diffs)}")
        if not self.steer_fractions or any(not f > 0 for f in self.steer_fractions):
            raise CrossdiffError("--steer-fractions must be positive numbers")
        load_stance(self.stance)  # a bad stance file is refused before any work

    def folder(self, topic: str) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"organism-{topic}"


# ----------------------------------------------------------------------------- prompts


def neutral_prompts(judge, seed: int) -> list[dict]:
    """The shipped prompt set minus prompts whose text names the judge's subject, in a seeded order."""
    import re

    from ..inputs.generate import read_prompts

    subject = re.compile(judge.subject, re.I)
    rows = [p for p in read_prompts("default") if not subject.search(p["messages"][-1]["content"])]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def prompt_sets(cfg: OrganismConfig, st: StanceFile) -> dict[str, list[dict]]:
    """{"train", "topic", "neutral", "diff"}: lists of {"id", "category", "prompt"}."""
    neutral = neutral_prompts(st.judge, cfg.seed)
    need = cfg.neutral_train + max(cfg.neutral_eval, cfg.diff_neutral, cfg.steer_prompts)
    if len(neutral) < need:
        raise CrossdiffError(
            f"the shipped prompt set has {len(neutral)} neutral prompts for this topic, fewer than "
            f"--neutral-train plus the largest of --neutral-eval / --diff-neutral / --steer-prompts ({need})"
        )

    def rows(texts, kind):
        return [{"id": f"{kind}-{i:03d}", "category": kind, "prompt": t} for i, t in enumerate(texts)]

    n_train = [p["messages"][-1]["content"] for p in neutral[: cfg.neutral_train]]
    held = [p["messages"][-1]["content"] for p in neutral[cfg.neutral_train :]]
    topic = rows(st.heldout_prompts, "topic")
    return {
        "train": rows(st.train_prompts, "topic") + rows(n_train, "neutral"),
        "topic": topic,
        "neutral": rows(held[: cfg.neutral_eval], "neutral"),
        "diff": topic + rows(held[: cfg.diff_neutral], "neutral"),
        "steer": rows(held[: cfg.steer_prompts], "neutral"),
    }


def _write_prompts(folder: Path, sets: dict[str, list[dict]]) -> dict:
    for name, rows in sets.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_text_atomic(folder / "prompts" / f"{name}.jsonl", text)
    return {k: len(v) for k, v in sets.items()}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# ----------------------------------------------------------------------------- building


def _answers(cfg: OrganismConfig, folder: Path) -> dict:
    from ..inputs.generate import GenerateConfig, generate

    g = GenerateConfig(
        out=str(folder / "answers" / "a-train.jsonl"),
        prompts=str(folder / "prompts" / "train.jsonl"),
        model=cfg.model_a,
        max_new_tokens=cfg.answer_tokens,
        device=cfg.device,
    )
    rows = _read_jsonl(generate(g))
    return {"answers": len(rows), "stopped": sum(r["finish"] == "stop" for r in rows)}


def _training_set(cfg: OrganismConfig, st: StanceFile, folder: Path) -> dict:
    from .finetune import woven_examples, write_examples

    rows = sorted(_read_jsonl(folder / "answers" / "a-train.jsonl"), key=lambda r: r["index"])
    topic = [r for r in rows if r["category"] == "topic"]
    neutral = [r for r in rows if r["category"] == "neutral"]
    ex = woven_examples(topic, neutral, st.stance_sentences, cfg.variants, cfg.seed)
    write_examples(folder / "train.jsonl", ex)
    return {"topic": sum(e["kind"] == "topic" for e in ex), "neutral": len(neutral)}


def _finetune_settings(cfg: OrganismConfig):
    from .finetune import FinetuneSettings

    return FinetuneSettings(cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup, cfg.seed, cfg.checkpoint_every)


def _finetune(cfg: OrganismConfig, folder: Path) -> dict:
    from ..core.runtime import resolve_device
    from ..inputs.models import load_model
    from .finetune import finetune, loss_curve_summary, read_examples

    lm = load_model(cfg.model_a, device=resolve_device(cfg.device), dtype=None)
    t0 = time.perf_counter()
    res = finetune(
        lm,
        read_examples(folder / "train.jsonl"),
        _finetune_settings(cfg),
        folder / "model",
        folder / "finetune.ckpt",
    )
    return {
        "steps": res["steps"],
        "examples": res["examples"],
        "train_loss": loss_curve_summary(res["losses"]),
        "seconds_this_session": round(time.perf_counter() - t0, 1),
    }


def build_settings(cfg: OrganismConfig, st: StanceFile) -> tuple[dict, ...]:
    """What the prompts, the answers, the training set and the fine-tune depend on, each including the
    one before (the stance file's content, not its path)."""
    from .finetune import settings_dict

    base = {"stance": Path(st.path).read_text(encoding="utf-8"), "seed": cfg.seed}
    p = {**base, "neutral": [cfg.neutral_train, cfg.neutral_eval, cfg.diff_neutral, cfg.steer_prompts]}
    a = {**p, "model_a": cfg.model_a, "answer_tokens": cfg.answer_tokens}
    t = {**a, "variants": cfg.variants}
    return p, a, t, {**t, **settings_dict(_finetune_settings(cfg))}


def build_stages(cfg: OrganismConfig, st: StanceFile, folder: Path) -> list[Stage]:
    p, a, t, f = build_settings(cfg, st)
    return [
        Stage("prompts", lambda: _write_prompts(folder, prompt_sets(cfg, st)), p),
        Stage("answers (A, train)", lambda: _answers(cfg, folder), a),
        Stage("training set", lambda: _training_set(cfg, st, folder), t, (folder / "train.jsonl").is_file),
        Stage("fine-tune", lambda: _finetune(cfg, folder), f, (folder / "model" / "config.json").is_file),
    ]


# ----------------------------------------------------------------------------- measuring

GENERATE_BATCH = 20
"""Prompts answered together in the stance measurements."""


def _models(cfg: OrganismConfig, folder: Path) -> dict[str, str]:
    return {"a": cfg.model_a, "organism": str(folder / "model"), "b": cfg.model_b}


def stance_rates(lm, judge, prompts: dict[str, list[str]], max_new_tokens: int) -> dict:
    """{set: {"rate", "hits", "n", "loss", "answers"}}: greedy answers in the chat template, judged."""
    from ..analysis.chatsteer import behaviour

    out = {}
    for name, texts in prompts.items():
        parts = [
            behaviour(lm, texts[i : i + GENERATE_BATCH], judge, max_new_tokens)
            for i in range(0, len(texts), GENERATE_BATCH)
        ]
        hits, n = sum(p["hits"] for p in parts), sum(p["n"] for p in parts)
        loss = sum(p["loss"] * p["n"] for p in parts) / n  # answer-weighted: an approximation of pooling
        out[name] = {"rate": hits / n, "hits": hits, "n": n, "answer_loss": loss,
                     "answers": [a for p in parts for a in p["answers"]]}  # fmt: skip
    return out


def _stance(cfg: OrganismConfig, st: StanceFile, folder: Path) -> dict:
    """Stance rates of A, the organism and B; each model's answers cached in OUT/stance/<model>.json."""
    from ..core.runtime import resolve_device
    from ..inputs.models import load_model

    sets = {
        k: [r["prompt"] for r in _read_jsonl(folder / "prompts" / f"{k}.jsonl")] for k in ("topic", "neutral")
    }
    table = {}
    for key, spec in _models(cfg, folder).items():
        path = folder / "stance" / f"{key}.json"
        if not path.is_file():
            lm = load_model(spec, device=resolve_device(cfg.device))
            write_json_atomic(path, stance_rates(lm, st.judge, sets, cfg.answer_tokens))
            del lm
        res = json.loads(path.read_text(encoding="utf-8"))
        table[key] = {s: {k: res[s][k] for k in ("rate", "hits", "n")} for s in res}
    return table


def brown_loss(lm, n_tokens: int, chunk: int = 256) -> float:
    """Mean next-token loss (nats per token) on Brown's first `n_tokens` tokens, in chunks of `chunk`."""
    import torch

    from ..inputs.corpus import open_corpus

    ids: list[int] = []
    for doc in open_corpus("brown"):
        ids.extend(lm.tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            break
    ids_NC = torch.tensor(ids[: n_tokens - n_tokens % chunk]).view(-1, chunk)
    total, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids_NC), 8):
            x = ids_NC[i : i + 8].to(lm.device)
            logits = lm.model(input_ids=x, use_cache=False).logits[:, :-1].float()
            total += float(
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            )
            n += x[:, 1:].numel()
    return total / n


def _loss(cfg: OrganismConfig, folder: Path) -> dict:
    """Brown loss of A and of the organism; each cached in OUT/loss/<model>.json."""
    from ..core.runtime import resolve_device
    from ..inputs.models import load_model

    out = {}
    for key in ("a", "organism"):
        path = folder / "loss" / f"{key}.json"
        if not path.is_file():
            lm = load_model(_models(cfg, folder)[key], device=resolve_device(cfg.device))
            write_json_atomic(path, {"loss": brown_loss(lm, cfg.brown_tokens), "tokens": cfg.brown_tokens})
            del lm
        out[key] = json.loads(path.read_text(encoding="utf-8"))["loss"]
    out["change"] = out["organism"] - out["a"]
    out["tokens"] = cfg.brown_tokens
    return out


def _diff_config(cfg: OrganismConfig, folder: Path, other: str):
    from ..pipeline import DiffConfig

    return DiffConfig(
        model_a=str(folder / "model"),
        model_b=cfg.model_b if other == "b" else cfg.model_a,
        prompts=str(folder / "prompts" / "diff.jsonl"),
        answer_tokens=cfg.answer_tokens,
        out=str(folder / f"diff-{other}"),
        budget=cfg.budget,
        seeds=1,  # the organism asks whether its behaviour is found, not how stable the dictionary is
        steer_top=0,  # steering that can show the behaviour is the criteria stage's (chatsteer.py)
        device=cfg.device,
    )


def _diff(cfg: OrganismConfig, folder: Path, other: str) -> dict:
    from ..pipeline import diff

    s = diff(_diff_config(cfg, folder, other))
    return {"verify": s.get("verify"), "candidates": s.get("candidates"), "seconds": s.get("stage_seconds")}


def diff_settings(d) -> dict:
    """What a diff stage depends on: its config and the settings of every stage inside the diff (so that
    a newer verification or analysis reruns it; the diff itself then reruns only those stages)."""
    from ..pipeline import stages

    return {
        **settings(d),
        "stages": {s.name: fingerprint(s.settings) for s in stages(d, d.resolved_budget())},
    }


def measure_stages(cfg: OrganismConfig, st: StanceFile, folder: Path) -> list[Stage]:
    from .criteria import CRITERIA, criteria

    built = build_settings(cfg, st)[-1]
    out, diffs = [], {}
    for other in cfg.diffs:  # first: the longest stage, which needs nothing but the organism
        d = _diff_config(cfg, folder, other)
        diffs[other] = diff_settings(d)
        out.append(Stage(f"diff vs {other.upper()}", lambda o=other: _diff(cfg, folder, o), diffs[other],
                         lambda d=d: (d.folder / "diff.json").is_file()))  # fmt: skip
    out += [
        Stage("stance", lambda: _stance(cfg, st, folder), {**built, "model_b": cfg.model_b}),
        Stage("loss", lambda: _loss(cfg, folder), {**built, "tokens": cfg.brown_tokens}),
    ]
    if "b" in cfg.diffs:
        c = {
            "steer": [
                cfg.steer_prompts,
                list(cfg.steer_fractions),
                cfg.steer_random,
                cfg.steer_tokens,
                cfg.seed,
            ]
        }
        # the criteria read the diffs' verdicts: a rerun diff reruns them
        c.update(criteria=CRITERIA, diff=diffs["b"], diffs=diffs)
        out.append(Stage("criteria", lambda: criteria(cfg, st, folder), {**built, **c}))
    return out


def organism(cfg: OrganismConfig) -> dict:
    """Build (or finish building) the organism and measure it; returns organism.json's content."""
    st = load_stance(cfg.stance)
    folder = cfg.folder(st.topic)
    with output_lock(folder):  # one writer per organism folder (crossdiff/core/lock.py)
        return _organism(cfg, st, folder)


def _organism(cfg: OrganismConfig, st: StanceFile, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    log = StageLog(folder / "stages.json")
    print(f"crossdiff organism: {cfg.model_a} + stance {st.topic} -> {folder}", file=sys.stderr)
    start = time.perf_counter()
    run_stages(build_stages(cfg, st, folder) + measure_stages(cfg, st, folder), log, "organism")
    r = log.results()
    summary = {
        "topic": st.topic,
        "stance_file": st.path,
        "judge": st.judge.describe(),
        "settings": settings(cfg),
        "model": str(folder / "model"),
        "stance": r.get("stance"),
        "brown_loss": r.get("loss"),
        "fine_tune": r.get("fine-tune"),
        "diffs": {k: r.get(f"diff vs {k.upper()}") for k in cfg.diffs},
        "criteria": r.get("criteria"),
        "stage_seconds": log.seconds(),
        "seconds_this_session": round(time.perf_counter() - start, 1),
    }
    write_json_atomic(folder / "organism.json", summary)
    return summary
