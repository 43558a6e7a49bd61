"""Test long: perplexity and bits per byte at each evaluation length ``L'``.

The two protocols of the ALiBi paper (Press, Smith and Lewis, "Train Short, Test Long", ICLR 2022,
arXiv 2108.12409, section 4 and appendix B), on one token stream of ``N`` tokens whose targets are
tokens ``1 .. N-1``; both score every target exactly once, so their numbers are comparable:

* ``nonoverlapping``: consecutive chunks of ``L'`` tokens, every token of a chunk scored. Tokens
  early in a chunk see little context (the "early token curse"); ``per_position`` shows it.
* ``sliding`` with stride ``S`` (``1 <= S <= L'``): window ``k`` holds tokens ``kS .. kS+L'-1``
  and scores only its last ``S`` predictions (the first window scores all ``L'``), so every
  prediction after the first window sees at least ``L' - S`` tokens of context. ``S = L'`` is
  exactly ``nonoverlapping``.

The targets left at the end (fewer than a chunk or a stride) are not dropped: the protocol's grid
continues with one final window cut at the end of the stream, shorter than ``L'`` (as in the
sliding-window loop of the Hugging Face perplexity guide). That window scores only its new tokens,
and a length-scaling rule sees its own, shorter length.

Perplexity is ``exp`` of the mean negative log-likelihood per scored token (nats); bits per byte
is the total NLL in bits over the UTF-8 bytes of the scored tokens, comparable across tokenizers.
Position interpolation for ALiBi (Al-Khateeb et al. 2023, arXiv 2310.13017) is evaluated by
setting a scaling rule on the model (``GPT.scaled``) for the duration of an evaluation.

A diverged model's loss is not finite: its records keep ``nan``/``inf`` (never a made-up
perplexity), ``report.format_table`` says the loss is not finite, and ``write_results``, since JSON has no
NaN or Infinity, writes such a number as ``null`` and lists its key in the record's
``"non_finite"``.

The core, ``evaluate_stream``, takes any logits function ``[B, T] -> [B, T, V]``, so the same
protocols serve models from other libraries. Every loop over lengths and rules is written once
against ``EvalModel``, whose two adapters are a linbias run (``RunModel``) and a transformers model
(``linbias.hf.HFModel``): perplexity (``evaluate_model``), retrieval accuracy per length and needle
depth (``evaluate_task``, with the tasks of ``linbias.tasks``) and the attention-distance profile
(``attention_profile``). Shape suffixes: ``B`` windows in a batch, ``T``
window length, ``V`` vocabulary, ``K`` windows, ``N`` scored tokens of a batch.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from linbias.checks import check_int
from linbias.config import (
    PERPLEXITY_ONLY, TASK_ONLY, EvalConfig, Mode, check_protocol, resolve_stride,
)
from linbias.deprecation import moved
from linbias.data import (
    default_cache_dir, load_corpus, token_byte_lengths, token_stream,
)
from linbias import fileio
from linbias.fileio import OutputError, check_output
from linbias.tasks import (
    Encoder, Trial, cell_record, encoder, k_max, make_trials, passkey, score, wilson,
)
from linbias.runs import Run, check_corpus, load_run

__all__ = [
    "EvalModel", "RunModel", "cell_seed", "check_results_path", "check_fits", "fits_in_memory",
    "eval_config", "evaluate_model", "run_stream",
    "evaluate_run", "evaluate_run_task", "evaluate_stream", "evaluate_task",
    "json_record", "merge_cells", "attention_profile", "needle_map", "retrieval_summary",
    "write_results",
]

# Configuration names lived here before ``linbias.config`` held every config.
__getattr__ = moved(__name__, {**dict.fromkeys(("DEPTHS", "MODES"), "linbias.config"),
                               **dict.fromkeys(("format_table", "retrieval_table"), "linbias.report")})

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

_LN2 = math.log(2.0)


# --- windows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Windows:
    """Window ``k`` reads inputs ``stream[start_k : start_k + length_k]``, predicts the next token
    at each, and scores the predictions at window positions ``first_k .. length_k - 1``."""

    start_K: np.ndarray
    length_K: np.ndarray
    first_K: np.ndarray


def _windows(n_targets: int, eval_len: int, stride: int) -> _Windows:
    """The sliding grid (``stride == eval_len``: non-overlapping chunks) over ``n_targets`` targets.

    Window ``k`` starts at ``k * stride``; all but the first score only what the previous window
    did not, ``eval_len - stride`` positions in; the last one is cut at the end of the stream.
    """
    n_windows = 1 + -(-(n_targets - eval_len) // stride)  # ceil division
    start_K = np.arange(n_windows, dtype=np.int64) * stride
    end_K = np.minimum(start_K + eval_len, n_targets)
    first_K = np.concatenate([[0], end_K[:-1] - start_K[1:]]).astype(np.int64)
    return _Windows(start_K, end_K - start_K, first_K)


# --- the core: any logits function --------------------------------------------------------------


def _prepare_stream(stream: Any, max_tokens: int | None, eval_len: int) -> np.ndarray:
    """The 1-D stream cut to ``max_tokens`` targets, checked to hold at least ``eval_len``."""
    if isinstance(stream, torch.Tensor):
        stream = stream.detach().cpu().numpy()
    array = np.asarray(stream)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"stream must be 1-D token ids, got shape {array.shape}, {array.dtype}")
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, 1)
        array = array[: max_tokens + 1]
    if len(array) < 2:
        raise ValueError(
            f"the stream has {len(array)} token(s); perplexity needs at least 2 (one to predict)"
        )
    if len(array) - 1 < eval_len:
        raise ValueError(
            f"eval_len={eval_len} needs at least {eval_len} scored tokens ({eval_len + 1} in the "
            f"stream); it has {len(array) - 1}"
            + (f" with max_tokens={max_tokens}" if max_tokens is not None else "")
        )
    return array


@dataclass
class _Totals:
    """Running sums over scored tokens, in float64."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    pos_nll: torch.Tensor | None = None  # [eval_len] float64, when per_position
    pos_count: torch.Tensor | None = None  # [eval_len] int64


def _score_batch(
    logits_fn: LogitsFn,
    stream: np.ndarray,
    start_B: np.ndarray,
    first_B: np.ndarray,
    length: int,
    byte_lengths: np.ndarray | None,
    totals: _Totals,
) -> None:
    """One forward over windows of equal ``length``; adds their scored NLL to ``totals``."""
    offsets_T = np.arange(length + 1)
    tokens = torch.from_numpy(np.asarray(stream[start_B[:, None] + offsets_T], dtype=np.int64))
    idx_BT, target_BT = tokens[:, :-1], tokens[:, 1:]
    scored_BT = torch.arange(length)[None, :] >= torch.from_numpy(first_B)[:, None]
    logits_BTV = logits_fn(idx_BT)
    if logits_BTV.shape[:2] != idx_BT.shape:
        raise ValueError(
            f"logits_fn returned shape {tuple(logits_BTV.shape)} for input {tuple(idx_BT.shape)}; "
            "expected [B, T, V]"
        )
    scored = scored_BT.to(logits_BTV.device)
    # Only scored rows go through log-softmax, in float32 at least; sums in float64.
    logits_NV = logits_BTV[scored] if not bool(scored_BT.all()) else logits_BTV.flatten(0, 1)
    del logits_BTV
    logits_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))
    target_N = target_BT[scored_BT].to(logits_NV.device)
    nll_N = F.cross_entropy(logits_NV, target_N, reduction="none").double().cpu()
    del logits_NV
    totals.nll += float(nll_N.sum())
    totals.tokens += int(nll_N.numel())
    if byte_lengths is not None:
        totals.bytes += int(byte_lengths[target_N.cpu().numpy()].sum())
    if totals.pos_nll is not None and totals.pos_count is not None:
        pos_N = torch.arange(length).expand_as(scored_BT)[scored_BT]
        totals.pos_nll += torch.bincount(pos_N, weights=nll_N, minlength=len(totals.pos_nll))
        totals.pos_count += torch.bincount(pos_N, minlength=len(totals.pos_count))


def _ppl(mean_nll: float) -> float:
    if math.isnan(mean_nll):
        return math.nan  # a nan loss is not an infinite perplexity
    return math.exp(mean_nll) if mean_nll < 700 else math.inf  # exp overflows past ~709


def evaluate_stream(
    logits_fn: LogitsFn,
    stream: np.ndarray | torch.Tensor | Sequence[int],
    byte_lengths: np.ndarray | None,
    *,
    eval_len: int,
    mode: Mode = "nonoverlapping",
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    per_position: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity and bits per byte of a token stream under one protocol at one length ``L'``.

    Every token of the stream after the first (or of its first ``max_tokens + 1`` tokens) is
    predicted and scored exactly once, whatever the mode and stride (see the module docstring).

    Args:
        logits_fn: maps ``[B, T]`` int64 token ids (on the CPU) to ``[B, T, V]`` next-token logits
            on any device, in any float dtype; called under ``torch.inference_mode``.
        stream: 1-D token ids (e.g. from ``linbias.data.token_stream``; a memory map is fine).
        byte_lengths: UTF-8 bytes per token id (``linbias.data.token_byte_lengths``), or ``None``
            to skip bits per byte.
        eval_len: the window length ``L'``; the stream must hold at least ``L'`` targets.
        mode: ``"nonoverlapping"`` or ``"sliding"``.
        stride: the sliding stride ``S``, ``1 <= S <= L'``; required for ``sliding``, and must
            be ``None`` or ``L'`` for ``nonoverlapping``.
        batch_size: windows per forward (memory grows with ``batch_size * L' * V``).
        max_tokens: score only the first ``max_tokens`` targets (``None``: all).
        per_position: also return the mean NLL by position inside the window.
        progress: show a progress bar over windows.

    Returns:
        ``eval_len``, ``mode``, ``stride`` (the effective stride: ``eval_len`` for
        ``nonoverlapping``), ``ppl``, ``bpb`` (``None`` without ``byte_lengths``), ``nll`` (mean
        nats per scored token), ``tokens`` (scored tokens), ``bytes`` (their UTF-8 bytes, or
        ``None``), ``seconds``, and with ``per_position`` a list of ``L'`` mean NLLs (nats):
        entry ``j`` is over the predictions made after reading ``j + 1`` tokens of a window.

    Raises:
        ValueError: bad lengths, stride, mode or batch size; a stream with fewer than 2 tokens or
            fewer than ``L'`` targets; logits of the wrong shape.
    """
    check_int("eval_len", eval_len, 1)
    check_int("batch_size", batch_size, 1)
    step = resolve_stride(mode, eval_len, stride)
    array = _prepare_stream(stream, max_tokens, eval_len)
    if byte_lengths is not None and int(array.max()) >= len(byte_lengths):
        raise ValueError(
            f"token id {int(array.max())} has no entry in byte_lengths ({len(byte_lengths)} ids)"
        )
    windows = _windows(len(array) - 1, eval_len, step)
    totals = _Totals()
    if per_position:
        totals.pos_nll = torch.zeros(eval_len, dtype=torch.float64)
        totals.pos_count = torch.zeros(eval_len, dtype=torch.int64)
    bar = tqdm(total=len(windows.start_K), disable=not progress, unit="window", dynamic_ncols=True,
               desc=f"L'={eval_len} {mode}", leave=False)
    t0 = time.perf_counter()
    with bar, torch.inference_mode():
        for length in np.unique(windows.length_K):  # at most two lengths: full and the last cut
            (rows,) = np.nonzero(windows.length_K == length)
            for i in range(0, len(rows), batch_size):
                batch = rows[i : i + batch_size]
                _score_batch(logits_fn, array, windows.start_K[batch], windows.first_K[batch],
                             int(length), byte_lengths, totals)
                bar.update(len(batch))
    return _result(totals, eval_len, mode, step, time.perf_counter() - t0, byte_lengths is not None)


def _result(
    totals: _Totals, eval_len: int, mode: str, stride: int, seconds: float, with_bytes: bool
) -> dict[str, Any]:
    nll = totals.nll / totals.tokens
    out: dict[str, Any] = {
        "eval_len": eval_len,
        "mode": mode,
        "stride": stride,
        "ppl": _ppl(nll),
        "bpb": totals.nll / _LN2 / totals.bytes if with_bytes and totals.bytes else None,
        "nll": nll,
        "tokens": totals.tokens,
        "bytes": totals.bytes if with_bytes else None,
        "seconds": seconds,
    }
    if totals.pos_nll is not None and totals.pos_count is not None:
        out["per_position"] = (totals.pos_nll / totals.pos_count).tolist()
    return out


# --- runs ----------------------------------------------------------------------------------------


_LIST_FIELDS = ("lengths", "rules", "depths")


def eval_config(config: EvalConfig | None = None, **fields: Any) -> EvalConfig:
    """``config`` with ``fields`` replaced, or the ``EvalConfig`` of ``fields`` alone; a list-like
    (a numpy array, a range) is taken as the list of its values.

    Raises:
        ValueError: an unknown field (the valid ones named) or a bad value (from ``EvalConfig``).
    """
    fields = {k: list(v) if k in _LIST_FIELDS and _ordered(v) else v for k, v in fields.items()}
    base = {} if config is None else config.to_dict()
    if "task" in fields and fields["task"] != base.get("task"):
        # Another protocol than the config's: its fields of the old protocol do not carry over.
        old = PERPLEXITY_ONLY if fields["task"] is not None else TASK_ONLY
        base = {k: v for k, v in base.items() if k not in old}
    merged = EvalConfig.from_dict({**base, **fields})
    check_protocol(merged.task, [k for k, v in fields.items() if v is not None])
    return merged


def _ordered(values: Any) -> bool:
    """A list-like of values: a string or bytes would be read letter by letter, a set or dict in
    no fixed order, and an iterator would be used up by the checks."""
    return isinstance(values, Iterable) and not isinstance(
        values, (str, bytes, bytearray, Set, Mapping, Iterator)
    ) and not (isinstance(values, np.ndarray) and values.ndim != 1)


# --- one loop over lengths and rules, for any model -----------------------------------------------


class EvalModel(Protocol):
    """What the evaluation loops need of a model: a linbias run (``RunModel``) and a transformers
    model (``linbias.hf.HFModel``) are two adapters of it.

    Attributes:
        position: recorded as each record's ``position`` (a method name or a model family).
        train_len: the training length L the rules count from (``None`` if unknown).
        max_len: the longest window the model can represent (``None``: unbounded).
    """

    position: str
    train_len: int | None
    max_len: int | None

    def logits(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, V]`` next-token logits; ``mask_BT`` marks real tokens of left-padded rows."""
        ...

    def check_rules(self, rules: Sequence[str]) -> None:
        """ValueError for a rule the model cannot run, before any work."""
        ...

    def under(self, rule: str) -> AbstractContextManager[Any]:
        """The model with scaling ``rule`` for the duration of a ``with`` block."""
        ...

    def attention_maps(self, ids_BT: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's attention probabilities ``[B, H, T, T]`` for unpadded windows."""
        ...


class RunModel:
    """A linbias run as an ``EvalModel``. Left-padded rows get positions that start at 0 at their
    first real token, so padding changes nothing (``GPT.forward``)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.position: str = run.config.position
        self.train_len: int | None = run.config.train_len
        self.max_len: int | None = run.model.position.max_len
        self.vocab_size: int = run.config.vocab_size

    def logits(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        device = next(self.run.model.parameters()).device
        if mask_BT is None:
            return self.run.model(ids_BT.to(device))
        mask_BT = mask_BT.to(device)
        pos_BT = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
        return self.run.model(ids_BT.to(device), pos=pos_BT, key_padding_mask=mask_BT)

    def check_rules(self, rules: Sequence[str]) -> None:
        for rule in rules:
            with self.under(rule):  # the position method's own error for a rule it lacks
                pass

    @contextmanager
    def under(self, rule: str) -> Iterator[RunModel]:
        with self.run.model.scaled(rule):
            yield self

    def attention_maps(self, ids_BT: torch.Tensor) -> list[torch.Tensor]:
        # The fused kernels return no probabilities, but attending over identity values does:
        # P @ I = P, through each method's own attention path (its bias, rule and backend), D
        # columns of I at a time (values must be shaped like the keys).
        position, maps = self.run.model.position, []
        attend = position.attend

        def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
            S, D = k.shape[-2:]
            eye = torch.eye(S, -(-S // D) * D, dtype=v.dtype, device=v.device)
            cols = [attend(q, k, eye[:, c : c + D].expand_as(v), **kw)
                    for c in range(0, eye.shape[1], D)]
            maps.append(torch.cat(cols, dim=-1)[..., :S].float().cpu())
            return attend(q, k, v, **kw)

        position.attend = recording  # an instance attribute shadows the method for this call
        try:
            with torch.inference_mode():
                self.logits(ids_BT)
        finally:
            del position.attend
        return maps

    def answer_attention(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's attention probabilities ``[B, H, T]`` of the last query of each
        (left-padded) row: where the model looks as it writes the answer. Only that query is
        attended, over identity values (see ``attention_maps``), so a long prompt costs about
        ``T / D`` single-query steps per layer."""
        position, rows = self.run.model.position, []
        attend = position.attend

        def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
            S, D = k.shape[-2:]
            last = dict(kw)
            state = kw.get("state")
            if isinstance(state, torch.Tensor) and state.dim() == 3:  # T5's bias [H, T, S]
                last["state"] = state[:, -1:]
            eye = torch.eye(S, -(-S // D) * D, dtype=v.dtype, device=v.device)
            cols = [attend(q[..., -1:, :], k, eye[:, c : c + D].expand_as(v), **last)
                    for c in range(0, eye.shape[1], D)]
            rows.append(torch.cat(cols, dim=-1)[..., 0, :S].float().cpu())
            return attend(q, k, v, **kw)

        position.attend = recording  # an instance attribute shadows the method for this call
        try:
            with torch.inference_mode():
                self.logits(ids_BT, mask_BT)
        finally:
            del position.attend
        return rows


def skip_reason(model: EvalModel, eval_len: int, n_targets: int, where: str) -> str | None:
    """Why ``eval_len`` cannot be evaluated (``None`` if it can)."""
    if model.max_len is not None and eval_len > model.max_len:
        return (
            f"{model.position!r} cannot represent L'={eval_len}: its position table has "
            f"{model.max_len} positions and it cannot extrapolate past them"
        )
    if n_targets < eval_len:
        return f"eval_len={eval_len} needs at least {eval_len} scored tokens; {where} has {n_targets}"
    return None


def evaluate_model(
    model: EvalModel, stream: np.ndarray, byte_lengths: np.ndarray | None, config: EvalConfig,
    *, data: str, progress: bool = True,
) -> list[dict[str, Any]]:
    """``evaluate_stream`` at each length and rule of ``config``: the one loop behind
    ``evaluate_run`` and ``linbias.hf.evaluate_hf``.

    ``stream`` is ``config.split`` of corpus ``data``, as recorded. Records hold ``position``,
    ``scaling``, ``train_len``, ``data``, ``split``, ``skipped`` and ``evaluate_stream``'s keys.
    With several lengths, one that cannot be evaluated is skipped (numbers ``None``); with a
    single length it is an error.
    """
    _perplexity(config)
    model.check_rules(config.rules)
    c = config
    n_targets = len(stream) - 1 if c.max_tokens is None else min(len(stream) - 1, c.max_tokens)
    where = f"the {c.split} split of {data}" + (
        f" with max_tokens={c.max_tokens}" if c.max_tokens is not None else "")
    records = []
    for eval_len in c.lengths:
        reason = skip_reason(model, eval_len, n_targets, where)
        if reason is not None and len(c.lengths) == 1:
            raise ValueError(reason)
        if reason is None:
            check_fits(model, eval_len, 1)
        for rule in c.rules:
            first = {"position": model.position, "scaling": rule, "train_len": model.train_len,
                     "data": data, "split": c.split, "skipped": reason}
            if reason is not None:
                records.append({**first, **_skipped_record(eval_len, c)})
                continue
            with model.under(rule), fits_in_memory(eval_len):
                result = evaluate_stream(
                    model.logits, stream, byte_lengths, eval_len=eval_len, mode=c.mode,
                    stride=c.stride, batch_size=c.batch_size, max_tokens=c.max_tokens,
                    per_position=c.per_position, progress=progress,
                )
            records.append({**first, **result})
    return records


def _available_memory() -> int | None:
    """Bytes the kernel says a new allocation can take now (Linux), else ``None``."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(model: EvalModel, length: int, rows: int) -> None:
    """Refuse, before any work, a length whose logits alone (``rows x length x vocab`` floats)
    would not fit in the memory available now: a clear error instead of the allocator's (or the
    kernel's out-of-memory kill).

    Raises:
        MemoryError: naming the length, the estimate and the fix.
    """
    vocab, free = getattr(model, "vocab_size", None), _available_memory()
    if not vocab or free is None:
        return
    need = rows * length * int(vocab) * 4
    if need > free:
        raise MemoryError(f"length {length} needs at least {need / 2**30:.1f} GiB for its logits "
                          f"({rows} x {length} x {vocab} floats), more than the "
                          f"{free / 2**30:.1f} GiB available: evaluate shorter --lengths, or a "
                          "smaller --batch-size")


@contextmanager
def fits_in_memory(length: int) -> Iterator[None]:
    """Turn an allocation failure at length ``length`` into one clear error naming the fix."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and \
                "alloc" not in str(exc).lower():
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MemoryError(f"length {length} does not fit in this machine's memory ({first}); "
                          "evaluate shorter --lengths, or with a smaller --batch-size") from None


def _perplexity(config: EvalConfig) -> None:
    if config.task is not None:
        raise ValueError(f"task={config.task!r} asks for retrieval, not perplexity: use "
                         "evaluate_run_task (or evaluate_task, linbias.hf.evaluate_hf_task)")


def _retrieval(config: EvalConfig) -> str:
    require_task(config, {})
    return str(config.task)


def _run_model(run_or_path: Run | str | Path, device: str | torch.device | None,
               rules: Sequence[str]) -> RunModel:
    """The run as an ``EvalModel`` on ``device``, its rules checked before any corpus is read."""
    run = run_or_path if isinstance(run_or_path, Run) else load_run(run_or_path)
    if device is not None:
        run.model.to(device)
    model = RunModel(run)
    model.check_rules(rules)
    return model


def run_stream(run: Run, spec: str, split: str, cache_dir: str | Path | None) -> np.ndarray:
    """A split of corpus ``spec`` in the run's tokens; the run's own corpus must be unchanged
    since training, so that held-out text is still held out."""
    corpus = load_corpus(spec)
    if spec == run.train_config.data:
        corpus = check_corpus(run.path, run.corpus, corpus, run.split_rule)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return token_stream(corpus, run.tokenizer, split, cache)


def evaluate_run(
    run_or_path: Run | str | Path,
    config: EvalConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Perplexity of a trained run on a held-out split at each length and rule; with
    ``config.task``, retrieval accuracy instead (``evaluate_task``, with the run's tokenizer).

    Args:
        run_or_path: a ``Run`` or a run directory (loaded with ``linbias.runs.load_run``).
        config: what to measure (``EvalConfig``); ``data`` ``None`` is the run's own corpus,
            which must be unchanged since training so that held-out text is still held out.
        cache_dir: where token streams are cached (default ``linbias.data.default_cache_dir()``).
        device: where the model runs (default: where it is, the CPU after ``load_run``).
        progress: show progress bars.
        **fields: ``EvalConfig`` fields, replacing ``config``'s (or making one):
            ``evaluate_run(run, lengths=[128, 512], rules=["none", "linear"])``.

    Returns:
        With a task, ``evaluate_task``'s records; its passkey haystack is ``config.filler``
        (``"corpus"``: the valid split of the run's corpus; ``None``: the run's ``mix_filler``,
        what it was trained with). Otherwise one record per (length, rule), lengths outer: ``position``, ``scaling``, ``train_len``,
        ``data``, ``split``, ``skipped`` (``None``, or why the length was not evaluated) and the
        keys of ``evaluate_stream``. With several lengths, one the method cannot represent
        (``learned`` past its table) or the stream cannot fill is skipped: its numbers are ``None``.

    Raises:
        RunError: the run directory is unusable (from ``load_run``).
        ValueError: a bad config, or a rule the position method does not support; with a single
            length, a length that would be skipped.
    """
    config = eval_config(config, **fields)
    model = _run_model(run_or_path, device, config.rules)
    run = model.run
    if config.task is not None:
        filler_ids = None
        if (config.filler or run.train_config.mix_filler) == "corpus":
            filler_ids = run_stream(run, run.train_config.data, "valid", cache_dir)
        return evaluate_task(model, encoder(run.tokenizer), config, filler_ids=filler_ids,
                             progress=progress)
    spec = run.train_config.data if config.data is None else config.data
    stream = run_stream(run, spec, config.split, cache_dir)
    return evaluate_model(model, stream, token_byte_lengths(run.tokenizer), config, data=spec,
                          progress=progress)


def _skipped_record(eval_len: int, c: EvalConfig) -> dict[str, Any]:
    out = {"eval_len": eval_len, "mode": c.mode, "stride": eval_len if c.stride is None else c.stride,
           "ppl": None, "bpb": None, "nll": None, "tokens": 0, "bytes": None, "seconds": 0.0}
    return {**out, "per_position": None} if c.per_position else out


# --- retrieval: accuracy per (length, depth) cell -----------------------------------------------

def evaluate_task(
    model: EvalModel,
    encode: Encoder,
    config: EvalConfig,
    *,
    filler_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Retrieval accuracy of ``model`` on ``config.task`` at each length, needle depth and rule.

    Every rule sees the same prompts (a paired comparison): the trials of a cell are seeded by
    ``(seed, length, depth)``. A length the model cannot represent (``max_len``) is skipped.

    Args:
        model: an ``EvalModel`` (``RunModel``, ``linbias.hf.HFModel``).
        encode: the model's tokenizer as ``linbias.tasks.encoder(tokenizer)``.
        config: the task, lengths (prompt plus answer, in tokens), depths, trials, rules, seed and
            batch size (trials per forward, left-padded).
        filler_ids: ``passkey``: a token stream to cut the haystack from (default: the filler
            sentences).
        progress: a progress bar over cells.

    Returns:
        One record per (length, rule, depth): ``position``, ``scaling``, ``train_len``,
        ``filler``, ``skipped`` and ``linbias.tasks.cell_record``'s keys (``accuracy`` ``None``
        when skipped).
    """
    task, c = _retrieval(config), config
    model.check_rules(c.rules)
    head = {"position": model.position, "train_len": model.train_len,
            "filler": "sentences" if filler_ids is None else "corpus"}
    bar = tqdm(total=len(c.lengths) * len(c.depths) * len(c.rules), disable=not progress,
               unit="cell", dynamic_ncols=True, desc=task, leave=False)
    records = []
    with bar:
        for length in c.lengths:
            if not _beyond(model, length):
                check_fits(model, length, min(c.batch_size, c.trials))
            with fits_in_memory(length):
                cells = [] if _beyond(model, length) else [
                    (d, make_trials(task, encode, length, d, c.trials,
                                    cell_seed(c.seed, length, d), filler_ids)) for d in c.depths]
            for rule in c.rules:
                if not cells:
                    records += [{**head, "scaling": rule, **_skipped_cell(model, task, length, d)}
                                for d in c.depths]
                    bar.update(len(c.depths))
                    continue
                with model.under(rule), fits_in_memory(length):
                    for depth, cell in cells:
                        results = score(model.logits, cell, c.batch_size)
                        records.append({**head, "scaling": rule, "skipped": None,
                                        **cell_record(task, length, depth, results, cell)})
                        bar.update(1)
    return records


def needle_map(
    model: EvalModel,
    encode: Encoder,
    *,
    lengths: Sequence[int],
    distances: Sequence[int],
    trials: int = 10,
    rules: Sequence[str] = ("none",),
    seed: int = 0,
    batch_size: int = 8,
    heads: bool = True,
    instruction: str | int = "start",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Passkey accuracy over a grid of needle distance ``d`` (tokens from the needle's first
    token to the answer) and prompt length ``L'``, for each rule: it tells dilution (a near
    needle lost as ``L'`` grows) from reach (a needle farther than ``L`` lost at any ``L'``).

    With ``heads`` (a model with ``answer_attention``, e.g. ``RunModel``), each cell also holds,
    per layer and head, at the answer position (the last prompt token), the attention mass on the
    needle's tokens and the entropy of the attention (nats), averaged over its trials.

    Every rule sees the same prompts: a cell's trials are seeded by ``(seed, L', d)``. A cell
    whose distance does not fit in its length, or a length the model cannot represent, is
    recorded as skipped. ``instruction`` moves the task's instruction (``linbias.tasks.passkey``):
    a control for what else the model needs in view.

    Returns:
        One record per (length, rule, distance): ``position``, ``scaling``, ``train_len``,
        ``task`` (``"passkey"``), ``instruction``, ``length``, ``distance``, ``skipped``, ``n``,
        ``correct``, ``accuracy``, ``ci_low``, ``ci_high``, and with ``heads``
        ``needle_mass``, ``key_mass`` and ``entropy`` (``[layer][head]`` lists).
    """
    check_int("trials", trials, 1)
    check_int("batch_size", batch_size, 1)
    for d in distances:
        check_int("distance", d, 1)
    model.check_rules(rules)
    heads = heads and hasattr(model, "answer_attention")
    head = {"position": model.position, "train_len": model.train_len, "task": "passkey",
            "instruction": instruction}
    bar = tqdm(total=len(lengths) * len(distances) * len(rules), disable=not progress,
               unit="cell", dynamic_ncols=True, desc="needle map", leave=False)
    records = []
    with bar:
        for length in lengths:
            cells, skipped = [], {}
            for d in distances:
                if _beyond(model, length):
                    skipped[d] = skip_reason(model, length, length, "")
                    continue
                try:
                    cells.append((d, passkey(encode, length, 50.0, trials,
                                             cell_seed(seed, length, d), distance=d,
                                             instruction=instruction)))
                except ValueError as e:  # the distance does not fit in this length
                    skipped[d] = str(e)
            if cells:
                check_fits(model, length, min(batch_size, trials))
            for rule in rules:
                records += [{**head, "scaling": rule, "length": length, "distance": d,
                             "skipped": why, "n": 0, "correct": 0, "accuracy": None,
                             "ci_low": None, "ci_high": None} for d, why in skipped.items()]
                with model.under(rule), fits_in_memory(length):
                    for d, cell in cells:
                        ok = score(model.logits, cell, batch_size)
                        k = sum(ok)
                        low, high = wilson(k, len(ok))
                        r = {**head, "scaling": rule, "length": length, "distance": d,
                             "skipped": None, "n": len(ok), "correct": k, "accuracy": k / len(ok),
                             "ci_low": low, "ci_high": high}
                        if heads:
                            r.update(_needle_heads(model, cell, batch_size))
                        records.append(r)
                        bar.update(1)
                bar.update(len(skipped))
    return records


def _needle_heads(model: Any, trials: Sequence[Trial], batch_size: int) -> dict[str, Any]:
    """Mean over ``trials`` of each layer's and head's attention at the last prompt token: its
    mass on the needle's tokens, on the key's own tokens inside the needle (each place the
    answer's tokens occur there), and its entropy: ``{"needle_mass", "key_mass", "entropy"}``,
    each ``[layers][heads]``."""
    mass, key, entropy = 0.0, 0.0, 0.0
    for start in range(0, len(trials), batch_size):
        batch = trials[start : start + batch_size]
        T = max(len(t.prompt_ids) for t in batch)
        ids_BT = torch.zeros(len(batch), T, dtype=torch.long)
        mask_BT = torch.zeros(len(batch), T, dtype=torch.bool)
        needle_BT = torch.zeros(len(batch), T, dtype=torch.bool)
        key_BT = torch.zeros(len(batch), T, dtype=torch.bool)
        for b, t in enumerate(batch):
            pad = T - len(t.prompt_ids)
            ids_BT[b, pad:], mask_BT[b, pad:] = torch.tensor(t.prompt_ids), True
            a, n = t.needle_pos, len(t.answer_ids)
            needle_BT[b, pad + a : pad + a + t.needle_len] = True
            for i in range(a, a + t.needle_len - n + 1):
                if t.prompt_ids[i : i + n] == t.answer_ids:
                    key_BT[b, pad + i : pad + i + n] = True
        p_LBHT = torch.stack(model.answer_attention(ids_BT, mask_BT))
        mass = mass + (p_LBHT * needle_BT[None, :, None]).sum(-1).sum(1)  # [layers, H]
        key = key + (p_LBHT * key_BT[None, :, None]).sum(-1).sum(1)
        plogp = torch.where(p_LBHT > 0, p_LBHT * p_LBHT.clamp_min(1e-38).log(), 0.0)
        entropy = entropy + (-plogp.sum(-1)).sum(1)
    n = len(trials)
    return {"needle_mass": (mass / n).tolist(), "key_mass": (key / n).tolist(),
            "entropy": (entropy / n).tolist()}


def _beyond(model: EvalModel, length: int) -> bool:
    return model.max_len is not None and length > model.max_len


def cell_seed(seed: int, length: int, depth: float) -> int:
    """One seed per cell, so that adding a length or a depth changes no other cell's trials."""
    return int(np.random.SeedSequence([seed, length, round(depth * 1000)]).generate_state(1)[0])


def _skipped_cell(model: EvalModel, task: str, length: int, depth: float) -> dict[str, Any]:
    reason = skip_reason(model, length, length, "")
    return {"skipped": reason, "task": task, "length": length, "depth": float(depth), "n": 0,
            "correct": 0, "accuracy": None, "ci_low": None, "ci_high": None,
            "mean_distance": None}


def merge_cells(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of the same (position, scaling, task, length, depth) cell pooled, e.g. over seeds:
    trials and correct answers summed, accuracy and its Wilson interval recomputed."""
    pooled: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r["position"], r["scaling"], r["task"], r["length"], r["depth"])
        if key not in pooled:
            pooled[key] = {k: v for k, v in r.items() if k != "seed"}
            continue
        cell = pooled[key]
        if r["skipped"] or cell["skipped"]:
            continue  # a length the method cannot represent is skipped for every seed
        n = cell["n"] + r["n"]
        cell["mean_distance"] = (cell["mean_distance"] * cell["n"] + r["mean_distance"] * r["n"]) / n
        cell["n"], cell["correct"] = n, cell["correct"] + r["correct"]
        cell["accuracy"] = cell["correct"] / n
        cell["ci_low"], cell["ci_high"] = wilson(cell["correct"], n)
    return list(pooled.values())


def retrieval_summary(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (position, rule): accuracy at each length and Chen et al.'s ``k_max``.

    Returns:
        One dict per (position, scaling), in first-seen order: ``k_max`` over all its cells (each
        cell's distance is its mean needle distance), and ``by_length``, a list of ``{"length",
        "accuracy" (pooled over depths), "k_max" (of that length's cells)}``, both ``None`` where
        the length was skipped.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["position"], r["scaling"]), []).append(r)
    out = []
    for (position, rule), rows in groups.items():
        done = [r for r in rows if not r["skipped"]]
        by_length = []
        for n in sorted({r["length"] for r in rows}):
            cells = [r for r in done if r["length"] == n]
            by_length.append({
                "length": n,
                "accuracy": sum(r["correct"] for r in cells) / sum(r["n"] for r in cells)
                if cells else None,
                "k_max": k_max(_distances(cells)) if cells else None,
            })
        out.append({"position": position, "scaling": rule,
                    "k_max": k_max(_distances(done)) if done else None, "by_length": by_length})
    return out


def _distances(cells: Sequence[dict[str, Any]]) -> list[tuple[int, int, int]]:
    return [(round(r["mean_distance"]), r["correct"], r["n"]) for r in cells]


# --- where the model looks: the attention-distance profile ---------------------------------------

PROFILE_DISTANCES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # multiples of L


def attention_profile(
    model: EvalModel,
    windows_KT: torch.Tensor,
    *,
    rules: Sequence[str] = ("none",),
    distances: Sequence[float] = PROFILE_DISTANCES,
) -> list[dict[str, Any]]:
    """The receptive field: each head's share of attention mass beyond distance ``d``.

    For every rule, layer and head, the attention probabilities of the windows (``[K, T]`` token
    ids, e.g. ``T = 4L``) are summed over keys more than ``d`` tokens behind the query, and averaged
    over the windows and over the queries of the second half of each window (those that can look
    ``T/2`` back). ``d`` is each of ``distances`` times L (Chi et al. 2022 read ALiBi's heads at
    long distance as windowed attention: their share beyond L is near 0).

    Returns:
        One record per (rule, layer, head, distance): ``position``, ``scaling``, ``train_len``,
        ``eval_len`` (T), ``layer``, ``head``, ``distance`` (tokens), ``share``.
    """
    model.check_rules(rules)
    if model.train_len is None:
        raise ValueError("the attention profile counts distances in multiples of L: the model "
                         "needs a train_len")
    T = windows_KT.shape[-1]
    if _beyond(model, T):
        raise ValueError(skip_reason(model, T, T, ""))
    i_T1 = torch.arange(T)[:, None]
    gap_TT = i_T1 - torch.arange(T)[None, :]  # query i minus key j
    records = []
    for rule in rules:
        with model.under(rule):
            maps = model.attention_maps(windows_KT)
        for layer, p_KHTT in enumerate(maps):
            late_KHQT = p_KHTT[:, :, T // 2 :, :]
            for d in distances:
                far = (gap_TT[T // 2 :] > d * model.train_len).to(late_KHQT.dtype)
                share_H = (late_KHQT * far).sum(-1).mean(dim=(0, 2))
                records += [{"position": model.position, "scaling": rule,
                             "train_len": model.train_len, "eval_len": T, "layer": layer,
                             "head": h, "distance": round(d * model.train_len),
                             "share": float(share_H[h])} for h in range(len(share_H))]
    return records


def evaluate_run_task(run_or_path: Run | str | Path, config: EvalConfig | None = None,
                      **kwargs: Any) -> list[dict[str, Any]]:
    """``evaluate_run`` for a retrieval task, which ``config`` or ``task=`` must name."""
    require_task(config, kwargs)
    return evaluate_run(run_or_path, config, **kwargs)


def require_task(config: EvalConfig | None, fields: dict[str, Any]) -> None:
    """Refuse a retrieval call whose ``config`` and ``fields`` name no task."""
    if (config is None or config.task is None) and fields.get("task") is None:
        raise ValueError("retrieval needs a task: give task='passkey' or task='lines'")


# --- output --------------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def json_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record with each non-finite number as ``None``, its key listed in ``non_finite``: what
    JSON can hold (it has no NaN or Infinity)."""
    out: dict[str, Any] = {}
    non_finite = []
    for key, value in record.items():
        if isinstance(value, list):  # per_position
            bad = not all(map(_finite, value))
            out[key] = [v if _finite(v) else None for v in value] if bad else value
        else:
            bad = not _finite(value)
            out[key] = None if bad else value
        if bad:
            non_finite.append(key)
    return {**out, "non_finite": non_finite} if non_finite else out


# The stamp of an eval --json file: another is replaced only over a file carrying it.
EVAL_JSON = "linbias eval --json"


def _earlier_eval_json(path: Path) -> bool:
    """A results file of an eval from before files were stamped: ``{"results": [records]}``."""
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and set(obj) == {"results"} and isinstance(obj["results"], list) \
        and all(isinstance(r, dict) and "scaling" in r for r in obj["results"])


def write_json(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Deprecated: ``write_results(path, records)`` (path first, as every writer takes it)."""
    warnings.warn("linbias.evaluate.write_json(records, path) is now write_results(path, "
                  "records); the old name goes in the next release", DeprecationWarning,
                  stacklevel=2)
    write_results(path, records)


def check_results_path(path: str | Path, *, force: bool = False) -> None:
    """Check, before an evaluation that may take hours, that ``write_results`` may write ``path``:
    nothing there, or an earlier eval's results; any file only with ``force`` (``fileio.check_output``).

    Raises:
        OutputError: naming what is in the way and the fix.
    """
    check_output(path, EVAL_JSON, force=force, flag="--json", legacy=_earlier_eval_json)


def write_results(path: str | Path, records: Sequence[dict[str, Any]], *,
                  force: bool = False) -> None:
    """Write ``{"results": records, "written_by": "linbias eval --json"}`` to ``path`` as strict
    JSON, atomically (``fileio.write_json``).

    JSON has no NaN or Infinity, so a non-finite number (a diverged model's loss, a perplexity past
    the float range) is written as ``null`` and its key listed in the record's ``"non_finite"``.

    Raises:
        OutputError: ``path`` may not be written (``check_results_path``).
    """
    check_results_path(path, force=force)
    try:
        fileio.write_json(Path(path), {"results": [json_record(dict(r)) for r in records],
                                       "written_by": EVAL_JSON})
    except OSError as e:
        raise OutputError(f"cannot write the results to {path} ({e}); choose another path") from e
