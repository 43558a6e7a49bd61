"""Per-token decode latency and peak memory of ALiBi against plain attention, measured in one run.

A decoding step is one new query against the ``T`` tokens of a KV cache. For each context ``T``:

* op alone, B=1 H=8 D=64 fp32: ``scaled_dot_product_attention`` with one query and no mask (the
  baseline, "plain"), against ``alibi_attention`` with the paper's slopes ("alibi") and with
  slopes scaled by ``linear`` interpolation for ``L' = T`` ("alibi linear"; the scaling is timed
  too, since a model rescales its slopes at every step);
* one full decode step of a GPT preset (``model(idx_B1, cache=cache)``) with ALiBi, and with
  ``position="none"`` as the baseline: same weights, same cache. The cache holds random keys and
  values (one tensor shared by all layers, to save memory) and is reset to ``T`` tokens before
  every step, so each step also pays the model's ``torch.cat`` of the whole cache, as in decoding.

Latency: median over rounds of the mean per call, variants alternating (A B C A B C ...); ratios
are against the baseline measured in the same rounds. Target: at most 1.10x plain.

Peak memory: the extra resident memory (Linux ``VmHWM`` after ``/proc/self/clear_refs``, minus
``VmRSS`` before) of one call, after a warm-up call, in a fresh process per context that runs with
``MALLOC_MMAP_THRESHOLD_`` small, so every tensor over 4 KiB gets fresh pages and is unmapped when
freed (otherwise glibc reuses freed heap pages and a repeated allocation never shows). tracemalloc
is no use here: it sees Python's allocator only, not torch's tensors. Memory is linear in the
context when the extra bytes per cached token stay constant.

    python benchmarks/decode.py                                 # ~2 minutes on 2 cores
    python benchmarks/decode.py --contexts 1024,4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from linbias import alibi_attention, alibi_slopes
from linbias.alibi import interpolate_slopes
from linbias.config import PRESETS, model_config
from linbias.model import GPT, KVCache

TARGET = 1.10
VARIANTS = ("plain", "alibi", "alibi linear")
HEADS, HEAD_DIM = 8, 64


# --- what is timed ------------------------------------------------------------------------------


def op_steps(context: int, train_len: int) -> dict[str, Callable[[], object]]:
    """One decoding step of each variant for the op alone: one query over ``context`` keys."""
    torch.manual_seed(0)
    q = torch.randn(1, HEADS, 1, HEAD_DIM)
    k, v = torch.randn(1, HEADS, context, HEAD_DIM), torch.randn(1, HEADS, context, HEAD_DIM)
    slopes = alibi_slopes(HEADS)
    return {
        "plain": lambda: F.scaled_dot_product_attention(q, k, v),
        "alibi": lambda: alibi_attention(q, k, v, slopes),
        "alibi linear": lambda: alibi_attention(
            q, k, v, interpolate_slopes(slopes, train_len, context, "linear")
        ),
    }


def build(preset: str, position: str, train_len: int, scaling: str = "none") -> GPT:
    torch.manual_seed(0)  # the same weights for every variant (no position method has parameters)
    model = GPT(model_config(preset, position=position, train_len=train_len)).eval()
    model.set_scaling(scaling)
    return model


def model_steps(context: int, train_len: int, preset: str) -> dict[str, Callable[[], object]]:
    """One decoding step of each variant of a whole model, against ``context`` cached tokens."""
    models = {
        "plain": build(preset, "none", train_len),
        "alibi": build(preset, "alibi", train_len),
        "alibi linear": build(preset, "alibi", train_len, "linear"),
    }
    config = models["plain"].config
    H, D = config.n_heads, config.d_model // config.n_heads
    torch.manual_seed(1)
    k, v = torch.randn(1, H, context, D), torch.randn(1, H, context, D)
    idx_B1 = torch.randint(config.vocab_size, (1, 1))
    cache = KVCache(config.n_layers)
    cache.k, cache.v = [k] * config.n_layers, [v] * config.n_layers

    def step(model: GPT) -> torch.Tensor:
        with torch.no_grad():
            logits = model(idx_B1, cache=cache)
        # Back to `context` tokens, freeing the step's copies as a decoder frees the old cache.
        cache.k, cache.v = [k] * config.n_layers, [v] * config.n_layers
        return logits

    return {name: (lambda m=m: step(m)) for name, m in models.items()}


def per_call_seconds(steps: dict[str, Callable[[], object]], budget_s: float) -> dict[str, float]:
    """Median over rounds of each step's mean time per call, the steps alternating.

    A round calls each step for about 20 ms (so timer and loop overhead vanish at short contexts);
    there are as many rounds as fit in ``budget_s``, and at least 5.
    """
    for fn in steps.values():  # warm-up
        fn()
    start = time.perf_counter()
    next(iter(steps.values()))()
    once = time.perf_counter() - start
    calls = max(1, int(0.02 / once))
    rounds = max(5, int(budget_s / (len(steps) * calls * once)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


# --- peak memory, in a fresh process per context ------------------------------------------------


def memory_child(context: int, train_len: int, preset: str) -> None:
    """Print, as JSON, the extra peak resident MB of one call of every step (run in a child)."""
    from peak_memory import rss_mb

    extra = {}
    for what, steps in (("op", op_steps(context, train_len)),
                        ("model", model_steps(context, train_len, preset))):
        for name, fn in steps.items():
            fn()  # warm-up: one-time allocations (thread pools, lazy initialisation) not counted
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = rss_mb("VmRSS")
            fn()
            extra[f"{what}/{name}"] = rss_mb("VmHWM") - before
    print(json.dumps(extra))


def extra_peak_mb(context: int, train_len: int, preset: str) -> dict[str, float]:
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import torch; "
            f"torch.set_num_threads({torch.get_num_threads()}); import decode; "
            f"decode.memory_child({context}, {train_len}, {preset!r})")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the table ----------------------------------------------------------------------------------


def _fmt_seconds(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="1024,4096,16384,65536", help="cached tokens T")
    p.add_argument("--train-len", type=int, default=1024, help="training length L for 'linear'")
    p.add_argument("--preset", default="base", choices=sorted(PRESETS),
                   help="GPT preset of the full decode step (base: 8 heads of 64, as the op)")
    p.add_argument("--seconds", type=float, default=4.0,
                   help="timing budget of each row (at least 5 rounds)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(x) for x in args.contexts.split(",")]

    print(f"Decode step / plain attention, CPU fp32, B=1 H={HEADS} D={HEAD_DIM} (op) and preset "
          f"{args.preset!r} (model), 'linear' from L={args.train_len}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; target <= {TARGET:.2f}x")
    print(f"{'':<7}{'T':>7}{'plain':>11}{'alibi':>9}{'linear':>9}   "
          f"extra peak MB (bytes per cached token): plain, alibi, linear")
    rows = []
    for T in contexts:
        memory = {} if args.no_memory else extra_peak_mb(T, args.train_len, args.preset)
        for what, make_steps in (
            ("op", lambda: op_steps(T, args.train_len)),
            ("model", lambda: model_steps(T, args.train_len, args.preset)),
        ):
            seconds = per_call_seconds(make_steps(), args.seconds)
            for name in VARIANTS:
                mb = memory.get(f"{what}/{name}")
                rows.append({
                    "what": what, "context": T, "variant": name, "seconds": seconds[name],
                    "ratio": seconds[name] / seconds["plain"], "extra_peak_mb": mb,
                    "extra_bytes_per_token": None if mb is None else mb * 2**20 / T,
                })
            mine = rows[-len(VARIANTS):]
            ratios = "".join(f"{r['ratio']:>8.2f}x" for r in mine[1:])
            mem = "" if args.no_memory else ", ".join(
                f"{r['extra_peak_mb']:.2f} ({r['extra_bytes_per_token']:.0f})" for r in mine)
            print(f"{what:<7}{T:>7}{_fmt_seconds(seconds['plain']):>11}{ratios}   {mem}",
                  flush=True)

    result = {"baseline": "plain attention on the same cache", "target": TARGET,
              "device": "cpu", "dtype": "float32", "heads": HEADS, "head_dim": HEAD_DIM,
              "preset": args.preset, "train_len": args.train_len,
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
