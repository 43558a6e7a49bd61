"""BLOOM (``BloomForCausalLM``, ``BloomModel``): ALiBi with float32 slopes and positions counted
along the attention mask.

``BloomModel.build_alibi_tensor`` (a method, called with the 2-D mask) is overridden on the
instance; without a mask BLOOM (5.x) computes its bias inline, so the pre-hook passes an all-ones
mask when scaling or the fast path is due. On the fast path the builder returns the scaled slopes
(or, when a row's mask has a pad between real tokens, BLOOM's own per-key bias with zero slopes)
and ``BloomAttention`` runs ``alibi_attention``, its output projection (``slow_but_exact``
included) as BLOOM computes it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from linbias.hf.patch import (
    AlibiCall, Extension, Family, alibi_call, cached_update, causal_mask, code_names, key_alibi,
    mask_builder, patch_attention, patch_forward,
)


class Bloom(Family):
    name, title = "bloom", "BLOOM"
    classes = "BloomForCausalLM, BloomModel"
    module = "transformers.models.bloom.modeling_bloom"
    base_class = "BloomModel"

    def default_train_len(self, config: Any) -> int:
        raise ValueError(
            "BLOOM configs record no training length: pass train_len (the BigScience BLOOM "
            "models were trained on 2048-token sequences)"
        )

    def missing(self) -> list[str]:
        m = self.modeling()
        gone = [f"modeling_bloom.{n}" for n in (
            "BloomModel", "BloomAttention", "build_alibi_tensor", "dropout_add") if not hasattr(m, n)]
        if gone:
            return gone
        model_names = code_names(m.BloomModel.forward)
        gone += [f"BloomModel.forward calling {n}" for n in ("build_alibi_tensor",)
                 if n not in model_names]
        if mask_builder(m.BloomModel.forward) is None:
            gone.append("BloomModel.forward calling a known causal-mask builder")
        attn_names = code_names(m.BloomAttention.forward)
        gone += [f"BloomAttention.forward using {n}" for n in (
            "query_key_value", "_reshape", "update", "dense", "pretraining_tp", "slow_but_exact")
            if n not in attn_names]
        return gone

    def slopes(self, num_heads: int, device: torch.device) -> torch.Tensor:
        """BLOOM's float32 slopes ``[H]``, read off its builder: the bias of the second key."""
        ones = torch.ones(1, 2, dtype=torch.long, device=device)
        return self.modeling().build_alibi_tensor(ones, num_heads, torch.float32).view(-1, 2)[:, 1]

    def patch(self, ext: Extension, base: Any) -> None:
        m = self.modeling()
        builders = {"build_alibi_tensor": lambda original: _bias_builder(ext, original)}
        mask = mask_builder(m.BloomModel.forward)
        builders[mask] = lambda original: causal_mask(ext, original)
        patch_forward(ext, base, builders)
        patch_attention(ext, base, m.BloomAttention, _attention)


FAMILY = Bloom()


def _bias_builder(ext: Extension, original: Any) -> Any:
    def build(attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype
              ) -> torch.Tensor | AlibiCall:
        """BLOOM's ``build_alibi_tensor`` with scaled slopes; on the fast path an ``AlibiCall``:
        the scaled slopes or, when a row's mask has a pad between real tokens (BLOOM counts
        positions along the mask, not in slots), BLOOM's own per-key bias with zero slopes."""
        plan = ext.plan
        slopes_H = FAMILY.slopes(num_heads, attention_mask.device)
        if plan is not None and plan.fast and plan.gaps:
            return alibi_call(ext, key_bias_BHK=key_alibi(
                ext, slopes_H, torch.float32, attention_mask, dtype))
        if plan is not None and plan.fast:
            return alibi_call(ext, slopes_H)
        if plan is None or ext.unscaled(plan.lengths):
            return original(attention_mask, num_heads, dtype)
        alibi_BHK = key_alibi(ext, slopes_H, torch.float32, attention_mask, dtype)
        return alibi_BHK.flatten(0, 1)[:, None, :]  # [B * H, 1, K], as BLOOM's

    return build


def _attention(attn: Any, original: Any, args: tuple, kwargs: dict, given: dict) -> tuple:
    """``BloomAttention.forward`` through ``alibi_attention`` when the bias is an ``AlibiCall``;
    anything else goes to the original. Returns ``(output, cache)``: 4.46 reads the cache from the
    second slot; later releases read attention probabilities there, only with
    ``output_attentions``, which never takes this path."""
    alibi = given["alibi"]
    if not isinstance(alibi, AlibiCall):
        return original(*args, **kwargs)
    hidden_states, cache = given["hidden_states"], given.get("layer_past")
    q_BHTD, k_BHKD, v_BHKD = attn._reshape(attn.query_key_value(hidden_states))
    k_BHKD, v_BHKD = cached_update(cache, k_BHKD, v_BHKD, attn.layer_idx,
                                   given.get("cache_position"))
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
    residual = given["residual"]
    return FAMILY.modeling().dropout_add(out, residual, attn.hidden_dropout, attn.training), cache
