"""Harvest on the real default pair: aligned rows hold each model's own activations, kill-and-resume and
a full disk end byte-identical to an uninterrupted run, and bad input fails cleanly."""

from __future__ import annotations

import errno
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from crossdiff.core.errors import CrossdiffError
from crossdiff.harvest.harvest import HarvestConfig, harvest
from crossdiff.inputs.align import tokenize
from crossdiff.inputs.store import Store

WORDS = (
    "the jury said election county city of in was and to a for that is on with as by at from court "
    "judge vote 1961 Atlanta's café naïve — “quoted” 42.5% e-mail"
).split()
# Length sorting puts the longest batches (~4 x 128 pairs) last in a window, so shards overshoot
# --shard-tokens by up to a batch: 300 keeps several shards for the kill-and-resume test.
SETTINGS = dict(max_tokens=2400, context_len=128, batch_size=4, shard_tokens=300)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 260))) + "." for _ in range(20)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(corpus_file, tmp_path_factory, models_ab):
    out = tmp_path_factory.mktemp("ref") / "store"
    return harvest(HarvestConfig(out=str(out), corpus=str(corpus_file), device="cpu", **SETTINGS))


def _cli(out, corpus, **kw):
    args = [
        sys.executable,
        "-m",
        "crossdiff",
        "harvest",
        "--out",
        str(out),
        "--corpus",
        str(corpus),
        "--device",
        "cpu",
    ]
    for k, v in {**SETTINGS, **kw}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), f"{rel} differs"


def test_meta_and_layout(reference):
    meta = reference.meta
    assert meta["n_tokens"] == 2400 and len(meta["shards"]) >= 4
    assert (meta["models"]["a"]["id"], meta["models"]["a"]["layer"], meta["models"]["a"]["d_model"]) == (
        "smollm2-135m",
        15,
        576,
    )
    assert (meta["models"]["b"]["id"], meta["models"]["b"]["layer"], meta["models"]["b"]["d_model"]) == (
        "gemma3-270m",
        9,
        640,
    )
    for key in "ab":
        assert meta["models"][key]["aligned_fraction"] > 0.95
    assert meta["masked"]["special_b"] > 0 and meta["masked"]["special_a"] == 0  # Gemma's BOS only
    assert meta["masked"]["first_position"] > 0
    # E||x - mean||^2 = d after normalisation (from the float32 sums; bf16 storage costs well under
    # 1%), and mean_sq_norm is the raw E||x||^2.
    x_a, x_b = reference.get(np.arange(reference.n_tokens))
    for key, x, d, scale in (("a", x_a, 576, reference.scale_a), ("b", x_b, 640, reference.scale_b)):
        assert meta["models"][key]["normalisation"] == "centred"
        assert abs((x - x.mean(0)).pow(2).sum(1).mean().item() / d - 1) < 0.01
        raw = x.pow(2).sum(1).mean().item() / scale**2
        assert abs(raw / meta["models"][key]["mean_sq_norm"] - 1) < 0.01
    # Gemma-3's residual stream carries a large constant offset: uncentred, its variance would weigh
    # several times less than SmolLM2's in the crosscoder's loss (docs/design.md §4).
    assert x_b.mean(0).pow(2).sum() > 5 * x_a.mean(0).pow(2).sum()


def test_rows_are_each_models_own_activation_at_aligned_positions(reference, models_ab):
    rows = reference.rows(np.arange(reference.n_tokens))
    texts = {}
    for s in range(len(reference.meta["shards"])):
        texts.update(reference.texts(s))
    rng = np.random.default_rng(0)
    for chunk in rng.choice(np.unique(rows["chunk"]), size=3, replace=False):
        sel = np.nonzero(rows["chunk"] == chunk)[0]
        text = texts[int(chunk)]["text"]
        for key, lm, layer in (("a", models_ab[0], 15), ("b", models_ab[1], 9)):
            ids, offsets, _ = tokenize(lm.tokenizer, text)
            pos = rows[f"pos_{key}"][sel]
            assert np.array_equal(rows[f"tok_{key}"][sel], ids[pos])
            assert np.array_equal(rows["char_end"][sel], offsets[pos, 1])  # both end at the same character
            # Each chunk alone through the model equals what the padded batch stored (bf16 storage).
            hidden = lm.hidden(torch.from_numpy(ids)[None], torch.ones(1, len(ids), dtype=torch.long), layer)[
                0
            ]
            stored = reference.get(sel, normalised=False)[0 if key == "a" else 1]
            torch.testing.assert_close(
                stored,
                hidden[pos].bfloat16().float(),
                rtol=0.02,
                atol=0.02 * hidden.norm(dim=-1).median().item() / 20,
            )


def test_kill_and_resume_is_byte_identical(reference, corpus_file, tmp_path):
    out = tmp_path / "store"
    proc = subprocess.Popen(_cli(out, corpus_file), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "shards" / "00001.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "meta.json").exists()
    with pytest.raises(CrossdiffError, match="incomplete"):
        Store.open(out)
    subprocess.run(_cli(out, corpus_file), check=True, capture_output=True)
    _same_tree(reference.root, out)


@pytest.mark.slow  # intermittent: a re-harvested shard differs in its model-A activations (docs/store.md, "Open: re-harvest")
def test_full_disk_fails_cleanly_and_resumes(reference, corpus_file, tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        r = subprocess.run(_cli(mnt / "store", corpus_file), capture_output=True, text=True)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1].startswith("error: no space left on the device")
        assert not (mnt / "store" / "meta.json").exists()
        assert not [p for p in (mnt / "store").rglob(".*tmp*")]  # no temporaries left behind
        subprocess.run(["mount", "-o", "remount,size=200m", str(mnt)], check=True)
        subprocess.run(_cli(mnt / "store", corpus_file), check=True, capture_output=True)
        _same_tree(reference.root, mnt / "store")
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_harvest_runs_bf16_models_and_matches_cpu(reference, corpus_file, tmp_path):
    from crossdiff.inputs.models import DEFAULT_MODEL_A, load_model

    assert load_model(DEFAULT_MODEL_A, device="cuda").model.dtype == torch.bfloat16
    cfg = dict(out=str(tmp_path / "gpu"), corpus=str(corpus_file), device="cuda", **SETTINGS)
    gpu = harvest(HarvestConfig(**cfg))
    assert gpu.n_tokens == reference.n_tokens
    for key in "ab":  # bf16 forward vs fp32 forward: the same scale to within a few percent
        assert gpu.meta["models"][key]["scale"] == pytest.approx(
            reference.meta["models"][key]["scale"], rel=0.05
        )
    ref_rows, gpu_rows = reference.rows(np.arange(reference.n_tokens)), gpu.rows(np.arange(gpu.n_tokens))
    ref_key = {(c, p): i for i, (c, p) in enumerate(zip(ref_rows["chunk"], ref_rows["pos_a"]))}
    both = [(ref_key[k], i) for i, k in enumerate(zip(gpu_rows["chunk"], gpu_rows["pos_a"])) if k in ref_key]
    assert len(both) > 0.99 * gpu.n_tokens  # only outlier decisions near the threshold can differ
    r, g = np.array(both).T
    for x_ref, x_gpu in zip(reference.get(r), gpu.get(g)):
        cos = torch.nn.functional.cosine_similarity(x_ref, x_gpu, dim=-1)
        assert cos.median() > 0.99 and cos.min() > 0.9


def test_existing_store_with_other_settings_is_refused(reference, corpus_file):
    cfg = dict(
        out=str(reference.root), corpus=str(corpus_file), device="cpu", **{**SETTINGS, "context_len": 256}
    )
    with pytest.raises(CrossdiffError, match="other settings"):
        harvest(HarvestConfig(**cfg))
    assert Store.open(reference.root).n_tokens == 2400  # untouched
    again = harvest(HarvestConfig(out=str(reference.root), corpus=str(corpus_file), device="cpu", **SETTINGS))
    assert again.n_tokens == 2400  # same settings: already complete, nothing redone


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(model_a="no-such-model-xyz/../x"), "not found"),
        (dict(layer_a="40"), "out of range"),
        (dict(layer_b="0.5.1"), "neither a block index"),
        (dict(corpus="/nonexistent/corpus.txt"), "does not exist"),
        (dict(context_len=4), "context-len"),
    ],
)
def test_bad_input_one_line_and_no_output(tmp_path, corpus_file, kwargs, message):
    out = tmp_path / "store"
    args = dict(out=str(out), corpus=str(corpus_file), device="cpu", **SETTINGS)
    args.update(kwargs)
    with pytest.raises(CrossdiffError, match=message):
        harvest(HarvestConfig(**args))
    assert not out.exists()


def test_empty_and_unalignable_corpora(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(CrossdiffError, match="empty|no documents|no text"):
        harvest(HarvestConfig(out=str(tmp_path / "s1"), corpus=str(empty), device="cpu"))
    single = tmp_path / "single.txt"
    single.write_text("Hello\n\nworld\n")  # one aligned pair per document, masked as first position
    with pytest.raises(CrossdiffError, match="no aligned tokens"):
        harvest(HarvestConfig(out=str(tmp_path / "s2"), corpus=str(single), device="cpu"))
    assert not (tmp_path / "s2").exists()


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "crossdiff", "harvest", "--out", str(tmp_path / "s"), "--corpus", "nope:x"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: unknown corpus")


def test_help_lists_subcommands():
    r = subprocess.run(
        [sys.executable, "-m", "crossdiff", "--help"], capture_output=True, text=True, check=True
    )
    for cmd in ("harvest", "train", "install-defaults"):
        assert cmd in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "crossdiff", "harvest", "--help"], capture_output=True, text=True, check=True
    )
    assert "--max-tokens" in r.stdout and "relative depth" in r.stdout
    assert json.loads(json.dumps(SETTINGS))  # settings stay JSON-serialisable


@pytest.mark.slow  # intermittent: a re-harvested shard differs in its model-A activations (docs/store.md, "Open: re-harvest")
def test_rerun_reharvests_damaged_shards_byte_identically(reference, corpus_file, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference.root, out)
    one, three = out / "shards" / "00001.safetensors", out / "shards" / "00003.safetensors"
    with open(one, "r+b") as f:  # random bytes, same size: only the sha256 can tell
        f.seek(one.stat().st_size - 2000)
        f.write(np.random.default_rng(0).bytes(2000))
    with open(three, "r+b") as f:
        f.truncate(three.stat().st_size // 2)
    with pytest.raises(
        CrossdiffError, match="00003.safetensors is damaged .*repair the store with: crossdiff harvest"
    ):
        Store.open(out)
    r = subprocess.run(_cli(out, corpus_file), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"damaged: {one} (its sha256 differs" in r.stderr and f"damaged: {three} (" in r.stderr
    assert "re-harvesting shard 00001" in r.stderr and "re-harvesting shard 00003" in r.stderr
    _same_tree(reference.root, out)


def test_full_disk_while_saving_tokenizers_leaves_no_temporary(tmp_path, models_ab):
    from crossdiff.harvest.harvest import _prepare

    mnt = tmp_path / "disk"
    mnt.mkdir()
    # SmolLM2's tokenizer files take ~3.5 MB, Gemma's ~33 MB: the second one cannot fit in 8 MB.
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        cfg = HarvestConfig(out=str(mnt / "store"), device="cpu")
        with pytest.raises(OSError) as e:
            _prepare(mnt / "store", cfg, models_ab)
        assert e.value.errno == errno.ENOSPC
        assert sorted(p.name for p in (mnt / "store" / "tokenizers").iterdir()) == ["a"]
    finally:
        subprocess.run(["umount", str(mnt)])


CHINESE = (
    "今天早上委员会开会讨论了城市公共图书馆的新预算。几位委员认为阅览室晚上应该开得更晚一些，"
    "因为许多学生和工人六点以前没有时间去。🙂📚 其他人担心冬天几个月里老建筑的取暖费用。"
    "经过长时间的辩论，他们同意在两个分馆试行一年延长开放时间，并在春天向议会报告来访人数。🎉"
)


def test_badly_aligned_text_warns_and_says_why(tmp_path, capsys, tokenizers_ab):
    from crossdiff.harvest.harvest import aligned_fraction_warning

    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n\n".join(CHINESE[i:] + CHINESE[:i] for i in range(0, 120, 10)) + "\n")
    store = harvest(HarvestConfig(out=str(tmp_path / "zh"), corpus=str(corpus), device="cpu", max_tokens=300))
    frac_a, frac_b = (store.meta["models"][k]["aligned_fraction"] for k in "ab")
    # SmolLM2 reads Chinese in byte pieces, Gemma in whole characters: A's fraction falls.
    low = [(m, frac) for m, frac in (("A", frac_a), ("B", frac_b)) if frac < 0.5]
    assert low
    err = capsys.readouterr().err
    assert "warning: only " in err and "byte pieces whose ends rarely coincide" in err
    for m, frac in low:
        assert f"{frac:.0%} of model {m}'s text tokens were aligned, against" in err
    # The English store of this module's fixture stays silent.
    assert aligned_fraction_warning(0.98, 0.98, *tokenizers_ab) is None
