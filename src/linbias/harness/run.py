"""``linbias harness``: lm-eval's ``simple_evaluate`` on a linbias run or a transformers model, once
per scaling rule, writing lm-eval's results JSON and a short table."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from linbias.fileio import LOCK_NAME, atomic_write_text, locked_folder, owning_folder, stamp_of
from linbias.harness import require_harness

__all__ = ["evaluate_harness", "harness_table"]

# The stamp of a results.json this command wrote: only such a file (and its folder) is replaced.
HARNESS_JSON = "linbias harness"
_TABLE_HEAD = "| task | metric |"


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
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder")
    with locked_folder(out, f"the harness output {out}"):  # one writer; checked under the lock
        _check_out(out)
        return _evaluate(run, hf, tasks, rules, max_length, out, train_len, limit, batch_size,
                         device, dtype, metadata, gen_kwargs, log_samples)


def _evaluate(run: str | Path | None, hf: str | None, tasks: Sequence[str],
              rules: Sequence[str], max_length: int | None, out: Path, train_len: int | None,
              limit: int | float | None, batch_size: int, device: str | None, dtype: str | None,
              metadata: dict[str, Any] | None, gen_kwargs: str | None,
              log_samples: bool) -> dict[str, dict[str, Any]]:
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
        results["written_by"] = HARNESS_JSON
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


def _check_out(out: Path) -> None:
    """``out`` may hold only what this command writes: ``table.md`` and one folder per rule with
    a ``results.json`` it stamped; never inside a run or an export."""
    whole = owning_folder(out)
    if whole is not None:
        raise ValueError(f"--out {out} is inside {whole}, a linbias run or export whose files must "
                         "stay as written: choose an --out outside it")
    foreign = [p.name for p in out.iterdir() if p.name != LOCK_NAME and not _ours(p)]
    if foreign:
        raise ValueError(f"--out {out} holds files this command did not write "
                         f"({', '.join(sorted(foreign)[:3])}): give a new or empty folder")


def _ours(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.name == "table.md" and path.is_file():
        with open(path, "rb") as f:
            return f.read(len(_TABLE_HEAD)) == _TABLE_HEAD.encode()
    return path.is_dir() and [p.name for p in path.iterdir()] == ["results.json"] and \
        stamp_of(path / "results.json") == HARNESS_JSON


def _write_json(path: Path, results: dict[str, Any]) -> None:
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
