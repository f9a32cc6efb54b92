"""The report's headline: what the run found, in words generated from its results.

Each sentence is derived from a file the report reads, and none claims more than the verdicts do: a
`difference` is "removing it moves its model towards the other", never "model B knows X"; candidates
never judged (too rare, not verified) are counted and said to be unjudged, not absent; controls not run
are named as missing, with the command. The strength of each finding is graded from its numbers:

    strong     z ≥ 5 against random directions, and z ≥ 3 against the dictionary's own directions
    moderate   z ≥ 3 against random directions (the verdict's bar), and not weak against the dictionary
               (or not tested against it: an older verification)
    weak       a difference by the verdict's rule whose z against the dictionary's directions is below 3
"""

from __future__ import annotations

from .frame import finite, num, pct, side_label
from .htmlkit import esc, fmt

NEVER_JUDGED = ("too rare", "not verified")


def strength(b: dict) -> str:
    z, zd = b.get("z"), b.get("z_dictionary")
    if finite(zd) and zd < 3:
        return "weak"
    return "strong" if finite(z) and z >= 5 and finite(zd) else "moderate"


def _said(data, j: int) -> str:
    """For a linked n-gram's group led by `j` (verify's LINK_RULES 3): ", removed together with latents
    ..., which fire just before M says “n-gram” (x of n answers; the other model y)"; else ""."""
    g = data.link_groups.get(j)
    if g is None:
        return ""
    answers = getattr(data, "answers", None) or {}
    e, m = {x.get("ngram"): x for x in answers.get("top") or []}.get(g["ngram"], {}), g["side"]
    mine, theirs = e.get(f"answers_{m}"), e.get(f"answers_{'b' if m == 'a' else 'a'}")
    others = [str(k) for k in g["members"][1:]]
    with_ = f", removed together with latent{'s' * (len(others) > 1)} {', '.join(others)}," if others else ""
    counts = (
        f" ({fmt(mine)} of {fmt(answers.get('n_prompts'))} answers; the other model {fmt(theirs)})"
        if e
        else ""
    )
    return f"{with_} which fire{'s' * (not others)} just before {side_label(m)} says “{g['ngram']}”{counts}"


def _finding(b: dict, label: str, steer: str | None, said: str = "", group: bool = False) -> str:
    j, m = int(b["latent"]), side_label(b.get("side")) or "?"
    other = "A" if m == "B" else "B"
    zd = b.get("z_dictionary")
    dict_part = "; not tested against the dictionary's own directions"
    if finite(zd):
        dict_part = f"; z {num(zd, 1)} against the dictionary's own directions"
        if zd < 3:
            dict_part += " (below 3: removing other dictionary directions of that size does much the same)"
    n = b.get("n_contexts")
    what = f" — {esc(label)}" if label else ""
    steer_part = f" Steering it: {esc(steer)}." if steer else ""
    return (
        f'<li><b class="grade {strength(b)}">{strength(b)}</b> evidence: '
        f'<a href="features/{j}.html">latent {j}</a> ({m}){esc(said)}{what}. Removing {"them" if group else "it"} moves {m}\'s predictions '
        f"towards {other}'s by {num(b.get('shift'), 3)} nats per token (z {num(b.get('z'), 1)} against random "
        f"directions{dict_part}), closing {pct(b.get('gap_closed'))} of the gap on its "
        f"{fmt(n)} contexts.{steer_part}</li>"
    )


def _counts(behaviour: dict[int, dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in behaviour.values():
        v = str(b.get("verdict") or "not verified")
        out[v] = out.get(v, 0) + 1
    return out


def _whole(verification: dict | None) -> str:
    whole = (verification or {}).get("whole") or {}
    parts = []
    for m in "ab":
        share = (whole.get(m) or {}).get("share")
        if not finite(share):
            continue
        if share <= 0.01:
            how = "none" if share <= 0 else "almost none"
            parts.append(
                f"{m.upper()}'s candidates, removed together, account for {pct(share)} of the per-segment gap "
                f"on held-out text: together they explain {how} of how the models differ there"
            )
        else:
            parts.append(
                f"{m.upper()}'s candidates account for {pct(share)} of the per-segment gap on held-out text"
            )
    return "; ".join(parts)


def _controls(cal, diff_dir: str) -> str:
    by_arch = (cal or {}).get("by_arch") if isinstance(cal, dict) else None
    if not isinstance(by_arch, dict) or not by_arch:
        return (
            "<b>Controls not run</b>: nothing here shows that this diff finds a difference planted in A or "
            "stays silent on identical models. Run "
            f"<code>crossdiff calibrate --out {esc(diff_dir)}</code> (docs/calibration.md)."
        )
    parts = []
    for arch, res in by_arch.items():
        if not isinstance(res, dict):
            continue
        bits = []
        for key, name in (("positive", "the planted word concept"), ("positive_random", "the random plant")):
            pos = res.get(key) or {}
            if pos:
                ok = bool(pos.get("recovered")) and bool(pos.get("verified"))
                bits.append(f"{name} {'found and verified' if ok else 'missed'}")
        neg = res.get("negative") or {}
        for key, name in (
            ("self_false_exclusive", "self-diff"),
            ("rotated_false_exclusive", "rotated self-diff"),
        ):
            if neg.get(key) is not None:
                bits.append(f"{fmt(neg.get(key))} false differences in the {name}")
        parts.append(f"{esc(arch)}: " + ", ".join(esc(b) for b in bits))
    return "<b>Controls</b> (crossdiff calibrate) — " + "; ".join(parts) + "."


def _next(
    counts: dict, n_diff: int, verified: bool, cal, steered: bool, diff_dir: str, run: str
) -> list[str]:
    out = []
    if not verified:
        out.append(f"<code>crossdiff verify --run {esc(run)}</code>: no candidate has been judged yet.")
    if counts.get("too rare"):
        out.append(
            f"More text (<code>crossdiff diff --out {esc(diff_dir)}-medium --budget medium</code>, or a larger corpus): "
            f"{counts['too rare']} candidate{'s' * (counts['too rare'] != 1)} had too few strong firings on held-out "
            "text to be judged."
        )
    if counts.get("not verified"):
        out.append(
            f"More exact ablations (<code>crossdiff verify --run {esc(run)} --top N</code>): "
            f"{counts['not verified']} candidate{'s' * (counts['not verified'] != 1)} were ranked below the "
            "ablation budget (a count of ablations per model, never seconds)."
        )
    if not (isinstance(cal, dict) and cal.get("by_arch")):
        out.append(f"<code>crossdiff calibrate --out {esc(diff_dir)}</code>: the controls.")
    if n_diff and not steered:
        out.append(
            f"<code>crossdiff steer --run {esc(run)} --top {n_diff}</code>: what adding the differences does."
        )
    return out


def headline_html(data, labels: dict[int, dict]) -> str:
    """The headline section of index.html (data: report.RunData)."""
    behaviour, v = data.behaviour, data.verification
    # the analysis's candidates, and the latents verification added (those linked to the answers)
    n_cand = len({int(r["latent"]) for r in data.rows if r.get("side") and r.get("verdict") != "dead"}
                 | {int(j) for j in behaviour})  # fmt: skip
    steer = {int(r["latent"]): r.get("steer_verdict") for r in data.rows if r.get("steer_verdict")}
    diff_dir = str(data.run.parent if data.run.name == "run" else data.run)
    diffs = sorted(
        (b for b in behaviour.values() if b.get("verdict") == "difference"),
        key=lambda b: -(b.get("z") if finite(b.get("z")) else 0.0),
    )
    counts = _counts(behaviour)
    judged = sum(c for k, c in counts.items() if k not in NEVER_JUDGED)
    unjudged = n_cand - judged
    if v is None and not behaviour:
        lead = (
            f"{n_cand} candidates, none judged yet: a candidate is only a lead until "
            "<code>crossdiff verify</code> measures what removing it does."
        )
    elif diffs:
        lead = (
            f"{len(diffs)} behavioural difference{'s' * (len(diffs) != 1)} verified out of {n_cand} candidates; "
            f"{unjudged} of the {n_cand} were never judged."
        )
    elif judged == 0:
        lead = (
            f"No candidate judged: all {n_cand} candidates were too rare or beyond the ablation budget, so "
            "this run says nothing yet about whether the models differ."
        )
    else:
        lead = (
            f"No behavioural difference verified: {judged} of {n_cand} candidates were judged and none passed; "
            f"{unjudged} were never judged, so this is not evidence that the models do not differ."
        )
    items = []
    for b in diffs:
        j = int(b["latent"])
        group = len((data.link_groups.get(j) or {}).get("members", ())) > 1
        items.append(_finding(b, (labels.get(j) or {}).get("label", ""), steer.get(j), _said(data, j), group))
    if unjudged > 0 and behaviour:
        why = ", ".join(f"{counts[k]} {k}" for k in NEVER_JUDGED if counts.get(k))
        items.append(
            f"<li><b>Not judged</b>: {unjudged} of {n_cand} candidates ({esc(why or 'no verification row')}).</li>"
        )
    other = [f"{counts[k]} {k}" for k in ("inert", "shared behaviour") if counts.get(k)]
    if other:
        items.append(f"<li><b>Judged, not a difference</b>: {esc(', '.join(other))}.</li>")
    whole = _whole(v)
    if whole:
        items.append(f"<li><b>Whole diff</b>: {esc(whole)}.</li>")
    items.append(f"<li>{_controls(data.calibration, diff_dir)}</li>")
    nxt = _next(
        counts,
        len(diffs),
        v is not None or bool(behaviour),
        data.calibration,
        bool(steer),
        diff_dir,
        str(data.run),
    )
    if nxt:
        items.append("<li><b>Next</b>: " + " ".join(nxt) + "</li>")
    return f'<section class="headline"><p class="lead">{lead}</p><ul>{"".join(items)}</ul></section>'


def headline_text(data, labels: dict[int, dict]) -> str:
    """The headline as plain text (for docs and the command line)."""
    import re
    from html import unescape

    html = headline_html(data, labels)
    html = html.replace("</li>", "\n").replace("</p>", "\n")
    return unescape(re.sub(r"<[^>]+>", "", html)).strip()
