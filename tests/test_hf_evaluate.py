"""linbias.hf.evaluate: transformers models scored with linbias's protocols (``evaluate_hf``,
``HFModel``). The references are ``linbias.evaluate.evaluate_run`` and ``RunModel`` on the run the
export came from: the same weights through the other adapter must give the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
)

from linbias import hf  # noqa: E402
from linbias.config import model_config  # noqa: E402
from linbias.data import token_byte_lengths  # noqa: E402
from linbias.evaluate import evaluate_run  # noqa: E402
from linbias.runs import load_run  # noqa: E402

ATOL = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _eval_kwargs(tiny_cache_dir: Path, **kwargs) -> dict:
    return dict(cache_dir=tiny_cache_dir, progress=False, **kwargs)


@pytest.mark.parametrize(
    ("mode", "stride", "lengths", "rules"),
    [("nonoverlapping", None, [16, 32, 80], ["none", "linear"]), ("sliding", 8, [32], ["none"]),
     ("nonoverlapping", None, [80], ["ntk", "cap", "window:2", "selfextend", "logn"])],
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
    if long and len(long) > 1:
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


def test_passkey_round_trips_through_the_export(tiny_text_corpus, tiny_cache_dir, tmp_path) -> None:
    """A run trained with the passkey mix, exported: same prompts, same logits, same accuracy."""
    from linbias.evaluate import RunModel, evaluate_run_task
    from linbias.tasks import encoder, make_trials
    from linbias.config import TrainConfig
    from linbias.train import train

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


def test_a_length_that_cannot_fit_is_refused_before_any_work(exported) -> None:
    from linbias.config import EvalConfig
    from linbias.hf import evaluate_hf

    with pytest.raises(MemoryError, match=r"length 100000000 needs at least .* GiB for its logits"):
        evaluate_hf(str(exported), EvalConfig(lengths=(100_000_000,), task="passkey"),
                    progress=False)
