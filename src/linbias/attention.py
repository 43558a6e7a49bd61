"""One ALiBi attention entry point, with backends chosen by device, dtype and mask.

Shapes: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads (``H % Hkv == 0``), ``Lq`` queries,
``Lk`` keys, ``D`` head dim. Queries are the last ``Lq`` of the ``Lk`` positions (KV cache). Slopes
are ``[H]``, or ``[B, H]`` when rows of a batch need their own (interpolated for each row's length).
An optional ``key_bias`` ``[H, Lk]`` or ``[B, H, Lk]`` adds a per-key term to every query's score
(a model whose ALiBi bias is counted along its mask, or rounded as the model rounds it).

The fast path uses the fact that softmax is unchanged by a constant added along a row: for causal
attention the bias ``-m_h * (i - j)`` of row ``i`` equals ``m_h * (j - c)`` plus a row constant,
for any centre ``c``. That per-key bias is a ``[1, H, 1, Lk]`` mask, which PyTorch's fused CPU
attention kernel broadcasts over the queries under its own causal mask, so no ``H x Lq x Lk``
tensor is ever built. The per-key values grow with the distance from ``c``, which costs float
precision on the logits that matter (those near the diagonal), so queries are processed in
blocks, each with its own centre. A decoding step (a few queries against a KV cache) skips all
that: its whole ``[H, Lq, Lk]`` bias is linear in the context, and one kernel call takes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from linbias.alibi import Distances, alibi_bias, check_slopes

__all__ = ["alibi_attention", "causal_attention", "BACKENDS", "Backend", "KeyNorms"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class _Call:
    q: Tensor  # [B, H, Lq, D]
    k: Tensor  # [B, Hkv, Lk, D]
    v: Tensor  # [B, Hkv, Lk, D]
    slopes: Tensor  # [H] or [B, H]
    causal: bool
    scale: float
    key_padding_mask: Optional[Tensor]  # [B, Lk] bool, True = real token
    key_bias: Optional[Tensor] = None  # [1 or B, H, Lk], in the dtype of slopes
    distances: Optional[Distances] = None  # a rule's distance count past L; None: d itself
    key_norms: Optional["KeyNorms"] = None  # the keys' largest norm per block (a KV cache's)

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (self.q, self.k, self.v, self.slopes, self.key_bias)
        )

    @property
    def slopes_need_grad(self) -> bool:
        return torch.is_grad_enabled() and self.slopes.requires_grad

    @property
    def key_bias_needs_grad(self) -> bool:
        return torch.is_grad_enabled() and self.key_bias is not None and self.key_bias.requires_grad

    @property
    def slopes_BH(self) -> Tensor:
        """The slopes as ``[1 or B, H]``: one row shared by the batch, or one per row."""
        return self.slopes.view(1, -1) if self.slopes.dim() == 1 else self.slopes

    def key_bias_keys(self, k0: int, k1: int) -> Optional[Tensor]:
        """``key_bias`` of keys ``k0 .. k1 - 1`` as ``[1 or B, H, 1, keys]``, broadcast over
        queries; None without one."""
        return None if self.key_bias is None else self.key_bias[:, :, None, k0:k1]


@dataclass(frozen=True)
class Backend:
    """An attention implementation and a check that says why it cannot run a call (or None)."""

    run: Callable[[_Call], Tensor]
    unavailable: Callable[[_Call], Optional[str]]


def _expand_kv(x: Tensor, n_heads: int) -> Tensor:
    # [B, Hkv, L, D] -> [B, H, L, D]: each KV head serves H/Hkv consecutive query heads.
    group = n_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


# --- the visibility rule, in one place: a query row that sees no key gives zeros ----------------
#
# Only key padding can hide every key of a row (a causal query sees its own position, a
# bidirectional one every key). Such a row is let see every key, so that softmax over it stays
# finite in both passes, and its output is then set to zero, which also zeroes its gradients.
# Without padding there is nothing to do: ``has_key`` is None and both steps are skipped.


@dataclass(frozen=True)
class _Rows:
    """Which query rows see at least one key."""

    has_key: Optional[Tensor]  # [B, 1, Lq, 1] bool; None: every row does (no key padding)

    @staticmethod
    def of(key_padding_mask: Optional[Tensor], n_queries: int, causal: bool) -> "_Rows":
        if key_padding_mask is None:
            return _Rows(None)
        if causal:  # query i, the (Lk - Lq + i)-th key, sees keys 0 .. itself
            seen = key_padding_mask.cumsum(-1)[:, key_padding_mask.shape[1] - n_queries :] > 0
        else:
            seen = key_padding_mask.any(-1, keepdim=True).expand(-1, n_queries)
        return _Rows(seen[:, None, :, None])

    def block(self, q0: int, q1: int) -> "_Rows":
        """The rows ``q0 .. q1 - 1``."""
        return self if self.has_key is None else _Rows(self.has_key[:, :, q0:q1])

    def open(self, visible: Tensor) -> Tensor:
        """``visible`` (bool ``[..., Lq, keys]``, batch first) with each row that sees no key
        seeing every key."""
        if self.has_key is None:
            return visible
        has_key = self.has_key
        has_key = has_key.view(has_key.shape[0], *[1] * (visible.dim() - 3), *has_key.shape[2:])
        return visible | ~has_key

    def zero(self, out: Tensor) -> Tensor:
        """``out`` ``[B, H, Lq, D]`` with the rows that see no key set to zero."""
        return out if self.has_key is None else out.masked_fill(~self.has_key, 0.0)


def _visible(c: _Call, rows: _Rows, q_start: int, q_end: int, k_end: int) -> Tensor:
    """Bool ``[B or 1, 1, q_end - q_start, k_end]``: which keys each query in the block may see,
    rows that see none opened (``rows`` holds the block's rows)."""
    offset = c.k.shape[2] - c.q.shape[2]
    i_abs = torch.arange(offset + q_start, offset + q_end, device=c.q.device).view(-1, 1)
    j = torch.arange(k_end, device=c.q.device).view(1, -1)
    mask = (j <= i_abs) if c.causal else torch.ones_like(j <= i_abs)
    mask = mask.view(1, 1, *mask.shape)
    if c.distances is not None and c.distances.window is not None:
        mask = mask & _in_window(c, i_abs, j)
    if c.key_padding_mask is not None:
        mask = mask & c.key_padding_mask[:, None, None, :k_end]
    return rows.open(mask)


def _in_window(c: _Call, i_abs: Tensor, j: Tensor) -> Tensor:
    """Bool ``[1 or B, 1, Bq, keys]``: keys nearer than the rule's window, or among the first
    ``sinks`` real tokens of the row (LM-Infinite's Lambda mask, StreamingLLM's sinks)."""
    assert c.distances is not None and c.distances.window is not None
    near = (i_abs - j).abs() < c.distances.window
    if c.key_padding_mask is None:
        sink = j < c.distances.sinks
    else:  # the row's first real tokens, wherever its padding ends
        rank = c.key_padding_mask.cumsum(-1)[:, None, None, : j.shape[-1]] - 1
        sink = rank < c.distances.sinks
    return near.view(1, 1, *near.shape) | sink


def _bias(c: _Call, q0: int, q1: int, k_end: int, dtype: torch.dtype) -> Tensor:
    """The bias ``-m_h * f(d)`` of queries ``q0 .. q1 - 1`` and keys ``0 .. k_end - 1``:
    ``[1 or B, H, q1 - q0, k_end]`` (``f`` the rule's distance count, or ``d`` itself)."""
    offset = c.k.shape[2] - c.q.shape[2]
    i = torch.arange(offset + q0, offset + q1, device=c.q.device).view(-1, 1)
    d = (i - torch.arange(k_end, device=c.q.device).view(1, -1)).to(dtype)
    d = (d if c.causal else d.abs())[None]  # [1, Bq, k_end]
    if c.distances is not None:
        d = c.distances.f(d)  # [1 or B, Bq, k_end]
    return -c.slopes_BH.to(dtype)[:, :, None, None] * d[:, None]


# --- attention without ALiBi: plain causal, or an additive [H, T, S] bias (T5) ---------------


def causal_attention(
    q_BHTD: Tensor,
    k_BHSD: Tensor,
    v_BHSD: Tensor,
    *,
    bias_HTS: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Causal scaled dot-product attention; queries are the last ``T`` of the ``S`` keys.

    Args:
        q_BHTD, k_BHSD, v_BHSD: queries, keys, values.
        bias_HTS: optional additive score bias (after the ``1/sqrt(D)`` scaling).
        key_padding_mask: ``[B, S]`` bool, True = real token; masked keys are never attended.

    Returns:
        ``[B, H, T, D]``; a query that sees no key (e.g. a left pad) gets zeros, not NaN.
    """
    T, S = q_BHTD.shape[-2], k_BHSD.shape[-2]
    if bias_HTS is None and key_padding_mask is None and T == S:
        return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, is_causal=True)
    i = torch.arange(S - T, S, device=q_BHTD.device).view(-1, 1)
    j = torch.arange(S, device=q_BHTD.device).view(1, -1)
    visible = (j <= i).view(1, 1, T, S)  # [B or 1, 1, T, S]; never a float heads x T x S mask
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    rows = _Rows.of(key_padding_mask, T, causal=True)
    visible = rows.open(visible)
    if bias_HTS is not None and bias_HTS.requires_grad:  # fused kernels give a mask no gradient
        bias_HTS = bias_HTS.to(q_BHTD.dtype)
        out = _LearnedBiasAttention.apply(q_BHTD, k_BHSD, v_BHSD, bias_HTS, ~visible)
    else:
        mask = visible
        if bias_HTS is not None:
            # [B or 1, H, T, S]: four dimensions, or PyTorch skips its fused kernel.
            mask = bias_HTS.to(q_BHTD.dtype).masked_fill(~visible, float("-inf"))
        out = F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask)
    return rows.zero(out)


# Query rows per block of _LearnedBiasAttention: on CPU the scores of 128 rows stay in cache, and
# T5 training at the ALiBi paper's L=512 ran fastest at this size.
_QUERY_BLOCK = 128


class _LearnedBiasAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(D) + bias) v`` over visible keys, and its gradients, the bias's too.

    PyTorch's own fallback for a mask that needs a gradient computes every score and checks every
    row for NaN. Here queries go in blocks, each over the keys up to its last query only, which
    skips the causally hidden half of the work; the backward pass is the usual softmax one,
    accumulating key and value gradients in place.
    """

    @staticmethod
    def forward(
        ctx, q_BHTD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, bias_HTS: Tensor, hidden: Tensor
    ) -> Tensor:
        """``hidden``: bool ``[B or 1, 1, T, S]``, True where a query must not see a key."""
        T, S = q_BHTD.shape[-2], k_BHSD.shape[-2]
        # Contiguous once here, not once per block inside each matmul; q pre-scaled by 1/sqrt(D).
        q_BHTD = (q_BHTD * q_BHTD.shape[-1] ** -0.5).contiguous()
        k_BHSD, v_BHSD = k_BHSD.contiguous(), v_BHSD.contiguous()
        out_BHTD = q_BHTD.new_empty(q_BHTD.shape)
        blocks, probs = [], []
        for t0 in range(0, T, _QUERY_BLOCK):
            t1 = min(T, t0 + _QUERY_BLOCK)
            s1 = S - T + t1  # keys 0..s1-1 are all that queries t0..t1-1 can see
            mask = bias_HTS[:, t0:t1, :s1].masked_fill(hidden[..., t0:t1, :s1], float("-inf"))
            scores = q_BHTD[..., t0:t1, :] @ k_BHSD[..., :s1, :].transpose(-1, -2)
            p = torch.softmax(scores.add_(mask), dim=-1)
            out_BHTD[..., t0:t1, :] = p @ v_BHSD[..., :s1, :]
            blocks.append((t0, t1, s1))
            probs.append(p)
        ctx.save_for_backward(q_BHTD, k_BHSD, v_BHSD, out_BHTD, *probs)
        ctx.blocks, ctx.bias_shape = blocks, bias_HTS.shape
        return out_BHTD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BHTD: Tensor) -> tuple[Tensor | None, ...]:
        q_scaled, k, v, out, *probs = ctx.saved_tensors
        grad_BHTD = grad_BHTD.contiguous()
        dq, dk, dv = torch.empty_like(q_scaled), torch.zeros_like(k), torch.zeros_like(v)
        dbias = q_scaled.new_zeros(ctx.bias_shape)  # hidden keys get 0: their p_ij is 0
        # d score_ij = p_ij (d p_ij - sum_k p_ik d p_ik), and sum_k p_ik d p_ik = grad_i . out_i
        row_dot = (grad_BHTD * out).sum(-1, keepdim=True)
        for (t0, t1, s1), p in zip(ctx.blocks, probs):
            grad = grad_BHTD[..., t0:t1, :]
            dv[..., :s1, :] += p.transpose(-1, -2) @ grad
            dscores = (grad @ v[..., :s1, :].transpose(-1, -2)).sub_(row_dot[..., t0:t1, :])
            dscores = dscores.mul_(p)
            dbias[:, t0:t1, :s1] = dscores.sum(0)  # one bias for the whole batch
            dq[..., t0:t1, :] = dscores @ k[..., :s1, :]
            dk[..., :s1, :] += dscores.transpose(-1, -2) @ q_scaled[..., t0:t1, :]
        return dq.mul_(q_scaled.shape[-1] ** -0.5), dk, dv, dbias, None


# --- reference: the materialised bias, float math in the inputs' dtype --------------------------


def _reference(c: _Call) -> Tensor:
    H, Lq, Lk = c.q.shape[1], c.q.shape[2], c.k.shape[2]
    k, v = _expand_kv(c.k, H), _expand_kv(c.v, H)
    scores = (c.q @ k.transpose(-1, -2)) * c.scale  # [B, H, Lq, Lk]
    if c.distances is None:
        bias = torch.stack([alibi_bias(row.to(scores.dtype), Lq, Lk, causal=c.causal)
                            for row in c.slopes_BH])
    else:
        bias = _bias(c, 0, Lq, Lk, scores.dtype)
    scores = scores + bias  # [1 or B, H, Lq, Lk]
    if c.key_bias is not None:
        scores = scores + c.key_bias_keys(0, Lk).to(scores.dtype)
    rows = _Rows.of(c.key_padding_mask, Lq, c.causal)
    scores = scores.masked_fill(~_visible(c, rows, 0, Lq, Lk), float("-inf"))
    return rows.zero(torch.softmax(scores, dim=-1) @ v)


def _always(c: _Call) -> Optional[str]:
    return None


# --- sdpa: the per-key bias as a broadcast mask, PyTorch's fused CPU kernel ---------------------
#
# Queries are cut into blocks; each block's keys are split into segments whose ALiBi bias is a
# per-key bias (keys before the block: +m (j - centre); keys after it, bidirectional only:
# -m (j - centre)) or a small square diagonal block (causal: the per-key bias under the kernel's
# own causal mask; bidirectional: a materialised [H, Bq, Bq] bias). A per-key bias is a
# [1, H, 1, keys] mask that the kernel broadcasts over queries. Each segment is one kernel call
# that also returns its log-sum-exp, and the segments are merged exactly (as in ring or
# flash-decoding attention). The backward pass calls the kernel's backward per segment with the
# merged output and log-sum-exp, which gives each segment's exact share of the gradient.
#
# Causal attention also skips what cannot count. With slope m a key d tokens back loses m * d
# against the nearest ones, so past a window only an enormous q . k could bring it back. Each
# group of heads gets query blocks sized to its slope; a block's diagonal segment runs first,
# and its log-sum-exp is a lower bound on what each row already has. A block of keys before it
# is then left out when no score in it can come within _negligible(Lk) of that bound, by
# |q . k| <= |q| |k| with the block's largest key norm: a proof, not a guess, so a far key with
# a huge q . k is kept. The keys left out weigh less than 2e-9 of their row together (fp32). Skipped
# scores never reach exp (on some CPUs exp's subnormal results are slow), and steep heads do a
# window's work instead of the whole prefix.

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

# A logit carries m * (j - centre); fp32 keeps about 2^-24 of it, so a block is sized to keep
# m * |j - centre| <= _BIAS_BUDGET for the keys near its diagonal (error ~ 3e-5 in a logit).
_BIAS_BUDGET = 512.0
# Bidirectional diagonal blocks carry a materialised [H, Bq, Bq] bias: keep them small.
_MAX_BIDIRECTIONAL_BLOCK = 512
# Causal query blocks of a head span m * Bq <= _SKIP_SPAN of bias (at least _MIN_SKIP_BLOCK rows):
# a block's rows then need nearly the same window, and the square diagonal segment, computed
# whole, holds few scores that do not count.
_SKIP_SPAN = 64.0
_MIN_SKIP_BLOCK = 2048
# Keys are bounded in blocks of this many (one largest norm each).
_KEY_BLOCK = 64
# Query rows share one bound in chunks of this many (their bias differs by m * 8 at most).
_ROW_CHUNK = 8


@dataclass(frozen=True)
class _Segment:
    q0: int  # query rows [q0, q1)
    q1: int
    k0: int  # keys [k0, k1)
    k1: int
    sign: int  # per-key bias sign * m * (j - centre); 0: diagonal block with materialised bias
    causal: bool  # square diagonal block under the kernel's own causal mask
    centre: int
    h0: int = 0  # query heads [h0, h1); h1 = 0: every head
    h1: int = 0

    def heads(self, n_heads: int) -> slice:
        return slice(self.h0, self.h1 or n_heads)


def _block_size(c: _Call) -> int:
    steepest = float(c.slopes.abs().max()) if c.slopes.numel() else 0.0
    return _block_for_slope(steepest, c.q.shape[2], c.causal)


def _block_for_slope(m: float, n_queries: int, causal: bool) -> int:
    """Query rows per block that keep ``m * |j - centre| <= _BIAS_BUDGET`` near the diagonal."""
    if m <= 16.0:
        block = n_queries if m == 0.0 else 1 << int(math.log2(2 * _BIAS_BUDGET / m))
        return max(64, block if causal else min(block, _MAX_BIDIRECTIONAL_BLOCK))
    # Slopes past 16 (no trained model has them; a key one step back already weighs e^-16 less):
    # blocks shrink, down to one query, so the budget still holds near the diagonal.
    return 1 << max(0, math.floor(math.log2(2 * _BIAS_BUDGET / m)))


def _head_groups(c: _Call) -> list[tuple[int, int, int]]:
    """``(h0, h1, block)``: runs of consecutive heads that share a causal query block size."""
    Lq = c.q.shape[2]
    if c.key_bias is None and Lq <= _MIN_SKIP_BLOCK and _block_size(c) >= Lq:
        return [(0, c.q.shape[1], Lq)]  # one block covers every head: no loop over the heads
    steep = c.slopes_BH.abs().amax(0)  # each head's steepest row
    fall = steep
    if c.key_bias is not None and c.k.shape[2] > 1:
        # A key_bias that grows along the keys is a per-key ALiBi (Falcon's, or BLOOM's with
        # padding, under zero slopes): its mean growth sizes the blocks as a slope would, so its
        # far keys can be skipped too. Only the block size: the skip's proof reads key_bias itself.
        kb = c.key_bias
        growth = ((kb[..., -1] - kb[..., 0]) / (c.k.shape[2] - 1)).amax(0)
        fall = torch.maximum(steep, growth)
    groups: list[tuple[int, int, int]] = []
    for h, (m, f) in enumerate(zip(steep.tolist(), fall.tolist())):
        block = _block_for_slope(m, Lq, True)
        if 0.0 < f <= 16.0:
            block = min(block, max(_MIN_SKIP_BLOCK, 1 << int(math.log2(_SKIP_SPAN / f))))
        block = min(block, Lq)
        if groups and groups[-1][2] == block:
            groups[-1] = (groups[-1][0], h + 1, block)
        else:
            groups.append((h, h + 1, block))
    return groups


def _segments(c: _Call) -> list[_Segment]:
    """Bidirectional attention's segments (causal ones are chosen as the forward runs)."""
    Lq, Lk = c.q.shape[2], c.k.shape[2]
    offset, block = Lk - Lq, _block_size(c)
    segs = []
    for q0 in range(0, Lq, block):
        q1 = min(Lq, q0 + block)
        a, b = offset + q0, offset + q1  # absolute positions of the block
        centre = (a + b - 1) // 2
        if a > 0:
            segs.append(_Segment(q0, q1, 0, a, 1, False, centre))
        segs.append(_Segment(q0, q1, a, b, 0, False, centre))
        if b < Lk:
            segs.append(_Segment(q0, q1, b, Lk, -1, False, centre))
    return segs


def _segment_mask(c: _Call, s: _Segment) -> Tensor:
    """The segment's additive mask: ``[1 or B, heads, 1, keys]`` per-key bias (broadcast over
    queries), or ``[1 or B, heads, Bq, Bq]`` for a bidirectional diagonal block; plus
    ``key_bias``, which every segment carries whole (so it moves no segment's frame); padded keys
    -inf."""
    device, dtype = c.q.device, c.slopes.dtype
    heads = s.heads(c.q.shape[1])
    slopes = c.slopes_BH[:, heads]
    j = torch.arange(s.k0, s.k1, device=device, dtype=dtype)
    if s.sign != 0:
        mask = (s.sign * slopes)[:, :, None, None] * (j - s.centre).view(1, 1, 1, -1)
    else:
        offset = c.k.shape[2] - c.q.shape[2]
        i = torch.arange(offset + s.q0, offset + s.q1, device=device, dtype=dtype)
        mask = -slopes[:, :, None, None] * (i.view(-1, 1) - j.view(1, -1)).abs()
    if c.key_bias is not None:
        mask = mask + c.key_bias_keys(s.k0, s.k1)[:, heads]
    if c.key_padding_mask is not None:
        pad = ~c.key_padding_mask[:, None, None, s.k0 : s.k1]
        mask = mask.masked_fill(pad, float("-inf"))
    return mask


def _segment_empty_rows(c: _Call, s: _Segment) -> Optional[Tensor]:
    """``[B, 1, q1 - q0]`` True where a query sees no key of the segment (only with padding)."""
    if c.key_padding_mask is None:
        return None
    real = c.key_padding_mask[:, s.k0 : s.k1]
    if s.causal:  # row r sees keys k0 .. k0 + r
        return (real.cumsum(-1) == 0)[:, None, :]
    return (~real.any(-1)).view(-1, 1, 1).expand(-1, 1, s.q1 - s.q0)


def _frame_shift(c: _Call, s: _Segment) -> Tensor:
    """``[1 or B, heads, q1 - q0]``: added to a segment's kernel log-sum-exp to put all segments
    of a block on one scale, the true logits minus ``m * (centre - i)``.

    A per-key segment scores ``sign * m * (j - centre)``, the true bias minus
    ``sign * m * (centre - i)``; a materialised one (sign 0) scores the true bias.
    """
    offset = c.k.shape[2] - c.q.shape[2]
    i = torch.arange(offset + s.q0, offset + s.q1, device=c.q.device, dtype=c.slopes.dtype)
    slopes = c.slopes_BH[:, s.heads(c.q.shape[1])]
    return (s.sign - 1) * slopes[:, :, None] * (s.centre - i).view(1, 1, -1)


def _run_segment(c: _Call, q: Tensor, k: Tensor, v: Tensor, s: _Segment):
    """One fused-kernel call: the segment's output and its log-sum-exp in the block's frame."""
    heads = s.heads(q.shape[1])
    o_s, l_s = _FLASH_CPU(
        q[:, heads, s.q0 : s.q1], k[:, heads, s.k0 : s.k1], v[:, heads, s.k0 : s.k1], 0.0,
        s.causal, attn_mask=_segment_mask(c, s), scale=c.scale,
    )
    if s.sign != 1:  # causal segments all share one frame
        l_s = l_s + _frame_shift(c, s)
    empty = _segment_empty_rows(c, s)
    if empty is not None:  # the kernel reports lse 0 (and output 0) for a row that sees no key
        l_s = l_s.masked_fill(empty, float("-inf"))
    return o_s, l_s


def _merge(acc: tuple[Tensor, Tensor], part: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Two parts of the same rows, merged by their softmax weights (log-sum-exp)."""
    (o_acc, l_acc), (o_s, l_s) = acc, part
    w = torch.nan_to_num(torch.sigmoid(l_s - l_acc)).unsqueeze(-1)
    return torch.lerp(o_acc, o_s, w), torch.logaddexp(l_acc, l_s)


def _bias_forward(c: _Call, q: Tensor, k: Tensor, v: Tensor):
    """Output ``[B, H, Lq, D]``, log-sum-exp ``[B, H, Lq]`` (in each block's frame) and the
    segments that were run."""
    if c.causal:
        return _causal_forward(c, q, k, v)
    segs = _segments(c)
    outs, lses = [], []
    for n, s in enumerate(segs):
        o_s, l_s = _run_segment(c, q, k, v, s)
        if n and s.q0 == segs[n - 1].q0:
            outs[-1], lses[-1] = _merge((outs[-1], lses[-1]), (o_s, l_s))
        else:
            outs.append(o_s)
            lses.append(l_s)
    if len(outs) == 1:
        return outs[0], lses[0], segs
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2), segs


def _block_max(x: Tensor, fill: float) -> Tensor:
    """``[..., L]`` to ``[..., ceil(L / _KEY_BLOCK)]``: each block's largest value (nan if any)."""
    pad = -x.shape[-1] % _KEY_BLOCK
    n = (x.shape[-1] + pad) // _KEY_BLOCK  # (not -1 in view: an empty batch makes it ambiguous)
    return F.pad(x, (0, pad), value=fill).view(*x.shape[:-1], n, _KEY_BLOCK).amax(-1)


class _KeyBounds:
    """Per block of ``_KEY_BLOCK`` keys, what bounds any score with them: the largest key norm
    ``[B, H, n]`` and the largest ``key_bias`` ``[B or 1, H, n]`` (padded keys: norm 0 and
    -inf, so an all-padded block never counts), and each query's norm ``[B, H, Lq]``."""

    def __init__(self, c: _Call, q: Tensor, k: Tensor):
        norms = torch.linalg.vector_norm(k, dim=-1)  # [B, H, Lk]
        extra = torch.zeros(1, k.shape[1], k.shape[2], dtype=norms.dtype, device=norms.device)
        if c.key_bias is not None:
            extra = c.key_bias.to(norms.dtype)
        if c.key_padding_mask is not None:
            real = c.key_padding_mask[:, None, :]
            norms, extra = norms.masked_fill(~real, 0.0), extra.masked_fill(~real, float("-inf"))
        self.key_norm = _block_max(norms, 0.0)
        self.key_extra = _block_max(extra, float("-inf"))
        self.query_norm = torch.linalg.vector_norm(q, dim=-1) * abs(c.scale)


class KeyNorms:
    """The largest norm in each block of 64 keys of a KV cache, ``[B, Hkv, blocks]``.

    Kept beside the cache, it lets a decoding step bound every score of a block without reading
    the block's keys, and so leave out, unread, the keys that cannot count (with ALiBi, most of
    a long cache for all but the flattest heads). ``linbias.model.KVCache`` keeps one per layer;
    with a cache of your own, build it with ``KeyNorms.of(k)`` and after each append replace it
    with ``norms.extended(k)`` (only the blocks the new keys touch are read).
    """

    def __init__(self, block_max: Tensor, n_keys: int) -> None:
        self.block_max, self.n_keys = block_max, n_keys

    @staticmethod
    def of(k: Tensor) -> "KeyNorms":
        """The norms of ``k`` ``[B, Hkv, Lk, D]``, computed in at least float32."""
        work = torch.promote_types(k.dtype, torch.float32)
        return KeyNorms(_block_max(torch.linalg.vector_norm(k, dim=-1, dtype=work), 0.0),
                        k.shape[2])

    def extended(self, k: Tensor) -> "KeyNorms":
        """The norms of ``k``, the cache after an append: its first ``n_keys`` keys must be the
        ones these norms were computed from."""
        if k.shape[:2] != self.block_max.shape[:2] or k.shape[2] < self.n_keys:
            raise ValueError(f"KeyNorms of {self.n_keys} keys in {tuple(self.block_max.shape[:2])} "
                             f"(batch, heads) cannot extend to keys of shape {tuple(k.shape)}: "
                             "build them anew with KeyNorms.of(k)")
        start = self.n_keys // _KEY_BLOCK  # the first block the new keys touch
        fresh = KeyNorms.of(k[:, :, start * _KEY_BLOCK :]).block_max
        return KeyNorms(torch.cat((self.block_max[..., :start], fresh), -1), k.shape[2])


def _prefix_runs(
    c: _Call, bounds: _KeyBounds, lse: Tensor, h0: int, h1: int, q0: int, q1: int, centre: int
) -> list[tuple[int, int]]:
    """The runs of keys before the block ``[q0, q1)`` (heads ``[h0, h1)``) that may count.

    ``lse`` ``[B, heads, q1 - q0]`` is the diagonal segment's log-sum-exp in the block's frame,
    where key ``j`` scores ``scale q . k_j + m (j - centre) + key_bias_j``. A key block is left
    out when for every row ``|scale| |q| max|k| + max(m (j - centre)) + max key_bias`` stays
    ``_negligible(Lk)`` below that row's lse. Comparisons are written so that nan counts."""
    a = c.k.shape[2] - c.q.shape[2] + q0
    n = -(-a // _KEY_BLOCK)  # key blocks before the block's first key (the last may overlap it)
    A = bounds.query_norm[:, h0:h1, q0:q1]
    rows = A.shape[-1]
    chunk = -(-rows // _ROW_CHUNK)
    pad = chunk * _ROW_CHUNK - rows
    A = F.pad(A, (0, pad)).view(*A.shape[:2], chunk, _ROW_CHUNK).amax(-1)  # [B, h, chunks]
    low = F.pad(lse, (0, pad), value=float("inf")).view(*lse.shape[:2], chunk, _ROW_CHUNK)
    low = low.amin(-1)
    K = bounds.key_norm[:, h0:h1, :n]  # [B, h, n]
    # max over rows of (|q| |k| - lse): [B, h, n]
    worst = (A[..., :, None] * K[..., None, :] - low[..., :, None]).amax(-2)
    j_first = torch.arange(n, device=K.device, dtype=K.dtype) * _KEY_BLOCK
    j_last = torch.clamp(j_first + (_KEY_BLOCK - 1), max=a - 1)
    m = c.slopes_BH[:, h0:h1, None].to(K.dtype)
    slope_term = torch.maximum(m * (j_first - centre), m * (j_last - centre))
    bound = worst + slope_term + bounds.key_extra[:, h0:h1, :n]
    counts = ~(bound < -_negligible(c.k.shape[2], lse.dtype))  # [B, h, n]; nan counts
    needed = counts.view(-1, n).any(0).tolist()
    runs: list[tuple[int, int]] = []
    for i, need in enumerate(needed):
        if not need:
            continue
        k0, k1 = i * _KEY_BLOCK, min(a, (i + 1) * _KEY_BLOCK)
        if runs and k0 - runs[-1][1] <= 2 * _KEY_BLOCK:  # a short gap: one call is cheaper
            runs[-1] = (runs[-1][0], k1)
        else:
            runs.append((k0, k1))
    return runs


def _causal_forward(c: _Call, q: Tensor, k: Tensor, v: Tensor):
    """Causal attention by head group and query block: each block's diagonal segment, then the
    runs of earlier keys that may count (see above)."""
    B, H, Lq, D = q.shape
    offset = k.shape[2] - Lq
    groups = _head_groups(c)
    if offset == 0 and groups == [(0, H, Lq)]:  # one segment: the kernel's output as it is
        whole = _Segment(0, Lq, 0, Lq, 1, True, (Lq - 1) // 2, 0, H)
        return (*_run_segment(c, q, k, v, whole), [whole])
    # [B, Lq, H, D] in memory, as the kernel writes it: a model's transpose back is free.
    out, lse = q.new_empty(B, Lq, H, D).transpose(1, 2), q.new_empty(B, H, Lq)
    segs: list[_Segment] = []
    bounds = None
    for h0, h1, block in groups:
        for q0 in range(0, Lq, block):
            q1 = min(Lq, q0 + block)
            a, b = offset + q0, offset + q1
            centre = (a + b - 1) // 2
            diag = _Segment(q0, q1, a, b, 1, True, centre, h0, h1)
            acc = _run_segment(c, q, k, v, diag)
            segs.append(diag)
            if a > 0:
                bounds = bounds or _KeyBounds(c, q, k)
                for k0, k1 in _prefix_runs(c, bounds, acc[1], h0, h1, q0, q1, centre):
                    s = _Segment(q0, q1, k0, k1, 1, False, centre, h0, h1)
                    acc = _merge(acc, _run_segment(c, q, k, v, s))
                    segs.append(s)
            out[:, h0:h1, q0:q1], lse[:, h0:h1, q0:q1] = acc
    return out, lse, segs


class _BiasAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, call: _Call, rows: _Rows) -> Tensor:
        out, lse, segs = _bias_forward(call, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.segs, ctx.rows = call, segs, rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        c, seen = ctx.call, ctx.rows
        if seen.has_key is not None:  # rows that see no key: zero output, zero gradient
            lse, grad_out = lse.masked_fill(~seen.has_key[..., 0], 0.0), seen.zero(grad_out)
        grad_out = _kernel_layout(grad_out, grad_out.dtype)
        grads: dict[str, Tensor] = {}
        for s in ctx.segs:
            heads, rows, keys = s.heads(q.shape[1]), slice(s.q0, s.q1), slice(s.k0, s.k1)
            lse_s = lse[:, heads, rows]
            lse_s = lse_s if s.sign == 1 else lse_s - _frame_shift(c, s)
            dq_s, dk_s, dv_s = _FLASH_CPU_BWD(
                grad_out[:, heads, rows], q[:, heads, rows], k[:, heads, keys], v[:, heads, keys],
                out[:, heads, rows], lse_s.contiguous(), 0.0, s.causal,
                attn_mask=_segment_mask(c, s), scale=c.scale,
            )
            if dq_s.shape == q.shape and dk_s.shape == k.shape and not grads:
                return dq_s, dk_s, dv_s, None, None  # one segment covers all: no zeros, no copy
            if not grads:
                grads = {name: torch.zeros_like(t) for name, t in (("q", q), ("k", k), ("v", v))}
            grads["q"][:, heads, rows] += dq_s
            grads["k"][:, heads, keys] += dk_s
            grads["v"][:, heads, keys] += dv_s
        return grads["q"], grads["k"], grads["v"], None, None


def _kernel_layout(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, copied only if the fused kernel cannot read it.

    The kernel takes any batch, head and row strides (a ``[B, T, H, D]`` view transposed to
    ``[B, H, T, D]``, expanded heads, every other row) but reads each row of ``D`` values as
    packed memory: for ``stride(-1) != 1`` it silently returns wrong numbers.
    """
    x = x if x.dtype == dtype else x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


# --- sdpa, decode-shaped calls: the whole bias, one kernel call --------------------------------
#
# A decoding step has one query (or a few) against a long KV cache. Its whole bias is
# ``[B or 1, H, Lq, Lk]``, linear in the context (for one query it is exactly the per-key bias the
# segments above would build), so the segment machinery buys nothing: its fixed cost per call
# (a block size read from the slopes, segment bookkeeping, slicing, the raw kernel's dispatch) was
# as long as the kernel itself at a 1k-token cache. This is part of the sdpa backend, not a backend
# of its own: the same kernel, device and gradients, only cheaper for a few queries. Grouped heads
# fold into query rows (``[B, Hkv, group * Lq, D]`` against the unexpanded cache), so the cache is
# never copied per group. The bias is the exact ``m * (j - i)``, not a folded one: no precision
# is lost.

# Past a few queries, materialising the bias costs more than the segments' fixed cost (one thread,
# H 8, D 64: with 16k keys, 4 queries take 1.03x the segments' time, 8 queries 1.23x; with 1k keys,
# 0.83x and 0.95x). At 4 queries the bias is at most 4 H Lk floats, 1/16 of a D = 64 key cache.
_DECODE_MAX_QUERIES = 4


def _decode(c: _Call, rows: _Rows, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``[B, H, Lq, D]`` from inputs already in the kernel's layout and working dtype."""
    B, H, Lq, D = q.shape
    Hkv, Lk, group = k.shape[1], k.shape[2], H // k.shape[1]
    # The kernel adds its mask to q . k, so a nan in a future key would reach the rows before it;
    # the scores route masks after. Only the last Lq - 1 keys can be future ones: a cheap check.
    future_nan = Lq > 1 and c.causal and not bool(torch.isfinite(k[:, :, Lk - Lq + 1 :]).all())
    if not future_nan and _can_skip_keys(c, k):
        keep = _decode_blocks(c, rows, q, k)
        if keep.float().mean() <= _DECODE_SKIP_SHARE:
            return rows.zero(_decode_skip(c, rows, q, k, v, keep))
    j_minus_i = torch.arange(Lq - Lk, Lq, device=q.device, dtype=q.dtype)  # [Lk], first query
    if Lq > 1:
        j_minus_i = j_minus_i - torch.arange(Lq, device=q.device, dtype=q.dtype).view(-1, 1)
    # [1 or B, Hkv, group, Lq, Lk]: head h = kv_head * group + g, as in _expand_kv.
    bias = c.slopes_BH.view(-1, Hkv, group, 1, 1) * (j_minus_i if c.causal else -j_minus_i.abs())
    if c.key_bias is not None:
        bias = bias + c.key_bias.reshape(-1, Hkv, group, 1, Lk)
    visible = (j_minus_i <= 0) if c.causal and Lq > 1 else None  # [Lq, Lk] no future keys
    if c.key_padding_mask is not None:
        real = c.key_padding_mask[:, None, :]  # [B, 1, Lk]
        visible = rows.open(real if visible is None else real & visible)  # [B, Lq or 1, Lk]
    if visible is not None:
        visible = visible.view(-1, 1, 1, *visible.shape[-2:])
    if future_nan:
        return rows.zero(_decode_window(c, q, k, v, bias, visible))
    if visible is not None:  # after the product: a zero slope times -inf would be nan
        bias = bias.masked_fill(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.reshape(B, Hkv, group * Lq, D), k, v, attn_mask=bias.flatten(2, 3), scale=c.scale
    ).reshape(B, H, Lq, D)
    return rows.zero(out)


# A decoding step given the cache's KeyNorms leaves out, unread, the blocks of keys that cannot
# count: the last two blocks are scored exactly, which bounds each row's log-sum-exp from below,
# and an earlier block is left out when |scale| |q| max|k| + m (j - i) + key_bias stays
# _negligible(Lk) below that bound for every row and head of its key head (the forward's proof,
# with the cache's norms instead of a pass over the keys). Under this many elements of keys
# (B Hkv Lk D: 16k keys of 8 heads of 64) one kernel call over the whole cache is cheaper than the
# bookkeeping and a call per key head, which runs on one thread when B is 1 (2 threads, AMD EPYC:
# 8 heads of 64 at 8k keys, 1.46x plain against the one call's 1.15x; 4 heads of 32 at 16k keys,
# 2.0x against 1.3x; at this many elements 0.5-0.7x and 0.3x against 1.05-1.2x).
_DECODE_SKIP_ELEMENTS = 1 << 23
# ... and when the heads together keep more than this share of the blocks (interpolated slopes
# widen every window to the whole cache), the one call is cheaper too: a call per key head over
# nearly every key measured 1.29x plain at 64k keys against the one call's 1.04x.
_DECODE_SKIP_SHARE = 0.5


def _can_skip_keys(c: _Call, k: Tensor) -> bool:
    return (c.key_norms is not None and c.causal and k.numel() >= _DECODE_SKIP_ELEMENTS
            and bool((c.slopes >= 0).all()))


def _decode_bias(c: _Call, rows: _Rows, heads: slice, j: Tensor, n_queries: int) -> Tensor:
    """``[1 or B, heads, Lq, n]``: the exact causal bias of the last ``Lq`` queries with keys
    ``j`` ``[n]`` (positions), ``key_bias`` added, keys a row does not see at -inf."""
    Lk = c.k.shape[2]
    i = torch.arange(Lk - n_queries, Lk, device=j.device, dtype=c.slopes.dtype)
    jf = j.to(c.slopes.dtype)
    bias = c.slopes_BH[:, heads, None, None] * (jf.view(1, -1) - i.view(-1, 1))
    if c.key_bias is not None:
        bias = bias + c.key_bias[:, heads, None, :].index_select(-1, j)
    visible = (jf.view(1, -1) <= i.view(-1, 1)) if n_queries > 1 else None  # [Lq, n]
    if c.key_padding_mask is not None:
        real = c.key_padding_mask.index_select(1, j)[:, None, :]  # [B, 1, n]
        visible = rows.open(real if visible is None else real & visible)  # [B, Lq or 1, n]
    if visible is not None:  # [1 or B, 1, Lq or 1, n] (indexing, not view(-1): n may be 0)
        visible = visible[None] if visible.dim() == 2 else visible
        bias = bias.masked_fill(~visible[:, None], float("-inf"))
    return bias


def _decode_blocks(c: _Call, rows: _Rows, q: Tensor, k: Tensor) -> Tensor:
    """``[Hkv, blocks]`` bool: the blocks of ``_KEY_BLOCK`` keys that may count (see above)."""
    B, H, Lq, D = q.shape
    Hkv, Lk, group = k.shape[1], k.shape[2], H // k.shape[1]
    norms = c.key_norms.block_max.to(q.dtype)  # [B, Hkv, nb]
    nb = norms.shape[-1]
    recent = max(0, nb - 2)  # the blocks scored exactly
    j = torch.arange(recent * _KEY_BLOCK, Lk, device=q.device)
    qk = q.reshape(B, Hkv, group * Lq, D) @ k[:, :, recent * _KEY_BLOCK :].transpose(-1, -2)
    scores = qk.view(B, H, Lq, -1) * c.scale + _decode_bias(c, rows, slice(None), j, Lq)
    lse = torch.logsumexp(scores, -1).view(B, Hkv, group, Lq)  # -inf: the row sees none of them
    reach = torch.linalg.vector_norm(q, dim=-1).view(B, Hkv, group, Lq) * abs(c.scale)
    worst = (reach[..., None] * norms[:, :, None, None, :] - lse[..., None]).amax(-2)
    j_last = torch.clamp(torch.arange(nb, device=q.device) * _KEY_BLOCK + _KEY_BLOCK - 1,
                         max=Lk - 1).to(q.dtype)
    bound = worst + c.slopes_BH.to(q.dtype).view(-1, Hkv, group, 1) * (j_last - (Lk - Lq))
    if c.key_bias is not None or c.key_padding_mask is not None:
        extra = (c.key_bias if c.key_bias is not None else q.new_zeros(1, H, Lk)).to(q.dtype)
        if c.key_padding_mask is not None:
            extra = extra.masked_fill(~c.key_padding_mask[:, None, :], float("-inf"))
        bound = bound + _block_max(extra, float("-inf")).view(-1, Hkv, group, nb)
    counts = ~(bound < -_negligible(Lk, q.dtype))  # [B, Hkv, group, nb]; nan counts
    keep = counts.any(0).any(1)  # [Hkv, nb]
    keep[:, recent:] = True
    return keep


def _decode_skip(c: _Call, rows: _Rows, q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """A decoding step over the key blocks that may count (see above): one kernel call per key
    head, on views of the cache and of one bias built for all heads, unless a head keeps blocks
    with a gap between them (a far key with a huge score), whose keys are gathered."""
    B, H, Lq, D = q.shape
    Hkv, Lk, group = k.shape[1], k.shape[2], H // k.shape[1]
    first = keep.int().argmax(-1)  # [Hkv] each key head's first kept block
    one_run = keep.cumsum(-1).gt(0).eq(keep).all(-1)  # [Hkv] kept from the first block on
    starts = (first * _KEY_BLOCK).tolist()
    j0 = min(s for s, whole in zip(starts, one_run.tolist()) if whole) if one_run.any() else Lk
    bias = _decode_bias(c, rows, slice(None), torch.arange(j0, Lk, device=q.device), Lq)
    outs = []
    for g, (start, whole) in enumerate(zip(starts, one_run.tolist())):
        heads = slice(g * group, (g + 1) * group)
        if whole:
            kg, vg, bg = k[:, g : g + 1, start:], v[:, g : g + 1, start:], bias[:, heads, :, start - j0 :]
        else:
            jg = (keep[g].nonzero() * _KEY_BLOCK + torch.arange(_KEY_BLOCK, device=q.device))
            jg = jg.flatten()[jg.flatten() < Lk]
            kg, vg = k[:, g : g + 1].index_select(2, jg), v[:, g : g + 1].index_select(2, jg)
            bg = _decode_bias(c, rows, heads, jg, Lq)
        out = F.scaled_dot_product_attention(
            q[:, heads].reshape(B, 1, group * Lq, D), kg, vg,
            attn_mask=bg.reshape(bg.shape[0], 1, group * Lq, -1), scale=c.scale)
        outs.append(out.view(B, group, Lq, D))
    return torch.cat(outs, 1)


# A decoding step whose future keys hold nan computes its scores itself and masks after the
# product, so that the nan reaches only the rows that see it.
def _decode_window(
    c: _Call, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, visible: Optional[Tensor]
) -> Tensor:
    """A decoding step through explicit scores, over the keys from the first one that counts."""
    B, H, Lq, D = q.shape
    Hkv, Lk, group = k.shape[1], k.shape[2], H // k.shape[1]
    # k @ q^T reads the cache row by row (q @ k^T through a transposed view was 1.2x slower).
    qk = (k @ q.reshape(B, Hkv, group * Lq, D).transpose(-1, -2)).transpose(-1, -2)
    scores = torch.add(bias, qk.view(B, Hkv, group, Lq, Lk), alpha=c.scale)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    j0 = _first_key_that_counts(scores)
    p = torch.softmax(scores[..., j0:], dim=-1).view(B, Hkv, group * Lq, Lk - j0)
    return (p @ v[:, :, j0:]).view(B, H, Lq, D)


def _negligible(n_keys: int, dtype: torch.dtype) -> float:
    """How far below its row's best a score must be to be left out: the ``n_keys`` left out then
    weigh less than ``eps(dtype) / 50`` of the row together (fp32: e^-20, 2e-9), below the
    rounding of its result."""
    return math.log(max(n_keys, 1)) - math.log(torch.finfo(dtype).eps) + 4.0


def _first_key_that_counts(scores: Tensor) -> int:
    """The first key whose score, in any row of ``scores`` ``[..., Lk]``, is within
    ``_negligible(Lk)`` of that row's best. A nan score counts (so that nan reaches the output)."""
    Lk = scores.shape[-1]
    best = scores.amax(-1, keepdim=True)
    counts = ~(scores < best - _negligible(Lk, scores.dtype))  # nan in a score or its row's best: True
    return int(counts.view(-1, Lk).any(0).int().argmax())


def _sdpa(c: _Call) -> Tensor:
    if c.scale < torch.finfo(torch.float32).tiny:
        # The fused kernel writes its causal mask into q . k as -inf before scaling: a scale of 0
        # or below (or one that rounds to 0 in fp32) would turn it into nan or +inf. Such a scale
        # goes into q instead.
        c = replace(c, q=c.q * c.scale, scale=1.0)
    # Half-precision inputs run in fp32 (the dtype of c.slopes): the bias needs its mantissa.
    H, dtype, work = c.q.shape[1], c.q.dtype, c.slopes.dtype
    rows = _Rows.of(c.key_padding_mask, c.q.shape[2], c.causal)
    if c.q.shape[2] <= _DECODE_MAX_QUERIES:
        out = _decode(c, rows, *(_kernel_layout(t, work) for t in (c.q, c.k, c.v)))
        return out if out.dtype == dtype else out.to(dtype)
    q, k, v = (_kernel_layout(t, work) for t in (c.q, _expand_kv(c.k, H), _expand_kv(c.v, H)))
    if c.needs_grad:
        out = _BiasAttention.apply(q, k, v, c, rows)
    else:
        out = _bias_forward(c, q, k, v)[0]
    # No rows.zero here: every segment of a row that sees no key gives 0 (and lse -inf), so the
    # merged row is already 0; tests check it against the reference.
    return out if out.dtype == dtype else out.to(dtype)


_BENT = "a rule's distance count (cap, window, selfextend) is not a per-key bias; use 'blocked'"


def _sdpa_unavailable(c: _Call) -> Optional[str]:
    if c.distances is not None:
        return _BENT
    if _FLASH_CPU is None or _FLASH_CPU_BWD is None:
        return "this PyTorch build has no fused CPU attention kernel"
    if c.q.device.type != "cpu":
        return f"the per-key-bias kernel is CPU-only (inputs are on {c.q.device.type})"
    if c.slopes_need_grad:
        return "its fused kernel gives no gradient for slopes (use 'blocked' to learn them)"
    if c.key_bias_needs_grad:
        return "its fused kernel gives no gradient for key_bias (use 'blocked' to learn it)"
    return None


# --- blocked: the bias materialised one block of queries at a time, any device -----------------

_BLOCK_ELEMENTS = 1 << 24  # cap on H * Bq * Lk elements of bias per block
# Query rows per block under a rule's distance count (cap, window, selfextend): those rules run
# at lengths far past L, where a block of every query would be the L' x L' bias.
_DISTANCE_BLOCK = 256


def _blocked(c: _Call) -> Tensor:
    B, H, Lq, _ = c.q.shape
    Lk, offset = c.k.shape[2], c.k.shape[2] - Lq
    k, v = _expand_kv(c.k, H), _expand_kv(c.v, H)
    rows = _Rows.of(c.key_padding_mask, Lq, c.causal)
    block = max(1, min(Lq, _BLOCK_ELEMENTS // max(1, H * Lk)))
    if c.distances is not None:  # inference past L: memory linear in L', at any L'
        block = min(block, _DISTANCE_BLOCK)
    # SDPA adds its mask to q . k: a nan or inf key hidden from a row would still poison it.
    finite_keys = bool(torch.isfinite(c.k).all())
    outs = []
    for q0 in range(0, Lq, block):
        q1 = min(Lq, q0 + block)
        k_end = offset + q1 if c.causal else Lk
        bias = _bias(c, q0, q1, k_end, c.slopes.dtype)  # [1 or B, H, Bq, k_end]
        if c.key_bias is not None:
            bias = bias + c.key_bias_keys(0, k_end)
        hidden = ~_visible(c, rows.block(q0, q1), q0, q1, k_end)
        qb, kb, vb = c.q[:, :, q0:q1], k[:, :, :k_end], v[:, :, :k_end]
        if finite_keys:
            bias = bias.to(c.q.dtype).masked_fill(hidden, float("-inf"))
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=c.scale)
        else:  # a nan key j must reach rows >= j only: mask the scores after q . k, not before
            scores = (qb @ kb.transpose(-1, -2)) * c.scale + bias.to(c.q.dtype)
            out = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) @ vb
        outs.append(rows.block(q0, q1).zero(out))
    return torch.cat(outs, dim=2)


# --- flex: PyTorch FlexAttention with a score function and a block mask ------------------------

_flex_compiled = None


def _flex(c: _Call) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _flex_compiled
    if _flex_compiled is None:
        # Default dynamic-shape handling: after the first new length, lengths become symbolic,
        # so new shapes do not recompile (past the recompile limit torch would silently fall
        # back to an unfused flex_attention that materialises the scores).
        _flex_compiled = torch.compile(flex_attention)
    B, H, Lq, _ = c.q.shape
    Lk = c.k.shape[2]
    kpm, causal = c.key_padding_mask, c.causal
    # The queries' offset as a tensor: CPU inductor (torch 2.13) fails to compile a score_mod or
    # mask_mod whose offset is a symbolic int, which the second length (dynamic shapes) makes it.
    shift = torch.tensor(Lk - Lq, device=c.q.device)
    slopes = c.slopes_BH.expand(B, H).contiguous()  # indexed by row and head in score_mod
    key_bias = c.key_bias

    # Padded keys get -inf in the key bias, not in mask_mod: CPU inductor (torch 2.13) fails to
    # compile a second captured tensor of keys once their length is symbolic. (Tiles with no
    # real key are left out by the block mask; a row that sees none is zeroed after.)
    if kpm is not None:
        zero = c.q.new_zeros(1, H, Lk, dtype=c.slopes.dtype)
        key_bias = (zero if key_bias is None else key_bias).masked_fill(
            ~kpm[:, None, :], float("-inf"))
    if key_bias is not None:
        key_bias = key_bias.expand(B, H, Lk).contiguous()

    def score_mod(score, b, h, q_idx, kv_idx):
        dist = q_idx - kv_idx + shift
        dist = dist if causal else dist.abs()
        score = score - slopes[b, h] * dist
        return score if key_bias is None else score + key_bias[b, h, kv_idx]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx - q_idx <= shift) if causal else (kv_idx >= 0)

    out = _flex_compiled(
        c.q, c.k, c.v, score_mod=score_mod, block_mask=_flex_block_mask(c, mask_mod),
        scale=c.scale, enable_gqa=c.k.shape[1] != H,
    )
    return _Rows.of(kpm, Lq, causal).zero(out)


# FlexAttention's default block: its block mask keeps or drops whole 128 x 128 tiles.
_FLEX_BLOCK = 128


def _flex_block_mask(c: _Call, visible: Callable):
    """FlexAttention's ``BlockMask``, built from facts per tile in ``O(B H Lq Lk / 128^2)``
    (``create_block_mask`` would call ``mask_mod`` on all ``B H Lq Lk`` pairs: on CPU, a bool
    tensor of that size). A tile is left out when no query of it sees a key of it, or (causal)
    when none of its scores can count (``_flex_needed_blocks``); it is full, ``visible`` not
    evaluated, when every query of it sees every key of it; the rest are partial."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H, Lq, _ = c.q.shape
    Lk, n, dev = c.k.shape[2], _FLEX_BLOCK, c.q.device
    nq, nk = -(-Lq // n), -(-Lk // n)
    q_first = torch.arange(nq, device=dev) * n + (Lk - Lq)  # absolute positions
    q_last = torch.clamp(q_first + (n - 1), max=Lk - 1)
    k_first = torch.arange(nk, device=dev) * n
    k_last = torch.clamp(k_first + (n - 1), max=Lk - 1)
    inside = (q_last - q_first == n - 1)[:, None] & (k_last - k_first == n - 1)[None, :]
    if c.causal:
        some, every = k_first[None, :] <= q_last[:, None], k_last[None, :] <= q_first[:, None]
    else:
        some = every = torch.ones(nq, nk, dtype=torch.bool, device=dev)
    some, every = some[None, None], (every & inside)[None, None]  # [1, 1, nq, nk]
    if c.key_padding_mask is not None:
        real = F.pad(c.key_padding_mask, (0, nk * n - Lk)).view(-1, 1, 1, nk, n)
        some, every = some & real.any(-1), every & real.all(-1)
    if c.causal:
        needed = _flex_needed_blocks(c)
        some, every = some & needed, every & needed
    partial, every = (some & ~every).expand(B, H, -1, -1), every.expand(B, H, -1, -1)

    def listed(tiles: Tensor) -> tuple[Tensor, Tensor]:  # count, and kept indices first
        order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True)
        return tiles.sum(-1, dtype=torch.int32), order.to(torch.int32)

    return BlockMask.from_kv_blocks(*listed(partial), *listed(every), BLOCK_SIZE=n,
                                    mask_mod=visible, seq_lengths=(Lq, Lk))


def _flex_needed_blocks(c: _Call, block: int = _FLEX_BLOCK) -> Tensor:
    """Bool ``[1 or B, H, n_query_blocks, n_key_blocks]`` for causal attention: False where no
    score of the key block can come within ``_negligible(Lk)`` of what each query of the block
    already has, so that a block mask may leave the tile out.

    A row has at least its own key's score (distance 0: no slope term), computed exactly; a key
    ``j`` scores at most ``|scale| |q_i| |k_j| - m (i - j) + key_bias_j``. Per block: the largest
    query and key norms, the largest ``m j`` and ``key_bias``, the smallest ``own_i + m i``.
    Padded keys count for nothing; a query whose own key is padded keeps every block."""
    B, H, Lq, _ = c.q.shape
    Lk, work = c.k.shape[2], c.slopes.dtype
    offset = Lk - Lq
    q, k = c.q.to(work), _expand_kv(c.k, H).to(work)
    m = c.slopes_BH[:, :, None]  # [1 or B, H, 1]
    key_norm = torch.linalg.vector_norm(k, dim=-1)  # [B, H, Lk]
    extra = torch.zeros(1, H, Lk, dtype=work, device=q.device) if c.key_bias is None else c.key_bias
    own = (q * k[:, :, offset:]).sum(-1) * c.scale + extra[:, :, offset:]  # [B, H, Lq]
    if c.key_padding_mask is not None:
        real = c.key_padding_mask[:, None, :]
        key_norm, extra = key_norm.masked_fill(~real, 0.0), extra.masked_fill(~real, -math.inf)
        own = own.masked_fill(~real[..., offset:], -math.inf)
    i = torch.arange(offset, Lk, device=q.device, dtype=work)
    low = own + m * i

    def blocks(x: Tensor, fill: float, reduce: Callable) -> Tensor:
        x = F.pad(x, (0, -x.shape[-1] % block), value=fill)
        return reduce(x.view(*x.shape[:-1], x.shape[-1] // block, block), -1)

    A = blocks(torch.linalg.vector_norm(q, dim=-1) * abs(c.scale), 0.0, torch.amax)
    low = blocks(low, math.inf, torch.amin)  # [B, H, nq]
    K, E = blocks(key_norm, 0.0, torch.amax), blocks(extra, -math.inf, torch.amax)  # [., H, nk]
    j_first = torch.arange(K.shape[-1], device=q.device, dtype=work) * block
    j_last = torch.clamp(j_first + (block - 1), max=Lk - 1)
    reach = torch.maximum(m * j_first, m * j_last) + E  # [1 or B, H, nk]
    bound = A[..., :, None] * K[..., None, :] + reach[..., None, :] - low[..., :, None]
    return ~(bound < -_negligible(Lk, work))  # nan counts


def _flex_unavailable(c: _Call) -> Optional[str]:
    if c.distances is not None:
        return _BENT
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return "this PyTorch build has no FlexAttention"
    if c.q.device.type == "cpu" and c.q.dtype != torch.float32:
        return "FlexAttention on CPU runs float32 only"
    if c.q.device.type == "cpu" and c.needs_grad:
        return "FlexAttention has no backward pass on CPU (use 'sdpa' or 'blocked' for training)"
    if c.key_bias_needs_grad:
        return "its score function gives no gradient for key_bias (use 'blocked' to learn it)"
    return None


# --- flash: flash-attn's alibi_slopes, CUDA and half precision only ----------------------------


def _flash(c: _Call) -> Tensor:
    from flash_attn import flash_attn_func

    # flash-attn adds -slope * |i + Lk - Lq - j|, the same bias (its queries are also the last Lq);
    # it takes slopes [H] or [B, H] as they are.
    out = flash_attn_func(
        c.q.transpose(1, 2), c.k.transpose(1, 2), c.v.transpose(1, 2), softmax_scale=c.scale,
        causal=c.causal, alibi_slopes=c.slopes.float(),
    )
    return out.transpose(1, 2)


def _flash_unavailable(c: _Call) -> Optional[str]:
    if c.distances is not None:
        return _BENT
    if c.key_bias is not None:
        return "flash-attn takes no per-key bias (key_bias); use 'flex' or 'blocked'"
    if c.slopes_need_grad:
        return "flash-attn gives no gradient for slopes (use 'flex' or 'blocked' to learn them)"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "the flash-attn package is not installed (pip install flash-attn, CUDA only)"
    if c.q.device.type != "cuda":
        return f"flash-attn needs a CUDA device (inputs are on {c.q.device.type})"
    if c.q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16 inputs, got {c.q.dtype}"
    if c.key_padding_mask is not None:
        return "flash-attn's dense kernel takes no key padding mask"
    return None


BACKENDS: dict[str, Backend] = {
    "reference": Backend(_reference, _always),
    "sdpa": Backend(_sdpa, _sdpa_unavailable),
    "blocked": Backend(_blocked, _always),
    "flex": Backend(_flex, _flex_unavailable),
    "flash": Backend(_flash, _flash_unavailable),
}


def _check_types(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool
) -> None:
    # Lists and arrays would fail deep inside with an AttributeError; integer tensors would run
    # the reference in integer maths or fail in a kernel; mixed dtypes would run on some backends
    # and not others.
    for name, t in (("q", q), ("k", k), ("v", v), ("key_padding_mask", key_padding_mask)):
        if not isinstance(t, torch.Tensor) and not (t is None and name == "key_padding_mask"):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(t).__name__}; use torch.as_tensor({name})"
            )
    if not all(t.dtype.is_floating_point for t in (q, k, v)):
        raise TypeError(
            f"q, k, v must be floating-point tensors, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
            "convert them with .float()"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(
            f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
            "cast k and v with .to(q.dtype)"
        )
    if not isinstance(causal, bool):  # a truthy string such as "False" would mean causal
        raise TypeError(f"causal must be True or False, got {causal!r}")


def _check(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, key_padding_mask: Optional[Tensor]):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be 4-D [batch, heads, length, head_dim]; got "
            f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    B, H, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k/v batch and head_dim must match q: q{tuple(q.shape)} vs k{tuple(k.shape)}"
        )
    Hkv, Lk = k.shape[1], k.shape[2]
    if 0 in (H, Hkv, D):
        raise ValueError(
            f"q, k, v need at least one head and a head_dim >= 1, got q{tuple(q.shape)}, "
            f"k{tuple(k.shape)}"
        )
    if H % Hkv != 0:
        raise ValueError(
            f"query heads ({H}) must be a multiple of key/value heads ({Hkv}) for grouped attention"
        )
    if Lq < 1:
        raise ValueError(f"need at least one query, got q{tuple(q.shape)}")
    if Lq > Lk:
        raise ValueError(
            f"more queries ({Lq}) than keys ({Lk}): queries are the last Lq key positions"
        )
    if isinstance(slopes, torch.Tensor) and slopes.dim() == 2:
        if tuple(slopes.shape) != (B, H):
            raise ValueError(
                f"per-row slopes must have shape [batch, heads] = [{B}, {H}], got "
                f"{tuple(slopes.shape)}; pass [{H}] slopes to share them across the batch"
            )
        check_slopes(slopes.reshape(-1))  # floating point and finite
    else:
        check_slopes(slopes, H)
    if slopes.device != q.device and slopes.device.type != "cpu":
        raise ValueError(f"slopes are on {slopes.device} but q is on {q.device}")
    if key_padding_mask is not None:
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (B, Lk):
            raise ValueError(
                f"key_padding_mask must be a bool tensor [{B}, {Lk}] (True = real token), got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )


def _check_key_bias(key_bias: Optional[Tensor], q: Tensor, n_keys: int) -> None:
    if key_bias is None:
        return
    B, H = q.shape[:2]
    if not isinstance(key_bias, torch.Tensor):
        raise TypeError(
            f"key_bias must be a torch.Tensor or None, got {type(key_bias).__name__}; use "
            "torch.as_tensor(key_bias)"
        )
    if not key_bias.dtype.is_floating_point:
        raise TypeError(f"key_bias must be a floating-point tensor, got {key_bias.dtype}; use "
                        "key_bias.float()")
    if tuple(key_bias.shape) not in ((H, n_keys), (B, H, n_keys)):
        raise ValueError(
            f"key_bias must have shape [heads, keys] = [{H}, {n_keys}] (shared by the batch) or "
            f"[batch, heads, keys] = [{B}, {H}, {n_keys}], got {tuple(key_bias.shape)}"
        )
    if key_bias.device != q.device:
        raise ValueError(f"key_bias is on {key_bias.device} but q is on {q.device}")
    # Checked on the CPU only, as slopes are: on an accelerator the check would stall the host.
    # One sum in float64 (nan and inf carry through it; finite float32 values cannot overflow
    # it) costs a fraction of isfinite().all(), which is several kernels.
    if key_bias.device.type == "cpu" and not math.isfinite(key_bias.detach().sum(dtype=torch.float64)):
        raise ValueError(
            "key_bias must be finite (nan or inf found); hide keys with key_padding_mask, not "
            "with -inf"
        )


def _check_distances(distances: Optional[Distances], batch: int) -> None:
    if distances is None:
        return
    if not isinstance(distances, Distances):
        raise TypeError(
            f"distances must be a linbias.alibi.Distances or None, got {type(distances).__name__}; "
            "use linbias.alibi.rule_distances(train_len, lengths, rule)"
        )
    d = distances
    if len(d.ratio) not in (1, batch):
        raise ValueError(f"distances.ratio must hold 1 or {batch} (batch) values, got {len(d.ratio)}")
    if not all(math.isfinite(r) and r >= 0 for r in d.ratio):
        raise ValueError(f"distances.ratio must be finite and >= 0, got {d.ratio}")
    if d.bend < 0 or (d.window is not None and d.window < 1) or d.sinks < 0:
        raise ValueError(f"distances need bend >= 0, window >= 1 and sinks >= 0, got {d}")


def _check_key_norms(key_norms: Optional[KeyNorms], k: Tensor) -> None:
    if key_norms is None:
        return
    if not isinstance(key_norms, KeyNorms):
        raise TypeError(f"key_norms must be linbias.attention.KeyNorms (KeyNorms.of(k)), got "
                        f"{type(key_norms).__name__}")
    B, Hkv, Lk = k.shape[:3]
    want = (B, Hkv, -(-Lk // _KEY_BLOCK))
    if key_norms.n_keys != Lk or tuple(key_norms.block_max.shape) != want:
        raise ValueError(f"key_norms describe {key_norms.n_keys} keys as "
                         f"{tuple(key_norms.block_max.shape)}, but k has {Lk} keys (norms "
                         f"{want}): extend them with each append (norms.extended(k))")
    if key_norms.block_max.device != k.device:
        raise ValueError(f"key_norms are on {key_norms.block_max.device}, k on {k.device}")


def _clean_padded(k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``k`` and ``v`` with non-finite padded slots zeroed: what a padded slot holds (an
    uninitialised cache slot can hold nan) must reach no row, and kernels that add the mask to
    ``q . k``, or weigh a value by 0, would pass nan on. Only the padded slots are read; the
    inputs are copied only when one of them is not finite."""
    if key_padding_mask is None:
        return k, v
    b, j = (~key_padding_mask).nonzero(as_tuple=True)
    if b.numel() == 0:
        return k, v
    hidden = ~key_padding_mask[:, None, :, None]
    k, v = (x if bool(torch.isfinite(x[b, :, j]).all()) else x.masked_fill(hidden, 0.0)
            for x in (k, v))
    return k, v


def _scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or type(scale).__name__ == "bool_" or (
        isinstance(scale, torch.Tensor) and scale.dtype == torch.bool
    ):  # float(True) is 1.0: a flag passed by mistake would silently set the scale
        raise TypeError(f"scale must be a number (None: 1/sqrt(head_dim)), got {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if isinstance(scale, str) or not math.isfinite(value):
        raise ValueError(f"scale must be a finite number (None: 1/sqrt(head_dim)), got {scale!r}")
    return value


def _auto(c: _Call) -> str:
    # Fastest first; "flex" only where it is compiled for a GPU (on CPU "sdpa" is faster). Only a
    # backend that can run the call is picked (flash takes no key_bias, for one).
    preferred = ("flash", "flex") if c.q.device.type == "cuda" else ("sdpa",)
    for name in preferred:
        if name in BACKENDS and BACKENDS[name].unavailable(c) is None:
            return name
    return "blocked"


def alibi_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    key_bias: Optional[Tensor] = None,
    distances: Optional[Distances] = None,
    key_norms: Optional[KeyNorms] = None,
    backend: str = "auto",
) -> Tensor:
    """Attention with linear biases: ``softmax(q k^T * scale - m_h * distance + key_bias) v``.

    Args:
        q: ``[B, H, Lq, D]`` queries, the last ``Lq`` positions of the keys.
        k: ``[B, Hkv, Lk, D]`` keys, ``H % Hkv == 0`` (grouped or multi-query heads).
        v: ``[B, Hkv, Lk, D]`` values.
        slopes: ``[H]`` ALiBi slopes (``alibi_slopes``, possibly ``interpolate_slopes``-scaled),
            or ``[B, H]``: each row of the batch its own (e.g. interpolated for its own length).
            Slopes that require grad are learnt: ``"auto"`` then picks a backend that
            differentiates them (``"blocked"`` on CPU).
        causal: mask future keys (bias ``-m (i - j)``); False gives ``-m |i - j|``.
        scale: multiplies ``q k^T`` before the bias is added; default ``1 / sqrt(D)``.
        key_padding_mask: ``[B, Lk]`` bool, True = real token. Masked keys are never attended,
            and what their slots of ``k`` and ``v`` hold (nan included) reaches no row; a query
            that sees no key gets zeros.
        key_bias: optional ``[H, Lk]`` (shared by the batch) or ``[B, H, Lk]`` float, finite:
            ``key_bias[b, h, j]`` is added to the score of every query of row ``b``, head ``h``
            with key ``j``, after ``scale`` and alongside the slopes' term, so the score is
            ``q_i . k_j * scale - m_h * (i - j) + key_bias[b, h, j]``. Costs ``O(B H Lk)``
            memory, never ``O(Lq Lk)``. With zero slopes it carries a bias counted per key, such
            as one along the positions of a mask with gaps (softmax ignores a constant per query,
            so a causal ``-m (i - j)`` is the per-key ``m j``). Every backend but ``"flash"``
            takes it; a ``key_bias`` that requires grad is learnt on ``"reference"`` and
            ``"blocked"`` (``"auto"`` picks ``"blocked"`` then).
        distances: a rule's count of distance past L (``linbias.alibi.rule_distances``: ``cap``,
            ``window``, ``selfextend``): the bias becomes ``-m_h * f(d)``, and a window hides far
            keys but the row's sinks. ``"reference"`` and ``"blocked"`` run it, in query blocks
            of ``_DISTANCE_BLOCK`` rows (memory linear in ``Lk``); ``"auto"`` picks
            ``"blocked"``.
        key_norms: the keys' ``KeyNorms`` (a KV cache keeps them): a causal decoding step
            (up to 4 queries) on ``"sdpa"`` against a cache of at least 2^23 key elements
            (``B Hkv Lk D``: 16,384 keys of 8 heads of 64) then leaves out, unread, the blocks
            of keys that provably weigh less than fp32's rounding of the row. They
            must be the norms of these keys (``KeyNorms.of(k)``, kept with ``extended``): a
            bound, never checked against the keys, that the result's exactness rests on.
        backend: a key of ``BACKENDS`` or ``"auto"`` (the fastest correct one for this call).

    Returns:
        ``[B, H, Lq, D]`` in the dtype of ``q``.

    Raises:
        TypeError: an argument of the wrong type (a list or array, integer or mixed dtypes).
        ValueError: inconsistent shapes, no heads or no head dim, nan/inf slopes, scale or
            key_bias.
        RuntimeError: the named backend cannot run this call (the message says why).
    """
    _check_types(q, k, v, key_padding_mask, causal)
    _check(q, k, v, slopes, key_padding_mask)
    _check_key_bias(key_bias, q, k.shape[2])
    _check_distances(distances, q.shape[0])
    _check_key_norms(key_norms, k)
    k, v = _clean_padded(k, v, key_padding_mask)
    work = torch.promote_types(q.dtype, torch.float32)
    if key_bias is not None:
        key_bias = key_bias.to(work)
        key_bias = key_bias if key_bias.dim() == 3 else key_bias[None]
    call = _Call(
        q, k, v, slopes.to(q.device, work), causal, _scale(scale, q.shape[-1]), key_padding_mask,
        key_bias, distances, key_norms,
    )
    if backend == "auto":  # _auto picks only a backend that can run the call
        return BACKENDS[_auto(call)].run(call)
    if backend not in BACKENDS:
        valid = ", ".join(BACKENDS)
        raise ValueError(f"unknown attention backend {backend!r}; valid: auto, {valid}")
    reason = BACKENDS[backend].unavailable(call)
    if reason is not None:
        raise RuntimeError(f"attention backend {backend!r} cannot run this call: {reason}")
    return BACKENDS[backend].run(call)
