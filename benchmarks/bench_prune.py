"""Recursive pruning (prune_mask, design.md §3): reference (M×M) vs fused backends.

Memories like the notebook's at a constant density: M locations ~ N(0, (100·√(M/1024))²) in 2-D,
σ = 10, θ = 25, E-dimensional values from a smooth field (Gaussian bumps carrying random unit
vectors), max_error 0.05, up to 10 steps. For each M and backend: median wall time of the whole
prune_mask call and its peak extra memory (CPU: peak RSS above baseline in a fresh process; CUDA:
torch.cuda.max_memory_allocated). The reference is measured only where its M×M footprint fits
comfortably; elsewhere the row says what it would need, extrapolated as M² from the largest
measured reference row.

    PYTHONPATH=.:python_api python benchmarks/bench_prune.py            # CPU sizes 1024, 4096, 16384
    PYTHONPATH=.:python_api python benchmarks/bench_prune.py --quick    # M 1024, 2048: checks it runs
    PYTHONPATH=.:python_api python benchmarks/bench_prune.py --device cuda   # up to 65536
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import resonant_kernels as rk  # noqa: E402
from _cases import Case, ready  # noqa: E402
from _measure import (MB, add_out_argument, cuda_peak_extra_mb, machine_description, median_time,  # noqa: E402
                      out_path, peak_extra_rss_mb, write_json)

SD, THRESHOLD, MAX_ERROR, MAX_STEPS = 10.0, 25.0, 0.05, 10
DTYPE = torch.float32
# The reference's peak is dominated by (M, M, d) differences/variances and a few (M, M) tensors.
REFERENCE_BYTES_PER_PAIR = DTYPE.itemsize * (3 * 2 + 6)
# A shared machine: the reference's M×M tensors are measured only up to this much (--reference-limit-gb).
CPU_REFERENCE_LIMIT_GB = 4.0


def make_memory(M: int, E: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    spread = 100.0 * math.sqrt(M / 1024)
    loc = torch.randn(M, 2, generator=gen, dtype=torch.float64) * spread
    centers = torch.randn(max(8, M // 25), 2, generator=gen, dtype=torch.float64) * spread
    directions = torch.nn.functional.normalize(torch.randn(len(centers), E, generator=gen, dtype=torch.float64), dim=-1)
    values = torch.zeros(M, E, dtype=torch.float64)
    for chunk in torch.arange(M).split(4096):  # the field itself stays O(M) in memory
        bumps = torch.exp(-((loc[chunk, None, :] - centers[None]) ** 2).sum(-1) / (2 * 60.0**2))
        values[chunk] = bumps @ directions
    return loc.to(device, DTYPE), values.to(device, DTYPE)


def make_call(M: int, E: int, backend: str, device: str = "cpu"):
    """A zero-argument prune_mask call (also the entry point of the memory probe's subprocess)."""
    loc, values = make_memory(M, E, device)
    return lambda: rk.prune_mask(loc, SD, values, max_error=MAX_ERROR, match_threshold=THRESHOLD,
                                 max_steps=MAX_STEPS, backend=backend)


def measure(M, E, backend, device, repeats):
    call = make_call(M, E, backend, device)
    kept = int(call().sum())
    seconds = median_time(call, device=device, repeats=repeats, warmup=0, max_seconds=120)
    if device == "cuda":
        peak = cuda_peak_extra_mb(call)
    else:
        peak = peak_extra_rss_mb("bench_prune", "make_call", dict(M=M, E=E, backend=backend, device=device))
    return dict(M=M, backend=backend, seconds=seconds, peak_extra_mb=peak, kept=kept)


def reference_estimate_mb(M) -> float:
    return M * M * REFERENCE_BYTES_PER_PAIR / MB


def reference_budget_mb(device, limit_gb) -> float:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return min(0.7 * free / MB, limit_gb * 1024)
    return limit_gb * 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--quick", action="store_true", help="M in {1024, 2048}, one repeat: checks it runs")
    parser.add_argument("--E", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-limit-gb", type=float, default=CPU_REFERENCE_LIMIT_GB,
                        help="skip reference rows whose estimated peak exceeds this")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.quick:
        args.sizes, args.repeats = args.sizes or [1024, 2048], 1
    sizes = args.sizes or ([1024, 4096, 16384, 65536] if cuda else [1024, 4096, 16384])
    fused = ["triton", "cuda"] if cuda else ["cpu"]
    fused = [b for b in fused if any(r.name == b and r.usable and "prune_mask" in r.ops for r in rk.backends(False))]

    rows, measured_ref = [], None  # measured_ref: (M, peak MB) of the largest measured reference row
    jobs = [(M, b) for M in sizes for b in ["reference", *fused]]
    for M, backend in tqdm(jobs, desc="prune_mask", unit="run"):
        if backend == "reference":
            need_mb = reference_estimate_mb(M)
            if measured_ref:
                need_mb = measured_ref[1] * (M / measured_ref[0]) ** 2
            if need_mb > reference_budget_mb(args.device, args.reference_limit_gb):
                rows.append(dict(M=M, backend=backend, skipped=f"would need ~{need_mb / 1024:.1f} GB"))
                continue
        try:
            row = measure(M, args.E, backend, args.device, args.repeats)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            if "out of memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
                raise
            rows.append(dict(M=M, backend=backend, skipped="out of memory"))
            if cuda:
                torch.cuda.empty_cache()
            continue
        if backend == "reference" and row["peak_extra_mb"] > 0:
            measured_ref = (M, row["peak_extra_mb"])
        rows.append(row)

    print(f"\nprune_mask, E={args.E}, {DTYPE}, σ={SD}, θ={THRESHOLD}, max_error={MAX_ERROR}, {args.device}")
    print(f"{'M':>7}  {'backend':<10} {'time (s)':>10} {'peak extra (MB)':>16} {'kept':>7}  speed-up vs reference")
    ref_time = {r["M"]: r["seconds"] for r in rows if r["backend"] == "reference" and "seconds" in r}
    for r in rows:
        if "skipped" in r:
            print(f"{r['M']:>7}  {r['backend']:<10} {r['skipped']}")
            continue
        speedup = f"{ref_time[r['M']] / r['seconds']:.1f}x" if r["M"] in ref_time and r["backend"] != "reference" else ""
        r["speedup_vs_reference"] = speedup
        print(f"{r['M']:>7}  {r['backend']:<10} {r['seconds']:>10.3f} {r['peak_extra_mb']:>16.1f} {r['kept']:>7}  {speedup}")
    out = out_path(args.out, f"prune_{args.device}.json")
    write_json(out, dict(benchmark="prune_mask", E=args.E, dtype=str(DTYPE), sd=SD, threshold=THRESHOLD,
                         max_error=MAX_ERROR, max_steps=MAX_STEPS, machine=machine_description(), rows=rows))
    print(f"wrote {out}")


# ---- the cases of pytest-benchmark (benchmarks/test_benchmarks.py) ---------------------------

def benchmark_cases(size):
    """One group per M (CPU: the reference and the fused `cpu` backend); "full" is the script's table
    (the reference left out where its M×M tensors would pass CPU_REFERENCE_LIMIT_GB)."""
    E = 8 if size == "smoke" else 64
    sizes = {"smoke": [64], "quick": [1024, 2048], "full": [1024, 4096, 16384]}[size]
    cases = []
    for M in sizes:
        for backend in ("reference", "cpu"):
            skip = None
            if backend == "reference" and reference_estimate_mb(M) > CPU_REFERENCE_LIMIT_GB * 1024:
                skip = f"the reference would need ~{reference_estimate_mb(M) / 1024:.1f} GB"
            cases.append(Case(f"prune_mask M={M} E={E}", backend, ready(make_call, M, E, backend), skip=skip,
                              info=dict(M=M, E=E, threshold=THRESHOLD, max_error=MAX_ERROR)))
    return cases


if __name__ == "__main__":
    main()
