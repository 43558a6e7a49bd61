"""``linbias harness``: lm-eval's ``simple_evaluate`` on a linbias run or a transformers model, once
per scaling rule, writing lm-eval's results JSON and a short table."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from linbias.fileio import atomic_write_text
from linbias.harness import require_harness

__all__ = ["evaluate_harness", "harness_table"]

_OUT_FILES = ("results.json", "table.md")


def evaluate_harness(
    run: str | Path | None = None,
    *,
    hf: str | None = None,
    tasks: Sequence[str],
    rules: Sequence[str] = ("none",),
    max_length: int | None = None,
    out: str | Path,
    train_len: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    metadata: dict[str, Any] | None = None,
    gen_kwargs: str | None = None,
    log_samples: bool = True,
) -> dict[str, dict[str, Any]]:
    """lm-eval tasks on a run (or ``hf``, a transformers model) at L' = ``max_length``, per rule.

    Args:
        run: a run directory written by ``linbias train`` (or give ``hf``).
        hf: a transformers causal LM, a local directory or a Hub name.
        tasks: lm-eval task names: its own (``scrolls_qmsum``, ``longbench_qmsum``, ...) and
            linbias's (``linbias_qmsum``, ``linbias_passkey``, ``linbias_lines``).
        rules: scaling rules, one evaluation each (``none`` first is the paper's comparison).
        max_length: L', the longest input (default: the training length).
        out: folder to write: ``RULE/results.json`` (lm-eval's results, its samples under
            ``"samples"`` with ``log_samples``) per rule and ``table.md`` over all.
        train_len: ``hf`` only: its training length L (see ``LinbiasLM``).
        limit: documents per task (lm-eval's ``--limit``: a count, or a fraction below 1).
        batch_size: requests per forward.
        device: where the model runs (default: ``cuda`` if available).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (default: as loaded).
        metadata: task metadata (lm-eval's ``--metadata``), e.g. ``{"lengths": [1024]}`` for
            the retrieval tasks or ``{"qmsum_file": PATH}``.
        gen_kwargs: lm-eval's ``--gen_kwargs``, e.g. ``"max_gen_toks=64"``.
        log_samples: keep each document's prompt, generation and scores in the results.

    Returns:
        lm-eval's results dict per rule (with ``"seconds"``, the time taken).

    Raises:
        ImportError: lm-eval or rouge-score missing (the message names the install command).
        ValueError: neither or both of ``run`` and ``hf``, no task, ``out`` not writable, and the
            model's own errors (an unknown rule, a bad length).
    """
    require_harness()
    if (run is None) == (hf is None):
        raise ValueError("give either a run directory or hf=PATH_OR_NAME (one of them, not both)")
    if not tasks or not rules:
        raise ValueError("give at least one task and one scaling rule")
    out = _check_out(Path(out), rules)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from linbias.harness import TASKS_DIR
    from linbias.harness.lm import LinbiasLM

    source = {"run": str(run)} if run is not None else {"pretrained": str(hf)}
    # Built once: indexing lm-eval's own tasks takes seconds; each evaluation loads its tasks.
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={**source, **(metadata or {})})
    all_results = {}
    for rule in rules:
        started = time.perf_counter()
        lm = LinbiasLM(**source, train_len=train_len, rule=rule, max_length=max_length,
                       batch_size=batch_size, device=device, dtype=dtype)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                          task_manager=manager, gen_kwargs=gen_kwargs,
                                          log_samples=log_samples)
        results["seconds"] = time.perf_counter() - started
        results["linbias"] = {**source, "rule": rule, "max_length": lm.max_length,
                              "train_len": lm.backend.train_len}
        _write_json(out / rule / "results.json", results)
        all_results[rule] = results
    atomic_write_text(out / "table.md", harness_table(all_results) + "\n")
    return all_results


def harness_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per task and metric, one column per rule, then the seconds."""
    rules = list(results)
    rows = ["| task | metric | " + " | ".join(rules) + " |",
            "|---|---|" + "---:|" * len(rules)]
    first = results[rules[0]]["results"]
    for task in first:
        for key in first[task]:
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):
                continue
            values = [results[r]["results"].get(task, {}).get(key) for r in rules]
            rows.append(f"| {task} | {metric} | " + " | ".join(_cell(v) for v in values) + " |")
    rows.append("| time | seconds | " + " | ".join(f"{results[r]['seconds']:.1f}" for r in rules)
                + " |")
    return "\n".join(rows)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "—"


def _check_out(out: Path, rules: Sequence[str]) -> Path:
    """``out`` must be a new folder, or one holding only what this function writes."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder")
    if out.is_dir():
        ours = set(_OUT_FILES) | set(rules)
        foreign = [p.name for p in out.iterdir() if p.name not in ours and
                   not (p.is_dir() and (p / "results.json").is_file())]
        if foreign:
            raise ValueError(f"--out {out} holds files this command did not write "
                             f"({', '.join(sorted(foreign)[:3])}): give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, results: dict[str, Any]) -> None:
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
