"""Model configuration: a frozen keyword-only dataclass, exact-name presets, JSON round-trip.

Configs store names (``position="alibi"``), never classes, so the JSON written beside the weights
rebuilds the model. ``train_len`` is the training length ``L`` of ALiBi (Press et al. 2022,
arXiv 2108.12409): the length the model was trained at, never a cap on the input length.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

__all__ = [
    "INIT_STD", "ConfigBase", "ModelConfig", "POSITIONS", "PRESETS", "Position", "check_int",
    "check_positive_float", "model_config",
]

Position = Literal["none", "sinusoidal", "learned", "rotary", "t5", "alibi"]
POSITIONS: tuple[str, ...] = get_args(Position)

_C = TypeVar("_C", bound="ConfigBase")

# GPT-2's initialisation scale for weights and token embeddings; sinusoidal positions use it too.
INIT_STD = 0.02


class ConfigBase:
    """Dict and JSON round-trip for a dataclass config (a base for ``ModelConfig`` and others)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable for configs of plain values)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} keys: {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def to_json(self) -> str:
        """The config as a JSON object string (``from_json`` reads it back)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[_C], s: str) -> _C:
        """Build from the string ``to_json`` wrote."""
        return cls.from_dict(json.loads(s))


def check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
        high is not None and value > high
    ):
        bound = (f"an integer in {low}..{high}" if high is not None else
                 "a positive integer" if low == 1 else "a non-negative integer" if low == 0 else
                 f"an integer >= {low}")
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ConfigBase):
    """A GPT decoder and its position method.

    Args:
        vocab_size: number of token ids.
        n_layers: transformer blocks.
        n_heads: attention heads; must divide ``d_model``.
        d_model: residual stream width.
        d_ff: MLP hidden width; ``None`` means ``4 * d_model`` (see ``ff_dim``).
        position: the position method, a key of ``linbias.positions.POSITION_METHODS``.
        train_len: the training length ``L``. Only ``learned`` positions are limited by it (its
            table has exactly ``train_len`` rows); scaling rules use it as ``L``.
        dropout: dropout on embeddings and residual branches.
        tie_weights: share the token embedding with the output projection.
        bias: additive biases in linear layers and LayerNorms. Off by default, as in MPT, so an
            ALiBi model exports to transformers' MPT exactly.
        alibi_max_bias: ALiBi slope exponent scale (8 gives the paper's slopes).
        rotary_base: RoPE frequency base (RoFormer: 10000).
        t5_buckets: T5 relative-position buckets (T5: 32).
        t5_max_distance: distance at which T5's log-spaced buckets end (T5: 128).
    """

    vocab_size: int = 4096
    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    d_ff: int | None = None
    position: Position = "alibi"
    train_len: int = 128
    dropout: float = 0.0
    tie_weights: bool = True
    bias: bool = False
    alibi_max_bias: float = 8.0
    rotary_base: float = 10000.0
    t5_buckets: int = 32
    t5_max_distance: int = 128

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "train_len", "t5_buckets",
                     "t5_max_distance"):
            check_int(name, getattr(self, name))
        if self.d_ff is not None:
            check_int("d_ff", self.d_ff)
        check_positive_float("alibi_max_bias", self.alibi_max_bias)
        check_positive_float("rotary_base", self.rotary_base)
        if self.position not in POSITIONS:
            raise ValueError(
                f"unknown position method {self.position!r}; valid: {', '.join(POSITIONS)}"
            )
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.position == "rotary" and self.head_dim % 2 != 0:
            raise ValueError(f"rotary positions need an even head dim, got {self.head_dim}")
        if self.t5_max_distance <= self.t5_buckets // 2:
            raise ValueError(
                f"t5_max_distance ({self.t5_max_distance}) must exceed half of t5_buckets "
                f"({self.t5_buckets // 2}), where the log-spaced buckets start"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def ff_dim(self) -> int:
        """The MLP hidden width: ``d_ff``, or ``4 * d_model`` when unset."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def head_dim(self) -> int:
        """Per-head width ``d_model / n_heads``."""
        return self.d_model // self.n_heads


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layers=2, n_heads=4, d_model=128),
    "small": dict(n_layers=4, n_heads=8, d_model=256),
    "base": dict(n_layers=6, n_heads=8, d_model=512),
}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """A preset by its exact name, with fields overridden.

    Args:
        preset: a key of ``PRESETS``.
        **overrides: ``ModelConfig`` fields, e.g. ``position="rotary"``, ``train_len=512``.

    Raises:
        ValueError: unknown preset or unknown field (the message lists the valid ones).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[preset], **overrides})
