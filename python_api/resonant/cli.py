"""The `resonant` console script.

Each subcommand lives in its own module with an `add_subcommand(subparsers)` function that adds
its parser (setting `func`, called with the parsed args); list the module in SUBCOMMAND_MODULES.
Modules that share a command group (`resonant demo <name>`) get it from `subgroup`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

SUBCOMMAND_MODULES = ("resonant.train_cli", "resonant.parallel.cli", "resonant.demo_treeworld", "resonant.hippocampus.cli")

GROUP_HELP = {
    "demo": "reproduce a published experiment on the fused ops",
    "serve": "run a service over HTTP",
    "experiment": "run an experiment and write its results",
}


def subgroup(subparsers, name: str):
    """The subparsers of command group `name` (e.g. "demo"), created on first use."""
    groups = subparsers.__dict__.setdefault("_resonant_groups", {})
    if name not in groups:
        parser = subparsers.add_parser(name, help=GROUP_HELP.get(name))
        groups[name] = parser.add_subparsers(dest=f"{name}_command", required=True, metavar="NAME")
    return groups[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resonant", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_subcommand(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from .extras import MissingExtra
    from .train_cli import ResumeError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MissingExtra, ResumeError) as exc:  # a user's setup or data, not a bug: one line, no traceback
        print(f"resonant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
