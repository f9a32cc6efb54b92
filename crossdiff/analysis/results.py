"""The analysis results: one row per latent, the verdicts, the candidate rule, and the files that hold them.

This module owns the format of RUN/analysis/latents.csv (schema: docs/analysis.md) and of the
per-stage files that later stages write beside it, joined to it by latent id. Every reader of
analysis results goes through `read_latents` / `load_results`; nothing rewrites another stage's file.

    RUN/analysis/latents.csv     written by `crossdiff analyze` (`write_latents`)
    RUN/verification/behaviour.csv  written by `crossdiff verify` (`write_stage`); joined as
                                 behaviour_verdict, behaviour_shift, behaviour_z, ...
    RUN/steering/verdicts.csv    written by `crossdiff steer` (`write_stage`); joined as steer_verdict,
                                 steer_effect
    RUN/answers/latents.csv      written by `crossdiff answers` (`write_stage`); joined as answers_rule,
                                 answers_ngram, ...

A latent's *side* ("a" / "b", or "" for none) says which model it is an exclusive candidate of; the rule
(`candidate_sides`) is the one in docs/design.md §5, and it is written into latents.csv so
that no reader has to restate it. Files written before the column existed get it from the same rule,
applied to their partition and relative-norm columns with the analysis's threshold (summary.json).

Legend: F latents.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core import runfolder
from ..core.errors import CrossdiffError
from ..core.fsutil import write_text_atomic
from ..core.runfolder import FILES

VERDICTS = ("candidate_a", "candidate_b", "shared", "dead")
"""Every verdict of the analysis, in the order reports list them (behavioural verdicts: verify.py)."""
EXCLUSIVE_THRESHOLD = 0.1
"""Default relative-norm threshold of the candidate rule (AnalyzeConfig.exclusive_threshold)."""
COLUMNS = (
    "latent,partition,side,verdict,reason,score,rel_norm,functional_share,dec_norm_a,dec_norm_b,density,mean_act,"
    "max_act,p99_act,probe_r2,probe_auroc,latent_scaling"
).split(",")
TEXT_COLUMNS = frozenset({"partition", "side", "verdict", "reason"})
LATENTS_CSV = "latents.csv"
SUMMARY_JSON = Path(FILES["analysis"]).name
"""analyze's summary.json (crossdiff.core.runfolder): read_latents takes any analysis folder (--out)."""


# ----------------------------------------------------------------------------- the candidate rule


def candidate_sides(partition_F, rel_norm_F, threshold: float) -> np.ndarray:
    """(F,) "a" / "b" for an exclusive candidate, else "": relative norm <= t (A) or >= 1 - t (B), and
    every member of a DFC's exclusive partitions (docs/design.md §5)."""
    rel = np.asarray(rel_norm_F, dtype=float)
    part = np.asarray(partition_F, dtype=object)
    side = np.full(len(rel), "", dtype="<U1")
    with np.errstate(invalid="ignore"):  # NaN (a latent with no decoder at all) is never a candidate
        side[rel <= threshold] = "a"
        side[rel >= 1 - threshold] = "b"
    side[part == "a_exclusive"] = "a"
    side[part == "b_exclusive"] = "b"
    return side


def partitions(cc) -> np.ndarray:
    """(F,) "a_exclusive" / "b_exclusive" / "shared" of a crosscoder (all "shared" for a standard one)."""
    part, n_f = cc.partition, cc.cfg.n_latents
    out = np.full(n_f, "shared", dtype=object)
    out[part.a_exclusive.start : part.a_exclusive.stop] = "a_exclusive"
    out[part.b_exclusive.start : part.b_exclusive.stop] = "b_exclusive"
    return out


def exclusive_sides(
    cc, threshold: float, share_F: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(side, relative norm, ||d_A||, ||d_B||) per latent of a crosscoder, by `candidate_sides`.
    The norm rule applies to a DFC's shared latents too: a concept only A has can be learned by a
    shared latent whose B row stays near its initialisation (docs/calibration.md). Given the
    functional share `share_F` (crossdiff.coder.functional), a DFC's shared latent with share_B <= t
    (>= 1 - t) is an A (B) candidate as well: the toy benchmark finds many planted exclusive features
    there (docs/benchmark.md)."""
    norm_a, norm_b = (t.detach().double().cpu().numpy() for t in cc.decoder_norms())
    total = norm_a + norm_b
    rel = np.where(total > 0, norm_b / np.where(total > 0, total, 1.0), np.nan)
    side = candidate_sides(partitions(cc), rel, threshold)
    if cc.partition.is_dfc and share_F is not None:
        from ..coder.functional import classify_by_share

        side = np.where(side == "", classify_by_share(share_F, threshold), side)
    return side, rel, norm_a, norm_b


def null_z(value: float, mean: float, std: float) -> float:
    """z of `value` against a null of this mean and std: the one rule of verify's and steer's verdicts.
    A null with no spread gives 0 when the value equals it, else ±inf (the value is outside it)."""
    if std > 0:
        return (value - mean) / std
    return 0.0 if value == mean else math.copysign(math.inf, value - mean)


def is_candidate(row: dict) -> bool:
    """An exclusive candidate the analysis looked at: a side, and it fired."""
    return bool(row.get("side")) and row.get("verdict") != "dead"


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class LatentTable:
    """latents.csv parsed: the columns in file order (joined stage columns last) and one row per latent,
    values typed (latent: int; text columns: str; numbers: float, NaN where missing; other columns:
    a number when they parse as one, else the text, None when empty)."""

    columns: list[str]
    rows: list[dict]

    def column(self, name: str) -> np.ndarray:
        return np.array([r.get(name) for r in self.rows], dtype=object if name in TEXT_COLUMNS else float)

    def alive(self) -> np.ndarray:
        return np.array([r.get("verdict") != "dead" for r in self.rows])

    def candidates(self, side: str | None = None) -> list[dict]:
        """Candidates (`is_candidate`) of one side or both, best score first (rows without a score last)."""
        rows = [r for r in self.rows if is_candidate(r) and side in (None, r["side"])]
        return sorted(rows, key=lambda r: _order(r.get("score")))


def _order(score) -> tuple:
    ok = isinstance(score, (int, float)) and math.isfinite(score)
    return (0, -score) if ok else (1, 0.0)


def as_float(v) -> float:
    """v as a float; NaN when it is none (None, empty, text): the one reading of a table's numbers."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _cell(column: str, text: str):
    text = (text or "").strip()
    if column == "latent":
        return int(float(text))  # "12.0" from a float-typed writer is still latent 12 (it names files)
    if column in TEXT_COLUMNS:
        return text
    if column in COLUMNS:
        return as_float(text) if text else math.nan
    if not text:
        return None
    for conv in (int, float):  # float() also takes nan / NaN / inf
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _read_csv(path: Path, what: str) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            if "latent" not in columns:
                raise CrossdiffError(f"{path} has no 'latent' column; {what}")
            rows = [{k: _cell(k, v) for k, v in r.items() if k is not None} for r in reader]
    except FileNotFoundError:
        raise CrossdiffError(f"{path} not found; {what}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CrossdiffError(f"{path} is damaged ({e}); {what}") from e
    return columns, rows


def _threshold(analysis: Path) -> float:
    try:
        s = json.loads((analysis / SUMMARY_JSON).read_text())
        return float(s["thresholds"]["exclusive_threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return EXCLUSIVE_THRESHOLD


def read_latents(analysis: str | Path) -> LatentTable:
    """An analysis folder's latents.csv (files of any crossdiff version: a missing side column is filled
    in by the candidate rule, missing numeric columns read as NaN)."""
    analysis = Path(analysis)
    _check_recorded(analysis, (LATENTS_CSV, SUMMARY_JSON), _analyze_command(analysis))
    columns, rows = _read_csv(analysis / LATENTS_CSV, "run crossdiff analyze on this run")
    if "side" not in columns:
        part = [r.get("partition", "shared") for r in rows]
        rel = [r.get("rel_norm", math.nan) for r in rows]
        for r, s in zip(rows, candidate_sides(part, rel, _threshold(analysis))):
            r["side"] = str(s)
        at = columns.index("partition") + 1 if "partition" in columns else len(columns)
        columns.insert(at, "side")
    for r in rows:
        for c in COLUMNS:
            r.setdefault(c, "" if c in TEXT_COLUMNS else math.nan)
    return LatentTable(columns, rows)


def _analyze_command(analysis: Path) -> str:
    run = analysis.parent if analysis.name == "analysis" else None
    return (
        f"repair it with: crossdiff analyze --run {run}"
        if run
        else "rerun the crossdiff analyze that wrote it"
    )


def _check_recorded(folder: Path, names: tuple[str, ...], repair: str) -> None:
    """Refuse a stage file that differs from its stage's record (crossdiff.core.manifest), in one line."""
    from ..core.manifest import check_file

    for name in names:
        if (folder / name).is_file():
            check_file(folder / name, repair)


def write_latents(analysis: Path, table: dict[str, np.ndarray]) -> None:
    """latents.csv from equal-length column arrays (every column of COLUMNS), atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for i in range(len(table[COLUMNS[0]])):
        writer.writerow([_text(table[c][i]) for c in COLUMNS])
    write_text_atomic(Path(analysis) / LATENTS_CSV, buf.getvalue())


def _text(v) -> str:
    """Floats to 8 significant digits, "NaN" where missing."""
    if isinstance(v, (float, np.floating)):
        return "NaN" if not np.isfinite(v) else format(float(v), ".8g")
    return str(v.item() if isinstance(v, np.generic) else v)


# ----------------------------------------------------------------------------- later stages' files


@dataclass(frozen=True)
class StageFile:
    """A later stage's per-latent results: its own CSV in the run folder, joined to latents.csv by latent
    id with its columns prefixed (`steer` + `verdict` -> `steer_verdict`)."""

    prefix: str
    path: str
    """Relative to the run folder."""
    columns: tuple[str, ...]
    """Besides `latent`, in file order."""

    def joined(self) -> list[str]:
        return [f"{self.prefix}_{c}" for c in self.columns]


STEERING = StageFile("steer", "steering/verdicts.csv", ("verdict", "effect"))
BEHAVIOUR = StageFile(
    "behaviour",
    "verification/behaviour.csv",
    tuple(
        "side verdict n_strong n_contexts shift z gap_closed null_mean null_std gap first_order "
        "first_order_contexts n_group z_dictionary dictionary_null_mean n_fresh".split()
    ),
)
"""crossdiff verify's verdict per candidate (docs/verification.md)."""
ANSWERS = StageFile("answers", "answers/latents.csv", ("side", "rule", "ngram", "coverage", "lift"))
"""crossdiff answers' rows (analysis/answerlink.py, docs/answers.md): each candidate's rule (partition,
norm, share, answer-link) and the answer n-gram a latent is linked to."""
STAGE_FILES = (BEHAVIOUR, STEERING, ANSWERS)
"""Every stage file `load_results` joins, in column order; a new stage adds its StageFile here."""


STAGE_REPAIRS = {
    "behaviour": "repair it with: crossdiff verify --run {run}",
    "steer": "delete {path} and rerun crossdiff steer --run {run}",
}
"""The command that repairs a stage file differing from its record (crossdiff.core.manifest)."""


def read_stage(run: str | Path, stage: StageFile) -> dict[int, dict]:
    """{latent: {column: value}} of a stage file; {} when the stage has not run."""
    path = Path(run) / stage.path
    if not path.is_file():
        return {}
    repair = STAGE_REPAIRS.get(stage.prefix, "delete {path} and rerun the command that wrote it")
    _check_recorded(path.parent, (path.name,), repair.format(run=run, path=path))
    _, rows = _read_csv(path, f"delete it and rerun the {stage.prefix} stage")
    return {r["latent"]: {c: r.get(c) for c in stage.columns} for r in rows}


def write_stage(run: str | Path, stage: StageFile, rows: dict[int, dict]) -> None:
    """The stage's file with one row per latent (latent order), atomically; missing values are empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["latent", *stage.columns])
    for latent in sorted(rows):
        writer.writerow(
            [latent, *("" if rows[latent].get(c) is None else rows[latent][c] for c in stage.columns)]
        )
    write_text_atomic(Path(run) / stage.path, buf.getvalue())


def read_behaviour(run: str | Path) -> dict[int, dict]:
    """latent -> its verification/behaviour.csv row (numbers as floats, NaN where empty); {} without a
    verification."""
    out = {}
    for latent, row in read_stage(run, BEHAVIOUR).items():
        parsed = {k: (v if k in ("side", "verdict") else as_float(v)) for k, v in row.items()}
        out[latent] = {"latent": latent, **parsed}
    return out


def open_analysed(run: str | Path, store_path: str | None):
    """(run, crosscoder, store, the analysis's latents table, its summary.json) of an analysed run;
    the store given, or the one the analysis recorded."""
    from ..coder.crosscoder import Crosscoder
    from ..inputs.store import Store

    run = Path(run)
    summary = runfolder.read(run, "analysis")
    if summary is None:
        raise CrossdiffError(f"{run} has no finished analysis; run crossdiff analyze --run {run} first")
    cc = Crosscoder.from_pretrained(run)
    store = Store.open_recorded(store_path, summary["store"]["path"], runfolder.path(run, "analysis"))
    cc.cfg.check_store(store)
    return run, cc, store, read_latents(run / "analysis"), summary


def load_results(run: str | Path, analysis: str | Path | None = None) -> LatentTable:
    """latents.csv of RUN/analysis (or `analysis`) joined with every stage file present in RUN. A stage
    file's columns replace same-named ones (older crossdiff versions appended steering to latents.csv)."""
    run = Path(run)
    table = read_latents(analysis if analysis is not None else run / "analysis")
    columns, rows = list(table.columns), table.rows
    for stage in STAGE_FILES:
        found = read_stage(run, stage)
        if not found:
            continue
        names = stage.joined()
        columns += [c for c in names if c not in columns]
        for r in rows:
            got = found.get(r["latent"], {})
            r.update({n: got.get(c) for n, c in zip(names, stage.columns)})
    return LatentTable(columns, rows)


__all__ = [
    "VERDICTS",
    "COLUMNS",
    "LatentTable",
    "StageFile",
    "STEERING",
    "BEHAVIOUR",
    "ANSWERS",
    "STAGE_FILES",
    "candidate_sides",
    "exclusive_sides",
    "is_candidate",
    "read_latents",
    "write_latents",
    "read_stage",
    "read_behaviour",
    "write_stage",
    "load_results",
    "open_analysed",
]
