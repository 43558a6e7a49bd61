"""The run directory: its files, how they are written, read back and checked.

A run directory holds everything later commands need:

    config.json            {"format": "linbias-run/1", "model": ModelConfig, "train": TrainConfig,
                            "corpus": the corpus name with its content fingerprint,
                            "split_rule": the rule that split it (``data.SPLIT_RULES``)}
    tokenizer.json         the byte-level BPE tokenizer (Hugging Face ``tokenizers``)
    model.safetensors      the latest weights
    checkpoint.json        step, the state file below and its sha256, and the sha256 of
                           config.json, tokenizer.json and model.safetensors at that step
    state-STEP.safetensors weights, optimizer moments, RNG (one per checkpoint, the older removed)
    log.jsonl              one JSON object per logged step: step, train_loss, valid_loss, ...
    .linbias.lock          only while a process writes the run: its OS lock (``writing``)

A fine-tuned run (``TrainConfig.init_from``) also records its parent in ``config.json``: ``"parent":
{"path", "step", "config_sha256", "weights_sha256"}``, the parent's directory and step and the
sha256 of its ``config.json`` and ``model.safetensors`` when the child started (``Lineage``). Its
first checkpoint is step 0, the parent's weights with a fresh optimizer, so a kill at any moment
resumes without the parent.

Runs written before ``split_rule`` was recorded imply it (``check_corpus``): one with a ``corpus``
was split by ``CONTENT_RULE``, one without by ``PATH_RULE``.

Every file is written atomically (``linbias.fileio``) except ``log.jsonl``, which is appended to
line by line, each line before the checkpoint that covers it; a resume drops the lines past the
checkpoint, and a line torn by a kill. ``config.json`` (written first, with its ``format`` marker)
is what proves later that a directory is a run: nothing that is not provably a run is ever
deleted, and a run's own files are the only ones replaced (``check_run_dir``, ``remove_run``).

One process writes a run at a time (``writing``: an OS lock held from before the first check to
the end). Every reader (``load_run``) checks what a resume checks: the recorded checksums, the
weights against the config, the tokenizer against the vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save
from tokenizers import Tokenizer

from linbias.checks import is_finite_number
from linbias.config import ModelConfig, TrainConfig, model_config
from linbias.data import (
    CONTENT_RULE, PATH_RULE, SPLIT_RULES, Corpus, load_tokenizer, save_tokenizer,
)
from linbias.fileio import (
    LOCK_NAME, atomic_write, atomic_write_text, locked_folder, owning_folder, sha256_file,
    write_json, writer_of,
)
from linbias.model import GPT
from linbias.positions import POSITION_METHODS

__all__ = [
    "RUN_FORMAT", "Checkpoint", "ConfigMismatch", "Lineage", "Run", "RunError", "append_log",
    "check_child_config", "check_corpus", "check_parent", "child_configs", "child_model",
    "lineage_of",
    "check_new_out", "check_resume", "check_run_dir", "check_writable", "last_checkpoint", "load_run",
    "read_checkpoint", "read_configs", "read_log", "recorded_corpus", "recorded_split_rule",
    "remove_run",
    "restore_checkpoint", "run_configs", "save_checkpoint", "start_run", "writing",
]

RUN_FORMAT = "linbias-run/1"

# The files a run writes. State files carry the step, zero-padded to 8 digits (more past 10^8
# steps); a name is matched whole, so no path separator can ever reach an unlink.
_RUN_FILES = frozenset({"config.json", "tokenizer.json", "model.safetensors", "checkpoint.json",
                        "log.jsonl", LOCK_NAME})
# The files a checkpoint records the sha256 of (``Checkpoint.files``): what every reader verifies.
_RECORDED = ("config.json", "tokenizer.json", "model.safetensors")
_STATE_FILE = re.compile(r"state-\d{8,}\.safetensors")
# fileio.atomic_write's temporary files: ".NAME.<random>.tmp", left behind only by a kill.
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Lineage:
    """The run a fine-tune started from: its directory (absolute), its step, and the sha256 of
    its ``config.json`` and ``model.safetensors`` at that moment."""

    path: str
    step: int
    config_sha256: str
    weights_sha256: str


@dataclass
class Run:
    """A trained run loaded from its directory: ``model`` (eval mode), ``tokenizer``, configs."""

    path: Path
    model: GPT
    tokenizer: Tokenizer
    config: ModelConfig
    train_config: TrainConfig
    corpus: Optional[str] = None  # the name (with content fingerprint) of the corpus trained on
    parent: Optional[Lineage] = None  # the run it was fine-tuned from
    split_rule: Optional[str] = None  # the rule that split its corpus, if recorded (check_corpus)



class RunError(ValueError):
    """A run directory that cannot be used (missing files, wrong format, mismatched resume)."""


class ConfigMismatch(RunError):
    """A resume whose settings differ from the run's saved ones (``differences`` names each)."""

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


@dataclass(frozen=True)
class Checkpoint:
    """The validated content of ``checkpoint.json``: the step, its state file and that file's
    sha256, and the sha256 of the run's config, tokenizer and weights at that step (``files``;
    empty for runs written before it was recorded)."""

    step: int
    state: str
    sha256: str
    files: dict[str, str] = dataclasses.field(default_factory=dict)


# --- files ---------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    if path.parent.exists() and not path.parent.is_dir():
        raise RunError(f"{path.parent} is a file, not a linbias run directory")
    if not path.is_file():
        raise RunError(f"{path.parent} is not a usable linbias run: {path.name} is missing ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is corrupt ({exc}); delete the run or restore the file") from exc


def _run_meta(run_dir: Path) -> dict[str, Any]:
    """config.json after checking its shape and format marker (not yet its field values)."""
    path = run_dir / "config.json"
    meta = _read_json(path, "the model and training configuration")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt is None and isinstance(meta, dict) and "model_type" in meta:
        raise RunError(f"{run_dir} is a transformers model (config.json of model_type "
                       f"{meta['model_type']!r}), not a linbias run: evaluate it with --hf {run_dir}")
    if fmt != RUN_FORMAT:
        raise RunError(
            f"{path} has format {fmt!r}, expected {RUN_FORMAT!r}: "
            "not a linbias run directory, or written by an incompatible version"
        )
    for key in ("model", "train"):
        if not isinstance(meta.get(key), dict):
            raise RunError(f"{path}: {key!r} must be a JSON object, got {meta.get(key)!r}; "
                           "restore the file or train the run again")
    if not isinstance(meta.get("corpus", ""), str):
        raise RunError(f"{path}: 'corpus' must be a string, got {meta['corpus']!r}; "
                       "restore the file or train the run again")
    if "split_rule" in meta and not (isinstance(meta["split_rule"], str) and "corpus" in meta):
        raise RunError(f"{path}: 'split_rule' must be a string beside 'corpus', got "
                       f"{meta['split_rule']!r}; restore the file or train the run again")
    return meta


def check_corpus(run_dir: Path, recorded: Optional[str], corpus: Corpus,
                 split_rule: Optional[str] = None) -> Corpus:
    """The run's corpus split by the rule it was trained with, after checking that it is the
    corpus the run was trained on (same files, same split), so held-out text is still held out.

    A run that records its corpus was split by the rule it records (``split_rule``), or, written
    before the rule was recorded, by ``CONTENT_RULE``: the recorded name, which ends in a
    fingerprint of the files and the rule, must be that of ``corpus`` split so. A run that records
    no corpus was written by a release that split by ``PATH_RULE`` and recorded nothing to compare
    with: its split is rebuilt from the same source, with a warning saying so.

    Args:
        run_dir: the run (for messages).
        recorded: the corpus name the run recorded (``recorded_corpus``), or ``None``.
        corpus: the run's corpus (``train_config.data``) as ``load_corpus`` loads it.
        split_rule: the split rule the run recorded (``recorded_split_rule``), or ``None``.

    Returns:
        ``corpus`` split by the run's rule (``corpus`` itself if already so split).

    Raises:
        RunError: the corpus changed since the run recorded it, or the run records a split rule
            this linbias does not know.
    """
    if split_rule is not None and split_rule not in SPLIT_RULES:
        raise RunError(f"{run_dir} was split by {split_rule!r}, a rule this linbias does not know "
                       f"({', '.join(SPLIT_RULES)}): it was written by a newer linbias; evaluate "
                       "or resume it with that release")
    if recorded is None:
        warnings.warn(
            f"{run_dir} records no corpus: it was written by a linbias release that split files "
            f"by a hash of their path, so it gets that release's split ({PATH_RULE}); that "
            f"release recorded no fingerprint, so held-out text cannot be verified: {corpus.spec} "
            "must hold the files it was trained on", stacklevel=2)
        return corpus.with_split_rule(PATH_RULE)
    corpus = corpus.with_split_rule(split_rule or CONTENT_RULE)
    if recorded == corpus.name:
        return corpus
    raise RunError(
        f"the corpus {corpus.name!r} is not the one {run_dir} was trained on ({recorded!r}): its "
        "files or its split changed, so held-out text may have been trained on. Restore the "
        "corpus, train again, or evaluate on another corpus with --data"
    )


def read_configs(run_dir: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs saved in a run directory.

    Raises:
        RunError: config.json is missing, not JSON, not a linbias run's, or holds invalid values.
    """
    run_dir = Path(run_dir)
    meta = _run_meta(run_dir)
    try:
        return ModelConfig.from_dict(meta["model"]), TrainConfig.from_dict(meta["train"])
    except (ValueError, TypeError) as exc:
        raise RunError(f"{run_dir / 'config.json'} holds an invalid configuration ({exc}); "
                       "restore the file or train the run again") from exc


def _state_name(step: int) -> str:
    return f"state-{step:08d}.safetensors"


def read_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The last checkpoint named by ``checkpoint.json``, its fields checked (not its state file).

    Raises:
        RunError: the file is missing, not JSON, or a field has the wrong type or form.
    """
    path = Path(run_dir) / "checkpoint.json"
    ckpt = _read_json(path, "the last checkpoint; the run never saved one")
    problem = _checkpoint_problem(ckpt)
    if problem:
        raise RunError(f"{path} is corrupt ({problem}); restore it, or train into another --out")
    return Checkpoint(ckpt["step"], ckpt["state"], ckpt["sha256"], dict(ckpt.get("files", {})))


def last_checkpoint(run_dir: str | Path) -> Optional[Checkpoint]:
    """``read_checkpoint``, or ``None`` for a run that never saved one."""
    return read_checkpoint(run_dir) if (Path(run_dir) / "checkpoint.json").exists() else None


def _checkpoint_problem(ckpt: Any) -> str:
    if not isinstance(ckpt, dict):
        return "not a JSON object"
    step, state, sha = ckpt.get("step"), ckpt.get("state"), ckpt.get("sha256")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"step must be an integer >= 0, got {step!r}"
    # The one name this step's state is written under: no other path is ever opened or deleted.
    if state != _state_name(step):
        return f"state must be {_state_name(step)!r}, got {state!r}"
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        return f"sha256 must be 64 lowercase hex digits, got {sha!r}"
    files = ckpt.get("files", {})
    if not isinstance(files, dict) or set(files) - set(_RECORDED) or not all(
            isinstance(v, str) and _SHA256.fullmatch(v) for v in files.values()):
        return f"files must map {', '.join(_RECORDED)} to sha256 digests, got {files!r}"
    return ""


def _log_problem(record: Any, previous: int) -> str:
    if not isinstance(record, dict):
        return "not a JSON object"
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step <= previous:
        return f"step must be an integer > {previous}, got {step!r}"
    for key in ("train_loss", "valid_loss", "lr", "tokens_per_s"):
        if (key == "train_loss" or key in record) and not is_finite_number(record.get(key)):
            return f"{key} must be a finite number, got {record.get(key)!r}"
    return ""


def _log_lines(log: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each line of the log with its record, checked. A last line torn by a kill (no newline, not
    JSON) is left out; any other bad line is an error, never skipped."""
    try:
        text = log.read_text(encoding="utf-8") if log.is_file() else ""
    except UnicodeDecodeError as exc:
        raise RunError(f"{log} is corrupt ({exc}); restore it, or train into another --out") from exc
    lines = text.splitlines()
    out: list[tuple[str, dict[str, Any]]] = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith("\n"):
                break
            record = line
        problem = _log_problem(record, out[-1][1]["step"] if out else 0)
        if problem:
            raise RunError(f"{log} line {n} is not a log record ({problem}); restore the file or "
                           "delete that line")
        out.append((line, record))
    return out


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl``, in order.

    Raises:
        RunError: a line that is not a record (steps must increase; losses must be finite).
    """
    return [record for _, record in _log_lines(Path(run_dir) / "log.jsonl")]


def _is_run_file(entry: Path, extra: frozenset[str]) -> bool:
    temp = _TEMP_FILE.fullmatch(entry.name)
    name = temp["name"] if temp else entry.name
    # Regular files only: a folder or a link by one of these names was not written by a run.
    return (name in _RUN_FILES or name in extra or bool(_STATE_FILE.fullmatch(name))) and \
        entry.is_file() and not entry.is_symlink()


def check_run_dir(run_dir: str | Path, extra: tuple[str, ...] = ()) -> None:
    """Check that ``run_dir`` provably is a linbias run: a real directory whose ``config.json``
    carries the run format and which holds nothing but the files a run writes (and ``extra``).

    Raises:
        RunError: naming what does not belong, or why the directory is not a run.
    """
    run_dir = Path(run_dir)
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a directory linbias wrote (a file or a link)")
    _run_meta(run_dir)
    foreign = sorted(p.name for p in run_dir.iterdir() if not _is_run_file(p, frozenset(extra)))
    if foreign:
        raise RunError(f"{run_dir} holds files a linbias run does not write: "
                       f"{', '.join(foreign[:8])}{' ...' if len(foreign) > 8 else ''}")


def remove_run(run_dir: str | Path, extra: tuple[str, ...] = ()) -> None:
    """Delete a run directory that ``check_run_dir`` proves to be a run, file by file.

    Only the run's own files are unlinked and the directory is then removed with ``rmdir``, so
    anything that appeared meanwhile stops the removal instead of being deleted. ``config.json``
    goes last: an interrupted removal still leaves a directory that proves to be a run.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir, extra)
    writer = writer_of(run_dir / LOCK_NAME)
    if writer is not None:
        raise RunError(f"{run_dir} is being trained by another process (pid {writer or '?'}); "
                       "it is not removed: stop that process first")
    files = [p for p in run_dir.iterdir() if _is_run_file(p, frozenset(extra))]
    for p in sorted(files, key=lambda p: p.name == "config.json"):
        p.unlink()
    run_dir.rmdir()


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RunError(f"{path.parent} is not a usable linbias run: {path.name} is missing")
    try:
        return load_file(str(path))  # safetensors: no pickle, nothing executed
    except Exception as exc:
        raise RunError(f"{path} is corrupt or truncated ({exc})") from exc


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights share storage; safetensors refuses shared tensors, so store each once.
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous().clone()
    return out


def _load_model_weights(model: GPT, tensors: dict[str, torch.Tensor], source: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise RunError(f"{source} does not match the model config ({exc})") from exc
    tied = {"lm_head.weight"} if model.config.tie_weights else set()
    if set(missing) - tied or unexpected:
        raise RunError(
            f"{source} does not match the model config: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )


def load_run(path: str | Path) -> Run:
    """Load a run directory written by ``train``, after the checks ``--resume`` makes.

    The weights, config and tokenizer must be the ones the last checkpoint recorded (their
    sha256; for runs written before that was recorded, the weights must equal the checkpoint's
    state file, itself checked against its sha256), the weights must fit the config, and the
    tokenizer the vocabulary. A run without a checkpoint is refused. An unfinished run, or one that
    another process is training right now, loads with a warning that says which step is used (for
    a run being trained: the last checkpoint, read from its verified state file).

    Returns:
        ``Run`` with ``.model`` in eval mode (``model(idx)`` gives ``[B, T, vocab]`` logits),
        ``.tokenizer`` (a ``tokenizers.Tokenizer``), ``.config`` and ``.train_config``.

    Raises:
        RunError: missing, corrupt or changed files, or an unknown format; the message names the
            file and the fix.
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise RunError(f"no run directory at {run_dir}")
    config, train_config = read_configs(run_dir)
    meta = _run_meta(run_dir)
    parent = _read_lineage(run_dir, meta)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise RunError(f"{run_dir} is not a usable linbias run: tokenizer.json is missing")
    if not (run_dir / "checkpoint.json").exists():
        writer = writer_of(run_dir / LOCK_NAME)
        if writer is not None:
            raise RunError(f"{run_dir} is being trained by another process (pid {writer or '?'}) "
                           "and has no checkpoint yet: read it after its first checkpoint")
        raise RunError(f"{run_dir} never saved a checkpoint (training was stopped before its first "
                       "one: killed, or the disk filled), so nothing in it is verified: train it "
                       "again into a new --out")
    ckpt, tensors, note = _verified_weights(run_dir)
    model = GPT(config)
    _load_model_weights(model, tensors, run_dir)
    model.eval()
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise RunError(f"{tok_path} has {tokenizer.get_vocab_size()} tokens, more than the model's "
                       f"vocab_size {config.vocab_size}: it is not this run's tokenizer; restore it")
    if ckpt.step < train_config.steps and not note:
        note = f"it is unfinished (step {ckpt.step} of {train_config.steps})"
    if note:
        warnings.warn(f"{run_dir}: {note}; using its weights at step {ckpt.step}", stacklevel=2)
    return Run(run_dir, model, tokenizer, config, train_config, meta.get("corpus"), parent,
               meta.get("split_rule"))


def _verified_weights(run_dir: Path) -> tuple[Checkpoint, dict[str, torch.Tensor], str]:
    """The weights of the last checkpoint, checked, and a note when another process writes the
    run (its files may move on while they are read: its checkpoint's state file is used)."""
    for attempt in range(5):
        writer = writer_of(run_dir / LOCK_NAME)
        ckpt = read_checkpoint(run_dir)
        try:
            if writer is None:
                _check_recorded(run_dir, ckpt, _RECORDED)
                tensors = _load_safetensors(run_dir / "model.safetensors")
                if not ckpt.files:  # written before checksums were recorded: the state decides
                    _check_legacy_weights(run_dir, ckpt, tensors)
                return ckpt, tensors, ""
            _check_recorded(run_dir, ckpt, ("config.json", "tokenizer.json"))
            return ckpt, _model_tensors(_verified_state(run_dir, ckpt)), (
                f"another process (pid {writer or '?'}) is training it now")
        except RunError:
            if writer is None or attempt == 4:
                raise
        time.sleep(0.2)  # the writer replaced the checkpoint while it was read: read it again
    raise AssertionError("unreachable")


def _check_recorded(run_dir: Path, ckpt: Checkpoint, names: tuple[str, ...]) -> None:
    """Each file of ``names`` whose sha256 the checkpoint recorded must still have it."""
    for name in names:
        recorded = ckpt.files.get(name)
        if recorded is None or sha256_file(run_dir / name) == recorded:
            continue
        fix = (f"restore it, or resume with 'linbias train --resume --out {run_dir}' if the run is "
               "unfinished (a save cut short)" if name == "model.safetensors" else
               "restore it: training writes it once, and no later step rewrites it")
        raise RunError(f"{run_dir / name} is not the file the last checkpoint (step {ckpt.step}) "
                       f"recorded (its sha256 differs: edited, or another run's); {fix}")


def _verified_state(run_dir: Path, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    state_path = run_dir / ckpt.state
    if not state_path.is_file() or sha256_file(state_path) != ckpt.sha256:
        raise RunError(f"{state_path} is missing, truncated or corrupt (checksum mismatch)")
    return _load_safetensors(state_path)


def _model_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[6:]: v for k, v in state.items() if k.startswith("model.")}


def _check_legacy_weights(run_dir: Path, ckpt: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    saved = _model_tensors(_verified_state(run_dir, ckpt))
    if saved.keys() != tensors.keys() or not all(torch.equal(saved[k], tensors[k]) for k in saved):
        raise RunError(f"{run_dir / 'model.safetensors'} differs from the weights of the last "
                       f"checkpoint (step {ckpt.step}, {ckpt.state}): it was edited or a save was "
                       "cut short; restore it, or resume the run if it is unfinished")


# --- fine-tuning: a run started from another's weights -------------------------------------------

# The model fields a run's weights fix; a fine-tune may change the others (see TrainConfig.init_from).
_WEIGHT_FIELDS = ("vocab_size", "n_layers", "n_heads", "d_model", "d_ff", "position",
                  "tie_weights", "bias", "t5_buckets", "embedding")


def lineage_of(parent_dir: str | Path) -> Lineage:
    """The lineage record of a run as it is now (see ``Lineage``)."""
    parent_dir = Path(parent_dir).resolve()
    return Lineage(str(parent_dir), read_checkpoint(parent_dir).step,
                   sha256_file(parent_dir / "config.json"),
                   sha256_file(parent_dir / "model.safetensors"))


def check_parent(parent_dir: str | Path) -> Run:
    """Load the run a fine-tune starts from, after checking it is a finished, intact run.

    Raises:
        RunError: not a run, corrupt, or not finished (the message names the fix).
    """
    parent_dir = Path(parent_dir)
    try:
        run = load_run(parent_dir)
        step = read_checkpoint(parent_dir).step
    except RunError as exc:
        raise RunError(f"cannot fine-tune from {parent_dir}: {exc}") from exc
    if step != run.train_config.steps:
        raise RunError(
            f"cannot fine-tune from {parent_dir}: it is not finished (step {step} of "
            f"{run.train_config.steps}); finish it with 'linbias train --out {parent_dir} "
            "--resume', or start from a finished run"
        )
    return run


# What a fine-tune takes from its parent unless given: the corpus and the tokenizer.
_INHERITED = ("data", "vocab_size")


def run_configs(model: dict[str, Any], train: dict[str, Any], *, preset: Optional[str] = None,
                resume: str | Path | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The configs a ``train`` call runs with, from the fields a caller gives (the CLI: its flags).

    - A new run: the model ``preset`` (default ``tiny``) with ``model`` replacing its fields, and
      ``TrainConfig(**train)``.
    - ``resume``: the run's saved configs with the given fields replacing theirs (``check_resume``
      then refuses any that differ), the model fields on top of ``preset`` if one is named.
    - A fine-tune (``train["init_from"]``): the parent's model (or ``preset``'s) with ``model``
      replacing its fields, and a fresh ``TrainConfig(**train)`` that takes the parent's corpus and
      tokenizer (``data``, ``vocab_size``) unless given; ``vocab_size`` of the model is always the
      parent's.

    Raises:
        RunError: the run to resume or fine-tune from has no readable configs.
        ValueError: an unknown preset or field, or a bad value.
    """
    if resume is None and train.get("init_from") is None:
        return model_config(preset or "tiny", **model), TrainConfig(**train)
    source = resume if resume is not None else train["init_from"]
    try:
        saved_mc, saved_tc = read_configs(source)
    except RunError as exc:
        if resume is not None:
            raise
        raise RunError(f"cannot fine-tune from --init-from {source}: {exc}") from exc
    if resume is None:
        return child_configs((saved_mc, saved_tc), model, train, preset=preset)
    base = model_config(preset).to_dict() if preset else saved_mc.to_dict()
    mc = ModelConfig.from_dict({**base, **model, "vocab_size": saved_mc.vocab_size})
    return mc, TrainConfig.from_dict({**saved_tc.to_dict(), **train})


def child_configs(parent: tuple[ModelConfig, TrainConfig], model: dict[str, Any],
                  train: dict[str, Any], *, preset: Optional[str] = None,
                  ) -> tuple[ModelConfig, TrainConfig]:
    """A fine-tune's configs from its parent's (see ``run_configs``), without reading a file."""
    parent_mc, parent_tc = parent
    base = model_config(preset).to_dict() if preset else parent_mc.to_dict()
    mc = ModelConfig.from_dict({**base, **model, "vocab_size": parent_mc.vocab_size})
    inherited = {k: getattr(parent_tc, k) for k in _INHERITED}
    return mc, TrainConfig(**{**inherited, **train})


def child_model(parent: Run, config: ModelConfig) -> GPT:
    """A GPT of ``config`` holding ``parent``'s weights: a fine-tune before its first step.

    Raises:
        RunError: ``config`` changes a field the parent's weights fix (``check_child_config``).
    """
    check_child_config(parent, config)
    model = GPT(config)
    model.load_state_dict(parent.model.state_dict())
    return model


def check_child_config(parent: Run, config: ModelConfig) -> None:
    """Refuse a fine-tune config that changes what ``parent``'s weights fix.

    Raises:
        RunError: naming each conflicting field with both values.
    """
    given, saved = config.to_dict(), parent.config.to_dict()
    table = POSITION_METHODS[parent.config.position].fixes_train_len
    fixed = _WEIGHT_FIELDS + (("train_len",) if table else ())
    diff = [f"{k} (parent {saved[k]!r}, given {given[k]!r})" for k in fixed if given[k] != saved[k]]
    if diff:
        why = (f" ({parent.config.position} positions have one table row per position up to "
               "train_len)"
               if any(d.startswith("train_len") for d in diff) else "")
        raise RunError(
            f"cannot fine-tune from {parent.path}: the settings conflict with its weights in "
            f"{', '.join(diff)}{why}; drop those flags, the architecture comes from the parent"
        )


def _read_lineage(run_dir: Path, meta: dict[str, Any]) -> Optional[Lineage]:
    """The ``parent`` record of config.json, checked; a warning if that parent changed since."""
    record = meta.get("parent")
    if record is None:
        return None
    fields = {"path": str, "step": int, "config_sha256": str, "weights_sha256": str}
    if not isinstance(record, dict) or set(record) != set(fields) or any(
            type(record[k]) is not t for k, t in fields.items()) or record["step"] < 0 or not all(
            _SHA256.fullmatch(record[k]) for k in ("config_sha256", "weights_sha256")):
        raise RunError(f"{run_dir / 'config.json'}: 'parent' must be {{path, step, config_sha256, "
                       f"weights_sha256}} as a fine-tune writes it, got {record!r}; restore the file")
    lineage = Lineage(**record)
    parent = Path(lineage.path)
    if (parent / "config.json").is_file() and (parent / "model.safetensors").is_file() and (
            sha256_file(parent / "config.json") != lineage.config_sha256
            or sha256_file(parent / "model.safetensors") != lineage.weights_sha256):
        warnings.warn(f"{run_dir} was fine-tuned from {parent} at step {lineage.step}, but that "
                      "run's config or weights have changed since: it is no longer this run's "
                      "parent", stacklevel=3)
    return lineage


def check_resume(out: str | Path, mc: ModelConfig, tc: TrainConfig) -> ModelConfig:
    """The saved model config, after checking the requested settings match the saved ones.

    Raises:
        ConfigMismatch: a setting differs (the message names each one).
        RunError: the run directory is unusable.
    """
    out = Path(out)
    saved_mc, saved_tc = read_configs(out)
    requested = {**mc.to_dict(), "vocab_size": saved_mc.vocab_size, **tc.to_dict()}
    saved = {**saved_mc.to_dict(), **saved_tc.to_dict()}
    diff = [f"{k} (saved {saved[k]!r}, given {requested.get(k)!r})"
            for k in sorted(saved) if saved[k] != requested.get(k)]
    if diff:
        raise ConfigMismatch(
            f"--resume with settings that differ from {out / 'config.json'} in: " + ", ".join(diff)
            + "; resume with the saved settings, or train into a new --out", diff
        )
    if not (out / "tokenizer.json").is_file():
        raise RunError(f"cannot resume {out}: tokenizer.json is missing")
    return saved_mc


def check_writable(out: str | Path) -> None:
    """Check that ``out`` can be created and written: its nearest existing ancestor is a writable
    folder (nothing is created).

    Raises:
        RunError: naming the file in the way or the folder that is not writable.
    """
    out = Path(out)
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise RunError(f"cannot create {out}: {parent} is a file; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"cannot write to {parent} (permission denied); choose another --out")


def check_new_out(out: Path) -> None:
    """A new run goes only into an absent or empty directory: nothing of the user's is replaced."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; choose another --out")
    whole = owning_folder(out)
    if whole is not None:
        raise RunError(f"--out {out} is inside {whole}, a linbias run or export whose files must "
                       "stay as written; choose an --out outside it")
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if "config.json" in entries:
        try:
            _run_meta(out)
        except RunError:
            pass  # someone else's config.json: reported below with the other files
        else:
            raise RunError(f"{out} already holds a run: pass --resume to continue it, or choose a "
                           "new --out")
    if entries:
        raise RunError(
            f"{out} is not empty ({', '.join(entries[:8])}{' ...' if len(entries) > 8 else ''}); "
            "a new run needs an absent or empty directory: choose another --out"
        )
    check_writable(out)


def writing(run_dir: str | Path) -> AbstractContextManager[None]:
    """Hold a run directory for the one process that writes it (``fileio.locked_folder``): the
    directory is created if absent, and another writer is refused with this process's pid.

    Raises:
        Busy: another process writes the run.
    """
    return locked_folder(Path(run_dir), f"the run {run_dir}")


def start_run(out: Path, tokenizer: Tokenizer, mc: ModelConfig, tc: TrainConfig,
              corpus: Corpus, parent: Optional[Lineage] = None) -> None:
    meta = {"format": RUN_FORMAT, "model": mc.to_dict(), "train": tc.to_dict(),
            "corpus": corpus.name, "split_rule": corpus.split_rule}
    if parent is not None:
        meta["parent"] = dataclasses.asdict(parent)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # config.json first: its format marker is what later proves the directory is a run.
        write_json(out / "config.json", meta)
        save_tokenizer(tokenizer, out / "tokenizer.json")
        atomic_write_text(out / "log.jsonl", "")
    except OSError as exc:
        raise RunError(f"cannot write the run to {out} ({exc}); choose another --out") from exc


def _write_json_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    for i, moments in state.items():
        # load_state_dict takes any shape; a wrong one would fail only in a later step.
        if not 0 <= i < len(params):
            raise ValueError(f"optimizer state for parameter {i}, which the model does not have")
        for key, value in moments.items():
            if key != "step" and value.shape != params[i].shape:
                raise ValueError(f"optim.{i}.{key} has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(params[i].shape)}")
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(out: Path, model: GPT, opt: torch.optim.Optimizer, step: int,
                previous: Optional[int]) -> None:
    """Write the weights, then the state file, then ``checkpoint.json`` naming both (with the
    sha256 of the state, the weights, the config and the tokenizer), then drop the previous state.

    Raises:
        RunError: the disk is full or the folder unwritable; the previous checkpoint is intact.
    """
    model_tensors = _state_dict(model)
    weights = save(model_tensors)
    state_name = _state_name(step)
    tensors = {**{f"model.{k}": v for k, v in model_tensors.items()},
               **_optimizer_tensors(opt), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # every rank was seeded alike, so rank 0's state serves all
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    data = save(tensors)
    files = {"config.json": sha256_file(out / "config.json"),
             "tokenizer.json": sha256_file(out / "tokenizer.json"),
             "model.safetensors": hashlib.sha256(weights).hexdigest()}
    try:
        atomic_write(out / "model.safetensors", lambda f: f.write(weights))
        atomic_write(out / state_name, lambda f: f.write(data))
        write_json(out / "checkpoint.json", {"step": step, "state": state_name,
                                             "sha256": hashlib.sha256(data).hexdigest(),
                                             "files": files})
    except OSError as exc:
        raise RunError(
            f"cannot save the checkpoint of step {step} in {out} ({exc.strerror or exc}): the "
            f"last checkpoint{'' if previous is None else f' (step {previous})'} is kept; free "
            f"space or fix the folder, then 'linbias train --resume --out {out}'") from exc
    # Only the state file this run verified or wrote itself: a name built here, never one read.
    if previous is not None and previous != step:
        (out / _state_name(previous)).unlink(missing_ok=True)


def restore_checkpoint(out: Path, model: GPT, opt: torch.optim.Optimizer, tc: TrainConfig,
             trim_log: bool) -> int:
    """Load the last checkpoint into ``model`` and ``opt`` and return its step. Everything is
    verified before the log is trimmed, so a refused resume leaves the run as it was."""
    ckpt = read_checkpoint(out)
    if ckpt.step > tc.steps:
        raise RunError(f"{out / 'checkpoint.json'} is at step {ckpt.step}, past steps={tc.steps}; "
                       "cannot resume")
    state_path = out / ckpt.state
    try:
        tensors = _verified_state(out, ckpt)
        _check_recorded(out, ckpt, ("config.json", "tokenizer.json"))
    except RunError as exc:
        raise RunError(f"{exc}; cannot resume") from exc
    kept = [line for line, record in _log_lines(out / "log.jsonl") if record["step"] <= ckpt.step]
    _load_model_weights(model, _model_tensors(tensors), state_path)
    try:
        _restore_optimizer(opt, tensors)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise RunError(f"{state_path} does not hold a usable optimizer and RNG state ({exc!r}); "
                       "cannot resume") from exc
    if trim_log:
        # The resumed run writes the later lines again; a line torn by the kill goes too.
        _write_json_lines(out / "log.jsonl", kept)
    return ckpt.step


def recorded_corpus(run_dir: str | Path) -> Optional[str]:
    """The corpus name (with its content fingerprint) a run recorded, or ``None`` (older runs)."""
    return _run_meta(Path(run_dir)).get("corpus")


def recorded_split_rule(run_dir: str | Path) -> Optional[str]:
    """The split rule a run recorded, or ``None`` (older runs: ``check_corpus`` says which)."""
    return _run_meta(Path(run_dir)).get("split_rule")


def append_log(out: Path, record: dict[str, Any]) -> None:
    """One line of ``log.jsonl`` (see the module docstring for why it is appended, not replaced)."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
