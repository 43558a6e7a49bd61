"""The ``linbias`` command: a thin map from sub-command to library function."""

from __future__ import annotations

import argparse
import sys

import linbias


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linbias",
        description="ALiBi (Attention with Linear Biases): train short, test long.",
    )
    parser.add_argument("--version", action="version", version=f"linbias {linbias.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
