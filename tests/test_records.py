"""Checked stage records (crossdiff.core.manifest): a stage file that differs from the record its stage
wrote is refused by every reader with one line and the repairing command, `crossdiff check` names it, and
a rerun of the stage repairs it; a harvested store without settings.json or tokenizers is damaged; and
the messages of docs/integrity.md's table name the file and the fix, before any model loads, leaving
nothing behind. A synthetic store and a tiny trained DFC stand in for the real pair (seconds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crossdiff import cli
from crossdiff.analysis.analyze import RULES_VERSION, AnalyzeConfig, analyze
from crossdiff.analysis.results import BEHAVIOUR, load_results, read_stage, write_stage
from crossdiff.analysis.steer import SteerConfig, steer
from crossdiff.analysis.verify import VerifyConfig, verify
from crossdiff.check import CheckConfig, check
from crossdiff.coder.train import TrainConfig, train
from crossdiff.core import manifest
from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.store import Store, write_synthetic_store
from crossdiff.report.report import ReportConfig, report

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(latents=64, k=4, tokens=64 * 30, batch_size=64, checkpoint_every=10, dead_tokens=256,
            heldout_tokens=512, exclusive_frac=0.1)  # fmt: skip


def _store(path: Path, d_a: int = 12, d_b: int = 10, seed: int = 0, **kw) -> Path:
    g = torch.Generator().manual_seed(seed)
    x_a, x_b = torch.randn(3000, d_a, generator=g), torch.randn(3000, d_b, generator=g)
    write_synthetic_store(path, x_a, x_b, shard_tokens=1000, chunk_len=32, **kw)
    return path


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("records")
    store = _store(root / "store")
    run = root / "run"
    train(TrainConfig(store=str(store), out=str(run), **TINY))
    analyze(AnalyzeConfig(run=str(run), batch_size=256, shared_probes=8, shared_features=2))
    return store, run


@pytest.fixture
def run(analysed, tmp_path) -> Path:
    """A private copy of the analysed run (its store path in train_config.json is absolute)."""
    copy = tmp_path / "run"
    shutil.copytree(analysed[1], copy)
    return copy


def _as_harvested(store: Path, dest: Path) -> Path:
    """A copy of a synthetic store dressed as a harvested one (corpus, settings.json, tokenizers)."""
    shutil.copytree(store, dest)
    meta = json.loads((dest / "meta.json").read_text())
    (dest / "meta.json").write_text(json.dumps({**meta, "corpus": "brown"}))
    (dest / "settings.json").write_text(json.dumps({"corpus": "brown"}))
    for key in "ab":
        (dest / "tokenizers" / key).mkdir(parents=True)
        (dest / "tokenizers" / key / "tokenizer_config.json").write_text("{}")
    return dest


def _truncate(path: Path, share: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * share)])


def test_each_stage_records_its_files_with_sha256_and_rows(run):
    m = manifest.read(run / "analysis")
    assert m["command"] == "analyze" and m["complete"] is True
    rec = m["files"]["latents.csv"]
    assert rec == manifest.file_record(run / "analysis" / "latents.csv")
    assert rec["rows"] == 64 == len(load_results(run).rows)
    assert set(m["files"]) >= {"latents.csv", "summary.json", "pass.pt"} and "settings.json" not in m["files"]
    assert m["protocol"] == manifest.KEYED and m["settings"]["rules"] == RULES_VERSION  # the analysis's key
    assert set(manifest.read(run)["files"]) == {"cfg.json", "crosscoder.safetensors", "eval.json",
                                                "metrics.jsonl", "train_config.json"}  # fmt: skip


@pytest.mark.parametrize("damage", ["truncated", "one row deleted"])
def test_a_damaged_latents_csv_is_refused_named_checked_and_repaired(run, analysed, damage, capsys):
    path = run / "analysis" / "latents.csv"
    good = path.read_bytes()
    if damage == "truncated":
        _truncate(path, 0.6)
    else:
        lines = good.decode().splitlines(keepends=True)
        path.write_text("".join(lines[:5] + lines[6:]))
    expect = f"{path} is damaged .*; repair it with: crossdiff analyze --run {run}$"
    store = _as_harvested(analysed[0], run.parent / "harvested")  # verify refuses a synthetic store first
    readers = (
        lambda: load_results(run),
        lambda: report(ReportConfig(run=str(run))),
        lambda: verify(VerifyConfig(run=str(run), store=str(store), device="cpu")),
        lambda: steer(SteerConfig(run=str(run), top=1, device="cpu")),
    )
    for reader in readers:
        with pytest.raises(CrossdiffError, match=expect):
            reader()
    with pytest.raises(CrossdiffError, match="1 damaged file"):
        check(CheckConfig(path=str(run)))
    out = capsys.readouterr().out
    assert f"damaged: {path} (" in out and f"repair: crossdiff analyze --run {run}" in out
    if damage == "one row deleted":
        assert "63 rows, 64 were written" in out or "bytes" in out
    analyze(AnalyzeConfig(run=str(run), batch_size=256, shared_probes=8, shared_features=2))  # repairs it
    assert path.read_bytes() == good
    check(CheckConfig(path=str(run)))


def test_a_damaged_verification_file_names_crossdiff_verify(run):
    folder = run / "verification"
    began, old = time.time() - 1, None
    write_stage(run, BEHAVIOUR, {3: {"side": "a", "verdict": "difference", "z": 4.0}})
    manifest.finish(folder, "verify", {}, began, old, True)
    assert read_stage(run, BEHAVIOUR)[3]["verdict"] == "difference"
    _truncate(folder / "behaviour.csv", 0.5)
    with pytest.raises(CrossdiffError, match=f"behaviour.csv is damaged .*crossdiff verify --run {run}$"):
        load_results(run)


def test_a_folder_being_written_or_left_half_written_is_refused(run):
    from test_locks import _holder, _kill

    proc = _holder(run / "analysis")
    try:
        with pytest.raises(
            CrossdiffError, match=f"is being written by another crossdiff process [(]PID {proc.pid}"
        ):
            load_results(run)
    finally:
        _kill(proc)
    manifest.start(run / "analysis")  # as a rewrite killed half-way leaves it
    with pytest.raises(CrossdiffError, match="left half-written by an interrupted crossdiff analyze"):
        load_results(run)


def test_a_no_op_rerun_never_records_a_file_damaged_before_it(run, capsys):
    _truncate(run / "metrics.jsonl", 0.5)
    cfg = json.loads((run / "train_config.json").read_text())
    train(TrainConfig(**{k: v for k, v in cfg.items() if k in TrainConfig.__dataclass_fields__}))
    with pytest.raises(CrossdiffError, match="1 damaged file"):
        check(CheckConfig(path=str(run)))
    assert f"damaged: {run / 'metrics.jsonl'}" in capsys.readouterr().out


def test_a_command_that_fails_before_writing_leaves_its_folder_complete(run, tmp_path):
    other = _store(tmp_path / "other", d_b=8)  # another width: refused before anything is written
    with pytest.raises(CrossdiffError, match="does not match the store"):
        analyze(AnalyzeConfig(run=str(run), store=str(other)))
    assert manifest.read(run / "analysis")["complete"] is True
    load_results(run)


# ----------------------------------------------------------------------------- stores


@pytest.mark.parametrize("missing", ["settings.json", "tokenizers"])
def test_a_harvested_store_without_settings_or_tokenizers_is_damaged_never_synthetic(
    tmp_path, missing, capsys
):
    store = _as_harvested(_store(tmp_path / "synthetic"), tmp_path / "s")
    Store.open(store)
    shutil.rmtree(store / missing) if missing == "tokenizers" else (store / missing).unlink()
    with pytest.raises(CrossdiffError, match=f"{store / missing}.* is damaged [(]missing[)]"):
        Store.open(store)
    with pytest.raises(CrossdiffError, match="damaged file"):
        check(CheckConfig(path=str(store)))
    assert f"damaged: {store / missing}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- messages


def _main(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_train_lr_inf_is_refused_before_anything(tmp_path, analysed, capsys):
    rc, err = _main(
        ["train", "--store", str(analysed[0]), "--out", str(tmp_path / "r"), "--lr", "inf"], capsys
    )
    assert rc == 2 and err == "error: --lr must be a finite number, got inf"
    assert not (tmp_path / "r").exists()


def test_train_on_a_damaged_store_leaves_no_folder(tmp_path, capsys):
    store = _store(tmp_path / "s")
    (store / "shards" / "00001.safetensors").unlink()
    rc, err = _main(["train", "--store", str(store), "--out", str(tmp_path / "x" / "r")], capsys)
    assert rc == 2 and "00001.safetensors is damaged (missing)" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_a_diverging_run_without_a_checkpoint_says_so_and_leaves_nothing(tmp_path, analysed, capsys):
    argv = ["train", "--store", str(analysed[0]), "--out", str(tmp_path / "r"), "--lr", "1e30"]
    argv += ["--latents", "64", "--k", "4", "--tokens", "6400", "--batch-size", "64"]
    rc, err = _main(argv, capsys)
    assert rc == 2 and "non-finite" in err and "no checkpoint had been written" in err
    assert not (tmp_path / "r").exists()


def test_batch_size_1_logs_a_sane_fve(tmp_path, analysed):
    run = tmp_path / "r"
    ev = train(TrainConfig(store=str(analysed[0]), out=str(run), **{**TINY, "batch_size": 1, "tokens": 64,
                                                                   "log_every": 8}))  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(-1.5 < r["fve_a"] <= 1 and -1.5 < r["fve_b"] <= 1 for r in rows)
    assert -1.5 < ev["fve_a"] <= 1


def test_generate_into_a_path_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc, err = _main(["generate", "--out", str(tmp_path / "afile" / "x.jsonl"), "--limit", "1"], capsys)
    assert rc == 2 and err == (
        f"error: {tmp_path / 'afile'} is a file, so nothing can be written under it; choose an output path "
        "whose folders are folders"
    )


def test_verify_on_a_moved_run_asks_for_store(run, analysed, tmp_path, capsys):
    """The run records its store's path; after the run and the store move, verify asks for --store."""
    store = tmp_path / "s2"
    shutil.copytree(analysed[0], store)
    summary_path = run / "analysis" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["store"]["path"] = str(store)
    summary_path.write_text(json.dumps(summary))
    manifest.finish(run / "analysis", "analyze", {}, time.time() - 1, manifest.read(run / "analysis"), True)
    shutil.move(store, tmp_path / "s3")
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(run, moved)
    rc, err = _main(["verify", "--run", str(moved)], capsys)
    assert rc == 2 and err == (
        f"error: {moved / 'analysis' / 'summary.json'} records the store {store}, which is not there (the run "
        "or the store was moved); pass --store with the store's path"
    )


def test_a_store_from_another_corpus_names_the_fix(run, tmp_path, capsys):
    other = _store(tmp_path / "other", seed=1)  # same models and widths, other activations: other scale
    meta = json.loads((other / "meta.json").read_text())
    for m in "ab":
        meta["models"][m]["scale"] = 0.5
    (other / "meta.json").write_text(json.dumps(meta))
    rc, err = _main(
        ["analyze", "--run", str(run), "--store", str(other), "--out", str(tmp_path / "an")], capsys
    )
    assert (
        rc == 2 and "harvested from other text" in err and "pass --store with the store the checkpoint" in err
    )
    assert not (tmp_path / "an").exists()


def test_a_layer_out_of_range_names_flag_and_model_before_any_load(
    tmp_path, monkeypatch, capsys, tokenizers_ab
):
    from crossdiff.harvest import harvest as harvest_module

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the layer was checked")

    monkeypatch.setattr(harvest_module, "load_model", no_load)
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some text to read.\n")
    rc, err = _main(
        ["harvest", "--out", str(tmp_path / "s"), "--corpus", str(corpus), "--layer-a", "99"], capsys
    )
    assert rc == 2 and err.startswith(
        "error: --layer-a 99: layer 99 is out of range: this model has 30 blocks"
    )
    assert "smollm2-135m" in err and not (tmp_path / "s").exists()


def test_check_covers_a_stage_folder_alone(run, capsys):
    check(CheckConfig(path=str(run / "analysis")))
    assert "recorded files match" in capsys.readouterr().out


def test_python_m_crossdiff_check_exit_code(run):
    _truncate(run / "analysis" / "summary.json", 0.9)
    r = subprocess.run([sys.executable, "-m", "crossdiff", "check", str(run)], capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert r.returncode == 2 and f"damaged: {run / 'analysis' / 'summary.json'}" in r.stdout


def test_a_prompts_store_records_its_answers_relative_to_itself(tmp_path):
    """A diff's answers are recorded relative to its store, so the folder resumes after a move or under a
    symlink; a corpus outside the folder stays as given."""
    from crossdiff.harvest.harvest import HarvestConfig, _check_settings, recorded_settings
    from crossdiff.inputs.storefiles import harvest_command

    real = tmp_path / "D"
    (real / "answers").mkdir(parents=True)
    (real / "answers" / "a.jsonl").write_text("")
    (tmp_path / "link").symlink_to(real)

    def cfg(folder: Path, corpus: str | None = None) -> HarvestConfig:
        return HarvestConfig(
            out=str(folder / "store"), corpus=corpus or f"chat:{folder / 'answers' / 'a.jsonl'}"
        )

    saved = recorded_settings(cfg(real))
    assert saved["corpus"] == "chat:{store}/../answers/a.jsonl"
    assert recorded_settings(cfg(tmp_path / "link")) == saved
    outside = f"chat:{tmp_path / 'elsewhere.jsonl'}"
    assert recorded_settings(cfg(real, outside))["corpus"] == outside
    (real / "store").mkdir()
    (real / "store" / "settings.json").write_text(json.dumps(saved))
    (real / "store" / "meta.json").write_text("{}")
    shutil.move(real, tmp_path / "D2")
    moved = tmp_path / "D2" / "store"
    assert _check_settings(moved, cfg(tmp_path / "D2"), 1)[0] is True  # complete: the rerun resumes it
    assert f"--corpus chat:{moved}/../answers/a.jsonl" in harvest_command(moved)
