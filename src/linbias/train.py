"""Train short: GPT training with any position method, checkpoints that resume exactly.

A run directory holds everything later commands need:

    config.json            {"format", "model": ModelConfig, "train": TrainConfig}
    tokenizer.json         the byte-level BPE tokenizer (Hugging Face ``tokenizers``)
    model.safetensors      the latest weights
    checkpoint.json        step, data position, RNG state, and the name of the state file below
    state-STEP.safetensors weights, optimizer moments (one file per checkpoint, the older removed)
    log.jsonl              one JSON object per logged step: step, train_loss, valid_loss, ...

Batches are a pure function of (seed, step, rank) (``data.get_batch``), so resuming needs only the
step, and ``torchrun`` ranks each read their own shard of one global batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from linbias.config import ConfigBase, ModelConfig, check_positive_float, check_int
from linbias.data import (
    atomic_write,
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

__all__ = [
    "RUN_FORMAT", "ConfigMismatch", "Run", "RunError", "TrainConfig", "check_resume", "load_run",
    "read_configs", "train",
]

RUN_FORMAT = "linbias-run/1"


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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            check_int(name, getattr(self, name))
        check_positive_float("lr", self.lr)
        for name in ("warmup", "eval_every", "save_every", "seed"):
            check_int(name, getattr(self, name), low=0)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class Run:
    """A trained run loaded from its directory: ``model`` (eval mode), ``tokenizer``, configs."""

    path: Path
    model: GPT
    tokenizer: Tokenizer
    config: ModelConfig
    train_config: TrainConfig


class RunError(ValueError):
    """A run directory that cannot be used (missing files, wrong format, mismatched resume)."""


class ConfigMismatch(RunError):
    """A resume whose settings differ from the run's saved ones."""


# --- files ---------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RunError(f"{path.parent} is not a usable linbias run: {path.name} is missing ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is corrupt ({exc}); delete the run or restore the file") from exc


def read_configs(run_dir: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs saved in a run directory."""
    run_dir = Path(run_dir)
    meta = _read_json(run_dir / "config.json", "the model and training configuration")
    if meta.get("format") != RUN_FORMAT:
        raise RunError(
            f"{run_dir}/config.json has format {meta.get('format')!r}, expected {RUN_FORMAT!r}: "
            "not a linbias run directory, or written by an incompatible version"
        )
    return ModelConfig.from_dict(meta["model"]), TrainConfig.from_dict(meta["train"])


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
    missing, unexpected = model.load_state_dict(tensors, strict=False)
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
    return Run(run_dir, model, load_tokenizer(tok_path), config, train_config)


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
    diff = sorted(k for k in saved if saved[k] != requested.get(k))
    if diff:
        raise ConfigMismatch(
            f"--resume with settings that differ from {out / 'config.json'} in: "
            + ", ".join(f"{k} (saved {saved[k]!r}, given {requested.get(k)!r})" for k in diff)
            + "; resume with the saved settings, or train into a new --out"
        )
    if not (out / "tokenizer.json").is_file():
        raise RunError(f"cannot resume {out}: tokenizer.json is missing")
    return saved_mc


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
        out: the run directory.
        resume: continue the run in ``out`` from its last checkpoint, exactly.
        progress: show a progress bar (rank 0 only).
        cache_dir: where tokenizers and token streams are cached (default ``LINBIAS_CACHE`` or
            ``~/.cache/linbias``).
        stop_after: end after this many steps (as if killed there; for tests and time-boxing).

    Returns:
        The run directory.
    """
    d = _init_distributed()
    out, tc = Path(out), train_config
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus = load_corpus(tc.data)
    if resume:
        mc = check_resume(out, model_config, tc)
    elif d.main and (out / "config.json").exists():
        raise RunError(f"{out} already holds a run: pass --resume to continue it, or choose a new --out")
    with _main_first(d):  # rank 0 fills the tokenizer and token caches; the others then read them
        if resume:
            tokenizer = load_tokenizer(out / "tokenizer.json")
        else:
            tokenizer = train_tokenizer(corpus, tc.vocab_size, cache_dir=cache)
            mc = ModelConfig.from_dict({**model_config.to_dict(), "vocab_size": tokenizer.get_vocab_size()})
        train_stream = token_stream(corpus, tokenizer, "train", cache)
        valid_stream = token_stream(corpus, tokenizer, "valid", cache)

    torch.manual_seed(tc.seed)
    model = GPT(mc).to(d.device)
    opt = _optimizer(model, tc)
    start = _restore(out, model, opt, trim_log=d.main) if resume else 0
    if not resume and d.main:
        out.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tokenizer, out / "tokenizer.json")
        _write_json(out / "config.json", {"format": RUN_FORMAT, "model": mc.to_dict(), "train": tc.to_dict()})
        (out / "log.jsonl").write_text("")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if d.world_size > 1 else model
    model.train()

    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    tokens_per_step = tc.batch_size * tc.grad_accum * d.world_size * mc.train_len
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and d.main), unit="step",
               dynamic_ncols=True)
    t0, window_tokens, rate = time.perf_counter(), 0, 0.0
    for step in range(start, end):
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = get_batch(train_stream, tc.batch_size, mc.train_len, seed=tc.seed,
                             step=step * tc.grad_accum + micro, rank=d.rank, world_size=d.world_size)
            sync = micro == tc.grad_accum - 1 or d.world_size == 1
            with (nullcontext() if sync else ddp.no_sync()):
                loss = _loss(ddp, x.to(d.device), y.to(d.device), tc.bf16) / tc.grad_accum
                loss.backward()
            loss_sum += loss.item()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window_tokens += tokens_per_step
        done = step + 1
        record = {"step": done, "train_loss": _mean_across(loss_sum, d), "lr": lr}
        if tc.eval_every and done % tc.eval_every == 0 or done == tc.steps:
            record["valid_loss"] = _valid_loss(model, valid_stream, mc, tc, d)
        if d.main:
            if done % tc.log_every == 0 or "valid_loss" in record or done == end:
                # Tokens per second of training since the last log line.
                rate = window_tokens / max(time.perf_counter() - t0, 1e-9)
                record["tokens_per_s"] = rate
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if (tc.save_every and done % tc.save_every == 0) or done == end:
                _checkpoint(out, model, opt, done)
            if "tokens_per_s" in record:
                t0, window_tokens = time.perf_counter(), 0
    bar.close()
    if d.world_size > 1:
        dist.barrier()
    return out


def _checkpoint(out: Path, model: GPT, opt: torch.optim.Optimizer, step: int) -> None:
    weights = _state_dict(model)
    atomic_write(out / "model.safetensors", lambda f: f.write(save(weights)))
    state_name = f"state-{step:08d}.safetensors"
    tensors = {**{f"model.{k}": v for k, v in weights.items()}, **_optimizer_tensors(opt),
               "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # every rank was seeded alike, so rank 0's state serves all
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    atomic_write(out / state_name, lambda f: f.write(save(tensors)))
    previous = out / "checkpoint.json"
    old = json.loads(previous.read_text())["state"] if previous.is_file() else None
    _write_json(previous, {"step": step, "data_step": step, "state": state_name,
                           "sha256": _sha256(out / state_name)})
    if old and old != state_name:
        (out / old).unlink(missing_ok=True)


def _restore(out: Path, model: GPT, opt: torch.optim.Optimizer, trim_log: bool) -> int:
    ckpt = _read_json(out / "checkpoint.json", "the last checkpoint; the run never saved one")
    if not isinstance(ckpt.get("state"), str) or not isinstance(ckpt.get("step"), int):
        raise RunError(f"{out / 'checkpoint.json'} is corrupt (no state file or step); cannot resume")
    state_path = out / ckpt["state"]
    if not state_path.is_file() or _sha256(state_path) != ckpt.get("sha256"):
        raise RunError(f"{state_path} is missing, truncated or corrupt (checksum mismatch); cannot resume")
    tensors = _load_safetensors(state_path)
    _load_model_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, state_path)
    _restore_optimizer(opt, tensors)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    step = ckpt["step"]
    if trim_log:
        _trim_log(out / "log.jsonl", step)
    return step


def _trim_log(log: Path, step: int) -> None:
    """Keep the log lines up to the checkpoint: the resumed run writes the later ones again. A
    line torn by the kill (the last one) is dropped too."""
    kept = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    _write_json_lines(log, kept)


def _write_json_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(ln + "\n" for ln in lines))
