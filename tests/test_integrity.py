"""Damaged data is named, never trusted: shard sizes and sha256 recorded at write time, checked on
open (sizes) and by `crossdiff check` (every byte), non-finite activations stopped where they enter,
and damaged run folders reported file by file. Synthetic stores; the harvest's own repair of damaged
shards is in tests/test_harvest.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from crossdiff import cli
from crossdiff.check import CheckConfig, check
from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.store import Store, write_synthetic_store
from crossdiff.inputs.storefiles import sha256_file


def _store(path, n=3000, **kw):
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(n, 8, generator=g), torch.randn(n, 6, generator=g)
    return write_synthetic_store(path, x_a, x_b, shard_tokens=1000, **kw)


def _shard(store, i=1):
    return store.root / "shards" / f"{i:05d}.safetensors"


def test_shard_records_its_size_and_sha256(tmp_path):
    store = _store(tmp_path / "s")
    for entry in store.meta["shards"]:
        for ext in ("safetensors", "texts.jsonl"):
            path = store.root / "shards" / f"{entry['name']}.{ext}"
            assert entry["files"][ext] == {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            assert (
                json.loads(path.with_name(f"{entry['name']}.json").read_text())["files"][ext]
                == entry["files"][ext]
            )


def test_truncated_shard_is_refused_on_open_naming_the_file(tmp_path):
    store = _store(tmp_path / "s")
    with open(_shard(store), "r+b") as f:
        f.truncate(_shard(store).stat().st_size - 100)
    with pytest.raises(CrossdiffError, match="00001.safetensors is damaged") as e:
        Store.open(store.root)
    assert "\n" not in str(e.value) and "were written" in str(e.value)


def test_random_bytes_in_a_shard_stop_reads_naming_the_file_not_the_learning_rate(tmp_path):
    store = _store(tmp_path / "s")
    path, size = _shard(store), _shard(store).stat().st_size
    with open(path, "r+b") as f:  # the activations, past the header; same size, so open() passes
        f.seek(size - 4000)
        f.write(np.random.default_rng(0).bytes(4000))
    store = Store.open(store.root)
    with pytest.raises(CrossdiffError, match="00001.safetensors is damaged .*non-finite or impossible"):
        for _ in store.batches(256, epochs=1):
            pass
    with pytest.raises(CrossdiffError, match="00001.safetensors is damaged"):
        store.get(np.arange(store.n_tokens))  # the analysis path


def test_check_finds_random_bytes_by_sha256(tmp_path, capsys):
    store = _store(tmp_path / "s")
    path, size = _shard(store), _shard(store).stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - 10)
        f.write(b"0123456789")
    with pytest.raises(CrossdiffError, match="1 damaged file"):
        check(CheckConfig(str(store.root)))
    assert capsys.readouterr().out.startswith(f"damaged: {path} (its sha256 differs")


def test_nan_store_stops_the_analysis_pass_with_the_damaged_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(2000, 8, generator=g), torch.randn(2000, 6, generator=g)
    x_b[1500, 2] = float("nan")
    store = write_synthetic_store(tmp_path / "s", x_a, x_b, shard_tokens=1000)
    store.get(np.arange(1000))  # the clean shard reads
    with pytest.raises(CrossdiffError, match="00001.safetensors is damaged .*max \\|x\\| = nan"):
        store.get([1499, 1500])


def test_check_prints_one_line_per_damaged_file_with_the_repair_command(tmp_path, capsys):
    store = _store(tmp_path / "s")
    (store.root / "settings.json").write_text(json.dumps({"max_tokens": 3000, "corpus": "brown"}))
    for key in "ab":  # a harvested store also holds both tokenizers
        (store.root / "tokenizers" / key).mkdir(parents=True)
        (store.root / "tokenizers" / key / "tokenizer_config.json").write_text("{}")
    check(CheckConfig(str(store.root)))
    assert "no damage found" in capsys.readouterr().out
    _shard(store, 0).write_bytes(_shard(store, 0).read_bytes()[:-10])
    os.remove(store.root / "shards" / "00002.texts.jsonl")
    assert cli.main(["check", str(store.root)]) == 2
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 2, lines
    assert "00000.safetensors" in lines[0] and "00002.texts.jsonl (missing)" in lines[1]
    for line in lines:
        assert line.endswith(f"repair: crossdiff harvest --out {store.root} --max-tokens 3000 --corpus brown")
    assert err.strip().splitlines() == [
        f"error: 2 damaged file(s) in {store.root}; run the commands above to repair them"
    ]


def test_store_written_before_checksums_still_opens_and_size_checks_from_headers(tmp_path):
    store = _store(tmp_path / "s")
    meta = json.loads((store.root / "meta.json").read_text())
    for entry in meta["shards"]:
        del entry["files"]
    (store.root / "meta.json").write_text(json.dumps(meta))
    assert Store.open(store.root).get([5])[0].shape == (1, 8)
    with open(_shard(store), "r+b") as f:
        f.truncate(_shard(store).stat().st_size - 100)
    with pytest.raises(CrossdiffError, match="00001.safetensors is damaged .*its header describes"):
        Store.open(store.root).get([1500])


def _run_folder(tmp_path):
    cfg = CrosscoderConfig(d_a=8, d_b=6, n_latents=16, sparsity="batchtopk", k=2)
    run = tmp_path / "run"
    Crosscoder(cfg, generator=torch.Generator().manual_seed(0)).save_pretrained(run)
    (run / "train_config.json").write_text(json.dumps({"store": "S", "out": str(run), "latents": 16}))
    Crosscoder(cfg, generator=torch.Generator().manual_seed(0)).save_pretrained(
        run / "checkpoints" / "step-000000002"
    )
    torch.save({"step": 2}, run / "checkpoints" / "step-000000002" / "trainer_state.pt")
    return run


def test_check_of_a_run_names_damaged_weights_and_checkpoints(tmp_path, capsys):
    run = _run_folder(tmp_path)
    check(CheckConfig(str(run)))
    ckpt = run / "checkpoints" / "step-000000002"
    (run / "crosscoder.safetensors").write_bytes((run / "crosscoder.safetensors").read_bytes()[:-7])
    (ckpt / "trainer_state.pt").write_bytes(b"")
    capsys.readouterr()
    with pytest.raises(CrossdiffError, match="2 damaged file"):
        check(CheckConfig(str(run)))
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        lines[0].startswith(f"damaged: {run / 'crosscoder.safetensors'}")
        and "crossdiff train --store S" in lines[0]
    )
    assert lines[1].startswith(f"damaged: {ckpt / 'trainer_state.pt'}") and f"rm -r {ckpt}" in lines[1]


def test_checkpoint_with_non_finite_weights_is_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    run = _run_folder(tmp_path)
    tensors = load_file(str(run / "crosscoder.safetensors"))
    tensors["W_dec_a"][3, 1] = float("nan")
    save_file(tensors, str(run / "crosscoder.safetensors"), metadata={"format_version": "1"})
    with pytest.raises(CrossdiffError, match="holds non-finite values in W_dec_a; it is damaged"):
        Crosscoder.from_pretrained(run)
