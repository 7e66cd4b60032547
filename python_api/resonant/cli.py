"""The `resonant` console script: one argparse subcommand per module.

Each module in SUBCOMMANDS has `add_subcommand(subparsers)`, which adds its parser and sets
`func` (called with the parsed args; its return value is the exit status).
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("resonant.train_cli",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resonant", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_subcommand(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
