"""The command-line surface: sub-commands, their flags, and clear errors for bad input."""

import json

import pytest

import linbias
from linbias.cli import build_parser, main


def test_sub_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"train", "eval", "reproduce", "export", "harness"}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and linbias.__version__ in capsys.readouterr().out


# The whole surface, pinned: a change to a command or flag must change this test too.
SURFACE = {
    'eval': (['run'], [
        '--batch-size', '--data', '--depths', '--filler', '--heatmap', '--hf', '--json',
        '--lengths', '--max-tokens', '--mode', '--no-per-position', '--no-progress',
        '--per-position', '--scaling',
        '--seed', '--split', '--stride', '--task', '--train-len', '--trials',
    ]),
    'export': (['run'], [
        '--to-hf',
    ]),
    'harness': (['run'], [
        '--batch-size', '--batch_size', '--device', '--dtype', '--gen-kwargs', '--gen_kwargs',
        '--hf', '--limit', '--max-length', '--metadata', '--out', '--scaling', '--tasks',
        '--train-len',
    ]),
    'reproduce': ([], [
        '--data', '--embedding', '--force', '--no-progress', '--out', '--positions', '--preset',
        '--seed', '--seeds',
    ]),
    'train': ([], [
        '--alibi-max-bias', '--batch-size', '--bf16', '--bias', '--d-ff', '--d-model', '--data',
        '--dropout', '--embedding', '--eval-batches', '--eval-every', '--grad-accum',
        '--grad-clip', '--init-from', '--log-every', '--lr', '--min-lr-ratio', '--mix-filler', '--mix-fraction',
        '--mix-task', '--n-heads', '--n-layers', '--no-bf16', '--no-bias', '--no-progress',
        '--no-tie-weights', '--out', '--position', '--position-scale', '--preset', '--resume',
        '--rotary-base',
        '--save-every', '--seed', '--steps', '--t5-buckets', '--t5-max-distance',
        '--tie-weights', '--train-len', '--vocab-size', '--warmup', '--weight-decay',
    ]),
}


def test_the_cli_surface_is_pinned():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    got = {name: ([a.dest for a in p._actions if not a.option_strings],
                  sorted(s for a in p._actions for s in a.option_strings
                         if s.startswith("--") and s != "--help"))
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
        assert err.startswith("linbias eval: error: cannot write results to") and message in err


def test_wrong_typed_run_config_is_one_clear_line(tmp_path, capsys):
    from linbias.config import ModelConfig
    from linbias.train import RUN_FORMAT, TrainConfig

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
