"""MPT (``MptForCausalLM``, ``MptModel``): ALiBi with the bias ``m_h * (j - (K - 1))``, shared by
the batch, built for exactly ``config.max_seq_len`` keys whatever the input (hence transformers'
shape error past it).

The instance's ``build_mpt_alibi_tensor`` builds a bias long enough (from the plan), with MPT's own
slopes (its ``alibi_bias_max`` as the model passes it). ``MptAttention`` takes only a bias shared by
the batch, so with ``"native"`` each attention module also takes a per-row ``[B, H, 1, K]`` bias.
The KV cache is whatever the release uses: a ``Cache`` under ``past_key_values`` (4.57 to 5.23) or
``cache`` (5.24 on), or a legacy ``(keys, values)`` tuple per layer (4.46, returned as a third
value).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from linbias.hf.patch import (
    AlibiCall, Extension, Family, alibi_call, cache_arg, cached_update, causal_mask, code_names,
    mask_builder, patch_attention, patch_forward,
)


class Mpt(Family):
    name, title = "mpt", "MPT"
    classes = "MptForCausalLM, MptModel"
    module = "transformers.models.mpt.modeling_mpt"
    base_class = "MptModel"
    mask_2d_only = False  # MptAttention takes a 4-D boolean mask

    def default_train_len(self, config: Any) -> int:
        return config.max_seq_len

    def attention_dropout(self, config: Any) -> tuple[float, str]:
        return config.attn_config.attn_pdrop, "config.attn_config.attn_pdrop"

    def missing(self) -> list[str]:
        m = self.modeling()
        gone = [f"modeling_mpt.{n}" for n in ("MptModel", "MptAttention", "build_mpt_alibi_tensor")
                if not hasattr(m, n)]
        if gone:
            return gone
        if "build_mpt_alibi_tensor" not in code_names(m.MptModel.forward):
            gone.append("MptModel.forward calling build_mpt_alibi_tensor")
        if mask_builder(m.MptModel.forward) is None:
            gone.append("MptModel.forward calling a known causal-mask builder")
        if cache_arg(m.MptAttention.forward) is None:
            gone.append("MptAttention.forward taking a KV cache argument")
        names = code_names(m.MptAttention.forward)
        gone += [f"MptAttention.forward using {n}" for n in (
            "Wqkv", "clip_qkv", "softmax_scale", "out_proj") if n not in names]
        return gone

    def patch(self, ext: Extension, base: Any) -> None:
        m = self.modeling()
        builders = {"build_mpt_alibi_tensor": lambda original: _bias_builder(ext, original)}
        builders[mask_builder(m.MptModel.forward)] = lambda original: causal_mask(ext, original)
        patch_forward(ext, base, builders)
        cache = cache_arg(m.MptAttention.forward)
        patch_attention(ext, base, m.MptAttention,
                        lambda *a: _attention(*a, cache=cache, legacy=cache == "past_key_value"))


FAMILY = Mpt()


def _bias_builder(ext: Extension, original: Any) -> Any:
    def build(num_heads: int, sequence_length: int, alibi_bias_max: float = 8,
              device: torch.device | None = None) -> torch.Tensor | AlibiCall:
        """MPT's bias ``m_h * (j - (K - 1))``, for at least as many keys as the call has; on the
        fast path, an ``AlibiCall`` with the same slopes."""
        plan = ext.plan
        if plan is None:  # called outside a forward: nothing to scale
            return original(num_heads, sequence_length, alibi_bias_max, device)
        n_keys = max(sequence_length, plan.n_keys)
        if ext.unscaled(plan.lengths) and not plan.fast:
            return original(num_heads, n_keys, alibi_bias_max, device)  # the very call, if K fits
        # MPT's own slopes, read off its builder: the bias one key before the last is -m_h.
        slopes_H = -original(num_heads, 2, alibi_bias_max, device)[:, 0, 0]
        if plan.fast:
            return alibi_call(ext, slopes_H)
        slopes_BH = ext.scaled(slopes_H, plan.lengths)
        dist_K = torch.arange(1 - n_keys, 1, dtype=torch.int32, device=device)
        if len(set(plan.lengths)) == 1:  # one set of slopes (no per-row tensor comparison)
            return slopes_BH[0, :, None, None] * dist_K  # [H, 1, K]: what MptAttention takes
        return slopes_BH[:, :, None, None] * dist_K  # [B, H, 1, K]: see _attention

    return build


def _qkv(attn: Any, hidden_states: torch.Tensor, cache: Any, cache_position: Any
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
    k_BHKD, v_BHKD = cached_update(cache, k_BHKD, v_BHKD, getattr(attn, "layer_idx", None),
                                   cache_position)
    return q_BHTD, k_BHKD, v_BHKD


def _attention(attn: Any, original: Any, args: tuple, kwargs: dict, given: dict, *, cache: str,
               legacy: bool) -> tuple:
    """``MptAttention.forward``, also taking an ``AlibiCall`` (the fast path) or a per-row bias
    ``[B, H, 1, K]`` (rows of a left-padded batch hold different numbers of tokens and so need
    different slopes, which MptAttention cannot take); anything else goes to the original.
    Returns ``(output, weights)``, and the legacy ``(keys, values)`` cache with 4.46's tuples."""
    bias = given.get("position_bias")
    if not isinstance(bias, AlibiCall) and (bias is None or bias.dim() != 4):
        return original(*args, **kwargs)
    hidden_states = given["hidden_states"]
    q_BHTD, k_BHKD, v_BHKD = _qkv(attn, hidden_states, given.get(cache),
                                  given.get("cache_position"))
    if isinstance(bias, AlibiCall):
        out, weights = attn.out_proj(bias.attend(q_BHTD, k_BHKD, v_BHKD, attn.softmax_scale)), None
    else:
        scores_BHTK = torch.matmul(q_BHTD, k_BHKD.transpose(-1, -2)) * attn.softmax_scale
        scores_BHTK = scores_BHTK + bias[..., -k_BHKD.shape[-2]:]
        mask = given.get("attention_mask")
        if mask is not None:
            scores_BHTK = scores_BHTK.masked_fill(mask, torch.finfo(q_BHTD.dtype).min)
        weights = F.softmax(scores_BHTK.float(), dim=-1).to(v_BHKD.dtype)
        weights = F.dropout(weights, p=attn.attn_dropout_p, training=attn.training)
        batch, n_new = hidden_states.shape[:2]
        context = torch.matmul(weights, v_BHKD).permute(0, 2, 1, 3).reshape(batch, n_new, -1)
        out = attn.out_proj(context)
    return (out, weights, (k_BHKD, v_BHKD)) if legacy else (out, weights)
