"""Shared test helpers: an independent float64 ALiBi attention written from the paper's formula,
and the tiny trained runs that the train, run-directory, CLI and export tests share."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from linbias.config import ModelConfig, TrainConfig, model_config
from linbias.data import split_of
from linbias.runs import load_run
from linbias.train import train


def naive_alibi_attention(q, k, v, slopes, *, causal=True, scale=None, key_padding_mask=None,
                          key_bias=None):
    """score[b, h, i, j] = q_i . k_j * scale - m[b, h] (i - j) + key_bias[b, h, j], in float64,
    loops over rows and heads; slopes ``[H]`` or ``[B, H]``, key_bias ``[H, K]`` or ``[B, H, K]``.

    Deliberately shares no code with linbias: positions, masks and grouped heads are spelled out.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, Lq, D = q.shape
    Lk, group = k.shape[2], H // k.shape[1]
    slopes = slopes.double().expand(B, H)
    key_bias = torch.zeros(B, H, Lk, dtype=torch.float64) if key_bias is None else \
        key_bias.double().expand(B, H, Lk)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, H, Lq, D, dtype=torch.float64)
    i_abs = torch.arange(Lk - Lq, Lk, dtype=torch.float64).view(-1, 1)
    j = torch.arange(Lk, dtype=torch.float64).view(1, -1)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // group], v[b, h // group]
            dist = (i_abs - j) if causal else (i_abs - j).abs()
            scores = q[b, h] @ kh.T * scale - slopes[b, h] * dist + key_bias[b, h]
            allowed = torch.ones(Lq, Lk, dtype=torch.bool)
            if causal:
                allowed &= j <= i_abs
            if key_padding_mask is not None:
                allowed &= key_padding_mask[b].view(1, -1)
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[b, h] = torch.softmax(scores, -1).nan_to_num(0.0) @ vh  # no key: zeros
    return out


def design_rule_attention(q, k, v, slopes, rule, train_len, *, key_padding_mask=None, scale=None,
                          sinks=4, eval_len=None):
    """Causal ALiBi attention under a rule past L, spelled out from DESIGN.md ("Rules past L") in
    float64: per row L' (its real tokens), per head its slope and rank (0 = steepest), per query
    the distance to each key. Shares no code with linbias. ``slopes`` ``[H]``: the paper's;
    ``eval_len`` overrides L' (a cached query at its own length)."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    B, H, Lq, D = q.shape
    Lk, group, L = k.shape[2], H // k.shape[1], train_len
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    base = [float(m) for m in slopes]
    rank = {h: n for n, h in enumerate(sorted(range(H), key=lambda h: -base[h]))}
    out = torch.zeros(B, H, Lq, D, dtype=torch.float64)
    for b in range(B):
        real = [True] * Lk if key_padding_mask is None else key_padding_mask[b].tolist()
        Lp = max(1, sum(real)) if eval_len is None else eval_len
        past = Lp > L
        sink_keys = [j for j in range(Lk) if real[j]][:sinks]
        w = L // 2
        for h in range(H):
            m, a = base[h], Lp / L
            if past:
                m *= {"linear": 1 / a, "sqrt": math.sqrt(1 / a),
                      "log": math.log(L) / math.log(Lp),
                      "ntk": a ** (-rank[h] / (H - 1)) if H > 1 else 1.0}.get(rule, 1.0)
            temperature = math.log(Lp) / math.log(L) if past and rule == "logn" else 1.0
            for i in range(Lq):
                i_abs = Lk - Lq + i
                scores = torch.full((Lk,), -math.inf, dtype=torch.float64)
                for j in range(i_abs + 1):
                    d = i_abs - j
                    if not real[j]:
                        continue
                    if past and rule == "window" and not (d < L or j in sink_keys):
                        continue
                    f = d
                    if past and rule in ("cap", "window"):
                        f = min(d, L)
                    if past and rule == "selfextend" and d > w:
                        f = w + (d - w) / ((Lp - w) / (L - w))
                    qk = float(q[b, h, i] @ k[b, h // group, j])
                    scores[j] = temperature * qk * scale - m * f
                if torch.isfinite(scores).any():
                    out[b, h, i] = torch.softmax(scores, -1) @ v[b, h // group]
    return out


def reference_attention(q, k, v, bias=None, key_padding_mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias) v in float64, causal with queries the last T keys."""
    q, k, v = q.double(), k.double(), v.double()
    T, S = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.double()
    visible = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    visible = visible.expand(q.shape[0], 1, T, S)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    has_key = visible.any(-1, keepdim=True)  # a query with no visible key gives zeros
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0), -1)
    return (probs @ v).masked_fill(~has_key, 0.0)


class LargestTensor(TorchDispatchMode):
    """Records the numel of the largest tensor any aten op produces inside the ``with`` block: a
    check that no heads x L x L tensor is built."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def forget_checksums(run_dir) -> None:
    """Drop the file checksums from a run's checkpoint.json, as runs written before they were
    recorded have none: a test can then edit config.json to make such a run."""
    import json

    path = run_dir / "checkpoint.json"
    meta = json.loads(path.read_text())
    meta.pop("files")
    path.write_text(json.dumps(meta))


_HOLD = """
import sys, time
from pathlib import Path
from linbias.fileio import exclusive, locked_folder
lock = {"folder": locked_folder, "file": exclusive}[sys.argv[1]]
with lock(Path(sys.argv[2]), "x"):
    print("held", flush=True)
    time.sleep(120)
"""


@contextmanager
def another_writer(path, kind: str = "folder"):
    """A real second process that holds ``path`` (``fileio.locked_folder``, or ``exclusive`` on a
    lock file with ``kind="file"``) until the block ends, then is killed (the kernel frees it)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, kind, str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- a tiny trained run, shared by tests that need real weights, a tokenizer and a corpus -------

_TINY_WORDS = [
    "alpha", "beta", "γάμμα", "дельта", "日本語", "🙂", "x = 1\n", "def f(y):\n    return y\n",
]


@pytest.fixture(scope="session")
def tiny_text_corpus(tmp_path_factory: pytest.TempPathFactory):
    """A folder of 400 small text files (ASCII start, then multi-byte words): ~1% valid/test."""
    import random

    root = tmp_path_factory.mktemp("tiny_corpus")
    rng = random.Random(0)
    for i in range(400):
        words = " ".join(rng.choice(_TINY_WORDS) for _ in range(60 + i % 40))
        (root / f"doc{i:03d}.txt").write_text(f"doc {i}: {words}\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """A token-stream and tokenizer cache private to the test session."""
    return tmp_path_factory.mktemp("linbias_cache")


@pytest.fixture(scope="session")
def tiny_alibi_run(tmp_path_factory: pytest.TempPathFactory, tiny_text_corpus, tiny_cache_dir):
    """Path of an ALiBi run (train_len 32, 1 layer, d_model 32, 2 heads) trained for 5 steps."""
    from linbias.config import model_config
    from linbias.config import TrainConfig
    from linbias.train import train

    torch.manual_seed(0)
    config = model_config("tiny", position="alibi", train_len=32, n_layers=1, d_model=32, n_heads=2)
    train_config = TrainConfig(data=f"text:{tiny_text_corpus}", vocab_size=300, steps=5,
                               batch_size=4, eval_every=0, save_every=0, warmup=1)
    out = tmp_path_factory.mktemp("tiny_alibi_run") / "run"
    return train(config, train_config, out, progress=False, cache_dir=tiny_cache_dir)


@pytest.fixture(scope="module")
def bias_free_dir(tiny_alibi_run):
    """The tiny trained ALiBi run (train_len 32): no biases, the default, so it exports exactly."""
    from safetensors.torch import load_file

    assert not any(name.endswith(".bias") for name in load_file(str(tiny_alibi_run / "model.safetensors")))
    return tiny_alibi_run


@pytest.fixture(scope="module")
def exported(bias_free_dir, tmp_path_factory: pytest.TempPathFactory):
    """The tiny run exported to a transformers MPT directory."""
    from linbias import hf

    return hf.export_to_hf(bias_free_dir, tmp_path_factory.mktemp("export") / "hf")


# --- tiny runs on a folder of Python-like files, shared by the train, run-directory and CLI tests ---
# ``tiny_configs`` is the settings of them all; ``stopped_run`` is one stopped after 3 of its 6 steps,
# ``parent`` one that finished (the start of a fine-tune, ``fine_tune_configs``).

LINES = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\npath = os.path.join('a', 'b')\n",
    "# the quick brown fox jumps over the lazy dog\n",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A folder of small Python-like files with train, valid and test files present."""
    root = tmp_path_factory.mktemp("corpus")
    counts = {"train": 0, "valid": 0, "test": 0}
    i = 0
    while counts["train"] < 60 or counts["valid"] < 2 or counts["test"] < 2:
        name = f"doc{i:04d}.py"
        split = split_of(name)
        if counts[split] < (60 if split == "train" else 2):
            text = "".join(LINES[(i + j) % len(LINES)] for j in range(12))
            (root / name).write_text(f"# file {i}\n" + text)
            counts[split] += 1
        i += 1
    return f"text:{root}"


def tiny_configs(corpus: str, **train: Any) -> tuple[ModelConfig, TrainConfig]:
    """A one-layer ALiBi model at L = 32 and a 6-step schedule on ``corpus`` (``train`` overrides)."""
    mc = model_config("tiny", position="alibi", train_len=32, n_layers=1, d_model=32, n_heads=2)
    defaults = dict(data=corpus, vocab_size=300, steps=6, batch_size=4, eval_every=3,
                    eval_batches=2, save_every=2, log_every=1, warmup=2, lr=3e-3)
    return mc, TrainConfig(**{**defaults, **train})


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """A token-stream and tokenizer cache for the runs on ``corpus``."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory, corpus, cache) -> Path:
    """A run of 6 steps stopped after 3: checkpoint at step 3, log lines 1..3."""
    mc, tc = tiny_configs(corpus)
    out = tmp_path_factory.mktemp("stopped") / "run"
    return train(mc, tc, out, progress=False, cache_dir=cache, stop_after=3)


@pytest.fixture(scope="session")
def parent(tmp_path_factory, corpus, cache) -> Path:
    """A finished ALiBi run at L = 32 (the stopped run's settings, all 6 steps)."""
    mc, tc = tiny_configs(corpus, eval_every=0)
    return train(mc, tc, tmp_path_factory.mktemp("parent") / "run", progress=False, cache_dir=cache)


def fine_tune_configs(parent_dir: Path, **model: Any) -> tuple[ModelConfig, TrainConfig]:
    """The child configs: the parent's model at L2 = 64 (and ``model``), a fresh schedule."""
    parent_run = load_run(parent_dir)
    mc = ModelConfig.from_dict({**parent_run.config.to_dict(), "train_len": 64, **model})
    tc = TrainConfig(**{**parent_run.train_config.to_dict(), "steps": 4, "lr": 1e-3, "warmup": 1,
                        "save_every": 1, "init_from": str(parent_dir)})
    return mc, tc


def train_argv(corpus: str, out: Path, cache: Path, *extra: str) -> list[str]:
    """``python -m linbias train`` of a tiny ALiBi run that saves every step (``extra`` appended)."""
    return [sys.executable, "-m", "linbias", "train", "--position", "alibi", "--train-len", "32",
            "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--vocab-size", "300",
            "--batch-size", "4", "--eval-every", "0", "--save-every", "1", "--warmup", "1",
            "--data", corpus, "--out", str(out), "--no-progress", *extra]


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Wait until ``path`` exists, failing if ``proc`` ends first or ``seconds`` pass."""
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, "the first process ended early"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)
