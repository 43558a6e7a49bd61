"""A GPT decoder with a pluggable position method, read top to bottom (after nanoGPT).

The model of the ALiBi paper's comparison (Press, Smith and Lewis, "Train Short, Test Long",
ICLR 2022, arXiv 2108.12409): a pre-LN transformer whose only position-specific code is one
``PositionMethod`` (``linbias.positions``), shared by all layers. Positions are an explicit input
and the training length is never a cap: only ``learned`` positions refuse longer inputs.

Shape suffixes: ``B`` batch, ``T`` new tokens, ``S`` keys (cached plus new), ``H`` heads, ``D`` head
dim, ``C`` d_model, ``V`` vocab.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from linbias.attention import KeyNorms
from linbias.config import INIT_STD, ModelConfig
from linbias.positions import PositionMethod, make_position

__all__ = ["KVCache", "CausalSelfAttention", "MLP", "Block", "GPT"]

Tensor = torch.Tensor


class KVCache:
    """Per-layer keys (after rotation) and values of the tokens seen so far; grows without limit.

    Args:
        n_layers: number of transformer blocks.
    """

    def __init__(self, n_layers: int) -> None:
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        # Each layer's largest key norm per block of 64, which lets ALiBi leave far keys unread,
        # and the keys they were computed from: keys set from outside get norms of their own.
        self.norms: list[KeyNorms | None] = [None] * n_layers
        self._normed: list[Tensor | None] = [None] * n_layers

    def __len__(self) -> int:
        """Number of cached positions (as written by the last complete forward)."""
        k = self.k[-1]
        return 0 if k is None else k.shape[-2]

    def update(self, layer: int, k_BHTD: Tensor, v_BHTD: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new keys and values of ``layer``; return all of them, ``[B, H, S, D]``."""
        old_k, old_v = self.k[layer], self.v[layer]
        if old_k is not None and old_v is not None:
            # torch.cat costs O(S) per step, no more than attending over S keys already does.
            k_BHTD, v_BHTD = torch.cat((old_k, k_BHTD), dim=-2), torch.cat((old_v, v_BHTD), dim=-2)
        norms = self.norms[layer]
        fresh = norms is None or self._normed[layer] is not old_k
        self.norms[layer] = KeyNorms.of(k_BHTD) if fresh else norms.extended(k_BHTD)
        self._normed[layer] = self.k[layer] = k_BHTD
        self.v[layer] = v_BHTD
        return k_BHTD, v_BHTD


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; positions enter only through ``self.position``."""

    position: PositionMethod

    def __init__(self, config: ModelConfig, position: PositionMethod, layer: int) -> None:
        super().__init__()
        self.n_heads, self.layer = config.n_heads, layer
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        # A plain reference, not a submodule: GPT owns the one instance, so its parameters appear
        # once in the state dict (``position.*``), not once per layer.
        object.__setattr__(self, "position", position)

    def forward(self, x_BTC: Tensor, pos_T: Tensor, cache: KVCache | None,
                key_padding_mask: Tensor | None, state: Tensor | None = None) -> Tensor:
        B, T, C = x_BTC.shape
        H, D = self.n_heads, C // self.n_heads
        q, k, v = self.qkv(x_BTC).split(C, dim=-1)
        q_BHTD, k_BHTD, v_BHTD = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        q_BHTD, k_BHTD = self.position.rotate(q_BHTD, k_BHTD, pos_T, pos_T)
        k_BHSD, v_BHSD, norms = k_BHTD, v_BHTD, None
        if cache is not None:
            k_BHSD, v_BHSD = cache.update(self.layer, k_BHTD, v_BHTD)
            norms = cache.norms[self.layer]
        y_BHTD = self.position.attend(
            q_BHTD, k_BHSD, v_BHSD, key_padding_mask=key_padding_mask, state=state,
            key_norms=norms,
        )
        y_BTC = y_BHTD.transpose(1, 2).reshape(B, T, C)
        return self.dropout(self.proj(y_BTC))


class MLP(nn.Module):
    """Position-wise feed-forward: ``C -> ff_dim -> C`` with GELU (GPT-2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.proj = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x_BTC: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x_BTC))))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: ModelConfig, position: PositionMethod, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config, position, layer)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x_BTC: Tensor, pos_T: Tensor, cache: KVCache | None,
                key_padding_mask: Tensor | None, state: Tensor | None = None) -> Tensor:
        x_BTC = x_BTC + self.attn(self.ln_1(x_BTC), pos_T, cache, key_padding_mask, state)
        return x_BTC + self.mlp(self.ln_2(x_BTC))


class GPT(nn.Module):
    """Decoder-only language model.

    Args:
        config: the architecture; ``config.position`` picks the position method.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.position = make_position(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, self.position, layer) for layer in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers), two per block, so the
        # residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layers))
        # fairseq: token embeddings stored at std C^-0.5 (so a tied output layer starts small)
        # and multiplied by sqrt(C) on the way in; a learned position table at std C^-0.5 too.
        self.emb_scale = 1.0
        if config.embedding == "fairseq":
            self.emb_scale = math.sqrt(config.d_model)
            for name, p in self.named_parameters():
                if name in ("tok_emb.weight", "position.table.weight"):
                    nn.init.normal_(p, mean=0.0, std=config.d_model**-0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental decoding with ``forward(..., cache=cache)``."""
        return KVCache(self.config.n_layers)

    def set_rule(self, rule: str) -> None:
        """Set the position method's length-scaling rule (e.g. ALiBi ``"linear"`` interpolation)."""
        self.position.set_rule(rule)

    @contextmanager
    def scaled(self, rule: str) -> Iterator[GPT]:
        """The model under ``rule`` for the duration of a ``with`` block, then its rule before."""
        previous = self.position.rule
        try:
            self.set_rule(rule)
            yield self
        finally:
            self.set_rule(previous)

    def forward(
        self,
        idx: Tensor,
        pos: Tensor | None = None,
        cache: KVCache | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits.

        Args:
            idx: ``[B, T]`` token ids.
            pos: ``[T]`` (or ``[B, T]``) absolute positions; default ``len(cache) + arange(T)``.
                With left padding, pass positions that start at 0 at the first real token.
            cache: a ``KVCache``, appended to in place; ``None`` attends within ``idx`` only.
            key_padding_mask: ``[B, len(cache) + T]`` bool, True = real token.

        Returns:
            ``[B, T, V]`` logits.
        """
        B, T = idx.shape
        start = 0 if cache is None else len(cache)
        if pos is None:
            pos = torch.arange(start, start + T, device=idx.device)
        if key_padding_mask is not None and key_padding_mask.shape != (B, start + T):
            raise ValueError(
                f"key_padding_mask must have shape [{B}, {start + T}] (cached plus new tokens), "
                f"got {tuple(key_padding_mask.shape)}"
            )
        x_BTC = self.drop(self.position.embed(self.tok_emb(idx) * self.emb_scale, pos))
        # Once per forward, not per layer: e.g. T5's bias, one table shared by all layers.
        state = self.position.prepare(T, start + T, idx.device, key_padding_mask)
        for block in self.blocks:
            x_BTC = block(x_BTC, pos, cache, key_padding_mask, state)
        return self.lm_head(self.ln_f(x_BTC))

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Extend ``idx`` by sampling, one token at a time, with a KV cache.

        Args:
            idx: ``[B, T]`` prompt token ids.
            max_new_tokens: tokens to add; the total may exceed ``train_len``.
            temperature: softmax temperature; 0 means greedy (argmax).
            top_k: sample only among the ``top_k`` most likely tokens.
            generator: random generator for reproducible sampling.

        Returns:
            ``[B, T + max_new_tokens]`` token ids.
        """
        cache = self.new_cache()
        tokens = [idx]
        logits_BV = self(idx, cache=cache)[:, -1]
        for step in range(max_new_tokens):
            tokens.append(_sample(logits_BV, temperature, top_k, generator))
            if step + 1 < max_new_tokens:
                logits_BV = self(tokens[-1], cache=cache)[:, -1]
        return torch.cat(tokens, dim=1)


def _sample(
    logits_BV: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """One token per row, ``[B, 1]``."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits_BV, dim=-1), 1, generator=generator)
