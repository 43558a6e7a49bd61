"""Render train-short / test-long results: a markdown table, a plot, the paper's finding.

The finding of record is the ALiBi paper's first figure (Press et al. 2022): past the training
length ``L``, sinusoidal models fall apart while ALiBi's perplexity stays flat.

Results of several seeds are first combined by ``aggregate``: every table, curve and check then
uses the mean over seeds, and tables and plots also show the min-max range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from linbias.fileio import write_png

__all__ = [
    "aggregate", "beyond_table", "describe_finding", "finding", "finetune_curves",
    "markdown_table", "md_table", "plot_finetune", "plot_ppl_vs_length", "rule_label", "series",
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
