"""``export_to_hf``: a linbias ALiBi GPT written as a transformers MPT checkpoint.

See the package docstring (``linbias.hf``) for why MPT.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, MptConfig, MptForCausalLM, PreTrainedTokenizerFast

import linbias
from linbias.config import ModelConfig
from linbias.data import EOT
from linbias.fileio import (
    LOCK_NAME, exclusive, owning_folder, replacing_folder, sha256_file, write_json,
)
from linbias.runs import Run, load_run

__all__ = ["EXPORT_MARKER", "export_to_hf"]

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
    fast tokenizer that encodes like the run's (``<|endoftext|>`` is its eos, bos, unk and pad
    token; it pads on the left, so ``tok(texts, padding=True)`` batches prompts for ``generate``),
    and ``extend_context(model)`` takes ``train_len`` from ``config.max_seq_len``. The unpatched
    model, as any MPT, refuses inputs longer than ``max_seq_len``.

    Why MPT, and what it cannot hold. MPT (transformers 5.23) has linbias's layout: pre-LN blocks,
    one fused ``[q | k | v]`` projection, exact GELU, no position embeddings, ALiBi added after the
    1/sqrt(head dim) scaling with the same slopes for any head count, optionally untied output
    weights (``tie_word_embeddings``). But ``MptModel`` builds every Linear and LayerNorm without a
    bias and every MLP 4 * d_model wide, whatever ``no_bias`` and ``expansion_ratio`` say, and
    builds its ALiBi with ``alibi_bias_max=8`` whatever ``attn_config`` says. So only a model whose
    biases are all zero (or absent), with ``d_ff = 4 * d_model``, ``alibi_max_bias = 8`` and
    ``position_scale = 1`` (a fine-tune with fixed interpolation scales every slope), exports
    exactly; anything else is refused rather than approximated. BLOOM is no alternative:
    its tanh-approximated GELU and its LayerNorm on the word embeddings cannot be made exact.
    Dropout only acts in training; the export has none.

    Args:
        run_or_path: a ``linbias.train.Run`` or a run directory.
        out_dir: the directory to write: new, empty, or a previous export, which is replaced
            only if it holds exactly the files that export wrote (``EXPORT_MARKER`` lists their
            names and SHA-256); a file added or changed since is an error, never deleted. It is
            built beside and renamed into place (``fileio.replacing_folder``): a reader or a
            kill never meets a half-written export.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: a model that is not ALiBi, or that MPT cannot hold exactly (the message says
            which part); an ``out_dir`` that is a file, a non-empty directory of something else,
            an export with added or changed files, the current directory, or one holding the run.
        RuntimeError: the written model's logits differ (another transformers version).
        RunError: an unusable run directory.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; export_to_hf writes a directory: choose another "
                         "--to-hf directory (new or empty)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # One export into a target at a time: the lock sits beside it, since the target is replaced.
    with exclusive(out.parent / f".{out.name}{LOCK_NAME}", f"the export {out}"):
        run = run_or_path if isinstance(run_or_path, Run) else load_run(run_or_path)
        _check_export_dir(out, run.path)
        return _export(run, out)


def _export(run: Run, out: Path) -> Path:
    tensors = _mpt_tensors(run.model, run.config)  # every refusal comes before any file is written
    mpt = MptForCausalLM(_mpt_config(run))
    mpt.load_state_dict(tensors, strict=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=run.tokenizer, eos_token=EOT, bos_token=EOT, unk_token=EOT,
        # Batches as transformers users write them, tok(texts, padding=True): a decoder pads on
        # the left, so every row's last token is where generation continues.
        pad_token=EOT, padding_side="left",
        clean_up_tokenization_spaces=False,  # decode gives back the text, spaces and all
        # What MPT takes (4.x tokenizers also return token_type_ids, which generate refuses).
        model_input_names=["input_ids", "attention_mask"],
    )
    # Built beside ``out`` and swapped in whole (``_check_export_dir`` allowed the replacement).
    with replacing_folder(out) as tmp:
        mpt.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        diff = _verify_export(run, tmp)
        marker = {"format": _EXPORT_FORMAT, "hf_format": "mpt", "source": str(run.path),
                  "linbias_version": linbias.__version__, "train_len": run.config.train_len,
                  "max_logit_diff": diff, "model": run.config.to_dict(),
                  "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}}
        write_json(tmp / EXPORT_MARKER, marker)
    return out


def _check_export_dir(out: Path, run_dir: Path) -> None:
    """``out`` may be new, empty, or an export whose every file is as ``export_to_hf`` wrote it
    (the marker lists names and checksums): nothing else is ever replaced."""
    fix = "choose another --to-hf directory (new or empty)"
    cwd, run = Path.cwd().resolve(), run_dir.resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise ValueError(f"{out} is the current directory or holds it; {fix}")
    if run == out.resolve() or out.resolve() in run.parents:
        raise ValueError(f"{out} holds the run being exported ({run_dir}); {fix}")
    whole = owning_folder(out)
    if whole is not None:
        raise ValueError(f"{out} is inside {whole}, a linbias run or export whose files must stay "
                         f"as written; {fix}")
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
                                        or written.get(p.name) != sha256_file(p))
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
    if config.position_scale != 1.0:
        raise ValueError(
            f"position_scale={config.position_scale:g} (a fine-tune's fixed interpolation) cannot "
            "be exported: MPT's slopes are 2^(-8h/H), and no alibi_bias_max turns them into "
            f"slopes x {config.position_scale:g}; evaluate the run with linbias instead"
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
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
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
