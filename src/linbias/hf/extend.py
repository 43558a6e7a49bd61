"""``extend_context``, ``extended``, ``undo``: ALiBi position interpolation patched into one loaded
BLOOM, MPT or Falcon, on every transformers release from ``SUPPORTED_TRANSFORMERS[0]`` on.

See the package docstring (``linbias.hf``) for the conventions and which attention runs where; each
family's unit (``linbias.hf.families``) says how it is patched, ``linbias.hf.patch`` what they
share.
A release is judged by its code, not its version string: each family lists what the installed
code lacks of what its patch needs. Below the floor a release is refused; past the newest tested
one it is accepted with a warning if nothing is missing, and refused, naming what changed, if
something is.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import transformers
from transformers import PreTrainedModel

from linbias.alibi import SCALING_RULES, check_rule, parse_rule
from linbias.config import check_int
from linbias.hf.families import bloom, falcon, mpt
from linbias.hf.patch import STATE, Extension, Family, undo_all

__all__ = [
    "ATTENTIONS", "Attention", "FAMILIES", "SUPPORTED_TRANSFORMERS", "extend_context", "extended",
    "family_of", "undo",
]

_UNITS: dict[str, Family] = {f.name: f for f in (bloom.FAMILY, mpt.FAMILY, falcon.FAMILY)}

# The model families extend_context supports, and the transformers classes that belong to each.
FAMILIES: dict[str, str] = {name: unit.classes for name, unit in _UNITS.items()}

# Which attention an extended model runs past train_len: linbias.alibi_attention (O(L) memory, the
# flash and flex backends on a GPU), or the family's own (a bias or scores per query and key).
Attention = Literal["linbias", "native"]
_SLOPE_RULES = [name for name, r in SCALING_RULES.items() if r.slopes_only]
ATTENTIONS: tuple[str, ...] = ("linbias", "native")

# The oldest and newest transformers minor releases the families were tested with (every minor
# between is covered by the feature checks; CI runs 4.46, 4.57, 5.23, 5.24 and 5.25).
SUPPORTED_TRANSFORMERS = ("4.46", "5.25")
_INSTALL_SUPPORTED = "pip install 'transformers>=4.46,<5.26'"


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _check_release(family: Family) -> None:
    """Refuse a release below the floor, or one whose family code lacks what the patch needs;
    warn about one newer than the newest tested."""
    version = transformers.__version__
    floor, newest = (_release(v) for v in SUPPORTED_TRANSFORMERS)
    if _release(version) < floor:
        raise RuntimeError(
            f"linbias.hf supports transformers {SUPPORTED_TRANSFORMERS[0]} to "
            f"{SUPPORTED_TRANSFORMERS[1]}; this is {version}, older than the oldest supported. "
            f"Install a supported release: {_INSTALL_SUPPORTED}"
        )
    missing = family.missing()
    if missing:
        raise RuntimeError(
            f"transformers {version} changed {family.title}'s code: it no longer has "
            f"{'; '.join(missing)}, which linbias.hf replaces or calls, so the patch would compute "
            f"something else. Install a supported release: {_INSTALL_SUPPORTED}"
        )
    if _release(version) > newest:
        warnings.warn(
            f"transformers {version} is newer than the newest release linbias.hf was tested with "
            f"({SUPPORTED_TRANSFORMERS[1]}); {family.title}'s code still has everything the patch "
            "needs, so it is extended", UserWarning, stacklevel=3,
        )


def extend_context(
    model: PreTrainedModel,
    train_len: int | None = None,
    rule: str = "linear",
    *,
    attention: Attention = "linbias",
) -> PreTrainedModel:
    """Let a transformers ALiBi model run past its training length, interpolating its slopes.

    Patches ``model`` in place. At or below ``train_len`` its logits stay bit-identical (the
    family's own code runs); beyond, the slopes of each sequence follow ``rule`` for its current
    length (prompt plus generated tokens; padding excluded). Left-padded batches and ``generate()``
    with a KV cache keep working; a cached token keeps what it computed at its own length (see the
    package docstring). Calling it again on an extended model re-configures it. Not thread-safe
    for concurrent forwards of one model; ``undo`` before pickling or deep-copying the model.

    Args:
        model: a BLOOM, MPT or Falcon (``alibi=True``) model, e.g. ``BloomForCausalLM``, or its base
            model (``BloomModel``).
        train_len: the training length L. Defaults to ``config.max_seq_len`` for MPT and
            ``config.max_position_embeddings`` for Falcon; BLOOM records none, so it is required.
        rule: a rule of ``linbias.alibi.SCALING_RULES``; ``"linear"`` is ``m * L / L'``. Rules
            that change more than the slopes (``cap``, ``window``, ``selfextend``, ``logn``) run
            only in linbias attention: past L a call that needs the family's own attention
            (see ``attention``) is refused with the reason.
        attention: what computes attention once a row is longer than ``train_len``:
            ``"linbias"`` (default) is ``linbias.alibi_attention``, which builds no tensor of
            queries x keys; ``"native"`` keeps the family's own attention (for debugging and
            comparison). Both use the family's slopes and conventions (Falcon's bias rounded to
            bfloat16 as Falcon rounds it). A call that needs what only the family's attention
            gives (``output_attentions``, attention dropout in training, a 4-D mask) runs it, with
            a ``UserWarning`` once per extension and reason.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: unsupported model (the message names the families), Falcon without ALiBi,
            BLOOM without ``train_len``, a bad ``train_len``, an unknown rule or attention (the
            message lists the valid ones).
        RuntimeError: a transformers release older than ``SUPPORTED_TRANSFORMERS[0]``, or one whose
            family code no longer has what the patch replaces or calls (the message names the
            version and what is missing).
    """
    base = _base_model(model)
    family = family_of(model)
    if train_len is None:
        train_len = family.default_train_len(base.config)
    check_rule(rule)  # before anything changes
    check_int("train_len", train_len)
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; valid: {', '.join(ATTENTIONS)}")
    if attention == "native" and not parse_rule(rule)[1].slopes_only:
        raise ValueError(
            f"scaling rule {rule!r} changes more than the slopes, which only linbias attention "
            f"runs: use attention='linbias', or a slope rule ({', '.join(_SLOPE_RULES)})"
        )
    _check_release(family)
    undo(model)
    ext = Extension(family, train_len, rule, attention, base.config)
    try:
        family.patch(ext, base)
    except BaseException:
        undo_all(ext)
        raise
    vars(base)[STATE] = ext
    ext.restore.append(lambda: vars(base).pop(STATE, None))
    return model


def undo(model: PreTrainedModel) -> PreTrainedModel:
    """Take back ``extend_context``: the model behaves exactly as before. A no-op if not extended.

    Returns:
        ``model`` itself.
    """
    ext = vars(_base_model(model)).get(STATE)
    if ext is not None:
        undo_all(ext)
    return model


@contextmanager
def extended(
    model: PreTrainedModel,
    train_len: int | None = None,
    rule: str = "linear",
    *,
    attention: Attention = "linbias",
) -> Iterator[PreTrainedModel]:
    """``extend_context`` for the duration of a ``with`` block, then the previous state again.

    Example:
        ``with extended(model, train_len=2048): model.generate(...)``
    """
    previous = vars(_base_model(model)).get(STATE)
    extend_context(model, train_len, rule, attention=attention)
    try:
        yield model
    finally:
        if previous is None:
            undo(model)
        else:
            extend_context(model, previous.train_len, previous.rule, attention=previous.attention)


# --- Which model ----------------------------------------------------------------------------------


def _base_model(model: Any) -> Any:
    return getattr(model, "base_model", model)


def family_of(model: PreTrainedModel) -> Family:
    """The family unit of a model or its base model.

    Raises:
        ValueError: not a supported ALiBi family (the message names them), or Falcon without ALiBi.
    """
    base = _base_model(model)
    for unit in _UNITS.values():
        if unit.matches(base):
            unit.check_model(model, base)
            return unit
    supported = "; ".join(f"{name} ({classes})" for name, classes in FAMILIES.items())
    raise ValueError(
        f"extend_context does not support {type(model).__name__}; "
        f"supported ALiBi families: {supported}"
    )
