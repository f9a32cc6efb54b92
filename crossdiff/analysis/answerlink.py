"""The link between the answer-level diff (answers.py) and the crosscoder's latents.

For each significant n-gram, in the answers of the model that says it more: every occurrence the store
holds (a chunk of that model's answer file, inside the assistant message) gets a *window*: its
*lead-up*, the `before` aligned store rows just before the n-gram's first one (in the message, or at
the end of the turn before it when the n-gram opens the answer), where the model decides to say it.
The n-gram's own rows are not in it: the latents that fire on a word once it is said detect the word,
which both models do (LINK_WINDOW 1 included them, and the build organism's "nuclear" was linked to
"nuclear"-token latents whose removal breaks the prediction of " power" after "nuclear" in both
models' sense, not the choice to say it; docs/organism.md). The crosscoder encodes every answer row
of the store (and each answer's lead-in rows) once, batch by batch, shard by shard (memory: one shard's
firing entries). Per n-gram and latent:

    coverage   share of the occurrences in whose window the latent fires (f > 0)
    lift       the latent's firing rate on window rows / its rate on the model's answer rows outside
               the n-gram's windows

A latent with coverage >= min_coverage and lift >= min_lift is *linked* (at most max_links per n-gram,
largest coverage first): it becomes a candidate for verification whatever its partition or share
(`read_linked`, read by verify.py's `candidates`). The converse, for each candidate and linked latent:
the n-grams that its strongest contexts (the analysis's top examples) precede.

RUN/answers/latents.csv (results.ANSWERS, joined to latents.csv by `load_results`) has one row per
candidate and linked latent: side, the rule that made it a candidate (`partition`, `norm`, `share`
or `answer-link`), and its best linked n-gram with coverage and lift.

Legend: N firing entries, F latents, R rows of one shard's answers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..core.errors import CrossdiffError
from .answers import ngram_spans, read_ngrams
from .results import ANSWERS, read_stage, write_stage

MIN_OCCURRENCES = 3
"""Fewer occurrences in the store than this: the n-gram's coverage is not a link (too few to share)."""
LINK_WINDOW = 2
"""What a window is (1: the n-gram's rows and the `before` rows before them; 2: the `before` rows before
them only, its lead-up); in the answers stage's settings (answers.VERSION's record)."""


def open_run(cfg) -> dict:
    """{"run", "cc", "store", "table", "threshold"} of an analysed run (results.open_analysed)."""
    from .results import open_analysed

    run, cc, store, table, summary = open_analysed(cfg.run, cfg.store)
    threshold = float(summary.get("thresholds", {}).get("exclusive_threshold", 0.1))
    return {"run": run, "cc": cc, "store": store, "table": table, "threshold": threshold}


# ----------------------------------------------------------------------------- windows


def shard_windows(meta: dict, texts: dict, sources: dict[str, str], wanted: dict, max_n: int, before: int):
    """(rows to encode [R] (shard-local: each answer's `before` lead-in rows, then its rows, in message
    order), model of each [R], whether each is an answer row [R], windows: [(n-gram, positions into the
    rows)], occurrences without an aligned lead-up row)."""
    order = np.lexsort((meta["char_end"], meta["chunk"]))
    chunk_s, start_s, end_s = meta["chunk"][order], meta["char_start"][order], meta["char_end"][order]
    bounds = np.flatnonzero(np.diff(chunk_s)) + 1
    rows, models, answer, windows, unseen = [], [], [], [], 0
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
        if hi <= lo:
            continue
        chunk = texts.get(int(chunk_s[lo]))
        model = sources.get(str(chunk.get("source", "")).rsplit(":", 1)[0]) if chunk else None
        if model is None:
            continue
        for role, _, ms, me in chunk.get("messages") or ():
            if role != "assistant":
                continue
            inside = np.flatnonzero((start_s[lo:hi] >= ms) & (end_s[lo:hi] <= me))
            if not len(inside):
                continue
            lead = np.flatnonzero(end_s[lo:hi] <= ms)[-before:] if before else np.zeros(0, np.int64)
            take = np.concatenate([lead, inside])
            base = len(rows)
            rows.extend(order[lo + take].tolist())
            models.extend([model] * len(take))
            answer.extend([False] * len(lead) + [True] * len(inside))
            s_M, e_M = start_s[lo + take], end_s[lo + take]
            for g, s, e in ngram_spans(chunk["text"][ms:me], max_n):
                if g not in wanted[model]:
                    continue
                on = np.flatnonzero((e_M > s + ms) & (s_M < e + ms))
                if not len(on) or on[0] == 0:
                    unseen += 1
                    continue
                windows.append((g, base + np.arange(max(0, on[0] - before), on[0])))
    return np.asarray(rows, dtype=np.int64), np.asarray(models), np.asarray(answer, bool), windows, unseen


@torch.inference_mode()
def window_pass(cc, store, sources: dict[str, str], wanted: dict, cfg, device) -> dict:
    """One pass over the store's answer rows: per model its answer rows and firing counts; per n-gram
    its occurrences, the occurrences each latent covers, and the window rows' firing counts."""
    from tqdm.auto import tqdm

    n_f = cc.cfg.n_latents
    model_acc = {m: {"rows": 0, "fire_F": np.zeros(n_f, np.int64)} for m in "ab"}
    grams = {
        g: {
            "model": m,
            "n": 0,
            "covered_F": np.zeros(n_f, np.int64),
            "rows": 0,
            "fire_F": np.zeros(n_f, np.int64),
            "answer_rows": 0,
            "answer_fire_F": np.zeros(n_f, np.int64),
        }
        for m in "ab"
        for g in wanted[m]
    }
    offsets = np.cumsum([0] + [s["n_tokens"] for s in store.meta["shards"]])
    unseen = 0
    for shard in tqdm(range(len(offsets) - 1), desc="answers: link", unit="shard", dynamic_ncols=True):
        meta = store.rows(np.arange(offsets[shard], offsets[shard + 1]))
        rows_R, model_R, answer_R, windows, lost = shard_windows(
            meta, store.texts(shard), sources, wanted, cfg.max_n, cfg.before
        )
        unseen += lost
        if not len(rows_R):
            continue
        # each answer's lead-in rows and the rows of its lead-ups, which may repeat: encode each once
        uniq_U, back_R = np.unique(rows_R, return_inverse=True)
        ptr_U, cols_N = _firing(cc, store, offsets[shard] + uniq_U, cfg.batch_size, device)
        count_R = np.diff(ptr_U)[back_R]
        ptr = np.r_[0, np.cumsum(count_R)]
        # row r's entries, read from its unique row's: one gather over every entry
        cols_N = cols_N[np.repeat(ptr_U[back_R] - ptr[:-1], count_R) + np.arange(ptr[-1])]
        rows_N = np.repeat(np.arange(len(rows_R)), count_R)
        for m in "ab":
            mine = (model_R == m) & answer_R
            model_acc[m]["rows"] += int(mine.sum())
            model_acc[m]["fire_F"] += np.bincount(cols_N[mine[rows_N]], minlength=n_f)
        in_window = {}
        for g, pos in windows:
            acc = grams[g]
            acc["n"] += 1
            acc["covered_F"][np.unique(np.concatenate([cols_N[ptr[p] : ptr[p + 1]] for p in pos]))] += 1
            in_window.setdefault(g, np.zeros(len(rows_R), bool))[pos] = True
        for g, mask in in_window.items():
            grams[g]["rows"] += int(mask.sum())
            grams[g]["fire_F"] += np.bincount(cols_N[mask[rows_N]], minlength=n_f)
            inner = mask & answer_R  # window rows that are answer rows: outside the base rate
            grams[g]["answer_rows"] += int(inner.sum())
            grams[g]["answer_fire_F"] += np.bincount(cols_N[inner[rows_N]], minlength=n_f)
        store.release(shard)
    return {"models": model_acc, "grams": grams, "unseen": unseen}


def _firing(cc, store, rows_R: np.ndarray, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """CSR of the firing latents of each row: (ptr [R + 1], latent ids [N]) in row order."""
    counts, cols = [], []
    for i in range(0, len(rows_R), batch_size):
        x_a, x_b = (x.to(device) for x in store.get(rows_R[i : i + batch_size]))
        r_N, c_N = (cc.encode(x_a, x_b) > 0).nonzero(as_tuple=True)  # row-major: rows in order
        counts.append(torch.bincount(r_N, minlength=x_a.shape[0]).cpu().numpy())
        cols.append(c_N.cpu().numpy())
    return np.r_[0, np.cumsum(np.concatenate(counts))], np.concatenate(cols).astype(np.int64)


def rank_links(acc: dict, model_acc: dict, alive_F: np.ndarray, cfg) -> list[dict]:
    """The latents of one n-gram with lift >= min_lift, largest coverage first (max_links of them), each
    marked `linked` when its coverage and the occurrences suffice."""
    n = acc["n"]
    if n == 0:
        return []
    cov_F = acc["covered_F"] / n
    other_rows = model_acc["rows"] - acc["answer_rows"]
    if other_rows <= 0:  # the windows cover every answer row of the model: no base rate to compare
        return []
    rate_w = acc["fire_F"] / max(acc["rows"], 1)
    rate_o = (model_acc["fire_F"] - acc["answer_fire_F"]) / other_rows
    with np.errstate(divide="ignore", invalid="ignore"):
        lift_F = np.where(rate_o > 0, rate_w / rate_o, np.where(rate_w > 0, np.inf, 0.0))
    ok = np.flatnonzero((lift_F >= cfg.min_lift) & alive_F & (acc["covered_F"] > 0))
    ok = ok[np.lexsort((-lift_F[ok], -cov_F[ok]))][: cfg.max_links]
    return [
        {
            "latent": int(j),
            "coverage": float(cov_F[j]),
            "covered": int(acc["covered_F"][j]),
            "lift": float(lift_F[j]) if math.isfinite(lift_F[j]) else None,
            "linked": bool(cov_F[j] >= cfg.min_coverage and n >= MIN_OCCURRENCES),
        }
        for j in ok
    ]


# ----------------------------------------------------------------------------- rules and files


def candidate_rule(row: dict, threshold: float) -> str:
    """Which rule of docs/design.md §5 made an analysis candidate: its partition, its relative decoder
    norm, or (the rest) its functional share."""
    if row.get("partition") in ("a_exclusive", "b_exclusive"):
        return "partition"
    rel = row.get("rel_norm")
    if isinstance(rel, float) and math.isfinite(rel) and (rel <= threshold or rel >= 1 - threshold):
        return "norm"
    return "share"


def link_latents(run: dict, files: dict[str, str], top: list[dict], cfg) -> dict:
    """Link the significant n-grams `top` to the run's latents; writes RUN/answers/latents.csv."""
    from ..core.runtime import resolve_device

    cc, store, table = run["cc"], run["store"], run["table"]
    device = resolve_device(cfg.device)
    cc = cc.to(device).eval().requires_grad_(False)
    wanted = {m: {r["ngram"] for r in top if r["more_in"] == m} for m in "ab"}
    sources = {name: m for m, name in files.items()}
    if len(sources) < 2:
        raise CrossdiffError(f"both answer files are named {files['a']}; give them different names")
    res = window_pass(cc, store, sources, wanted, cfg, device) if top else {"grams": {}, "unseen": 0}
    if top and not any(res["models"][m]["rows"] for m in "ab"):
        raise CrossdiffError(
            f"no chunk of the store {store.root} comes from {files['a']} or {files['b']} (its chunks' sources); "
            "pass the answer files the store was harvested from"
        )
    alive_F = np.zeros(cc.cfg.n_latents, bool)
    alive_F[[int(r["latent"]) for r in table.rows if r.get("verdict") != "dead"]] = True
    by_ngram, occurrences, linked = {}, {}, {}
    for r in top:
        acc = res["grams"][r["ngram"]]
        occurrences[r["ngram"]] = acc["n"]
        by_ngram[r["ngram"]] = rank_links(acc, res["models"][acc["model"]], alive_F, cfg)
        for x in by_ngram[r["ngram"]]:
            if x["linked"] and x["latent"] not in linked:  # `top` is in p order: its best n-gram first
                linked[x["latent"]] = {"side": acc["model"], "ngram": r["ngram"], **x}
    rows = _stage_rows(table, linked, run["threshold"])
    write_stage(run["run"], ANSWERS, rows)
    converse = converse_ngrams(run["run"] / "analysis", rows, cfg)
    listed = [{"latent": j, **{k: v for k, v in rows[j].items()}} for j in sorted(linked)]
    return {
        "by_ngram": by_ngram,
        "occurrences": occurrences,
        "linked": listed,
        "converse": converse,
        "unseen": res["unseen"],
    }


def _stage_rows(table, linked: dict, threshold: float) -> dict[int, dict]:
    """RUN/answers/latents.csv's rows: every alive candidate (its rule) and every linked latent."""
    rows = {}
    for r in table.candidates():
        rows[int(r["latent"])] = {"side": r["side"], "rule": candidate_rule(r, threshold)}
    for j, x in linked.items():
        row = rows.setdefault(j, {"side": x["side"], "rule": "answer-link"})
        row.update(ngram=x["ngram"], coverage=f"{x['coverage']:.4g}", lift=_lift(x["lift"]))
    return rows


def _lift(v) -> str:
    return "inf" if v is None else f"{v:.4g}"


def read_linked(run: str | Path) -> dict[int, str]:
    """latent -> side of the latents that only the answer link made candidates (RUN/answers/latents.csv;
    {} when the stage has not run): verify.py's `candidates` adds them."""
    return {j: r["side"] for j, r in _linked_rows(run).items()}


def _linked_rows(run: str | Path) -> dict[int, dict]:
    """RUN/answers/latents.csv's rows of the latents that only the answer link made candidates."""
    return {j: r for j, r in read_stage(run, ANSWERS).items() if r.get("rule") == "answer-link"}


def link_priority(run: str | Path) -> dict[int, tuple]:
    """latent -> its place among the linked latents of its model (smaller first), {} when none. The
    n-grams are ranked by how much they set one model's answers apart (the largest log ratio of the
    answers that say them, log((n_more + 0.5) / (n_other + 0.5)): what one model says and the other
    hardly ever does); within an n-gram its latents by coverage, then lift. The first latent of every
    n-gram comes before the second of any: the first leads its n-gram's group (`ngram_groups`).
    verify.py spends its own ablation budget (--top-linked) in this order."""
    linked = _linked_rows(run)
    if not linked:
        return {}
    try:
        tested = {r["ngram"]: r for r in read_ngrams(Path(run) / "answers") if r["scope"] == "all"}
    except CrossdiffError:
        tested = {}

    def ratio(r: dict) -> float:
        g = tested.get(r.get("ngram", ""))
        more, other = ("answers_a", "answers_b") if r["side"] == "a" else ("answers_b", "answers_a")
        return math.log((g[more] + 0.5) / (g[other] + 0.5)) if g else -math.inf

    within = {j: (-_float(r.get("coverage")), -_float(r.get("lift")), j) for j, r in linked.items()}
    out = {}
    for members in _by_ngram(linked).values():
        for i, j in enumerate(sorted(members, key=within.get)):
            r = linked[j]
            out[j] = (i, -ratio(r), r.get("ngram", ""), *within[j])
    return out


def ngram_groups(run: str | Path) -> dict[int, dict]:
    """leader -> {"members", "ngram", "side"}: one group per linked n-gram of a model, led by its first
    latent in link_priority's order (largest coverage, then lift), the members the leader first. Under
    verify's LINK_RULES 3 the group is the unit of verification: it is ablated as one, on the n-gram's
    own occurrences in the answers (`ngram_contexts`), once."""
    linked, priority = _linked_rows(run), link_priority(run)
    out = {}
    for (side, ngram), members in _by_ngram(linked).items():
        order = sorted(members, key=priority.get)
        out[order[0]] = {"members": tuple(order), "ngram": ngram, "side": side}
    return out


def answer_sources(run: str | Path) -> dict[str, str]:
    """answer file name -> model ("a" / "b") of the run's answers stage (RUN/answers/summary.json), {}
    without one: a store chunk's `source` names the file it came from."""
    from .answers import read_summary

    s = read_summary(run) or {}
    return {Path(p).name: m for m, p in (s.get("answers") or {}).items()}


def ngram_contexts(store, sources: dict[str, str], side: str, ngram: str, n: int) -> list[dict]:
    """Up to `n` occurrences of `ngram` in model `side`'s answers in the store, at most one per chunk,
    held-out chunks first (then the training ones), each in store order: {"f": nan, "row": None,
    "fresh": False, "chunk", "c0" (the n-gram's first character in the chunk), "text", "anchor":
    "ngram"}. The link was measured on their lead-ups; verification scores the same place: the
    n-gram's characters and what follows, with the group removed before them."""
    held, train = [], []
    for shard in range(len(store.meta["shards"])):
        heldout = set(
            np.unique(store.rows(store.offsets[shard] + store.split_rows(shard, "heldout"))["chunk"]).tolist()
        )
        for chunk, t in sorted(store.texts(shard).items()):
            if sources.get(str(t.get("source", "")).rsplit(":", 1)[0]) != side:
                continue
            hit = _first_occurrence(t, ngram)
            if hit is not None:
                ctx = {"f": math.nan, "row": None, "fresh": False, "chunk": int(chunk), "c0": hit}
                (held if chunk in heldout else train).append({**ctx, "text": t["text"], "anchor": "ngram"})
        if len(held) >= n:
            break
    return (held + train)[:n]


def _first_occurrence(chunk: dict, ngram: str) -> int | None:
    """The chunk-level start of the first occurrence of `ngram` in one of its assistant messages."""
    for role, _, ms, me in chunk.get("messages") or ():
        if role != "assistant":
            continue
        for g, s, _ in ngram_spans(chunk["text"][ms:me], len(ngram.split(" "))):
            if g == ngram:
                return ms + s
    return None


def _by_ngram(linked: dict[int, dict]) -> dict[tuple[str, str], list[int]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for j, r in sorted(linked.items()):
        groups.setdefault((r["side"], r.get("ngram", "")), []).append(j)
    return groups


def _float(s) -> float:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return -math.inf
    return v if not math.isnan(v) else -math.inf


def with_linked(table, linked: dict[int, str] | None) -> list[dict]:
    """The table's candidates (best score first), then the alive `linked` latents that are not
    candidates already, each with the side of the model whose answers it was linked in."""
    rows = table.candidates()
    known = {int(r["latent"]) for r in rows}
    for r in table.rows:
        j = int(r["latent"])
        if linked and j in linked and j not in known and r.get("verdict") != "dead":
            rows.append({**r, "side": linked[j]})
    return rows


def converse_ngrams(analysis: Path, rows: dict[int, dict], cfg, k: int = 5) -> dict[str, list[dict]]:
    """latent -> the n-grams its top examples (features/<latent>.json) precede: those starting at the
    firing token or within `before` words after it, most frequent first, with their significance."""
    try:
        tested = {r["ngram"]: r for r in read_ngrams(cfg.folder) if r["scope"] == "all"}
    except CrossdiffError:
        tested = {}
    out = {}
    for j in sorted(rows):
        path = analysis / "features" / f"{j}.json"
        if not path.is_file():
            continue
        counts: dict[str, int] = {}
        nearest: dict[str, int] = {}  # the closest its start came to the firing token, in words
        examples = json.loads(path.read_text()).get("examples", [])
        for ex in examples:
            text = ex.get("text_token", "") + ex.get("text_after", "")
            spans = ngram_spans(text, cfg.max_n)
            starts = sorted({s for _, s, _ in spans})[: cfg.before + 1]
            seen = {g: starts.index(s) for g, s, _ in reversed(spans) if s in starts}
            for g, rank in seen.items():
                counts[g] = counts.get(g, 0) + 1
                nearest[g] = min(nearest.get(g, rank), rank)
        best = sorted(counts.items(), key=lambda x: (-x[1], nearest[x[0]], len(x[0])))[:k]
        out[str(j)] = [
            {
                "ngram": g,
                "examples": c,
                "of": len(examples),
                "more_in": tested.get(g, {}).get("more_in"),
                "q": tested.get(g, {}).get("q"),
                "significant": bool(tested.get(g, {}).get("significant", False)),
            }
            for g, c in best
        ]
    return out
