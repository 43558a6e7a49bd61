"""ALiBi maths: slopes, the materialised bias, and slope scaling rules.

Attention with Linear Biases (Press, Smith and Lewis, "Train Short, Test Long", ICLR 2022,
arXiv 2108.12409) adds ``-m_h * (i - j)`` to the score of query ``i`` and key ``j`` in head ``h``.
Position interpolation for ALiBi (Al-Khateeb et al. 2023, arXiv 2310.13017) multiplies every slope
by ``L / L'`` when the input length ``L'`` exceeds the training length ``L``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from linbias.config import check_int

__all__ = [
    "alibi_slopes", "alibi_bias", "check_rule", "check_slopes", "row_lengths", "row_slopes", "interpolate_slopes", "SCALING_RULES",
    "scaling_factor",
]


def _power_of_two_slopes(n: int, max_bias: float) -> list[float]:
    # Geometric sequence starting at 2^(-max_bias/n) with that same ratio (paper, section 3).
    start = 2.0 ** (-max_bias / n)
    return [start ** (i + 1) for i in range(n)]


def _slopes(n: int, max_bias: float) -> list[float]:
    if n & (n - 1) == 0:
        return _power_of_two_slopes(n, max_bias)
    c = 1 << (n.bit_length() - 1)  # largest power of two below n
    return _power_of_two_slopes(c, max_bias) + _slopes(2 * c, max_bias)[0::2][: n - c]


def alibi_slopes(n_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """The paper's per-head slopes ``m``, for any head count.

    Args:
        n_heads: number of attention heads (>= 1).
        max_bias: the exponent scale; 8 gives the paper's slopes (8 heads: 1/2, 1/4, ..., 1/256).

    Returns:
        float32 tensor of shape ``[n_heads]``. For a power of two ``n`` the geometric sequence
        ``2^(-max_bias/n) ** (1..n)``; otherwise the slopes of the largest power of two ``c < n``,
        then every other slope of the ``2c``-head sequence, first ``n - c`` of them (the official
        code's, BLOOM's and MPT's rule).
    """
    check_int("n_heads", n_heads)
    if isinstance(max_bias, bool) or not (
        isinstance(max_bias, (int, float)) and math.isfinite(max_bias) and max_bias > 0
    ):
        raise ValueError(f"max_bias must be a positive finite number, got {max_bias!r}")
    return torch.tensor(_slopes(n_heads, float(max_bias)), dtype=torch.float64).float()


def check_slopes(slopes: Any, n_heads: Optional[int] = None) -> None:
    """Check that ``slopes`` is a finite floating-point tensor ``[n_heads]``.

    Args:
        slopes: the value to check.
        n_heads: the required length; ``None`` accepts any length >= 1.

    Raises:
        TypeError: not a tensor, or not floating point (the message says how to convert).
        ValueError: wrong shape, or a nan/inf slope. The values are checked only on the CPU:
            on an accelerator the check would stall the host once per call, and there a
            non-finite slope shows anyway, as nan outputs.
    """
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(
            f"slopes must be a torch.Tensor, got {type(slopes).__name__}; "
            "use alibi_slopes(n_heads) or torch.tensor(values)"
        )
    if not slopes.dtype.is_floating_point:
        raise TypeError(
            f"slopes must be a floating-point tensor, got {slopes.dtype}; use slopes.float()"
        )
    if slopes.dim() != 1 or slopes.numel() == 0 or n_heads not in (None, slopes.numel()):
        want = f"[{n_heads}] (one per query head)" if n_heads else "[n_heads] with n_heads >= 1"
        raise ValueError(f"slopes must have shape {want}, got {tuple(slopes.shape)}")
    # One read of the values (isfinite().all() costs several small kernels, about as long as a
    # decoding step over a 1k-token cache).
    if slopes.device.type == "cpu" and not all(map(math.isfinite, slopes.tolist())):
        raise ValueError(f"slopes must be finite, got {slopes.tolist()}")


def alibi_bias(
    slopes: torch.Tensor, q_len: int, k_len: int, *, causal: bool = True
) -> torch.Tensor:
    """The materialised ALiBi bias ``[H, q_len, k_len]`` (for tests and for inspection).

    Query ``i`` sits at absolute position ``k_len - q_len + i`` (queries are the last ``q_len``
    positions of the keys, as with a KV cache). Causal: ``-m_h * (i_abs - j)``, and ``-inf`` where
    ``j > i_abs``. Bidirectional: ``-m_h * |i_abs - j|``.

    Args:
        slopes: ``[H]`` slopes.
        q_len: number of queries, ``1 <= q_len <= k_len``.
        k_len: number of keys.
        causal: mask future keys.

    Returns:
        Tensor ``[H, q_len, k_len]`` in the dtype of ``slopes``.

    Raises:
        TypeError, ValueError: bad slopes (see ``check_slopes``), lengths or ``causal``.
    """
    check_slopes(slopes)
    check_int("q_len", q_len)
    check_int("k_len", k_len)
    if q_len > k_len:
        raise ValueError(f"need 1 <= q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    i_abs = torch.arange(k_len - q_len, k_len, device=slopes.device).view(-1, 1)
    j = torch.arange(k_len, device=slopes.device).view(1, -1)
    offset = (j - i_abs).to(slopes.dtype)  # j - i: negative for past keys
    if not causal:
        return slopes.view(-1, 1, 1) * -offset.abs()
    return (slopes.view(-1, 1, 1) * offset).masked_fill(j > i_abs, float("-inf"))


# Each rule maps (train_len L, eval_len L') to the factor the slopes are multiplied by. Every rule
# returns exactly 1 when L' <= L, so a model is unchanged inside its training length.
SCALING_RULES: dict[str, Callable[[int, int], float]] = {
    # No scaling: plain ALiBi extrapolation (Press et al.).
    "none": lambda train_len, eval_len: 1.0,
    # Position interpolation (Al-Khateeb et al. 2023): m * L / L'.
    "linear": lambda train_len, eval_len: min(1.0, train_len / eval_len),
    # A gentler interpolation: m * sqrt(L / L').
    "sqrt": lambda train_len, eval_len: min(1.0, math.sqrt(train_len / eval_len)),
    # Keep the bias at the farthest trained distance's log-ratio: m * log(L) / log(L').
    "log": lambda train_len, eval_len: (
        1.0 if eval_len <= train_len or train_len < 2 else math.log(train_len) / math.log(eval_len)
    ),
}


def check_rule(rule: Any) -> None:
    """ValueError unless ``rule`` is a key of ``SCALING_RULES`` (the message lists them)."""
    if not isinstance(rule, str) or rule not in SCALING_RULES:
        raise ValueError(f"unknown scaling rule {rule!r}; valid rules: {', '.join(SCALING_RULES)}")


def scaling_factor(train_len: int, eval_len: int, rule: str = "linear") -> float:
    """The factor a scaling rule applies to the slopes at input length ``eval_len``.

    Raises:
        ValueError: unknown rule (the message lists the valid ones) or non-positive lengths.
    """
    check_rule(rule)
    check_int("train_len", train_len)
    check_int("eval_len", eval_len)
    return SCALING_RULES[rule](train_len, eval_len)


def row_lengths(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """L' of each row of a padded batch: its real tokens (True in ``[B, S]``), at least 1, so a
    fully padded row still has a valid length. ``[B]`` int64."""
    return key_padding_mask.sum(-1).clamp(min=1)


def row_slopes(slopes: torch.Tensor, train_len: int, lengths: list[int], rule: str) -> torch.Tensor:
    """``interpolate_slopes`` for each row of a batch at its own length ``L'``: ``[B, H]``."""
    check_slopes(slopes)  # once, not once per row
    factors = [scaling_factor(train_len, n, rule) for n in lengths]
    return torch.tensor(factors, dtype=slopes.dtype, device=slopes.device)[:, None] * slopes


def interpolate_slopes(
    slopes: torch.Tensor, train_len: int, eval_len: int, rule: str = "linear"
) -> torch.Tensor:
    """Scale ALiBi slopes for an input of ``eval_len`` tokens by a named rule.

    ``linear`` is the interpolation paper's rule: slopes times ``train_len / eval_len`` only when
    ``eval_len > train_len``; otherwise the slopes are returned unchanged. ``none`` never scales.

    Args:
        slopes: ``[H]`` slopes.
        train_len: the training length ``L``.
        eval_len: the current input length ``L'`` (prompt plus generated tokens when decoding).
        rule: a key of ``SCALING_RULES``.

    Returns:
        The scaled slopes, same shape and dtype (the input itself when the factor is 1).
    """
    check_slopes(slopes)
    factor = scaling_factor(train_len, eval_len, rule)
    return slopes if factor == 1.0 else slopes * factor
