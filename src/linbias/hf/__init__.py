"""ALiBi position interpolation for loaded transformers models (BLOOM, MPT, Falcon with ALiBi).

Position interpolation for ALiBi (Al-Khateeb, Dey, Soboleva and Hestness 2023, arXiv 2310.13017):
when the current length L' exceeds the training length L, every slope ``m`` becomes ``m * L / L'``
(or follows another rule of ``linbias.alibi.SCALING_RULES``); at or below L nothing changes.
``extend_context`` applies this to one loaded model, in place, and lets it run past the length its
config names; ``undo`` takes it back. This package is the only place that speaks transformers' names
(``max_seq_len``, ``alibi_bias_max``, ``max_position_embeddings``, ``n_head``): the rest of linbias
says ``train_len``, ``eval_len``, ``slopes``.

L' is counted per sequence: the real (unmasked) tokens of a row of the 2-D attention mask, cached
tokens included, or past plus new tokens when no mask is given. Rows of a left-padded batch thus
get the slopes they would get alone, and during generation the slopes shrink as the text grows.
The bias is added at score time, so cached keys and values stay usable; but past train_len a cached
token keeps the hidden states it got at its own length, so from the second layer on, a step of
cached generation is not the whole sequence recomputed with the newest slopes (the two agree for a
one-layer model). Without a cache (MPT's default, ``use_cache=False``) every step recomputes.

Which attention runs where (the ``attention`` option of ``extend_context`` and ``extended``).
At or below train_len (every row's L' <= L) the family's own code runs with the same arguments,
so logits are bit-identical to the unpatched model. Past it, with ``attention="linbias"`` (the
default), every attention module calls ``linbias.alibi_attention`` with the family's slopes,
scaled per row (``[B, H]`` slopes when rows differ), the key padding of the mask, and the KV cache
as the family fills it: no ``H x L x L`` score tensor or ``L x L`` mask is built (O(L) memory on
CPU; ``flash`` or ``flex`` on a GPU, as for linbias models). Where the family counts positions
along the mask or rounds its bias, its own per-key bias (``[B, H, K]``, scaled slopes) goes to
``alibi_attention`` as ``key_bias``, with zero slopes: Falcon always, BLOOM when a row's mask has
a pad between real tokens. ``attention="native"`` keeps the family's attention past L too (eager
scores, or Falcon's materialised bias for SDPA), for debugging and comparison. The family's
attention also runs past L when a call needs what only it gives, with a ``UserWarning`` once per
extension and reason: ``output_attentions``, attention dropout in training, or (MPT) a 4-D mask.
BLOOM and Falcon build their bias from the 2-D mask and take no 4-D one (unpatched they fail on
it); the extension refuses it with a ``ValueError``.

Conventions on the fast path: BLOOM's float32 slopes (or its float32 per-key bias); MPT's slopes
as its builder computes them; Falcon's own bias tensor, built by its rule with the scaled slopes
(slope rounded to bfloat16, times the position along the mask, in bfloat16), divided by
sqrt(head dim) as ``FalconModel`` divides it (up to 5.24 transformers' eager Falcon adds it
twice, and so does the fast path then). BLOOM's ``slow_but_exact`` output projection is computed
as BLOOM
computes it. Measured max |logit difference| to ``"native"`` (fp32): 0 for Falcon (1.5e-7 with
multi-query heads) and 2.4e-7 or less for BLOOM and MPT on the tests' tiny models at 2-4x
train_len; 0 for Falcon and 1.2e-5 or less for BLOOM and MPT at 2k and 8k tokens in
``benchmarks/hf_long.py``. The tests require 1e-4.

How each family is patched. Everything is per instance (instance attributes and hooks on the base
model and its attention modules, originals kept for ``undo``); no class or module function of
transformers is changed, so other models in the process are unaffected. A forward pre-hook on the
base model plans each call (L' per row, tokens, keys, fast or not). The names the base model's
forward calls to build its bias and its causal mask (``create_causal_mask`` in 5.x, a
``_update_causal_mask`` method or ``_prepare_4d_causal_attention_mask`` in 4.x) are replaced: a
method on the instance, a module function in a copy of the forward (decorators kept). On the fast
path the mask is an empty stand-in and the bias builder returns the ``alibi_attention``
arguments, which the blocks pass to the patched attention modules as they would the bias. Falcon
from 5.25 goes through transformers' public attention and mask registries instead. Each family's
unit in ``linbias.hf.families`` documents its own patch.

Releases. Every transformers minor release from ``SUPPORTED_TRANSFORMERS[0]`` (4.46) to
``SUPPORTED_TRANSFORMERS[1]`` (5.25) is supported, judged by its code rather than its version
string: the cache keyword (``past_key_values``, ``cache`` from 5.24, MPT 4.46's legacy tuples), the
mask builder, the return values, decorators unwrapped. An older release is refused; a newer one is
extended with a warning if each family's code still has what the patch needs, and refused, naming
what changed, if not.

Exporting (``export_to_hf``). A linbias ALiBi GPT is written as an MPT checkpoint, the one ALiBi
architecture of transformers it maps onto without approximation, and only when the model has no
biases (see ``export_to_hf``): BLOOM's MLP uses the tanh approximation of GELU where linbias uses
the exact one, and BLOOM normalises the word embeddings with a LayerNorm that no weights turn into
the identity; Falcon divides the ALiBi bias by sqrt(head dim), changing the slopes. The training
length becomes MPT's ``max_seq_len``, so ``extend_context`` finds it by default; the tokenizer
pads on the left with its eos token, so ``tok(texts, padding=True)`` works for batched ``generate``.

Evaluating (``evaluate_hf``). Any transformers causal LM, scored with ``linbias.evaluate``'s
protocols on a linbias corpus tokenised by the model's own tokenizer; the ALiBi families also with
each scaling rule, through ``extended``.

Modules: ``extend`` (``extend_context``, ``extended``, ``undo``, ``family_of``, the release
checks), ``patch`` (what the families share: planning, hooks, undo), ``families.bloom``,
``families.mpt``, ``families.falcon`` (one unit per family), ``export`` (``export_to_hf``),
``evaluate`` (``HFModel``, ``evaluate_hf``, ``evaluate_hf_task``).

Shape suffixes: B batch, H heads, K keys, T tokens of the current call, D head dim.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # an optional extra
    raise ImportError("linbias.hf needs transformers: pip install 'linbias[hf]'") from exc

from linbias.hf.evaluate import HFModel, evaluate_hf, evaluate_hf_task
from linbias.hf.export import EXPORT_MARKER, export_to_hf
from linbias.hf.extend import (
    ATTENTIONS,
    FAMILIES,
    SUPPORTED_TRANSFORMERS,
    Attention,
    extend_context,
    extended,
    family_of,
    undo,
)

__all__ = [
    "ATTENTIONS",
    "Attention",
    "EXPORT_MARKER",
    "FAMILIES",
    "HFModel",
    "SUPPORTED_TRANSFORMERS",
    "evaluate_hf",
    "evaluate_hf_task",
    "export_to_hf",
    "extend_context",
    "extended",
    "family_of",
    "undo",
]
