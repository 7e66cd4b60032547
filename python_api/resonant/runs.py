"""Where runs write their outputs: ./runs/<name>/ under the current directory, or --out.

`resonant train`, `resonant demo` and the benchmark scripts default here, so a run from a checkout
never overwrites a tracked file (runs/ is git-ignored); results worth keeping are copied into the
repository on purpose. Files are written atomically (a temporary file, then a rename), so a run
that dies mid-write leaves the previous file intact.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Optional

from .types import PathLike

RUNS = Path("runs")


def run_dir(name: str, out: Optional[PathLike] = None) -> Path:
    """`out` if given, else runs/<name> (relative to the current directory)."""
    return Path(out) if out is not None else RUNS / name


def add_out_argument(parser: argparse.ArgumentParser, default_name: str, what: str) -> None:
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"folder for {what} (default: runs/{default_name} under the current directory)")


def write_text_atomic(path: PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
