"""Tests for linbias.data: corpus specs and splits, tokenizer, cached streams, batches."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from linbias import data
from linbias.data import (
    EOT,
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
    counts = Counter(split_of(f"pkg{i % 50}/module_{i}.py") for i in range(20_000))
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


def test_folder_corpus_splits_by_relative_path(corpus: data.Corpus, folder: Path) -> None:
    for split in SPLITS:
        expected = sorted(
            (p.relative_to(folder).as_posix(), p.read_bytes().decode())
            for p in folder.glob("d*/*.txt")
            if split_of(p.relative_to(folder).as_posix()) == split
        )
        docs = [d for d in corpus.documents(split) if d != "# a markdown file\n"]
        assert expected and docs == [text for _, text in expected]
    info = corpus.describe()
    assert info["skipped"] == {"files": 3}  # binary, latin-1 and empty; .hidden not even listed
    assert sum(info[s]["documents"] for s in SPLITS) == N_FILES + 1  # + notes.md


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
    empty = [s for s in SPLITS if s != split_of("x.txt")]
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
