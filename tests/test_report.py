import pytest

from linbias.report import aggregate, describe_finding, finding, markdown_table, plot_ppl_vs_length, series


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


# --- seeds -------------------------------------------------------------------------------------


def _seeded(seed, position, eval_len, ppl, curve=None):
    r = {**_rec(position, "none", eval_len, ppl), "seed": seed}
    return {**r, "per_position": curve} if curve else r


def test_aggregate_gives_mean_and_range_over_seeds():
    records = [_seeded(0, "alibi", 64, 20.0, [4.0, 2.0]), _seeded(1, "alibi", 64, 23.0, [3.0, 3.0]),
               _seeded(2, "alibi", 64, 26.0, [2.0, 1.0]), _seeded(0, "learned", 128, None),
               _seeded(1, "learned", 128, None)]
    by = {(r["position"], r["eval_len"]): r for r in aggregate(records)}
    assert len(by) == 2
    a = by["alibi", 64]
    assert (a["ppl"], a["ppl_min"], a["ppl_max"], a["seeds"]) == (23.0, 20.0, 26.0, 3)
    assert a["per_position"] == [3.0, 2.0] and "seed" not in a
    assert by["learned", 128]["ppl"] is None and by["learned", 128]["seeds"] == 0
    assert aggregate(aggregate(records)) == aggregate(records)  # idempotent
    assert "| alibi | 23.00 (20.00–26.00) |" in markdown_table(aggregate(records), 64)


def test_finding_uses_the_mean_over_seeds():
    records = [_seeded(0, "alibi", 64, 20.0), _seeded(0, "alibi", 256, 20.0),
               _seeded(1, "alibi", 64, 20.0), _seeded(1, "alibi", 256, 23.0)]
    f = finding(records, 64)["alibi"]
    assert f["ratio"] == pytest.approx(1.075) and f["holds"] is False  # seed 0 alone would pass


def test_plot_draws_a_band_for_several_seeds(tmp_path, monkeypatch):
    import matplotlib.axes

    bands = []
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, lo, hi, **k: bands.append((list(x), list(lo), list(hi))))
    records = [_seeded(s, "alibi", n, 20.0 + s + n / 64) for s in (0, 1) for n in (64, 128)]
    plot_ppl_vs_length(aggregate(records), 64, tmp_path / "p.png")
    assert bands == [([64, 128], [21.0, 22.0], [22.0, 23.0])]
    bands.clear()
    plot_ppl_vs_length(aggregate(records[:2]), 64, tmp_path / "q.png")  # one seed: no band
    assert bands == []


def test_report_states_its_numbers_without_canned_reasons():
    mild = [r if (r["position"], r["eval_len"]) != ("sinusoidal", 256) else {**r, "ppl": 26.0}
            for r in RECORDS]
    text = describe_finding(finding(mild, 64), mild)
    assert "does NOT hold" in text and "1.3x" in text
    assert "paper" not in text.split("wants")[-1] and "README" not in text
