"""Corpora, a byte-level BPE tokenizer, cached token streams and resumable random batches.

Train-short/test-long experiments (Press, Smith and Lewis, "Train Short, Test Long", ICLR 2022,
arXiv 2108.12409) need long contiguous documents and splits that never leak, so every choice here
is deterministic and content-addressed:

* A ``Corpus`` has three fixed splits, ``train``, ``valid`` and ``test``, and a ``name`` that ends
  in a fingerprint of its contents, so caches keyed by it go stale when the text changes.
* Files are assigned to splits by a keyed hash of their content (blake2b, never Python's
  per-process randomised ``hash``): about 98% / 1% / 1% by file, so a file never straddles two
  splits, adding a file never moves another one, and the same text can never be in two splits,
  however many paths reach it (symbolic or hard links, copies, a glob matching it twice). Of
  byte-identical files only the first path (in sorted order) is kept; the repeats are counted.
* Split rules are versioned (``SPLIT_RULES``): new corpora use ``CONTENT_RULE`` above, and a run
  records the rule it was split by; runs of the releases that split by a keyed hash of each
  file's relative path (``PATH_RULE``), which record no corpus, are evaluated and resumed on that
  split, rebuilt exactly (``load_corpus(spec, split_rule=PATH_RULE)``, see ``_path_rule_corpus``).
* A token stream is the split's documents in order, each followed by ``<|endoftext|>``.
* ``get_batch`` is a pure function of ``(seed, step, rank, world_size)``: resuming at ``step``
  replays the same batches, and ``world_size`` ranks together see the one-process global batch.

Corpus specs (``load_corpus``):

* ``stdlib``: every ``.py`` file of the running interpreter's standard library, outside
  ``site-packages``/``dist-packages`` (installed packages, not the stdlib) and ``__pycache__``.
  The ``test`` packages are kept: they are about 60% of the bytes (31 MB in all for CPython 3.11),
  and without them the ~1% held-out splits shrink to about 10k tokens each, too few to evaluate
  at several times the training length.
* ``text:PATH``: a folder (recursive) or a glob (``**`` recursive; ``..`` only before the first
  wildcard) are split by file like ``stdlib``; hidden files and folders are skipped. Symbolic
  links to files are read; links to folders are not followed (a link loop cannot hang the walk,
  and a folder linked twice is not read twice). A single file is cut into three contiguous
  documents at the first line break after 98% and 99% of its characters (the convention of
  enwik8 and text8), so the held-out text is the file's own continuation.
* Too few files for a by-file split (valid or test would get less than half of its expected 1% of
  the characters, e.g. a folder of 40 books): every document is cut as a single file is, its
  first 98% to train, the next 1% to valid, the last 1% to test, if that holds out more text than
  the by-file split. No text is in two splits either way; ``Corpus.split_by`` and ``describe()``
  say which split was used.
* ``hf:NAME[:CONFIG]``: a Hugging Face ``datasets`` dataset with its own train, validation and
  test splits and a ``text`` column; each row is a document, except WikiText, whose rows are lines
  and are regrouped into articles at their `` = Title = `` headings.

Files are read as strict UTF-8; empty files, files with a NUL byte and files that do not decode are
skipped and counted in ``Corpus.describe()``. So are paths that are not regular files once links
are resolved (named pipes, sockets, devices, links to folders, broken links and link loops): reading
a named pipe would block forever, so they are never opened, and a warning names a few.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import tokenizers
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from linbias.fileio import atomic_write

__all__ = [
    "CONTENT_RULE",
    "EOT",
    "PATH_RULE",
    "SPLITS",
    "SPLIT_RULES",
    "Corpus",
    "default_cache_dir",
    "get_batch",
    "load_corpus",
    "load_tokenizer",
    "save_tokenizer",
    "split_of",
    "stdlib_files",
    "token_byte_lengths",
    "token_stream",
    "train_tokenizer",
]

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")
SplitBy = Literal["file", "document", "source"]
EOT = "<|endoftext|>"

# The split rules linbias has shipped, oldest first. A rule's name enters every corpus name and
# cache key made under it, so a new rule (a new name) never reuses another's splits or caches.
# A run records the rule it was split by (``split_rule`` in its config.json); one written before
# that which records its corpus name was split by CONTENT_RULE, one that records none by PATH_RULE.
PATH_RULE = "blake2b-path-mod100:v1"
CONTENT_RULE = "blake2b-content-mod100:v2"
SPLIT_RULES = (PATH_RULE, CONTENT_RULE)
_TOKENIZER_FORMAT = "bytelevel-bpe-split32:v2"
_STREAM_FORMAT = "eot-after-each-doc:v1"
_PACKAGE_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_HF_SPLITS: dict[Split, tuple[str, ...]] = {
    "train": ("train",),
    "valid": ("validation", "valid", "dev"),
    "test": ("test",),
}
_SPECS = "'stdlib', 'text:PATH' (a file, folder or glob) or 'hf:NAME[:CONFIG]'"


def _digest(*parts: str | bytes, size: int = 8) -> str:
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguous concatenation
        h.update(data)
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "corpus"


class Corpus:
    """Documents in three fixed splits, named by their source and a content fingerprint.

    Args:
        name: a filesystem-safe identifier that changes when the contents change.
        load: returns the documents of one split (called at most once per split).
        skipped: files left out because they were empty, binary or not UTF-8.
        duplicates: files left out because an earlier path held the same bytes.
        not_regular: paths left out because they are not regular files once links are resolved.
        split_by: how the splits were made: ``"file"`` (whole documents by content hash),
            ``"document"`` (each document cut 98/1/1% in order) or ``"source"`` (the dataset's own
            splits).
        root: the folder whose files it reads (``None`` for one file or a dataset).
        spec: the ``load_corpus`` spec it was loaded from (``None``: built directly).
        split_rule: the rule its splits were made by (one of ``SPLIT_RULES``).
    """

    def __init__(
        self, name: str, load: Callable[[Split], list[str]], skipped: int = 0, *,
        duplicates: int = 0, not_regular: int = 0, split_by: SplitBy = "file",
        root: Path | None = None, spec: str | None = None, split_rule: str = CONTENT_RULE,
    ) -> None:
        self.name = name
        self.root = root
        self.spec = spec
        self.split_rule = split_rule
        self.split_by = split_by
        self.skipped = skipped
        self.duplicates = duplicates
        self.not_regular = not_regular
        self._load = load
        self._docs: dict[Split, list[str]] = {}

    def __repr__(self) -> str:
        return f"Corpus({self.name!r})"

    def documents(self, split: str) -> list[str]:
        """The split's documents, in a fixed order.

        Raises:
            ValueError: for a split other than ``train``, ``valid``, ``test``, or an empty split.
        """
        docs = self._split(split)
        if not docs:
            raise ValueError(
                f"split {split!r} of corpus {self.name!r} is empty: its documents are too short to "
                "hold out 1% of each (split inside documents); give more text"
            )
        return docs

    def with_split_rule(self, rule: str) -> Corpus:
        """The same source split by ``rule`` (itself if already so split); read again.

        Raises:
            ValueError: an unknown rule, or a corpus not loaded from a spec.
        """
        if rule == self.split_rule:
            return self
        if self.spec is None:
            raise ValueError(f"corpus {self.name!r} was not loaded from a spec, so it cannot be "
                             f"split again by {rule!r}; load it with load_corpus(spec, "
                             "split_rule=...)")
        return load_corpus(self.spec, split_rule=rule)

    def check_outside(self, path: str | Path, flag: str = "--out") -> None:
        """Refuse an output folder inside the folder this corpus reads: what is written there
        would become documents, and the corpus (and its held-out split) would change.

        Raises:
            ValueError: naming both folders.
        """
        if self.root is None:
            return
        root, target = Path(os.path.realpath(self.root)), Path(os.path.realpath(path))
        if target == root or root in target.parents:
            raise ValueError(f"{flag} {path} is inside the corpus folder {self.root}: what linbias "
                             f"writes there would become part of the corpus; choose a {flag} "
                             "outside it")

    def describe(self) -> dict[str, Any]:
        """Documents and UTF-8 bytes per split, how they were split, and what was left out.

        Returns:
            ``{split: {"documents", "bytes"}}``, ``"split_by"`` (see the class), ``"split_rule"``
            and ``"skipped"``:
            ``files`` (empty, binary or not UTF-8), ``duplicates`` (byte-identical to a kept
            file) and ``not_regular`` (named pipes, sockets, devices, links to folders, broken
            links).
        """
        out: dict[str, Any] = {s: _stats(self._split(s)) for s in SPLITS}
        out["split_by"] = self.split_by
        out["split_rule"] = self.split_rule
        out["skipped"] = {"files": self.skipped, "duplicates": self.duplicates,
                          "not_regular": self.not_regular}
        return out

    def _split(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        split = cast(Split, split)
        if split not in self._docs:
            self._docs[split] = self._load(split)
        return self._docs[split]


def _stats(docs: list[str]) -> dict[str, int]:
    return {"documents": len(docs), "bytes": sum(len(d.encode()) for d in docs)}


def split_of(key: str, rule: str = CONTENT_RULE) -> Split:
    """The split of a document, from a stable hash of ``key`` keyed by the rule's name.

    Under ``CONTENT_RULE`` the key is the document's text: hashing the content, not the path, is
    what keeps one text out of two splits whatever paths reach it. Under ``PATH_RULE`` it is the
    file's ``/``-separated path relative to the corpus root. Buckets 0 and 1 of 100 are ``valid``
    and ``test``; the other 98 are ``train``.
    """
    bucket = int(_digest(rule, key), 16) % 100
    return "valid" if bucket == 0 else "test" if bucket == 1 else "train"


def load_corpus(spec: str = "stdlib", *, split_rule: str = CONTENT_RULE) -> Corpus:
    """Load a corpus from a spec: ``stdlib``, ``text:PATH`` or ``hf:NAME[:CONFIG]``.

    Args:
        spec: see the module docstring for what each form selects and how it is split.
        split_rule: how files are assigned to splits (``SPLIT_RULES``); ``PATH_RULE`` only to
            rebuild the split of a run that records no corpus (``linbias.runs.check_corpus``).

    Returns:
        The corpus; file sources are read now, Hugging Face splits when first asked for.

    Raises:
        ValueError: a spec that is not a string, an unknown spec or split rule, or a source
            with no usable documents.
    """
    if not isinstance(spec, str):
        raise ValueError(f"corpus spec must be a string, got {spec!r} ({type(spec).__name__}); "
                         f"valid forms: {_SPECS}")
    if split_rule not in SPLIT_RULES:
        raise ValueError(f"unknown split rule {split_rule!r}; valid rules: "
                         f"{', '.join(SPLIT_RULES)}")
    kind, _, arg = spec.partition(":")
    if spec == "stdlib":
        corpus = _stdlib_corpus(split_rule)
    elif kind == "text" and arg:
        corpus = _text_corpus(arg, split_rule)
    elif kind == "hf" and arg:
        name, _, config = arg.partition(":")
        corpus = _hf_corpus(name, config or None, split_rule)
    else:
        raise ValueError(f"unknown corpus spec {spec!r}; valid forms: {_SPECS}")
    corpus.spec = spec
    return corpus


# --- file sources --------------------------------------------------------------------------------


def _walk(root: Path, keep: Callable[[tuple[str, ...], bool], bool]) -> list[Path]:
    """Paths under ``root`` that ``keep(relative parts, is_folder)`` accepts, sorted by relative
    path; hidden names are skipped. Links to folders are listed as paths, never descended into,
    so a link loop cannot make the walk endless (``glob``'s ``**`` follows them, exponentially)."""
    found = []
    for top, dirs, files in os.walk(root):
        base = Path(top).relative_to(root).parts
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and keep((*base, d), True))
        links = [d for d in dirs if Path(top, d).is_symlink()]
        dirs[:] = [d for d in dirs if d not in links]
        found += [Path(top, f) for f in (*files, *links)
                  if not f.startswith(".") and keep((*base, f), False)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files(root: Path | None = None) -> tuple[Path, list[Path]]:
    """The stdlib root and its ``.py`` files in sorted order, without installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root

    def keep(parts: tuple[str, ...], folder: bool) -> bool:
        return parts[-1] not in _PACKAGE_DIRS if folder else parts[-1].endswith(".py")

    return root, _walk(root, keep)


class _NotRegular(Exception):
    """A path that is not a regular file once links are resolved."""


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file; ``_NotRegular`` for anything else, which is never read.

    ``stat`` first (no side effects), then a non-blocking open checked again with ``fstat``, so a
    named pipe swapped in between cannot block either.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _NotRegular
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError) as e:  # a broken link
        raise _NotRegular from e
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise _NotRegular from e  # a link loop; a socket
        raise ValueError(f"cannot read {path} ({e}); fix its permissions or move it out of the "
                         "corpus") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _NotRegular
        return f.read()


def _decode(data: bytes) -> str | None:
    if not data or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_text(path: Path) -> str | None:
    """The file as strict UTF-8, or ``None`` if it is empty, binary or does not decode."""
    return _decode(_read_regular(path))


@dataclass
class _Tally:
    """What ``_files_corpus`` keeps and leaves out, path by path."""

    documents: list[str] = field(default_factory=list)
    splits: dict[Split, list[str]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    seen: set[str] = field(default_factory=set)  # content digests of the kept documents
    unusable: int = 0
    duplicates: int = 0
    not_regular: list[str] = field(default_factory=list)


def _readable(root: Path, paths: list[Path], tally: _Tally) -> Iterator[tuple[str, str]]:
    """``(relative path, text)`` of each usable file, in order; what is not usable is tallied.
    Special files are never opened (``_read_regular``), whatever the split rule."""
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            text = _read_text(path)
        except _NotRegular:
            tally.not_regular.append(rel)
            continue
        if text is None:
            tally.unusable += 1
            continue
        yield rel, text


def _check_tally(label: str, root: Path, tally: _Tally) -> None:
    """Warn about the paths that are not regular files; refuse a source without documents."""
    if tally.not_regular:
        _warn_not_regular(label, tally.not_regular)
    if not tally.documents:
        raise ValueError(
            f"corpus {label!r} has no documents ({tally.unusable} empty, binary or non-UTF-8 "
            f"files, {len(tally.not_regular)} paths that are not regular files in {root})"
        )


def _files_corpus(label: str, root: Path, paths: list[Path]) -> Corpus:
    """Files split by ``CONTENT_RULE``: one document per distinct text."""
    tally = _Tally()
    fingerprint = hashlib.blake2b(CONTENT_RULE.encode(), digest_size=8)
    for rel, text in _readable(root, paths, tally):
        digest = _digest(text)
        if digest in tally.seen:  # a link, a copy or a second match: same text, same document
            tally.duplicates += 1
            continue
        tally.seen.add(digest)
        tally.documents.append(text)
        tally.splits[split_of(text)].append(text)
        fingerprint.update(_digest(rel, digest).encode())
    _check_tally(label, root, tally)
    splits, split_by = tally.splits, "file"
    if _held_out(splits) < _MIN_HELD_OUT * sum(len(d) for d in tally.documents):
        cut = _cut_documents(tally.documents)
        if _held_out(cut) > _held_out(splits):
            splits, split_by = cut, "document"
            fingerprint.update(b"cut-inside-documents")
    return Corpus(f"{_slug(label)}-{fingerprint.hexdigest()}", splits.__getitem__, tally.unusable,
                  duplicates=tally.duplicates, not_regular=len(tally.not_regular),
                  split_by=split_by, root=root)


def _path_rule_corpus(label: str, root: Path, paths: list[Path]) -> Corpus:
    """Files split by ``PATH_RULE``, exactly as the releases that used it did, for their runs.

    Every usable path is a document, in the order given, byte-identical copies included (those
    releases kept them: a copy may sit in another split than its original, which is why the rule
    was replaced); the split is the hash of the relative path; no document is ever cut; the name
    is theirs (its fingerprint covers each path and text in order), so the token caches they
    wrote are reused. Only the reading is today's: special files are skipped, never opened.
    """
    tally = _Tally()
    fingerprint = hashlib.blake2b(PATH_RULE.encode(), digest_size=8)
    for rel, text in _readable(root, paths, tally):
        tally.documents.append(text)
        tally.splits[split_of(rel, PATH_RULE)].append(text)
        fingerprint.update(_digest(rel, text).encode())
    _check_tally(label, root, tally)
    return Corpus(f"{_slug(label)}-{fingerprint.hexdigest()}", tally.splits.__getitem__,
                  tally.unusable, not_regular=len(tally.not_regular), root=root,
                  split_rule=PATH_RULE)


# How a folder's files are split, per rule.
_FILE_SPLITS: dict[str, Callable[[str, Path, list[Path]], Corpus]] = {
    PATH_RULE: _path_rule_corpus, CONTENT_RULE: _files_corpus,
}


# A by-file split is kept when valid and test each get at least this share of the characters
# (half of the 1% expected). Otherwise documents are cut inside, if that holds out more text.
_MIN_HELD_OUT = 0.005


def _held_out(splits: dict[Split, list[str]]) -> int:
    """Characters in the smaller of the two held-out splits."""
    return min(sum(len(d) for d in splits[s]) for s in ("valid", "test"))


def _cut_documents(docs: list[str]) -> dict[Split, list[str]]:
    """Each document cut as a single file is: its first 98% to train, then 1% valid, 1% test."""
    splits: dict[Split, list[str]] = {s: [] for s in SPLITS}
    for text in docs:
        a = _cut(text, 0.98)
        b = max(a, _cut(text, 0.99))
        for split, piece in (("train", text[:a]), ("valid", text[a:b]), ("test", text[b:])):
            if piece:
                splits[split].append(piece)
    return splits


def _warn_not_regular(label: str, rels: list[str], shown: int = 5) -> None:
    more = f" and {len(rels) - shown} more" if len(rels) > shown else ""
    warnings.warn(
        f"corpus {label!r}: skipped {len(rels)} path(s) that are not regular files (named pipes, "
        f"sockets, devices, links to folders, broken links): {', '.join(rels[:shown])}{more}",
        stacklevel=6,  # the caller of load_corpus
    )


def _stdlib_corpus(rule: str) -> Corpus:
    root, paths = stdlib_files()
    label = f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}"
    return _FILE_SPLITS[rule](label, root, paths)


def _magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def _glob_root(pattern: Path) -> Path:
    """The pattern's leading folders without wildcards: relative paths are taken from there."""
    fixed = []
    for part in pattern.parts:
        if _magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _match(parts: tuple[str, ...], pattern: tuple[str, ...], prefix: bool = False) -> bool:
    """``parts`` match the glob ``pattern`` (``**`` is zero or more folders), or with ``prefix``
    could still be the leading folders of a match."""
    if not pattern:
        return not parts
    if not parts:
        return prefix or all(p == "**" for p in pattern)
    if pattern[0] == "**":
        return _match(parts, pattern[1:], prefix) or _match(parts[1:], pattern, prefix)
    return fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:], prefix)


def _match_count(parts: tuple[str, ...], pattern: tuple[str, ...]) -> int:
    """The number of ways ``parts`` match ``pattern``: Python's ``glob``, which the releases of
    ``PATH_RULE`` used, lists a file once per way (``a/**/**/*.txt`` lists ``a/b/c.txt`` thrice)."""
    if not pattern:
        return int(not parts)
    if pattern[0] == "**":
        return _match_count(parts, pattern[1:]) + (_match_count(parts[1:], pattern) if parts else 0)
    if not parts or not fnmatchcase(parts[0], pattern[0]):
        return 0
    return _match_count(parts[1:], pattern[1:])


def _as_python_glob(root: Path, pattern: tuple[str, ...], paths: list[Path]) -> list[Path]:
    """``paths`` as those releases' ``sorted(glob(...))`` listed them: ordered by path parts (not
    by the ``/``-joined text: ``a/b`` before ``a.txt``), each repeated once per match."""
    parts = {p: p.relative_to(root).parts for p in paths}
    return [p for p in sorted(paths, key=parts.__getitem__)
            for _ in range(_match_count(parts[p], pattern))]


def _glob_files(root: Path, pattern: tuple[str, ...]) -> list[Path]:
    """Paths under ``root`` matching ``pattern`` (its parts below ``root``), each listed once."""

    def keep(parts: tuple[str, ...], folder: bool) -> bool:
        return _match(parts, pattern, prefix=True) if folder else _match(parts, pattern)

    return _walk(root, keep) if root.is_dir() else []


def _text_corpus(arg: str, rule: str) -> Corpus:
    path = Path(arg).expanduser()
    if path.is_file():
        return _single_file_corpus(f"text-{path.stem}", path, rule)
    if path.is_dir():
        label = f"text-{path.resolve().name}"
        return _FILE_SPLITS[rule](label, path, _walk(path, lambda *_: True))
    if path.exists():
        raise ValueError(f"text corpus {arg!r} is not a regular file or a folder (a named pipe, "
                         "socket or device?); give a file, a folder or a glob")
    if _magic(arg):
        root = _glob_root(path)
        pattern = path.parts[len(root.parts):]
        if ".." in pattern:  # the walk below root never climbs back up
            raise ValueError(f"text corpus {arg!r}: '..' after a wildcard is not supported; "
                             "put it before the first wildcard")
        paths = _glob_files(root, pattern)
        if rule == PATH_RULE:
            paths = _as_python_glob(root, pattern, paths)
        if paths:
            return _FILE_SPLITS[rule](f"text-{root.resolve().name}", root, paths)
    raise ValueError(f"text corpus {arg!r}: no such file or folder, and no file matches the glob")


def _cut(text: str, fraction: float) -> int:
    """The first line break at or after ``fraction`` of the text (or exactly there if none)."""
    target = int(len(text) * fraction)
    newline = text.find("\n", target)
    return target if newline < 0 else newline + 1


def _single_file_corpus(label: str, path: Path, rule: str) -> Corpus:
    """One file cut 98/1/1% (every rule cuts it alike; the rule is in the name)."""
    text = _read_text(path)
    if not text:
        raise ValueError(f"text corpus {str(path)!r} is empty, binary or not UTF-8")
    name = f"{_slug(label)}-{_digest(rule, 'single-file', text)}"
    return Corpus(name, _cut_documents([text]).__getitem__, split_by="document", split_rule=rule)


# --- Hugging Face datasets -----------------------------------------------------------------------


def _hf_corpus(name: str, config: str | None, rule: str) -> Corpus:
    """The dataset's own splits (every rule keeps them; the rule is in the name)."""
    try:
        import datasets  # optional dependency
    except ImportError as e:
        raise ImportError(
            f"corpus 'hf:{name}' needs the Hugging Face datasets package: pip install 'linbias[hf]'"
        ) from e
    try:
        dataset = datasets.load_dataset(name, config)
    except Exception as e:  # noqa: BLE001 - offline, unknown name and bad config all end here
        raise RuntimeError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}): {e}. It must be "
            "in the local datasets cache (HF_DATASETS_OFFLINE=1 uses only the cache) or online."
        ) from e
    columns = {s: _hf_split_name(dataset, s, name) for s in SPLITS}
    fingerprint = _digest(rule, *(dataset[c]._fingerprint for c in columns.values()))
    regroup = _wikitext_articles if name.split("/")[-1].startswith("wikitext") else list

    def load(split: Split) -> list[str]:
        rows = dataset[columns[split]]
        if "text" not in rows.column_names:
            raise ValueError(f"dataset {name!r} has no 'text' column; it has {rows.column_names}")
        return [d for d in regroup(rows["text"]) if d]

    return Corpus(_slug(f"hf-{name}-{config or 'default'}-{fingerprint}"), load, split_by="source",
                  split_rule=rule)


def _hf_split_name(dataset: object, split: Split, name: str) -> str:
    available = list(dataset.keys())  # type: ignore[attr-defined]
    for candidate in _HF_SPLITS[split]:
        if candidate in available:
            return candidate
    raise ValueError(f"dataset {name!r} has no {split} split (it has {available})")


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")


def _wikitext_articles(lines: Iterable[str]) -> list[str]:
    """Join WikiText's one-line rows into articles, each starting at a `` = Title = `` line.

    Blank lines are empty rows in the Hugging Face copy; they are put back as ``"\\n"``.
    """
    articles: list[list[str]] = []
    for line in lines:
        if not articles or _WIKITEXT_TITLE.match(line):
            articles.append([])
        articles[-1].append(line or "\n")
    return [text for text in map("".join, articles) if text.strip()]


# --- tokenizer -----------------------------------------------------------------------------------


def train_tokenizer(
    corpus: Corpus, vocab_size: int = 4096, *, cache_dir: Path | None = None
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on the corpus's train split.

    Every byte is in the initial alphabet, so any text round-trips; ``<|endoftext|>`` is token 0.
    Pre-tokens are GPT-2's, with runs cut at ``_MAX_RUN`` characters (see ``_PRE_TOKEN``).

    Args:
        corpus: the corpus; only its train split is read.
        vocab_size: total vocabulary, special token and the 256 bytes included.
        cache_dir: if given, the tokenizer is loaded from / saved to a file keyed by the corpus
            name, vocab size, pre-tokenizer and ``tokenizers`` version. A cached file that does not
            load (truncated, say) is rebuilt with a warning.

    Returns:
        The trained tokenizer; the same corpus and vocab size give the same tokenizer.
    """
    key = _digest(corpus.name, str(vocab_size), tokenizers.__version__, _TOKENIZER_FORMAT)
    path = None
    if cache_dir is not None:
        path = _cache_folder(cache_dir) / f"tokenizer-{corpus.name}-{vocab_size}-{key}.json"
    if path is not None and path.exists():
        try:
            return load_tokenizer(path)
        except ValueError as e:
            warnings.warn(f"rebuilding a cached tokenizer that does not load: {e}", stacklevel=2)
    tokenizer = _new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = corpus.documents("train")
    tokenizer.train_from_iterator(docs, trainer, length=len(docs))
    if path is not None:
        with _cache_write(path):
            save_tokenizer(tokenizer, path)
    return tokenizer


@contextmanager
def _cache_write(path: Path) -> Iterator[None]:
    """A write into the cache whose failure (a full disk) names the cache and the fix."""
    try:
        yield
    except OSError as exc:
        raise OSError(f"cannot write {path} into the token cache ({exc.strerror or exc}):"
                      " free space there, or point LINBIAS_CACHE at a folder with room") from exc


# GPT-2's pre-tokenizer regex (the one ByteLevel(use_regex=True) applies) with every run bounded
# to _MAX_RUN characters. BPE training costs grow with the square of a pre-token's length, so text
# without spaces (CJK, minified code, base64) made one pre-token of a whole document: 6 s for 150k
# characters, 24 s for 300k. Bounded runs make it linear; ordinary words and indents are far
# shorter, so they split as before.
_MAX_RUN = 32
_PRE_TOKEN = (
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?\p{{L}}{{1,{_MAX_RUN}}}| ?\p{{N}}{{1,{_MAX_RUN}}}"
    rf"| ?[^\s\p{{L}}\p{{N}}]{{1,{_MAX_RUN}}}|\s{{1,{_MAX_RUN}}}(?!\S)|\s{{1,{_MAX_RUN}}}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_TOKEN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> characters
    ])


def _new_byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """Write the tokenizer's JSON to ``path`` atomically."""
    atomic_write(Path(path), lambda f: f.write(tokenizer.to_str().encode()))


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer written by ``save_tokenizer`` (or any ``tokenizer.json``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable tokenizer (truncated, corrupt, another JSON file,
            a folder); the message names it.
    """
    path = Path(path)
    try:
        return Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for bad JSON
        raise ValueError(
            f"{path} is not a readable tokenizer file ({type(e).__name__}: {e}); it may be "
            "truncated or another file: restore it from a copy, or delete it if it is a cache "
            "entry (it is rebuilt)"
        ) from e


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (what ByteLevel uses)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)}
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    byte_of_char, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            byte_of_char[chr(byte)] = byte
        else:  # control and space bytes map to unused code points from 256 up
            byte_of_char[chr(256 + shifted)], shifted = byte, shifted + 1
    return byte_of_char


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id decodes to, for bits-per-byte.

    Special tokens count 0 bytes: ``<|endoftext|>`` marks a document boundary that we insert, not
    text of the corpus, so summing over a token stream gives exactly the corpus's UTF-8 bytes.

    Returns:
        int64 array of shape ``[vocab_size]``.
    """
    table = _byte_of_char()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        if token not in special:
            lengths[i] = len(bytes(table[c] for c in token))  # KeyError: not a byte-level token
    return lengths


# --- token streams -------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$LINBIAS_CACHE`` if set, else ``~/.cache/linbias``.

    Raises:
        ValueError: ``$LINBIAS_CACHE`` names something that is not a folder.
    """
    env = os.environ.get("LINBIAS_CACHE")
    if env:
        return _cache_folder(Path(env).expanduser(), "LINBIAS_CACHE")
    return Path.home() / ".cache" / "linbias"


def _cache_folder(path: str | Path, what: str = "the cache folder") -> Path:
    """``path``, checked to be a folder or absent (it is created on first write)."""
    path = Path(path)
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(
                    f"{what} {str(path)!r} cannot be a cache folder: {ancestor} is a file; "
                    "point it at a folder (or unset LINBIAS_CACHE for ~/.cache/linbias)"
                )
            break
    return path


def _chunks(docs: list[str], max_chars: int = 1 << 22) -> Iterator[list[str]]:
    """Batches of about ``max_chars`` characters, to bound the memory of ``Encoding`` objects."""
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_documents(
    tokenizer: Tokenizer, docs: list[str], dtype: type[np.integer], eot: str = EOT
) -> np.ndarray:
    """Token ids of the documents, each followed by the id of ``eot``."""
    encoder = Tokenizer.from_str(tokenizer.to_str())  # a copy: the flag below is not serialised
    encoder.encode_special_tokens = True  # a literal separator in a document is just text
    eot_id = np.array([tokenizer.token_to_id(eot)], dtype=dtype)
    pieces = []
    for batch in _chunks(docs):
        for encoding in encoder.encode_batch_fast(batch, add_special_tokens=False):
            pieces += [np.asarray(encoding.ids, dtype=dtype), eot_id]
    return np.concatenate(pieces)


def token_stream(
    corpus: Corpus, tokenizer: Tokenizer, split: str, cache_dir: Path, *, eot: str = EOT
) -> np.ndarray:
    """The split as one token stream, each document followed by ``eot``; cached on disk.

    Args:
        corpus: the corpus.
        tokenizer: a tokenizer with an ``eot`` token.
        split: ``train``, ``valid`` or ``test``.
        cache_dir: where the ``.npy`` is kept, keyed by corpus name, tokenizer JSON, split and
            (when not the default) ``eot``.
        eot: the document separator; another model's own end-of-text token (e.g. ``"</s>"``)
            when evaluating it with its tokenizer.

    Returns:
        A read-only memory-mapped 1-D array, uint16 if the vocabulary fits, else uint32.
    """
    if tokenizer.token_to_id(eot) is None:
        raise ValueError(f"the tokenizer has no {eot!r} token")
    # The default separator adds nothing to the key, so streams cached before it existed stay valid.
    extra = () if eot == EOT else (eot,)
    key = _digest(_STREAM_FORMAT, corpus.name, tokenizer.to_str(), split, *extra)
    path = _cache_folder(cache_dir) / f"tokens-{corpus.name}-{split}-{key}.npy"
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    if path.exists():
        stream = _load_stream(path, dtype)
        if stream is not None:
            return stream
        warnings.warn(f"rebuilding the cached token stream {path}: it does not load as a 1-D "
                      f"{np.dtype(dtype).name} array", stacklevel=2)
    ids = _encode_documents(tokenizer, corpus.documents(split), dtype, eot)
    with _cache_write(path):
        atomic_write(path, lambda f: np.save(f, ids, allow_pickle=False))
    return np.load(path, mmap_mode="r")


def _load_stream(path: Path, dtype: type[np.integer]) -> np.ndarray | None:
    """The cached stream, or ``None`` if the file is not a whole 1-D array of ``dtype``."""
    try:
        stream = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError):  # truncated header or data, not an .npy at all
        return None
    return stream if stream.ndim == 1 and stream.dtype == dtype else None


# --- batches -------------------------------------------------------------------------------------


def get_batch(
    stream: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    seed: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the stream, a pure function of ``(seed, step, rank, world_size)``.

    The generator seeded by ``(seed, step)`` draws the start of every window of the global batch
    (``batch_size * world_size`` rows); rank ``r`` takes rows ``r*batch_size`` to
    ``(r+1)*batch_size``. So a run resumed at ``step`` sees the batches it would have seen, and
    ``world_size`` ranks together see exactly the one-process batch of ``batch_size * world_size``.

    Args:
        stream: 1-D token ids (e.g. from ``token_stream``).
        batch_size: rows per rank (B).
        seq_len: tokens per row (T).
        seed, step: the run's seed and the optimiser step (both >= 0).
        rank, world_size: this process and the number of processes.

    Returns:
        ``(x, y)``, int64 tensors of shape ``[B, T]``; ``y`` is ``x`` shifted left by one token.
    """
    if batch_size < 1 or seq_len < 1 or seed < 0 or step < 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size, seq_len >= 1, seed, step >= 0 and 0 <= rank < world_size; got "
            f"{batch_size=}, {seq_len=}, {seed=}, {step=}, {rank=}, {world_size=}"
        )
    if len(stream) < seq_len + 1:
        raise ValueError(
            f"the stream has {len(stream)} tokens; seq_len={seq_len} needs at least {seq_len + 1}"
        )
    rng = np.random.default_rng([seed, step])
    starts_G = rng.integers(0, len(stream) - seq_len, size=batch_size * world_size)
    starts_B = starts_G[rank * batch_size : (rank + 1) * batch_size]
    windows_BT1 = np.asarray(stream[starts_B[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    xy = torch.from_numpy(windows_BT1)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
