"""Dense reads without a threshold on the cpu backend: the blocked path against the fused dense kernel.

    python benchmarks/bench_blocked_dispatch.py                      # float32, 2 threads
    python benchmarks/bench_blocked_dispatch.py --threads 1 --dtype float64

A read without a threshold whose pairs share one variance, with values at least
cpu_blocked.BLOCKED_FROM_E wide, can run on two cpu kernels: the blocked path (issue #17:
blocks of queries, each block's weights in a tile of about 1 MB, the tile times the values by the
BLAS that torch ships; resonant_kernels/backends/cpu_blocked.py) and the fused dense kernel
(csrc/read_dense_cpu.cpp). `cpu_blocked.applies` decides. This benchmark times each case both ways
in one run, alternating the two calls in every round (the blocked path switched off for the
dense calls, and for the blocked ones its rule before the bounds on the values' size, few queries
and float64), and reports the
median ratio blocked / dense (above 1: the dense kernel is faster) beside which one the shipped
rule picks.

Cases: M entries at N(0, 10²) in d = 2, σ = 10 for queries and entries, values N(0, 1), each query
an entry plus 1 in every coordinate; Q queries, E value columns. Writes --out (JSON, untracked by
default) with the machine's description and load.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python_api"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import resonant_kernels as rk  # noqa: E402
from _measure import machine_description  # noqa: E402
from resonant.runs import run_dir, write_text_atomic  # noqa: E402
from resonant_kernels.backends import cpu_blocked  # noqa: E402


@contextlib.contextmanager
def replaced(name: str, value):
    """cpu_blocked's attribute `name` is `value` inside the block."""
    original = getattr(cpu_blocked, name)
    setattr(cpu_blocked, name, value)
    try:
        yield
    finally:
        setattr(cpu_blocked, name, original)


def blocked_off():
    """Inside the block no cpu read takes the blocked path."""
    return replaced("applies", lambda *args, **kwargs: False)


def blocked_on():
    """Inside the block every read the blocked path can run takes it (the rule before its bounds on
    the values' size, on few queries and on float64: issue #17's)."""
    return replaced("faster_forward", lambda *args, **kwargs: True)


def chosen_is_blocked(read) -> bool:
    """Whether the shipped rule sends this read to the blocked path."""
    calls = []
    applies = cpu_blocked.applies

    def spy(*args, **kwargs):
        calls.append(applies(*args, **kwargs))
        return calls[-1]

    with replaced("applies", spy):
        read()
    return bool(calls and calls[0])


def seconds(call, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    return (time.perf_counter() - t0) / reps


def run_case(Q: int, M: int, E: int, dtype: torch.dtype, rounds: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mem_loc = (torch.randn(M, 2, generator=g) * 10).to(dtype)
    values = torch.randn(M, E, generator=g).to(dtype)
    query_loc = mem_loc[torch.randint(0, M, (Q,), generator=g)] + 1.0

    def read():
        return rk.gaussian_read(query_loc, 10.0, mem_loc, 10.0, values, backend="cpu")

    with blocked_on():
        blocked_out = read()
    with blocked_off():
        dense_out = read()
    # the two kernels read the same numbers (to the dtype's rounding of a sum over M)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(blocked_out, dense_out, rtol=tol, atol=tol)
    once = seconds(read, 1)
    reps = max(1, int(0.05 / max(once, 1e-6)))
    blocked, dense = [], []
    for _ in range(rounds):
        with blocked_on():
            blocked.append(seconds(read, reps))
        with blocked_off():
            dense.append(seconds(read, reps))
    ratios = np.array(blocked) / np.array(dense)
    return {"Q": Q, "M": M, "E": E, "value_bytes": M * E * values.element_size(),
            "blocked_ms": round(float(np.median(blocked)) * 1e3, 4), "dense_ms": round(float(np.median(dense)) * 1e3, 4),
            "dense_speedup": round(float(np.median(ratios)), 3), "shipped": "blocked" if chosen_is_blocked(read) else "dense"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch (and kernel) threads (default: %(default)s)")
    p.add_argument("--queries", type=int, nargs="+", default=[4, 16, 64, 256, 1024])
    p.add_argument("--entries", type=int, nargs="+", default=[2048, 10_000, 50_000])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024], help="value columns E")
    p.add_argument("--most-products", type=float, default=4e9,
                   help="skip cases whose Q·M·E exceeds this (default: %(default)s)")
    p.add_argument("--shapes", nargs="+", metavar="Q,M,E",
                   help="these (Q, M, E) instead of the grid of --queries, --entries and --widths (issue #17's: "
                        "4096,2048,256 3000,1500,512 10000,1024,1024 4096,4096,128)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(run_dir("benchmarks") / "blocked_dispatch.json"),
                   help="the JSON results (default: %(default)s, untracked)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.shapes:
        cases = [tuple(int(v) for v in shape.split(",")) for shape in args.shapes]
    else:
        cases = [(Q, M, E) for M, E, Q in itertools.product(args.entries, args.widths, args.queries)
                 if Q * M * E <= args.most_products]
    result = {"command": " ".join(sys.argv), "machine": machine_description(), "dtype": args.dtype,
              "threads": args.threads, "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "load_start": os.getloadavg(), "cases": []}
    for Q, M, E in tqdm(cases, desc="cases", unit="case"):
        result["cases"].append(run_case(Q, M, E, dtype, args.rounds, args.seed))
    result["load_end"] = os.getloadavg()
    result["ended_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    write_text_atomic(args.out, json.dumps(result, indent=1))
    print(f"{result['machine']}, {args.dtype}, {args.threads} thread(s); load {result['load_start']} -> "
          f"{result['load_end']}")
    print(f"{'M':>6} {'E':>5} {'Q':>5} {'values MB':>9} {'blocked ms':>10} {'dense ms':>9} {'dense speed-up':>14} shipped")
    for c in result["cases"]:
        print(f"{c['M']:>6} {c['E']:>5} {c['Q']:>5} {c['value_bytes'] / 2**20:>9.1f} {c['blocked_ms']:>10.3f} "
              f"{c['dense_ms']:>9.3f} {c['dense_speedup']:>14.2f} {c['shipped']}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
