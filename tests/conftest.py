"""Shared test helpers: an independent float64 ALiBi attention written from the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch


def naive_alibi_attention(q, k, v, slopes, *, causal=True, scale=None, key_padding_mask=None):
    """score[h, i, j] = q_i . k_j * scale - m_h * (i - j), in float64, loops over heads.

    Deliberately shares no code with linbias: positions, masks and grouped heads are spelled out.
    """
    q, k, v, slopes = q.double(), k.double(), v.double(), slopes.double()
    B, H, Lq, D = q.shape
    Lk, group = k.shape[2], H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, H, Lq, D, dtype=torch.float64)
    i_abs = torch.arange(Lk - Lq, Lk, dtype=torch.float64).view(-1, 1)
    j = torch.arange(Lk, dtype=torch.float64).view(1, -1)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // group], v[b, h // group]
            dist = (i_abs - j) if causal else (i_abs - j).abs()
            scores = q[b, h] @ kh.T * scale - slopes[h] * dist
            allowed = torch.ones(Lq, Lk, dtype=torch.bool)
            if causal:
                allowed &= j <= i_abs
            if key_padding_mask is not None:
                allowed &= key_padding_mask[b].view(1, -1)
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[b, h] = torch.softmax(scores, -1).nan_to_num(0.0) @ vh  # no key: zeros
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
