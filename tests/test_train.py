"""The trainer: config validation, end-to-end runs, SIGKILL + resume (bitwise), bad input.

Synthetic stores of planted sparse features stand in for harvested activations (the trainer never
touches models). Legend: N tokens, F planted features, D one model's width.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossdiff import cli
from crossdiff.coder.crosscoder import Crosscoder, Partition
from crossdiff.coder.runlog import save_checkpoint
from crossdiff.coder.train import KILL_ENV, TrainConfig, _initialise, _new_state, fit, train
from crossdiff.core.config import settings
from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.store import write_synthetic_store

REPO = Path(__file__).resolve().parents[1]
D_A, D_B = 24, 20


pytestmark = pytest.mark.usefixtures("one_thread")


def _planted(n_tokens: int, d_a: int, d_b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[A-only | shared | B-only] features, 3 active per token, plus a mean and noise (raw units)."""
    g = torch.Generator().manual_seed(seed)
    n_f = 48
    dirs_a_FD = torch.randn(n_f, d_a, generator=g)
    dirs_b_FD = torch.randn(n_f, d_b, generator=g)
    dirs_a_FD[40:], dirs_b_FD[:8] = 0, 0
    idx_NK = torch.randint(0, n_f, (n_tokens, 3), generator=g)
    mag_NK = torch.rand(n_tokens, 3, generator=g) + 0.5
    x_a = torch.nn.functional.embedding_bag(idx_NK, dirs_a_FD, mode="sum", per_sample_weights=mag_NK) + 1.0
    x_b = torch.nn.functional.embedding_bag(idx_NK, dirs_b_FD, mode="sum", per_sample_weights=mag_NK) - 0.5
    return 10 * x_a + 0.01 * torch.randn(n_tokens, d_a, generator=g), x_b


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "synthetic"
    x_a, x_b = _planted(4096, D_A, D_B)
    write_synthetic_store(path, x_a, x_b, scale_a=0.02, scale_b=0.2, shard_tokens=1024, chunk_len=32)
    return path


def _argv(store, out, **opts) -> list[str]:
    base = dict(
        latents=96,
        k=4,
        tokens=64 * 24,
        batch_size=64,
        checkpoint_every=5,
        log_every=4,
        dead_tokens=128,
        heldout_tokens=1024,
    )
    argv = ["train", "--store", str(store), "--out", str(out)]
    for key, val in {**base, **opts}.items():
        argv += [f"--{key.replace('_', '-')}", str(val)]
    return argv


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "crosscoder.safetensors"))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=200, latents=96), "exceeds the dictionary size"),
        (dict(exclusive_frac=0.5), r"exclusive-frac must be in \[0, 0.5\)"),
        (dict(exclusive_frac=-0.1), "exclusive-frac"),
        (dict(exclusive_frac=0.001, latents=96), "no exclusive latent"),
        (dict(sparsity="relu"), "unknown sparsity 'relu'"),
        (dict(tokens=0), "--tokens must be at least 1"),
        (dict(lr=-1.0), "--lr must be positive"),
        (dict(dec_init_norm=0.0), "--dec-init-norm must be positive"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(CrossdiffError, match=match):
        TrainConfig(store="s", out="o", **kwargs)


def test_schedule():
    cfg = TrainConfig(store="s", out="o", latents=65536, tokens=4096 * 10_000, batch_size=4096)
    assert cfg.warmup == 500 and cfg.lr_at(5000) == pytest.approx(1e-4)  # 2e-4 / sqrt(D / 2^14)
    assert cfg.lr_at(0) == pytest.approx(1e-4 / 500) and cfg.lr_at(249) == pytest.approx(0.5e-4)
    assert cfg.lr_at(9999) == pytest.approx(1e-4 / 2000)  # linear decay over the last 20%
    assert TrainConfig(store="s", out="o", lr=3e-4).lr_at(5000) == 3e-4


def test_clipping_folded_into_fused_adam_matches_clip_grad_norm():
    from crossdiff.coder.crosscoder import CrosscoderConfig
    from crossdiff.coder.train import clip_grad_norm

    results = []
    for fused in (True, False):
        model = Crosscoder(
            CrosscoderConfig(d_a=6, d_b=7, n_latents=32, k=2), generator=torch.Generator().manual_seed(0)
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            out = model.training_forward(
                torch.randn(16, 6, generator=g) * 5, torch.randn(16, 7, generator=g) * 5
            )
            out.loss.backward()
            if fused:
                clip_grad_norm(opt, 1.0)
            else:
                assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) > 1  # clipping is active
            opt.step()
            opt.zero_grad()
        results.append(model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_help_comes_from_field_docstrings(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["crossdiff", "train", "--help"])
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in ("--exclusive-frac", "--no-sparse-kernels", "Dedicated Feature Crosscoder", "2e-4 / sqrt"):
        assert text in out


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize(
    "arch, opts",
    [
        ("batchtopk", {}),
        ("topk", {}),
        ("l1", {"l1_coeff": 0.5}),
        ("dfc", {"sparsity": "topk", "exclusive_frac": 0.1}),
    ],
)
def test_each_arch_trains_and_evaluates(store_path, tmp_path, arch, opts):
    assert cli.main(_argv(store_path, tmp_path / "run", arch=arch, **opts)) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["tokens_trained"] == 64 * 24 and ev["heldout_tokens"] > 0
    assert 0.2 < ev["fve_a"] < 1 and 0.2 < ev["fve_b"] < 1, ev
    assert 0 <= ev["dead_fraction"] < 1 and ev["l0"] > 0
    if arch == "topk" or opts.get("sparsity") == "topk":
        assert ev["l0"] <= 4
    model = Crosscoder.from_pretrained(tmp_path / "run")
    assert model.cfg.sparsity == opts.get("sparsity", arch) and model.partition.is_dfc == (arch == "dfc")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_finished_run_is_a_noop_and_settings_are_locked(store_path, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_argv(store_path, run)) == 0
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8, 12, 16, 20, 24]
    assert {"fve_a", "fve_b", "l0", "loss", "lr", "tokens_per_s", "dead_fraction", "threshold"} <= set(
        lines[-1]
    )
    ev = json.loads((run / "eval.json").read_text())
    assert {"fve_a", "fve_b", "l0", "dead_fraction", "tokens_trained"} <= set(ev) and ev["threshold"] > 0
    before = _tensors(run)
    capsys.readouterr()
    assert cli.main(_argv(store_path, run)) == 0
    assert "already finished" in capsys.readouterr().out
    assert all(torch.equal(v, _tensors(run)[k]) for k, v in before.items())
    assert cli.main(_argv(store_path, run, k=5)) == 2
    assert "other settings (k: 4 -> 5)" in capsys.readouterr().err
    # a run saved before a field existed counts as that field's default: still finished (a folder
    # written before its manifest held its key: its train_config.json decides)
    saved = json.loads((run / "train_config.json").read_text())
    del saved["dec_init_norm"]
    (run / "train_config.json").write_text(json.dumps(saved))
    (run / "manifest.json").unlink()
    assert cli.main(_argv(store_path, run)) == 0
    assert "already finished" in capsys.readouterr().out
    assert cli.main(_argv(store_path, run, dec_init_norm=0.01)) == 2
    assert "other settings (dec_init_norm: 0.1 -> 0.01)" in capsys.readouterr().err
    # a run saved when `arch` named the sparsity (exclusive_frac ignored) is the same run
    old = {k: v for k, v in saved.items() if k != "sparsity"} | {"arch": "batchtopk", "exclusive_frac": 0.05}
    (run / "train_config.json").write_text(json.dumps(old))
    (run / "manifest.json").unlink()
    assert cli.main(_argv(store_path, run)) == 0
    assert "already finished" in capsys.readouterr().out
    assert json.loads((run / "manifest.json").read_text())["protocol"] == 2  # the key recorded now
    assert cli.main(_argv(store_path, run, exclusive_frac=0.05)) == 2
    assert "other settings (exclusive_frac: 0.0 -> 0.05)" in capsys.readouterr().err


def test_arch_shorthand_maps_to_sparsity_and_exclusive_fraction():
    import argparse

    from crossdiff.coder.sparsity import arch_settings
    from crossdiff.core.config import add_config_arguments, config_from_args

    assert arch_settings("dfc") == {"sparsity": "batchtopk", "exclusive_frac": 0.05}
    assert arch_settings("dfc", "l1", 0.1) == {"sparsity": "l1", "exclusive_frac": 0.1}
    assert arch_settings("topk") == {"sparsity": "topk", "exclusive_frac": 0.0}
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    for argv, want in (
        (["--arch", "dfc"], ("batchtopk", 0.05, "dfc")),
        (["--arch", "dfc", "--sparsity", "topk", "--exclusive-frac", "0.1"], ("topk", 0.1, "dfc")),
        (["--arch", "l1"], ("l1", 0.0, "l1")),
        (["--exclusive-frac", "0.2"], ("batchtopk", 0.2, "dfc")),
        ([], ("batchtopk", 0.0, "batchtopk")),
    ):
        cfg = config_from_args(TrainConfig, parser.parse_args(["--store", "s", "--out", "o", *argv]))
        assert (cfg.sparsity, cfg.exclusive_frac, cfg.arch) == want, argv


def test_rerun_with_a_relative_out_of_a_run_made_with_its_absolute_path_is_accepted(
    store_path, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    assert cli.main(_argv(store_path, run.resolve())) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(_argv(os.path.relpath(store_path), "run")) == 0
    assert "already finished" in capsys.readouterr().out


def test_moved_run_folder_is_accepted_and_a_noop_rerun_writes_nothing(store_path, tmp_path, capsys):
    """A finished run, renamed, rerun with its store spelled another way: "already finished", and
    train_config.json untouched (so `crossdiff analyze` still finds the store it names)."""
    assert cli.main(_argv(store_path, tmp_path / "run")) == 0
    moved = tmp_path / "renamed"
    (tmp_path / "run").rename(moved)
    saved = moved / "train_config.json"
    before = (saved.read_bytes(), saved.stat().st_mtime_ns)
    other_spelling = store_path.parent / ".." / store_path.parent.name / store_path.name
    capsys.readouterr()
    assert cli.main(_argv(other_spelling, moved, log_every=8, checkpoint_every=3)) == 0
    assert "already finished" in capsys.readouterr().out
    assert (saved.read_bytes(), saved.stat().st_mtime_ns) == before
    assert json.loads(saved.read_text())["store"] == str(store_path)


def test_decoder_rows_start_at_dec_init_norm(store_path):
    from crossdiff.coder.train import _initialise
    from crossdiff.inputs.store import Store

    for norm in (0.1, 0.01):
        cfg = TrainConfig(
            store=str(store_path), out="-", latents=96, k=4, exclusive_frac=0.05, dec_init_norm=norm
        )
        model = _initialise(cfg, Store.open(store_path), torch.device("cpu")).model
        for W in (model.W_dec_a, model.W_dec_b):
            torch.testing.assert_close(W.norm(dim=1), torch.full((W.shape[0],), norm))


def test_per_partition_auxk_is_a_setting_that_old_dfc_folders_do_not_have(store_path, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_argv(store_path, run, arch="dfc", exclusive_frac=0.1)) == 0
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["aux_per_partition"] is False
    del saved["aux_per_partition"]  # as crossdiff wrote it before the setting: still a match at the default
    (run / "train_config.json").write_text(json.dumps(saved))
    (run / "manifest.json").unlink()  # and before its manifest held its key
    capsys.readouterr()
    assert cli.main([*_argv(store_path, run, arch="dfc", exclusive_frac=0.1), "--aux-per-partition"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert cli.main(_argv(store_path, run, arch="dfc", exclusive_frac=0.1)) == 0
    assert "already finished" in capsys.readouterr().out


def test_exclusive_latents_get_their_own_dead_window():
    part = Partition(10, 2, 3)
    cfg = TrainConfig(store="s", out="o", latents=10, k=2, exclusive_frac=0.2, dead_tokens=500)
    assert cfg.dead_windows(part).tolist() == [500] * 10
    cfg = TrainConfig(
        store="s", out="o", latents=10, k=2, exclusive_frac=0.2, dead_tokens=500, exclusive_dead_tokens=50
    )
    assert cfg.dead_windows(part).tolist() == [50, 50] + [500] * 5 + [50, 50, 50]


def test_sigkill_then_resume_is_bitwise_identical_for_dfc_with_auxk(store_path, tmp_path):
    """DFC + AuxK: killed after step 8 (checkpoint at 5), resumed, equals an uninterrupted run."""
    opts = dict(arch="dfc", exclusive_frac=0.1)
    assert cli.main(_argv(store_path, tmp_path / "ref", **opts)) == 0
    cmd = [sys.executable, "-m", "crossdiff", *_argv(store_path, tmp_path / "run", **opts)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process (fixture)
    killed = subprocess.run(cmd, cwd=REPO, env={**env, KILL_ENV: "8"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000000005"]
    assert not (tmp_path / "run" / "eval.json").exists()
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr and "from step 5" in resumed.stderr
    ref, got = _tensors(tmp_path / "ref"), _tensors(tmp_path / "run")
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    ev_ref, ev_got = (json.loads((tmp_path / r / "eval.json").read_text()) for r in ("ref", "run"))
    for key in ("fve_a", "fve_b", "l0", "dead_fraction", "threshold", "tokens_trained"):
        assert ev_ref[key] == ev_got[key], key
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]  # lines after step 5 were not duplicated
    assert max(r["aux_loss"] for r in rows) > 0  # AuxK was active
    _assert_dfc_isolation(Crosscoder.from_pretrained(tmp_path / "run"))


def _assert_dfc_isolation(model: Crosscoder) -> None:
    part = model.partition
    s, ea, eb = len(part.shared), len(part.a_exclusive), len(part.b_exclusive)
    assert ea == eb == 10 and s == 76
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["W_enc_a"] == shapes["W_dec_a"] == (ea + s, D_A)  # no rows for B-exclusive latents
    assert shapes["W_enc_b"] == shapes["W_dec_b"] == (s + eb, D_B)  # no rows for A-exclusive latents
    x_a, x_b = torch.randn(64, D_A), torch.randn(64, D_B)
    pre, pre_pert = model.pre_acts(x_a, x_b), model.pre_acts(x_a + torch.randn(64, D_A), x_b)
    a_ex, b_ex = slice(0, ea), slice(ea + s, ea + s + eb)
    assert not torch.equal(pre[:, a_ex], pre_pert[:, a_ex]) and torch.equal(pre[:, b_ex], pre_pert[:, b_ex])
    f = model.encode(x_a, x_b).detach().requires_grad_(True)
    x_hat_b = model.decode(f)[1]
    x_hat_b.sum().backward()
    assert not f.grad[:, a_ex].any()
    f2 = f.detach().clone()
    f2[:, a_ex] += 5.0
    assert torch.equal(model.decode(f2)[1], x_hat_b.detach())


# ----------------------------------------------------------------------------- bad input


def _tiny_cfg(store_path, out, **kw) -> TrainConfig:
    base = dict(latents=96, k=4, tokens=64 * 12, batch_size=64, checkpoint_every=2, dead_tokens=128)
    return TrainConfig(store=str(store_path), out=str(out), **{**base, **kw})


def test_nan_batch_stops_naming_the_step_and_keeps_the_last_checkpoint(store_path, tmp_path):
    from crossdiff.coder.runlog import MetricsLog
    from crossdiff.inputs.store import Store

    cfg = _tiny_cfg(store_path, tmp_path / "run")
    store = Store.open(store_path)
    st = _initialise(cfg, store, torch.device("cpu"))
    batches = [b for _, b in zip(range(8), store.batches(64, seed=0), strict=False)]
    batches[5] = (batches[5][0].clone(), batches[5][1].clone())
    batches[5][1][3, 2] = float("nan")
    with pytest.raises(CrossdiffError, match="batch at step 5 contains NaN") as e:
        fit(st, iter(batches), cfg, tmp_path / "run", MetricsLog(tmp_path / "run", cfg, 0))
    assert "last good checkpoint is kept" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000000004"]
    model = Crosscoder.from_pretrained(tmp_path / "run" / "checkpoints" / "step-000000004")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_in_the_store_is_a_one_line_cli_error(tmp_path, capsys):
    x_a, x_b = _planted(1024, D_A, D_B)
    x_a[:, 0] = float("inf")
    write_synthetic_store(tmp_path / "bad", x_a, x_b)
    assert cli.main(_argv(tmp_path / "bad", tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # Stopped where the data enters (the store reader), naming the shard, before any step.
    shard = tmp_path / "bad" / "shards" / "00000.safetensors"
    assert err.startswith(f"error: {shard} is damaged (it holds non-finite or impossible activations"), err
    assert "lr" not in err


def test_checkpoint_that_does_not_match_the_store(store_path, tmp_path):
    from crossdiff.coder.runlog import check_run_folder
    from crossdiff.inputs.store import Store

    other = tmp_path / "store"
    write_synthetic_store(other, *_planted(1024, D_A, D_B))
    cfg = _tiny_cfg(other, tmp_path / "run")
    check_run_folder(cfg, tmp_path / "run", settings(cfg))
    st = _initialise(cfg, Store.open(other), torch.device("cpu"))
    save_checkpoint(tmp_path / "run", st)
    # The store at the same path is replaced by one with another width for B.
    import shutil

    shutil.rmtree(other)
    write_synthetic_store(other, *_planted(1024, D_A, D_B + 4))
    with pytest.raises(
        CrossdiffError, match=r"does not match the store for model B: .* width 20 .* width 24"
    ):
        train(cfg)


@pytest.mark.parametrize("victim", ["crosscoder.safetensors", "trainer_state.pt"])
def test_unreadable_checkpoint_is_a_one_line_error(store_path, tmp_path, victim):
    from crossdiff.coder.runlog import check_run_folder
    from crossdiff.inputs.store import Store

    cfg = _tiny_cfg(store_path, tmp_path / "run")
    check_run_folder(cfg, tmp_path / "run", settings(cfg))
    st = _initialise(cfg, Store.open(store_path), torch.device("cpu"))
    ckpt = save_checkpoint(tmp_path / "run", st)
    (ckpt / victim).write_bytes(b"not a checkpoint")
    with pytest.raises(CrossdiffError, match="cannot read the") as e:
        train(cfg)
    assert "\n" not in str(e.value) and str(ckpt) in str(e.value)


def test_fit_takes_a_plain_iterator_of_tensors(tmp_path):
    """The loop needs no store: any iterable of (x_A, x_B) batches in normalised units."""
    from crossdiff.coder.crosscoder import CrosscoderConfig
    from crossdiff.coder.runlog import MetricsLog

    cfg = TrainConfig(
        store="-", out=str(tmp_path), latents=32, k=2, tokens=16 * 6, batch_size=16, checkpoint_every=100
    )
    st = _new_state(Crosscoder(CrosscoderConfig(d_a=6, d_b=7, n_latents=32, k=2)), torch.device("cpu"))
    batches = ((torch.randn(16, 6), torch.randn(16, 7)) for _ in range(100))
    fit(st, batches, cfg, tmp_path, MetricsLog(tmp_path, cfg, 0))
    assert st.step == 6 and (tmp_path / "checkpoints" / "step-000000006").is_dir()


@pytest.mark.parametrize(
    "argv_opts, match",
    [
        ({"k": 500}, "k=500 exceeds the dictionary size 96"),
        ({"arch": "dfc", "exclusive_frac": 0.7}, "exclusive-frac"),
        ({"arch": "dfc", "exclusive_frac": 0}, "--arch dfc needs --exclusive-frac > 0"),
        ({"arch": "topk", "sparsity": "l1"}, "--sparsity l1 applies only to --arch dfc"),
        ({"arch": "batchtopk", "exclusive_frac": 0.1}, "--exclusive-frac applies only to --arch dfc"),
    ],
)
def test_cli_rejects_bad_options_in_one_line(store_path, tmp_path, capsys, argv_opts, match):
    assert cli.main(_argv(store_path, tmp_path / "run", **argv_opts)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("logger, module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_optional_logger_is_a_warning(tmp_path, capsys, monkeypatch, logger, module):
    from crossdiff.coder.runlog import MetricsLog

    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    log = MetricsLog(tmp_path, TrainConfig(store="-", out=str(tmp_path), logger=logger), 0)
    log.write({"step": 1, "loss": 2.0})
    assert log.backend is None and f"--logger {logger} is not installed" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"loss": 2.0, "step": 1}


def test_short_run_scales_its_defaults_and_warns(store_path, tmp_path, capsys):
    short = TrainConfig(store="S", out="R", exclusive_frac=0.05, latents=4096, k=32, tokens=60_000)
    assert (short.total_steps, short.dead_window, short.warmup) == (15, 15_000, 0)
    assert short.beta == pytest.approx(1 - 10 / 15)
    long = TrainConfig(store="S", out="R", tokens=50_000_000)
    assert (long.dead_window, long.beta) == (10_000_000, 0.999)  # the defaults for full-length runs
    assert TrainConfig(store="S", out="R", tokens=60_000, dead_tokens=5, threshold_beta=0.9).beta == 0.9
    # 12 steps: θ follows the recent cutoffs, so inference fires about k latents per token.
    base = dict(heldout_tokens=1024, dead_tokens=None)
    scaled = train(_tiny_cfg(store_path, tmp_path / "scaled", **base))
    err = capsys.readouterr().err
    assert "warning: 12 optimizer steps (768 tokens at --batch-size 64) are too few" in err
    assert "AuxK dead window 192 tokens, threshold EMA factor 0.167" in err
    fixed = train(_tiny_cfg(store_path, tmp_path / "fixed", threshold_beta=0.999, **base))
    assert abs(scaled["l0"] - 4) < abs(fixed["l0"] - 4)


def test_run_started_with_the_old_fixed_defaults_still_resumes(tmp_path):
    from crossdiff.coder.runlog import check_run_folder
    from crossdiff.core.config import config_to_dict

    cfg = TrainConfig(store="S", out=str(tmp_path / "run"), tokens=50_000_000)
    old = {**config_to_dict(cfg), "dead_tokens": 10_000_000, "threshold_beta": 0.999}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(old))
    check_run_folder(
        cfg, tmp_path / "run", settings(cfg)
    )  # the values it used are the scaled defaults' values
    short = TrainConfig(store="S", out=str(tmp_path / "run"), tokens=60_000)
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({**old, "tokens": 60_000}))
    with pytest.raises(CrossdiffError, match="dead_tokens: 10000000 -> None, threshold_beta: 0.999 -> None"):
        check_run_folder(short, tmp_path / "run", settings(short))


def test_a_store_with_the_uncentred_normalisation_draws_a_warning():
    from types import SimpleNamespace

    from crossdiff.coder.train import uncentred_store_warning

    def store(rule_a, rule_b):
        entry = lambda rule: {"id": "m", **({"normalisation": rule} if rule else {})}  # noqa: E731
        return SimpleNamespace(root="/s", model_a=entry(rule_a), model_b=entry(rule_b))

    assert uncentred_store_warning(store("centred", "centred")) is None
    assert uncentred_store_warning(store("given", "given")) is None  # a synthetic store's own scales
    assert "model B by E||x||^2" in uncentred_store_warning(store("centred", None))
    assert "model A and B" in uncentred_store_warning(store("uncentred", "uncentred"))


def test_fve_accumulated_over_batches_is_the_one_shot_formula():
    """coder/fve.FVE (training's meter and evaluation, the analysis): batch by batch it gives
    1 − Σ||x − x̂||² / Σ||x − mean||² about the mean of all rows, and NaN where nothing varies."""
    from crossdiff.coder.fve import FVE

    g = torch.Generator().manual_seed(0)
    x_ND = torch.randn(50, 7, generator=g, dtype=torch.float64) + 3
    x_hat_ND = torch.randn(50, 7, generator=g, dtype=torch.float64)
    acc = FVE()
    for i in range(0, 50, 8):  # a last batch of 2 rows
        acc.add(x_ND[i : i + 8], x_hat_ND[i : i + 8])
    x, xh = x_ND.double(), x_hat_ND.double()
    want = 1 - float((x - xh).pow(2).sum()) / float((x - x.mean(0)).pow(2).sum())
    assert acc.value() == pytest.approx(want, rel=1e-12)
    by_sse = FVE()
    by_sse.add(x_ND, sse=float((x - xh).pow(2).sum()))
    assert by_sse.value() == pytest.approx(want, rel=1e-12)
    flat = FVE()
    flat.add(torch.ones(4, 3), torch.zeros(4, 3))
    assert math.isnan(flat.value()) and math.isnan(FVE().value())


def test_a_damaged_train_config_is_one_line_and_changes_nothing(store_path, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text('{"store": ')  # cut short
    capsys.readouterr()
    assert cli.main(_argv(store_path, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run / 'train_config.json'} is not valid JSON" in err[0]
    assert sorted(p.name for p in run.iterdir()) == ["train_config.json"]
