"""`crossdiff calibrate` and its derived stores (crossdiff/inputs/derive.py), on a store harvested from a small
text with the real default pair: the planted store equals model A's forward with a hook adding the
direction at the layer, the self and rotated stores are what they claim, derivation resumes byte-identical,
and the whole calibration runs end to end on a tiny budget.

Legend: N rows, D model A's width.
"""

from __future__ import annotations

import filecmp
import json
import random
import shutil

import numpy as np
import pytest
import torch

from crossdiff.budget import Budget
from crossdiff.controls.calibrate import (
    DEFAULT_WORDS,
    CalibrateConfig,
    calibrate,
    calibration_settings,
    read_words,
)
from crossdiff.core import manifest
from crossdiff.core.errors import CrossdiffError
from crossdiff.harvest.harvest import HarvestConfig, harvest
from crossdiff.inputs.align import tokenize
from crossdiff.inputs.derive import (
    Control,
    derive_store,
    load_direction,
    load_rotation,
    planted_mask,
    planted_norm,
    rows_on_words,
    word_pattern,
)
from crossdiff.inputs.store import Store

FILLER = (
    "the a of and to in was said that with for on at from by old new big small near his her their".split()
)
NOUNS = list(DEFAULT_WORDS[:12])
TINY = Budget(
    "tiny", 3000, 0.05, 256, 8, 12_288, 256, 2048, 1e-3, 1, 0, None, verify_top=1, verify_heldout_tokens=256,
    verify_scan_tokens=512,
)  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory, models_ab) -> Store:
    """~3,000 aligned pairs in 6 shards of text where about one word in five is a planted noun."""
    rng = random.Random(0)
    docs = []
    for _ in range(24):
        words = [
            rng.choice(NOUNS) if rng.random() < 0.2 else rng.choice(FILLER)
            for _ in range(rng.randint(60, 140))
        ]
        words[0] = words[0].capitalize()
        docs.append(" ".join(words) + ".")
    root = tmp_path_factory.mktemp("calibrate")
    (root / "docs.txt").write_text("\n\n".join(docs) + "\n")
    return harvest(
        HarvestConfig(
            out=str(root / "diff" / "store"),
            corpus=str(root / "docs.txt"),
            max_tokens=3000,
            context_len=128,
            batch_size=4,
            shard_tokens=500,
            device="cpu",
        )
    )


@pytest.fixture(scope="module")
def derived(base, tmp_path_factory) -> dict[str, Store]:
    root = tmp_path_factory.mktemp("derived")
    return {
        name: derive_store(base, root / name, Control(name, 7, NOUNS if name == "planted" else ()))
        for name in ("planted", "self", "rotated")
    }


def _raw(store: Store, key: str) -> torch.Tensor:
    """All rows of one model in storage precision (bf16)."""
    from safetensors.torch import load_file

    parts = [
        load_file(store.root / "shards" / f"{s['name']}.safetensors")[f"acts_{key}"]
        for s in store.meta["shards"]
    ]
    return torch.cat(parts)


# ----------------------------------------------------------------------------- the word rule


def test_rows_on_words_rule():
    text = "The House, houses and a dog's bed-dog. HOUSE"
    pattern = word_pattern(["house", "dog"])
    spans = [m.span() for m in pattern.finditer(text)]
    assert [text[s:e] for s, e in spans] == ["House", "dog", "dog", "HOUSE"]  # whole words, any case
    # A row is on a word when its char_end is in (start, end]: " House" ends at 9, "The" at 3.
    ends = np.array([3, 9, 10, 17, 27, 29, 37, 38, 44, 42])
    assert rows_on_words(text, ends, pattern).tolist() == [0, 1, 0, 0, 1, 0, 1, 0, 1, 1]
    assert not rows_on_words("nothing here", np.array([3, 7]), pattern).any()
    with pytest.raises(CrossdiffError, match="empty"):
        word_pattern([" ", ""])


def test_read_words(tmp_path):
    assert read_words(None) == DEFAULT_WORDS and len(DEFAULT_WORDS) == 40
    f = tmp_path / "w.txt"
    f.write_text("# nouns\nDog\n\n  cat  # pets\ndog\nice cream\n")
    assert read_words(str(f)) == ("Dog", "cat", "ice cream")
    f.write_text("# only a comment\n\n")
    with pytest.raises(CrossdiffError, match="has no words"):
        read_words(str(f))
    with pytest.raises(CrossdiffError, match="not found"):
        read_words(str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- derived stores


def test_planted_store_equals_hooked_forward(base, derived, models_ab):
    """Each planted row is model A's block output with v added there by a forward hook on the tokens
    of A that end inside a word (found here from A's own tokenisation, not from the store's rows)."""
    planted, lm = derived["planted"], models_ab[0]
    layer = base.model_a["layer"]
    v_raw_D = load_direction(planted) * planted_norm(base)
    rows = base.rows(np.arange(base.n_tokens))
    mask_N = planted_mask(base, word_pattern(NOUNS))
    assert 0.1 < mask_N.mean() < 0.4
    texts = {}
    for s in range(len(base.meta["shards"])):
        texts.update(base.texts(s))
    checked = 0
    for chunk in np.unique(rows["chunk"][mask_N])[:3]:
        text = texts[int(chunk)]["text"]
        ids, offsets, _ = tokenize(lm.tokenizer, text)
        spans = [m.span() for m in word_pattern(NOUNS).finditer(text)]
        on_T = torch.tensor([any(s < end <= e for s, e in spans) for end in offsets[:, 1]])

        def add(module, args, output, on_T=on_T):
            h = output[0] if isinstance(output, tuple) else output
            h = h + on_T[None, :, None].to(h.dtype) * v_raw_D.to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = lm.blocks[layer].register_forward_hook(add)
        try:
            hidden_TD = lm.hidden(
                torch.from_numpy(ids)[None], torch.ones(1, len(ids), dtype=torch.long), layer
            )[0]
        finally:
            handle.remove()
        sel = np.flatnonzero(rows["chunk"] == chunk)
        pos = rows["pos_a"][sel]
        assert np.array_equal(on_T.numpy()[pos], mask_N[sel])  # the store's rule = the hook's tokens
        stored = planted.get(sel, normalised=False)[0]
        tol = 0.02 * hidden_TD.norm(dim=-1).median().item() / 20
        torch.testing.assert_close(stored, hidden_TD[pos].bfloat16().float(), rtol=0.02, atol=tol)
        checked += int(mask_N[sel].sum())
    assert checked >= 10
    # Off the words the rows are the base's bit for bit; on them base + v up to one bf16 rounding.
    a_base, a_planted = _raw(base, "a"), _raw(planted, "a")
    off = torch.from_numpy(~mask_N)
    assert torch.equal(a_base[off].view(torch.int16), a_planted[off].view(torch.int16))
    expect = (a_base[~off].float() + v_raw_D).bfloat16().float()
    torch.testing.assert_close(a_planted[~off].float(), expect, rtol=0, atol=0)
    assert torch.equal(_raw(base, "b"), _raw(planted, "b"))


def test_planted_meta_and_scales(base, derived):
    planted = derived["planted"]
    meta = planted.meta
    assert meta["models"]["a"]["id"] == "smollm2-135m+planted" and meta["models"]["b"] == base.model_b
    assert meta["derived"]["control"] == "planted" and meta["n_tokens"] == base.n_tokens
    rows = lambda shards: [{k: v for k, v in e.items() if k != "files"} for e in shards]  # noqa: E731
    assert rows(meta["shards"]) == rows(base.meta["shards"]) and meta.get("heldout_frac") == base.meta.get(
        "heldout_frac"
    )
    for e in meta["shards"]:  # its own files' sizes and digests, as the harvest records them
        assert (
            e["files"]["safetensors"]["bytes"]
            == (planted.root / "shards" / f"{e['name']}.safetensors").stat().st_size
        )
    assert abs(planted_norm(base) ** 2 / base.model_a["mean_sq_norm"] - 1) < 1e-9
    x_a, x_b = planted.get(np.arange(planted.n_tokens))
    assert planted.model_a["normalisation"] == "centred"  # the base's rule
    centred = (x_a - x_a.mean(0)).pow(2).sum(1).mean().item()
    assert abs(centred / planted.d_a - 1) < 0.01  # E||x - mean||² = d after rescaling
    assert planted.scale_a < base.scale_a  # the planted rows made A's activations larger
    assert planted.scale_b == base.scale_b
    assert (planted.root / "tokenizers" / "a" / "tokenizer_config.json").is_file()
    for s in range(len(meta["shards"])):
        assert planted.texts(s) == base.texts(s)


def test_self_store_is_a_twice(base, derived):
    st = derived["self"]
    a = _raw(st, "a")
    assert torch.equal(a.view(torch.int16), _raw(st, "b").view(torch.int16))
    assert torch.equal(a.view(torch.int16), _raw(base, "a").view(torch.int16))
    rows = st.rows(np.arange(st.n_tokens))
    assert np.array_equal(rows["tok_a"], rows["tok_b"]) and np.array_equal(rows["pos_a"], rows["pos_b"])
    assert st.model_b == st.model_a == base.model_a  # same id and width: analysis sees one space
    assert filecmp.cmp(
        st.root / "tokenizers" / "b" / "tokenizer.json",
        base.root / "tokenizers" / "a" / "tokenizer.json",
        shallow=False,
    )


def test_rotated_store(base, derived):
    st = derived["rotated"]
    R = load_rotation(st).double()
    assert R.shape == (base.d_a, base.d_a)
    torch.testing.assert_close(R @ R.T, torch.eye(base.d_a, dtype=torch.float64), rtol=0, atol=1e-5)
    a, b = _raw(st, "a").float(), _raw(st, "b").float()
    assert torch.equal(_raw(base, "a").float(), a)
    torch.testing.assert_close(b, (a @ R.float()).bfloat16().float(), rtol=0, atol=0)
    torch.testing.assert_close(b.norm(dim=1), a.norm(dim=1), rtol=8e-3, atol=0)  # bf16 rounding only
    assert st.model_b["id"] == "smollm2-135m+rotated" and st.d_b == base.d_a
    assert abs(st.scale_b / st.scale_a - 1) < 1e-3  # recomputed from the stored values
    x_a, x_b = st.get(np.arange(st.n_tokens))
    assert abs((x_b - x_b.mean(0)).pow(2).sum(1).mean().item() / st.d_b - 1) < 1e-4  # centred, §4


def test_derive_resumes_byte_identical_and_refuses_other_settings(base, derived, tmp_path):
    ref = derived["planted"].root
    copy = tmp_path / "planted"
    shutil.copytree(ref, copy)
    # As if killed while writing shard 3: shards 3.. incomplete, a temporary file, no meta.json.
    (copy / "meta.json").unlink()
    for p in (copy / "shards").glob("0000[3-9].*"):
        p.unlink()
    (copy / "shards" / "00003.safetensors").write_bytes(b"partial")
    (copy / "shards" / ".00004.safetensors.tmp-x").write_bytes(b"junk")
    derive_store(base, copy, Control("planted", 7, tuple(NOUNS)))
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(ref / rel, copy / rel, shallow=False), rel
    with pytest.raises(CrossdiffError, match="different derived store"):
        derive_store(base, copy, Control("planted", 8, tuple(NOUNS)))
    assert (
        derive_store(base, copy, Control("planted", 8, tuple(NOUNS)), overwrite=True).meta["derived"]["seed"]
        == 8
    )


# ----------------------------------------------------------------------------- calibrate


def test_calibrate_end_to_end(base, tmp_path, capsys, one_thread):
    diff = tmp_path / "diff"
    diff.mkdir()
    (diff / "store").symlink_to(base.root)
    words = tmp_path / "words.txt"
    words.write_text("\n".join(NOUNS) + "\n")
    cfg = CalibrateConfig(out=str(diff), words=str(words), device="cpu")
    res = calibrate(cfg, budget=TINY)
    saved = json.loads((diff / "calibration.json").read_text())
    assert saved == res
    assert set(res["positive"]) >= {"recovered", "cosine", "verified"} and set(res["negative"]) >= {
        "self_false_exclusive",
        "rotated_false_exclusive",
    }
    assert res["positive"] == res["by_arch"]["dfc"]["positive"] and set(res["by_arch"]) == {
        "dfc",
        "batchtopk",
    }
    for arch in ("dfc", "batchtopk"):
        pos, neg = res["by_arch"][arch]["positive"], res["by_arch"][arch]["negative"]
        assert isinstance(pos["recovered"], bool) and -1 <= pos["cosine"] <= 1
        assert pos["pass"] == (pos["recovered"] and pos["verified"])
        assert set(res["by_arch"][arch]["positive_random"]) >= {"recovered", "cosine", "verified"}
        best = pos["best_overall"]
        assert best["cosine"] >= pos["cosine"] and 0 <= best["top_on_words"] <= 1 and best["n_top"] > 0
        # Planted at the layer's typical norm on ~25% of tokens: some latent takes the direction.
        assert best["cosine"] > 0.5
        for c in ("self", "rotated"):
            assert (
                isinstance(neg[f"{c}_false_exclusive"], int)
                and 0 <= neg[f"{c}_false_exclusive"] <= neg[f"{c}_candidates"]
            )
    assert res["words"] == NOUNS and res["n_planted_rows"] == int(
        planted_mask(base, word_pattern(NOUNS)).sum()
    )
    assert res["planted_norm"] == pytest.approx(planted_norm(base))
    controls = ("planted", "random", "self", "rotated")
    stages = {
        f"{v} {c}-{a}" for v in ("train", "analyse", "verify") for c in controls for a in ("dfc", "batchtopk")
    }
    assert set(res["seconds"]) == stages | {f"derive {c}" for c in controls}
    assert "harvest" not in res["seconds"]  # the store was reused
    capsys.readouterr()

    # A rerun skips every stage and gives the same numbers; with DIR/run analysed, the report shows them.
    shutil.copytree(diff / "calibration" / "planted-dfc", diff / "run")
    again = calibrate(cfg, budget=TINY)
    err = capsys.readouterr().err
    assert err.count("already done") == len(stages) + 4 and "done in" not in err
    assert {k: v for k, v in again.items() if k != "seconds_this_session"} == {
        k: v for k, v in res.items() if k != "seconds_this_session"
    }
    html = (diff / "run" / "report" / "index.html").read_text()
    assert "Calibration" in html and "rotated-diff false differences" in html and "Latents closest" in html

    with pytest.raises(CrossdiffError, match="other settings"):
        calibrate(CalibrateConfig(out=str(diff), words=str(words), seed=1, device="cpu"), budget=TINY)
    # --dec-init-norm at the trainer's default is the same calibration; another value is not
    settings = manifest.read(diff / "calibration")["settings"]  # the calibration's key
    assert "dec_init_norm" not in settings["train"]  # written as before the option existed
    same = CalibrateConfig(out=str(diff), words=str(words), device="cpu", dec_init_norm=0.1)
    assert calibration_settings(same, TINY, base, read_words(str(words))) == settings
    with pytest.raises(CrossdiffError, match="other settings"):
        calibrate(CalibrateConfig(out=str(diff), words=str(words), dec_init_norm=0.01), budget=TINY)
    # a calibration written when the trainer's `arch` named the DFC is the same calibration
    from crossdiff.controls.calibrate import _check_settings

    old_train = {k: v for k, v in settings["train"].items() if k != "sparsity"} | {
        "arch": "dfc",
        "sparsity": None,
    }
    written = json.dumps({**settings, "train": old_train})
    (diff / "calibration" / "settings.json").write_text(written)
    (diff / "calibration" / "manifest.json").unlink()  # a folder written before its manifest held its key
    _check_settings(diff / "calibration", settings, overwrite=False)  # accepted: no error
    with pytest.raises(CrossdiffError, match="other settings"):
        _check_settings(diff / "calibration", {**settings, "seed": 9}, overwrite=False)
    assert (diff / "calibration" / "settings.json").read_text() == written  # and a no-op writes nothing


def test_calibrate_bad_input(base, tmp_path, capsys):
    from crossdiff.cli import main

    diff = tmp_path / "diff"
    diff.mkdir()
    (diff / "store").symlink_to(base.root)
    words = tmp_path / "w.txt"
    words.write_text("zyzzyva\n")
    with pytest.raises(CrossdiffError, match="none of the 1 words occurs"):
        calibrate(CalibrateConfig(out=str(diff), words=str(words)), budget=TINY)
    with pytest.raises(CrossdiffError, match="holds model A 'smollm2-135m', not 'gemma3-270m'"):
        calibrate(CalibrateConfig(out=str(diff), model="gemma3-270m"), budget=TINY)
    for content, message in ((None, "not found"), ("# nothing\n", "has no words")):
        path = tmp_path / f"words-{message[:3]}.txt"
        if content is not None:
            path.write_text(content)
        capsys.readouterr()
        assert main(["calibrate", "--out", str(diff), "--words", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err
    assert not (diff / "calibration").exists()


def test_calibration_settings_written_by_the_previous_version_still_match():
    """settings.json as crossdiff 0.1 (commit 29d79fc) wrote it: each stage config's fields less a list
    of non-settings, dec_init_norm left out at its default. The settings now read from the configs'
    own field marks must give the same dict, or every old calibration would be refused."""
    from types import SimpleNamespace

    from crossdiff.budget import analyze_config, train_config
    from crossdiff.core.config import config_to_dict

    not_settings = {
        "store",
        "out",
        "run",
        "device",
        "logger",
        "log_every",
        "checkpoint_every",
        "splice_tokens",
        "aux_per_partition",  # added after 0.1: left out of the settings at their defaults
        "exclusive_dead_tokens",
    }

    def old_strip(c) -> dict:
        d = config_to_dict(c)
        return {
            k: v for k, v in d.items() if k not in not_settings and not (k == "dec_init_norm" and v == 0.1)
        }

    store = SimpleNamespace(meta={"n_tokens": 3000, "models": {}})
    for dec_init_norm in (None, 0.1, 0.03):
        cfg = CalibrateConfig(out="x", seed=2, dec_init_norm=dec_init_norm)
        old = {
            "train": old_strip(train_config(TINY, ".", ".", arch="dfc", seed=2, dec_init_norm=dec_init_norm)),
            "analyze": old_strip(analyze_config(TINY, ".", ".", load_models=False)),
        }
        new = calibration_settings(cfg, TINY, store, DEFAULT_WORDS)
        assert {k: new[k] for k in ("train", "analyze")} == json.loads(json.dumps(old))
