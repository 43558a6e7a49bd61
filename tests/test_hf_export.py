"""linbias.hf.export_to_hf: a linbias ALiBi GPT as a transformers MPT checkpoint.

The references are independent of the export: the linbias model's own forward (logits), the run's
own ``tokenizers.Tokenizer`` (token ids) and ``linbias.evaluate.evaluate_run`` (perplexity).
transformers' MPT has no biases; nor do linbias models unless built with ``bias=True``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    MptForCausalLM,
)

from linbias import hf  # noqa: E402
from linbias.config import model_config  # noqa: E402
from linbias.model import GPT  # noqa: E402
from linbias.runs import Run, load_run  # noqa: E402

ATOL = 1e-4


def _zero_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()


def _wide_run(tokenizer: Tokenizer, **config) -> Run:
    """An untrained model with large random weights (so logits differ clearly), biases zero."""
    torch.manual_seed(0)
    mc = model_config("tiny", vocab_size=tokenizer.get_vocab_size(), train_len=16, **config)
    model = GPT(mc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "ln_" in name else 0.0, 0.3)  # LayerNorm gains about 1
    _zero_biases(model)
    return Run(Path("wide"), model.eval(), tokenizer, mc, None)  # type: ignore[arg-type]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --- export: files, weights, logits --------------------------------------------------------------


def test_export_loads_as_mpt_with_the_training_length(exported: Path, bias_free_dir: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", hf.EXPORT_MARKER} <= names
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temporaries
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert isinstance(model, MptForCausalLM)
    assert model.config.max_seq_len == 32 and model.config.use_cache
    assert model.config.eos_token_id == 0 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    marker = json.loads((exported / hf.EXPORT_MARKER).read_text())
    assert marker["hf_format"] == "mpt" and marker["train_len"] == 32
    assert marker["source"] == str(bias_free_dir) and marker["max_logit_diff"] < ATOL


@pytest.mark.parametrize("length", [1, 7, 32])
def test_export_logits_match_up_to_the_training_length(exported, bias_free_dir, length) -> None:
    run, model = load_run(bias_free_dir), AutoModelForCausalLM.from_pretrained(exported)
    ids = torch.randint(run.config.vocab_size, (3, length))
    with torch.no_grad():
        assert _max_diff(model(ids).logits, run.model(ids)) < ATOL


def test_export_tokenizer_pads_on_the_left_with_eos(exported: Path) -> None:
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
    assert AutoModelForCausalLM.from_pretrained(exported).config.pad_token_id == tok.eos_token_id
    batch = tok(["one", "one two three four"], padding=True)
    short, long = batch["attention_mask"]
    assert short[0] == 0 and short[-1] == 1 and all(long)
    assert batch["input_ids"][0][0] == tok.pad_token_id


def test_batched_generate_on_the_export_past_train_len(exported: Path) -> None:
    """As transformers users write it: tok(texts, padding=True), then generate, past L = 32."""
    tok = AutoTokenizer.from_pretrained(exported)
    model = hf.extend_context(AutoModelForCausalLM.from_pretrained(exported).eval())
    texts = ["the quick brown fox jumps over the lazy dog and runs away", "a cat"]
    new = 40
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        batch = model.generate(**tok(texts, return_tensors="pt", padding=True), **kwargs)
        assert batch.sequences.shape[1] > 32 + new // 2
        for b, text in enumerate(texts):
            single = model.generate(**tok([text], return_tensors="pt"), **kwargs)
            assert torch.equal(batch.sequences[b, -new:], single.sequences[0, -new:])
            assert _max_diff(torch.stack(batch.logits)[:, b], torch.stack(single.logits)[:, 0]) < ATOL


@pytest.mark.parametrize("rule", ["none", "linear", "sqrt"])
def test_export_logits_match_beyond_train_len_with_extend_context(exported, bias_free_dir, rule):
    run, model = load_run(bias_free_dir), AutoModelForCausalLM.from_pretrained(exported)
    ids = torch.randint(run.config.vocab_size, (2, 100))  # about 3 L
    with pytest.raises(RuntimeError):  # as any MPT: the bias is built for max_seq_len keys only
        model(ids)
    run.model.set_rule(rule)
    with torch.no_grad(), hf.extended(model, rule=rule):  # train_len from max_seq_len
        assert _max_diff(model(ids).logits, run.model(ids)) < ATOL


def test_export_of_untied_odd_head_model_with_dropout(tiny_alibi_run, tmp_path) -> None:
    """6 heads (MPT's slope order for non-powers of two), 2 layers, untied output, dropout."""
    run = _wide_run(load_run(tiny_alibi_run).tokenizer, n_layers=2, n_heads=6, d_model=48,
                    tie_weights=False, dropout=0.1)
    out = hf.export_to_hf(run, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    ids = torch.randint(run.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = run.model(ids)
        assert expected.abs().max() > 5  # large logits: a loose match would show
        assert _max_diff(model(ids).logits, expected) < ATOL
        run.model.set_rule("linear")
        with hf.extended(model):
            long_ids = torch.randint(run.config.vocab_size, (2, 40))
            assert _max_diff(model(long_ids).logits, run.model(long_ids)) < ATOL


def test_biases_export_only_when_zero(tiny_alibi_run, tmp_path) -> None:
    """A model built with bias=True maps onto MPT only while every bias is zero."""
    run = _wide_run(load_run(tiny_alibi_run).tokenizer, n_layers=1, d_model=32, bias=True)
    with torch.no_grad():
        run.model.blocks[0].attn.qkv.bias.fill_(0.1)
    with pytest.raises(ValueError, match="bias"):
        hf.export_to_hf(run, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    _zero_biases(run.model)
    model = AutoModelForCausalLM.from_pretrained(hf.export_to_hf(run, tmp_path / "hf"))
    ids = torch.randint(run.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert _max_diff(model(ids).logits, run.model(ids)) < ATOL


def test_exported_tokenizer_encodes_like_the_run(exported: Path, bias_free_dir: Path) -> None:
    run_tok = load_run(bias_free_dir).tokenizer
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == 0
    texts = ["doc 5: alpha γάμμα 🙂", "def f(y):\n    return y\n", "a<|endoftext|>b", "  x  "]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == run_tok.encode(text).ids
        assert tok.decode(ids) == text


# --- export: refusals and the output directory --------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(position="rotary"), "only ALiBi models"),
        (dict(alibi_max_bias=4.0), "alibi_bias_max=8"),
        (dict(d_ff=96), "4 \\* d_model"),
        (dict(embedding="fairseq"), "sqrt\\(d_model\\)"),
        (dict(position_scale=0.25), "position_scale=0.25 .*no alibi_bias_max.*evaluate the run"),
    ],
)
def test_inexact_models_are_refused(tiny_alibi_run, tmp_path, config, message) -> None:
    run = _wide_run(load_run(tiny_alibi_run).tokenizer, n_layers=1, d_model=32, **config)
    with pytest.raises(ValueError, match=message):
        hf.export_to_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_directory_rules(bias_free_dir: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a previous linbias export"):
        hf.export_to_hf(bias_free_dir, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        hf.export_to_hf(bias_free_dir, tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    hf.export_to_hf(bias_free_dir, empty)
    first = {p.name: p.read_bytes() for p in empty.iterdir()}
    hf.export_to_hf(bias_free_dir, empty)  # an untouched previous export is replaced
    assert {p.name for p in empty.iterdir()} == set(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "foreign"]


@pytest.mark.parametrize("change", ["add file", "add folder", "edit config", "bad marker"])
def test_export_never_replaces_what_a_user_added_or_changed(bias_free_dir, tmp_path, change):
    out = tmp_path / "hf"
    hf.export_to_hf(bias_free_dir, out)
    if change == "add file":
        (out / "notes.txt").write_text("mine")
    elif change == "add folder":
        (out / "mine").mkdir()
        (out / "mine" / "data.txt").write_text("mine")
    elif change == "edit config":
        (out / "config.json").write_text((out / "config.json").read_text() + " ")
    else:
        (out / hf.EXPORT_MARKER).write_text("[1, 2]")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="--to-hf"):
        hf.export_to_hf(bias_free_dir, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left


def test_export_never_touches_the_run_or_the_current_directory(tiny_alibi_run, tmp_path,
                                                               monkeypatch) -> None:
    outer = tmp_path / "outer"
    run_dir = outer / "run"
    shutil.copytree(tiny_alibi_run, run_dir)
    with pytest.raises(ValueError, match="holds the run"):
        hf.export_to_hf(run_dir, outer)
    with pytest.raises(ValueError, match="holds the run"):
        hf.export_to_hf(run_dir, run_dir)
    assert sorted(p.name for p in outer.iterdir()) == ["run"]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for target in (".", "..", str(work)):
        with pytest.raises(ValueError, match="current directory"):
            hf.export_to_hf(run_dir, target)
    assert list(work.iterdir()) == []
    hf.export_to_hf(run_dir, "hf")  # a relative new folder is fine
    assert (work / "hf" / hf.EXPORT_MARKER).is_file()


def test_failed_check_writes_nothing(bias_free_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(hf.export, "_EXPORT_RTOL", -1.0)  # as if transformers' MPT had changed
    with pytest.raises(RuntimeError, match="logits differ"):
        hf.export_to_hf(bias_free_dir, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


# --- retrieval through the export -----------------------------------------------------------------


def test_a_fine_tuned_run_exports_with_its_new_training_length(bias_free_dir, tiny_cache_dir,
                                                                tmp_path) -> None:
    from linbias.config import TrainConfig
    from linbias.train import train

    parent = load_run(bias_free_dir)
    mc = model_config("tiny", **{**parent.config.to_dict(), "train_len": 64})
    tc = TrainConfig(**{**parent.train_config.to_dict(), "steps": 2, "init_from": str(bias_free_dir)})
    child = load_run(train(mc, tc, tmp_path / "child", progress=False, cache_dir=tiny_cache_dir))
    out = hf.export_to_hf(child, tmp_path / "hf")
    mpt = AutoModelForCausalLM.from_pretrained(out).eval()
    assert mpt.config.max_seq_len == 64
    ids = torch.randint(child.config.vocab_size, (2, 64))
    with torch.no_grad():
        ref = child.model(ids)
        assert _max_diff(mpt(ids).logits, ref) <= 1e-4 * float(ref.abs().max())


# --- one writer, whole runs only ------------------------------------------------------------------


def test_export_refuses_a_target_inside_a_run_and_a_run_without_a_checkpoint(tiny_alibi_run,
                                                                              tmp_path) -> None:
    run_dir = Path(shutil.copytree(tiny_alibi_run, tmp_path / "run"))
    with pytest.raises(ValueError, match="is inside .*run, a linbias run or export"):
        hf.export_to_hf(run_dir, run_dir / "hf")
    (run_dir / "checkpoint.json").unlink()
    with pytest.raises(ValueError, match="never saved a checkpoint"):
        hf.export_to_hf(run_dir, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_two_exports_into_one_target_are_one_at_a_time(bias_free_dir, tmp_path) -> None:
    from conftest import another_writer

    with another_writer(tmp_path / ".hf.linbias.lock", "file") as proc:
        with pytest.raises(RuntimeError, match=rf"the export .*hf is being written by another "
                                               rf"linbias process \(pid {proc.pid}\)"):
            hf.export_to_hf(bias_free_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
