"""linbias.harness: lm-eval's model ``linbias``, linbias's lm-eval tasks and ``linbias harness``.

References, independent of the code under test: the run's own GPT forward in float64 log-softmax
(loglikelihood, rolling windows written out by hand), greedy decoding that recomputes the whole
sequence each step (exact for a one-layer ALiBi model, see DESIGN.md), ``rouge_score`` called
directly on lm-eval's logged generations, and ``linbias.evaluate.evaluate_run`` for retrieval.
"""

from __future__ import annotations

import functools
import json
import random
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the harness tests need linbias[test] (lm-eval)")
pytest.importorskip("rouge_score", reason="the harness tests need linbias[test] (rouge-score)")
pytest.importorskip("transformers")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402

from linbias import hf  # noqa: E402
from linbias.cli import main  # noqa: E402
from linbias.harness import TASKS_DIR, require_harness  # noqa: E402
from linbias.harness.lm import LinbiasLM  # noqa: E402
from linbias.harness.task_data import QMSUM_SAMPLE, qmsum_dataset  # noqa: E402
from linbias.runs import load_run  # noqa: E402

L = 32  # the tiny run's training length


@pytest.fixture(scope="module")
def meeting_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer ALiBi run (L = 32) trained briefly on the QMSum sample's own sentences and its
    questions with their answers, so its greedy generations after "Answer:" are words of that
    text (non-zero ROUGE), not one repeated byte."""
    from linbias.config import model_config
    from linbias.train import TrainConfig, train

    rows = [json.loads(line) for line in QMSUM_SAMPLE.read_text().splitlines()]
    sentences = [s for r in rows for s in r["input"].split("\n") if s]
    answers = [f"Question: {r['input'].split(chr(10))[0]}\nAnswer: {r['output']}" for r in rows]
    rng = random.Random(0)
    text = "\n".join(rng.choice(sentences if i % 3 else answers) for i in range(3000))
    corpus = tmp_path_factory.mktemp("meetings") / "meetings.txt"
    corpus.write_text(text, encoding="utf-8")
    torch.manual_seed(0)
    config = model_config("tiny", position="alibi", train_len=L, n_layers=1, d_model=64, n_heads=4)
    train_config = TrainConfig(data=f"text:{corpus}", vocab_size=400, steps=60, batch_size=16,
                               eval_every=0, save_every=0, warmup=5, lr=3e-3)
    out = tmp_path_factory.mktemp("meeting_run") / "run"
    return train(config, train_config, out, progress=False,
                 cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def meeting_export(meeting_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf.export_to_hf(meeting_run, tmp_path_factory.mktemp("meeting_export") / "hf")


def _tasks() -> TaskManager:
    """linbias's tasks only: indexing lm-eval's own hundreds of tasks takes tens of seconds."""
    return TaskManager(include_defaults=False, include_path=str(TASKS_DIR))


def _req(kind: str, *args: object) -> Instance:
    return Instance(kind, {}, tuple(args), 0)


def _ref_logprobs(run, ids: list[int], rule: str) -> torch.Tensor:
    """``[T, V]`` float64 log-probabilities of the run's plain forward over ``ids`` (no padding)."""
    with torch.no_grad(), run.model.scaled(rule):
        return torch.log_softmax(run.model(torch.tensor([ids])).double()[0], dim=-1)


# --- the model: loglikelihood, rolling, generation ------------------------------------------------


@pytest.mark.parametrize("rule", ["none", "linear"])
def test_loglikelihood_matches_forward(meeting_run, rule):
    run, max_length = load_run(meeting_run), 2 * L
    lm = LinbiasLM(run=str(meeting_run), rule=rule, max_length=max_length, batch_size=2,
                   device="cpu")
    encode = lambda s: run.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    pairs = [("Project Manager: The budget", " is twelve euros."),
             ("Marketing:" + " Our survey asked one hundred users." * 6, " Marketing:"),
             ("User", " Interface: I will prepare drawings.")]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        ctx, cont = encode(context), encode(context + continuation)[len(encode(context)):]
        ids = (ctx + cont)[-(max_length + 1):]  # past L' the context is cut on the left
        logp_TV = _ref_logprobs(run, ids[:-1], rule)[-len(cont):]
        target = torch.tensor(cont)
        assert logp == pytest.approx(float(logp_TV.gather(-1, target[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logp_TV.argmax(-1) == target).all())
    assert len(encode(pairs[1][0])) > max_length  # the truncation was exercised


def test_loglikelihood_rolling_matches_windows(meeting_run):
    run, max_length = load_run(meeting_run), 2 * L
    lm = LinbiasLM(run=str(meeting_run), rule="linear", max_length=max_length, batch_size=3,
                   device="cpu")
    text = QMSUM_SAMPLE.read_text().splitlines()[1]
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    seq = [lm.eot_token_id] + run.tokenizer.encode(text, add_special_tokens=False).ids
    # Targets seq[s+1 : e+1] in spans of L', each read from the L' tokens before its last target.
    total, n = 0.0, len(seq) - 1
    for s in range(0, n, max_length):
        e = min(s + max_length, n)
        window = seq[max(0, e - max_length) : e]
        logp = _ref_logprobs(run, window, "linear")[-(e - s):]
        total += float(logp.gather(-1, torch.tensor(seq[s + 1 : e + 1])[:, None]).sum())
    assert n > 2 * max_length
    assert got == pytest.approx(total, abs=1e-3)


def _greedy_recompute(run, prompt: list[int], n: int, rule: str, eot: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence at every step, no cache."""
    ids = list(prompt)
    for _ in range(n):
        tok = int(_ref_logprobs(run, ids, rule)[-1].argmax())
        if tok == eot:
            break
        ids.append(tok)
    return ids[len(prompt):]


def test_generate_until_uses_the_cache_and_matches_recompute(meeting_run):
    run = load_run(meeting_run)
    lm = LinbiasLM(run=str(meeting_run), rule="linear", max_length=3 * L, batch_size=2,
                   device="cpu")
    prompts = ["Project Manager: We will meet again", "Marketing: " + "I will check. " * 8]
    encode = lambda s: run.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    n = 24
    refs = [run.tokenizer.decode(_greedy_recompute(run, encode(p), n, "linear", lm.eot_token_id))
            for p in prompts]
    calls = []
    step = lm.backend.step
    lm.backend.step = lambda ids, mask, cache: calls.append(ids.shape) or step(ids, mask, cache)
    got = lm.generate_until([_req("generate_until", p, {"until": [], "max_gen_toks": n})
                             for p in prompts])
    assert got == refs
    assert len(encode(prompts[1])) + n > L  # generation ran past L
    assert calls[0][1] > 1 and all(shape == (2, 1) for shape in calls[1:])  # one token per step
    # A stop sequence cuts the text where it first appears, as lm-eval's HFLM cuts it.
    stop = refs[0][len(refs[0]) // 2 :][:3]
    (cut,) = lm.generate_until([_req("generate_until", prompts[0],
                                     {"until": [stop], "max_gen_toks": n})])
    assert stop and cut == refs[0].split(stop)[0]


def test_batched_left_padding_changes_nothing(meeting_run):
    requests = [_req("generate_until", p, {"until": ["\n"], "max_gen_toks": 12})
                for p in ("Marketing:", "Project Manager: So we agree to keep", "Industrial")]
    one = LinbiasLM(run=str(meeting_run), max_length=2 * L, batch_size=1, device="cpu")
    three = LinbiasLM(run=str(meeting_run), max_length=2 * L, batch_size=3, device="cpu")
    assert three.generate_until(requests) == one.generate_until(requests)


def test_bad_arguments_are_one_line_errors(meeting_run, meeting_export):
    with pytest.raises(ValueError, match="run=PATH .* or pretrained="):
        LinbiasLM(run=str(meeting_run), pretrained=str(meeting_export))
    with pytest.raises(ValueError, match="valid rules"):
        LinbiasLM(run=str(meeting_run), rule="bogus")
    with pytest.raises(ValueError, match="train_len applies to pretrained"):
        LinbiasLM(run=str(meeting_run), train_len=8)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        LinbiasLM(run=str(meeting_run), max_length=0)
    lm = LinbiasLM(run=str(meeting_run), max_length=16, device="cpu")
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        lm.generate_until([_req("generate_until", "Marketing:", {"max_gen_toks": 16})])
    with pytest.raises(ValueError, match="does not take top_p"):
        lm.generate_until([_req("generate_until", "Marketing:", {"top_p": 0.9})])


def test_missing_extra_names_the_install_command(monkeypatch, meeting_run, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs lm-eval: pip install 'linbias\[harness\]'"):
        require_harness()
    assert main(["harness", str(meeting_run), "--tasks", "linbias_qmsum", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'linbias[harness]'" in err


# --- QMSum in SCROLLS' format, end to end through lm-eval ----------------------------------------


def _rouge_by_hand(samples: list[dict]) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    best = {"rouge1": [], "rouge2": [], "rougeL": []}
    for s in samples:
        scores = [scorer.score(ref, s["filtered_resps"][0]) for ref in s["doc"]["outputs"]]
        for name, kind in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rougeLsum")):
            best[name].append(100 * max(sc[kind].fmeasure for sc in scores))
    return {k: sum(v) / len(v) for k, v in best.items()}


def test_qmsum_sample_end_to_end_run_and_export(meeting_run, meeting_export):
    """The issue's check: the sample through lm-eval on a run and on its export, at L' = 2L with
    and without a rule; lm-eval's ROUGE is rouge_score's on the generations; same generations."""
    generations, rouge1 = {}, {}
    for rule in ("none", "linear"):
        for name, source in (("run", {"run": str(meeting_run)}),
                             ("export", {"pretrained": str(meeting_export)})):
            lm = LinbiasLM(**source, rule=rule, max_length=2 * L, device="cpu", batch_size=2)
            out = lm_eval.simple_evaluate(model=lm, tasks=["linbias_qmsum"], task_manager=_tasks(),
                                          gen_kwargs="max_gen_toks=16", log_samples=True)
            samples = out["samples"]["linbias_qmsum"]
            result = out["results"]["linbias_qmsum"]
            for metric, value in _rouge_by_hand(samples).items():
                assert result[f"{metric},none"] == pytest.approx(value, abs=1e-9)
            generations[rule, name] = [s["filtered_resps"][0] for s in samples]
            rouge1[rule, name] = result["rouge1,none"]
            prompt_tokens = [len(lm.tok_encode(f"{s['doc']['text']}\n\nQuestion: "
                                               f"{s['doc']['question']}\nAnswer:"))
                             for s in samples]
            assert min(prompt_tokens) > 2 * L  # every prompt was cut to L' - 16 > L tokens
        assert generations[rule, "run"] == generations[rule, "export"]
    assert len(generations["none", "run"]) == len(qmsum_dataset()["test"]) == 4
    assert max(rouge1.values()) > 0  # the comparison above is not 0 == 0
    assert all(any(g.strip() for g in gens) for gens in generations.values())


def test_qmsum_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "input": "no blank line", "output": "x"}\n')
    with pytest.raises(ValueError, match="no blank line between the query"):
        qmsum_dataset(qmsum_file=str(bad))
    bad.write_text('{"id": "a", "input": 3}\n')
    with pytest.raises(ValueError, match="string fields id, input and output"):
        qmsum_dataset(qmsum_file=str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        qmsum_dataset(qmsum_file=str(tmp_path / "absent.jsonl"))
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": "m", "input": "Q?\n\nA: hi", "output": o}) + "\n"
                           for o in ("first", "second")))
    (doc,) = qmsum_dataset(qmsum_file=str(dup))["test"]
    assert doc["outputs"] == ["first", "second"] and doc["question"] == "Q?"


# --- retrieval tasks: the prompts and accuracy of linbias eval --task ----------------------------


@pytest.mark.parametrize("task", ["passkey", "lines"])
def test_retrieval_task_equals_linbias_eval(meeting_run, task):
    from linbias.evaluate import evaluate_run
    from linbias.tasks import encoder, make_trials

    run = load_run(meeting_run)
    cells = {"lengths": [360], "depths": [0.0, 100.0], "trials": 3, "seed": 5}
    lm = LinbiasLM(run=str(meeting_run), rule="linear", max_length=400, batch_size=3,
                   device="cpu")
    manager = TaskManager(include_defaults=False, include_path=str(TASKS_DIR),
                          metadata={"run": str(meeting_run), **cells})
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"linbias_{task}"], task_manager=manager,
                                  log_samples=True)
    samples = out["samples"][f"linbias_{task}"]
    records = evaluate_run(run, task=task, rules=["linear"], filler="sentences",
                           batch_size=3, progress=False, **cells)
    correct = sum(r["correct"] for r in records)
    assert out["results"][f"linbias_{task}"]["acc,none"] == pytest.approx(
        correct / sum(r["n"] for r in records))
    # The documents are linbias's trials, token for token.
    from linbias.evaluate import cell_seed

    encode = encoder(run.tokenizer)
    trials = [t for length in cells["lengths"] for d in cells["depths"]
              for t in make_trials(task, encode, length, d, cells["trials"],
                                   cell_seed(cells["seed"], length, d))]
    assert len(samples) == len(trials)
    by_doc = {s["doc"]["context"]: s for s in samples}
    for trial in trials:
        s = by_doc[encode.decode(trial.prompt_ids)]
        assert s["doc"]["tokens_match"]
        assert encode(s["doc"]["context"] + s["doc"]["answer"]) == list(
            trial.prompt_ids + trial.answer_ids)
        # lm-eval scored exactly these tokens: its log-likelihood is the run's own.
        ids = list(trial.prompt_ids + trial.answer_ids)
        logp = _ref_logprobs(run, ids[:-1], "linear")[-len(trial.answer_ids):]
        expected = float(logp.gather(-1, torch.tensor(trial.answer_ids)[:, None]).sum())
        assert s["filtered_resps"][0][0] == pytest.approx(expected, abs=1e-3)


# --- registration, packaging and the command line -------------------------------------------------


def test_install_registers_model_and_tasks(monkeypatch):
    from lm_eval.api.registry import get_model, model_registry
    from lm_eval.tasks import manager

    from linbias.harness.plugin import install

    monkeypatch.setattr(manager.TaskManager, "__init__", manager.TaskManager.__init__)
    install()
    install()  # idempotent
    assert get_model("linbias") is LinbiasLM and "linbias" in model_registry
    names = manager.TaskManager(include_defaults=False).all_tasks
    assert {"linbias_qmsum", "linbias_passkey", "linbias_lines"} <= set(names)


def test_pyproject_declares_plugin_and_task_files():
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["lm_eval.models"]["linbias"]
    module, _, name = target.partition(":")
    import importlib

    assert getattr(importlib.import_module(module), name) is LinbiasLM
    patterns = project["tool"]["setuptools"]["package-data"]["linbias.harness"]
    shipped = {p.name for pattern in patterns for p in TASKS_DIR.parent.glob(pattern)}
    assert shipped == {p.name for p in TASKS_DIR.iterdir() if p.suffix in (".yaml", ".jsonl")}
    assert {"linbias_qmsum.yaml", "qmsum_sample.jsonl"} <= shipped
    extras = project["project"]["optional-dependencies"]
    assert {"lm-eval==0.4.13", "rouge-score==0.1.2"} <= set(extras["harness"]) & set(extras["test"])


def test_cli_harness_writes_results_and_table(meeting_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(TaskManager, include_defaults=False))
    out = tmp_path / "out"
    assert main(["harness", str(meeting_run), "--tasks", "linbias_qmsum", "--scaling",
                 "none,linear", "--max-length", str(2 * L), "--limit", "2", "--gen-kwargs",
                 "max_gen_toks=8", "--device", "cpu", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    for rule in ("none", "linear"):
        results = json.loads((out / rule / "results.json").read_text())
        assert results["linbias"]["rule"] == rule and results["linbias"]["max_length"] == 2 * L
        assert len(results["samples"]["linbias_qmsum"]) == 2
        assert results["results"]["linbias_qmsum"]["rouge1,none"] >= 0
    row = next(line for line in table.splitlines() if "rouge1" in line)
    values = [json.loads((out / r / "results.json").read_text())["results"]["linbias_qmsum"]
              ["rouge1,none"] for r in ("none", "linear")]
    assert row == "| linbias_qmsum | rouge1 | " + " | ".join(f"{v:.4g}" for v in values) + " |"
    assert "table.md" in capsys.readouterr().out
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    assert main(["harness", str(meeting_run), "--tasks", "linbias_qmsum",
                 "--out", str(tmp_path / "foreign")]) == 2
    (tmp_path / "users" / "none").mkdir(parents=True)  # a rule's name, someone else's file
    (tmp_path / "users" / "none" / "results.json").write_text('{"mine": 1}')
    for target, message in [(tmp_path / "users", "holds files this command did not write"),
                            (meeting_run / "h", "is inside")]:
        assert main(["harness", str(meeting_run), "--tasks", "linbias_qmsum",
                     "--out", str(target)]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "users" / "none" / "results.json").read_text() == '{"mine": 1}'
    assert not (meeting_run / "h").exists()
