"""Training speed in float32 against bfloat16 autocast, side by side, on this CPU.

bfloat16 autocast is fast only where the CPU has native bf16 instructions (AVX-512 BF16 or AMX);
elsewhere PyTorch and oneDNN emulate it. This benchmark times the same training step in both
precisions (interleaved rounds, median tokens/s) in fresh processes, once with the kernels this CPU
offers and, with ``--also-avx2``, once restricted to AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``), which imitates a CPU without AVX-512.

    python benchmarks/precision.py                          # the quick preset's model: tiny, L=64
    python benchmarks/precision.py --also-avx2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def measure(preset: str, position: str, train_len: int, batch_size: int, vocab: int, steps: int,
            repeats: int) -> dict:
    """Median tokens/s of training steps in float32 and in bf16 autocast, in this process."""
    import torch
    import torch.nn.functional as F

    from linbias.config import model_config
    from linbias.model import GPT

    torch.manual_seed(0)
    model = GPT(model_config(preset, position=position, train_len=train_len, vocab_size=vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (batch_size, train_len + 1), generator=torch.Generator().manual_seed(0))

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for name in rates:  # warm-up
        step(name == "bf16")
    for _ in range(repeats):
        for name in rates:
            start = time.perf_counter()
            for _ in range(steps):
                step(name == "bf16")
            rates[name].append(steps * batch_size * train_len / (time.perf_counter() - start))
    return {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            **{f"{k}_tokens_per_s": statistics.median(v) for k, v in rates.items()}}


def _in_subprocess(args: argparse.Namespace, env: dict[str, str]) -> dict:
    code = ("import json, sys; sys.path.insert(0, {here!r}); from precision import measure; "
            "print(json.dumps(measure(*{a!r})))").format(
        here=os.path.dirname(os.path.abspath(__file__)),
        a=(args.preset, args.position, args.train_len, args.batch_size, args.vocab_size,
           args.steps, args.repeats))
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--position", default="alibi")
    p.add_argument("--train-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps per precision per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds over the two precisions")
    p.add_argument("--also-avx2", action="store_true",
                   help="also measure with kernels restricted to AVX2 (imitates a CPU without AVX-512)")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    settings = [("this CPU", {})] + ([("restricted to AVX2", AVX2_ONLY)] if args.also_avx2 else [])
    rows = []
    for label, env in settings:
        row = {"kernels": label, **_in_subprocess(args, env)}
        row["bf16_vs_fp32"] = row["bf16_tokens_per_s"] / row["fp32_tokens_per_s"]
        rows.append(row)
    print(f"training speed, preset {args.preset}, {args.position}, L={args.train_len}, batch "
          f"{args.batch_size}, median of {args.repeats} rounds x {args.steps} steps")
    print(f"{'kernels':<20}{'capability':>12}{'fp32 tok/s':>12}{'bf16 tok/s':>12}{'bf16/fp32':>11}")
    for r in rows:
        print(f"{r['kernels']:<20}{r['capability']:>12}{r['fp32_tokens_per_s']:>12.0f}"
              f"{r['bf16_tokens_per_s']:>12.0f}{r['bf16_vs_fp32']:>10.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
