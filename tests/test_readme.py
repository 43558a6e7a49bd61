"""The README's Python blocks run as written, with small stand-ins for shapes, runs and Hub models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(code: str, replacements: dict[str, str], namespace: dict | None = None) -> dict:
    for old, new in replacements.items():
        assert old in code, f"the README block no longer contains {old!r}: update this test"
        code = code.replace(old, new)
    namespace = {} if namespace is None else namespace
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    return namespace


def test_every_python_block_is_covered() -> None:
    blocks = _blocks()
    assert len(blocks) == 5
    assert "alibi_attention" in blocks[0] and "load_run" in blocks[1] and "EvalConfig" in blocks[2]
    assert "extend_context" in blocks[3] and "padding=True" in blocks[4]


def test_the_attention_block_runs() -> None:
    ns = _run(_blocks()[0], {"4096": "256", "train_len=1024": "train_len=64"})
    assert ns["out"].shape == (2, 12, 256, 64) and ns["step"].shape == (2, 12, 1, 64)


def test_the_load_run_block_runs(tiny_alibi_run: Path) -> None:
    ns = _run(_blocks()[1], {'"runs/alibi"': repr(str(tiny_alibi_run))})
    assert ns["logits"].shape[-1] == ns["run"].config.vocab_size


def test_the_evaluation_block_runs(tiny_alibi_run: Path, monkeypatch: pytest.MonkeyPatch,
                                   tiny_cache_dir: Path) -> None:
    monkeypatch.setenv("LINBIAS_CACHE", str(tiny_cache_dir))
    ns = _run(_blocks()[2], {'"runs/alibi"': repr(str(tiny_alibi_run)),
                             "lengths=(128, 512, 2048)": "lengths=(32, 64, 128)",
                             "max_tokens=20000": "max_tokens=200",
                             # the tiny tokenizer's passkey prompt alone takes 250 tokens
                             'task="passkey", trials=5': 'task="passkey", trials=1, lengths=(256,)'})
    assert [(r["eval_len"], r["scaling"]) for r in ns["records"]] == [
        (n, rule) for n in (32, 64, 128) for rule in ("none", "linear")]
    assert {r["task"] for r in ns["cells"]} == {"passkey"}


def test_the_transformers_block_runs(tiny_alibi_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    from linbias.hf import export_to_hf

    mpt = export_to_hf(tiny_alibi_run, tmp_path / "mpt")  # a local MPT with its tokenizer
    bloom = tmp_path / "bloom"
    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=32, n_layer=1, n_head=2)).save_pretrained(bloom)
    AutoTokenizer.from_pretrained(mpt).save_pretrained(bloom)
    long_text = "def f(x):\n    return x * 2\n" * 12  # past the tiny models' 32 tokens
    ns = _run(_blocks()[3], {'"mosaicml/mpt-7b"': repr(str(mpt)), "max_new_tokens=4000":
                             "max_new_tokens=8", '"bigscience/bloom-560m"': repr(str(bloom)),
                             "train_len=2048": "train_len=32"}, {"long_text": long_text})
    assert ns["out"].shape[1] == ns["ids"].shape[1] + 8 and ns["ids"].shape[1] > 32
    assert ns["logits"].shape[:2] == ns["bloom_ids"].shape


def test_the_batched_export_block_runs(tiny_alibi_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from linbias.hf import export_to_hf, extend_context

    out = export_to_hf(tiny_alibi_run, tmp_path / "mpt")
    ns = _run(_blocks()[4], {"max_new_tokens=2000": "max_new_tokens=40"},
              {"OUT": str(out), "AutoTokenizer": AutoTokenizer,
               "AutoModelForCausalLM": AutoModelForCausalLM, "extend_context": extend_context})
    assert ns["out"].shape == (2, ns["batch"]["input_ids"].shape[1] + 40)  # past train_len 32


# --- the bash blocks: every command line is run (cheap stand-ins) or skipped with its reason ----

# Commands that cannot run here: each must stay in the README as written, or this list changes.
SKIPPED = {
    "python3 -m pip install -e . && python3 -m linbias reproduce --preset quick --out reports/quick":
        "the main job (minutes); CI runs the test command beside it",
    "python3 -m pip install -e '.[test]' && python3 -m pytest": "this test suite itself",
    "apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb pydoc": "a download",
    "linbias reproduce --data text:pydoc/usr/share/doc/python3.11/html/_sources --out reports/pydoc":
        "a 10-minute job on the download above",
    "torchrun --nproc_per_node 2 -m linbias train --position alibi --out runs/ddp":
        "tests/test_train.py runs two processes against one",
    "python3 -m pip install -e '.[harness]'": "an install (the test extra includes it)",
}
# Command lines that start so are run elsewhere in the suite, on tiny models.
RUN_ELSEWHERE = {
    "linbias eval --hf": "tests/test_hf_evaluate.py: the same protocols on transformers models",
    "linbias harness": "tests/test_harness.py::test_cli_harness_writes_results_and_table",
    "python -m linbias.harness": "tests/test_harness.py: lm-eval's own command line with linbias's "
                                 "model (and the paper's setting downloads MPT-7B-8K)",
}
TINY = ("--n-layers 1 --d-model 32 --n-heads 2 --vocab-size 300 --batch-size 4 --eval-every 0 "
        "--warmup 1 --no-progress")


def _bash_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines()]
    return [" ".join(line.split()) for line in lines if line and not line.startswith("#")]


def test_every_bash_line_runs_or_is_skipped_for_a_reason(tiny_text_corpus: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tiny_cache_dir: Path) -> None:
    import shlex

    from linbias.cli import main

    monkeypatch.setenv("LINBIAS_CACHE", str(tiny_cache_dir))
    monkeypatch.chdir(tmp_path)
    data = f"--data text:{tiny_text_corpus}"
    stand_ins = {  # what each command line becomes: the same command, at a tiny size
        "--preset tiny --train-len 128 --steps 2000": f"--train-len 32 --steps 4 {TINY} {data}",
        "--train-len 512 --steps 200 --lr 5e-4 --warmup 10": "--train-len 64 --steps 2 --lr 5e-4 "
                                                              "--warmup 1 --no-progress",
        "--train-len 512 --position-scale 0.25 --steps 200": "--train-len 64 --position-scale 0.5 "
                                                              "--steps 2 --no-progress",
        "--lengths 128,256,512,1024,2048": "--lengths 32,64 --max-tokens 200 --no-progress",
        "--lengths 1024 --mode sliding --stride 128": "--lengths 64 --mode sliding --stride 16 "
                                                       "--max-tokens 200 --no-progress",
        "runs/passkey": "runs/alibi",
        "--lengths 128,256,512,1024 --depths 0,25,50,75,100 --trials 20": "--lengths 256 --depths 50 "
                                                                          "--trials 1 --no-progress",
        "--resume --out runs/alibi": "--resume --out runs/alibi --no-progress",
    }
    ran = []
    for line in _bash_lines():
        if line in SKIPPED:
            continue
        if any(line.startswith(start) for start in RUN_ELSEWHERE):
            continue
        assert line.startswith("linbias "), f"a README command this test does not know: {line}"
        for old, new in stand_ins.items():
            line = line.replace(old, new)
        assert main(shlex.split(line)[1:]) == 0, line
        ran.append(line.split()[1])
    assert ran == ["train", "train", "train", "train", "eval", "eval", "eval"]
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "passkey.png").is_file()
    assert (tmp_path / "runs" / "alibi-512-fixed" / "checkpoint.json").is_file()
