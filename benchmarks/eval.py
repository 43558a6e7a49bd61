"""Evaluation time of an ALiBi model at 16x its training length against the same model without
positions (NoPE), measured in one run.

The two models share the architecture and the weights (neither position method has parameters,
so the same seed gives the same tensors); only ALiBi's score bias differs. Both evaluate the same
random token stream with ``linbias.evaluate.evaluate_stream`` (non-overlapping windows of
``factor * train_len`` tokens), alternately (A B A B ...), and the ratio of the medians is
reported. Target: ALiBi at most 1.15x the no-position time.

    python benchmarks/eval.py                          # tiny preset, L=128, L'=2048 (~1 minute)
    python benchmarks/eval.py --train-len 64 --tokens 8192 --json out.json

On a shared machine, other processes stall the per-op thread barriers and inflate every small
op (ALiBi's path has a few more): compare with ``--threads 1`` when the numbers look noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from linbias.config import PRESETS, model_config
from linbias.evaluate import evaluate_stream
from linbias.model import GPT

TARGET = 1.15


def build(preset: str, position: str, train_len: int) -> GPT:
    torch.manual_seed(0)  # same weights for both position methods
    return GPT(model_config(preset, position=position, train_len=train_len)).eval()


def timed(model: GPT, stream: np.ndarray, eval_len: int, batch_size: int) -> float:
    start = time.perf_counter()
    evaluate_stream(model, stream, None, eval_len=eval_len, batch_size=batch_size, progress=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-len", type=int, default=128, help="training length L")
    p.add_argument("--factor", type=int, default=16, help="evaluation length L' = factor * L")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, default=None,
                   help="scored tokens per evaluation (default: 4 windows of L')")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    p.add_argument("--repeats", type=int, default=5, help="timed A/B pairs (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_len = args.factor * args.train_len
    tokens = args.tokens or 4 * eval_len
    models = {name: build(args.preset, name, args.train_len) for name in ("alibi", "none")}
    vocab = models["alibi"].config.vocab_size
    stream = np.random.default_rng(0).integers(0, vocab, size=tokens + 1)

    print(f"evaluation, {args.preset} preset, L={args.train_len}, L'={eval_len}, {tokens} tokens, "
          f"batch {args.batch_size}, median of {args.repeats}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up: allocator, kernels, caches
        timed(model, stream, eval_len, args.batch_size)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(timed(model, stream, eval_len, args.batch_size))
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["alibi"] / median["none"]
    for name, t in times.items():
        spread = f"{min(t):.3f}-{max(t):.3f}"
        print(f"{name:<6} median {median[name]:.3f} s  (range {spread} s, "
              f"{tokens / median[name]:,.0f} tokens/s)")
    verdict = "ok" if ratio <= TARGET else "above target"
    print(f"ratio alibi / none: {ratio:.3f}x (target <= {TARGET}x: {verdict})")

    result = {
        "preset": args.preset, "train_len": args.train_len, "eval_len": eval_len,
        "tokens": tokens, "batch_size": args.batch_size, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "seconds": times, "median_s": median, "ratio": ratio, "target": TARGET,
    }
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
