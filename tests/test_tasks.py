"""Tests for linbias.tasks: exact lengths, needles, seeds, tokenizers, scoring, statistics."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from linbias.config import ModelConfig
from linbias.data import load_corpus, train_tokenizer
from linbias.model import GPT
from linbias.tasks import (
    TaskMix,
    FILLER, LINE_WORDS, LINES_INSTRUCTION, PASSKEY_INSTRUCTION, PASSKEY_QUESTION, TASKS, Trial,
    cell_record, encoder, k_max, make_trials, score, wilson,
)
from linbias.report import accuracy_table, plot_heatmaps

QUESTIONS = " What is the pass key? The pass key is What is the REGISTER_CONTENT in line ? It is"
TASK_TEXT = PASSKEY_INSTRUCTION + FILLER + LINES_INSTRUCTION + QUESTIONS + " ".join(LINE_WORDS)


def needle(key: str) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key."


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with 44 merges, so most words are several tokens and the
    filler is often cut inside a word."""
    root = tmp_path_factory.mktemp("task_corpus")
    rng = random.Random(0)
    for i in range(60):
        texts = [TASK_TEXT[:200], FILLER, LINES_INSTRUCTION]
        words = [f"{rng.choice(texts)} {rng.randrange(10**5)}" for _ in range(30)]
        (root / f"doc{i}.txt").write_text(" ".join(words), encoding="utf-8")
    return train_tokenizer(load_corpus(f"text:{root}"), vocab_size=300)


@pytest.fixture(scope="module")
def chars() -> Tokenizer:
    """One token per character (BPE without merges); id 0 is the unknown token."""
    alphabet = sorted(set(TASK_TEXT + "-0123456789"))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


@pytest.fixture(scope="module")
def words() -> Tokenizer:
    """Whitespace words of the task texts: no digits in its vocabulary."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(TASK_TEXT.split())))}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


# --- tokenizers ----------------------------------------------------------------------------------


def test_encoder_accepts_tokenizers_and_transformers_only(bpe: Tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>")
    a, b = encoder(bpe), encoder(wrapped)
    assert a(FILLER) == b(FILLER) == bpe.encode(FILLER).ids
    assert make_trials("passkey", a, 400, 50, 3, 1) == make_trials("passkey", b, 400, 50, 3, 1)
    for other in ("a string", lambda text: [1]):
        with pytest.raises(TypeError, match="tokenizers.Tokenizer or a transformers tokenizer"):
            encoder(other)


def test_a_tokenizer_without_digits_is_refused(words: Tokenizer) -> None:
    with pytest.raises(ValueError, match="cannot encode the digits.*byte-level BPE"):
        make_trials("passkey", encoder(words), 200, 50, 1, 0)  # round trip via decode
    with pytest.raises(ValueError, match="cannot encode the digits"):
        make_trials("lines", lambda text: words.encode(text).ids, 200, 50, 1, 0)  # no decode


# --- trials --------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(TASKS))
def test_lengths_are_exact_and_byte_level_segments_concatenate(task: str, bpe: Tokenizer) -> None:
    enc, inside_a_word = encoder(bpe), 0
    for length in (300, 301, 333, 1000):
        for depth in (0, 12.5, 50, 99, 100):
            for t in make_trials(task, enc, length, depth, 2, seed=length):
                ids = list(t.prompt_ids + t.answer_ids)
                assert len(ids) == length and t.distance == len(t.prompt_ids) - t.needle_pos
                assert enc(enc.decode(ids)) == ids  # the segments are the text's own encoding
                assert t.answer_ids == tuple(enc(f" {t.answer}")) and t.depth == depth
                inside_a_word += enc.decode(list(t.prompt_ids[: t.needle_pos]))[-1].isalpha()
    assert inside_a_word > 0  # the filler was cut inside a word, and still round-trips


@pytest.mark.parametrize("tokenizer", ["bpe", "chars"])
def test_passkey_needle_sits_at_the_depth_once(tokenizer: str, request) -> None:
    enc = encoder(request.getfixturevalue(tokenizer))
    head, question = len(enc(PASSKEY_INSTRUCTION)), enc(PASSKEY_QUESTION)
    for depth in (0, 33, 100):
        (t,) = make_trials("passkey", enc, 700, depth, 1, seed=3)
        size = len(enc(needle(t.answer)))
        text = enc.decode(list(t.prompt_ids))
        at = t.prompt_ids[t.needle_pos : t.needle_pos + size]
        assert enc.decode(list(at)) == needle(t.answer)
        assert text.count(needle(t.answer).strip()) == 1 and text.count(t.answer) == 2
        n_fill = 700 - head - size - len(question) - len(t.answer_ids)
        assert t.needle_pos == head + int(depth / 100 * n_fill + 0.5)  # rounded half up
    assert t.prompt_ids[t.needle_pos + size :] == tuple(question)  # depth 100: before the question


def test_passkey_needle_at_a_distance_in_tokens(bpe: Tokenizer) -> None:
    # The (distance, length) map: the needle's first token exactly d tokens before the answer,
    # at any length; the needle's size is recorded; a distance that cannot fit names the range.
    enc = encoder(bpe)
    for length, d in ((300, 80), (300, 200), (1200, 80), (1200, 1000)):
        for t in make_trials_at(enc, length, d):
            assert t.distance == d and len(t.prompt_ids) - t.needle_pos == d
            assert len(t.prompt_ids) + len(t.answer_ids) == length
            at = t.prompt_ids[t.needle_pos : t.needle_pos + t.needle_len]
            assert enc.decode(list(at)) == needle(t.answer)
            assert 0 <= t.depth <= 100
    with pytest.raises(ValueError, match=r"does not fit in 300 tokens.*use a distance in \d+\.\.\d+"):
        make_trials_at(enc, 300, 299)


def test_passkey_instruction_can_move_or_go(bpe: Tokenizer) -> None:
    # The control for "what else must be in view": the same needle and question, the instruction
    # left out (filler instead) or starting k tokens before the answer.
    from linbias.tasks import passkey

    enc = encoder(bpe)
    head = enc(PASSKEY_INSTRUCTION)
    (start,) = passkey(enc, 900, 50.0, 1, seed=2, distance=100)
    (gone,) = passkey(enc, 900, 50.0, 1, seed=2, distance=100, instruction="none")
    (moved,) = passkey(enc, 900, 50.0, 1, seed=2, distance=100, instruction=300)
    for t in (gone, moved):
        assert len(t.prompt_ids) == len(start.prompt_ids) and t.answer_ids == start.answer_ids
        assert t.prompt_ids[-100:] == start.prompt_ids[-100:]  # needle to question unchanged
    text = enc.decode(list(gone.prompt_ids))
    assert PASSKEY_INSTRUCTION not in text and needle(start.answer) in text
    at = len(moved.prompt_ids) - 300
    assert moved.prompt_ids[at : at + len(head)] == tuple(head)
    assert enc.decode(list(moved.prompt_ids)).count(PASSKEY_INSTRUCTION) == 1
    with pytest.raises(ValueError, match="must lie before the needle"):
        passkey(enc, 900, 50.0, 1, seed=2, distance=100, instruction=120)
    with pytest.raises(ValueError, match="instruction must be 'start', 'none'"):
        passkey(enc, 900, 50.0, 1, seed=2, instruction="end")


def make_trials_at(enc, length: int, distance: int):
    from linbias.tasks import passkey
    return passkey(enc, length, 50.0, 3, seed=1, distance=distance)


@pytest.mark.parametrize("tokenizer", ["bpe", "chars"])
def test_lines_asks_the_line_at_the_depth(tokenizer: str, request) -> None:
    enc = encoder(request.getfixturevalue(tokenizer))
    for depth in (0, 40, 100):
        (t,) = make_trials("lines", enc, 1500, depth, 1, seed=5)
        text = enc.decode(list(t.prompt_ids))
        rows = re.findall(r"line ([a-z]+-[a-z]+): REGISTER_CONTENT is (\d+)", text)
        names, values = [r[0] for r in rows], [r[1] for r in rows]
        asked = re.search(r"in line ([a-z]+-[a-z]+)\? It is$", text)[1]
        assert len(rows) > 5 and len(set(names)) == len(set(values)) == len(rows)
        assert names.index(asked) == round(depth / 100 * (len(rows) - 1))
        assert values[names.index(asked)] == t.answer and text.count(t.answer) == 1
        at = enc.decode(list(t.prompt_ids[t.needle_pos :]))
        assert at.strip().startswith(f"line {asked}: REGISTER_CONTENT is {t.answer}")
        assert enc.decode(list(t.prompt_ids[: t.needle_pos])).count("REGISTER_CONTENT is") == (
            names.index(asked))


def test_line_words_never_contain_each_other() -> None:
    assert not [(a, b) for a in LINE_WORDS for b in LINE_WORDS if a != b and a in b]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_seed_fixes_the_trials_and_keys_differ(task: str, chars: Tokenizer) -> None:
    enc = encoder(chars)
    first = make_trials(task, enc, 400, 30, 20, seed=7)
    assert first == make_trials(task, enc, 400, 30, 20, seed=7)
    assert first != make_trials(task, enc, 400, 30, 20, seed=8)
    assert len({t.answer for t in first}) == 20
    assert all(re.fullmatch(r"[1-9]\d{4}", t.answer) for t in first)


def test_real_haystack_never_states_the_key(bpe: Tokenizer) -> None:
    enc = encoder(bpe)
    (plain,) = make_trials("passkey", enc, 300, 50, 1, 0, filler_ids=enc(FILLER * 60))
    # A haystack stating the first key everywhere: the key must be drawn again.
    haystack = enc(f" Call {plain.answer} now." * 200)
    trials = make_trials("passkey", enc, 300, 50, 4, 0, filler_ids=haystack)
    for t in trials:
        text = enc.decode(list(t.prompt_ids))
        assert t.answer != plain.answer and text.count(t.answer) == 2
        assert f"Call {plain.answer} now" in text and len(t.prompt_ids + t.answer_ids) == 300
    with pytest.raises(ValueError, match="needs a decode"):
        make_trials("passkey", enc.encode, 300, 50, 1, 0, filler_ids=haystack)
    with pytest.raises(ValueError, match="filler_ids has 10 tokens"):
        make_trials("passkey", enc, 300, 50, 1, 0, filler_ids=haystack[:10])
    with pytest.raises(ValueError, match="for task 'passkey', not 'lines'"):
        make_trials("lines", enc, 300, 50, 1, 0, filler_ids=haystack)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_too_short_names_the_minimum(task: str, chars: Tokenizer) -> None:
    enc = encoder(chars)
    with pytest.raises(ValueError, match=r"too short.*use length >= \d+") as info:
        make_trials(task, enc, 50, 50, 1, seed=0)
    minimum = int(re.search(r">= (\d+)", str(info.value))[1])
    assert len(make_trials(task, enc, minimum, 50, 1, seed=0)[0].prompt_ids) < minimum
    with pytest.raises(ValueError, match=f">= {minimum}"):
        make_trials(task, enc, minimum - 1, 50, 1, seed=0)


def test_bad_requests_are_named(chars: Tokenizer) -> None:
    enc = encoder(chars)
    with pytest.raises(ValueError, match="unknown task 'keypass'; valid tasks: passkey, lines"):
        make_trials("keypass", enc, 400, 50, 1, 0)
    for depth in (-1, 100.5, True):
        with pytest.raises(ValueError, match="depth must be a percent in 0..100"):
            make_trials("passkey", enc, 400, depth, 1, 0)
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        make_trials("lines", enc, 400, 50, 0, 0)


# --- scoring -------------------------------------------------------------------------------------


def test_score_reads_the_answer_positions_of_left_padded_batches() -> None:
    """An oracle that predicts ``token + 1`` at each real position, checked on hand-made trials."""
    V, shapes = 16, []

    def oracle(ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(ids_BT.shape))
        assert (ids_BT[~mask_BT] == 0).all() and (mask_BT.int().diff(dim=1) >= 0).all()
        return torch.nn.functional.one_hot((ids_BT + 1) % V, V).float()

    def trial(prompt, answer) -> Trial:
        return Trial(prompt, answer, "", 0.0, 0, len(prompt))

    trials = [trial((1, 2, 3), (4, 5)), trial((7,), (8,)), trial((1, 2, 3, 4, 5), (6, 8)),
              trial((9, 10), (11, 12, 13)), trial((2,), (4,))]
    assert score(oracle, trials, batch_size=2) == [True, True, False, True, False]
    assert shapes == [(2, 1), (2, 4), (1, 6)]  # sorted by length: [1, 4], [0, 3], [2]
    with pytest.raises(ValueError, match=r"expected \[B, T, V\]"):
        score(lambda ids, mask: torch.zeros(1, 1, V), trials)


def test_teacher_forced_score_equals_greedy_generation(chars: Tokenizer) -> None:
    enc, V = encoder(chars), chars.get_vocab_size()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V, n_layers=2, n_heads=4, d_model=32, train_len=16,
                            position="alibi")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    trials = [t for length, depth in [(360, 0), (420, 50), (481, 100)]
              for task in ("passkey", "lines") for t in make_trials(task, enc, length, depth, 2, 1)]

    def greedy(t: Trial) -> tuple[int, ...]:
        out = model.generate(torch.tensor([t.prompt_ids]), len(t.answer_ids), temperature=0)
        return tuple(out[0, len(t.prompt_ids) :].tolist())

    # Every other trial gets the model's own greedy answer (right by construction); each answer
    # keeps its length, so prompt + answer stays the trial's length.
    trials = [dataclasses.replace(t, answer_ids=greedy(t)) if i % 2 else t
              for i, t in enumerate(trials)]
    # Positions start at 0 at each row's first real token (GPT.forward takes pos of shape [B, T]).
    results = score(lambda ids, mask: model(ids, pos=(mask.cumsum(-1) - 1).clamp(min=0),
                                            key_padding_mask=mask), trials, batch_size=4)
    assert results == [greedy(t) == t.answer_ids for t in trials]
    assert 0 < sum(results) < len(results)


# --- statistics ----------------------------------------------------------------------------------


def test_wilson_matches_hand_computed_intervals() -> None:
    # z^2 = 3.8415. 8/10: centre (0.8 + 0.19207) / 1.38415 = 0.71674, half-width
    # 1.95996 * sqrt(0.016 + 0.0096037) / 1.38415 = 0.22657 -> (0.4902, 0.9433).
    # 0/10: centre 0.19207 / 1.38415 = 0.13877 = half-width -> (0, 0.2775); 10/10 mirrors it.
    for (k, n), expected in {(8, 10): (0.4902, 0.9433), (0, 10): (0.0, 0.2775),
                             (10, 10): (0.7225, 1.0)}.items():
        assert wilson(k, n) == pytest.approx(expected, abs=1e-4)
    for k, n in ((1, 0), (11, 10), (-1, 10)):
        with pytest.raises(ValueError):
            wilson(k, n)


def test_k_max_is_the_last_distance_before_a_failure() -> None:
    cells = [(400, 9, 10), (100, 9, 10), (200, 2, 10), (300, 1, 10)]  # 300 fails: 10 % < 20 %
    assert k_max(cells) == 200
    assert k_max(cells, threshold=0.1) == 400
    assert k_max([(100, 1, 10), (200, 10, 10)]) == 0  # the shortest fails
    assert k_max([(100, 5, 5), (200, 5, 5), (200, 0, 5), (300, 5, 5)]) == 100  # one of two fails


# --- records, table, heatmaps --------------------------------------------------------------------


def test_records_table_and_heatmap(chars: Tokenizer, tmp_path) -> None:
    enc = encoder(chars)
    records = []
    for length in (300, 400):
        for depth in (0, 50, 100):
            trials = make_trials("passkey", enc, length, depth, 4, 0)
            results = [i < 1 + depth / 50 for i in range(4)]  # 1, 2, 3 of 4 right
            records.append(cell_record("passkey", length, depth, results, trials))
    r = records[1]
    assert (r["n"], r["correct"], r["accuracy"]) == (4, 2, 0.5)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson(2, 4))
    assert 0 < r["mean_distance"] < 300
    table = accuracy_table(records)
    assert "passkey" in table and "25.0% (4)" in table and "75.0% (4)" in table
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert rows["50%"].split()[1:] == ["50.0%", "(4)", "50.0%", "(4)"]
    path = tmp_path / "out" / "heatmap.png"
    plot_heatmaps({"alibi / none": records, "alibi / linear": records[:3]}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="two records for depth 0"):
        accuracy_table(records + records[:1])


# --- training rows -------------------------------------------------------------------------------


def test_task_mix_rows_are_seeded_trials_and_ranks_share_one_global_batch(bpe: Tokenizer) -> None:
    mix = TaskMix("passkey", 0.3, encoder(bpe))
    T, B = 400, 8

    def batch(step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.full((B, T), -1, dtype=torch.long)
        y = x.clone()
        mix.apply(x, y, seed=5, step=step, rank=rank, world_size=world_size)
        return x, y

    x, y = batch(3)
    assert torch.equal(x, batch(3)[0]) and not torch.equal(x, batch(4)[0])  # a function of step
    for row_x, row_y in zip(x, y):
        if row_x[0] == -1:
            continue  # a corpus row, left as it was
        assert torch.equal(row_x[1:], row_y[:-1])  # targets are the inputs shifted by one
        text = bpe.decode(row_x.tolist() + row_y[-1:].tolist())
        key = re.search(r"pass key is (\d{5})\. Remember", text).group(1)
        assert text.endswith(f"The pass key is {key}") and text.count(key) == 3
    # two ranks of 4 rows see the rows of one process with 8
    halves = [torch.full((4, T), -1, dtype=torch.long) for _ in range(2)]
    for rank, h in enumerate(halves):
        mix.apply(h, h.clone(), seed=5, step=3, rank=rank, world_size=2)
    whole = torch.full((8, T), -1, dtype=torch.long)
    mix.apply(whole, whole.clone(), seed=5, step=3)
    assert torch.equal(torch.cat(halves), whole)
    share = sum(int((batch(s)[0][:, 0] != -1).sum()) for s in range(40)) / (40 * B)
    assert 0.2 < share < 0.4  # about the fraction asked for
    with pytest.raises(ValueError, match="too short for task 'passkey'"):
        mix.check(20)


def test_the_config_literal_names_every_registered_task() -> None:
    from typing import get_args

    from linbias.config import Task

    assert set(get_args(Task)) == set(TASKS)
