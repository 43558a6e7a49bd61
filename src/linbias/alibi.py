"""ALiBi maths: slopes, the materialised bias, and slope scaling rules.

Attention with Linear Biases (Press, Smith and Lewis, "Train Short, Test Long", ICLR 2022,
arXiv 2108.12409) adds ``-m_h * (i - j)`` to the score of query ``i`` and key ``j`` in head ``h``.
Position interpolation for ALiBi (Al-Khateeb et al. 2023, arXiv 2310.13017) multiplies every slope
by ``L / L'`` when the input length ``L'`` exceeds the training length ``L``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from linbias.config import check_int

__all__ = [
    "alibi_slopes", "alibi_bias", "check_rule", "check_slopes", "Distances", "interpolate_slopes",
    "parse_rule", "row_lengths", "row_slopes", "rule_distances", "Rule", "SCALING_RULES",
    "scaling_factor", "slope_factors", "temperatures",
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


# --- rules past L ---------------------------------------------------------------------------------
#
# A rule says what changes when a row's length L' exceeds the training length L (DESIGN.md, "Rules
# past L"): per-head factors on the slopes, a temperature on q . k, and how distance is counted.
# Every rule leaves L' <= L untouched, so a model is unchanged inside its training length.


@dataclass(frozen=True)
class Distances:
    """How a rule counts the distance ``d = i - j >= 0`` of a query to a key, past L.

    The bias is ``-m_h * f(d)``, ``f(d) = d`` up to ``bend`` and ``bend + (d - bend) * ratio``
    beyond (``ratio`` 0 caps it at ``bend``). With ``window``, a key at ``d >= window`` is hidden
    unless it is one of the first ``sinks`` real tokens of its row.
    """

    bend: int
    ratio: tuple[float, ...]  # one per row of the call, or one shared by every row
    window: Optional[int] = None
    sinks: int = 0

    def f(self, d: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``f(d)`` of distances ``d`` ``[1 or B, ...]`` (``ratio`` broadcast along the first dim)."""
        ratio = torch.tensor(self.ratio, dtype=d.dtype, device=d.device)
        ratio = ratio.view(-1, *[1] * (d.dim() - 1))
        return torch.where(d <= self.bend, d, self.bend + (d - self.bend) * ratio)


@dataclass(frozen=True)
class Rule:
    """One rule past L. Each callable takes ``(L, L')`` with ``L' > L`` (below, nothing changes)."""

    summary: str
    # Per-head slope factors, from the head's rank r (0 = steepest) of H: (L, L', r, H) -> factor.
    factor: Callable[[int, int, int, int], float] = lambda L, Lp, r, H: 1.0
    # Whether the factor differs by head (then no single scaling_factor exists).
    per_head: bool = False
    # Multiplies the scaled q . k (attention temperature); None: unchanged.
    temperature: Optional[Callable[[int, int], float]] = None
    # (bend, ratio, window, sinks) of ``Distances``; None: distance counts as itself.
    distances: Optional[Callable[[int, int, int], tuple[int, float, Optional[int], int]]] = None
    # The rule's one integer parameter (``window:8``), with its default, or None.
    parameter: Optional[tuple[str, int]] = None

    @property
    def slopes_only(self) -> bool:
        """Whether the rule only rescales slopes (any ALiBi implementation can run it)."""
        return self.distances is None and self.temperature is None


def _ntk(L: int, Lp: int, rank: int, H: int) -> float:
    # NTK-ALiBi (keezen/ntk_alibi): m_h * a^(-h / (H - 1)), a = L'/L; h ranks the heads by slope.
    return 1.0 if H == 1 else (Lp / L) ** (-rank / (H - 1))


def _selfextend(L: int, Lp: int, parameter: int) -> tuple[int, float, Optional[int], int]:
    # Self-Extend, continuous form: exact to w = L // 2, then grouped by G so L' - 1 lands near L.
    w = L // 2
    return w, (L - w) / (Lp - w), None, 0


SCALING_RULES: dict[str, Rule] = {
    "none": Rule("plain ALiBi extrapolation (Press et al.)"),
    "linear": Rule("position interpolation (Al-Khateeb et al. 2023): m * L / L'",
                   factor=lambda L, Lp, r, H: L / Lp),
    "sqrt": Rule("m * sqrt(L / L')", factor=lambda L, Lp, r, H: math.sqrt(L / Lp)),
    "log": Rule("m * log L / log L'",
                factor=lambda L, Lp, r, H: 1.0 if L < 2 else math.log(L) / math.log(Lp)),
    "ntk": Rule("NTK-ALiBi: m_h * (L'/L)^(-h/(H-1)), the steepest head kept, the flattest / (L'/L)",
                factor=_ntk, per_head=True),
    "cap": Rule("LM-Infinite's distance ceiling: -m * min(d, L)",
                distances=lambda L, Lp, S: (L, 0.0, None, 0)),
    "window": Rule("LM-Infinite's Lambda mask: keys at d < L and the row's first S (sinks, "
                   "window:S, default 4), bias -m * min(d, L)",
                   distances=lambda L, Lp, S: (L, 0.0, L, S), parameter=("sinks", 4)),
    "selfextend": Rule("Self-Extend: exact to w = L // 2, then w + (d - w) / G, "
                       "G = (L' - w) / (L - w)", distances=_selfextend),
    "logn": Rule("attention temperature: q . k times log L' / log L",
                 temperature=lambda L, Lp: 1.0 if L < 2 else math.log(Lp) / math.log(L)),
}


def parse_rule(rule: Any) -> tuple[str, Rule, int]:
    """``(name, Rule, parameter)`` of a rule spelled ``name`` or ``name:N`` (``window:8``).

    Raises:
        ValueError: not a rule name (the message lists them), a parameter the rule does not
            take, or one that is not a non-negative integer.
    """
    name, _, given = rule.partition(":") if isinstance(rule, str) else (rule, "", "")
    if not isinstance(name, str) or name not in SCALING_RULES:
        raise ValueError(f"unknown scaling rule {rule!r}; valid rules: {', '.join(SCALING_RULES)}")
    r = SCALING_RULES[name]
    if not given:
        return name, r, r.parameter[1] if r.parameter else 0
    if r.parameter is None:
        raise ValueError(f"scaling rule {name!r} takes no parameter; use {name!r}")
    if not given.isdigit():
        raise ValueError(
            f"{name}'s {r.parameter[0]} must be a non-negative integer, got {given!r} "
            f"(e.g. {name}:{r.parameter[1]})"
        )
    return name, r, int(given)


def check_rule(rule: Any) -> None:
    """ValueError unless ``rule`` names a rule of ``SCALING_RULES`` (``parse_rule``)."""
    parse_rule(rule)


def _check_lengths(train_len: int, eval_len: int) -> None:
    check_int("train_len", train_len)
    check_int("eval_len", eval_len)


def scaling_factor(train_len: int, eval_len: int, rule: str = "linear") -> float:
    """The one factor a rule applies to every slope at input length ``eval_len``.

    Raises:
        ValueError: unknown rule (the message lists the valid ones), non-positive lengths, or a
            rule whose factor differs by head (``ntk``: use ``slope_factors``).
    """
    name, r, _ = parse_rule(rule)
    _check_lengths(train_len, eval_len)
    if r.per_head:
        raise ValueError(f"rule {name!r} scales each head by its own factor; use slope_factors")
    return 1.0 if eval_len <= train_len else r.factor(train_len, eval_len, 0, 1)


def slope_factors(slopes: torch.Tensor, train_len: int, eval_len: int, rule: str) -> list[float]:
    """Each head's slope factor under ``rule`` at length ``eval_len`` (all 1 when L' <= L).

    Heads are ranked by slope, steepest first (``ntk``'s ``h``): for a power-of-two head count
    that is the paper's order; for other counts the interleaved heads find their place."""
    _, r, _ = parse_rule(rule)
    _check_lengths(train_len, eval_len)
    H = slopes.numel()
    if eval_len <= train_len:
        return [1.0] * H
    if not r.per_head:  # one factor: no ranking, no read of the slopes (a device sync on GPU)
        return [r.factor(train_len, eval_len, 0, H)] * H
    values = slopes.tolist()  # one read, not one per head
    order = sorted(range(H), key=lambda h: -abs(values[h]))
    rank = {h: n for n, h in enumerate(order)}
    return [r.factor(train_len, eval_len, rank[h], H) for h in range(H)]


def temperatures(train_len: int, lengths: Sequence[int], rule: str) -> Optional[list[float]]:
    """Each row's factor on ``q . k`` under ``rule`` (``logn``), or None when every one is 1."""
    _, r, _ = parse_rule(rule)
    if r.temperature is None:
        return None
    t = [1.0 if n <= train_len else r.temperature(train_len, n) for n in lengths]
    return None if all(x == 1.0 for x in t) else t


def rule_distances(train_len: int, lengths: Sequence[int], rule: str) -> Optional[Distances]:
    """How ``rule`` counts distance for rows of lengths ``lengths`` (one shared ``ratio`` when
    they agree), or None when it counts plainly: no distance rule, or no row past L."""
    _, r, parameter = parse_rule(rule)
    if r.distances is None or all(n <= train_len for n in lengths):
        return None
    # bend, window and sinks depend on L alone; a row at or below L gets ratio 1, and its
    # distances (d < L' <= L) never reach the bend or the window: they count plainly.
    bend, _, window, sinks = r.distances(train_len, max(lengths), parameter)
    ratios = tuple(r.distances(train_len, n, parameter)[1] if n > train_len else 1.0
                   for n in lengths)
    return Distances(bend, ratios if len(set(ratios)) > 1 else ratios[:1], window, sinks)


def row_lengths(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """L' of each row of a padded batch: its real tokens (True in ``[B, S]``), at least 1, so a
    fully padded row still has a valid length. ``[B]`` int64."""
    return key_padding_mask.sum(-1).clamp(min=1)


def row_slopes(slopes: torch.Tensor, train_len: int, lengths: list[int], rule: str) -> torch.Tensor:
    """``interpolate_slopes`` for each row of a batch at its own length ``L'``: ``[B, H]``."""
    check_slopes(slopes)  # once, not once per row
    factors = [slope_factors(slopes, train_len, n, rule) for n in lengths]
    return torch.tensor(factors, dtype=slopes.dtype, device=slopes.device) * slopes


def interpolate_slopes(
    slopes: torch.Tensor, train_len: int, eval_len: int, rule: str = "linear"
) -> torch.Tensor:
    """Scale ALiBi slopes for an input of ``eval_len`` tokens by a named rule.

    ``linear`` is the interpolation paper's rule: slopes times ``train_len / eval_len`` only when
    ``eval_len > train_len``; otherwise the slopes are returned unchanged. ``none`` never scales;
    nor do the rules that change distances or the temperature instead (``cap``, ``window``,
    ``selfextend``, ``logn``: see ``rule_distances`` and ``temperatures``).

    Args:
        slopes: ``[H]`` slopes.
        train_len: the training length ``L``.
        eval_len: the current input length ``L'`` (prompt plus generated tokens when decoding).
        rule: a key of ``SCALING_RULES``.

    Returns:
        The scaled slopes, same shape and dtype (the input itself when every factor is 1).
    """
    check_slopes(slopes)
    factors = slope_factors(slopes, train_len, eval_len, rule)
    if all(f == 1.0 for f in factors):
        return slopes
    return slopes * torch.tensor(factors, dtype=slopes.dtype, device=slopes.device)
