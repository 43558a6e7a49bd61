"""The cost of a model that answers at L: passkey accuracy at the training length against steps.

Each position method's run of a reproduce preset (default ``remedies-deep``: the retrieval mix,
half passkey rows, 4 layers) is trained in chunks of ``--every`` steps; after each chunk its
checkpoint is scored on passkey prompts of exactly L tokens (5 depths x ``--trials``), and
training resumes exactly. A checkpoint mid-run has not had its learning rate annealed, so the
step at which a curve first reaches the target is an upper bound on the budget a run of that
length needs. The runs are where ``linbias reproduce --preset PRESET --out OUT`` keeps them, with
its settings, so that the study reuses them as they are.

Nothing past L is measured here: the budget is chosen at L only, before any result past L is seen.

    python benchmarks/retrieval_budget.py --out OUT [--preset remedies-deep]
        [--positions alibi,rotary] [--every 500] [--trials 10] [--seed 0] [--json FILE]

Prints a table (accuracy at L per method and step, with Wilson 95% intervals) and the training
time of each run; with ``--json`` the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from linbias.config import EvalConfig
from linbias.evaluate import evaluate_run_task
from linbias.positions import POSITION_METHODS
from linbias.reproduce import preset_run
from linbias.tasks import wilson
from linbias.train import train


def curve(position: str, out: Path, *, preset: str, every: int, trials: int, seed: int) -> dict:
    """Train ``position``'s run in chunks of ``every`` steps, scoring passkey at L after each."""
    run_dir, mc, tc = preset_run(out, position, preset, seed)
    if tc.steps % every:
        raise SystemExit(f"--every {every} must divide the preset's {tc.steps} steps")
    ec = EvalConfig(lengths=(mc.train_len,), task="passkey", depths=(0.0, 25.0, 50.0, 75.0, 100.0),
                    trials=trials, seed=seed)
    points, train_s, steps, n_layers = [], 0.0, tc.steps, mc.n_layers
    for done in range(every, steps + every, every):
        t0 = time.perf_counter()
        train(mc, tc, run_dir, resume=done > every, progress=False, stop_after=every)
        train_s += time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unfinished run": scoring mid-run is the point
            records = evaluate_run_task(run_dir, ec, progress=False)
        correct, n = sum(r["correct"] for r in records), sum(r["n"] for r in records)
        lo, hi = wilson(correct, n)
        points.append({"step": done, "correct": correct, "trials": n, "accuracy": correct / n,
                       "wilson95": [lo, hi], "train_seconds": round(train_s, 1)})
        print(f"{position:>10} {n_layers} layers step {done:>5}: {correct}/{n} at L "
              f"({lo:.0%}-{hi:.0%}), {train_s / 60:.1f} min of training", flush=True)
    return {"position": position, "preset": preset, "n_layers": n_layers, "seed": seed,
            "points": points}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the reproduce --out of the study")
    ap.add_argument("--preset", default="remedies-deep", help="a reproduce preset with a task")
    ap.add_argument("--positions", default=",".join(POSITION_METHODS))
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--trials", type=int, default=10, help="trials per depth (5 depths)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    positions = a.positions.split(",")
    unknown = sorted(set(positions) - set(POSITION_METHODS))
    if unknown:
        ap.error(f"unknown position methods {unknown}; valid: {', '.join(POSITION_METHODS)}")
    curves = [curve(pos, a.out, preset=a.preset, every=a.every, trials=a.trials, seed=a.seed)
              for pos in positions]
    steps = [pt["step"] for pt in curves[0]["points"]]
    print(f"\npasskey accuracy at L ({a.preset}: {curves[0]['n_layers']} layers), by step")
    print("| method | " + " | ".join(str(s) for s in steps) + " | training min |")
    print("|---|" + "---:|" * (len(steps) + 1))
    for c in curves:
        cells = [f"{pt['accuracy']:.0%}" for pt in c["points"]]
        print(f"| {c['position']} | " + " | ".join(cells) +
              f" | {c['points'][-1]['train_seconds'] / 60:.1f} |")
    if a.json:
        a.json.write_text(json.dumps({"curves": curves}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
