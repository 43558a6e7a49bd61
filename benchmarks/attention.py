"""ALiBi attention speed and memory against plain causal SDPA (no bias), measured in one run.

For each length and batch size, every backend's forward and forward+backward time is timed
alternately with the baseline (A B A B ...) and reported as the ratio of medians. Extra peak memory
is measured in fresh processes (peak resident set growth while the op runs, minus the baseline's).

    python benchmarks/attention.py                      # the full table (several minutes)
    python benchmarks/attention.py --lengths 512,1024 --batches 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from linbias import alibi_attention, alibi_slopes
from linbias.alibi import alibi_bias
from peak_memory import peak_growth_mb as _peak_growth_mb

BASELINE = "causal SDPA, no bias"


_BIASES: dict = {}


def materialised(q, k, v, slopes):
    """The route most libraries take: a float [H, L, L] bias handed to SDPA (built once per
    shape and reused, as a model would cache it, so only the attention itself is timed)."""
    L = q.shape[2]
    key = (L, tuple(slopes.tolist()))
    if key not in _BIASES:
        _BIASES.clear()
        _BIASES[key] = alibi_bias(slopes, L, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_BIASES[key])


def op(name: str) -> Callable:
    if name == "baseline":
        return lambda q, k, v, slopes: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name == "materialised":
        return materialised
    return lambda q, k, v, slopes: alibi_attention(q, k, v, slopes, backend=name)


def trainable(name: str) -> bool:
    """FlexAttention has no backward pass on CPU."""
    return name != "flex"


def timed(fn: Callable, q, k, v, slopes, backward: bool) -> float:
    start = time.perf_counter()
    out = fn(q, k, v, slopes)
    if backward:
        out.sum().backward()
    return time.perf_counter() - start


def compare(name: str, shape, repeats: int, backward: bool) -> dict:
    B, H, L, D = shape
    q, k, v = (torch.randn(B, H, L, D, requires_grad=backward) for _ in range(3))
    slopes = alibi_slopes(H)
    base_fn, fn = op("baseline"), op(name)
    timed(base_fn, q, k, v, slopes, backward), timed(fn, q, k, v, slopes, backward)  # warm-up
    base, ours = [], []
    for _ in range(repeats):
        base.append(timed(base_fn, q, k, v, slopes, backward))
        ours.append(timed(fn, q, k, v, slopes, backward))
    return {
        "baseline_s": statistics.median(base),
        "seconds": statistics.median(ours),
        "ratio": statistics.median(ours) / statistics.median(base),
    }


def peak_growth_mb(name: str, shape) -> float:
    """Peak RSS growth (MB) of a fresh process while it runs one forward of ``name``."""
    setup = f"""
        import torch
        from attention import op
        from linbias import alibi_slopes
        B, H, L, D = {tuple(shape)!r}
        q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
        slopes, fn = alibi_slopes(H), op({name!r})
        fn(q[:, :, :256], k[:, :, :256], v[:, :, :256], slopes)
    """
    return _peak_growth_mb(setup, "with torch.no_grad():\n    out = fn(q, k, v, slopes)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--backends", default="sdpa,blocked,flex,materialised")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-materialised", type=int, default=4096,
                   help="skip the materialised-bias route above this length (its bias is H*L*L floats)")
    p.add_argument("--memory-length", type=int, default=16384, help="0 skips the memory check")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    backends = args.backends.split(",")
    torch.manual_seed(0)

    rows = []
    print(f"ALiBi attention / {BASELINE}, CPU fp32, H={args.heads} D={args.dim}, "
          f"median of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'backend':<13}{'B':>3}{'L':>7}{'fwd':>9}{'fwd+bwd':>10}")
    for B in batches:
        for L in lengths:
            for name in backends:
                if name == "materialised" and L > args.max_materialised:
                    continue
                shape = (B, args.heads, L, args.dim)
                fwd = compare(name, shape, args.repeats, backward=False)
                bwd = compare(name, shape, args.repeats, backward=True) if trainable(name) else None
                rows.append({"backend": name, "batch": B, "length": L, "heads": args.heads,
                             "head_dim": args.dim, "forward": fwd, "forward_backward": bwd})
                back = f"{bwd['ratio']:>9.2f}x" if bwd else f"{'-':>10}"
                print(f"{name:<13}{B:>3}{L:>7}{fwd['ratio']:>8.2f}x{back}", flush=True)

    memory = []
    if args.memory_length:
        shape = (1, args.heads, args.memory_length, args.dim)
        base = peak_growth_mb("baseline", shape)
        print(f"\nextra peak memory, forward, B=1 H={args.heads} L={args.memory_length} "
              f"D={args.dim} (baseline grows {base:.0f} MB; a materialised fp32 bias alone would be "
              f"{args.heads * args.memory_length**2 * 4 / 1e9:.1f} GB)")
        for name in [b for b in backends if b in ("sdpa", "blocked")]:
            extra = peak_growth_mb(name, shape) - base
            memory.append({"backend": name, "length": args.memory_length, "extra_peak_mb": extra})
            print(f"{name:<13}{extra:>8.0f} MB")

    result = {"baseline": BASELINE, "device": "cpu", "dtype": "float32",
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "timings": rows, "memory": memory}
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
