"""linbias.fileio: a reader sees the old file or the whole new one, never a torn one."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from conftest import another_writer

from linbias.fileio import (
    atomic_write, atomic_write_text, replacing_folder, sha256_file, write_json,
)


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


# --- output files: only over what linbias wrote for the same purpose -----------------------------


def test_files_get_the_mode_open_gives_them(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.txt", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o644  # mkstemp alone: 0600
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600


def test_check_output_writes_only_over_its_own_kind(tmp_path: Path) -> None:
    from linbias.fileio import OutputError, check_output

    check_output(tmp_path / "new" / "deeper" / "eval.json", "p")  # nothing there: fine
    mine, other = tmp_path / "mine.json", tmp_path / "notes.json"
    write_json(mine, {"written_by": "p", "results": []})
    other.write_text('{"results": []}')
    check_output(mine, "p")
    with pytest.raises(OutputError, match="was not written by q: pass --force"):
        check_output(mine, "q")
    with pytest.raises(OutputError, match="notes.json exists and was not written by p"):
        check_output(other, "p")
    check_output(other, "p", force=True)
    check_output(other, "p", legacy=lambda path: path.name == "notes.json")
    (tmp_path / "link.json").symlink_to(mine)
    with pytest.raises(OutputError, match="is a link"):
        check_output(tmp_path / "link.json", "p", force=True)
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path, "p", force=True)


@pytest.mark.parametrize("marker, content", [
    ("config.json", {"format": "linbias-run/1"}), ("linbias_export.json", {"format": "x"}),
])
def test_no_output_goes_inside_a_run_or_an_export(tmp_path: Path, marker: str, content) -> None:
    from linbias.fileio import OutputError, check_output, owning_folder

    (tmp_path / "whole").mkdir()
    write_json(tmp_path / "whole" / marker, content)
    for path in (tmp_path / "whole" / marker, tmp_path / "whole" / "sub" / "eval.json"):
        assert owning_folder(path) == tmp_path / "whole"
        with pytest.raises(OutputError, match="inside .*whole, a linbias run or export"):
            check_output(path, "p", force=True)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text('{"format": "someone-else"}')
    assert owning_folder(tmp_path / "plain" / "eval.json") is None


def test_a_png_stamp_is_read_back(tmp_path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from linbias.fileio import stamp_of, write_png

    fig = Figure()
    FigureCanvasAgg(fig)
    write_png(tmp_path / "a.png", fig, "linbias eval --heatmap")
    assert stamp_of(tmp_path / "a.png") == "linbias eval --heatmap"
    fig.savefig(tmp_path / "b.png")  # someone else's plot
    assert stamp_of(tmp_path / "b.png") is None


# --- one writer per folder, with real processes --------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    import os

    from linbias.fileio import LOCK_NAME, Busy, locked_folder, writer_of

    folder = tmp_path / "run"
    with another_writer(folder) as proc:  # killed at the end, not exited: the kernel frees it
        assert writer_of(folder / LOCK_NAME) == proc.pid
        with pytest.raises(Busy, match=rf"being written by another linbias process \(pid {proc.pid}\)"):
            with locked_folder(folder, "the folder"):
                pass
    assert writer_of(folder / LOCK_NAME) is None
    with locked_folder(folder, "the folder"):  # the lock file a kill left is no obstacle
        assert writer_of(folder / LOCK_NAME) == os.getpid()
    assert list(folder.iterdir()) == []  # the lock file goes when the holder ends


def test_a_refused_writer_leaves_no_folder_it_created(tmp_path: Path) -> None:
    from linbias.fileio import locked_folder

    with pytest.raises(ValueError, match="refused"):
        with locked_folder(tmp_path / "new" , "the folder"):
            raise ValueError("refused")
    assert not (tmp_path / "new").exists()


# --- a folder replaced whole ------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_folder_build_that_fails_midway_leaves_the_old_folder_and_no_temporary(
        tmp_path: Path) -> None:
    out = tmp_path / "export"
    (out / "sub").mkdir(parents=True)
    (out / "config.json").write_text("old")
    (out / "sub" / "weights.bin").write_bytes(b"old weights")
    before = _tree(out)
    with pytest.raises(KeyboardInterrupt):
        with replacing_folder(out) as new:
            assert new.parent == tmp_path and new != out and list(new.iterdir()) == []
            (new / "config.json").write_text("half of the new")
            raise KeyboardInterrupt  # a kill in the middle of writing
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_an_interrupt_as_the_folder_is_made_leaves_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: Ctrl-C or SIGTERM landing between mkdtemp and the try left a .export.tmp-* folder
    # (seen once from `linbias export` under load). The interrupt now waits for the try.
    import os
    import signal
    import tempfile

    real = tempfile.mkdtemp

    def mkdtemp_then_interrupted(*args, **kwargs):
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # delivered right after the folder exists
        return made

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with replacing_folder(tmp_path / "export"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_finished_folder_replaces_the_old_one_whole(tmp_path: Path) -> None:
    import os

    out = tmp_path / "export"
    for files in ({"a.txt": b"first", "b.txt": b"only in the first"}, {"a.txt": b"second"}):
        with replacing_folder(out) as new:
            for name, data in files.items():
                (new / name).write_bytes(data)
            assert not out.exists() or _tree(out) != files  # nothing shows before the block ends
        assert _tree(out) == files  # the first folder's extra file is gone with it
        assert [p.name for p in tmp_path.iterdir()] == ["export"]
    os.mkdir(tmp_path / "plain")  # the reference: the mode mkdir gives under this umask
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode
    empty = tmp_path / "empty"
    empty.mkdir()
    with replacing_folder(empty) as new:  # an empty folder is replaced too
        (new / "x").write_text("x")
    assert _tree(empty) == {"x": b"x"}


def test_a_failed_rename_puts_the_old_folder_back(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import linbias.fileio

    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("old")
    real, calls = os.replace, []

    def fail_second(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the new folder onto the target, after the old one went aside
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(linbias.fileio.os, "replace", fail_second)
    with pytest.raises(OSError, match="No space"):
        with replacing_folder(out) as new:
            (new / "config.json").write_text("new")
    assert calls[0][0] == "export" and calls[1][1] == "export"
    assert _tree(out) == {"config.json": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
