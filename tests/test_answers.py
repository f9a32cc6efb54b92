"""The answer-level diff (crossdiff/analysis/answers.py) and its link to latents (answerlink.py).

Statistics against hand-computed references (exact McNemar, Benjamini-Hochberg), a planted n-gram rate
difference found with the right sign and p, self-diffs with nothing significant after the correction,
and the link on a real on-disk store whose planted latents fire at known positions, end to end through
`crossdiff answers --run` and verify's candidate list.
"""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest
import torch

from crossdiff.analysis.answerlink import (
    answer_sources,
    link_priority,
    ngram_contexts,
    ngram_groups,
    read_linked,
    with_linked,
)
from crossdiff.analysis.answers import (
    AnswersConfig,
    answers,
    benjamini_hochberg,
    diff_ngrams,
    mcnemar_exact,
    min_discordant,
    ngram_spans,
    pair_answers,
    read_answers,
    read_ngrams,
    words,
)
from crossdiff.analysis.results import ANSWERS, COLUMNS, load_results, read_latents, read_stage, write_latents
from crossdiff.core.errors import CrossdiffError


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _answers(prompts, texts, model, categories=None):
    return [
        {
            "index": i,
            "id": f"p{i}",
            "category": categories[i] if categories else None,
            "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": t}],
            "model": model,
        }
        for i, (p, t) in enumerate(zip(prompts, texts))
    ]


# ----------------------------------------------------------------------------- words and statistics


def test_words_are_case_folded_letters_and_ngrams_stop_at_punctuation():
    assert [w[0] for w in words("I can't HELP, sorry: l’eau 3 dogs_x")] == [
        "i",
        "can't",
        "help",
        "sorry",
        "l'eau",
        "dogs",
        "x",
    ]
    grams = [g for g, _, _ in ngram_spans("I can't help, sorry now", 3)]
    assert grams == [
        "i",
        "i can't",
        "i can't help",
        "can't",
        "can't help",
        "help",
        "sorry",
        "sorry now",
        "now",
    ]
    text = "Well,  I CANNOT do it"
    assert [(g, text[s:e]) for g, s, e in ngram_spans(text, 2) if g == "i cannot"] == [
        ("i cannot", "I CANNOT")
    ]


def test_mcnemar_exact_against_hand_computed_binomial_tails():
    assert mcnemar_exact(10, 0) == 2 / 2**10
    assert mcnemar_exact(7, 3) == 2 * (1 + 10 + 45 + 120) / 1024  # P(X <= 3), X ~ Bin(10, 1/2)
    assert mcnemar_exact(3, 7) == mcnemar_exact(7, 3)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(15, 1) == 2 * 17 / 2**16
    # min_discordant: the fewest discordant prompts whose most extreme split can reach q
    assert min_discordant(0.05) == 6 and mcnemar_exact(6, 0) <= 0.05 < mcnemar_exact(5, 0)
    assert min_discordant(0.01) == 8 and mcnemar_exact(8, 0) <= 0.01 < mcnemar_exact(7, 0)


def test_benjamini_hochberg_against_hand_computed_q_values():
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(q, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert benjamini_hochberg([0.9, 0.2]) == [0.9, 0.4]
    assert benjamini_hochberg([]) == []


# ----------------------------------------------------------------------------- planted and self-diffs

FILLER = "the answer is that it depends on many things such as time and place".split()


def _filler(rng, n=12):
    return " ".join(rng.choice(FILLER) for _ in range(n))


def test_planted_ngram_is_found_with_its_sign_p_and_examples(tmp_path):
    rng = random.Random(0)
    n = 40
    prompts = [f"Question number {i}?" for i in range(n)]
    cats = ["politics" if i < 20 else "facts" for i in range(n)]
    # A refuses ("I cannot") in 15 politics prompts where B does not; B says it once where A does not.
    a = [("I cannot discuss this. " if i < 15 else "") + _filler(rng) for i in range(n)]
    b = [("I cannot say. " if i == 30 else "") + _filler(rng) for i in range(n)]
    fa = _write(tmp_path / "a.jsonl", _answers(prompts, a, "m-a", cats))
    fb = _write(tmp_path / "b.jsonl", _answers(prompts, b, "m-b", cats))
    s = answers(AnswersConfig(answers_a=str(fa), answers_b=str(fb), out=str(tmp_path / "out")))
    rows = {(r["scope"], r["ngram"]): r for r in read_ngrams(tmp_path / "out")}
    r = rows[("all", "i cannot")]
    assert (r["a_only"], r["b_only"], r["answers_a"], r["answers_b"]) == (15, 1, 15, 1)
    assert r["more_in"] == "a" and r["significant"]
    assert math.isclose(
        r["p"], 2 * 17 / 2**16, rel_tol=1e-5
    )  # the exact reference (6 significant digits in the CSV)
    assert r["count_a"] == 15 and math.isclose(r["rate_a"], 15 / 40, rel_tol=1e-5)
    pol = rows[("politics", "i cannot")]  # the category carries all 15 discordant prompts
    assert (pol["a_only"], pol["b_only"]) == (15, 0) and pol["significant"]
    assert ("facts", "i cannot") not in rows  # 1 discordant prompt: cannot reach q, not tested
    # No filler word is significant (both models draw them from the same distribution).
    assert not any(rr["significant"] for (sc, g), rr in rows.items() if sc == "all" and g in FILLER)
    top = {e["ngram"]: e for e in s["top"]}
    ex = top["i cannot"]["examples"]
    assert len(ex) == 3 and all("I cannot" in e["a"] and "I cannot" not in e["b"] for e in ex)
    assert s["significant"]["all"]["a"] >= 3 and s["significant"]["all"]["b"] == 0  # i, cannot, i cannot ...
    assert s["n_prompts"] == 40


def test_self_diffs_have_no_significant_ngram_after_correction():
    """Both sides drawn from one distribution: the family-wise false-positive rate over 20 self-diffs
    stays at about q (BH controls it when every null is true)."""
    vocab = [chr(97 + i // 26) + chr(97 + i % 26) + "x" for i in range(40)]  # letters only: words
    weights = [1 / (i + 1) for i in range(40)]  # Zipf-like, so many words are frequent enough to test
    any_hit, tested = 0, 0
    for seed in range(20):
        rng = random.Random(seed)
        pairs = []
        for _ in range(120):
            a, b = (" ".join(rng.choices(vocab, weights, k=15)) for _side in range(2))
            pairs.append(({"answer": a, "category": None}, {"answer": b, "category": None}))
        rows = diff_ngrams(pairs, 2, 0.05)
        tested += len(rows)
        any_hit += any(r["significant"] for r in rows)
    assert tested > 20 * 40  # words and bigrams were tested, not filtered away
    assert any_hit <= 3  # expected <= 1 of 20 at q 0.05; 3 or more has probability < 8%


def test_mismatched_or_missing_answer_files_fail_with_one_line(tmp_path):
    a = _write(tmp_path / "a.jsonl", _answers(["Q1", "Q2"], ["x", "y"], "m"))
    b = _write(tmp_path / "b.jsonl", _answers(["Q1", "Other"], ["x", "y"], "m"))
    with pytest.raises(CrossdiffError, match="differs between the two answer files"):
        pair_answers(read_answers(a), read_answers(b))
    with pytest.raises(CrossdiffError, match="does not exist"):
        read_answers(tmp_path / "missing.jsonl")
    prompts_only = _write(tmp_path / "p.jsonl", [{"prompt": "Q1"}])
    with pytest.raises(CrossdiffError, match="does not end with an answer"):
        read_answers(prompts_only)
    with pytest.raises(CrossdiffError, match="pass --run"):
        AnswersConfig(answers_a=str(a), answers_b=str(b))


def test_cli_writes_the_tables(tmp_path, capsys):
    from crossdiff.cli import main

    rng = random.Random(1)
    prompts = [f"Q{i}" for i in range(30)]
    a = _write(tmp_path / "a.jsonl", _answers(prompts, [f"Sure thing. {_filler(rng)}" for _ in prompts], "m"))
    b = _write(tmp_path / "b.jsonl", _answers(prompts, [_filler(rng) for _ in prompts], "m"))
    out = tmp_path / "o"
    assert main(["answers", "--answers-a", str(a), "--answers-b", str(b), "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["top"][0]["ngram"] in ("sure", "sure thing", "thing") and s["top"][0]["more_in"] == "a"
    assert (
        main(
            ["answers", "--answers-a", str(a), "--answers-b", str(tmp_path / "none.jsonl"), "--out", str(out)]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the link, end to end

D = 8  # latents = width: the planted crosscoder's latent j reads coordinate j of x_A


def _planted_run(tmp_path):
    """A real store of 40 conversations (20 prompts answered by A and by B) with one row per word, a
    crosscoder whose latent j fires exactly where coordinate j of x_A is set, and its analysis files.
    In A's 12 refusals "Well, I cannot do that": latent 3 fires on "I", latent 4 on "Well" (one row
    before), latent 6 on "Well" in 4 of the 12; latent 5 fires on every row (dense)."""
    from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
    from crossdiff.inputs.chat import content_text
    from crossdiff.inputs.store import Store, finalize, write_shard

    prompts = [f"Tell me about topic {chr(97 + i)}." for i in range(20)]
    refusal = [i < 12 for i in range(20)]
    ans_a = ["Well, I cannot do that." if r else "Sure, here is a short answer." for r in refusal]
    ans_b = ["Sure, here is a short answer." for _ in range(20)]
    files = {
        "a": _write(tmp_path / "a.jsonl", _answers(prompts, ans_a, "synthetic-a")),
        "b": _write(tmp_path / "b.jsonl", _answers(prompts, ans_b, "synthetic-b")),
    }
    rows_x, cols, texts = [], {c: [] for c in "chunk doc pos_a pos_b char_start char_end".split()}, []
    chunk = 0
    for key in "ab":
        for i, (p, t) in enumerate(zip(prompts, ans_a if key == "a" else ans_b)):
            text, spans = content_text([{"role": "user", "content": p}, {"role": "assistant", "content": t}])
            texts.append(
                {"chunk": chunk, "doc": chunk, "source": f"{key}.jsonl:{i + 1}", "text": text,
                 "messages": [list(m) for m in spans]}
            )  # fmt: skip
            ws = words(text)
            for k, (w, s, e, _) in enumerate(ws):
                x = np.zeros(D, np.float32)
                x[5] = 1.0
                if key == "a" and refusal[i] and w == "i":
                    x[3] = 2.0
                if key == "a" and refusal[i] and w == "well":
                    x[4] = 1.5
                    x[6] = 1.0 if i % 3 == 0 else 0.0
                rows_x.append(x)
                for c, v in zip(cols, (chunk, chunk, k, k, s, e)):
                    cols[c].append(v)
            chunk += 1
    x_a = torch.as_tensor(np.stack(rows_x))
    tensors = {
        "acts_a": x_a.to(torch.bfloat16),
        "acts_b": torch.zeros_like(x_a).to(torch.bfloat16),
        **{c: torch.as_tensor(v, dtype=torch.int64) for c, v in cols.items()},
        "tok_a": torch.zeros(len(x_a), dtype=torch.int32),
        "tok_b": torch.zeros(len(x_a), dtype=torch.int32),
    }
    store_dir = tmp_path / "store"
    write_shard(store_dir, 0, tensors, texts, {})
    models = {
        k: {"id": f"synthetic-{k}", "layer": 0, "n_layers": 1, "d_model": D, "scale": 1.0,
            "normalisation": "given", "aligned_fraction": 1.0}
        for k in "ab"
    }  # fmt: skip
    corpus = f"chat:{files['a']},{files['b']}"
    finalize(
        store_dir,
        {"crossdiff_version": "test", "models": models, "dtype": "bfloat16", "masked": {}, "corpus": corpus},
    )
    # A chat store is a harvested one: it needs the harvest's record and tokenizer folders to open
    # (a store without them is damaged, crossdiff/inputs/store.py); the link reads neither.
    (store_dir / "settings.json").write_text(json.dumps({"corpus": corpus}))
    for key in "ab":
        (store_dir / "tokenizers" / key).mkdir(parents=True)
        (store_dir / "tokenizers" / key / "tokenizer_config.json").write_text("{}")
    store = Store.open(store_dir)
    cfg = CrosscoderConfig(d_a=D, d_b=D, n_latents=D, sparsity="l1", model_a="synthetic-a", model_b="synthetic-b",
                           layer_a=0, layer_b=0)  # fmt: skip
    cc = Crosscoder(cfg, dec_init_norm=0)
    with torch.no_grad():
        cc.W_enc_a.copy_(torch.eye(D))
        cc.W_dec_a.copy_(torch.eye(D))
        cc.W_dec_b.copy_(torch.eye(D))
    run = tmp_path / "run"
    cc.save_pretrained(run)
    table = {c: np.full(D, np.nan) for c in COLUMNS}
    table.update(
        latent=np.arange(D), partition=np.array(["shared"] * D, dtype=object),
        side=np.array(["a"] + [""] * (D - 1), dtype=object),  # latent 0: a candidate by the norm rule
        verdict=np.array(["candidate_a"] + ["shared"] * 6 + ["dead"], dtype=object),
        reason=np.array([""] * D, dtype=object), rel_norm=np.array([0.05] + [0.5] * (D - 1)),
        p99_act=np.ones(D),
    )  # fmt: skip
    (run / "analysis").mkdir()
    write_latents(run / "analysis", table)
    summary = {"store": {"path": str(store_dir)}, "thresholds": {"exclusive_threshold": 0.1}}
    (run / "analysis" / "summary.json").write_text(json.dumps(summary))
    feature = {"examples": [{"text_token": "Well", "text_after": ", I cannot do that."}] * 2}
    (run / "analysis" / "features").mkdir()
    (run / "analysis" / "features" / "4.json").write_text(json.dumps(feature))
    return run, store, cc


def test_planted_latents_are_linked_with_their_known_coverage(tmp_path):
    run, store, cc = _planted_run(tmp_path)
    s = answers(AnswersConfig(run=str(run), device="cpu"))  # answer files found from the store's corpus
    top = {e["ngram"]: e for e in s["top"]}
    assert {"cannot", "i cannot", "well"} <= set(top) and top["cannot"]["more_in"] == "a"
    assert top["cannot"]["occurrences_in_store"] == 12
    links = {x["latent"]: x for x in top["cannot"]["latents"]}
    # window of "cannot": "Well", "I" (the rows before it) and "cannot" itself
    assert links[3]["coverage"] == 1.0 and links[4]["coverage"] == 1.0 and links[3]["linked"]
    assert links[6]["covered"] == 4 and not links[6]["linked"]  # fires in 4 of 12 windows only
    assert 5 not in links  # fires everywhere: lift 1
    assert 7 not in links  # dead
    # "well" opens the answer: its window is its lead-up, the user turn's last rows, where only the
    # dense latent fires; latent 4, which fires on "Well" itself, detects the word and is not linked
    assert top["well"]["latents"] == [] and top["well"]["occurrences_in_store"] == 12
    linked = read_linked(run)
    assert linked == {3: "a", 4: "a"}
    joined = {r["latent"]: r for r in load_results(run).rows}
    assert joined[0]["answers_rule"] == "norm" and joined[3]["answers_rule"] == "answer-link"
    assert joined[3]["answers_ngram"] in top and joined[5]["answers_rule"] is None
    # their ablation order (verify's --top-linked): the n-gram that most sets A's answers apart first
    priority = link_priority(run)
    assert set(priority) == {3, 4}
    tested = {r["ngram"]: r for r in read_ngrams(run / "answers") if r["scope"] == "all"}
    for key in priority.values():
        g = tested[key[2]]
        assert key[1] == pytest.approx(-math.log((g["answers_a"] + 0.5) / (g["answers_b"] + 0.5)))
    assert {read_stage(run, ANSWERS)[j]["ngram"] for j in (3, 4)} == {"cannot"}
    assert [priority[j][0] for j in (3, 4)] == [0, 1]  # the n-gram's first latent, then its second
    # one group per n-gram, led by its first latent: ablated together, once
    assert ngram_groups(run) == {3: {"members": (3, 4), "ngram": "cannot", "side": "a"}}
    # ... on the n-gram's own occurrences in A's answers: one per chunk, held-out chunks first
    ctx = ngram_contexts(store, answer_sources(run), "a", "cannot", 100)
    in_a = {
        c for sh in range(len(store.meta["shards"])) for c, t in store.texts(sh).items()
        if t["source"].startswith("a.jsonl") and "cannot" in t["text"][t["messages"][-1][2]:].lower()
    }  # fmt: skip
    assert {c["chunk"] for c in ctx} == in_a and len(ctx) == len(in_a)
    assert all(c["text"][c["c0"] : c["c0"] + 6].lower() == "cannot" for c in ctx)
    held = {c for c, _ in store.heldout_chunks(10**9)}
    flags = [c["chunk"] in held for c in ctx]
    assert flags == sorted(flags, reverse=True) and any(flags) and not all(flags)
    assert ngram_contexts(store, answer_sources(run), "b", "cannot", 100) == []
    # verify's candidate list: the analysis's candidate, then the linked latents with their side
    rows = with_linked(read_latents(run / "analysis"), linked)
    assert [(int(r["latent"]), r["side"]) for r in rows] == [(0, "a"), (3, "a"), (4, "a")]
    from crossdiff.analysis.ablation import candidates

    cands = candidates(cc, read_latents(run / "analysis"), 1.0, linked)
    assert [(c.latent, c.side) for c in cands] == [(0, "a"), (3, "a"), (4, "a")]
    leaders = {j: g["side"] for j, g in ngram_groups(run).items()}
    grouped = candidates(cc, read_latents(run / "analysis"), 1.0, leaders, {3: (3, 4)})
    assert [c.members for c in grouped] == [(0,), (3, 4)]
    assert torch.equal(grouped[1].rows_GD, torch.stack([cands[1].u_D, cands[2].u_D]))
    # the converse: latent 4's top examples precede "well i cannot", a significant n-gram of A
    conv = {x["ngram"]: x for x in s["converse"]["4"]}
    assert conv["well"]["examples"] == 2 and conv["well"]["significant"] and conv["well"]["more_in"] == "a"
    with open(run / "answers" / "latents.csv", newline="") as f:
        assert next(csv.reader(f)) == ["latent", "side", "rule", "ngram", "coverage", "lift"]


def test_a_chat_diff_runs_the_answers_stage_between_analyse_and_verify(tmp_path):
    from crossdiff.budget import get_budget
    from crossdiff.pipeline import DiffConfig, stages

    chat = [s.name for s in stages(DiffConfig(prompts="default", out=str(tmp_path)), get_budget("small"))]
    assert chat.index("analyse") < chat.index("answers") < chat.index("verify")
    plain = stages(DiffConfig(out=str(tmp_path)), get_budget("small"))
    assert "answers" not in [s.name for s in plain]
    one = stages(DiffConfig(prompts="default", answers="a", out=str(tmp_path)), get_budget("small"))
    assert "answers" not in [s.name for s in one]  # one model's answers: nothing to compare
    verify = {
        s.name: s for s in stages(DiffConfig(prompts="default", out=str(tmp_path)), get_budget("small"))
    }
    # verify reruns on a chat diff when the answer links are new (its settings say so)
    assert verify["verify"].settings != {s.name: s for s in plain}["verify"].settings


def test_a_run_without_analysis_fails_with_one_line(tmp_path, capsys):
    from crossdiff.cli import main

    (tmp_path / "run").mkdir()
    assert main(["answers", "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "crossdiff analyze" in err[-1]
    assert not (tmp_path / "run" / "answers").exists()  # nothing written


def test_matched_lengths_keep_a_longer_answering_model_from_saying_everything_more():
    """A writes 40 words per answer and B 8, from the same distribution: unmatched, every common word is
    'more in A'; matched to the shorter answer's length, nothing is."""
    rng = random.Random(3)
    pairs = [
        ({"answer": _filler(rng, 40), "category": None}, {"answer": _filler(rng, 8), "category": None})
        for _ in range(60)
    ]
    unmatched = diff_ngrams(pairs, 1, 0.05, match_length=False)
    assert sum(r["significant"] and r["more_in"] == "a" for r in unmatched) >= 5
    matched = diff_ngrams(pairs, 1, 0.05, match_length=True)
    assert not any(r["significant"] for r in matched)
    # the descriptive counts stay those of the whole answers
    assert {r["ngram"]: r["count_a"] for r in matched} == {
        r["ngram"]: r["count_a"] for r in unmatched if r["ngram"] in {m["ngram"] for m in matched}
    }
