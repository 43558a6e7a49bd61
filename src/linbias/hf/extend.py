"""``extend_context``: ALiBi position interpolation patched into one loaded BLOOM, MPT or Falcon.

See the package docstring (``linbias.hf``) for the conventions, which attention runs where, and
how each family is patched.

Shape suffixes: B batch, H heads, K keys, T tokens of the current call, D head dim.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel
from transformers.models.bloom.modeling_bloom import (
    BloomAttention,
    BloomModel,
    _get_alibi_slopes,
    dropout_add,
)
from transformers.models.falcon.modeling_falcon import FalconAttention, FalconModel
from transformers.models.mpt.modeling_mpt import MptAttention, MptModel

from linbias.alibi import check_rule, row_lengths, row_slopes, scaling_factor
from linbias.attention import alibi_attention
from linbias.config import check_int

__all__ = [
    "ATTENTIONS", "Attention", "FAMILIES", "SUPPORTED_TRANSFORMERS", "extend_context", "extended",
    "undo",
]

# The model families extend_context supports, and the transformers classes that belong to each.
FAMILIES: dict[str, str] = {
    "bloom": "BloomForCausalLM, BloomModel",
    "mpt": "MptForCausalLM, MptModel",
    "falcon": "FalconForCausalLM, FalconModel with config.alibi=True",
}

_FAMILY_NAMES = {"bloom": "BLOOM", "mpt": "MPT", "falcon": "Falcon"}  # as messages spell them

# Which attention an extended model runs past train_len: linbias.alibi_attention (O(L) memory, the
# flash and flex backends on a GPU), or the family's own (a bias or scores per query and key).
Attention = Literal["linbias", "native"]
ATTENTIONS: tuple[str, ...] = ("linbias", "native")

_STATE = "_linbias_extension"  # attribute of the base model holding its _Extension

# The transformers releases whose BLOOM, MPT and Falcon internals the patches below were written
# against and tested with; another release may compute something else, so it is refused.
SUPPORTED_TRANSFORMERS = ("5.23",)
_INSTALL_SUPPORTED = f"pip install 'transformers>={SUPPORTED_TRANSFORMERS[0]},<5.24'"


def _check_transformers_version() -> None:
    release = ".".join(transformers.__version__.split(".")[:2])
    if release not in SUPPORTED_TRANSFORMERS:
        raise RuntimeError(
            f"linbias.hf patches transformers internals and supports transformers "
            f"{', '.join(v + '.x' for v in SUPPORTED_TRANSFORMERS)}; this is "
            f"{transformers.__version__}. Install a supported release: {_INSTALL_SUPPORTED}"
        )


@dataclass(frozen=True)
class _Plan:
    """One forward call of the base model, as its forward pre-hook sees it."""

    lengths: list[int]  # L' per row
    n_tokens: int  # past plus new tokens: the key slots that hold tokens
    n_keys: int  # key slots the family's own code covers (a static cache holds more than tokens)
    mask_BK: torch.Tensor | None  # the 2-D attention mask, when there is one
    fast: bool  # attention through linbias.alibi_attention
    gaps: bool = False  # a row of the mask has a pad between two real tokens


@dataclass
class _Extension:
    """One model's extension: rule, attention, the current call's plan, and how to undo it all."""

    family: str
    train_len: int
    rule: str
    attention: str
    config: Any  # the model's config, read at call time (its attention implementation may change)
    restore: list[Callable[[], None]] = field(default_factory=list)
    # Set by the base model's forward pre-hook for the builders and the mask below, which the
    # family calls without the lengths (so one forward at a time per model); cleared after it.
    plan: _Plan | None = None
    signature: inspect.Signature | None = None  # of the base model's forward, looked up once
    warned: set[str] = field(default_factory=set)  # the fallbacks already warned about

    def unscaled(self, lengths: list[int]) -> bool:
        return all(scaling_factor(self.train_len, n, self.rule) == 1.0 for n in lengths)

    def scaled(self, slopes_H: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Slopes for each row's current length, ``[B, H]``."""
        return row_slopes(slopes_H, self.train_len, lengths, self.rule)


@dataclass(frozen=True)
class _AlibiCall:
    """What the patched bias builders return, on the fast path, in place of the family's bias: the
    arguments of ``linbias.alibi_attention`` that do not depend on the layer. The family's forward
    hands it to every block as it would its bias, and the patched attention modules recognise it."""

    slopes: torch.Tensor  # [H], or [B, H] when rows differ; the bias is -slopes * (i - j)
    key_padding_mask: torch.Tensor | None  # [B, n_tokens] bool, True = real; None: no padding
    n_tokens: int
    # [B, H, n_tokens]: the family's own per-key bias (slopes then zero), for families that count
    # positions along the mask or round the bias; None: the slopes carry the whole bias.
    key_bias: torch.Tensor | None = None

    def attend(
        self, q_BHTD: torch.Tensor, k_BHKD: torch.Tensor, v_BHKD: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """The attention output with heads merged, ``[B, T, H * D]``."""
        n = self.n_tokens  # a static cache's empty slots come after the tokens
        out_BHTD = alibi_attention(
            q_BHTD, k_BHKD[:, :, :n], v_BHKD[:, :, :n], self.slopes, scale=scale,
            key_padding_mask=self.key_padding_mask, key_bias=self.key_bias,
        )
        return out_BHTD.transpose(1, 2).flatten(2)


def extend_context(
    model: PreTrainedModel,
    train_len: int | None = None,
    rule: str = "linear",
    *,
    attention: Attention = "linbias",
) -> PreTrainedModel:
    """Let a transformers ALiBi model run past its training length, interpolating its slopes.

    Patches ``model`` in place. At or below ``train_len`` its logits stay bit-identical (the
    family's own code runs); beyond, the slopes of each sequence follow ``rule`` for its current
    length (prompt plus generated tokens; padding excluded). Left-padded batches and ``generate()``
    with a KV cache keep working; a cached token keeps what it computed at its own length (see the
    package docstring). Calling it again on an extended model re-configures it. Not thread-safe
    for concurrent forwards of one model; ``undo`` before pickling or deep-copying the model.

    Args:
        model: a BLOOM, MPT or Falcon (``alibi=True``) model, e.g. ``BloomForCausalLM``, or its base
            model (``BloomModel``).
        train_len: the training length L. Defaults to ``config.max_seq_len`` for MPT and
            ``config.max_position_embeddings`` for Falcon; BLOOM records none, so it is required.
        rule: a key of ``linbias.alibi.SCALING_RULES``; ``"linear"`` is ``m * L / L'``.
        attention: what computes attention once a row is longer than ``train_len``:
            ``"linbias"`` (default) is ``linbias.alibi_attention``, which builds no tensor of
            queries x keys; ``"native"`` keeps the family's own attention (for debugging and
            comparison). Both use the family's slopes and conventions (Falcon's bias rounded to
            bfloat16 as Falcon rounds it). A call that needs what only the family's attention
            gives (``output_attentions``, attention dropout in training, a 4-D mask) runs it, with
            a ``UserWarning`` once per extension and reason.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: unsupported model (the message names the families), Falcon without ALiBi,
            BLOOM without ``train_len``, a bad ``train_len``, an unknown rule or attention (the
            message lists the valid ones).
        RuntimeError: a transformers release other than ``SUPPORTED_TRANSFORMERS``, or one whose
            family code no longer has what the patches replace (the message names the version).
    """
    _check_transformers_version()
    base = _base_model(model)
    family = _family(model, base)
    if train_len is None:
        train_len = _default_train_len(family, base)
    check_rule(rule)  # before anything changes
    check_int("train_len", train_len)
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; valid: {', '.join(ATTENTIONS)}")
    _check_internals(family)
    undo(model)
    ext = _Extension(family, train_len, rule, attention, base.config)
    _patch(ext, base, *_PATCHES[family])
    _set(ext, base, _STATE, ext)
    return model


def undo(model: PreTrainedModel) -> PreTrainedModel:
    """Take back ``extend_context``: the model behaves exactly as before. A no-op if not extended.

    Returns:
        ``model`` itself.
    """
    ext = vars(_base_model(model)).get(_STATE)
    if ext is not None:
        for restore in reversed(ext.restore):
            restore()
    return model


@contextmanager
def extended(
    model: PreTrainedModel,
    train_len: int | None = None,
    rule: str = "linear",
    *,
    attention: Attention = "linbias",
) -> Iterator[PreTrainedModel]:
    """``extend_context`` for the duration of a ``with`` block, then the previous state again.

    Example:
        ``with extended(model, train_len=2048): model.generate(...)``
    """
    previous = vars(_base_model(model)).get(_STATE)
    extend_context(model, train_len, rule, attention=attention)
    try:
        yield model
    finally:
        if previous is None:
            undo(model)
        else:
            extend_context(model, previous.train_len, previous.rule, attention=previous.attention)


# --- Which model, which training length -------------------------------------------------------


def _base_model(model: Any) -> Any:
    return getattr(model, "base_model", model)


def _family(model: Any, base: Any) -> str:
    if isinstance(base, BloomModel):
        return "bloom"
    if isinstance(base, MptModel):
        return "mpt"
    if isinstance(base, FalconModel):
        if not base.config.alibi:
            raise ValueError(
                f"{type(model).__name__} uses rotary position embeddings (config.alibi=False), not "
                "ALiBi; only Falcon models configured with alibi=True can be extended"
            )
        return "falcon"
    supported = "; ".join(f"{name} ({classes})" for name, classes in FAMILIES.items())
    raise ValueError(
        f"extend_context does not support {type(model).__name__}; "
        f"supported ALiBi families: {supported}"
    )


def _default_train_len(family: str, base: Any) -> int:
    if family == "mpt":
        return base.config.max_seq_len
    if family == "falcon":
        return base.config.max_position_embeddings
    raise ValueError(
        "BLOOM configs record no training length: pass train_len (the BigScience BLOOM models were "
        "trained on 2048-token sequences)"
    )


def _attention_dropout(family: str, config: Any) -> tuple[float, str]:
    """The family's attention dropout probability and where its config keeps it."""
    if family == "mpt":
        return config.attn_config.attn_pdrop, "config.attn_config.attn_pdrop"
    return config.attention_dropout, "config.attention_dropout"


# What each family's code must still call for the patches to mean what they say: the names each
# method looks up (its code's co_names), as in transformers 5.23.
_INTERNALS: dict[str, tuple[tuple[type, tuple[str, ...]], ...]] = {
    "bloom": (
        (BloomModel, ("build_alibi_tensor", "create_causal_mask")),
        (BloomAttention, (
            "query_key_value", "_reshape", "update", "dense", "pretraining_tp", "slow_but_exact",
        )),
    ),
    "mpt": (
        (MptModel, ("build_mpt_alibi_tensor", "create_causal_mask")),
        (MptAttention, ("Wqkv", "clip_qkv", "update", "softmax_scale", "out_proj")),
    ),
    "falcon": (
        (FalconModel, ("build_alibi_tensor", "create_causal_mask")),
        (FalconAttention, ("query_key_value", "_split_heads", "update", "dense")),
    ),
}


def _check_internals(family: str) -> None:
    for cls, names in _INTERNALS[family]:
        code = getattr(cls.forward, "__code__", None)
        missing = [n for n in names if code is None or n not in code.co_names]
        if missing:
            raise RuntimeError(
                f"transformers {transformers.__version__} changed {cls.__name__}.forward: it no "
                f"longer uses {', '.join(missing)}, which linbias.hf replaces, so the patch would "
                f"compute something else. Install a supported release: {_INSTALL_SUPPORTED}"
            )


# --- Patching helpers ----------------------------------------------------------------------------


def _set(ext: _Extension, obj: Any, name: str, value: Any) -> None:
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


def _hooks(ext: _Extension, module: torch.nn.Module) -> None:
    """Plan each forward of ``module`` before it runs, and drop the plan when it ends (even by
    an error): a builder called outside a forward then has no stale plan to follow."""
    ext.signature = inspect.signature(module.forward)
    before = module.register_forward_pre_hook(functools.partial(_plan_call, ext), with_kwargs=True)
    after = module.register_forward_hook(functools.partial(_end_call, ext), always_call=True)
    ext.restore += [before.remove, after.remove]


def _end_call(ext: _Extension, module: torch.nn.Module, args: tuple, output: Any) -> None:
    ext.plan = None


def _call_sizes(arguments: dict) -> tuple[int, int, int, int] | None:
    """``(batch, new tokens, past tokens, keys)`` of a forward call; None without inputs (the
    model's forward then raises its own error).

    Keys count the slots attention sees, as the model itself does: a static cache holds more slots
    than tokens (and reports its sizes as tensors).
    """
    x = arguments.get("input_ids")
    x = arguments.get("inputs_embeds") if x is None else x
    if x is None:
        return None
    cache = arguments.get("past_key_values")
    batch, new = x.shape[:2]
    if cache is None:
        return batch, new, 0, new
    return batch, new, int(cache.get_seq_length()), int(cache.get_mask_sizes(new, 0)[0])


def _real_lengths(mask_BK: torch.Tensor) -> list[int]:
    """L' of each row (``linbias.alibi.row_lengths``)."""
    return row_lengths(mask_BK).tolist()


def _has_gaps(mask_BK: torch.Tensor) -> bool:
    """Whether a row's real tokens are not one run (a pad between two of them)."""
    real = mask_BK.bool()
    starts = real & ~F.pad(real, (1, 0))[:, :-1]  # first token of each run of real tokens
    return bool((starts.sum(-1) > 1).any())


def _plan_call(
    ext: _Extension, module: torch.nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """Forward pre-hook of the base model: record the call's plan for the builders. BLOOM without a
    mask also gets an all-ones one when its slopes change or the fast path runs, so the bias goes
    through the instance's ``build_alibi_tensor`` (its mask-free path uses module-level code)."""
    call = ext.signature.bind(*args, **kwargs)  # the arguments by name, however passed
    sizes = _call_sizes(call.arguments)
    if sizes is None:
        ext.plan = None
        return None
    batch, new, past, n_keys = sizes
    mask = call.arguments.get("attention_mask")
    if mask is not None and mask.dim() != 2 and ext.family != "mpt":
        name = _FAMILY_NAMES[ext.family]
        raise ValueError(
            f"{name} takes only a 2-D attention_mask [batch, keys] (1 = real token), from which "
            f"it builds its ALiBi bias; got shape {tuple(mask.shape)}. Pass the 2-D padding mask"
        )
    mask_BK = mask if mask is not None and mask.dim() == 2 else None
    lengths = _real_lengths(mask_BK) if mask_BK is not None else [past + new] * batch
    fast = _takes_fast_path(ext, module, call.arguments, lengths)
    changed = None
    if ext.family == "bloom" and mask is None and (fast or not ext.unscaled(lengths)):
        # Empty slots of a static cache stay masked, as in BLOOM's own generate.
        device = module.word_embeddings.weight.device
        mask_BK = torch.zeros(batch, n_keys, dtype=torch.long, device=device)
        mask_BK[:, : past + new] = 1
        call.arguments["attention_mask"] = mask_BK
        changed = call.args, call.kwargs
    gaps = fast and ext.family == "bloom" and mask is not None and _has_gaps(mask_BK)
    ext.plan = _Plan(lengths, past + new, n_keys, mask_BK, fast, gaps)
    return changed


def _takes_fast_path(
    ext: _Extension, base: torch.nn.Module, arguments: dict, lengths: list[int]
) -> bool:
    """Past train_len with ``attention="linbias"``, unless the call needs what only the family's
    own attention gives; each such fallback warns once per extension and reason."""
    if ext.attention != "linbias" or max(lengths, default=0) <= ext.train_len:
        return False
    fallbacks = _fallbacks(ext, base, arguments)
    for reason, message in fallbacks:
        if reason not in ext.warned:
            ext.warned.add(reason)
            warnings.warn(message, UserWarning, stacklevel=2)
    return not fallbacks


def _fallbacks(ext: _Extension, base: torch.nn.Module, arguments: dict) -> list[tuple[str, str]]:
    """``(reason, message)`` for each thing this call asks that ``alibi_attention`` cannot give:
    attention probabilities, attention dropout in training, a custom 4-D mask."""
    own = (f"this call used {_FAMILY_NAMES[ext.family]}'s own attention, which builds "
           "H x L x L scores")
    found = []
    output_attentions = arguments.get("output_attentions")
    if output_attentions is None:
        output_attentions = base.config.output_attentions
    if output_attentions:
        found.append(("output_attentions", (
            "linbias attention cannot return attention probabilities (output_attentions=True): "
            f"{own}; pass output_attentions=False for the fast path")))
    dropout, where = _attention_dropout(ext.family, base.config)
    if base.training and dropout > 0:
        found.append(("dropout", (
            f"linbias attention applies no attention dropout ({where}={dropout}): {own}; call "
            f"model.eval(), or set {where} = 0 before training, for the fast path")))
    mask = arguments.get("attention_mask")
    if mask is not None and mask.dim() != 2:  # MPT's: BLOOM's and Falcon's are refused
        found.append(("mask", (
            f"linbias attention takes only a 2-D attention mask [batch, keys] (1 = real token), "
            f"got a {mask.dim()}-D one (generate builds one for a static cache): {own}; pass the "
            "2-D padding mask, or generate with the default dynamic cache, for the fast path")))
    return found


def _alibi_call(
    ext: _Extension, slopes_H: torch.Tensor | None = None, key_bias_BHK: torch.Tensor | None = None
) -> _AlibiCall:
    """The fast path's arguments for this call: the family's slopes scaled per row, or (zero
    slopes) the family's own per-key bias ``[B, H, K]`` built with them; and the key padding."""
    plan = ext.plan
    assert plan is not None  # set by the pre-hook before the family's forward runs
    padded = plan.mask_BK is not None and any(n != plan.n_tokens for n in plan.lengths)
    kpm = plan.mask_BK[:, : plan.n_tokens].bool() if padded else None
    if key_bias_BHK is not None:
        zero = key_bias_BHK.new_zeros(key_bias_BHK.shape[1], dtype=torch.float32)
        return _AlibiCall(zero, kpm, plan.n_tokens, key_bias_BHK[:, :, : plan.n_tokens])
    assert slopes_H is not None
    same = all(n == plan.lengths[0] for n in plan.lengths)
    slopes = ext.scaled(slopes_H, plan.lengths[:1] if same else plan.lengths)
    return _AlibiCall(slopes[0] if same else slopes, kpm, plan.n_tokens)


def _causal_mask(ext: _Extension, original: Callable, *args: Any, **kwargs: Any) -> Any:
    """The family's ``create_causal_mask``, except on the fast path: there attention takes its
    padding from the ``_AlibiCall``, so an empty tensor stands in for the 4-D mask (MPT calls
    ``.to(torch.bool)`` on it; Falcon folds its bias only into a 4-D one)."""
    if ext.plan is not None and ext.plan.fast:
        return torch.ones(0, dtype=torch.bool)
    return original(*args, **kwargs)


def _with_globals(fn: types.FunctionType, **names: Any) -> types.FunctionType:
    """A copy of ``fn`` that sees ``names`` in place of its module's globals of those names."""
    copy = types.FunctionType(
        fn.__code__, {**fn.__globals__, **names}, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(copy, fn)


def _patch(
    ext: _Extension, base: Any, builder_name: str, builder: Callable, cls: type, attention: Callable
) -> None:
    """Patch one base model: the bias builder its forward calls (``builder_name``, a method of the
    model, or a function of its module: Falcon's) becomes ``builder`` (called with ``ext`` and the
    original first); its forward, a copy whose ``create_causal_mask`` is ``_causal_mask``, gets
    the pre-hook that plans each call; each ``cls`` module's forward becomes ``attention`` (called
    with the module and its original forward first)."""
    forward = type(base).forward
    names = {"create_causal_mask": functools.partial(
        _causal_mask, ext, forward.__globals__["create_causal_mask"])}
    if hasattr(base, builder_name):
        _set(ext, base, builder_name,
             functools.partial(builder, ext, getattr(base, builder_name)))
    else:
        names[builder_name] = functools.partial(builder, ext, forward.__globals__[builder_name])
    _set(ext, base, "forward", types.MethodType(_with_globals(forward, **names), base))
    _hooks(ext, base)
    for attn in base.modules():
        if isinstance(attn, cls):
            _set(ext, attn, "forward", functools.partial(attention, attn, attn.forward))


def _scaled_key_alibi(
    ext: _Extension, slope_dtype: torch.dtype, attention_mask: torch.Tensor, num_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """BLOOM's and Falcon's per-key bias ``[B, H, K]``, as their ``build_alibi_tensor`` computes
    it, with each row's slopes scaled for its L'.

    Both add ``m_h * pos_j`` per key, ``pos`` counted along the mask (padded keys are masked
    anyway), and rely on the causal mask and softmax's shift invariance for ``-m_h * (i - j)``.
    Falcon rounds the slopes to bfloat16 and multiplies in bfloat16 (positions and products
    rounded too); BLOOM stays in float32.
    """
    # The family's float32 slopes (Falcon's builder computes the same ones inline).
    slopes_BH = ext.scaled(
        _get_alibi_slopes(num_heads, attention_mask.device), _real_lengths(attention_mask)
    )
    pos_B1K = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]
    return (slopes_BH[:, :, None].to(slope_dtype) * pos_B1K).to(dtype)


def _cumulative_alibi(
    ext: _Extension,
    original: Callable,
    slope_dtype: torch.dtype,
    attention_mask: torch.Tensor,
    num_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """BLOOM's and Falcon's ``build_alibi_tensor`` (``[B * H, 1, K]``), each row's slopes scaled
    for its L' (see ``_scaled_key_alibi``); the original when no row is scaled."""
    if ext.unscaled(_real_lengths(attention_mask)):
        return original(attention_mask, num_heads, dtype)
    alibi_BHK = _scaled_key_alibi(ext, slope_dtype, attention_mask, num_heads, dtype)
    return alibi_BHK.flatten(0, 1)[:, None, :]


# --- BLOOM ---------------------------------------------------------------------------------------


def _bloom_alibi(
    ext: _Extension, original: Callable, attention_mask: torch.Tensor, num_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor | _AlibiCall:
    """BLOOM's ``build_alibi_tensor`` with scaled slopes; on the fast path an ``_AlibiCall``: the
    scaled slopes, or, when a row's mask has a pad between real tokens (BLOOM counts positions
    along the mask, not in slots), BLOOM's own per-key bias with zero slopes."""
    plan = ext.plan
    if plan is not None and plan.fast and plan.gaps:
        return _alibi_call(ext, key_bias_BHK=_scaled_key_alibi(
            ext, torch.float32, attention_mask, num_heads, dtype))
    if plan is not None and plan.fast:
        return _alibi_call(ext, _get_alibi_slopes(num_heads, attention_mask.device))
    return _cumulative_alibi(ext, original, torch.float32, attention_mask, num_heads, dtype)


def _bloom_attention(
    attn: BloomAttention,
    original: Callable,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor | _AlibiCall,
    attention_mask: torch.Tensor | None,
    layer_past: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``BloomAttention.forward`` (transformers 5.23) through ``alibi_attention`` when the bias
    is an ``_AlibiCall``; anything else goes to the original. The output projection is BLOOM's,
    ``slow_but_exact`` included."""
    if not isinstance(alibi, _AlibiCall):
        return original(hidden_states, residual, alibi, attention_mask, layer_past, **kwargs)
    q_BHTD, k_BHKD, v_BHKD = attn._reshape(attn.query_key_value(hidden_states))
    if layer_past is not None:
        k_BHKD, v_BHKD = layer_past.update(k_BHKD, v_BHKD, attn.layer_idx)
    context = alibi.attend(q_BHTD, k_BHKD, v_BHKD, attn.inv_norm_factor)
    if attn.pretraining_tp > 1 and attn.slow_but_exact:
        # As BloomAttention computes it: the projection in pretraining_tp slices of the input
        # features, summed (and, as there, without the dense layer's bias).
        tp = attn.pretraining_tp
        cut = [int(i * attn.hidden_size / tp) for i in range(tp + 1)]
        out = torch.zeros_like(context)
        for a, b in zip(cut[:-1], cut[1:]):
            out = out + F.linear(context[:, :, a:b], attn.dense.weight[:, a:b])
    else:
        out = attn.dense(context)
    return dropout_add(out, residual, attn.hidden_dropout, attn.training), None


# --- MPT -----------------------------------------------------------------------------------------


def _mpt_alibi(
    ext: _Extension,
    original: Callable,
    num_heads: int,
    sequence_length: int,
    alibi_bias_max: float = 8,
    device: torch.device | None = None,
) -> torch.Tensor | _AlibiCall:
    """MPT's bias ``m_h * (j - (K - 1))``, for at least as many keys as the call has; on the fast
    path, an ``_AlibiCall`` with the same slopes.

    ``MptModel`` builds its bias for exactly ``config.max_seq_len`` keys whatever the input; the
    pre-hook's plan says how many the call has.
    """
    plan = ext.plan
    if plan is None:  # called outside a forward: nothing to scale
        return original(num_heads, sequence_length, alibi_bias_max, device)
    n_keys = max(sequence_length, plan.n_keys)
    if ext.unscaled(plan.lengths) and not plan.fast:
        return original(num_heads, n_keys, alibi_bias_max, device)  # the very call, when K fits
    # MPT's own slopes, read off its builder: the bias one key before the last is -m_h.
    slopes_H = -original(num_heads, 2, alibi_bias_max, device)[:, 0, 0]
    if plan.fast:
        return _alibi_call(ext, slopes_H)
    slopes_BH = ext.scaled(slopes_H, plan.lengths)
    dist_K = torch.arange(1 - n_keys, 1, dtype=torch.int32, device=device)
    if len(set(plan.lengths)) == 1:  # one set of slopes (no per-row tensor comparison)
        return slopes_BH[0, :, None, None] * dist_K  # [H, 1, K]: what MptAttention takes
    return slopes_BH[:, :, None, None] * dist_K  # [B, H, 1, K]: see _mpt_attention


def _mpt_qkv(
    attn: MptAttention, hidden_states: torch.Tensor, past_key_values: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MptAttention's queries ``[B, H, T, D]``, keys and values ``[B, H, K, D]``, cache updated."""
    batch, n_new = hidden_states.shape[:2]
    qkv = attn.Wqkv(hidden_states)
    if attn.clip_qkv:
        qkv = qkv.clamp(min=-attn.clip_qkv, max=attn.clip_qkv)
    q_BHTD, k_BHKD, v_BHKD = (
        t.reshape(batch, n_new, attn.n_heads, attn.head_dim).transpose(1, 2)
        for t in qkv.chunk(3, dim=2)
    )
    if past_key_values is not None:
        k_BHKD, v_BHKD = past_key_values.update(k_BHKD, v_BHKD, attn.layer_idx)
    return q_BHTD, k_BHKD, v_BHKD


def _mpt_attention(
    attn: MptAttention,
    original: Callable,
    hidden_states: torch.Tensor,
    position_bias: torch.Tensor | _AlibiCall | None,
    past_key_values: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``MptAttention.forward`` (transformers 5.23), also taking an ``_AlibiCall`` (the fast path)
    or a per-row bias ``[B, H, 1, K]``.

    Rows of a left-padded batch hold different numbers of tokens and so need different slopes, but
    MptAttention accepts only a bias shared by the batch. For that case this repeats its forward
    with the per-row bias; anything else goes to the original.
    """
    if isinstance(position_bias, _AlibiCall):
        q_BHTD, k_BHKD, v_BHKD = _mpt_qkv(attn, hidden_states, past_key_values)
        return attn.out_proj(position_bias.attend(q_BHTD, k_BHKD, v_BHKD, attn.softmax_scale)), None
    if position_bias is None or position_bias.dim() != 4:
        return original(
            hidden_states,
            position_bias,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            **kwargs,
        )
    q_BHTD, k_BHKD, v_BHKD = _mpt_qkv(attn, hidden_states, past_key_values)
    scores_BHTK = torch.matmul(q_BHTD, k_BHKD.transpose(-1, -2)) * attn.softmax_scale
    scores_BHTK = scores_BHTK + position_bias[..., -k_BHKD.shape[-2] :]
    if attention_mask is not None:
        scores_BHTK = scores_BHTK.masked_fill(attention_mask, torch.finfo(q_BHTD.dtype).min)
    weights_BHTK = F.softmax(scores_BHTK.float(), dim=-1).to(v_BHKD.dtype)
    weights_BHTK = F.dropout(weights_BHTK, p=attn.attn_dropout_p, training=attn.training)
    batch, n_new = hidden_states.shape[:2]
    context = torch.matmul(weights_BHTK, v_BHKD).permute(0, 2, 1, 3).reshape(batch, n_new, -1)
    return attn.out_proj(context), weights_BHTK


# --- Falcon --------------------------------------------------------------------------------------


def _falcon_alibi(
    ext: _Extension, original: Callable, attention_mask: torch.Tensor, num_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor | _AlibiCall:
    """Falcon's ``build_alibi_tensor`` with scaled slopes; on the fast path an ``_AlibiCall``
    whose ``key_bias`` is what Falcon's attention adds per key, from that very tensor: slope
    rounded to bfloat16, times the position along the mask, in bfloat16 (product and, past 256,
    position rounded), divided by sqrt(head dim) as ``FalconModel`` divides it."""
    if ext.plan is None or not ext.plan.fast:
        return _cumulative_alibi(ext, original, torch.bfloat16, attention_mask, num_heads, dtype)
    alibi_BHK = _scaled_key_alibi(ext, torch.bfloat16, attention_mask, num_heads, dtype)
    head_dim = ext.config.hidden_size // num_heads
    # FalconModel folds alibi / sqrt(d) into its 4-D mask, which SDPA (the default) adds once;
    # transformers 5.23's eager attention also adds alibi to the scores before scaling them.
    key_bias_BHK = alibi_BHK / math.sqrt(head_dim)
    if ext.config._attn_implementation == "eager":
        key_bias_BHK = alibi_BHK * (1.0 / math.sqrt(head_dim)) + key_bias_BHK
    return _alibi_call(ext, key_bias_BHK=key_bias_BHK)


def _falcon_attention(
    attn: FalconAttention,
    original: Callable,
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | _AlibiCall | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    layer_past: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``FalconAttention.forward`` (transformers 5.23) through ``alibi_attention`` when the bias
    is an ``_AlibiCall``; anything else goes to the original. Multi-query keys and values stay
    one head; grouped ones (``new_decoder_architecture``) are expanded as Falcon caches them."""
    if not isinstance(alibi, _AlibiCall):
        return original(hidden_states, alibi, attention_mask, position_ids, layer_past, **kwargs)
    q_BHTD, k_BHKD, v_BHKD = (  # each [B, T, heads, D] before the transpose
        t.transpose(1, 2) for t in attn._split_heads(attn.query_key_value(hidden_states))
    )
    if layer_past is not None:
        k_BHKD, v_BHKD = layer_past.update(k_BHKD, v_BHKD, attn.layer_idx)
    return attn.dense(alibi.attend(q_BHTD, k_BHKD, v_BHKD, attn.inv_norm_factor)), None


# Per family: the bias builder its base model's forward calls, its replacement, the attention
# class, and the attention forward that replaces that class's on each instance (see _patch).
_PATCHES: dict[str, tuple[str, Callable, type, Callable]] = {
    "bloom": ("build_alibi_tensor", _bloom_alibi, BloomAttention, _bloom_attention),
    "mpt": ("build_mpt_alibi_tensor", _mpt_alibi, MptAttention, _mpt_attention),
    "falcon": ("build_alibi_tensor", _falcon_alibi, FalconAttention, _falcon_attention),
}
