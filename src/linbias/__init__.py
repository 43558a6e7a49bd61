"""linbias: Attention with Linear Biases (ALiBi) — train short, test long.

Slopes and biases (Press, Smith and Lewis 2022), position interpolation for ALiBi
(Al-Khateeb et al. 2023), a fused attention op, GPT training and long-context evaluation.
"""

from typing import Any

from linbias.alibi import SCALING_RULES, alibi_bias, alibi_slopes, interpolate_slopes
from linbias.attention import BACKENDS, KeyNorms, alibi_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "GPT",
    "KeyNorms",
    "ModelConfig",
    "SCALING_RULES",
    "alibi_attention",
    "alibi_bias",
    "alibi_slopes",
    "interpolate_slopes",
    "load_run",
    "__version__",
]

# The model and training API load on first use, so ``import linbias`` for the attention op does
# not pull in tokenizers and safetensors.
_LAZY = {"GPT": "linbias.model", "ModelConfig": "linbias.config", "load_run": "linbias.runs"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'linbias' has no attribute {name!r}")
