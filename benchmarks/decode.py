"""Per-token decode latency and peak memory of ALiBi against plain attention, measured in one run.

A decoding step is one new query against the ``T`` tokens of a KV cache. For each context ``T``:

* op alone, B=1 H=8 D=64 fp32: ``scaled_dot_product_attention`` with one query and no mask (the
  baseline, "plain"), against ``alibi_attention`` given the cache's key norms (as ``KVCache``
  keeps them, which lets a step from 16k keys of 8 heads of 64 leave far blocks unread) with the paper's slopes
  ("alibi") and with
  slopes scaled by ``linear`` interpolation for ``L' = T`` ("alibi linear"; the scaling is timed
  too, since a model rescales its slopes at every step);
* one full decode step of a GPT preset (``model(idx_B1, cache=cache)``) with ALiBi, and with
  ``position="none"`` as the baseline: same weights, same cache. The cache holds random keys and
  values (one tensor shared by all layers, to save memory) and is set back to ``T`` tokens after
  every step, so each step also pays the model's ``torch.cat`` of the whole cache, as in decoding.

Latency: median over rounds of the mean per call, variants alternating (A B C A B C ...); ratios
are against the baseline measured in the same rounds. Target: at most 1.10x plain.

Peak memory: the most bytes of torch allocations live at once during one step, beyond what was
live before it (``peak_extra_bytes``: the profiler's allocator events, byte-exact). Memory is linear
in the context when the extra bytes per cached token stay constant. The KV cache itself is not
counted: it is the same for every variant (``B * H * T * D * 4`` bytes of keys, as many of values).

    python benchmarks/decode.py                                 # about 1.5 minutes on 2 cores
    python benchmarks/decode.py --contexts 1024,4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity

from linbias import alibi_attention, alibi_slopes
from linbias.alibi import interpolate_slopes
from linbias.config import PRESETS, model_config
from linbias.attention import KeyNorms
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
    slopes, norms = alibi_slopes(HEADS), KeyNorms.of(k)  # a cache keeps the norms (KVCache)
    return {
        "plain": lambda: F.scaled_dot_product_attention(q, k, v),
        "alibi": lambda: alibi_attention(q, k, v, slopes, key_norms=norms),
        "alibi linear": lambda: alibi_attention(
            q, k, v, interpolate_slopes(slopes, train_len, context, "linear"), key_norms=norms
        ),
    }


def build(preset: str, position: str, train_len: int, scaling: str = "none") -> GPT:
    torch.manual_seed(0)  # the same weights for every variant (no position method has parameters)
    model = GPT(model_config(preset, position=position, train_len=train_len)).eval()
    model.set_rule(scaling)
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
    for layer in range(config.n_layers):  # as decoding left it, key norms included
        cache.update(layer, k, v)
    saved = {name: list(value) for name, value in vars(cache).items()}

    def step(model: GPT) -> torch.Tensor:
        with torch.no_grad():
            logits = model(idx_B1, cache=cache)
        # Back to `context` tokens, freeing the step's copies as a decoder frees the old cache.
        for name, value in saved.items():
            setattr(cache, name, list(value))
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


# --- peak memory --------------------------------------------------------------------------------


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of torch allocations live at once during one call of ``fn`` (after a warm-up
    call), counting from what was live before it.

    Read from the profiler's allocator events: every CPU allocation and free torch makes, in
    order, kernels' scratch buffers included. Byte-exact, unlike resident-set deltas (the kernel
    updates those lazily, about 256 KB at a time); tracemalloc sees Python's allocator, not torch's.
    """
    fn()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
         if e.name() == "[memory]"),
        key=lambda e: e[0],  # stable: an allocation and a free at one tick keep their order
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


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
    p.add_argument("--seconds", type=float, default=8.0,
                   help="timing budget of each row (at least 5 rounds)")
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
        for what in ("op", "model"):
            if what == "op":
                steps = op_steps(T, args.train_len)
            else:
                steps = model_steps(T, args.train_len, args.preset)
            seconds = per_call_seconds(steps, args.seconds)
            for name in VARIANTS:
                extra = peak_extra_bytes(steps[name])
                rows.append({
                    "what": what, "context": T, "variant": name, "seconds": seconds[name],
                    "ratio": seconds[name] / seconds["plain"], "extra_peak_mb": extra / 1e6,
                    "extra_bytes_per_token": extra / T,
                })
            mine = rows[-len(VARIANTS):]
            ratios = "".join(f"{r['ratio']:>8.2f}x" for r in mine[1:])
            mem = ", ".join(
                f"{r['extra_peak_mb']:.3g} ({r['extra_bytes_per_token']:.0f})" for r in mine)
            print(f"{what:<7}{T:>7}{_fmt_seconds(seconds['plain']):>11}{ratios}   {mem}",
                  flush=True)
            del steps

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
