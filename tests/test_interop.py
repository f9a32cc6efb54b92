"""crossdiff import / export / push against the dictionary_learning forks' checkpoint layout.

The forks cannot be installed here, so each test builds a checkpoint the way their
dictionary_learning/dictionary.py lays it out (state-dict names and shapes, the normaliser buffers, the
DFC's [A-excl | B-excl | shared] order, zeroed forbidden weights, _partition_config in the .pt) and
`fork_forward` below computes what their encode/decode do with it. docs/interop.md records the one-off
check of crossdiff's import against the forks' own code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
from crossdiff.core.errors import CrossdiffError
from crossdiff.interop import dictionary_learning as dl
from crossdiff.interop.importer import ImportConfig, import_crosscoder

D, F, K, B = 16, 96, 4, 64
IDS = dict(model_a="ma", model_b="mb", layer_a=1, layer_b=2)


def fork_state(kind: str, *, normaliser: bool, ea: int = 0, eb: int = 0, seed: int = 0) -> dict:
    """A state dict in the forks' layout (CrossCoder / BatchTopKCrossCoder / the DFC)."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(2, D, F, generator=g) / D**0.5
    dec = torch.randn(2, F, D, generator=g) / D**0.5
    if ea or eb:  # the DFC's masks: A never touches B-exclusive latents [ea, ea+eb), B never A's [0, ea)
        enc[0, :, ea : ea + eb], dec[0, ea : ea + eb] = 0, 0
        enc[1, :, :ea], dec[1, :ea] = 0, 0
    state = {
        "encoder.weight": enc,
        "encoder.bias": torch.randn(F, generator=g) * 0.1,
        "decoder.weight": dec,
        "decoder.bias": torch.randn(2, D, generator=g),
        "code_normalization_id": torch.tensor(1),
        "target_rms": torch.tensor(1.0),
        "activation_mean": torch.full((2, D), float("nan")),
        "activation_std": torch.full((2, D), float("nan")),
        "activation_global_scale": torch.ones(2),
    }
    if normaliser:
        state["activation_mean"] = torch.randn(2, D, generator=g) * 3
        state["activation_std"] = torch.rand(2, D, generator=g) + 0.5
        state["activation_global_scale"] = 1.0 / state["activation_std"].pow(2).sum(1).sqrt()
    if kind == "batchtopk":
        state["k"] = torch.tensor(K, dtype=torch.int32)
        state["threshold"] = torch.tensor(0.0)
    if ea or eb:
        state["_partition_config"] = {
            "dict_size": F,
            "model_a_exclusive_pct": ea / F,
            "model_b_exclusive_pct": eb / F,
        }
    return state


def fork_forward(state: dict, x_raw_B2D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f (B, F), x̂ raw (B, 2, D)) as the forks' CrossCoder/BatchTopKCrossCoder encode and decode compute them."""
    mean = state["activation_mean"]
    has_norm = not bool(torch.isnan(mean).any())
    g = state["activation_global_scale"][None, :, None]
    u = (x_raw_B2D - mean) * g if has_norm else x_raw_B2D
    f = torch.relu(torch.einsum("bld,ldf->bf", u, state["encoder.weight"]) + state["encoder.bias"])
    if "threshold" in state:
        norm_F = state["decoder.weight"].norm(dim=2).sum(0)
        f = f * (f * norm_F > state["threshold"])
    u_hat = torch.einsum("bf,lfd->bld", f, state["decoder.weight"]) + state["decoder.bias"]
    return f, u_hat / (g + 1e-8) + mean if has_norm else u_hat


def crossdiff_forward(cc: Crosscoder, x_raw_B2D: torch.Tensor, order: torch.Tensor):
    """The same through crossdiff: f permuted to the fork's latent order, x̂ in raw units."""
    y_a, y_b = cc.normalise(x_raw_B2D[:, 0, : cc.cfg.d_a], x_raw_B2D[:, 1, : cc.cfg.d_b])
    with torch.no_grad():
        f = cc.encode(y_a, y_b)
        x_a, x_b = cc.denormalise(*cc.decode(f))
    f_fork = torch.empty_like(f)
    f_fork[:, order] = f
    return f_fork, x_a, x_b


def _set_threshold(state: dict, x: torch.Tensor) -> None:
    """θ halfway between two consecutive values of f·Σ||d||: about K active per token, no tie at θ."""
    state["threshold"] = torch.tensor(-1.0)
    state_no = {k: v for k, v in state.items() if k != "threshold"}
    f, _ = fork_forward(state_no, x)
    scaled = (f * state["decoder.weight"].norm(dim=2).sum(0)).flatten().sort().values
    state["threshold"] = (scaled[-K * B - 1] + scaled[-K * B]) / 2


def _write_pt(state: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "model_final.pt")  # what the forks' training.py save_model writes
    return folder / "model_final.pt"


CASES = [
    ("batchtopk", False, 0, 0),
    ("batchtopk", True, 0, 0),
    ("l1", False, 0, 0),
    ("l1", True, 0, 0),
    ("batchtopk", False, 5, 9),  # the DFC trainer's DedicatedFeatureBatchTopKCrossCoder
    ("batchtopk", True, 5, 9),
]


@pytest.mark.parametrize("kind, normaliser, ea, eb", CASES)
def test_import_gives_the_forks_encode_and_decode(tmp_path, kind, normaliser, ea, eb):
    state = fork_state(kind, normaliser=normaliser, ea=ea, eb=eb)
    mean = state["activation_mean"] if normaliser else 0.0
    x = torch.randn(B, 2, D, generator=torch.Generator().manual_seed(1)) * 4 + mean
    if kind == "batchtopk":
        _set_threshold(state, x)
    source = _write_pt(state, tmp_path / "fork")
    units = {} if normaliser else {"input_units": "raw"}
    run = import_crosscoder(ImportConfig(source=str(source), out=str(tmp_path / "run"), **IDS, **units))
    cc = Crosscoder.from_pretrained(run)
    assert (cc.cfg.sparsity, cc.cfg.n_a_exclusive, cc.cfg.n_b_exclusive) == (kind, ea, eb)
    f_ref, x_ref = fork_forward(state, x)
    f, x_a, x_b = crossdiff_forward(cc, x, dl.fork_index(F, ea, eb))
    assert torch.equal(f > 0, f_ref > 0)  # the same latents fire
    assert 0 < (f > 0).sum() < f.numel()
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack([x_a, x_b], 1), x_ref, rtol=1e-4, atol=1e-4)
    record = json.loads((run / "import.json").read_text())
    assert record["format"].startswith("dictionary_learning")


def test_dfc_exclusive_blocks_become_partitions_without_forbidden_rows(tmp_path):
    """The DFC's exclusive latents land in crossdiff's partitions, whose forbidden rows do not exist."""
    state = fork_state("batchtopk", normaliser=False, ea=5, eb=9)
    run = import_crosscoder(
        ImportConfig(
            source=str(_write_pt(state, tmp_path / "f")), out=str(tmp_path / "r"), input_units="raw", **IDS
        )
    )
    cc = Crosscoder.from_pretrained(run)
    assert cc.W_enc_a.shape == (F - 9, D) and cc.W_dec_b.shape == (F - 5, D)
    # crossdiff latent 0 is the fork's A-exclusive latent 0; the last is the fork's last B-exclusive one
    torch.testing.assert_close(cc.W_dec_a[0], state["decoder.weight"][0, 0])
    torch.testing.assert_close(cc.W_dec_b[-1], state["decoder.weight"][1, 5 + 9 - 1])


@pytest.mark.parametrize("where", ["encoder", "decoder"])
def test_nonzero_forbidden_dfc_weight_is_refused(tmp_path, where):
    state = fork_state("batchtopk", normaliser=False, ea=5, eb=9)
    if where == "encoder":
        state["encoder.weight"][1, 3, 2] = 1e-3  # B reads A-exclusive latent 2
    else:
        state["decoder.weight"][0, 7, 0] = -2.0  # A writes B-exclusive latent 7
    out = tmp_path / "run"
    with pytest.raises(CrossdiffError, match="forbidden weights are not zero") as e:
        import_crosscoder(
            ImportConfig(source=str(_write_pt(state, tmp_path / "f")), out=str(out), input_units="raw", **IDS)
        )
    assert "\n" not in str(e.value) and where in str(e.value)
    assert not out.exists()  # nothing written


def test_unknown_units_and_models_are_asked_for(tmp_path):
    source = str(_write_pt(fork_state("batchtopk", normaliser=False), tmp_path / "f"))
    with pytest.raises(CrossdiffError, match="--input-units"):
        import_crosscoder(ImportConfig(source=source, out=str(tmp_path / "r"), **IDS))
    with pytest.raises(CrossdiffError, match="--store STORE, or --model-a --model-b --layer-a --layer-b"):
        import_crosscoder(ImportConfig(source=source, out=str(tmp_path / "r"), input_units="raw"))
    assert not (tmp_path / "r").exists()


def test_cli_import_error_is_one_line(tmp_path, capsys):
    from crossdiff.cli import main

    source = str(_write_pt(fork_state("l1", normaliser=False), tmp_path / "f"))
    assert main(["import", source, "--out", str(tmp_path / "r"), "--model-a", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--model-b" in err


def _crossdiff_dfc(seed=0, ea=6, eb=10, sparsity="batchtopk") -> Crosscoder:
    cfg = CrosscoderConfig(
        d_a=12,
        d_b=D,
        n_latents=F,
        k=K,
        sparsity=sparsity,
        n_a_exclusive=ea,
        n_b_exclusive=eb,
        scale_a=0.37,
        scale_b=1.9,
        **IDS,
    )
    cc = Crosscoder(cfg, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in (cc.b_enc, cc.b_dec_a, cc.b_dec_b):
            p.copy_(torch.randn(p.shape, generator=g))
        cc.threshold.fill_(0.05)
    return cc


@pytest.mark.parametrize("ea, eb, sparsity", [(6, 10, "batchtopk"), (0, 0, "batchtopk"), (0, 0, "l1")])
def test_round_trip_is_byte_stable(tmp_path, ea, eb, sparsity):
    """crossdiff -> dictionary_learning -> crossdiff gives the same crosscoder.safetensors bytes, and
    exporting twice gives the same fork files."""
    from crossdiff.interop.export import ExportConfig, export

    cc = _crossdiff_dfc(ea=ea, eb=eb, sparsity=sparsity)
    cc.save_pretrained(tmp_path / "orig")
    first = export(
        ExportConfig(run=str(tmp_path / "orig"), to="dictionary_learning", out=str(tmp_path / "dl"))
    )
    again = export(
        ExportConfig(run=str(tmp_path / "orig"), to="dictionary_learning", out=str(tmp_path / "dl2"))
    )
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in again.iterdir())
    for p in first.iterdir():
        assert p.read_bytes() == (again / p.name).read_bytes(), p.name
    run = import_crosscoder(ImportConfig(source=str(first), out=str(tmp_path / "back")))
    for name in ("crosscoder.safetensors", "cfg.json"):
        assert (run / name).read_bytes() == (tmp_path / "orig" / name).read_bytes(), name


def test_export_without_crossdiff_record_imports_to_float_rounding(tmp_path):
    """A fork checkpoint crossdiff wrote but that lost crossdiff_export.json (e.g. re-saved by the fork): the
    fold b_enc = bias + W_enc b_dec is exact to float rounding only; everything else is the same bytes."""
    cc = _crossdiff_dfc()
    folder = dl.write_checkpoint(cc, tmp_path / "dl", {})
    (folder / dl.SIDECAR).unlink()
    run = import_crosscoder(ImportConfig(source=str(folder), out=str(tmp_path / "r"), **IDS, d_a=12, d_b=D))
    back = Crosscoder.from_pretrained(run)
    for name, v in cc.state_dict().items():
        if name == "b_enc":
            torch.testing.assert_close(back.b_enc, v, rtol=0, atol=1e-5)
        else:
            assert torch.equal(back.state_dict()[name], v), name


def test_padding_beyond_a_models_width_must_be_unused(tmp_path):
    cc = _crossdiff_dfc()
    folder = dl.write_checkpoint(cc, tmp_path / "dl", {})
    (folder / dl.SIDECAR).unlink()
    with pytest.raises(CrossdiffError, match="uses columns beyond it"):  # A is 12 wide, not 10
        import_crosscoder(ImportConfig(source=str(folder), out=str(tmp_path / "r"), **IDS, d_a=10, d_b=D))


def _store(tmp_path, scale_a=0.5, scale_b=2.0):
    from crossdiff.inputs.store import write_synthetic_store

    g = torch.Generator().manual_seed(3)
    x_a, x_b = torch.randn(2048, D, generator=g) * 3, torch.randn(2048, D, generator=g)
    return write_synthetic_store(tmp_path / "store", x_a, x_b, scale_a=scale_a, scale_b=scale_b)


def test_units_other_than_the_stores_give_a_store_view_that_analyze_reads(tmp_path):
    """A BatchTopK checkpoint trained on raw activations cannot be rescaled per model to the store's
    units (its ranking sums the two decoder norms), so the run gets a store view with its own scales;
    crossdiff analyze reads it unchanged."""
    from crossdiff.analysis.analyze import AnalyzeConfig, analyze
    from crossdiff.inputs.store import Store

    store = _store(tmp_path)
    state = fork_state("batchtopk", normaliser=False)
    x = torch.stack(store.get(range(B), normalised=False), 1)
    _set_threshold(state, x)
    run = import_crosscoder(
        ImportConfig(
            source=str(_write_pt(state, tmp_path / "f")),
            out=str(tmp_path / "r"),
            store=str(store.root),
            input_units="raw",
        )
    )
    view = Store.open(run / "store")
    cc = Crosscoder.from_pretrained(run)
    assert (view.scale_a, view.scale_b) == (cc.cfg.scale_a, cc.cfg.scale_b) == (1.0, 1.0)
    assert view.model_a["normalisation"] == "imported" and view.n_tokens == store.n_tokens
    torch.testing.assert_close(
        view.get(range(5), normalised=False)[0], store.get(range(5), normalised=False)[0]
    )
    f_ref, _ = fork_forward(state, x)
    f, _, _ = crossdiff_forward(cc, x, dl.fork_index(F, 0, 0))
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-5)
    summary = analyze(
        AnalyzeConfig(run=str(run), store=str(run / "store"), load_models=False, shared_probes=8)
    )
    assert summary["n_tokens_analysed"] == store.n_tokens
    # analyze's held-out FVE through the view is the fork's own reconstruction's, in raw units
    held = torch.cat(
        [
            torch.as_tensor(store.split_rows(s, "heldout")) + int(store.offsets[s])
            for s in range(len(store.meta["shards"]))
        ]
    )
    x_held = torch.stack(store.get(held, normalised=False), 1)
    _, x_hat = fork_forward(state, x_held)
    for side, key in enumerate(("fve_a", "fve_b")):
        err = (x_held[:, side] - x_hat[:, side]).pow(2).sum()
        var = (x_held[:, side] - x_held[:, side].mean(0)).pow(2).sum()
        assert summary[key] == pytest.approx(float(1 - err / var), rel=1e-4)


def test_units_of_the_store_need_no_view(tmp_path):
    store = _store(tmp_path)
    state = fork_state("batchtopk", normaliser=False)
    run = import_crosscoder(
        ImportConfig(
            source=str(_write_pt(state, tmp_path / "f")),
            out=str(tmp_path / "r"),
            store=str(store.root),
            input_units="store",
        )
    )
    cc = Crosscoder.from_pretrained(run)
    cc.cfg.check_store(store)  # analyze's own check passes
    assert not (run / "store").exists()
    assert json.loads((run / "import.json").read_text())["store"] == str(store.root)


def test_export_imported_with_another_pairs_store_is_refused(tmp_path):
    cc = _crossdiff_dfc()
    folder = dl.write_checkpoint(cc, tmp_path / "dl", {})
    store = _store(tmp_path)  # synthetic-a / synthetic-b, not ma / mb
    with pytest.raises(CrossdiffError, match="other models or layers"):
        import_crosscoder(ImportConfig(source=str(folder), out=str(tmp_path / "r"), store=str(store.root)))
