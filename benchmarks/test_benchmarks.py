"""Every benchmark case under pytest-benchmark: one group per case, one row per backend or peer.

    pytest benchmarks/ --benchmark-only --bench-size quick     # minutes on 2 cores
    pytest benchmarks/ --benchmark-only --benchmark-autosave   # the recorded sizes, saved under runs/
    pytest benchmarks/ --benchmark-only --benchmark-compare    # against the last saved run

The cases come from the benchmark scripts (`benchmark_cases` in bench_read, bench_prune,
bench_sample, bench_engram), so the scripts' tables and these groups time the same calls. The
first call of each row (set-up, compilation) is timed apart into extra_info and left out of the
rounds.
"""
from __future__ import annotations

import contextlib
import time

import pytest

from _cases import Unavailable, all_cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = all_cases(metafunc.config.getoption("bench_size"))
        metafunc.parametrize("case", cases, ids=[case.id for case in cases])


def test_case(benchmark, case):
    if case.skip:
        pytest.skip(case.skip)
    with contextlib.ExitStack() as opened:
        try:
            call = opened.enter_context(case.setup())
        except Unavailable as exc:
            pytest.skip(str(exc))
        benchmark.group = case.group
        benchmark.extra_info.update(case.info, peer=case.peer)
        t0 = time.perf_counter()
        call()
        benchmark.extra_info["first_call_seconds"] = time.perf_counter() - t0
        benchmark(call)
