"""Files written so that a reader sees the old file or the whole new one, never a torn one, and
folders that one process writes at a time.

Every file linbias writes goes through ``atomic_write`` (a temporary file beside the target,
flushed to disk, then renamed over it), except ``log.jsonl``, which a run appends to line by line;
a line torn by a kill is dropped when the run resumes (``linbias.runs``). Files get the mode a
plain ``open`` would give them (``0o666`` less the umask), not the temporary file's private one.
A folder that is replaced whole (an export) is built beside its target and renamed into place
(``replacing_folder``), so no reader or kill ever sees it half written.

Output files (``check_output``) go only where nothing is, or over a file that carries the stamp of
the same purpose (``written_by``: a JSON key, a PNG text chunk), never inside a folder that belongs
to one whole (a run, an export), and over anything else only with ``force``.

A folder that a command writes (a run, a report, an export target) is held with an OS lock
(``exclusive``, ``flock``): a second writer is refused with the holder's pid, and the kernel
releases the lock when the holder dies, so no kill leaves a stale marker that blocks the next run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, Optional

__all__ = [
    "LOCK_NAME", "Busy", "OutputError", "atomic_write", "atomic_write_text", "check_output",
    "exclusive", "locked_folder", "owning_folder", "replacing_folder", "sha256_file", "stamp_of",
    "write_json", "write_png", "writer_of",
]

# The lock file a held folder carries while a command writes it; removed when the command ends.
LOCK_NAME = ".linbias.lock"


class Busy(RuntimeError):
    """Another process holds the lock of a folder this one would write."""


class OutputError(ValueError):
    """An output path that would replace or corrupt something linbias must not touch."""


def _umask() -> int:
    """The process umask, read from ``/proc`` where it is there: setting it to read it back is not
    safe with other threads running."""
    with suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """``0o666`` less the umask: the mode ``open`` gives a new file (mkstemp gives 0600)."""
    return 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file through ``write(f)`` so readers see the old file or the whole new one.

    The bytes go to a temporary file beside ``path``, are flushed to disk, then renamed over it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), _file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write`` for UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode()))


@contextmanager
def replacing_folder(path: Path) -> Iterator[Path]:
    """A new folder to fill, which replaces ``path`` whole when the block ends without an error.

    The folder is made beside ``path`` (``.<name>.tmp-*``, with the mode ``mkdir`` would give it),
    then renamed into place; a folder already at ``path`` goes aside first (between the two renames
    ``path`` is briefly absent, never partly written), then is deleted. If the block raises (a
    failed check, Ctrl-C), or the rename fails, the new folder is removed and ``path`` is left as
    it was. The caller decides whether ``path`` may be replaced and holds its
    lock (``exclusive``): this function replaces whatever folder is there.

    Yields:
        the new folder (empty), to fill inside the ``with`` block.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh, uniquely named folder: the only one removed on failure. Ctrl-C or SIGTERM between
    # its creation and the try would leave it behind, so they are held until the try is entered.
    held = _hold_interrupts()
    try:
        new = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    except BaseException:
        _release_interrupts(held)
        raise
    try:
        _release_interrupts(held)  # an interrupt held meanwhile is raised here, inside the try
        new.chmod(0o777 & ~_umask())  # mkdtemp makes it private
        yield new
        _swap_in(new, path)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def _hold_interrupts() -> Optional[tuple[dict, list]]:
    """Defer SIGINT and SIGTERM: their handlers (which Python runs in the main thread) are
    replaced by one that only records the signal; the old handlers and the record, or None off
    the main thread. Blocking the signals instead is not enough: a signal sent to the process
    goes to any thread that does not block it, and its handler still runs in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    caught: list = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:  # None: a handler not set from Python, left alone
            old[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    return old, caught


def _release_interrupts(held: Optional[tuple[dict, list]]) -> None:
    """The old handlers back, then the first signal recorded meanwhile raised again for them."""
    if held is None:
        return
    old, caught = held
    for sig, handler in old.items():
        signal.signal(sig, handler)
    if caught:
        signal.raise_signal(caught[0])


def _swap_in(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; a non-empty folder there (which a rename cannot replace) goes
    aside first and comes back if the second rename fails."""
    if not (path.is_dir() and any(path.iterdir())):
        os.replace(new, path)  # nothing there, or an empty folder: one rename
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.replace(path, old)  # over the fresh empty folder
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as strict JSON (indented, sorted keys), atomically.

    Raises:
        ValueError: ``obj`` holds nan or inf, which JSON has no way to write (nothing is written).
    """
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_png(path: Path, fig: Any, stamp: str, **savefig: Any) -> None:
    """A matplotlib figure as a PNG, atomically, carrying ``stamp`` as its ``written_by`` text
    chunk (what ``check_output`` reads back to know the file is linbias's)."""
    meta = {"written_by": stamp}
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", metadata=meta, **savefig))


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- output files --------------------------------------------------------------------------------

# A folder holding one of these files (with this check on its JSON) is one whole that only its
# own command writes: a run (config.json of a linbias run format) or an export.
_WHOLE_FOLDERS: dict[str, Callable[[Any], bool]] = {
    "config.json": lambda obj: isinstance(obj, dict)
    and str(obj.get("format", "")).startswith("linbias-run/"),
    "linbias_export.json": lambda obj: True,
}


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def owning_folder(path: str | Path) -> Optional[Path]:
    """The run or export folder that ``path`` (a file or folder to be written) lies in, if any."""
    for folder in Path(os.path.abspath(path)).parents:
        for name, belongs in _WHOLE_FOLDERS.items():
            if (folder / name).is_file() and belongs(_read_json_file(folder / name)):
                return folder
    return None


def stamp_of(path: Path) -> Optional[str]:
    """The ``written_by`` stamp of a JSON or PNG file linbias wrote, or ``None``."""
    with suppress(OSError):
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"\x89PNG"):
            from PIL import Image  # matplotlib's own dependency

            with suppress(Exception), Image.open(path) as image:
                return image.text.get("written_by")  # type: ignore[attr-defined]
            return None
    obj = _read_json_file(path)
    stamp = obj.get("written_by") if isinstance(obj, dict) else None
    return stamp if isinstance(stamp, str) else None


def check_output(path: str | Path, purpose: str, *, force: bool = False,
                 flag: str = "output path",
                 legacy: Optional[Callable[[Path], bool]] = None) -> None:
    """Check that an output file may be written at ``path``, before the work that produces it.

    It may go where nothing is, or over a regular file stamped with the same ``purpose`` (an
    earlier output of the same kind, or one that ``legacy`` recognises as written before stamps
    were), or, with ``force``, over any regular file; never over a
    folder or a link, never inside a run or export folder, and only where the nearest existing
    folder is writable (missing folders are created when the file is written).

    Raises:
        OutputError: naming the path, what is in the way and the fix.
    """
    path = Path(path)
    whole = owning_folder(path)
    if whole is not None:
        raise OutputError(f"cannot write {path}: it is inside {whole}, a linbias run or export "
                          f"whose files must stay as written; choose a {flag} outside it")
    if path.is_symlink():
        raise OutputError(f"cannot write {path}: it is a link, and writing would replace the link "
                          f"or its target; choose another {flag}")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name, e.g. "
                          f"{path / ('out.png' if purpose.endswith('heatmap') else 'out.json')}")
    if path.exists():
        if not path.is_file():
            raise OutputError(f"cannot write {path}: it is not a regular file; choose another {flag}")
        if not force and stamp_of(path) != purpose and not (legacy and legacy(path)):
            raise OutputError(f"{path} exists and was not written by {purpose}: pass --force to "
                              f"replace it, or choose another {flag}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is a file, not a folder")
    try:  # a real probe: permissions, read-only mounts and ACLs all answer here
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".linbias-probe-", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {ancestor} is not writable ({e}); choose "
                          f"another {flag}") from e
    os.close(fd)
    os.unlink(probe)


# --- one writer per folder -----------------------------------------------------------------------


def _pid_in(fd: int) -> Optional[int]:
    with suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    return None


def _holder(pid: Optional[int]) -> str:
    return f"another linbias process (pid {pid})" if pid else "another linbias process"


@contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive OS lock on the file ``lock`` for the block; ``what`` names the folder in
    the error. The file holds this process's pid (for the other writer's message) and is removed
    when the block ends; the kernel drops the lock if the process dies first.

    Raises:
        Busy: another process holds the lock (its pid named).
    """
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _pid_in(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise Busy(f"{what} is being written by {_holder(pid)}: wait for it to finish (or "
                       "stop it), or choose another path") from None
        # The holder that just let go may have removed the file: lock the one at the path.
        with suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def writer_of(lock: Path) -> Optional[int]:
    """The pid of the process writing under ``lock`` now (0 if it has not written it yet), or
    ``None`` when no process holds it."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _pid_in(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def locked_folder(folder: Path, what: str) -> Iterator[None]:
    """Create ``folder`` if needed and hold its lock (``exclusive`` on ``folder/LOCK_NAME``) for
    the block. The folders this call created are removed again if the block fails while they are
    still empty, so a refused command leaves nothing behind.

    Raises:
        Busy: another process writes the folder.
        OutputError: the folder cannot be created (a file in the way, no permission).
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder} ({exc.strerror or exc}); choose another path") \
            from exc
    try:
        with exclusive(folder / LOCK_NAME, what):
            yield
    except BaseException:
        with suppress(OSError):
            for path in created:
                path.rmdir()  # only while empty: nothing written is ever removed here
        raise
