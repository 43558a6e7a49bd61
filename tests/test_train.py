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
from safetensors.torch import load_file

import linbias.train as train_mod
from conftest import LINES, fine_tune_configs, tiny_configs
from linbias.config import ModelConfig, TrainConfig, model_config
from linbias.data import split_of
from linbias.runs import RunError, load_run, read_log
from linbias.train import Diverged, train


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_writes_a_loadable_run(tmp_path, corpus):
    mc, tc = tiny_configs(corpus, steps=12)
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
    mc, tc = tiny_configs(corpus)
    a = train(mc, tc, tmp_path / "a", progress=False, cache_dir=tmp_path / "cache")
    b = train(mc, tc, tmp_path / "b", progress=False, cache_dir=tmp_path / "cache")
    assert _losses(a) == _losses(b)
    c = train(mc, TrainConfig(**{**tc.to_dict(), "seed": 1}), tmp_path / "c", progress=False,
              cache_dir=tmp_path / "cache")
    assert _losses(c) != _losses(a)


def test_resume_after_kill_continues_exactly(tmp_path, corpus):
    mc, tc = tiny_configs(corpus, steps=40, save_every=5, eval_every=10)
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


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    mc, tc = tiny_configs(f"text:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="empty|no "):
        train(mc, tc, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("position", ["none", "sinusoidal", "learned", "rotary", "t5", "alibi"])
def test_every_position_method_trains(tmp_path, corpus, position):
    mc, tc = tiny_configs(corpus, steps=3, eval_every=0)
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
    mc, tc = tiny_configs(f"text:{root}")
    with pytest.raises(RunError, match=r"valid split .* fewer than one window of train_len \+ 1 = 33"):
        train(mc, tc, tmp_path / "a", progress=False, cache_dir=tmp_path / "cache")
    long = ModelConfig.from_dict({**mc.to_dict(), "train_len": 1_000_000})
    with pytest.raises(RunError, match="train split .* smaller --train-len"):
        train(long, tiny_configs(corpus)[1], tmp_path / "b", progress=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _finite_state(out: Path) -> bool:
    ckpt = json.loads((out / "checkpoint.json").read_text())
    tensors = load_file(str(out / ckpt["state"]))
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path, corpus):
    # lr 1e10 leaves finite but huge weights after step 1; step 2's loss is not finite.
    mc, tc = tiny_configs(corpus, lr=1e10, warmup=0, save_every=1, grad_clip=0.0)
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"step 2 .*checkpoint \(step 1\) is kept"):
        train(mc, tc, out, progress=False, cache_dir=tmp_path / "cache")
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 1 and _finite_state(out)
    assert [r["step"] for r in read_log(out)] == [1]
    with pytest.raises(Diverged):  # a resume meets the same wall rather than reporting success
        train(mc, tc, out, resume=True, progress=False, cache_dir=tmp_path / "cache")


def test_a_non_finite_valid_loss_stops_before_the_checkpoint(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(train_mod, "_valid_loss", lambda *a: float("nan"))
    mc, tc = tiny_configs(corpus, eval_every=4, save_every=2)
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
        train(*tiny_configs(corpus), out, progress=False, cache_dir=tmp_path / "cache")
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 2 and _finite_state(out)


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


def test_train_warns_when_t5_buckets_used_past_train_len_stay_untrained(tmp_path, corpus, cache):
    import warnings as w

    _, tc = tiny_configs(corpus, steps=1, eval_every=0, save_every=0)
    base = dict(position="t5", train_len=32, n_layers=1, d_model=32, n_heads=2)
    with pytest.warns(UserWarning, match="t5_max_distance"):
        train(model_config("tiny", **base), tc, tmp_path / "a", progress=False, cache_dir=cache)
    with w.catch_warnings():
        w.simplefilter("error")  # every bucket used past L is reached below L: no warning
        train(model_config("tiny", **base, t5_max_distance=24), tc, tmp_path / "b",
              progress=False, cache_dir=cache)


def test_a_task_mix_trains_and_resumes_exactly(tmp_path, corpus):
    mc, tc = tiny_configs(corpus, steps=6, save_every=3, eval_every=0, mix_task="passkey",
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


def test_fixed_interpolation_trains_with_slopes_times_l_over_l2(parent, tmp_path, cache):
    run = load_run(parent)
    mc, tc = fine_tune_configs(parent, position_scale=32 / 64)
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

    mc, tc = fine_tune_configs(parent)
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
    mc, tc = fine_tune_configs(parent, dropout=0.1)  # RNG state must resume too
    tc = TrainConfig(**{**tc.to_dict(), "steps": 12, "save_every": 3})
    whole = train(mc, tc, tmp_path / "whole", progress=False, cache_dir=cache)
    killed = _kill_at_checkpoint(mc, tc, tmp_path / "killed", cache, min_step=0)
    train(mc, tc, killed, resume=True, progress=False, cache_dir=cache)
    assert _losses(killed) == _losses(whole)
    assert load_run(killed).parent == load_run(whole).parent


def test_fine_tune_errors_name_the_fix(parent, stopped_run, tmp_path, cache):
    mc, tc = fine_tune_configs(parent)
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


# --- the corpus folder and the token cache ----------------------------------------------------------


def test_an_out_inside_the_corpus_folder_is_refused_before_any_work(tmp_path, corpus):
    root = Path(corpus.removeprefix("text:"))
    with pytest.raises(ValueError, match=r"--out .* is inside the corpus folder .*: what linbias "
                                         r"writes there would become part of the corpus"):
        train(*tiny_configs(corpus), root / "runs" / "a", progress=False, cache_dir=tmp_path / "cache")
    assert not (root / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_full_cache_names_the_cache_and_the_fix(tmp_path, corpus, monkeypatch):
    import errno

    import linbias.data

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(linbias.data, "atomic_write", full)
    with pytest.raises(OSError, match=r"cannot write .*cache.* into the token cache \(No space "
                                      r"left on device\): free space there, or point LINBIAS_CACHE"):
        train(*tiny_configs(corpus), tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
