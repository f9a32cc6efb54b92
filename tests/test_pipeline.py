"""`crossdiff diff` end to end on the real default pair at a tiny budget: every stage's output,
skipping of finished stages on a rerun, and growing the seed count without redoing other seeds."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest

from crossdiff import budget, cli, pipeline
from crossdiff.analysis.analyze import RULES_VERSION
from crossdiff.budget import Budget
from crossdiff.core.errors import CrossdiffError
from crossdiff.pipeline import DiffConfig, diff

TINY = Budget(
    name="tiny", harvest_tokens=3000, heldout_frac=0.2, latents=256, k=8, train_tokens=6000,
    batch_size=256, dead_tokens=1500, lr=1e-3, seeds=2, steer_top=1, steer_seconds=60.0, splice_tokens=256,
    verify_top=1, verify_heldout_tokens=256, verify_scan_tokens=512,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_budget():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(budget.BUDGETS, "tiny", TINY)
        yield


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_budget, models_ab):  # models_ab: skip when the pair is not installed
    out = tmp_path_factory.mktemp("diff") / "d"
    cfg = DiffConfig(out=str(out), budget="tiny")
    return cfg, diff(cfg)


def _json(path):
    return json.loads(path.read_text())


def test_every_stage_leaves_its_output(done):
    cfg, summary = done
    d = cfg.folder
    assert _json(d / "diff.json") == summary
    assert _json(d / "store" / "meta.json")["n_tokens"] == TINY.harvest_tokens
    assert _json(d / "store" / "meta.json")["heldout_frac"] == TINY.heldout_frac
    for run in (d / "run", d / "seeds" / "seed1"):
        ev = _json(run / "eval.json")
        assert ev["latents"] == TINY.latents and ev["tokens_trained"] >= TINY.train_tokens
    assert _json(d / "seeds" / "seed1" / "train_config.json")["seed"] == 1
    assert (d / "run" / "analysis" / "summary.json").is_file()
    stab = _json(d / "run" / "stability.json")
    assert stab["n_runs"] == 2 and stab["seeds"] == [1]
    index = (d / "run" / "report" / "index.html").read_text()
    assert "<h2>Seed stability</h2>" in index
    for f in stab["features"]:  # every candidate in the table links to its page
        assert f'href="features/{f["latent"]}.html"' in index
    stages = _json(d / "stages.json")
    assert set(stages) == {s.name for s in pipeline.stages(cfg, cfg.resolved_budget())}
    assert set(summary["stage_seconds"]) == set(stages)


def test_a_rerun_skips_every_finished_stage(done, monkeypatch):
    cfg, summary = done
    for name in ("_harvest", "_train", "_analyze", "_stability", "_steer", "_report"):
        monkeypatch.setattr(pipeline, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran again"))
    again = diff(cfg)
    assert again["stage_seconds"] == summary["stage_seconds"]


def _no_stage_may_run(monkeypatch):
    for name in ("_harvest", "_train", "_analyze", "_stability", "_steer", "_report"):
        monkeypatch.setattr(pipeline, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran again"))


def test_a_rerun_with_a_relative_out_of_a_diff_made_with_its_absolute_path_skips_every_stage(
    done, monkeypatch
):
    cfg, summary = done
    _no_stage_may_run(monkeypatch)
    monkeypatch.chdir(cfg.folder.parent.parent)
    again = diff(DiffConfig(out=f"{cfg.folder.parent.name}/{cfg.folder.name}", budget="tiny"))
    assert again["stage_seconds"] == summary["stage_seconds"]


def test_a_moved_diff_folder_skips_every_stage(done, monkeypatch, tmp_path):
    cfg, summary = done
    moved = tmp_path / "moved"
    shutil.copytree(cfg.folder, moved)  # copy2: file times kept, as by a move
    _no_stage_may_run(monkeypatch)
    again = diff(DiffConfig(out=str(moved), budget="tiny"))
    assert again["stage_seconds"] == summary["stage_seconds"]


def test_stages_recorded_by_the_previous_version_are_accepted(done, monkeypatch, tmp_path):
    """stages.json as crossdiff 0.1 (commit 29d79fc) wrote it: the train and analyse stages' fingerprints
    covered every config field but the device, folders included. Still finished, and upgraded."""
    cfg, summary = done
    old = tmp_path / "old"
    shutil.copytree(cfg.folder, old)
    b, log = cfg.resolved_budget(), _json(old / "stages.json")

    def old_fingerprint(c, **extra):
        fields = {k: v for k, v in dataclasses.asdict(c).items() if k != "device"}
        text = json.dumps({**fields, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    for s, path in ((0, old / "run"), (1, old / "seeds" / "seed1")):
        tcfg = budget.train_config(b, old / "store", path, arch="dfc", seed=s)
        log[f"train DFC (seed {s})"]["fingerprint"] = old_fingerprint(tcfg)
    acfg = budget.analyze_config(b, old / "run", old / "store")
    log["analyse"]["fingerprint"] = old_fingerprint(acfg, rules=RULES_VERSION)
    # steer's settings as pipeline.py assembled them by hand until commit e790170 (unchanged since: the
    # organism keys its diff stages on these fingerprints)
    steer = {"top": b.steer_top, "budget_seconds": b.steer_seconds, "rules": RULES_VERSION}
    log["steer"]["fingerprint"] = hashlib.sha256(json.dumps(steer, sort_keys=True).encode()).hexdigest()[:16]
    (old / "stages.json").write_text(json.dumps(log))
    _no_stage_may_run(monkeypatch)
    assert diff(DiffConfig(out=str(old), budget="tiny"))["stage_seconds"] == summary["stage_seconds"]
    for stage in ("analyse", "steer"):
        assert (
            _json(old / "stages.json")[stage]["fingerprint"]
            == _json(cfg.folder / "stages.json")[stage]["fingerprint"]
        )


def test_steering_whose_file_is_gone_runs_again(done, monkeypatch):
    """Steering's results live in RUN/steering/verdicts.csv: without it, the stage is not done."""
    cfg, _ = done
    verdicts = cfg.folder / "run" / "steering" / "verdicts.csv"
    content = verdicts.read_text()
    verdicts.unlink()
    ran = []

    def steer_again(*a):
        ran.append(True)
        verdicts.write_text(content)
        return {"steered": 0}

    monkeypatch.setattr(pipeline, "_steer", steer_again)
    diff(cfg)
    assert ran == [True] and verdicts.read_text() == content


def test_a_third_seed_trains_only_that_seed(done, monkeypatch):
    cfg, _ = done
    trained = []
    real_train = pipeline._train
    monkeypatch.setattr(pipeline, "_harvest", lambda *a: pytest.fail("harvest ran again"))
    monkeypatch.setattr(pipeline, "_analyze", lambda *a: pytest.fail("analyze ran again"))
    monkeypatch.setattr(pipeline, "_steer", lambda *a: pytest.fail("steer ran again"))
    monkeypatch.setattr(pipeline, "_train", lambda t: trained.append(t.seed) or real_train(t))
    cfg3 = DiffConfig(out=cfg.out, budget="tiny", seeds=3)
    diff(cfg3)
    assert trained == [2]
    assert _json(cfg.folder / "run" / "stability.json")["n_runs"] == 3


def test_bad_settings_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(CrossdiffError, match="--seeds"):
        DiffConfig(seeds=0)
    assert cli.main(["diff", "--out", str(tmp_path / "x"), "--steer-top", "-1"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --steer-top")
    assert not (tmp_path / "x").exists()


def test_a_model_that_does_not_exist_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "d"
    assert cli.main(["diff", "--out", str(out), "--model-a", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "missing.gguf" in err[-1]
    assert not out.exists()


def test_default_folder_names_both_models():
    assert str(DiffConfig().folder) == "runs/smollm2-135m-vs-gemma3-270m-small"
    assert DiffConfig(model_a="/m/Llama-3.1-8B.gguf", model_b="Qwen/Qwen3-8B").folder.name == (
        "Llama-3.1-8B-vs-Qwen3-8B-small"
    )
