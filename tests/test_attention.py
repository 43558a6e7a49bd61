
import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import LargestTensor, naive_alibi_attention, reference_attention
from linbias import BACKENDS, alibi_attention, alibi_slopes
from linbias.attention import KeyNorms, causal_attention
import linbias.attention as attention

CPU_BACKENDS = ["reference", "sdpa", "blocked"]


def _inputs(B, H, Hkv, Lq, Lk, D, dtype=torch.float32, grad=False):
    q = torch.randn(B, H, Lq, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype, requires_grad=grad)
    return q, k, v


def _left_padding(B, Lk):
    mask = torch.ones(B, Lk, dtype=torch.bool)
    for b in range(B):
        mask[b, : (b * Lk) // (2 * B)] = False
    return mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "B,H,Hkv,Lq,Lk", [(2, 8, 8, 33, 33), (1, 8, 2, 5, 40), (2, 6, 1, 1, 17), (1, 12, 4, 70, 70)]
)
@pytest.mark.parametrize("padded", [False, True])
def test_matches_float64_reference(backend, causal, B, H, Hkv, Lq, Lk, padded):
    q, k, v = _inputs(B, H, Hkv, Lq, Lk, 16)
    kpm = _left_padding(B, Lk) if padded else None
    slopes = alibi_slopes(H)
    out = alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm, backend=backend)
    ref = naive_alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert (out.double() - ref).abs().max() < 2e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_many_blocks_match_reference(monkeypatch, causal, padded):
    # A tiny fold budget forces many query blocks and segments on a short sequence.
    monkeypatch.setattr(attention, "_BIAS_BUDGET", 4.0)
    q, k, v = _inputs(2, 4, 2, 150, 170, 8, dtype=torch.float64)
    kpm = _left_padding(2, 170) if padded else None
    c = attention._Call(q, k, v, alibi_slopes(4).double(), causal, 1.0, kpm)
    k4, v4 = attention._expand_kv(k, 4), attention._expand_kv(v, 4)
    assert len({s.q0 for s in attention._bias_forward(c, q, k4, v4)[2]}) > 2
    out = alibi_attention(q, k, v, alibi_slopes(4), causal=causal, key_padding_mask=kpm, backend="sdpa")
    ref = naive_alibi_attention(q, k, v, alibi_slopes(4), causal=causal, key_padding_mask=kpm)
    assert (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize("backend", ["sdpa", "blocked"])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck(monkeypatch, backend, causal):
    monkeypatch.setattr(attention, "_BIAS_BUDGET", 1.0)  # several blocks, so merges are checked
    monkeypatch.setattr(attention, "_DECODE_MAX_QUERIES", 0)  # sdpa: segments, not the decode path
    q, k, v = _inputs(1, 4, 2, 6, 9, 3, dtype=torch.float64, grad=True)
    kpm = torch.tensor([[False, False, True, True, True, True, True, True, True]])
    slopes = alibi_slopes(4).double()

    def f(q, k, v):
        return alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_match_reference(backend):
    q, k, v = _inputs(2, 8, 4, 48, 64, 16, grad=True)
    kpm = _left_padding(2, 64)
    slopes = alibi_slopes(8)
    out = alibi_attention(q, k, v, slopes, key_padding_mask=kpm, backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_alibi_attention(qd, kd, vd, slopes, key_padding_mask=kpm)
    want = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() < 1e-4


# Layouts a caller can hand in: each keeps x's shape; most keep its values too.
LAYOUTS = {
    "contiguous": lambda x: x,
    "bthd": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),  # the model's q, k, v
    "d_major": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),  # stride(-1) = L
    "reversed": lambda x: x.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0),
    "every_other_row": lambda x: x.repeat_interleave(2, dim=2)[:, :, ::2],
    "every_other_d": lambda x: x.repeat_interleave(2, dim=3)[..., ::2],  # stride(-1) = 2
    "offset": lambda x: F.pad(x, (5, 0, 3, 0))[:, :, 3:, 5:],  # storage offset, row stride D + 5
    "expanded_heads": lambda x: x[:, :1].expand_as(x),  # stride 0, values shared by heads
    "expanded_rows": lambda x: x[:, :, :1].expand_as(x),
    "expanded_d": lambda x: x[..., :1].expand_as(x),  # stride(-1) = 0
}
MASK_LAYOUTS = {
    "contiguous": lambda m: m,
    "transposed": lambda m: m.T.contiguous().T,
    "every_other_key": lambda m: m.repeat_interleave(2, dim=1)[:, ::2],
    "expanded_batch": lambda m: m[-1:].expand_as(m),
}


def _laid_out(x, layout, grad=False):
    """``x`` rearranged in memory by ``LAYOUTS[layout]``, as a leaf that may require grad."""
    y = LAYOUTS[layout](x.detach())
    assert y.shape == x.shape
    return y.requires_grad_(grad)


def _attend_and_grad(q, k, v, grad_out, **kwargs):
    out = alibi_attention(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def _contiguous_twin(*ts):
    return [t.detach().contiguous().requires_grad_(t.requires_grad) for t in ts]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_contiguous_inputs(backend, layout):
    # Before the fix, sdpa misread any input with stride(-1) != 1 (errors of 2 to 1e37).
    q, k, v = (_laid_out(t, layout, grad=True) for t in _inputs(2, 4, 2, 40, 72, 16))
    grad_out = _laid_out(torch.randn(2, 4, 40, 16), layout)
    kpm = MASK_LAYOUTS["transposed"](_left_padding(2, 72))
    slopes = alibi_slopes(4)
    got = _attend_and_grad(q, k, v, grad_out, slopes=slopes, key_padding_mask=kpm, backend=backend)
    qc, kc, vc = _contiguous_twin(q, k, v)
    want = _attend_and_grad(
        qc, kc, vc, grad_out.contiguous(), slopes=slopes, key_padding_mask=kpm.contiguous(),
        backend=backend,
    )
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5
    ref = naive_alibi_attention(q, k, v, slopes, key_padding_mask=kpm)
    assert (got[0].double() - ref).abs().max() < 2e-5


def test_sdpa_copies_only_inputs_the_kernel_cannot_read():
    # The model's [B, T, H, D]-view layout reaches the kernel without a copy, in both passes;
    # an input with stride(-1) != 1 is copied once.
    B, T, H, D = 1, 40, 4, 8
    x = torch.randn(B, T, 3 * H * D, requires_grad=True)
    q, k, v = (y.view(B, T, H, D).transpose(1, 2) for y in x.split(H * D, dim=2))
    slopes = alibi_slopes(H)
    with _Copies() as mode:
        out = alibi_attention(q, k, v, slopes, backend="sdpa")
        out.transpose(1, 2).reshape(B, T, H * D).backward(torch.ones(B, T, H * D))
    assert set(mode.copied) <= {(B, H, T)}  # at most the kernel's small log-sum-exp
    q_d_major = LAYOUTS["d_major"](q.detach())
    with _Copies() as mode:
        alibi_attention(q_d_major, k.detach(), v.detach(), slopes, backend="sdpa")
    assert mode.copied == [(B, H, T, D)]


@settings(max_examples=20, deadline=None)
@given(
    layouts=st.tuples(*[st.sampled_from(list(LAYOUTS))] * 4),  # q, k, v, grad_out
    mask_layout=st.sampled_from([None, *MASK_LAYOUTS]),
    group=st.sampled_from([1, 2]),
    lq=st.one_of(st.integers(1, 12), st.integers(65, 72)),  # over 64: two sdpa blocks
    extra=st.integers(0, 12),
    d=st.sampled_from([1, 4, 8]),
    causal=st.booleans(),
    backend=st.sampled_from(CPU_BACKENDS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_layouts_match_contiguous_and_reference(
    layouts, mask_layout, group, lq, extra, d, causal, backend, dtype
):
    H, Lk = 4, lq + extra
    inputs = _inputs(2, H, H // group, lq, Lk, d, dtype)
    q, k, v = (_laid_out(t, lay, grad=True) for t, lay in zip(inputs, layouts))
    grad_out = _laid_out(torch.randn(2, H, lq, d, dtype=dtype), layouts[3])
    kpm = None if mask_layout is None else MASK_LAYOUTS[mask_layout](_left_padding(2, Lk))
    slopes = alibi_slopes(H)
    kw = dict(slopes=slopes, causal=causal, backend=backend)
    with mock.patch.object(attention, "_BIAS_BUDGET", 4.0):  # the smallest blocks, 64 queries
        got = _attend_and_grad(q, k, v, grad_out, key_padding_mask=kpm, **kw)
        qc, kc, vc = _contiguous_twin(q, k, v)
        kpm_c = None if kpm is None else kpm.contiguous()
        want = _attend_and_grad(qc, kc, vc, grad_out.contiguous(), key_padding_mask=kpm_c, **kw)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_alibi_attention(qd, kd, vd, slopes, causal=causal, key_padding_mask=kpm)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad_out.double())
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for g, w, r in zip(got, want, (ref, *ref_grads)):
        assert (g - w).abs().max() <= tol
        assert (g.double() - r).abs().max() <= tol


def test_fully_padded_rows_are_zero_and_finite():
    q, k, v = _inputs(1, 2, 2, 6, 6, 4, grad=True)
    kpm = torch.tensor([[False, False, False, True, True, True]])
    for backend in CPU_BACKENDS:
        out = alibi_attention(q, k, v, alibi_slopes(2), key_padding_mask=kpm, backend=backend)
        assert torch.all(out[:, :, :3] == 0) and torch.isfinite(out).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


def test_fp32_accuracy_at_8192_with_steepest_slopes():
    # Max abs error against float64 at L = 8192 with slopes 1/2 and 1/4 (the hardest case for the
    # folded per-key bias, whose values grow with length).
    L = 8192
    q, k, v = _inputs(1, 2, 2, L, L, 64)
    slopes = torch.tensor([0.5, 0.25])
    out = alibi_attention(q, k, v, slopes, backend="sdpa")
    ref = alibi_attention(q.double(), k.double(), v.double(), slopes.double(), backend="blocked")
    assert (out.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_half_precision_inputs(dtype, tol, backend):
    q, k, v = _inputs(1, 4, 4, 64, 64, 32, dtype=dtype)
    out = alibi_attention(q, k, v, alibi_slopes(4), backend=backend)
    ref = naive_alibi_attention(q, k, v, alibi_slopes(4))
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() < tol


@settings(max_examples=40, deadline=None)
@given(
    n_heads=st.integers(1, 64),
    group=st.sampled_from([1, 2, 4]),
    lq=st.integers(1, 24),
    extra=st.integers(0, 24),
    d=st.sampled_from([1, 4, 8]),
    causal=st.booleans(),
    backend=st.sampled_from(["sdpa", "blocked"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    padded=st.booleans(),
)
def test_property_random_shapes(n_heads, group, lq, extra, d, causal, backend, dtype, padded):
    H = n_heads * group if n_heads * group <= 64 else n_heads
    Hkv = H // group if H % group == 0 else H
    q, k, v = _inputs(2, H, Hkv, lq, lq + extra, d, dtype=dtype)
    kpm = _left_padding(2, lq + extra) if padded else None
    slopes = alibi_slopes(H)
    out = alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm, backend=backend)
    ref = naive_alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm)
    assert (out.double() - ref).abs().max() < (1e-5 if dtype == torch.float32 else 1e-10)


def test_custom_scale():
    q, k, v = _inputs(1, 4, 4, 10, 10, 8)
    out = alibi_attention(q, k, v, alibi_slopes(4), scale=0.3)
    ref = naive_alibi_attention(q, k, v, alibi_slopes(4), scale=0.3)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -0.5, -4.0, 1e-30])
@pytest.mark.parametrize("Lq", [2, 70])  # the decode path and the segments
def test_zero_and_negative_scales_match_reference(backend, scale, Lq):
    # Before: the fused kernel's causal mask (-inf written before scaling) gave nan in most rows.
    q, k, v = _inputs(2, 4, 2, Lq, 90, 8, grad=True)
    kpm = _left_padding(2, 90)
    out = alibi_attention(q, k, v, alibi_slopes(4), scale=scale, key_padding_mask=kpm, backend=backend)
    ref = naive_alibi_attention(q, k, v, alibi_slopes(4), scale=scale, key_padding_mask=kpm)
    assert (out.double() - ref).abs().max() < 2e-5
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("slope", [2049.0, 1e6])
@pytest.mark.parametrize("Lq", [1, 70])
def test_slopes_above_2048_match_reference(backend, slope, Lq):
    # Before: the fused path's block size raised "negative shift count".
    q, k, v = _inputs(1, 2, 2, Lq, 80, 8)
    slopes = torch.tensor([slope, 0.5])
    out = alibi_attention(q, k, v, slopes, backend=backend)
    assert (out.double() - naive_alibi_attention(q, k, v, slopes)).abs().max() < 2e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("Lq", [3, 40])
def test_a_nonfinite_key_reaches_only_the_rows_that_see_it(backend, bad, Lq):
    # Before: on "blocked", key j's nan also reached rows before j in its query block.
    q, k, v = _inputs(1, 2, 2, Lq, 40, 8)
    j = 40 - Lq // 2 - 1  # a key in the middle of the queries
    k[0, 1, j, 3] = bad
    out = alibi_attention(q, k, v, alibi_slopes(2), backend=backend)
    rows_before = 40 - Lq + torch.arange(Lq) < j
    assert torch.isfinite(out[0, 0]).all()
    assert torch.isfinite(out[0, 1, rows_before]).all()
    ref = naive_alibi_attention(q, k, v, alibi_slopes(2))
    assert (out[0, 1, rows_before].double() - ref[0, 1, rows_before]).abs().max() < 2e-5
    if math.isnan(bad):  # (an inf key scores +inf or -inf, by the sign of q's entry)
        assert out[0, 1, ~rows_before].isnan().all()


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lq", [1, 3, 40, 300])
def test_what_a_padded_slot_holds_reaches_no_row(backend, causal, Lq):
    # Before: a nan in a padded key or value (an uninitialised cache slot) turned every row that
    # shares its batch row into nan on sdpa (the kernel adds the mask to q . k), and a nan value
    # did so on every backend (0 x nan).
    q, k, v = _inputs(2, 4, 2, Lq, 300, 8, grad=True)
    real = torch.ones(2, 300, dtype=torch.bool)
    real[0, :5], real[1, 150] = False, False  # left padding; a gap
    clean_k, clean_v = (x.detach().masked_fill(~real[:, None, :, None], 0.0) for x in (k, v))
    dirty_k, dirty_v = clean_k.clone(), clean_v.clone()
    dirty_k[0, 0, 2], dirty_v[0, 1, 3] = math.nan, math.inf
    dirty_k[1, 1, 150], dirty_v[1, 0, 150] = -math.inf, math.nan
    slopes = alibi_slopes(4)
    out = alibi_attention(q, dirty_k, dirty_v, slopes, causal=causal, key_padding_mask=real,
                          backend=backend)
    assert torch.isfinite(out).all()
    ref = naive_alibi_attention(q, clean_k, clean_v, slopes, causal=causal, key_padding_mask=real)
    assert (out.double() - ref).abs().max() < 2e-5
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


# Every backend against the float64 reference on random valid arguments, the extremes included: a
# scale of 0, below 0 or huge, slopes of 0, below 0, tiny or huge, per row or per head.
_SCALES = st.one_of(
    st.none(), st.sampled_from([0.0, -1.0, 1e-30, 40.0]), st.floats(-3.0, 3.0)
)
_SLOPES = st.one_of(
    st.sampled_from([0.0, 1e-6, 0.5, 16.0, 2049.0, 1e6]), st.floats(-1.0, 64.0)
)


@settings(max_examples=60, deadline=None)
@given(
    H=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2]),
    lq=st.one_of(st.integers(1, 6), st.integers(60, 80)),
    extra=st.integers(0, 30),
    d=st.sampled_from([1, 4, 8]),
    causal=st.booleans(),
    padded=st.booleans(),
    per_row=st.booleans(),
    scale=_SCALES,
    slopes=st.lists(_SLOPES, min_size=8, max_size=8),
    backend=st.sampled_from(CPU_BACKENDS),
)
def test_property_extreme_arguments_match_reference(
    H, group, lq, extra, d, causal, padded, per_row, scale, slopes, backend
):
    Hkv, Lk = max(1, H // group), lq + extra
    q, k, v = _inputs(2, H, Hkv, lq, Lk, d)
    m = torch.tensor(slopes)[: 2 * H].view(2, H) if per_row else torch.tensor(slopes)[:H]
    kpm = _left_padding(2, Lk) if padded else None
    out = alibi_attention(
        q, k, v, m, causal=causal, scale=scale, key_padding_mask=kpm, backend=backend
    )
    ref = naive_alibi_attention(q, k, v, m, causal=causal, scale=scale, key_padding_mask=kpm)
    # fp32 keeps 2^-24 of each logit: |scale q . k| plus the folded bias (at most 512 near the
    # diagonal, see _BIAS_BUDGET) bound what a logit can lose.
    s = 1.0 / math.sqrt(d) if scale is None else abs(scale)
    logit = s * q.norm(dim=-1).max() * k.norm(dim=-1).max() + 512.0
    assert (out.double() - ref).abs().max() <= 4 * 2.0**-24 * logit * v.abs().max() + 1e-6


def test_flex_matches_reference():
    # Strided views (one compile: each new layout would cost flex a recompile of several seconds).
    q, k, v = _inputs(2, 4, 2, 96, 128, 16)
    q, k, v = LAYOUTS["d_major"](q), LAYOUTS["expanded_heads"](k), LAYOUTS["every_other_row"](v)
    kpm = MASK_LAYOUTS["transposed"](_left_padding(2, 128))
    out = alibi_attention(q, k, v, alibi_slopes(4), key_padding_mask=kpm, backend="flex")
    ref = naive_alibi_attention(q, k, v, alibi_slopes(4), key_padding_mask=kpm)
    assert (out.double() - ref).abs().max() < 1e-5


def test_flex_compiles_for_new_lengths_with_padding():
    # The second length makes the compiled lengths symbolic, the third is a new key length: with
    # the offset or padding mask captured as ints or a bool mask, CPU inductor failed to compile it.
    for Lq, Lk in [(200, 300), (100, 300), (250, 450)]:
        q, k, v = _inputs(2, 4, 2, Lq, Lk, 16)
        kpm = _left_padding(2, Lk)
        with torch.no_grad():
            out = alibi_attention(q, k, v, alibi_slopes(4), key_padding_mask=kpm, backend="flex")
        ref = naive_alibi_attention(q, k, v, alibi_slopes(4), key_padding_mask=kpm)
        assert (out.double() - ref).abs().max() < 1e-5


# --- per-row slopes [B, H]: each row of the batch its own (e.g. interpolated for its length) ------


def _row_slopes(B, H):
    return alibi_slopes(H) * torch.tensor([1.0, 0.5, 0.125, 0.03])[:B].view(-1, 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lq", [1, 3, 70])  # decode-shaped and segmented calls
@pytest.mark.parametrize("padded", [False, True])
def test_per_row_slopes_match_reference(backend, causal, Lq, padded):
    q, k, v = _inputs(3, 8, 2, Lq, 70, 16)
    kpm = _left_padding(3, 70) if padded else None
    slopes = _row_slopes(3, 8)
    out = alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm, backend=backend)
    ref = naive_alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm)
    assert (out.double() - ref).abs().max() < 2e-5
    # each row really used its own slopes: the shared first row's would differ
    shared = alibi_attention(q, k, v, slopes[0], causal=causal, key_padding_mask=kpm, backend=backend)
    assert (out[1:] - shared[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_key_bias", [False, True])  # every segment carries its keys' part
def test_per_row_slopes_many_blocks(monkeypatch, causal, with_key_bias):
    monkeypatch.setattr(attention, "_BIAS_BUDGET", 4.0)
    q, k, v = _inputs(2, 4, 2, 150, 170, 8, dtype=torch.float64)
    kpm = _left_padding(2, 170)
    slopes = _row_slopes(2, 4).double()
    key_bias = _key_bias(2, 4, 170, dtype=torch.float64) if with_key_bias else None
    out = alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm, key_bias=key_bias,
                          backend="sdpa")
    if with_key_bias:
        ref = naive_alibi_attention(q, k, v, slopes, key_bias=key_bias, causal=causal,
                                    key_padding_mask=kpm)
    else:
        ref = naive_alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm)
    assert (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize("backend", ["sdpa", "blocked"])
def test_per_row_slopes_gradcheck(monkeypatch, backend):
    monkeypatch.setattr(attention, "_BIAS_BUDGET", 1.0)
    monkeypatch.setattr(attention, "_DECODE_MAX_QUERIES", 0)
    q, k, v = _inputs(2, 4, 2, 6, 9, 3, dtype=torch.float64, grad=True)
    kpm = _left_padding(2, 9)
    slopes = _row_slopes(2, 4).double()

    def f(q, k, v):
        return alibi_attention(q, k, v, slopes, key_padding_mask=kpm, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_per_row_slopes_can_be_learnt():
    q, k, v = _inputs(2, 4, 2, 12, 20, 8)
    slopes = _row_slopes(2, 4).requires_grad_()
    out = alibi_attention(q, k, v, slopes, key_padding_mask=_left_padding(2, 20))
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, slopes, grad)
    leaf = slopes.detach().double().requires_grad_()
    ref = naive_alibi_attention(q, k, v, leaf, key_padding_mask=_left_padding(2, 20))
    (want,) = torch.autograd.grad(ref, leaf, grad.double())
    assert got.shape == (2, 4) and (got.double() - want).abs().max() < 1e-4


def test_per_row_slopes_shape_error_names_the_fix():
    q, k, v = _inputs(2, 4, 4, 5, 5, 8)
    with pytest.raises(ValueError, match=r"\[batch, heads\] = \[2, 4\].*\[4\] slopes"):
        alibi_attention(q, k, v, _row_slopes(3, 4))
    with pytest.raises(ValueError, match="finite"):
        alibi_attention(q, k, v, torch.full((2, 4), float("nan")))


def test_flex_per_row_slopes():
    q, k, v = _inputs(2, 4, 2, 96, 128, 16)
    kpm = _left_padding(2, 128)
    slopes = _row_slopes(2, 4)
    out = alibi_attention(q, k, v, slopes, key_padding_mask=kpm, backend="flex")
    assert (out.double() - naive_alibi_attention(q, k, v, slopes, key_padding_mask=kpm)).abs().max() < 1e-5


class _Copies(TorchDispatchMode):
    """Records the shape of every tensor copied into a new layout or dtype."""

    def __init__(self):
        super().__init__()
        self.copied = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default):
            self.copied.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("causal", [True, False])
def test_fast_path_never_builds_heads_by_length_squared(causal):
    B, H, L, D = 1, 8, 4096, 8
    q, k, v = _inputs(B, H, H, L, L, D)
    with LargestTensor() as mode:
        alibi_attention(q, k, v, alibi_slopes(H), causal=causal, backend="sdpa")
    assert mode.largest < H * L * L // 8
    assert mode.largest <= max(B * H * L * D, H * 512 * 512)


def test_decoding_step_builds_bias_in_linear_memory():
    H, T, D = 8, 20000, 8
    q, k, v = _inputs(1, H, H, 1, T, D)
    with LargestTensor() as mode:
        out = alibi_attention(q, k, v, alibi_slopes(H), backend="sdpa")
    assert mode.largest <= H * T * D
    ref = naive_alibi_attention(q, k, v, alibi_slopes(H))
    assert (out.double() - ref).abs().max() < 1e-5


# --- decode-shaped calls: a few queries against a KV cache ---------------------------------------


def _cache_slice(B, Hkv, Lk, D, dtype):
    """Keys as a decoder holds them: a slice of a longer ``[B, T, Hkv, D]`` cache, as
    ``[B, Hkv, Lk, D]`` (strided: neither contiguous nor starting a row at every D)."""
    cache = torch.randn(B, Lk + 7, Hkv, D, dtype=dtype)
    return cache[:, 3 : 3 + Lk].transpose(1, 2)


def _decode_padding(Lk):
    """Three rows: no padding, left padding, and every key padded (its queries see nothing)."""
    mask = torch.ones(3, Lk, dtype=torch.bool)
    mask[1, : Lk // 2] = False
    mask[2] = False
    return mask


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hkv", [1, 2, 4])
@pytest.mark.parametrize("Lq", [1, 2, 4])
def test_decode_matches_float64_reference(Lq, Hkv, causal, padded, strided, dtype, tol):
    B, H, Lk, D = 3, 4, 45, 16
    q = torch.randn(B, H, Lq, D, dtype=dtype)
    if strided:
        k, v = _cache_slice(B, Hkv, Lk, D, dtype), _cache_slice(B, Hkv, Lk, D, dtype)
    else:
        k, v = _inputs(B, Hkv, Hkv, 1, Lk, D, dtype)[1:]
    kpm = _decode_padding(Lk) if padded else None
    slopes = alibi_slopes(H)
    with mock.patch.object(attention, "_decode", wraps=attention._decode) as decode:
        out = alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm)
    assert decode.call_count == 1
    ref = naive_alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - ref).abs().max() < tol
    if padded:
        assert torch.all(out[2] == 0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lq,Hkv", [(1, 4), (3, 2), (2, 1)])
def test_decode_gradcheck(Lq, Hkv, causal):
    q = torch.randn(3, 4, Lq, 3, dtype=torch.float64, requires_grad=True)
    k = _cache_slice(3, Hkv, 9, 3, torch.float64).requires_grad_()
    v = _cache_slice(3, Hkv, 9, 3, torch.float64).requires_grad_()
    kpm = _decode_padding(9)
    slopes = alibi_slopes(4).double()
    slopes[1] = 0.0  # a zero slope must not turn masked keys into nan

    def f(q, k, v):
        return alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm, backend="sdpa")

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("Lq,uses_decode", [(1, True), (4, True), (5, False)])
def test_auto_takes_the_decode_path_for_a_few_queries(Lq, uses_decode):
    q, k, v = _inputs(1, 4, 2, Lq, 40, 8)
    with mock.patch.object(attention, "_decode", wraps=attention._decode) as decode:
        alibi_attention(q, k, v, alibi_slopes(4), backend="auto")
    assert decode.called == uses_decode
    slopes = alibi_slopes(4).requires_grad_()  # learnt slopes: blocked, which differentiates them
    with mock.patch.object(attention, "_decode", wraps=attention._decode) as decode:
        out = alibi_attention(q[:, :, :1], k, v, slopes, backend="auto")
    assert not decode.called and out.requires_grad


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("T,norms", [(4000, True), (20000, False), (20000, True)])
def test_decode_builds_nothing_larger_than_its_bias(padded, T, norms):
    # One query over T keys: the bias is [B or 1, H, 1, T], O(T); grouped keys are never
    # expanded (an expanded cache would be H * T * D). With the cache's norms past 4,096 keys
    # (the skip route) a key head's kept keys are gathered, at most one key head's cache.
    B, H, Hkv, D = 2, 8, 2, 8
    q, k, v = _inputs(B, H, Hkv, 1, T, D)
    kpm = _left_padding(B, T) if padded else None
    key_norms = KeyNorms.of(k) if norms else None
    skip_from = B * Hkv * 16384 * D  # elements: the skip route from 16k keys on, at this size
    with LargestTensor() as mode, mock.patch.object(attention, "_DECODE_SKIP_ELEMENTS", skip_from):
        out = alibi_attention(q, k, v, alibi_slopes(H), key_padding_mask=kpm, key_norms=key_norms)
    if k.numel() < skip_from or not norms:
        assert mode.largest <= (B if padded else 1) * H * T
    else:  # (the per-key bias and padding padded to whole blocks)
        assert mode.largest <= max(B * H * (T + attention._KEY_BLOCK), B * T * D)
    ref = naive_alibi_attention(q, k, v, alibi_slopes(H), key_padding_mask=kpm)
    assert (out.double() - ref).abs().max() < 1e-5


class _Ops(TorchDispatchMode):
    """Records the name of every aten op."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_decode_step_is_a_handful_of_ops():
    # The fixed cost of a decoding step, pinned without timing: before, 20 ops per call, among
    # them a finiteness check of the slopes (isfinite as abs, ne, eq, mul; all; a read back) and
    # a max over them read back too; now one arange, one multiply, one kernel call and views.
    q, k, v = _inputs(1, 8, 8, 1, 64, 16)
    slopes = alibi_slopes(8)
    with _Ops() as mode:
        alibi_attention(q, k, v, slopes)
    assert sum("flash_attention" in op for op in mode.ops) == 1
    assert not {"isfinite", "all", "max", "abs", "clone", "_to_copy"} & {
        op.split(".")[0] for op in mode.ops
    }
    assert len(mode.ops) <= 10, mode.ops


def test_auto_picks_sdpa_on_cpu():
    q, k, v = _inputs(1, 2, 2, 4, 4, 4)
    c = attention._Call(q, k, v, alibi_slopes(2), True, 0.5, None)
    assert attention._auto(c) == "sdpa"


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((1, 4, 5, 8), (1, 4, 5, 8), (1, 4, 6, 8)), "same shape"),
        (((1, 4, 5, 8), (1, 3, 5, 8), (1, 3, 5, 8)), "multiple"),
        (((1, 4, 6, 8), (1, 4, 5, 8), (1, 4, 5, 8)), "more queries"),
        (((1, 4, 5, 8), (1, 4, 5, 4), (1, 4, 5, 4)), "head_dim"),
        (((4, 5, 8), (4, 5, 8), (4, 5, 8)), "4-D"),
    ],
)
def test_shape_errors(shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        alibi_attention(q, k, v, alibi_slopes(q.shape[1] if q.dim() == 4 else 4))


def test_input_errors():
    q, k, v = _inputs(1, 4, 4, 5, 5, 8)
    with pytest.raises(ValueError, match="at least one query"):
        alibi_attention(q[:, :, :0], k, v, alibi_slopes(4))
    with pytest.raises(ValueError, match=r"slopes must have shape \[4\]"):
        alibi_attention(q, k, v, alibi_slopes(3))
    with pytest.raises(ValueError, match="key_padding_mask"):
        alibi_attention(q, k, v, alibi_slopes(4), key_padding_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid: auto, reference, sdpa"):
        alibi_attention(q, k, v, alibi_slopes(4), backend="triton")
    with pytest.raises(RuntimeError, match="flash.*(not installed|CUDA)"):
        alibi_attention(q, k, v, alibi_slopes(4), backend="flash")


def _bad_call(case):
    """Arguments of a call that must be refused, by case name."""
    q, k, v = _inputs(1, 4, 2, 5, 5, 8)
    kw = dict(q=q, k=k, v=v, slopes=alibi_slopes(4))
    changes = {
        "q list": dict(q=q.tolist()),
        "k numpy": dict(k=k.numpy()),
        "v list": dict(v=v.tolist()),
        "slopes list": dict(slopes=[0.5, 0.25, 0.125, 0.0625]),
        "slopes numpy": dict(slopes=alibi_slopes(4).numpy()),
        "key_padding_mask list": dict(key_padding_mask=[[True] * 5]),
        "key_padding_mask numpy": dict(key_padding_mask=np.ones((1, 5), dtype=bool)),
        "integer inputs": dict(q=q.long(), k=k.long(), v=v.long()),
        "bool inputs": dict(q=q > 0, k=k > 0, v=v > 0),
        "integer v": dict(v=v.int()),
        "mixed dtypes": dict(k=k.double()),
        "mixed half": dict(v=v.half()),
        "zero heads": dict(q=q[:, :0], k=k[:, :0], v=v[:, :0], slopes=torch.zeros(0)),
        "zero kv heads": dict(k=k[:, :0], v=v[:, :0]),
        "zero head_dim": dict(q=q[..., :0], k=k[..., :0], v=v[..., :0]),
        "nan slope": dict(slopes=torch.tensor([0.5, math.nan, 0.1, 0.1])),
        "inf slope": dict(slopes=torch.tensor([0.5, 0.25, math.inf, 0.1])),
        "-inf slope": dict(slopes=torch.tensor([-math.inf, 0.25, 0.1, 0.1])),
        "integer slopes": dict(slopes=torch.tensor([1, 2, 3, 4])),
        "causal string": dict(causal="False"),
        "causal None": dict(causal=None),
        "nan scale": dict(scale=math.nan),
        "inf scale": dict(scale=math.inf),
        "string scale": dict(scale="0.5"),
        "bool scale": dict(scale=True),
        "bool tensor scale": dict(scale=torch.tensor(False)),
    }
    return {**kw, **changes[case]}


BAD_CALLS = {  # case: (error, what the message must name)
    "q list": (TypeError, r"q must be a torch\.Tensor, got list"),
    "k numpy": (TypeError, r"k must be a torch\.Tensor, got ndarray"),
    "v list": (TypeError, r"v must be a torch\.Tensor"),
    "slopes list": (TypeError, r"slopes must be a torch\.Tensor"),
    "slopes numpy": (TypeError, r"slopes must be a torch\.Tensor"),
    "key_padding_mask list": (TypeError, r"key_padding_mask must be a torch\.Tensor"),
    "key_padding_mask numpy": (TypeError, r"key_padding_mask must be a torch\.Tensor"),
    "integer inputs": (TypeError, r"floating-point.*int64.*\.float\(\)"),
    "bool inputs": (TypeError, r"floating-point.*bool"),
    "integer v": (TypeError, r"floating-point.*v torch\.int32"),
    "mixed dtypes": (TypeError, r"one dtype.*k torch\.float64.*\.to\(q\.dtype\)"),
    "mixed half": (TypeError, r"one dtype.*v torch\.float16"),
    "zero heads": (ValueError, r"at least one head"),
    "zero kv heads": (ValueError, r"at least one head"),
    "zero head_dim": (ValueError, r"head_dim >= 1"),
    "nan slope": (ValueError, r"slopes must be finite"),
    "inf slope": (ValueError, r"slopes must be finite"),
    "-inf slope": (ValueError, r"slopes must be finite"),
    "integer slopes": (TypeError, r"slopes must be a floating-point tensor.*slopes\.float\(\)"),
    "causal string": (TypeError, r"causal must be True or False"),
    "causal None": (TypeError, r"causal must be True or False"),
    "nan scale": (ValueError, r"scale must be a finite number"),
    "inf scale": (ValueError, r"scale must be a finite number"),
    "string scale": (ValueError, r"scale must be a finite number"),
    "bool scale": (TypeError, r"scale must be a number.*True"),
    "bool tensor scale": (TypeError, r"scale must be a number"),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_inputs_raise_errors_that_name_the_argument(backend, case):
    # Before: AttributeErrors, ZeroDivisionErrors, kernel errors, or (causal="False", nan slopes
    # on some backends, integer inputs on reference) an answer.
    error, match = BAD_CALLS[case]
    with pytest.raises(error, match=match):
        alibi_attention(**_bad_call(case), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_is_still_an_empty_answer(backend):
    q, k, v = _inputs(0, 4, 2, 5, 7, 8)
    out = alibi_attention(q, k, v, alibi_slopes(4), backend=backend)
    assert out.shape == (0, 4, 5, 8)


@pytest.mark.parametrize("backend", ["reference", "blocked", "auto"])
@pytest.mark.parametrize("causal", [True, False])
def test_slope_gradients_match_float64_reference(backend, causal):
    q, k, v = _inputs(2, 4, 2, 12, 20, 8, grad=True)
    kpm = _left_padding(2, 20)
    slopes = alibi_slopes(4).requires_grad_()
    out = alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm, backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (slopes, q, k, v), grad)
    leaves = [t.detach().double().requires_grad_() for t in (slopes, q, k, v)]
    ref = naive_alibi_attention(*leaves[1:], leaves[0], causal=causal, key_padding_mask=kpm)
    want = torch.autograd.grad(ref, leaves, grad.double())
    assert got[0].abs().max() > 1e-3  # the slopes matter here, so a zero gradient would fail
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("causal", [True, False])
def test_slope_gradcheck(monkeypatch, backend, causal):
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 2 * 4 * 9)  # blocked: two queries a block
    q, k, v = _inputs(1, 4, 2, 5, 9, 3, dtype=torch.float64)
    kpm = torch.tensor([[False, False, True, True, True, True, True, True, True]])
    slopes = alibi_slopes(4).double().requires_grad_()

    def f(m):
        return alibi_attention(q, k, v, m, causal=causal, key_padding_mask=kpm, backend=backend)

    assert torch.autograd.gradcheck(f, (slopes,), fast_mode=True)


def test_learnable_slopes_choose_a_differentiable_backend():
    q, k, v = _inputs(1, 2, 2, 4, 4, 4)
    slopes = alibi_slopes(2).requires_grad_()
    c = attention._Call(q, k, v, slopes, True, 0.5, None)
    assert attention._auto(c) == "blocked"
    assert "slopes" in BACKENDS["flash"].unavailable(c)
    assert BACKENDS["flex"].unavailable(c) is not None  # no backward on CPU
    with pytest.raises(RuntimeError, match="'sdpa' cannot run.*slopes.*'blocked'"):
        alibi_attention(q, k, v, slopes, backend="sdpa")
    with torch.no_grad():  # inference with learnable slopes keeps the fast kernel
        assert attention._auto(c) == "sdpa"
        out = alibi_attention(q, k, v, slopes, backend="sdpa")
    assert (out.double() - naive_alibi_attention(q, k, v, slopes.detach())).abs().max() < 1e-5


def test_registry_names():
    assert set(BACKENDS) == {"reference", "sdpa", "blocked", "flex", "flash"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["flash", "flex", "blocked", "auto"])
def test_cuda_backends(backend):
    q, k, v = (t.cuda().to(torch.bfloat16) for t in _inputs(2, 8, 2, 256, 256, 64))
    slopes = alibi_slopes(8).cuda()
    try:
        out = alibi_attention(q, k, v, slopes, backend=backend)
    except RuntimeError as exc:
        if "cannot run" in str(exc):
            pytest.skip(str(exc))
        raise
    ref = naive_alibi_attention(q.cpu(), k.cpu(), v.cpu(), slopes.cpu())
    assert (out.double().cpu() - ref).abs().max() < 3e-2


# --- attention without ALiBi: causal_attention (NoPE and T5's bias) -----------------------------


def _qkv(T: int, S: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 4, n, 8, generator=g) for n in (T, S, S))


def test_causal_attention_padding_rows_are_zero_not_nan() -> None:
    T = S = 6
    q, k, v = _qkv(T, S)
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[0, :3] = False  # row 0 left-padded by 3: its first 3 queries see no key
    out = causal_attention(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
    ref = reference_attention(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("T, S", [(300, 300), (200, 330), (1, 300)])  # several query blocks
def test_causal_attention_with_a_bias_matches_reference_and_its_gradients(
    T: int, S: int, padded: bool
) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(T, S))
    bias = torch.randn(4, T, S, generator=torch.Generator().manual_seed(1)).requires_grad_()
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[1, :140] = False  # left padding that spans the first query block
    mask = mask if padded else None
    out = causal_attention(q, k, v, bias_HTS=bias, key_padding_mask=mask)
    leaves = (q, k, v, bias)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference_attention(*ref_leaves[:3], bias=ref_leaves[3], key_padding_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no gradient wanted: PyTorch's fused kernel instead, same numbers
        out_no_grad = causal_attention(q, k, v, bias_HTS=bias, key_padding_mask=mask)
    torch.testing.assert_close(out_no_grad.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad_out)
    ref.backward(grad_out.double())
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-5, rtol=1e-5)


# --- key_bias: a per-key term added to every query's score ----------------------------------------


def _key_bias(B, H, Lk, per_row=True, dtype=torch.float32):
    """Values of the size a model's per-key bias has (Falcon's ``m j / sqrt(d)`` at a few hundred
    keys), not a smooth function of j: any position error shows."""
    shape = (B, H, Lk) if per_row else (H, Lk)
    return 3 * torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lq,Hkv", [(1, 2), (3, 8), (70, 2)])  # decode-shaped and segmented
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("per_row", [False, True])  # per-row slopes and a [B, H, K] key_bias
def test_key_bias_matches_float64_reference(backend, causal, Lq, Hkv, padded, per_row):
    B, H, Lk = 3, 8, 70
    q, k, v = _inputs(B, H, Hkv, Lq, Lk, 16)
    kpm = _decode_padding(Lk) if padded else None  # a row with every key padded too
    slopes = _row_slopes(B, H) if per_row else alibi_slopes(H)
    key_bias = _key_bias(B, H, Lk, per_row)
    out = alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm, key_bias=key_bias,
                          backend=backend)
    ref = naive_alibi_attention(q, k, v, slopes, key_bias=key_bias, causal=causal,
                                key_padding_mask=kpm)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert (out.double() - ref).abs().max() < 2e-5
    if padded:
        assert torch.all(out[2] == 0)
    # the key_bias was used: without it the answer differs
    plain = alibi_attention(q, k, v, slopes, causal=causal, key_padding_mask=kpm, backend=backend)
    assert (out - plain).abs().max() > 1e-2


@pytest.mark.parametrize("Lq", [1, 3, 70])
def test_key_bias_with_zero_slopes_is_alibi_counted_per_key(Lq):
    # Causal -m (i - j) is the per-key m j up to a constant per query: zero slopes and the key_bias
    # m j give ALiBi. With the positions counted along a mask with a gap (as BLOOM and Falcon
    # count them), the same key_bias gives what slots cannot.
    B, H, Lk = 2, 4, 70
    q, k, v = _inputs(B, H, 2, Lq, Lk, 16)
    slopes = alibi_slopes(H)
    kpm = torch.ones(B, Lk, dtype=torch.bool)
    kpm[1, 10:20] = False  # a gap between real tokens
    slots = torch.arange(Lk, dtype=torch.float32).expand(B, Lk)
    zero = torch.zeros(H)
    by_slot = slopes[:, None] * slots[:, None]
    out = alibi_attention(q, k, v, zero, key_padding_mask=kpm, key_bias=by_slot)
    ref = naive_alibi_attention(q, k, v, slopes, key_padding_mask=kpm)
    assert (out.double() - ref).abs().max() < 2e-5
    along_mask = (kpm.cumsum(-1) - 1).float()  # position of each real key among real keys
    by_position = slopes[:, None] * along_mask[:, None]
    out = alibi_attention(q, k, v, zero, key_padding_mask=kpm, key_bias=by_position)
    assert (out[0].double() - ref[0]).abs().max() < 2e-5  # no gap: the same
    assert (out[1].double() - ref[1]).abs().max() > 1e-3  # the gap shortens distances
    ref = naive_alibi_attention(q, k, v, zero, key_bias=by_position, key_padding_mask=kpm)
    assert (out.double() - ref).abs().max() < 2e-5


@pytest.mark.parametrize("Lq", [2, 6])  # the decode path and the segments
@pytest.mark.parametrize("causal", [True, False])
def test_key_bias_gradcheck(monkeypatch, Lq, causal):
    # Gradients of q, k, v through the sdpa backend's kernel calls that carry a key_bias.
    monkeypatch.setattr(attention, "_BIAS_BUDGET", 1.0)
    q, k, v = _inputs(2, 4, 2, Lq, 9, 3, dtype=torch.float64, grad=True)
    kpm = _left_padding(2, 9)
    key_bias = _key_bias(2, 4, 9, dtype=torch.float64)

    def f(q, k, v):
        return alibi_attention(q, k, v, _row_slopes(2, 4).double(), causal=causal,
                               key_padding_mask=kpm, key_bias=key_bias, backend="sdpa")

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "blocked", "auto"])
def test_key_bias_can_be_learnt(backend):
    q, k, v = _inputs(2, 4, 2, 12, 20, 8, grad=True)
    kpm = _left_padding(2, 20)
    key_bias = _key_bias(2, 4, 20).requires_grad_()
    out = alibi_attention(q, k, v, alibi_slopes(4), key_padding_mask=kpm, key_bias=key_bias,
                          backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (key_bias, q, k, v), grad)
    leaves = [t.detach().double().requires_grad_() for t in (key_bias, q, k, v)]
    ref = naive_alibi_attention(*leaves[1:], alibi_slopes(4), key_bias=leaves[0], key_padding_mask=kpm)
    want = torch.autograd.grad(ref, leaves, grad.double())
    assert got[0].abs().max() > 1e-3
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() < 1e-4


def test_backends_that_cannot_take_a_key_bias_refuse_it():
    q, k, v = _inputs(1, 4, 4, 6, 6, 8)
    key_bias = _key_bias(1, 4, 6)
    c = attention._Call(q, k, v, alibi_slopes(4), True, 0.5, None, key_bias)
    assert "key_bias" in BACKENDS["flash"].unavailable(c)
    with pytest.raises(RuntimeError, match="'flash' cannot run.*key_bias.*'flex' or 'blocked'"):
        alibi_attention(q, k, v, alibi_slopes(4), key_bias=key_bias, backend="flash")
    learnt = key_bias.clone().requires_grad_()
    c = attention._Call(q, k, v, alibi_slopes(4), True, 0.5, None, learnt)
    assert attention._auto(c) == "blocked"
    assert "key_bias" in BACKENDS["flash"].unavailable(c)
    with pytest.raises(RuntimeError, match="'sdpa' cannot run.*gradient for key_bias.*'blocked'"):
        alibi_attention(q, k, v, alibi_slopes(4), key_bias=learnt, backend="sdpa")
    with torch.no_grad():  # inference keeps the fast kernel
        assert attention._auto(c) == "sdpa"


@pytest.mark.parametrize(
    "key_bias,error,match",
    [
        ([[0.0] * 6] * 4, TypeError, r"key_bias must be a torch\.Tensor or None, got list"),
        (torch.zeros(4, 6, dtype=torch.long), TypeError, r"floating-point.*key_bias\.float\(\)"),
        (torch.zeros(4, 5), ValueError, r"\[heads, keys\] = \[4, 6\].*\[batch, heads, keys\] = "
                                        r"\[2, 4, 6\], got \(4, 5\)"),
        (torch.zeros(3, 4, 6), ValueError, r"\[2, 4, 6\], got \(3, 4, 6\)"),
        (torch.zeros(2, 4, 1, 6), ValueError, r"key_bias must have shape"),
        (torch.full((4, 6), math.nan), ValueError, r"key_bias must be finite.*key_padding_mask"),
        (torch.full((4, 6), -math.inf), ValueError, r"key_bias must be finite"),
    ],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_key_bias_is_refused(backend, key_bias, error, match):
    q, k, v = _inputs(2, 4, 2, 3, 6, 8)
    with pytest.raises(error, match=match):
        alibi_attention(q, k, v, alibi_slopes(4), key_bias=key_bias, backend=backend)


@pytest.mark.parametrize("slopes", ["zero", "alibi"])
def test_key_bias_builds_nothing_quadratic(slopes):
    # A long segmented call with a per-row key_bias: the bias stays [B, H, 1, keys] per segment.
    B, H, L, D = 2, 8, 4096, 8
    q, k, v = _inputs(B, H, H, L, L, D)
    kpm = _left_padding(B, L)
    key_bias = _key_bias(B, H, L)
    m = torch.zeros(H) if slopes == "zero" else alibi_slopes(H)
    with LargestTensor() as mode:
        alibi_attention(q, k, v, m, key_padding_mask=kpm, key_bias=key_bias, backend="sdpa")
    assert mode.largest < H * L * L // 8
    assert mode.largest <= max(B * H * L * D, H * 512 * 512)


def test_key_bias_decode_builds_nothing_larger_than_its_bias():
    B, H, Hkv, T, D = 2, 8, 2, 20000, 8
    q, k, v = _inputs(B, H, Hkv, 1, T, D)
    kpm = _left_padding(B, T)
    key_bias = _key_bias(B, H, T)
    with LargestTensor() as mode:
        out = alibi_attention(q, k, v, torch.zeros(H), key_padding_mask=kpm, key_bias=key_bias)
    assert mode.largest <= max(B * H * T, k.numel())  # the scores; views of the cache
    ref = naive_alibi_attention(q, k, v, torch.zeros(H), key_bias=key_bias, key_padding_mask=kpm)
    assert (out.double() - ref).abs().max() < 1e-5


def test_flex_key_bias():
    q, k, v = _inputs(2, 4, 2, 96, 128, 16)
    kpm = _left_padding(2, 128)
    slopes, key_bias = _row_slopes(2, 4), _key_bias(2, 4, 128)
    out = alibi_attention(q, k, v, slopes, key_padding_mask=kpm, key_bias=key_bias, backend="flex")
    ref = naive_alibi_attention(q, k, v, slopes, key_bias=key_bias, key_padding_mask=kpm)
    assert (out.double() - ref).abs().max() < 1e-5


# --- causal sdpa skips key blocks that cannot count ----------------------------------------------


@pytest.fixture
def small_skip_blocks(monkeypatch):
    """Blocks small enough that tiny inputs exercise the skip: 16-row query blocks for steep
    heads, 8-key bound blocks."""
    monkeypatch.setattr(attention, "_MIN_SKIP_BLOCK", 16)
    monkeypatch.setattr(attention, "_SKIP_SPAN", 16.0)
    monkeypatch.setattr(attention, "_KEY_BLOCK", 8)
    monkeypatch.setattr(attention, "_DECODE_SKIP_ELEMENTS", 16)
    monkeypatch.setattr(attention, "_DECODE_SKIP_SHARE", 1.0)


def _score_share(q, k, v, slopes, **kw) -> float:
    """Share of the causal scores the sdpa segments compute (1: nothing skipped)."""
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    c = attention._Call(q, k, v, slopes, True, q.shape[-1] ** -0.5, kw.get("key_padding_mask"),
                        kw.get("key_bias"))
    _, _, segs = attention._bias_forward(c, q, attention._expand_kv(k, H), attention._expand_kv(v, H))
    done = sum(
        (s.q1 - s.q0) * ((s.q1 - s.q0 + 1) / 2 if s.causal else s.k1 - s.k0) * len(range(H)[s.heads(H)])
        for s in segs
    )
    return done / (H * Lq * (Lk - Lq) + H * Lq * (Lq + 1) / 2)


def test_skip_leaves_out_far_keys_and_matches_reference(small_skip_blocks):
    q, k, v = _inputs(2, 4, 2, 300, 320, 8, grad=True)
    slopes = torch.tensor([2.0, 1.0, 0.5, 0.0])  # windows of a few, tens of keys; the last: none
    out = alibi_attention(q, k, v, slopes, backend="sdpa")
    ref = naive_alibi_attention(q, k, v, slopes)
    assert (out.double() - ref).abs().max() < 2e-5
    share = _score_share(q.detach(), k.detach(), v.detach(), slopes)
    assert share < 0.6  # three of four heads skip most of their keys
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() < 1e-4


@pytest.mark.parametrize("Lq", [1, 64, 1000, 2048, 2049, 5000])
@pytest.mark.parametrize("steepest", [0.0, 1 / 256, 0.5, 1.0, 40.0])
def test_head_groups_short_cut_agrees_with_the_general_rule(Lq, steepest):
    # Short calls take one group without reading each head's slope: the same groups as the
    # general rule (a zero key_bias takes it, and changes no block size).
    H = 8
    slopes = steepest * 0.5 ** torch.arange(H, dtype=torch.float32)
    q = torch.zeros(1, H, Lq, 4)
    c = attention._Call(q, q, q, slopes, True, 0.5, None)
    general = attention._Call(q, q, q, slopes, True, 0.5, None, torch.zeros(1, H, Lq))
    assert attention._head_groups(c) == attention._head_groups(general)


@pytest.mark.parametrize("padded", [False, True])
def test_a_per_key_alibi_under_zero_slopes_skips_as_slopes_would(small_skip_blocks, padded):
    # Falcon's bias (and BLOOM's with padding) reaches the op as key_bias m * pos_j, pos counted
    # along the mask, with zero slopes: its far keys are skipped too, by the same proof.
    q, k, v = _inputs(2, 4, 4, 300, 300, 8, grad=True)
    m = torch.tensor([2.0, 1.0, 0.5, 0.0])
    kpm = _left_padding(2, 300) if padded else torch.ones(2, 300, dtype=torch.bool)
    pos = (kpm.cumsum(-1) - 1) * kpm
    kw = dict(key_bias=m.view(1, -1, 1) * pos[:, None, :].float(),
              key_padding_mask=kpm if padded else None)
    zero = torch.zeros(4)
    out = alibi_attention(q, k, v, zero, backend="sdpa", **kw)
    ref = naive_alibi_attention(q, k, v, zero, **kw)
    # fp32 adds q . k to a key_bias of up to 598: its rounding, with or without the skip
    tol = 2e-5 + 4 * 2.0**-24 * 598
    assert (out.double() - ref).abs().max() < tol
    assert (out.double() - naive_alibi_attention(q, k, v, m, **kw)).abs().max() > 0.1  # a bias
    share = _score_share(q.detach(), k.detach(), v.detach(), zero, **kw)
    assert share < 0.6  # as with the slopes themselves
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() < 10 * tol


@pytest.mark.parametrize("Lq", [1, 2, 200])  # decoding steps (with the cache's norms), segments
def test_a_far_key_with_a_huge_score_is_not_skipped(small_skip_blocks, Lq):
    q, k, v = _inputs(1, 2, 2, Lq, 240, 8)
    q[0, 0] = q[0, 0, :1]  # one direction for every query of head 0
    k[0, 0, 5] = q[0, 0, 0] * 60.0  # key 5, far back: its q . k outweighs the slope's bias
    slopes = torch.tensor([0.5, 0.5])
    out = alibi_attention(q, k, v, slopes, backend="sdpa", key_norms=KeyNorms.of(k))
    ref = naive_alibi_attention(q, k, v, slopes)
    assert (out.double() - ref).abs().max() < 2e-5
    assert (out[0, 0, -1] - v[0, 0, 5]).abs().max() < 1e-3  # the far key takes the last row
    if Lq <= attention._DECODE_MAX_QUERIES:  # head 0 keeps key 5's block, head 1 only a window
        c = attention._Call(q, k, v, slopes, True, 8**-0.5, None, key_norms=KeyNorms.of(k))
        kept = attention._decode_blocks(c, attention._Rows.of(None, Lq, True), q, k)
        assert kept[0, 0] and not kept[1, :20].any() and kept[1, -2:].all()


@pytest.mark.parametrize("flat,large,skips", [(False, True, True), (True, True, False),
                                               (False, False, False)])
def test_decode_leaves_keys_unread_only_when_most_blocks_can_go(flat, large, skips):
    # Flat slopes (interpolation at L' >> L) keep every block, and a small cache (20k keys of 8
    # heads of 8 dims) is read faster than it is bounded: one call over the cache is cheaper than
    # a call per key head, and the result is the same. `large`: the threshold as for 64 dims.
    q, k, v = _inputs(1, 8, 8, 1, 20000, 8)
    slopes = alibi_slopes(8) * (1e-6 if flat else 1.0)
    threshold = attention._DECODE_SKIP_ELEMENTS // (64 // 8 if large else 1)
    with mock.patch.object(attention, "_decode_skip", wraps=attention._decode_skip) as skip, \
            mock.patch.object(attention, "_DECODE_SKIP_ELEMENTS", threshold):
        out = alibi_attention(q, k, v, slopes, key_norms=KeyNorms.of(k))
    assert skip.called == skips
    ref = naive_alibi_attention(q, k, v, slopes)
    assert (out.double() - ref).abs().max() < 1e-5


def test_key_norms_extended_equal_the_norms_of_the_whole_cache():
    k = torch.randn(2, 3, 500, 8, dtype=torch.float64)
    norms, n = KeyNorms.of(k[:, :, :1]), 1
    for size in [1, 62, 1, 1, 64, 130, 5, 235]:  # across and along block boundaries
        n += size
        norms = norms.extended(k[:, :, :n])
        whole = KeyNorms.of(k[:, :, :n])
        assert norms.n_keys == n and torch.equal(norms.block_max, whole.block_max)
    by_hand = F.pad(k.norm(dim=-1), (0, 12)).view(2, 3, 8, 64).amax(-1)  # 8 blocks of 64 keys
    torch.testing.assert_close(whole.block_max, by_hand)


@pytest.mark.parametrize("bad,error,match", [
    ("stale", ValueError, r"describe 300 keys.*has 301 keys.*norms.extended"),
    ("tensor", TypeError, r"key_norms must be linbias.attention.KeyNorms"),
    ("heads", ValueError, r"extend them with each append"),
])
def test_key_norms_that_do_not_describe_the_keys_are_refused(bad, error, match):
    q, k, v = _inputs(1, 4, 2, 1, 301, 8)
    norms = {"stale": KeyNorms.of(k[:, :, :300]), "tensor": KeyNorms.of(k).block_max,
             "heads": KeyNorms.of(k[:, :1])}[bad]
    with pytest.raises(error, match=match):
        alibi_attention(q, k, v, alibi_slopes(4), key_norms=norms)
    with pytest.raises(ValueError, match="cannot extend to keys of shape"):
        KeyNorms.of(k).extended(k[:, :, :10])


@settings(max_examples=40, deadline=None)
@given(
    H=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2]),
    lq=st.one_of(st.integers(1, 4), st.integers(5, 120)),  # decoding steps, segments
    extra=st.integers(0, 40),
    steep=st.floats(0.05, 4.0),
    per_row=st.booleans(),
    padded=st.booleans(),
    with_key_bias=st.booleans(),
    far=st.lists(st.tuples(st.integers(0, 159), st.floats(1.0, 300.0)), max_size=3),
    scale=st.one_of(st.none(), st.floats(-2.0, 2.0)),
)
def test_property_skip_with_adversarial_norms_matches_reference(
    H, group, lq, extra, steep, per_row, padded, with_key_bias, far, scale
):
    with mock.patch.multiple(
        attention, _MIN_SKIP_BLOCK=16, _SKIP_SPAN=16.0, _KEY_BLOCK=8, _DECODE_SKIP_ELEMENTS=16,
        _DECODE_SKIP_SHARE=1.0,
    ):
        Hkv, Lk = max(1, H // group), lq + extra
        q, k, v = _inputs(2, H, Hkv, lq, Lk, 8)
        for j, size in far:  # far keys aligned with their queries, huge q . k
            j = j % Lk
            k[:, :, j] = q[:, : Hkv, -1] / q[:, :Hkv, -1].norm(dim=-1, keepdim=True) * size
        slopes = steep * 0.5 ** torch.arange(H, dtype=torch.float32)
        slopes = slopes * torch.tensor([[1.0], [0.25]]) if per_row else slopes
        kpm = _left_padding(2, Lk) if padded else None
        key_bias = _key_bias(2, H, Lk) * 3 if with_key_bias else None
        kw = dict(scale=scale, key_padding_mask=kpm, key_bias=key_bias)
        out = alibi_attention(q, k, v, slopes, backend="sdpa", key_norms=KeyNorms.of(k), **kw)
    ref = naive_alibi_attention(q, k, v, slopes, **kw)
    s = 1.0 / math.sqrt(8) if scale is None else abs(scale)
    logit = s * q.norm(dim=-1).max() * k.norm(dim=-1).max() + 512.0
    assert (out.double() - ref).abs().max() <= 4 * 2.0**-24 * logit * v.abs().max() + 2e-5


def _flushes_subnormals() -> bool:
    tiny = torch.tensor([1e-39])  # subnormal in fp32
    return bool((tiny * torch.tensor([1.0]))[0] == 0)


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("Lq", [1, 300])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_callers_floating_point_state_is_unchanged(small_skip_blocks, flush, Lq, backend):
    # Subnormal scores are avoided by skipping, never by flushing them for the whole process:
    # the forward, the backward and a decoding step that leaves keys unread, on every backend.
    q, k, v = _inputs(1, 8, 8, Lq, 4096, 8, grad=True)
    supported = torch.set_flush_denormal(flush)  # torch has no getter: the state is probed
    try:
        if flush and not supported:
            pytest.skip("this CPU cannot flush subnormals")
        assert _flushes_subnormals() == flush
        out = alibi_attention(q, k, v, alibi_slopes(8), backend=backend,
                              key_norms=KeyNorms.of(k.detach()))
        out.sum().backward()
        assert _flushes_subnormals() == flush
    finally:
        torch.set_flush_denormal(False)


# --- FlexAttention's block mask: the same skip, decided per 128 x 128 tile -------------------------


def _true_scores(q, k, slopes, key_bias=None, kpm=None):
    """float64 [B, H, Lq, Lk] causal scores, -inf where hidden."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    k = k.double().repeat_interleave(H // k.shape[1], dim=1)
    i = torch.arange(Lk - Lq, Lk).view(-1, 1)
    j = torch.arange(Lk).view(1, -1)
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(D) - slopes.double().view(-1, H, 1, 1) * (i - j)
    if key_bias is not None:
        s = s + key_bias.double().view(-1, H, 1, Lk)
    hidden = (j > i).view(1, 1, Lq, Lk)
    if kpm is not None:
        hidden = hidden | ~kpm.view(B, 1, 1, Lk)
    return s.masked_fill(hidden, -math.inf)


@pytest.mark.parametrize("padded", [False, True])
def test_flex_block_mask_leaves_out_only_tiles_that_cannot_count(padded):
    B, H, Lq, Lk, D = 2, 4, 600, 700, 16
    q, k, v = _inputs(B, H, 2, Lq, Lk, D)
    k[0, 1, 40] = q[0, 2, -1] * 50.0  # a far key with a huge score for head 2's last query
    slopes = torch.tensor([0.5, 0.25, 0.1, 0.0])
    kpm = _left_padding(B, Lk) if padded else None
    key_bias = _key_bias(B, H, Lk)
    c = attention._Call(q, k, v, slopes, True, D**-0.5, kpm, key_bias)
    needed = attention._flex_needed_blocks(c).expand(B, H, -1, -1)
    scores = _true_scores(q, k, slopes, key_bias, kpm)
    best = scores.amax(-1, keepdim=True)
    n = attention._FLEX_BLOCK
    tiles = F.pad(scores - best, (0, -Lk % n, 0, -Lq % n), value=-math.inf)
    tiles = tiles.view(B, H, -(-Lq // n), n, -1, n).amax((3, 5))  # [B, H, nq, nk] best in tile
    far = tiles > -(math.log(Lk) + 16)  # tiles holding a score that counts
    assert not (far & ~needed).any()  # never left out where something counts
    assert needed[0, 2, -1, 0]  # the far key's tile, for the query that sees it
    i_first = Lk - Lq + torch.arange(0, Lq, n).view(-1, 1)
    past = (torch.arange(0, Lk, n) + n - 1).view(1, -1) < i_first  # tiles wholly before the queries
    assert (~needed[:, 0] & past).sum() > 0.5 * past.sum() * B  # the steep head skips most
    assert needed[:, 3].all() or padded  # slope 0: nothing provably negligible


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_flex_block_mask_is_built_per_tile(causal, padded):
    # Listed tiles hold every visible pair of the tiles that may count; a full tile (mask_mod not
    # evaluated) holds only visible pairs; and nothing of B x H x Lq x Lk is built for it.
    B, H, Lq, Lk, D = 2, 4, 300, 700, 8
    q, k, v = _inputs(B, H, 2, Lq, Lk, D)
    slopes = torch.tensor([0.5, 0.25, 0.1, 0.0])
    kpm = _left_padding(B, Lk) if padded else None
    c = attention._Call(q, k, v, slopes, causal, D**-0.5, kpm)
    i = (Lk - Lq + torch.arange(Lq)).view(-1, 1)

    def visible(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx + (Lk - Lq) if causal else kv_idx >= 0
        return keep & kpm[b, kv_idx] if padded else keep

    with LargestTensor() as mode:
        mask = attention._flex_block_mask(c, visible)
    assert mode.largest <= B * H * Lk * D
    n = attention._FLEX_BLOCK
    nq, nk = -(-Lq // n), -(-Lk // n)

    def dense(num, idx):  # [B, H, nq, nk] bool from counts and indices
        out = torch.zeros(B, H, nq, nk, dtype=torch.bool)
        for b, h, r in np.ndindex(B, H, nq):
            out[b, h, r, idx[b, h, r, : num[b, h, r]].long()] = True
        return out

    partial = dense(mask.kv_num_blocks, mask.kv_indices)
    full = dense(mask.full_kv_num_blocks, mask.full_kv_indices)
    pairs = torch.arange(Lk).view(1, -1) <= i if causal else torch.ones(Lq, Lk, dtype=torch.bool)
    pairs = pairs.view(1, 1, Lq, Lk) & (kpm.view(B, 1, 1, Lk) if padded else True)
    pairs = F.pad(pairs.expand(B, H, -1, -1), (0, nk * n - Lk, 0, nq * n - Lq))
    tiles = pairs.view(B, H, nq, n, nk, n)
    counts = attention._flex_needed_blocks(c).expand(B, H, -1, -1) if causal else True
    assert not (partial & full).any()
    assert ((tiles.any(5).any(3) & counts) <= (partial | full)).all()
    assert (full <= tiles.all(5).all(3)).all()
    assert full.any() and (partial | full).sum() < B * H * nq * nk or not causal


# --- rules past L that count distance otherwise (cap, window, selfextend) ----------------------


DISTANCE_RULES = ["cap", "window", "window:0", "window:2", "selfextend"]


@pytest.mark.parametrize("rule", DISTANCE_RULES)
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk", [(2, 4, 4, 40, 40), (2, 4, 2, 1, 40), (2, 6, 3, 3, 37)])
@pytest.mark.parametrize("backend", ["reference", "blocked", "auto"])
def test_distance_rules_match_the_design_formulas(rule, B, H, Hkv, Lq, Lk, backend):
    # Rows of different real lengths (left padding: one past L, one at L), grouped heads, and
    # decoding steps against a cache, against DESIGN.md's formulas spelled out in float64.
    from conftest import design_rule_attention
    from linbias.alibi import parse_rule, row_lengths, rule_distances

    torch.manual_seed(7)
    L = 10
    q, k, v = _inputs(B, H, Hkv, Lq, Lk, 8, dtype=torch.float64)
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[1, : Lk - L] = False  # row 1 holds exactly L real tokens: nothing changes for it
    slopes = alibi_slopes(H).double()
    dist = rule_distances(L, row_lengths(mask).tolist(), rule)
    out = alibi_attention(q, k, v, slopes, key_padding_mask=mask, distances=dist, backend=backend)
    sinks = parse_rule(rule)[2]
    ref = design_rule_attention(q, k, v, slopes, rule.partition(":")[0], L,
                                key_padding_mask=mask, sinks=sinks)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_distance_rules_build_nothing_quadratic():
    from linbias.alibi import rule_distances

    H, Lk = 4, 2048
    q, k, v = _inputs(1, H, H, Lk, Lk, 16)
    for rule in ("cap", "window", "selfextend"):
        with LargestTensor() as seen:
            alibi_attention(q, k, v, alibi_slopes(H), distances=rule_distances(128, [Lk], rule))
        assert seen.largest <= H * Lk * attention._DISTANCE_BLOCK, rule


def test_backends_that_count_distance_linearly_refuse_a_rule():
    from linbias.alibi import rule_distances

    q, k, v = _inputs(1, 2, 2, 8, 8, 4)
    for backend in ("sdpa", "flex", "flash"):
        with pytest.raises(RuntimeError, match="distance count.*use 'blocked'"):
            alibi_attention(q, k, v, alibi_slopes(2), distances=rule_distances(4, [8], "cap"),
                            backend=backend)


@pytest.mark.parametrize("bad,error,match", [
    ("cap", TypeError, "distances must be a linbias.alibi.Distances"),
    (dict(bend=2, ratio=(0.5, 0.5, 0.5)), ValueError, "ratio must hold 1 or 2"),
    (dict(bend=2, ratio=(math.nan,)), ValueError, "finite and >= 0"),
    (dict(bend=-1, ratio=(0.0,)), ValueError, "bend >= 0"),
    (dict(bend=2, ratio=(0.0,), window=0), ValueError, "window >= 1"),
])
def test_bad_distances_are_refused(bad, error, match):
    from linbias.alibi import Distances

    q, k, v = _inputs(2, 2, 2, 8, 8, 4)
    with pytest.raises(error, match=match):
        alibi_attention(q, k, v, alibi_slopes(2),
                        distances=Distances(**bad) if isinstance(bad, dict) else bad)
