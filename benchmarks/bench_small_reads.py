"""Reads of a few queries on the cpu backend: the kernel the dispatch picks against the per-pair one.

    python benchmarks/bench_small_reads.py                       # float32, M = 10 000, one thread
    python benchmarks/bench_small_reads.py --dtype float64 --entries 50000 --rounds 9

A memory-based agent reads its memory with one query per environment: Q of 1 to 16 against
thousands of entries. csrc/read_cpu.cpp sends a call whose variance every pair shares to the dense
kernel (csrc/read_dense_cpu.cpp: queries in the SIMD lanes) from dense_read_min_queries() queries
on, fewer to the per-pair kernel (queries in blocks of 8, one pair at a time). This benchmark runs
each case both ways, the dispatch's choice (`gaussian_read(..., backend="cpu")`) and the same call
with the per-pair kernel put in its place (`_C.read_forward_per_pair`), alternating the two calls
in every round, and reports the median ratio per-pair / chosen (above 1: the choice is faster) with
the path the dispatch took ("dense", "per-pair", or "dense-blocked": csrc/read_blocked_cpu.cpp and
torch's BLAS, which dense reads without a threshold take from E = 64 values at the sizes of
cpu_blocked.faster_forward, whatever their number of queries).

Cases: the memory's locations N(0, 0.5²) per dimension, each query an entry plus N(0, 0.05²), one
σ for queries and entries with v = σ_q² + σ_m² = 0.09 · d / 8 and the threshold (on the plain
distance) 0.9 · sqrt(d / 8) ("tight": a few percent of the entries pass), 3.0 · sqrt(d / 8)
("wide": most pass) or none. Writes --out (JSON, untracked by default) with the machine's load.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import subprocess
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

THRESHOLDS = {"tight": 0.9, "wide": 3.0, "none": None}


@contextlib.contextmanager
def per_pair_forward():
    """Inside the block every cpu read runs the per-pair forward (the blocked path switched off too)."""
    from resonant_kernels import _C
    from resonant_kernels.backends import cpu_blocked

    original, applies = _C.read_forward, cpu_blocked.applies
    _C.read_forward = _C.read_forward_per_pair
    cpu_blocked.applies = lambda *args, **kwargs: False
    try:
        yield
    finally:
        _C.read_forward, cpu_blocked.applies = original, applies


def chosen_path(read) -> str:
    """The forward kernel the dispatch takes for read() (the first cpu call it makes)."""
    from resonant_kernels import _C

    seen = []
    original, blocked = _C.read_forward, _C.blocked_read_forward

    def spy(dtype, shape, qloc, qvar, mloc, mvar, *rest):
        seen.append(_C.read_forward_path(dtype, shape, qvar, mvar))
        return original(dtype, shape, qloc, qvar, mloc, mvar, *rest)

    def spy_blocked(*args):
        seen.append("dense-blocked")
        return blocked(*args)

    _C.read_forward, _C.blocked_read_forward = spy, spy_blocked
    try:
        read()
    finally:
        _C.read_forward, _C.blocked_read_forward = original, blocked
    return seen[0] if seen else "dense-blocked"  # the blocked path's Python loop calls neither


def case(Q: int, M: int, d: int, E: int, threshold: str, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    mem_loc = (torch.randn(M, d, generator=g) * 0.5).to(dtype)
    query_loc = mem_loc[torch.randint(0, M, (Q,), generator=g)] + 0.05 * torch.randn(Q, d, generator=g).to(dtype)
    mem_values = torch.randn(M, E, generator=g).to(dtype)
    sd = math.sqrt(0.09 * d / 8 / 2)
    thr = THRESHOLDS[threshold]
    thr = None if thr is None else thr * math.sqrt(d / 8)
    return lambda: rk.gaussian_read(query_loc, sd, mem_loc, sd, mem_values, match_threshold=thr, validate=False,
                                    backend="cpu")


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    p.add_argument("--entries", type=int, default=10_000, help="M (default: %(default)s)")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--values", type=int, nargs="+", default=[1, 8, 84, 256], help="E (84: resonant train's columns)")
    p.add_argument("--thresholds", nargs="+", default=list(THRESHOLDS), choices=list(THRESHOLDS))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--rounds", type=int, default=15, help="alternating calls of each kernel (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(run_dir("benchmarks") / "small_reads.json"),
                   help="the JSON results (default: %(default)s, untracked)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = []
    grid = list(itertools.product(args.dims, args.values, args.thresholds, args.queries))
    for d, E, threshold, Q in tqdm(grid, desc="cases", unit="case"):
        read = case(Q, args.entries, d, E, threshold, dtype, args.seed)
        path = chosen_path(read)
        chosen, per_pair = [], []
        for _ in range(2):  # warm-up
            read()
            with per_pair_forward():
                read()
        for _ in range(args.rounds):
            chosen.append(seconds(read))
            with per_pair_forward():
                per_pair.append(seconds(read))
        ratio = float(np.median(np.asarray(per_pair) / np.asarray(chosen)))
        rows.append({"Q": Q, "M": args.entries, "d": d, "E": E, "threshold": threshold, "path": path,
                     "chosen_ms": round(float(np.median(chosen)) * 1e3, 4),
                     "per_pair_ms": round(float(np.median(per_pair)) * 1e3, 4), "per_pair_over_chosen": round(ratio, 3)})
    print(f"{'d':>3} {'E':>4} {'threshold':>9} " + " ".join(f"{'Q=' + str(q):>16}" for q in args.queries))
    for (d, E, threshold), group in itertools.groupby(rows, key=lambda r: (r["d"], r["E"], r["threshold"])):
        cells = [f"{r['per_pair_over_chosen']:5.2f} {r['path']:>10}" for r in group]
        print(f"{d:>3} {E:>4} {threshold:>9} " + " ".join(f"{c:>16}" for c in cells))
    write_text_atomic(args.out, json.dumps({"command": " ".join(sys.argv), "uptime_start": load,
                                            "dtype": args.dtype, "machine": machine_description(),
                                            "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
