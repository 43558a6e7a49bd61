"""Train short: GPT training with any position method, checkpoints that resume exactly.

A run directory holds everything later commands need:

    config.json            {"format": "linbias-run/1", "model": ModelConfig, "train": TrainConfig,
                            "corpus": the corpus name with its content fingerprint}
    tokenizer.json         the byte-level BPE tokenizer (Hugging Face ``tokenizers``)
    model.safetensors      the latest weights
    checkpoint.json        step, data position, the state file below and its sha256
    state-STEP.safetensors weights, optimizer moments, RNG (one per checkpoint, the older removed)
    log.jsonl              one JSON object per logged step: step, train_loss, valid_loss, ...

Batches are a pure function of (seed, step, rank) (``data.get_batch``), so resuming needs only the
step, and ``torchrun`` ranks each read their own shard of one global batch.

What a command may touch: a new run goes only into an absent or empty directory, and
``config.json`` (written first, with its ``format`` marker) is what proves later that a directory
is a run. A resume writes only the files above, into a directory that proves to be a run, and
deletes only state files whose name it wrote (``state-`` and the zero-padded step); anything else
in the way is an error naming the path. Every check that can fail (settings, the directory, the
length of both token streams, the checkpoint and the log) runs before step 1, and a resume
verifies all of it before it trims the log. A run whose loss or gradient norm stops being finite
ends with ``Diverged``, keeping its last checkpoint: one is never written from non-finite weights,
nor after a non-finite validation loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from linbias.config import ConfigBase, ModelConfig, check_int
from linbias.data import (
    atomic_write,
    Corpus,
    atomic_write_text,
    default_cache_dir,
    get_batch,
    load_corpus,
    load_tokenizer,
    save_tokenizer,
    token_stream,
    train_tokenizer,
)
from linbias.model import GPT
from linbias.tasks import TaskMix, encoder
from linbias.positions import position_warnings

__all__ = [
    "RUN_FORMAT", "Checkpoint", "ConfigMismatch", "Diverged", "Run", "RunError", "TrainConfig",
    "check_corpus", "check_resume", "check_run_dir", "check_writable", "load_run", "read_checkpoint",
    "read_configs", "read_log", "remove_run", "train",
]

RUN_FORMAT = "linbias-run/1"

# The files a run writes. State files carry the step, zero-padded to 8 digits (more past 10^8
# steps); a name is matched whole, so no path separator can ever reach an unlink.
_RUN_FILES = frozenset({"config.json", "tokenizer.json", "model.safetensors", "checkpoint.json",
                        "log.jsonl"})
_STATE_FILE = re.compile(r"state-\d{8,}\.safetensors")
# data.atomic_write's temporary files: ".NAME.<random>.tmp", left behind only by a kill.
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_real(name: str, value: Any, low: float, high: float = math.inf, *,
                low_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number in range."""
    if not _is_number(value) or value < low or (low_open and value == low) or value > high:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(ConfigBase):
    """How a model is trained (the model itself is a ``ModelConfig``).

    Args:
        data: corpus spec (``stdlib``, ``text:PATH``, ``hf:NAME[:CONFIG]``).
        vocab_size: tokenizer vocabulary size requested from BPE training.
        steps: optimizer steps.
        batch_size: sequences per process per micro-step.
        grad_accum: micro-steps per optimizer step.
        lr: peak learning rate (AdamW), reached after ``warmup`` steps, then cosine to
            ``lr * min_lr_ratio`` at ``steps``.
        weight_decay: AdamW decoupled weight decay on matrices (not on norms, biases, tables).
        grad_clip: max global gradient norm (0 disables).
        seed: fixes initialisation, data order and results.
        bf16: bfloat16 autocast for the forward pass.
        eval_every: steps between validation losses (0: only at the end).
        eval_batches: validation batches per evaluation.
        save_every: steps between checkpoints (a checkpoint is always written at the end).
        log_every: steps between log lines.
        mix_task: a retrieval task of ``linbias.tasks.TASKS`` (``"passkey"``, ``"lines"``) whose
            sequences replace a share of the training rows, so that a model trained from scratch
            learns the task at length L and can be tested on it past L.
        mix_fraction: the share of training rows replaced (each row independently, seeded by the
            step); validation batches stay plain corpus, so the valid loss stays comparable.
        mix_filler: the passkey haystack: ``"sentences"``, the repeated filler sentences of the
            published passkey test (the prompts ``linbias eval --task passkey`` uses by default),
            or ``"corpus"``, a slice of the training split (a needle in a real haystack).
    """

    data: str = "stdlib"
    vocab_size: int = 4096
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = False
    eval_every: int = 200
    eval_batches: int = 16
    save_every: int = 500
    log_every: int = 10
    mix_task: Optional[Literal["passkey", "lines"]] = None
    mix_fraction: float = 0.0
    mix_filler: Literal["sentences", "corpus"] = "sentences"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            check_int(name, getattr(self, name))
        for name in ("warmup", "eval_every", "save_every", "seed"):
            check_int(name, getattr(self, name), low=0)
        # Finite and in range: one inf or nan here makes every later loss nan, silently.
        _check_real("lr", self.lr, 0.0, low_open=True)
        _check_real("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_real("weight_decay", self.weight_decay, 0.0)
        _check_real("grad_clip", self.grad_clip, 0.0)
        _check_real("mix_fraction", self.mix_fraction, 0.0, 1.0)
        if (self.mix_task is None) != (self.mix_fraction == 0):
            raise ValueError(
                f"mix_task={self.mix_task!r} with mix_fraction={self.mix_fraction:g}: give both "
                "(e.g. --mix-task passkey --mix-fraction 0.25) or neither"
            )
        if self.mix_filler == "corpus" and self.mix_task not in (None, "passkey"):
            raise ValueError(f"mix_filler='corpus' is a passkey haystack; task {self.mix_task!r} "
                             "has no filler to replace: use mix_filler='sentences'")


@dataclass
class Run:
    """A trained run loaded from its directory: ``model`` (eval mode), ``tokenizer``, configs."""

    path: Path
    model: GPT
    tokenizer: Tokenizer
    config: ModelConfig
    train_config: TrainConfig
    corpus: Optional[str] = None  # the name (with content fingerprint) of the corpus trained on


class RunError(ValueError):
    """A run directory that cannot be used (missing files, wrong format, mismatched resume)."""


class ConfigMismatch(RunError):
    """A resume whose settings differ from the run's saved ones (``differences`` names each)."""

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


class Diverged(RuntimeError):
    """Training stopped because a loss or the gradient norm stopped being finite."""


@dataclass(frozen=True)
class Checkpoint:
    """The validated content of ``checkpoint.json``."""

    step: int
    state: str
    sha256: str


# --- files ---------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    return meta


def check_corpus(run_dir: Path, recorded: Optional[str], corpus: Corpus) -> None:
    """Refuse to resume or evaluate a run on its corpus unless that corpus is the one it was
    trained on: same files and same split rule, so held-out text is still held out.

    Raises:
        RunError: the corpus changed, or the run (from an older linbias) recorded none.
    """
    if recorded == corpus.name:
        return
    if recorded is None:
        raise RunError(
            f"{run_dir / 'config.json'} records no corpus fingerprint (written by an older linbias, "
            f"whose split rule differs): its held-out split may now hold training text. Train the "
            "run again, or evaluate it on another corpus with --data"
        )
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
    return Checkpoint(ckpt["step"], ckpt["state"], ckpt["sha256"])


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
    return ""


def _log_problem(record: Any, previous: int) -> str:
    if not isinstance(record, dict):
        return "not a JSON object"
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step <= previous:
        return f"step must be an integer > {previous}, got {step!r}"
    for key in ("train_loss", "valid_loss", "lr", "tokens_per_s"):
        if (key == "train_loss" or key in record) and not _is_number(record.get(key)):
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
    """Load a run directory written by ``train``.

    Returns:
        ``Run`` with ``.model`` in eval mode (``model(idx)`` gives ``[B, T, vocab]`` logits),
        ``.tokenizer`` (a ``tokenizers.Tokenizer``), ``.config`` and ``.train_config``.

    Raises:
        RunError: missing or corrupt files, or an unknown format; the message names the file.
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise RunError(f"no run directory at {run_dir}")
    config, train_config = read_configs(run_dir)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise RunError(f"{run_dir} is not a usable linbias run: tokenizer.json is missing")
    model = GPT(config)
    _load_model_weights(model, _load_safetensors(run_dir / "model.safetensors"), run_dir)
    model.eval()
    corpus = _run_meta(run_dir).get("corpus")
    return Run(run_dir, model, load_tokenizer(tok_path), config, train_config, corpus)


# --- optimisation --------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices only (GPT-2 / nanoGPT); norms, biases and position tables are left alone.
    position = {id(p) for p in model.position.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in position]
    keep = [p for p in params if p.dim() < 2 or id(p) in position]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    sd["state"] = state
    opt.load_state_dict(sd)


# --- distributed ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    if world == 1:
        return _Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return _Dist(dist.get_rank(), dist.get_world_size(), device)


def _mean_across(value: float, d: _Dist) -> float:
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)  # nccl reduces CUDA tensors
    dist.all_reduce(t)
    return t.item() / d.world_size


@contextmanager
def _main_first(d: _Dist) -> Iterator[None]:
    """Rank 0 runs the block first; the other ranks wait for it, then run it (cache hits)."""
    if d.world_size > 1 and not d.main:
        dist.barrier()
    yield
    if d.world_size > 1 and d.main:
        dist.barrier()


# --- the loop ------------------------------------------------------------------------------------


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> torch.Tensor:
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with ctx:
        logits = model(x)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def _valid_loss(model: GPT, stream: np.ndarray, mc: ModelConfig, tc: TrainConfig, d: _Dist) -> float:
    model.eval()
    losses = []
    for i in range(tc.eval_batches):
        x, y = get_batch(stream, tc.batch_size, mc.train_len, seed=tc.seed + 1, step=i,
                         rank=d.rank, world_size=d.world_size)
        losses.append(_loss(model, x.to(d.device), y.to(d.device), tc.bf16).item())
    model.train()
    return _mean_across(float(np.mean(losses)), d)


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


def _check_new_out(out: Path) -> None:
    """A new run goes only into an absent or empty directory: nothing of the user's is replaced."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; choose another --out")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
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


def _check_streams(streams: dict[str, np.ndarray], mc: ModelConfig, tc: TrainConfig) -> None:
    # get_batch needs train_len + 1 tokens for one window; found here, not after the last step.
    for split, stream in streams.items():
        if len(stream) < mc.train_len + 1:
            raise RunError(
                f"the {split} split of {tc.data!r} has {len(stream)} tokens, fewer than one window "
                f"of train_len + 1 = {mc.train_len + 1}: use a larger corpus or a smaller --train-len"
            )


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    stop_after: Optional[int] = None,
) -> Path:
    """Train a GPT and write a run directory (see the module docstring).

    Args:
        model_config: the architecture; its ``vocab_size`` is replaced by the tokenizer's.
        train_config: optimisation, data and checkpoint settings.
        out: the run directory: absent or empty for a new run, an existing run with ``resume``.
        resume: continue the run in ``out`` from its last checkpoint, exactly.
        progress: show a progress bar (rank 0 only).
        cache_dir: where tokenizers and token streams are cached (default ``LINBIAS_CACHE`` or
            ``~/.cache/linbias``).
        stop_after: end after this many steps (as if killed there; for tests and time-boxing).

    Returns:
        The run directory.

    Raises:
        RunError: ``out`` is in the way or unusable, a split is too short, or the checkpoint or
            log to resume from is corrupt; all found before step 1.
        Diverged: a loss or the gradient norm stopped being finite (the last checkpoint is kept).
    """
    if stop_after is not None:
        check_int("stop_after", stop_after)
    d = _init_distributed()
    out, tc = Path(out), train_config
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if resume:
        mc = check_resume(out, model_config, tc)
        check_writable(out)
    else:
        _check_new_out(out)  # every rank, before rank 0 writes anything (see _main_first)
    corpus = load_corpus(tc.data)
    if resume:
        check_corpus(out, _run_meta(out).get("corpus"), corpus)
    elif d.main:
        for message in position_warnings(model_config):  # e.g. T5 buckets training never reaches
            warnings.warn(message, stacklevel=2)
    with _main_first(d):  # rank 0 fills the tokenizer and token caches; the others then read them
        if resume:
            tokenizer = load_tokenizer(out / "tokenizer.json")
        else:
            tokenizer = train_tokenizer(corpus, tc.vocab_size, cache_dir=cache)
            mc = ModelConfig.from_dict({**model_config.to_dict(), "vocab_size": tokenizer.get_vocab_size()})
        train_stream = token_stream(corpus, tokenizer, "train", cache)
        valid_stream = token_stream(corpus, tokenizer, "valid", cache)
    _check_streams({"train": train_stream, "valid": valid_stream}, mc, tc)
    mix = None if tc.mix_task is None else TaskMix(
        tc.mix_task, tc.mix_fraction, encoder(tokenizer),
        train_stream if tc.mix_filler == "corpus" else None)
    if mix is not None:
        mix.check(mc.train_len)  # a task that does not fit L fails now, not at its first row

    torch.manual_seed(tc.seed)
    model = GPT(mc).to(d.device)
    opt = _optimizer(model, tc)
    start = _restore(out, model, opt, tc, trim_log=d.main) if resume else 0
    if not resume and d.main:
        _start_run(out, tokenizer, mc, tc, corpus.name)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if d.world_size > 1 else model
    model.train()

    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    tokens_per_step = tc.batch_size * tc.grad_accum * d.world_size * mc.train_len
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and d.main), unit="step",
               dynamic_ncols=True)
    t0, window_tokens, rate = time.perf_counter(), 0, 0.0
    saved = start if resume else None  # the step of the last checkpoint, for Diverged's message
    try:
        for step in range(start, end):
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(tc.grad_accum):
                at = dict(seed=tc.seed, step=step * tc.grad_accum + micro, rank=d.rank,
                          world_size=d.world_size)
                x, y = get_batch(train_stream, tc.batch_size, mc.train_len, **at)
                if mix is not None:
                    mix.apply(x, y, **at)
                sync = micro == tc.grad_accum - 1 or d.world_size == 1
                with (nullcontext() if sync else ddp.no_sync()):
                    loss = _loss(ddp, x.to(d.device), y.to(d.device), tc.bf16) / tc.grad_accum
                    loss.backward()
                loss_sum += loss.item()
            done = step + 1
            # The loss is all-reduced and DDP's gradients are identical on every rank, so every
            # rank takes the same decision here and all stop together.
            record = {"step": done, "train_loss": _mean_across(loss_sum, d), "lr": lr}
            grad_norm = _clip_gradients(model, tc.grad_clip)
            if not (math.isfinite(record["train_loss"]) and math.isfinite(grad_norm)):
                raise _diverged(out, done, f"train loss {record['train_loss']}, gradient norm "
                                f"{grad_norm}", saved)
            opt.step()
            opt.zero_grad(set_to_none=True)
            window_tokens += tokens_per_step
            if tc.eval_every and done % tc.eval_every == 0 or done == tc.steps:
                record["valid_loss"] = _valid_loss(model, valid_stream, mc, tc, d)
                if not math.isfinite(record["valid_loss"]):
                    raise _diverged(out, done, f"valid loss {record['valid_loss']}", saved)
            save = bool(tc.save_every and done % tc.save_every == 0) or done == end
            if save and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise _diverged(out, done, "the weights are not finite", saved)
            if d.main:
                if done % tc.log_every == 0 or "valid_loss" in record or done == end:
                    # Tokens per second of training since the last log line.
                    rate = window_tokens / max(time.perf_counter() - t0, 1e-9)
                    record["tokens_per_s"] = rate
                    with open(out / "log.jsonl", "a") as f:  # before the checkpoint that covers it
                        f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{rate:.0f}")
                bar.update(1)
                if save:
                    _checkpoint(out, model, opt, done, previous=saved)
                if "tokens_per_s" in record:
                    t0, window_tokens = time.perf_counter(), 0
            if save:
                saved = done
    finally:
        bar.close()
    if d.world_size > 1:
        dist.barrier()
    return out


def _start_run(out: Path, tokenizer: Tokenizer, mc: ModelConfig, tc: TrainConfig,
               corpus: str) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        # config.json first: its format marker is what later proves the directory is a run.
        _write_json(out / "config.json", {"format": RUN_FORMAT, "model": mc.to_dict(),
                                          "train": tc.to_dict(), "corpus": corpus})
        save_tokenizer(tokenizer, out / "tokenizer.json")
        (out / "log.jsonl").write_text("")
    except OSError as exc:
        raise RunError(f"cannot write the run to {out} ({exc}); choose another --out") from exc


def _clip_gradients(model: GPT, max_norm: float) -> float:
    """The global gradient norm, before clipping to ``max_norm`` (0: no clipping)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0 and torch.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return norm.item()


def _diverged(out: Path, step: int, what: str, saved: Optional[int]) -> Diverged:
    kept = (f"its last checkpoint (step {saved}) is kept in {out}" if saved else
            "no checkpoint was written")
    return Diverged(f"training diverged at step {step} ({what}); {kept}. Train again into another "
                    "--out with a lower --lr, a longer --warmup or a --grad-clip")


def _checkpoint(out: Path, model: GPT, opt: torch.optim.Optimizer, step: int,
                previous: Optional[int]) -> None:
    weights = _state_dict(model)
    atomic_write(out / "model.safetensors", lambda f: f.write(save(weights)))
    state_name = _state_name(step)
    tensors = {**{f"model.{k}": v for k, v in weights.items()}, **_optimizer_tensors(opt),
               "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # every rank was seeded alike, so rank 0's state serves all
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    atomic_write(out / state_name, lambda f: f.write(save(tensors)))
    _write_json(out / "checkpoint.json", {"step": step, "data_step": step, "state": state_name,
                                          "sha256": _sha256(out / state_name)})
    # Only the state file this run verified or wrote itself: a name built here, never one read.
    if previous is not None and previous != step:
        (out / _state_name(previous)).unlink(missing_ok=True)


def _restore(out: Path, model: GPT, opt: torch.optim.Optimizer, tc: TrainConfig,
             trim_log: bool) -> int:
    """Load the last checkpoint into ``model`` and ``opt`` and return its step. Everything is
    verified before the log is trimmed, so a refused resume leaves the run as it was."""
    ckpt = read_checkpoint(out)
    if ckpt.step > tc.steps:
        raise RunError(f"{out / 'checkpoint.json'} is at step {ckpt.step}, past steps={tc.steps}; "
                       "cannot resume")
    state_path = out / ckpt.state
    if not state_path.is_file() or _sha256(state_path) != ckpt.sha256:
        raise RunError(f"{state_path} is missing, truncated or corrupt (checksum mismatch); cannot resume")
    kept = [line for line, record in _log_lines(out / "log.jsonl") if record["step"] <= ckpt.step]
    tensors = _load_safetensors(state_path)
    _load_model_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, state_path)
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


def _write_json_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(ln + "\n" for ln in lines))
