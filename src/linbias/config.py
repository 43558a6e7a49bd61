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
from collections.abc import Callable, Iterable
from typing import Any, Literal, Optional, TypeVar, Union, get_args, get_origin

from linbias.checks import check_int, check_positive_float, check_real, is_finite_number

__all__ = [
    "DEPTHS", "INIT_STD", "MODES", "REPRODUCE_PRESETS", "ConfigBase", "Embedding", "EvalConfig",
    "Mode", "ReproducePreset", "Task", "TrainConfig", "resolve_stride",
    "is_finite_number", "ModelConfig", "PRESETS", "check_int",
    "check_positive_float", "model_config",
]

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
        position_scale: every position and distance is multiplied by this, at every length
            (ALiBi: slopes ``m * position_scale``; rotary: positions ``pos * position_scale``).
            A fine-tune from a run trained at ``L`` to ``L2`` keeps it at ``L / L2`` (the fixed
            interpolation of BTLM and Chen et al. 2023); 1 everywhere else. Scaling rules act on
            top of it, counted from this config's ``train_len``.
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
    position: str = "alibi"
    train_len: int = 128
    dropout: float = 0.0
    tie_weights: bool = True
    bias: bool = False
    alibi_max_bias: float = 8.0
    rotary_base: float = 10000.0
    t5_buckets: int = 32
    t5_max_distance: int = 128
    position_scale: float = 1.0
    embedding: Embedding = "gpt2"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "train_len", "t5_buckets",
                     "t5_max_distance"):
            check_int(name, getattr(self, name))
        if self.d_ff is not None:
            check_int("d_ff", self.d_ff)
        check_positive_float("alibi_max_bias", self.alibi_max_bias)
        check_positive_float("rotary_base", self.rotary_base)
        check_positive_float("position_scale", self.position_scale)
        from linbias.positions import POSITION_METHODS  # the one registry (it imports this module)

        if self.position not in POSITION_METHODS:
            raise ValueError(f"unknown position method {self.position!r}; valid: "
                             f"{', '.join(POSITION_METHODS)}")
        if self.position_scale != 1.0 and not POSITION_METHODS[self.position].scalable:
            scalable = [name for name, cls in POSITION_METHODS.items() if cls.scalable]
            raise ValueError(
                f"position_scale={self.position_scale:g} applies to {' and '.join(scalable)} "
                f"positions only, not {self.position!r}: leave it at 1"
            )
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        POSITION_METHODS[self.position].check_config(self)
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


@dataclass(frozen=True, kw_only=True)
class TrainConfig(ConfigBase):
    """How a model is trained (the model itself is a ``ModelConfig``).

    Args:
        data: corpus spec (``stdlib``, ``text:PATH``, ``hf:NAME[:CONFIG]``).
        vocab_size: tokenizer vocabulary size requested from BPE training.
        steps: optimizer steps.
        batch_size: sequences per process per micro-step.
        grad_accum: micro-steps per optimizer step.
        lr: peak learning rate (AdamW), reached after ``warmup`` steps, then cosine to
            ``lr * min_lr_ratio`` at ``steps``.
        weight_decay: AdamW decoupled weight decay on matrices (not on norms, biases, tables).
        grad_clip: max global gradient norm (0 disables).
        seed: fixes initialisation, data order and results.
        bf16: bfloat16 autocast for the forward pass.
        eval_every: steps between validation losses (0: only at the end).
        eval_batches: validation batches per evaluation.
        save_every: steps between checkpoints (a checkpoint is always written at the end).
        log_every: steps between log lines.
        mix_task: a retrieval task of ``linbias.tasks.TASKS`` (``"passkey"``, ``"lines"``) whose
            sequences replace a share of the training rows, so that a model trained from scratch
            learns the task at length L and can be tested on it past L.
        mix_fraction: the share of training rows replaced (each row independently, seeded by the
            step); validation batches stay plain corpus, so the valid loss stays comparable.
        mix_filler: the passkey haystack: ``"sentences"``, the repeated filler sentences of the
            published passkey test (the prompts ``linbias eval --task passkey`` uses by default),
            or ``"corpus"``, a slice of the training split (a needle in a real haystack).
        init_from: a finished run to start from (its weights and tokenizer, nothing else: the
            optimizer, schedule and step count start afresh). The model config may change only
            what the weights do not fix: ``train_len``, ``position_scale``, ``alibi_max_bias``,
            ``rotary_base``, ``t5_max_distance``, ``dropout``.
    """

    data: str = "stdlib"
    vocab_size: int = 4096
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = False
    eval_every: int = 200
    eval_batches: int = 16
    save_every: int = 500
    log_every: int = 10
    mix_task: Optional[Task] = None
    mix_fraction: float = 0.0
    mix_filler: Literal["sentences", "corpus"] = "sentences"
    init_from: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            check_int(name, getattr(self, name))
        for name in ("warmup", "eval_every", "save_every", "seed"):
            check_int(name, getattr(self, name), low=0)
        # Finite and in range: one inf or nan here makes every later loss nan, silently.
        check_real("lr", self.lr, 0.0, low_open=True)
        check_real("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_real("weight_decay", self.weight_decay, 0.0)
        check_real("grad_clip", self.grad_clip, 0.0)
        check_real("mix_fraction", self.mix_fraction, 0.0, 1.0)
        if (self.mix_task is None) != (self.mix_fraction == 0):
            raise ValueError(
                f"mix_task={self.mix_task!r} with mix_fraction={self.mix_fraction:g}: give both "
                "(e.g. --mix-task passkey --mix-fraction 0.25) or neither"
            )
        if self.init_from is not None and not self.init_from.strip():
            raise ValueError("init_from must name a run directory, got an empty string")
        if self.mix_filler == "corpus" and self.mix_task not in (None, "passkey"):
            raise ValueError(f"mix_filler='corpus' is a passkey haystack; task {self.mix_task!r} "
                             "has no filler to replace: use mix_filler='sentences'")


Mode = Literal["nonoverlapping", "sliding"]
MODES: tuple[str, ...] = get_args(Mode)
Task = Literal["passkey", "lines"]
DEPTHS: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)


def resolve_stride(mode: str, eval_len: int, stride: int | None) -> int:
    """The stride of ``mode`` at ``eval_len``: ``eval_len`` for ``nonoverlapping`` (``stride``
    must be ``None`` or equal), ``stride`` for ``sliding`` (required, ``1 <= stride <= eval_len``).

    Raises:
        ValueError: naming the mode, the stride and the fix.
    """
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; valid modes: {', '.join(MODES)}")
    if stride is not None:  # typed first: 8.0 or True must not pass a comparison with eval_len
        check_int("stride", stride, 1)
    if mode == "nonoverlapping":
        if stride is not None and stride != eval_len:
            raise ValueError(
                f"mode 'nonoverlapping' uses stride = eval_len ({eval_len}); got stride={stride}. "
                "Use mode='sliding' for another stride"
            )
        return eval_len
    if stride is None:
        raise ValueError("mode 'sliding' needs a stride S with 1 <= S <= eval_len (S=1: slowest)")
    check_int(f"stride (eval_len={eval_len})", stride, 1, eval_len)
    return int(stride)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(ConfigBase):
    """What an evaluation measures (``linbias.evaluate``): lengths and rules, then the perplexity
    protocol, then the retrieval task. Every value is checked when the config is built, so a typo
    never costs a long evaluation; what depends on the model (which rules it has) is checked when
    the model is known.

    Args:
        lengths: evaluation lengths L' in tokens; records come back in this order.
        rules: length-scaling rules, each evaluated separately (ALiBi: none, linear, sqrt, log,
            ntk, cap, window or window:SINKS, selfextend, logn; rotary: none, linear, ntk,
            yarn); a rule acts only when L' > L.
        batch_size: windows (perplexity) or trials (retrieval) per forward.
        data: corpus spec, encoded with the model's own tokenizer (``stdlib``, ``text:PATH``,
            ``hf:NAME[:CONFIG]``); ``None``: a run's own corpus, ``stdlib`` for transformers models.
        split: the corpus split scored.
        mode: ``nonoverlapping`` windows of L', or a ``sliding`` window.
        stride: the sliding stride S, ``1 <= S <= min(lengths)``; ``None`` for nonoverlapping.
        max_tokens: score only this many tokens of the split (``None``: all).
        per_position: also compute the mean loss by position inside the window.
        task: a retrieval task of ``linbias.tasks.TASKS`` (exact-match accuracy per length and
            needle depth, and k_max) instead of perplexity.
        depths: needle depths in percent, 0..100.
        trials: trials per (length, depth) cell.
        seed: fixes every trial.
        filler: the passkey haystack of a run: ``sentences`` or ``corpus`` (its corpus's valid
            split); ``None``: what the run was trained with (transformers models: ``sentences``).
    """

    lengths: tuple[int, ...]
    rules: tuple[str, ...] = ("none",)
    batch_size: int = 8
    data: Optional[str] = None
    split: Literal["valid", "test", "train"] = "valid"
    mode: Mode = "nonoverlapping"
    stride: Optional[int] = None
    max_tokens: Optional[int] = None
    per_position: bool = False
    task: Optional[Task] = None
    depths: tuple[float, ...] = DEPTHS
    trials: int = 10
    seed: int = 0
    filler: Optional[Literal["sentences", "corpus"]] = None

    def __post_init__(self) -> None:
        if not self.lengths:
            raise ValueError("lengths must name at least one evaluation length L'")
        for length in self.lengths:
            check_int("eval_len", length)
            resolve_stride(self.mode, length, self.stride)
        if not self.rules or not all(self.rules):
            raise ValueError(f"rules must be a non-empty list of rule names, got {list(self.rules)}")
        check_int("batch_size", self.batch_size)
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens)
        if not self.depths or not all(0 <= d <= 100 for d in self.depths):
            raise ValueError(f"depths must be a non-empty list of percents in 0..100, got "
                             f"{list(self.depths)}")
        check_int("trials", self.trials)
        check_int("seed", self.seed, low=0)
        # A field of the other protocol given a value of its own would be silently ignored.
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        check_protocol(self.task, [n for n in (*TASK_ONLY, *PERPLEXITY_ONLY)
                                   if getattr(self, n) != defaults[n]])


# The EvalConfig fields of one protocol: retrieval (a task) or perplexity (no task).
TASK_ONLY = ("depths", "trials", "seed", "filler")
PERPLEXITY_ONLY = ("data", "mode", "stride", "max_tokens", "per_position")


def check_protocol(task: Optional[str], given: Iterable[str], *,
                   name: Callable[[str], str] = str, task_word: str = "a task") -> None:
    """Refuse fields of the protocol ``task`` does not run (retrieval fields without a task,
    perplexity fields with one): they would be ignored. ``name`` spells a field (the CLI: its
    flag), ``task_word`` the task itself.

    Raises:
        ValueError: naming each such field and the fix.
    """
    given = set(given)
    wrong = [name(n) for n in (TASK_ONLY if task is None else PERPLEXITY_ONLY) if n in given]
    if wrong:
        one = len(wrong) == 1
        raise ValueError(f"{', '.join(wrong)} appl{'ies' if one else 'y'} only "
                         f"{'with' if task is None else 'without'} {task_word}; drop "
                         f"{'it' if one else 'them'} or " +
                         (f"add {task_word}" if task is None else "evaluate perplexity separately"))


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


@dataclass(frozen=True, kw_only=True)
class ReproducePreset(ConfigBase):
    """One size of the experiment.

    Args:
        model: model preset name (``linbias.config.PRESETS``).
        n_layers: the model preset's depth replaced by this (``None``: the preset's own).
        train_len: the training length L.
        steps: optimizer steps per model.
        batch_size: sequences per step.
        lr: peak learning rate.
        warmup: warmup steps.
        vocab_size: BPE vocabulary size.
        bf16: bfloat16 autocast in training (evaluation runs in float32). Off in every preset:
            bf16 is fast only on CPUs with native bf16 instructions (emulated elsewhere, many
            times slower), and float32 gives the same numbers on every CPU up to rounding.
        t5_max_distance: T5's ``max_distance`` for this L (``None``: the model default, 128). T5
            ran it at L/4; every bucket used past L must be reached by some distance below L,
            or it is never trained (``positions.t5_untrained_buckets``).
        embedding: token embedding convention (``ModelConfig.embedding``): ``"gpt2"`` or
            ``"fairseq"`` (the paper's code).
        task: a retrieval task (``linbias.tasks.TASKS``) to mix into training and evaluate at
            every length, depth and rule; ``None``: perplexity only.
        task_fraction: the share of training rows that are task sequences.
        depths: needle depths (percent) of the retrieval evaluation.
        trials: trials per (length, depth) cell.
        profile_windows: windows of the valid split for the attention-distance profile
            (``linbias.evaluate.attention_profile``); 0: none.
        profile_multiple: their length, as a multiple of L.
        sliding_tokens: the first tokens of the valid split scored with a sliding window of
            stride 1 at each L' up to half of them, beside non-overlapping windows over the same
            tokens (the ALiBi paper's appendix B), without scaling rules; 0: none.
        multiples: evaluation lengths as multiples of L.
        eval_tokens: tokens scored per evaluation (a prefix of the split; 0 means all).
        eval_batch_size: windows per forward when evaluating.
        finetune_steps: the fine-tune study (``TrainConfig.init_from``): each trained model is
            fine-tuned at ``finetune_multiple * L`` for each of these step counts (0: the model as
            it is, at the new length), plainly and, for ALiBi and rotary, with positions fixed at
            x ``1 / finetune_multiple``; empty: no study.
        finetune_multiple: the fine-tune length, as a multiple of L.
        finetune_batch_size: sequences per fine-tune step.
        finetune_lr: peak learning rate of the fine-tunes (after ``finetune_warmup`` steps).
        finetune_warmup: warm-up steps of the fine-tunes.
        finetune_rules: the rules each fine-tuned model is evaluated with, where its method has
            them (past the fine-tune length L2 they scale from L2). With ``map_distances`` every
            fine-tuned model also gets the needle map under these rules.
        rules: the scaling rules every evaluation runs, each where the method has it
            (``linbias.alibi.SCALING_RULES``; rotary: ``none``, ``linear``, ``ntk``, ``yarn``).
        map_distances: the needle map (``linbias.evaluate.needle_map``): passkey needles this
            many tokens before the answer, at every evaluation length and rule, with each head's
            attention on the needle; empty: no map.
        map_trials: trials per map cell.
        expected_minutes: wall time of one seed on 2 idle CPU cores, end to end, estimated from
            measured training speed (float32).
    """

    model: str
    train_len: int
    steps: int
    batch_size: int
    n_layers: Optional[int] = None
    lr: float = 2e-3
    warmup: int = 50
    vocab_size: int = 4096
    bf16: bool = False
    t5_max_distance: Optional[int] = None
    embedding: Embedding = "gpt2"
    task: Optional[Task] = None
    task_fraction: float = 0.25
    depths: tuple[float, ...] = DEPTHS
    trials: int = 10
    profile_windows: int = 0
    profile_multiple: int = 4
    sliding_tokens: int = 0
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    eval_tokens: int = 0
    eval_batch_size: int = 8
    finetune_steps: tuple[int, ...] = ()
    finetune_multiple: int = 4
    finetune_batch_size: int = 8
    finetune_lr: float = 5e-4
    finetune_warmup: int = 10
    finetune_rules: tuple[str, ...] = ("none", "linear")
    rules: tuple[str, ...] = ("none", "linear", "sqrt", "log")
    map_distances: tuple[int, ...] = ()
    map_trials: int = 10
    expected_minutes: float = 0.0

    def __post_init__(self) -> None:
        for n in self.finetune_steps:
            check_int("finetune_steps", n, low=0)
        if len(set(self.finetune_steps)) != len(self.finetune_steps):
            raise ValueError(f"finetune_steps must not repeat, got {list(self.finetune_steps)}")
        check_int("finetune_multiple", self.finetune_multiple, low=2)
        check_int("finetune_batch_size", self.finetune_batch_size)
        check_int("finetune_warmup", self.finetune_warmup, low=0)
        check_real("finetune_lr", self.finetune_lr, 0.0, low_open=True)
        for name in ("rules", "finetune_rules"):
            rules = getattr(self, name)
            if not rules or rules[0] != "none":
                raise ValueError(f"{name} must start with 'none' (the method as trained), got "
                                 f"{list(rules)}")
        for n in self.map_distances:
            check_int("map_distances", n)
        check_int("map_trials", self.map_trials)
        if self.n_layers is not None:
            check_int("n_layers", self.n_layers)


REPRODUCE_PRESETS: dict[str, ReproducePreset] = {
    # T5's max_distance: L/4 as in T5 would be 16, which 32 buckets cannot hold (their log-spaced
    # half starts at 16); L/2 is the nearest that keeps every bucket used past L trained.
    "quick": ReproducePreset(model="tiny", train_len=64, steps=1200, batch_size=16, lr=2e-3,
                             warmup=100, vocab_size=2048, t5_max_distance=32, expected_minutes=8),
    # Retrieval: the passkey prompt (instruction, needle, question) takes 92 tokens with this
    # vocabulary, so L = 128 leaves the needle room to move. Half the rows are passkey: with a
    # quarter, ALiBi answered 66% at L after these steps; with half, every trial at L.
    "retrieval": ReproducePreset(model="tiny", train_len=128, steps=1200, batch_size=16, lr=2e-3,
                                 warmup=100, vocab_size=2048, t5_max_distance=64, task="passkey",
                                 task_fraction=0.5, profile_windows=4, sliding_tokens=1024,
                                 expected_minutes=20),
    # Fine-tune at 4L (Chen et al. 2023; BTLM): the retrieval preset's models, so that passkey
    # k_max means something, each fine-tuned on the same mix for 0, 50, 100 and 200 steps.
    "finetune": ReproducePreset(model="tiny", train_len=128, steps=1200, batch_size=16, lr=2e-3,
                                warmup=100, vocab_size=2048, t5_max_distance=64, task="passkey",
                                task_fraction=0.5, trials=5, eval_tokens=65536,
                                finetune_steps=(0, 50, 100, 200), expected_minutes=30),
    # Remedies past L (issue: tell dilution from reach): the retrieval preset's models, every
    # rule, and the needle map over distance x length with each head's attention on the needle.
    "remedies": ReproducePreset(model="tiny", train_len=128, steps=1200, batch_size=16, lr=2e-3,
                                warmup=100, vocab_size=2048, t5_max_distance=64, task="passkey",
                                task_fraction=0.5, trials=5, depths=(0.0, 50.0, 100.0),
                                eval_tokens=65536, rules=("none", "linear", "sqrt", "log", "ntk", "cap", "window",
                                       "selfextend", "logn", "yarn"),
                                map_distances=(48, 96, 192, 384, 768, 1536), map_trials=10,
                                expected_minutes=15),
    # The remedies study on models that answer at L whatever their position method: 4 layers and
    # 3000 steps (benchmarks/retrieval_budget.py measured, at L only, the steps each method
    # needs to reach 90%); the map and rules as in "remedies"; each model fine-tuned 200 steps
    # at 4L, then mapped under the rules that did best past L for near (logn) and far (cap)
    # needles. About 84 of the 160 minutes are training; 35 are the fine-tunes.
    "remedies-deep": ReproducePreset(model="tiny", n_layers=4, train_len=128, steps=3000,
                                     batch_size=16, lr=2e-3, warmup=100, vocab_size=2048,
                                     t5_max_distance=64, task="passkey", task_fraction=0.5,
                                     trials=5, depths=(0.0, 50.0, 100.0), eval_tokens=65536,
                                     rules=("none", "linear", "sqrt", "log", "ntk", "cap",
                                            "window", "selfextend", "logn", "yarn"),
                                     map_distances=(48, 96, 192, 384, 768, 1536), map_trials=10,
                                     finetune_steps=(200,), finetune_rules=("none", "logn", "cap"),
                                     expected_minutes=160),
    "paper-small": ReproducePreset(model="small", train_len=256, steps=5000, batch_size=32,
                                   lr=1e-3, warmup=250, t5_max_distance=64, expected_minutes=810),
}
