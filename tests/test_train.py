import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

import linbias.train as train_mod
from conftest import forget_checksums
from linbias.cli import main
from linbias.config import ModelConfig, model_config
from linbias.data import split_of
from linbias.config import TrainConfig
from linbias.runs import RunError, load_run, read_log
from linbias.train import Diverged, train

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
    assert [r["step"] for r in log if "valid_loss" in r] == [3, 6, 9, 12]
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

    killed = _kill_at_checkpoint(mc, tc, tmp_path / "killed", cache, min_step=10)
    train(mc, tc, killed, resume=True, progress=False, cache_dir=cache)
    assert _losses(killed) == _losses(whole)
    logged = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, tc.steps + 1))


def _kill_at_checkpoint(mc, tc, out: Path, cache: Path, min_step: int) -> Path:
    """Train in a subprocess and SIGKILL it once a checkpoint of ``min_step`` or later exists."""
    script = textwrap.dedent(f"""
        from linbias.config import ModelConfig
        from linbias.config import TrainConfig
        from linbias.train import train
        mc = ModelConfig.from_json({mc.to_json()!r})
        tc = TrainConfig.from_json({tc.to_json()!r})
        train(mc, tc, {str(out)!r}, progress=False, cache_dir={str(cache)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    ckpt = out / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and json.loads(ckpt.read_text())["step"] >= min_step:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(ckpt.read_text())["step"] < tc.steps, "the run finished before the kill"
    return out


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
    with pytest.raises(RunError, match="model.safetensors is not the file .* sha256 differs"):
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
    losses = _losses(out)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


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


# --- no silent wrong answers, no user files touched ----------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, corpus, cache) -> Path:
    """A run of 6 steps stopped after 3: checkpoint at step 3, log lines 1..3."""
    mc, tc = _configs(corpus)
    out = tmp_path_factory.mktemp("stopped") / "run"
    return train(mc, tc, out, progress=False, cache_dir=cache, stop_after=3)


@pytest.fixture
def run_copy(tmp_path, stopped_run) -> Path:
    return Path(shutil.copytree(stopped_run, tmp_path / "run"))


def _resume(corpus, out, cache, **train_kwargs):
    mc, tc = _configs(corpus)
    return train(mc, tc, out, resume=True, progress=False, cache_dir=cache, **train_kwargs)


def test_cli_rejects_an_infinite_lr_before_any_work(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--lr", "inf", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lr must be a finite number" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("names", [("model.safetensors", "log.jsonl"), ("tokenizer.json",),
                                   ("config.json",), (".hidden",)])
def test_new_run_never_overwrites_files_in_out(tmp_path, corpus, names):
    out = tmp_path / "mine"
    out.mkdir()
    for name in names:
        (out / name).write_text(f"the user's {name}")
    mc, tc = _configs(corpus)
    with pytest.raises(RunError, match=rf"{names[0]}.*choose another --out"):
        train(mc, tc, out, progress=False, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert all((out / n).read_text() == f"the user's {n}" for n in names)
    assert not (tmp_path / "cache").exists()  # refused before the tokenizer was trained


def test_new_run_never_deletes_what_a_stale_checkpoint_json_names(tmp_path, corpus):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    for state in ("../victim.txt", str(victim)):
        (out / "checkpoint.json").write_text(json.dumps({"step": 1, "state": state}))
        with pytest.raises(RunError, match="not empty"):
            train(*_configs(corpus), out, progress=False, cache_dir=tmp_path / "cache")
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("resume", [False, True])
def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, corpus, resume):
    (tmp_path / "file").write_text("not a folder")
    for out in [tmp_path / "file"] + ([] if resume else [tmp_path / "file" / "run"]):
        with pytest.raises(RunError, match="is a file"):
            train(*_configs(corpus), out, resume=resume, progress=False, cache_dir=tmp_path / "cache")
    assert (tmp_path / "file").read_text() == "not a folder" and not (tmp_path / "cache").exists()


def test_too_short_splits_are_refused_before_step_1(tmp_path, corpus):
    root = tmp_path / "short_valid"
    root.mkdir()
    files = {"valid": 0, "train": 0}
    for i in range(100_000):  # valid documents of a token or two, whether split by name or text
        name, short, long = f"doc{i:05d}.py", f"x{i}", "".join(LINES) * 3 + f"# {i}\n"
        if split_of(name) == split_of(short) == "valid" and files["valid"] < 3:
            (root / name).write_text(short)
            files["valid"] += 1
        elif split_of(name) == split_of(long) == "train" and files["train"] < 40:
            (root / name).write_text(long)
            files["train"] += 1
        if min(files.values()) == 3 and files["train"] == 40:
            break
    mc, tc = _configs(f"text:{root}")
    with pytest.raises(RunError, match=r"valid split .* fewer than one window of train_len \+ 1 = 33"):
        train(mc, tc, tmp_path / "a", progress=False, cache_dir=tmp_path / "cache")
    long = ModelConfig.from_dict({**mc.to_dict(), "train_len": 1_000_000})
    with pytest.raises(RunError, match="train split .* smaller --train-len"):
        train(long, _configs(corpus)[1], tmp_path / "b", progress=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _finite_state(out: Path) -> bool:
    ckpt = json.loads((out / "checkpoint.json").read_text())
    tensors = load_file(str(out / ckpt["state"]))
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path, corpus):
    # lr 1e10 leaves finite but huge weights after step 1; step 2's loss is not finite.
    mc, tc = _configs(corpus, lr=1e10, warmup=0, save_every=1, grad_clip=0.0)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"step 2 .*checkpoint \(step 1\) is kept"):
        train(mc, tc, out, progress=False, cache_dir=tmp_path / "cache")
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 1 and _finite_state(out)
    assert [r["step"] for r in read_log(out)] == [1]
    with pytest.raises(Diverged):  # a resume meets the same wall rather than reporting success
        train(mc, tc, out, resume=True, progress=False, cache_dir=tmp_path / "cache")


def test_cli_reports_divergence_in_one_line(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("LINBIAS_CACHE", str(tmp_path / "cache"))
    args = ["train", "--out", str(tmp_path / "run"), "--train-len", "32", "--n-layers", "1",
            "--d-model", "32", "--n-heads", "2", "--data", corpus, "--vocab-size", "300",
            "--steps", "4", "--batch-size", "4", "--warmup", "0", "--lr", "1e30", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("linbias train: error: training diverged") and err.count("\n") == 1


def test_a_non_finite_valid_loss_stops_before_the_checkpoint(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(train_mod, "_valid_loss", lambda *a: float("nan"))
    mc, tc = _configs(corpus, eval_every=4, save_every=2)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"step 4 \(valid loss nan\).*checkpoint \(step 2\)"):
        train(mc, tc, out, progress=False, cache_dir=tmp_path / "cache")
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 2
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


def test_a_non_finite_gradient_norm_stops_before_the_update(tmp_path, corpus, monkeypatch):
    real, calls = train_mod._clip_gradients, []

    def inf_at_step_3(model, max_norm):
        calls.append(1)
        return float("inf") if len(calls) == 3 else real(model, max_norm)

    monkeypatch.setattr(train_mod, "_clip_gradients", inf_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"step 3 .*gradient norm inf"):
        train(*_configs(corpus), out, progress=False, cache_dir=tmp_path / "cache")
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 2 and _finite_state(out)


def test_a_refused_resume_leaves_the_log_as_it_was(run_copy, corpus, cache):
    log = run_copy / "log.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 4, "train_loss": 5.0}) + "\n")
    ckpt = json.loads((run_copy / "checkpoint.json").read_text())
    state = run_copy / ckpt["state"]
    tensors = load_file(str(state))
    del tensors["rng.torch"]
    state.write_bytes(save(tensors))
    ckpt["sha256"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (run_copy / "checkpoint.json").write_text(json.dumps(ckpt))
    before = log.read_bytes()
    with pytest.raises(RunError, match="optimizer and RNG state"):
        _resume(corpus, run_copy, cache)
    assert log.read_bytes() == before


def test_a_bad_log_line_is_refused_not_dropped(run_copy, corpus, cache):
    log = run_copy / "log.jsonl"
    lines = log.read_text().splitlines()
    lines[1] = json.dumps({"step": "2", "train_loss": 5.0})
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=r"log.jsonl line 2 .*step must be an integer"):
        _resume(corpus, run_copy, cache)
    assert log.read_text().splitlines() == lines


def test_a_resume_drops_only_a_torn_last_line(run_copy, corpus, cache):
    log = run_copy / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "train_lo')  # killed mid-write
    _resume(corpus, run_copy, cache)
    assert [r["step"] for r in read_log(run_copy)] == list(range(1, 7))
    assert sorted(p.name for p in run_copy.glob("state-*")) == ["state-00000006.safetensors"]


@pytest.mark.parametrize("change, problem", [
    ({"step": "3"}, "step must be an integer"),
    ({"step": True}, "step must be an integer"),
    ({"step": 3.0}, "step must be an integer"),
    ({"step": -1}, "step must be an integer"),
    ({"state": "../victim.safetensors"}, "state must be 'state-00000003.safetensors'"),
    ({"state": "/tmp/state-00000003.safetensors"}, "state must be"),
    ({"state": 3}, "state must be"),
    ({"sha256": "abc"}, "sha256 must be 64"),
    ({"sha256": None}, "sha256 must be 64"),
])
def test_checkpoint_json_of_the_wrong_shape_is_refused(run_copy, corpus, cache, change, problem):
    victim = run_copy.parent / "victim.safetensors"
    victim.write_bytes(b"the user's")
    ckpt = json.loads((run_copy / "checkpoint.json").read_text())
    (run_copy / "checkpoint.json").write_text(json.dumps({**ckpt, **change}))
    log = (run_copy / "log.jsonl").read_bytes()
    with pytest.raises(RunError, match=rf"checkpoint.json is corrupt \({problem}"):
        _resume(corpus, run_copy, cache)
    assert victim.read_bytes() == b"the user's" and (run_copy / "log.jsonl").read_bytes() == log


def test_a_checkpoint_past_the_last_step_is_refused(run_copy, corpus, cache):
    ckpt = json.loads((run_copy / "checkpoint.json").read_text())
    (run_copy / ckpt["state"]).rename(run_copy / "state-00000009.safetensors")
    (run_copy / "checkpoint.json").write_text(json.dumps(
        {**ckpt, "step": 9, "state": "state-00000009.safetensors"}))
    with pytest.raises(RunError, match="past steps=6"):
        _resume(corpus, run_copy, cache)


def test_two_processes_stop_together_when_the_loss_diverges(tmp_path, corpus):
    env = {**os.environ, "LINBIAS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(30500 + os.getpid() % 1000), "-m", "linbias", "train", "--out", str(tmp_path / "run"),
         "--train-len", "32", "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--data",
         corpus, "--vocab-size", "300", "--steps", "4", "--batch-size", "2", "--warmup", "0",
         "--lr", "1e30", "--save-every", "1", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=180,  # a rank left waiting would hang
    )
    assert proc.returncode != 0
    assert proc.stderr.count("linbias train: error: training diverged at step 2") == 2
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"] == 1


def test_a_run_is_resumed_and_evaluated_only_on_the_corpus_it_was_trained_on(
        run_copy, corpus, cache):
    from linbias.data import load_corpus
    from linbias.evaluate import evaluate_run

    meta = json.loads((run_copy / "config.json").read_text())
    assert meta["corpus"] == load_corpus(corpus).name and load_run(run_copy).corpus == meta["corpus"]
    forget_checksums(run_copy)  # as a run written before they were recorded
    meta["corpus"] = "text-other-0123456789abcdef"
    (run_copy / "config.json").write_text(json.dumps(meta))
    log = (run_copy / "log.jsonl").read_bytes()
    message = "not the one .* was trained on"
    with pytest.raises(RunError, match=message):
        _resume(corpus, run_copy, cache)
    assert (run_copy / "log.jsonl").read_bytes() == log
    with pytest.raises(RunError, match=message):
        evaluate_run(run_copy, lengths=[32], cache_dir=cache, progress=False)


def test_train_warns_when_t5_buckets_used_past_train_len_stay_untrained(tmp_path, corpus, cache):
    import warnings as w

    _, tc = _configs(corpus, steps=1, eval_every=0, save_every=0)
    base = dict(position="t5", train_len=32, n_layers=1, d_model=32, n_heads=2)
    with pytest.warns(UserWarning, match="t5_max_distance"):
        train(model_config("tiny", **base), tc, tmp_path / "a", progress=False, cache_dir=cache)
    with w.catch_warnings():
        w.simplefilter("error")  # every bucket used past L is reached below L: no warning
        train(model_config("tiny", **base, t5_max_distance=24), tc, tmp_path / "b",
              progress=False, cache_dir=cache)


def test_a_task_mix_trains_and_resumes_exactly(tmp_path, corpus):
    mc, tc = _configs(corpus, steps=6, save_every=3, eval_every=0, mix_task="passkey",
                      mix_fraction=0.5)
    mc = ModelConfig.from_dict({**mc.to_dict(), "train_len": 384})
    cache = tmp_path / "cache"
    whole = train(mc, tc, tmp_path / "whole", progress=False, cache_dir=cache)
    plain = train(mc, TrainConfig(**{**tc.to_dict(), "mix_task": None, "mix_fraction": 0.0}),
                  tmp_path / "plain", progress=False, cache_dir=cache)
    assert _losses(whole) != _losses(plain)  # the mix changed what was trained on
    part = train(mc, tc, tmp_path / "part", progress=False, cache_dir=cache, stop_after=3)
    train(mc, tc, part, resume=True, progress=False, cache_dir=cache)
    assert _losses(part) == _losses(whole)
    assert load_run(whole).train_config.mix_task == "passkey"
    short = ModelConfig.from_dict({**mc.to_dict(), "train_len": 32})
    with pytest.raises(ValueError, match="too short for task 'passkey'.*use length >="):
        train(short, tc, tmp_path / "short", progress=False, cache_dir=cache)
    assert not (tmp_path / "short").exists()


# --- fine-tuning at a longer length (TrainConfig.init_from) ---------------------------------------


@pytest.fixture(scope="module")
def parent(tmp_path_factory, corpus, cache) -> Path:
    """A finished ALiBi run at L = 32 (the stopped run's settings, all 6 steps)."""
    mc, tc = _configs(corpus, eval_every=0)
    return train(mc, tc, tmp_path_factory.mktemp("parent") / "run", progress=False, cache_dir=cache)


def _child(parent_dir, **model):
    """The child configs: the parent's model at L2 = 64 (and ``model``), a fresh schedule."""
    parent_run = load_run(parent_dir)
    mc = ModelConfig.from_dict({**parent_run.config.to_dict(), "train_len": 64, **model})
    tc = TrainConfig(**{**parent_run.train_config.to_dict(), "steps": 4, "lr": 1e-3, "warmup": 1,
                        "save_every": 1, "init_from": str(parent_dir)})
    return mc, tc


def test_a_child_before_its_first_step_gives_the_parent_logits(parent):
    from linbias.runs import child_model

    run = load_run(parent)
    mc, _ = _child(parent)
    idx = torch.randint(run.config.vocab_size, (2, 80))  # past both L = 32 and L2 = 64
    assert torch.equal(child_model(run, mc).eval()(idx), run.model(idx))


def test_a_child_may_take_another_slope_range(parent):
    from linbias.runs import child_model

    mc, _ = _child(parent, alibi_max_bias=16.0)  # MPT-7B-StoryWriter's change, 8 to 16
    assert child_model(load_run(parent), mc).position.slopes.tolist() == [2 ** -8, 2 ** -16]


def test_fixed_interpolation_trains_with_slopes_times_l_over_l2(parent, tmp_path, cache):
    run = load_run(parent)
    mc, tc = _child(parent, position_scale=32 / 64)
    out = train(mc, tc, tmp_path / "child", progress=False, cache_dir=cache, stop_after=1)
    child = load_run(out)
    # The paper's slopes for 2 heads, 2^-4 and 2^-8, by hand, times L / L2 = 1/2.
    assert child.model.position.slopes.tolist() == [2 ** -5, 2 ** -9]
    calls = []
    original = train_mod.GPT.forward

    def spy(self, *args, **kwargs):
        calls.append(self.position.slopes.clone())
        return original(self, *args, **kwargs)

    train_mod.GPT.forward = spy
    try:
        train(mc, tc, out, resume=True, progress=False, cache_dir=cache, stop_after=1)
    finally:
        train_mod.GPT.forward = original
    assert calls and all(c.tolist() == [2 ** -5, 2 ** -9] for c in calls)
    assert run.model.position.slopes.tolist() == [2 ** -4, 2 ** -8]  # the parent's are untouched


def test_a_fine_tune_records_its_parent_and_starts_fresh(parent, tmp_path, cache):
    from linbias.fileio import sha256_file
    from linbias.runs import read_checkpoint

    mc, tc = _child(parent)
    out = train(mc, tc, tmp_path / "child", progress=False, cache_dir=cache)
    meta = json.loads((out / "config.json").read_text())
    assert meta["parent"] == {
        "path": str(parent.resolve()), "step": 6,
        "config_sha256": sha256_file(parent / "config.json"),
        "weights_sha256": sha256_file(parent / "model.safetensors"),
    }
    child = load_run(out)
    assert child.parent.step == 6 and child.config.train_len == 64
    assert (out / "tokenizer.json").read_text() == (parent / "tokenizer.json").read_text()
    assert read_checkpoint(out).step == 4 and [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert read_log(out)[0]["lr"] == pytest.approx(1e-3)  # warm-up of 1 step: a fresh schedule


def test_a_killed_fine_tune_resumes_exactly(parent, tmp_path, cache):
    mc, tc = _child(parent, dropout=0.1)  # RNG state must resume too
    tc = TrainConfig(**{**tc.to_dict(), "steps": 12, "save_every": 3})
    whole = train(mc, tc, tmp_path / "whole", progress=False, cache_dir=cache)
    killed = _kill_at_checkpoint(mc, tc, tmp_path / "killed", cache, min_step=0)
    train(mc, tc, killed, resume=True, progress=False, cache_dir=cache)
    assert _losses(killed) == _losses(whole)
    assert load_run(killed).parent == load_run(whole).parent


@pytest.mark.parametrize("change, message", [
    (dict(n_layers=2), r"conflict with its weights in n_layers \(parent 1, given 2\).*drop those"),
    (dict(position="rotary"), r"position \(parent 'alibi', given 'rotary'\)"),
])
def test_a_fine_tune_that_changes_the_architecture_is_refused(parent, tmp_path, cache, change,
                                                               message):
    mc, tc = _child(parent, **change)
    with pytest.raises(RunError, match=message):
        train(mc, tc, tmp_path / "child", progress=False, cache_dir=cache)
    assert not (tmp_path / "child").exists()


def test_fine_tune_errors_name_the_fix(parent, stopped_run, tmp_path, cache):
    mc, tc = _child(parent)
    bad = {
        "not finished": (stopped_run, r"not finished \(step 3 of 6\).*--resume"),
        "not a run": (tmp_path, r"cannot fine-tune from .*config.json is missing"),
    }
    for parent_dir, message in bad.values():
        with pytest.raises(RunError, match=message):
            train(mc, TrainConfig(**{**tc.to_dict(), "init_from": str(parent_dir)}),
                  tmp_path / "child", progress=False, cache_dir=cache)
    corrupt = Path(shutil.copytree(parent, tmp_path / "corrupt"))
    (corrupt / "model.safetensors").write_bytes(b"{}")
    with pytest.raises(RunError, match=r"cannot fine-tune from .*corrupt"):
        train(mc, TrainConfig(**{**tc.to_dict(), "init_from": str(corrupt)}), tmp_path / "child",
              progress=False, cache_dir=cache)
    with pytest.raises(RunError, match=r"keeps the tokenizer .*vocab_size 300.*drop --vocab-size"):
        train(mc, TrainConfig(**{**tc.to_dict(), "vocab_size": 400}), tmp_path / "child",
              progress=False, cache_dir=cache)
    with pytest.raises(RunError, match="a fine-tune goes into a new --out"):
        shutil.rmtree(tmp_path / "child", ignore_errors=True)
        train(mc, tc, parent, progress=False, cache_dir=cache)
    assert not (tmp_path / "child").exists()


def test_learned_positions_cannot_change_their_length(tmp_path, corpus, cache):
    mc, tc = _configs(corpus, steps=1, eval_every=0, save_every=0)
    learned = train(ModelConfig.from_dict({**mc.to_dict(), "position": "learned"}), tc,
                    tmp_path / "learned", progress=False, cache_dir=cache)
    child_mc, child_tc = _child(learned)
    with pytest.raises(RunError, match="train_len .*one table row per position"):
        train(child_mc, child_tc, tmp_path / "child", progress=False, cache_dir=cache)


def test_cli_fine_tune_takes_the_parents_model_and_corpus(parent, tmp_path, cache, monkeypatch):
    monkeypatch.setenv("LINBIAS_CACHE", str(cache))
    out = tmp_path / "child"
    assert main(["train", "--init-from", str(parent), "--out", str(out), "--train-len", "64",
                 "--position-scale", "0.5", "--steps", "2", "--warmup", "1", "--no-progress"]) == 0
    child, run = load_run(out), load_run(parent)
    assert child.config == ModelConfig.from_dict(
        {**run.config.to_dict(), "train_len": 64, "position_scale": 0.5})
    assert child.train_config.data == run.train_config.data and child.train_config.steps == 2
    assert main(["train", "--init-from", str(tmp_path / "nothing"), "--out", str(tmp_path / "c2"),
                 "--no-progress"]) == 2


# --- one writer per run, with real processes ---------------------------------------------------------


def _train_cli(corpus: str, out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "linbias", "train", "--position", "alibi", "--train-len", "32",
            "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--vocab-size", "300",
            "--batch-size", "4", "--eval-every", "0", "--save-every", "1", "--warmup", "1",
            "--data", corpus, "--out", str(out), "--no-progress", *extra]


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, "the first process ended early"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_writer_of_a_run_is_refused_with_the_first_ones_pid(tmp_path, corpus):
    out, env = tmp_path / "run", {**os.environ, "LINBIAS_CACHE": str(tmp_path / "cache")}
    first = subprocess.Popen(_train_cli(corpus, out, tmp_path / "cache", "--steps", "100000"),
                             env=env, stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / "checkpoint.json", first)
        log = (out / "log.jsonl").read_text()
        for extra in (["--steps", "10", "--position", "rotary", "--seed", "2"], ["--resume"]):
            second = subprocess.run(_train_cli(corpus, out, tmp_path / "cache", *extra), env=env,
                                    capture_output=True, text=True, timeout=300)
            assert second.returncode == 2
            assert f"the run {out} is being written by another linbias process (pid " \
                   f"{first.pid})" in second.stderr
        assert json.loads((out / "config.json").read_text())["model"]["position"] == "alibi"
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    assert first.returncode == 130
    steps = [r["step"] for r in read_log(out)]  # one writer: each step logged once, in order
    assert steps == sorted(set(steps)) and (out / "log.jsonl").read_text().startswith(log)


def test_ctrl_c_says_how_to_resume(tmp_path, corpus):
    out, env = tmp_path / "run", {**os.environ, "LINBIAS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(_train_cli(corpus, out, tmp_path / "cache", "--steps", "100000"),
                            env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoint.json", proc)
    proc.send_signal(signal.SIGTERM)  # as a scheduler or torchrun stops it: the same as Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"linbias train: interrupted; the run keeps its last checkpoint: continue it with "
        f"'linbias train --resume --out {out}'")
    assert not (out / ".linbias.lock").exists()
    from linbias.runs import read_checkpoint, read_configs

    step = read_checkpoint(out).step
    train(*read_configs(out), out, resume=True, stop_after=1, progress=False,
          cache_dir=tmp_path / "cache")
    assert read_checkpoint(out).step == step + 1


def test_an_out_inside_the_corpus_folder_is_refused_before_any_work(tmp_path, corpus):
    root = Path(corpus.removeprefix("text:"))
    with pytest.raises(ValueError, match=r"--out .* is inside the corpus folder .*: what linbias "
                                         r"writes there would become part of the corpus"):
        train(*_configs(corpus), root / "runs" / "a", progress=False, cache_dir=tmp_path / "cache")
    assert not (root / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_full_cache_names_the_cache_and_the_fix(tmp_path, corpus, monkeypatch):
    import errno

    import linbias.data

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(linbias.data, "atomic_write", full)
    with pytest.raises(OSError, match=r"cannot write .*cache.* into the token cache \(No space "
                                      r"left on device\): free space there, or point LINBIAS_CACHE"):
        train(*_configs(corpus), tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
