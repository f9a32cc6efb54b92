"""The report's vocabulary: every technical term a page uses is defined once on that page, where it is
first used (a `<dfn>` in a short definitions line right under the table or card that uses it).

A `Terms` object belongs to one page: `terms.define("fve", "l0")` returns the definitions of the terms
not yet defined on the page (and nothing for those already defined), so each term is defined exactly once
per page wherever the sections that use it appear. tests/test_report.py checks that every term a page
shows is defined on it once.
"""

from __future__ import annotations

from .htmlkit import esc

TERMS: dict[str, tuple[str, str]] = {
    "candidate": (
        "candidate",
        "a latent the analysis found exclusive to one model (by its DFC partition, its relative decoder norm "
        "or its functional share; docs/design.md §5) that fired at least once. A candidate is only a lead.",
    ),
    "difference": (
        "difference",
        "a candidate whose removal from its model moves that model's predictions of the following text "
        "towards the other model's, by more than removing random directions of the same size (z ≥ 3).",
    ),
    "too rare": (
        "too rare",
        "fewer strong firings on held-out text than the verification needs (16 contexts by default): "
        "never judged, neither shown to matter nor shown not to.",
    ),
    "not verified": (
        "not verified",
        "enough strong firings, but the verification's time budget ran out first: never judged.",
    ),
    "inert": ("inert", "judged: removing it does not move its model towards the other model beyond chance."),
    "shared behaviour": (
        "shared behaviour",
        "judged: removing it moves its model away from the other model (it makes the two agree).",
    ),
    "strong": ("strong firing", "an activation of at least 0.3 × the latent's 99th-percentile activation."),
    "ell": ("ℓ", "the log-probability (nats) a model gives to the scored text that follows a firing."),
    "gap": (
        "per-segment gap",
        "|ℓ_A − ℓ_B| summed over the text's segments, a segment being the characters between consecutive "
        "positions where both tokenisations end a token (so both models score the same characters).",
    ),
    "shift": (
        "shift",
        "how much removing the latent shrinks the per-segment gap, in nats per scored token (positive: "
        "towards the other model).",
    ),
    "z": (
        "z",
        "(shift − mean of the null) / standard deviation of the null, the null being random directions.",
    ),
    "z_dictionary": (
        "z against the dictionary",
        "the same z, but the null removes other alive latents' decoder directions at the same norm "
        "(directions the model's dictionary uses), not random ones.",
    ),
    "gap_closed": (
        "gap closed",
        "the fraction of the per-segment gap on its contexts that removing the latent closes.",
    ),
    "gap_share": (
        "gap share",
        "the fraction of the per-segment gap on held-out text that a model's candidates, removed all at "
        "once from the spliced reconstruction, account for. Near zero or negative: together they explain "
        "none of the gap.",
    ),
    "fve": (
        "FVE",
        "fraction of variance explained: 1 − reconstruction error / variance, on held-out tokens.",
    ),
    "l0": ("L0", "the mean number of latents firing per token."),
    "splice": (
        "splice-in",
        "the model run with its layer replaced by the crosscoder's reconstruction; loss recovered = "
        "(zero − splice) / (zero − clean), 1 being perfect.",
    ),
    "dead": (
        "never fired",
        "the fraction of latents with no firing on the analysed tokens (training's eval.json counts the "
        "held-out sample only, a smaller set, so its dead fraction is larger).",
    ),
    "density": ("density", "the fraction of analysed tokens on which the latent fires."),
    "rel_norm": (
        "relative norm",
        "|d_B| / (|d_A| + |d_B|) of the latent's decoder rows: 0 writes only into A, 1 only into B.",
    ),
    "auroc": (
        "AUROC",
        "how well a linear probe on the other model's activations separates the latent's strong firings "
        "from the rest (0.5 chance, 1 perfect, below 0.5 worse than chance: an unreliable probe). "
        "Context information only: it does not decide a verdict.",
    ),
    "outlier": (
        "outlier",
        "an example whose activation is more than 4 × the latent's 99th percentile: one unusual context "
        "can dominate a top-k list.",
    ),
    "lens": (
        "logit lens",
        "the latent's typical write (mean activation × decoder row) read through the final norm's gain "
        "and the unembedding, in logits relative to the vocabulary's mean.",
    ),
}


class Terms:
    """The terms already defined on one page."""

    def __init__(self):
        self.done: set[str] = set()

    def define(self, *keys: str) -> str:
        """Definitions of the `keys` not defined yet on this page ('' when all are)."""
        new = [k for k in keys if k not in self.done]
        self.done.update(new)
        if not new:
            return ""
        items = "".join(
            f'<span class="term"><dfn data-term="{esc(k)}">{esc(TERMS[k][0])}</dfn>: {esc(TERMS[k][1])}</span> '
            for k in new
        )
        if len(new) > 4:  # a long list stays one click away instead of a wall of grey text
            return f'<details class="terms"><summary>Terms used above</summary><p class="terms">{items}</p></details>'
        return f'<p class="terms">{items}</p>'
