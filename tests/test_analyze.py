"""`crossdiff analyze` on synthetic stores: candidates and context probes on planted latents (one truly
A-only, one secretly linear in x_B: both candidates, only the second detectable by B), the output schema (latents.csv, summary.json, features/*.json), restartability, and
Latent Scaling on a self-diff.

Legend: N tokens, D one model's width, F latents.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from crossdiff import cli
from crossdiff.analysis.analyze import COLUMNS, RULES_VERSION, AnalyzeConfig, analyze
from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.store import write_synthetic_store

D_A, D_B, N = 16, 12, 8192
SUMMARY_KEYS = {
    "n_latents",
    "counts",
    "candidates",
    "fve_a",
    "fve_b",
    "l0",
    "dead_fraction",
    "n_tokens_analysed",
    "thresholds",
    "splice",
    "run",
    "store",
}


def _planted(same_space: bool = False):
    """x_A carries z0 (A only) on dim 0 and z1 on dim 1; x_B carries z1 too (dim 0), plus shared
    dense features on dims 4-7 of both. Raw units."""
    g = torch.Generator().manual_seed(0)

    def sparse():
        return (torch.rand(N, generator=g) < 0.1) * (1 + 2 * torch.rand(N, generator=g))

    z0, z1, dense = sparse(), sparse(), torch.randn(N, 4, generator=g)
    x_a = 0.05 * torch.randn(N, D_A, generator=g)
    x_a[:, 0] += z0
    x_a[:, 1] += z1
    x_a[:, 4:8] += dense
    if same_space:
        return x_a, x_a.clone()
    x_b = 0.05 * torch.randn(N, D_B, generator=g)
    x_b[:, 0] += 2 * z1
    x_b[:, 4:8] += dense  # on the dims _handmade's shared latents write: both writes help
    return x_a, x_b


def _e(d, i, scale=1.0):
    v = torch.zeros(d)
    v[i] = scale
    return v


def _handmade(arch: str, d_b: int = D_B, model_b: str = "synthetic-b") -> Crosscoder:
    """Latent 0 reads A's z0, latent 1 A's z1 (both A-side candidates), 2-5 the shared dense dims,
    the last two read B dims that carry only noise (dead B-side candidates). ReLU(f_pre - 0.5)."""
    spec = {  # latent: (A direction or None, B direction or None)
        0: (_e(D_A, 0), None),
        1: (_e(D_A, 1), None),
        **{2 + i: (_e(D_A, 4 + i), _e(d_b, 4 + i)) for i in range(4)},
        6: (None, _e(d_b, 2)),
        7: (None, _e(d_b, 3)),
    }
    dfc = arch == "dfc"
    cfg = CrosscoderConfig(
        d_a=D_A,
        d_b=d_b,
        n_latents=8,
        sparsity="l1",
        n_a_exclusive=2 if dfc else 0,
        n_b_exclusive=2 if dfc else 0,
        model_a="synthetic-a",
        model_b=model_b,
        layer_a=0,
        layer_b=0,
    )
    cc = Crosscoder(cfg, dec_init_norm=0.0)
    part = cc.partition
    with torch.no_grad():
        cc.b_enc.fill_(-0.5)
        for j, (va, vb) in spec.items():
            if j in part.a_latents:
                # standard crosscoder: A-side candidates get a tiny B decoder (relative norm 0.05/1.05)
                va = va if va is not None else torch.zeros(D_A)
                cc.W_enc_a[j], cc.W_dec_a[j] = va, va if va.any() else _e(D_A, 15, 0.05)
            if j in part.b_latents:
                vb = vb if vb is not None else torch.zeros(d_b)
                cc.W_enc_b[j - part.n_a_exclusive] = vb
                cc.W_dec_b[j - part.n_a_exclusive] = vb if vb.any() else _e(d_b, d_b - 1, 0.05)
    return cc


def _setup(tmp_path: Path, arch: str, same_space: bool = False) -> tuple[Path, Path]:
    x_a, x_b = _planted(same_space)
    model_b = "synthetic-a" if same_space else "synthetic-b"
    store = tmp_path / "store"
    write_synthetic_store(
        store, x_a, x_b, shard_tokens=3000, chunk_len=64, model_a="synthetic-a", model_b=model_b
    )
    run = tmp_path / "run"
    _handmade(arch, d_b=x_b.shape[1], model_b=model_b).save_pretrained(run)
    return store, run


def _rows(run: Path) -> list[dict]:
    with open(run / "analysis" / "latents.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("arch", ["dfc", "standard"])
def test_both_planted_latents_are_candidates_and_only_the_secretly_shared_one_is_detectable(tmp_path, arch):
    store, run = _setup(tmp_path, arch)
    summary = analyze(AnalyzeConfig(run=str(run), store=str(store), batch_size=500))
    rows = _rows(run)
    verdicts = [r["verdict"] for r in rows]
    # Detection by B is information, never a rejection: both stay candidates.
    assert verdicts[:2] == ["candidate_a", "candidate_a"], rows[:2]
    assert rows[1]["reason"].startswith("context detectable by B (AUROC"), rows[1]
    assert rows[0]["reason"].startswith("context not linearly detectable by B"), rows[0]
    assert float(rows[1]["probe_r2"]) > 0.5 and float(rows[0]["probe_r2"]) < 0.1
    assert float(rows[0]["probe_auroc"]) < 0.7 < 0.95 < float(rows[1]["probe_auroc"])
    assert verdicts[2:6] == ["shared"] * 4 and verdicts[6:] == ["dead"] * 2
    assert all(r["reason"] == "" for r in rows[2:])
    sides = [r["side"] for r in rows]  # the candidate rule, written down (dead ones keep their side)
    assert sides[:6] == ["a", "a"] + [""] * 4 and (arch != "dfc" or sides[6:] == ["b", "b"])
    expected_partition = ["a_exclusive"] * 2 + ["shared"] * 4 + ["b_exclusive"] * 2
    assert [r["partition"] for r in rows] == (expected_partition if arch == "dfc" else ["shared"] * 8)
    assert float(rows[0]["rel_norm"]) == pytest.approx(0.0 if arch == "dfc" else 0.05 / 1.05, abs=1e-6)
    assert summary["candidates"] == {"a": 2, "b": 0}
    assert summary["counts"] == {"candidate_a": 2, "candidate_b": 0, "shared": 4, "dead": 2}
    # shared references are probed too, and are predictable from the other side
    assert summary["shared_reference"]["n"] == 4 and summary["shared_reference"]["median_auroc"] > 0.9
    assert math.isnan(float(rows[0]["latent_scaling"]))  # different models: no Latent Scaling
    # The score is the RMS write into A; detection by B does not discount it.
    assert float(rows[0]["score"]) > 0 and float(rows[1]["score"]) > 0
    share = [float(r["functional_share"]) for r in rows]  # B's share of the reconstruction, held out
    assert (
        share[0] <= 0.1 and all(0.1 < v < 0.9 for v in share[2:6]) and all(math.isnan(v) for v in share[6:])
    )


def test_end_to_end_cli_schema_features_and_restart(tmp_path):
    store, run = _setup(tmp_path, "dfc")
    argv = ["analyze", "--run", str(run), "--store", str(store), "--top-k", "5", "--batch-size", "700"]
    assert cli.main(argv + ["--shared-features", "2"]) == 0
    out = run / "analysis"
    with open(out / "latents.csv") as f:
        header = next(csv.reader(f))
    assert header == COLUMNS
    rows = _rows(run)
    assert len(rows) == 8 and [int(r["latent"]) for r in rows] == list(range(8))
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert sum(summary["counts"].values()) == summary["n_latents"] == 8
    assert summary["n_tokens_analysed"] == N and summary["fve_a"] <= 1 and summary["l0"] > 0
    assert summary["dead_fraction"] == pytest.approx(2 / 8)
    assert summary["splice"] == {"skipped": "synthetic store: no models to load"}
    assert summary["store"]["a"]["id"] == "synthetic-a" and summary["run"]["top_k"] == 5
    # evidence: non-dead candidates (0, 1) and the 2 best shared latents
    shared_scores = sorted(((float(r["score"]), int(r["latent"])) for r in rows[2:6]), reverse=True)
    expected = {0, 1} | {j for _, j in shared_scores[:2]}
    assert {int(p.stem) for p in (out / "features").glob("*.json")} == expected
    feat = json.loads((out / "features" / "0.json").read_text())
    assert set(feat) == {
        "latent",
        "partition",
        "verdict",
        "stats",
        "examples",
        "histogram",
        "logit_lens",
        "quantile_examples",
    }
    assert feat["verdict"] == "candidate_a" and set(feat["stats"]) == set(COLUMNS)
    assert feat["logit_lens"] is None and feat["stats"]["latent_scaling"] is None  # NaN -> null
    assert len(feat["examples"]) == 5
    quant = [e["value"] for e in feat["quantile_examples"]]  # sampled across its range (examples.py)
    assert (
        len(quant) == 10 and quant == sorted(quant, reverse=True) and quant[0] < feat["examples"][0]["value"]
    )
    values = [e["value"] for e in feat["examples"]]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(float(rows[0]["max_act"]))
    assert sum(feat["histogram"]["counts"]) == round(float(rows[0]["density"]) * N)
    assert len(feat["histogram"]["edges"]) == len(feat["histogram"]["counts"]) + 1
    # rerun with the same settings: nothing is rewritten
    stamp = (out / "summary.json").stat().st_mtime_ns
    assert cli.main(argv + ["--shared-features", "2"]) == 0
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    # other output settings: the files are redone, the streaming pass is reused
    pass_stamp = (out / "pass.pt").stat().st_mtime_ns
    assert cli.main(argv + ["--shared-features", "0", "--context-chars", "40"]) == 0
    assert (out / "pass.pt").stat().st_mtime_ns == pass_stamp
    assert {int(p.stem) for p in (out / "features").glob("*.json")} == {0, 1}  # stale files removed
    assert _rows(run)[0]["verdict"] == "candidate_a"
    # new candidate / verdict rules (analyze.RULES_VERSION): a rerun redoes everything
    import crossdiff.analysis.analyze as analyze_mod

    stamp = (out / "summary.json").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(analyze_mod, "RULES_VERSION", analyze_mod.RULES_VERSION + 1)
        assert cli.main(argv + ["--shared-features", "0", "--context-chars", "40"]) == 0
    assert (out / "pass.pt").stat().st_mtime_ns > pass_stamp
    assert (out / "summary.json").stat().st_mtime_ns > stamp


@pytest.mark.parametrize("version", ["0.1", "e790170"])
def test_analysis_written_by_the_previous_version_is_complete(tmp_path, capsys, version):
    """An analysis whose key lived in settings.json (before the manifest held it, crossdiff.core.manifest):
    as crossdiff 0.1 (commit 29d79fc) wrote it, a sha1 over the settings (every field but run, store,
    out, device), cfg.json, the weights' size and time, the store's meta and the rules; as commit
    e790170 wrote it, the sha256 fingerprint of the same, beside a manifest of the config's settings."""
    import hashlib

    from crossdiff.core.config import fingerprint, settings

    store, run = _setup(tmp_path, "dfc")
    cfg = AnalyzeConfig(run=str(run), store=str(store), batch_size=700)
    analyze(cfg)
    out = run / "analysis"
    stat = (run / "crosscoder.safetensors").stat()
    meta = json.loads((store / "meta.json").read_text())
    inputs = [(run / "cfg.json").read_text(), stat.st_size, stat.st_mtime_ns, meta, RULES_VERSION]
    if version == "0.1":
        old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("run", "store", "out", "device")}
        key = hashlib.sha1(json.dumps([old, *inputs], sort_keys=True).encode()).hexdigest()
        (out / "manifest.json").unlink()  # 0.1 wrote none
    else:
        key = fingerprint([settings(cfg), *inputs])
        manifest = json.loads((out / "manifest.json").read_text())
        del manifest["protocol"]
        manifest.update(fingerprint=fingerprint(settings(cfg)), settings=settings(cfg))
        (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "settings.json").write_text(json.dumps({"fingerprint": key, "settings": dataclasses.asdict(cfg)}))
    stamp = (out / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    analyze(AnalyzeConfig(run=str(run), store=str(store.resolve()), batch_size=700, device="cpu"))
    assert "already complete" in capsys.readouterr().out
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "manifest.json").read_text())["protocol"] == 2  # upgraded, still complete
    (out / "settings.json").write_text(json.dumps({"fingerprint": "0" * 16, "settings": {}}))
    analyze(AnalyzeConfig(run=str(run), store=str(store), batch_size=700))  # the manifest decides now
    assert (out / "summary.json").stat().st_mtime_ns == stamp


def test_max_tokens_and_trained_crosscoder(tmp_path):
    from crossdiff.coder.train import TrainConfig, train

    x_a, x_b = _planted()
    store = tmp_path / "store"
    write_synthetic_store(store, x_a * 3, x_b, scale_a=1 / 3, shard_tokens=2000, chunk_len=32)
    run = tmp_path / "run"
    cfg = dict(latents=32, k=4, batch_size=256, heldout_tokens=2048, log_every=10, checkpoint_every=100)
    train(TrainConfig(store=str(store), out=str(run), exclusive_frac=0.125, tokens=256 * 16, **cfg))
    summary = analyze(AnalyzeConfig(run=str(run), max_tokens=5000, batch_size=512))  # store from the run
    assert summary["n_tokens_analysed"] == 5000 and SUMMARY_KEYS <= set(summary)
    with open(run / "analysis" / "latents.csv") as f:
        assert next(csv.reader(f)) == COLUMNS
    rows = _rows(run)
    assert len(rows) == 32 and sum(summary["counts"].values()) == 32
    alive = [r for r in rows if r["verdict"] != "dead"]
    assert summary["candidates"]["a"] == sum(r["partition"] == "a_exclusive" for r in alive)
    for r in rows:
        assert (r["verdict"] == "dead") == (float(r["density"]) == 0)
        if r["verdict"] in ("candidate_a", "candidate_b"):
            assert r["partition"] in ("a_exclusive", "b_exclusive") or float(r["rel_norm"]) <= 0.1
            assert r["partition"] != ("b_exclusive" if r["verdict"] == "candidate_a" else "a_exclusive")
    # over the whole store, held-out FVE and L0 agree with the trainer's own evaluation
    full = analyze(AnalyzeConfig(run=str(run), out=str(tmp_path / "full"), batch_size=512))
    trained = json.loads((run / "eval.json").read_text())
    for key in ("fve_a", "fve_b"):
        assert full[key] == pytest.approx(trained[key], abs=1e-4)


def test_self_diff_gets_latent_scaling(tmp_path):
    store, run = _setup(tmp_path, "dfc", same_space=True)
    analyze(AnalyzeConfig(run=str(run), store=str(store), batch_size=1000))
    rows = _rows(run)
    # B's activation is A's: latent 0's direction is fully present in "B" (ν ≈ 1), and B predicts it.
    assert float(rows[0]["latent_scaling"]) == pytest.approx(1.0, abs=0.05)
    assert rows[0]["verdict"] == "candidate_a" and float(rows[0]["probe_r2"]) > 0.9
    assert rows[0]["reason"].startswith("context detectable by B")
    assert all(math.isnan(float(r["latent_scaling"])) for r in rows[6:])  # dead


def test_bad_inputs_fail_with_one_line(tmp_path):
    store, run = _setup(tmp_path, "dfc")
    with pytest.raises(CrossdiffError, match="no crosscoder checkpoint"):
        analyze(AnalyzeConfig(run=str(tmp_path / "nope"), store=str(store)))
    with pytest.raises(CrossdiffError, match="no train_config.json"):
        analyze(AnalyzeConfig(run=str(run)))
    with pytest.raises(CrossdiffError, match="same-space needs equal widths"):
        analyze(AnalyzeConfig(run=str(run), store=str(store), same_space=True))
    with pytest.raises(CrossdiffError, match="--strong"):
        AnalyzeConfig(run=str(run), strong=0.0)
    other = tmp_path / "other"
    write_synthetic_store(other, torch.zeros(64, D_A), torch.zeros(64, D_B + 1))
    with pytest.raises(CrossdiffError, match="does not match the store"):
        analyze(AnalyzeConfig(run=str(run), store=str(other)))
    assert not np.any([p.name == "analysis" for p in run.iterdir()])


@pytest.mark.slow
def test_real_pair_end_to_end(tmp_path, models_ab, monkeypatch):
    """harvest -> train -> analyze on the default pair: examples in both tokenisations, logit lens, splice."""
    import crossdiff.harvest.harvest
    import crossdiff.inputs.models
    from crossdiff.coder.train import TrainConfig, train
    from crossdiff.harvest.harvest import HarvestConfig, harvest

    by_id = {lm.id: lm for lm in models_ab}
    monkeypatch.setattr(crossdiff.harvest.harvest, "load_model", lambda spec, device="cpu": by_id[spec])
    monkeypatch.setattr(crossdiff.inputs.models, "load_model", lambda spec, device="cpu": by_id[spec])
    corpus = tmp_path / "docs.txt"
    sentence = "The jury said the election in Atlanta was conducted well, despite {} objections."
    corpus.write_text("\n\n".join(sentence.format(i * 7) + " " + sentence.format(i) for i in range(60)))
    store = harvest(
        HarvestConfig(out=str(tmp_path / "store"), corpus=str(corpus), max_tokens=1500, device="cpu")
    )
    run = tmp_path / "run"
    train(
        TrainConfig(
            store=str(store.root),
            out=str(run),
            exclusive_frac=0.05,
            latents=64,
            k=8,
            tokens=128 * 12,
            batch_size=128,
        )
    )
    summary = analyze(AnalyzeConfig(run=str(run), splice_tokens=64, shared_features=3, top_k=3))
    for m in "ab":
        sp = summary["splice"][m]
        assert sp["n_tokens"] >= 40 and sp["zero"] > sp["clean"] and math.isfinite(sp["loss_recovered"])
    feats = [json.loads(p.read_text()) for p in (run / "analysis" / "features").glob("*.json")]
    assert feats
    for feat in feats:
        lens = feat["logit_lens"]
        assert lens["model"] in "ab" and len(lens["promoted"]) == len(lens["suppressed"]) == 10
        for ex in feat["examples"]:
            assert ex["text_token"] and ex["source"].startswith("docs.txt")
            for key in ("tokens_a", "tokens_b"):
                (hl,) = [t for t in ex[key] if t["highlight"]]
                assert hl["text"].strip() and hl["text"].strip() in ex["text_token"] + ex["text_after"][:1]


def test_dfc_shared_latent_with_a_one_sided_decoder_is_a_candidate():
    """A shared latent whose B row stayed tiny (relative norm <= t) is an A candidate in a DFC as in
    a standard crosscoder; balanced shared latents are not; partition members always are."""
    from crossdiff.analysis.analyze import exclusive_sides

    cc = _handmade("dfc")
    part = cc.partition
    with torch.no_grad():
        cc.W_dec_b[2 - part.n_a_exclusive] *= 0.05  # shared latent 2: ||d_B|| = 0.05 ||d_A||
        cc.W_dec_a[3] *= 0.05  # shared latent 3: the mirror image
    side, rel, norm_a, norm_b = exclusive_sides(cc, 0.1)
    assert rel[2] == pytest.approx(0.05 / 1.05) and rel[3] == pytest.approx(1 / 1.05)
    assert list(side) == ["a", "a", "a", "b", "", "", "b", "b"]
    assert list(exclusive_sides(cc, 0.01)[0]) == ["a", "a", "", "", "", "", "b", "b"]


def test_dfc_shared_latent_with_a_one_sided_functional_share_is_a_candidate(tmp_path):
    """Given the functional share, a DFC's shared latent with share_B <= t (>= 1 - t) is an A (B)
    candidate; a standard crosscoder keeps the relative-norm rule. The analysis writes the share
    (measured on held-out rows) as the functional_share column."""
    from crossdiff.analysis.analyze import exclusive_sides

    share = np.array([np.nan, np.nan, 0.5, 0.5, 0.05, 0.95, np.nan, np.nan])
    assert list(exclusive_sides(_handmade("dfc"), 0.1, share)[0]) == ["a", "a", "", "", "a", "b", "b", "b"]
    assert list(exclusive_sides(_handmade("crosscoder"), 0.1, share)[0]) == [
        "a",
        "a",
        "",
        "",
        "",
        "",
        "b",
        "b",
    ]


def test_the_functional_share_decides_candidates_on_centred_stores_only():
    """Under the older uncentred normalisation one model's ΔSSE is systematically smaller, so the share
    is a column only there; on a centred store (or a synthetic store's given scales) it is a rule."""
    from types import SimpleNamespace

    from crossdiff.analysis.analyze import AnalyzeConfig, make_plan

    share = np.array([np.nan, np.nan, 0.5, 0.5, 0.05, 0.95, np.nan, np.nan])
    by_rule = {}
    for rule in ("centred", "given", "uncentred", None):
        extra = {"normalisation": rule} if rule else {}
        store = SimpleNamespace(model_a={"id": "a", **extra}, model_b={"id": "b", **extra}, d_a=D_A, d_b=D_B)
        plan = make_plan(_handmade("dfc"), store, AnalyzeConfig(run=".", store="."), share)
        by_rule[rule] = list(plan.side)
    assert by_rule["centred"] == by_rule["given"] == ["a", "a", "", "", "a", "b", "b", "b"]
    assert by_rule["uncentred"] == by_rule[None] == ["a", "a", "", "", "", "", "b", "b"]
