"""Long forward passes of extended transformers ALiBi models: the family's own attention against
linbias's, and both against a linbias GPT of the same size, measured in one run.

For each family (BLOOM, MPT, Falcon with ``alibi=True``), a random model of one size (d_model 256,
8 heads, 2 layers, training length L = 1024; as in the issue, ``MptConfig(d_model=256, n_heads=8,
n_layers=2, max_seq_len=1024)``) is extended with ``linbias.hf.extend_context`` and runs one
forward pass of L' tokens, CPU fp32, no KV cache:

* native: ``extend_context(model, attention="native")``, the family's attention past L (BLOOM and
  MPT: eager scores ``H x L' x L'``; Falcon: its bias materialised for SDPA);
* linbias: ``extend_context(model)``, the default, through ``linbias.alibi_attention``;
* gpt: ``linbias.model.GPT`` with ``position="alibi"`` and rule ``linear``, same d_model, heads,
  layers and vocabulary: the baseline of the ratios.

Every measurement runs in a fresh process: one warm-up forward of 256 tokens, then one timed
forward of L' tokens. Extra peak memory is the peak resident set during that forward minus the
resident set before it (``benchmarks/peak_memory.py``). The vocabulary is small (512) so that the
output layer, the same for every variant, does not hide attention. ``max |dlogit|`` compares the
linbias and native logits of the same model (Falcon's linbias path passes Falcon's own per-key
bias, rounded to bfloat16 as Falcon rounds it, as ``key_bias``). Native runs are skipped where
their ``H x L' x L'`` tensors would not fit in the available memory. Targets at 8k: linbias
within 1.5x of the GPT's time, and its extra peak memory within 2x of the GPT's.

    OMP_NUM_THREADS=1 python benchmarks/hf_long.py                   # 2k, 8k, 32k: ~10 minutes
    OMP_NUM_THREADS=1 python benchmarks/hf_long.py --lengths 2048,8192 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from peak_memory import rss_mb

FAMILIES = ("bloom", "mpt", "falcon")
TRAIN_LEN, D_MODEL, HEADS, LAYERS, VOCAB = 1024, 256, 8, 2, 512
TARGET_TIME, TARGET_MEMORY, TARGET_LEN = 1.5, 2.0, 8192
WARMUP = 256
# Bytes per query x key of the family's own attention (fp32 scores, probabilities and a mask or a
# copy of them at once), to skip lengths that cannot fit; 8.6 GB for BLOOM at 8k in the issue.
NATIVE_BYTES_PER_SCORE = 3 * HEADS * 4


# --- one measurement, in its own process ----------------------------------------------------------


def build(family: str, variant: str) -> torch.nn.Module:
    """The model of one row, random weights, extended for ``variant``."""
    torch.manual_seed(0)
    if family == "gpt":
        from linbias.config import model_config
        from linbias.model import GPT

        gpt = GPT(model_config("tiny", d_model=D_MODEL, n_heads=HEADS, n_layers=LAYERS,
                               vocab_size=VOCAB, train_len=TRAIN_LEN, position="alibi"))
        gpt.set_rule("linear")
        return gpt.eval()
    import transformers as tf

    from linbias.hf import extend_context

    if family == "bloom":
        model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=D_MODEL,
                                                   n_layer=LAYERS, n_head=HEADS))
    elif family == "mpt":
        model = tf.MptForCausalLM(tf.MptConfig(d_model=D_MODEL, n_heads=HEADS, n_layers=LAYERS,
                                               max_seq_len=TRAIN_LEN, vocab_size=VOCAB))
    else:
        model = tf.FalconForCausalLM(tf.FalconConfig(
            vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, alibi=True, multi_query=False,
            max_position_embeddings=TRAIN_LEN))
    return extend_context(model.eval(), train_len=TRAIN_LEN, attention=variant)


def forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    from linbias.model import GPT

    return model(ids) if isinstance(model, GPT) else model(ids, use_cache=False).logits


def measure(family: str, variant: str, length: int, logits_path: str) -> dict:
    """Seconds and extra peak MB of one forward of ``length`` tokens; logits saved for dlogit."""
    model = build(family, variant)
    ids = torch.randint(VOCAB, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        forward(model, ids[:, :WARMUP])
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM)
        before = rss_mb("VmRSS")
        start = time.perf_counter()
        logits = forward(model, ids)
        seconds = time.perf_counter() - start
        extra = rss_mb("VmHWM") - before
    torch.save(logits[0].float(), logits_path)
    return {"seconds": seconds, "extra_peak_mb": extra}


def run_measure(family: str, variant: str, length: int, logits_path: str) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, os.path.join(here, "hf_long.py"), "--worker", family, variant,
         str(length), logits_path],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the table ------------------------------------------------------------------------------------


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def native_skip_reason(length: int) -> str | None:
    need, have = NATIVE_BYTES_PER_SCORE * length * length, 0.8 * available_bytes()
    if need > have:
        return (f"native skipped at {length}: its H x L' x L' tensors need ~{need / 1e9:.0f} GB, "
                f"{have / 1e9:.0f} GB usable here")
    return None


def max_dlogit(a_path: str, b_path: str) -> float:
    return float((torch.load(a_path) - torch.load(b_path)).abs().max())


def row(family: str, length: int, gpt: dict, skip_native: str | None, tmp: str) -> dict:
    paths = {v: os.path.join(tmp, f"{family}-{v}-{length}.pt") for v in ("linbias", "native")}
    r = {"family": family, "length": length, "linbias": run_measure(family, "linbias", length,
                                                                   paths["linbias"])}
    r["native"] = None if skip_native else run_measure(family, "native", length, paths["native"])
    r["native_skipped"] = skip_native
    r["time_vs_gpt"] = r["linbias"]["seconds"] / gpt["seconds"]
    r["memory_vs_gpt"] = r["linbias"]["extra_peak_mb"] / max(gpt["extra_peak_mb"], 1.0)
    if r["native"]:
        r["native_time_vs_linbias"] = r["native"]["seconds"] / r["linbias"]["seconds"]
        r["native_memory_vs_linbias"] = (r["native"]["extra_peak_mb"]
                                         / max(r["linbias"]["extra_peak_mb"], 1.0))
        r["max_dlogit"] = max_dlogit(paths["linbias"], paths["native"])
    for p in paths.values():
        if os.path.exists(p):
            os.remove(p)
    return r


def _cell(m: dict | None) -> str:
    return "—" if m is None else f"{m['seconds']:.2f} s, {m['extra_peak_mb']:.0f} MB"


def print_header() -> None:
    print(f"Extended HF ALiBi models, one forward, CPU fp32, d_model {D_MODEL}, {HEADS} heads, "
          f"{LAYERS} layers, vocab {VOCAB}, L={TRAIN_LEN}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; targets at {TARGET_LEN}: linbias/gpt time <= "
          f"{TARGET_TIME}x, extra peak memory <= {TARGET_MEMORY}x")
    print("| family | L' | native (own attention) | linbias | linbias GPT | linbias/GPT time | "
          "linbias/GPT memory | native/linbias time | native/linbias memory | max abs dlogit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def print_row(r: dict, gpt: dict) -> None:
    """One line of the markdown table."""
    native = r.get("native_time_vs_linbias")
    ratios = (f"{native:.1f}x | {r['native_memory_vs_linbias']:.1f}x | {r['max_dlogit']:.1e}"
              if native else "— | — | —")
    print(f"| {r['family']} | {r['length']} | {_cell(r['native'])} | {_cell(r['linbias'])} | "
          f"{_cell(gpt)} | {r['time_vs_gpt']:.2f}x | {r['memory_vs_gpt']:.2f}x | {ratios} |",
          flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2048,8192,32768", help="tokens L' of the forward pass")
    p.add_argument("--families", default=",".join(FAMILIES), help="of bloom, mpt, falcon")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    families = args.families.split(",")
    unknown = set(families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; valid: {', '.join(FAMILIES)}")
    print_header()
    rows, gpts = [], {}
    skipped = {n: native_skip_reason(n) for n in lengths}
    with tempfile.TemporaryDirectory() as tmp:
        for length in lengths:
            gpts[length] = run_measure("gpt", "linbias", length, os.path.join(tmp, "gpt.pt"))
            for family in families:
                rows.append(row(family, length, gpts[length], skipped[length], tmp))
                print_row(rows[-1], gpts[length])
    for reason in filter(None, skipped.values()):
        print(reason)
    at_target = [r for r in rows if r["length"] == TARGET_LEN]
    for r in at_target:
        ok = r["time_vs_gpt"] <= TARGET_TIME and r["memory_vs_gpt"] <= TARGET_MEMORY
        print(f"{r['family']} at {TARGET_LEN}: {'meets' if ok else 'misses'} the targets "
              f"({r['time_vs_gpt']:.2f}x time, {r['memory_vs_gpt']:.2f}x memory)")
    result = {"baseline": "linbias GPT of the same size", "device": "cpu", "dtype": "float32",
              "d_model": D_MODEL, "heads": HEADS, "layers": LAYERS, "vocab": VOCAB,
              "train_len": TRAIN_LEN, "targets": {"length": TARGET_LEN, "time": TARGET_TIME,
                                                  "memory": TARGET_MEMORY},
              "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "gpt": {str(k): v for k, v in gpts.items()}, "rows": rows}
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        family, variant, length, logits_path = sys.argv[2:6]
        print(json.dumps(measure(family, variant, int(length), logits_path)))
    else:
        main()
