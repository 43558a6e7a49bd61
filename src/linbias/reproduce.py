"""One command for the ALiBi paper's train-short / test-long experiment (Press et al. 2022, fig. 1).

Trains one model per position method at the same training length ``L`` with equal token budgets
and seeds, evaluates each at ``L, 2L, 4L, 8L, 16L`` with and without each scaling rule the method
supports (ALiBi's slope rules, Al-Khateeb et al. 2023; rotary's position interpolation), and
writes ``results.json``, ``report.md`` and ``ppl_vs_length.png``. Finished runs and evaluations are
reused when the command is repeated.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from linbias.config import POSITIONS, ConfigBase, model_config
from linbias.data import atomic_write_text, load_corpus
from linbias.evaluate import evaluate_run
from linbias.positions import POSITION_METHODS
from linbias.report import (
    beyond_table,
    describe_finding,
    finding,
    markdown_table,
    plot_ppl_vs_length,
)
from linbias.train import ConfigMismatch, TrainConfig, check_resume, load_run, read_configs, train

__all__ = ["ReproducePreset", "REPRODUCE_PRESETS", "reproduce"]


@dataclass(frozen=True, kw_only=True)
class ReproducePreset(ConfigBase):
    """One size of the experiment.

    Args:
        model: model preset name (``linbias.config.PRESETS``).
        train_len: the training length L.
        steps: optimizer steps per model.
        batch_size: sequences per step.
        lr: peak learning rate.
        warmup: warmup steps.
        vocab_size: BPE vocabulary size.
        bf16: bfloat16 autocast in training (evaluation runs in float32).
        multiples: evaluation lengths as multiples of L.
        eval_tokens: tokens scored per evaluation (a prefix of the split; 0 means all).
        eval_batch_size: windows per forward when evaluating.
        expected_minutes: wall time on a 2-core CPU, end to end (measured for ``quick``;
            estimated from the measured step time for ``paper-small``).
    """

    model: str
    train_len: int
    steps: int
    batch_size: int
    lr: float = 2e-3
    warmup: int = 50
    vocab_size: int = 4096
    bf16: bool = False
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    eval_tokens: int = 0
    eval_batch_size: int = 8
    expected_minutes: float = 0.0


REPRODUCE_PRESETS: dict[str, ReproducePreset] = {
    "quick": ReproducePreset(model="tiny", train_len=64, steps=2000, batch_size=16, lr=2e-3,
                             warmup=100, vocab_size=2048, bf16=True, expected_minutes=8),
    "paper-small": ReproducePreset(model="small", train_len=256, steps=5000, batch_size=32,
                                   lr=1e-3, warmup=250, bf16=True, expected_minutes=810),
}


def _rules(position: str) -> list[str]:
    return list(POSITION_METHODS[position].scaling_rules)


def _finished(run_dir: Path, steps: int) -> bool:
    try:
        return json.loads((run_dir / "checkpoint.json").read_text()).get("step") == steps
    except (OSError, json.JSONDecodeError):
        return False


def _train_one(position: str, p: ReproducePreset, data: str, seed: int, run_dir: Path,
               force: bool, cache_dir: Optional[Path], progress: bool,
               log: Callable[[str], None]) -> dict[str, Any]:
    mc = model_config(p.model, position=position, train_len=p.train_len)
    tc = TrainConfig(data=data, vocab_size=p.vocab_size, steps=p.steps, batch_size=p.batch_size,
                     lr=p.lr, warmup=p.warmup, seed=seed, bf16=p.bf16, eval_every=0, eval_batches=8,
                     save_every=max(1, p.steps // 4), log_every=10)
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    if (run_dir / "config.json").is_file():
        try:
            check_resume(run_dir, mc, tc)
        except ConfigMismatch as exc:  # a run of another preset, corpus or seed: not reusable
            log(f"[{position}] retraining: {exc}")
            shutil.rmtree(run_dir)
    start = time.perf_counter()
    if not _finished(run_dir, p.steps):
        resume = (run_dir / "checkpoint.json").is_file()
        if not resume and run_dir.exists():  # a run that never saved a checkpoint
            shutil.rmtree(run_dir)
        train(mc, tc, run_dir, resume=resume, progress=progress, cache_dir=cache_dir)
    saved_mc, saved_tc = read_configs(run_dir)
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x]
    return {
        "position": position, "steps": saved_tc.steps, "train_len": saved_mc.train_len,
        "tokens": saved_tc.steps * saved_tc.batch_size * saved_mc.train_len,
        "final_train_loss": lines[-1]["train_loss"], "final_valid_loss": lines[-1].get("valid_loss"),
        "seconds_this_invocation": round(time.perf_counter() - start, 1), "run": str(run_dir),
    }


def _evaluate_one(run_dir: Path, p: ReproducePreset, force: bool, cache_dir: Optional[Path],
                  progress: bool) -> list[dict[str, Any]]:
    cached = run_dir / "eval.json"
    settings = {"multiples": list(p.multiples), "eval_tokens": p.eval_tokens, "per_position": True,
                "weights_sha": (run_dir / "checkpoint.json").read_text()}
    if cached.is_file() and not force:
        try:
            saved = json.loads(cached.read_text())
        except json.JSONDecodeError:  # unreadable: evaluate again
            saved = {}
        if saved.get("settings") == settings:
            return saved["results"]
    run = load_run(run_dir)
    records = evaluate_run(
        run, lengths=[m * p.train_len for m in p.multiples], split="valid",
        scalings=_rules(run.config.position), batch_size=p.eval_batch_size,
        max_tokens=p.eval_tokens or None, per_position=True, cache_dir=cache_dir, progress=progress,
    )
    atomic_write_text(cached, json.dumps({"settings": settings, "results": records}, indent=1))
    return records


def reproduce(
    preset: str = "quick",
    out: str | Path = "reports/quick",
    *,
    data: str = "stdlib",
    seed: int = 0,
    positions: tuple[str, ...] = POSITIONS,
    force: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train each position method short, test it long, and write the report.

    Args:
        preset: a key of ``REPRODUCE_PRESETS``.
        out: the report directory (runs go to ``out/runs/POSITION``).
        data: corpus spec (default: the Python standard library, no download).
        seed: the same seed for every method.
        positions: which methods to compare.
        force: retrain and re-evaluate even where finished results exist.
        cache_dir: tokenizer and token-stream cache.
        progress: progress bars.
        log: where one-line progress messages go.

    Returns:
        The content of ``results.json``.
    """
    if preset not in REPRODUCE_PRESETS:
        raise ValueError(f"unknown reproduce preset {preset!r}; valid: {', '.join(REPRODUCE_PRESETS)}")
    unknown = sorted(set(positions) - set(POSITIONS))
    if unknown:
        raise ValueError(f"unknown position methods {unknown}; valid: {', '.join(POSITIONS)}")
    p, out = REPRODUCE_PRESETS[preset], Path(out)
    cache = Path(cache_dir) if cache_dir is not None else None
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    training, records = [], []
    for position in positions:
        run_dir = out / "runs" / position
        log(f"[{position}] training ({p.steps} steps of {p.batch_size} x {p.train_len} tokens)")
        training.append(_train_one(position, p, data, seed, run_dir, force, cache, progress, log))
        log(f"[{position}] evaluating at {', '.join(str(m * p.train_len) for m in p.multiples)}")
        records += _evaluate_one(run_dir, p, force, cache, progress)
    results = {
        "preset": {"name": preset, **p.to_dict()}, "data": data, "seed": seed,
        "corpus": load_corpus(data).describe(), "machine": _machine(),
        "seconds": round(time.perf_counter() - started, 1), "training": training,
        "finding": finding(records, p.train_len), "results": records,
    }
    _write_report(out, results, p)
    log(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'ppl_vs_length.png'}")
    return results


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def _write_report(out: Path, results: dict[str, Any], p: ReproducePreset) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    plot_ppl_vs_length(results["results"], p.train_len, out / "ppl_vs_length.png",
                       title=f"Train short (L={p.train_len}), test long — preset {results['preset']['name']}")
    atomic_write_text(out / "report.md", _report_md(results, p))


def _report_md(results: dict[str, Any], p: ReproducePreset) -> str:
    t = results["training"]
    corpus = results["corpus"]
    tokens = t[0]["tokens"] if t else 0
    m = results["machine"]
    return f"""# Train short, test long — preset `{results['preset']['name']}`

Perplexity on the validation split (non-overlapping windows of L'), one model per position method,
all trained at L = {p.train_len} tokens.

{markdown_table(results['results'], p.train_len)}

![perplexity against evaluation length](ppl_vs_length.png)

## The paper's finding (Press et al. 2022, figure 1)

{describe_finding(results['finding'], results['results'])}

Where the loss goes: mean loss (nats) per token at L' = 4L, by position inside the window. Tokens
before L/2 are left out (they have little context whatever the method: the early-token curse).

{beyond_table(results['results'], p.train_len)}

## How it was made

- Corpus: `{results['data']}` — train {corpus['train']['documents']} documents
  ({corpus['train']['bytes']:,} bytes), valid {corpus['valid']['documents']} documents
  ({corpus['valid']['bytes']:,} bytes); byte-level BPE, vocabulary {p.vocab_size}.
- Model: preset `{p.model}`; each method trained {p.steps} steps x {p.batch_size} sequences x
  {p.train_len} tokens = {tokens:,} tokens, AdamW, peak lr {p.lr}, warmup {p.warmup}, cosine
  decay, seed {results['seed']} for every method.
- Evaluation: {f'the first {p.eval_tokens}' if p.eval_tokens else 'all'} tokens of the validation split, non-overlapping
  windows of L' = {', '.join(f'{k}L' for k in p.multiples)}; every scored token counted.
  `learned` is evaluated only where its table reaches. Rules: ALiBi slopes x L/L' (`linear`,
  Al-Khateeb et al. 2023), x sqrt(L/L') (`sqrt`), x log L / log L' (`log`); rotary positions
  x L/L' (`linear`, Chen et al. 2023). Rules act only when L' > L.
- Machine: {m['processor']}, {m['threads']} threads, torch {m['torch']}, Python {m['python']}.
  Total time of this invocation: {results['seconds']:.0f} s (finished runs are reused).
- Reproduce: `linbias reproduce --preset {results['preset']['name']} --out OUT`.
"""
