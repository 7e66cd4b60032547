"""pytest-benchmark set-up for `pytest benchmarks/` (BENCHMARKS.md, "pytest-benchmark").

--bench-size picks the case sizes (benchmarks/_cases.py): smoke (seconds: checks every case
runs), quick (minutes on 2 cores), full (the default: the sizes BENCHMARKS.md records). Saved runs
(--benchmark-autosave, --benchmark-save) go to runs/pytest-benchmark/ under the current directory,
untracked like every run output, unless --benchmark-storage says otherwise.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cases import SIZES  # noqa: E402

PLUGIN_DEFAULT_STORAGE = "file://./.benchmarks"
STORAGE = "file://./runs/pytest-benchmark"


def pytest_addoption(parser):
    parser.getgroup("resonant benchmarks").addoption(
        "--bench-size", choices=SIZES, default="full",
        help="case sizes: smoke (seconds), quick (minutes on 2 cores), full (BENCHMARKS.md's; default)")


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own pytest_configure opens the storage
def pytest_configure(config):
    if getattr(config.option, "benchmark_storage", None) == PLUGIN_DEFAULT_STORAGE:
        config.option.benchmark_storage = STORAGE
