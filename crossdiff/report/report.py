"""`crossdiff report`: a static HTML report of an analysed run, readable from disk (no server, no network).

Layout written to RUN/report/ (built in a temporary folder next to it, then renamed into place):
    index.html               the headline in words, the differences, a map of every candidate, the
                             dictionary's summary, the sortable table of candidates, the controls
    features/<latent>.html   one page per latent: what removing it does, what each model predicts where
                             it fires, examples (top and sampled across its range, coloured per token),
                             logit lens, statistics, steering
    assets/report.css, assets/report.js   shared style and the table-sorting script (crossdiff/report/templates)

Modules: report.py (this: inputs, writing), index.py and feature.py (the pages), headline.py (the
headline's sentences), figures.py (the evidence as SVG), calibration.py (controls), terms.py (the
definitions), frame.py (the page frame, value display), htmlkit.py and plots.py (building blocks).

Inputs (every key is optional except the analysis folder and its latents.csv): RUN/cfg.json,
RUN/eval.json, RUN/analysis/{latents.csv, summary.json, features/<latent>.json}, read through
crossdiff.analysis.results (which joins verification/behaviour.csv and steering/verdicts.csv by latent
id); when present RUN/verification/{summary.json, latents/<latent>.json}, RUN/predictions/<latent>.json,
RUN/steering/<latent>.json, RUN/stability.json and calibration.json (RUN/ or RUN/..). Files of older
runs lacking newer keys render without them. docs/report.md has details.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..analysis.answers import read_summary
from ..analysis.labels import label
from ..analysis.results import is_candidate, load_results, read_behaviour
from ..core import runfolder
from ..core.errors import CrossdiffError
from ..core.lock import writes
from .calibration import calibration_html, read_calibration, stability_html
from .feature import example_html, feature_html, hist_view
from .frame import read_json
from .headline import headline_text
from .index import index_html

ASSETS = ("report.css", "report.js")
_hist_view = hist_view  # the name tests and older callers use
__all__ = [
    "ReportConfig",
    "RunData",
    "load_run",
    "report",
    "example_html",
    "stability_html",
    "calibration_html",
]


@dataclass(frozen=True)
class ReportConfig:
    """Where the analysed run is; the report is written to RUN/report/."""

    run: str
    """Run folder made by `crossdiff train` and analysed by `crossdiff analyze`; the report goes in RUN/report."""
    max_examples: int = 20
    """Top examples shown on each feature page."""
    predictions: bool = True
    """First compute what each model predicts where each verified difference fires (crossdiff/analysis/predictions.py: loads both models, a few seconds per difference; reused when done). Skipped, with a note, when the run is not verified or the models or store cannot be opened; the report renders without it."""

    def __post_init__(self):
        if self.max_examples < 1:
            raise CrossdiffError(f"--max-examples must be at least 1, got {self.max_examples}")


@dataclass(frozen=True)
class RunData:
    """Everything the report reads, loaded once (feature and steering files are read page by page)."""

    run: Path
    cfg: dict
    eval: dict
    summary: dict
    columns: list[str]
    rows: list[dict]
    calibration: dict | list | None
    stability: dict | None
    features: dict[int, Path]
    steering: dict[int, Path]
    behaviour: dict[int, dict]
    """crossdiff verify's row per candidate (verification/behaviour.csv), {} without a verification."""
    verification: dict | None
    """verification/summary.json."""
    contexts: dict[int, Path]
    """verification/latents/<latent>.json: the scored contexts of each exactly verified latent."""
    predictions: dict[int, dict]
    """predictions/<latent>.json (crossdiff/analysis/predictions.py), {} when not computed."""
    labels: dict[int, dict]
    """crossdiff/analysis/labels.py's label of every latent with a feature page."""
    answers: dict | None = None
    """answers/summary.json (crossdiff/analysis/answers.py): the answer-level diff of a chat diff."""
    link_groups: dict[int, dict] = field(default_factory=dict)
    """leader -> its linked n-gram's group (crossdiff/analysis/answerlink.py ngram_groups), {} without."""

    @property
    def paged(self) -> set[int]:
        """The latents with a feature page: an evidence file, or a verification (a linked n-gram's group)."""
        return set(self.features) | set(self.contexts)


def _numbered_json(folder: Path) -> dict[int, Path]:
    """{latent: path} for the <latent>.json files of a folder (other names are ignored)."""
    if not folder.is_dir():
        return {}
    return {int(p.stem): p for p in folder.glob("*.json") if re.fullmatch(r"\d+", p.stem)}


def load_run(run: str | Path) -> RunData:
    from ..analysis.answerlink import ngram_groups
    from ..analysis.predictions import read_predictions

    run = Path(run)
    if not run.is_dir():
        raise CrossdiffError(f"run folder {run} not found; pass the --out folder of crossdiff train")
    analysis = run / "analysis"
    if not analysis.is_dir():
        raise CrossdiffError(f"{analysis} not found; run crossdiff analyze first")
    latents = load_results(run)  # latents.csv joined with the later stages' files
    features = _numbered_json(analysis / "features")
    predictions = read_predictions(run)
    labels = {}
    for j, path in features.items():
        doc = read_json(path)
        labels[j] = label(doc if isinstance(doc, dict) else None, predictions.get(j))
    return RunData(
        run=run,
        cfg=runfolder.read(run, "cfg") or {},
        eval=runfolder.read(run, "eval") or {},
        summary=runfolder.read(run, "analysis") or {},
        columns=latents.columns,
        rows=latents.rows,
        calibration=read_calibration(run),
        stability=runfolder.read(run, "stability"),
        features=features,
        steering=_numbered_json(run / "steering"),
        behaviour=read_behaviour(run),
        verification=runfolder.read(run, "verification"),
        contexts=_numbered_json(run / "verification" / "latents"),
        predictions=predictions,
        labels=labels,
        answers=read_summary(run),
        link_groups=ngram_groups(run),
    )


def _score_order(rows: list[dict]) -> list[dict]:
    """Highest score first; rows without a finite score last, in file order."""
    from .frame import finite

    return sorted(rows, key=lambda r: (0, -r["score"]) if finite(r.get("score")) else (1, 0.0))


# ----------------------------------------------------------------------------- writing


def _write_pages(data: RunData, cands: list[dict], out: Path, max_examples: int) -> None:
    (out / "assets").mkdir(parents=True)
    for name in ASSETS:
        (out / "assets" / name).write_bytes((resources.files(__package__) / "templates" / name).read_bytes())
    (out / "index.html").write_text(index_html(data, cands), encoding="utf-8")
    cand_ids = [r["latent"] for r in cands]
    # verified latents without an evidence file (linked n-grams' groups) get a page of their verification
    paged = data.paged
    order = [i for i in cand_ids if i in paged] + sorted(paged - set(cand_ids))
    rows = {r["latent"]: r for r in data.rows}
    (out / "features").mkdir()
    for k, latent in enumerate(order):
        feat = read_json(data.features[latent]) if latent in data.features else {}
        if not isinstance(feat, dict):
            raise CrossdiffError(f"{data.features[latent]} is not a JSON object; rerun crossdiff analyze")
        nav = (order[k - 1] if k else None, order[k + 1] if k + 1 < len(order) else None)
        html = feature_html(latent, feat, data, rows.get(latent), nav, max_examples)
        (out / "features" / f"{latent}.html").write_text(html, encoding="utf-8")


def _replace_dir(new: Path, dest: Path) -> None:
    """Put the finished folder `new` at `dest`; an old report is moved aside first, then deleted."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def candidate_rows(rows: list[dict]) -> list[dict]:
    """The analysis's candidates and the latents verification added beside them (those linked to the
    answers, analysis/answerlink.py), each with the side of the model it was judged in."""
    out = []
    for r in rows:
        if is_candidate(r):
            out.append(r)
        elif r.get("behaviour_verdict") and r.get("verdict") != "dead":
            out.append({**r, "side": r.get("behaviour_side")})
    return out


@writes(lambda cfg: Path(cfg.run) / "report", record="tree")
def report(cfg: ReportConfig) -> Path:
    """Write RUN/report/ and return the path of its index.html."""
    data = load_run(cfg.run)  # checks the inputs before any model is loaded
    if cfg.predictions and data.verification is not None:
        from ..analysis.predictions import PredictConfig, try_predict

        note = try_predict(PredictConfig(run=cfg.run))
        if note != "not verified":
            print(f"report: predictions at the differences' firing positions: {note}", file=sys.stderr)
        data = load_run(cfg.run)
    cands = _score_order(candidate_rows(data.rows))
    dest = data.run / "report"
    for stale in data.run.glob(f".{dest.name}.old-*"):  # left by a run killed mid-swap
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=data.run))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a report is meant to be shared
        _write_pages(data, cands, tmp, cfg.max_examples)
        _replace_dir(tmp, dest)
    except OSError as e:
        raise CrossdiffError(f"could not write the report to {dest}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index = dest / "index.html"
    print(f"report: {index} ({len(cands)} candidates, {len(data.paged)} feature pages)", file=sys.stderr)
    print(headline_text(data, data.labels), file=sys.stderr)  # what the page opens with, in the terminal
    return index
