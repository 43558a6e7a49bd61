"""Tests for linbias.positions against independent float64 references."""

from __future__ import annotations

import math
import re

import pytest
import torch

from linbias.alibi import SCALING_RULES, alibi_bias, alibi_slopes
from linbias.config import ModelConfig
from conftest import reference_attention
from linbias.positions import (
    POSITION_METHODS,
    AlibiPositions,
    LearnedPositions,
    PositionMethod,
    make_position,
    position_warnings,
    t5_bucket,
    t5_untrained_buckets,
)

B, H, D = 2, 4, 8


def cfg(position: str, **kw) -> ModelConfig:
    base = dict(vocab_size=64, n_layers=2, n_heads=H, d_model=H * D, train_len=16)
    return ModelConfig(position=position, **{**base, **kw})


def qkv(T: int, S: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g) for n in (T, S, S))


# --- the registry and the interface ---------------------------------------------------------------


def test_registry_names_classes_and_limits() -> None:
    assert set(POSITION_METHODS) == {"none", "sinusoidal", "learned", "rotary", "t5", "alibi"}
    for name, cls in POSITION_METHODS.items():
        method = make_position(cfg(name))
        assert type(method) is cls and cls.name == name and isinstance(method, PositionMethod)
        assert method.rule == "none"
        assert method.max_len == (16 if name == "learned" else None)


@pytest.mark.parametrize("name", sorted(POSITION_METHODS))
def test_set_rule_validates_per_method(name: str) -> None:
    method = make_position(cfg(name))
    valid = {"alibi": tuple(SCALING_RULES), "rotary": ("none", "linear", "ntk", "yarn")}.get(
        name, ("none",))
    for rule in valid:
        method.set_rule(rule)
        assert method.rule == rule
    # A real rule elsewhere, or none at all.
    bad = {"alibi": "yarn", "rotary": "cap"}.get(name, "linear")
    with pytest.raises(ValueError, match=f"valid rules: {', '.join(valid)}$"):
        method.set_rule(bad)
    assert method.rule == valid[-1]  # unchanged by the failed call


@pytest.mark.parametrize("name", ["none", "rotary", "t5", "alibi"])
def test_embed_is_identity_without_absolute_positions(name: str) -> None:
    x = torch.randn(B, 5, H * D)
    assert torch.equal(make_position(cfg(name)).embed(x, torch.arange(100, 105)), x)


@pytest.mark.parametrize("name", ["none", "sinusoidal", "learned", "t5", "alibi"])
def test_rotate_is_identity_except_rotary(name: str) -> None:
    q, k, _ = qkv(5, 5)
    pos = torch.arange(5)
    q2, k2 = make_position(cfg(name)).rotate(q, k, pos, pos)
    assert q2 is q and k2 is k


# --- default causal attention ---------------------------------------------------------------------


@pytest.mark.parametrize("T, S", [(7, 7), (3, 10), (1, 10)])
def test_causal_attention_matches_reference(T: int, S: int) -> None:
    q, k, v = qkv(T, S)
    out = make_position(cfg("none")).attend(q, k, v)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


# --- sinusoidal and learned -----------------------------------------------------------------------


def test_sinusoidal_matches_vaswani_formula() -> None:
    C = H * D
    pos = torch.tensor([0, 1, 7, 500, 10_000])  # far past train_len: no table, no limit
    out = make_position(cfg("sinusoidal")).embed(torch.zeros(1, len(pos), C), pos)
    ref = torch.zeros(len(pos), C, dtype=torch.float64)
    for t, p in enumerate(pos.tolist()):
        for i in range(0, C, 2):
            ref[t, i] = math.sin(p / 10000 ** (i / C))
            ref[t, i + 1] = math.cos(p / 10000 ** (i / C))
    # scaled by the token-embedding init std, keeping Vaswani et al.'s PE-to-token ratio
    torch.testing.assert_close(out[0].double(), ref * 0.02, atol=2e-5, rtol=0)
    # fairseq's convention: unit-scale tokens, so PE is added as it is
    out = make_position(cfg("sinusoidal", embedding="fairseq")).embed(torch.zeros(1, len(pos), C), pos)
    torch.testing.assert_close(out[0].double(), ref, atol=1e-3, rtol=0)  # float32 angles near 10^4


def test_learned_adds_table_rows_and_refuses_to_extrapolate() -> None:
    method = make_position(cfg("learned"))
    assert isinstance(method, LearnedPositions)
    x = torch.randn(1, 3, H * D)
    pos = torch.tensor([0, 5, 15])
    torch.testing.assert_close(method.embed(x, pos), x + method.table.weight[pos])
    with pytest.raises(ValueError, match=r"16 rows.*cannot extrapolate"):
        method.embed(x, torch.tensor([14, 15, 16]))


# --- rotary ---------------------------------------------------------------------------------------


def complex_rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """RoFormer as complex multiplication: pair (x[2i], x[2i+1]) times exp(i * pos * theta_i)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    angles = pos.double()[:, None] * theta
    rot = torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(z * rot).flatten(-2)


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rotary_matches_complex_reference(base: float) -> None:
    method = make_position(cfg("rotary", rotary_base=base))
    q, k, _ = qkv(4, 9)
    q_pos, k_pos = torch.arange(5, 9), torch.arange(9)
    q_rot, k_rot = method.rotate(q, k, q_pos, k_pos)
    torch.testing.assert_close(q_rot.double(), complex_rope(q, q_pos, base), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_rot.double(), complex_rope(k, k_pos, base), atol=1e-5, rtol=1e-5)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    method = make_position(cfg("rotary"))
    q, k, _ = qkv(1, 1)
    def score(i: int, j: int) -> torch.Tensor:
        qr, kr = method.rotate(q, k, torch.tensor([i]), torch.tensor([j]))
        return (qr * kr).sum(-1)
    torch.testing.assert_close(score(10, 3), score(107, 100), atol=1e-4, rtol=1e-4)


def test_rotary_linear_scaling_is_position_interpolation() -> None:
    L = 16
    method = make_position(cfg("rotary", train_len=L))
    q, k, _ = qkv(64, 64)
    pos = torch.arange(64)  # L' = 64 = 4L
    expected = method.rotate(q, k, pos * (L / 64), pos * (L / 64))
    method.set_rule("linear")
    for got, want in zip(method.rotate(q, k, pos, pos), expected):
        torch.testing.assert_close(got, want)
    short = torch.arange(L)  # within the training length: unchanged
    method_none = make_position(cfg("rotary", train_len=L))
    for got, want in zip(
        method.rotate(q[..., :L, :], k[..., :L, :], short, short),
        method_none.rotate(q[..., :L, :], k[..., :L, :], short, short),
    ):
        assert torch.equal(got, want)


def rope_with_freqs(x: torch.Tensor, pos: torch.Tensor, theta: list[float]) -> torch.Tensor:
    """Complex RoPE with frequencies given one by one, in float64."""
    d = x.shape[-1]
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    angles = pos.double()[:, None] * torch.tensor(theta, dtype=torch.float64)
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


@pytest.mark.parametrize("rule", ["ntk", "yarn"])
def test_rotary_ntk_and_yarn_follow_their_papers(rule: str) -> None:
    L, Lp, base = 16, 64, 10000.0
    method = make_position(cfg("rotary", train_len=L))
    method.set_rule(rule)
    q, k, _ = qkv(Lp, Lp)
    pos = torch.arange(Lp)
    s, half = Lp / L, [2 * i / D for i in range(D // 2)]
    if rule == "ntk":  # NTK-aware: the base times s^(D / (D - 2))
        theta, factor = [(base * s ** (D / (D - 2))) ** -e for e in half], 1.0
    else:  # YaRN (Peng et al. 2023, eq. 17-21): ramp of L / wavelength between 1 and 32
        theta = []
        for e in half:
            t = base ** -e
            r = L / (2 * math.pi / t)
            g = 0.0 if r < 1 else 1.0 if r > 32 else (r - 1) / 31
            theta.append((1 - g) * t / s + g * t)
        factor = 0.1 * math.log(s) + 1  # sqrt(1/t) on q and on k
    got_q, got_k = method.rotate(q, k, pos, pos)
    torch.testing.assert_close(got_q.double(), rope_with_freqs(q, pos, theta) * factor,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_k.double(), rope_with_freqs(k, pos, theta) * factor,
                               atol=1e-4, rtol=1e-4)
    short = torch.arange(L)  # within the training length: unchanged
    plain = make_position(cfg("rotary", train_len=L))
    for got, want in zip(method.rotate(q[..., :L, :], k[..., :L, :], short, short),
                         plain.rotate(q[..., :L, :], k[..., :L, :], short, short)):
        assert torch.equal(got, want)


def test_position_scale_multiplies_positions_at_every_length_before_the_rule() -> None:
    L = 16
    fixed = make_position(cfg("rotary", train_len=L, position_scale=0.25))
    plain = make_position(cfg("rotary", train_len=L))
    q, k, _ = qkv(64, 64)
    pos = torch.arange(64)
    for got, want in zip(fixed.rotate(q, k, pos, pos), plain.rotate(q, k, pos / 4, pos / 4)):
        torch.testing.assert_close(got, want)
    fixed.set_rule("linear")  # L' = 64 = 4L: a further L / L'
    for got, want in zip(fixed.rotate(q, k, pos, pos), plain.rotate(q, k, pos / 16, pos / 16)):
        torch.testing.assert_close(got, want)
    alibi = make_position(cfg("alibi", train_len=L, n_heads=4, position_scale=0.25))
    assert alibi.slopes.tolist() == [2.0 ** -2 / 4, 2.0 ** -4 / 4, 2.0 ** -6 / 4, 2.0 ** -8 / 4]


# --- T5 -------------------------------------------------------------------------------------------


def t5_reference_bucket(relative_position, num_buckets=32, max_distance=128):
    """T5's `_relative_position_bucket(bidirectional=False)`; relative_position = key - query."""
    n = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = n < max_exact
    if_large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return torch.where(is_small, n, if_large)


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64), (8, 20)])
def test_t5_bucket_matches_reference(num_buckets: int, max_distance: int) -> None:
    query_minus_key = torch.arange(-20, 1000)
    got = t5_bucket(query_minus_key, num_buckets, max_distance)
    assert torch.equal(got, t5_reference_bucket(-query_minus_key, num_buckets, max_distance))
    exact = num_buckets // 2  # distances below it get their own bucket; future keys bucket 0
    assert torch.equal(got[20 : 20 + exact], torch.arange(exact)) and not got[:20].any()
    assert got.max() == num_buckets - 1


def test_t5_bucket_matches_transformers() -> None:
    modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    query_minus_key = torch.arange(-5, 600)
    ref = modeling_t5.T5Attention._relative_position_bucket(
        -query_minus_key, bidirectional=False, num_buckets=32, max_distance=128
    )
    assert torch.equal(t5_bucket(query_minus_key, 32, 128), ref)


def test_t5_attend_adds_bucketed_bias() -> None:
    method = make_position(cfg("t5"))
    torch.nn.init.normal_(method.relative_bias.weight)
    T, S = 5, 40
    q, k, v = qkv(T, S)
    i, j = torch.arange(S - T, S)[:, None], torch.arange(S)[None, :]
    bias = method.relative_bias.weight[t5_reference_bucket(j - i)].permute(2, 0, 1)  # [H, T, S]
    out = method.attend(q, k, v)
    ref = reference_attention(q, k, v, bias=bias.detach())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def t5_untrained_brute_force(train_len: int, num_buckets: int, max_distance: int) -> list[int]:
    """Every distance one at a time, far past both lengths: buckets only distances >= L reach."""
    def bucket(d: int) -> int:
        return int(t5_reference_bucket(torch.tensor([-d]), num_buckets, max_distance))
    trained = {bucket(d) for d in range(train_len)}
    reached = {bucket(d) for d in range(train_len, 4 * max(train_len, max_distance))}
    return sorted(reached - trained)


@pytest.mark.parametrize(
    "train_len, num_buckets, max_distance",
    [(64, 32, 128), (512, 32, 128), (100, 32, 128), (113, 32, 128), (114, 32, 128),
     (16, 32, 128), (5, 32, 128), (64, 32, 20), (40, 16, 300), (30, 8, 9)],
)
def test_t5_untrained_buckets_matches_brute_force(
    train_len: int, num_buckets: int, max_distance: int
) -> None:
    got = t5_untrained_buckets(train_len, num_buckets, max_distance)
    assert got == t5_untrained_brute_force(train_len, num_buckets, max_distance)


def test_t5_untrained_buckets_quick_preset_and_paper() -> None:
    # The quick preset trains at L=64: distance 63 is in bucket 26, distances from 67 on fill
    # buckets 27..31, which training never reaches.
    assert t5_untrained_buckets(64, 32, 128) == [27, 28, 29, 30, 31]
    assert t5_untrained_buckets(512, 32, 128) == []  # the paper's L: every bucket is trained


def test_position_warnings_name_the_buckets_and_fixes_that_work() -> None:
    (message,) = position_warnings(cfg("t5", train_len=64, t5_max_distance=128))
    assert "[27, 28, 29, 30, 31]" in message and "train_len=64" in message
    assert "longer than 67 tokens" in message  # distance 67 is the first in bucket 27
    max_distance = int(re.search(r"t5_max_distance <= (\d+)", message).group(1))
    train_len = int(re.search(r"train_len >= (\d+)", message).group(1))
    # Each fix is the loosest one: one step further and the warning is back.
    assert position_warnings(cfg("t5", train_len=64, t5_max_distance=max_distance)) == []
    assert position_warnings(cfg("t5", train_len=64, t5_max_distance=max_distance + 1))
    assert position_warnings(cfg("t5", train_len=train_len, t5_max_distance=128)) == []
    assert position_warnings(cfg("t5", train_len=train_len - 1, t5_max_distance=128))
    assert position_warnings(cfg("t5", train_len=512)) == []
    for name in POSITION_METHODS:  # no other method has such a gap
        if name != "t5":
            assert position_warnings(cfg(name, train_len=64)) == []


# --- ALiBi ----------------------------------------------------------------------------------------


def test_alibi_slopes_buffer_is_not_persistent() -> None:
    method = make_position(cfg("alibi", alibi_max_bias=4.0))
    assert isinstance(method, AlibiPositions)
    assert torch.equal(method.slopes, alibi_slopes(H, 4.0))
    assert "slopes" in dict(method.named_buffers())
    assert method.state_dict() == {}


@pytest.mark.parametrize("T, S", [(12, 12), (3, 40)])
def test_alibi_attend_matches_materialised_bias(T: int, S: int) -> None:
    method = make_position(cfg("alibi"))
    q, k, v = qkv(T, S)
    slopes = alibi_slopes(H).double()
    ref = reference_attention(q, k, v, bias=alibi_bias(slopes, T, S))
    torch.testing.assert_close(method.attend(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)
    method.set_rule("linear")  # interpolation: slopes * L / L' only past train_len (16)
    factor = min(1.0, 16 / S)
    ref = reference_attention(q, k, v, bias=alibi_bias(slopes * factor, T, S))
    torch.testing.assert_close(method.attend(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)
