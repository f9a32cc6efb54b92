"""crossdiff generate on the real SmolLM2: answers written as conversations, resumed after SIGKILL
without a duplicate or a lost answer, and a file made with other settings is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.generate import GenerateConfig, answer_batch, cut_at_turn, load_answered, read_prompts

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = 30


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "crossdiff", "generate", *args]


def _env() -> dict:
    # One thread: on a loaded shared machine OpenMP threads waiting for each other slow generation 16x.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_generate_resumes_after_sigkill_without_duplicates(tmp_path, models_ab, one_thread):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"Name a city that starts with {chr(65 + i % 26)}."}) + "\n"
            for i in range(N_PROMPTS)
        )
    )
    out = tmp_path / "answers.jsonl"
    args = _cli(
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--model",
        "smollm2-135m",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "1",
        "--device",
        "cpu",
    )
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (out.is_file() and out.read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no answers written in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    n_before = out.read_bytes().count(b"\n")
    assert 2 <= n_before < N_PROMPTS
    with open(out, "ab") as f:  # as if killed in the middle of writing a line
        f.write(b'{"index": 99, "messages": [{"role": "us')
    subprocess.run(args, env=_env(), check=True, capture_output=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(N_PROMPTS))  # each once, in order
    # Every answer is what an uninterrupted greedy run gives (batch size 1: no padding effects).
    cfg = GenerateConfig(out="unused", max_new_tokens=4, batch_size=1)
    lm = models_ab[0]
    for p, r in zip(read_prompts(str(prompts)), records):
        ((expected, finish),) = answer_batch(lm, [p["messages"]], cfg, seed=0)
        assert r["messages"] == p["messages"] + [{"role": "assistant", "content": expected}]
        assert r["finish"] == finish and r["sampling"] == cfg.sampling() and r["model"] == "smollm2-135m"


def test_load_answered_drops_a_torn_line_and_refuses_other_settings(tmp_path):
    out = tmp_path / "a.jsonl"
    sampling = GenerateConfig(out=str(out)).sampling()
    line = {"index": 0, "model": "m", "sampling": sampling, "messages": []}
    out.write_text(json.dumps(line) + "\n" + '{"index": 1, "mod')
    assert load_answered(out, "m", sampling) == {0}
    assert out.read_text() == json.dumps(line) + "\n"
    with pytest.raises(CrossdiffError, match="rerun with those settings"):
        load_answered(out, "m", GenerateConfig(out=str(out), max_new_tokens=5).sampling())
    with pytest.raises(CrossdiffError, match="rerun with those settings"):
        load_answered(out, "other", sampling)


def test_bad_prompt_files(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    )
    with pytest.raises(CrossdiffError, match="last message must be the user's"):
        read_prompts(str(p))
    with pytest.raises(CrossdiffError, match="does not exist"):
        read_prompts(str(tmp_path / "missing.jsonl"))
    assert 200 <= len(read_prompts("default")) <= 300


def test_plain_rendering_answers_are_cut_at_the_next_turn():
    assert cut_at_turn("Paris.\n\nUser:\nAnd Spain?") == ("Paris.\n", True)
    assert cut_at_turn("Paris.\nAssistant:\nParis.\nUser: x") == ("Paris.", True)
    assert cut_at_turn("A user: said Assistant: hi") == ("A user: said Assistant: hi", False)


def test_diff_on_prompts_generates_both_models_answers_before_the_harvest(tmp_path):
    from crossdiff.pipeline import DiffConfig, stages

    cfg = DiffConfig(corpus="chat-default", out=str(tmp_path))
    st = stages(cfg, cfg.resolved_budget())
    assert [s.name for s in st[:3]] == ["generate (a)", "generate (b)", "harvest"]
    assert st[0].settings["prompts"] == "default" and st[1].settings["model"] == cfg.model_b
    # recorded relative to the store (crossdiff.harvest.harvest.recorded_settings): a moved folder resumes
    assert st[2].settings["corpus"] == "chat:{store}/../answers/a.jsonl,{store}/../answers/b.jsonl"
    one = DiffConfig(prompts="p.jsonl", answers="b", out=str(tmp_path))
    st = stages(one, one.resolved_budget())
    assert [s.name for s in st[:2]] == ["generate (b)", "harvest"]
    assert st[1].settings["corpus"] == "chat:{store}/../answers/b.jsonl"
