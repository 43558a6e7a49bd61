"""Retrieval tasks: does a model *use* the context past its training length?

Perplexity past ``L`` is not retrieval (ALiBi's stays flat while it attends like a sliding window,
Chi et al. 2022). These exact-match tasks plant one fact at a chosen depth of a prompt whose length
in tokens is exact, and ask for it at the end:

* ``passkey`` (Mohtashami and Jaggi 2023, "Landmark Attention", arXiv 2305.16300; as used by Chen
  et al. 2023, "Extending Context Window ... via Positional Interpolation", arXiv 2306.15595):
  filler sentences, or a slice of a real token stream ("a needle in a real haystack"), with "The
  pass key is K. Remember it. K is the pass key." at the depth, then "What is the pass key? The
  pass key is" -> " K".
* ``lines`` (LongEval line retrieval, LongChat, Li et al. 2023): lines "line <name>:
  REGISTER_CONTENT is <n>", then a question about the line at the depth -> " <n>".

Prompts are built in token space from separately encoded segments, each cut just before a space,
so for a GPT-2 style byte-level BPE (whose pre-tokens start at a space) the concatenation is the
encoding of the whole text. To make the length exact, the filler is one encoded token sequence,
repeated and cut at a token boundary to the count that is left. ``lines`` puts those filler tokens
between the instruction and the first line, so the lines run unbroken up to the question and the
depth is measured over the lines alone.

A seed fixes every trial (``random.Random(seed)``, never global state); trials of one call have
different answers. ``score`` is one teacher-forced forward per batch: an answer is right iff the
argmax at each of its positions is its token, which is exactly greedy decoding of it. ``k_max`` is
Chen et al.'s effective context window, ``wilson`` the interval of a cell's accuracy.

Shape suffixes: ``B`` trials in a batch, ``T`` tokens (left-padded), ``V`` vocabulary, ``N``
answer tokens of a batch.
"""

from __future__ import annotations

import math
import numbers
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import tokenizers
import torch

from linbias.checks import check_int
from linbias.deprecation import moved

__all__ = [
    "FILLER", "LINES_INSTRUCTION", "LINE_WORDS", "PASSKEY_INSTRUCTION", "PASSKEY_QUESTION", "TASKS",
    "Encoder", "TaskMix", "Trial", "cell_record", "encoder", "k_max", "lines", "make_trials",
    "passkey", "score", "wilson",
]

# Tables and plots live in linbias.report.
__getattr__ = moved(__name__, dict.fromkeys(("accuracy_table", "plot_heatmaps"), "linbias.report"))

Encode = Callable[[str], list[int]]
Decode = Callable[[Sequence[int]], str]
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Record = dict[str, Any]

PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go."
          " There and back again.")
PASSKEY_QUESTION = " What is the pass key? The pass key is"
LINES_INSTRUCTION = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <name>' and "
    "ends with a REGISTER_CONTENT, a number. At the end of the record, I will ask you for the "
    "REGISTER_CONTENT of one line. Now the record starts:"
)
# No word contains another, so "line <name>:" names exactly one line. 40 words: 1560 names.
LINE_WORDS = (
    "amber", "birch", "cedar", "delta", "ember", "falcon", "granite", "harbor", "indigo", "juniper",
    "kestrel", "lantern", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron",
    "timber", "velvet", "willow", "yonder", "zephyr", "anchor", "bramble", "copper", "dune",
    "fjord", "glacier", "hazel", "ivory", "jasper", "kelp", "lotus", "marble", "nimbus", "oasis",
    "prairie", "rustic",
)
_NAMES = [f"{a}-{b}" for a in LINE_WORDS for b in LINE_WORDS if a != b]
_KEYS = range(10000, 100000)  # 5-digit numbers
_MAX_DRAWS = 100


@dataclass(frozen=True)
class Trial:
    """One prompt and its answer; ``len(prompt_ids) + len(answer_ids)`` is the requested length."""

    prompt_ids: tuple[int, ...]  # everything before the answer
    answer_ids: tuple[int, ...]  # the answer's tokens, encoded with its leading space
    answer: str  # e.g. "71432"
    depth: float  # requested depth, percent
    needle_pos: int  # token index where the needle starts in prompt_ids
    distance: int  # len(prompt_ids) - needle_pos
    needle_len: int = 0  # the needle's tokens (passkey: the key sentences; lines: the line)


# --- tokenizers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoder:
    """``text -> token ids`` without special tokens, carrying the tokenizer's ``decode``, which the
    tasks use to check that the digits of a key round-trip."""

    encode: Encode
    decode: Decode

    def __call__(self, text: str) -> list[int]:
        return list(self.encode(text))


def encoder(tokenizer: Any) -> Encoder:
    """The ``encode`` callable the tasks take, for either kind of tokenizer.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (``encode(text).ids``) or a transformers tokenizer
            (``encode(text, add_special_tokens=False)``).

    Returns:
        An ``Encoder``: call it on text for ids without special tokens; ``.decode(ids)`` is text.

    Raises:
        TypeError: any other object (the message names the two supported kinds).
    """
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return Encoder(lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                       lambda ids: tokenizer.decode(list(ids)))
    transformers = sys.modules.get("transformers")  # holding its tokenizer means it is imported
    if transformers is not None and isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        return Encoder(lambda text: tokenizer.encode(text, add_special_tokens=False),
                       lambda ids: tokenizer.decode(list(ids)))
    raise TypeError(
        f"cannot encode with a {type(tokenizer).__name__}; supported: a tokenizers.Tokenizer or a "
        "transformers tokenizer (PreTrainedTokenizerBase), or pass your own encode(text) -> ids"
    )


def _check_digits(encode: Encode, decode: Decode | None) -> None:
    """Fail before building trials if the tokenizer cannot write a key.

    With ``decode``, " 0123456789" must decode back to its digits (whitespace ignored: word-level
    decoders join tokens with spaces); an unknown-token id decodes to "[UNK]" or to nothing. Without
    it, " 00000" .. " 99999" must encode to ten distinct, non-empty sequences: that catches digits
    mapped to one unknown id, not a single missing digit, so give ``decode`` for the strict check.
    """
    if decode is not None:
        _answer_ids(encode, decode, "0123456789")
        return
    probes = [tuple(encode(f" {d * 5}")) for d in "0123456789"]
    if not all(probes) or len(set(probes)) < 10:
        raise ValueError(_digits_message("00000 .. 99999", "the same token ids"))


def _answer_ids(encode: Encode, decode: Decode | None, answer: str) -> list[int]:
    ids = encode(f" {answer}")
    decoded = None if decode is None or not ids else "".join(decode(ids).split())
    if not ids or (decode is not None and decoded != answer):
        raise ValueError(_digits_message(answer, f"ids {ids} (decoded: {decoded!r})"))
    return ids


def _digits_message(text: str, got: str) -> str:
    return (f"the tokenizer cannot encode the digits of the keys: ' {text}' gives {got} (an "
            "unknown token?); use a tokenizer that covers 0-9, e.g. a byte-level BPE")


# --- tasks ---------------------------------------------------------------------------------------


def _prepare(encode: Encode, decode: Decode | None, length: int, depth: float, n: int,
             seed: int) -> Decode | None:
    """The checks every task runs first; returns ``decode``, by default ``encode.decode``."""
    check_int("length", length, 1)
    check_int("n", n, 1)
    check_int("seed", seed, 0)
    if isinstance(depth, bool) or not isinstance(depth, numbers.Real) or not 0 <= depth <= 100:
        raise ValueError(f"depth must be a percent in 0..100 (0: right after the instruction, "
                         f"100: right before the question), got {depth!r}")
    decode = decode if decode is not None else getattr(encode, "decode", None)
    _check_digits(encode, decode)
    return decode


def _at(depth: float, count: int) -> int:
    """``depth`` percent of ``0 .. count``, rounded half up."""
    return math.floor(depth / 100 * count + 0.5)


def _cycle(unit: Sequence[int], count: int) -> list[int]:
    """The first ``count`` tokens of ``unit`` repeated: the cut may fall inside a word."""
    return (list(unit) * -(-count // len(unit)))[:count]


def _draw_key(rng: random.Random, taken: set[int]) -> int:
    while (key := rng.choice(_KEYS)) in taken:
        pass
    return key


def _too_short(task: str, length: int, minimum: int) -> ValueError:
    return ValueError(f"length {length} is too short for task {task!r}: instruction, needle, "
                      f"question and answer take {minimum} tokens with this tokenizer and key; "
                      f"use length >= {minimum}")


def passkey(
    encode: Encode, length: int, depth: float, n: int, seed: int, *,
    filler_ids: Sequence[int] | None = None, decode: Decode | None = None,
    distance: int | None = None, instruction: str | int = "start",
) -> list[Trial]:
    """Passkey trials: a 5-digit key at ``depth`` percent of the filler (arguments as in
    ``make_trials``).

    With ``filler_ids`` the haystack is a slice of that stream at a seeded offset; a key that the
    slice's text states is drawn again (with a new offset), so this needs a ``decode``. With
    ``distance``, the needle starts exactly that many tokens before the answer
    (``Trial.distance``), whatever the length, and ``depth`` is ignored (each trial records the
    depth that gives it).

    ``instruction`` (a control: what the model needs in view besides the needle): ``"start"`` (the
    task's layout), ``"none"`` (filler of the same length in its place), or ``k``: the instruction
    starts ``k`` tokens before the answer, before the needle, with filler in its place at the
    start (sentence filler only).
    """
    if distance is not None:
        check_int("distance", distance, 1)
    if instruction not in ("start", "none") and not (
            isinstance(instruction, int) and not isinstance(instruction, bool) and instruction > 0):
        raise ValueError(f"instruction must be 'start', 'none' or a distance in tokens > 0, got "
                         f"{instruction!r}")
    if instruction != "start" and filler_ids is not None:
        raise ValueError("instruction moves only with the sentence filler; drop filler_ids")
    decode = _prepare(encode, decode, length, depth, n, seed)
    if filler_ids is not None and decode is None:
        raise ValueError("filler_ids needs a decode to check that the haystack does not state the "
                         "key: pass encode=encoder(tokenizer), or decode=")
    rng, keys, trials = random.Random(seed), set(), []
    for _ in range(n):
        for _draw in range(_MAX_DRAWS):
            trial = _passkey_trial(encode, decode, length, depth, rng, keys, filler_ids, distance)
            if trial is not None and instruction != "start":
                trial = _move_instruction(encode, trial, instruction)
            if trial is not None:
                break
        else:
            raise ValueError(f"the haystack states every key drawn in {_MAX_DRAWS} tries; give "
                             "filler_ids with fewer 5-digit numbers")
        keys.add(int(trial.answer))
        trials.append(trial)
    return trials


def _move_instruction(encode: Encode, trial: Trial, instruction: str | int) -> Trial:
    """``trial`` with its instruction replaced by filler (``"none"``) or moved to start
    ``instruction`` tokens before the answer, the needle where it was relative to the answer."""
    head = encode(PASSKEY_INSTRUCTION)
    body = list(trial.prompt_ids[len(head):])  # filler, needle, filler, question
    if instruction == "none":
        return replace(trial, prompt_ids=tuple(_cycle(encode(FILLER), len(head)) + body))
    n = len(trial.prompt_ids)
    k = int(instruction)
    if not trial.distance + len(head) <= k <= n:
        raise ValueError(f"an instruction {k} tokens before the answer must lie before the "
                         f"needle ({trial.distance} tokens back) and inside the {n}-token prompt: "
                         f"use {trial.distance + len(head)}..{n}")
    keep = body[len(body) - (k - len(head)):]  # what follows the instruction, needle included
    prompt = _cycle(encode(FILLER), n - k) + head + keep
    return replace(trial, prompt_ids=tuple(prompt))


def _passkey_trial(
    encode: Encode, decode: Decode | None, length: int, depth: float, rng: random.Random,
    keys: set[int], filler_ids: Sequence[int] | None, distance: int | None = None,
) -> Trial | None:
    """A trial with a new key, or None if the haystack cut for it states the key."""
    key = _draw_key(rng, keys)
    head, question = encode(PASSKEY_INSTRUCTION), encode(PASSKEY_QUESTION)
    needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
    answer = _answer_ids(encode, decode, str(key))
    n_fill = length - len(head) - len(needle) - len(question) - len(answer)
    if n_fill < 0:
        raise _too_short("passkey", length, length - n_fill)
    at = _at(depth, n_fill)
    if distance is not None:  # the needle's first token `distance` tokens before the answer
        at = length - len(answer) - len(head) - distance
        if not 0 <= at <= n_fill:
            low = len(needle) + len(question)
            raise ValueError(f"a passkey needle {distance} tokens before the answer does not fit "
                             f"in {length} tokens with this key: use a distance in "
                             f"{low}..{low + n_fill}")
        depth = 100.0 * at / n_fill if n_fill else 100.0
    if filler_ids is None:  # both sides start the sentences afresh: the needle ends one
        before, after = _cycle(encode(FILLER), at), _cycle(encode(FILLER), n_fill - at)
    else:
        if len(filler_ids) < n_fill:
            raise ValueError(f"filler_ids has {len(filler_ids)} tokens; length {length} needs a "
                             f"haystack of {n_fill}")
        start = rng.randrange(len(filler_ids) - n_fill + 1)
        hay = list(filler_ids[start : start + n_fill])
        if decode is not None and str(key) in decode(hay):
            return None
        before, after = hay[:at], hay[at:]
    prompt = head + before + needle + after + question
    return Trial(tuple(prompt), tuple(answer), str(key), float(depth), len(head) + at,
                 len(prompt) - len(head) - at, len(needle))


def lines(
    encode: Encode, length: int, depth: float, n: int, seed: int, *, decode: Decode | None = None,
) -> list[Trial]:
    """LongEval line-retrieval trials: as many lines as fit, then a question about the line at
    ``depth`` percent of them (0 the first, 100 the last; arguments: ``make_trials``).

    Names are two different ``LINE_WORDS`` joined by "-", all distinct, so at most 1560 lines;
    values are distinct 5-digit numbers, and none answers an earlier trial. The tokens left over
    (fewer than a line, or all past the last name) are filler between the instruction and the
    first line, so the lines run unbroken up to the question.
    """
    decode = _prepare(encode, decode, length, depth, n, seed)
    rng, answers, trials = random.Random(seed), set(), []
    for _ in range(n):
        trials.append(_lines_trial(encode, decode, length, depth, rng, answers))
        answers.add(int(trials[-1].answer))
    return trials


def _lines_trial(
    encode: Encode, decode: Decode | None, length: int, depth: float, rng: random.Random,
    answers: set[int],
) -> Trial:
    names, values, taken = rng.sample(_NAMES, len(_NAMES)), [], set(answers)

    def ask(q: int) -> tuple[list[int], list[int]]:
        question = encode(f" What is the REGISTER_CONTENT in line {names[q]}? It is")
        return question, _answer_ids(encode, decode, str(values[q]))

    head = encode(LINES_INSTRUCTION)
    budget, used, rows = length - len(head), 0, []
    while len(rows) < len(names):  # add lines while the next one and its question fit
        values.append(_draw_key(rng, taken))
        taken.add(values[-1])
        line = encode(f" line {names[len(rows)]}: REGISTER_CONTENT is {values[-1]}")
        if used + len(line) + sum(map(len, ask(_at(depth, len(rows))))) > budget:
            if not rows:
                raise _too_short("lines", length, len(head) + len(line) + sum(map(len, ask(0))))
            break
        rows.append(line)
        used += len(line)
    q = _at(depth, len(rows) - 1)
    question, answer = ask(q)
    pad = _cycle(encode(FILLER), budget - used - len(question) - len(answer))
    prompt = head + pad + [tok for row in rows for tok in row] + question
    needle_pos = len(head) + len(pad) + sum(map(len, rows[:q]))
    return Trial(tuple(prompt), tuple(answer), str(values[q]), float(depth), needle_pos,
                 len(prompt) - needle_pos, len(rows[q]))


TASKS: dict[str, Callable[..., list[Trial]]] = {"passkey": passkey, "lines": lines}


def make_trials(
    task: str, encode: Encode, length: int, depth: float, n: int, seed: int,
    filler_ids: Sequence[int] | None = None, *, decode: Decode | None = None,
) -> list[Trial]:
    """``n`` trials of a registered task.

    Args:
        task: a name in ``TASKS``: ``"passkey"`` or ``"lines"``.
        encode: text -> token ids without special tokens, e.g. ``encoder(tokenizer)``.
        length: tokens of prompt plus answer, exactly.
        depth: where the needle is, percent: 0 first (right after the instruction), 100 last
            (right before the question).
        n: number of trials; each has its own answer.
        seed: fixes every trial.
        filler_ids: ``passkey`` only: a token stream (e.g. a held-out split) to cut the haystack
            from, instead of the repeated filler sentences.
        decode: token ids -> text, to check that keys round-trip (see ``_check_digits``);
            default ``encode.decode`` (an ``Encoder`` has one).

    Returns:
        ``n`` trials, each ``length`` tokens long.

    Raises:
        ValueError: an unknown task (the message lists them), a depth outside 0..100, ``n < 1``,
            a length too short (the message gives the minimum), a tokenizer that cannot encode
            the digits, ``filler_ids`` for ``lines``, too short, or without a ``decode``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if filler_ids is not None:
        if task != "passkey":
            raise ValueError(f"filler_ids (a real haystack) is for task 'passkey', not {task!r}")
        return passkey(encode, length, depth, n, seed, filler_ids=filler_ids, decode=decode)
    return TASKS[task](encode, length, depth, n, seed, decode=decode)


# --- training rows -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskMix:
    """Task sequences mixed into training batches, so a model trained from scratch learns the task.

    Each row of the global batch is replaced with probability ``fraction`` by one trial of
    ``train_len + 1`` tokens (inputs and shifted targets) with its needle at a uniform random depth.
    Which rows, their depths and their trials are a pure function of ``(seed, step)`` from a
    generator of their own, so batches stay reproducible and a resumed run sees the same rows, and
    the corpus rows of ``linbias.data.get_batch`` are those of a run without the mix.

    Args:
        task: a name in ``TASKS``.
        fraction: the probability that a row is replaced, ``0 < fraction <= 1``.
        encode: ``encoder(tokenizer)`` of the run's tokenizer.
        filler_ids: ``passkey`` only: a token stream to cut the haystack from (``None``: the filler
            sentences).
    """

    task: str
    fraction: float
    encode: Encoder
    filler_ids: Sequence[int] | None = None

    def check(self, train_len: int) -> None:
        """ValueError now if a trial of ``train_len + 1`` tokens cannot be built."""
        make_trials(self.task, self.encode, train_len + 1, 50.0, 1, 0, self.filler_ids)

    def apply(self, x_BT: torch.Tensor, y_BT: torch.Tensor, *, seed: int, step: int,
              rank: int = 0, world_size: int = 1) -> None:
        """Replace this rank's chosen rows of ``(x, y)`` in place (arguments as ``get_batch``)."""
        B, T = x_BT.shape
        rng = np.random.default_rng([seed, step, _MIX_STREAM])
        chosen_G = rng.random(B * world_size) < self.fraction
        depth_G = rng.uniform(0.0, 100.0, B * world_size)
        seed_G = rng.integers(0, 2**62, B * world_size)
        for b in range(B):
            g = rank * B + b
            if chosen_G[g]:
                (trial,) = make_trials(self.task, self.encode, T + 1, float(depth_G[g]), 1,
                                       int(seed_G[g]), self.filler_ids)
                ids_T1 = torch.tensor(trial.prompt_ids + trial.answer_ids, dtype=x_BT.dtype)
                x_BT[b], y_BT[b] = ids_T1[:-1], ids_T1[1:]


_MIX_STREAM = 0x7A5C  # keys the mix's generator apart from get_batch's ([seed, step])


# --- scoring -------------------------------------------------------------------------------------


def score(logits_fn: LogitsFn, trials: Sequence[Trial], batch_size: int = 8) -> list[bool]:
    """Exact match of each answer, teacher-forced: one forward per batch of similar lengths.

    Args:
        logits_fn: ``(ids_BT, mask_BT) -> [B, T, V]`` logits, for int64 ids left-padded with 0
            and a bool mask (True: a real token), both on the CPU; called under inference mode.
            A model with absolute positions must start them at 0 at each row's first real token.
        trials: the trials; each reads ``prompt_ids + answer_ids[:-1]``.
        batch_size: trials per forward.

    Returns:
        One bool per trial, in the input order: True iff the argmax at every answer position is
        the answer token (what greedy decoding would write).
    """
    check_int("batch_size", batch_size, 1)
    if any(not t.answer_ids or not t.prompt_ids for t in trials):
        raise ValueError("every trial needs a non-empty prompt and answer")
    lengths = [len(t.prompt_ids) + len(t.answer_ids) for t in trials]
    order = sorted(range(len(trials)), key=lengths.__getitem__)  # little padding per batch
    results = [False] * len(trials)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for i, ok in zip(batch, _score_batch(logits_fn, [trials[i] for i in batch])):
                results[i] = ok
    return results


def _score_batch(logits_fn: LogitsFn, trials: list[Trial]) -> list[bool]:
    inputs = [t.prompt_ids + t.answer_ids[:-1] for t in trials]
    T = max(map(len, inputs))
    ids_BT = torch.zeros(len(inputs), T, dtype=torch.long)
    mask_BT = torch.zeros(len(inputs), T, dtype=torch.bool)
    rows, cols = [], []
    for b, (trial, seq) in enumerate(zip(trials, inputs)):
        pad = T - len(seq)
        ids_BT[b, pad:], mask_BT[b, pad:] = torch.tensor(seq), True
        first = pad + len(trial.prompt_ids) - 1  # the last prompt token predicts answer token 0
        rows += [b] * len(trial.answer_ids)
        cols += range(first, first + len(trial.answer_ids))
    logits_BTV = logits_fn(ids_BT, mask_BT)
    if logits_BTV.shape[:2] != ids_BT.shape:
        raise ValueError(f"logits_fn returned shape {tuple(logits_BTV.shape)} for input "
                         f"{tuple(ids_BT.shape)}; expected [B, T, V]")
    device = logits_BTV.device
    logits_NV = logits_BTV[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    pred_N = logits_NV.argmax(-1).cpu()
    hit_N = pred_N == torch.tensor([tok for t in trials for tok in t.answer_ids])
    return [bool(h.all()) for h in hit_N.split([len(t.answer_ids) for t in trials])]


# --- statistics ----------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (default 95 %).

    Returns:
        ``(low, high)``, within 0..1; unlike ``p +- z se`` it does not collapse at 0 or n.
    """
    check_int("n", n, 1)
    check_int(f"k (n={n})", k, 0, n)
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def k_max(cells: Sequence[tuple[int, int, int]], threshold: float = 0.2) -> int:
    """Chen et al. 2023's effective context window from ``(distance, n_correct, n_trials)`` cells.

    Returns:
        The largest distance ``d`` such that every cell at distance ``<= d`` has accuracy
        ``>= threshold``; 0 if a cell at the shortest distance fails.
    """
    if not cells:
        raise ValueError("k_max needs at least one (distance, n_correct, n_trials) cell")
    for distance, _, total in cells:
        check_int(f"n_trials at distance {distance}", total, 1)
    best = 0
    for d in sorted({c[0] for c in cells}):
        if any(k / total < threshold for dist, k, total in cells if dist == d):
            break
        best = d
    return best


# --- records, table, heatmaps --------------------------------------------------------------------


def cell_record(
    task: str, length: int, depth: float, results: Sequence[bool], trials: Sequence[Trial]
) -> Record:
    """One (task, length, depth) cell: accuracy, its Wilson interval, mean needle distance."""
    if not results or len(results) != len(trials):
        raise ValueError(f"need one result per trial, got {len(results)} results for "
                         f"{len(trials)} trials")
    n, k = len(results), sum(map(bool, results))
    low, high = wilson(k, n)
    return {"task": task, "length": int(length), "depth": float(depth), "n": n, "correct": k,
            "accuracy": k / n, "ci_low": low, "ci_high": high,
            "mean_distance": sum(t.distance for t in trials) / n}


