"""The ``linbias`` command: a thin map from sub-command to library function.

Config dataclasses are the argument groups: every field of ``ModelConfig``, ``TrainConfig`` and
``EvalConfig`` becomes a ``--flag`` whose help is the field's line in the dataclass docstring, so
the library's signature is the CLI. A sub-command is named after the function that runs it, whose
docstring is its help.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import signal
import sys
import threading
import typing
from pathlib import Path
from typing import Any, get_args

import linbias
from linbias.config import PRESETS, Embedding, EvalConfig, ModelConfig, check_protocol
from linbias.positions import POSITION_METHODS


# --- dataclass fields as flags -------------------------------------------------------------------


def _field_help(cls: type) -> dict[str, str]:
    """``name: text`` entries of the docstring's Args section (continuation lines joined)."""
    doc, out, name = cls.__doc__ or "", {}, None
    for line in doc.split("Args:", 1)[-1].splitlines():
        m = re.match(r"\s{8}(\w+): (.*)", line)
        if m:
            name, out[m.group(1)] = m.group(1), m.group(2)
        elif name and line.startswith(" " * 12):
            out[name] += " " + line.strip()
    return {k: v.replace("%", "%%") for k, v in out.items()}


def _unoptional(hint: Any) -> Any:
    """``X`` for ``X | None`` (``Optional[X]``), else the hint itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint


def _scalar_type(hint: Any) -> type:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal or (args and isinstance(args[0], str)):
        return str
    return args[0] if args else hint


def _comma_list(kind: type) -> Any:
    """An argparse type: comma-separated values of ``kind`` (``128,256,512``)."""
    def parse(text: str) -> list:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    parse.__name__ = f"list of {kind.__name__}"
    return parse


def _default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def add_fields(
    parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple = (), default_from: str = "",
    choices: dict[str, tuple[str, ...]] | None = None, flags: dict[str, str] | None = None,
) -> None:
    """Add one ``--flag`` per dataclass field; the default ``None`` means 'not given'. Tuple fields
    take comma-separated values; a field without a default is a required flag. ``choices`` names
    the valid values of string fields that a registry, not a ``Literal``, defines; ``flags``
    renames a field's flag (its value still lands under the field's name)."""
    group, helps = parser.add_argument_group(title), _field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + (flags or {}).get(f.name, f.name).replace("_", "-")
        hint = _unoptional(typing.get_type_hints(cls)[f.name])
        listed = typing.get_origin(hint) is tuple
        kind = _scalar_type(typing.get_args(hint)[0] if listed else hint)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        text = helps.get(f.name, "").replace("``", "") + (
            "" if required or f.default is None and not default_from
            else f" (default: {default_from or _default(f.default)})")
        common = dict(dest=f.name, default=None, help=text)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif listed:
            group.add_argument(flag, type=_comma_list(kind), metavar=f.name.upper(),
                               required=required, **common)
        else:
            options = (choices or {}).get(f.name) or (typing.get_args(hint) if kind is str else None)
            group.add_argument(flag, type=kind, metavar=None if options else f.name.upper(),
                               choices=options or None, required=required, **common)


def given(args: argparse.Namespace, cls: type, skip: tuple = ()) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line."""
    return {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
        if f.name not in skip and getattr(args, f.name, None) is not None
    }


# --- sub-commands --------------------------------------------------------------------------------


def _command(sub: argparse._SubParsersAction, func: Any) -> argparse.ArgumentParser:
    """The sub-command ``func`` runs (``_run_export``: ``export``): the first paragraph of its
    docstring is the one-line help, the second the description."""
    summary, _, rest = inspect.cleandoc(func.__doc__).partition("\n\n")
    p = sub.add_parser(func.__name__.removeprefix("_run_"), help=summary,
                       description=" ".join(rest.split()))
    p.set_defaults(func=func)
    return p


def _train_parser(sub: argparse._SubParsersAction) -> None:
    from linbias.config import TrainConfig

    p = _command(sub, _run_train)
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model size preset (default: tiny; on --resume: the saved config; with "
                   "--init-from: the parent's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_fields(p, ModelConfig, "model", skip=("vocab_size",), default_from="the preset",
               choices={"position": tuple(POSITION_METHODS)})
    add_fields(p, TrainConfig, "training")


def _run_train(args: argparse.Namespace) -> int:
    """train a GPT with a chosen position method

    Train a GPT on a corpus (default: the Python standard library's source). Runs under
    torchrun for several processes (DistributedDataParallel).
    """
    from linbias.config import TrainConfig
    from linbias.runs import run_configs
    from linbias.train import train

    mc, tc = run_configs(given(args, ModelConfig, ("vocab_size",)), given(args, TrainConfig),
                         preset=args.preset, resume=args.out if args.resume else None)
    out = train(mc, tc, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"run written to {out}")
    return 0


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, _run_eval)
    p.add_argument("run", type=Path, nargs="?", default=None,
                   help="a run directory written by 'linbias train' (or give --hf)")
    hf = p.add_argument_group("transformers model (instead of a run)")
    hf.add_argument("--hf", metavar="PATH_OR_NAME", default=None,
                    help="a transformers causal LM: a local directory (e.g. from 'linbias export') "
                    "or a Hugging Face Hub name (needs network access or the local HF cache)")
    hf.add_argument("--train-len", type=int, default=None,
                    help="its training length L for the scaling rules (default: MPT max_seq_len, "
                    "Falcon max_position_embeddings; BLOOM needs it)")
    add_fields(p, EvalConfig, "evaluation", flags={"rules": "scaling"})
    p.add_argument("--heatmap", type=Path, default=None,
                   help="with --task: write a PNG heatmap (length x depth, one panel per rule) here")
    p.add_argument("--json", type=Path, default=None, help="write {\"results\": [...]} here (a new "
                   "file, or an earlier eval's results)")
    p.add_argument("--force", action="store_true",
                   help="replace whatever file --json or --heatmap names (never inside a run or "
                   "export folder)")
    p.add_argument("--no-progress", action="store_true")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _run_eval(args: argparse.Namespace) -> int:
    """perplexity or retrieval past the training length

    Perplexity and bits per byte of a trained run (or, with --hf, a transformers model) at each
    evaluation length, non-overlapping or with a sliding window, with and without length-
    scaling rules; with --task, retrieval accuracy per length and needle depth instead.
    """
    from linbias.evaluate import check_results_path, write_results
    from linbias.fileio import check_output
    from linbias.report import HEATMAP

    if (args.run is None) == (args.hf is None):
        raise ValueError("give either a run directory or --hf PATH_OR_NAME (one of them, not both)")
    if args.hf is None and args.train_len is not None:
        raise ValueError("--train-len applies to --hf models; a run has its own (config.json)")
    fields = given(args, EvalConfig)
    if args.heatmap is not None and fields.get("task") is None:
        raise ValueError("--heatmap applies only with --task; drop it or add --task")
    check_protocol(fields.get("task"), fields, name=_flag, task_word="--task")
    config = EvalConfig.from_dict(fields)  # every value checked before a model is loaded
    # Now, not after an evaluation that may take hours.
    if args.json is not None:
        check_results_path(args.json, force=args.force)
    if args.heatmap is not None:
        check_output(args.heatmap, HEATMAP, force=args.force, flag="--heatmap")
    progress = not args.no_progress
    if args.hf is not None:
        from linbias.hf import evaluate_hf

        records = evaluate_hf(args.hf, config, train_len=args.train_len, progress=progress)
    else:
        from linbias.evaluate import evaluate_run

        records = evaluate_run(args.run, config, progress=progress)
    (_print_perplexity if config.task is None else _print_task)(args, config, records)
    if args.json:
        write_results(args.json, records, force=args.force)
        print(f"wrote {args.json}")
    return 0


def _print_perplexity(args: argparse.Namespace, config: Any, records: list[dict]) -> None:
    from linbias.report import format_table, per_position_summary

    print(format_table(records))
    if config.per_position:
        print(per_position_summary(records))


def _print_task(args: argparse.Namespace, config: Any, records: list[dict]) -> None:
    from linbias.report import HEATMAP, accuracy_table, plot_heatmaps, retrieval_table

    done = [r for r in records if not r["skipped"]]
    for rule in config.rules:
        print(f"scaling {rule}: " + accuracy_table([r for r in done if r["scaling"] == rule]))
    print(retrieval_table(records))
    if args.heatmap is not None:
        if not done:
            raise ValueError("no length could be evaluated, so there is no heatmap to draw")
        plot_heatmaps({f"{done[0]['position']} / {rule}": [r for r in done if r["scaling"] == rule]
                       for rule in config.rules}, args.heatmap, stamp=HEATMAP)
        print(f"wrote {args.heatmap}")


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, _run_export)
    p.add_argument("run", type=Path, help="a run directory written by 'linbias train'")
    p.add_argument("--to-hf", type=Path, required=True, metavar="OUT_DIR",
                   help="directory to write (new, empty, or a previous export, which is replaced)")


def _run_export(args: argparse.Namespace) -> int:
    """write an ALiBi run as a transformers checkpoint

    Write an ALiBi run as a transformers MPT checkpoint with its tokenizer, for
    AutoModelForCausalLM / AutoTokenizer.from_pretrained; the logits are checked to match. MPT
    in transformers has no biases and a 4 * d_model MLP, so only such models export.
    """
    from linbias.hf import export_to_hf

    out = export_to_hf(args.run, args.to_hf)
    print(f"exported {args.run} to {out} (MPT format): load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _reproduce_parser(sub: argparse._SubParsersAction) -> None:
    from linbias.config import REPRODUCE_PRESETS

    p = _command(sub, _run_reproduce)
    p.add_argument("--preset", choices=sorted(REPRODUCE_PRESETS), default="quick",
                   help="; ".join(f"{k}: about {v.expected_minutes:g} min on 2 CPU cores"
                                  for k, v in REPRODUCE_PRESETS.items()))
    p.add_argument("--out", type=Path, default=None, help="report directory (default: reports/PRESET)")
    p.add_argument("--data", default="stdlib", help="corpus: stdlib, text:PATH or hf:NAME[:CONFIG]")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds per method; tables and plots show the mean and min-max range "
                   "(default: 1)")
    p.add_argument("--positions", type=_comma_list(str), default=list(POSITION_METHODS),
                   help=f"methods to compare (default: {','.join(POSITION_METHODS)})")
    p.add_argument("--embedding", choices=get_args(Embedding), default=None,
                   help="token embedding convention (default: the preset's, gpt2): gpt2 (std "
                   "0.02, unscaled) or fairseq (std d^-0.5, times sqrt(d), as the paper's code)")
    p.add_argument("--force", action="store_true",
                   help="retrain and re-evaluate everything, replacing runs of other settings; "
                   "only folders that are provably linbias runs are ever deleted")
    p.add_argument("--no-progress", action="store_true")


def _run_reproduce(args: argparse.Namespace) -> int:
    """the train-short / test-long experiment, end to end

    Train one model per position method at the same length, evaluate each at L..16L with and
    without scaling rules, and write results.json, report.md and ppl_vs_length.png. Finished
    runs are reused; --force redoes them.
    """
    from linbias.reproduce import reproduce

    out = args.out or Path("reports") / args.preset
    reproduce(args.preset, out, data=args.data, seed=args.seed, seeds=args.seeds,
              positions=tuple(args.positions), embedding=args.embedding,
              force=args.force, progress=not args.no_progress)
    print((out / "report.md").read_text())
    return 0


def _harness_parser(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, _run_harness)
    p.add_argument("run", type=Path, nargs="?", default=None,
                   help="a run directory written by 'linbias train' (or give --hf)")
    p.add_argument("--hf", metavar="PATH_OR_NAME", default=None, help="a transformers causal LM")
    p.add_argument("--train-len", type=int, default=None, help="--hf only: its training length L")
    p.add_argument("--tasks", type=_comma_list(str), required=True,
                   help="lm-eval tasks, e.g. linbias_qmsum,linbias_passkey,scrolls_qmsum")
    p.add_argument("--scaling", type=_comma_list(str), default=["none"],
                   help="scaling rules, one evaluation each (default: none)")
    p.add_argument("--max-length", type=int, default=None,
                   help="L', the longest input (default: the training length)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (lm-eval's)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=1, dest="batch_size")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="the model's weights (default: as loaded)")
    p.add_argument("--metadata", type=json.loads, default=None,
                   help='task metadata as JSON, e.g. \'{"lengths": [512]}\' (lm-eval\'s --metadata)')
    p.add_argument("--gen-kwargs", "--gen_kwargs", default=None, dest="gen_kwargs",
                   help="lm-eval's generation settings, e.g. max_gen_toks=64")
    p.add_argument("--out", type=Path, required=True, help="folder for results and table.md")


def _run_harness(args: argparse.Namespace) -> int:
    """lm-evaluation-harness tasks at a chosen length and rule

    Run lm-eval tasks (summarization such as linbias_qmsum or scrolls_qmsum, linbias's retrieval
    tasks, any other) on a run or a transformers model at L' = --max-length, once per scaling
    rule; writes lm-eval's results JSON per rule and a table. Needs linbias[harness].
    """
    from linbias.harness import require_harness

    require_harness()
    from linbias.harness.run import evaluate_harness

    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = evaluate_harness(args.run, hf=args.hf, tasks=args.tasks, rules=args.scaling,
                               max_length=args.max_length, out=args.out, train_len=args.train_len,
                               limit=limit, batch_size=args.batch_size, device=args.device,
                               dtype=args.dtype, metadata=args.metadata, gen_kwargs=args.gen_kwargs)
    print((args.out / "table.md").read_text(), end="")
    print(f"wrote {args.out}: {', '.join(f'{r}/results.json' for r in results)}, table.md")
    return 0


COMMANDS = (_train_parser, _eval_parser, _export_parser, _reproduce_parser, _harness_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linbias",
        description="ALiBi (Attention with Linear Biases): train short, test long. "
        f"Position methods: {', '.join(POSITION_METHODS)}.",
    )
    parser.add_argument("--version", action="version", version=f"linbias {linbias.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted command left, and how to go on."""
    out = getattr(args, "out", None)
    if args.command == "train" and (Path(out) / "checkpoint.json").exists():
        return (f"interrupted; the run keeps its last checkpoint: continue it with 'linbias train "
                f"--resume --out {out}'")
    if args.command == "train" and (Path(out) / "config.json").exists():
        return (f"interrupted before the run's first checkpoint: {out} cannot be resumed; train "
                "again into a new --out")
    if args.command == "reproduce":
        return "interrupted; run the same command again to continue (finished runs are reused)"
    if args.command == "export":
        return f"interrupted; {args.to_hf} was not changed"
    return "interrupted; nothing was written"


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: temporary files and locks are released


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"linbias {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, RuntimeError, MemoryError) as exc:
        # Bad input or an unusable path (OSError names it): one clear line, not a traceback.
        print(f"linbias {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
