"""Steering that can show a behaviour (docs/steering.md, "Behaviour"): a chat model answers inside its
own chat template, the edit lands on the assistant's turn only, and the answers are judged by what they
say (a stated judge: the rate of a behaviour) and by how fluent they are (their loss under the unsteered
model), against random directions of the same norm.

    answers        greedy answers to user prompts, rendered with the model's chat template and its
                   generation prompt (inputs/chat.py; left-padded, so every prompt ends at position P-1)
    the edit       an Edit of steer.py (add a direction, ablate or clamp a latent), applied at block
                   `layer` on the answer's positions only: the last prompt position (whose output the
                   first answer token is read from) and every generated token; never on the template's
                   special tokens, the system or user turn
    behaviour      the fraction of answers the judge (a callable: answer text -> bool) says show it
    fluency        the answers' mean loss (nats per answer token, pooled) under the unsteered model:
                   a steered "effect" whose answers the plain model finds improbable is a broken model
    strengths      α times the latent's strong activation (its top activation on its examples), so
                   α = 1 is the latent firing as it does at its strongest; fractions up to a few times it

Letters in names: B prompts, T positions, D model width.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..inputs.chat import chat_template
from ..inputs.generate import cut_at_turn
from .hooks import (
    Edit,
    LatentDirection,
    _special_table,
    ablate_edit,
    add_edit,
    orthonormal_rows,
    project_edit,
    random_directions,
    random_subspaces,
)

Judge = Callable[[str], bool]


@dataclass(frozen=True)
class Answers:
    texts: list[str]
    prompt_BT: Tensor
    """The left-padded chat renderings (token ids) the answers continue."""
    prompt_mask_BT: Tensor
    answer_BN: Tensor
    """Generated token ids (B, N), right-padded after the end of each answer."""
    answer_mask_BN: Tensor
    """True on the answer's tokens: up to the end of turn (excluded) or the token limit."""


def chat_prompts(lm, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(ids_BT, attention_BT): each prompt as a one-turn user conversation in the model's chat template
    with its generation prompt (the assistant's header), left-padded."""
    from ..inputs.chat import render

    tok = lm.tokenizer
    renders = [render(tok, ["user"], [p.strip()], True) for p in prompts]
    old, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(
            [r.text for r in renders],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not renders[0].own_template,
        )
    finally:
        tok.padding_side = old
    return enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device)


@contextmanager
def answer_steering(lm, layer: int, edit: Edit, prompt_len: int):
    """Apply `edit` at block `layer` on absolute positions >= prompt_len - 1 that are not special tokens.

    Positions are counted across the forward calls of one generate (the first call reads the whole
    prompt, later ones one token each with the KV cache); keep_BT passed to the edit is that mask.
    """
    table, state = _special_table(lm), {"pos": 0}

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        T = ids.shape[1]
        pos_T = torch.arange(state["pos"], state["pos"] + T, device=ids.device)
        state["pos"] += T
        state["keep"] = (pos_T >= prompt_len - 1)[None, :] & ~table[ids]

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        new = edit(h, state["keep"]).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = [
        lm.model.register_forward_pre_hook(pre, with_kwargs=True),
        lm.blocks[layer].register_forward_hook(hook),
    ]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


def _end_ids(lm) -> set[int]:
    tok, ids = lm.tokenizer, set()
    for t in (tok.eos_token_id, tok.pad_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        ids.update(t if isinstance(t, list) else [t] if t is not None else [])
    return ids


@torch.inference_mode()
def generate_answers(
    lm, prompts: list[str], max_new_tokens: int, edit: Edit | None = None, layer: int | None = None
) -> Answers:
    """Greedy answers in the chat template; with `edit`, steered at block `layer` on the answer's
    positions (answer_steering). edit=None runs no hook at all."""
    ids_BT, att_BT = chat_prompts(lm, prompts)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    hooks = answer_steering(lm, layer, edit, ids_BT.shape[1]) if edit is not None else nullcontext()
    with hooks:
        out_BT = lm.model.generate(
            input_ids=ids_BT,
            attention_mask=att_BT,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            top_p=None,
            top_k=None,
        )
    new_BN = out_BT[:, ids_BT.shape[1] :]
    ends = torch.tensor(sorted(_end_ids(lm)), device=new_BN.device)
    is_end_BN = torch.isin(new_BN, ends)
    mask_BN = is_end_BN.long().cumsum(1) == 0  # before the first end-of-turn / pad
    texts = [tok.decode(row[m], skip_special_tokens=True) for row, m in zip(new_BN, mask_BN)]
    if not chat_template(tok)[1]:  # the plain rendering: the model may write the next turn itself
        texts = [cut_at_turn(t)[0] for t in texts]
    return Answers([t.strip() for t in texts], ids_BT, att_BT, new_BN, mask_BN)


@torch.inference_mode()
def answer_loss(lm, a: Answers) -> float:
    """Mean loss (nats per token, pooled over answers) of the answers' tokens under `lm`, unsteered,
    teacher-forced after their prompts."""
    ids = torch.cat([a.prompt_BT, a.answer_BN], 1)
    att = torch.cat([a.prompt_mask_BT, a.answer_mask_BN.long()], 1)
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    N = a.answer_BN.shape[1]
    logits = lm.model(
        input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False, logits_to_keep=N + 1
    ).logits[:, :-1]
    lp_BN = logits.float().log_softmax(-1).gather(-1, a.answer_BN[..., None])[..., 0]
    n = a.answer_mask_BN.sum()
    return float(-(lp_BN * a.answer_mask_BN).sum() / n) if n else float("nan")


def behaviour(
    lm, prompts: list[str], judge: Judge, max_new_tokens: int, edit=None, layer=None, base=None
) -> dict:
    """{"rate", "hits", "n", "loss", "answers"}: the judge's rate on the answers under `edit` and their
    fluency under the unsteered model (`base`: the unsteered LanguageModel, default `lm` itself)."""
    a = generate_answers(lm, prompts, max_new_tokens, edit, layer)
    hits = [bool(judge(t)) for t in a.texts]
    return {
        "rate": sum(hits) / len(hits),
        "hits": sum(hits),
        "n": len(hits),
        "loss": answer_loss(base or lm, a),
        "answers": a.texts,
    }


def steer_behaviour(
    lm,
    direction: LatentDirection,
    prompts: list[str],
    judge: Judge,
    strong: float,
    fractions: tuple[float, ...],
    n_random: int,
    seed: int,
    max_new_tokens: int,
) -> dict:
    """Add α·strong·d (the latent's decoder direction) on the answers, for each α in `fractions`, and
    the same for `n_random` random directions of its norm: behaviour rate and fluency of each."""
    unit_D = direction.d_raw_D * strong
    res = steer_vector_behaviour(
        lm, direction.layer, unit_D, prompts, judge, fractions, n_random, seed, max_new_tokens
    )
    return {"strong_activation": strong, **res}


def steer_vector_behaviour(
    lm,
    layer: int,
    unit_D: Tensor,
    prompts: list[str],
    judge: Judge,
    fractions: tuple[float, ...],
    n_random: int,
    seed: int,
    max_new_tokens: int,
) -> dict:
    """Add α·unit_D (raw units) at block `layer` on the answers, for each α in `fractions`, and the same
    for `n_random` random directions of its norm: {"plain", "strengths"} with each's rate and fluency."""
    rand_RD = random_directions(unit_D, n_random, seed)
    plain = behaviour(lm, prompts, judge, max_new_tokens)
    rows = []
    for alpha in fractions:
        lat = behaviour(lm, prompts, judge, max_new_tokens, add_edit(alpha * unit_D), layer)
        null = [
            behaviour(lm, prompts, judge, max_new_tokens, add_edit(alpha * r_D), layer) for r_D in rand_RD
        ]
        rates = [r["rate"] for r in null]
        rows.append(
            {
                "alpha": alpha,
                "raw_norm": float(alpha * unit_D.norm()),
                "rate": lat["rate"],
                "loss": lat["loss"],
                "null_rates": rates,
                "null_losses": [r["loss"] for r in null],
                "null_max": max(rates),
                "null_mean": float(np.mean(rates)),
                "answers": lat["answers"][:4],
            }
        )
    return {"plain": _short(plain), "strengths": rows}


def ablate_behaviour(
    lm, direction: LatentDirection, prompts: list[str], judge: Judge, max_new_tokens: int
) -> dict:
    """Behaviour rate and fluency with the latent ablated on the answers (exclusive latents), beside the
    unedited answers."""
    plain = behaviour(lm, prompts, judge, max_new_tokens)
    ablated = behaviour(lm, prompts, judge, max_new_tokens, ablate_edit(direction), direction.layer)
    return {"plain": _short(plain), "ablated": _short(ablated)}


def ablate_subspace_behaviour(
    lm,
    layer: int,
    U_KD: Tensor,
    c_D: Tensor,
    prompts: list[str],
    judge: Judge,
    n_random: int,
    seed: int,
    max_new_tokens: int,
) -> dict:
    """Behaviour rate and fluency with the span of U's rows (a group's decoder directions, raw units)
    projected out of the centred activation (c_D: the centre, raw units) on the answers, beside the
    unedited answers and `n_random` random subspaces of the same dimension (hooks.project_edit)."""
    Q_KD = orthonormal_rows(U_KD)
    plain = behaviour(lm, prompts, judge, max_new_tokens)
    ablated = behaviour(lm, prompts, judge, max_new_tokens, project_edit(Q_KD, c_D), layer)
    null = [
        behaviour(lm, prompts, judge, max_new_tokens, project_edit(R_KD, c_D), layer)
        for R_KD in random_subspaces(len(Q_KD), Q_KD.shape[1], n_random, seed)
    ]
    rates = [r["rate"] for r in null]
    return {
        "dimension": len(Q_KD),
        "plain": _short(plain),
        "ablated": _short(ablated),
        "null_rates": rates,
        "null_losses": [r["loss"] for r in null],
        "null_min": min(rates),
    }


def _short(r: dict) -> dict:
    return {**{k: r[k] for k in ("rate", "hits", "n", "loss")}, "answers": r["answers"][:4]}
