"""Tests for linbias.evaluate, against a plain loop written from the ALiBi paper's protocols."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linbias import evaluate as ev
from linbias.config import EvalConfig
from linbias.data import load_corpus, token_byte_lengths, token_stream
from linbias.evaluate import evaluate_run, evaluate_stream, write_results
from linbias.report import format_table, retrieval_table
from linbias.model import GPT
from linbias.tasks import encoder, make_trials, score
from linbias.runs import Run, RunError, load_run

RECORD_KEYS = {"position", "scaling", "train_len", "data", "split", "skipped", "eval_len", "mode",
               "stride", "ppl", "bpb", "nll", "tokens", "bytes", "seconds"}


# --- the independent reference -------------------------------------------------------------------


def naive_eval(model, stream, eval_len, stride):
    """The Hugging Face perplexity guide's loop: windows start every ``stride`` tokens, each scores
    the targets past the previous window's end; the last window is cut at the end of the stream.

    Returns ``{target index: (nll, position in window)}``, failing if a target is scored twice.
    """
    stream = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    last, scored, prev_end = len(stream) - 1, {}, 0
    for begin in range(0, last, stride):
        end = min(begin + eval_len, last)  # inputs stream[begin:end], targets begin+1 .. end
        with torch.no_grad():
            logits = model(stream[begin:end][None])[0].double()
        nll = F.cross_entropy(logits, stream[begin + 1 : end + 1], reduction="none")
        for t in range(prev_end + 1, end + 1):
            assert t not in scored
            scored[t] = (nll[t - begin - 1].item(), t - begin - 1)
        prev_end = end
        if end == last:
            break
    return scored


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_alibi_run: Path) -> Run:
    return load_run(tiny_alibi_run)


@pytest.fixture(scope="module")
def stream(run: Run, tiny_cache_dir: Path) -> np.ndarray:
    return token_stream(load_corpus(run.train_config.data), run.tokenizer, "valid", tiny_cache_dir)


@pytest.fixture(scope="module")
def byte_lengths(run: Run) -> np.ndarray:
    return token_byte_lengths(run.tokenizer)


def _eval(run, stream, byte_lengths, **kwargs):
    return evaluate_stream(run.model, stream, byte_lengths, progress=False, **kwargs)


# --- the protocols -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "eval_len", "stride"), [
    (2, 1, 1), (9, 8, 3), (33, 8, 8), (34, 8, 8), (40, 8, 1), (41, 8, 5), (100, 16, 7),
    (17, 16, 16),
])
def test_windows_score_every_target_once(n, eval_len, stride) -> None:
    w = ev._windows(n - 1, eval_len, stride)
    targets = np.concatenate([np.arange(s + f, s + l) + 1
                              for s, l, f in zip(w.start_K, w.length_K, w.first_K)])
    assert sorted(targets.tolist()) == list(range(1, n))
    assert (w.length_K <= eval_len).all() and (w.length_K[:-1] == eval_len).all()
    # After the first window, every scored prediction has read at least L' - S tokens before it.
    assert (w.first_K[1:] >= eval_len - stride).all()


@pytest.mark.parametrize(("mode", "eval_len", "stride"), [
    ("nonoverlapping", 16, None), ("nonoverlapping", 64, None), ("nonoverlapping", 50, None),
    ("sliding", 16, 5), ("sliding", 64, 24), ("sliding", 50, 1),
])
def test_matches_naive_loop(run, stream, byte_lengths, mode, eval_len, stride) -> None:
    n = 230  # 229 targets: no length divides it, so the last window is always cut short
    naive = naive_eval(run.model, stream[:n], eval_len, stride or eval_len)
    assert sorted(naive) == list(range(1, n))
    nll = np.array([naive[t][0] for t in range(1, n)])
    n_bytes = int(byte_lengths[np.asarray(stream[1:n], dtype=np.int64)].sum())
    got = _eval(run, stream, byte_lengths, eval_len=eval_len, mode=mode, stride=stride,
                max_tokens=n - 1, batch_size=3)
    assert got["tokens"] == n - 1 and got["bytes"] == n_bytes
    assert got["stride"] == (stride or eval_len)
    assert got["nll"] == pytest.approx(nll.mean(), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    assert got["bpb"] == pytest.approx(nll.sum() / math.log(2) / n_bytes, rel=1e-5)


def test_each_target_scored_once_through_the_public_api() -> None:
    # A bigram model: the NLL of target t depends on (stream[t-1], stream[t]) only, not on the
    # window, so every protocol's total must be the same sum over t = 1 .. N-1.
    gen = torch.Generator().manual_seed(1)
    V, n = 11, 97
    table = torch.randn(V, V, generator=gen, dtype=torch.float64)
    stream = torch.randint(0, V, (n,), generator=gen)
    nll = F.cross_entropy(table[stream[:-1]], stream[1:], reduction="none")
    expected = nll.sum().item()
    assert nll.min() > 1e-2  # so a target dropped or scored twice moves the sum

    def bigram(idx):
        return table[idx]

    for mode, eval_len, stride in [("nonoverlapping", 10, None), ("nonoverlapping", 96, None),
                                   ("sliding", 10, 1), ("sliding", 10, 3), ("sliding", 13, 13)]:
        got = evaluate_stream(bigram, stream, None, eval_len=eval_len, mode=mode, stride=stride,
                              batch_size=4, progress=False)
        assert got["tokens"] == n - 1
        assert got["nll"] * got["tokens"] == pytest.approx(expected, rel=1e-12)
        assert got["bpb"] is None and got["bytes"] is None


def test_sliding_with_stride_equal_to_length_is_nonoverlapping(run, stream, byte_lengths) -> None:
    a = _eval(run, stream, byte_lengths, eval_len=24, mode="nonoverlapping")
    b = _eval(run, stream, byte_lengths, eval_len=24, mode="sliding", stride=24)
    for key in ("tokens", "bytes", "nll", "ppl", "bpb", "stride"):
        assert a[key] == b[key]


def test_stride_one_on_a_short_stream(run, stream, byte_lengths) -> None:
    naive = naive_eval(run.model, stream[:41], 8, 1)
    assert len(naive) == 40
    # Stride 1: every prediction after the first window reads exactly L' = 8 tokens.
    assert all(pos == 7 for t, (_, pos) in naive.items() if t > 8)
    got = _eval(run, stream[:41], byte_lengths, eval_len=8, mode="sliding", stride=1)
    assert got["tokens"] == 40
    assert got["nll"] == pytest.approx(np.mean([v[0] for v in naive.values()]), rel=1e-5)


def test_batching_does_not_change_results(run, stream, byte_lengths) -> None:
    one = _eval(run, stream, byte_lengths, eval_len=20, mode="sliding", stride=7, batch_size=1)
    many = _eval(run, stream, byte_lengths, eval_len=20, mode="sliding", stride=7, batch_size=64)
    assert one["tokens"] == many["tokens"] == len(stream) - 1
    assert one["nll"] == pytest.approx(many["nll"], rel=1e-5)


def test_max_tokens_is_a_prefix(run, stream, byte_lengths) -> None:
    a = _eval(run, stream, byte_lengths, eval_len=16, max_tokens=100)
    b = _eval(run, stream[:101], byte_lengths, eval_len=16)
    assert a["tokens"] == 100
    assert a["nll"] == b["nll"] and a["bytes"] == b["bytes"]
    whole = _eval(run, stream, byte_lengths, eval_len=16, max_tokens=10 * len(stream))
    assert whole["tokens"] == len(stream) - 1


def test_bits_per_byte_counts_the_decoded_text(run, stream, byte_lengths) -> None:
    got = _eval(run, stream, byte_lengths, eval_len=32)
    ids = np.asarray(stream, dtype=np.int64).tolist()
    # Every document starts "doc N:", so the first token is ASCII and the scored text is the
    # whole split's text without it; multi-byte characters split across tokens are counted once.
    docs = load_corpus(run.train_config.data).documents("valid")
    text_bytes = sum(len(d.encode()) for d in docs)
    first = len(run.tokenizer.decode(ids[:1]).encode())
    assert run.tokenizer.decode(ids).encode() == "".join(docs).encode()
    assert got["bytes"] == text_bytes - first
    assert any(len(c.encode()) > 1 for c in "".join(docs))  # the check covers multi-byte text
    assert got["bpb"] == pytest.approx(got["nll"] * got["tokens"] / math.log(2) / got["bytes"])


def test_per_position_matches_naive_loop(run, stream, byte_lengths) -> None:
    n, eval_len = 230, 32
    naive = naive_eval(run.model, stream[:n], eval_len, eval_len)
    by_pos = [[nll for nll, pos in naive.values() if pos == j] for j in range(eval_len)]
    got = _eval(run, stream, byte_lengths, eval_len=eval_len, max_tokens=n - 1, per_position=True)
    assert len(got["per_position"]) == eval_len
    np.testing.assert_allclose(got["per_position"], [np.mean(v) for v in by_pos], rtol=1e-5)
    assert "per_position" not in _eval(run, stream, byte_lengths, eval_len=eval_len)


# --- runs, scaling rules, skipped lengths --------------------------------------------------------


def test_evaluate_run_matches_a_naive_loop(tiny_alibi_run, run, stream, tiny_cache_dir) -> None:
    records = evaluate_run(tiny_alibi_run, lengths=[16, 48], cache_dir=tiny_cache_dir,
                           progress=False)
    assert [r["eval_len"] for r in records] == [16, 48]
    for r in records:
        assert set(r) == RECORD_KEYS
        assert (r["position"], r["scaling"], r["train_len"], r["split"]) == ("alibi", "none", 32,
                                                                             "valid")
        assert r["skipped"] is None
        naive = naive_eval(run.model, stream, r["eval_len"], r["eval_len"])  # independent loop
        assert r["nll"] == pytest.approx(np.mean([nll for nll, _ in naive.values()]), rel=1e-5)
        assert r["tokens"] == len(stream) - 1 == len(naive)


def test_evaluate_run_on_another_corpus_with_the_runs_tokenizer(tiny_alibi_run, run, tmp_path,
                                                                 tiny_cache_dir) -> None:
    """A model trained on one corpus measured on another: that corpus's split, this tokenizer."""
    prose = tmp_path / "prose.txt"
    prose.write_text("".join(f"Line {i} of a story that goes on and on.\n" for i in range(3000)))
    spec = f"text:{prose}"
    (r,) = evaluate_run(tiny_alibi_run, lengths=[32], data=spec, cache_dir=tiny_cache_dir,
                        progress=False)
    other = token_stream(load_corpus(spec), run.tokenizer, "valid", tiny_cache_dir)
    direct = _eval(run, other, token_byte_lengths(run.tokenizer), eval_len=32)
    assert r["data"] == spec and r["tokens"] == len(other) - 1
    assert r["nll"] == pytest.approx(direct["nll"], rel=1e-6)
    assert r["bytes"] == direct["bytes"]
    (own,) = evaluate_run(tiny_alibi_run, lengths=[32], cache_dir=tiny_cache_dir, progress=False)
    assert own["data"] == run.train_config.data and own["nll"] != r["nll"]


@pytest.mark.parametrize("rule", ["none", "linear"])
def test_run_model_left_padding_changes_no_logit(run, rule) -> None:
    """The adapter every evaluation loop uses: a left-padded row gives its unpadded logits."""
    model = ev.RunModel(run)
    rows = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 70)]
    T = max(len(r) for r in rows)
    ids_BT = torch.zeros(2, T, dtype=torch.long)
    mask_BT = torch.zeros(2, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids_BT[b, T - len(r):], mask_BT[b, T - len(r):] = r, True
    with torch.no_grad(), model.under(rule):
        padded = model.logits(ids_BT, mask_BT)
        for b, r in enumerate(rows):
            alone = model.logits(r[None])[0]
            torch.testing.assert_close(padded[b, T - len(r):], alone, atol=1e-5, rtol=1e-5)
    assert run.model.position.rule == "none"  # restored after the block


def test_scaling_changes_alibi_only_past_train_len(run, tiny_cache_dir) -> None:
    run.model.set_rule("log")  # a rule set before the call is put back after it
    records = evaluate_run(run, lengths=[16, 32, 96], rules=("none", "linear", "sqrt"),
                           cache_dir=tiny_cache_dir, progress=False, max_tokens=200)
    assert run.model.position.rule == "log"
    run.model.set_rule("none")
    nll = {(r["eval_len"], r["scaling"]): r["nll"] for r in records}
    assert [r["scaling"] for r in records[:3]] == ["none", "linear", "sqrt"]
    for length in (16, 32):  # L' <= L = 32: every rule leaves the slopes alone
        assert nll[length, "linear"] == nll[length, "none"] == nll[length, "sqrt"]
    assert len({nll[96, "none"], nll[96, "linear"], nll[96, "sqrt"]}) == 3


def test_scaling_is_reset_after_an_error(run, tiny_cache_dir, monkeypatch) -> None:
    def fail(*args, **kwargs):
        assert run.model.position.rule == "linear"
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ev, "evaluate_stream", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate_run(run, lengths=[64], rules=("linear",), cache_dir=tiny_cache_dir)
    assert run.model.position.rule == "none"


def _learned_run(run: Run) -> Run:
    config = dataclasses.replace(run.config, position="learned")
    return dataclasses.replace(run, model=GPT(config).eval(), config=config)


def test_learned_past_its_table_is_skipped_among_several_lengths(run, tiny_cache_dir) -> None:
    records = evaluate_run(_learned_run(run), lengths=[16, 64, 32], cache_dir=tiny_cache_dir,
                           progress=False)
    assert [r["eval_len"] for r in records] == [16, 64, 32]
    ok, skipped = records[0], records[1]
    assert ok["skipped"] is None and math.isfinite(ok["ppl"]) and records[2]["skipped"] is None
    assert "learned" in skipped["skipped"] and "32" in skipped["skipped"]
    assert skipped["ppl"] is None and skipped["tokens"] == 0
    table = format_table(records)
    assert "skipped" in table and skipped["skipped"] in table
    with pytest.raises(ValueError, match="learned"):  # a single explicit request raises
        evaluate_run(_learned_run(run), lengths=[64], cache_dir=tiny_cache_dir, progress=False)


# --- retrieval ------------------------------------------------------------------------------------


def test_evaluate_task_scores_the_same_prompts_under_every_rule(run) -> None:
    records = ev.evaluate_run_task(run, task="passkey", lengths=[320, 640], depths=[0, 100],
                                   trials=3, rules=("none", "linear"), progress=False)
    assert [(r["length"], r["scaling"], r["depth"]) for r in records] == [
        (n, rule, d) for n in (320, 640) for rule in ("none", "linear") for d in (0.0, 100.0)]
    model, encode = ev.RunModel(run), encoder(run.tokenizer)
    for r in records:  # recomputed from the documented seeding, trial by trial
        assert r["position"] == "alibi" and r["train_len"] == 32 and r["filler"] == "sentences"
        cell = make_trials("passkey", encode, r["length"], r["depth"], 3,
                           ev.cell_seed(0, r["length"], r["depth"]))
        with model.under(r["scaling"]):
            results = score(model.logits, cell)
        assert r["correct"] == sum(results) and r["n"] == 3
        assert r["mean_distance"] == sum(t.distance for t in cell) / 3
    again = ev.evaluate_run_task(run, task="passkey", lengths=[320], depths=[0, 100], trials=3,
                                 progress=False)
    assert again == [r for r in records if r["length"] == 320 and r["scaling"] == "none"]
    assert run.model.position.rule == "none"


def test_evaluate_task_skips_lengths_past_a_learned_table(run) -> None:
    learned = _learned_run(dataclasses.replace(
        run, config=dataclasses.replace(run.config, train_len=400)))
    records = ev.evaluate_run_task(learned, task="passkey", lengths=[320, 640], depths=[50],
                                   trials=2, progress=False)
    assert records[0]["skipped"] is None and records[0]["n"] == 2
    assert "position table has 400" in records[1]["skipped"] and records[1]["accuracy"] is None
    (summary,) = ev.retrieval_summary(records)
    assert summary["by_length"][1] == {"length": 640, "accuracy": None, "k_max": None}
    assert "-" in retrieval_table(records)


def test_retrieval_summary_k_max_by_hand() -> None:
    def cell(length, depth, correct, distance):
        return {"position": "alibi", "scaling": "none", "skipped": None, "length": length,
                "depth": depth, "n": 10, "correct": correct, "mean_distance": distance}

    records = [cell(100, 0, 9, 90.4), cell(100, 100, 10, 10.0),
               cell(200, 0, 1, 190.0), cell(200, 100, 10, 10.2)]
    (s,) = ev.retrieval_summary(records)
    # distances 10 (10/10 and 10/10), 90 (9/10), 190 (1/10 < 20%): k_max is 90
    assert s["k_max"] == 90 and s["by_length"] == [
        {"length": 100, "accuracy": 0.95, "k_max": 90}, {"length": 200, "accuracy": 0.55, "k_max": 10}]


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(task="needle"), "task must be one of 'passkey', 'lines'"),
    (dict(depths=[50, 101]), "percents in 0..100"),
    (dict(depths=[]), "percents in 0..100"),
    (dict(trials=0), "trials"),
    (dict(lengths=[40]), "too short for task 'passkey'.*use length >="),
    (dict(rules=("cubic",)), "valid rules"),
])
def test_bad_retrieval_requests_are_named(run, kwargs, match) -> None:
    request = {"task": "passkey", "lengths": [320], "depths": [50], "trials": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        ev.evaluate_run_task(run, progress=False, **request)


@pytest.mark.parametrize("rule", ["none", "linear"])
def test_attention_maps_and_profile_match_a_float64_reference(run, rule) -> None:
    """Layer 0's probabilities written out from the weights and the paper's bias, in float64."""
    from linbias.alibi import alibi_slopes

    model, T = ev.RunModel(run), 96  # 3L: the rule acts
    ids_KT = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(3))
    with model.under(rule):
        maps = model.attention_maps(ids_KT)
    gpt = run.model.double()
    try:
        with torch.no_grad():
            x = gpt.tok_emb(ids_KT) * gpt.emb_scale
            q, k, _ = gpt.blocks[0].attn.qkv(gpt.blocks[0].ln_1(x)).split(x.shape[-1], dim=-1)
    finally:
        gpt.float()
    H = run.config.n_heads
    q, k = (t.view(2, T, H, -1).transpose(1, 2) for t in (q, k))
    slopes = alibi_slopes(H).double()
    if rule == "linear":
        slopes = slopes * 32 / T  # m x L / L'
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) - slopes[:, None, None] * (i - j)
    ref = torch.softmax(scores.masked_fill(j > i, float("-inf")), dim=-1)
    assert len(maps) == run.config.n_layers
    torch.testing.assert_close(maps[0].double(), ref, atol=1e-5, rtol=1e-4)
    records = ev.attention_profile(model, ids_KT, rules=(rule,), distances=(0.5,))
    far = ((i - j) > 16)[T // 2:]
    for r in (x for x in records if x["layer"] == 0):
        want = (ref[:, r["head"], T // 2:] * far).sum(-1).mean()
        assert r["distance"] == 16 and r["share"] == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize("rule", ["none", "window"])
def test_needle_map_scores_the_grid_and_reads_each_heads_attention(run, rule) -> None:
    from linbias.tasks import passkey

    model, encode = ev.RunModel(run), encoder(run.tokenizer)
    records = ev.needle_map(model, encode, lengths=[320, 640], distances=[120, 450], trials=3,
                            rules=(rule,), progress=False, batch_size=2)
    assert [(r["length"], r["distance"]) for r in records] == [
        (320, 450), (320, 120), (640, 120), (640, 450)]  # skipped cells first, then the others
    assert "does not fit in 320 tokens" in records[0]["skipped"]
    for r in records[1:]:
        cell = passkey(encode, r["length"], 50.0, 3, ev.cell_seed(0, r["length"], r["distance"]),
                       distance=r["distance"])
        with model.under(rule):
            assert r["correct"] == sum(score(model.logits, cell)) and r["n"] == 3
            # Each trial's full attention maps (an independent path: every query attended),
            # read at the last prompt token: needle mass and entropy per layer and head.
            mass, key, ent = 0.0, 0.0, 0.0
            for t in cell:
                maps = model.attention_maps(torch.tensor([t.prompt_ids]))
                p = torch.stack([m[0, :, -1] for m in maps]).double()  # [layers, H, T]
                mass = mass + p[..., t.needle_pos : t.needle_pos + t.needle_len].sum(-1)
                # The key's two places, from the needle's sentence encoded piece by piece.
                first = t.needle_pos + len(encode(" The pass key is"))
                second = first + len(t.answer_ids) + len(encode(". Remember it."))
                assert t.prompt_ids[first : first + len(t.answer_ids)] == t.answer_ids
                assert t.prompt_ids[second : second + len(t.answer_ids)] == t.answer_ids
                key = key + sum(p[..., i : i + len(t.answer_ids)].sum(-1) for i in (first, second))
                ent = ent - (p * p.clamp_min(1e-300).log()).sum(-1)
        torch.testing.assert_close(torch.tensor(r["needle_mass"]).double(), mass / 3, atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(torch.tensor(r["entropy"]).double(), ent / 3, atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(torch.tensor(r["key_mass"]).double(), key / 3, atol=1e-5,
                                   rtol=1e-4)


def test_a_rule_the_method_lacks_raises_its_error(run, tiny_cache_dir) -> None:
    with pytest.raises(ValueError, match="do not support scaling rule 'linear'"):
        evaluate_run(_learned_run(run), lengths=[16], rules=("linear",),
                     cache_dir=tiny_cache_dir)
    with pytest.raises(ValueError, match="valid rules"):
        evaluate_run(run, lengths=[16], rules=("cubic",), cache_dir=tiny_cache_dir)


def test_a_length_past_the_stream_is_skipped_or_raises(run, stream, tiny_cache_dir) -> None:
    too_long = len(stream) + 10
    records = evaluate_run(run, lengths=[16, too_long], cache_dir=tiny_cache_dir, progress=False)
    assert records[0]["skipped"] is None and "needs at least" in records[1]["skipped"]
    with pytest.raises(ValueError, match="needs at least 64 scored tokens; .* max_tokens=50"):
        evaluate_run(run, lengths=[64], max_tokens=50, cache_dir=tiny_cache_dir, progress=False)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eval_len": 0}, "eval_len"),
    ({"eval_len": True}, "eval_len"),
    ({"eval_len": 8, "mode": "strided"}, "valid modes: nonoverlapping, sliding"),
    ({"eval_len": 8, "mode": "sliding"}, "needs a stride"),
    ({"eval_len": 8, "mode": "sliding", "stride": 0}, "stride"),
    ({"eval_len": 8, "mode": "sliding", "stride": 9}, "stride"),
    ({"eval_len": 8, "stride": 4}, "nonoverlapping"),
    ({"eval_len": 8, "batch_size": 0}, "batch_size"),
    ({"eval_len": 8, "max_tokens": 0}, "max_tokens"),
    ({"eval_len": 200}, "needs at least 200 scored tokens"),
])
def test_bad_arguments(run, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate_stream(run.model, np.arange(101), None, progress=False, **kwargs)


@pytest.mark.parametrize("stream", [np.array([], dtype=np.int64), np.array([3])])
def test_a_stream_shorter_than_two_tokens_raises(run, stream) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_stream(run.model, stream, None, eval_len=1, progress=False)


def test_bad_run_requests(run, tiny_cache_dir) -> None:
    for lengths in ([], 16, [16, 0]):
        with pytest.raises(ValueError, match="eval_len|lengths"):
            evaluate_run(run, lengths=lengths, cache_dir=tiny_cache_dir)
    with pytest.raises(ValueError, match="stride"):  # checked against every length up front
        evaluate_run(run, lengths=[64, 8], mode="sliding", stride=16, cache_dir=tiny_cache_dir)


def test_unusable_run_dirs_raise_run_error(tiny_alibi_run, tmp_path) -> None:
    with pytest.raises(RunError):
        evaluate_run(tmp_path / "missing", lengths=[16])
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(RunError, match="format"):
        evaluate_run(tmp_path, lengths=[16])
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((Path(tiny_alibi_run) / name).read_bytes())
    with pytest.raises(RunError, match="tokenizer"):
        evaluate_run(no_tok, lengths=[16])


# --- output --------------------------------------------------------------------------------------


def test_json_schema_and_table(run, tiny_cache_dir, tmp_path) -> None:
    records = evaluate_run(run, lengths=[16, 64], mode="sliding", stride=8, per_position=True,
                           rules=("none", "linear"), max_tokens=150, cache_dir=tiny_cache_dir,
                           progress=False)
    path = tmp_path / "out" / "eval.json"
    write_results(path, records)
    loaded = json.loads(path.read_text())
    assert list(loaded) == ["results", "written_by"] and len(loaded["results"]) == 4
    assert not list(path.parent.glob(".*tmp"))  # the temporary file was renamed away
    for r, original in zip(loaded["results"], records):
        assert set(r) == RECORD_KEYS | {"per_position"}
        assert r == original  # floats round-trip through JSON exactly
        assert (r["mode"], r["stride"], r["tokens"]) == ("sliding", 8, 150)
        assert isinstance(r["bytes"], int) and len(r["per_position"]) == r["eval_len"]
    table = format_table(records).splitlines()
    assert table[0].split() == ["position", "scaling", "L", "L'", "mode", "ppl", "bpb", "tokens",
                                "s"]
    assert len(table) == 1 + len(records)
    for line, r in zip(table[1:], records):
        cells = line.split()
        assert cells[:4] == ["alibi", r["scaling"], "32", str(r["eval_len"])]
        assert f"{r['ppl']:.3f}" in cells and f"{r['bpb']:.4f}" in cells and "150" in cells
        assert "S=8" in line
    assert len({len(line) for line in table}) == 1  # aligned: the last column is right-aligned


def test_progress_bar_counts_windows(run, stream, byte_lengths, capsys) -> None:
    evaluate_stream(run.model, stream[:65], byte_lengths, eval_len=16, progress=True)
    err = capsys.readouterr().err  # tqdm redraws at most every 0.1 s: the first frame is certain
    assert "0/4" in err and "window" in err and "L'=16" in err
    evaluate_stream(run.model, stream[:65], byte_lengths, eval_len=16, progress=False)
    assert capsys.readouterr().err == ""


# --- non-finite losses and strict JSON -----------------------------------------------------------


def _constant_logits(value: float, vocab: int = 7):
    """A model whose logits are all ``value`` (nan, inf: a diverged model)."""
    return lambda idx_BT: torch.full((*idx_BT.shape, vocab), value)


def _strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_diverged_model_has_no_perplexity(value: float, tmp_path: Path) -> None:
    stream = np.arange(40) % 7
    r = evaluate_stream(_constant_logits(value), stream, np.ones(7, dtype=np.int64), eval_len=8,
                        per_position=True, progress=False)
    assert math.isnan(r["nll"]) and math.isnan(r["ppl"])  # never "inf", as if merely large
    record = {"position": "alibi", "scaling": "none", "train_len": 8, "split": "valid",
              "skipped": None, **r}
    table = format_table([record])
    assert "not finite" in table.splitlines()[1] and "inf" not in table.splitlines()[1]
    assert "the model's loss is not finite" in table
    path = tmp_path / "eval.json"
    write_results(path, [record])
    (written,) = _strict_json(path.read_text())["results"]
    assert written["ppl"] is written["nll"] is written["bpb"] is None
    assert written["per_position"] == [None] * 8
    assert written["non_finite"] == ["ppl", "bpb", "nll", "per_position"]
    assert written["tokens"] == 39 and written["skipped"] is None


def test_a_perplexity_past_the_float_range_is_called_an_overflow(tmp_path: Path) -> None:
    def confident_and_wrong(idx_BT: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx_BT.shape, 4)
        logits[..., 0] = 2000.0  # always predicts 0: nll ~2000 nats on the other targets
        return logits

    r = evaluate_stream(confident_and_wrong, np.array([1, 2, 3, 1, 2]), None, eval_len=4,
                        progress=False)
    assert math.isfinite(r["nll"]) and r["nll"] > 700 and r["ppl"] == math.inf
    table = format_table([r])
    assert "overflow" in table and "the loss itself is finite" in table
    write_results(tmp_path / "r.json", [r])
    (written,) = _strict_json((tmp_path / "r.json").read_text())["results"]
    assert written["ppl"] is None and written["non_finite"] == ["ppl"]
    assert written["nll"] == r["nll"]


def test_finite_records_have_no_flag(tmp_path: Path) -> None:
    r = evaluate_stream(_constant_logits(0.0), np.arange(20) % 7, None, eval_len=4,
                        progress=False)
    write_results(tmp_path / "r.json", [r])
    (written,) = _strict_json((tmp_path / "r.json").read_text())["results"]
    assert "non_finite" not in written and written["ppl"] == pytest.approx(7.0)


# --- argument types ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eval_len": 8.0}, "eval_len must be a positive integer, got 8.0"),
    ({"eval_len": math.nan}, "eval_len"),
    ({"eval_len": "8"}, "eval_len"),
    ({"eval_len": 8, "stride": 8.0}, "stride must be a positive integer, got 8.0"),
    ({"eval_len": 1, "stride": True}, "stride must be a positive integer, got True"),
    ({"eval_len": 8, "mode": "sliding", "stride": math.inf}, "stride"),
    ({"eval_len": 8, "batch_size": 2.5}, "batch_size"),
    ({"eval_len": 8, "batch_size": math.inf}, "batch_size"),
    ({"eval_len": 8, "max_tokens": 50.0}, "max_tokens"),
    ({"eval_len": 8, "max_tokens": math.nan}, "max_tokens"),
])
def test_wrong_typed_or_non_finite_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate_stream(_constant_logits(0.0), np.arange(101) % 7, None, progress=False, **kwargs)


@pytest.mark.parametrize(("lengths", "rules", "match"), [
    ("128", ("none",), "lengths must be a list"),
    (b"\x80", ("none",), "lengths must be a list"),  # bytes iterate as integers: 128
    ({16, 8}, ("none",), "lengths must be a list"),  # a set has no order for the records
    ((n for n in [8]), ("none",), "lengths must be a list"),
    ([8.0], ("none",), "lengths must be a list whose items are each an integer"),
    ([math.nan], ("none",), "lengths must be a list whose items are each an integer"),
    ([], ("none",), "at least one evaluation length"),
    ([8], [3], "rules must be a list whose items are each a string"),
    ([8], "none", "rules must be a list"),
    ([8], [], "rules must be a non-empty list"),
])
def test_eval_config_rejects_wrong_types(lengths, rules, match) -> None:
    with pytest.raises(ValueError, match=match):
        ev.eval_config(lengths=lengths, rules=rules)


def test_eval_config_takes_any_ordered_list_of_lengths() -> None:
    assert ev.eval_config(lengths=np.array([8, 16])).lengths == (8, 16)
    assert ev.eval_config(lengths=range(8, 10)).lengths == (8, 9)
    base = ev.eval_config(lengths=(np.int64(8),), mode="sliding", stride=4)
    assert ev.eval_config(base, rules=["none", "linear"]) == EvalConfig(
        lengths=(8,), mode="sliding", stride=4, rules=("none", "linear"))
    with pytest.raises(ValueError, match="unknown EvalConfig keys: scalings; valid keys: .*rules"):
        ev.eval_config(base, scalings=["none"])


# --- the output file -----------------------------------------------------------------------------


def test_check_results_path(tmp_path: Path) -> None:
    ev.check_results_path(tmp_path / "new" / "deeper" / "eval.json")  # folders are created later
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # probe removed
    with pytest.raises(ValueError, match="it is a folder; give a file name"):
        ev.check_results_path(tmp_path)
    (tmp_path / "plain").write_text("")
    with pytest.raises(ValueError, match="plain is a file, not a folder"):
        ev.check_results_path(tmp_path / "plain" / "eval.json")
    with pytest.raises(ValueError, match="is a folder"):
        write_results(tmp_path, [])


def test_results_replace_only_earlier_results(tmp_path: Path) -> None:
    record = {"scaling": "none", "eval_len": 32, "ppl": 2.0}
    write_results(tmp_path / "eval.json", [record])
    write_results(tmp_path / "eval.json", [record])  # its own stamp: replaced
    assert json.loads((tmp_path / "eval.json").read_text())["written_by"] == ev.EVAL_JSON
    (tmp_path / "old.json").write_text(json.dumps({"results": [record]}))  # an older release's
    write_results(tmp_path / "old.json", [record])
    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match="notes.txt exists and was not written by linbias eval "
                                         "--json: pass --force"):
        write_results(tmp_path / "notes.txt", [record])
    assert (tmp_path / "notes.txt").read_text() == "my notes"
    write_results(tmp_path / "notes.txt", [record], force=True)
    assert json.loads((tmp_path / "notes.txt").read_text())["results"] == [record]


def test_check_results_path_in_a_read_only_folder(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere a mode allows: use a folder no one can add to
        if not Path("/sys").is_dir():
            pytest.skip("needs /sys, or a user other than root")
        folder = Path("/sys")
    else:
        folder = tmp_path
        folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=f"{folder} is not writable"):
            ev.check_results_path(folder / "eval.json")
    finally:
        tmp_path.chmod(0o700)


def test_one_config_names_the_protocol(run) -> None:
    with pytest.raises(ValueError, match="retrieval needs a task: give task='passkey'"):
        ev.evaluate_run_task(run, lengths=[320], progress=False)
    config = EvalConfig(lengths=(320,), task="passkey", depths=(50.0,), trials=2)
    assert ev.evaluate_run(run, config, progress=False) == \
        ev.evaluate_run_task(run, lengths=[320], task="passkey", depths=[50], trials=2,
                             progress=False)
    with pytest.raises(ValueError, match="asks for retrieval, not perplexity"):
        ev.evaluate_model(ev.RunModel(run), np.arange(400), None, config, data="x")
