"""One command for the ALiBi paper's train-short / test-long experiment (Press et al. 2022, fig. 1).

Trains one model per position method at the same training length ``L`` with equal token budgets
and seeds, evaluates each at ``L, 2L, 4L, 8L, 16L`` with and without each scaling rule the method
supports (ALiBi's slope rules, Al-Khateeb et al. 2023; rotary's position interpolation), and
writes ``results.json``, ``report.md`` and ``ppl_vs_length.png``. Finished runs and evaluations are
reused when the command is repeated.

What it may touch: every argument is checked, and every run folder ``OUT/runs/METHOD`` is
classified, before anything is written or removed. A folder that is not provably a linbias run (a
``config.json`` of format ``linbias-run/1`` and only the files a run writes, see
``train.check_run_dir``) is never deleted, with or without ``--force``: it is an error that names
it. A run trained with other settings is an error too; ``--force`` replaces it, file by file, as
it replaces any provable run. The one run replaced without ``--force`` is a matching one that
never saved a checkpoint: nothing of it can be resumed. The three report files are replaced only
when they carry the signature this module writes.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch

from linbias.checks import check_int
from linbias.config import REPRODUCE_PRESETS, ModelConfig, ReproducePreset, TrainConfig, model_config
from linbias.data import Corpus, load_corpus
from linbias.fileio import locked_folder, owning_folder, write_json
from linbias.evaluate import (
    RunModel,
    attention_profile,
    needle_map,
    evaluate_run,
    evaluate_run_task,
    json_record,
    merge_cells,
    retrieval_summary,
    run_stream,
)
from linbias.positions import POSITION_METHODS
from linbias.tasks import encoder
from linbias.report import REPORT_TITLE, finding, write_report
from linbias.runs import (
    ConfigMismatch,
    last_checkpoint,
    child_configs,
    RunError,
    check_resume,
    check_run_dir,
    check_writable,
    child_model,
    load_run,
    read_checkpoint,
    read_configs,
    read_log,
    remove_run,
)
from linbias.train import train

__all__ = ["preset_run", "reproduce"]


def _rules(position: str, p: ReproducePreset, rules: Optional[tuple[str, ...]] = None
           ) -> list[str]:
    """The preset's rules (or ``rules``) that ``position`` has (its own error for any other)."""
    return [r for r in (p.rules if rules is None else rules)
            if r.partition(":")[0] in POSITION_METHODS[position].rules]


# reproduce's own file in a run directory: a run holding it is still provably a run.
_EVAL_FILE = "eval.json"
_RETRIEVAL_FILE = "retrieval.json"
_PROFILE_FILE = "profile.json"
_MAP_FILE = "needle_map.json"
_SLIDING_FILE = "sliding.json"
# The fine-tune study's evaluations: in a fine-tuned run, and in a parent for its 0-step children.
_FINETUNE_FILE = "finetune.json"
_FINETUNE0_FILES = {mode: f"finetune0-{mode}.json" for mode in ("plain", "fixed")}
_OWN_FILES = (_EVAL_FILE, _RETRIEVAL_FILE, _PROFILE_FILE, _MAP_FILE, _SLIDING_FILE, _FINETUNE_FILE,
              *_FINETUNE0_FILES.values())

Action = Literal["train", "resume", "reuse", "restart", "replace"]
_SAY: dict[str, str] = {
    "train": "training", "resume": "resuming from its last checkpoint",
    "reuse": "reusing the finished run", "restart": "restarting (it never saved a checkpoint)",
    "replace": "retraining (--force)",
}


def _configs(position: str, p: ReproducePreset, data: str, seed: int) -> tuple[ModelConfig, TrainConfig]:
    t5 = {} if p.t5_max_distance is None else {"t5_max_distance": p.t5_max_distance}
    depth = {} if p.n_layers is None else {"n_layers": p.n_layers}
    mc = model_config(p.model, position=position, train_len=p.train_len, embedding=p.embedding,
                      **t5, **depth)
    tc = TrainConfig(data=data, vocab_size=p.vocab_size, steps=p.steps, batch_size=p.batch_size,
                     lr=p.lr, warmup=p.warmup, seed=seed, bf16=p.bf16, eval_every=0, eval_batches=8,
                     save_every=max(1, p.steps // 4), log_every=10, mix_task=p.task,
                     mix_fraction=p.task_fraction if p.task else 0.0)
    return mc, tc


def _plan(run_dir: Path, mc: ModelConfig, tc: TrainConfig, force: bool) -> Action:
    """What to do with ``run_dir``, decided before anything is written; an error for a folder
    that may not be touched."""
    empty = run_dir.is_dir() and not run_dir.is_symlink() and not any(run_dir.iterdir())
    if empty or not (run_dir.exists() or run_dir.is_symlink()):
        return "train"
    try:
        check_run_dir(run_dir, extra=_OWN_FILES)
    except RunError as exc:
        raise RunError(f"{exc}; reproduce deletes only its own runs, so it stops here: move it "
                       "away or choose another --out") from exc
    if force:
        return "replace"
    try:
        check_resume(run_dir, mc, tc)
        ckpt = last_checkpoint(run_dir)
        if ckpt is None:
            return "restart"
        step = ckpt.step
        if step == tc.steps:
            _final_record(run_dir, tc.steps)
    except ConfigMismatch as exc:
        raise RunError(f"{run_dir} holds a linbias run trained with other settings "
                       f"({', '.join(exc.differences)}): pass --force to replace it, or choose "
                       "another --out") from exc
    except RunError as exc:
        raise RunError(f"{exc}; pass --force to replace this run, or choose another --out") from exc
    return "reuse" if step == tc.steps else "resume"


def _final_record(run_dir: Path, steps: int) -> dict[str, Any]:
    lines = read_log(run_dir)
    if not lines or lines[-1]["step"] != steps or "valid_loss" not in lines[-1]:
        raise RunError(f"{run_dir / 'log.jsonl'} does not end with the record of step {steps} "
                       "and its valid_loss")
    return lines[-1]


def _train_one(position: str, mc: ModelConfig, tc: TrainConfig, action: Action, run_dir: Path,
               cache_dir: Optional[Path], progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    if action in ("restart", "replace"):
        remove_run(run_dir, extra=_OWN_FILES)
    if action != "reuse":
        train(mc, tc, run_dir, resume=action == "resume", progress=progress, cache_dir=cache_dir)
    saved_mc, saved_tc = read_configs(run_dir)
    last = _final_record(run_dir, saved_tc.steps)
    return {
        "position": position, "steps": saved_tc.steps, "train_len": saved_mc.train_len,
        "tokens": saved_tc.steps * saved_tc.batch_size * saved_mc.train_len,
        "final_train_loss": last["train_loss"], "final_valid_loss": last["valid_loss"],
        "seconds_this_invocation": round(time.perf_counter() - start, 1), "run": str(run_dir),
    }


def _cached(path: Path, settings: dict[str, Any], force: bool,
            compute: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``compute()``'s records, kept in ``path`` with the settings they were made with."""
    if path.is_file() and not force:
        try:
            saved = json.loads(path.read_text())
        except ValueError:  # unreadable (not JSON, not UTF-8): evaluate again
            saved = None
        if isinstance(saved, dict) and saved.get("settings") == settings and \
                isinstance(saved.get("results"), list):
            return saved["results"]
    records = [json_record(r) for r in compute()]  # strict JSON: a non-finite number is null
    write_json(path, {"settings": settings, "results": records})
    return records


def _evaluate_one(run_dir: Path, p: ReproducePreset, force: bool, cache_dir: Optional[Path],
                  progress: bool) -> list[dict[str, Any]]:
    rules = _rules(read_configs(run_dir)[0].position, p)
    settings = {"multiples": list(p.multiples), "eval_tokens": p.eval_tokens, "per_position": True,
                "weights_sha": read_checkpoint(run_dir).sha256, **_rule_setting(p)}
    return _cached(run_dir / _EVAL_FILE, settings, force, lambda: evaluate_run(
        run_dir, lengths=[m * p.train_len for m in p.multiples], split="valid",
        rules=rules, batch_size=p.eval_batch_size,
        max_tokens=p.eval_tokens or None, per_position=True, cache_dir=cache_dir, progress=progress,
    ))


def _retrieve_one(run_dir: Path, p: ReproducePreset, force: bool,
                  progress: bool) -> list[dict[str, Any]]:
    rules = _rules(read_configs(run_dir)[0].position, p)
    settings = {"task": p.task, "multiples": list(p.multiples), "depths": list(p.depths),
                "trials": p.trials, "weights_sha": read_checkpoint(run_dir).sha256,
                **_rule_setting(p)}
    return _cached(run_dir / _RETRIEVAL_FILE, settings, force, lambda: evaluate_run_task(
        run_dir, task=str(p.task), lengths=[m * p.train_len for m in p.multiples],
        depths=p.depths, trials=p.trials, rules=rules,
        batch_size=p.eval_batch_size, progress=progress,
    ))


def _profile_one(run_dir: Path, p: ReproducePreset, force: bool,
                 cache_dir: Optional[Path]) -> list[dict[str, Any]]:
    rules = _rules(read_configs(run_dir)[0].position, p)
    settings = {"profile_windows": p.profile_windows, "eval_len": p.profile_multiple * p.train_len,
                "weights_sha": read_checkpoint(run_dir).sha256, **_rule_setting(p)}

    def compute() -> list[dict[str, Any]]:
        run = load_run(run_dir)
        stream = run_stream(run, run.train_config.data, "valid", cache_dir)  # held out still
        T = p.profile_multiple * p.train_len
        if run.model.position.max_len is not None and T > run.model.position.max_len:
            return []  # e.g. learned positions: no attention at all past their table
        if len(stream) < p.profile_windows * T:
            raise ValueError(f"the valid split has {len(stream)} tokens; the attention profile "
                             f"needs {p.profile_windows} windows of {T}")
        windows = torch.from_numpy(np.asarray(stream[: p.profile_windows * T], dtype=np.int64))
        return attention_profile(RunModel(run), windows.view(p.profile_windows, T),
                                 rules=rules)
    return _cached(run_dir / _PROFILE_FILE, settings, force, compute)


def _rule_setting(p: ReproducePreset) -> dict[str, Any]:
    # Caches written before presets named their rules ran every rule of the method, which were
    # the default rules: with those, an old cache still matches.
    default = dataclasses.fields(ReproducePreset)
    rules = next(f.default for f in default if f.name == "rules")
    return {} if tuple(p.rules) == rules else {"rules": list(p.rules)}


def _map_one(run_dir: Path, p: ReproducePreset, force: bool, progress: bool,
             rules: Optional[tuple[str, ...]] = None, controls: bool = True
             ) -> list[dict[str, Any]]:
    rules = _rules(read_configs(run_dir)[0].position, p, rules)
    lengths = [m * p.train_len for m in p.multiples]
    controls = ["none", p.train_len] if controls else []  # the instruction left out, or within L
    settings = {"lengths": lengths, "distances": list(p.map_distances), "trials": p.map_trials,
                "rules": rules, "weights_sha": read_checkpoint(run_dir).sha256,
                "instruction_controls": controls}

    def compute() -> list[dict[str, Any]]:
        run = load_run(run_dir)
        common = dict(lengths=lengths, trials=p.map_trials, rules=rules,
                      batch_size=p.eval_batch_size, progress=progress)
        model, encode = RunModel(run), encoder(run.tokenizer)
        out = needle_map(model, encode, distances=p.map_distances, **common)
        # Controls at the nearest distance: is the needle, or the instruction, what is lost?
        for instruction in controls:
            out += needle_map(model, encode, distances=[min(p.map_distances)], heads=False,
                              instruction=instruction, **common)
        return out
    return _cached(run_dir / _MAP_FILE, settings, force, compute)


def _sliding_one(run_dir: Path, p: ReproducePreset, force: bool, cache_dir: Optional[Path],
                 progress: bool) -> list[dict[str, Any]]:
    settings = {"sliding_tokens": p.sliding_tokens, "multiples": list(p.multiples),
                "weights_sha": read_checkpoint(run_dir).sha256}
    lengths = [m * p.train_len for m in p.multiples]

    def compute() -> list[dict[str, Any]]:
        run = load_run(run_dir)
        out = []
        for eval_len in lengths:  # at most half the tokens in the first window, scored as is
            if 2 * eval_len > p.sliding_tokens or (run.model.position.max_len or eval_len) < eval_len:
                continue
            for mode, stride in (("sliding", 1), ("nonoverlapping", None)):
                out += evaluate_run(run, lengths=[eval_len], mode=mode, stride=stride,
                                    max_tokens=p.sliding_tokens, batch_size=p.eval_batch_size,
                                    cache_dir=cache_dir, progress=progress)
        return out
    return _cached(run_dir / _SLIDING_FILE, settings, force, compute)


def _run_dir(out: Path, position: str, seed: int) -> Path:
    return out / "runs" / f"{position}-seed{seed}"


def preset_run(out: str | Path, position: str, preset: str, seed: int, data: str = "stdlib"
               ) -> tuple[Path, ModelConfig, TrainConfig]:
    """Where ``reproduce --preset PRESET --out OUT`` keeps ``position``'s run of ``seed``, and the
    settings it trains it with. A run trained there beforehand with these settings (for example
    by ``benchmarks/retrieval_budget.py``, which scores it along the way) is reused as it is."""
    if preset not in REPRODUCE_PRESETS:
        raise ValueError(f"unknown reproduce preset {preset!r}; valid: {', '.join(REPRODUCE_PRESETS)}")
    return (_run_dir(Path(out), position, seed),
            *_configs(position, REPRODUCE_PRESETS[preset], data, seed))


# --- the fine-tune study: each model fine-tuned at a longer length (TrainConfig.init_from) -------

Child = tuple[str, int, str, int]  # (position, seed, mode, steps)


def _children(jobs: list[tuple[str, int]], p: ReproducePreset) -> list[Child]:
    # A table of one row per position up to L (learned) has no longer length to train at.
    return [(position, s, mode, steps) for position, s in jobs
            if not POSITION_METHODS[position].fixes_train_len
            for mode in (("plain", "fixed") if POSITION_METHODS[position].scalable else ("plain",))
            for steps in p.finetune_steps]


def _child_dir(out: Path, child: Child, p: ReproducePreset) -> Path:
    position, s, mode, steps = child
    return out / "runs" / f"{position}-seed{s}-ft{p.finetune_multiple}x-{mode}-{steps}"


def _child_configs(parent_dir: Path, parent: tuple[ModelConfig, TrainConfig], mode: str,
                   steps: int, p: ReproducePreset) -> tuple[ModelConfig, TrainConfig]:
    """The fine-tune of ``parent``: at ``finetune_multiple * L``, positions x ``1 / multiple`` if
    ``mode`` is ``"fixed"``, the parent's data and mix, a fresh schedule of ``steps``."""
    mc, tc = parent
    model = {**mc.to_dict(), "train_len": p.finetune_multiple * mc.train_len,
             "position_scale": 1 / p.finetune_multiple if mode == "fixed" else 1.0}
    return child_configs(parent, model, {
        **tc.to_dict(), "steps": max(steps, 1), "lr": p.finetune_lr, "warmup": p.finetune_warmup,
        "batch_size": p.finetune_batch_size, "save_every": max(steps, 1), "eval_every": 0,
        "init_from": str(parent_dir)})


def _finetune_one(child: Child, out: Path, configs: tuple[ModelConfig, TrainConfig],
                  action: Optional[Action], p: ReproducePreset, force: bool,
                  cache_dir: Optional[Path], progress: bool) -> list[dict[str, Any]]:
    """Fine-tune (unless 0 steps) and evaluate one child: perplexity at L2 and 4 x L2, and the
    retrieval task's k_max, without a rule and with ``linear`` where the method has it."""
    position, s, mode, steps = child
    parent_dir = _run_dir(out, position, s)
    mc, tc = configs
    if steps == 0:  # the parent's weights at the new length: nothing to train
        parent = load_run(parent_dir)
        mc = ModelConfig.from_dict({**mc.to_dict(), "vocab_size": parent.config.vocab_size})
        run = dataclasses.replace(parent, model=child_model(parent, mc).eval(), config=mc)
        path, weights = parent_dir / _FINETUNE0_FILES[mode], parent_dir
    else:
        run_dir = _child_dir(out, child, p)
        _train_one(position, mc, tc, action or "reuse", run_dir, cache_dir, progress)
        run, path, weights = load_run(run_dir), run_dir / _FINETUNE_FILE, run_dir
    rules = _rules(position, p, p.finetune_rules)
    lengths = [run.config.train_len, 4 * run.config.train_len]
    task_lengths = [m * p.train_len for m in p.multiples]
    settings = {"lengths": lengths, "rules": rules, "eval_tokens": p.eval_tokens, "task": p.task,
                "task_lengths": task_lengths, "depths": list(p.depths), "trials": p.trials,
                "model": mc.to_dict(), "weights_sha": read_checkpoint(weights).sha256}

    def compute() -> list[dict[str, Any]]:
        ppl = evaluate_run(run, lengths=lengths, rules=rules, batch_size=p.eval_batch_size,
                           max_tokens=p.eval_tokens or None, cache_dir=cache_dir, progress=progress)
        k_max: dict[str, Any] = {}
        if p.task is not None:
            cells = evaluate_run_task(run, task=p.task, lengths=task_lengths, depths=p.depths,
                                      trials=p.trials, rules=rules,
                                      batch_size=p.eval_batch_size, progress=progress)
            k_max = {r["scaling"]: r for r in retrieval_summary(cells)}
        return [{"position": position, "mode": mode, "steps": steps, "scaling": rule,
                 "ppl": {str(r["eval_len"]): r["ppl"] for r in ppl if r["scaling"] == rule},
                 "k_max": k_max[rule]["k_max"] if rule in k_max else None,
                 "accuracy": {str(b["length"]): b["accuracy"] for b in k_max[rule]["by_length"]}
                 if rule in k_max else {}} for rule in rules]
    return [{**r, "train_len": run.config.train_len}
            for r in _cached(path, settings, force, compute)]


def _finetune_map_one(child: Child, out: Path, p: ReproducePreset, force: bool,
                      progress: bool) -> list[dict[str, Any]]:
    """A fine-tuned model's needle map under ``p.finetune_rules`` (its parent's, at 0 steps, is
    the parent's own map), without the instruction controls."""
    position, s, mode, steps = child
    records = _map_one(_child_dir(out, child, p), p, force, progress, p.finetune_rules,
                       controls=False)
    return [{**r, "mode": mode, "steps": steps, "seed": s} for r in records]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def reproduce(
    preset: str = "quick",
    out: str | Path = "reports/quick",
    *,
    data: str = "stdlib",
    seed: int = 0,
    seeds: int = 1,
    positions: tuple[str, ...] = tuple(POSITION_METHODS),
    embedding: Optional[str] = None,
    force: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train each position method short, test it long, and write the report.

    Args:
        preset: a key of ``REPRODUCE_PRESETS``.
        out: the report directory (runs go to ``out/runs/POSITION-seedN``).
        data: corpus spec (default: the Python standard library, no download).
        seed: the first seed; every method is trained with the same seeds.
        seeds: how many seeds per method (``seed`` .. ``seed + seeds - 1``); tables, plots and
            the finding use the mean over seeds and show their min-max range.
        positions: which methods to compare.
        embedding: replaces the preset's embedding convention (``"gpt2"`` or ``"fairseq"``).
        force: retrain and re-evaluate even where finished results exist, and replace a run
            trained with other settings. Only folders that provably are linbias runs are
            replaced (see the module docstring); anything else in ``out/runs`` is an error.
        cache_dir: tokenizer and token-stream cache.
        progress: progress bars.
        log: where one-line progress messages go.

    Returns:
        The content of ``results.json``.

    Raises:
        ValueError: an invalid argument, or (``RunError``) a file or folder in the way, named,
            with the flag that fixes it; all raised before anything is written or removed.
    """
    p, corpus = _check_arguments(preset, data, seed, positions)
    if embedding is not None:
        p = ReproducePreset.from_dict({**p.to_dict(), "embedding": embedding})  # checks the name
    check_int("seeds", seeds)
    out = Path(out)
    corpus.check_outside(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; choose another --out")
    check_writable(out)
    with locked_folder(out, f"the report {out}"):  # one reproduce per --out at a time
        return _reproduce(preset, p, corpus, out, data, seed, seeds, positions, force,
                          Path(cache_dir) if cache_dir is not None else None, progress, log)


def _reproduce(preset: str, p: ReproducePreset, corpus: Corpus, out: Path, data: str, seed: int,
               seeds: int, positions: tuple[str, ...], force: bool, cache: Optional[Path],
               progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    _check_out(out)
    jobs = [(position, s) for s in range(seed, seed + seeds) for position in positions]
    configs = {job: _configs(job[0], p, data, job[1]) for job in jobs}
    plans = {job: _plan(_run_dir(out, *job), *configs[job], force) for job in jobs}
    children = _children(jobs, p)
    child_configs = {c: _child_configs(_run_dir(out, c[0], c[1]), configs[c[:2]], c[2], c[3], p)
                     for c in children}
    child_plans = {c: _plan(_child_dir(out, c, p), *child_configs[c], force)
                   for c in children if c[3] > 0}
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    todo = sum(plan != "reuse" for plan in plans.values())
    log(f"{len(jobs)} models ({len(positions)} methods x {seeds} seed{'s' * (seeds > 1)}), "
        f"{todo} to train: about "
        f"{_duration(60 * p.expected_minutes * todo / len(positions))} on 2 idle CPU cores "
        f"(float32; the pace below updates this)")
    training, records, retrieval, profile, sliding, needles = [], [], [], [], [], []
    trained_seconds, trained = 0.0, 0
    for n, job in enumerate(jobs):
        (position, s), run_dir, job_start = job, _run_dir(out, *job), time.perf_counter()
        log(f"[{position} seed {s}] {_SAY[plans[job]]} "
            f"({p.steps} steps of {p.batch_size} x {p.train_len} tokens)")
        training.append({**_train_one(position, *configs[job], plans[job], run_dir, cache,
                                      progress), "seed": s})
        log(f"[{position} seed {s}] evaluating at "
            f"{', '.join(str(m * p.train_len) for m in p.multiples)}")
        records += [{**r, "seed": s} for r in _evaluate_one(run_dir, p, force, cache, progress)]
        if p.task is not None:
            log(f"[{position} seed {s}] {p.task} retrieval: {len(p.depths)} depths x "
                f"{p.trials} trials at each length")
            retrieval += [{**r, "seed": s} for r in _retrieve_one(run_dir, p, force, progress)]
        if p.profile_windows:
            profile += [{**r, "seed": s} for r in _profile_one(run_dir, p, force, cache)]
        if p.map_distances:
            log(f"[{position} seed {s}] needle map: distances "
                f"{', '.join(map(str, p.map_distances))} x {p.map_trials} trials at each length")
            needles += [{**r, "seed": s} for r in _map_one(run_dir, p, force, progress)]
        if p.sliding_tokens:
            log(f"[{position} seed {s}] sliding window, stride 1, over {p.sliding_tokens} tokens")
            sliding += [{**r, "seed": s} for r in _sliding_one(run_dir, p, force, cache, progress)]
        if plans[job] != "reuse":
            trained_seconds, trained = trained_seconds + time.perf_counter() - job_start, trained + 1
        left = sum(plans[j] != "reuse" for j in jobs[n + 1:])
        if left:  # the whole job's ETA, from this machine's pace so far
            log(f"{n + 1} of {len(jobs)} models done after {_duration(time.perf_counter() - started)}; "
                f"about {_duration(trained_seconds / max(trained, 1) * left)} left")
    finetune, finetune_map = [], []
    for child in children:
        position, s, mode, steps = child
        log(f"[{position} seed {s}] fine-tune at {p.finetune_multiple * p.train_len}, {mode}, "
            f"{steps} steps: {_SAY[child_plans[child]] if steps else 'the weights as they are'}")
        finetune += [{**r, "seed": s} for r in _finetune_one(
            child, out, child_configs[child], child_plans.get(child), p, force, cache, progress)]
        if p.map_distances and steps:
            log(f"[{position} seed {s}] fine-tuned, {mode}, {steps} steps: needle map")
            finetune_map += _finetune_map_one(child, out, p, force, progress)
    results = {
        "preset": {"name": preset, **p.to_dict()}, "data": data, "seed": seed, "seeds": seeds,
        "positions": list(positions),
        "corpus": corpus.describe(), "machine": _machine(p),
        "seconds": round(time.perf_counter() - started, 1), "training": training,
        "finding": finding(records, p.train_len), "results": records,
    }
    if p.task is not None:
        results["retrieval"] = retrieval
        results["retrieval_summary"] = retrieval_summary(merge_cells(retrieval))
    if p.profile_windows:
        results["attention_profile"] = profile
    if p.map_distances:
        results["needle_map"] = needles
    if p.sliding_tokens:
        results["sliding"] = sliding
    if p.finetune_steps:
        results["finetune"] = finetune
        if p.map_distances:
            results["finetune_map"] = finetune_map
    write_report(out, results, p)
    log(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'ppl_vs_length.png'}")
    return results


def _check_arguments(preset: str, data: str, seed: int,
                     positions: tuple[str, ...]) -> tuple[ReproducePreset, Corpus]:
    if preset not in REPRODUCE_PRESETS:
        raise ValueError(f"unknown reproduce preset {preset!r}; valid: {', '.join(REPRODUCE_PRESETS)}")
    unknown = sorted(set(positions) - set(POSITION_METHODS))
    if unknown or not positions:
        raise ValueError(f"unknown position methods {unknown}; valid: {', '.join(POSITION_METHODS)}"
                         if unknown else f"no position methods given; valid: {', '.join(POSITION_METHODS)}")
    if len(set(positions)) != len(positions):
        raise ValueError(f"positions must not repeat a method, got {list(positions)}")
    check_int("seed", seed, low=0)
    return REPRODUCE_PRESETS[preset], load_corpus(data)  # an unknown or empty corpus fails here


def _is_results(head: bytes) -> bool:
    try:
        obj = json.loads(head)
    except ValueError:  # not JSON, or not UTF-8
        return False
    return isinstance(obj, dict) and {"preset", "finding", "results"} <= obj.keys()


def _is_plot(head: bytes) -> bool:
    # matplotlib names itself in a tEXt chunk right after the PNG header.
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"Matplotlib" in head[:256]

# The signature of each report file this module writes: only such a file is ever replaced.
_REPORT_FILES: dict[str, Callable[[bytes], bool]] = {
    "results.json": _is_results,
    "report.md": lambda head: head.startswith(REPORT_TITLE.encode()),
    **{name: _is_plot for name in ("ppl_vs_length.png", "retrieval.png",
                                   "attention_profile.png", "finetune.png", "needle_map.png",
                                   "needle_heads.png")},
}


def _check_out(out: Path) -> None:
    """``out`` can hold the report: every file or folder reproduce would replace is its own."""
    whole = owning_folder(out)
    if whole is not None:
        raise RunError(f"--out {out} is inside {whole}, a linbias run or export whose files must "
                       "stay as written; choose an --out outside it")
    if (out / "runs").exists() and not (out / "runs").is_dir():
        raise RunError(f"{out / 'runs'} is a file, not the runs folder; choose another --out")
    for name, ours in _REPORT_FILES.items():
        path = out / name
        if path.is_symlink() or path.exists() and not (path.is_file() and ours(path.read_bytes())):
            raise RunError(f"{path} was not written by linbias reproduce, and would be replaced: "
                           "move it away or choose another --out")


def _machine(p: ReproducePreset) -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "precision": "bfloat16 autocast" if p.bf16 else "float32",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


