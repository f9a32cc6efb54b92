"""`crossdiff diff` end to end on the real default pair at a tiny budget: every stage's output,
skipping of finished stages on a rerun, and growing the seed count without redoing other seeds."""

from __future__ import annotations

import json

import pytest

from crossdiff import budget, cli, pipeline
from crossdiff.budget import Budget
from crossdiff.errors import CrossdiffError
from crossdiff.pipeline import DiffConfig, diff

TINY = Budget(
    name="tiny", harvest_tokens=3000, heldout_frac=0.2, latents=256, k=8, train_tokens=6000,
    batch_size=256, dead_tokens=1500, lr=1e-3, seeds=2, steer_top=1, steer_seconds=60.0, splice_tokens=256,
    verify_top=1, verify_heldout_tokens=256,
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
