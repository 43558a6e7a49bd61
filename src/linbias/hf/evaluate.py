"""``evaluate_hf``, ``evaluate_hf_task`` and ``HFModel``: any transformers causal LM scored with
``linbias.evaluate``'s protocols, the ALiBi families also under each scaling rule (``extended``).
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Sequence
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from linbias.alibi import check_rule
from linbias.config import check_int
from linbias.data import default_cache_dir, load_corpus, token_byte_lengths, token_stream
from linbias.config import EvalConfig
from linbias.evaluate import eval_config, evaluate_model, evaluate_task, require_task
from linbias.hf.extend import extended, family_of
from linbias.tasks import encoder

__all__ = ["HFModel", "evaluate_hf", "evaluate_hf_task"]


def evaluate_hf(
    model_or_path: PreTrainedModel | str | Path,
    config: EvalConfig | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    train_len: int | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Evaluate a transformers causal LM on a linbias corpus at several lengths and scaling rules;
    with ``config.task``, its retrieval accuracy instead: ``linbias.evaluate.evaluate_task`` with
    plain prompts in the model's own tokenizer (no special tokens, no chat template), batched with
    left padding, the haystack being the filler sentences.

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
        config: what to measure (``linbias.config.EvalConfig``); ``data`` ``None`` is
            ``stdlib``.
        tokenizer: the model's tokenizer; default: ``AutoTokenizer`` from the same place (for a
            loaded model, its ``name_or_path``).
        train_len: the training length L for the scaling rules; default as ``extend_context``
            (MPT: ``max_seq_len``; Falcon: ``max_position_embeddings``; BLOOM: required).
        cache_dir: token-stream cache; default ``linbias.data.default_cache_dir()``.
        device: move the model there first (default: where it is).
        progress: show progress bars.
        **fields: ``EvalConfig`` fields, replacing ``config``'s (as for ``evaluate_run``).

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
    config = eval_config(config, **fields)
    if config.filler not in (None, "sentences"):
        raise ValueError("filler='corpus' cuts the haystack from a run's corpus; a transformers "
                         "model uses the filler sentences: drop it")
    model, tokenizer = _load_hf(model_or_path, tokenizer)
    adapter = HFModel(model, train_len)
    adapter.check_rules(config.rules)
    if config.task is not None:
        with _evaluating(model, device):
            return evaluate_task(adapter, encoder(tokenizer), config, progress=progress)
    backend, eos = _fast_backend(tokenizer)
    data = config.data or "stdlib"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stream = token_stream(load_corpus(data), backend, config.split, cache, eot=eos)
    with _evaluating(model, device):
        return evaluate_model(adapter, stream, _hf_byte_lengths(backend), config, data=data,
                              progress=progress)


@contextmanager
def _evaluating(model: PreTrainedModel, device: str | torch.device | None) -> Iterator[None]:
    """The model on ``device`` in eval mode, then back in the mode it was in."""
    if device is not None:
        model.to(device)
    training = model.training
    model.eval()
    try:
        yield
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
        try:
            self._family = family_of(model)
        except ValueError as exc:
            self.position, self._not_alibi, self._family = model.config.model_type, exc, None
        else:
            self.position, self._not_alibi = self._family.name, None
            if train_len is None and self.position != "bloom":
                train_len = self._family.default_train_len(model.config)
        if train_len is not None:
            check_int("train_len", train_len)
        self.train_len = train_len
        self.max_len = None if self._not_alibi is None else _position_table_rows(model)
        # For evaluate.check_fits: a length whose logits cannot fit is refused before any work.
        self.vocab_size: int | None = getattr(model.config, "vocab_size", None)
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
        with torch.inference_mode(), warnings.catch_warnings():
            # Probabilities are what is asked for: the family's own attention is the point here.
            warnings.filterwarnings("ignore", message="linbias attention cannot return attention")
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
                self._family.default_train_len(self.model.config)  # BLOOM: asks for it

    def under(self, rule: str) -> AbstractContextManager:
        """The model under ``rule``: as it is for ``"none"``, except MPT (see ``evaluate_hf``)."""
        if rule == "none" and self.position != "mpt":
            return nullcontext(self.model)
        return extended(self.model, self.train_len, rule)


def evaluate_hf_task(model_or_path: PreTrainedModel | str | Path,
                     config: EvalConfig | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """``evaluate_hf`` for a retrieval task, which ``config`` or ``task=`` must name."""
    require_task(config, kwargs)
    return evaluate_hf(model_or_path, config, **kwargs)


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
