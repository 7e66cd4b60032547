"""The benchmark cases as data, shared by the scripts' tables and by pytest-benchmark.

Each benchmark module (bench_read, bench_prune, bench_sample, bench_engram) lists its cases with
`benchmark_cases(size)`: one `Case` per (case, peer), the case named by `group` (one
pytest-benchmark group, one table block) and the peer by `peer` (one row). `setup` is a context
manager that builds the inputs and yields the zero-argument call to time, and closes whatever it
opened (a Milvus Lite file, a temporary folder). A peer that cannot run here (an optional package
missing) raises `Unavailable` from `setup`, or has `skip` set when that is known without building.

Sizes: "smoke" (tiny, seconds for every case together: proves the code runs), "quick" (minutes on
2 cores), "full" (the sizes BENCHMARKS.md records).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

SIZES = ("smoke", "quick", "full")
MODULES = ("bench_read", "bench_prune", "bench_sample", "bench_engram")


class Unavailable(Exception):
    """A peer that cannot run on this machine (the message says why); reported as skipped."""


@dataclass(frozen=True)
class Case:
    group: str
    peer: str
    setup: Callable[[], ContextManager[Callable[[], object]]]
    skip: Optional[str] = None
    info: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.group}/{self.peer}".replace(" ", "-")


def ready(build: Callable[..., Callable[[], object]], *args, **kwargs) -> Callable[[], ContextManager]:
    """`setup` for a builder that opens nothing: build(*args, **kwargs) returns the call."""
    return lambda: contextlib.nullcontext(build(*args, **kwargs))


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return size


def all_cases(size: str) -> list[Case]:
    """Every module's cases at `size`, in MODULES order."""
    check_size(size)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    cases = [case for name in MODULES for case in importlib.import_module(name).benchmark_cases(size)]
    ids = [case.id for case in cases]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise AssertionError(f"benchmark cases share an id: {duplicated}")
    return cases
