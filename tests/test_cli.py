"""The command-line surface: sub-commands, their flags, and clear errors for bad input; what each
command prints and how it ends when stopped."""

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

import linbias
from conftest import train_argv, wait_for
from linbias.cli import build_parser, main
from linbias.config import ModelConfig
from linbias.runs import load_run
from linbias.train import train

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers (pip install linbias[hf])")


def test_sub_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"train", "eval", "reproduce", "export", "harness"}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and linbias.__version__ in capsys.readouterr().out


# The whole surface, pinned: each command's arguments with their type, default (None: not given,
# the config's own default applies), choices and whether required. A change to a command or a flag
# must change this test too.
SURFACE = {'eval': {'--batch-size': ('int', None, None, False),
          '--data': ('str', None, None, False),
          '--depths': ('list of float', None, None, False),
          '--filler': ('str', None, ('sentences', 'corpus'), False),
          '--force': ('flag', False, None, False),
          '--heatmap': ('Path', None, None, False),
          '--hf': ('str', None, None, False),
          '--json': ('Path', None, None, False),
          '--lengths': ('list of int', None, None, True),
          '--max-tokens': ('int', None, None, False),
          '--mode': ('str', None, ('nonoverlapping', 'sliding'), False),
          '--no-progress': ('flag', False, None, False),
          '--per-position': ('bool', None, None, False),
          '--scaling': ('list of str', None, None, False),
          '--seed': ('int', None, None, False),
          '--split': ('str', None, ('valid', 'test', 'train'), False),
          '--stride': ('int', None, None, False),
          '--task': ('str', None, ('passkey', 'lines'), False),
          '--train-len': ('int', None, None, False),
          '--trials': ('int', None, None, False),
          'run': ('Path', None, None, False)},
 'export': {'--to-hf': ('Path', None, None, True), 'run': ('Path', None, None, True)},
 'harness': {'--batch-size': ('int', 1, None, False),
             '--device': ('str', None, None, False),
             '--dtype': ('str', None, ('float32', 'bfloat16', 'float16'), False),
             '--gen-kwargs': ('str', None, None, False),
             '--hf': ('str', None, None, False),
             '--limit': ('float', None, None, False),
             '--max-length': ('int', None, None, False),
             '--metadata': ('loads', None, None, False),
             '--out': ('Path', None, None, True),
             '--scaling': ('list of str', ['none'], None, False),
             '--tasks': ('list of str', None, None, True),
             '--train-len': ('int', None, None, False),
             'run': ('Path', None, None, False)},
 'reproduce': {'--data': ('str', 'stdlib', None, False),
               '--embedding': ('str', None, ('gpt2', 'fairseq'), False),
               '--force': ('flag', False, None, False),
               '--no-progress': ('flag', False, None, False),
               '--out': ('Path', None, None, False),
               '--positions': ('list of str',
                               ['none', 'sinusoidal', 'learned', 'rotary', 't5', 'alibi'],
                               None,
                               False),
               '--preset': ('str',
                            'quick',
                            ('finetune', 'paper-small', 'quick', 'remedies', 'remedies-deep', 'retrieval'),
                            False),
               '--seed': ('int', 0, None, False),
               '--seeds': ('int', 1, None, False)},
 'train': {'--alibi-max-bias': ('float', None, None, False),
           '--batch-size': ('int', None, None, False),
           '--bf16': ('bool', None, None, False),
           '--bias': ('bool', None, None, False),
           '--d-ff': ('int', None, None, False),
           '--d-model': ('int', None, None, False),
           '--data': ('str', None, None, False),
           '--dropout': ('float', None, None, False),
           '--embedding': ('str', None, ('gpt2', 'fairseq'), False),
           '--eval-batches': ('int', None, None, False),
           '--eval-every': ('int', None, None, False),
           '--grad-accum': ('int', None, None, False),
           '--grad-clip': ('float', None, None, False),
           '--init-from': ('str', None, None, False),
           '--log-every': ('int', None, None, False),
           '--lr': ('float', None, None, False),
           '--min-lr-ratio': ('float', None, None, False),
           '--mix-filler': ('str', None, ('sentences', 'corpus'), False),
           '--mix-fraction': ('float', None, None, False),
           '--mix-task': ('str', None, ('passkey', 'lines'), False),
           '--n-heads': ('int', None, None, False),
           '--n-layers': ('int', None, None, False),
           '--no-progress': ('flag', False, None, False),
           '--out': ('Path', None, None, True),
           '--position': ('str',
                          None,
                          ('none', 'sinusoidal', 'learned', 'rotary', 't5', 'alibi'),
                          False),
           '--position-scale': ('float', None, None, False),
           '--preset': ('str', None, ('base', 'small', 'tiny'), False),
           '--resume': ('flag', False, None, False),
           '--rotary-base': ('float', None, None, False),
           '--save-every': ('int', None, None, False),
           '--seed': ('int', None, None, False),
           '--steps': ('int', None, None, False),
           '--t5-buckets': ('int', None, None, False),
           '--t5-max-distance': ('int', None, None, False),
           '--tie-weights': ('bool', None, None, False),
           '--train-len': ('int', None, None, False),
           '--vocab-size': ('int', None, None, False),
           '--warmup': ('int', None, None, False),
           '--weight-decay': ('float', None, None, False)}}


def _describe(action: argparse.Action) -> tuple:
    if isinstance(action, argparse.BooleanOptionalAction):
        kind = "bool"
    elif isinstance(action, argparse._StoreTrueAction):
        kind = "flag"
    else:
        kind = getattr(action.type, "__name__", "str") if action.type is not None else "str"
    return (kind, action.default, tuple(action.choices) if action.choices else None,
            bool(action.required))


def test_the_cli_surface_is_pinned():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    got = {name: {(a.option_strings[0] if a.option_strings else a.dest): _describe(a)
                  for a in p._actions if not isinstance(a, argparse._HelpAction)}
           for name, p in sub.choices.items()}
    assert got == SURFACE


def test_unknown_names_list_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", "x", "--position", "xpos"])
    assert "alibi" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "--preset", "huge"])
    assert "quick" in capsys.readouterr().err


def test_library_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--lengths", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("linbias eval: error:") and "Traceback" not in err
    assert main(["eval", str(tmp_path), "--lengths", "0"]) == 2  # checked before the run loads
    assert "eval_len must be" in capsys.readouterr().err


def _forbidden(*args, **kwargs):
    raise AssertionError("the evaluation started")


def test_a_bad_json_path_is_reported_before_evaluating(tmp_path, capsys, monkeypatch):
    import linbias.evaluate

    monkeypatch.setattr(linbias.evaluate, "evaluate_run", _forbidden)
    (tmp_path / "a_file").write_text("")
    for json_path, message in [(tmp_path, "is a folder"),
                               (tmp_path / "a_file" / "eval.json", "a_file is a file")]:
        assert main(["eval", str(tmp_path), "--lengths", "16", "--json", str(json_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("linbias eval: error: cannot write") and message in err


def test_wrong_typed_run_config_is_one_clear_line(tmp_path, capsys):
    from linbias.config import ModelConfig
    from linbias.config import TrainConfig
    from linbias.runs import RUN_FORMAT

    model = {**ModelConfig().to_dict(), "tie_weights": "no"}  # truthy: it would have tied them
    config = {"format": RUN_FORMAT, "model": model, "train": TrainConfig().to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(tmp_path), "--lengths", "16"]) == 2
    err = capsys.readouterr().err
    assert "ModelConfig.tie_weights must be a bool" in err and "'no'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, field", [(["--alibi-max-bias", "inf"], "alibi_max_bias"),
                                          (["--rotary-base", "nan"], "rotary_base"),
                                          (["--lr", "inf"], "lr")])
def test_non_finite_flags_are_rejected(tmp_path, capsys, flags, field):
    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert field in err and "finite" in err
    assert not (tmp_path / "run").exists()


def test_a_cache_that_is_a_file_is_one_clear_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "cache").write_text("")
    monkeypatch.setenv("LINBIAS_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--out", str(tmp_path / "run"), "--data", f"text:{tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "LINBIAS_CACHE" in err and "cannot be a cache folder" in err


def test_eval_a_run_on_another_corpus(tiny_alibi_run, tiny_cache_dir, tmp_path, capsys,
                                      monkeypatch):
    monkeypatch.setenv("LINBIAS_CACHE", str(tiny_cache_dir))
    prose = tmp_path / "prose.txt"
    prose.write_text("".join(f"Line {i} of a story.\n" for i in range(3000)))
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_alibi_run), "--lengths", "32", "--data", f"text:{prose}",
                 "--json", str(out), "--no-progress"]) == 0
    (record,) = json.loads(out.read_text())["results"]
    assert record["data"] == f"text:{prose}" and record["tokens"] > 0
    assert main(["eval", str(tiny_alibi_run), "--lengths", "32", "--train-len", "8"]) == 2
    assert "--train-len applies to --hf models" in capsys.readouterr().err


def test_eval_task_writes_a_table_json_and_heatmap(tiny_alibi_run, tmp_path, capsys):
    out, png = tmp_path / "passkey.json", tmp_path / "passkey.png"
    assert main(["eval", str(tiny_alibi_run), "--task", "passkey", "--lengths", "320,640",
                 "--depths", "0,100", "--trials", "2", "--scaling", "none,linear", "--json",
                 str(out), "--heatmap", str(png), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "scaling linear: passkey: accuracy (n trials)" in printed and "k_max" in printed
    records = json.loads(out.read_text())["results"]
    assert len(records) == 2 * 2 * 2 and {r["scaling"] for r in records} == {"none", "linear"}
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(("flags", "message"), [
    (["--depths", "50"], "--depths applies only with --task; drop it"),
    (["--heatmap", "x.png"], "--heatmap applies only with --task"),
    (["--task", "passkey", "--mode", "sliding", "--stride", "4"],
     "--mode, --stride apply only without --task; drop them"),
    (["--task", "passkey", "--data", "stdlib"], "--data applies only without --task"),
    (["--task", "passkey", "--mode", "sliding"], "--mode applies only without --task"),
])
def test_eval_flags_of_the_other_kind_are_refused(tiny_alibi_run, capsys, flags, message):
    assert main(["eval", str(tiny_alibi_run), "--lengths", "320", *flags]) == 2
    assert message in capsys.readouterr().err


# --- outputs replace only what linbias wrote for them --------------------------------------------


def test_eval_outputs_never_replace_a_users_file_or_a_runs(tiny_alibi_run, tiny_cache_dir,
                                                          tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LINBIAS_CACHE", str(tiny_cache_dir))
    run = str(tiny_alibi_run)
    config = (tiny_alibi_run / "config.json").read_bytes()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "link.json").symlink_to(tmp_path / "notes.txt")
    for flag, path, message in [
        ("--json", tiny_alibi_run / "config.json", "is inside .*, a linbias run or export"),
        ("--json", tmp_path / "notes.txt", "was not written by linbias eval --json: pass --force"),
        ("--json", tmp_path / "link.json", "is a link"),
    ]:
        assert main(["eval", run, "--lengths", "16", flag, str(path), "--no-progress"]) == 2
        assert re.search(message, capsys.readouterr().err)
    for path, message in [(tiny_alibi_run / "model.safetensors", "is inside"),
                          (tmp_path / "notes.txt", "not written by linbias eval --heatmap")]:
        assert main(["eval", run, "--task", "passkey", "--lengths", "32", "--trials", "1",
                     "--depths", "50", "--heatmap", str(path), "--no-progress"]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert (tiny_alibi_run / "config.json").read_bytes() == config
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "link.json").is_symlink()
    for _ in range(2):  # an earlier eval's results are replaced
        assert main(["eval", run, "--lengths", "16", "--json", str(tmp_path / "e.json"),
                     "--no-progress"]) == 0
    assert main(["eval", run, "--lengths", "16", "--json", str(tmp_path / "notes.txt"), "--force",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "notes.txt").read_text())["results"][0]["eval_len"] == 16


def test_a_length_that_cannot_fit_in_memory_is_one_line_before_any_work(tiny_alibi_run, capsys):
    assert main(["eval", str(tiny_alibi_run), "--task", "passkey", "--lengths", "100000000",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"length 100000000 needs at least \d+\.\d GiB for its logits .* evaluate "
                     r"shorter --lengths", err) and "Traceback" not in err


# --- train: one-line errors, fine-tunes and interrupts --------------------------------------------


def test_cli_rejects_an_infinite_lr_before_any_work(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--lr", "inf", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lr must be a finite number" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_reports_divergence_in_one_line(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setenv("LINBIAS_CACHE", str(tmp_path / "cache"))
    args = ["train", "--out", str(tmp_path / "run"), "--train-len", "32", "--n-layers", "1",
            "--d-model", "32", "--n-heads", "2", "--data", corpus, "--vocab-size", "300",
            "--steps", "4", "--batch-size", "4", "--warmup", "0", "--lr", "1e30", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("linbias train: error: training diverged") and err.count("\n") == 1


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


def test_ctrl_c_says_how_to_resume(tmp_path, corpus):
    out, env = tmp_path / "run", {**os.environ, "LINBIAS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(train_argv(corpus, out, tmp_path / "cache", "--steps", "100000"),
                            env=env, stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoint.json", proc)
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


# --- export, and eval of a transformers model -----------------------------------------------------


@needs_transformers
def test_cli_export_and_eval(bias_free_dir, tiny_alibi_run, tmp_path, monkeypatch, capsys) -> None:
    from linbias import hf

    monkeypatch.setenv("LINBIAS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "hf"
    assert main(["export", str(bias_free_dir), "--to-hf", str(out)]) == 0
    assert "MPT" in capsys.readouterr().out and (out / hf.EXPORT_MARKER).is_file()
    assert main(["export", str(tmp_path / "missing"), "--to-hf", str(tmp_path / "no")]) == 2
    assert "no run directory" in capsys.readouterr().err
    data = load_run(bias_free_dir).train_config.data
    report = tmp_path / "r.json"
    argv = ["eval", "--hf", str(out), "--lengths", "16,48", "--scaling", "none,window:2",
            "--data", data, "--max-tokens", "96", "--no-progress", "--json", str(report)]
    assert main(argv) == 0
    records = json.loads(report.read_text())["results"]
    assert [(r["position"], r["eval_len"], r["scaling"]) for r in records] == [
        ("mpt", 16, "none"), ("mpt", 16, "window:2"), ("mpt", 48, "none"), ("mpt", 48, "window:2")]
    assert all(r["train_len"] == 32 and r["tokens"] == 96 for r in records)


@needs_transformers
def test_sigterm_during_an_export_leaves_nothing_behind(bias_free_dir, tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "exports" / "hf"
    proc = subprocess.Popen([sys.executable, "-m", "linbias", "export", str(bias_free_dir),
                             "--to-hf", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.parent.glob(".hf.tmp-*")):  # the export is being written
        assert proc.poll() is None and time.time() < deadline, "the export never started writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"linbias export: interrupted; {out} was not changed"
    assert list(out.parent.iterdir()) == []  # no hidden partial export, no lock file


@needs_transformers
def test_eval_of_an_export_without_hf_names_the_flag(exported: Path, capsys) -> None:
    assert main(["eval", str(exported), "--lengths", "16"]) == 2
    assert f"is a transformers model (config.json of model_type 'mpt'), not a linbias run: " \
        f"evaluate it with --hf {exported}" in \
        capsys.readouterr().err


@needs_transformers
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--lengths", "16"], "either a run directory or --hf"),
        (["eval", "RUN", "--hf", "x", "--lengths", "16"], "either a run directory or --hf"),
        (["eval", "RUN", "--train-len", "8", "--lengths", "16"], "applies to --hf models"),
    ],
)
def test_cli_eval_needs_one_model(bias_free_dir, capsys, argv, message) -> None:
    argv = [str(bias_free_dir) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
