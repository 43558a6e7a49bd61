"""linbias.fileio: a reader sees the old file or the whole new one, never a torn one."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from linbias.fileio import atomic_write, atomic_write_text, sha256_file, write_json


def _torn_write(f) -> None:
    f.write(b"half of the new")
    raise KeyboardInterrupt  # a kill in the middle of writing


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    atomic_write(path, lambda f: f.write(b"old"))
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, _torn_write)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_atomic_write_creates_folders_and_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "text.txt"
    atomic_write_text(path, "γάμμα " * 1000)
    atomic_write_text(path, "short")
    assert path.read_text(encoding="utf-8") == "short"


def test_write_json_is_strict_and_sorted(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    write_json(path, {"b": 1, "a": [1.5, None]})
    assert path.read_text() == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json(path, {"lr": math.nan})
    assert json.loads(path.read_text()) == {"a": [1.5, None], "b": 1}  # the old file stays


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * (3 * 4096 + 7)  # a little over 3 MiB: several 1 MiB chunks
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
