"""linbias: Attention with Linear Biases (ALiBi) — train short, test long.

Slopes and biases (Press, Smith and Lewis 2022), position interpolation for ALiBi
(Al-Khateeb et al. 2023), a fused attention op, GPT training and long-context evaluation.
"""

from linbias.alibi import SCALING_RULES, alibi_bias, alibi_slopes, interpolate_slopes
from linbias.attention import BACKENDS, alibi_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "SCALING_RULES",
    "alibi_attention",
    "alibi_bias",
    "alibi_slopes",
    "interpolate_slopes",
    "__version__",
]
