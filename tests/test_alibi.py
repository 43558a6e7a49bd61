import math

import pytest
import torch

from linbias import SCALING_RULES, alibi_bias, alibi_slopes, interpolate_slopes
from linbias.alibi import scaling_factor


def official_get_slopes(n):
    # The ALiBi repository's rule, transcribed from the paper's appendix.
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + official_get_slopes(2 * closest)[0::2][: n - closest]


def test_paper_values():
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    assert torch.allclose(alibi_slopes(16), torch.tensor([2 ** (-0.5 * i) for i in range(1, 17)]))
    assert alibi_slopes(1).tolist() == [2.0**-8]
    assert alibi_slopes(8).dtype == torch.float32


@pytest.mark.parametrize("n", range(1, 65))
def test_matches_official_rule(n):
    expected = torch.tensor(official_get_slopes(n), dtype=torch.float32)
    assert torch.allclose(alibi_slopes(n), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [1, 3, 5, 6, 8, 12, 16, 24, 32, 40, 64])
def test_matches_bloom(n):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    mask = torch.ones(1, 3)
    alibi = bloom.build_alibi_tensor(mask, n, torch.float32)  # [n, 1, 3] = slope * position
    assert torch.allclose(alibi[:, 0, 1], alibi_slopes(n), rtol=1e-6, atol=0)


def test_max_bias_generalises_start():
    assert torch.allclose(alibi_slopes(4, max_bias=4.0), torch.tensor([2.0**-1, 2.0**-2, 2.0**-3, 2.0**-4]))
    mpt_like = alibi_slopes(6, max_bias=16.0)
    assert torch.allclose(mpt_like, torch.tensor(official_get_slopes(6)) ** 2, rtol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_head_count(bad):
    with pytest.raises(ValueError, match="n_heads"):
        alibi_slopes(bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_max_bias(bad):
    with pytest.raises(ValueError, match="max_bias"):
        alibi_slopes(4, max_bias=bad)


def test_causal_bias_values():
    bias = alibi_bias(torch.tensor([0.5, 0.25]), 3, 3)
    assert bias.shape == (2, 3, 3)
    assert bias[0, 2].tolist() == [-1.0, -0.5, 0.0]
    assert bias[1, 1, 0].item() == -0.25
    assert torch.isinf(bias[0, 0, 1]) and bias[0, 0, 1] < 0


def test_bias_with_fewer_queries_sits_at_the_end():
    bias = alibi_bias(torch.tensor([1.0]), 2, 5)
    # query 0 is absolute position 3
    assert bias[0, 0].tolist() == [-3.0, -2.0, -1.0, 0.0, float("-inf")]
    assert bias[0, 1].tolist() == [-4.0, -3.0, -2.0, -1.0, 0.0]


def test_bidirectional_bias_is_symmetric_distance():
    bias = alibi_bias(torch.tensor([0.5]), 4, 4, causal=False)
    i = torch.arange(4)
    assert torch.equal(bias[0], -0.5 * (i.view(-1, 1) - i.view(1, -1)).abs().float())


def test_causal_bias_is_per_key_plus_row_constant():
    # The identity the fast path rests on: each finite row is m * j plus a constant.
    m = alibi_slopes(4)
    bias = alibi_bias(m, 6, 6)
    j = torch.arange(6).float()
    for i in range(6):
        row = bias[:, i, : i + 1] - m.view(-1, 1) * j[: i + 1]
        assert torch.allclose(row, row[:, :1].expand_as(row))


def test_bias_errors():
    with pytest.raises(ValueError, match="q_len <= k_len"):
        alibi_bias(alibi_slopes(2), 5, 3)
    with pytest.raises(ValueError, match="shape"):
        alibi_bias(torch.ones(2, 2), 1, 1)


def test_linear_interpolation():
    m = alibi_slopes(8)
    assert interpolate_slopes(m, 1024, 1024) is m
    assert interpolate_slopes(m, 1024, 512) is m  # shorter inputs never change
    assert torch.allclose(interpolate_slopes(m, 1024, 4096), m / 4)
    assert torch.equal(interpolate_slopes(m, 1024, 4096, rule="none"), m)


def test_other_rules_only_scale_past_train_len():
    m = alibi_slopes(4)
    assert torch.allclose(interpolate_slopes(m, 100, 400, rule="sqrt"), m / 2)
    assert torch.allclose(interpolate_slopes(m, 16, 256, rule="log"), m / 2)
    for rule in SCALING_RULES:
        assert torch.equal(interpolate_slopes(m, 100, 100, rule=rule), m)
        assert torch.equal(interpolate_slopes(m, 100, 7, rule=rule), m)
        scaled = interpolate_slopes(m, 100, 1000, rule=rule)
        assert torch.all(scaled <= m) and torch.all(scaled > 0)


def test_unknown_rule_lists_valid():
    with pytest.raises(ValueError, match="linear"):
        interpolate_slopes(alibi_slopes(2), 10, 20, rule="ntk-alibi")


@pytest.mark.parametrize(
    "lengths", [(0, 10), (10, 0), (10.0, 20), (10, -5), (True, 10), ("10", 20)]
)
def test_bad_lengths(lengths):
    with pytest.raises(ValueError, match="positive integer"):
        interpolate_slopes(alibi_slopes(2), *lengths)


@pytest.mark.parametrize(
    "slopes,error,match",
    [
        ([0.5, 0.25], TypeError, r"slopes must be a torch\.Tensor, got list"),
        (alibi_slopes(2).numpy(), TypeError, r"slopes must be a torch\.Tensor, got ndarray"),
        (torch.tensor([1, 2]), TypeError, r"floating-point.*slopes\.float\(\)"),
        (torch.tensor([0.5, math.nan]), ValueError, "finite"),
        (torch.tensor([math.inf, 0.5]), ValueError, "finite"),
        (torch.zeros(0), ValueError, r"shape \[n_heads\]"),
    ],
)
def test_bad_slopes_are_refused_by_every_function(slopes, error, match):
    # Before: AttributeErrors, an int64 overflow error, nan/inf biases, or (interpolate_slopes
    # with factor 1) the bad value handed back.
    with pytest.raises(error, match=match):
        alibi_bias(slopes, 2, 3)
    for eval_len in (10, 40):  # factor 1 returns the slopes themselves, factor 1/4 scales them
        with pytest.raises(error, match=match):
            interpolate_slopes(slopes, 10, eval_len)


@pytest.mark.parametrize(
    "q_len,k_len,match",
    [(0, 3, "q_len"), (2.5, 5, "q_len"), (True, 3, "q_len"), (2, 3.0, "k_len"), (1, -1, "k_len"),
     ("2", 3, "q_len")],
)
def test_bias_lengths_must_be_positive_integers(q_len, k_len, match):
    # Before: a float q_len built a bias of the wrong shape; True counted as 1.
    with pytest.raises(ValueError, match=match):
        alibi_bias(alibi_slopes(2), q_len, k_len)


@pytest.mark.parametrize("causal", ["False", None, 0])
def test_bias_causal_must_be_a_bool(causal):
    # Before: "False" was truthy and gave the causal bias; None gave the bidirectional one.
    with pytest.raises(TypeError, match="causal must be True or False"):
        alibi_bias(alibi_slopes(2), 2, 3, causal=causal)


def test_bias_of_learnable_slopes_is_differentiable():
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: alibi_bias(m, 3, 4, causal=False), (slopes,))


@pytest.mark.parametrize("rule", [["linear"], None, 1])
def test_scaling_factor_rule_must_be_a_name(rule):
    # Before: a list raised "unhashable type"; the message now lists the valid rules.
    with pytest.raises(ValueError, match="valid rules: none, linear"):
        scaling_factor(10, 20, rule)


def test_bool_max_bias_is_refused():
    # Before: True counted as max_bias 1.
    with pytest.raises(ValueError, match="max_bias"):
        alibi_slopes(4, max_bias=True)


def test_row_lengths_count_real_tokens_and_never_zero() -> None:
    from linbias.alibi import row_lengths

    mask = torch.tensor([[True, True, True], [False, True, True], [False, False, False]])
    assert row_lengths(mask).tolist() == [3, 2, 1]  # a fully padded row keeps a valid length


def test_ntk_keeps_the_steepest_head_and_divides_the_flattest_by_a():
    from linbias.alibi import slope_factors

    m = alibi_slopes(8)
    a = 4096 / 1024
    assert slope_factors(m, 1024, 4096, "ntk") == pytest.approx(
        [a ** (-h / 7) for h in range(8)])  # keezen/ntk_alibi: m_h * a^(-h / (H - 1))
    m12 = alibi_slopes(12)  # not a power of two: heads ranked by slope, not by index
    f = dict(zip(m12.tolist(), slope_factors(m12, 10, 40, "ntk")))
    ranked = sorted(f, reverse=True)
    assert [f[s] for s in ranked] == pytest.approx([4 ** (-r / 11) for r in range(12)])
    assert slope_factors(alibi_slopes(1), 10, 40, "ntk") == [1.0]  # H = 1: unchanged
    with pytest.raises(ValueError, match="each head by its own factor"):
        scaling_factor(10, 40, "ntk")


def test_distance_rules_follow_design():
    from linbias.alibi import Distances, rule_distances, temperatures

    assert rule_distances(100, [50, 100], "cap") is None  # nothing past L: plain distances
    assert rule_distances(100, [400], "cap") == Distances(100, (0.0,))
    assert rule_distances(100, [400, 90], "window") == Distances(100, (0.0, 1.0), 100, 4)
    assert rule_distances(100, [400], "window:9").sinks == 9
    se = rule_distances(100, [400], "selfextend")
    assert se.bend == 50 and se.ratio == pytest.approx(((100 - 50) / (400 - 50),))
    farthest = se.f(torch.tensor([[399.0]], dtype=torch.float64))
    assert 99 < float(farthest) < 100  # the farthest key lands near L
    assert temperatures(100, [1000, 10], "logn") == pytest.approx([1.5, 1.0])
    assert temperatures(100, [1000], "cap") is None


@pytest.mark.parametrize("rule,match", [
    ("window:x", "sinks must be a non-negative integer"), ("window:-1", "non-negative"),
    ("cap:3", "takes no parameter"), ("ntk-alibi", "valid rules: none, linear"),
])
def test_bad_rule_spellings_name_the_fix(rule, match):
    with pytest.raises(ValueError, match=match):
        interpolate_slopes(alibi_slopes(2), 10, 20, rule=rule)
