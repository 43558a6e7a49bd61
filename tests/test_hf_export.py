"""linbias.hf.export_to_hf and evaluate_hf: a linbias ALiBi GPT as a transformers MPT checkpoint.

The references are independent of the export: the linbias model's own forward (logits), the run's
own ``tokenizers.Tokenizer`` (token ids) and ``linbias.evaluate.evaluate_run`` (perplexity).
transformers' MPT has no biases; nor do linbias models unless built with ``bias=True``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MptForCausalLM,
)

from linbias import hf  # noqa: E402
from linbias.cli import main  # noqa: E402
from linbias.config import model_config  # noqa: E402
from linbias.data import token_byte_lengths  # noqa: E402
from linbias.evaluate import evaluate_run  # noqa: E402
from linbias.model import GPT  # noqa: E402
from linbias.train import Run, load_run  # noqa: E402

ATOL = 1e-4


def _zero_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()


@pytest.fixture(scope="module")
def bias_free_dir(tiny_alibi_run: Path) -> Path:
    """The tiny trained ALiBi run (train_len 32): no biases, the default."""
    assert not any(name.endswith(".bias") for name in load_file(str(tiny_alibi_run / "model.safetensors")))
    return tiny_alibi_run


@pytest.fixture(scope="module")
def exported(bias_free_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf.export_to_hf(bias_free_dir, tmp_path_factory.mktemp("export") / "hf")


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


# --- evaluate_hf ---------------------------------------------------------------------------------


def _eval_kwargs(tiny_cache_dir: Path, **kwargs) -> dict:
    return dict(cache_dir=tiny_cache_dir, progress=False, **kwargs)


@pytest.mark.parametrize(
    ("mode", "stride", "lengths", "rules"),
    [("nonoverlapping", None, [16, 32, 80], ["none", "linear"]), ("sliding", 8, [32], ["none"])],
)
def test_evaluate_hf_equals_evaluate_run(exported, bias_free_dir, tiny_cache_dir, mode, stride,
                                         lengths, rules) -> None:
    run = load_run(bias_free_dir)
    common = _eval_kwargs(tiny_cache_dir, lengths=lengths, rules=rules, mode=mode,
                          stride=stride, max_tokens=400)
    expected = evaluate_run(run, **common)
    got = hf.evaluate_hf(exported, data=run.train_config.data, **common)
    assert len(got) == len(expected) == len(lengths) * len(rules)
    for g, e in zip(got, expected):
        assert set(g) == set(e)
        assert g["position"] == "mpt" and e["position"] == "alibi"
        for key in ("scaling", "train_len", "split", "skipped", "eval_len", "mode", "stride",
                    "tokens", "bytes"):
            assert g[key] == e[key], key
        assert g["ppl"] == pytest.approx(e["ppl"], rel=1e-5)
        assert g["bpb"] == pytest.approx(e["bpb"], rel=1e-5)
    # Past train_len the rules differ, and MPT's "none" extrapolates like linbias's.
    long = [g for g in got if g["eval_len"] == 80]
    if long:
        assert long[0]["ppl"] != long[1]["ppl"]


def test_evaluate_hf_skips_lengths_the_stream_cannot_fill(exported, bias_free_dir, tiny_cache_dir):
    run = load_run(bias_free_dir)
    common = _eval_kwargs(tiny_cache_dir, lengths=[16, 64], max_tokens=40, per_position=True)
    records = hf.evaluate_hf(exported, data=run.train_config.data, **common)
    assert records[0]["skipped"] is None and len(records[0]["per_position"]) == 16
    assert "needs at least 64" in records[1]["skipped"] and records[1]["ppl"] is None
    expected = evaluate_run(run, **common)
    assert [set(r) for r in records] == [set(r) for r in expected]
    assert records[1]["skipped"] == expected[1]["skipped"]
    with pytest.raises(ValueError, match="needs at least 64"):
        hf.evaluate_hf(exported, data=run.train_config.data,
                       **_eval_kwargs(tiny_cache_dir, lengths=[64], max_tokens=40))


def test_evaluate_hf_checks_requests_before_evaluating(exported: Path) -> None:
    # The corpus does not exist: each error below comes before it is read.
    bad = dict(data="text:/no/such/corpus", progress=False)
    with pytest.raises(ValueError, match="unknown scaling rule 'linera'; valid rules: none"):
        hf.evaluate_hf(exported, lengths=[16], rules=["none", "linera"], **bad)
    with pytest.raises(ValueError, match="sliding"):
        hf.evaluate_hf(exported, lengths=[16], mode="sliding", **bad)
    with pytest.raises(ValueError, match="at least one evaluation length"):
        hf.evaluate_hf(exported, lengths=[], **bad)


def test_evaluate_hf_other_families(exported, bias_free_dir, tiny_cache_dir) -> None:
    tok = AutoTokenizer.from_pretrained(exported)
    data = load_run(bias_free_dir).train_config.data
    kwargs = _eval_kwargs(tiny_cache_dir, tokenizer=tok, data=data, lengths=[16], max_tokens=48)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=16, n_layer=1,
                                      n_head=2))
    (record,) = hf.evaluate_hf(gpt2, **kwargs)
    assert record["position"] == "gpt2" and record["tokens"] == 48 and gpt2.training
    with pytest.raises(ValueError, match="supported ALiBi families"):
        hf.evaluate_hf(gpt2, rules=["linear"], **kwargs)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=16, n_layer=1, n_head=2))
    (record,) = hf.evaluate_hf(bloom, **kwargs)
    assert record["position"] == "bloom" and record["train_len"] is None
    with pytest.raises(ValueError, match="pass train_len"):
        hf.evaluate_hf(bloom, rules=["linear"], **kwargs)
    records = hf.evaluate_hf(bloom, rules=["none", "linear"], train_len=8, **kwargs)
    assert [r["train_len"] for r in records] == [8, 8] and records[0]["ppl"] != records[1]["ppl"]


def test_missing_model_mentions_offline_use(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        hf.evaluate_hf(tmp_path / "missing", lengths=[16], progress=False)


def test_byte_lengths_of_other_vocabularies(tiny_alibi_run: Path) -> None:
    run_tok = load_run(tiny_alibi_run).tokenizer
    tok = Tokenizer.from_str(run_tok.to_str())
    tok.add_tokens(["  "])  # raw text, as GPT-NeoX's runs of spaces: not byte-level characters
    lengths = hf.evaluate._hf_byte_lengths(tok)
    assert lengths[tok.token_to_id("  ")] == 2
    np.testing.assert_array_equal(lengths[:-1], token_byte_lengths(run_tok))
    word = Tokenizer(models.WordLevel({"</s>": 0, "héllo": 1, "a": 2}, unk_token="a"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.add_special_tokens(["</s>"])
    np.testing.assert_array_equal(hf.evaluate._hf_byte_lengths(word), [0, 6, 1])


# --- the command line ----------------------------------------------------------------------------


def test_cli_export_and_eval(bias_free_dir, tiny_alibi_run, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LINBIAS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "hf"
    assert main(["export", str(bias_free_dir), "--to-hf", str(out)]) == 0
    assert "MPT" in capsys.readouterr().out and (out / hf.EXPORT_MARKER).is_file()
    assert main(["export", str(tmp_path / "missing"), "--to-hf", str(tmp_path / "no")]) == 2
    assert "no run directory" in capsys.readouterr().err
    data = load_run(bias_free_dir).train_config.data
    report = tmp_path / "r.json"
    argv = ["eval", "--hf", str(out), "--lengths", "16,48", "--scaling", "none,linear",
            "--data", data, "--max-tokens", "96", "--no-progress", "--json", str(report)]
    assert main(argv) == 0
    records = json.loads(report.read_text())["results"]
    assert [(r["position"], r["eval_len"], r["scaling"]) for r in records] == [
        ("mpt", 16, "none"), ("mpt", 16, "linear"), ("mpt", 48, "none"), ("mpt", 48, "linear")]
    assert all(r["train_len"] == 32 and r["tokens"] == 96 for r in records)


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


def test_evaluate_hf_skips_lengths_past_a_learned_position_table(exported, bias_free_dir,
                                                                   tiny_cache_dir) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(exported)
    data = load_run(bias_free_dir).train_config.data
    kwargs = _eval_kwargs(tiny_cache_dir, tokenizer=tok, data=data, max_tokens=48)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=16, n_embd=16, n_layer=1,
                                      n_head=2))
    short, long = hf.evaluate_hf(gpt2, lengths=[8, 32], **kwargs)
    assert short["ppl"] is not None and long["ppl"] is None and "16 positions" in long["skipped"]
    with pytest.raises(ValueError, match="position table"):
        hf.evaluate_hf(gpt2, lengths=[17], **kwargs)
    opt = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, ffn_dim=32, max_position_embeddings=16,
                                   word_embed_proj_dim=16))  # two offset rows before position 0
    assert [r["ppl"] is None for r in hf.evaluate_hf(opt, lengths=[16, 17], **kwargs)] == [False, True]


# --- retrieval through the export -----------------------------------------------------------------


def test_passkey_round_trips_through_the_export(tiny_text_corpus, tiny_cache_dir, tmp_path) -> None:
    """A run trained with the passkey mix, exported: same prompts, same logits, same accuracy."""
    from linbias.evaluate import RunModel, evaluate_run_task
    from linbias.tasks import encoder, make_trials
    from linbias.train import TrainConfig, train

    torch.manual_seed(0)
    config = model_config("tiny", position="alibi", train_len=384, n_layers=1, d_model=32, n_heads=2)
    tc = TrainConfig(data=f"text:{tiny_text_corpus}", vocab_size=300, steps=8, batch_size=4,
                     eval_every=0, save_every=0, warmup=1, mix_task="passkey", mix_fraction=0.5)
    run_dir = train(config, tc, tmp_path / "run", progress=False, cache_dir=tiny_cache_dir)
    out = hf.export_to_hf(run_dir, tmp_path / "hf")
    request = dict(task="passkey", lengths=[384, 1152], depths=[0, 50, 100], trials=4,
                   rules=("none", "linear"), progress=False)
    ours = evaluate_run_task(run_dir, **request)
    theirs = hf.evaluate_hf_task(out, **request)
    keys = ("length", "depth", "scaling", "n", "correct", "mean_distance", "skipped")
    assert [[r[k] for k in keys] for r in theirs] == [[r[k] for k in keys] for r in ours]
    assert {r["position"] for r in theirs} == {"mpt"} and {r["train_len"] for r in theirs} == {384}

    run, mpt = load_run(run_dir), AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    trials = make_trials("passkey", encoder(run.tokenizer), 1152, 50, 3, 7)
    assert make_trials("passkey", encoder(tok), 1152, 50, 3, 7) == trials  # same ids both ways
    ids_BT = torch.zeros(2, 1152, dtype=torch.long)
    mask_BT = torch.ones(2, 1152, dtype=torch.bool)
    ids_BT[0], ids_BT[1, 100:] = torch.tensor(trials[0].prompt_ids + trials[0].answer_ids), \
        torch.tensor(trials[1].prompt_ids + trials[1].answer_ids)[:1052]
    mask_BT[1, :100] = False  # a left-padded row
    with torch.no_grad(), RunModel(run).under("linear") as ours_model, \
            hf.extended(mpt, 384, "linear"):
        got = hf.HFModel(mpt, 384).logits(ids_BT, mask_BT)
        want = ours_model.logits(ids_BT, mask_BT)
    assert _max_diff(got[mask_BT], want[mask_BT]) < ATOL


@pytest.mark.parametrize("rule", ["none", "linear"])
def test_attention_profile_of_the_export_equals_the_runs(exported, bias_free_dir, rule) -> None:
    from linbias.evaluate import RunModel, attention_profile

    ids_KT = torch.randint(0, 300, (2, 96), generator=torch.Generator().manual_seed(1))
    mpt = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    theirs = attention_profile(hf.HFModel(mpt), ids_KT, rules=(rule,))
    ours = attention_profile(RunModel(load_run(bias_free_dir)), ids_KT, rules=(rule,))
    assert [(r["layer"], r["head"], r["distance"]) for r in theirs] == \
        [(r["layer"], r["head"], r["distance"]) for r in ours]
    assert all(abs(a["share"] - b["share"]) < 1e-5 for a, b in zip(theirs, ours))


def test_a_fine_tuned_run_exports_with_its_new_training_length(bias_free_dir, tiny_cache_dir,
                                                                tmp_path) -> None:
    from linbias.train import TrainConfig, train

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
