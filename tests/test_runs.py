"""linbias.runs: the run directory's files read back strictly; a run written by an earlier release
still loads, evaluates and resumes; a new run's --out, a resume and a fine-tune's start checked
before anything is touched; one writer per run.

One fixture per run format the project has shipped:

* ``fixtures/path_split_run``: written by the release that split files by a hash of their path and
  recorded no corpus (``data.PATH_RULE``): a finished ALiBi run (6 steps) and the same run
  interrupted after its step-3 checkpoint, on the folder ``corpus`` given as a relative path, with
  ``expected.json``: the numbers that release computed (its evaluation of each run on its own
  valid split, logits of a fixed input, its corpus names) and the machine they were computed on.
* ``fixtures/old_run``: written by linbias 0.1.0 before the run directory moved to
  ``linbias.runs`` (its ``checkpoint.json`` still has the ``data_step`` field that is no longer
  written): an ALiBi model trained 3 of 6 steps on ``corpus.txt``, given as a relative path.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from conftest import fine_tune_configs, forget_checksums, tiny_configs, train_argv, wait_for

from linbias.config import ModelConfig, TrainConfig
from linbias.data import CONTENT_RULE, PATH_RULE, load_corpus, token_stream
from linbias.evaluate import evaluate_run, run_stream
from linbias.runs import (
    RUN_FORMAT, RunError, check_corpus, load_run, read_checkpoint, read_configs, read_log,
    recorded_corpus, recorded_split_rule,
)
from linbias.train import train

FIXTURE = Path(__file__).parent / "fixtures" / "old_run"
PATH_SPLIT_FIXTURE = Path(__file__).parent / "fixtures" / "path_split_run"


@pytest.fixture
def old_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "old_run")
    monkeypatch.chdir(tmp_path / "old_run")  # the run names its corpus as text:corpus.txt
    monkeypatch.setenv("LINBIAS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "old_run" / "run"


def test_an_old_run_loads_and_evaluates(old_run: Path) -> None:
    assert "data_step" in json.loads((old_run / "checkpoint.json").read_text())
    run = load_run(old_run)
    assert run.config.embedding == "gpt2" and run.train_config.mix_task is None  # new fields
    assert read_checkpoint(old_run).step == 3 and [r["step"] for r in read_log(old_run)] == [1, 2, 3]
    (record,) = evaluate_run(old_run, lengths=[32], progress=False)
    assert record["tokens"] > 32 and 0 < record["ppl"] < 280


# The fixture's numbers were computed on another CPU: kernels there may round the last bits
# differently, so they agree to float tolerance; bit-exact resume is a same-machine guarantee
# (test_train's kill-and-resume tests compare exactly).
ACROSS_CPUS = dict(rel=1e-5, abs=1e-6)


def test_an_old_run_resumes_as_the_new_code_trains(old_run: Path, tmp_path: Path) -> None:
    mc, tc = read_configs(old_run)
    old_losses = [r["train_loss"] for r in read_log(old_run)]
    fresh = train(ModelConfig.from_dict(mc.to_dict()), TrainConfig.from_dict(tc.to_dict()),
                  tmp_path / "fresh", progress=False)
    new_losses = [r["train_loss"] for r in read_log(fresh)]
    assert new_losses[:3] == pytest.approx(old_losses, **ACROSS_CPUS)  # the release's steps
    train(mc, tc, old_run, resume=True, progress=False)
    resumed = [r["train_loss"] for r in read_log(old_run)]
    assert resumed[:3] == old_losses  # the log's own lines are kept as written
    assert resumed == pytest.approx(new_losses, **ACROSS_CPUS)
    assert "data_step" not in json.loads((old_run / "checkpoint.json").read_text())


# --- a run of the release that split by path ---------------------------------------------------


@pytest.fixture
def path_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(PATH_SPLIT_FIXTURE, tmp_path / "path_split")
    monkeypatch.chdir(tmp_path / "path_split")  # the runs name their corpus as text:corpus
    monkeypatch.setenv("LINBIAS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "path_split"


EXPECTED = json.loads((PATH_SPLIT_FIXTURE / "expected.json").read_text())
OLD_SPLIT_WARNING = (f"records no corpus.*split files by a hash of their path.*{PATH_RULE}"
                     ".*held-out text cannot be verified")


def _this_machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in
             (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor(),
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def _agree(got: object, want: object) -> None:
    """Bit for bit on the machine that wrote the fixture; to float tolerance on any other."""
    if _this_machine() == EXPECTED["written_on"]:
        assert got == want
    else:
        assert got == pytest.approx(want, **ACROSS_CPUS)


def test_a_path_split_run_loads_and_gives_the_same_logits(path_split: Path) -> None:
    assert "corpus" not in json.loads((path_split / "finished" / "config.json").read_text())
    run = load_run(path_split / "finished")
    assert run.corpus is None and read_checkpoint(run.path).step == run.train_config.steps == 6
    logits = EXPECTED["logits"]
    with torch.no_grad():
        out_TV = run.model(torch.tensor([logits["input"]]))[0]
    _agree(out_TV[logits["positions"]].flatten().tolist(),
           [v for row in logits["values"] for v in row])


@pytest.mark.parametrize("name", ["finished", "interrupted"])
def test_a_path_split_run_evaluates_on_its_own_split_with_its_numbers(
        path_split: Path, name: str) -> None:
    want = EXPECTED["evaluation"][name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the interrupted run's "unfinished" warning
        run = load_run(path_split / name)
    with pytest.warns(UserWarning, match=OLD_SPLIT_WARNING):
        (record,) = evaluate_run(run, lengths=[32], progress=False)
    assert {k: record[k] for k in ("eval_len", "mode", "split", "tokens", "bytes")} == \
        {k: want[k] for k in ("eval_len", "mode", "split", "tokens", "bytes")}  # the same text
    _agree([record[k] for k in ("nll", "ppl", "bpb")], [want[k] for k in ("nll", "ppl", "bpb")])
    # The content rule holds out other files: only the path rule gives these numbers.
    assert load_corpus("text:corpus").documents("valid") != \
        load_corpus("text:corpus", split_rule=PATH_RULE).documents("valid")


def test_an_interrupted_path_split_run_resumes_to_the_finished_runs_losses(
        path_split: Path) -> None:
    run_dir = path_split / "interrupted"
    mc, tc = read_configs(run_dir)
    with pytest.warns(UserWarning, match=OLD_SPLIT_WARNING):
        train(mc, tc, run_dir, resume=True, progress=False)
    finished, resumed = read_log(path_split / "finished"), read_log(run_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in finished] == [1, 2, 3, 4, 5, 6]
    assert resumed[:3] == read_log(PATH_SPLIT_FIXTURE / "interrupted")  # kept as written
    for key in ("train_loss", "valid_loss", "lr"):
        _agree([r.get(key) for r in resumed[3:]], [r.get(key) for r in finished[3:]])
    assert recorded_corpus(run_dir) is None  # still split by its release's rule, next time too


def test_a_new_run_records_the_content_split_and_is_evaluated_on_it(
        tiny_alibi_run: Path, tiny_cache_dir: Path) -> None:
    run = load_run(tiny_alibi_run)
    spec = run.train_config.data
    content, by_path = load_corpus(spec), load_corpus(spec, split_rule=PATH_RULE)
    assert content.split_rule == CONTENT_RULE and by_path.split_rule == PATH_RULE
    assert run.corpus == content.name != by_path.name  # the name carries the rule
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recorded run: no warning
        assert check_corpus(run.path, run.corpus, content) is content
        stream = run_stream(run, spec, "valid", tiny_cache_dir)
    assert np.array_equal(stream, token_stream(content, run.tokenizer, "valid", tiny_cache_dir))
    with pytest.warns(UserWarning, match=OLD_SPLIT_WARNING):
        assert check_corpus(run.path, None, content).name == by_path.name


def test_a_run_is_split_by_the_rule_it_records(tiny_alibi_run: Path, tiny_cache_dir: Path,
                                              tmp_path: Path) -> None:
    meta = json.loads((tiny_alibi_run / "config.json").read_text())
    assert meta["split_rule"] == CONTENT_RULE == load_run(tiny_alibi_run).split_rule
    spec = meta["train"]["data"]
    content, by_path = load_corpus(spec), load_corpus(spec, split_rule=PATH_RULE)
    # A run that records the path rule (and the corpus name made under it) is split by that rule.
    run_dir = Path(shutil.copytree(tiny_alibi_run, tmp_path / "run"))
    forget_checksums(run_dir)  # so that config.json can be edited
    path_meta = {**meta, "corpus": by_path.name, "split_rule": PATH_RULE}
    (run_dir / "config.json").write_text(json.dumps(path_meta))
    run = load_run(run_dir)
    assert run.split_rule == recorded_split_rule(run_dir) == PATH_RULE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recorded rule: no warning
        stream = run_stream(run, spec, "valid", tiny_cache_dir)
        resumed = check_corpus(run_dir, recorded_corpus(run_dir), content,
                               recorded_split_rule(run_dir))  # as a resume calls it
    assert np.array_equal(stream, token_stream(by_path, run.tokenizer, "valid", tiny_cache_dir))
    assert not np.array_equal(stream, token_stream(content, run.tokenizer, "valid", tiny_cache_dir))
    assert resumed.split_rule == PATH_RULE and resumed.name == by_path.name
    # Without the record, a run with a corpus name was split by the content rule: this name fails.
    (run_dir / "config.json").write_text(json.dumps({**meta, "corpus": by_path.name}))
    with pytest.raises(RunError, match="not the one .* was trained on"):
        run_stream(load_run(run_dir), spec, "valid", tiny_cache_dir)
    with pytest.raises(RunError, match=r"split by 'blake2b-content-mod100:v9', a rule this "
                                       r"linbias does not know .*newer linbias"):
        check_corpus(run_dir, by_path.name, content, "blake2b-content-mod100:v9")


@pytest.mark.parametrize("record", [{"split_rule": 2}, {"split_rule": PATH_RULE, "corpus": None}])
def test_a_split_rule_of_the_wrong_shape_is_refused(run_copy: Path, record: dict) -> None:
    forget_checksums(run_copy)
    meta = {**json.loads((run_copy / "config.json").read_text()), **record}
    (run_copy / "config.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    with pytest.raises(RunError, match="'split_rule' must be a string beside 'corpus'"):
        load_run(run_copy)


@pytest.mark.parametrize("text, problem", [
    ('{"step": 1, "train_loss": 5.0}\n[1, 2]\n', "line 2 .*not a JSON object"),
    ('{"step": 1, "train_loss": NaN}\n', "train_loss must be a finite number"),
    ('{"step": 1, "train_loss": "5"}\n', "train_loss must be a finite number"),
    ('{"step": 2, "train_loss": 5.0}\n{"step": 1, "train_loss": 5.0}\n', "step must be an integer > 2"),
    ('{"step": true, "train_loss": 5.0}\n', "step must be an integer"),
    ('{"step": 1, "train_loss": 5.0, "valid_loss": null}\n', "valid_loss"),
    ('not json\n{"step": 1, "train_loss": 5.0}\n', "line 1"),
])
def test_read_log_rejects_records_of_the_wrong_shape(tmp_path, text, problem):
    (tmp_path / "log.jsonl").write_text(text)
    with pytest.raises(RunError, match=problem):
        read_log(tmp_path)


# --- a fine-tune's lineage -------------------------------------------------------------------------


@pytest.fixture
def lineage_pair(tmp_path: Path, tiny_alibi_run: Path, tiny_cache_dir: Path) -> tuple[Path, Path]:
    """A copy of the tiny ALiBi run and a one-step fine-tune of it at twice its length."""
    parent = Path(shutil.copytree(tiny_alibi_run, tmp_path / "parent"))
    run = load_run(parent)
    mc = ModelConfig.from_dict({**run.config.to_dict(), "train_len": 64})
    tc = TrainConfig(**{**run.train_config.to_dict(), "steps": 1, "init_from": str(parent)})
    return parent, train(mc, tc, tmp_path / "child", progress=False, cache_dir=tiny_cache_dir)


def test_the_lineage_is_verified_on_load(lineage_pair: tuple[Path, Path]) -> None:
    import warnings

    from linbias.runs import lineage_of

    parent, child = lineage_pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the parent as it was: no warning
        assert load_run(child).parent == lineage_of(parent)
    meta = json.loads((parent / "config.json").read_text())
    (parent / "config.json").write_text(json.dumps({**meta, "corpus": meta["corpus"] + " "}))
    with pytest.warns(UserWarning, match="config or weights have changed since"):
        load_run(child)
    shutil.rmtree(parent)  # a parent moved away: the record stands, nothing to compare
    assert load_run(child).parent.step == 5


@pytest.mark.parametrize("change", [
    {"step": -1}, {"step": "5"}, {"weights_sha256": "0" * 63}, {"path": None}, {"extra": 1},
])
def test_a_malformed_lineage_is_refused(lineage_pair: tuple[Path, Path], change: dict) -> None:
    _, child = lineage_pair
    meta = json.loads((child / "config.json").read_text())
    meta["parent"] = {**meta["parent"], **change}
    (child / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match="'parent' must be .* as a fine-tune writes it"):
        load_run(child)


# --- load_run refuses what is not a whole run --------------------------------------------------------


@pytest.fixture
def run_copy(tmp_path: Path, tiny_alibi_run: Path) -> Path:
    return Path(shutil.copytree(tiny_alibi_run, tmp_path / "run"))


def test_load_run_names_what_is_missing(tmp_path: Path, run_copy: Path) -> None:
    with pytest.raises(RunError, match="no run directory"):
        load_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="config.json is missing"):
        load_run(tmp_path / "empty")
    (run_copy / "tokenizer.json").unlink()
    with pytest.raises(RunError, match="tokenizer.json is missing"):
        load_run(run_copy)
    (run_copy / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RunError, match="format"):
        load_run(run_copy)


@pytest.mark.parametrize("meta, problem", [
    ([1, 2], "format None"),
    ({"format": RUN_FORMAT, "model": [], "train": {}}, "'model' must be a JSON object"),
    ({"format": RUN_FORMAT, "model": {}, "train": "fast"}, "'train' must be a JSON object"),
    ({"format": RUN_FORMAT, "model": {"n_layerz": 2}, "train": {}}, "invalid configuration .*n_layerz"),
])
def test_config_json_of_the_wrong_shape_is_refused(run_copy: Path, meta: object, problem: str) -> None:
    (run_copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match=rf"config.json.*{problem}"):
        load_run(run_copy)


# --- every reader checks what --resume checks --------------------------------------------------------


def _edit_weights(run_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(run_dir / "model.safetensors"))
    name = max(tensors, key=lambda k: tensors[k].numel())
    tensors[name].view(-1)[:2000] = 0.5
    save_file(tensors, str(run_dir / "model.safetensors"))


def test_a_run_without_a_checkpoint_is_refused(run_copy: Path) -> None:
    (run_copy / "checkpoint.json").unlink()  # killed, or the disk filled, before the first save
    with pytest.raises(RunError, match="never saved a checkpoint .* train it again"):
        load_run(run_copy)
    with pytest.raises(RunError, match="never saved a checkpoint"):
        evaluate_run(run_copy, lengths=[32], progress=False)


def test_edited_weights_are_refused_by_every_reader(run_copy: Path, tmp_path: Path,
                                                     tiny_cache_dir: Path) -> None:
    _edit_weights(run_copy)
    with pytest.raises(RunError, match="model.safetensors is not the file the last checkpoint"):
        load_run(run_copy)
    mc, tc = read_configs(run_copy)
    child = TrainConfig(**{**tc.to_dict(), "steps": 1, "init_from": str(run_copy)})
    with pytest.raises(RunError, match="cannot fine-tune from .*sha256 differs"):
        train(mc, child, tmp_path / "child", progress=False, cache_dir=tiny_cache_dir)
    assert not (tmp_path / "child").exists()


def test_edited_weights_of_an_older_run_are_refused_against_its_state_file(run_copy: Path) -> None:
    from conftest import forget_checksums

    forget_checksums(run_copy)  # as written before checkpoints recorded file checksums
    load_run(run_copy)
    _edit_weights(run_copy)
    with pytest.raises(RunError, match="differs from the weights of the last checkpoint"):
        load_run(run_copy)


def test_a_config_swapped_in_from_another_run_is_refused(run_copy: Path) -> None:
    meta = json.loads((run_copy / "config.json").read_text())
    meta["model"]["position"] = "rotary"  # same shapes as ALiBi: only the checksum can tell
    (run_copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match="config.json is not the file .* restore it"):
        load_run(run_copy)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(run_copy: Path) -> None:
    from tokenizers import Tokenizer

    from conftest import forget_checksums

    forget_checksums(run_copy)  # even where no checksum can tell
    tok = Tokenizer.from_file(str(run_copy / "tokenizer.json"))
    tok.add_tokens([f"extra{i}" for i in range(50)])
    tok.save(str(run_copy / "tokenizer.json"))
    with pytest.raises(RunError, match=r"tokenizer.json has 3\d\d tokens, more than the model's "
                                       r"vocab_size 300"):
        load_run(run_copy)


def test_an_unfinished_run_loads_with_a_warning_naming_its_step(old_run: Path) -> None:
    with pytest.warns(UserWarning, match=r"unfinished \(step 3 of 6\); using its weights at step 3"):
        load_run(old_run)


def test_a_run_being_trained_is_read_from_its_verified_checkpoint(run_copy: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from conftest import another_writer

    state = load_file(str(run_copy / read_checkpoint(run_copy).state))
    with another_writer(run_copy) as proc:
        _edit_weights(run_copy)  # the writer has saved newer weights, its checkpoint.json not yet
        with pytest.warns(UserWarning, match=rf"pid {proc.pid}\) is training it now; using its "
                                             r"weights at step 5"):
            run = load_run(run_copy)
        for name, tensor in run.model.state_dict().items():
            if f"model.{name}" in state:
                assert torch.equal(tensor, state[f"model.{name}"])
        with pytest.raises(RunError, match=rf"being trained by another process \(pid {proc.pid}\)"):
            from linbias.runs import remove_run
            remove_run(run_copy)
    with pytest.raises(RunError, match="sha256 differs"):  # nobody writes it: the edit is an edit
        load_run(run_copy)


def test_a_wrong_shaped_optimizer_state_is_refused_before_the_log_is_trimmed(
        run_copy: Path, tiny_cache_dir: Path) -> None:
    import hashlib

    import torch
    from safetensors.torch import load_file, save

    ckpt = read_checkpoint(run_copy)
    tensors = load_file(str(run_copy / ckpt.state))
    name = next(k for k in tensors if k.endswith(".exp_avg"))
    tensors[name] = torch.zeros(3, 3)
    data = save(tensors)
    (run_copy / ckpt.state).write_bytes(data)
    meta = json.loads((run_copy / "checkpoint.json").read_text())
    meta["sha256"] = hashlib.sha256(data).hexdigest()  # a matching checksum: written so
    (run_copy / "checkpoint.json").write_text(json.dumps(meta))
    meta_config = json.loads((run_copy / "config.json").read_text())
    meta_config["train"]["steps"] = 8
    (run_copy / "config.json").write_text(json.dumps(meta_config))
    from conftest import forget_checksums

    forget_checksums(run_copy)
    log = (run_copy / "log.jsonl").read_bytes()
    mc, tc = read_configs(run_copy)
    with pytest.raises(RunError, match=rf"{name} has shape \(3, 3\).*cannot resume"):
        train(mc, tc, run_copy, resume=True, progress=False, cache_dir=tiny_cache_dir)
    assert (run_copy / "log.jsonl").read_bytes() == log


def test_a_full_disk_at_a_checkpoint_names_the_run_and_the_fix(
        tmp_path: Path, tiny_alibi_run: Path, tiny_cache_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import linbias.runs

    mc, tc = read_configs(tiny_alibi_run)
    tc = TrainConfig(**{**tc.to_dict(), "steps": 4, "save_every": 2})
    real = linbias.runs.atomic_write

    def fill(path, write):
        if Path(path).name.startswith("state-00000004"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(linbias.runs, "atomic_write", fill)
    with pytest.raises(RunError, match=r"cannot save the checkpoint of step 4 in .*\(No space left "
                                       r"on device\): the last checkpoint \(step 2\) is kept; free "
                                       r"space .* --resume"):
        train(mc, tc, tmp_path / "run", progress=False, cache_dir=tiny_cache_dir)
    assert read_checkpoint(tmp_path / "run").step == 2


# --- a new run's --out, and a resume that does not match its run ----------------------------------


def test_resume_with_different_config_is_refused(tmp_path, corpus):
    mc, tc = tiny_configs(corpus)
    train(mc, tc, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    other = TrainConfig(**{**tc.to_dict(), "lr": 1e-4})
    with pytest.raises(RunError, match=r"lr \(saved 0.003, given 0.0001\)"):
        train(mc, other, tmp_path / "run", resume=True, progress=False, cache_dir=tmp_path / "cache")
    with pytest.raises(RunError, match="already holds a run"):
        train(mc, tc, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")


def test_corrupt_checkpoint_is_refused(tmp_path, corpus):
    mc, tc = tiny_configs(corpus)
    out = train(mc, tc, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    state = out / json.loads((out / "checkpoint.json").read_text())["state"]
    state.write_bytes(state.read_bytes()[:-100])
    with pytest.raises(RunError, match="truncated or corrupt"):
        train(mc, tc, out, resume=True, progress=False, cache_dir=tmp_path / "cache")
    (out / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RunError, match="model.safetensors is not the file .* sha256 differs"):
        load_run(out)


@pytest.mark.parametrize("names", [("model.safetensors", "log.jsonl"), ("tokenizer.json",),
                                   ("config.json",), (".hidden",)])
def test_new_run_never_overwrites_files_in_out(tmp_path, corpus, names):
    out = tmp_path / "mine"
    out.mkdir()
    for name in names:
        (out / name).write_text(f"the user's {name}")
    mc, tc = tiny_configs(corpus)
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
            train(*tiny_configs(corpus), out, progress=False, cache_dir=tmp_path / "cache")
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("resume", [False, True])
def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, corpus, resume):
    (tmp_path / "file").write_text("not a folder")
    for out in [tmp_path / "file"] + ([] if resume else [tmp_path / "file" / "run"]):
        with pytest.raises(RunError, match="is a file"):
            train(*tiny_configs(corpus), out, resume=resume, progress=False, cache_dir=tmp_path / "cache")
    assert (tmp_path / "file").read_text() == "not a folder" and not (tmp_path / "cache").exists()


# --- a refused resume changes nothing (a copy of a run stopped at step 3 of 6) --------------------


@pytest.fixture
def stopped_copy(tmp_path, stopped_run) -> Path:
    """A copy of ``stopped_run``: checkpoint at step 3 of 6, log lines 1..3."""
    return Path(shutil.copytree(stopped_run, tmp_path / "run"))


def _resume(corpus, out, cache, **train_kwargs):
    mc, tc = tiny_configs(corpus)
    return train(mc, tc, out, resume=True, progress=False, cache_dir=cache, **train_kwargs)


def test_a_refused_resume_leaves_the_log_as_it_was(stopped_copy, corpus, cache):
    log = stopped_copy / "log.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 4, "train_loss": 5.0}) + "\n")
    ckpt = json.loads((stopped_copy / "checkpoint.json").read_text())
    state = stopped_copy / ckpt["state"]
    tensors = load_file(str(state))
    del tensors["rng.torch"]
    state.write_bytes(save(tensors))
    ckpt["sha256"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (stopped_copy / "checkpoint.json").write_text(json.dumps(ckpt))
    before = log.read_bytes()
    with pytest.raises(RunError, match="optimizer and RNG state"):
        _resume(corpus, stopped_copy, cache)
    assert log.read_bytes() == before


def test_a_bad_log_line_is_refused_not_dropped(stopped_copy, corpus, cache):
    log = stopped_copy / "log.jsonl"
    lines = log.read_text().splitlines()
    lines[1] = json.dumps({"step": "2", "train_loss": 5.0})
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=r"log.jsonl line 2 .*step must be an integer"):
        _resume(corpus, stopped_copy, cache)
    assert log.read_text().splitlines() == lines


def test_a_resume_drops_only_a_torn_last_line(stopped_copy, corpus, cache):
    log = stopped_copy / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "train_lo')  # killed mid-write
    _resume(corpus, stopped_copy, cache)
    assert [r["step"] for r in read_log(stopped_copy)] == list(range(1, 7))
    assert sorted(p.name for p in stopped_copy.glob("state-*")) == ["state-00000006.safetensors"]


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
def test_checkpoint_json_of_the_wrong_shape_is_refused(stopped_copy, corpus, cache, change, problem):
    victim = stopped_copy.parent / "victim.safetensors"
    victim.write_bytes(b"the user's")
    ckpt = json.loads((stopped_copy / "checkpoint.json").read_text())
    (stopped_copy / "checkpoint.json").write_text(json.dumps({**ckpt, **change}))
    log = (stopped_copy / "log.jsonl").read_bytes()
    with pytest.raises(RunError, match=rf"checkpoint.json is corrupt \({problem}"):
        _resume(corpus, stopped_copy, cache)
    assert victim.read_bytes() == b"the user's" and (stopped_copy / "log.jsonl").read_bytes() == log


def test_a_checkpoint_past_the_last_step_is_refused(stopped_copy, corpus, cache):
    ckpt = json.loads((stopped_copy / "checkpoint.json").read_text())
    (stopped_copy / ckpt["state"]).rename(stopped_copy / "state-00000009.safetensors")
    (stopped_copy / "checkpoint.json").write_text(json.dumps(
        {**ckpt, "step": 9, "state": "state-00000009.safetensors"}))
    with pytest.raises(RunError, match="past steps=6"):
        _resume(corpus, stopped_copy, cache)


def test_a_run_is_resumed_and_evaluated_only_on_the_corpus_it_was_trained_on(
        stopped_copy, corpus, cache):
    from linbias.data import load_corpus
    from linbias.evaluate import evaluate_run

    meta = json.loads((stopped_copy / "config.json").read_text())
    assert meta["corpus"] == load_corpus(corpus).name and load_run(stopped_copy).corpus == meta["corpus"]
    forget_checksums(stopped_copy)  # as a run written before they were recorded
    meta["corpus"] = "text-other-0123456789abcdef"
    (stopped_copy / "config.json").write_text(json.dumps(meta))
    log = (stopped_copy / "log.jsonl").read_bytes()
    message = "not the one .* was trained on"
    with pytest.raises(RunError, match=message):
        _resume(corpus, stopped_copy, cache)
    assert (stopped_copy / "log.jsonl").read_bytes() == log
    with pytest.raises(RunError, match=message):
        evaluate_run(stopped_copy, lengths=[32], cache_dir=cache, progress=False)


# --- a fine-tune's start (child_model, check_child_config) ----------------------------------------


def test_a_child_before_its_first_step_gives_the_parent_logits(parent):
    from linbias.runs import child_model

    run = load_run(parent)
    mc, _ = fine_tune_configs(parent)
    idx = torch.randint(run.config.vocab_size, (2, 80))  # past both L = 32 and L2 = 64
    assert torch.equal(child_model(run, mc).eval()(idx), run.model(idx))


def test_a_child_may_take_another_slope_range(parent):
    from linbias.runs import child_model

    mc, _ = fine_tune_configs(parent, alibi_max_bias=16.0)  # MPT-7B-StoryWriter's change, 8 to 16
    assert child_model(load_run(parent), mc).position.slopes.tolist() == [2 ** -8, 2 ** -16]


@pytest.mark.parametrize("change, message", [
    (dict(n_layers=2), r"conflict with its weights in n_layers \(parent 1, given 2\).*drop those"),
    (dict(position="rotary"), r"position \(parent 'alibi', given 'rotary'\)"),
])
def test_a_fine_tune_that_changes_the_architecture_is_refused(parent, tmp_path, cache, change,
                                                               message):
    mc, tc = fine_tune_configs(parent, **change)
    with pytest.raises(RunError, match=message):
        train(mc, tc, tmp_path / "child", progress=False, cache_dir=cache)
    assert not (tmp_path / "child").exists()


def test_learned_positions_cannot_change_their_length(tmp_path, corpus, cache):
    mc, tc = tiny_configs(corpus, steps=1, eval_every=0, save_every=0)
    learned = train(ModelConfig.from_dict({**mc.to_dict(), "position": "learned"}), tc,
                    tmp_path / "learned", progress=False, cache_dir=cache)
    child_mc, child_tc = fine_tune_configs(learned)
    with pytest.raises(RunError, match="train_len .*one table row per position"):
        train(child_mc, child_tc, tmp_path / "child", progress=False, cache_dir=cache)


# --- one writer per run, with real processes ------------------------------------------------------


def test_a_second_writer_of_a_run_is_refused_with_the_first_ones_pid(tmp_path, corpus):
    out, env = tmp_path / "run", {**os.environ, "LINBIAS_CACHE": str(tmp_path / "cache")}
    first = subprocess.Popen(train_argv(corpus, out, tmp_path / "cache", "--steps", "100000"),
                             env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for(out / "checkpoint.json", first)
        log = (out / "log.jsonl").read_text()
        for extra in (["--steps", "10", "--position", "rotary", "--seed", "2"], ["--resume"]):
            second = subprocess.run(train_argv(corpus, out, tmp_path / "cache", *extra), env=env,
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
