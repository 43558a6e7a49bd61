"""reproduce touches only what it can prove it wrote, and checks every argument first."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import linbias.reproduce as reproduce_mod
from linbias.data import split_of
from linbias.config import ReproducePreset
from linbias.reproduce import preset_run, reproduce
from linbias.train import train
from linbias.runs import RunError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("corpus")
    counts = {"train": 0, "valid": 0, "test": 0}
    i = 0
    while min(counts.values()) < 2 or counts["train"] < 30:
        text = f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 30
        split = split_of(text)  # a file's split follows its text or its name: make them agree
        if split == split_of(f"f{i}.py") and (split == "train" or counts[split] < 2):
            (root / f"f{i}.py").write_text(text)
            counts[split] += 1
        i += 1
    return f"text:{root}"


@pytest.fixture
def run(tmp_path_factory, corpus, monkeypatch):
    """``run(out, **kwargs)``: reproduce a 2-step ALiBi-only experiment into ``out``."""
    preset = ReproducePreset(model="tiny", train_len=16, steps=2, batch_size=2, warmup=1,
                             vocab_size=300, multiples=(1,), eval_tokens=64)
    monkeypatch.setitem(reproduce_mod.REPRODUCE_PRESETS, "unit", preset)
    cache = tmp_path_factory.getbasetemp() / "reproduce_cache"

    def run(out: Path, preset: str = "unit", **kwargs):
        defaults = dict(data=corpus, cache_dir=cache, progress=False, log=lambda s: None,
                        positions=("alibi",))
        return reproduce(preset, out, **{**defaults, **kwargs})
    return run


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("force", [False, True])
def test_a_users_folder_in_runs_is_never_deleted(tmp_path, run, force):
    mine = tmp_path / "report" / "runs" / "alibi-seed0"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(RunError, match=r"runs/alibi-seed0.*config.json is missing.*choose another --out"):
        run(tmp_path / "report", force=force)
    assert _files(tmp_path / "report") == {"runs/alibi-seed0/notes.txt": b"my notes"}


def test_a_run_of_other_settings_is_an_error_and_force_replaces_it(tmp_path, run, monkeypatch):
    out = tmp_path / "report"
    run(out)
    longer = dataclasses.replace(reproduce_mod.REPRODUCE_PRESETS["unit"], steps=3)
    monkeypatch.setitem(reproduce_mod.REPRODUCE_PRESETS, "unit-3", longer)
    before = _files(out)
    with pytest.raises(RunError, match=r"runs/alibi-seed0 holds a linbias run trained with other "
                                       r"settings \(steps \(saved 2, given 3\)\).*--force"):
        run(out, preset="unit-3")
    assert _files(out) == before
    run(out, preset="unit-3", force=True)
    assert json.loads((out / "runs/alibi-seed0/config.json").read_text())["train"]["steps"] == 3

    (out / "runs/alibi-seed0/notes.txt").write_text("my notes")  # now not only a run
    before = _files(out)
    with pytest.raises(RunError, match=r"files a linbias run does not write: notes.txt"):
        run(out, force=True)
    assert _files(out) == before


def test_a_run_that_never_saved_a_checkpoint_is_restarted(tmp_path, run):
    out = tmp_path / "report"
    run(out)
    for name in ("checkpoint.json", "model.safetensors", "eval.json"):
        (out / "runs/alibi-seed0" / name).unlink()
    for state in (out / "runs/alibi-seed0").glob("state-*"):
        state.unlink()
    results = run(out)
    assert results["training"][0]["steps"] == 2 and (out / "runs/alibi-seed0/checkpoint.json").is_file()


@pytest.mark.parametrize("bad", [
    dict(preset="huge"), dict(positions=("alibi", "xpos")), dict(positions=()),
    dict(positions=("alibi", "alibi")), dict(seed=-1), dict(seed=1.5), dict(data="nosuch:corpus"),
    dict(embedding="bert"),
])
def test_every_argument_is_checked_before_anything_is_removed(tmp_path, run, bad):
    out = tmp_path / "report"
    out.mkdir()
    (out / "runs" / "alibi-seed0").mkdir(parents=True)
    meta = {"format": "linbias-run/1", "model": {}, "train": {}}  # a run --force may replace
    (out / "runs" / "alibi-seed0" / "config.json").write_text(json.dumps(meta))
    before = _files(out)
    with pytest.raises(ValueError):
        run(out, force=True, **bad)
    assert _files(out) == before
    with pytest.raises(ValueError):
        run(tmp_path / "new", **bad)
    assert not (tmp_path / "new").exists()


def test_out_that_is_a_file_is_refused(tmp_path, run):
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "report"):
        with pytest.raises(RunError, match="is a file.*choose another --out"):
            run(out)
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("name", ["report.md", "results.json", "ppl_vs_length.png"])
def test_a_report_file_reproduce_did_not_write_is_not_replaced(tmp_path, run, name):
    out = tmp_path / "report"
    out.mkdir()
    (out / name).write_text("{}")
    with pytest.raises(RunError, match=rf"{name} was not written by linbias reproduce"):
        run(out)
    assert _files(out) == {name: b"{}"}


def test_its_own_report_files_are_replaced(tmp_path, run):
    out = tmp_path / "report"
    run(out)
    (out / "results.json").write_text((out / "results.json").read_text().replace('"seed": 0', '"seed": 7'))
    run(out)
    assert json.loads((out / "results.json").read_text())["seed"] == 0


def test_reproduce_end_to_end_reuses_and_forces(tmp_path, corpus, monkeypatch):
    preset = ReproducePreset(model="tiny", train_len=16, steps=4, batch_size=2, warmup=1,
                             vocab_size=300, multiples=(1, 2, 4), eval_tokens=256)
    monkeypatch.setitem(reproduce_mod.REPRODUCE_PRESETS, "unit", preset)
    out = tmp_path / "report"
    kwargs = dict(data=corpus, cache_dir=tmp_path / "cache", progress=False, log=lambda s: None)
    results = reproduce("unit", out, **kwargs)

    assert {p.name for p in out.iterdir()} >= {"results.json", "report.md", "ppl_vs_length.png", "runs"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["finding"] == results["finding"]
    keys = {"position", "scaling", "train_len", "eval_len", "mode", "stride", "ppl", "bpb", "tokens", "seconds"}
    assert all(keys <= set(r) for r in saved["results"])
    got = {(r["position"], r["scaling"], r["eval_len"]) for r in saved["results"]}
    for rule in ("none", "linear", "sqrt", "log"):
        assert {("alibi", rule, n) for n in (16, 32, 64)} <= got
    assert ("rotary", "linear", 64) in got and ("t5", "none", 32) in got
    learned = {r["eval_len"]: r for r in saved["results"] if r["position"] == "learned"}
    assert learned[16]["ppl"] is not None and learned[32]["ppl"] is None and learned[32]["skipped"]
    assert len(saved["training"]) == 6 and all(t["tokens"] == 4 * 2 * 16 for t in saved["training"])
    report = (out / "report.md").read_text()
    assert "| alibi + linear |" in report and "How it was made" in report
    assert "Where the loss goes" in report and "| alibi + linear | " in report.split("Where the loss goes")[1]

    calls = []
    for name in ("train", "evaluate_run"):
        real = getattr(reproduce_mod, name)
        monkeypatch.setattr(reproduce_mod, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    again = reproduce("unit", out, **kwargs)
    assert calls == [] and again["results"] == results["results"]
    reproduce("unit", out, force=True, positions=("alibi",), **kwargs)
    assert calls == ["train", "evaluate_run"]


def test_a_run_trained_in_chunks_where_preset_run_says_is_reused(tmp_path, tmp_path_factory, run,
                                                                 corpus, monkeypatch):
    # benchmarks/retrieval_budget.py trains the study's runs in chunks, scoring each checkpoint;
    # reproduce must then reuse them as they are. The preset's depth replaces the model preset's.
    deep = dataclasses.replace(reproduce_mod.REPRODUCE_PRESETS["unit"], n_layers=3)
    monkeypatch.setitem(reproduce_mod.REPRODUCE_PRESETS, "unit-deep", deep)
    out, cache = tmp_path / "study", tmp_path_factory.getbasetemp() / "reproduce_cache"
    run_dir, mc, tc = preset_run(out, "alibi", "unit-deep", 0, data=corpus)
    assert mc.n_layers == 3 and tc.steps == 2
    for chunk in range(2):
        train(mc, tc, run_dir, resume=chunk > 0, progress=False, cache_dir=cache, stop_after=1)
    calls = []
    real = reproduce_mod.train
    monkeypatch.setattr(reproduce_mod, "train", lambda *a, **k: calls.append(a) or real(*a, **k))
    results = run(out, preset="unit-deep")
    assert calls == [] and results["training"][0]["run"] == str(run_dir)
    assert "preset `tiny` with 3 layers" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="unknown reproduce preset 'nope'"):
        preset_run(out, "alibi", "nope", 0)


def test_reproduce_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="quick"):
        reproduce("huge", tmp_path)
    with pytest.raises(ValueError, match="alibi"):
        reproduce("quick", tmp_path, positions=("xpos",))


def test_seeds_train_each_method_per_seed_and_report_the_mean(tmp_path, run):
    out = tmp_path / "report"
    lines = []
    results = run(out, seeds=2, seed=3, log=lines.append)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["alibi-seed3", "alibi-seed4"]
    assert [t["seed"] for t in results["training"]] == [3, 4]
    assert {r["seed"] for r in results["results"]} == {3, 4}
    one = {r["seed"]: r["ppl"] for r in results["results"] if r["scaling"] == "none"}
    mean = (one[3] + one[4]) / 2
    f = results["finding"]["alibi"]
    assert f["ppl_at_L"] == pytest.approx(mean)
    report = (out / "report.md").read_text()
    low, high = sorted(one.values())
    assert f"| alibi | {mean:.2f} ({low:.2f}–{high:.2f}) |" in report
    assert "mean over 2 seeds" in report and "--seeds 2" in report
    assert results["machine"]["precision"] == "float32"
    assert results["machine"]["cpu_capability"] in report
    assert any("2 models" in x and "to train" in x for x in lines)
    assert any("1 of 2 models done" in x and "left" in x for x in lines)
    with pytest.raises(ValueError, match="seeds"):
        run(out, seeds=0)


def test_presets_are_float32_and_keep_every_t5_bucket_trained():
    from linbias.positions import t5_untrained_buckets

    for name, p in reproduce_mod.REPRODUCE_PRESETS.items():
        assert not p.bf16, name  # the numbers must not depend on the CPU's bf16 support
        mc = reproduce_mod._configs("t5", p, "stdlib", 0)[0]
        assert t5_untrained_buckets(mc.train_len, mc.t5_buckets, mc.t5_max_distance) == [], name


def test_the_embedding_convention_replaces_the_presets_and_is_reported(tmp_path, run, corpus):
    results = run(tmp_path / "report", embedding="fairseq")
    saved = json.loads((tmp_path / "report/runs/alibi-seed0/config.json").read_text())
    assert saved["model"]["embedding"] == "fairseq" and results["preset"]["embedding"] == "fairseq"
    report = (tmp_path / "report/report.md").read_text()
    assert f"--preset unit --seeds 1 --data {corpus} --positions alibi --embedding fairseq --out OUT" \
        in report
    assert "`fairseq` convention" in report and "whole files split about 98/1/1%" in report
    assert results["corpus"]["split_by"] == "file"


def test_a_retrieval_preset_mixes_the_task_and_reports_accuracy_and_k_max(tmp_path, run,
                                                                         monkeypatch):
    preset = ReproducePreset(model="tiny", train_len=320, steps=2, batch_size=2, warmup=1,
                             vocab_size=300, multiples=(1, 2), eval_tokens=700, task="passkey",
                             task_fraction=0.5, depths=(0.0, 100.0), trials=2, profile_windows=1,
                             profile_multiple=2, sliding_tokens=640, map_distances=(120, 450),
                             map_trials=1)
    monkeypatch.setitem(reproduce_mod.REPRODUCE_PRESETS, "unit-passkey", preset)
    out = tmp_path / "report"
    results = run(out, preset="unit-passkey", seeds=2, positions=("alibi", "learned"))
    saved = json.loads((out / "runs/alibi-seed0/config.json").read_text())["train"]
    assert (saved["mix_task"], saved["mix_fraction"]) == ("passkey", 0.5)
    cells = results["retrieval"]
    # 2 seeds x (alibi: 4 rules, learned: 1) x 2 lengths x 2 depths
    assert len(cells) == 2 * 5 * 2 * 2 and {r["seed"] for r in cells} == {0, 1}
    learned = [r for r in cells if r["position"] == "learned"]
    assert all(bool(r["skipped"]) == (r["length"] == 640) for r in learned)
    summary = {(s["position"], s["scaling"]): s for s in results["retrieval_summary"]}
    pooled = [r for r in cells if (r["position"], r["scaling"], r["length"]) == ("alibi", "none", 320)]
    expected = sum(r["correct"] for r in pooled) / sum(r["n"] for r in pooled)
    first = summary["alibi", "none"]["by_length"][0]
    assert first["length"] == 320 and first["accuracy"] == pytest.approx(expected)
    assert isinstance(first["k_max"], int)
    report = (out / "report.md").read_text()
    assert "## Retrieval past L: passkey" in report and "| alibi + linear |" in report
    assert "4 trials per cell" in report and "| learned |" in report
    assert (out / "retrieval.png").read_bytes().startswith(b"\x89PNG")
    profile = results["attention_profile"]  # 2 seeds x 5 rules x layers x heads x 4 distances
    layers, heads = 2, 4
    assert len(profile) == 2 * 4 * layers * heads * 4  # alibi's 4 rules; learned cannot run 2L
    assert {r["distance"] for r in profile} == {80, 160, 320, 640}
    assert all(0.0 <= r["share"] <= 1.0 for r in profile)
    assert "## Where the model looks" in report and (out / "attention_profile.png").is_file()
    sliding = results["sliding"]  # L'=320 only (at most half of 640 tokens), rule none
    assert sorted((r["position"], r["mode"]) for r in sliding if r["seed"] == 0) == [
        ("alibi", "nonoverlapping"), ("alibi", "sliding"), ("learned", "nonoverlapping"),
        ("learned", "sliding")]
    assert all(r["tokens"] == 640 and r["eval_len"] == 320 for r in sliding)
    assert "## Sliding window against non-overlapping windows" in report
    # The needle map: 2 seeds x (alibi: 4 rules, learned: 1) x 2 lengths x 2 distances, then two
    # controls (the instruction left out or within L) at the nearest distance.
    needles = results["needle_map"]
    grid = [r for r in needles if r["instruction"] == "start"]
    assert len(grid) == 2 * 5 * 2 * 2
    controls = [r for r in needles if r["instruction"] != "start"]
    assert {r["instruction"] for r in controls} == {320, "none"}
    assert len(controls) == 2 * 5 * 2 * 2 and all(r["distance"] == 120 for r in controls)
    alibi = [r for r in grid if r["position"] == "alibi"]
    assert {(r["length"], r["distance"]) for r in alibi if r["skipped"]} == {(320, 450)}
    done = [r for r in alibi if not r["skipped"]]
    assert all(np.asarray(r["key_mass"]).shape == (layers, heads) for r in done)
    assert all(0 <= k <= m + 1e-6 <= 1 + 1e-6 for r in done
               for k, m in zip(np.ravel(r["key_mass"]), np.ravel(r["needle_mass"])))
    assert "## Dilution or reach: the needle map" in report and "`alibi + linear`:" in report
    assert "What else the model needs in view" in report
    for name in ("needle_map.png", "needle_heads.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    again = run(out, preset="unit-passkey", seeds=2, positions=("alibi", "learned"))
    assert again["retrieval"] == cells  # reused from each run's retrieval.json
    assert again["attention_profile"] == profile and again["sliding"] == sliding
    assert again["needle_map"] == needles


def test_a_preset_runs_its_own_rules_where_the_method_has_them() -> None:
    from linbias.report import _rules_words

    p = ReproducePreset(model="tiny", train_len=16, steps=2, batch_size=2,
                        rules=("none", "cap", "window:2", "yarn"))
    assert reproduce_mod._rules("alibi", p) == ["none", "cap", "window:2"]
    assert reproduce_mod._rules("rotary", p) == ["none", "yarn"]
    assert reproduce_mod._rules("t5", p) == ["none"]
    words = _rules_words(p)
    assert "`cap` (LM-Infinite's distance ceiling" in words and "`yarn` (YaRN" in words
    with pytest.raises(ValueError, match="rules must start with 'none'"):
        ReproducePreset(model="tiny", train_len=16, steps=2, batch_size=2, rules=("linear",))


def test_the_fine_tune_study_trains_evaluates_and_reuses(tmp_path, run, monkeypatch):
    preset = ReproducePreset(model="tiny", train_len=16, steps=2, batch_size=2, warmup=1,
                             vocab_size=300, multiples=(1, 2), eval_tokens=128,
                             finetune_steps=(0, 2), finetune_multiple=2, finetune_batch_size=2,
                             finetune_warmup=1)
    monkeypatch.setitem(reproduce_mod.REPRODUCE_PRESETS, "unit-ft", preset)
    out = tmp_path / "report"
    results = run(out, preset="unit-ft", positions=("alibi", "learned", "none"))
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["alibi-seed0", "alibi-seed0-ft2x-fixed-2", "alibi-seed0-ft2x-plain-2",
                    "learned-seed0", "none-seed0", "none-seed0-ft2x-plain-2"]
    child = json.loads((out / "runs/alibi-seed0-ft2x-fixed-2/config.json").read_text())
    assert child["model"]["train_len"] == 32 and child["model"]["position_scale"] == 0.5
    assert child["train"]["init_from"] == str(out / "runs/alibi-seed0")
    rows = {(r["position"], r["mode"], r["steps"], r["scaling"]): r for r in results["finetune"]}
    assert set(rows) == {(pos, mode, steps, rule) for pos, mode, rule in (
        ("alibi", "plain", "none"), ("alibi", "plain", "linear"), ("alibi", "fixed", "none"),
        ("alibi", "fixed", "linear"), ("none", "plain", "none")) for steps in (0, 2)}
    assert all(set(r["ppl"]) == {"32", "128"} for r in rows.values())
    # 0 steps is the parent at L2 = 2L: with fixed slopes (x 1/2) it is the parent under the
    # linear rule there; plain, the parent without a rule.
    parent = {(r["eval_len"], r["scaling"]): r["ppl"] for r in results["results"]
              if r["position"] == "alibi"}
    assert rows["alibi", "fixed", 0, "none"]["ppl"]["32"] == pytest.approx(parent[32, "linear"])
    assert rows["alibi", "plain", 0, "none"]["ppl"]["32"] == pytest.approx(parent[32, "none"])
    report = (out / "report.md").read_text()
    assert "## Fine-tuned at 32 = 2L" in report and "`learned` is left out" in report
    assert (out / "finetune.png").read_bytes().startswith(b"\x89PNG")
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*")}
    assert run(out, preset="unit-ft", positions=("alibi", "learned", "none"))["finetune"] == \
        results["finetune"]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*")} == before  # all reused


def test_fine_tuned_models_get_their_rules_and_the_needle_map(tmp_path, run, monkeypatch):
    preset = ReproducePreset(model="tiny", train_len=320, steps=2, batch_size=2, warmup=1,
                             vocab_size=300, multiples=(1, 4), eval_tokens=700,
                             rules=("none",), map_distances=(120, 700), map_trials=1,
                             finetune_steps=(2,), finetune_multiple=2, finetune_batch_size=1,
                             finetune_warmup=1, finetune_rules=("none", "cap"))
    monkeypatch.setitem(reproduce_mod.REPRODUCE_PRESETS, "unit-ftmap", preset)
    out = tmp_path / "report"
    results = run(out, preset="unit-ftmap", positions=("alibi",))
    # The fine-tune rules, where the method has them (the preset's own rules are only "none").
    assert {(r["mode"], r["scaling"]) for r in results["finetune"]} == {
        (mode, rule) for mode in ("plain", "fixed") for rule in ("none", "cap")}
    # A map per fine-tuned model under each rule, without the instruction controls.
    fmap = results["finetune_map"]
    assert all(r["instruction"] == "start" and r["seed"] == 0 and r["steps"] == 2 for r in fmap)
    cells = {(r["mode"], r["scaling"], r["length"], r["distance"]): r for r in fmap}
    assert set(cells) == {(mode, rule, n, d) for mode in ("plain", "fixed")
                          for rule in ("none", "cap") for n in (320, 1280) for d in (120, 700)}
    assert cells["plain", "none", 320, 700]["skipped"]
    assert not cells["plain", "none", 1280, 700]["skipped"]
    # Up to L2 = 640 a rule changes nothing: the same prompts, the same answers.
    for name in ("correct", "needle_mass", "entropy"):
        np.testing.assert_allclose(cells["fixed", "cap", 320, 120][name],
                                   cells["fixed", "none", 320, 120][name], rtol=1e-6)
    saved = json.loads((out / "runs/alibi-seed0-ft2x-fixed-2/needle_map.json").read_text())
    assert saved["settings"]["rules"] == ["none", "cap"]
    report = (out / "report.md").read_text()
    assert "The needle map of each fine-tuned model" in report
    assert "`alibi, fine-tuned fixed 2 steps + cap`:" in report and "d = 700 (> 640)" in report
    assert run(out, preset="unit-ftmap", positions=("alibi",))["finetune_map"] == fmap


# --- one reproduce per --out, never inside the corpus or a run ---------------------------------


def test_a_second_reproduce_into_one_out_is_refused_before_any_work(tmp_path, run):
    from conftest import another_writer
    from linbias.fileio import Busy

    out = tmp_path / "report"
    with another_writer(out) as proc:
        with pytest.raises(Busy, match=rf"the report .*report is being written by another linbias "
                                       rf"process \(pid {proc.pid}\)"):
            run(out)
        assert [p.name for p in out.iterdir()] == [".linbias.lock"]  # nothing trained or written


def test_an_out_inside_the_corpus_or_a_run_is_refused(tmp_path, run, corpus, tiny_alibi_run):
    root = Path(corpus.removeprefix("text:"))
    with pytest.raises(ValueError, match="is inside the corpus folder"):
        run(root / "rep")
    assert not (root / "rep").exists()
    with pytest.raises(RunError, match="is inside .*, a linbias run or export"):
        run(tiny_alibi_run / "rep")
    assert not (tiny_alibi_run / "rep").exists()
