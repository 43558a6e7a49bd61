
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import naive_alibi_attention
from linbias import BACKENDS, alibi_attention, alibi_slopes
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
    assert len({s.q0 for s in attention._segments(c)}) > 2
    out = alibi_attention(q, k, v, alibi_slopes(4), causal=causal, key_padding_mask=kpm, backend="sdpa")
    ref = naive_alibi_attention(q, k, v, alibi_slopes(4), causal=causal, key_padding_mask=kpm)
    assert (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize("backend", ["sdpa", "blocked"])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck(monkeypatch, backend, causal):
    monkeypatch.setattr(attention, "_BIAS_BUDGET", 1.0)  # several blocks, so merges are checked
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


def test_flex_matches_reference():
    q, k, v = _inputs(2, 4, 2, 96, 128, 16)
    kpm = _left_padding(2, 128)
    out = alibi_attention(q, k, v, alibi_slopes(4), key_padding_mask=kpm, backend="flex")
    ref = naive_alibi_attention(q, k, v, alibi_slopes(4), key_padding_mask=kpm)
    assert (out.double() - ref).abs().max() < 1e-5


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [True, False])
def test_fast_path_never_builds_heads_by_length_squared(causal):
    B, H, L, D = 1, 8, 4096, 8
    q, k, v = _inputs(B, H, H, L, L, D)
    with _LargestTensor() as mode:
        alibi_attention(q, k, v, alibi_slopes(H), causal=causal, backend="sdpa")
    assert mode.largest < H * L * L // 8
    assert mode.largest <= max(B * H * L * D, H * 512 * 512)


def test_decoding_step_builds_bias_in_linear_memory():
    H, T, D = 8, 20000, 8
    q, k, v = _inputs(1, H, H, 1, T, D)
    with _LargestTensor() as mode:
        out = alibi_attention(q, k, v, alibi_slopes(H), backend="sdpa")
    assert mode.largest <= H * T * D
    ref = naive_alibi_attention(q, k, v, alibi_slopes(H))
    assert (out.double() - ref).abs().max() < 1e-5


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
