"""Model configuration: a frozen keyword-only dataclass, exact-name presets, JSON round-trip.

Configs store names (``position="alibi"``), never classes, so the JSON written beside the weights
rebuilds the model. ``train_len`` is the training length ``L`` of ALiBi (Press et al. 2022,
arXiv 2108.12409): the length the model was trained at, never a cap on the input length.

Every field of every ``ConfigBase`` dataclass is checked against its annotation when the config is
built, from code or from JSON: ``"tie_weights": "no"`` is truthy and ``"d_ff": 2.0`` would build a
different model, so a value of the wrong type is an error, never coerced or ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

__all__ = [
    "INIT_STD", "ConfigBase", "Embedding", "ModelConfig", "POSITIONS", "PRESETS", "Position", "check_int",
    "check_positive_float", "model_config",
]

Position = Literal["none", "sinusoidal", "learned", "rotary", "t5", "alibi"]
POSITIONS: tuple[str, ...] = get_args(Position)
Embedding = Literal["gpt2", "fairseq"]

_C = TypeVar("_C", bound="ConfigBase")

# GPT-2's initialisation scale for weights and token embeddings; sinusoidal positions use it too.
INIT_STD = 0.02


class ConfigBase:
    """Dict and JSON round-trip for a dataclass config (a base for ``ModelConfig`` and others).

    Building a subclass checks every field against its annotation (``_check_field_types``) before
    the subclass's own ``__post_init__`` runs, even one that does not call ``super()``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_field_types", False):
            # Wrapped here, before @dataclass reads it, so range checks only ever see typed values.
            @functools.wraps(own)
            def post_init(self: ConfigBase) -> None:
                _check_field_types(self)
                own(self)

            post_init._checks_field_types = True  # type: ignore[attr-defined]
            cls.__post_init__ = post_init  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        _check_field_types(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serialisable for configs of plain values)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Build from a dict (e.g. parsed JSON, where tuples arrive as lists).

        Raises:
            ValueError: ``d`` is not a dict, has unknown keys (named, with the valid ones), lacks
                a field without a default, or has a value of the wrong type (named, with the
                expected type).
        """
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__} must be a dict (a JSON object), got {d!r}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{cls.__name__} needs {', '.join(missing)} (no default)")
        names = {f.name for f in fields}
        unknown = sorted(set(d) - names, key=str)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} keys: {', '.join(map(str, unknown))}; "
                f"valid keys: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def to_json(self) -> str:
        """The config as a JSON object string (``from_json`` reads it back)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls: type[_C], s: str) -> _C:
        """Build from the string ``to_json`` wrote."""
        return cls.from_dict(json.loads(s))


class _Mismatch(Exception):
    """A value that does not fit an annotation (turned into a ``ValueError`` naming the field)."""


@functools.lru_cache(maxsize=None)
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolves the string annotations of __future__.annotations


def _check_field_types(config: ConfigBase) -> None:
    """Check every field against its annotation; store lists given for tuples as tuples.

    bool must be a real bool; int an integer, not a bool; float any finite real but a bool;
    str and ``Literal`` exact; ``X | None`` also ``None``; ``tuple[X, ...]`` a tuple or list of X.
    """
    cls, hints = type(config), _field_hints(type(config))
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        value, hint = getattr(config, field.name), hints[field.name]
        try:
            conformed = _conform(value, hint)
        except _Mismatch:
            raise ValueError(
                f"{cls.__name__}.{field.name} must be {_describe(hint)}, got {value!r} "
                f"({type(value).__name__})"
            ) from None
        if conformed is not value:
            object.__setattr__(config, field.name, conformed)  # frozen: set once, while building


def _conform(value: Any, hint: Any) -> Any:
    """``value`` as the annotation's type (int -> float, list -> tuple, numpy scalars -> Python),
    or ``_Mismatch``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is Union or origin is types.UnionType:
        for arg in args:
            try:
                return _conform(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if hint is type(None) or origin is Literal:
        options = (None,) if hint is type(None) else args
        if any(type(value) is type(option) and value == option for option in options):
            return value
        raise _Mismatch
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if hint is float and isinstance(value, numbers.Real) and not isinstance(value, bool) \
            and math.isfinite(value):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if origin is tuple and isinstance(value, (tuple, list)):
        return _conform_tuple(value, args)
    if origin is list and isinstance(value, list):
        return [_conform(v, args[0]) for v in value] if args else value
    if origin is None and isinstance(hint, type) and hint not in (bool, int, float, str, tuple):
        if isinstance(value, hint):
            return value
    elif origin not in (None, tuple, list) and isinstance(value, origin):
        return value  # other generics (dict[...]): the container type only
    raise _Mismatch


def _conform_tuple(value: tuple | list, args: tuple) -> tuple:
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_conform(v, args[0]) for v in value)
    if len(value) != len(args):
        raise _Mismatch
    return tuple(_conform(v, a) for v, a in zip(value, args))


def _describe(hint: Any) -> str:
    """The annotation in words, for error messages."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple or origin is list:
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return f"a list whose items are each {_describe(args[0])}"
        return f"a list of {len(args)}: " + ", ".join(_describe(a) for a in args)
    names = {type(None): "None (JSON null)", bool: "a bool (true or false)", int: "an integer",
             float: "a finite number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


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
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number above 0."""
    # inf passes "> 0" yet poisons everything it touches (inf * 0 = nan), so finiteness is checked.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


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
        embedding: how token embeddings are scaled. ``"gpt2"``: initialised with std
            ``INIT_STD`` (0.02) and used as they are; sinusoids are scaled by ``INIT_STD`` to keep
            their ratio to the tokens. ``"fairseq"`` (the ALiBi paper's code, after Vaswani et
            al.): initialised with std ``d_model^-0.5`` and multiplied by ``sqrt(d_model)``;
            sinusoids are added unscaled and a learned table starts at std ``d_model^-0.5``.
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
    embedding: Embedding = "gpt2"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "train_len", "t5_buckets",
                     "t5_max_distance"):
            check_int(name, getattr(self, name))
        if self.d_ff is not None:
            check_int("d_ff", self.d_ff)
        check_positive_float("alibi_max_bias", self.alibi_max_bias)
        check_positive_float("rotary_base", self.rotary_base)
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
        if not 0.0 <= self.dropout < 1.0:  # a finite float already (the field type check)
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
