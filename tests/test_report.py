import json

import pytest

import linbias.reproduce as reproduce_mod
from linbias.data import split_of
from linbias.report import describe_finding, finding, markdown_table, plot_ppl_vs_length, series
from linbias.reproduce import ReproducePreset, reproduce


def _rec(position, scaling, eval_len, ppl):
    return {"position": position, "scaling": scaling, "train_len": 64, "eval_len": eval_len,
            "mode": "nonoverlapping", "stride": eval_len, "ppl": ppl}


RECORDS = [
    _rec("sinusoidal", "none", 64, 20.0), _rec("sinusoidal", "none", 256, 55.0),
    _rec("alibi", "none", 64, 20.0), _rec("alibi", "none", 256, 19.0),
    _rec("alibi", "linear", 64, 20.0), _rec("alibi", "linear", 256, 30.0),
    _rec("learned", "none", 64, 21.0), {**_rec("learned", "none", 256, None), "skipped": "table"},
]


def test_finding_checks_the_papers_ratios():
    f = finding(RECORDS, 64)
    assert f["sinusoidal"]["ratio"] == pytest.approx(2.75) and f["sinusoidal"]["holds"]
    assert f["alibi"]["ratio"] == pytest.approx(0.95) and f["alibi"]["holds"]
    worse = [r if r["position"] != "alibi" or r["eval_len"] != 256 else {**r, "ppl": 25.0} for r in RECORDS]
    assert finding(worse, 64)["alibi"]["holds"] is False


def test_table_and_series():
    assert series(RECORDS)["alibi + linear"] == {64: 20.0, 256: 30.0}
    assert "learned" in series(RECORDS) and 256 not in series(RECORDS)["learned"]
    table = markdown_table(RECORDS, 64)
    assert "L'=64 (L)" in table and "L'=256 (4L)" in table
    assert "| alibi + linear | 20.00 | 30.00 |" in table
    assert "| learned | 21.00 | — |" in table


def test_plot_writes_png(tmp_path):
    plot_ppl_vs_length(RECORDS, 64, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    counts = {"train": 0, "valid": 0, "test": 0}
    i = 0
    while min(counts.values()) < 2 or counts["train"] < 30:
        name = f"f{i}.py"
        split = split_of(name)
        if split == "train" or counts[split] < 2:
            (root / name).write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 30)
            counts[split] += 1
        i += 1
    return f"text:{root}"


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


def test_reproduce_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="quick"):
        reproduce("huge", tmp_path)
    with pytest.raises(ValueError, match="alibi"):
        reproduce("quick", tmp_path, positions=("xpos",))


def test_a_failed_check_is_explained_not_hidden():
    mild = [r if (r["position"], r["eval_len"]) != ("sinusoidal", 256) else {**r, "ppl": 26.0}
            for r in RECORDS]
    f = finding(mild, 64)
    assert f["sinusoidal"]["holds"] is False
    text = describe_finding(f, mild)
    assert "does NOT hold" in text and "1.30x at 4L" in text and "less than in the paper" in text
    assert "less than in the paper" not in describe_finding(finding(RECORDS, 64), RECORDS)
