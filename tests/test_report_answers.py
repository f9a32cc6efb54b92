"""The report's "What the models say": the answer-level diff beside the crosscoder's verdicts, in the
sentence docs/answers.md gives, escaped, and honest about latents never verified."""

from __future__ import annotations

import json

import pytest
from test_report import XSS, make_run

from crossdiff.analysis.answers import read_summary
from crossdiff.core.errors import CrossdiffError
from crossdiff.report.answers import answers_html
from crossdiff.report.report import ReportConfig, report

NAMES = {"a": "smollm2", "b": "gemma3"}


def _summary(top: list[dict]) -> dict:
    return {"n_prompts": 236, "tested": {"all": 168}, "significant": {"all": {"a": 1, "b": 2}},
            "settings": {"q": 0.05}, "top": top}  # fmt: skip


def _row(ngram: str, more_in: str, a: int, b: int, latents: list[dict]) -> dict:
    return {"ngram": ngram, "more_in": more_in, "answers_a": a, "answers_b": b, "p": 6.3e-14, "q": 5.3e-12,
            "occurrences_in_store": 40, "latents": latents,
            "examples": [{"prompt": "Why? " + XSS, "a": "Because.", "b": "I'm not sure " + XSS}]}  # fmt: skip


def test_the_sentence_reads_counts_link_and_verdict_off_the_files():
    top = [_row("i'm not sure", "b", 1, 29, [{"latent": 7, "coverage": 0.9, "linked": True},
                                            {"latent": 8, "coverage": 0.3, "linked": False}])]  # fmt: skip
    behaviour = {7: {"latent": 7, "verdict": "difference", "shift": 0.2, "z": 4.1}}
    html = answers_html(_summary(top), NAMES, behaviour, features={7}, groups={"i'm not sure": [7]})
    assert "gemma3 says <b>“i&#x27;m not sure”</b> in 29 of 236 answers, smollm2 in 1" in html
    assert 'latent <a href="features/7.html">7</a> fires just before it in 90% of its 40 occurrences' in html
    assert (
        "removing it moves gemma3 towards smollm2 by 0.2 nats/token (z 4.1; verdict <b>difference</b>)"
        in html
    )
    assert ">8<" not in html and "8 (" not in html  # an unlinked latent is not listed
    assert "<script>" not in html and "&lt;script&gt;" in html  # prompts and answers are text


def test_unlinked_and_unverified_are_said_as_such():
    top = [
        _row("what is", "b", 0, 33, []),
        _row("is a", "a", 80, 8, [{"latent": 3, "coverage": 0.6, "linked": True}]),
    ]
    html = answers_html(_summary(top), NAMES, behaviour={}, features=set(), groups={"is a": [3]})
    assert "no latent fires just before it in most of its occurrences" in html
    assert "latent 3 fires just before it in 60%" in html and "not verified (no verification row)" in html


def test_an_ngrams_group_is_named_with_its_leaders_verdict_and_a_latent_of_another_group_is_not():
    """verify's LINK_RULES 3: the latents linked to one n-gram are one candidate, led by the first;
    a latent linked here whose own n-gram is another one is verified with that one's group."""
    lats = [{"latent": 9, "coverage": 0.7, "linked": True}, {"latent": 4, "coverage": 0.6, "linked": True},
            {"latent": 5, "coverage": 0.5, "linked": True}]  # fmt: skip
    top = [_row("nuclear power", "a", 23, 0, lats)]
    behaviour = {
        4: {"verdict": "difference", "shift": 0.06, "z": 5.0},
        9: {"verdict": "inert", "shift": 0.0, "z": 0.1},
    }
    html = answers_html(
        _summary(top), NAMES, behaviour, set(), groups={"nuclear power": [4, 5], "what is": [9]}
    )
    assert "latents 4, 5 (removed together) fire just before it in 60%" in html
    assert "removing them moves model A towards" not in html  # names come from NAMES
    assert (
        "removing them moves smollm2 towards gemma3 by 0.06 nats/token (z 5; verdict <b>difference</b>)"
        in html
    )
    assert "inert" not in html
    assert "<td>4 (60%), 5 (50%)</td><td>difference</td>" in html


def test_a_self_diff_says_nothing_differs():
    html = answers_html(_summary([]), NAMES, {}, set())
    assert "No n-gram differs significantly" in html


def test_read_summary_missing_is_none_and_damaged_is_one_line(tmp_path):
    assert read_summary(tmp_path) is None
    (tmp_path / "answers").mkdir()
    (tmp_path / "answers" / "summary.json").write_text('{"top": [')
    with pytest.raises(CrossdiffError, match="crossdiff answers --run"):
        read_summary(tmp_path)


def test_the_index_shows_the_answers_section_only_for_a_chat_diff(tmp_path):
    run = make_run(tmp_path)
    report(ReportConfig(run=str(run), predictions=False))
    assert "What the models say" not in (run / "report" / "index.html").read_text()
    (run / "answers").mkdir()
    top = [_row("well", "a", 12, 0, [{"latent": 0, "coverage": 1.0, "linked": True}])]
    (run / "answers" / "latents.csv").write_text(
        "latent,side,rule,ngram,coverage,lift\n0,a,answer-link,well,1,9\n"
    )
    (run / "answers" / "summary.json").write_text(json.dumps(_summary(top)))
    report(ReportConfig(run=str(run), predictions=False))
    idx = (run / "report" / "index.html").read_text()
    assert (
        "What the models say" in idx and "in 12 of 236 answers" in idx and "verdict <b>difference</b>" in idx
    )
