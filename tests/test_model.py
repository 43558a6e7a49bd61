"""Tests for linbias.model: extrapolation, KV cache, padding, generation, parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import linbias.attention as attention
from linbias.attention import KeyNorms
from linbias.alibi import SCALING_RULES, alibi_bias
from linbias.config import ModelConfig
from linbias.model import GPT, KVCache
from linbias.positions import POSITION_METHODS

L, V = 16, 64  # train_len, vocab
METHODS = sorted(POSITION_METHODS)
UNBOUNDED = [m for m in METHODS if m != "learned"]


def tiny(position: str, **kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layers=2, n_heads=4, d_model=32, train_len=L)
    return ModelConfig(position=position, **{**base, **kw})


def make_model(position: str, seed: int = 0, **kw) -> GPT:
    """A model with weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    model = GPT(tiny(position, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- train short, test long ---------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_past_train_len_or_refuses(name: str, factor: int) -> None:
    model = make_model(name)
    idx = tokens(2, factor * L)
    if name == "learned":
        assert torch.isfinite(model(idx[:, :L])).all()  # exactly train_len is fine
        with pytest.raises(ValueError, match=rf"{L} rows.*cannot extrapolate"):
            model(idx)
        return
    for rule in model.position.rules:
        model.set_rule(rule)
        logits = model(idx)
        assert logits.shape == (2, factor * L, V) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", METHODS)
def test_backward_gives_finite_gradients(name: str) -> None:
    model = make_model(name).train()
    idx = tokens(2, L + 1)
    logits = model(idx[:, :-1])
    F.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- KV cache -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_kv_cache_decoding_equals_full_forward(name: str) -> None:
    model = make_model(name)
    N = L if name == "learned" else 3 * L  # past the training length where possible
    idx = tokens(2, N)
    full = model(idx)
    cache = model.new_cache()
    chunks, start = [], 0
    for size in [5, 1, 3] + [1] * (N - 9):  # a prefill, then chunked and single-token steps
        chunks.append(model(idx[:, start : start + size], cache=cache))
        start += size
        assert len(cache) == start
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_alibi_decoding_leaves_far_keys_unread_and_equals_the_full_forward(monkeypatch, padded):
    # The cache keeps each layer's key norms per block; with them a decoding step leaves out
    # the blocks that cannot count (here blocks of 8 keys, from a cache of 16 elements on).
    monkeypatch.setattr(attention, "_KEY_BLOCK", 8)
    monkeypatch.setattr(attention, "_DECODE_SKIP_ELEMENTS", 16)
    monkeypatch.setattr(attention, "_DECODE_SKIP_SHARE", 1.0)
    model, N = make_model("alibi", n_heads=8, d_model=64), 12 * L
    idx = tokens(2, N)
    mask = torch.ones(2, N, dtype=torch.bool)
    if padded:
        mask[1, :37] = False
    full = model(idx, key_padding_mask=mask if padded else None)
    cache, kept = model.new_cache(), []
    start = N - 24  # a prefill, then single steps
    chunks = [model(idx[:, :start], cache=cache,
                    key_padding_mask=mask[:, :start] if padded else None)]
    real = attention._decode_blocks
    monkeypatch.setattr(attention, "_decode_blocks", lambda *a: kept.append(real(*a)) or kept[-1])
    for t in range(start, N):
        chunks.append(model(idx[:, t : t + 1], cache=cache,
                            key_padding_mask=mask[:, : t + 1] if padded else None))
    torch.testing.assert_close(torch.cat(chunks, dim=1)[mask], full[mask], atol=1e-4, rtol=1e-4)
    assert kept and not kept[-1][0].all()  # the steepest head left far blocks out


def test_kv_cache_norms_follow_keys_set_from_outside() -> None:
    # A cache whose keys are replaced (trimmed, edited, restored) must not keep stale norms:
    # a norm too small would let a decoding step leave out keys that count.
    cache = KVCache(1)
    k, v = torch.randn(1, 2, 100, 4), torch.randn(1, 2, 100, 4)
    cache.update(0, k, v)
    cache.update(0, k[:, :, :1], v[:, :, :1])  # appended: extended from the last block
    torch.testing.assert_close(cache.norms[0].block_max, KeyNorms.of(cache.k[0]).block_max)
    cache.k[0] = k * 50.0  # set from outside
    cache.update(0, k[:, :, :1], v[:, :, :1])
    want = KeyNorms.of(torch.cat((k * 50.0, k[:, :, :1]), dim=-2))
    assert cache.norms[0].n_keys == 101
    torch.testing.assert_close(cache.norms[0].block_max, want.block_max)


@pytest.mark.parametrize("rule", [r for r in SCALING_RULES if r != "none"])
def test_kv_cache_alibi_interpolation_uses_the_length_so_far(rule: str) -> None:
    # With a rule the attention depends on L' = keys so far, so only the last position of a
    # full forward sees the terms of incremental decoding at that step. Exact for one layer only:
    # deeper cached keys come from hidden states computed under the earlier terms.
    model = make_model("alibi", n_layers=1)
    model.set_rule(rule)
    idx = tokens(2, 3 * L)
    cache = model.new_cache()
    model(idx[:, :20], cache=cache)
    for t in range(20, 3 * L):
        step = model(idx[:, t : t + 1], cache=cache)[:, -1]
        torch.testing.assert_close(step, model(idx[:, : t + 1])[:, -1], atol=1e-4, rtol=1e-4)


def test_default_positions_continue_from_the_cache() -> None:
    model = make_model("sinusoidal")
    idx = tokens(1, 10)
    c1, c2 = model.new_cache(), KVCache(model.config.n_layers)
    model(idx[:, :6], cache=c1)
    model(idx[:, :6], pos=torch.arange(6), cache=c2)
    torch.testing.assert_close(
        model(idx[:, 6:], cache=c1), model(idx[:, 6:], pos=torch.arange(6, 10), cache=c2)
    )
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[1, 11\]"):
        model(idx[:, :1], cache=c1, key_padding_mask=torch.ones(1, 1, dtype=torch.bool))


# --- ALiBi ----------------------------------------------------------------------------------------


def alibi_layer_reference(attn, x: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """One attention layer with a materialised ALiBi bias, in float64."""
    B, T, C = x.shape
    H = attn.n_heads
    x = x.double()
    def double(t):
        return None if t is None else t.double()

    qkv = F.linear(x, attn.qkv.weight.double(), double(attn.qkv.bias))
    q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // H) + alibi_bias(slopes.double(), T, T)
    y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    return F.linear(y, attn.proj.weight.double(), double(attn.proj.bias))


@pytest.mark.parametrize("T, rule", [(12, "none"), (3 * L, "none"), (3 * L, "linear")])
def test_alibi_attention_layer_matches_float64_reference(T: int, rule: str) -> None:
    model = make_model("alibi", bias=True)  # biases on, so the reference checks them too
    model.set_rule(rule)
    attn = model.blocks[0].attn
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(3))
    slopes = model.position.slopes * (min(1.0, L / T) if rule == "linear" else 1.0)
    out = attn(x, torch.arange(T), None, None)
    ref = alibi_layer_reference(attn, x, slopes)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rule", list(SCALING_RULES))
def test_alibi_rules_match_the_design_formulas_in_float64(rule: str) -> None:
    # One layer with every rule, two rows of different real lengths (past L and at L), against
    # DESIGN.md's formulas spelled out in the test (per-head ranks, temperature, distances).
    from conftest import design_rule_attention

    model = make_model("alibi", n_heads=6, d_model=48)  # 6 heads: slopes out of rank order
    model.set_rule(rule)
    attn, T, C = model.blocks[0].attn, 3 * L, 48
    x = torch.randn(2, T, C, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, : T - L] = False
    out = attn(x, torch.arange(T), None, mask, model.position.prepare(T, T, x.device, mask))
    B, H = 2, 6
    qkv = F.linear(x.double(), attn.qkv.weight.double())
    q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=-1))
    y = design_rule_attention(q, k, v, model.position.slopes, rule, L, key_padding_mask=mask)
    ref = F.linear(y.transpose(1, 2).reshape(B, T, C), attn.proj.weight.double())
    torch.testing.assert_close(out.double()[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double()[1, T - L:], ref[1, T - L:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", [r for r in SCALING_RULES if r != "none"])
def test_alibi_scaling_changes_outputs_only_past_train_len(rule: str) -> None:
    model = make_model("alibi")
    short, long = tokens(2, L), tokens(2, 2 * L)
    base_short, base_long = model(short), model(long)
    model.set_rule(rule)
    assert torch.equal(model(short), base_short)
    assert (model(long) - base_long).abs().max() > 1e-3


# --- T5: one bias per forward, shared by the layers ---------------------------------------------


def t5_bucket_scalar(distance: int, num_buckets: int, max_distance: int) -> int:
    """T5's causal bucket of one query-key distance >= 0, in Python floats (Raffel et al. 2020)."""
    exact = num_buckets // 2
    if distance < exact:
        return distance
    log_ratio = math.log(distance / exact) / math.log(max_distance / exact)
    return min(num_buckets - 1, exact + int(log_ratio * (num_buckets - exact)))


def t5_gpt_reference(model: GPT, idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The T5 model's logits in float64, with the bias gathered from ``table`` in every layer."""
    cfg, (B, T) = model.config, idx.shape
    H, C = cfg.n_heads, cfg.d_model
    w = {name: t.detach().double() for name, t in model.state_dict().items()}
    def layer_norm(x, name):
        return F.layer_norm(x, (C,), w[f"{name}.weight"], w.get(f"{name}.bias"))
    def linear(x, name):
        return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    x = w["tok_emb.weight"][idx]
    for layer in range(cfg.n_layers):
        buckets = torch.tensor([
            [t5_bucket_scalar(max(i - j, 0), cfg.t5_buckets, cfg.t5_max_distance) for j in range(T)]
            for i in range(T)
        ])
        bias = table[buckets].permute(2, 0, 1)  # [H, T, T], this layer's own gather
        p = f"blocks.{layer}."
        q, k, v = linear(layer_norm(x, p + "ln_1"), p + "attn.qkv").split(C, dim=-1)
        q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(C // H) + bias).masked_fill(future, -math.inf)
        y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + linear(y, p + "attn.proj")
        x = x + linear(F.gelu(linear(layer_norm(x, p + "ln_2"), p + "mlp.fc")), p + "mlp.proj")
    return linear(layer_norm(x, "ln_f"), "lm_head")


def test_t5_shared_bias_equals_a_bias_per_layer_in_logits_and_gradients() -> None:
    model = make_model("t5", n_layers=3, bias=True)
    idx = tokens(2, 150)  # past one 128-query block of the attention
    method, built = model.position, []
    bias = method.bias
    method.bias = lambda *args: built.append(args) or bias(*args)  # type: ignore[method-assign]
    logits = model(idx)
    assert built == [(150, 150)]  # once per forward, not once per layer
    table = method.relative_bias.weight.detach().double().requires_grad_()
    ref = t5_gpt_reference(model, idx, table)
    torch.testing.assert_close(logits.double(), ref, atol=1e-4, rtol=1e-4)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    (logits * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(
        method.relative_bias.weight.grad.double(), table.grad, atol=1e-4, rtol=1e-4
    )


# --- parameters and state dict --------------------------------------------------------------------


def test_one_shared_position_module_and_clean_state_dict() -> None:
    model = make_model("t5")
    assert all(block.attn.position is model.position for block in model.blocks)
    keys = list(model.state_dict())
    assert [k for k in keys if "position" in k] == ["position.relative_bias.weight"]
    assert {k.split(".")[0] for k in keys} == {"tok_emb", "position", "blocks", "ln_f", "lm_head"}
    # The shared bias is one tensor that every layer reads: changing it changes all layers.
    idx = tokens(1, 8)
    model(idx).sum().backward()
    assert model.position.relative_bias.weight.grad.abs().sum() > 0
    fresh = GPT(model.config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(idx), model(idx))


def test_alibi_slopes_not_in_state_dict() -> None:
    model = make_model("alibi")
    assert not any("slopes" in k for k in model.state_dict())
    assert "position.slopes" in dict(model.named_buffers())


def test_init_and_weight_tying() -> None:
    torch.manual_seed(0)
    config = tiny("alibi", d_model=64, n_layers=4)
    model = GPT(config)
    assert model.lm_head.weight is model.tok_emb.weight
    resid_std = 0.02 / math.sqrt(2 * config.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.15), name
        elif name.endswith(("qkv.weight", "fc.weight", "tok_emb.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.15), name
    with_bias = GPT(tiny("alibi", d_model=64, n_layers=4, bias=True))
    biases = [n for n, p in with_bias.named_parameters() if n.endswith("bias") and "ln" not in n]
    assert len(biases) == 4 * 4  # qkv, attention proj, fc, mlp proj in each of 4 blocks
    assert all(not dict(with_bias.named_parameters())[n].any() for n in biases)
    untied = GPT(tiny("alibi", d_model=64, n_layers=4, tie_weights=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - model.num_params() == V * 64
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


@pytest.mark.parametrize("name", ["sinusoidal", "learned", "alibi"])
def test_fairseq_embedding_convention(name: str) -> None:
    """fairseq's transformer LM: tokens at std C^-0.5 times sqrt(C), a learned table at C^-0.5,
    sinusoids unscaled; every other weight as in the gpt2 convention."""
    C = 64
    torch.manual_seed(0)
    gpt2 = GPT(tiny(name, d_model=C, n_layers=4))
    torch.manual_seed(0)
    model = GPT(tiny(name, d_model=C, n_layers=4, embedding="fairseq")).eval()
    assert model.lm_head.weight is model.tok_emb.weight
    big = ("tok_emb.weight", "position.table.weight")
    for (n, p), (n2, p2) in zip(model.named_parameters(), gpt2.named_parameters()):
        assert n == n2
        if n in big:
            assert p.std().item() == pytest.approx(C**-0.5, rel=0.15), n
        else:
            assert p.shape == p2.shape and p.std().item() == pytest.approx(p2.std().item(), rel=0.3), n
    idx = tokens(2, 10)
    x = model.tok_emb(idx) * math.sqrt(C)
    if name == "sinusoidal":  # unscaled PE, independently of positions.py
        pos = torch.arange(10, dtype=torch.float64)[:, None]
        inv = 10000 ** (-torch.arange(0, C, 2, dtype=torch.float64) / C)
        x = x + torch.stack(((pos * inv).sin(), (pos * inv).cos()), -1).flatten(-2).float()
    elif name == "learned":
        x = x + model.position.table.weight[:10]
    for block in model.blocks:
        x = block(x, torch.arange(10), None, None, model.position.prepare(10, 10, x.device))
    torch.testing.assert_close(model(idx), model.lm_head(model.ln_f(x)), atol=1e-5, rtol=1e-5)


# --- padding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_left_padding_matches_unpadded(name: str) -> None:
    model = make_model(name)
    n, pads = 10, (3, 0)  # row 1 is right-padded by 3 instead
    real = tokens(2, n)
    idx = torch.zeros(2, max(pads) + n, dtype=torch.long)
    mask = torch.zeros(idx.shape, dtype=torch.bool)
    pos = torch.zeros(idx.shape, dtype=torch.long)  # [B, T]: real tokens keep positions 0..n-1
    for b, p in enumerate(pads):  # row b: p pads on the left
        idx[b, p : p + n], mask[b, p : p + n], pos[b, p : p + n] = real[b], True, torch.arange(n)
    padded = model(idx, pos=pos, key_padding_mask=mask)
    assert torch.isfinite(padded).all()
    one_row = model(idx[:1], pos=pos[0], key_padding_mask=mask[:1])  # pos as [T]
    torch.testing.assert_close(one_row[0], padded[0], atol=1e-5, rtol=1e-5)
    for b, p in enumerate(pads):
        unpadded = model(real[b : b + 1])[0]
        torch.testing.assert_close(padded[b, p : p + n], unpadded, atol=1e-4, rtol=1e-4)


# --- generation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNBOUNDED)
def test_greedy_generation_is_deterministic_and_matches_no_cache(name: str) -> None:
    model = make_model(name)
    prompt, new = tokens(2, 4), 2 * L  # grows well past train_len
    out = model.generate(prompt, new, temperature=0)
    assert out.shape == (2, 4 + new) and torch.equal(out[:, :4], prompt)
    assert torch.equal(model.generate(prompt, new, temperature=0), out)
    naive = prompt
    with torch.no_grad():
        for _ in range(new):
            naive = torch.cat((naive, model(naive)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, naive)


def test_sampling_reproducible_and_top1_is_greedy() -> None:
    model = make_model("alibi")
    prompt = tokens(2, 3)
    def sample(seed: int) -> torch.Tensor:
        return model.generate(prompt, 20, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    greedy = model.generate(prompt, 20, temperature=0)
    assert torch.equal(model.generate(prompt, 20, temperature=0.7, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_learned_generation_stops_at_its_table() -> None:
    model = make_model("learned")
    with pytest.raises(ValueError, match="cannot extrapolate"):
        model.generate(tokens(1, 4), L, temperature=0)


@pytest.mark.parametrize("rule", [r for r in SCALING_RULES if r != "none"] + ["window:1"])
def test_alibi_interpolation_counts_real_tokens_not_padding(rule: str) -> None:
    # Past train_len with a scaling rule, a left-padded row must get the terms of its own length
    # (its slopes, temperature, distance count, and its first real tokens as sinks).
    model = make_model("alibi")
    model.set_rule(rule)
    n, pad = 2 * L + 3, 5
    real = tokens(1, n)
    idx = torch.cat([torch.zeros(1, pad, dtype=torch.long), real], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool)], dim=1)
    batch = torch.cat([idx, torch.cat([real, real[:, :pad]], dim=1)])  # row 1: no padding, longer
    batch_mask = torch.cat([mask, torch.ones_like(mask)])
    with torch.no_grad():
        padded = model(batch, key_padding_mask=batch_mask)
        alone = model(real)[0]
        longer = model(batch[1:])[0]
    torch.testing.assert_close(padded[0, pad:], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded[1], longer, atol=1e-4, rtol=1e-4)


def test_scaled_sets_a_rule_for_a_block_and_restores_it_after_an_error() -> None:
    model = make_model("alibi")
    model.set_rule("log")
    with pytest.raises(RuntimeError, match="inside"):
        with model.scaled("linear"):
            assert model.position.rule == "linear"
            raise RuntimeError("inside")
    assert model.position.rule == "log"
    with pytest.raises(ValueError, match="valid rules"), model.scaled("cubic"):
        pass
    assert model.position.rule == "log"
