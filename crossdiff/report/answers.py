"""index.html's "What the models say": the answer-level diff (crossdiff/analysis/answers.py) beside
what the crosscoder found, in the sentence docs/answers.md gives: "A says X far more often than B
(counts, p); latent L fires on or before it in N% of its occurrences; removing L moves A towards B by
…". The verdicts come from verification (joined by latent id); a latent never verified says so."""

from __future__ import annotations

from .frame import finite
from .htmlkit import data_table, esc, fmt

_SHOWN = 10
"""Significant n-grams listed (summary.json's `top` holds the smallest p first)."""


def _who(side: str, names: dict) -> str:
    return names.get(side, side.upper())


def _latent_link(j: int, features) -> str:
    return f'<a href="features/{j}.html">{j}</a>' if j in features else str(j)


def _evidence(lat: dict, behaviour: dict, speaker: str, other: str, group: bool = False) -> str:
    """'removing it (them) moves A towards B by …' from the verification's row, or why there is none."""
    b = behaviour.get(int(lat["latent"]))
    if not b:
        return "not verified (no verification row)"
    verdict = str(b.get("verdict", ""))
    if verdict == "difference" or (finite(b.get("shift")) and finite(b.get("z"))):
        return (
            f"removing {'them' if group else 'it'} moves {esc(speaker)} towards {esc(other)} by {fmt(b.get('shift'))} nats/token "
            f"(z {fmt(b.get('z'))}; verdict <b>{esc(verdict)}</b>)"
        )
    return f"verdict <b>{esc(verdict or 'none')}</b>"


def _sentence(row: dict, n: int, names: dict, behaviour: dict, features, groups: dict) -> str:
    side = row.get("more_in", "")
    speaker, other = _who(side, names), _who("b" if side == "a" else "a", names)
    mine, theirs = (
        (row.get("answers_a"), row.get("answers_b"))
        if side == "a"
        else (row.get("answers_b"), row.get("answers_a"))
    )
    text = (
        f"{esc(speaker)} says <b>“{esc(row.get('ngram', ''))}”</b> in {fmt(mine)} of {fmt(n)} answers, "
        f"{esc(other)} in {fmt(theirs)} (p {fmt(row.get('p'))}, q {fmt(row.get('q'))})"
    )  # fmt: skip
    group = _group(row, groups)
    if not group:
        return text + "; no latent fires just before it in most of its occurrences."
    lat, members = group[0], ", ".join(_latent_link(int(x["latent"]), features) for x in group)
    which = f"latent {members} fires" if len(group) == 1 else f"latents {members} (removed together) fire"
    return (
        f"{text}; {which} just before it in "
        f"{fmt(100 * float(lat.get('coverage', 0)))}% of its {fmt(row.get('occurrences_in_store'))} "
        f"occurrences; {_evidence(lat, behaviour, speaker, other, len(group) > 1)}."
    )


def _group(row: dict, groups: dict[str, list[int]]) -> list[dict]:
    """The n-gram's link group (verify's candidate: its leader first), as the row's latent entries:
    the latents whose own linked n-gram this is (`groups`: n-gram -> latents, leader first); a latent
    linked here that belongs to another n-gram's group is verified there."""
    by_latent = {int(x["latent"]): x for x in row.get("latents") or [] if x.get("linked")}
    return [by_latent[j] for j in groups.get(str(row.get("ngram", "")), []) if j in by_latent]


def _example(row: dict, names: dict) -> str:
    ex = (row.get("examples") or [None])[0]
    if not isinstance(ex, dict):
        return ""
    return (
        f"<details><summary>Example: {esc(ex.get('prompt', ''))}</summary>"
        f'<div class="two"><div><h4>{esc(_who("a", names))}</h4><pre class="answer">{esc(ex.get("a", ""))}</pre></div>'
        f'<div><h4>{esc(_who("b", names))}</h4><pre class="answer">{esc(ex.get("b", ""))}</pre></div></div></details>'
    )  # fmt: skip


def answers_html(summary: dict, names: dict, behaviour: dict, features, groups: dict | None = None) -> str:
    """The section's HTML; `names` {"a": model A's name, "b": ...}; `behaviour` verify's rows by latent;
    `groups` n-gram -> its link group's latents, leader first (answerlink.ngram_groups)."""
    groups = groups or {}
    n = summary.get("n_prompts")
    sig, tested = summary.get("significant", {}).get("all", {}), summary.get("tested", {}).get("all")
    top = summary.get("top") or []
    q = (summary.get("settings") or {}).get("q", 0.05)
    intro = (
        f"<p>Both models answered the same {fmt(n)} prompts. Of {fmt(tested)} word n-grams tested, "
        f"{fmt(sig.get('a', 0))} are significantly more frequent in {esc(names['a'])}'s answers and "
        f"{fmt(sig.get('b', 0))} in {esc(names['b'])}'s (exact McNemar test on the paired answers, each "
        f"pair compared over the shorter answer's length; Benjamini–Hochberg q ≤ {fmt(q)}). A latent is "
        "linked to an n-gram when it fires in the 3 tokens before it (its lead-up) in at least half of "
        "its occurrences, at 3 times its rate elsewhere. The latents linked to one n-gram are verified "
        "together, whatever their partition: removed on the lead-up of the n-gram's occurrences, does "
        "the model that says it move towards the other (docs/answers.md)?</p>"
    )
    if not top:
        return intro + "<p>No n-gram differs significantly: the answers do not tell the models apart.</p>"
    sentences = "".join(
        f"<li>{_sentence(r, n, names, behaviour, features, groups)}{_example(r, names)}</li>" for r in top[:3]
    )
    rows = []
    for r in top[:_SHOWN]:
        lats = _group(r, groups)
        cell = ", ".join(
            f"{_latent_link(int(x['latent']), features)} ({fmt(100 * float(x.get('coverage', 0)))}%)"
            for x in lats
        )
        b = behaviour.get(int(lats[0]["latent"])) if lats else None
        verdict = esc(str(b.get("verdict"))) if b else "—"
        rows.append([r.get("ngram"), _who(r.get("more_in", ""), names), r.get("answers_a"), r.get("answers_b"),
                     r.get("p"), r.get("q"), (", ".join(str(x["latent"]) for x in lats), cell or "—"),
                     (verdict, verdict)])  # fmt: skip
    cols = ["n-gram", "more in", f"answers of {names['a']}", f"answers of {names['b']}", "p", "q",
            "linked latents (coverage)", "verdict of the group"]  # fmt: skip
    return intro + f"<ul>{sentences}</ul>" + f'<div class="scroll">{data_table(cols, rows)}</div>'
