"""linbias.hf.extend: ALiBi position interpolation patched into transformers' BLOOM, MPT, Falcon.

The reference is a hand-written float64 forward of each tiny model from its weights, with the
paper's bias ``-m_h * (i - j)`` (Falcon: its own per-key bias, divided by sqrt(head dim) with the
scores, slopes and products rounded to bfloat16 as Falcon rounds them) and slopes from
``linbias.alibi_slopes`` scaled by hand, not by linbias.hf. Past train_len the default attention
is linbias's (``attention="linbias"``); tests that name ``attention`` check both. The other
reference is the stock model itself: ``attention="native"`` runs the family's own attention with
the scaled slopes, and the linbias attention must agree with it within 1e-4 (fp32).
"""

from __future__ import annotations

import contextlib

import math
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BloomConfig,
    BloomForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MptConfig,
    MptForCausalLM,
)
from transformers.models.bloom.modeling_bloom import build_alibi_tensor as bloom_alibi  # noqa: E402
from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi  # noqa: E402
from transformers.models.mpt.modeling_mpt import MptModel  # noqa: E402
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor as mpt_alibi  # noqa: E402
from conftest import LargestTensor  # noqa: E402

from linbias import hf  # noqa: E402
from linbias.hf import patch as hf_patch  # noqa: E402
from linbias.hf.families import falcon as falcon_unit  # noqa: E402
from linbias.alibi import alibi_slopes  # noqa: E402

TRAIN_LEN = 16
VOCAB = 64
MODELS = [
    "bloom", "bloom-6-heads", "mpt", "mpt-6-heads", "falcon", "falcon-multi-query", "falcon-grouped",
]
ATTENTIONS = ["linbias", "native"]
FACTORS = {  # the scaling rules, by hand
    "linear": lambda n: min(1.0, TRAIN_LEN / n),
    "sqrt": lambda n: min(1.0, math.sqrt(TRAIN_LEN / n)),
    "none": lambda n: 1.0,
}


def make(family: str, n_layers: int = 2, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A tiny randomly initialised model; MPT's and Falcon's configs give TRAIN_LEN as length."""
    torch.manual_seed(seed)
    n_heads = 6 if family.endswith("6-heads") else 4
    sizes = dict(vocab_size=VOCAB, hidden_size=8 * n_heads, num_hidden_layers=n_layers)
    if family.startswith("bloom"):
        model = BloomForCausalLM(BloomConfig(n_head=n_heads, **sizes, **config))
    elif family.startswith("mpt"):
        model = MptForCausalLM(MptConfig(n_heads=n_heads, max_seq_len=TRAIN_LEN, **sizes, **config))
    else:
        grouped = family.endswith("grouped")  # two key/value heads for four query heads
        falcon = FalconConfig(
            num_attention_heads=n_heads,
            alibi=True,
            new_decoder_architecture=grouped,
            num_kv_heads=2 if grouped else None,
            multi_query=family.endswith("multi-query"),
            max_position_embeddings=TRAIN_LEN,
            **sizes,
            **config,
        )
        model = FalconForCausalLM(falcon)
    return model.eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


# --- The float64 reference ------------------------------------------------------------------------


def _d(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double()


def _ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], _d(norm.weight), _d(norm.bias), norm.eps)


def _lin(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, _d(linear.weight), _d(linear.bias))


def _causal(bias_HTT: torch.Tensor) -> torch.Tensor:
    t = bias_HTT.shape[-1]
    return bias_HTT.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))


def paper_bias(slopes_TH: torch.Tensor) -> torch.Tensor:
    """``-m_h * (i - j)``, query row ``i`` with its own slopes ``slopes_TH[i]``."""
    pos = torch.arange(slopes_TH.shape[0], dtype=torch.float64)
    return _causal(-slopes_TH.T[:, :, None] * (pos[:, None] - pos[None, :]))


def falcon_bias(slopes_TH: torch.Tensor) -> torch.Tensor:
    """Falcon's per-key ``m_h * j``: slope rounded to bfloat16, product rounded to bfloat16 (the
    positions of these short inputs, below 256, are exact in bfloat16)."""
    pos = torch.arange(slopes_TH.shape[0], dtype=torch.float64)
    bias = slopes_TH.T[:, :, None].to(torch.bfloat16).double() * pos
    return _causal(bias.to(torch.bfloat16).double())


def _attend(scores_HTT: torch.Tensor, v_HTD: torch.Tensor) -> torch.Tensor:
    """Softmax over keys, then the values, heads merged: ``[T, H*D]``."""
    out_HTD = torch.softmax(scores_HTT, dim=-1) @ v_HTD
    return out_HTD.transpose(0, 1).reshape(scores_HTT.shape[1], -1)


def _heads(x_TC: torch.Tensor, d_head: int) -> torch.Tensor:
    return x_TC.reshape(x_TC.shape[0], -1, d_head).transpose(0, 1)  # [H, T, D]


def _bloom_reference(model, ids, slopes_TH, attend=None):
    tr, d_head = model.transformer, model.config.hidden_size // slopes_TH.shape[1]
    bias_HTT = paper_bias(slopes_TH)
    h = _ln(_d(tr.word_embeddings.weight)[ids], tr.word_embeddings_layernorm)
    for block in tr.h:
        att, mlp = block.self_attention, block.mlp
        qkv = _lin(_ln(h, block.input_layernorm), att.query_key_value)
        # BLOOM interleaves q, k, v per head: [T, H, 3, D].
        q, k, v = (x.transpose(0, 1) for x in qkv.view(len(ids), -1, 3, d_head).unbind(2))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_head) + bias_HTT
        h = h + _lin(_attend(scores, v) if attend is None else attend(q, k, v), att.dense)
        x = _ln(h, block.post_attention_layernorm)
        h = h + _lin(F.gelu(_lin(x, mlp.dense_h_to_4h), approximate="tanh"), mlp.dense_4h_to_h)
    return _lin(_ln(h, tr.ln_f), model.lm_head)


def _mpt_reference(model, ids, slopes_TH, attend=None):
    tr, d_head = model.transformer, model.config.hidden_size // slopes_TH.shape[1]
    bias_HTT = paper_bias(slopes_TH)
    h = _d(tr.wte.weight)[ids]
    for block in tr.blocks:
        qkv = _lin(_ln(h, block.norm_1), block.attn.Wqkv)
        q, k, v = (_heads(x, d_head) for x in qkv.chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_head) + bias_HTT
        y = _attend(scores, v) if attend is None else attend(q, k, v)
        h = h + _lin(y, block.attn.out_proj)
        h = h + _lin(F.gelu(_lin(_ln(h, block.norm_2), block.ffn.up_proj)), block.ffn.down_proj)
    return _lin(_ln(h, tr.norm_f), model.lm_head)


def _falcon_qkv(config, qkv, n_heads, d_head):
    """Queries, keys and values ``[heads, T, D]`` (keys and values expanded to every head)."""
    if config.new_decoder_architecture:  # per key/value head: its query heads, a key, a value
        group = n_heads // config.num_kv_heads
        qkv = qkv.view(len(qkv), config.num_kv_heads, group + 2, d_head)
        q = qkv[:, :, :group].reshape(len(qkv), n_heads, d_head)
        k, v = (qkv[:, :, group + i].repeat_interleave(group, dim=1) for i in (0, 1))
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if config.multi_query:  # H query heads, then one key and one value head for all
        qkv_HTD = _heads(qkv, d_head)
        return qkv_HTD[:n_heads], qkv_HTD[n_heads:-1], qkv_HTD[-1:]
    return (x.transpose(0, 1) for x in qkv.view(len(qkv), n_heads, 3, d_head).unbind(2))


def _falcon_reference(model, ids, slopes_TH, divides_bias=True, attend=None):
    tr, n_heads, config = model.transformer, slopes_TH.shape[1], model.config
    d_head = config.hidden_size // n_heads
    bias_HTT = falcon_bias(slopes_TH)
    h = _d(tr.word_embeddings.weight)[ids]
    for layer in tr.h:
        if config.new_decoder_architecture:  # separate norms before attention and MLP
            x, x_mlp = _ln(h, layer.ln_attn), _ln(h, layer.ln_mlp)
        else:
            x = x_mlp = _ln(h, layer.input_layernorm)
        att = layer.self_attention
        q, k, v = _falcon_qkv(config, _lin(x, att.query_key_value), n_heads, d_head)
        qk = q @ k.transpose(-1, -2)
        if divides_bias:  # Falcon's convention: the bias is divided by sqrt(d) with the scores
            scores = (qk + bias_HTT) / math.sqrt(d_head)
        else:  # everyone else's
            scores = qk / math.sqrt(d_head) + bias_HTT
        attn = _lin(_attend(scores, v) if attend is None else attend(q, k, v), att.dense)
        # Parallel attention and MLP.
        h = h + attn + _lin(F.gelu(_lin(x_mlp, layer.mlp.dense_h_to_4h)), layer.mlp.dense_4h_to_h)
    return _lin(_ln(h, tr.ln_f), model.lm_head)


def reference(model, ids_T: torch.Tensor, slopes_TH: torch.Tensor, **kwargs) -> torch.Tensor:
    """float64 logits ``[T, V]`` of one sequence; query ``i`` uses the slopes ``slopes_TH[i]``."""
    if isinstance(model, BloomForCausalLM):
        return _bloom_reference(model, ids_T, slopes_TH, **kwargs)
    if isinstance(model, MptForCausalLM):
        return _mpt_reference(model, ids_T, slopes_TH, **kwargs)
    return _falcon_reference(model, ids_T, slopes_TH, **kwargs)


def slopes_for(model, lengths: list[int], rule: str = "linear") -> torch.Tensor:
    """``[T, H]``: row ``i`` holds the slopes for a current length of ``lengths[i]``."""
    slopes = alibi_slopes(model.config.num_attention_heads).double()
    return torch.stack([slopes * FACTORS[rule](n) for n in lengths])


def assert_matches_reference(model, ids_T, lengths, rule="linear", atol=2e-6):
    ref = reference(model, ids_T, slopes_for(model, lengths, rule))
    torch.testing.assert_close(logits(model, ids_T[None])[0].double(), ref, rtol=0, atol=atol)


# --- Slopes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_heads", [4, 6, 8, 12])
def test_family_slopes_agree_with_linbias(n_heads):
    ones = torch.ones(1, 2, dtype=torch.long)
    expected = alibi_slopes(n_heads)
    # BLOOM and Falcon: per-key m * pos, so the second key's bias is the slope.
    torch.testing.assert_close(
        bloom_alibi(ones, n_heads, torch.float32).view(n_heads, 2)[:, 1], expected
    )
    torch.testing.assert_close(
        falcon_alibi(ones, n_heads, torch.float32).view(n_heads, 2)[:, 1],
        expected.bfloat16().float(),
    )
    # MPT: m * (j - (K - 1)), so the first of two keys holds -m.
    torch.testing.assert_close(-mpt_alibi(n_heads, 2)[:, 0, 0], expected)


# --- At or below train_len: bit-identical ---------------------------------------------------------


@pytest.mark.parametrize("family", MODELS)
def test_bit_identical_within_train_len(family):
    model = make(family)
    ids = tokens(2, TRAIN_LEN)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    cases = [(ids, {}), (ids[:, :7], {}), (ids, {"attention_mask": mask})]
    before = [logits(model, x, **kw) for x, kw in cases]
    hf.extend_context(model, train_len=TRAIN_LEN)
    for (x, kw), expected in zip(cases, before, strict=True):
        assert torch.equal(logits(model, x, **kw), expected)


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_generation_within_train_len_is_bit_identical(family):
    model = make(family)
    kwargs = dict(
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
        use_cache=True,
    )
    prompt = tokens(2, 8)
    with torch.no_grad():
        before = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        hf.extend_context(model, train_len=TRAIN_LEN)
        after = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert torch.equal(before.sequences, after.sequences)
    assert all(torch.equal(a, b) for a, b in zip(before.logits, after.logits, strict=True))


# --- Beyond train_len: the reference with scaled slopes -------------------------------------------


@pytest.mark.parametrize("n", [2 * TRAIN_LEN, 4 * TRAIN_LEN - 3])
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("family", MODELS)
def test_beyond_train_len_matches_reference(family, attention, n):
    model = hf.extend_context(make(family), train_len=TRAIN_LEN, attention=attention)
    assert_matches_reference(model, tokens(n), [n] * n)


@pytest.mark.parametrize("rule", ["linear", "sqrt", "none"])
@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_rules_match_reference(family, rule):
    model = hf.extend_context(make(family), train_len=TRAIN_LEN, rule=rule)
    ids = tokens(TRAIN_LEN + 7)
    assert_matches_reference(model, ids, [len(ids)] * len(ids), rule)


def test_reference_sees_the_scaling():
    # The reference tests above could not pass if the slopes were left alone.
    model = hf.extend_context(make("bloom"), train_len=TRAIN_LEN)
    ids = tokens(2 * TRAIN_LEN)
    unscaled = reference(model, ids, slopes_for(model, [len(ids)] * len(ids), "none"))
    assert (logits(model, ids[None])[0].double() - unscaled).abs().max() > 1e-4


def test_falcon_divides_the_bias_by_sqrt_head_dim():
    model = hf.extend_context(make("falcon"), train_len=TRAIN_LEN)
    ids = tokens(2 * TRAIN_LEN)
    slopes = slopes_for(model, [len(ids)] * len(ids))
    got = logits(model, ids[None])[0].double()
    torch.testing.assert_close(got, reference(model, ids, slopes), rtol=0, atol=2e-6)
    assert (got - reference(model, ids, slopes, divides_bias=False)).abs().max() > 1e-4


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_falcon_eager_keeps_its_double_bias(attention):
    # Up to 5.24, transformers' eager Falcon adds the ALiBi tensor twice (to the scores and,
    # divided by sqrt(d), folded into the mask); SDPA, the default, once; from 5.25 eager adds it
    # once too. The unit detects which, the stock model within train_len confirms it, and the
    # extension keeps it past train_len (linbias's attention doubles the slopes where eager does).
    factor = 2 if falcon_unit.FAMILY.eager_doubles_bias() else 1
    model = make("falcon", attn_implementation="eager")
    ids = tokens(3 * TRAIN_LEN - 1)
    before = logits(model, ids[None, :TRAIN_LEN])
    short = factor * slopes_for(model, [TRAIN_LEN] * TRAIN_LEN, "none")
    ref = reference(model, ids[:TRAIN_LEN], short)
    torch.testing.assert_close(before[0].double(), ref, rtol=0, atol=2e-6)
    hf.extend_context(model, train_len=TRAIN_LEN, attention=attention)
    assert torch.equal(logits(model, ids[None, :TRAIN_LEN]), before)
    slopes = factor * slopes_for(model, [len(ids)] * len(ids))
    got = logits(model, ids[None])[0].double()
    torch.testing.assert_close(got, reference(model, ids, slopes), rtol=0, atol=2e-6)


def test_mpt_runs_past_max_seq_len():
    model = make("mpt")
    ids = tokens(1, TRAIN_LEN + 4)
    with pytest.raises(RuntimeError):
        logits(model, ids)  # transformers builds MPT's bias for exactly max_seq_len keys
    hf.extend_context(model, rule="none")  # train_len defaults to config.max_seq_len
    assert_matches_reference(model, ids[0], [ids.shape[1]] * ids.shape[1], "none")
    hf.extend_context(model)
    assert_matches_reference(model, ids[0], [ids.shape[1]] * ids.shape[1], "linear")


def test_mpt_keeps_the_slopes_it_uses():
    # transformers 5.23's MptModel never passes config.attn_config.alibi_bias_max to its builder
    # (it always uses 8). Whichever it uses, past train_len the extension scales those slopes.
    model = make("mpt", attn_config={"alibi_bias_max": 4})
    ids = tokens(2 * TRAIN_LEN)
    short = logits(model, ids[None, :TRAIN_LEN])[0].double()
    candidates = {
        max_bias: alibi_slopes(4, max_bias).double().expand(TRAIN_LEN, 4) for max_bias in (4, 8)
    }
    used = [
        b
        for b, slopes in candidates.items()
        if torch.allclose(short, reference(model, ids[:TRAIN_LEN], slopes), rtol=0, atol=2e-6)
    ]
    assert len(used) == 1
    hf.extend_context(model)
    factor = TRAIN_LEN / len(ids)
    slopes = factor * alibi_slopes(4, used[0]).double().expand(len(ids), 4)
    got = logits(model, ids[None])[0].double()
    torch.testing.assert_close(got, reference(model, ids, slopes), rtol=0, atol=2e-6)


def test_mpt_train_len_beyond_max_seq_len_runs_unscaled():
    model = hf.extend_context(make("mpt"), train_len=4 * TRAIN_LEN)
    ids = tokens(2 * TRAIN_LEN)
    assert_matches_reference(model, ids, [len(ids)] * len(ids), "none")


# --- Generation with a KV cache -------------------------------------------------------------------


def _skip_unless_stock_runs(run, what: str) -> None:
    """Skip (naming the release) when the unextended model cannot do ``run()`` on this release,
    or warns that it ignores part of it: a limit of transformers, not of the extension."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run()
        except (RuntimeError, ValueError) as exc:
            pytest.skip(f"transformers {transformers.__version__}'s own {what} fails: {exc}")
    ignored = [str(w.message) for w in caught if "ignored" in str(w.message)]
    if ignored:
        pytest.skip(f"transformers {transformers.__version__}'s own {what}: {ignored[0]}")


def _generate(model, prompt, mask=None, new=10, **kwargs):
    with torch.no_grad():
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt) if mask is None else mask,
            max_new_tokens=new,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            use_cache=True,  # MptConfig defaults to use_cache=False
            **kwargs,
        )


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_one_layer_generation_matches_recomputing_without_cache(family):
    # With one layer the cached keys and values do not depend on the slopes, so each step equals
    # the whole sequence recomputed with the slopes for its current length.
    model = hf.extend_context(make(family, n_layers=1), train_len=TRAIN_LEN)
    prompt = tokens(2, TRAIN_LEN - 4)
    out = _generate(model, prompt)
    for step, step_logits in enumerate(out.logits):
        n = prompt.shape[1] + step
        torch.testing.assert_close(
            step_logits, logits(model, out.sequences[:, :n])[:, -1], rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize(
    "family", ["bloom", "mpt", "falcon", "falcon-multi-query", "falcon-grouped", "bloom-6-heads"]
)
def test_generation_matches_reference_at_each_tokens_own_length(family, attention):
    # With more layers a cached token keeps the hidden states it got at its own length, so the
    # reference gives query i the slopes for max(prompt length, i + 1).
    model = hf.extend_context(make(family), train_len=TRAIN_LEN, attention=attention)
    prompt = tokens(1, TRAIN_LEN - 4)
    out = _generate(model, prompt, new=2 * TRAIN_LEN)  # to 3.75 x train_len
    seq = out.sequences[0]
    p = prompt.shape[1]
    slopes = slopes_for(model, [max(p, i + 1) for i in range(len(seq))])
    ref = reference(model, seq, slopes)
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0].double(), ref[p + step - 1], rtol=0, atol=2e-6)


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_static_cache_generation_matches_dynamic(family):
    # Falcon is left out: transformers (4.46 to 5.25) cannot generate with a static cache for
    # Falcon+ALiBi. Some releases' MPT cannot either, or ignores the request: the test follows
    # what the unextended model does on this release.
    prompt = tokens(2, TRAIN_LEN - 4)
    _skip_unless_stock_runs(
        lambda: _generate(make(family), prompt, new=2, cache_implementation="static"),
        f"{family} generating with a static cache")
    model = hf.extend_context(make(family), train_len=TRAIN_LEN)
    # MPT's generate builds a 4-D mask for a static cache: its own attention runs, and says so.
    warns = pytest.warns(UserWarning, match="4-D one \\(generate builds one for a static cache\\)")
    with warns if family == "mpt" else contextlib.nullcontext():
        static = _generate(model, prompt, cache_implementation="static")
    dynamic = _generate(model, prompt)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(
        torch.stack(static.logits), torch.stack(dynamic.logits), rtol=0, atol=1e-6
    )


def test_multi_layer_generation_differs_from_recomputing():
    # Documents why the test above needs its own reference: past train_len a cached model is not
    # the full recomputation with the final slopes (their hidden states were built with others).
    model = hf.extend_context(make("falcon"), train_len=TRAIN_LEN)
    out = _generate(model, tokens(1, TRAIN_LEN - 4))
    assert (out.logits[-1] - logits(model, out.sequences[:, :-1])[:, -1]).abs().max() > 1e-5


def test_prompt_longer_than_train_len_in_one_call():
    model = hf.extend_context(make("mpt"), train_len=TRAIN_LEN)
    prompt = tokens(1, TRAIN_LEN + 6)
    out = _generate(model, prompt, new=3)
    seq, p = out.sequences[0], prompt.shape[1]
    ref = reference(model, seq, slopes_for(model, [max(p, i + 1) for i in range(len(seq))]))
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0].double(), ref[p + step - 1], rtol=0, atol=2e-6)


# --- Left padding ---------------------------------------------------------------------------------


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
    return ids, mask


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("family", MODELS)
def test_left_padded_batch_matches_single_sequences(family, attention):
    model = hf.extend_context(make(family), train_len=TRAIN_LEN, attention=attention)
    rows = [
        tokens(2 * TRAIN_LEN, seed=2),
        tokens(TRAIN_LEN + 5, seed=3),
        tokens(TRAIN_LEN - 3, seed=4),
    ]
    ids, mask = _left_padded(rows)
    batch = logits(model, ids, attention_mask=mask)
    for b, r in enumerate(rows):
        single = logits(model, r[None])[0]
        torch.testing.assert_close(batch[b, ids.shape[1] - len(r) :], single, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon", "falcon-grouped"])
def test_left_padded_generation_matches_single_sequences(family):
    model = hf.extend_context(make(family), train_len=TRAIN_LEN)
    rows = [tokens(TRAIN_LEN - 2, seed=5), tokens(TRAIN_LEN - 6, seed=6)]
    ids, mask = _left_padded(rows)
    batch = _generate(model, ids, mask, new=2 * TRAIN_LEN)
    for b, r in enumerate(rows):
        single = _generate(model, r[None], new=2 * TRAIN_LEN)
        torch.testing.assert_close(
            torch.stack(batch.logits)[:, b], torch.stack(single.logits)[:, 0], rtol=0, atol=1e-6
        )


def test_bloom_without_mask_beyond_train_len_equals_all_ones_mask():
    model = hf.extend_context(make("bloom"), train_len=TRAIN_LEN)
    ids = tokens(2, 2 * TRAIN_LEN)
    assert torch.equal(logits(model, ids), logits(model, ids, attention_mask=torch.ones_like(ids)))


# --- Which attention runs where -------------------------------------------------------------------


def _count_fast_calls(monkeypatch) -> list[dict]:
    """Records the keyword arguments of each call of linbias.alibi_attention by the extension."""
    calls = []
    op = hf_patch.alibi_attention

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return op(*args, **kwargs)

    monkeypatch.setattr(hf_patch, "alibi_attention", counted)
    return calls


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_linbias_attention_runs_only_past_train_len(family, monkeypatch):
    calls = _count_fast_calls(monkeypatch)
    model = hf.extend_context(make(family), train_len=TRAIN_LEN)
    logits(model, tokens(2, TRAIN_LEN))
    assert not calls
    logits(model, tokens(2, TRAIN_LEN + 1))
    assert len(calls) == model.config.num_hidden_layers
    hf.extend_context(model, train_len=TRAIN_LEN, attention="native")
    logits(model, tokens(2, 2 * TRAIN_LEN))
    assert len(calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_long_forward_builds_nothing_quadratic(family):
    # Left padding too: the key padding must not bring back a queries x keys mask.
    L = 32 * TRAIN_LEN
    ids = tokens(2, L)
    mask = torch.ones_like(ids)
    mask[1, : L // 3] = 0
    largest = {}
    for attention in ATTENTIONS:
        model = hf.extend_context(make(family), train_len=TRAIN_LEN, attention=attention)
        with torch.no_grad(), LargestTensor() as mode:
            model(ids, attention_mask=mask)
        largest[attention] = mode.largest
    assert largest["native"] >= L * L  # the check can fail: the family's own attention is O(L^2)
    assert largest["linbias"] <= 2 * L * max(VOCAB, 4 * model.config.hidden_size)


# --- The linbias attention against the stock model (the family's own attention) ----------------

STOCK_ATOL = 1e-4  # max |logit difference|, fp32, linbias attention vs attention="native"


def _stock_and_linbias(model, run) -> dict[str, torch.Tensor]:
    """``run(model)`` with the family's own attention and with linbias's, same weights."""
    out = {}
    for attention in ATTENTIONS:
        hf.extend_context(model, train_len=TRAIN_LEN, attention=attention)
        out[attention] = run(model)
    return out


def _max_real_difference(got: dict[str, torch.Tensor], mask: torch.Tensor) -> float:
    """Over real tokens: a query that sees no key (a left pad) gets zeros from linbias and the
    mean of every value from the family's attention; no one reads those logits."""
    return float((got["linbias"] - got["native"])[mask.bool()].abs().max())


@pytest.mark.parametrize("n", [2 * TRAIN_LEN, 3 * TRAIN_LEN - 1, 4 * TRAIN_LEN])
@pytest.mark.parametrize("family", [*MODELS, "falcon-6-heads"])
def test_linbias_attention_matches_stock_past_train_len(family, n, monkeypatch):
    # A left-padded batch, every row past train_len at its own length. For Falcon the stock
    # model rounds each slope x position to bfloat16, which the key_bias carries (with six heads
    # and 3L - 1 tokens neither slopes nor factor are powers of two, so the rounding shows: an
    # exact product differed by 1.4e-4).
    calls = _count_fast_calls(monkeypatch)
    rows = [tokens(n, seed=2), tokens(n - 5, seed=3), tokens(TRAIN_LEN + 1, seed=4)]
    ids, mask = _left_padded(rows)
    got = _stock_and_linbias(make(family), lambda m: logits(m, ids, attention_mask=mask))
    assert calls  # the fast path ran
    # Falcon passes its own per-key bias; BLOOM (no gap in these masks) and MPT the slopes.
    assert all((c["key_bias"] is not None) == family.startswith("falcon") for c in calls)
    assert _max_real_difference(got, mask) < STOCK_ATOL


@pytest.mark.parametrize(
    "family", ["bloom", "bloom-6-heads", "mpt", "falcon", "falcon-multi-query", "falcon-grouped"]
)
def test_linbias_generation_matches_stock(family):
    # Cached generation of a left-padded batch from below train_len to 3.9 x train_len.
    ids, mask = _left_padded([tokens(TRAIN_LEN - 2, seed=5), tokens(TRAIN_LEN - 6, seed=6)])
    got = _stock_and_linbias(make(family), lambda m: _generate(m, ids, mask, new=3 * TRAIN_LEN))
    assert torch.equal(got["linbias"].sequences, got["native"].sequences)
    diff = torch.stack(got["linbias"].logits) - torch.stack(got["native"].logits)
    assert diff.abs().max() < STOCK_ATOL


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon", "falcon-grouped"])
def test_mask_with_a_gap_takes_the_fast_path(family, monkeypatch):
    # BLOOM and Falcon count positions along the mask; across a pad between real tokens that is
    # not the distance in slots, so their own per-key bias goes to alibi_attention as key_bias.
    # MPT counts in slots, as linbias does.
    calls = _count_fast_calls(monkeypatch)
    ids = tokens(2, 3 * TRAIN_LEN)
    mask = torch.ones_like(ids)
    mask[0, TRAIN_LEN // 2 : 2 * TRAIN_LEN] = 0  # a long gap: slots would be far off
    mask[1, :5] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _stock_and_linbias(make(family), lambda m: logits(m, ids, attention_mask=mask))
    assert not _ours(caught)
    assert calls and all((c["key_bias"] is not None) == (family != "mpt") for c in calls)
    assert _max_real_difference(got, mask) < STOCK_ATOL


def test_bloom_slow_but_exact_takes_the_fast_path(monkeypatch):
    # BLOOM's slow_but_exact projects the attention output in pretraining_tp slices and, in
    # transformers 5.23, leaves out the projection's bias: nonzero here, so the check can fail.
    calls = _count_fast_calls(monkeypatch)
    model = make("bloom", pretraining_tp=2, slow_but_exact=True)
    with torch.no_grad():
        for block in model.transformer.h:
            block.self_attention.dense.bias.normal_()
    ids = tokens(1, 3 * TRAIN_LEN - 1)
    got = _stock_and_linbias(model, lambda m: logits(m, ids))
    assert calls
    assert (got["linbias"] - got["native"]).abs().max() < STOCK_ATOL
    model.config.slow_but_exact = False  # the modules keep what they were built with
    for block in model.transformer.h:
        block.self_attention.slow_but_exact = False
    assert (logits(model, ids) - got["native"]).abs().max() > 1e-2


# --- Fallbacks to the family's attention: each warns once --------------------------------------


def _ours(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "linbias attention" in str(w.message)]


def _with_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with attention dropout 0.1."""
    if isinstance(model, MptForCausalLM):
        # transformers 5.23 validates attn_pdrop as an int, though MPT applies it as a probability
        object.__setattr__(model.config.attn_config, "attn_pdrop", 0.1)
        for block in model.transformer.blocks:
            block.attn.attn_dropout_p = 0.1
    else:
        model.config.attention_dropout = 0.1
        for module in model.modules():
            if isinstance(getattr(module, "attention_dropout", None), torch.nn.Dropout):
                module.attention_dropout.p = 0.1
    return model


def _four_d_mask(ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[1]
    return torch.ones(n, n, dtype=torch.bool).tril().expand(len(ids), 1, n, n)


FALLBACKS = {  # reason: (families, model change, call arguments, training, what the message says)
    "output_attentions": (
        ("bloom", "mpt", "falcon"), lambda m: m, lambda ids: {"output_attentions": True}, False,
        r"linbias attention cannot return attention probabilities \(output_attentions=True\): "
        r"this call used {name}'s own attention, which builds H x L x L scores; pass "
        r"output_attentions=False for the fast path$",
    ),
    "dropout": (
        ("bloom", "mpt", "falcon"), _with_dropout, lambda ids: {}, True,
        r"linbias attention applies no attention dropout \(config\.(attn_config\.attn_pdrop|"
        r"attention_dropout)=0\.1\): this call used {name}'s own attention.*model\.eval\(\)",
    ),
    "4-D mask": (  # BLOOM and Falcon take none: see test_four_d_mask_is_refused
        ("mpt",), lambda m: m, lambda ids: {"attention_mask": _four_d_mask(ids)}, False,
        r"linbias attention takes only a 2-D attention mask \[batch, keys\].*got a 4-D one .*: "
        r"this call used {name}'s own attention.*pass the 2-D padding mask",
    ),
}
NAMES = {"bloom": "BLOOM", "mpt": "MPT", "falcon": "Falcon"}


@pytest.mark.parametrize(
    "family,reason", [(f, r) for r, spec in FALLBACKS.items() for f in spec[0]]
)
def test_each_fallback_warns_once(family, reason, monkeypatch):
    calls = _count_fast_calls(monkeypatch)
    _, change, arguments, training, message = FALLBACKS[reason]
    if reason == "4-D mask":  # MPT up to 4.57 cannot take a 4-D mask at all
        short = tokens(2, TRAIN_LEN)
        _skip_unless_stock_runs(lambda: logits(make(family), short, **arguments(short)),
                                f"{family} with a 4-D attention mask")
    model = hf.extend_context(change(make(family)), train_len=TRAIN_LEN)
    model.train(training)
    long, short = tokens(2, 2 * TRAIN_LEN), tokens(2, TRAIN_LEN)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(short, **arguments(short))  # within train_len: the family's code, nothing to say
        assert not _ours(caught)
        for _ in range(3):
            model(long, **arguments(long))
    assert not calls  # the family's attention ran
    (warned,) = _ours(caught)
    assert re.match(message.format(name=NAMES[family]), warned), warned


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_fallback_warnings_are_per_reason_and_only_for_linbias(family):
    model = hf.extend_context(_with_dropout(make(family)), train_len=TRAIN_LEN, attention="native")
    ids = tokens(1, 2 * TRAIN_LEN)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(ids, output_attentions=True)  # asked for the family's attention: no warning
        assert not _ours(caught)
        hf.extend_context(model, train_len=TRAIN_LEN)
        model(ids, output_attentions=True)
        model.train()
        model(ids)
        model(ids, output_attentions=True)
    assert len(_ours(caught)) == 2  # one per reason


@pytest.mark.parametrize("family", ["bloom", "falcon"])
@pytest.mark.parametrize("n", [TRAIN_LEN, 2 * TRAIN_LEN])
def test_four_d_mask_is_refused(family, n):
    # BLOOM and Falcon build their bias from the 2-D mask; unpatched they fail on a 4-D one with
    # "too many values to unpack".
    model = hf.extend_context(make(family), train_len=TRAIN_LEN)
    ids = tokens(1, n)
    with pytest.raises(ValueError, match=r"takes only a 2-D attention_mask.*\(1, 1, \d+, \d+\)"):
        model(ids, attention_mask=_four_d_mask(ids))


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon", "falcon-grouped"])
def test_fast_path_warns_nothing(family):
    model = hf.extend_context(make(family), train_len=TRAIN_LEN)
    ids, mask = _left_padded([tokens(2 * TRAIN_LEN, seed=2), tokens(TRAIN_LEN - 3, seed=3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits(model, ids, attention_mask=mask)
        logits(model, ids[:, -TRAIN_LEN:])
        _generate(model, ids[:, :TRAIN_LEN], mask[:, :TRAIN_LEN], new=TRAIN_LEN)
        model.train()  # training without attention dropout (the tiny models have none)
        model(ids, attention_mask=mask).logits.sum().backward()
    assert not _ours(caught)


def test_attention_probabilities_come_from_the_familys_attention():
    model = hf.extend_context(make("bloom"), train_len=TRAIN_LEN)
    with torch.no_grad(), pytest.warns(UserWarning, match="output_attentions=True"):
        out = model(tokens(1, 2 * TRAIN_LEN), output_attentions=True)
    assert all(a.shape == (1, 4, 2 * TRAIN_LEN, 2 * TRAIN_LEN) for a in out.attentions)


def test_extended_restores_the_previous_attention():
    model = hf.extend_context(make("mpt"), attention="native")
    ids = tokens(1, 3 * TRAIN_LEN - 1)
    native = logits(model, ids)
    with hf.extended(model) as same:
        fast = logits(same, ids)
    assert vars(model.transformer)[hf_patch.STATE].attention == "native"
    assert torch.equal(logits(model, ids), native)
    torch.testing.assert_close(fast, native, rtol=0, atol=STOCK_ATOL)


# --- undo, extended, re-configuring, one instance only --------------------------------------------


def _instance_state(model) -> tuple:
    modules = list(model.modules())
    return (
        [sorted(vars(m)) for m in modules],
        [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules],
    )


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_undo_restores_the_model(family):
    model = make(family)
    ids = tokens(2, TRAIN_LEN)
    before, state = logits(model, ids), _instance_state(model)
    hf.extend_context(model, train_len=TRAIN_LEN // 2)
    assert not torch.equal(logits(model, ids), before)
    assert hf.undo(model) is model
    assert torch.equal(logits(model, ids), before)
    assert _instance_state(model) == state
    hf.undo(model)  # undoing twice is harmless


def test_undo_brings_back_mpts_length_limit():
    model = hf.extend_context(make("mpt"))
    logits(model, tokens(1, TRAIN_LEN + 1))
    hf.undo(model)
    with pytest.raises(RuntimeError):
        logits(model, tokens(1, TRAIN_LEN + 1))


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
def test_extended_context_manager(family):
    model = make(family)
    ids = tokens(1, TRAIN_LEN)
    before = logits(model, ids)
    with hf.extended(model, train_len=TRAIN_LEN // 2) as same:
        assert same is model
        inside = logits(model, ids)
    assert torch.equal(logits(model, ids), before)
    torch.testing.assert_close(
        inside, logits(hf.extend_context(make(family), train_len=TRAIN_LEN // 2), ids)
    )


def test_extended_restores_the_previous_extension():
    model = hf.extend_context(make("bloom"), train_len=TRAIN_LEN // 2)
    ids = tokens(1, TRAIN_LEN)
    outer = logits(model, ids)
    with hf.extended(model, train_len=TRAIN_LEN // 4):
        assert not torch.equal(logits(model, ids), outer)
    assert torch.equal(logits(model, ids), outer)


def test_extending_twice_reconfigures():
    model = make("mpt")
    ids = tokens(1, 2 * TRAIN_LEN)
    hf.extend_context(model, train_len=TRAIN_LEN)
    hf.extend_context(model, train_len=TRAIN_LEN // 2, rule="sqrt")
    fresh = hf.extend_context(make("mpt"), train_len=TRAIN_LEN // 2, rule="sqrt")
    assert torch.equal(logits(model, ids), logits(fresh, ids))
    hf.undo(model)  # one undo takes back everything
    assert _instance_state(model) == _instance_state(make("mpt"))


def test_failed_reconfigure_keeps_the_extension():
    model = hf.extend_context(make("bloom"), train_len=TRAIN_LEN)
    ids = tokens(1, 2 * TRAIN_LEN)
    before = logits(model, ids)
    with pytest.raises(ValueError):
        hf.extend_context(model, train_len=TRAIN_LEN, rule="cubic")
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("family", ["mpt", "falcon"])
def test_only_the_given_instance_is_patched(family):
    patched, other = make(family), make(family)
    ids = tokens(1, TRAIN_LEN + 8)
    before = logits(other, ids) if family == "falcon" else None
    hf.extend_context(patched, train_len=TRAIN_LEN // 2)
    logits(patched, ids)
    if family == "mpt":
        with pytest.raises(RuntimeError):
            logits(other, ids)
    else:
        assert torch.equal(logits(other, ids), before)


def test_base_model_can_be_extended():
    model = make("falcon")
    hf.extend_context(model.transformer)  # train_len: config.max_position_embeddings
    ids = tokens(2 * TRAIN_LEN)
    assert_matches_reference(model, ids, [len(ids)] * len(ids))


# --- Errors ---------------------------------------------------------------------------------------


def test_unsupported_model_names_the_families():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*bloom.*mpt.*falcon"):
        hf.extend_context(model, train_len=TRAIN_LEN)


def test_falcon_without_alibi_is_refused():
    config = FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, alibi=False
    )
    with pytest.raises(ValueError, match="alibi"):
        hf.extend_context(FalconForCausalLM(config))


def test_bloom_needs_train_len():
    with pytest.raises(ValueError, match="train_len"):
        hf.extend_context(make("bloom"))


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="linear.*sqrt"):
        hf.extend_context(make("mpt"), rule="cubic")


@pytest.mark.parametrize("train_len", [0, -3, 2.5])
def test_bad_train_len(train_len):
    with pytest.raises(ValueError, match="train_len"):
        hf.extend_context(make("bloom"), train_len=train_len)


def test_unknown_attention_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'flash'.*linbias, native"):
        hf.extend_context(make("mpt"), attention="flash")


def test_changed_family_internals_are_refused(monkeypatch):
    # As if a transformers release built MPT's mask another way: the patch would compute
    # something else, so it refuses, naming the version and what changed, before changing anything.
    model = make("mpt")

    def forward(self, input_ids=None, **kwargs):
        return None

    monkeypatch.setattr(MptModel, "forward", forward)
    version = re.escape(transformers.__version__)
    with pytest.raises(RuntimeError, match=rf"transformers {version} changed MPT's code: .*"
                                           r"causal-mask builder.*pip install"):
        hf.extend_context(model)
    assert not hasattr(model.transformer, hf_patch.STATE)


def test_release_below_the_floor_is_refused(monkeypatch):
    model = make("mpt")
    monkeypatch.setattr(hf.extend.transformers, "__version__", "4.45.2")
    with pytest.raises(RuntimeError, match=r"4\.46 to 5\.25; this is 4\.45\.2.*pip install"):
        hf.extend_context(model)
    monkeypatch.undo()
    assert not hasattr(model.transformer, hf_patch.STATE)  # nothing was patched


def test_newer_release_is_accepted_with_a_warning_when_its_code_fits(monkeypatch):
    model = make("mpt")
    ids = tokens(2 * TRAIN_LEN)
    monkeypatch.setattr(hf.extend.transformers, "__version__", "5.99.0")
    with pytest.warns(UserWarning, match=r"5\.99\.0 is newer than the newest release .*5\.25"):
        hf.extend_context(model)
    assert_matches_reference(model, ids, [len(ids)] * len(ids))


def test_newer_release_whose_code_changed_is_refused(monkeypatch):
    model = make("bloom")
    monkeypatch.setattr(hf.extend.transformers, "__version__", "5.99.0")
    monkeypatch.setattr(model.transformer.__class__, "forward", lambda self, **kw: None)
    with pytest.raises(RuntimeError, match=r"5\.99\.0 changed BLOOM's code: .*build_alibi_tensor"):
        hf.extend_context(model, train_len=TRAIN_LEN)
    assert not hasattr(model.transformer, hf_patch.STATE)


def test_a_builder_called_after_a_forward_follows_no_stale_plan():
    model = hf.extend_context(make("bloom"), train_len=TRAIN_LEN)
    logits(model, tokens(2, 2 * TRAIN_LEN))  # past train_len: this call's plan took the fast path
    base = model.transformer
    mask = torch.ones(2, 2 * TRAIN_LEN, dtype=torch.long)
    alibi = base.build_alibi_tensor(mask, model.config.n_head, torch.float32)
    assert isinstance(alibi, torch.Tensor) and alibi.shape[-1] == 2 * TRAIN_LEN


# --- Rules that change more than the slopes (ntk, cap, window, selfextend, logn) ----------------

def design_attend(model, rule: str, lengths_T: list[int]):
    """The reference's attention under ``rule``: query ``i`` over keys ``0..i`` at its own length
    ``lengths_T[i]``, from DESIGN.md's formulas (``conftest.design_rule_attention``), with the
    family's slopes: the paper's (Falcon: rounded to bfloat16, over sqrt(head dim))."""
    from conftest import design_rule_attention
    from linbias.alibi import parse_rule

    n_heads = model.config.num_attention_heads
    d_head = model.config.hidden_size // n_heads
    slopes = alibi_slopes(n_heads).double()
    if isinstance(model, FalconForCausalLM):
        slopes = slopes.bfloat16().double() / math.sqrt(d_head)
    name, _, sinks = parse_rule(rule)

    def attend(q_HTD, k_HTD, v_HTD):
        rows = [design_rule_attention(q_HTD[None, :, i:i + 1], k_HTD[None, :, :i + 1],
                                      v_HTD[None, :, :i + 1], slopes, name, TRAIN_LEN,
                                      sinks=sinks, eval_len=lengths_T[i])
                for i in range(q_HTD.shape[1])]
        return torch.cat(rows, dim=2)[0].transpose(0, 1).reshape(q_HTD.shape[1], -1)

    return attend


@pytest.mark.parametrize(("family", "rule"), [  # every rule on two families, every family on three
    ("bloom-6-heads", "ntk"), ("bloom-6-heads", "window:1"), ("bloom-6-heads", "selfextend"),
    ("mpt", "cap"), ("mpt", "window"), ("mpt", "logn"),
    ("falcon", "ntk"), ("falcon", "selfextend"), ("falcon", "window:1"),
    ("falcon-grouped", "cap"), ("falcon-grouped", "logn"), ("falcon-grouped", "window")])
def test_rules_past_l_match_the_design_formulas(family, rule):
    model = hf.extend_context(make(family), train_len=TRAIN_LEN, rule=rule)
    if family.startswith("falcon"):  # Falcon's eager attention doubles its bias (see above)
        assert model.config._attn_implementation != "eager"
    n = 3 * TRAIN_LEN
    ids = tokens(n, seed=2)
    ref = reference(model, ids, slopes_for(model, [n] * n, "none"),
                    attend=design_attend(model, rule, [n] * n))
    # Falcon's slope rules (ntk, logn) keep its bias rounded to bfloat16, which the formulas do
    # not: a looser bound there.
    atol = 1e-4 if family.startswith("falcon") else 2e-5
    torch.testing.assert_close(logits(model, ids[None])[0].double(), ref, rtol=0, atol=atol)


@pytest.mark.parametrize(("family", "rule"), [
    ("bloom", "cap"), ("bloom", "window"), ("mpt", "selfextend"), ("mpt", "logn"),
    ("falcon-multi-query", "window"), ("falcon-multi-query", "selfextend")])
def test_rules_past_l_generate_at_each_tokens_own_length(family, rule):
    # A cached step attends at its own L' (the tokens so far); the reference gives query i the
    # terms for max(prompt length, i + 1).
    model = hf.extend_context(make(family), train_len=TRAIN_LEN, rule=rule)
    prompt = tokens(1, TRAIN_LEN - 4)
    out = _generate(model, prompt, new=2 * TRAIN_LEN)
    seq, p = out.sequences[0], prompt.shape[1]
    lengths = [max(p, i + 1) for i in range(len(seq))]
    ref = reference(model, seq, slopes_for(model, lengths, "none"),
                    attend=design_attend(model, rule, lengths))
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0].double(), ref[p + step - 1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("rule", ["window", "selfextend"])
@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon-grouped"])
def test_rules_past_l_left_padded_batch_matches_single_sequences(family, rule):
    # Each row's own L', and the window's sinks are its own first real tokens.
    model = hf.extend_context(make(family), train_len=TRAIN_LEN, rule=rule)
    rows = [tokens(3 * TRAIN_LEN, seed=2), tokens(2 * TRAIN_LEN + 5, seed=3),
            tokens(TRAIN_LEN - 3, seed=4)]
    ids, mask = _left_padded(rows)
    batch = logits(model, ids, attention_mask=mask)
    for b, r in enumerate(rows):
        single = logits(model, r[None])[0]
        torch.testing.assert_close(batch[b, ids.shape[1] - len(r):], single, rtol=0, atol=1e-5)


def test_rules_past_l_refuse_what_only_the_familys_attention_runs():
    with pytest.raises(ValueError, match="only linbias attention runs: use attention='linbias'"):
        hf.extend_context(make("mpt"), train_len=TRAIN_LEN, rule="cap", attention="native")
    model = hf.extend_context(make("bloom"), train_len=TRAIN_LEN, rule="window")
    ids = tokens(1, 2 * TRAIN_LEN)
    with pytest.raises(ValueError, match="runs only in linbias attention.*output_attentions"):
        logits(model, ids, output_attentions=True)
    gap = torch.ones_like(ids)
    gap[0, 5] = 0
    with pytest.raises(ValueError, match="pad between real tokens.*pad on the left only"):
        logits(model, ids, attention_mask=gap)
    within = tokens(1, TRAIN_LEN)  # at or below L the rule changes nothing: the family runs
    torch.testing.assert_close(logits(model, within, output_attentions=True),
                               logits(hf.undo(model), within))
