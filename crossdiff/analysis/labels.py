"""A short label per latent, computed offline from its evidence (no model describes it).

The label says what the evidence shows and nothing more: the tokens a latent fires on most among its
strongest firings (with how many of them), the word before them when it repeats (a short n-gram), what
follows them, and the tokens it promotes. "Promotes" comes from the ablation (predictions.py: the tokens
whose probability falls most when the latent is removed at its firing positions) when that was measured,
else from the logit lens when the lens is coherent (evidence.py), else it is left out.

    label(feature_doc, predictions_doc) -> {"label": "“ Kennedy” 7/20 · after “F.” · → “,” · promotes “ was”",
                                            "tokens": [[text, count], ...], "before": ..., "after": ..., ...}
"""

from __future__ import annotations

import re
from collections import Counter

_MAX_TOKENS = 3
_WORD = re.compile(r"\S+")


def _show(text: str) -> str:
    """A token as the label shows it: quoted, whitespace made visible only when it is all there is."""
    if not text.strip():
        return "“" + text.replace("\n", "↵").replace(" ", "·").replace("\t", "→") + "”"
    return "“" + text.replace("\n", "↵") + "”"


def _top(counter: Counter, n: int, min_count: int) -> list[list]:
    return [[t, c] for t, c in counter.most_common(n) if c >= min_count]


def _dedup(examples: list[dict]) -> list[dict]:
    """One example per distinct context (the same sentence seen twice would count twice)."""
    seen, out = set(), []
    for e in examples:
        key = context_key(e)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def context_key(e: dict) -> tuple:
    """What makes two examples the same context: the firing token and 60 characters either side."""
    return (
        str(e.get("text_before") or "")[-60:],
        str(e.get("text_token") or ""),
        str(e.get("text_after") or "")[:60],
    )


def promoted_tokens(feature_doc: dict | None, predictions: dict | None, n: int = 3) -> tuple[list[str], str]:
    """(tokens, source): from the ablation when measured, else a coherent logit lens, else none."""
    effects = (predictions or {}).get("token_effects") or []
    if effects:
        return [str(t[0]) for t in effects[:n] if t and t[1] < 0], "ablation"
    lens = (feature_doc or {}).get("logit_lens") or {}
    if lens.get("coherent"):
        return [str(p[0]) for p in (lens.get("promoted") or [])[:n] if p], "logit lens"
    return [], ""


def label(feature_doc: dict | None, predictions: dict | None = None) -> dict:
    """The latent's label and its parts (see the module docstring)."""
    examples = [e for e in (feature_doc or {}).get("examples") or [] if isinstance(e, dict)]
    top = _dedup(examples)
    if not top:
        return {"label": "", "tokens": [], "n": 0}
    n = len(top)
    tokens = Counter(str(e.get("text_token") or "") for e in top)
    before = Counter(_last_word(e.get("text_before")) for e in top)
    after = Counter(_first_word(e.get("text_after")) for e in top)
    before.pop("", None)
    after.pop("", None)
    need = max(2, -(-n // 4))  # a context word is named only when it recurs in a quarter of the firings
    parts = [", ".join(f"{_show(t)} {c}/{n}" for t, c in tokens.most_common(_MAX_TOKENS))]
    b, a = _top(before, 1, need), _top(after, 1, need)
    if b:
        parts.append(f"after “{b[0][0]}”")
    if a:
        parts.append(f"→ “{a[0][0]}”")
    promotes, source = promoted_tokens(feature_doc, predictions)
    if promotes:
        parts.append("promotes " + " ".join(_show(t) for t in promotes))
    return {
        "label": " · ".join(parts),
        "n": n,
        "tokens": [[t, c] for t, c in tokens.most_common(_MAX_TOKENS)],
        "before": b,
        "after": a,
        "promotes": promotes,
        "promotes_from": source,
    }


def _last_word(text) -> str:
    words = _WORD.findall(str(text or "")[-40:])
    return words[-1] if words else ""


def _first_word(text) -> str:
    words = _WORD.findall(str(text or "")[:40])
    return words[0] if words else ""
