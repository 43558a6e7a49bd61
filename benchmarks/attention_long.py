"""Causal ALiBi attention at long context against plain causal SDPA, on random and trained
activations, with the share of scores the op computes per head (the rest is skipped: provably
below fp32's rounding of the row).

For each length L' and activation source, fp32, B=1 (random: H=8 D=64):

* forward and forward+backward: ``alibi_attention`` (default backend) against
  ``F.scaled_dot_product_attention(is_causal=True)`` on the same q, k, v, alternating; the ratio
  of the fastest runs (the fastest is the least disturbed on a shared machine);
* a decoding step: the last query against all L' keys with the cache's key norms (which let it
  leave far blocks unread), against plain SDPA with one query, and the share of keys it reads;
* the share of causal scores computed per head, with the paper's slopes and with ``linear``
  interpolation (slopes x L / L', which widens every window);
* once, the cost of subnormal numbers on this CPU: each path (plain SDPA, the op forward and
  backward, a decoding step, ``blocked``) on scores that differ by 95 within a row (exp gives
  subnormals) against scores that differ by 10, and ``torch.exp`` alone.

Trained activations are the q, k, v of the last layer of a linbias ALiBi run fed the Python
standard library's source (``--run``; its own heads and head dim, e.g. the retrieval preset's
4 x 32). ``--avx2`` repeats the timings in a
subprocess with ``ATEN_CPU_CAPABILITY=avx2`` (kernels restricted to AVX2).

    python benchmarks/attention_long.py --lengths 1024,4096 --sources random
    python benchmarks/attention_long.py --run RUN --lengths 1024,4096,16384,65536 --avx2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import linbias.attention as attention
import linbias.positions as positions
from linbias import alibi_attention, alibi_slopes

HEADS, HEAD_DIM = 8, 64


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- activations ----------------------------------------------------------------------------------


def random_qkv(L: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(1, HEADS, L, HEAD_DIM) for _ in range(3))


def stdlib_tokens(tokenizer, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the Python standard library's source, files in sorted order."""
    ids: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tokenizer.encode(path.read_text(errors="replace")).ids
        if len(ids) >= n:
            return torch.tensor(ids[:n]).view(1, -1)
    raise SystemExit(f"the standard library has fewer than {n} tokens")


class _Captured(Exception):
    pass


def trained_qkv(run_dir: str, L: int) -> tuple[torch.Tensor, ...]:
    """q, k, v of the last attention layer of the run, on ``L`` tokens of real text."""
    from linbias.runs import load_run

    run = load_run(run_dir)
    if run.config.position != "alibi":
        raise SystemExit(f"--run must be an ALiBi run, got {run.config.position}")
    calls, original = [], positions.alibi_attention

    def capture(q, k, v, slopes, **kw):
        calls.append((q.contiguous(), k.contiguous(), v.contiguous()))
        if len(calls) == run.config.n_layers:
            raise _Captured
        return original(q, k, v, slopes, **kw)

    positions.alibi_attention = capture
    try:
        with torch.no_grad():
            run.model(stdlib_tokens(run.tokenizer, L))
    except _Captured:
        pass
    finally:
        positions.alibi_attention = original
    return calls[-1]


# --- what is measured -----------------------------------------------------------------------------


def fastest(fns: dict[str, Callable[[], object]], repeats: int, warm_up: bool = True
            ) -> dict[str, float]:
    """Seconds of the fastest of ``repeats`` runs of each, alternating (after one warm-up)."""
    for fn in fns.values() if warm_up else ():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def forward(q, k, v, slopes, repeats: int) -> dict:
    with torch.no_grad():
        t = fastest({"plain": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                     "alibi": lambda: alibi_attention(q, k, v, slopes)}, repeats, q.shape[2] <= 4096)
    return {"plain_s": t["plain"], "alibi_s": t["alibi"], "ratio": t["alibi"] / t["plain"]}


def forward_backward(q, k, v, slopes, repeats: int) -> dict:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)

    def step(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), grad)

    t = fastest({"plain": step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                 "alibi": step(lambda: alibi_attention(q, k, v, slopes))}, repeats,
                q.shape[2] <= 4096)
    return {"plain_s": t["plain"], "alibi_s": t["alibi"], "ratio": t["alibi"] / t["plain"]}


def decode(q, k, v, slopes, repeats: int) -> dict:
    """The last query against all keys, with the cache's key norms (``KVCache`` keeps them; one
    block's norms per step, not timed), and the share of keys it reads per head."""
    q1 = q[:, :, -1:].contiguous()
    norms = attention.KeyNorms.of(k)
    with torch.no_grad():
        t = fastest({"plain": lambda: F.scaled_dot_product_attention(q1, k, v),
                     "alibi": lambda: alibi_attention(q1, k, v, slopes, key_norms=norms)}, repeats)
        c = attention._Call(q1, k, v, slopes, True, q.shape[-1] ** -0.5, None, key_norms=norms)
        kept = attention._decode_blocks(c, attention._Rows.of(None, 1, True), q1, k)
    return {"plain_s": t["plain"], "alibi_s": t["alibi"], "ratio": t["alibi"] / t["plain"],
            "share": kept.float().mean(-1).tolist()}


def computed_share(q, k, v, slopes) -> list[float]:
    """Per head, the share of the causal scores the sdpa segments compute (1: none skipped)."""
    H, L = q.shape[1], q.shape[2]
    c = attention._Call(q, k, v, slopes, True, q.shape[-1] ** -0.5, None)
    with torch.no_grad():
        segs = attention._bias_forward(c, q, k, v)[2]
    done = [0.0] * H
    for s in segs:
        rows = s.q1 - s.q0
        scores = rows * (rows + 1) / 2 if s.causal else rows * (s.k1 - s.k0)
        for h in range(H)[s.heads(H)]:
            done[h] += scores
    return [d / (L * (L + 1) / 2) for d in done]


def subnormal_penalty(L: int = 2048, repeats: int = 5) -> dict:
    """Each path on rows whose scores differ by 95 (exp: subnormal) against 10, as the ratio of
    their times: plain causal SDPA; the op with zero slopes (one kernel call with its per-key
    mask), forward and forward+backward; a decoding step (one query, 4L keys); ``blocked``; and
    ``torch.exp`` alone on values whose exp is subnormal."""
    def qkv(spread, Lq, Lk):  # scores +-spread/2 after the 1/sqrt(D) scaling
        torch.manual_seed(0)
        sign = torch.randint(0, 2, (1, HEADS, Lk, 1)).float() * 2 - 1
        k = torch.cat([sign, torch.zeros(1, HEADS, Lk, HEAD_DIM - 1)], -1)
        q = torch.cat([torch.full((1, HEADS, Lq, 1), spread / 2 * HEAD_DIM**0.5),
                       torch.zeros(1, HEADS, Lq, HEAD_DIM - 1)], -1)
        return q, k, torch.randn(1, HEADS, Lk, HEAD_DIM)

    zero = torch.zeros(HEADS)

    def backward(q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return lambda: torch.autograd.grad(alibi_attention(q, k, v, zero).sum(), (q, k, v))

    paths = {
        "plain": lambda q, k, v: lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "op": lambda q, k, v: lambda: alibi_attention(q, k, v, zero),
        "op_backward": backward,
        "decode": lambda q, k, v: lambda: alibi_attention(q[:, :, -1:], k, v, zero),
        "blocked": lambda q, k, v: lambda: alibi_attention(q, k, v, zero, backend="blocked"),
    }
    result: dict = {"length": L}
    with torch.no_grad():
        for name, make in paths.items():
            Lk = 4 * L if name == "decode" else L
            fns = {sp: make(*qkv(sp, Lk if name == "decode" else L, Lk)) for sp in (95.0, 10.0)}
            with torch.enable_grad() if name == "op_backward" else torch.no_grad():
                t = fastest({"subnormal": fns[95.0], "normal": fns[10.0]}, repeats)
            result[name] = t["subnormal"] / t["normal"]
        x = torch.full((1 << 22,), -95.0)
        t = fastest({"subnormal": lambda: torch.exp(x), "normal": lambda: torch.exp(x + 85.0)},
                    repeats)
        result["torch_exp"] = t["subnormal"] / t["normal"]
    return result


def measure(args) -> dict:
    rows = []
    for source in args.sources.split(","):
        for L in (int(x) for x in args.lengths.split(",")):
            q, k, v = random_qkv(L) if source == "random" else trained_qkv(args.run, L)
            slopes = alibi_slopes(q.shape[1])
            repeats = args.repeats if L <= 4096 else max(1, args.repeats // 3)
            row = {"source": source, "length": L, "heads": q.shape[1], "head_dim": q.shape[3],
                   "forward": forward(q, k, v, slopes, repeats)}
            row["forward_backward"] = (
                forward_backward(q, k, v, slopes, repeats) if L <= args.max_backward else None
            )
            row["decode"] = decode(q, k, v, slopes, 10 * args.repeats)
            row["share"] = computed_share(q, k, v, slopes)
            row["share_linear"] = computed_share(q, k, v, slopes * min(1.0, args.train_len / L))
            rows.append(row)
            fb = "-" if row["forward_backward"] is None else \
                f"{row['forward_backward']['ratio']:.2f}x"
            print(f"{source:<8}{L:>7}{row['forward']['ratio']:>8.2f}x{fb:>9}"
                  f"{row['decode']['ratio']:>8.2f}x   "
                  + " ".join(f"{s:.2f}" for s in row["share"]) + "   "
                  + " ".join(f"{s:.2f}" for s in row["share_linear"]) + "   "
                  + " ".join(f"{s:.2f}" for s in row["decode"]["share"]), flush=True)
    return {"timings": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,16384,65536")
    p.add_argument("--sources", default=None, help="random,trained (default: trained with --run)")
    p.add_argument("--run", default=None, help="an ALiBi run with 8 heads of 64 dims")
    p.add_argument("--train-len", type=int, default=128, help="L for the linear-interpolation share")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-backward", type=int, default=16384,
                   help="skip forward+backward above this length (plain alone takes minutes)")
    p.add_argument("--avx2", action="store_true", help="repeat in a subprocess restricted to AVX2")
    p.add_argument("--avx2-lengths", default="1024,4096,16384")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    args.sources = args.sources or ("random,trained" if args.run else "random")
    if "trained" in args.sources and not args.run:
        p.error("trained activations need --run RUN (an ALiBi run)")

    print(f"ALiBi attention / causal SDPA, fp32, B=1 (random: H={HEADS} D={HEAD_DIM}; trained: the "
          f"run's), {cpu_name()}, kernels "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'source':<8}{'L':>7}{'fwd':>9}{'fwd+bwd':>9}{'decode':>9}   computed share per "
          f"head, paper slopes   ... with linear slopes x {args.train_len}/L   decode: keys "
          f"read per head")
    result = {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, **measure(args)}
    penalty = subnormal_penalty()
    result["subnormal"] = penalty
    print(f"subnormal scores (L={penalty['length']}), time against normal ones: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in penalty.items() if k != "length"))
    if args.avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        cmd = [sys.executable, __file__, "--lengths", args.avx2_lengths, "--sources",
               args.sources, "--repeats", str(args.repeats), "--max-backward",
               str(args.max_backward), "--train-len", str(args.train_len)]
        cmd += ["--run", args.run] if args.run else []
        print("\nrestricted to AVX2 (ATEN_CPU_CAPABILITY=avx2):", flush=True)
        out = subprocess.run(cmd + ["--json", "/dev/stdout"], capture_output=True, text=True,
                             env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}, check=True)
        print(out.stdout[: out.stdout.index("{")], end="")
        result["avx2"] = json.loads(out.stdout[out.stdout.index("{"):])
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
