"""linbias.runs: the run directory's files read back strictly; a run written by an earlier release
still loads, evaluates and resumes.

``fixtures/old_run`` was written by linbias 0.1.0 before the run directory moved to
``linbias.runs`` (its ``checkpoint.json`` still has the ``data_step`` field that is no longer
written): an ALiBi model trained 3 of 6 steps on ``corpus.txt``, given as a relative path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from linbias.config import ModelConfig, TrainConfig
from linbias.evaluate import evaluate_run
from linbias.runs import RUN_FORMAT, RunError, load_run, read_checkpoint, read_configs, read_log
from linbias.train import train

FIXTURE = Path(__file__).parent / "fixtures" / "old_run"


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


def test_an_old_run_resumes_exactly_as_the_new_code_trains(old_run: Path, tmp_path: Path) -> None:
    mc, tc = read_configs(old_run)
    old_losses = [r["train_loss"] for r in read_log(old_run)]
    fresh = train(ModelConfig.from_dict(mc.to_dict()), TrainConfig.from_dict(tc.to_dict()),
                  tmp_path / "fresh", progress=False)
    new_losses = [r["train_loss"] for r in read_log(fresh)]
    assert new_losses[:3] == old_losses  # the same steps as the release that wrote the run
    train(mc, tc, old_run, resume=True, progress=False)
    assert [r["train_loss"] for r in read_log(old_run)] == new_losses
    assert "data_step" not in json.loads((old_run / "checkpoint.json").read_text())


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
