"""Position methods behind one interface, as compared in the ALiBi paper (Press et al. 2022).

A ``PositionMethod`` has four hooks, each a no-op or plain causal attention by default; a method
overrides only the ones it needs:

- ``embed``   adds to the token embeddings (sinusoidal, Vaswani et al. 2017; learned absolute),
- ``rotate``  rotates queries and keys (rotary, Su et al. 2021, "RoFormer"),
- ``prepare`` computes, once per forward, state that every layer's ``attend`` shares (T5's bias,
  ALiBi's slopes for the call's L'),
- ``attend``  adds a score bias (T5, Raffel et al. 2020; ALiBi, Press et al. 2022).

Each method declares ``max_len`` (``None``: any length) and the scaling rules it accepts, so the
training length is never a hidden cap. ``none`` is NoPE: the causal mask is the only position cue.

Shape suffixes: ``B`` batch, ``H`` heads, ``T`` query positions (the new tokens of this call),
``S`` key positions (cached plus new; queries are the last ``T`` of them), ``D`` head dim,
``C`` model width ``d_model``. ``pos_T`` holds absolute positions, shape ``[T]`` (or ``[B, T]`` for
per-row positions, e.g. left padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from linbias.alibi import (
    SCALING_RULES,
    Distances,
    check_rule,
    alibi_slopes,
    row_lengths,
    row_slopes,
    rule_distances,
    scaling_factor,
    temperatures,
)
from linbias.attention import KeyNorms, alibi_attention, causal_attention
from linbias.config import INIT_STD, ModelConfig

__all__ = [
    "PositionMethod",
    "NoPositions",
    "SinusoidalPositions",
    "LearnedPositions",
    "RotaryPositions",
    "T5Positions",
    "AlibiPositions",
    "POSITION_METHODS",
    "make_position",
    "causal_attention",
    "rotary_angles",
    "rotary_rule_freqs",
    "apply_rotary",
    "t5_bucket",
    "t5_untrained_buckets",
    "position_warnings",
]

Tensor = torch.Tensor


# --- shared maths --------------------------------------------------------------------------------


def rotary_angles(pos: Tensor, head_dim: int, base: float = 10000.0,
                  freqs: Tensor | None = None) -> Tensor:
    """RoFormer angles ``pos * base^(-2i / D)`` for ``i < D/2`` (or ``pos * freqs``): shape
    ``[*pos.shape, D/2]``."""
    if freqs is None:
        i = torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos.device)
        freqs = base ** (-i / head_dim)
    return pos.to(torch.float32)[..., None] * freqs


# YaRN's ramp (Peng et al. 2023, section 3.2): dimensions whose wavelength fits fewer than ALPHA
# times into L are interpolated, more than BETA times kept, linear in between.
YARN_ALPHA, YARN_BETA = 1.0, 32.0


def rotary_rule_freqs(head_dim: int, base: float, train_len: int, eval_len: int,
                      rule: str) -> tuple[Tensor, float]:
    """Rotary frequencies ``[D/2]`` (float64) under an NTK-style rule at ``L' > L``, and the
    factor on q and on k (YaRN's ``sqrt(1/t) = 0.1 ln s + 1``; 1 otherwise).

    ``ntk``: NTK-aware scaling, base ``b * s^(D / (D - 2))`` with ``s = L'/L``. ``yarn``: each
    frequency ``(1 - g) theta / s + g theta``, ``g`` YaRN's ramp of ``L / wavelength``."""
    i = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    s = eval_len / train_len
    if rule == "ntk":
        return (base * s ** (head_dim / (head_dim - 2))) ** (-i), 1.0
    theta = base ** (-i)
    r = train_len * theta / (2 * math.pi)  # how many wavelengths fit into L
    g = ((r - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
    return (1 - g) * theta / s + g * theta, 0.1 * math.log(s) + 1.0


def apply_rotary(x_BHTD: Tensor, angles: Tensor) -> Tensor:
    """Rotate each pair ``(x[2i], x[2i+1])`` by ``angles[..., t, i]`` (RoFormer eq. 34).

    Interleaved pairs as in the RoFormer paper and Meta's LLaMA code (not the half-split layout of
    GPT-NeoX and HF LLaMA; the two differ only by a fixed permutation of the head dim).

    Args:
        x_BHTD: queries or keys.
        angles: ``[T, D/2]`` or ``[B, T, D/2]`` from ``rotary_angles``.
    """
    cos, sin = angles.cos().unsqueeze(-3), angles.sin().unsqueeze(-3)  # broadcast over heads
    x = x_BHTD.float()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x_BHTD)


def t5_bucket(distance: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's causal (``bidirectional=False``) bucket of the query-key distance ``i - j``.

    Distances below ``num_buckets // 2`` get their own bucket; larger ones are log-spaced up to
    ``max_distance`` and farther ones share the last bucket. Future keys (``i - j < 0``) fall in
    bucket 0, as in T5; the causal mask hides them anyway.
    """
    n = distance.clamp(min=0)
    max_exact = num_buckets // 2
    # clamp(min=1) only keeps log() finite for the small distances, which take the exact branch.
    log_ratio = torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return torch.where(n < max_exact, n, large)


def t5_untrained_buckets(
    train_len: int, num_buckets: int = 32, max_distance: int = 128
) -> list[int]:
    """The T5 buckets that inputs longer than ``train_len`` use but training never reaches.

    Training at length ``L`` sees distances ``0..L-1`` only; a bucket reached solely by distances
    ``>= L`` never gets a gradient, yet inputs long enough to reach it use it.

    Returns:
        Those buckets, ascending; empty when ``t5_bucket(L - 1)`` is already the last bucket.
    """
    buckets = _t5_buckets_by_distance(train_len, num_buckets, max_distance)
    trained = set(buckets[:train_len].tolist())
    return sorted(set(buckets[train_len:].tolist()) - trained)


def _t5_buckets_by_distance(train_len: int, num_buckets: int, max_distance: int) -> Tensor:
    # Distances from max_distance on share the last bucket, so this range reaches every bucket.
    return t5_bucket(torch.arange(2 * max(train_len, max_distance)), num_buckets, max_distance)


# --- the interface -------------------------------------------------------------------------------


class PositionMethod(nn.Module):
    """One position method: hooks for embeddings, q/k rotation and attention.

    The model owns one instance, shared by every layer (T5 shares its bias across layers).
    ``rule`` names the length-scaling rule used beyond ``train_len`` (``set_rule``).
    """

    name: ClassVar[str]
    rules: ClassVar[tuple[str, ...]] = ("none",)
    # Whether config.position_scale (a fixed factor on every distance) applies to this method.
    scalable: ClassVar[bool] = False
    # Whether the weights fix train_len (a table of one row per position): no other length trains.
    fixes_train_len: ClassVar[bool] = False

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        """Refuse a config this method cannot build (default: any config is fine).

        Raises:
            ValueError: naming the field and the requirement.
        """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.rule: str = "none"

    @property
    def max_len(self) -> int | None:
        """The longest input this method can represent; ``None`` means unbounded."""
        return None

    def set_rule(self, rule: str) -> None:
        """Choose how positions are scaled when the input is longer than ``train_len``.

        Raises:
            ValueError: the rule is not one this method supports (the message lists them).
        """
        name = rule.partition(":")[0] if isinstance(rule, str) else rule
        if name not in self.rules:
            raise ValueError(
                f"{self.name!r} positions do not support scaling rule {rule!r}; "
                f"valid rules: {', '.join(self.rules)}"
            )
        if name != rule:  # a parameter (window:8): the rule's own check
            check_rule(rule)
        self.rule = rule

    def embed(self, x_BTC: Tensor, pos_T: Tensor) -> Tensor:
        """Add position information to token embeddings (default: unchanged)."""
        return x_BTC

    def rotate(self, q_BHTD: Tensor, k_BHTD: Tensor, q_pos: Tensor,
               k_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate the new queries and keys before keys are cached (default: unchanged)."""
        return q_BHTD, k_BHTD

    @classmethod
    def config_warnings(cls, config: ModelConfig) -> list[str]:
        """What in ``config`` will spoil inputs longer than ``train_len`` (default: nothing)."""
        return []

    def prepare(self, q_len: int, k_len: int, device: torch.device,
                key_padding_mask: Tensor | None = None) -> Tensor | None:
        """State for one forward pass, handed to every layer's ``attend`` (default: none).

        The model calls it once per forward, so work that is the same in every layer is done once.

        Args:
            q_len, k_len: ``T`` new tokens and ``S`` keys (cached plus new) of this forward.
            key_padding_mask: ``[B, S]`` bool, True = real token, as ``attend`` gets it.
        """
        return None

    def attend(self, q_BHTD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *,
               key_padding_mask: Tensor | None = None, state: Tensor | None = None,
               key_norms: KeyNorms | None = None) -> Tensor:
        """Causal attention of the ``T`` queries over all ``S`` keys (default: no bias).

        Args:
            key_padding_mask: ``[B, S]`` bool, True = real token.
            state: what ``prepare(T, S, device)`` returned for this forward; ``None`` when
                ``attend`` is called on its own, in which case a method computes it itself.
            key_norms: a KV cache's ``KeyNorms`` of ``k_BHSD``, or ``None``; a method whose
                bias makes far keys negligible (ALiBi) uses them to leave those keys unread.

        Returns:
            ``[B, H, T, D]``.
        """
        return causal_attention(q_BHTD, k_BHSD, v_BHSD, key_padding_mask=key_padding_mask)


# --- the methods ---------------------------------------------------------------------------------


class NoPositions(PositionMethod):
    """NoPE: no position information beyond the causal mask."""

    name = "none"


class SinusoidalPositions(PositionMethod):
    """Fixed sinusoids (Vaswani et al. 2017, section 3.5), computed for any position.

    ``PE[pos, 2i] = sin(pos / 10000^(2i/C))``, ``PE[pos, 2i+1] = cos(...)``. Vaswani et al. and
    fairseq (the ALiBi paper's code) add PE to token embeddings of unit scale (initialised with std
    ``C^-0.5``, multiplied by ``sqrt(C)``): PE's RMS is 0.71 of the tokens'. With
    ``embedding="fairseq"`` that is what happens. With ``"gpt2"`` token embeddings start at std
    ``INIT_STD``, so PE is scaled by ``INIT_STD`` to keep the initial ratio; the tokens may then
    grow in training while PE stays at its scale.
    """

    name = "sinusoidal"

    def embed(self, x_BTC: Tensor, pos_T: Tensor) -> Tensor:
        C = x_BTC.shape[-1]
        angles = rotary_angles(pos_T, C, base=10000.0)  # [..., T, ceil(C/2)]: same frequencies
        pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :C]
        scale = 1.0 if self.config.embedding == "fairseq" else INIT_STD
        return x_BTC + (pe * scale).to(x_BTC.dtype)


class LearnedPositions(PositionMethod):
    """A trained table of ``train_len`` absolute position embeddings (GPT-2); cannot extrapolate."""

    name = "learned"
    fixes_train_len = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.table = nn.Embedding(config.train_len, config.d_model)

    @property
    def max_len(self) -> int:
        return self.config.train_len

    def embed(self, x_BTC: Tensor, pos_T: Tensor) -> Tensor:
        if pos_T.numel() and int(pos_T.max()) >= self.max_len:
            raise ValueError(
                f"position {int(pos_T.max())} is past the learned position table ({self.max_len} "
                f"rows, positions 0..{self.max_len - 1}): learned positions cannot extrapolate "
                f"beyond train_len; use a relative method such as 'alibi' for longer inputs"
            )
        return x_BTC + self.table(pos_T)


class RotaryPositions(PositionMethod):
    """Rotary embeddings (Su et al. 2021), base ``config.rotary_base``, interleaved pairs.

    Rules act when ``L' > L``, where ``L'`` is the total key length of the call
    (``k_pos.max() + 1``): ``"linear"`` is position interpolation (Chen et al. 2023, arXiv
    2306.15595), positions times ``L / L'``; ``"ntk"`` NTK-aware scaling of the base and
    ``"yarn"`` YaRN (Peng et al. 2023), with its temperature (``rotary_rule_freqs``). Keys are
    cached after rotation, so with a rule a key keeps the rotation of the call that wrote it. ``config.position_scale`` multiplies positions at every
    length (a fine-tune's fixed interpolation), before any rule.
    """

    name = "rotary"
    rules = ("none", "linear", "ntk", "yarn")
    summaries: ClassVar[dict[str, str]] = {
        "linear": "positions x L/L', Chen et al. 2023",
        "ntk": "NTK-aware: base x (L'/L)^(D/(D-2))",
        "yarn": "YaRN, Peng et al. 2023: per-dimension ramp and its temperature",
    }
    scalable = True

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        if config.head_dim % 2 != 0:  # q and k rotate in pairs of dimensions
            raise ValueError(f"rotary positions need an even head dim, got {config.head_dim}")

    def rotate(self, q_BHTD: Tensor, k_BHTD: Tensor, q_pos: Tensor,
               k_pos: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.config.position_scale  # a fine-tune's fixed interpolation, at every length
        L, Lp = self.config.train_len, int(k_pos.max()) + 1
        D, base = q_BHTD.shape[-1], self.config.rotary_base
        freqs, qk_factor = None, 1.0
        if self.rule == "linear":
            factor *= scaling_factor(L, Lp, self.rule)
        elif self.rule != "none" and Lp > L:
            freqs, qk_factor = rotary_rule_freqs(D, base, L, Lp, self.rule)
            freqs = freqs.to(torch.float32).to(q_BHTD.device)
        if factor != 1.0:
            q_pos, k_pos = q_pos * factor, k_pos * factor
        q_BHTD = apply_rotary(q_BHTD, rotary_angles(q_pos, D, base, freqs))
        k_BHTD = apply_rotary(k_BHTD, rotary_angles(k_pos, D, base, freqs))
        if qk_factor != 1.0:
            q_BHTD, k_BHTD = q_BHTD * qk_factor, k_BHTD * qk_factor
        return q_BHTD, k_BHTD


class T5Positions(PositionMethod):
    """T5 relative bias (Raffel et al. 2020): a learned scalar per head per distance bucket.

    One table is shared by all layers, as in T5, so the ``[H, T, S]`` bias is gathered once per
    forward (``prepare``), not once per layer. Distances are query index minus key index.
    ``config_warnings`` flags buckets that only distances ``>= train_len`` reach.
    """

    name = "t5"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.relative_bias = nn.Embedding(config.t5_buckets, config.n_heads)

    def bias(self, q_len: int, k_len: int) -> Tensor:
        """The score bias ``[H, q_len, k_len]`` for queries that are the last ``q_len`` keys."""
        device = self.relative_bias.weight.device
        i = torch.arange(k_len - q_len, k_len, device=device).view(-1, 1)
        j = torch.arange(k_len, device=device).view(1, -1)
        buckets_TS = t5_bucket(i - j, self.config.t5_buckets, self.config.t5_max_distance)
        return self.relative_bias(buckets_TS).permute(2, 0, 1)

    @classmethod
    def config_warnings(cls, config: ModelConfig) -> list[str]:
        L, N, D = config.train_len, config.t5_buckets, config.t5_max_distance
        untrained = t5_untrained_buckets(L, N, D)
        if not untrained:
            return []
        buckets = _t5_buckets_by_distance(L, N, D)
        first = int((buckets == untrained[0]).nonzero()[0])  # the shortest distance using one
        # Either fix makes distance L - 1 reach the last bucket, which all farther ones share.
        fixes = [f"train_len >= {int((buckets == N - 1).nonzero()[0]) + 1}"]
        # The largest max_distance that works, by bisection: a smaller one only moves each
        # distance into the same or a later bucket.
        works, fails = N // 2, D  # N // 2 is below every valid max_distance
        while fails - works > 1:
            mid = (works + fails) // 2
            works, fails = (works, mid) if t5_untrained_buckets(L, N, mid) else (mid, fails)
        if works > N // 2:
            fixes.insert(0, f"t5_max_distance <= {works}")
        return [
            f"t5 buckets {untrained} (of t5_buckets={N}, t5_max_distance={D}) are reached only "
            f"by distances >= train_len={L}: training never gives them a gradient, yet inputs "
            f"longer than {first} tokens use them; use {' or '.join(fixes)}"
        ]

    def prepare(self, q_len: int, k_len: int, device: torch.device,
                key_padding_mask: Tensor | None = None) -> Tensor:
        # One gather per forward; autograd sums every layer's gradient into the one table.
        return self.bias(q_len, k_len)

    def attend(self, q_BHTD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *,
               key_padding_mask: Tensor | None = None, state: Tensor | None = None,
               key_norms: KeyNorms | None = None) -> Tensor:
        bias_HTS = self.bias(q_BHTD.shape[-2], k_BHSD.shape[-2]) if state is None else state
        return causal_attention(
            q_BHTD, k_BHSD, v_BHSD, bias_HTS=bias_HTS, key_padding_mask=key_padding_mask
        )


class AlibiPositions(PositionMethod):
    """ALiBi (Press et al. 2022): score bias ``-m_h * (i - j)``, no embeddings.

    A rule of ``linbias.alibi.SCALING_RULES`` acts past ``train_len`` for the length ``L'`` of the
    call (its keys, or with a padding mask each row's real tokens, so a left-padded row gets what
    it would get alone): it scales the slopes (position interpolation, Al-Khateeb et al. 2023;
    ``ntk``), the logits (``logn``) or counts distance otherwise (``cap``, ``window``,
    ``selfextend``). The bias is applied at score time, so a KV cache stays usable as the terms
    change during generation; but a cached token keeps the
    hidden states computed at its own length, so past ``train_len`` a cached step of a model
    with several layers differs slightly from recomputing the whole sequence with the newest
    slopes (they agree exactly for one layer).
    """

    name = "alibi"
    rules = tuple(SCALING_RULES)
    scalable = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        # Fixed, derived from the config: non-persistent, so it never enters a checkpoint.
        # position_scale is a fine-tune's fixed interpolation (m * L / L2), at every length.
        slopes = alibi_slopes(config.n_heads, config.alibi_max_bias) * config.position_scale
        self.register_buffer("slopes", slopes, persistent=False)

    def prepare(self, q_len: int, k_len: int, device: torch.device,
                key_padding_mask: Tensor | None = None) -> _AlibiState:
        # The slopes, temperature and distance count of this forward, once for every layer.
        return self._state(k_len, key_padding_mask)

    def _state(self, k_len: int, key_padding_mask: Tensor | None) -> _AlibiState:
        """The rule's terms for this call's L': slopes ``[H]``, or ``[B, H]`` when padded rows
        differ in L'; a temperature per row (``logn``) or None; the distance count or None."""
        L = self.config.train_len
        if self.rule == "none":
            return _AlibiState(self.slopes)
        # L' counts a row's real tokens, not its padding: each row gets the terms it would get
        # alone, all rows in one call.
        lengths = [k_len] if key_padding_mask is None else row_lengths(key_padding_mask).tolist()
        if len(set(lengths)) == 1:
            lengths = lengths[:1]
        slopes = row_slopes(self.slopes, L, lengths, self.rule)
        t = temperatures(L, lengths, self.rule)
        return _AlibiState(
            slopes if len(slopes) > 1 else slopes[0],
            None if t is None else torch.tensor(t, dtype=self.slopes.dtype,
                                                device=self.slopes.device).view(-1, 1, 1, 1),
            rule_distances(L, lengths, self.rule),
        )

    def attend(self, q_BHTD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, *,
               key_padding_mask: Tensor | None = None, state: _AlibiState | None = None,
               key_norms: KeyNorms | None = None) -> Tensor:
        state = self._state(k_BHSD.shape[-2], key_padding_mask) if state is None else state
        if state.temperature is not None:  # q . k times the factor; the bias stays as it is
            q_BHTD = q_BHTD * state.temperature.to(q_BHTD.dtype)
        return alibi_attention(q_BHTD, k_BHSD, v_BHSD, state.slopes,
                               key_padding_mask=key_padding_mask, distances=state.distances,
                               key_norms=key_norms)


@dataclass(frozen=True)
class _AlibiState:
    """One forward's ALiBi terms, shared by every layer."""

    slopes: Tensor  # [H] or [B, H]
    temperature: Tensor | None = None  # [1 or B, 1, 1, 1] on q . k (logn), or None
    distances: Distances | None = None  # a rule's distance count, or None


POSITION_METHODS: dict[str, type[PositionMethod]] = {
    cls.name: cls
    for cls in (
        NoPositions, SinusoidalPositions, LearnedPositions, RotaryPositions, T5Positions,
        AlibiPositions,
    )
}


def make_position(config: ModelConfig) -> PositionMethod:
    """The position method named by ``config.position`` (a key of ``POSITION_METHODS``, checked
    when the config was built)."""
    return POSITION_METHODS[config.position](config)


def position_warnings(config: ModelConfig) -> list[str]:
    """Warnings about ``config``'s position method, e.g. T5 buckets that training never reaches.

    Returns:
        One message per problem; empty when there is none.
    """
    return POSITION_METHODS[config.position].config_warnings(config)
