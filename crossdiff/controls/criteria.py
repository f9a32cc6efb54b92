"""The organism's pass criteria (issue #22; docs/organism.md), judged on the diff of the organism (model
A of the diff) against model B, each with its number:

    found        the stance latent is a verified `difference`, among the report's top 3 (the verified
                 differences of both models, most of the gap closed first, as report.py lists them)
    contexts     its strongest contexts are stance text or its lead-up: at least half of its top
                 CONTEXT_TOP examples (features/<latent>.json) sit in an answer sentence the stance
                 judge accepts, or in the sentence just before one
    steering     adding its decoder direction on neutral prompts' answers (chatsteer.py) raises the
                 stance rate above the unsteered rate and above every random direction of its norm, at
                 one of the strengths (fractions of its strongest activation)
    ablation     ablating it on held-out topic prompts' answers lowers the stance rate

The stance latent is the organism's candidate with the largest share of stance contexts among its
top examples (ties: the higher candidate score); none with any means the diff did not find the stance.
These rules (criteria 1) were fixed before any organism was built, and are reported as they come out.

Criteria 2 (fixed after the build topic and the first report topic were seen, before the second report
topic, chess, was built) judge the *stance finding*: the organism's verified candidate (a latent, or a
linked n-gram's group: verify's LINK_RULES 3) whose verification contexts, the contexts its verdict was
computed on, are most often stance text or its lead-up (ties: the report's order). On each diff (vs B
and vs A):

    found        it is a verified `difference` among the report's top 3
    contexts     at least half of its verification contexts are stance contexts
    steering     adding its write (each member's decoder row times its mean strongest activation in
                 those contexts, summed) at α = 1, 2, 4 on neutral prompts' answers gives a stance rate
                 above the unsteered one and above every random direction of its norm, at one α
    ablation     projecting its members' decoder directions out of the organism's centred activation
                 on held-out topic prompts' answers (chatsteer.ablate_subspace_behaviour: shared latents
                 included) gives a stance rate below the unedited one and below every random subspace of
                 the same dimension
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from ..analysis.results import as_float

CONTEXT_TOP = 10
"""Top examples of a latent read for its contexts."""
CONTEXT_SHARE = 0.5
"""The `contexts` criterion: at least this share of them in stance text or its lead-up."""
TOP_DIFFERENCES = 3
"""The `found` criterion: the report's top differences the stance latent must be among."""
CRITERIA = 2
"""Version of the criteria computed (1: the stance latent by its top examples; 2: besides it, the stance
finding by its verification contexts, on each diff); in the criteria stage's settings."""

_BOUNDARY = re.compile(r"[.!?](?=\s)|\n")


def stance_context(example: dict, judge) -> bool:
    """Whether an example's token lies in an assistant sentence the judge accepts, or in the sentence
    right before one (its lead-up)."""
    if example.get("role") not in (None, "assistant"):
        return False
    before, token, after = (example.get(k, "") for k in ("text_before", "text_token", "text_after"))
    starts = [m.end() for m in _BOUNDARY.finditer(before)]
    head = before[starts[-1] :] if starts else before
    ends = [m.end() for m in _BOUNDARY.finditer(after)]
    own = head + token + (after[: ends[0]] if ends else after)
    nxt = after[ends[0] : ends[1]] if len(ends) > 1 else after[ends[0] :] if ends else ""
    return judge(own) or judge(nxt)


def context_share(doc: dict | None, judge) -> tuple[float, int]:
    """(share of stance contexts, examples read) among a feature file's top examples."""
    ex = (doc or {}).get("examples", [])[:CONTEXT_TOP]
    if not ex:
        return 0.0, 0
    return sum(stance_context(e, judge) for e in ex) / len(ex), len(ex)


def _feature(run: Path, latent: int) -> dict | None:
    p = run / "analysis" / "features" / f"{latent}.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def find_stance_latent(run: Path, judge) -> dict:
    """The organism's (model A's) candidate whose top examples are most often stance text, with its
    rank among A's candidates (by score) and among the verified differences (report order)."""
    from ..analysis.results import load_results

    rows = load_results(run).rows
    cands = [r for r in rows if r.get("side") == "a"]
    cands.sort(
        key=lambda r: -as_float(r.get("score")) if math.isfinite(as_float(r.get("score"))) else math.inf
    )
    scored = []
    for rank, r in enumerate(cands, 1):
        share, n = context_share(_feature(run, int(r["latent"])), judge)
        scored.append((share, -rank, r, n))
    diffs = [r for r in rows if r.get("behaviour_verdict") == "difference"]
    diffs.sort(
        key=lambda r: (
            -as_float(r.get("behaviour_gap_closed"))
            if math.isfinite(as_float(r.get("behaviour_gap_closed")))
            else math.inf
        )
    )
    order = [int(r["latent"]) for r in diffs]
    best = max(scored, key=lambda x: (x[0], x[1]), default=None)
    if best is None or best[0] == 0:
        return {"latent": None, "candidates_a": len(cands), "differences": order,
                "with_stance_contexts": 0}  # fmt: skip
    share, neg_rank, r, n = best
    latent = int(r["latent"])
    keys = ("verdict", "shift", "z", "z_dictionary", "gap_closed", "n_strong", "n_contexts")
    return {
        "latent": latent,
        "partition": r.get("partition"),
        "candidate_rank": -neg_rank,
        "candidates_a": len(cands),
        "with_stance_contexts": sum(s > 0 for s, *_ in scored),
        "context_share": share,
        "contexts_read": n,
        "behaviour": {k: r.get(f"behaviour_{k}") for k in keys},
        "difference_rank": order.index(latent) + 1 if latent in order else None,
        "differences": order,
        "top_contexts": [
            {k: e.get(k) for k in ("value", "role", "text_before", "text_token", "text_after")}
            for e in (_feature(run, latent) or {}).get("examples", [])[:3]
        ],
    }


def criteria(cfg, st, folder: Path) -> dict:
    """Every criterion of the module docstring, with its number and pass / fail: criteria 1 on the diff
    vs B, and criteria 2 (`findings`) on each diff present."""
    out = _criteria_1(cfg, st, folder)
    out["findings"] = {
        other: _criteria_2(cfg, st, folder, other)
        for other in ("b", "a")
        if (folder / f"diff-{other}" / "run" / "verification" / "summary.json").is_file()
    }
    return out


def _criteria_1(cfg, st, folder: Path) -> dict:
    run = folder / "diff-b" / "run"
    found = find_stance_latent(run, st.judge)
    out = {"stance_latent": found, "rules": {
        "found": f"verified difference among the report's top {TOP_DIFFERENCES}",
        "contexts": f">= {CONTEXT_SHARE:g} of its top {CONTEXT_TOP} examples in stance text or its lead-up",
        "steering": "on neutral prompts: stance rate > unsteered and > every random direction of its norm, at one strength",
        "ablation": "on held-out topic prompts: stance rate ablated < unedited",
    }}  # fmt: skip
    latent = found["latent"]
    rank = found.get("difference_rank")
    out["found"] = {"difference_rank": rank, "pass": rank is not None and rank <= TOP_DIFFERENCES}
    out["contexts"] = {"share": found.get("context_share", 0.0),
                       "pass": found.get("context_share", 0.0) >= CONTEXT_SHARE}  # fmt: skip
    if latent is None:
        out["steering"] = out["ablation"] = {"pass": False, "why": "no candidate's contexts are stance text"}
        return out
    out.update(_cached_edits(cfg, st, folder, run, latent))
    return out


def _cached_edits(cfg, st, folder: Path, run: Path, latent: int) -> dict:
    """_edits, kept in OUT/criteria/edits.json with what it depends on (a rerun reuses it)."""
    key = {
        "latent": latent,
        "steer": _steer_settings(cfg),
        "crosscoder": _sha(run / "crosscoder.safetensors"),
    }
    return _cached(folder / "criteria" / "edits.json", key, lambda: _edits(cfg, st, folder, run, latent))


def _steer_settings(cfg) -> list:
    """The organism settings the steering and ablation edits depend on (their caches' keys)."""
    return [cfg.steer_prompts, list(cfg.steer_fractions), cfg.steer_random, cfg.steer_tokens, cfg.seed]


def _steering_judged(steer: dict, **extra) -> dict:
    """A steering result with its criterion: a stance rate above the unsteered one and every random
    direction's, at one strength at least."""
    base = steer["plain"]["rate"]
    wins = [s["alpha"] for s in steer["strengths"] if s["rate"] > max(base, s["null_max"])]
    return {**steer, **extra, "pass": bool(wins), "passing_alphas": wins}


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else ""


def _edits(cfg, st, folder: Path, run: Path, latent: int) -> dict:
    """Steering on neutral prompts and ablation on held-out topic prompts, on the organism itself."""
    from ..analysis.chatsteer import ablate_behaviour, steer_behaviour
    from ..analysis.hooks import latent_direction
    from ..coder.crosscoder import Crosscoder
    from ..core.runtime import resolve_device
    from ..inputs.models import load_model

    device = resolve_device(cfg.device)
    cc = Crosscoder.from_pretrained(run, device="cpu")
    doc = _feature(run, latent) or {}
    strong = max((e["value"] for e in doc.get("examples", [])), default=0.0)
    direction = latent_direction(cc, latent, "a", typical=strong)
    lm = load_model(str(folder / "model"), device=device)

    neutral = _prompts(folder, "steer")
    topic = _prompts(folder, "topic")[: cfg.steer_prompts]
    steer = steer_behaviour(lm, direction, neutral, st.judge, strong, tuple(cfg.steer_fractions),
                            cfg.steer_random, cfg.seed, cfg.steer_tokens)  # fmt: skip
    res = {"steering": _steering_judged(steer)}
    if direction.exclusive:
        abl = ablate_behaviour(lm, direction, topic, st.judge, cfg.steer_tokens)
        res["ablation"] = {**abl, "pass": abl["ablated"]["rate"] < abl["plain"]["rate"]}
    else:
        res["ablation"] = {
            "pass": False,
            "why": f"latent {latent} is shared: its activation needs model B's text",
        }
    return res


# ----------------------------------------------------------------------------- criteria 2


def context_example(chunks, ctx: dict, width: int = 300) -> dict:
    """A scored verification context as a top example (stance_context's input): the chunk's text
    around the scored span's start, with the role of the message it lies in. `chunks`: chunk id ->
    its text record (`.get`: ablation.ChunkTexts, or a dict)."""
    t = chunks.get(int(ctx["chunk"]))
    if t is None:
        return {"role": None}
    pos = int(ctx["start"]) + int(ctx["c0"])
    role = next((r for r, _, ms, me in t.get("messages") or () if ms <= pos < me), None)
    return {"role": role, "text_before": t["text"][max(0, pos - width) : pos], "text_token": "",
            "text_after": t["text"][pos : pos + width]}  # fmt: skip


def find_stance_finding(run: Path, store, judge) -> dict:
    """The organism's (side a) verified candidate whose verification contexts are most often stance
    contexts, with its report rank; {"latent": None, ...} when no verified context is stance text."""
    from ..analysis.ablation import ChunkTexts
    from ..analysis.answerlink import _linked_rows
    from ..analysis.results import load_results

    rows = {int(r["latent"]): r for r in load_results(run).rows}
    diffs = sorted((r for r in rows.values() if r.get("behaviour_verdict") == "difference"),
                   key=lambda r: -_finite(r.get("behaviour_gap_closed")))  # fmt: skip
    order = [int(r["latent"]) for r in diffs]
    chunks, linked, scored = ChunkTexts(store), _linked_rows(run), []
    for path in sorted((run / "verification" / "latents").glob("*.json")):
        res = json.loads(path.read_text(encoding="utf-8"))
        ctx = res.get("contexts", [])
        if res.get("side") != "a" or not ctx:
            continue
        hits = [stance_context(context_example(chunks, c), judge) for c in ctx]
        rank = order.index(res["latent"]) + 1 if res["latent"] in order else math.inf
        scored.append((sum(hits) / len(hits), -rank, res, hits))
    best = max(scored, key=lambda x: (x[0], x[1]), default=None)
    if best is None or best[0] == 0:
        return {"latent": None, "verified_a": len(scored), "differences": order}
    share, neg_rank, res, hits = best
    j = int(res["latent"])
    strongest = sorted(res["contexts"], key=lambda c: -c["f"])[:3]
    return {
        "latent": j,
        "members": res.get("group") or [j],
        "ngram": linked.get(j, {}).get("ngram"),
        "verified_a": len(scored),
        "verdict": res["verdict"],
        **{k: res.get(k) for k in ("shift", "z", "z_dictionary", "gap_closed", "n_contexts")},
        "context_share": share,
        "difference_rank": -neg_rank if math.isfinite(-neg_rank) else None,
        "differences": order,
        "f_members": np.mean([c["f_members"] for c in res["contexts"]], axis=0).tolist()
        if all("f_members" in c for c in res["contexts"])
        else None,
        "top_contexts": [{k: c[k] for k in ("f", "shift", "text_before", "scored")} for c in strongest],
    }


def _finite(v) -> float:
    x = as_float(v)
    return x if math.isfinite(x) else -math.inf


def _criteria_2(cfg, st, folder: Path, other: str) -> dict:
    """Criteria 2 on the diff vs `other` (module docstring)."""
    from ..inputs.store import Store

    run = folder / f"diff-{other}" / "run"
    found = find_stance_finding(run, Store.open(folder / f"diff-{other}" / "store"), st.judge)
    rank = found.get("difference_rank")
    out = {
        "finding": found,
        "found": {"difference_rank": rank, "pass": rank is not None and rank <= TOP_DIFFERENCES},
        "contexts": {
            "share": found.get("context_share", 0.0),
            "pass": found.get("context_share", 0.0) >= CONTEXT_SHARE,
        },  # fmt: skip
    }
    if found["latent"] is None or found.get("f_members") is None:
        out["steering"] = out["ablation"] = {
            "pass": False,
            "why": "no verified context of the organism is stance text",
        }
        return out
    key = {"finding": [found["latent"], found["members"], found["f_members"]],
           "steer": _steer_settings(cfg),
           "crosscoder": _sha(run / "crosscoder.safetensors")}  # fmt: skip
    out.update(_cached(folder / "criteria" / f"finding-{other}.json", key,
                       lambda: _group_edits(cfg, st, folder, run, found)))  # fmt: skip
    return out


def _cached(path: Path, key: dict, compute) -> dict:
    from ..core.fsutil import write_json_atomic

    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return cached["result"]
    res = compute()
    write_json_atomic(path, {"key": key, "result": res})
    return res


def _group_edits(cfg, st, folder: Path, run: Path, found: dict) -> dict:
    """Steering with the finding's write on neutral prompts, and its members' directions projected out
    on held-out topic prompts, on the organism itself, each against random directions / subspaces."""
    import torch

    from ..analysis.chatsteer import ablate_subspace_behaviour, steer_vector_behaviour
    from ..analysis.evidence import decoder_rows
    from ..coder.crosscoder import Crosscoder
    from ..core.runtime import resolve_device
    from ..inputs.models import load_model

    cc = Crosscoder.from_pretrained(run, device="cpu")
    side = cc.side("a")
    U_GD = (decoder_rows(cc, found["members"], "a") / side.scale).float()
    write_D = (torch.as_tensor(found["f_members"], dtype=torch.float32)[:, None] * U_GD).sum(0)
    centre_D = side.b_dec.detach().float().cpu() / side.scale
    layer = cc.cfg.model("a").layer
    lm = load_model(str(folder / "model"), device=resolve_device(cfg.device))
    neutral, topic = _prompts(folder, "steer"), _prompts(folder, "topic")[: cfg.steer_prompts]
    steer = steer_vector_behaviour(lm, layer, write_D, neutral, st.judge, tuple(cfg.steer_fractions),
                                   cfg.steer_random, cfg.seed, cfg.steer_tokens)  # fmt: skip
    abl = ablate_subspace_behaviour(lm, layer, U_GD, centre_D, topic, st.judge, cfg.steer_random, cfg.seed,
                                    cfg.steer_tokens)  # fmt: skip
    lower = abl["ablated"]["rate"] < min(abl["plain"]["rate"], abl["null_min"])
    return {
        "steering": _steering_judged(steer, write_norm=float(write_D.norm())),
        "ablation": {**abl, "pass": bool(lower)},
    }


def _prompts(folder: Path, name: str) -> list[str]:
    path = folder / "prompts" / f"{name}.jsonl"
    return [json.loads(x)["prompt"] for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
