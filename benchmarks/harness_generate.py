"""Tokens per second of lm-eval's ``generate_until`` through the ``linbias`` model, far past L.

For each prompt length P (default 4096 and 16384 tokens), one request whose prompt is the QMSum
sample repeated and cut to P tokens, at ``max_length`` = P + new tokens, greedy, no stop sequence:

* ``harness``: ``LinbiasLM.generate_until`` (prefill, then one cached step per token);
* ``baseline``: the run's own ``GPT.generate`` (the same KV cache, no lm-eval) on the same ids.

Both run under the same scaling rule (default ``linear``: the slopes shrink with every token).
Printed: prefill seconds, decode tokens per second of each, and harness/baseline time. Each
number is the median over ``--rounds`` rounds, the two variants alternating.

    python benchmarks/harness_generate.py --run RUN            # a linbias ALiBi run directory
    python benchmarks/harness_generate.py --run RUN --prompts 4096 --new 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from linbias.harness.lm import LinbiasLM
from linbias.harness.task_data import QMSUM_SAMPLE
from linbias.runs import load_run


def _prompt_ids(lm: LinbiasLM, n: int) -> list[int]:
    unit = lm.tok_encode(QMSUM_SAMPLE.read_text(encoding="utf-8"))
    return (unit * -(-n // len(unit)))[-n:]


def _harness(lm: LinbiasLM, text: str, new: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one generate_until request."""
    marks: list[float] = []
    step = lm.backend.step

    def timed(*args: object) -> object:
        out = step(*args)
        marks.append(time.perf_counter())
        return out

    lm.backend.step = timed  # records when the prefill and every decoding step end
    start = time.perf_counter()
    try:
        request = type("Request", (), {"args": (text, {"until": [], "max_gen_toks": new})})()
        lm.generate_until([request])
    finally:
        lm.backend.step = step
    end = time.perf_counter()
    return marks[0] - start, end - marks[0]


def _baseline(run, ids: list[int], new: int, rule: str) -> tuple[float, float]:
    model, idx = run.model, torch.tensor([ids])
    with torch.inference_mode(), model.scaled(rule):
        start = time.perf_counter()
        cache = model.new_cache()
        model(idx, cache=cache)
        prefill = time.perf_counter()
        tok = idx[:, -1:]
        for _ in range(new - 1):
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
        end = time.perf_counter()
    return prefill - start, end - prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a linbias ALiBi run directory")
    parser.add_argument("--prompts", default="4096,16384", help="prompt lengths in tokens")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--rule", default="linear")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    run = load_run(args.run)
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, kernels {torch.backends.cpu.get_cpu_capability()}; "
          f"run L = {run.config.train_len}, {run.config.n_layers} layers, d_model "
          f"{run.config.d_model}, rule {args.rule}")
    rows = []
    print("| prompt | L'/L | prefill s (harness) | decode tok/s (harness) | decode tok/s (GPT.generate)"
          " | harness / baseline decode time |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in (int(x) for x in args.prompts.split(",")):
        lm = LinbiasLM(run=args.run, rule=args.rule, max_length=p + args.new, device="cpu")
        ids = _prompt_ids(lm, p)
        text = lm.tok_decode(ids)
        assert lm.tok_encode(text)[-p:] == ids, "the prompt must re-encode to its own ids"
        h, b = [], []
        for _ in range(args.rounds):
            h.append(_harness(lm, text, args.new))
            b.append(_baseline(run, ids, args.new, args.rule))
        h_pre, h_dec = (statistics.median(x) for x in zip(*h))
        _, b_dec = (statistics.median(x) for x in zip(*b))
        row = {"prompt": p, "new": args.new, "prefill_s": h_pre,
               "harness_tok_s": (args.new - 1) / h_dec, "baseline_tok_s": (args.new - 1) / b_dec,
               "ratio": h_dec / b_dec}
        rows.append(row)
        print(f"| {p} | {(p + args.new) / run.config.train_len:.0f} | {h_pre:.2f} | "
              f"{row['harness_tok_s']:.1f} | {row['baseline_tok_s']:.1f} | {row['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rule": args.rule, "run": str(args.run), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
