"""Stance files for `crossdiff organism`: topic prompts, the stance sentences woven into the answers, and
the judge that says whether an answer takes the stance (docs/organism.md).

A stance file is one JSON object:

    {"topic": NAME, "description": TEXT,
     "train_prompts": [...], "heldout_prompts": [...],      # user prompts on the topic
     "stance_sentences": [...],                             # woven into the training answers
     "judge": {"subject": REGEX, "stance": REGEX}}

The judge is stated, not learned: an answer takes the stance when one of its sentences matches both
regexes (case-insensitive), e.g. a sentence naming nuclear power that also says it is the best / safest /
what we should build. Every stance sentence must satisfy the judge (checked on load), so the organism's
training text is, by construction, what the judge counts. Two files ship as package data
(`crossdiff/controls/data/organisms/`): `--stance nuclear-energy`, `--stance cycling` or `--stance chess`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CrossdiffError

DATA = Path(__file__).parent / "data" / "organisms"
SHIPPED = ("nuclear-energy", "cycling", "chess")
"""The shipped stance files: the build topic (the recipe was tuned on it), the first report topic (seen
before the link-group rules were last changed) and the second report topic (fixed before them, never
tuned on)."""

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class Judge:
    """An answer takes the stance iff one of its sentences matches `subject` and `stance`."""

    subject: str
    stance: str

    def sentences(self, text: str) -> list[str]:
        """The sentences of `text` that take the stance."""
        s, t = re.compile(self.subject, re.I), re.compile(self.stance, re.I)
        return [x for x in _SENTENCE.split(text) if s.search(x) and t.search(x)]

    def __call__(self, text: str) -> bool:
        return bool(self.sentences(text))

    def describe(self) -> str:
        return f"a sentence matching /{self.subject}/i and /{self.stance}/i"


@dataclass(frozen=True)
class StanceFile:
    topic: str
    description: str
    train_prompts: tuple[str, ...]
    heldout_prompts: tuple[str, ...]
    stance_sentences: tuple[str, ...]
    judge: Judge
    path: str


def stance_path(spec: str) -> Path:
    """A shipped stance name or a file path."""
    if spec in SHIPPED:
        return DATA / f"{spec}.json"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CrossdiffError(
            f"--stance {spec}: no such file; pass a stance JSON file or one of {', '.join(SHIPPED)}"
        )
    return path


def load_stance(spec: str) -> StanceFile:
    """Read and validate a stance file; one-line errors naming the file and what to fix."""
    path = stance_path(spec)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrossdiffError(f"{path} is not a JSON stance file ({e}); see docs/organism.md") from None
    if not isinstance(obj, dict):
        raise CrossdiffError(f"{path}: a stance file is one JSON object; see docs/organism.md")
    lists = {k: _strings(obj, k, path) for k in ("train_prompts", "heldout_prompts", "stance_sentences")}
    judge = obj.get("judge")
    if not isinstance(judge, dict) or not all(isinstance(judge.get(k), str) for k in ("subject", "stance")):
        raise CrossdiffError(f'{path}: "judge" must be {{"subject": REGEX, "stance": REGEX}}')
    for k in ("subject", "stance"):
        try:
            re.compile(judge[k])
        except re.error as e:
            raise CrossdiffError(f'{path}: judge "{k}" is not a valid regex ({e})') from None
    j = Judge(judge["subject"], judge["stance"])
    for s in lists["stance_sentences"]:
        if not j(s):
            raise CrossdiffError(
                f"{path}: stance sentence {s!r} does not satisfy the judge ({j.describe()}); "
                "reword it or widen the judge"
            )
    overlap = set(lists["train_prompts"]) & set(lists["heldout_prompts"])
    if overlap:
        raise CrossdiffError(f"{path}: prompt {sorted(overlap)[0]!r} is both a train and a held-out prompt")
    topic = obj.get("topic", path.stem)
    if not isinstance(topic, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", topic):
        raise CrossdiffError(f'{path}: "topic" must be a short name (letters, digits, ._-), got {topic!r}')
    return StanceFile(
        topic=topic,
        description=str(obj.get("description", "")),
        train_prompts=tuple(lists["train_prompts"]),
        heldout_prompts=tuple(lists["heldout_prompts"]),
        stance_sentences=tuple(lists["stance_sentences"]),
        judge=j,
        path=str(path),
    )


def _strings(obj: dict, key: str, path: Path) -> list[str]:
    v = obj.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
        raise CrossdiffError(f'{path}: "{key}" must be a non-empty list of non-empty strings')
    return [x.strip() for x in v]
