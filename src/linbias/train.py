"""Train short: GPT training with any position method, checkpoints that resume exactly.

``train`` writes a run directory (``linbias.runs``: its files, how each is written and checked).
Batches are a pure function of (seed, step, rank) (``data.get_batch``; the task mix of
``linbias.tasks.TaskMix`` too), so resuming needs only the step, and ``torchrun`` ranks each read
their own shard of one global batch.

Fine-tuning (``TrainConfig.init_from``): a new run starts from a finished run's weights and
tokenizer at another training length, with a fresh optimizer, schedule and step count; its config
records its parent (``linbias.runs.Lineage``) and its first checkpoint is step 0.

What a command may touch: a new run goes only into an absent or empty directory. A resume writes
only a run's own files, into a directory that proves to be a run, and deletes only state files
whose name it wrote (``state-`` and the zero-padded step); anything else in the way is an error
naming the path. Every check that can fail (settings, the directory, the length of both token
streams, the task mix, the checkpoint and the log) runs before step 1, and a resume verifies all
of it before it trims the log. A run whose loss or gradient norm stops being finite ends with
``Diverged``, keeping its last checkpoint: one is never written from non-finite weights, nor after
a non-finite validation loss.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from linbias.checks import check_int
from linbias.config import ModelConfig, TrainConfig
from linbias.data import (
    default_cache_dir, get_batch, load_corpus, load_tokenizer, token_stream, train_tokenizer,
)
from linbias.model import GPT
from linbias.positions import position_warnings
from linbias import runs
from linbias.deprecation import moved
from linbias.tasks import TaskMix, encoder

__all__ = ["Diverged", "lr_at", "train"]

# The run-directory API lived here before ``linbias.runs``.
__getattr__ = moved(__name__, dict.fromkeys(
    ("RUN_FORMAT", "Checkpoint", "ConfigMismatch", "Run", "RunError", "check_corpus",
     "check_resume", "check_run_dir", "check_writable", "load_run", "read_checkpoint",
     "read_configs", "read_log", "remove_run"), "linbias.runs"))

class Diverged(RuntimeError):
    """Training stopped because a loss or the gradient norm stopped being finite."""


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


def _check_streams(streams: dict[str, np.ndarray], mc: ModelConfig, tc: TrainConfig) -> None:
    # get_batch needs train_len + 1 tokens for one window; found here, not after the last step.
    for split, stream in streams.items():
        if len(stream) < mc.train_len + 1:
            raise runs.RunError(
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
        train_config: optimisation, data and checkpoint settings; with ``init_from``, the run
            starts from that finished run's weights and tokenizer (``model_config`` may change
            only what the weights do not fix; see ``TrainConfig``).
        out: the run directory: absent or empty for a new run, an existing run with ``resume``.
        resume: continue the run in ``out`` from its last checkpoint, exactly.
        progress: show a progress bar (rank 0 only).
        cache_dir: where tokenizers and token streams are cached (default ``LINBIAS_CACHE`` or
            ``~/.cache/linbias``).
        stop_after: end after this many steps (as if killed there; for tests and time-boxing).

    Returns:
        The run directory.

    Raises:
        linbias.runs.RunError: ``out`` is in the way or unusable, a split is too short, the checkpoint or
            log to resume from is corrupt, or the run to fine-tune from is unfinished, corrupt or
            conflicts with the settings; all found before step 1.
        Diverged: a loss or the gradient norm stopped being finite (the last checkpoint is kept).
    """
    if stop_after is not None:
        check_int("stop_after", stop_after)
    d = _init_distributed()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise runs.RunError(f"--out {out} is a file, not a directory; choose another --out")
    runs.check_writable(out)
    # One writer per run: rank 0 holds the lock from before the first check to the end.
    with runs.writing(out) if d.main else nullcontext():
        return _train(d, model_config, train_config, out, resume, progress, cache_dir, stop_after)


def _train(d: _Dist, model_config: ModelConfig, tc: TrainConfig, out: Path, resume: bool,
           progress: bool, cache_dir: str | Path | None, stop_after: Optional[int]) -> Path:
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if resume:
        mc = runs.check_resume(out, model_config, tc)
        runs.check_writable(out)
    parent = None if resume or tc.init_from is None else _check_init_from(out, model_config, tc)
    if not resume:
        runs.check_new_out(out)  # every rank, before rank 0 writes anything (see _main_first)
    corpus = load_corpus(tc.data)
    corpus.check_outside(out)
    if resume:
        corpus = runs.check_corpus(out, runs.recorded_corpus(out), corpus,
                                   runs.recorded_split_rule(out))
    elif d.main:
        for message in position_warnings(model_config):  # e.g. T5 buckets training never reaches
            warnings.warn(message, stacklevel=2)
    with _main_first(d):  # rank 0 fills the tokenizer and token caches; the others then read them
        if resume:
            tokenizer = load_tokenizer(out / "tokenizer.json")
        elif parent is not None:
            tokenizer = parent.tokenizer
            mc = ModelConfig.from_dict({**model_config.to_dict(), "vocab_size": parent.config.vocab_size})
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
    model = (GPT(mc) if parent is None else runs.child_model(parent, mc)).to(d.device)
    opt = _optimizer(model, tc)
    start = runs.restore_checkpoint(out, model, opt, tc, trim_log=d.main) if resume else 0
    if not resume and d.main:
        runs.start_run(out, tokenizer, mc, tc, corpus,
                  None if parent is None else runs.lineage_of(parent.path))
        if parent is not None:  # step 0: a kill before the first save still resumes
            runs.save_checkpoint(out, model, opt, 0, previous=None)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if d.world_size > 1 else model
    model.train()

    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    tokens_per_step = tc.batch_size * tc.grad_accum * d.world_size * mc.train_len
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and d.main), unit="step",
               dynamic_ncols=True)
    t0, window_tokens, rate = time.perf_counter(), 0, 0.0
    # The step of the last checkpoint, for Diverged's message and the next save's clean-up.
    saved = start if resume or parent is not None else None
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
                    runs.append_log(out, record)  # before the checkpoint that covers it
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{rate:.0f}")
                bar.update(1)
                if save:
                    runs.save_checkpoint(out, model, opt, done, previous=saved)
                if "tokens_per_s" in record:
                    t0, window_tokens = time.perf_counter(), 0
            if save:
                saved = done
    finally:
        bar.close()
    if d.world_size > 1:
        dist.barrier()
    return out


def _check_init_from(out: Path, mc: ModelConfig, tc: TrainConfig) -> runs.Run:
    """The parent of a fine-tune, loaded and checked against the requested settings."""
    parent_dir = Path(str(tc.init_from))
    if parent_dir.resolve() == out.resolve():
        raise runs.RunError(f"--out {out} is the run to start from: a fine-tune goes into a new --out")
    parent = runs.check_parent(parent_dir)
    if tc.vocab_size != parent.train_config.vocab_size:
        raise runs.RunError(
            f"a fine-tune keeps the tokenizer of {parent_dir} (vocab_size "
            f"{parent.train_config.vocab_size}), given vocab_size={tc.vocab_size}: drop "
            "--vocab-size, or train a new run to change the tokenizer"
        )
    runs.check_child_config(parent, ModelConfig.from_dict(
        {**mc.to_dict(), "vocab_size": parent.config.vocab_size}))
    return parent


def _clip_gradients(model: GPT, max_norm: float) -> float:
    """The global gradient norm, before clipping to ``max_norm`` (0: no clipping)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0 and torch.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return norm.item()


def _diverged(out: Path, step: int, what: str, saved: Optional[int]) -> Diverged:
    kept = (f"its last checkpoint (step {saved}) is kept in {out}" if saved is not None else
            "no checkpoint was written")
    return Diverged(f"training diverged at step {step} ({what}); {kept}. Train again into another "
                    "--out with a lower --lr, a longer --warmup or a --grad-clip")
