"""lm-eval's model ``linbias``: a linbias run or a transformers causal LM at a chosen length L'.

``LinbiasLM`` is a ``TemplateLM`` (lm-eval's base for tokenizer-based models, as ``HFLM`` is) over
one small backend interface, so a run and its transformers export go through the same request
code and give the same answers:

- ``logits(ids_BT, mask_BT)``: next-token logits of left-padded rows, no cache (scoring);
- ``step(ids_BT, mask_BS, cache)``: the logits of ``T`` new tokens appended to ``cache`` (``None``
  starts one), ``mask_BS`` covering cached plus new tokens: generation with a KV cache.

A run (``_RunBackend``) is ``linbias.model.GPT`` with its rule set; a transformers model
(``_HFBackend``) is loaded with ``AutoModelForCausalLM`` and, for the ALiBi families, extended
with ``linbias.hf.extend_context`` under the rule (also for ``"none"``: MPT cannot run past its
``max_seq_len`` otherwise, and past L the extension's attention builds no L' x L' tensor). In both,
L' is counted per row over its real tokens, cache included, so during generation the slopes
shrink as the text grows, and a cached token keeps the hidden states of its own length (see
``linbias.hf``): generation is the cached kind, not a recomputation per token.

Why not ``HFLM`` itself: it needs ``lm-eval[hf]`` (accelerate, peft), takes only a
``PreTrainedModel``, and a run is not one; its request logic is mirrored here instead: contexts are
cut on the left to fit L' (``generate_until``: L' minus ``max_gen_toks``), ``loglikelihood_rolling``
uses lm-eval's rolling windows of L' tokens, and stop sequences cut the generated text as HFLM
cuts it.

Shape suffixes: B rows, T new tokens, S cached plus new tokens, V vocabulary.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from linbias.harness import require_harness

require_harness()

from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import model_registry  # noqa: E402
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs  # noqa: E402

__all__ = ["LinbiasLM"]

Tensor = torch.Tensor
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k"}


class _RunBackend:
    """A linbias run: ``GPT`` forwards, its ``KVCache`` for generation."""

    def __init__(self, path: str, rule: str, device: torch.device, dtype: torch.dtype | None,
                 train_len: int | None) -> None:
        from linbias.data import EOT
        from linbias.runs import load_run

        if train_len is not None:
            raise ValueError("train_len applies to pretrained= models; a run has its own "
                             "(config.json): drop train_len")
        run = load_run(path)
        run.model.set_rule(rule)  # the position method's error lists its rules
        self.model = run.model.to(device=device, dtype=dtype)
        self.train_len: int | None = run.config.train_len
        self.max_len: int | None = run.model.position.max_len
        self.name = str(path)
        tok = run.tokenizer
        self.eot_token_id: int = tok.token_to_id(EOT)
        self.encode: Callable[[str], list[int]] = lambda s: tok.encode(
            s, add_special_tokens=False).ids
        self.decode: Callable[[Sequence[int]], str] = lambda ids: tok.decode(list(ids))

    def logits(self, ids_BT: Tensor, mask_BT: Tensor) -> Tensor:
        return self.step(ids_BT, mask_BT, None, cached=False)[0]

    def step(self, ids_BT: Tensor, mask_BS: Tensor, cache: Any,
             cached: bool = True) -> tuple[Tensor, Any]:
        if cached and cache is None:
            cache = self.model.new_cache()
        if bool(mask_BS.all()):  # no padding: the model's default positions, its unmasked path
            return self.model(ids_BT, cache=cache), cache
        # Absolute positions start at 0 at each row's first real token (they matter to the
        # methods with position embeddings; ALiBi reads only the mask).
        pos_BT = (mask_BS.long().cumsum(-1) - 1).clamp(min=0)[:, -ids_BT.shape[1]:]
        return self.model(ids_BT, pos=pos_BT, cache=cache, key_padding_mask=mask_BS), cache


class _HFBackend:
    """A transformers causal LM; the ALiBi families extended under the rule."""

    def __init__(self, source: str, rule: str, device: torch.device, dtype: torch.dtype | None,
                 train_len: int | None, tokenizer: str | None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from linbias.hf import FAMILIES, HFModel, extend_context

        model = _load(AutoModelForCausalLM, source, "model",
                      **({} if dtype is None else {"dtype": dtype}))
        tok = _load(AutoTokenizer, tokenizer or source, "tokenizer")
        adapter = HFModel(model, train_len)
        adapter.check_rules([rule])  # a rule on a model without ALiBi, BLOOM without train_len
        if adapter.position in FAMILIES:
            extend_context(model, adapter.train_len, rule)
        self.model = model.to(device).eval()
        self.train_len, self.max_len = adapter.train_len, adapter.max_len
        self.name = source
        if tok.eos_token_id is None:
            raise ValueError(f"the tokenizer of {source} has no eos token, which generation and "
                             "rolling windows need: pass tokenizer= one that has")
        self.eot_token_id = int(tok.eos_token_id)
        self.encode = lambda s: tok.encode(s, add_special_tokens=False)
        self.decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def logits(self, ids_BT: Tensor, mask_BT: Tensor) -> Tensor:
        return self.model(**self._inputs(ids_BT, mask_BT), use_cache=False).logits

    def step(self, ids_BT: Tensor, mask_BS: Tensor, cache: Any) -> tuple[Tensor, Any]:
        extra = {} if cache is None else {"past_key_values": cache}
        out = self.model(**self._inputs(ids_BT, mask_BS), use_cache=True, **extra)
        return out.logits, out.past_key_values

    def _inputs(self, ids_BT: Tensor, mask_BS: Tensor) -> dict[str, Tensor]:
        inputs = {"input_ids": ids_BT, "attention_mask": mask_BS.long()}
        if self._takes_positions:
            pos_BS = (mask_BS.long().cumsum(-1) - 1).clamp(min=0)
            inputs["position_ids"] = pos_BS[:, -ids_BT.shape[1]:]
        return inputs


def _load(cls: Any, source: str, what: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a transformers {what} from {source!r} (a local "
                         f"directory, e.g. from 'linbias export', or a Hub name): {exc}") from exc


class LinbiasLM(TemplateLM):
    """A linbias run or a transformers causal LM for lm-eval, at length L' under a scaling rule.

    lm-eval builds it from ``--model_args`` (``run=PATH,rule=linear,max_length=N`` or
    ``pretrained=PATH_OR_NAME,train_len=L,rule=...,max_length=N``).

    Args:
        run: a run directory written by ``linbias train`` (or give ``pretrained``).
        pretrained: a transformers causal LM, a local directory or a Hub name.
        train_len: ``pretrained`` only: its training length L (default: MPT ``max_seq_len``,
            Falcon ``max_position_embeddings``; BLOOM needs it when the rule is not ``"none"``).
        rule: a scaling rule of ``linbias.alibi.SCALING_RULES`` (``"none"``: the paper's slopes).
        max_length: L', the longest input the model sees: contexts are cut on the left to fit
            (default: the training length).
        batch_size: requests per forward (left-padded).
        max_batch_size: accepted because lm-eval's command line always passes it; unused.
        device: where the model runs (default: ``cuda`` if available, else ``cpu``).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (default: as loaded).
        tokenizer: ``pretrained`` only: a tokenizer to load instead of the model's.
        max_gen_toks: ``generate_until``'s default number of new tokens.
        seed: seeds sampling when a task asks for ``do_sample``.

    Raises:
        ValueError: neither or both of ``run`` and ``pretrained``, an unknown rule or dtype, a
            ``max_length`` past what the model can represent, an unusable model path.
    """

    def __init__(
        self, run: str | None = None, pretrained: str | None = None, *,
        train_len: int | None = None, rule: str = "none", max_length: int | None = None,
        batch_size: int | str = 1, max_batch_size: int | None = None,
        device: str | None = None, dtype: str | None = None, tokenizer: str | None = None,
        max_gen_toks: int = 256, seed: int = 1234,
    ) -> None:
        super().__init__()
        if (run is None) == (pretrained is None):
            raise ValueError("give the linbias model run=PATH (a linbias run) or pretrained="
                             "PATH_OR_NAME (a transformers model), one of them")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = None if dtype is None else _DTYPES[dtype]
        if run is not None:
            if tokenizer is not None:
                raise ValueError("tokenizer= applies to pretrained= models; a run has its own")
            self.backend: _RunBackend | _HFBackend = _RunBackend(
                str(run), rule, self._device, torch_dtype, train_len)
        else:
            self.backend = _HFBackend(str(pretrained), rule, self._device, torch_dtype, train_len,
                                      tokenizer)
        self.rule = rule
        self._max_length = _check_length(max_length, self.backend)
        self._batch_size = _positive("batch_size", batch_size)
        self._max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        self._generator = torch.Generator(device=self._device).manual_seed(int(seed))

    # --- what lm-eval reads -----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.backend.eot_token_id

    @property
    def max_length(self) -> int:
        """L': contexts are cut on the left to fit it."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.backend.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string``, no special tokens (none of these tokenizers adds a BOS)."""
        return self.backend.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.backend.decode(tokens)

    # --- loglikelihood ------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` per request: the last L' + 1 tokens of
        context plus continuation, one forward per batch of similar lengths."""
        inputs = []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored "
                                 f"within max_length={self.max_length}")
            inputs.append((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with torch.inference_mode():
            for batch in self._batches([len(x) for x in inputs]):
                ids_BT, mask_BT = self._left_pad([inputs[i] for i in batch])
                logp_BTV = F.log_softmax(self.backend.logits(ids_BT, mask_BT).float(), dim=-1)
                for b, i in enumerate(batch):
                    cont = torch.tensor(requests[i][2], device=logp_BTV.device)
                    logp_NV = logp_BTV[b, -len(cont):]
                    answer = (float(logp_NV.gather(-1, cont[:, None]).sum()),
                              bool((logp_NV.argmax(-1) == cont).all()))
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's rolling windows of L' tokens."""
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window,
                                             lm_utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(text),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[r] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations until a stop sequence (or the eos token, or ``max_gen_toks``), decoded
        with the KV cache; requests with the same generation settings share batches."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        for members in groups.values():
            settings = self._gen_settings(requests[members[0]].args[1])
            budget = self.max_length - settings["max_gen_toks"]
            if budget < 1:
                raise ValueError(f"max_gen_toks={settings['max_gen_toks']} leaves no room for a "
                                 f"prompt within max_length={self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in members]
            for batch in self._batches([len(p) for p in prompts]):
                texts = self._generate([prompts[j] for j in batch], **settings)
                for j, text in zip(batch, texts):
                    out[members[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[members[j]].args, text)
        return out

    def _gen_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        unknown = set(kwargs) - _GEN_KEYS
        if unknown:
            raise ValueError(f"linbias generation does not take {', '.join(sorted(unknown))}; "
                             f"it takes {', '.join(sorted(_GEN_KEYS))}")
        eos = self.tok_decode([self.eot_token_id]) or None
        return {"until": handle_stop_sequences(kwargs["until"], eos),
                "max_gen_toks": _positive("max_gen_toks", kwargs["max_gen_toks"]),
                "temperature": float(kwargs["temperature"]) if kwargs["do_sample"] else 0.0,
                "top_k": kwargs.get("top_k")}

    def _generate(self, prompts: list[list[int]], *, until: list[str], max_gen_toks: int,
                  temperature: float, top_k: int | None) -> list[str]:
        """One batch: prefill, then one cached step per token until every row has stopped."""
        ids_BT, mask_BS = self._left_pad(prompts)
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        with torch.inference_mode():
            logits_BTV, cache = self.backend.step(ids_BT, mask_BS, None)
            for step in range(max_gen_toks):
                tok_B1 = _next_token(logits_BTV[:, -1], temperature, top_k, self._generator)
                for b, tok in enumerate(tok_B1[:, 0].tolist()):
                    if done[b]:
                        continue
                    if tok == self.eot_token_id:
                        done[b] = True
                        continue
                    new[b].append(tok)
                    done[b] = any(s and s in self.tok_decode(new[b]) for s in until)
                if all(done) or step + 1 == max_gen_toks:
                    break
                mask_BS = torch.cat([mask_BS, mask_BS.new_ones(len(prompts), 1)], dim=1)
                logits_BTV, cache = self.backend.step(tok_B1, mask_BS, cache)
        return [_cut(self.tok_decode(ids), until) for ids in new]

    # --- batching -----------------------------------------------------------------------------

    def _batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """Indices in batches of ``batch_size``, longest first (little padding per batch)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def _left_pad(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        """``[B, T]`` ids left-padded with the eot token and the mask of real tokens."""
        T = max(map(len, rows))
        ids_BT = torch.full((len(rows), T), self.eot_token_id, dtype=torch.long)
        mask_BT = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, row in enumerate(rows):
            ids_BT[b, T - len(row):], mask_BT[b, T - len(row):] = torch.tensor(row), True
        return ids_BT.to(self._device), mask_BT.to(self._device)


def _next_token(logits_BV: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator) -> Tensor:
    """``[B, 1]``: the argmax, or a sample at ``temperature`` among the ``top_k`` likeliest."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits_BV, min(int(top_k), logits_BV.shape[-1])).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits_BV, dim=-1), 1, generator=generator)


def _cut(text: str, until: list[str]) -> str:
    """The text before the first stop sequence (as HFLM cuts it)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _positive(name: str, value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_length(max_length: int | None, backend: _RunBackend | _HFBackend) -> int:
    if max_length is None:
        max_length = backend.train_len or backend.max_len
        if max_length is None:
            raise ValueError("the model records no training length: give max_length=N (L')")
    max_length = _positive("max_length", max_length)
    if backend.max_len is not None and max_length > backend.max_len:
        raise ValueError(f"max_length={max_length} is past the {backend.max_len} positions this "
                         f"model can represent: use max_length <= {backend.max_len}")
    return max_length


if "linbias" not in model_registry:  # plugin.py may have registered it lazily already
    model_registry.register("linbias", target=LinbiasLM)
