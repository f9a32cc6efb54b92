"""`crossdiff generate`: a model's own answers to a prompt set, written as conversations.

Each prompt (a JSONL line with "prompt": TEXT, or "messages": [...] ending with a user turn) is rendered
with the model's chat template (chat.py; the plain rendering for a model without one) plus the
generation prompt, answered in batches, and written as one line
    {"index", "id", "category", "messages": [... prompt ..., {"role": "assistant", "content": answer}],
     "model", "sampling", "finish"}
which `--corpus chat:OUT.jsonl` reads. Lines are appended batch by batch and fsynced, so a killed run
resumes where it stopped: prompts already answered are skipped, and a torn last line is dropped.
Every line records the sampling settings; a rerun with other settings refuses to mix them in one file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import where
from ..core.errors import CrossdiffError
from ..core.lock import writes
from .chat import PLAIN_STOPS, render
from .corpus import default_prompts_path, parse_messages, read_jsonl
from .models import DEFAULT_MODEL_A


@dataclass(frozen=True)
class GenerateConfig:
    out: str = where()
    """JSONL file of conversations to write (appended to and resumed if it exists with the same settings)."""
    prompts: str = "default"
    """JSONL file of prompts ("prompt": TEXT or "messages": [...] per line); default: the set shipped with crossdiff (docs/data.md)."""
    model: str = DEFAULT_MODEL_A
    """The model that answers: a short name (smollm2-135m, gemma3-270m), a hub id, a local directory or a .gguf file."""
    max_new_tokens: int = 80
    """Longest answer, in tokens."""
    temperature: float = 0.0
    """0: greedy decoding; above 0: sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (with --temperature above 0)."""
    seed: int = 0
    """Seed for sampling; each batch is seeded with seed + its first prompt's index, so a resumed run samples as an uninterrupted one."""
    batch_size: int = where(16)
    """Prompts answered together."""
    limit: int | None = None
    """Answer only the first N prompts."""
    device: str = where("auto")
    """cpu, cuda, cuda:N or auto (cuda when available)."""

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, f"--max-new-tokens must be positive, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}"),
            (self.limit is None or self.limit >= 1, f"--limit must be positive, got {self.limit}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CrossdiffError(message)

    def sampling(self) -> dict:
        """What decides the answers (recorded in every line)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p if self.temperature > 0 else 1.0,
            "seed": self.seed if self.temperature > 0 else None,
            "plain_stops": list(PLAIN_STOPS),  # where answers on the plain rendering are cut
        }


def read_prompts(spec: str) -> list[dict]:
    """[{"index", "id", "category", "messages"}] from a prompt file ("default": the shipped set)."""
    path = default_prompts_path() if spec == "default" else Path(spec).expanduser()
    if not path.is_file():
        raise CrossdiffError(f"prompt file {path} does not exist; pass a JSONL file of prompts")
    out = []
    for n, obj in read_jsonl(path):
        messages = parse_messages(obj, f"{path} line {n}")
        if messages[-1]["role"] != "user":
            raise CrossdiffError(f"{path} line {n}: the last message must be the user's, to be answered")
        i = len(out)
        out.append(
            {"index": i, "id": obj.get("id", i), "category": obj.get("category"), "messages": messages}
        )
    if not out:
        raise CrossdiffError(f"prompt file {path} has no prompts")
    return out


def load_answered(out: Path, model: str, sampling: dict) -> set[int]:
    """Indices already answered in `out`; drops a torn last line (a kill mid-write) in place."""
    if not out.is_file():
        return set()
    raw = out.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1]  # everything up to the last complete line
    lines = keep.decode("utf-8").splitlines()
    try:
        records = [json.loads(x) for x in lines if x.strip()]
    except json.JSONDecodeError:
        raise CrossdiffError(
            f"{out} is not a crossdiff generate file (a line is not JSON); choose another --out"
        ) from None
    if len(keep) < len(raw):
        with open(out, "r+b") as f:
            f.truncate(len(keep))
            os.fsync(f.fileno())
    for r in records:
        if r.get("model") != model or r.get("sampling") != sampling:
            raise CrossdiffError(
                f"{out} holds answers of {r.get('model')} with sampling {r.get('sampling')}; "
                "rerun with those settings to resume, or choose another --out"
            )
    return {r["index"] for r in records}


@writes(lambda cfg: cfg.out)
def generate(cfg: GenerateConfig) -> Path:
    """Answer every prompt not yet answered in cfg.out; returns the path."""
    from tqdm.auto import tqdm

    from ..core.runtime import resolve_device
    from .models import load_model

    out, sampling = Path(cfg.out), cfg.sampling()
    prompts = read_prompts(cfg.prompts)[: cfg.limit]
    done = load_answered(out, cfg.model, sampling)
    todo = [p for p in prompts if p["index"] not in done]
    if not todo:
        print(f"{out} already holds answers to all {len(prompts)} prompts", file=sys.stderr)
        return out
    lm = load_model(cfg.model, device=resolve_device(cfg.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    start, n = time.perf_counter(), 0
    with (
        open(out, "a", encoding="utf-8") as f,
        tqdm(total=len(prompts), initial=len(done), unit="answer") as bar,
    ):
        for i in range(0, len(todo), cfg.batch_size):
            batch = todo[i : i + cfg.batch_size]
            answers = answer_batch(lm, [p["messages"] for p in batch], cfg, seed=cfg.seed + batch[0]["index"])
            for p, (text, finish) in zip(batch, answers):
                record = {
                    "index": p["index"],
                    "id": p["id"],
                    "category": p["category"],
                    "messages": p["messages"] + [{"role": "assistant", "content": text}],
                    "model": cfg.model,
                    "sampling": sampling,
                    "finish": finish,
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a batch is on disk before the next starts: a kill loses at most one
            n += len(batch)
            bar.update(len(batch))
    minutes = (time.perf_counter() - start) / 60
    print(
        f"{n} answers by {cfg.model} in {minutes * 60:.0f} s ({n / minutes:.1f} per minute) -> {out}",
        file=sys.stderr,
    )
    return out


def cut_at_turn(text: str) -> tuple[str, bool]:
    """(answer, whether it was cut): a model on the plain rendering writing another turn itself is cut
    at the first chat.PLAIN_STOPS marker."""
    cut = min((text.find(s) for s in PLAIN_STOPS if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def answer_batch(
    lm, conversations: list[list[dict]], cfg: GenerateConfig, seed: int
) -> list[tuple[str, str]]:
    """(answer, finish) per conversation: "stop" when the model ended its turn, "length" at the limit."""
    tok = lm.tokenizer
    renders = [
        render(tok, [m["role"] for m in c], [m["content"].strip() for m in c], True) for c in conversations
    ]
    own = renders[0].own_template
    old, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok([r.text for r in renders], return_tensors="pt", padding=True, add_special_tokens=not own)
    finally:
        tok.padding_side = old
    enc = enc.to(lm.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sample = cfg.temperature > 0
    if sample:
        torch.manual_seed(seed)
    kwargs = (
        {"temperature": cfg.temperature, "top_p": cfg.top_p} if sample else {"top_p": None, "top_k": None}
    )
    out_BT = lm.model.generate(
        **enc, max_new_tokens=cfg.max_new_tokens, do_sample=sample, pad_token_id=pad, **kwargs
    )
    new_BT = out_BT[:, enc["input_ids"].shape[1] :]
    results = []
    for row in new_BT.tolist():
        ended = tok.eos_token_id in row or (pad in row and pad != tok.eos_token_id)
        text = tok.decode(row, skip_special_tokens=True)
        if not own:
            text, cut = cut_at_turn(text)
            ended = ended or cut
        results.append((text.strip(), "stop" if ended else "length"))
    return results
