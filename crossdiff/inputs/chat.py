"""Conversations: each model reads them through its own chat template; only message content aligns.

A conversation is stored as its *content text*: the message contents, each stripped of surrounding
whitespace, joined by a blank line, with one `Message(role, turn, start, end)` span per message.
Character offsets into the content text are the "content coordinates" both models share.

For one model, the messages are rendered with the tokenizer's chat template (the same string
`apply_chat_template(tokenize=False)` gives), the rendering is tokenised with offsets, and every token
is mapped back to content coordinates:
- a token lying inside one message's content gets its offsets shifted to the content text, so
  align.align pairs the two models' tokens that end on the same content character, exactly as for
  plain text (docs/data.md);
- every other token is masked (special_mask) and counted by reason: `special` (the tokenizer's special
  tokens: BOS, <|im_start|> ...), `template` (role names, turn separators, a default system prompt),
  `boundary` (a token that spans template text and content; none with the default pair's renderings).
A model without a chat template gets PLAIN_TEMPLATE ("User:\\nHello\\n\\nAssistant:\\nHi"), tokenised
with its usual special tokens (Gemma: BOS); a model's own template writes its own, so its rendering
is tokenised without adding any (the convention of transformers' chat templating docs).

Message contents are located in the rendering by rendering once more with a unique placeholder per
message and checking that substituting the contents back gives the real rendering: a template that
alters content (other than trimming, which stripped contents make a no-op) is refused, not guessed.

Letters in names: N tokens, K messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..core.errors import CrossdiffError
from .align import TextSide, Tokens, tokenize

SEPARATOR = "\n\n"
"""Between two messages' contents in the content text: paragraph-like, so chunking prefers to cut there."""

ROLES = ("system", "user", "assistant")

PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}"
    "{{ message['role'] | capitalize }}{{ ':\\n' }}{{ message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}{{ 'Assistant:\\n' }}{% endif -%}"
)
"""The rendering of a model without a chat template. A newline (not a space) after the role name, so
that the first content token never merges with template text in either default tokenizer."""

PLAIN_STOPS = ("\nUser:", "\nAssistant:", "\nSystem:")
"""Where a model on the plain rendering has started writing another turn itself (crossdiff generate cuts
its answer at the first)."""

_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters: never in a template


class ChatTokens(NamedTuple):
    """align.Tokens of a conversation chunk, with why each masked token is masked."""

    input_ids: np.ndarray
    """(N,) int64 token ids of the model's rendering."""
    offsets: np.ndarray
    """(N, 2) int64 character [start, end) in the content text; (0, 0) outside message content."""
    special_mask: np.ndarray
    """(N,) bool: never aligned: special tokens and every token outside message content."""
    template_mask: np.ndarray
    """(N,) bool: chat-template text (role names, separators, a default system prompt)."""
    boundary_mask: np.ndarray
    """(N,) bool: tokens spanning template text and message content."""


class Message(NamedTuple):
    role: str
    turn: int
    """Position of the message in its conversation (0-based), kept when a chunk holds only some."""
    start: int
    """Character span [start, end) of its content in the content text."""
    end: int


def content_text(messages: list[dict]) -> tuple[str, tuple[Message, ...]]:
    """(content text, spans) of a validated list of {role, content} messages."""
    parts, spans, pos = [], [], 0
    for turn, m in enumerate(messages):
        content = m["content"].strip()
        if turn:
            pos += len(SEPARATOR)
        spans.append(Message(m["role"], turn, pos, pos + len(content)))
        parts.append(content)
        pos += len(content)
    return SEPARATOR.join(parts), tuple(spans)


def chunk_messages(spans: tuple[Message, ...], start: int, end: int) -> tuple[Message, ...]:
    """The spans of the messages inside content characters [start, end), relative to `start`; a message
    cut by the chunk keeps its role and turn."""
    out = []
    for m in spans:
        if (m.start < end and m.end > start) or (m.start == m.end and start <= m.start < end):
            out.append(Message(m.role, m.turn, max(m.start, start) - start, min(m.end, end) - start))
    return tuple(out)


def chat_template(tok) -> tuple[str, bool]:
    """(template, whether it is the tokenizer's own) for a model."""
    own = getattr(tok, "chat_template", None)
    return (own, True) if isinstance(own, str) and own else (PLAIN_TEMPLATE, False)


@dataclass(frozen=True)
class Rendering:
    text: str
    """What the model reads."""
    starts: tuple[int, ...]
    """Where each message's content starts in `text`."""
    own_template: bool


def render(tok, roles: list[str], contents: list[str], add_generation_prompt: bool = False) -> Rendering:
    """The model's rendering of a conversation, with where each message's content lies in it."""
    template, own = chat_template(tok)

    def apply(texts: list[str]) -> str:
        msgs = [{"role": r, "content": c} for r, c in zip(roles, texts)]
        try:
            return tok.apply_chat_template(
                msgs, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja2's TemplateError, or a template's raise_exception()
            raise CrossdiffError(
                f"the chat template of {tok.name_or_path} refused a conversation with roles {roles}: {e}"
            ) from None

    pieces = _MARK.split(apply([f"\ue000{k}\ue001" for k in range(len(roles))]))
    order = [int(k) for k in pieces[1::2]]
    if order != list(range(len(roles))):
        raise CrossdiffError(
            f"the chat template of {tok.name_or_path} does not write each message's content once, in order"
        )
    text, starts = pieces[0], []
    for k, literal in zip(order, pieces[2::2]):
        starts.append(len(text))
        text += contents[k] + literal
    if apply(contents) != text:
        raise CrossdiffError(
            f"the chat template of {tok.name_or_path} changes message content, so it cannot be located "
            "in the rendering; pass a model whose template copies content verbatim"
        )
    return Rendering(text, tuple(starts), own)


def conversation_messages(text: str, spans: tuple[Message, ...]) -> tuple[list[str], list[str]]:
    """(roles, contents) to render for a chunk. A chunk that starts inside a conversation gets an empty
    user turn first when its first message is not the user's or the system's, since some templates
    require turns to alternate from the user's; both models get the same messages."""
    roles, contents = [m.role for m in spans], [text[m.start : m.end] for m in spans]
    if roles and roles[0] not in ("user", "system"):
        roles, contents = ["user", *roles], ["", *contents]
    return roles, contents


def encode(tok, text: str, spans: tuple[Message, ...]) -> ChatTokens:
    """A conversation chunk as the model reads it, its offsets in content coordinates (module docstring)."""
    roles, contents = conversation_messages(text, spans)
    r = render(tok, roles, contents)
    enc = tokenize(tok, r.text, add_special_tokens=not r.own_template)
    lead = len(roles) - len(spans)  # the empty turn put first, if any
    ren_start_K = np.asarray(r.starts[lead:], dtype=np.int64)
    ren_end_K = ren_start_K + np.asarray([m.end - m.start for m in spans], dtype=np.int64)
    content_start_K = np.asarray([m.start for m in spans], dtype=np.int64)
    return map_tokens(enc, ren_start_K, ren_end_K, content_start_K)


def map_tokens(enc: Tokens, ren_start_K, ren_end_K, content_start_K) -> ChatTokens:
    """Rendering offsets -> content offsets; tokens outside every message's content are masked (K >= 1)."""
    s_N, e_N = enc.offsets[:, 0], enc.offsets[:, 1]
    text_N = (e_N > s_N) & ~enc.special_mask
    k_N = np.maximum(np.searchsorted(ren_start_K, s_N, side="right") - 1, 0)  # last message starting <= s
    inside_N = text_N & (s_N >= ren_start_K[k_N]) & (e_N <= ren_end_K[k_N])
    # A token overlapping a content range without lying inside it straddles template and content.
    k2_N = np.searchsorted(ren_start_K, e_N, side="left") - 1  # last message starting before e
    overlaps_N = (k2_N >= 0) & (s_N < ren_end_K[np.maximum(k2_N, 0)])
    boundary_N = text_N & ~inside_N & overlaps_N
    template_N = text_N & ~inside_N & ~boundary_N
    shift_N = content_start_K[k_N] - ren_start_K[k_N]
    new_N2 = np.where(inside_N[:, None], enc.offsets + shift_N[:, None], 0)
    return ChatTokens(enc.input_ids, new_N2, enc.special_mask | ~inside_N, template_N, boundary_N)


class ChatSide(TextSide):
    """One model's view of a whole conversation for align.split_sides: content tokens' ends in content
    coordinates; a candidate chunk is checked by rendering it as its own conversation."""

    def __init__(self, tok, text: str, spans: tuple[Message, ...], max_len: int):
        self.tok, self.max_len, self.text, self.spans = tok, max_len, text, spans
        enc = encode(tok, text, spans)
        content_N = ~enc.special_mask
        self.ends_N = np.sort(enc.offsets[content_N, 1])
        self.whole_fits = len(enc.input_ids) <= max_len
        # Template tokens grow with the number of turns in a chunk; start from the whole conversation's
        # (at most half the context) and let the check shrink a chunk that still overflows.
        self.overhead = min(int((~content_N).sum()), max_len // 2)
        self.budget = max_len - self.overhead

    def overflow(self, start: int, end: int) -> int:
        spans = chunk_messages(self.spans, start, end)
        return len(encode(self.tok, self.text[start:end], spans).input_ids) - self.max_len


def split_conversation(text: str, spans, tok_a, tok_b, max_len_a: int, max_len_b: int):
    """Content spans of a conversation such that each, rendered as its own conversation by each model,
    fits that model's context (align.split_document's rules, cut points in content coordinates)."""
    from .align import split_sides

    return split_sides(
        text, (ChatSide(tok_a, text, spans, max_len_a), ChatSide(tok_b, text, spans, max_len_b))
    )


def encode_chunk(tok, text: str, messages) -> Tokens | ChatTokens:
    """A chunk as the harvest fed it to the model: plain text, or a conversation chunk."""
    if messages is None:
        return tokenize(tok, text)
    return encode(tok, text, tuple(Message(*m) for m in messages))
