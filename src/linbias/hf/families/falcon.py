"""Falcon with ALiBi (``FalconForCausalLM``, ``FalconModel`` with ``config.alibi=True``).

Falcon's bias: the slope rounded to bfloat16, times the position along the mask, in bfloat16
(product and, past 256, position rounded), divided by sqrt(head dim) with the scores. The fast
path hands ``alibi_attention`` that very per-key bias, built with the scaled slopes, as
``key_bias``. Multi-query keys and values stay one head; grouped ones are taken as the release
caches them (expanded to every head up to 5.24, ``num_kv_heads`` heads from 5.25).

Two generations of transformers code, told apart by what ``FalconAttention.forward`` takes:
- Up to 5.24 it takes an ``alibi`` argument: ``FalconModel.forward`` calls the module-level
  ``build_alibi_tensor``, replaced in a copy of the forward by a scaling builder, and each
  attention module's forward is replaced on the instance. Eager attention adds the bias to the
  scores and again through the mask (which holds ``alibi / sqrt(d)``); SDPA adds it once. The
  extension keeps both conventions, so eager Falcon past train_len has twice the scaled slopes.
- From 5.25 the bias is folded into a 4-D float mask and attention goes through transformers'
  public registries: the extension registers an attention function and a mask function
  (``AttentionInterface.register``, ``AttentionMaskInterface.register``) wrapping the model's own
  implementation and selects them with ``set_attn_implementation``; nothing private is patched.
  Past train_len they rebuild the folded mask with the scaled slopes, or (fast path) build no mask
  and call ``alibi_attention``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from linbias.hf.patch import (
    AlibiCall, Extension, Family, alibi_call, cached_update, causal_mask, code_names, key_alibi,
    mask_builder, parameters, patch_attention, patch_forward,
)

_REGISTERED = "linbias_"  # prefix of the attention implementations registered from 5.25
_EXTENSIONS: dict[int, Extension] = {}  # id(config) -> its extension, for the registered functions


class Falcon(Family):
    name, title = "falcon", "Falcon"
    classes = "FalconForCausalLM, FalconModel with config.alibi=True"
    module = "transformers.models.falcon.modeling_falcon"
    base_class = "FalconModel"

    def check_model(self, model: Any, base: Any) -> None:
        if not base.config.alibi:
            raise ValueError(
                f"{type(model).__name__} uses rotary position embeddings (config.alibi=False), not "
                "ALiBi; only Falcon models configured with alibi=True can be extended"
            )

    def default_train_len(self, config: Any) -> int:
        return config.max_position_embeddings

    def uses_registry(self) -> bool:
        """Whether attention goes through transformers' attention registry (5.25 on), the bias
        folded into the mask, rather than taking an ``alibi`` argument."""
        attention = self.modeling().FalconAttention.forward
        return "alibi" not in parameters(attention) and "get_interface" in code_names(attention)

    def eager_doubles_bias(self) -> bool:
        """Whether this release's eager attention adds the bias twice (to the scores, and again
        through the mask): up to 5.24, where attention takes the ``alibi`` argument."""
        return not self.uses_registry()

    def missing(self) -> list[str]:
        m = self.modeling()
        gone = [f"modeling_falcon.{n}" for n in ("FalconModel", "FalconAttention",
                                                 "build_alibi_tensor") if not hasattr(m, n)]
        if gone:
            return gone
        if "build_alibi_tensor" not in code_names(m.FalconModel.forward):
            gone.append("FalconModel.forward calling build_alibi_tensor")
        try:
            _slopes(1, torch.device("cpu"))
        except RuntimeError as exc:
            gone.append(str(exc))
        if self.uses_registry():
            from transformers import masking_utils, modeling_utils
            gone += [f"transformers.{n}" for n, mod in (
                ("AttentionInterface", modeling_utils),
                ("masking_utils.AttentionMaskInterface", masking_utils),
            ) if not hasattr(mod, n.rsplit(".", 1)[-1])]
            if not hasattr(m.FalconModel, "set_attn_implementation"):
                gone.append("PreTrainedModel.set_attn_implementation")
            return gone
        if mask_builder(m.FalconModel.forward) is None:
            gone.append("FalconModel.forward calling a known causal-mask builder")
        names = code_names(m.FalconAttention.forward)
        gone += [f"FalconAttention.forward using {n}" for n in (
            "query_key_value", "_split_heads", "update", "dense") if n not in names]
        return gone

    def patch(self, ext: Extension, base: Any) -> None:
        if self.uses_registry():
            _use_registry(ext, base)
            return
        m = self.modeling()
        patch_forward(ext, base, {
            "build_alibi_tensor": lambda original: _bias_builder(ext, original),
            mask_builder(m.FalconModel.forward): lambda original: causal_mask(ext, original),
        })
        patch_attention(ext, base, m.FalconAttention, _attention)


FAMILY = Falcon()


class _Rounded(TorchFunctionMode):
    """Records the tensors rounded to bfloat16 under it."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
                           ) -> Any:
        if func is torch.Tensor.bfloat16:
            self.inputs.append(args[0])
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=64)
def _slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """Falcon's float32 slopes ``[H]``, read off its ``build_alibi_tensor``: the tensor it rounds
    to bfloat16 (the rounded slopes are what it multiplies; scaling needs them unrounded)."""
    ones = torch.ones(1, 2, dtype=torch.long, device=device)
    with _Rounded() as seen:
        alibi = FAMILY.modeling().build_alibi_tensor(ones, num_heads, torch.float32)
    slopes = seen.inputs[0].reshape(-1) if len(seen.inputs) == 1 else None
    if (slopes is None or slopes.dtype != torch.float32 or slopes.numel() != num_heads
            or not torch.equal(alibi.view(num_heads, 2)[:, 1], slopes.bfloat16().float())):
        raise RuntimeError("Falcon's build_alibi_tensor no longer multiplies float32 slopes "
                           "rounded to bfloat16 by the positions")
    return slopes


def _key_bias(ext: Extension, mask_BK: torch.Tensor, num_heads: int, dtype: torch.dtype
              ) -> torch.Tensor:
    """Falcon's per-key bias ``[B, H, K]`` with each row's slopes scaled, not yet divided."""
    return key_alibi(ext, _slopes(num_heads, mask_BK.device), torch.bfloat16, mask_BK, dtype)


def _position_slopes(num_heads: int, device: torch.device, head_dim: int) -> torch.Tensor:
    """What Falcon's bias adds per position back ``[H]`` (slopes in bfloat16, over sqrt(d)): the
    slopes a rule that counts distance otherwise runs with."""
    return _slopes(num_heads, device).bfloat16().float() / math.sqrt(head_dim)


# --- Up to 5.24: the alibi argument -------------------------------------------------------------


def _bias_builder(ext: Extension, original: Any) -> Any:
    def build(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype
              ) -> torch.Tensor | AlibiCall:
        """Falcon's ``build_alibi_tensor`` with scaled slopes; on the fast path an
        ``AlibiCall`` whose ``key_bias`` is what Falcon's attention adds per key: that tensor
        divided by sqrt(head dim) as ``FalconModel`` divides it, twice for eager (see module)."""
        plan = ext.plan
        if plan is None or (not plan.fast and ext.unscaled(plan.lengths)):
            return original(attention_mask, num_heads, dtype)
        alibi_BHK = _key_bias(ext, attention_mask, num_heads, dtype)
        if not plan.fast:
            return alibi_BHK.flatten(0, 1)[:, None, :]  # [B * H, 1, K], as Falcon's
        head_dim = ext.config.hidden_size // num_heads
        key_bias_BHK = alibi_BHK / math.sqrt(head_dim)
        slopes_H = _position_slopes(num_heads, attention_mask.device, head_dim)
        if ext.config._attn_implementation == "eager":
            key_bias_BHK = alibi_BHK * (1.0 / math.sqrt(head_dim)) + key_bias_BHK
            slopes_H = 2 * slopes_H
        return alibi_call(ext, slopes_H, key_bias_BHK)

    return build


def _attention(attn: Any, original: Any, args: tuple, kwargs: dict, given: dict) -> tuple:
    """``FalconAttention.forward`` through ``alibi_attention`` when the bias is an
    ``AlibiCall``; anything else goes to the original. Returns ``(output, cache)``: 4.46 reads
    the cache from the second slot, later releases attention probabilities, only with
    ``output_attentions``, which never takes this path."""
    alibi = given.get("alibi")
    if not isinstance(alibi, AlibiCall):
        return original(*args, **kwargs)
    cache = given.get("layer_past")
    q_BHTD, k_BHKD, v_BHKD = (  # each [B, T, heads, D] before the transpose
        t.transpose(1, 2) for t in attn._split_heads(attn.query_key_value(given["hidden_states"]))
    )
    k_BHKD, v_BHKD = cached_update(cache, k_BHKD, v_BHKD, attn.layer_idx,
                                   given.get("cache_position"))
    return attn.dense(alibi.attend(q_BHTD, k_BHKD, v_BHKD, attn.inv_norm_factor)), cache


# --- From 5.25: transformers' attention and mask registries ---------------------------------------


def _use_registry(ext: Extension, base: Any) -> None:
    """Select, on this model, an attention and a mask implementation wrapping its own one."""
    own = base.config._attn_implementation
    if own.startswith(_REGISTERED):  # re-extending: undo has run, so this is stale
        own = own[len(_REGISTERED):]
    name = _REGISTERED + own
    _register(name, own)
    key = id(base.config)
    _EXTENSIONS[key] = ext
    ext.restore.append(lambda: _EXTENSIONS.pop(key, None))
    base.set_attn_implementation(name)
    ext.restore.append(lambda: base.set_attn_implementation(own))
    # Plan each call, replacing nothing the forward calls.
    patch_forward(ext, base, {})


@functools.lru_cache(maxsize=None)
def _register(name: str, own: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    own_mask = ALL_MASK_ATTENTION_FUNCTIONS[own]
    AttentionMaskInterface.register(name, functools.partial(_mask, own_mask))
    AttentionInterface.register(name, functools.partial(_registered_attention, own))


def _mask(own: Any, *, config: Any, dtype: torch.dtype, device: Any, **kwargs: Any) -> Any:
    """The model's own mask function, except on the fast path: there attention takes its padding
    from the plan, and a zero stands in (Falcon adds its bias to it: ``[B, H, 1, K]``)."""
    ext = _EXTENSIONS.get(id(config))
    if ext is not None and ext.plan is not None and ext.plan.fast:
        return torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)
    return own(config=config, dtype=dtype, device=device, **kwargs)


def _registered_attention(own: str, module: Any, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own attention function, with the folded mask rebuilt from the scaled slopes
    past train_len; on the fast path ``alibi_attention`` with Falcon's per-key bias."""
    from transformers import AttentionInterface

    ext = _EXTENSIONS.get(id(module.config))
    plan = ext.plan if ext is not None else None
    if plan is not None and (plan.fast or not ext.unscaled(plan.lengths)):
        assert plan.mask_BK is not None  # the pre-hook passes one when scaling
        n_heads = query.shape[1]
        bias_BHK = _key_bias(ext, plan.mask_BK, n_heads, query.dtype) / math.sqrt(query.shape[-1])
        if plan.fast:
            slopes_H = _position_slopes(n_heads, query.device, query.shape[-1])
            call = alibi_call(ext, slopes_H, bias_BHK)
            return call.attend(query, key, value, kwargs["scaling"]), None
        # Falcon's own fold (FalconModel.forward), with the scaled bias.
        attention_mask = torch.masked_fill(
            bias_BHK[:, :, None, :], attention_mask < -1, torch.finfo(query.dtype).min)
    attend = AttentionInterface().get_interface(own, FAMILY.modeling().eager_attention_forward) \
        if own != "eager" else FAMILY.modeling().eager_attention_forward
    return attend(module, query, key, value, attention_mask, **kwargs)
