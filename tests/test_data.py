"""Tests for linbias.data: corpus specs and splits, tokenizer, cached streams, batches."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from linbias import data
from linbias.data import (
    CONTENT_RULE,
    EOT,
    PATH_RULE,
    SPLIT_RULES,
    SPLITS,
    default_cache_dir,
    get_batch,
    load_corpus,
    load_tokenizer,
    save_tokenizer,
    split_of,
    stdlib_files,
    token_byte_lengths,
    token_stream,
    train_tokenizer,
)

N_FILES = 400  # enough that ~1% valid and ~1% test are not empty
WORDS = ["alpha", "beta", "γάμμα", "дельта", "ε", "日本語", "🙂", "tab\tx", "crlf\r\n", "x = 1\n"]


def _doc(i: int) -> str:
    return f"doc {i}: " + " ".join(WORDS[(i * j) % len(WORDS)] for j in range(1, 2 + i % 13)) + "\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(N_FILES):
        path = root / f"d{i % 7}" / f"doc{i}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(_doc(i), encoding="utf-8")
    (root / "notes.md").write_text("# a markdown file\n", encoding="utf-8")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("hidden\n")
    return root


@pytest.fixture(scope="module")
def corpus(folder: Path) -> data.Corpus:
    return load_corpus(f"text:{folder}")


@pytest.fixture(scope="module")
def tokenizer(corpus: data.Corpus):
    return train_tokenizer(corpus, vocab_size=320)


def _forbidden(*args: object) -> None:
    raise RuntimeError("called")


# --- splits and sources --------------------------------------------------------------------------


def test_split_of_proportions() -> None:
    counts = Counter(split_of(f"def f{i}():\n    return {i % 50}\n") for i in range(20_000))
    assert abs(counts["train"] / 20_000 - 0.98) < 0.005
    assert abs(counts["valid"] / 20_000 - 0.01) < 0.003
    assert abs(counts["test"] / 20_000 - 0.01) < 0.003


def test_split_of_is_stable_across_processes() -> None:
    paths = [f"a/{i}.py" for i in range(300)]
    code = f"from linbias.data import split_of; print([split_of(p) for p in {paths!r}])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # this process has another (random) seed
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout == repr([split_of(p) for p in paths]) + "\n"


def test_stdlib_files_selection(tmp_path: Path) -> None:
    for rel in ["os.py", "a/b.py", "test/test_x.py", "a/readme.txt", "site-packages/pkg.py",
                "dist-packages/pkg.py", "a/__pycache__/b.py", ".git/x.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    root, paths = stdlib_files(tmp_path)
    assert [p.relative_to(root).as_posix() for p in paths] == ["a/b.py", "os.py", "test/test_x.py"]


def test_stdlib_files_real() -> None:
    root, paths = stdlib_files()
    rels = [p.relative_to(root).as_posix() for p in paths]
    assert "os.py" in rels and "json/decoder.py" in rels
    assert rels == sorted(rels)
    assert not any("site-packages" in r or r.endswith(".pyc") for r in rels)


def test_folder_corpus_splits_by_content(corpus: data.Corpus, folder: Path) -> None:
    for split in SPLITS:
        expected = sorted(
            (p.relative_to(folder).as_posix(), p.read_bytes().decode())
            for p in folder.glob("d*/*.txt")
            if split_of(p.read_bytes().decode()) == split
        )
        docs = [d for d in corpus.documents(split) if d != "# a markdown file\n"]
        assert expected and docs == [text for _, text in expected]  # in path order
    info = corpus.describe()
    # binary, latin-1 and empty; .hidden not even listed
    assert info["skipped"] == {"files": 3, "duplicates": 0, "not_regular": 0}
    assert sum(info[s]["documents"] for s in SPLITS) == N_FILES + 1  # + notes.md


def _blake2b_64(*parts: str) -> str:
    """blake2b-64 of the parts, each prefixed by its length (8 bytes, little-endian)."""
    h = hashlib.blake2b(digest_size=8)
    for part in map(str.encode, parts):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def _path_bucket(rule: str, rel: str) -> str:
    """The path rule written out: the hash of the rule name and the path, mod 100."""
    return {0: "valid", 1: "test"}.get(int(_blake2b_64(rule, rel), 16) % 100, "train")


def test_both_split_rules_are_selectable(tmp_path: Path) -> None:
    texts = {f"d{i % 3}/f{i:03d}.txt": f"text {i}\n" * (1 + i % 5) for i in range(300)}
    texts["copy.txt"] = texts["d0/f000.txt"]  # byte-identical to another path
    for rel, text in texts.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert SPLIT_RULES == (PATH_RULE, CONTENT_RULE)  # oldest first; new corpora use the last
    by_content = load_corpus(f"text:{tmp_path}")
    by_path = load_corpus(f"text:{tmp_path}", split_rule=PATH_RULE)
    assert by_content.split_rule == CONTENT_RULE and by_path.describe()["split_rule"] == PATH_RULE
    assert by_content.name != by_path.name
    assert by_content.with_split_rule(PATH_RULE).name == by_path.name
    for split in SPLITS:  # every path a document, copies too, in path order, split by its path
        assert by_path.documents(split) == [
            texts[rel] for rel in sorted(texts) if _path_bucket(PATH_RULE, rel) == split]
        assert split_of("d0/f000.txt", PATH_RULE) == _path_bucket(PATH_RULE, "d0/f000.txt")
    assert by_content.duplicates == 1 and by_path.duplicates == 0
    one = f"text:{tmp_path / 'd1' / 'f001.txt'}"
    old, new = (load_corpus(one, split_rule=rule) for rule in SPLIT_RULES)
    assert {**old.describe(), "split_rule": CONTENT_RULE} == new.describe()  # one file: cut alike
    assert old.name == "text-f001-" + _blake2b_64(PATH_RULE, "single-file", texts["d1/f001.txt"])
    with pytest.raises(ValueError, match="unknown split rule 'v3'; valid rules: blake2b-path"):
        load_corpus(f"text:{tmp_path}", split_rule="v3")
    with pytest.raises(ValueError, match="not loaded from a spec"):
        data.Corpus("by-hand", lambda split: ["x"]).with_split_rule(PATH_RULE)


def test_the_path_rule_rebuilds_the_corpora_of_its_release(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names that release gave the fixture's corpus (each a fingerprint of every path and text
    in order): a folder (sorted by the joined path), a glob (sorted by path parts, so
    ``part0/sec0/...`` before ``part0/sec0.txt``) and a glob matching files several times."""
    fixture = Path(__file__).parent / "fixtures" / "path_split_run"
    monkeypatch.chdir(fixture)
    corpora = json.loads((fixture / "expected.json").read_text())["corpora"]
    assert len({c["name"] for c in corpora.values()}) == 3
    for spec, want in corpora.items():
        c = load_corpus(spec, split_rule=PATH_RULE)
        assert c.name == want["name"], spec
        assert {s: len(c._split(s)) for s in SPLITS} == want["documents"], spec


def test_glob_matches_folder(corpus: data.Corpus, folder: Path) -> None:
    globbed = load_corpus(f"text:{folder}/**/*.txt")
    for split in SPLITS:
        expected = [d for d in corpus.documents(split) if d.startswith("doc")]
        assert globbed.documents(split) == expected
    assert globbed.name != corpus.name


def test_single_file_is_cut_into_contiguous_splits(tmp_path: Path) -> None:
    text = "".join(_doc(i) for i in range(1000))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    c = load_corpus(f"text:{tmp_path / 'book.txt'}")
    train, valid, test = (c.documents(s) for s in SPLITS)
    assert len(train) == len(valid) == len(test) == 1
    assert train[0] + valid[0] + test[0] == text
    assert train[0].endswith("\n") and valid[0].endswith("\n")
    assert 0.975 < len(train[0]) / len(text) < 0.985


def _books(root: Path, n: int = 40, lines: int = 400, grow: int = 17) -> list[str]:
    """``n`` files of unique numbered lines, ``grow`` more lines in each."""
    root.mkdir(parents=True, exist_ok=True)
    books = []
    for b in range(n):
        text = "".join(f"book {b} line {i}: {' '.join(WORDS[: 1 + (b + i) % 9])}\n"
                       for i in range(lines + grow * b))
        (root / f"book{b:02d}.txt").write_text(text, encoding="utf-8")
        books.append(text)
    return books


def test_few_large_files_are_split_inside_each_document(tmp_path: Path) -> None:
    books = _books(tmp_path / "books")
    c = load_corpus(f"text:{tmp_path / 'books'}")
    assert c.split_by == "document" and c.describe()["split_by"] == "document"
    train, valid, test = (c.documents(s) for s in SPLITS)
    assert len(train) == len(valid) == len(test) == len(books)  # every split non-empty, per book
    for book, a, b, t in zip(books, train, valid, test):  # contiguous pieces, in order
        assert a + b + t == book and a.endswith("\n") and b.endswith("\n")
        assert 0.975 < len(a) / len(book) < 0.985
    lines = {s: {m for doc in c.documents(s) for m in re.findall(r"book \d+ line \d+:", doc)}
             for s in SPLITS}
    assert not lines["train"] & lines["valid"] and not lines["train"] & lines["test"]
    assert not lines["valid"] & lines["test"]  # no text in two splits
    # the same split in another process (no per-process hashing), and a name of its own
    code = ("from linbias.data import load_corpus; c = load_corpus(" + repr(f"text:{tmp_path / 'books'}")
            + "); print(c.name, [len(d) for s in ('train', 'valid', 'test') for d in c.documents(s)])")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout == f"{c.name} {[len(d) for s in SPLITS for d in c.documents(s)]}\n"


def test_by_file_split_is_kept_when_the_held_out_splits_are_large_enough(
    tmp_path: Path, corpus: data.Corpus
) -> None:
    assert corpus.split_by == "file"  # 400 small files
    books = _books(tmp_path / "books", n=1000, lines=5, grow=0)  # many files: whole documents
    c = load_corpus(f"text:{tmp_path / 'books'}")
    assert c.split_by == "file"
    assert sorted(d for s in SPLITS for d in c.documents(s)) == sorted(books)
    # one file more that tips valid under half its expected 1% of the text: cut inside instead
    (tmp_path / "books" / "huge.txt").write_text("".join(f"huge {i}\n" for i in range(40_000)))
    c = load_corpus(f"text:{tmp_path / 'books'}")
    assert c.split_by == "document" and all(c.documents(s) for s in SPLITS)
    assert load_corpus(f"text:{tmp_path / 'books'}").name == c.name


def test_name_tracks_contents(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\nthree\n")
    first = load_corpus(f"text:{tmp_path / 'a.txt'}").name
    assert load_corpus(f"text:{tmp_path / 'a.txt'}").name == first
    (tmp_path / "a.txt").write_text("one\ntwo\nfour\n")
    assert load_corpus(f"text:{tmp_path / 'a.txt'}").name != first
    assert first.startswith("text-a-")


@pytest.mark.parametrize("spec", ["", "nope", "text:", "hf:", "stdlib:x", "file:/tmp"])
def test_unknown_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="valid forms: 'stdlib', 'text:PATH'.*'hf:NAME"):
        load_corpus(spec)


def test_unknown_split(corpus: data.Corpus) -> None:
    with pytest.raises(ValueError, match="split 'validation'; valid splits: train, valid, test"):
        corpus.documents("validation")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(f"text:{tmp_path / 'nothing'}")
    with pytest.raises(ValueError, match="no file matches"):
        load_corpus(f"text:{tmp_path}/*.txt")


def test_empty_corpus_and_empty_split(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    with pytest.raises(ValueError, match="no documents"):
        load_corpus(f"text:{tmp_path / 'empty'}")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.txt").write_text("a lonely file\n")
    c = load_corpus(f"text:{tmp_path / 'one'}")
    empty = [s for s in SPLITS if s != split_of("a lonely file\n")]
    with pytest.raises(ValueError, match=f"split '{empty[0]}' .* is empty"):
        c.documents(empty[0])


# --- Hugging Face (a fake datasets module: no network) -------------------------------------------


class _FakeSplit:
    def __init__(self, rows: list[str], fingerprint: str) -> None:
        self.rows, self._fingerprint, self.column_names = rows, fingerprint, ["text"]

    def __getitem__(self, column: str) -> list[str]:
        return self.rows


def _fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    return module


def test_hf_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install 'linbias\[hf\]'"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1")


def test_hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name, config):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(offline))
    with pytest.raises(RuntimeError, match="could not load Hugging Face dataset 'wikitext'.*cache"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1")


def test_hf_splits_and_wikitext_articles(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = ["", " = A = \n", "", " text \n", " = = Sub = = \n", " more \n", " = B = \n", " b \n"]
    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        return {s: _FakeSplit(rows, f"fp-{s}") for s in ("train", "validation", "test")}

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    c = load_corpus("hf:Salesforce/wikitext:wikitext-2-raw-v1")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]
    assert c.documents("valid") == [" = A = \n\n text \n = = Sub = = \n more \n", " = B = \n b \n"]
    assert "/" not in c.name and c.name.startswith("hf-Salesforce_wikitext-wikitext-2-raw-v1-")
    other = load_corpus("hf:some/corpus")
    assert other.documents("train") == [r for r in rows if r]  # rows are documents elsewhere
    old = load_corpus("hf:Salesforce/wikitext:wikitext-2-raw-v1", split_rule=PATH_RULE)
    assert all(old.documents(s) == c.documents(s) for s in SPLITS)  # the dataset's own splits
    assert old.name == "hf-Salesforce_wikitext-wikitext-2-raw-v1-" + _blake2b_64(
        PATH_RULE, "fp-train", "fp-validation", "fp-test")  # the name that release gave it


# --- tokenizer, streams, byte lengths ------------------------------------------------------------


def test_tokenizer_round_trip_and_determinism(corpus: data.Corpus, tokenizer, tmp_path) -> None:
    assert tokenizer.get_vocab_size() == 320 and tokenizer.token_to_id(EOT) == 0
    for doc in corpus.documents("test") + ["unseen: ünïcödé ∑ 𝔘 \x00\x7f\r\n", "  leading spaces"]:
        assert tokenizer.decode(tokenizer.encode(doc).ids) == doc
    assert train_tokenizer(corpus, vocab_size=320).to_str() == tokenizer.to_str()
    save_tokenizer(tokenizer, tmp_path / "tok.json")
    assert load_tokenizer(tmp_path / "tok.json").to_str() == tokenizer.to_str()


def test_train_tokenizer_cache(corpus: data.Corpus, tokenizer, tmp_path: Path, monkeypatch) -> None:
    first = train_tokenizer(corpus, vocab_size=320, cache_dir=tmp_path)
    monkeypatch.setattr(data, "_new_byte_level_bpe", _forbidden)
    assert train_tokenizer(corpus, vocab_size=320, cache_dir=tmp_path).to_str() == first.to_str()
    assert first.to_str() == tokenizer.to_str()


def _segments(stream: np.ndarray, eot: int) -> list[np.ndarray]:
    cuts = np.flatnonzero(stream == eot)
    return np.split(np.asarray(stream), cuts + 1)[:-1]


def test_stream_has_eot_after_each_document(corpus: data.Corpus, tokenizer, tmp_path: Path) -> None:
    stream = token_stream(corpus, tokenizer, "train", tmp_path)
    docs = corpus.documents("train")
    assert stream.dtype == np.uint16 and stream.ndim == 1 and stream[-1] == 0
    segments = _segments(stream, 0)
    assert len(segments) == len(docs)
    assert [tokenizer.decode(s[:-1].tolist()) for s in segments] == docs


def test_stream_with_another_separator(corpus: data.Corpus, tokenizer, tmp_path: Path) -> None:
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.add_special_tokens(["</s>"])  # e.g. an HF model's own end-of-text token
    sep = tok.token_to_id("</s>")
    stream = token_stream(corpus, tok, "train", tmp_path, eot="</s>")
    assert stream[-1] == sep and not (stream == 0).any()
    segments = _segments(stream, sep)
    assert [tok.decode(s[:-1].tolist()) for s in segments] == corpus.documents("train")
    default = token_stream(corpus, tok, "train", tmp_path)  # another separator, another file
    assert default[-1] == 0 and len(list(tmp_path.glob("*.npy"))) == 2
    with pytest.raises(ValueError, match="no '<sep>' token"):
        token_stream(corpus, tok, "train", tmp_path, eot="<sep>")

def test_literal_eot_in_text_stays_text(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text(f"a\nb {EOT} c\n" * 50 + "tail\nend\n")
    c = load_corpus(f"text:{tmp_path / 'f.txt'}")
    tok = train_tokenizer(c, vocab_size=270)
    stream = token_stream(c, tok, "train", tmp_path / "cache")
    assert int((stream == 0).sum()) == 1  # only the boundary we appended
    assert tok.decode(stream[:-1].tolist()) == c.documents("train")[0]


def test_stream_cache_hit(corpus: data.Corpus, tokenizer, tmp_path: Path, monkeypatch) -> None:
    first = token_stream(corpus, tokenizer, "valid", tmp_path)
    monkeypatch.setattr(data, "_encode_documents", _forbidden)
    second = token_stream(corpus, tokenizer, "valid", tmp_path)
    assert isinstance(second, np.memmap) and np.array_equal(first, second)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npy"]  # no temporary files left behind
    with pytest.raises(RuntimeError, match="called"):  # another split is another key
        token_stream(corpus, tokenizer, "test", tmp_path)


def test_byte_lengths_sum_to_utf8_bytes(corpus: data.Corpus, tokenizer, tmp_path: Path) -> None:
    lengths = token_byte_lengths(tokenizer)
    assert lengths.dtype == np.int64 and lengths.shape == (320,) and lengths[0] == 0
    stream = token_stream(corpus, tokenizer, "train", tmp_path)
    docs = corpus.documents("train")
    for doc, segment in zip(docs, _segments(stream, 0), strict=True):
        assert lengths[segment].sum() == len(doc.encode("utf-8"))
    assert lengths[stream].sum() == sum(len(d.encode("utf-8")) for d in docs)
    # The 256 single-byte tokens decode to one byte each (ASCII ones can be checked by decoding).
    for b in range(32, 127):
        assert lengths[tokenizer.token_to_id(tokenizer.encode(chr(b)).tokens[0])] == 1


# --- batches -------------------------------------------------------------------------------------


def test_get_batch_windows_and_determinism() -> None:
    stream = np.arange(10_000, dtype=np.uint16)
    x, y = get_batch(stream, 4, 16, seed=1, step=7)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive ids: each row is a window, y is x shifted by one
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))
    again, _ = get_batch(stream, 4, 16, seed=1, step=7)
    assert torch.equal(x, again)
    assert not torch.equal(x, get_batch(stream, 4, 16, seed=1, step=8)[0])
    assert not torch.equal(x, get_batch(stream, 4, 16, seed=2, step=7)[0])


def test_get_batch_ranks_shard_the_global_batch() -> None:
    stream = np.random.default_rng(0).integers(0, 300, 5_000).astype(np.uint16)
    whole_x, whole_y = get_batch(stream, 8, 32, seed=3, step=11)
    shards = [get_batch(stream, 2, 32, seed=3, step=11, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(torch.cat([x for x, _ in shards]), whole_x)
    assert torch.equal(torch.cat([y for _, y in shards]), whole_y)


def test_get_batch_errors() -> None:
    stream = np.arange(16, dtype=np.uint16)
    get_batch(stream, 1, 15, seed=0, step=0)  # exactly seq_len + 1 tokens is enough
    with pytest.raises(ValueError, match="16 tokens; seq_len=16 needs at least 17"):
        get_batch(stream, 1, 16, seed=0, step=0)
    with pytest.raises(ValueError, match="rank"):
        get_batch(stream, 1, 4, seed=0, step=0, rank=2, world_size=2)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LINBIAS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LINBIAS_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "linbias"


# --- one text, one split: links, copies, globs ---------------------------------------------------


class _Expired(Exception):
    """Not a TimeoutError: that is an OSError, which glob swallows while it lists folders."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging (a named pipe opened for reading blocks until a writer comes; glob's
    ``**`` through two link loops lists paths without end)."""

    def expire(signum: int, frame: object) -> None:
        raise _Expired(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _all_documents(c: data.Corpus) -> dict[str, list[str]]:
    info = c.describe()
    return {s: c.documents(s) if info[s]["documents"] else [] for s in SPLITS}


def _assert_each_text_once(c: data.Corpus) -> list[str]:
    docs = [d for s, ds in _all_documents(c).items() for d in ds]
    assert len(docs) == len(set(docs)), "a text appears twice (in one split or in two)"
    return docs


@pytest.fixture
def tangled(tmp_path: Path) -> Path:
    """300 distinct files, each also reached by a copy, a hard link or a symbolic link (inside
    and outside the folder), plus links to folders and link loops."""
    root, outside = tmp_path / "c", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for i in range(300):
        (root / f"f{i:03d}.txt").write_text(_doc(i) + f"#{i}\n", encoding="utf-8")
    for i in range(0, 300, 3):  # every file has a second path of one kind or another
        (root / "sub" / f"copy{i}.txt").write_bytes((root / f"f{i:03d}.txt").read_bytes())
        os.link(root / f"f{i + 1:03d}.txt", root / "sub" / f"hard{i}.txt")
        (root / "sub" / f"soft{i}.txt").symlink_to(root / f"f{i + 2:03d}.txt")
    (outside / "o.txt").write_text("a document outside the folder\n")
    (root / "o_link.txt").symlink_to(outside / "o.txt")
    (root / "o_copy.txt").write_text("a document outside the folder\n")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # link loops to folders
    (root / "sub" / "self").symlink_to(root / "sub", target_is_directory=True)
    (root / "outside_dir").symlink_to(outside, target_is_directory=True)
    return root


@pytest.mark.parametrize("pattern", ["", "/**/*.txt", "/**/*", "/**/**/*.txt"])
def test_no_text_in_two_splits_whatever_the_paths(tangled: Path, pattern: str) -> None:
    with _deadline(20), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # links to folders are reported: tested below
        c = load_corpus(f"text:{tangled}{pattern}")
    docs = _assert_each_text_once(c)
    assert len(docs) == 301  # 300 files and the one outside, each once
    assert c.describe()["skipped"]["duplicates"] == 301  # 100 copies, hard links, symlinks; o_copy
    for split, texts in _all_documents(c).items():
        assert all(split_of(t) == split for t in texts)


def test_dot_dot_in_globs(tangled: Path) -> None:
    c = load_corpus(f"text:{tangled}/sub/../f0*.txt")  # before the first wildcard: a folder
    assert len(_assert_each_text_once(c)) == 100
    with pytest.raises(ValueError, match="'..' after a wildcard"):
        load_corpus(f"text:{tangled}/*/../f0*.txt")


def test_adding_a_file_moves_no_other(tmp_path: Path) -> None:
    for i in range(300):
        (tmp_path / f"{i}.txt").write_text(_doc(i) + f"{i}\n")
    before = _all_documents(load_corpus(f"text:{tmp_path}"))
    (tmp_path / "0_new.txt").write_text("a new document, sorted first\n")
    after = _all_documents(load_corpus(f"text:{tmp_path}"))
    for split in SPLITS:
        assert set(before[split]) <= set(after[split])


def test_copies_keep_the_first_path_and_are_counted(tmp_path: Path) -> None:
    for name, text in [("b.txt", "same\n"), ("a.txt", "same\n"), ("c.txt", "other\n")]:
        (tmp_path / name).write_text(text)
    c = load_corpus(f"text:{tmp_path}")
    assert sorted(_assert_each_text_once(c)) == ["other\n", "same\n"]
    assert c.describe()["skipped"] == {"files": 0, "duplicates": 1, "not_regular": 0}


def test_stdlib_corpus_split_about_98_1_1() -> None:
    c = load_corpus("stdlib")
    info = c.describe()
    n = sum(info[s]["documents"] for s in SPLITS)
    assert n > 500 and c.name.startswith("stdlib-py")
    for split in ("valid", "test"):
        assert 0.004 < info[split]["documents"] / n < 0.025
    assert not set(c.documents("valid")) & set(c.documents("test"))
    assert not set(c.documents("train")) & set(c.documents("valid") + c.documents("test"))


# --- special files -------------------------------------------------------------------------------


def _special_files(root: Path) -> None:
    os.mkfifo(root / "pipe.txt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.txt"))
    sock.close()  # the socket file stays
    (root / "pipe_link.txt").symlink_to(root / "pipe.txt")
    (root / "broken.txt").symlink_to(root / "nowhere")
    (root / "loop.txt").symlink_to(root / "loop.txt")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("pattern", ["", "/*.txt", "/**"])
def test_named_pipes_and_sockets_are_skipped_not_read(tmp_path: Path, pattern: str) -> None:
    for i in range(300):
        (tmp_path / f"doc{i}.txt").write_text(_doc(i) + f"{i}\n")
    _special_files(tmp_path)
    with _deadline(20), pytest.warns(UserWarning, match="5 path.*not regular.*broken.txt") as w:
        c = load_corpus(f"text:{tmp_path}{pattern}")
    assert "and 0 more" not in str(w[0].message)
    assert c.describe()["skipped"] == {"files": 0, "duplicates": 0, "not_regular": 5}
    assert len(_assert_each_text_once(c)) == 300


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_as_the_corpus_is_an_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with _deadline(20), pytest.raises(ValueError, match="not a regular file or a folder"):
        load_corpus(f"text:{tmp_path / 'pipe'}")


def test_a_folder_of_only_special_files_says_so(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.warns(UserWarning, match="link"), pytest.raises(ValueError, match="1 paths that"):
        load_corpus(f"text:{tmp_path}")


@pytest.mark.parametrize("spec", [3, None, b"stdlib", Path("stdlib"), ["stdlib"]])
def test_a_spec_of_the_wrong_type_is_rejected(spec: object) -> None:
    expected = f"corpus spec must be a string, got .*{type(spec).__name__}"
    with pytest.raises(ValueError, match=expected):
        load_corpus(spec)  # type: ignore[arg-type]


# --- tokenizer pre-tokens: bounded runs ----------------------------------------------------------


def _pre_tokens(text: str) -> list[tuple[str, tuple[int, int]]]:
    return data._new_byte_level_bpe().pre_tokenizer.pre_tokenize_str(text)


def test_ordinary_text_pre_tokenizes_as_gpt2() -> None:
    from tokenizers import pre_tokenizers

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False)  # the pre-tokenizer before bounding
    code = Path(data.__file__).read_text().replace("-" * 33, "-")  # rulers: long punctuation runs
    for text in [*(_doc(i) for i in range(50)), "  it's 3.14, isn't it?\n\n\tx  \n", code]:
        assert _pre_tokens(text) == gpt2.pre_tokenize_str(text)


@pytest.mark.parametrize("text", ["日本語" * 2000, "a" * 5000, "7" * 5000, "+/" * 3000,
                                  " " * 5000 + "x", "QUJD" * 2000],
                         ids=["cjk", "letters", "digits", "punctuation", "spaces", "base64"])
def test_pre_tokens_are_bounded(text: str) -> None:
    pieces = _pre_tokens(text)
    assert max(end - start for _, (start, end) in pieces) <= data._MAX_RUN + 1  # + a space
    assert "".join(piece for piece, _ in pieces) == "".join(p for p, _ in _pre_tokens(text))
    tok = train_tokenizer(data.Corpus("one", lambda split: [text]), vocab_size=300)
    assert tok.decode(tok.encode(text).ids) == text


def test_text_without_spaces_trains_in_linear_time() -> None:
    rng = np.random.default_rng(0)
    cjk = "".join(map(chr, 0x4E00 + rng.integers(0, 300, 120_000)))

    def seconds(n: int) -> float:
        corpus = data.Corpus(f"cjk{n}", lambda split: [cjk[:n]])
        best = math.inf
        for _ in range(3):  # the best of three: the machine is shared
            t0 = time.perf_counter()
            train_tokenizer(corpus, vocab_size=400)
            best = min(best, time.perf_counter() - t0)
        return best

    small, large = seconds(30_000), seconds(120_000)
    # 4x the text: about 4x the time now, 16x or more when it was quadratic (a minute here).
    assert large < 9.0 * small + 0.3, (small, large)
    assert large < 10.0


# --- corrupt caches and files --------------------------------------------------------------------


@pytest.mark.parametrize("content", [b'{"version": "1.0", "truncated', b"{}", b'{"model": 3}',
                                     b"\xff\xfe not utf-8", b""],
                         ids=["truncated", "empty-object", "not-a-tokenizer", "not-utf8", "empty"])
def test_a_corrupt_tokenizer_file_names_itself(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path} is not a readable tokenizer file"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match="not a readable tokenizer"):
        load_tokenizer(tmp_path)  # a folder
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")


def test_a_truncated_cached_tokenizer_is_rebuilt(corpus: data.Corpus, tokenizer, tmp_path) -> None:
    train_tokenizer(corpus, vocab_size=320, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("tokenizer-*.json")
    cached.write_bytes(cached.read_bytes()[:100])  # as a killed, non-atomic writer would leave it
    with pytest.warns(UserWarning, match="rebuilding a cached tokenizer"):
        again = train_tokenizer(corpus, vocab_size=320, cache_dir=tmp_path)
    assert again.to_str() == tokenizer.to_str()
    assert load_tokenizer(cached).to_str() == tokenizer.to_str()  # the entry itself is repaired
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary file left


def test_a_truncated_cached_stream_is_rebuilt(corpus: data.Corpus, tokenizer, tmp_path) -> None:
    first = np.array(token_stream(corpus, tokenizer, "valid", tmp_path))
    (cached,) = tmp_path.glob("*.npy")
    cached.write_bytes(cached.read_bytes()[:-7])
    with pytest.warns(UserWarning, match="rebuilding the cached token stream"):
        again = token_stream(corpus, tokenizer, "valid", tmp_path)
    assert np.array_equal(again, first)


def test_the_tokenizer_cache_key_names_the_pre_tokenizer(corpus: data.Corpus, tmp_path,
                                                         monkeypatch) -> None:
    train_tokenizer(corpus, vocab_size=300, cache_dir=tmp_path)
    monkeypatch.setattr(data, "_TOKENIZER_FORMAT", "another-pre-tokenizer")
    train_tokenizer(corpus, vocab_size=300, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokenizer-*.json"))) == 2


def test_a_cache_that_is_a_file_is_a_clear_error(corpus, tokenizer, tmp_path, monkeypatch) -> None:
    a_file = tmp_path / "cache"
    a_file.write_text("not a folder")
    monkeypatch.setenv("LINBIAS_CACHE", str(a_file))
    with pytest.raises(ValueError, match=f"LINBIAS_CACHE '{a_file}' cannot be a cache folder"):
        default_cache_dir()
    with pytest.raises(ValueError, match=f"{a_file} is a file"):
        token_stream(corpus, tokenizer, "valid", a_file / "below")
    with pytest.raises(ValueError, match="is a file"):
        train_tokenizer(corpus, vocab_size=300, cache_dir=a_file)
