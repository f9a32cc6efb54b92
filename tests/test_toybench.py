"""`crossdiff bench toy` end to end at a tiny size: outputs, record fields, resume without retraining,
and the SVG plots it writes."""

from __future__ import annotations

import json
import xml.dom.minidom

import pytest
import torch

from crossdiff import cli
from crossdiff.report.plots import Point, histogram_svg, nice_ticks, scatter_svg

TINY = [
    "--seeds", "1", "--tokens", "12000", "--batch-size", "256", "--latents", "64", "--eval-tokens", "4096",
    "--d-a", "12", "--d-b", "14", "--n-shared", "24", "--n-a-only", "4", "--n-b-only", "4",
]  # fmt: skip


@pytest.fixture()
def one_thread():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_bench_toy_writes_results_and_resumes_without_retraining(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "bench"
    assert cli.main(["bench", "toy", "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["name"] for r in runs] == ["batchtopk", "l1", "dfc-0.05", "dfc-0.1"]
    for r in runs:
        for key in ("arch", "seed", "exclusive_frac", "exclusive_recall", "exclusive_precision", "shared_recall",
                    "fve_a", "fve_b", "settings", "exclusive_recall_verified", "exclusive_precision_verified"):  # fmt: skip
            assert key in r, key
        assert (out / "runs" / f"{r['name']}-seed-0" / "eval.json").is_file()
    assert runs[2]["exclusive_frac"] == 0.05 and runs[0]["exclusive_frac"] is None
    for r in runs:  # the functional-share classification is scored on every run
        assert {"exclusive_recall_functional", "exclusive_precision_functional", "share_sweep"} <= set(r)
        sweep = r["share_sweep"]["functional"]
        claimed = [x["recall"] for x in sweep.values()]
        assert claimed == sorted(claimed)  # a looser threshold never loses an exclusive feature
    for r in runs:  # the analysis's candidate rule is graded beside the paper's
        c, ca = r["counts"], r["counts_analysis"]
        if r["exclusive_frac"]:  # partition ⊆ partition ∪ r ∪ share: a superset of the calls
            assert all(ca[s]["claimed"] >= c[s]["claimed"] and ca[s]["found"] >= c[s]["found"] for s in "ab")
        else:  # the analysis keeps the relative-norm rule for a standard crosscoder
            assert ca == c and r["exclusive_recall_analysis"] == r["exclusive_recall"]
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ("batchtopk", "l1", "dfc-0.05", "dfc-0.1"))
    assert "excl. recall (analysis rule)" in table and "| dfc-0.05 (analysis rule) |" in table
    for svg in ("recall_precision.svg", "relative_norms.svg"):
        xml.dom.minidom.parse(str(out / svg))
    assert not (out / "stores" / "seed-0").exists()  # removed once its runs are done

    def no_training(cfg):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("crossdiff.coder.train.train", no_training)
    assert cli.main(["bench", "toy", "--out", str(out), *TINY]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == runs

    # bench.json as crossdiff 0.1 wrote it (every TrainConfig field but store, out and device, logging
    # and checkpoint intervals included): still this run's record, neither retrained nor re-scored.
    monkeypatch.setattr("crossdiff.controls.toybench.score_run", lambda *a: pytest.fail("re-scored"))
    for r in runs:
        path = out / "runs" / f"{r['name']}-seed-0" / "bench.json"
        rec = json.loads(path.read_text())
        rec["settings"].update(logger="none", log_every=50, checkpoint_every=11, dec_init_norm=0.1)
        path.write_text(json.dumps(rec))
    assert cli.main(["bench", "toy", "--out", str(out), *TINY]) == 0


def test_bench_toy_verifies_exclusive_latents_and_rescores_without_the_store(
    tmp_path, monkeypatch, one_thread
):
    out = tmp_path / "bench"
    assert cli.main(["bench", "toy", "--out", str(out), *TINY]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    for r in runs:
        assert (out / "runs" / f"{r['name']}-seed-0" / "analysis" / "latents.csv").is_file()
        assert r["verification"]["verify_seconds"] > 0
        c, v = r["counts"], r["counts_verified"]
        for side in "ab":  # verification only removes exclusive calls, never adds any
            assert v[side]["claimed"] <= c[side]["claimed"] and v[side]["true_pos"] <= c[side]["true_pos"]
            for cause in ("fp_shared", "fp_duplicate", "fp_unplanted"):
                assert v[side][cause] <= c[side][cause]
        assert (
            r["exclusive_recall_verified"] is not None
            and r["exclusive_recall_verified"] <= r["exclusive_recall"]
        )
        rejected = sum(c[s]["claimed"] - v[s]["claimed"] for s in "ab")
        ver = r["verification"]
        assert rejected <= ver["rejected_rare"] + ver["rejected_predictable"] + ver["rejected_other"]
        if r["exclusive_precision_verified"] is not None and r["exclusive_precision"] is not None:
            assert r["exclusive_precision_verified"] >= r["exclusive_precision"] - 0.25
    assert "excl. precision (verified)" in (out / "results.md").read_text()
    assert "<line" in (out / "recall_precision.svg").read_text()  # before → after arrows
    assert not (out / "stores" / "seed-0").exists()

    # Re-scoring at another threshold reuses the saved verdicts: no training, no analysis, no store.
    def fail(*args, **kwargs):
        raise AssertionError("re-scoring must not train, analyse or rebuild the store")

    monkeypatch.setattr("crossdiff.coder.train.train", fail)
    monkeypatch.setattr("crossdiff.analysis.analyze.analyze", fail)
    monkeypatch.setattr("crossdiff.controls.synthetic.SyntheticPairs.write_store", fail)
    assert cli.main(["bench", "toy", "--out", str(out), *TINY, "--match-threshold", "0.8"]) == 0
    again = json.loads((out / "results.json").read_text())["runs"]
    assert all(
        r["settings"]["match_threshold"] == 0.8 and r["verification"]["verify_seconds"] is None for r in again
    )
    assert all(r["exclusive_recall_verified"] is not None for r in again)

    # An analysis written before its manifest held its key (its config in settings.json) is reused too.
    for r in again:
        folder = out / "runs" / f"{r['name']}-seed-0" / "analysis"
        m = json.loads((folder / "manifest.json").read_text())
        (folder / "settings.json").write_text(json.dumps({"fingerprint": "-", "settings": m.pop("settings")}))
        del m["protocol"]
        (folder / "manifest.json").write_text(json.dumps(m))
    assert cli.main(["bench", "toy", "--out", str(out), *TINY, "--match-threshold", "0.7"]) == 0
    assert all(
        r["verification"]["verify_seconds"] is None
        for r in json.loads((out / "results.json").read_text())["runs"]
    )


def test_scatter_svg_draws_labelled_points_with_clipped_error_bars():
    svg = scatter_svg(
        [
            Point("a <b>", 0.5, 0.25, 0.1, 0.05),
            Point("edge", 1.0, 1.0, 0.9, 0.0),
            Point("undefined", None, 0.3),
        ],
        title="t",
        x_label="precision",
        y_label="recall",
    )
    doc = xml.dom.minidom.parseString(svg)
    labels = [t.firstChild.data for t in doc.getElementsByTagName("text")]
    assert "a <b>" in labels and "edge" in labels and any("undefined" in s for s in labels)
    assert len(doc.getElementsByTagName("circle")) == 2
    for line in doc.getElementsByTagName("line"):  # every error bar stays inside the picture
        assert all(0 <= float(line.getAttribute(c)) <= 600 for c in ("x1", "x2"))


def test_histogram_svg_counts_values_into_bins():
    svg = histogram_svg([0.0, 0.05, 0.5, 0.95, 1.0, 2.0], bins=2, value_range=(0.0, 1.0))
    rects = xml.dom.minidom.parseString(svg).getElementsByTagName("rect")
    counts = [
        int(float(r.getElementsByTagName("title")[0].firstChild.data.rsplit(": ", 1)[-1]))
        for r in rects
        if r.getElementsByTagName("title")
    ]
    assert counts == [2, 3]  # 2.0 is outside the range; 0.5 and 1.0 go to the upper bin


def test_nice_ticks():
    assert nice_ticks(0.0, 1.05) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.0, 30.0, 3) == [0.0, 10.0, 20.0, 30.0]


def test_wide_setting_builds_its_sizes(tmp_path, one_thread):
    from crossdiff.coder.crosscoder import Crosscoder
    from crossdiff.controls.toybench import ToyBenchConfig
    from crossdiff.core.errors import CrossdiffError

    sizes = ("d_a", "d_b", "n_shared", "n_a_only", "n_b_only", "latents", "k")
    wide = ToyBenchConfig(out=str(tmp_path), setting="wide")
    assert tuple(getattr(wide, s) for s in sizes) == (256, 256, 1024, 128, 128, 4096, 16)
    default = ToyBenchConfig(out=str(tmp_path))
    assert tuple(getattr(default, s) for s in sizes) == (64, 80, 256, 32, 32, 1024, 4)
    assert ToyBenchConfig(out=str(tmp_path), setting="wide", latents=512).latents == 512  # explicit wins
    with pytest.raises(CrossdiffError, match="--setting"):
        ToyBenchConfig(out=str(tmp_path), setting="huge")
    out = tmp_path / "wide"
    args = ["--setting", "wide", "--seeds", "1", "--tokens", "2048", "--eval-tokens", "2048", "--standard",
            "batchtopk", "--dfc-fracs", "0.05", "--verify-tokens", "0"]  # fmt: skip
    assert cli.main(["bench", "toy", "--out", str(out), *args]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["batchtopk", "dfc-0.05"]
    gt = results["generator_seed0"]["ground_truth"]
    assert (gt["shared"], gt["a_only"], gt["b_only"]) == (1024, 128, 128)
    for name, n_excl in (("batchtopk", 0), ("dfc-0.05", 205)):
        cfg = Crosscoder.from_pretrained(out / "runs" / f"{name}-seed-0").cfg
        assert (cfg.d_a, cfg.d_b, cfg.n_latents, cfg.k) == (256, 256, 4096, 16)
        assert cfg.n_a_exclusive == cfg.n_b_exclusive == n_excl
    for r in results["runs"]:
        assert set(r["share_sweep"]) == {"functional", "analysis"}
        assert len(r["functional_share_alive"]) == round((1 - r["dead_fraction_heldout"]) * 4096)
    assert "Setting wide: d_A = 256" in (out / "results.md").read_text()
