"""What every family's patch shares: the per-call plan, the hooks, the fast path's arguments, undo.

A family unit (``linbias.hf.families``) says which names its base model's forward calls and how
its attention computes; this module plans each call (L' per row, keys, fast or not), replaces the
names it is given on one instance, records how to take every change back, and finds what a
transformers release calls things (cache keyword, mask builder) from its code, never its version.

Shape suffixes: B batch, H heads, K keys, T tokens of the current call, D head dim.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from linbias.alibi import Distances, parse_rule, row_lengths, row_slopes, rule_distances, temperatures
from linbias.attention import alibi_attention

# The names a release gives the KV cache argument, newest first (5.24 renamed past_key_values).
CACHE_ARGS = ("cache", "past_key_values", "past_key_value")
# The causal-mask builders a base model's forward may call, newest first: masking_utils' function
# (5.x), a method of the model (BLOOM and Falcon up to 4.57), modeling_attn_mask_utils' (MPT 4.x).
MASK_BUILDERS = ("create_causal_mask", "_update_causal_mask", "_prepare_4d_causal_attention_mask")
STATE = "_linbias_extension"  # attribute of the base model holding its Extension


class Family:
    """One ALiBi model family of transformers: everything the generic patching asks of it.

    A subclass lives in ``linbias.hf.families.<name>`` and is the only code that knows the
    family's classes, config fields and attention.
    """

    name: str  # as users and records spell it, e.g. "mpt"
    title: str  # as messages spell it, e.g. "MPT"
    classes: str  # the transformers classes that belong to it, for messages
    module: str  # its modeling module
    base_class: str  # its base model class, e.g. "MptModel"
    mask_2d_only: bool = True  # builds its bias from the 2-D mask, so a 4-D one is refused

    def modeling(self) -> types.ModuleType:
        return importlib.import_module(self.module)

    def matches(self, base: Any) -> bool:
        return isinstance(base, getattr(self.modeling(), self.base_class))

    def check_model(self, model: Any, base: Any) -> None:
        """Raise ``ValueError`` if this model of the family cannot be extended."""

    def default_train_len(self, config: Any) -> int:
        raise NotImplementedError

    def attention_dropout(self, config: Any) -> tuple[float, str]:
        """Its attention dropout probability and where its config keeps it."""
        return config.attention_dropout, "config.attention_dropout"

    def missing(self) -> list[str]:
        """What the installed release's code lacks of what ``patch`` replaces or calls."""
        raise NotImplementedError

    def patch(self, ext: Extension, base: Any) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Plan:
    """One forward call of the base model, as its forward pre-hook sees it."""

    lengths: list[int]  # L' per row
    n_tokens: int  # past plus new tokens: the key slots that hold tokens
    n_keys: int  # key slots the family's own code covers (a static cache holds more than tokens)
    mask_BK: torch.Tensor | None  # the 2-D attention mask, when there is one
    fast: bool  # attention through linbias.alibi_attention
    gaps: bool = False  # a row of the mask has a pad between two real tokens


@dataclass
class Extension:
    """One model's extension: rule, attention, the current call's plan, and how to undo it all."""

    family: Family
    train_len: int
    rule: str
    attention: str
    config: Any  # the model's config, read at call time (its attention implementation may change)
    restore: list[Callable[[], None]] = field(default_factory=list)
    # Set by the base model's forward pre-hook for the builders and attention modules, which the
    # family calls without the lengths (so one forward at a time per model); cleared after it.
    plan: Plan | None = None
    params: list[str] = field(default_factory=list)  # the base forward's parameters, in order
    warned: set[str] = field(default_factory=set)  # the fallbacks already warned about

    def unscaled(self, lengths: list[int]) -> bool:
        """Whether the rule changes nothing for these rows: ``none``, or no row past L."""
        return parse_rule(self.rule)[0] == "none" or all(n <= self.train_len for n in lengths)

    def needs_linbias(self, lengths: list[int]) -> bool:
        """Whether the rule acts here and only ``alibi_attention`` can run it: it changes the
        logits' temperature or counts distance otherwise, which no family's bias can carry."""
        return not self.unscaled(lengths) and not parse_rule(self.rule)[1].slopes_only

    def scaled(self, slopes_H: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Slopes for each row's current length, ``[B, H]``."""
        return row_slopes(slopes_H, self.train_len, lengths, self.rule)


@dataclass(frozen=True)
class AlibiCall:
    """What the patched bias builders return, on the fast path, in place of the family's bias: the
    arguments of ``linbias.alibi_attention`` that do not depend on the layer. The family's forward
    hands it to every block as it would its bias, and the patched attention modules recognise it."""

    slopes: torch.Tensor  # [H], or [B, H] when rows differ; the bias is -slopes * (i - j)
    key_padding_mask: torch.Tensor | None  # [B, n_tokens] bool, True = real; None: no padding
    n_tokens: int
    # [B, H, n_tokens]: the family's own per-key bias (slopes then zero), for families that count
    # positions along the mask or round the bias; None: the slopes carry the whole bias.
    key_bias: torch.Tensor | None = None
    temperature: torch.Tensor | None = None  # [1 or B, 1, 1, 1] on q . k (``logn``), or None
    distances: Distances | None = None  # the rule's distance count (``cap``...), or None

    def attend(
        self, q_BHTD: torch.Tensor, k_BHKD: torch.Tensor, v_BHKD: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """The attention output with heads merged, ``[B, T, H * D]``."""
        n = self.n_tokens  # a static cache's empty slots come after the tokens
        if self.temperature is not None:
            q_BHTD = q_BHTD * self.temperature.to(q_BHTD)
        out_BHTD = alibi_attention(
            q_BHTD, k_BHKD[:, :, :n], v_BHKD[:, :, :n], self.slopes, scale=scale,
            key_padding_mask=self.key_padding_mask, key_bias=self.key_bias,
            distances=self.distances,
        )
        return out_BHTD.transpose(1, 2).flatten(2)


def alibi_call(
    ext: Extension, slopes_H: torch.Tensor | None = None, key_bias_BHK: torch.Tensor | None = None
) -> AlibiCall:
    """The fast path's arguments for this call: the family's slopes scaled per row, or (zero
    slopes) the family's own per-key bias ``[B, H, K]`` built with them; the key padding; the
    rule's temperature and distance count.

    A family that passes its per-key bias passes its slopes too (what the bias is per position):
    a rule that counts distance otherwise takes them instead, since no per-key bias carries it
    (the family's rounding of the bias is then not kept)."""
    plan = ext.plan
    assert plan is not None  # set by the pre-hook before the family's forward runs
    padded = plan.mask_BK is not None and any(n != plan.n_tokens for n in plan.lengths)
    kpm = plan.mask_BK[:, : plan.n_tokens].bool() if padded else None
    same = all(n == plan.lengths[0] for n in plan.lengths)
    lengths = plan.lengths[:1] if same else plan.lengths
    t = temperatures(ext.train_len, lengths, ext.rule)
    extra = dict(
        temperature=None if t is None else torch.tensor(t).view(-1, 1, 1, 1),
        distances=rule_distances(ext.train_len, lengths, ext.rule),
    )
    if extra["distances"] is not None and plan.gaps:
        raise ValueError(
            f"scaling rule {ext.rule!r} counts distances in key slots, but a row of this "
            f"attention_mask has a pad between real tokens, where {ext.family.title} counts "
            "positions along the mask: pad on the left only (one run of real tokens per row)"
        )
    if key_bias_BHK is not None and (extra["distances"] is None or slopes_H is None):
        zero = key_bias_BHK.new_zeros(key_bias_BHK.shape[1], dtype=torch.float32)
        return AlibiCall(zero, kpm, plan.n_tokens, key_bias_BHK[:, :, : plan.n_tokens], **extra)
    assert slopes_H is not None
    slopes = ext.scaled(slopes_H, lengths)
    return AlibiCall(slopes[0] if same else slopes, kpm, plan.n_tokens, **extra)


def key_alibi(
    ext: Extension, slopes_H: torch.Tensor, slope_dtype: torch.dtype, mask_BK: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A per-key bias ``[B, H, K]`` as BLOOM's and Falcon's ``build_alibi_tensor`` compute it,
    each row's slopes scaled for its L': ``m_h * pos_j``, ``pos`` counted along the mask (padded
    keys are masked anyway), the slopes and the product in ``slope_dtype``. The causal mask and
    softmax's shift invariance turn it into ``-m_h * (i - j)``."""
    slopes_BH = ext.scaled(slopes_H, real_lengths(mask_BK))
    pos_B1K = ((mask_BK.cumsum(dim=-1) - 1) * mask_BK)[:, None, :]
    return (slopes_BH[:, :, None].to(slope_dtype) * pos_B1K).to(dtype)


def real_lengths(mask_BK: torch.Tensor) -> list[int]:
    """L' of each row (``linbias.alibi.row_lengths``)."""
    return row_lengths(mask_BK).tolist()


# --- Reading a release's code ---------------------------------------------------------------------


def code_names(fn: Callable) -> set[str]:
    """The names ``fn`` looks up (globals and attributes), through any decorators."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return set(code.co_names) if code is not None else set()


def parameters(fn: Callable) -> list[str]:
    """``fn``'s parameters in order, through any decorators."""
    return list(inspect.signature(inspect.unwrap(fn)).parameters)


def cache_arg(fn: Callable) -> str | None:
    """The name ``fn`` gives its KV cache argument on this release."""
    names = parameters(fn)
    return next((n for n in CACHE_ARGS if n in names), None)


def mask_builder(fn: Callable) -> str | None:
    """Which causal-mask builder the base model's forward ``fn`` calls on this release."""
    names = code_names(fn)
    return next((n for n in MASK_BUILDERS if n in names), None)


def arguments(params: list[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by name, however passed (``params`` without ``self``)."""
    return {**dict(zip(params, args)), **kwargs}


def cache_of(given: dict[str, Any]) -> Any:
    """The KV cache of a call, under whichever name it was passed (a decorator may rename it)."""
    return next((given[n] for n in CACHE_ARGS if given.get(n) is not None), None)


def cached_update(
    cache: Any, k_BHKD: torch.Tensor, v_BHKD: torch.Tensor, layer_idx: int | None,
    cache_position: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values with the cache's before them, the cache updated as the family updates it: a
    ``Cache`` (``cache_position`` for the static caches of 4.x), or a legacy ``(keys, values)``
    tuple (MPT up to 4.46), which the caller returns instead."""
    if cache is None:
        return k_BHKD, v_BHKD
    if hasattr(cache, "update"):
        if cache_position is None:
            return cache.update(k_BHKD, v_BHKD, layer_idx)
        return cache.update(k_BHKD, v_BHKD, layer_idx, {"cache_position": cache_position})
    if len(cache) == 0:
        return k_BHKD, v_BHKD
    return torch.cat([cache[0], k_BHKD], dim=2), torch.cat([cache[1], v_BHKD], dim=2)


# --- Patching one instance ------------------------------------------------------------------------


def set_attr(ext: Extension, obj: Any, name: str, value: Any) -> None:
    """Set an instance attribute (shadowing the class's method) and record how to take it back."""
    attrs = vars(obj)
    had, old = name in attrs, attrs.get(name)
    attrs[name] = value

    def restore() -> None:
        if had:
            attrs[name] = old
        else:
            del attrs[name]

    ext.restore.append(restore)


def undo_all(ext: Extension) -> None:
    for restore in reversed(ext.restore):
        restore()
    ext.restore.clear()


def _with_globals(fn: Callable, names: dict[str, Any]) -> Callable:
    """A copy of ``fn`` that sees ``names`` in place of its module's globals of those names; a
    decorator's wrapper (5.24's ``deprecate_kwarg``) is copied too, wrapping the copy, so the
    call still goes through it."""
    inner = getattr(fn, "__wrapped__", None)
    closure = fn.__closure__
    if inner is not None:
        copy_inner = _with_globals(inner, names)
        closure = tuple(
            types.CellType(copy_inner) if cell.cell_contents is inner else cell
            for cell in closure or ()
        ) or None
        globals_ = fn.__globals__
    else:
        globals_ = {**fn.__globals__, **names}
    copy = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(copy, fn)


def patch_forward(ext: Extension, base: Any, builders: dict[str, Callable[[Callable], Callable]]
                  ) -> None:
    """Replace what the base model's forward calls, on this instance only, and plan its calls.

    ``builders`` maps a name the forward looks up to a function taking the original and returning
    its replacement. A method of the model is shadowed on the instance; a module function is
    replaced in a copy of the forward (decorators kept). The forward pre-hook plans each call.
    """
    forward = type(base).forward
    module_names = {}
    for name, make in builders.items():
        if hasattr(base, name):
            set_attr(ext, base, name, make(getattr(base, name)))
        else:
            module_names[name] = make(inspect.unwrap(forward).__globals__[name])
    if module_names:
        set_attr(ext, base, "forward", types.MethodType(_with_globals(forward, module_names), base))
    ext.params = parameters(forward)[1:]
    before = base.register_forward_pre_hook(functools.partial(_plan_call, ext), with_kwargs=True)
    after = base.register_forward_hook(functools.partial(_end_call, ext), always_call=True)
    ext.restore += [before.remove, after.remove]


def causal_mask(ext: Extension, original: Callable) -> Callable:
    """The family's causal-mask builder, except on the fast path: there attention takes its
    padding from the ``AlibiCall``, so an empty tensor stands in for the 4-D mask (MPT calls
    ``.bool()`` on it; Falcon folds its bias only into a 4-D one)."""

    def build(*args: Any, **kwargs: Any) -> Any:
        if ext.plan is not None and ext.plan.fast:
            return torch.ones(0, dtype=torch.bool)
        return original(*args, **kwargs)

    return build


def patch_attention(ext: Extension, base: Any, cls: type, attention: Callable) -> None:
    """Each ``cls`` module's forward becomes ``attention``, called with the module, its original
    forward and the call's arguments by name (``params`` of the original, unwrapped)."""
    params = parameters(cls.forward)[1:]
    for attn in base.modules():
        if isinstance(attn, cls):
            original = attn.forward

            def forward(*args: Any, _attn: Any = attn, _original: Callable = original,
                        **kwargs: Any) -> Any:
                given = arguments(params, args, kwargs)
                return attention(_attn, _original, args, kwargs, given)

            set_attr(ext, attn, "forward", forward)


# --- Planning each call ---------------------------------------------------------------------------


def _end_call(ext: Extension, module: torch.nn.Module, args: tuple, output: Any) -> None:
    ext.plan = None


def _call_sizes(given: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """``(batch, new tokens, past tokens, keys)`` of a forward call; None without inputs (the
    model's forward then raises its own error).

    Keys count the slots attention sees, as the model itself does: a static cache holds more slots
    than tokens (and reports its sizes as tensors).
    """
    x = given.get("input_ids")
    x = given.get("inputs_embeds") if x is None else x
    if x is None:
        return None
    batch, new = x.shape[:2]
    cache = cache_of(given)
    if cache is None:
        return batch, new, 0, new
    if not hasattr(cache, "get_seq_length"):  # legacy: per layer (keys, values) [B, H, K, D]
        past = cache[0][0].shape[2] if cache[0] is not None and len(cache[0]) else 0
        return batch, new, past, past + new
    past = int(cache.get_seq_length())
    if hasattr(cache, "get_mask_sizes"):
        # 4.5x asks for the new tokens' cache positions, 5.x for their number
        first = parameters(cache.get_mask_sizes)[0]
        query = torch.arange(past, past + new) if first == "cache_position" else new
        return batch, new, past, int(cache.get_mask_sizes(query, 0)[0])
    size = cache.get_max_cache_shape() if hasattr(cache, "get_max_cache_shape") else None
    return batch, new, past, int(size) if size is not None and int(size) > 0 else past + new


def _has_gaps(mask_BK: torch.Tensor) -> bool:
    """Whether a row's real tokens are not one run (a pad between two of them)."""
    real = mask_BK.bool()
    starts = real & ~F.pad(real, (1, 0))[:, :-1]  # first token of each run of real tokens
    return bool((starts.sum(-1) > 1).any())


def _plan_call(
    ext: Extension, module: torch.nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """Forward pre-hook of the base model: record the call's plan for the builders. Without a
    mask, a family that builds its bias from one gets an all-ones one when its slopes change or the
    fast path runs, so the bias goes through the patched builder (BLOOM's mask-free path, from
    5.x on, computes it inline)."""
    given = arguments(ext.params, args, kwargs)
    sizes = _call_sizes(given)
    if sizes is None:
        ext.plan = None
        return None
    batch, new, past, n_keys = sizes
    mask = given.get("attention_mask")
    if mask is not None and mask.dim() != 2 and ext.family.mask_2d_only:
        raise ValueError(
            f"{ext.family.title} takes only a 2-D attention_mask [batch, keys] (1 = real token), "
            f"from which it builds its ALiBi bias; got shape {tuple(mask.shape)}. Pass the 2-D "
            "padding mask"
        )
    mask_BK = mask if mask is not None and mask.dim() == 2 else None
    lengths = real_lengths(mask_BK) if mask_BK is not None else [past + new] * batch
    fast = _takes_fast_path(ext, module, given, lengths)
    if not fast and ext.needs_linbias(lengths):
        why = "; ".join(message for _, message in _fallbacks(ext, module, given))
        raise ValueError(
            f"scaling rule {ext.rule!r} runs only in linbias attention (no {ext.family.title} "
            f"bias carries it), and this call cannot use it: {why}"
        )
    changed = None
    if ext.family.mask_2d_only and mask is None and (fast or not ext.unscaled(lengths)):
        # Empty slots of a static cache stay masked, as in the family's own generate.
        device = next(module.parameters()).device
        mask_BK = torch.zeros(batch, n_keys, dtype=torch.long, device=device)
        mask_BK[:, : past + new] = 1
        changed = _with_argument(ext.params, args, kwargs, "attention_mask", mask_BK)
    gaps = fast and mask is not None and _has_gaps(mask_BK)
    ext.plan = Plan(lengths, past + new, n_keys, mask_BK, fast, gaps)
    return changed


def _with_argument(params: list[str], args: tuple, kwargs: dict, name: str, value: Any
                   ) -> tuple[tuple, dict]:
    """The call's ``(args, kwargs)`` with argument ``name`` set to ``value``."""
    i = params.index(name)
    if i < len(args):
        return (*args[:i], value, *args[i + 1:]), kwargs
    return args, {**kwargs, name: value}


def _takes_fast_path(
    ext: Extension, base: torch.nn.Module, given: dict, lengths: list[int]
) -> bool:
    """Past train_len with ``attention="linbias"``, unless the call needs what only the family's
    own attention gives; each such fallback warns once per extension and reason."""
    if ext.attention != "linbias" or max(lengths, default=0) <= ext.train_len:
        return False
    fallbacks = _fallbacks(ext, base, given)
    if fallbacks and ext.needs_linbias(lengths):
        return False  # the caller refuses the call, naming the reasons
    for reason, message in fallbacks:
        if reason not in ext.warned:
            ext.warned.add(reason)
            warnings.warn(message, UserWarning, stacklevel=2)
    return not fallbacks


def _fallbacks(ext: Extension, base: torch.nn.Module, given: dict) -> list[tuple[str, str]]:
    """``(reason, message)`` for each thing this call asks that ``alibi_attention`` cannot give:
    attention probabilities, attention dropout in training, a custom 4-D mask."""
    own = f"this call used {ext.family.title}'s own attention, which builds H x L x L scores"
    found = []
    output_attentions = given.get("output_attentions")
    if output_attentions is None:
        output_attentions = base.config.output_attentions
    if output_attentions:
        found.append(("output_attentions", (
            "linbias attention cannot return attention probabilities (output_attentions=True): "
            f"{own}; pass output_attentions=False for the fast path")))
    dropout, where = ext.family.attention_dropout(base.config)
    if base.training and dropout > 0:
        found.append(("dropout", (
            f"linbias attention applies no attention dropout ({where}={dropout}): {own}; call "
            f"model.eval(), or set {where} = 0 before training, for the fast path")))
    mask = given.get("attention_mask")
    if mask is not None and mask.dim() != 2:  # MPT's: BLOOM's and Falcon's are refused
        found.append(("mask", (
            f"linbias attention takes only a 2-D attention mask [batch, keys] (1 = real token), "
            f"got a {mask.dim()}-D one (generate builds one for a static cache): {own}; pass the "
            "2-D padding mask, or generate with the default dynamic cache, for the fast path")))
    return found
