"""Conversations on the real default pair (SmolLM2's own chat template, Gemma's plain rendering):
template tokens never align, content characters align as in plain text, long conversations are
chunked to fit, and a conversation harvest records masked tokens by reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.align import align, tokenize
from crossdiff.inputs.chat import (
    PLAIN_TEMPLATE,
    chat_template,
    chunk_messages,
    content_text,
    encode,
    render,
    split_conversation,
)
from crossdiff.inputs.corpus import open_corpus

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "  user  "},  # content equal to a role name, with spaces to strip
    {
        "role": "assistant",
        "content": "Assistant: sure. In 1989, 42.5% of the café's\n\n- items\n```py\nx = 1\n```",
    },
    {"role": "user", "content": "日本 and naïve “quotes” — thanks!"},
]


def _raw(tok, text, spans):
    """The rendering, its tokens with rendering offsets, and each message's content range in it,
    located independently of chat.py: contents are found in order, each after the previous one."""
    roles, contents = [m.role for m in spans], [text[m.start : m.end] for m in spans]
    rendering = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in zip(roles, contents)],
        chat_template=chat_template(tok)[0],
        tokenize=False,
    )
    ranges, pos = [], 0
    for c in contents:
        # Both renderings put a newline right before content; a role name is never preceded by one.
        pos = rendering.index("\n" + c, pos) + 1
        ranges.append((pos, pos + len(c)))
        pos += len(c)
    enc = tokenize(tok, rendering, add_special_tokens=chat_template(tok)[0] == PLAIN_TEMPLATE)
    return rendering, enc, ranges


def test_default_pair_renderings(tokenizers_ab):
    """SmolLM2 has a chat template; the Gemma-3-270M base GGUF has none and gets the plain rendering."""
    tok_a, tok_b = tokenizers_ab
    assert chat_template(tok_a)[1] and not chat_template(tok_b)[1]
    r = render(tok_b, ["user", "assistant"], ["Hi", "Hello!"], add_generation_prompt=False)
    assert r.text == "User:\nHi\n\nAssistant:\nHello!" and r.starts == (6, 21)


def test_template_tokens_are_never_aligned(tokenizers_ab):
    text, spans = content_text(CONVERSATION)
    encs = [encode(tok, text, spans) for tok in tokenizers_ab]
    al = align(encs[0].offsets, encs[1].offsets, encs[0].special_mask, encs[1].special_mask)
    assert len(al) > 30
    for tok, enc, idx in zip(tokenizers_ab, encs, (al.idx_a, al.idx_b)):
        rendering, raw, ranges = _raw(tok, text, spans)
        assert np.array_equal(raw.input_ids, enc.input_ids)
        inside = np.zeros(len(raw.input_ids), bool)
        for lo, hi in ranges:
            inside |= (
                (raw.offsets[:, 0] >= lo)
                & (raw.offsets[:, 1] <= hi)
                & (raw.offsets[:, 1] > raw.offsets[:, 0])
            )
        inside &= ~raw.special_mask
        assert inside[idx].all(), "an aligned token lies outside message content"
        assert not (enc.template_mask | enc.boundary_mask)[idx].any()
        # Every token outside content is masked, by exactly one reason.
        n_masked = int(enc.special_mask.sum())
        n_special = int((raw.special_mask | (raw.offsets[:, 1] == raw.offsets[:, 0])).sum())
        assert n_masked == (~inside).sum() == n_special + enc.template_mask.sum() + enc.boundary_mask.sum()
        assert enc.template_mask.sum() > 0 and enc.boundary_mask.sum() == 0


def test_content_characters_align_in_both_renderings(tokenizers_ab):
    """Each content token maps onto the same characters of the content text, and the aligned ends are
    those of the messages' contents aligned as plain text, one message at a time."""
    text, spans = content_text(CONVERSATION)
    encs = [encode(tok, text, spans) for tok in tokenizers_ab]
    for tok, enc in zip(tokenizers_ab, encs):
        rendering, raw, _ = _raw(tok, text, spans)
        content = ~enc.special_mask
        for (s, e), (rs, re_) in zip(enc.offsets[content], raw.offsets[content]):
            assert text[s:e] == rendering[rs:re_]
    al = align(encs[0].offsets, encs[1].offsets, encs[0].special_mask, encs[1].special_mask)
    expected = []
    for m in spans:
        piece = text[m.start : m.end]
        ta, tb = (tokenize(tok, piece) for tok in tokenizers_ab)
        expected += (
            align(ta.offsets, tb.offsets, ta.special_mask, tb.special_mask).end_char + m.start
        ).tolist()
    assert al.end_char.tolist() == expected


def test_long_conversation_is_chunked_to_fit_both_contexts(tokenizers_ab):
    rng = np.random.default_rng(0)
    words = "the model said that a court in Atlanta voted for 1961 reforms, and café owners agreed.".split()
    msgs = [
        {
            "role": ("user", "assistant")[i % 2],
            "content": " ".join(rng.choice(words, size=rng.integers(5, 60))),
        }
        for i in range(14)
    ]
    text, spans = content_text(msgs)
    ctx = 96
    chunks = split_conversation(text, spans, *tokenizers_ab, ctx, ctx)
    assert len(chunks) >= 3
    covered = np.zeros(len(text), bool)
    for s, e in chunks:
        covered[s:e] = True
        sub = chunk_messages(spans, s, e)
        assert sub and all(text[s:e][m.start : m.end] for m in sub)
        for tok in tokenizers_ab:
            assert len(encode(tok, text[s:e], sub).input_ids) <= ctx
    assert all(text[i].isspace() for i in np.flatnonzero(~covered))  # only whitespace is left out
    # A message cut across chunks keeps its role and turn in each.
    turns = [m.turn for s, e in chunks for m in chunk_messages(spans, s, e)]
    assert sorted(set(turns)) == list(range(14))


def test_chat_corpus_specs_and_errors(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text(json.dumps({"messages": CONVERSATION}) + "\n\n" + json.dumps({"prompt": "Hi?"}) + "\n")
    docs = list(open_corpus(f"chat:{good},{good}"))
    assert len(docs) == 4 and docs[1].messages[0].role == "user" and docs[1].text == "Hi?"
    assert docs[0].text.split("\n\n")[1] == "user"
    assert len(list(open_corpus("chat-default"))) >= 200
    bad = tmp_path / "bad.jsonl"
    for line, message in [
        ('{"messages": []}', "no non-empty messages list"),
        ('{"messages": [{"role": "user"}]}', None),
        ('{"messages": [{"content": "x"}]}', "message 0 is not"),
        ("not json", "not valid JSON"),
    ]:
        bad.write_text(line + "\n")
        if message is None:  # a missing content is an empty message: the conversation is empty
            with pytest.raises(CrossdiffError, match="no non-empty documents"):
                open_corpus(f"chat:{bad}")
            continue
        with pytest.raises(CrossdiffError, match=message):
            open_corpus(f"chat:{bad}")


def test_conversation_harvest_masks_templates_and_splits_long_conversations(tmp_path, one_thread):
    """A real harvest of three conversations, one longer than the context: rows only at content
    characters, in the model's own rendering; masked template tokens counted by reason."""
    from crossdiff.harvest.harvest import HarvestConfig, harvest
    from crossdiff.inputs.chat import Message, encode_chunk

    words = "the court said voters in Atlanta and the café owners agreed on 1961 reforms.".split()
    rng = np.random.default_rng(1)
    long = [
        {"role": ("user", "assistant")[i % 2], "content": " ".join(rng.choice(words, size=40))}
        for i in range(6)
    ]
    path = tmp_path / "c.jsonl"
    path.write_text(
        "".join(json.dumps({"messages": m}) + "\n" for m in (CONVERSATION, long, CONVERSATION[1:3]))
    )
    try:
        store = harvest(
            HarvestConfig(
                out=str(tmp_path / "s"), corpus=f"chat:{path}", context_len=96, batch_size=4, device="cpu"
            )
        )
    except CrossdiffError as e:
        pytest.skip(f"default models not installed ({e})")
    masked = store.meta["masked"]
    assert masked["template_a"] > 0 and masked["template_b"] > 0
    assert masked["boundary_a"] == masked["boundary_b"] == 0
    assert masked["special_a"] > 0 and masked["special_b"] > 0  # <|im_start|> ... ; Gemma's BOS
    texts = store.texts(0)
    assert max(t["index_in_doc"] for t in texts.values() if t["doc"] == 1) >= 2  # the long one, split
    rows = store.rows(np.arange(store.n_tokens))
    tokenizers = {k: store.root / "tokenizers" / k for k in "ab"}
    from transformers import AutoTokenizer

    toks = {k: AutoTokenizer.from_pretrained(p) for k, p in tokenizers.items()}
    for chunk_id, t in texts.items():
        sel = rows["chunk"] == chunk_id
        spans = [Message(*m) for m in t["messages"]]
        for s, e in zip(rows["char_start"][sel], rows["char_end"][sel]):
            assert any(m.start <= s and e <= m.end for m in spans)  # never a separator or template
        for k in "ab":
            ids = encode_chunk(toks[k], t["text"], t["messages"]).input_ids
            assert np.array_equal(ids[rows[f"pos_{k}"][sel]], rows[f"tok_{k}"][sel])


def test_hf_dataset_with_a_messages_field_is_read_as_conversations(tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    rows = [
        {"messages": CONVERSATION[1:3]},
        {"messages": [{"role": "user", "content": " "}]},
        {"messages": CONVERSATION},
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = list(open_corpus(f"hf:{tmp_path / 'ds'}:::messages"))
    assert [d.id for d in docs] == [0, 1]  # the empty conversation is skipped, as an empty document
    assert (
        docs[0].text == content_text(CONVERSATION[1:3])[0]
        and docs[1].messages == content_text(CONVERSATION)[1]
    )


def test_example_in_a_conversation_shows_its_role_and_turn(tokenizers_ab):
    """evidence renders a conversation row as a turn: its role and turn, text from its message only,
    and each model's tokens in its own rendering (template tokens included)."""
    from crossdiff.analysis.evidence import _render_row

    text, spans = content_text(CONVERSATION)
    chunk = {"chunk": 0, "doc": 0, "source": "c.jsonl:1", "text": text, "messages": [list(m) for m in spans]}
    m = spans[2]  # the assistant's message
    s = m.start + len("Assistant: sure")
    encs = [encode(tok, text, spans) for tok in tokenizers_ab]
    pos = [int(np.flatnonzero(e.offsets[:, 1] == s + 1)[0]) for e in encs]  # the token ending at "."
    row = {"chunk": 0, "doc": 0, "pos_a": pos[0], "pos_b": pos[1], "char_start": s, "char_end": s + 1}
    out = _render_row(row, {0: chunk}, dict(zip("ab", tokenizers_ab)), {}, context_chars=200, window=12)
    assert (out["role"], out["turn"]) == ("assistant", 2)
    assert out["text_before"] == "Assistant: sure" and out["text_token"] == "."
    assert out["text_after"] == text[s + 1 : m.end]
    window_a = "".join(t["text"] for t in out["tokens_a"])
    assert "<|im_start|>assistant\nAssistant: sure." in window_a
    assert "".join(t["text"] for t in out["tokens_b"] if t["highlight"]) == "."


def test_report_shows_a_conversation_example_as_a_turn():
    from crossdiff.report.report import example_html

    ex = {
        "value": 1.5,
        "role": "assistant",
        "turn": 2,
        "text_before": "Sure",
        "text_token": ".",
        "text_after": "",
    }
    html = example_html(ex, None)
    assert (
        "<b>assistant</b> turn 2" in html and '<span class="who">Assistant:</span> Sure<mark>.</mark>' in html
    )
    assert "turn" not in example_html({"value": 1.5, "text_before": "Sure", "text_token": "."}, None)
