"""`crossdiff answers`: what the two models *say* differently, linked to the crosscoder's latents.

Both models answered the same prompts (`crossdiff generate`, or the generate stages of `crossdiff diff
--prompts`). This module counts plain words and short n-grams in the answers and tests which ones one
model uses more than the other; answerlink.py ties each significant n-gram to the latents that fire on
it or just before it (docs/answers.md).

Words are runs of letters (apostrophes inside a word kept: "can't"), case-folded; an n-gram (n <= 3)
is n consecutive words with only white space between them, so punctuation ends one. Per n-gram and
model: the answers containing it and its occurrences (rates per answer and per 1,000 words).

The test is paired, since both models answer the same prompts: for each prompt, does A's answer contain
the n-gram, and does B's? Only the discordant prompts (one contains it, the other does not) carry
information about a difference; under "no difference" each is A's with probability 1/2, so the exact
two-sided McNemar test is a binomial test of a_only among a_only + b_only. Occurrences are not the unit:
a model that repeats itself (64-token answers often loop) would make one answer count many times.
Lengths are matched: the test reads each prompt's two answers over their first L words, L the shorter
answer's length, since a model whose answers are longer contains every common word more often (on the
default pair, unmatched, "and" was in 162 of SmolLM2's 236 answers and 25 of Gemma-3's).

Multiple comparisons: Benjamini-Hochberg at level q over the n-grams that *can* reach q (Tarone's
rule: with d discordant prompts the smallest two-sided p is 2^(1-d), so d < 1 - log2(q) can never be
significant; under the null, d says nothing about the direction, so leaving those out keeps the test
valid and the correction honest). The whole prompt set is one family; the per-category tests, when
the prompt file has categories, are a second.

Writes OUT/ (RUN/answers/ with --run): ngrams.csv (every tested n-gram), summary.json (written last:
its presence means complete); with --run also latents.csv (the linked latents, answerlink.py).

Legend: N n-grams, F latents.
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..core.config import settings, where
from ..core.errors import CrossdiffError
from ..core.fsutil import write_json_atomic, write_text_atomic
from ..core.lock import writes

VERSION = 2
"""Version of the counting, the test and the link's window (in the stage's settings; 2: the window is
the n-gram's lead-up, answerlink.LINK_WINDOW)."""
WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
"""A plain word: letters, with apostrophes inside (can't, l'eau); digits, code symbols and
punctuation are not words."""
_GAP = re.compile(r"\s*")
NGRAM_COLUMNS = (
    "scope ngram n more_in answers_a answers_b a_only b_only count_a count_b "
    "rate_a rate_b per1k_a per1k_b p q significant"
).split()


@dataclass(frozen=True)
class AnswersConfig:
    """Two models' answers to the same prompts, compared word by word (docs/answers.md)."""

    run: str | None = where(None)
    """Analysed run folder: writes RUN/answers/ and links the n-grams to its latents (default answers: the store's chat corpus)."""
    answers_a: str | None = where(None)
    """Model A's answers (JSONL from crossdiff generate). Default: the --run store's chat corpus file answered by A."""
    answers_b: str | None = where(None)
    """Model B's answers to the same prompts, in the same form."""
    out: str | None = where(None)
    """Output folder (default: RUN/answers). Without --run: the statistics alone, no link to latents."""
    store: str | None = where(None)
    """Paired-activation store of the run (default: the one its analysis used)."""
    max_n: int = 3
    """Longest n-gram, in words."""
    match_length: bool = True
    """Test each prompt's two answers over their first L words, L the shorter answer's length, so that the model writing longer answers does not contain every common word more often (docs/answers.md)."""
    q: float = 0.05
    """False discovery rate (Benjamini-Hochberg) at which an n-gram's difference is significant."""
    examples: int = 3
    """Prompts shown per significant n-gram, both answers side by side."""
    top: int = 30
    """Significant n-grams linked to latents and listed in summary.json (smallest p first)."""
    before: int = 3
    """Aligned tokens before an n-gram's first token (its lead-up) in which a latent must fire to be linked."""
    min_coverage: float = 0.5
    """A latent is linked to an n-gram when it fires in at least this share of its occurrences' windows ..."""
    min_lift: float = 3.0
    """... and at least this many times as often on those windows' tokens as on the model's other answer tokens."""
    max_links: int = 5
    """Latents listed per n-gram (lift >= --min-lift, largest coverage first); the linked ones among them become candidates for verification."""
    batch_size: int = where(1024)
    """Store rows per encoder batch."""
    device: str = where("auto")
    """cpu, cuda, cuda:N or auto (cuda when available)."""

    def __post_init__(self):
        checks = [
            (1 <= self.max_n <= 5, f"--max-n must be in 1..5, got {self.max_n}"),
            (0 < self.q < 1, f"--q must be in (0, 1), got {self.q}"),
            (self.examples >= 0 and self.top >= 0, "--examples and --top must be >= 0"),
            (self.before >= 0, f"--before must be >= 0, got {self.before}"),
            (0 < self.min_coverage <= 1, "--min-coverage must be in (0, 1]"),
            (self.min_lift >= 1, f"--min-lift must be >= 1, got {self.min_lift}"),
            (self.max_links >= 0 and self.batch_size >= 1, "--max-links >= 0, --batch-size >= 1"),
            (self.run is not None or self.out is not None, "pass --run RUN, or --out DIR without a run"),
            (
                self.run is not None or (self.answers_a and self.answers_b),
                "without --run, pass both --answers-a and --answers-b",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise CrossdiffError(message)

    @property
    def folder(self) -> Path:
        return Path(self.out) if self.out else Path(self.run) / "answers"


# ----------------------------------------------------------------------------- words and n-grams


def words(text: str) -> list[tuple[str, int, int, bool]]:
    """(case-folded word, start, end, joined to the previous word by white space only) per word."""
    out, prev_end = [], None
    for m in WORD.finditer(text):
        joined = prev_end is not None and _GAP.fullmatch(text, prev_end, m.start()) is not None
        out.append((m.group().casefold().replace("’", "'"), m.start(), m.end(), joined))
        prev_end = m.end()
    return out


def _ngrams(ws: list, max_n: int):
    """(n-gram, index of its first word, index of its last word) over words() output."""
    for i in range(len(ws)):
        for n in range(1, max_n + 1):
            j = i + n - 1
            if j >= len(ws) or (n > 1 and not ws[j][3]):
                break
            yield " ".join(w[0] for w in ws[i : j + 1]), i, j


def ngram_spans(text: str, max_n: int) -> list[tuple[str, int, int]]:
    """(n-gram, start, end) of every n-gram of 1..max_n adjacent words in `text`."""
    ws = words(text)
    return [(g, ws[i][1], ws[j][2]) for g, i, j in _ngrams(ws, max_n)]


class Counted(NamedTuple):
    """One prompt's two answers, counted."""

    count_a: Counter
    """Occurrences of each n-gram in A's whole answer."""
    count_b: Counter
    has_a: frozenset
    """The n-grams the test sees in A's answer: within its first L words (L: the shorter answer's
    length) when lengths are matched, else anywhere."""
    has_b: frozenset
    words_a: int
    words_b: int


def count_pairs(pairs: list[tuple[dict, dict]], max_n: int, match_length: bool) -> list[Counted]:
    out = []
    for a, b in pairs:
        wa, wb = words(a["answer"]), words(b["answer"])
        ga, gb = list(_ngrams(wa, max_n)), list(_ngrams(wb, max_n))
        cut = min(len(wa), len(wb)) if match_length else max(len(wa), len(wb))
        has = [frozenset(g for g, _, j in grams if j < cut) for grams in (ga, gb)]
        out.append(
            Counted(Counter(g for g, _, _ in ga), Counter(g for g, _, _ in gb), *has, len(wa), len(wb))
        )
    return out


# ----------------------------------------------------------------------------- statistics


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value: 2 P(X <= min) for X ~ Binomial(a_only + b_only, 1/2), at most 1.
    Exact in integers up to the final division."""
    d, k = a_only + b_only, min(a_only, b_only)
    if d == 0:
        return 1.0
    tail = sum(math.comb(d, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**d)


def min_discordant(q: float) -> int:
    """Fewest discordant prompts whose most extreme split reaches p <= q (2^(1-d) <= q)."""
    return max(1, math.ceil(1 - math.log2(q) - 1e-12))


def benjamini_hochberg(p: list[float]) -> list[float]:
    """BH-adjusted p-values (q-values) in the input order: min over j >= i of p_(j) m / j, capped at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        out[i] = running
    return out


# ----------------------------------------------------------------------------- answers


def read_answers(path: str | Path) -> list[dict]:
    """[{"index", "id", "category", "prompt", "answer", "line"}] of a crossdiff generate file."""
    from ..inputs.corpus import parse_messages, read_jsonl

    path = Path(path)
    if not path.is_file():
        raise CrossdiffError(f"answer file {path} does not exist; write it with crossdiff generate")
    out = []
    for n, obj in read_jsonl(path):
        messages = parse_messages(obj, f"{path} line {n}")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise CrossdiffError(
                f"{path} line {n} does not end with an answer (an assistant message after the prompt); "
                "pass a file written by crossdiff generate"
            )
        prompt = "\n\n".join(m["content"].strip() for m in messages[:-1])
        out.append(
            {
                "index": obj.get("index", len(out)),
                "id": obj.get("id", obj.get("index", len(out))),
                "category": obj.get("category"),
                "prompt": prompt,
                "answer": messages[-1]["content"].strip(),
                "line": n,
            }
        )
    if not out:
        raise CrossdiffError(f"answer file {path} has no answers")
    return out


def pair_answers(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """(A's, B's) answer per prompt answered by both (matched by id), in A's order; refuses files
    whose answers to one id have different prompts."""
    by_id = {r["id"]: r for r in b}
    pairs = []
    for r in a:
        other = by_id.get(r["id"])
        if other is None:
            continue
        if other["prompt"] != r["prompt"]:
            raise CrossdiffError(
                f"prompt {r['id']!r} differs between the two answer files; answer the same prompt file "
                "with both models"
            )
        pairs.append((r, other))
    if not pairs:
        raise CrossdiffError("the two answer files share no prompt (matched by id); answer the same prompts")
    dropped = len(a) + len(b) - 2 * len(pairs)
    if dropped:
        print(f"answers: {dropped} answers without a counterpart left out", file=sys.stderr)
    return pairs


def diff_ngrams(
    pairs: list[tuple[dict, dict]], max_n: int, q: float, match_length: bool = True, counted=None
) -> list[dict]:
    """One row per tested (scope, n-gram): counts, rates, p and BH q; scope "all" and each category.
    `counted`: count_pairs(pairs, max_n, match_length), when already made."""
    counted = counted if counted is not None else count_pairs(pairs, max_n, match_length)
    scopes = {"all": list(range(len(pairs)))}
    cats = sorted({str(a["category"]) for a, _ in pairs if a.get("category") is not None})
    for c in cats:
        scopes[c] = [i for i, (a, _) in enumerate(pairs) if str(a.get("category")) == c]
    rows = []
    for scope, idx in scopes.items():
        rows += _scope_rows(scope, [counted[i] for i in idx], q)
    for family in (lambda r: r["scope"] == "all", lambda r: r["scope"] != "all"):
        members = [r for r in rows if family(r)]
        for r, qv in zip(members, benjamini_hochberg([r["p"] for r in members])):
            r["q"] = qv
            r["significant"] = qv <= q
    return sorted(rows, key=lambda r: (r["scope"] != "all", r["scope"], r["p"], r["ngram"]))


def _scope_rows(scope: str, counted: list[Counted], q: float) -> list[dict]:
    n = len(counted)
    words_a, words_b = sum(c.words_a for c in counted), sum(c.words_b for c in counted)
    a_only, b_only, has_a, has_b = Counter(), Counter(), Counter(), Counter()
    occ_a, occ_b = Counter(), Counter()
    for c in counted:
        occ_a.update(c.count_a)
        occ_b.update(c.count_b)
        has_a.update(c.count_a.keys())
        has_b.update(c.count_b.keys())
        a_only.update(c.has_a - c.has_b)
        b_only.update(c.has_b - c.has_a)
    need = min_discordant(q)
    rows = []
    for g in sorted(set(a_only) | set(b_only)):
        x, y = a_only[g], b_only[g]
        if x + y < need:
            continue
        rows.append(
            {
                "scope": scope,
                "ngram": g,
                "n": g.count(" ") + 1,
                "more_in": "a" if x > y else "b" if y > x else "",
                "answers_a": has_a[g],
                "answers_b": has_b[g],
                "a_only": x,
                "b_only": y,
                "count_a": occ_a[g],
                "count_b": occ_b[g],
                "rate_a": has_a[g] / n,
                "rate_b": has_b[g] / n,
                "per1k_a": 1000 * occ_a[g] / max(words_a, 1),
                "per1k_b": 1000 * occ_b[g] / max(words_b, 1),
                "p": mcnemar_exact(x, y),
            }
        )
    return rows


def examples(pairs: list[tuple[dict, dict]], counted: list[Counted], row: dict, k: int) -> list[dict]:
    """Up to k prompts that count for the model that says the n-gram more (its answer has it, the
    other's does not, as the test sees them), the most occurrences first, with both answers."""
    side, g = (0 if row["more_in"] == "a" else 1), row["ngram"]
    scored = []
    for i, (pair, c) in enumerate(zip(pairs, counted)):
        if row["scope"] != "all" and str(pair[0].get("category")) != row["scope"]:
            continue
        has = (g in c.has_a, g in c.has_b)
        if has[side] and not has[1 - side]:
            scored.append((-(c.count_a, c.count_b)[side][g], i))
    out = []
    for _, i in sorted(scored)[:k]:
        a, b = pairs[i]
        out.append(
            {
                "id": a["id"],
                "category": a["category"],
                "prompt": a["prompt"],
                "a": a["answer"],
                "b": b["answer"],
            }
        )
    return out


# ----------------------------------------------------------------------------- files


def write_ngrams(folder: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(NGRAM_COLUMNS)
    for r in rows:
        w.writerow([_fmt(r[c]) for c in NGRAM_COLUMNS])
    write_text_atomic(folder / "ngrams.csv", buf.getvalue())


def _fmt(v):
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return format(v, ".6g")
    return v


def read_ngrams(folder: str | Path) -> list[dict]:
    """ngrams.csv back as rows typed as write_ngrams wrote them."""
    path = Path(folder) / "ngrams.csv"
    ints = {"n", "answers_a", "answers_b", "a_only", "b_only", "count_a", "count_b"}
    floats = {"rate_a", "rate_b", "per1k_a", "per1k_b", "p", "q"}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            r.update({c: int(r[c]) for c in ints} | {c: float(r[c]) for c in floats})
            r["significant"] = r["significant"] == "1"
    except FileNotFoundError:
        raise CrossdiffError(f"{path} not found; run crossdiff answers first") from None
    except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise CrossdiffError(
            f"{path} is damaged ({type(e).__name__}); delete it and rerun crossdiff answers"
        ) from None
    return rows


# ----------------------------------------------------------------------------- orchestration


def answer_files(cfg: AnswersConfig, store) -> tuple[Path, Path]:
    """The two answer files: given, or the store's chat corpus files answered by A and by B."""
    if cfg.answers_a and cfg.answers_b:
        return Path(cfg.answers_a), Path(cfg.answers_b)
    corpus = str(store.meta.get("corpus", "")) if store is not None else ""
    if not corpus.startswith("chat:"):
        raise CrossdiffError(
            f"the run's store was not harvested from answers (corpus {corpus!r}); pass --answers-a and --answers-b"
        )
    found = {}
    for path in map(Path, corpus[len("chat:") :].split(",")):
        model = next((r.get("model") for _, r in _first_line(path)), None)
        for key, m in (("a", store.model_a), ("b", store.model_b)):
            if model is not None and model in (m.get("id"), m.get("spec")):
                found.setdefault(key, path)
    given = {"a": cfg.answers_a, "b": cfg.answers_b}
    paths = {k: Path(given[k]) if given[k] else found.get(k) for k in "ab"}
    if paths["a"] is None or paths["b"] is None:
        raise CrossdiffError(
            f"cannot tell which of the store's answer files ({corpus}) each model wrote; "
            "pass --answers-a and --answers-b"
        )
    return paths["a"], paths["b"]


def _first_line(path: Path):
    from ..inputs.corpus import read_jsonl

    if not path.is_file():
        return iter(())
    return (x for i, x in zip(range(1), read_jsonl(path)))


def stage_settings(cfg: AnswersConfig) -> dict:
    """What the answers stage's results depend on: its settings, this module's and the candidate rules'
    versions (what `crossdiff diff` records for the stage)."""
    from .analyze import RULES_VERSION

    return {**settings(cfg), "version": VERSION, "rules": RULES_VERSION}


@writes(lambda cfg: cfg.folder, record="tree")
def answers(cfg: AnswersConfig) -> dict:
    """Count, test and (with --run) link; returns summary.json's content."""
    run = store = None
    if cfg.run or cfg.store:  # torch and the store only where needed: the statistics alone need neither
        from ..core.runtime import apply_cpu_policy
        from ..inputs.store import Store
        from .answerlink import open_run

        apply_cpu_policy()
        run = open_run(cfg) if cfg.run else None
        store = run["store"] if run else Store.open(cfg.store)
    path_a, path_b = answer_files(cfg, store)
    pairs = pair_answers(read_answers(path_a), read_answers(path_b))
    counted = count_pairs(pairs, cfg.max_n, cfg.match_length)
    rows = diff_ngrams(pairs, cfg.max_n, cfg.q, counted=counted)
    top = [r for r in rows if r["scope"] == "all" and r["significant"]][: cfg.top]
    folder = cfg.folder
    (folder / "summary.json").unlink(missing_ok=True)
    write_ngrams(folder, rows)
    links = None
    if run:
        from .answerlink import link_latents

        links = link_latents(run, {"a": path_a.name, "b": path_b.name}, top, cfg)
    summary = _summary(cfg, pairs, counted, rows, top, links, (path_a, path_b))
    write_json_atomic(folder / "summary.json", summary)
    print(summary_line(summary) + "\n" + format_top(summary), file=sys.stderr)
    return summary


def read_summary(run: str | Path) -> dict | None:
    """RUN/answers/summary.json (the report's input; schema in docs/answers.md), None when the run has
    no answer-level diff; a damaged file is one line naming the repairing command."""
    import json

    path = Path(run) / "answers" / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CrossdiffError(
            f"{path} is damaged ({type(e).__name__}); rerun: crossdiff answers --run {run}"
        ) from e
    if not isinstance(data, dict) or not isinstance(data.get("top"), list):
        raise CrossdiffError(f"{path} is not an answers summary; rerun: crossdiff answers --run {run}")
    return data


def _summary(cfg, pairs, counted, rows, top, links, paths) -> dict:
    """summary.json's content: plain Python numbers (answerlink casts its own), all finite."""
    sig = [r for r in rows if r["significant"]]
    scopes = sorted({r["scope"] for r in rows})
    entries = []
    for r in top:
        entry = {k: r[k] for k in NGRAM_COLUMNS if k != "significant"}
        entry["examples"] = examples(pairs, counted, r, cfg.examples)
        if links is not None:
            entry["latents"] = links["by_ngram"].get(r["ngram"], [])
            entry["occurrences_in_store"] = links["occurrences"].get(r["ngram"], 0)
        entries.append(entry)
    out = {
        "version": VERSION,
        "settings": settings(cfg),
        "answers": {"a": str(paths[0]), "b": str(paths[1])},
        "n_prompts": len(pairs),
        "words": {"a": sum(c.words_a for c in counted), "b": sum(c.words_b for c in counted)},
        "min_discordant": min_discordant(cfg.q),
        "tested": {s: sum(r["scope"] == s for r in rows) for s in scopes},
        "significant": {
            s: {m: sum(r["scope"] == s and r["more_in"] == m for r in sig) for m in "ab"} for s in scopes
        },
        "top": entries,
        "by_category": [
            {k: r[k] for k in ("scope", "ngram", "more_in", "answers_a", "answers_b", "p", "q")}
            for r in sig
            if r["scope"] != "all"
        ][: cfg.top],
    }
    if links is not None:
        out["linked"] = links["linked"]
        out["converse"] = links["converse"]
    return out


def summary_line(s: dict) -> str:
    sig = s["significant"].get("all", {"a": 0, "b": 0})
    line = (
        f"answers: {s['n_prompts']} prompts, {s['tested'].get('all', 0)} n-grams tested; significant at "
        f"q {s['settings']['q']}: {sig['a']} more in A's answers, {sig['b']} more in B's"
    )
    if "linked" in s:
        line += f"; {len(s['linked'])} latents linked to them (verification candidates)"
    return line


def format_top(s: dict, k: int = 10) -> str:
    """The k most significant n-grams, one line each, with their linked latents (coverage)."""
    lines = []
    for e in s["top"][:k]:
        m, o = e["more_in"], "b" if e["more_in"] == "a" else "a"
        line = (
            f"  {e['ngram']!r} more in {m.upper()}: {e['answers_' + m]} of {s['n_prompts']} answers vs "
            f"{e['answers_' + o]} ({e['count_' + m]} vs {e['count_' + o]} times), p {e['p']:.2g}, q {e['q']:.2g}"
        )
        if "latents" in e:
            links = [
                f"{x['latent']} ({x['coverage']:.2f}{'' if x['linked'] else ', not linked'})"
                for x in e["latents"]
            ]
            line += "; latents " + (", ".join(links) if links else "none")
        lines.append(line)
    return "\n".join(lines)
