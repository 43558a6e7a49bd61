"""The command-line surface: sub-commands, their flags, and clear errors for bad input."""

import pytest

import linbias
from linbias.cli import build_parser, main


def _flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {s for action in sub.choices[command]._actions for s in action.option_strings}


def test_sub_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"train", "eval", "reproduce", "export"}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and linbias.__version__ in capsys.readouterr().out


def test_train_flags_cover_both_configs():
    flags = _flags("train")
    for flag in ("--position", "--train-len", "--preset", "--out", "--steps", "--batch-size",
                 "--seed", "--save-every", "--resume", "--lr", "--warmup", "--weight-decay",
                 "--grad-clip", "--grad-accum", "--bf16", "--eval-every", "--data", "--vocab-size"):
        assert flag in flags, flag


def test_eval_and_reproduce_flags():
    assert {"--lengths", "--split", "--mode", "--stride", "--scaling", "--per-position", "--json",
            "--hf", "--train-len", "--max-tokens"} <= _flags("eval")
    assert {"--preset", "--out", "--force", "--data", "--positions"} <= _flags("reproduce")
    assert {"--to-hf"} <= _flags("export")


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
