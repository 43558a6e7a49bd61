import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from linbias.config import ModelConfig, model_config
from linbias.data import split_of
from linbias.train import RunError, TrainConfig, load_run, train

LINES = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\npath = os.path.join('a', 'b')\n",
    "# the quick brown fox jumps over the lazy dog\n",
]


@pytest.fixture(scope="module")
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


def _configs(corpus, **train):
    mc = model_config("tiny", position="alibi", train_len=32, n_layers=1, d_model=32, n_heads=2)
    defaults = dict(data=corpus, vocab_size=300, steps=6, batch_size=4, eval_every=3,
                    eval_batches=2, save_every=2, log_every=1, warmup=2, lr=3e-3)
    return mc, TrainConfig(**{**defaults, **train})


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_writes_a_loadable_run(tmp_path, corpus):
    mc, tc = _configs(corpus, steps=12)
    out = train(mc, tc, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", "checkpoint.json", "log.jsonl"} <= names
    assert sum(n.startswith("state-") for n in names) == 1  # older checkpoints removed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert all("valid_loss" in r for r in log if r["step"] % 3 == 0)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    run = load_run(out)
    assert not run.model.training
    assert run.config.vocab_size == run.tokenizer.get_vocab_size()
    idx = torch.tensor([run.tokenizer.encode("def add(a, b):").ids])
    assert run.model(idx).shape == (1, idx.shape[1], run.config.vocab_size)


def test_same_seed_same_losses(tmp_path, corpus):
    mc, tc = _configs(corpus)
    a = train(mc, tc, tmp_path / "a", progress=False, cache_dir=tmp_path / "cache")
    b = train(mc, tc, tmp_path / "b", progress=False, cache_dir=tmp_path / "cache")
    assert _losses(a) == _losses(b)
    c = train(mc, TrainConfig(**{**tc.to_dict(), "seed": 1}), tmp_path / "c", progress=False,
              cache_dir=tmp_path / "cache")
    assert _losses(c) != _losses(a)


def test_resume_after_kill_continues_exactly(tmp_path, corpus):
    mc, tc = _configs(corpus, steps=40, save_every=5, eval_every=10)
    mc = ModelConfig.from_dict({**mc.to_dict(), "dropout": 0.1})  # RNG state must resume too
    cache = tmp_path / "cache"
    whole = train(mc, tc, tmp_path / "whole", progress=False, cache_dir=cache)

    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        from linbias.config import ModelConfig
        from linbias.train import TrainConfig, train
        mc = ModelConfig.from_json({mc.to_json()!r})
        tc = TrainConfig.from_json({tc.to_json()!r})
        train(mc, tc, {str(killed)!r}, progress=False, cache_dir={str(cache)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    ckpt = killed / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and json.loads(ckpt.read_text())["step"] >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(ckpt.read_text())["step"]
    assert step < tc.steps, "the run finished before it could be killed"

    train(mc, tc, killed, resume=True, progress=False, cache_dir=cache)
    assert _losses(killed) == _losses(whole)
    logged = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, tc.steps + 1))


def test_resume_with_different_config_is_refused(tmp_path, corpus):
    mc, tc = _configs(corpus)
    train(mc, tc, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    other = TrainConfig(**{**tc.to_dict(), "lr": 1e-4})
    with pytest.raises(RunError, match=r"lr \(saved 0.003, given 0.0001\)"):
        train(mc, other, tmp_path / "run", resume=True, progress=False, cache_dir=tmp_path / "cache")
    with pytest.raises(RunError, match="already holds a run"):
        train(mc, tc, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")


def test_corrupt_checkpoint_is_refused(tmp_path, corpus):
    mc, tc = _configs(corpus)
    out = train(mc, tc, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    state = out / json.loads((out / "checkpoint.json").read_text())["state"]
    state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(RunError, match="truncated or corrupt"):
        train(mc, tc, out, resume=True, progress=False, cache_dir=tmp_path / "cache")
    (out / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RunError, match="corrupt or truncated"):
        load_run(out)


def test_load_run_errors(tmp_path, corpus):
    with pytest.raises(RunError, match="no run directory"):
        load_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="config.json is missing"):
        load_run(tmp_path / "empty")
    mc, tc = _configs(corpus, steps=2)
    out = train(mc, tc, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    (out / "tokenizer.json").unlink()
    with pytest.raises(RunError, match="tokenizer.json is missing"):
        load_run(out)
    (out / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RunError, match="format"):
        load_run(out)


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    mc, tc = _configs(f"text:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="empty|no "):
        train(mc, tc, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("position", ["none", "sinusoidal", "learned", "rotary", "t5", "alibi"])
def test_every_position_method_trains(tmp_path, corpus, position):
    mc, tc = _configs(corpus, steps=3, eval_every=0)
    mc = model_config("tiny", position=position, train_len=32, n_layers=1, d_model=32, n_heads=2)
    out = train(mc, tc, tmp_path / position, progress=False, cache_dir=tmp_path / "cache")
    assert load_run(out).config.position == position
    assert all(torch.isfinite(torch.tensor(_losses(out))))


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, corpus):
    env = {**os.environ, "LINBIAS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["--preset", "tiny", "--position", "alibi", "--train-len", "32", "--n-layers", "1",
              "--d-model", "32", "--n-heads", "2", "--data", corpus, "--vocab-size", "300",
              "--steps", "4", "--eval-every", "2", "--eval-batches", "2", "--log-every", "1",
              "--warmup", "1", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "linbias", "train", "--out", str(tmp_path / "one"),
                          "--batch-size", "8", *common], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29500 + os.getpid() % 1000), "-m", "linbias", "train", "--out", str(tmp_path / "two"),
         "--batch-size", "4", *common], env=env, capture_output=True, text=True,
    )
    assert two.returncode == 0, two.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    va = [json.loads(x).get("valid_loss") for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    vb = [json.loads(x).get("valid_loss") for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert va[1] is not None and abs(va[1] - vb[1]) < 1e-4
