"""ALiBi position interpolation for loaded transformers models (BLOOM, MPT, Falcon with ALiBi).

Position interpolation for ALiBi (Al-Khateeb, Dey, Soboleva and Hestness 2023, arXiv 2310.13017):
when the current length L' exceeds the training length L, every slope ``m`` becomes ``m * L / L'``
(or follows another rule of ``linbias.alibi.SCALING_RULES``); at or below L nothing changes.
``extend_context`` applies this to one loaded model, in place, and lets it run past the length its
config names; ``undo`` takes it back. This is the only module that speaks transformers' names
(``max_seq_len``, ``alibi_bias_max``, ``max_position_embeddings``, ``n_head``): the rest of linbias
says ``train_len``, ``eval_len``, ``slopes``.

L' is counted per sequence: the real (unmasked) tokens of a row of the 2-D attention mask, cached
tokens included, or past plus new tokens when no mask is given. Rows of a left-padded batch thus
get the slopes they would get alone, and during generation the slopes shrink as the text grows.
The bias is added at score time, so cached keys and values stay usable; but past train_len a cached
token keeps the hidden states it got at its own length, so from the second layer on, a step of
cached generation is not the whole sequence recomputed with the newest slopes (the two agree for a
one-layer model). Without a cache (MPT's default, ``use_cache=False``) every step recomputes.

How each family is patched. Everything is per instance (instance attributes and hooks on the base
model and its attention modules, originals kept for ``undo``); no class or module function of
transformers is changed, so other models in the process are unaffected. Wherever every row's factor
is exactly 1 the patch calls the family's own code with the same arguments, so logits are
bit-identical to the unpatched model.

- BLOOM: ``BloomModel.build_alibi_tensor`` (a method, called with the 2-D mask) is overridden on
  the instance. Without a mask BLOOM takes a module-level path instead, so a forward pre-hook
  passes an all-ones mask when scaling is due.
- MPT: ``MptModel`` builds its bias for exactly ``config.max_seq_len`` keys whatever the input,
  hence the shape error past it. A forward pre-hook records L' and the key count, and the instance's
  ``build_mpt_alibi_tensor`` builds a bias long enough, with MPT's own slopes (its
  ``alibi_bias_max`` as the model passes it). ``MptAttention`` only takes a bias shared by the
  batch, so when rows of a batch need different slopes each attention module's ``forward`` is
  overridden for that case (a ``[B, H, 1, K]`` bias); otherwise it calls the original.
- Falcon (``config.alibi=True``): ``FalconModel.forward`` calls the module-level
  ``build_alibi_tensor``, so the instance gets a copy of that forward whose globals name a scaling
  builder instead. Falcon's conventions stay as they are: slopes times positions in bfloat16, and
  the bias divided by sqrt(head dim) together with the scores.

Exporting a linbias model as a transformers checkpoint (``export_to_hf``) also belongs in this
module; it comes with its own issue.

Shape suffixes: B batch, H heads, K keys, T tokens of the current call, D head dim.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.bloom.modeling_bloom import BloomModel, _get_alibi_slopes
from transformers.models.falcon.modeling_falcon import FalconModel
from transformers.models.mpt.modeling_mpt import MptAttention, MptModel

from linbias.alibi import interpolate_slopes, scaling_factor

__all__ = ["FAMILIES", "extend_context", "extended", "undo"]

# The model families extend_context supports, and the transformers classes that belong to each.
FAMILIES: dict[str, str] = {
    "bloom": "BloomForCausalLM, BloomModel",
    "mpt": "MptForCausalLM, MptModel",
    "falcon": "FalconForCausalLM, FalconModel with config.alibi=True",
}

_STATE = "_linbias_extension"  # attribute of the base model holding its _Extension


@dataclass
class _Extension:
    """One model's extension: the rule, and how to take every patch back."""

    family: str
    train_len: int
    rule: str
    restore: list[Callable[[], None]] = field(default_factory=list)
    # MPT only: L' per row and the number of keys of the current call, set by a forward pre-hook
    # because MptModel calls its builder without any length (so one forward at a time per model).
    lengths: list[int] = field(default_factory=list)
    n_keys: int = 0

    def unscaled(self, lengths: list[int]) -> bool:
        return all(scaling_factor(self.train_len, n, self.rule) == 1.0 for n in lengths)

    def scaled(self, slopes_H: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Slopes for each row's current length, ``[B, H]``."""
        return torch.stack(
            [interpolate_slopes(slopes_H, self.train_len, n, self.rule) for n in lengths]
        )


def extend_context(
    model: PreTrainedModel, train_len: int | None = None, rule: str = "linear"
) -> PreTrainedModel:
    """Let a transformers ALiBi model run past its training length, interpolating its slopes.

    Patches ``model`` in place. At or below ``train_len`` its logits stay bit-identical; beyond, the
    slopes of each sequence follow ``rule`` for its current length (prompt plus generated tokens;
    padding excluded). Left-padded batches and ``generate()`` with a KV cache keep working; a
    cached token keeps what it computed at its own length (see the module docstring). Calling it
    again on an extended model re-configures it. Not thread-safe for concurrent forwards of one
    model; ``undo`` before pickling or deep-copying the model.

    Args:
        model: a BLOOM, MPT or Falcon (``alibi=True``) model, e.g. ``BloomForCausalLM``, or its base
            model (``BloomModel``).
        train_len: the training length L. Defaults to ``config.max_seq_len`` for MPT and
            ``config.max_position_embeddings`` for Falcon; BLOOM records none, so it is required.
        rule: a key of ``linbias.alibi.SCALING_RULES``; ``"linear"`` is ``m * L / L'``.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: unsupported model (the message names the families), Falcon without ALiBi,
            BLOOM without ``train_len``, a bad ``train_len``, or an unknown rule (the message lists
            the valid ones).
    """
    base = _base_model(model)
    family = _family(model, base)
    if train_len is None:
        train_len = _default_train_len(family, base)
    scaling_factor(train_len, train_len, rule)  # checks train_len and rule before anything changes
    undo(model)
    ext = _Extension(family=family, train_len=train_len, rule=rule)
    _PATCHERS[family](base, ext)
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
    model: PreTrainedModel, train_len: int | None = None, rule: str = "linear"
) -> Iterator[PreTrainedModel]:
    """``extend_context`` for the duration of a ``with`` block, then the previous state again.

    Example:
        ``with extended(model, train_len=2048): model.generate(...)``
    """
    previous = vars(_base_model(model)).get(_STATE)
    extend_context(model, train_len, rule)
    try:
        yield model
    finally:
        if previous is None:
            undo(model)
        else:
            extend_context(model, previous.train_len, previous.rule)


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


def _pre_hook(ext: _Extension, module: torch.nn.Module, hook: Callable) -> None:
    handle = module.register_forward_pre_hook(functools.partial(hook, ext), with_kwargs=True)
    ext.restore.append(handle.remove)


def _arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """The forward call's arguments by name, however they were passed."""
    return inspect.signature(module.forward).bind(*args, **kwargs)


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
    """L' of each row: its unmasked tokens (at least 1, so a fully padded row stays valid)."""
    return [max(1, int(n)) for n in mask_BK.sum(-1).tolist()]


def _cumulative_alibi(
    ext: _Extension,
    original: Callable,
    slope_dtype: torch.dtype,
    attention_mask: torch.Tensor,
    num_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """BLOOM's and Falcon's ``build_alibi_tensor``, with each row's slopes scaled for its L'.

    Both add ``m_h * pos_j`` per key, ``pos`` counted along the mask (padded keys are masked
    anyway), and rely on the causal mask and softmax's shift invariance for ``-m_h * (i - j)``.
    Falcon rounds the slopes to bfloat16 and multiplies in bfloat16; BLOOM stays in float32.
    """
    lengths = _real_lengths(attention_mask)
    if ext.unscaled(lengths):
        return original(attention_mask, num_heads, dtype)
    batch, n_keys = attention_mask.shape
    # The family's float32 slopes (Falcon's builder computes the same ones inline).
    slopes_BH = ext.scaled(_get_alibi_slopes(num_heads, attention_mask.device), lengths)
    pos_B1K = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]
    alibi_BHK = slopes_BH[:, :, None].to(slope_dtype) * pos_B1K
    return alibi_BHK.reshape(batch * num_heads, 1, n_keys).to(dtype)


# --- BLOOM ---------------------------------------------------------------------------------------


def _patch_bloom(base: BloomModel, ext: _Extension) -> None:
    builder = functools.partial(_cumulative_alibi, ext, base.build_alibi_tensor, torch.float32)
    _set(ext, base, "build_alibi_tensor", builder)
    _pre_hook(ext, base, _bloom_mask_when_scaling)


def _bloom_mask_when_scaling(
    ext: _Extension, module: BloomModel, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """Without a mask, pass an all-ones one once scaling is due, so the alibi goes through the
    instance's ``build_alibi_tensor`` (BLOOM's mask-free path builds it from module-level code)."""
    call = _arguments(module, args, kwargs)
    sizes = _call_sizes(call.arguments)
    if call.arguments.get("attention_mask") is not None or sizes is None:
        return None
    batch, new, past, n_keys = sizes
    if ext.unscaled([past + new]):
        return None
    device = module.word_embeddings.weight.device
    # Empty slots of a static cache stay masked, as in BLOOM's own generate.
    mask_BK = torch.zeros(batch, n_keys, dtype=torch.long, device=device)
    mask_BK[:, : past + new] = 1
    call.arguments["attention_mask"] = mask_BK
    return call.args, call.kwargs


# --- MPT -----------------------------------------------------------------------------------------


def _patch_mpt(base: MptModel, ext: _Extension) -> None:
    _pre_hook(ext, base, _mpt_record_lengths)
    builder = functools.partial(_mpt_alibi, ext, base.build_mpt_alibi_tensor)
    _set(ext, base, "build_mpt_alibi_tensor", builder)
    for attn in base.modules():
        if isinstance(attn, MptAttention):
            _set(ext, attn, "forward", functools.partial(_mpt_attention, attn, attn.forward))


def _mpt_record_lengths(ext: _Extension, module: MptModel, args: tuple, kwargs: dict) -> None:
    arguments = _arguments(module, args, kwargs).arguments
    sizes = _call_sizes(arguments)
    if sizes is None:
        return
    batch, new, past, n_keys = sizes
    mask = arguments.get("attention_mask")
    ext.lengths = (
        _real_lengths(mask) if mask is not None and mask.dim() == 2 else [past + new] * batch
    )
    ext.n_keys = n_keys


def _mpt_alibi(
    ext: _Extension,
    original: Callable,
    num_heads: int,
    sequence_length: int,
    alibi_bias_max: float = 8,
    device: torch.device | None = None,
) -> torch.Tensor:
    """MPT's bias ``m_h * (j - (K - 1))``, for at least as many keys as the call has."""
    n_keys = max(sequence_length, ext.n_keys)
    if ext.unscaled(ext.lengths):
        return original(num_heads, n_keys, alibi_bias_max, device)  # the very call, when K fits
    # MPT's own slopes, read off its builder: the bias one key before the last is -m_h.
    slopes_H = -original(num_heads, 2, alibi_bias_max, device)[:, 0, 0]
    slopes_BH = ext.scaled(slopes_H, ext.lengths)
    dist_K = torch.arange(1 - n_keys, 1, dtype=torch.int32, device=device)
    if all(torch.equal(row, slopes_BH[0]) for row in slopes_BH):
        return slopes_BH[0, :, None, None] * dist_K  # [H, 1, K]: what MptAttention takes
    return slopes_BH[:, :, None, None] * dist_K  # [B, H, 1, K]: see _mpt_attention


def _mpt_attention(
    attn: MptAttention,
    original: Callable,
    hidden_states: torch.Tensor,
    position_bias: torch.Tensor | None,
    past_key_values: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MptAttention.forward``, also taking a per-row bias ``[B, H, 1, K]``.

    Rows of a left-padded batch hold different numbers of tokens and so need different slopes, but
    MptAttention accepts only a bias shared by the batch. For that case this repeats its forward
    (transformers 5.23) with the per-row bias; anything else goes to the original.
    """
    if position_bias is None or position_bias.dim() != 4:
        return original(
            hidden_states,
            position_bias,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            **kwargs,
        )
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
    scores_BHTK = torch.matmul(q_BHTD, k_BHKD.transpose(-1, -2)) * attn.softmax_scale
    scores_BHTK = scores_BHTK + position_bias[..., -k_BHKD.shape[-2] :]
    if attention_mask is not None:
        scores_BHTK = scores_BHTK.masked_fill(attention_mask, torch.finfo(q_BHTD.dtype).min)
    weights_BHTK = F.softmax(scores_BHTK.float(), dim=-1).to(v_BHKD.dtype)
    weights_BHTK = F.dropout(weights_BHTK, p=attn.attn_dropout_p, training=attn.training)
    context = torch.matmul(weights_BHTK, v_BHKD).permute(0, 2, 1, 3).reshape(batch, n_new, -1)
    return attn.out_proj(context), weights_BHTK


# --- Falcon --------------------------------------------------------------------------------------


def _patch_falcon(base: FalconModel, ext: _Extension) -> None:
    forward = type(base).forward
    if "build_alibi_tensor" not in forward.__code__.co_names:
        raise RuntimeError(
            "this transformers version's FalconModel.forward does not call build_alibi_tensor; "
            "linbias.hf cannot extend it"
        )
    original = forward.__globals__["build_alibi_tensor"]
    builder = functools.partial(_cumulative_alibi, ext, original, torch.bfloat16)
    patched = _with_globals(forward, build_alibi_tensor=builder)
    _set(ext, base, "forward", types.MethodType(patched, base))


def _with_globals(fn: types.FunctionType, **names: Any) -> types.FunctionType:
    """A copy of ``fn`` that sees ``names`` in place of its module's globals of those names."""
    copy = types.FunctionType(
        fn.__code__, {**fn.__globals__, **names}, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(copy, fn)


_PATCHERS: dict[str, Callable[[Any, _Extension], None]] = {
    "bloom": _patch_bloom,
    "mpt": _patch_mpt,
    "falcon": _patch_falcon,
}
