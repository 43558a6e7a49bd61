"""Render train-short / test-long results: a markdown table, a plot, the paper's finding.

The finding of record is the ALiBi paper's first figure (Press et al. 2022): past the training
length ``L``, sinusoidal models fall apart while ALiBi's perplexity stays flat.

Results of several seeds are first combined by ``aggregate``: every table, curve and check then
uses the mean over seeds, and tables and plots also show the min-max range.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from linbias.alibi import SCALING_RULES
from linbias.config import REPRODUCE_PRESETS, ReproducePreset
from linbias.evaluate import merge_cells, retrieval_summary
from linbias.fileio import atomic_write_text, write_json, write_png
from linbias.positions import POSITION_METHODS, RotaryPositions
from linbias.tasks import wilson

__all__ = [
    "HEATMAP", "REPORT_TITLE", "accuracy_table", "aggregate", "beyond_table", "describe_finding",
    "finding", "finetune_curves", "format_table", "markdown_table", "md_table", "per_position_summary",
    "plot_finetune", "plot_heatmaps", "plot_ppl_vs_length", "retrieval_table", "rule_label",
    "series", "write_report",
]

Record = dict[str, Any]


_RULE_STYLES = {"none": "-", "linear": "--", "sqrt": ":", "log": (0, (3, 1, 1, 1))}


def rule_label(position: str, scaling: str) -> str:
    return position if scaling == "none" else f"{position} + {scaling}"


def _key(r: Record) -> tuple:
    return (r["position"], r["scaling"], int(r["eval_len"]), r.get("mode", "nonoverlapping"),
            r.get("stride"))


def aggregate(records: Sequence[Record]) -> list[Record]:
    """One record per (method, rule, length, protocol), combining the seeds.

    ``ppl`` and ``bpb`` become the mean over the seeds evaluated, ``ppl_min`` and ``ppl_max`` their
    range, ``seeds`` how many there were, and ``per_position`` the mean curve. A cell is skipped
    (``ppl`` None) only if no seed evaluated it. Records without a ``seed`` count as one seed each.
    """
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(_key(r), []).append(r)
    out = []
    for group in groups.values():
        done = [r for r in group if r.get("ppl") is not None]
        merged = {k: v for k, v in group[0].items() if k not in ("seed", "seconds")}
        merged["seeds"] = sum(r.get("seeds", 1) for r in done)  # aggregating twice changes nothing
        if done:
            ppl = [r["ppl"] for r in done]
            merged.update(ppl=sum(ppl) / len(ppl), ppl_min=min(r.get("ppl_min", r["ppl"]) for r in done),
                          ppl_max=max(r.get("ppl_max", r["ppl"]) for r in done),
                          tokens=done[0].get("tokens"))
            if all(r.get("bpb") is not None for r in done):
                merged["bpb"] = sum(r["bpb"] for r in done) / len(done)
            curves = [r["per_position"] for r in done if r.get("per_position")]
            if len(curves) == len(done):
                merged["per_position"] = [sum(xs) / len(xs) for xs in zip(*curves)]
        out.append(merged)
    return out


def series(records: Sequence[Record]) -> dict[str, dict[int, float]]:
    """``{"alibi + linear": {eval_len: ppl}}`` for the evaluated (not skipped) records."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("ppl") is not None:
            out.setdefault(rule_label(r["position"], r["scaling"]), {})[int(r["eval_len"])] = r["ppl"]
    return out


def _ppl_at(records: Sequence[Record], position: str, eval_len: int, scaling: str = "none"):
    for r in records:
        if (r["position"], r["scaling"], int(r["eval_len"])) == (position, scaling, eval_len):
            return r.get("ppl")
    return None


def finding(records: Sequence[Record], train_len: int) -> dict[str, Any]:
    """The paper's check at ``4L``: sinusoidal ppl >= 2x its ppl at L, ALiBi's <= 1.05x, on the
    mean over seeds."""
    records = aggregate(records)
    out: dict[str, Any] = {"train_len": train_len, "at": 4 * train_len}
    for position, bound, holds in (("sinusoidal", 2.0, lambda x: x >= 2.0),
                                   ("alibi", 1.05, lambda x: x <= 1.05)):
        at_l = _ppl_at(records, position, train_len)
        at_4l = _ppl_at(records, position, 4 * train_len)
        ratio = at_4l / at_l if at_l and at_4l else None
        out[position] = {"ppl_at_L": at_l, "ppl_at_4L": at_4l, "ratio": ratio, "bound": bound,
                         "holds": None if ratio is None else bool(holds(ratio))}
    return out


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if x >= 1000 else f"{x:.2f}"


def _cell(r: Record | None) -> str:
    """Perplexity, with the seeds' min-max range when there were several."""
    if r is None or r.get("ppl") is None:
        return "—"
    if r.get("seeds", 1) > 1:
        return f"{_fmt(r['ppl'])} ({_fmt(r['ppl_min'])}–{_fmt(r['ppl_max'])})"
    return _fmt(r["ppl"])


def md_table(columns: Sequence[str], rows: Sequence[Sequence[str]], first: str = "method") -> str:
    """A markdown table: a left column ``first`` of row names, right-aligned ``columns``; each
    row is its name followed by one cell per column."""
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(records: Sequence[Record], train_len: int) -> str:
    """Perplexity by method (rows) and evaluation length (columns), ``—`` where not evaluated;
    with several seeds (``aggregate``), the mean and the min-max range."""
    cells = {(rule_label(r["position"], r["scaling"]), int(r["eval_len"])): r for r in records}
    lengths = sorted({int(r["eval_len"]) for r in records})
    columns = [f"L'={n}" + (" (L)" if n == train_len else f" ({n // train_len}L)"
                            if n % train_len == 0 else "") for n in lengths]
    order = sorted({rule_label(r["position"], r["scaling"]) for r in records},
                   key=lambda s: (s.split(" + ")[0] != "alibi", s))
    return md_table(columns, [[name] + [_cell(cells.get((name, n))) for n in lengths]
                              for name in order])


def beyond_table(records: Sequence[Record], train_len: int, multiple: int = 4) -> str:
    """Mean loss at ``L' = multiple * L`` inside the training length (positions L/2 .. L-1)
    against beyond it (L .. 2L-1, and 2L .. L'-1), per method: where extrapolation fails."""
    L, rows = train_len, []
    parts = [(L // 2, L), (L, 2 * L), (2 * L, multiple * L)]
    for r in sorted(records, key=lambda r: (r["position"] != "alibi", rule_label(r["position"], r["scaling"]))):
        curve = r.get("per_position")
        if int(r["eval_len"]) != multiple * L or not curve:
            continue
        means = [sum(curve[a:b]) / (b - a) for a, b in parts]
        cells = [f"{means[0]:.3f}"] + [f"{m:.3f} ({m - means[0]:+.3f})" for m in means[1:]]
        rows.append([rule_label(r["position"], r["scaling"])] + cells)
    return md_table([f"positions {a}-{b - 1}" for a, b in parts], rows) if rows else ""


def plot_ppl_vs_length(records: Sequence[Record], train_len: int, path: str | Path, title: str = "") -> None:
    """Perplexity against evaluation length (log axes), one line per method and rule; with
    several seeds (``aggregate``), the mean and a band over the min-max range."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = series(records)
    ranges: dict[str, dict[int, tuple[float, float]]] = {}
    for r in records:
        if r.get("ppl_min") is not None:
            ranges.setdefault(rule_label(r["position"], r["scaling"]), {})[int(r["eval_len"])] = (
                r["ppl_min"], r["ppl_max"])
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colours = {}
    for name in sorted(curves, key=lambda s: (s.split(" + ")[0], s)):
        method = name.split(" + ")[0]
        colour = colours.setdefault(method, f"C{len(colours)}")
        xs = sorted(curves[name])
        rule = name.split(" + ")[1] if " + " in name else "none"
        ax.plot(xs, [curves[name][x] for x in xs], ls=_RULE_STYLES.get(rule, "-."), marker="o",
                ms=4, color=colour, label=name, lw=2 if rule == "none" else 1.3)
        bounds = [ranges.get(name, {}).get(x) for x in xs]
        if all(bounds) and any(lo < hi for lo, hi in bounds):
            ax.fill_between(xs, [lo for lo, _ in bounds], [hi for _, hi in bounds], color=colour,
                            alpha=0.12, lw=0)
    ax.axvline(train_len, color="grey", lw=1, ls="-.", label=f"training length L = {train_len}")
    ax.set_xscale("log", base=2)
    lengths = sorted({x for c in curves.values() for x in c})
    ax.set_xticks(lengths, [str(x) for x in lengths])
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("evaluation length L' (tokens)")
    ax.set_ylabel("perplexity (non-overlapping)")
    ax.set_title(title or "Train short, test long")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    write_png(Path(path), fig, "linbias reproduce")  # never a torn plot
    plt.close(fig)


def describe_finding(f: dict[str, Any], records: Sequence[Record] = ()) -> str:
    """The check in plain words, from these numbers only (their reading belongs in the README)."""
    lines = []
    for position, want in (("sinusoidal", "at least 2x"), ("alibi", "at most 1.05x")):
        g = f[position]
        if g["ratio"] is None:
            lines.append(f"- {position}: not evaluated at both L and 4L.")
            continue
        verdict = "holds" if g["holds"] else "does NOT hold"
        lines.append(
            f"- {position}: ppl {g['ppl_at_L']:.2f} at L={f['train_len']}, {_fmt(g['ppl_at_4L'])} at "
            f"4L={f['at']}: {g['ratio']:.3g}x (the paper's finding wants {want}): {verdict}."
        )
    sin = f["sinusoidal"]
    curve = series(records).get("sinusoidal", {})
    if sin["ratio"] is not None and curve and max(curve) > f["at"]:
        longest = max(curve)
        lines.append(f"- sinusoidal at the longest length, L'={longest}: "
                     f"{curve[longest] / sin['ppl_at_L']:.2f}x its perplexity at L.")
    return "\n".join(lines)


def plot_attention_profile(records: Sequence[Record], path: str | Path) -> None:
    """Small multiples, one per method and rule: each head's share of attention mass beyond
    distance d (``linbias.evaluate.attention_profile``), one line per head, coloured by layer;
    with several seeds, their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares: dict[str, dict[tuple[int, int], dict[int, list[float]]]] = {}
    for r in records:
        panel = shares.setdefault(rule_label(r["position"], r["scaling"]), {})
        panel.setdefault((r["layer"], r["head"]), {}).setdefault(r["distance"], []).append(r["share"])
    if not shares:
        raise ValueError("plot_attention_profile needs at least one record")
    cols = min(5, len(shares))
    rows = -(-len(shares) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), dpi=110, squeeze=False,
                             sharey=True)
    for ax, (label, heads) in zip(axes.flat, sorted(shares.items())):
        for (layer, _), curve in sorted(heads.items()):
            xs = sorted(curve)
            ax.plot(xs, [sum(curve[x]) / len(curve[x]) for x in xs], color=f"C{layer}", lw=1,
                    marker=".", label=f"layer {layer}")
        ax.set_xscale("log", base=2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("distance d (tokens)", fontsize=8)
        ax.grid(True, alpha=0.3)
        handles = {h.get_label(): h for h in ax.get_lines()}
        ax.legend(handles.values(), handles.keys(), fontsize=6)
    for ax in axes.flat[len(shares):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("attention mass beyond d", fontsize=8)
    eval_len = records[0]["eval_len"]
    fig.suptitle(f"Where each head looks at L' = {eval_len} (one line per head)", fontsize=10)
    fig.tight_layout()
    write_png(Path(path), fig, "linbias reproduce")  # never a torn plot
    plt.close(fig)


def finetune_curves(rows: Sequence[Record]) -> dict[str, dict[str, dict[int, float | None]]]:
    """The fine-tune study by curve (method, mode, rule) and metric: ``{metric: {steps: mean}}``.

    Metrics are ``ppl@N`` for each evaluated length N, with a retrieval task ``acc@N`` (its
    accuracy at N) and ``k_max``; each value is the mean over seeds, ``None`` where a seed has
    none (a length the method cannot reach).
    """
    out: dict[str, dict[str, dict[int, list]]] = {}
    for r in rows:
        label = f"{rule_label(r['position'], r['scaling'])} ({r['mode']})"
        # A rule acts only past the fine-tune length: up to it, its numbers are the plain ones.
        lengths = [n for n in r["ppl"] if r["scaling"] == "none" or int(n) > r["train_len"]]
        metrics = {f"ppl@{n}": r["ppl"][n] for n in lengths}
        metrics.update({f"acc@{n}": r["accuracy"][n] for n in lengths if n in r["accuracy"]})
        if r.get("k_max") is not None:
            metrics["k_max"] = r["k_max"]
        for name, value in metrics.items():
            out.setdefault(label, {}).setdefault(name, {}).setdefault(r["steps"], []).append(value)
    return {label: {name: {steps: None if None in vs else sum(vs) / len(vs)
                           for steps, vs in sorted(by_steps.items())}
                    for name, by_steps in metrics.items()}
            for label, metrics in out.items()}


def plot_finetune(rows: Sequence[Record], path: str | Path, title: str = "") -> None:
    """One panel per metric of ``finetune_curves`` against fine-tune steps, a line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = finetune_curves(rows)
    if not curves:
        raise ValueError("plot_finetune needs at least one record")
    order = {"ppl": 0, "acc": 1, "k_max": 2}
    metrics = sorted({m for c in curves.values() for m in c},
                     key=lambda m: (order[m.split("@")[0]], int(m.split("@")[1]) if "@" in m else 0))
    cols = min(3, len(metrics) + 1)  # the last panel holds the legend
    rows = -(-(len(metrics) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), dpi=110, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for n, (label, c) in enumerate(sorted(curves.items())):
            points = [(x, y) for x, y in c.get(metric, {}).items() if y is not None]
            if points:  # tab20: a colour of its own for each of up to 20 curves
                ax.plot(*zip(*points), marker="o", lw=1.2, color=plt.get_cmap("tab20")(n % 20),
                        label=label, ls="--" if "(fixed)" in label else "-")
        ax.set_title(metric.replace("ppl@", "perplexity at L'=").replace(
            "acc@", "retrieval accuracy at L'="), fontsize=9)
        ax.set_xlabel("fine-tune steps", fontsize=8)
        ax.grid(True, alpha=0.3)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    for ax in axes.flat[len(metrics):]:
        ax.set_axis_off()
    axes.flat[-1].legend(handles.values(), handles.keys(), fontsize=7, loc="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_png(Path(path), fig, "linbias reproduce")  # never a torn plot
    plt.close(fig)


# --- perplexity and retrieval tables (linbias eval) -------------------------------------------


_COLUMNS = ("position", "scaling", "L", "L'", "mode", "ppl", "bpb", "tokens", "s")

def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

def _row(r: dict[str, Any]) -> list[str]:
    mode = r["mode"] if r["mode"] == "nonoverlapping" else f"{r['mode']} S={r['stride']}"
    if r.get("skipped"):
        ppl = "skipped"
    elif not _finite(r.get("nll")):
        ppl = "not finite"  # never "inf" for a nan loss: the note below the table says why
    elif not _finite(r["ppl"]):
        ppl = "overflow"
    else:
        ppl = _number(r["ppl"], 3)
    bpb = _number(r["bpb"], 4) if _finite(r["bpb"]) else "not finite"
    return [str(r.get("position", "-")), str(r.get("scaling", "none")),
            str(r.get("train_len", "-")), str(r["eval_len"]), mode, ppl, bpb,
            str(r["tokens"]), _number(r["seconds"], 1)]

def _note(r: dict[str, Any]) -> str | None:
    """Why a row has no usable perplexity, or ``None``."""
    where = f"L'={r['eval_len']} ({r.get('scaling', 'none')})"
    if r.get("skipped"):
        return f"skipped {where}: {r['skipped']}"
    if not _finite(r.get("nll")):
        return (f"{where}: the model's loss is not finite (mean nll {r['nll']}): its weights or "
                "logits hold inf or nan (a diverged run?), so it has no perplexity")
    if not _finite(r["ppl"]):
        return (f"{where}: perplexity exp({r['nll']:.1f}) overflows a float; the loss itself is "
                "finite: compare nll or bpb")
    return None

def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The records as an aligned text table, one row each; below it, why a row was skipped or
    has no perplexity (a loss that is not finite, a perplexity past the float range).

    Columns: position, scaling, L (train_len), L' (eval_len), mode (with the stride when
    sliding), ppl, bpb, tokens (scored), s (seconds).
    """
    rows = [list(_COLUMNS)] + [_row(r) for r in records]
    widths = [max(len(row[c]) for row in rows) for c in range(len(_COLUMNS))]
    numeric = set(range(2, len(_COLUMNS))) - {4}  # right-align numbers, left-align names
    lines = [
        "  ".join(cell.rjust(w) if c in numeric else cell.ljust(w)
                  for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]
    lines += [note for note in map(_note, records) if note is not None]
    return "\n".join(lines)

def retrieval_table(records: Sequence[dict[str, Any]]) -> str:
    """Accuracy by length (pooled over depths) and ``k_max``, one row per position and rule."""
    summary = retrieval_summary(records)
    lengths = sorted({b["length"] for s in summary for b in s["by_length"]})
    head = ["position", "scaling", *[f"L'={n}" for n in lengths], "k_max"]
    rows = [head]
    for s in summary:
        acc = {b["length"]: b["accuracy"] for b in s["by_length"]}
        rows.append([s["position"], s["scaling"],
                     *["-" if acc.get(n) is None else f"{100 * acc[n]:.0f}%" for n in lengths],
                     "-" if s["k_max"] is None else str(s["k_max"])])
    width = [max(len(r[j]) for r in rows) for j in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in
                               enumerate(zip(r, width))) for r in rows)


# --- retrieval accuracy: tables and heatmaps --------------------------------------------------


def _grid(records: Sequence[Record], rows: str = "depth"
          ) -> tuple[list[float], list[int], dict[tuple, Record]]:
    """Depths (or another ``rows`` key: rows), lengths (columns) and the record of each cell."""
    cells: dict[tuple, Record] = {}
    for r in records:
        key = (float(r[rows]), int(r["length"]))
        if key in cells:
            raise ValueError(f"two records for {rows} {key[0]:g}, length {key[1]}; give one per "
                             "cell (one task and model per table or panel)")
        cells[key] = r
    return sorted({d for d, _ in cells}), sorted({n for _, n in cells}), cells


def accuracy_table(records: Sequence[Record]) -> str:
    """A terminal table per task: rows = depth, columns = length, cells = accuracy (n)."""
    blocks = []
    for task in dict.fromkeys(r["task"] for r in records):
        depths, lengths, cells = _grid([r for r in records if r["task"] == task])
        rows = [["depth \\ length"] + [str(n) for n in lengths]]
        for d in depths:
            rows.append([f"{d:g}%"] + [
                f"{100 * cells[d, n]['accuracy']:.1f}% ({cells[d, n]['n']})" if (d, n) in cells
                else "-" for n in lengths])
        width = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
        text = ["  ".join(c.rjust(w) for c, w in zip(row, width)) for row in rows]
        blocks.append("\n".join([f"{task}: accuracy (n trials)"] + text))
    return "\n\n".join(blocks)

# The stamp of an eval --heatmap file: another is replaced only over a file carrying it.
HEATMAP = "linbias eval --heatmap"

def plot_heatmaps(panels: dict[str, list[Record]], path: str | Path,
                  stamp: str = "linbias reproduce", by: str = "depth") -> None:
    """Small multiples, one per panel (e.g. "alibi / linear"): x = length, y = depth (or, with
    ``by="distance"``, the needle's distance), colour = accuracy on a fixed 0..1 scale, each cell annotated in
    percent; written as a PNG stamped with ``stamp`` (the command writing it, see
    ``fileio.check_output``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    if not panels or not all(panels.values()):
        raise ValueError("plot_heatmaps needs at least one panel, each with records")
    cols = min(5, len(panels))  # small multiples in rows of five
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(1.5 + 3.2 * cols, 0.4 + 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = list(grid.flat)[: len(panels)]
    for ax in list(grid.flat)[len(panels):]:
        ax.set_visible(False)
    for ax, (label, records) in zip(axes, panels.items()):
        depths, lengths, cells = _grid(records, by)
        acc = np.full((len(depths), len(lengths)), np.nan)
        for (d, n), r in cells.items():
            acc[depths.index(d), lengths.index(n)] = r["accuracy"]
            ax.text(lengths.index(n), depths.index(d), f"{100 * r['accuracy']:.0f}",
                    ha="center", va="center", fontsize=7)
        image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}%" if by == "depth" else f"{d:g}"
                                           for d in depths], fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("length (tokens)")
    for row in grid:
        row[0].set_ylabel("needle depth" if by == "depth" else "needle distance (tokens)")
    fig.colorbar(image, ax=list(grid.flat), label="accuracy")
    write_png(Path(path), fig, stamp, dpi=120)


# --- the early-token curse at a glance --------------------------------------------------------


def per_position_summary(records: list[dict]) -> str:
    """Mean loss in eight equal parts of the window: the early-token curse at a glance."""
    lines = ["mean loss (nats) by eighth of the window:"]
    for r in records:
        curve = r.get("per_position")
        if not curve:
            continue
        n = len(curve)
        parts = [sum(curve[i * n // 8 : (i + 1) * n // 8]) / max(1, (i + 1) * n // 8 - i * n // 8)
                 for i in range(8)]
        lines.append(f"  L'={r['eval_len']} {r['scaling']}: " + " ".join(f"{x:.3f}" for x in parts))
    return "\n".join(lines)


# --- the reproduce report: report.md beside results.json and the plots ------------------------


REPORT_TITLE = "# Train short, test long — preset"

_SPLIT_WORDS = {
    "file": "whole files split about 98/1/1% by a hash of their content",
    "document": "every document cut in order, its first 98% to train, the next 1% to valid, the "
    "last 1% to test (too few files to split by file)",
    "source": "the dataset's own splits",
}

def _command(results: dict[str, Any], p: ReproducePreset) -> str:
    """The command line that reproduces ``results``."""
    name = results["preset"]["name"]
    flags = [f"--preset {name}", f"--seeds {results.get('seeds', 1)}"]
    if results["data"] != "stdlib":
        flags.append(f"--data {results['data']}")
    if results.get("positions", list(POSITION_METHODS)) != list(POSITION_METHODS):
        flags.append(f"--positions {','.join(results['positions'])}")
    if name in REPRODUCE_PRESETS and p.embedding != REPRODUCE_PRESETS[name].embedding:
        flags.append(f"--embedding {p.embedding}")
    return "linbias reproduce " + " ".join(flags) + " --out OUT"

def _retrieval_md(results: dict[str, Any], p: ReproducePreset) -> str:
    if "retrieval" not in results:
        return ""
    summary = results["retrieval_summary"]
    lengths = [m * p.train_len for m in p.multiples]
    rows = []
    for s in summary:
        at = {b["length"]: b for b in s["by_length"]}
        cells = ["—" if at.get(n, {}).get("accuracy") is None else
                 f"{100 * at[n]['accuracy']:.0f}% ({at[n]['k_max']})" for n in lengths]
        rows.append([_label(s)] + cells + ["—" if s["k_max"] is None else str(s["k_max"])])
    table = md_table([f"L'={n} ({m}L)" for n, m in zip(lengths, p.multiples)] + ["k_max"], rows)
    n_trials = p.trials * results.get("seeds", 1)
    return f"""
## Retrieval past L: {p.task}

Every model was trained with {100 * p.task_fraction:.0f}% of its rows replaced by {p.task}
sequences of length L (needle at a uniform random depth), then asked at each L' with the needle
at depths {', '.join(f'{d:g}%' for d in p.depths)}, {n_trials} trials per cell
({p.trials} per seed). Each cell: accuracy (exact match of the greedy answer, pooled over depths)
and in brackets that length's k_max, the longest needle distance (tokens from the needle to the
question) up to which every depth retrieves in at least 20% of trials (Chen et al. 2023); the
last column is k_max over all lengths together.

{table}

![retrieval accuracy by length and depth](retrieval.png)
"""

def _label(r: dict[str, Any]) -> str:
    return rule_label(r["position"], r["scaling"])

def needle_cells(records: Sequence[Record], instruction: str | int = "start"
                 ) -> dict[str, list[Record]]:
    """The needle map's cells with the instruction at ``instruction``, pooled over seeds, per
    method and rule (``rule_label``): trials and correct answers summed, Wilson interval
    recomputed, head statistics averaged; skipped cells left out."""
    pooled: dict[tuple, Record] = {}
    for r in records:
        if r["skipped"] or r.get("instruction", "start") != instruction:
            continue
        key = (r["position"], r["scaling"], r["length"], r["distance"])
        if key not in pooled:
            pooled[key] = {**{k: v for k, v in r.items() if k != "seed"}, "seeds": 1}
            continue
        c = pooled[key]
        c["n"], c["correct"], c["seeds"] = c["n"] + r["n"], c["correct"] + r["correct"], c["seeds"] + 1
        for name in ("needle_mass", "key_mass", "entropy"):
            if name in c:
                c[name] = (np.asarray(c[name]) + np.asarray(r[name])).tolist()
    panels: dict[str, list[Record]] = {}
    for c in pooled.values():
        c["accuracy"] = c["correct"] / c["n"]
        c["ci_low"], c["ci_high"] = wilson(c["correct"], c["n"])
        for name in ("needle_mass", "key_mass", "entropy"):
            if name in c:
                c[name] = (np.asarray(c[name]) / c["seeds"]).tolist()
        panels.setdefault(rule_label(c["position"], c["scaling"]), []).append(c)
    return panels


def panels_first(panels: dict[str, list[Record]]) -> Record:
    """The first cell of the first panel."""
    return next(iter(panels.values()))[0]


def plot_needle_heads(panels: dict[str, list[Record]], distance: int, path: str | Path) -> None:
    """Per method and rule (columns): each head's attention mass on a needle ``distance`` tokens
    back, on the key's own tokens in it, and the entropy of its attention (rows), at the answer
    position, against the prompt's length L' (one line per head, coloured by layer)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = {label: sorted((c for c in cells if c["distance"] == distance and "entropy" in c),
                            key=lambda c: c["length"]) for label, cells in panels.items()}
    panels = {label: cells for label, cells in panels.items() if cells}
    if not panels:
        raise ValueError(f"plot_needle_heads: no cell with head statistics at distance {distance}")
    names = [n for n in ("needle_mass", "key_mass", "entropy") if n in panels_first(panels)]
    fig = Figure(figsize=(1.0 + 2.6 * len(panels), 2.5 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(names), len(panels), squeeze=False, sharey="row")
    for col, (label, cells) in enumerate(panels.items()):
        xs = [c["length"] for c in cells]
        for row, name in enumerate(names):
            ax = grid[row][col]
            values = np.asarray([c[name] for c in cells])  # [lengths, layers, heads]
            for layer in range(values.shape[1]):
                for h in range(values.shape[2]):
                    ax.plot(xs, values[:, layer, h], color=f"C{layer}", lw=1, marker=".",
                            label=f"layer {layer}" if h == 0 else None)
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
            if name != "entropy":
                ax.set_yscale("log")
            if row == 0:
                ax.set_title(label, fontsize=9)
            if row == len(names) - 1:
                ax.set_xlabel("prompt length L' (tokens)", fontsize=8)
        grid[0][col].legend(fontsize=6)
    for row, name in enumerate(names):
        grid[row][0].set_ylabel({"needle_mass": "attention mass on the needle",
                                 "key_mass": "mass on the key's tokens",
                                 "entropy": "attention entropy (nats)"}[name], fontsize=8)
    fig.suptitle(f"Each head at the answer, needle {distance} tokens back", fontsize=10)
    write_png(Path(path), fig, "linbias reproduce")


def _distance_tables(panels: dict[str, list[Record]], p: ReproducePreset,
                     train_len: Optional[int] = None) -> list[str]:
    """One markdown table per panel: accuracy by needle distance (rows) and length (columns)."""
    lengths = [m * p.train_len for m in p.multiples]
    train_len = train_len or p.train_len
    tables = []
    for label, cells in panels.items():
        by = {(c["distance"], c["length"]): c for c in cells}
        rows = [[f"d = {d}" + (f" (> {train_len})" if d > train_len else "")] +
                ["—" if (d, n) not in by else f"{by[d, n]['accuracy']:.0%}" for n in lengths]
                for d in sorted({c["distance"] for c in cells})]
        tables.append(f"`{label}`:\n\n" + md_table([f"L'={n}" for n in lengths], rows,
                                                    first="needle"))
    return tables


def _needle_md(results: dict[str, Any], p: ReproducePreset) -> str:
    records = results.get("needle_map")
    if not records:
        return ""
    panels = needle_cells(records)
    near = min(p.map_distances)
    lengths = [m * p.train_len for m in p.multiples]
    tables = _distance_tables(panels, p)
    mass = []
    for label, cells in panels.items():
        by = {c["length"]: c for c in cells if c["distance"] == near and "needle_mass" in c}
        if by:
            mass.append([label] + ["—" if n not in by else
                                   f"{np.max(by[n]['needle_mass']):.2f} / "
                                   f"{np.max(by[n].get('key_mass', np.nan)):.2f} / "
                                   f"{np.mean(by[n]['entropy']):.2f}" for n in lengths])
    seeds = results.get("seeds", 1)
    start, within, absent = (needle_cells(records, i) for i in ("start", p.train_len, "none"))
    cue = []
    for label, cells in start.items():
        by = [{c["length"]: c for c in group.get(label, []) if c["distance"] == near}
              for group in (start, within, absent)]
        cue.append([label] + [" / ".join("—" if n not in b else f"{b[n]['accuracy']:.0%}"
                                         for b in by) for n in lengths])
    return f"""
## Dilution or reach: the needle map

Passkey accuracy by the needle's distance d from the answer (tokens from its first token) and the
prompt's length L', {p.map_trials} trials a cell{f' x {seeds} seeds' if seeds > 1 else ''}; the same prompts under every rule. A near
needle lost as L' grows is dilution; a needle farther than L = {p.train_len} lost at every L' is
a lack of reach. "—": the distance does not fit in that length.

{chr(10).join(t + chr(10) for t in tables)}
![accuracy by needle distance and length](needle_map.png)

At the answer position, with the needle {near} tokens back: the largest attention mass any head
puts on the needle's tokens / on the key's own tokens in the needle / the mean entropy of the
heads' attention (nats), against L'.

{md_table([f"L'={n}" for n in lengths], mass) if mass else ""}

![each head's attention on the needle and its entropy](needle_heads.png)

What else the model needs in view: the needle {near} tokens back, with the task's instruction at
the start of the prompt (as trained) / moved to start L = {p.train_len} tokens before the answer
(filler in its place) / left out (filler of its length instead), {p.map_trials} trials a cell{f' x {seeds} seeds' if seeds > 1 else ''}.

{md_table([f"L'={n}" for n in lengths], cue)}
"""


def _profile_md(results: dict[str, Any], p: ReproducePreset) -> str:
    records = results.get("attention_profile")
    if not records:
        return ""
    distances = sorted({r["distance"] for r in records})
    rows = []
    for label in dict.fromkeys(_label(r) for r in records):
        cells = []
        for d in distances:
            shares = [r["share"] for r in records if _label(r) == label and r["distance"] == d]
            cells.append(f"{sum(shares) / len(shares):.3f} (max {max(shares):.2f})")
        rows.append([label] + cells)
    table = md_table([f"beyond {d}" for d in distances], rows)
    return f"""
## Where the model looks

Share of attention mass beyond distance d at L' = {p.profile_multiple * p.train_len}: mean over every layer and
head (and the largest head), for the queries of the second half of {p.profile_windows} windows of
the validation split{', pooled over seeds' if results.get('seeds', 1) > 1 else ''}.

{table}

![attention mass beyond distance d, per head](attention_profile.png)
"""

def _sliding_md(results: dict[str, Any], p: ReproducePreset) -> str:
    records = results.get("sliding")
    if not records:
        return ""
    ppl: dict[tuple[str, int, str], list[float]] = {}
    for r in records:
        if r["ppl"] is not None:
            ppl.setdefault((_label(r), r["eval_len"], r["mode"]), []).append(r["ppl"])
    lengths = sorted({r["eval_len"] for r in records})
    rows = []
    for label in dict.fromkeys(_label(r) for r in records):
        cells = []
        for n in lengths:
            a, b = ppl.get((label, n, "nonoverlapping")), ppl.get((label, n, "sliding"))
            cells.append("—" if not a or not b else
                         f"{sum(a) / len(a):.2f} → {sum(b) / len(b):.2f}")
        rows.append([label] + cells)
    table = md_table([f"L'={n}" for n in lengths], rows)
    return f"""
## Sliding window against non-overlapping windows

Perplexity over the first {p.sliding_tokens} tokens of the validation split: non-overlapping windows
of L' → a sliding window of stride 1 (after the first window, every token is predicted with
L' - 1 tokens of context: the ALiBi paper's appendix B), for each L' up to half of those tokens.
Only these tokens are scored, because stride 1 costs one forward per token{'; means over seeds' if results.get('seeds', 1) > 1 else ''}.

{table}
"""

def _finetune_md(results: dict[str, Any], p: ReproducePreset) -> str:
    rows = results.get("finetune")
    if not rows:
        return ""
    curves = finetune_curves(rows)
    steps = sorted({r["steps"] for r in rows})
    L2 = p.finetune_multiple * p.train_len
    tables = []
    metrics = [f"ppl@{L2}", f"ppl@{4 * L2}"]
    if p.task is not None:
        metrics += [f"acc@{L2}", f"acc@{4 * L2}", "k_max"]
    for metric in metrics:
        fmt = {"ppl": "{:.2f}", "acc": "{:.0%}", "k_max": "{:.0f}"}[metric.split("@")[0]]
        rows = [[label] + ["—" if c[metric].get(n) is None else fmt.format(c[metric][n])
                           for n in steps] for label, c in curves.items() if metric in c]
        name = {"ppl": f"Perplexity at L' = {metric[4:]}",
                "acc": f"{p.task} accuracy at L' = {metric[4:]} ({p.trials} trials x "
                       f"{len(p.depths)} depths)",
                "k_max": f"{p.task} k_max (tokens; over lengths "
                         f"{', '.join(f'{m}L' for m in p.multiples)})"}[metric.split("@")[0]]
        tables.append(f"{name}:\n\n" + md_table([f"{n} steps" for n in steps], rows,
                                                 first="method (mode)"))
    tables_of_l = [name for name in results.get("positions", [])
                   if POSITION_METHODS[name].fixes_train_len]
    skipped = "".join(f"`{name}` is left out: its table has one row per position up to L."
                      for name in tables_of_l)
    return f"""
## Fine-tuned at {L2} = {p.finetune_multiple}L, then tested longer

Each model above was trained on for {', '.join(map(str, steps))} steps at L2 = {L2} (its own corpus and
task mix; AdamW from fresh moments, peak lr {p.finetune_lr}, warm-up {p.finetune_warmup}, cosine,
{p.finetune_batch_size} sequences a step): `plain` keeps the positions it was trained with;
`fixed` multiplies them by L/L2 = 1/{p.finetune_multiple} throughout (ALiBi slopes, rotary
positions: BTLM's and Chen et al.'s interpolation).{' 0 steps is the model as it was, at the new length.' if 0 in steps else ''}
`+ RULE`: the rule acting past L2 and scaling from it (`linear`: L2/L'). {'Means over seeds.' if results.get('seeds', 1) > 1 else 'One seed.'}
{skipped.strip()}

{chr(10).join(t + chr(10) for t in tables)}
![metrics against fine-tune steps](finetune.png)
{_finetune_map_md(results, p)}"""

def _finetune_map_md(results: dict[str, Any], p: ReproducePreset) -> str:
    records = results.get("finetune_map")
    if not records:
        return ""
    L2 = p.finetune_multiple * p.train_len
    panels = needle_cells([{**r, "position": f"{r['position']}, fine-tuned {r['mode']} "
                                             f"{r['steps']} steps"} for r in records])
    seeds = len({r["seed"] for r in records})
    return f"""
The needle map of each fine-tuned model (as above: the needle d tokens before the answer, in a
prompt of L' tokens), {p.map_trials} trials a cell{f' x {seeds} seeds' if seeds > 1 else ''}, under
{', '.join(f'`{r}`' for r in p.finetune_rules)} (a rule acts past L2 = {L2} and scales from it).
Does training at L2 carry the needle farther, and does a rule carry it past L2?

{chr(10).join(t + chr(10) for t in _distance_tables(panels, p, L2))}"""


def _rules_words(p: ReproducePreset) -> str:
    alibi = [f"`{r}` ({SCALING_RULES[r].summary})" for r in p.rules
             if r != "none" and r in SCALING_RULES]
    rotary = [f"`{r}` ({RotaryPositions.summaries[r]})" for r in p.rules
              if r in RotaryPositions.summaries]
    return (f"Rules, acting only when L' > L: ALiBi {'; '.join(alibi) or 'none'}; rotary "
            f"{'; '.join(rotary) or 'none'}.")


def _report_md(results: dict[str, Any], p: ReproducePreset) -> str:
    t = results["training"]
    corpus = results["corpus"]
    tokens = t[0]["tokens"] if t else 0
    m = results["machine"]
    combined = aggregate(results["results"])
    seeds = results.get("seeds", 1)
    first = results["seed"]
    seed_words = (f"seed {first} for every method" if seeds == 1 else
                  f"seeds {first}-{first + seeds - 1} for every method ({seeds} models each)")
    spread = ("" if seeds == 1 else f" Each cell is the mean over {seeds} seeds, with their "
              "min-max range in brackets; the plot's bands show the same range.")
    return f"""{REPORT_TITLE} `{results['preset']['name']}`

Perplexity on the validation split (non-overlapping windows of L'), every position method
trained at L = {p.train_len} tokens.{spread}

{markdown_table(combined, p.train_len)}

![perplexity against evaluation length](ppl_vs_length.png)

## The paper's finding (Press et al. 2022, figure 1)

{describe_finding(results['finding'], combined)}

Where the loss goes: mean loss (nats) per token at L' = 4L, by position inside the window. Tokens
before L/2 are left out (they have little context whatever the method: the early-token curse).

{beyond_table(combined, p.train_len)}
{_retrieval_md(results, p)}{_needle_md(results, p)}{_profile_md(results, p)}{_sliding_md(results, p)}{_finetune_md(results, p)}
## How it was made

- Corpus: `{results['data']}` — train {corpus['train']['documents']} documents
  ({corpus['train']['bytes']:,} bytes), valid {corpus['valid']['documents']} documents
  ({corpus['valid']['bytes']:,} bytes), {_SPLIT_WORDS.get(corpus.get('split_by', 'file'), '?')};
  byte-level BPE, vocabulary {p.vocab_size}.
- Model: preset `{p.model}`{f' with {p.n_layers} layers' if p.n_layers else ''}; each method trained {p.steps} steps x {p.batch_size} sequences x
  {p.train_len} tokens = {tokens:,} tokens, AdamW, peak lr {p.lr}, warmup {p.warmup}, cosine
  decay, {seed_words}; {m.get('precision', 'float32')} throughout; token embeddings of the
  `{p.embedding}` convention.
- Evaluation: {f'the first {p.eval_tokens}' if p.eval_tokens else 'all'} tokens of the validation split, non-overlapping
  windows of L' = {', '.join(f'{k}L' for k in p.multiples)}; every scored token counted.
  `learned` is evaluated only where its table reaches. {_rules_words(p)}
- Machine: {m['processor']}, PyTorch CPU capability {m.get('cpu_capability', '?')},
  {m['threads']} threads, torch {m['torch']}, Python {m['python']}.
  Total time of this invocation: {results['seconds']:.0f} s (finished runs are reused).
- Reproduce: `{_command(results, p)}`.
"""

def write_report(out: Path, results: dict[str, Any], p: ReproducePreset) -> None:
    write_json(out / "results.json", results)
    plot_ppl_vs_length(aggregate(results["results"]), p.train_len, out / "ppl_vs_length.png",
                       title=f"Train short (L={p.train_len}), test long — preset {results['preset']['name']}")
    if "retrieval" in results:
        cells = [r for r in merge_cells(results["retrieval"]) if not r["skipped"]]
        panels: dict[str, list[dict[str, Any]]] = {}
        for r in cells:
            panels.setdefault(f"{r['position']} / {r['scaling']}", []).append(r)
        plot_heatmaps(panels, out / "retrieval.png")
    if results.get("attention_profile"):
        plot_attention_profile(results["attention_profile"], out / "attention_profile.png")
    if results.get("needle_map"):
        panels = needle_cells(results["needle_map"])
        plot_heatmaps(panels, out / "needle_map.png", by="distance")
        plot_needle_heads(panels, min(p.map_distances), out / "needle_heads.png")
    if results.get("finetune"):
        plot_finetune(results["finetune"], out / "finetune.png",
                      title=f"Fine-tuned at {p.finetune_multiple * p.train_len} from L = {p.train_len}")
    atomic_write_text(out / "report.md", _report_md(results, p))
