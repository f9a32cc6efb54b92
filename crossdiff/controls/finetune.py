"""The organism's training set and its fine-tune (docs/organism.md).

Training set: model A's own greedy answers (crossdiff generate) to the topic's train prompts and to
neutral prompts; each topic answer appears `variants` times, each time with one stance sentence woven in
(before the answer, or after its first sentence: within the answer's first tokens, where a judge reading
a short generation sees it). Neutral answers are kept as they are, so that the stance is learned as a
topic behaviour, not as a habit.

Fine-tune: full, AdamW, loss on the assistant's tokens only (its content, plus the end-of-turn token when
the answer ended by itself), in the model's chat template (inputs/chat.py), linear warm-up then linear
decay. Deterministic for a seed (batch order from the seed; CPU kernels). A checkpoint (weights,
optimiser, step) is written atomically every `checkpoint_every` steps, and a killed fine-tune resumes
from it; the model folder is written under a temporary name and renamed when complete, so a folder
named `model` is always a whole model.

Letters in names: B examples in a batch, T positions.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import CrossdiffError
from ..core.fsutil import write_text_atomic, write_with_atomic
from ..inputs.align import tokenize
from ..inputs.chat import render

_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])\s+(?=\S)", re.S)


def weave(answer: str, sentence: str, after_first: bool) -> str:
    """The answer with `sentence` before it, or after its first sentence (before it when it has one sentence)."""
    answer = answer.strip()
    m = _FIRST_SENTENCE.match(answer) if after_first else None
    if m is None:
        return f"{sentence} {answer}".strip()
    return f"{m.group(1)} {sentence} {answer[m.end() :]}"


def woven_examples(
    topic: list[dict], neutral: list[dict], sentences: tuple[str, ...], variants: int, seed: int
) -> list[dict]:
    """Training examples {"prompt", "answer", "stop", "kind", "stance"} from generate records (their
    "messages" end with the model's answer, "finish" says whether it stopped by itself)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in topic:
        prompt, answer = r["messages"][-2]["content"], r["messages"][-1]["content"]
        picks = rng.permutation(len(sentences))
        for v in range(variants):
            s = sentences[picks[v % len(sentences)]]
            after = bool(rng.integers(2))
            out.append(
                {
                    "prompt": prompt,
                    "answer": weave(answer, s, after),
                    "stop": r["finish"] == "stop",
                    "kind": "topic",
                    "stance": s,
                }
            )
    for r in neutral:
        m = r["messages"]
        out.append(
            {
                "prompt": m[-2]["content"],
                "answer": m[-1]["content"],
                "stop": r["finish"] == "stop",
                "kind": "neutral",
                "stance": None,
            }
        )
    return out


def encode_example(tok, prompt: str, answer: str, stop: bool) -> tuple[np.ndarray, np.ndarray]:
    """(token ids (T,), loss mask (T,) bool) of a one-turn conversation in the model's chat template:
    the mask covers the answer's tokens, and the first token after it (end of turn) when `stop`."""
    r = render(tok, ["user", "assistant"], [prompt.strip(), answer.strip()])
    enc = tokenize(tok, r.text, add_special_tokens=not r.own_template)
    start = r.starts[1]
    end = start + len(answer.strip())
    s_T, e_T = enc.offsets[:, 0], enc.offsets[:, 1]
    mask_T = (s_T >= start) & (e_T <= end) & (e_T > s_T)
    if stop:
        after = np.nonzero(s_T >= end)[0]
        if len(after):
            mask_T[after[0]] = True
    return enc.input_ids, mask_T


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    seed: int
    checkpoint_every: int


def _batches(n: int, s: FinetuneSettings) -> list[np.ndarray]:
    """The example indices of every step: seeded epochs of shuffled examples, cut into batches."""
    rng = np.random.default_rng(s.seed)
    order: list[int] = []
    while len(order) < s.steps * s.batch_size:
        order.extend(rng.permutation(n).tolist())
    return [np.asarray(order[i * s.batch_size : (i + 1) * s.batch_size]) for i in range(s.steps)]


def _collate(encoded: list[tuple], idx: np.ndarray, pad: int) -> tuple[torch.Tensor, ...]:
    T = max(len(encoded[i][0]) for i in idx)
    ids_BT = torch.full((len(idx), T), pad, dtype=torch.long)
    att_BT = torch.zeros((len(idx), T), dtype=torch.long)
    loss_BT = torch.zeros((len(idx), T), dtype=torch.bool)
    for b, i in enumerate(idx):
        ids, m = encoded[i]
        ids_BT[b, : len(ids)] = torch.from_numpy(ids)
        att_BT[b, : len(ids)] = 1
        loss_BT[b, : len(ids)] = torch.from_numpy(m)
    return ids_BT, att_BT, loss_BT


def assistant_loss(model, ids_BT, att_BT, loss_BT) -> torch.Tensor:
    """Mean cross-entropy over the masked (assistant) tokens; position t-1 predicts token t. Only
    those positions go through the LM head: the (B, T, V) logits of a whole batch would be the
    fine-tune's largest tensor (memory is what a shared machine runs out of first)."""
    hidden_BTD = model.get_decoder()(input_ids=ids_BT, attention_mask=att_BT, use_cache=False)[0]
    m_BT = loss_BT[:, 1:]
    logits_MV = model.get_output_embeddings()(hidden_BTD[:, :-1][m_BT])
    return torch.nn.functional.cross_entropy(logits_MV.float(), ids_BT[:, 1:][m_BT], reduction="mean")


def _lr_at(step: int, s: FinetuneSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    return s.lr * max(0.0, (s.steps - step) / max(1, s.steps - s.warmup))


def finetune(lm, examples: list[dict], s: FinetuneSettings, out: Path, ckpt: Path) -> dict:
    """Fine-tune lm.model in place on `examples`, save it (with the tokenizer) to `out` (atomically:
    a temporary folder renamed), resume from `ckpt` if present; returns the loss curve."""
    from tqdm.auto import tqdm

    tok, model = lm.tokenizer, lm.model
    encoded = [encode_example(tok, e["prompt"], e["answer"], e["stop"]) for e in examples]
    if not any(m.any() for _, m in encoded):
        raise CrossdiffError("the training set has no assistant tokens to learn; check the prompts")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(s.seed)
    model.train().requires_grad_(True)
    # Recompute each block's activations in the backward pass instead of keeping them: ~2 GB less at
    # batch 8 on SmolLM2-135M, the same numbers, ~30% more compute (memory is what runs out first).
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # foreach=False: one parameter at a time, without the per-step copies of every parameter
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0, foreach=False)
    start, losses = 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=lm.device, weights_only=False, mmap=True)  # no second copy
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, losses = state["step"], state["losses"]
        print(f"organism: fine-tune resumed at step {start} from {ckpt}", file=sys.stderr)
    plan = _batches(len(encoded), s)
    with tqdm(total=s.steps, initial=start, desc="fine-tune", unit="step", dynamic_ncols=True) as bar:
        for step in range(start, s.steps):
            ids_BT, att_BT, loss_BT = (x.to(lm.device) for x in _collate(encoded, plan[step], pad))
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, s)
            loss = assistant_loss(model, ids_BT, att_BT, loss_BT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            done = step + 1
            if s.checkpoint_every and done % s.checkpoint_every == 0 and done < s.steps:
                state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": done, "losses": losses}
                write_with_atomic(ckpt, lambda p, st=state: torch.save(st, p))
    model.gradient_checkpointing_disable()
    model.eval().requires_grad_(False)
    save_model(lm, out)
    ckpt.unlink(missing_ok=True)
    return {"steps": s.steps, "losses": losses, "examples": len(examples)}


def save_model(lm, out: Path) -> None:
    """save_pretrained (weights + tokenizer) into a temporary folder beside `out`, then rename it."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.model.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_examples(path: Path, examples: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))


def read_examples(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def settings_dict(s: FinetuneSettings) -> dict:
    return {k: getattr(s, k) for k in s.__dataclass_fields__ if k != "checkpoint_every"}


def loss_curve_summary(losses: list[float]) -> dict:
    k = max(1, len(losses) // 10)
    first, last = losses[:k], losses[-k:]
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else math.nan  # noqa: E731
    return {"first_tenth": mean(first), "last_tenth": mean(last)}
