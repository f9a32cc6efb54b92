"""The two sides of a diff as runnable models: a real model read at its crosscoder layer, changed the
way a calibration control changes it (docs/calibration.md), with per-copy edits at that layer.

    plain     the Hugging Face model as loaded
    plant     + v on chosen tokens at the layer: the tokens of a word class, or pseudo-random tokens
              (a seeded hash of the token's place in its chunk, which no model can know)
    rotated   the layer's output rotated by R and rotated back right after it: the behaviour is the
              model's own, and the crosscoder reads h R

These are the models whose activations the derived stores hold (derive.py: a planted store equals a
harvest of the planted model at the aligned rows), so behavioural verification (verify.py) measures
the controls on models that really have the planted behaviour. The model code is never reimplemented:
one forward hook on the layer's block and one pre-hook on the LM head.

`Side.forward` runs R copies of one token sequence, each with its own additive edit at the layer
(in the crosscoder's coordinates, raw units), and returns the clean layer activation, the
log-probabilities of chosen target tokens, and optionally the gradient of a weighted sum of the
first copy's log-probabilities with respect to the layer (grad=True, for first-order estimates).

Legend: R copies, T positions, D width, S scored target tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .derive import load_rotation, random_rows, rows_on_words, word_pattern


@dataclass(frozen=True)
class Window:
    """A slice of a store chunk's text: `text` is chunk[start : start + len(text)]."""

    text: str
    chunk: int
    start: int


@dataclass(frozen=True)
class Plant:
    """+ v_raw at the layer on the tokens `kind` picks: "words" (ending inside an occurrence of
    `pattern`) or "random" (random_rows with `seed`)."""

    kind: str
    v_raw_D: Tensor
    pattern: object = None
    seed: int = 0

    def mask(self, window: Window, offsets_T2: np.ndarray, special_T: np.ndarray) -> np.ndarray:
        """(T,) bool over one tokenisation of `window.text`: the tokens that get v."""
        ends = np.asarray(offsets_T2)[:, 1]
        text_T = (ends > np.asarray(offsets_T2)[:, 0]) & ~np.asarray(special_T, dtype=bool)
        if self.kind == "words":
            return rows_on_words(window.text, ends, self.pattern) & text_T
        picked = random_rows(np.full(len(ends), window.chunk), window.start + ends, self.seed)
        return picked & text_T


class SideOutput(NamedTuple):
    h_TD: Tensor
    """The layer's activation of the unedited copy 0, in the crosscoder's coordinates (raw units)."""
    logp_RS: Tensor
    """log p of each target token, per copy (float32); attached to the graph when grad=True."""
    h_leaf: Tensor | None
    """grad=True: the layer activation (R, T, D) as a leaf of the graph, for torch.autograd.grad."""


@dataclass
class Side:
    """One model of the pair as the crosscoder sees it: a LanguageModel, its layer, and the
    control's change (a plant, a rotation, or none)."""

    lm: object
    layer: int
    plant: Plant | None = None
    rotation_DD: Tensor | None = None

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def forward(
        self,
        ids_T: Tensor,
        targets_S: Tensor,
        *,
        plant_T: np.ndarray | None = None,
        deltas_RTD: Tensor | None = None,
        grad: bool = False,
    ) -> SideOutput:
        """Run copies of `ids_T` with edits `deltas_RTD` (None: one clean copy) added at the layer.

        targets_S: positions (≥ 1) whose token's log-probability is returned; the logits are computed
        only at the positions before them. grad=True keeps the graph from the layer activation (the
        leaf `h_leaf`, before the edits) to the log-probabilities.
        """
        lm, dev = self.lm, self.lm.device
        n_copies = 1 if deltas_RTD is None else deltas_RTD.shape[0]
        ids_RT = ids_T.to(dev)[None].expand(n_copies, -1)
        # The blocks below the layer run once: the copies differ only from the layer on, where the
        # edits' batch dimension broadcasts the one activation into R (tests/test_verify_power.py).
        targets_S = targets_S.to(dev)
        state: dict = {}
        rot = None if self.rotation_DD is None else self.rotation_DD.to(dev)
        plant = None
        if self.plant is not None and plant_T is not None and plant_T.any():
            plant = torch.as_tensor(plant_T, device=dev)[:, None] * self.plant.v_raw_D.to(dev)

        def block_hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            dtype = h.dtype
            h = h.float()
            if plant is not None:
                h = h + plant
            if rot is not None:
                h = h @ rot
            if grad:
                h = h.detach().requires_grad_(True)
                state["h"] = h
            state["tap"] = h[0].detach()
            if deltas_RTD is not None:
                h = h + deltas_RTD.to(dev, torch.float32)
            if rot is not None:
                h = h @ rot.T
            h = h.to(dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        def head_pre_hook(module, args):
            return (args[0][:, targets_S - 1], *args[1:])

        handles = [
            lm.blocks[self.layer].register_forward_hook(block_hook),
            lm.model.get_output_embeddings().register_forward_pre_hook(head_pre_hook),
        ]
        try:
            with torch.set_grad_enabled(grad):
                logits_RSV = lm.model(input_ids=ids_RT[:1], use_cache=False).logits
                logp_RS = logits_RSV.float().log_softmax(-1).gather(-1, ids_RT[:, targets_S, None])[..., 0]
        finally:
            for handle in handles:
                handle.remove()
        return SideOutput(state["tap"], logp_RS if grad else logp_RS.detach(), state.get("h"))


def sides_for_store(store, device: str = "cpu", lms: tuple | None = None) -> tuple[Side, Side]:
    """(A, B) as the store's activations were made: the real models, or for a derived control store
    (derive.py) the base model with its plant, itself (self-diff) or itself rotated."""
    from .models import load_model

    derived = store.meta.get("derived") or {}
    control = derived.get("control")
    id_a = store.model_a["id"].split("+")[0]
    layer_a, layer_b = int(store.model_a["layer"]), int(store.model_b["layer"])
    if lms is None:
        lm_a = load_model(id_a, device=device)
        lm_b = lm_a if control in ("self", "rotated") else load_model(store.model_b["id"], device=device)
    else:
        lm_a, lm_b = lms
    side_a, side_b = Side(lm_a, layer_a), Side(lm_b, layer_b)
    if control in ("planted", "random"):
        side_a.plant = store_plant(store)
    elif control == "rotated":
        side_b.rotation_DD = load_rotation(store)
    return side_a, side_b


def store_plant(store) -> Plant:
    """The plant of a planted or random-plant store (derive.py), as the hook that adds it live."""
    from safetensors.torch import load_file

    derived = store.meta["derived"]
    v_raw = load_file(store.root / "direction.safetensors")["v_raw"]
    if derived["control"] == "planted":
        return Plant("words", v_raw, pattern=word_pattern(derived["words"]))
    return Plant("random", v_raw, seed=int(derived["seed"]))
