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

Exporting (``export_to_hf``). A linbias ALiBi GPT is written as an MPT checkpoint, the one ALiBi
architecture of transformers it maps onto without approximation, and only when the model has no
biases (see ``export_to_hf``): BLOOM's MLP uses the tanh approximation of GELU where linbias uses
the exact one, and BLOOM normalises the word embeddings with a LayerNorm that no weights turn into
the identity; Falcon divides the ALiBi bias by sqrt(head dim), changing the slopes. The training length becomes MPT's ``max_seq_len``, so ``extend_context``
finds it by default.

Evaluating (``evaluate_hf``). Any transformers causal LM, scored with ``linbias.evaluate``'s
protocols on a linbias corpus tokenised by the model's own tokenizer; the ALiBi families also with
each scaling rule, through ``extended``.

Shape suffixes: B batch, H heads, K keys, T tokens of the current call, D head dim.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

try:
    import transformers
except ImportError as exc:  # an optional extra
    raise ImportError("linbias.hf needs transformers: pip install 'linbias[hf]'") from exc
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    MptConfig,
    MptForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.bloom.modeling_bloom import BloomModel, _get_alibi_slopes
from transformers.models.falcon.modeling_falcon import FalconModel
from transformers.models.mpt.modeling_mpt import MptAttention, MptModel

import linbias
from linbias.alibi import check_rule, interpolate_slopes, row_lengths, scaling_factor
from linbias.config import ModelConfig, check_int
from linbias.data import EOT, default_cache_dir, load_corpus, token_byte_lengths, token_stream
from linbias.evaluate import DEPTHS, Mode, check_request, evaluate_model, evaluate_task
from linbias.tasks import encoder
from linbias.runs import Run, load_run

__all__ = [
    "EXPORT_MARKER",
    "FAMILIES",
    "HFModel",
    "evaluate_hf",
    "evaluate_hf_task",
    "export_to_hf",
    "extend_context",
    "extended",
    "undo",
]

# The model families extend_context supports, and the transformers classes that belong to each.
FAMILIES: dict[str, str] = {
    "bloom": "BloomForCausalLM, BloomModel",
    "mpt": "MptForCausalLM, MptModel",
    "falcon": "FalconForCausalLM, FalconModel with config.alibi=True",
}

_STATE = "_linbias_extension"  # attribute of the base model holding its _Extension

# The transformers releases whose BLOOM, MPT and Falcon internals the patches below were written
# against and tested with; another release may compute something else, so it is refused.
SUPPORTED_TRANSFORMERS = ("5.23",)


def _check_transformers_version() -> None:
    release = ".".join(transformers.__version__.split(".")[:2])
    if release not in SUPPORTED_TRANSFORMERS:
        raise RuntimeError(
            f"linbias.hf patches transformers internals and supports transformers "
            f"{', '.join(v + '.x' for v in SUPPORTED_TRANSFORMERS)}; this is "
            f"{transformers.__version__}. Install a supported release: "
            f"pip install 'transformers>={SUPPORTED_TRANSFORMERS[0]},<5.24'"
        )


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
    _check_transformers_version()
    base = _base_model(model)
    family = _family(model, base)
    if train_len is None:
        train_len = _default_train_len(family, base)
    check_rule(rule)  # before anything changes
    check_int("train_len", train_len)
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
    """L' of each row (``linbias.alibi.row_lengths``)."""
    return row_lengths(mask_BK).tolist()


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


# --- Export: a linbias ALiBi GPT as an MPT checkpoint -------------------------------------------

EXPORT_MARKER = "linbias_export.json"  # written into every export; marks a directory as one
_EXPORT_FORMAT = "linbias-hf-export/1"
# The largest logit difference export_to_hf accepts between the two models, relative to the
# largest logit (at least 1): float32 sums in another order, MPT's bias m*(j - (K-1)) against
# linbias's -m*(i - j) (equal up to a per-row constant, which softmax ignores).
_EXPORT_RTOL = 1e-4
_VERIFY_LEN = 256  # tokens export_to_hf runs through both models (the training length if shorter)

# linbias GPT parameter names -> MptForCausalLM's; per block, below "blocks.{i}." / "transformer.
# blocks.{i}.". Biases have no counterpart: MPT in transformers has none (see _mpt_tensors).
_MPT_TOP = {
    "tok_emb.weight": "transformer.wte.weight",
    "ln_f.weight": "transformer.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
_MPT_BLOCK = {
    "ln_1.weight": "norm_1.weight",
    "attn.qkv.weight": "attn.Wqkv.weight",  # both [q | k | v] along the output, heads inside each
    "attn.proj.weight": "attn.out_proj.weight",
    "ln_2.weight": "norm_2.weight",
    "mlp.fc.weight": "ffn.up_proj.weight",
    "mlp.proj.weight": "ffn.down_proj.weight",
}


def export_to_hf(run_or_path: Run | str | Path, out_dir: str | Path) -> Path:
    """Write a linbias ALiBi model as a transformers MPT checkpoint, with its tokenizer.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` then loads an ``MptForCausalLM`` with the
    same logits (checked before anything is written to ``out_dir``: at most 1e-4 of the largest
    logit apart on ``min(train_len, 256)`` tokens), ``AutoTokenizer.from_pretrained(out_dir)`` a
    fast tokenizer that encodes like the run's (``<|endoftext|>`` is its eos, bos and unk token),
    and ``extend_context(model)`` takes ``train_len`` from ``config.max_seq_len``. The unpatched
    model, as any MPT, refuses inputs longer than ``max_seq_len``.

    Why MPT, and what it cannot hold. MPT (transformers 5.23) has linbias's layout: pre-LN blocks,
    one fused ``[q | k | v]`` projection, exact GELU, no position embeddings, ALiBi added after the
    1/sqrt(head dim) scaling with the same slopes for any head count, optionally untied output
    weights (``tie_word_embeddings``). But ``MptModel`` builds every Linear and LayerNorm without a
    bias and every MLP 4 * d_model wide, whatever ``no_bias`` and ``expansion_ratio`` say, and
    builds its ALiBi with ``alibi_bias_max=8`` whatever ``attn_config`` says. So only a model whose
    biases are all zero (or absent), with ``d_ff = 4 * d_model`` and ``alibi_max_bias = 8``,
    exports exactly; anything else is refused rather than approximated. BLOOM is no alternative:
    its tanh-approximated GELU and its LayerNorm on the word embeddings cannot be made exact.
    Dropout only acts in training; the export has none.

    Args:
        run_or_path: a ``linbias.train.Run`` or a run directory.
        out_dir: the directory to write: new, empty, or a previous export, which is replaced
            only if it holds exactly the files that export wrote (``EXPORT_MARKER`` lists their
            names and SHA-256); a file added or changed since is an error, never deleted. It is
            filled atomically: a reader sees the previous contents or the whole new export.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: a model that is not ALiBi, or that MPT cannot hold exactly (the message says
            which part); an ``out_dir`` that is a file, a non-empty directory of something else,
            an export with added or changed files, the current directory, or one holding the run.
        RuntimeError: the written model's logits differ (another transformers version).
        RunError: an unusable run directory.
    """
    run = run_or_path if isinstance(run_or_path, Run) else load_run(run_or_path)
    out = Path(out_dir).absolute()
    _check_export_dir(out, run.path)
    tensors = _mpt_tensors(run.model, run.config)  # every refusal comes before any file is written
    mpt = MptForCausalLM(_mpt_config(run))
    mpt.load_state_dict(tensors, strict=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=run.tokenizer, eos_token=EOT, bos_token=EOT, unk_token=EOT,
        clean_up_tokenization_spaces=False,  # decode gives back the text, spaces and all
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # A fresh, uniquely named folder: the only one this function ever removes on failure.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0o022)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export gets a plain folder's mode
    try:
        mpt.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        diff = _verify_export(run, tmp)
        marker = {"format": _EXPORT_FORMAT, "hf_format": "mpt", "source": str(run.path),
                  "linbias_version": linbias.__version__, "train_len": run.config.train_len,
                  "max_logit_diff": diff, "model": run.config.to_dict(),
                  "files": {p.name: _file_sha256(p) for p in sorted(tmp.iterdir())}}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_export_dir(out: Path, run_dir: Path) -> None:
    """``out`` may be new, empty, or an export whose every file is as ``export_to_hf`` wrote it
    (the marker lists names and checksums): nothing else is ever replaced."""
    fix = "choose another --to-hf directory (new or empty)"
    cwd, run = Path.cwd().resolve(), run_dir.resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise ValueError(f"{out} is the current directory or holds it; {fix}")
    if run == out.resolve() or out.resolve() in run.parents:
        raise ValueError(f"{out} holds the run being exported ({run_dir}); {fix}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; export_to_hf writes a directory: {fix}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    written = _export_manifest(out)
    if written is None:
        raise ValueError(
            f"{out} is not empty and is not a previous linbias export (no readable "
            f"{EXPORT_MARKER} listing its files); {fix}"
        )
    changed = sorted(
        p.name for p in out.iterdir()
        if p.name != EXPORT_MARKER and (not p.is_file() or p.is_symlink()
                                        or written.get(p.name) != _file_sha256(p))
    )
    if changed:
        raise ValueError(
            f"{out} is a previous linbias export, but these entries were added or changed since: "
            f"{', '.join(changed)}; replacing the export would delete them, so {fix}, or move them"
        )


def _export_manifest(out: Path) -> dict[str, str] | None:
    """The ``{file name: sha256}`` a previous export recorded, or None if there is no valid one."""
    try:
        marker = json.loads((out / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _EXPORT_FORMAT:
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and "/" not in k and isinstance(v, str) for k, v in files.items()
    ):
        return None
    return files


def _mpt_tensors(model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict of an equivalent ``MptForCausalLM``; ValueError if there is none."""
    if config.position != "alibi":
        raise ValueError(
            f"this run uses {config.position!r} positions; only ALiBi models map onto the ALiBi "
            f"architectures of transformers (MPT, BLOOM), so only position='alibi' exports"
        )
    if config.embedding != "gpt2":
        raise ValueError(
            f"embedding={config.embedding!r} cannot be exported: it multiplies token embeddings "
            f"by sqrt(d_model), which MPT does not, and the tied output layer must not be scaled; "
            f"only embedding='gpt2' runs export"
        )
    if config.alibi_max_bias != 8:
        raise ValueError(
            f"alibi_max_bias={config.alibi_max_bias:g} cannot be exported: transformers' MptModel "
            "builds its ALiBi slopes with alibi_bias_max=8 whatever its config says"
        )
    if config.ff_dim != 4 * config.d_model:
        raise ValueError(
            f"d_ff={config.ff_dim} cannot be exported: transformers' MPT MLP is always "
            f"4 * d_model = {4 * config.d_model} wide (it ignores expansion_ratio)"
        )
    tensors, nonzero, unknown = {}, [], []
    for name, t in model.state_dict().items():
        if name.endswith(".bias"):
            if bool(t.any()):
                nonzero.append(f"{name} (max |b| {float(t.abs().max()):.2g})")
        elif (target := _mpt_name(name)) is None:
            unknown.append(name)
        else:
            tensors[target] = t.detach().clone()
    if unknown:
        raise ValueError(f"no MPT counterpart for linbias parameters {unknown}")
    if nonzero:
        raise ValueError(
            f"{len(nonzero)} bias tensors are non-zero ({', '.join(nonzero[:3])}"
            f"{', ...' if len(nonzero) > 3 else ''}): transformers' MPT builds its Linear and "
            "LayerNorm layers without biases (it ignores no_bias), so only a model without biases "
            "exports exactly, and BLOOM, which has biases, differs in its GELU and an embedding "
            "LayerNorm"
        )
    return tensors


def _mpt_name(name: str) -> str | None:
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match is None:
        return _MPT_TOP.get(name)
    inner = _MPT_BLOCK.get(match.group(2))
    return None if inner is None else f"transformer.blocks.{match.group(1)}.{inner}"


def _mpt_config(run: Run) -> MptConfig:
    config, eot = run.config, run.tokenizer.token_to_id(EOT)
    eps = {m.eps for m in run.model.modules() if isinstance(m, torch.nn.LayerNorm)}
    if len(eps) != 1:
        raise ValueError(f"MPT has one layer_norm_epsilon; this model's LayerNorms use {eps}")
    return MptConfig(
        d_model=config.d_model, n_heads=config.n_heads, n_layers=config.n_layers,
        vocab_size=config.vocab_size, max_seq_len=config.train_len, expansion_ratio=4,
        layer_norm_epsilon=eps.pop(), learned_pos_emb=False, no_bias=True,
        attn_config={"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0},
        resid_pdrop=0, emb_pdrop=0, tie_word_embeddings=config.tie_weights,
        use_cache=True,  # MptConfig's default is False; generation wants the cache
        bos_token_id=eot, eos_token_id=eot,
    )


def _verify_export(run: Run, path: Path) -> float:
    """Largest logit difference between the run's model and the checkpoint written at ``path``."""
    mpt = AutoModelForCausalLM.from_pretrained(path).eval()
    n = min(run.config.train_len, _VERIFY_LEN)
    ids = torch.randint(run.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    training = run.model.training
    try:
        run.model.eval()  # no dropout
        with torch.inference_mode(), run.model.scaled("none"):
            expected = run.model(ids.to(next(run.model.parameters()).device)).float().cpu()
            got = mpt(ids).logits.float()
    finally:
        run.model.train(training)
    diff = float((got - expected).abs().max())
    if not diff <= _EXPORT_RTOL * max(1.0, float(expected.abs().max())):
        raise RuntimeError(
            f"the exported MPT's logits differ from the linbias model's by up to {diff:.3g}; this "
            f"transformers version ({transformers.__version__}) builds MPT differently from 5.23"
        )
    return diff


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; a previous export there (checked by
    ``_check_export_dir``) goes aside into a fresh folder, then away."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old)  # over the fresh empty folder
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)  # an empty directory is replaced in one step


# --- Evaluation of transformers models ----------------------------------------------------------


def evaluate_hf(
    model_or_path: PreTrainedModel | str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    train_len: int | None = None,
    lengths: Sequence[int],
    scalings: Sequence[str] = ("none",),
    data: str = "stdlib",
    split: str = "valid",
    mode: Mode = "nonoverlapping",
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    per_position: bool = False,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate a transformers causal LM on a linbias corpus at several lengths and scaling rules.

    The counterpart of ``linbias.evaluate.evaluate_run`` (same protocols through
    ``evaluate_stream``, same record keys, ``position`` being the model family, e.g. ``"mpt"``).
    The corpus is tokenised by the model's fast tokenizer (its ``backend_tokenizer``), each
    document followed by the tokenizer's ``eos_token``. For bits per byte, each token counts the
    UTF-8 bytes it stands for: exactly for byte-level BPE vocabularies (GPT-2, MPT, BLOOM, linbias
    exports); other tokens count the bytes of the token decoded on its own, which is approximate
    where that decoding differs from the token's share of the text (SentencePiece drops a word's
    leading space, a lone byte token decodes to U+FFFD).

    Scaling rules: ``"none"`` is the model as transformers runs it. For MPT, whose unpatched
    model cannot run past ``max_seq_len``, ``"none"`` goes through ``extended(model, train_len,
    "none")``, which gives the same logits where the unpatched model runs and plain ALiBi
    extrapolation beyond (as ``"none"`` does for linbias runs). Other rules use ``extended(model,
    train_len, rule)`` and need an ALiBi family of ``FAMILIES``.

    Args:
        model_or_path: a loaded model, or a local directory (e.g. from ``export_to_hf``) or Hub
            name for ``AutoModelForCausalLM.from_pretrained``. A Hub name needs network access or
            the local Hugging Face cache.
        tokenizer: the model's tokenizer; default: ``AutoTokenizer`` from the same place (for a
            loaded model, its ``name_or_path``).
        train_len: the training length L for the scaling rules; default as ``extend_context``
            (MPT: ``max_seq_len``; Falcon: ``max_position_embeddings``; BLOOM: required).
        lengths: evaluation lengths ``L'``, in the order the records are returned.
        scalings: rule names (``linbias.alibi.SCALING_RULES``), each evaluated separately.
        data: corpus spec for ``linbias.data.load_corpus`` (``stdlib``, ``text:PATH``, ``hf:...``).
        split: ``valid``, ``test`` or ``train``.
        mode, stride, batch_size, max_tokens, per_position, progress: as for ``evaluate_stream``.
        cache_dir: token-stream cache; default ``linbias.data.default_cache_dir()``.
        device: move the model there first (default: where it is).

    Returns:
        One record per length and rule, as ``evaluate_run``'s: ``position`` (family), ``scaling``,
        ``train_len``, ``split``, ``skipped`` (a reason, or ``None``) and ``evaluate_stream``'s
        keys. A length the stream cannot fill is skipped (numbers ``None``).

    Raises:
        RuntimeError: the model or tokenizer cannot be loaded (the message says what to check
            when offline).
        ValueError: bad lengths, stride, mode, an unknown rule, a rule other than ``"none"`` for a
            model without ALiBi, BLOOM without ``train_len``, a tokenizer without a fast backend
            or an eos token; with a single length, a length that would be skipped.
    """
    model, tokenizer = _load_hf(model_or_path, tokenizer)
    check_request(lengths, mode, stride, scalings, batch_size, max_tokens)
    adapter = HFModel(model, train_len)
    adapter.check_rules(scalings)
    backend, eos = _fast_backend(tokenizer)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stream = token_stream(load_corpus(data), backend, split, cache, eot=eos)
    if device is not None:
        model.to(device)
    training = model.training
    model.eval()
    try:
        return evaluate_model(
            adapter, stream, _hf_byte_lengths(backend), lengths=lengths, scalings=scalings,
            data=data, split=split, mode=mode, stride=stride,
            batch_size=batch_size, max_tokens=max_tokens, per_position=per_position,
            progress=progress,
        )
    finally:
        model.train(training)


class HFModel:
    """A transformers causal LM as a ``linbias.evaluate.EvalModel``: ``position`` is its family
    (e.g. ``"mpt"``), rules go through ``extended`` (see ``evaluate_hf``), and a learned absolute
    position table (GPT-2, OPT) is its ``max_len``.

    Raises:
        ValueError: a ``train_len`` that is not a positive integer, or BLOOM without one when a rule
            needs it.
    """

    def __init__(self, model: PreTrainedModel, train_len: int | None = None) -> None:
        self.model = model
        base = _base_model(model)
        try:
            self.position = _family(model, base)
        except ValueError as exc:
            self.position, self._not_alibi = model.config.model_type, exc
        else:
            self._not_alibi = None
            if train_len is None and self.position != "bloom":
                train_len = _default_train_len(self.position, base)
        if train_len is not None:
            check_int("train_len", train_len)
        self.train_len = train_len
        self.max_len = None if self._not_alibi is None else _position_table_rows(model)
        # Looked up once: logits() runs once per batch of every evaluation.
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def logits(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        extra: dict[str, torch.Tensor] = {}
        if mask_BT is not None:
            extra["attention_mask"] = mask_BT.long().to(device)
            if self._takes_positions:
                # left padding: absolute positions start at 0 at each row's first real token
                extra["position_ids"] = (extra["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids=ids_BT.to(device), use_cache=False, **extra).logits

    def attention_maps(self, ids_BT: torch.Tensor) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            out = self.model(input_ids=ids_BT.to(device), use_cache=False, output_attentions=True)
        maps = getattr(out, "attentions", None)
        if not maps or any(m is None for m in maps):
            raise ValueError(
                f"this {self.position} model returns no attention probabilities with its attention "
                "implementation: load it with attn_implementation='eager'"
            )
        return [m.float().cpu() for m in maps]

    def check_rules(self, rules: Sequence[str]) -> None:
        for rule in rules:
            check_rule(rule)
        if set(rules) - {"none"}:
            if self._not_alibi is not None:
                raise self._not_alibi  # the message names the supported families
            if self.train_len is None:
                _default_train_len(self.position, _base_model(self.model))  # BLOOM: asks for it

    def under(self, rule: str) -> AbstractContextManager:
        """The model under ``rule``: as it is for ``"none"``, except MPT (see ``evaluate_hf``)."""
        if rule == "none" and self.position != "mpt":
            return nullcontext(self.model)
        return extended(self.model, self.train_len, rule)


def evaluate_hf_task(
    model_or_path: PreTrainedModel | str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    train_len: int | None = None,
    task: str,
    lengths: Sequence[int],
    depths: Sequence[float] = DEPTHS,
    trials: int = 10,
    scalings: Sequence[str] = ("none",),
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Retrieval accuracy of a transformers causal LM: ``linbias.evaluate.evaluate_task`` with
    plain prompts in the model's own tokenizer (no special tokens, no chat template), batched
    with left padding. Arguments as ``evaluate_hf`` and ``evaluate_task``; the haystack is the
    filler sentences.
    """
    model, tokenizer = _load_hf(model_or_path, tokenizer)
    adapter = HFModel(model, train_len)
    adapter.check_rules(scalings)
    if device is not None:
        model.to(device)
    training = model.training
    model.eval()
    try:
        return evaluate_task(adapter, encoder(tokenizer), task=task, lengths=lengths,
                             depths=depths, trials=trials, scalings=scalings, seed=seed,
                             batch_size=batch_size, progress=progress)
    finally:
        model.train(training)


def _load_hf(
    model_or_path: PreTrainedModel | str | Path, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if isinstance(model_or_path, PreTrainedModel):
        model, source = model_or_path, model_or_path.name_or_path
    else:
        source = str(model_or_path)
        model = _from_pretrained(AutoModelForCausalLM, source, "model")
    if tokenizer is None:
        if not source:
            raise ValueError("the model records no name_or_path to load its tokenizer from: pass "
                             "tokenizer=")
        tokenizer = _from_pretrained(AutoTokenizer, source, "tokenizer")
    return model, tokenizer


def _from_pretrained(cls: Any, source: str, what: str) -> Any:
    try:
        return cls.from_pretrained(source)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            message = f"could not load a transformers {what} from {source}: {exc}"
            raise RuntimeError(message) from exc
        raise RuntimeError(
            f"could not load a transformers {what} from {source!r}: no such local directory, and "
            f"as a Hugging Face Hub name it needs network access or a copy in the local Hugging "
            f"Face cache (offline, e.g. with HF_HUB_OFFLINE=1, only the cache is used). Pass a "
            f"local directory, such as one written by 'linbias export'. ({exc})"
        ) from exc


def _fast_backend(tokenizer: PreTrainedTokenizerBase) -> tuple[Tokenizer, str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ValueError(
            f"{type(tokenizer).__name__} has no tokenizers backend; evaluate_hf needs a fast "
            "tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    eos = tokenizer.eos_token
    if not eos:
        raise ValueError("the tokenizer has no eos_token, which evaluate_hf puts between documents")
    return backend, str(eos)


def _hf_byte_lengths(backend: Tokenizer) -> np.ndarray:
    """UTF-8 bytes per token id (special tokens 0), for bits per byte.

    A byte-level BPE (its decoder is ``ByteLevel``) spells each byte as one character, so a
    token's length is its byte count (``linbias.data.token_byte_lengths``); tokens added as raw
    text (e.g. GPT-NeoX's runs of spaces) count their own UTF-8 bytes. Any other vocabulary counts
    each token decoded on its own. The decoder decides, not the characters: ``"é"`` is one byte as
    a byte-level character but two in a SentencePiece vocabulary.
    """
    byte_level = "ByteLevel" in _types(json.loads(backend.to_str()).get("decoder"))
    if byte_level:
        try:
            return token_byte_lengths(backend)
        except KeyError:  # a token added as raw text, not in byte-level characters
            pass
    added = {t.content: t.special for t in backend.get_added_tokens_decoder().values()}
    lengths = np.zeros(backend.get_vocab_size(), dtype=np.int64)
    for token, i in backend.get_vocab().items():
        if token in added:
            lengths[i] = 0 if added[token] else len(token.encode("utf-8"))
        elif byte_level:
            lengths[i] = len(token)
        else:
            lengths[i] = len(backend.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths


def _types(component: dict | None) -> set[str]:
    """The ``type`` names in a serialised tokenizer component, inside ``Sequence``s too."""
    if not component:
        return set()
    inner = component.get("decoders") or component.get("pretokenizers") or []
    return {component.get("type", "")}.union(*(_types(c) for c in inner))


# Names transformers gives learned absolute position tables (GPT-2, GPT-Neo, OPT, BERT-like).
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def _position_table_rows(model: PreTrainedModel) -> int | None:
    """Positions a learned absolute position table holds (OPT's first rows are an offset), or
    None if the model has none: such a model cannot run windows longer than the table."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in _POSITION_TABLES and isinstance(module, torch.nn.Embedding):
            return module.num_embeddings - int(getattr(module, "offset", 0))
    return None


