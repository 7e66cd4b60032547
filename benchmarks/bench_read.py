"""Read benchmark (design.md §2) on CPU: reference vs a chunked-PyTorch baseline vs the fused
`cpu` backend vs KeOps (when pykeops is installed), times and peak extra memory in one run.

    python benchmarks/bench_read.py --quick       # the table in BENCHMARKS.md (make bench)
    python benchmarks/bench_read.py               # adds forward+backward and no-threshold rows
    python benchmarks/bench_read.py --device cuda # GPU table (benchmarks/bench_read_gpu.py)
    pytest benchmarks/bench_read.py --benchmark-only   # the same methods under pytest-benchmark

Inputs follow the notebook: locations ~ N(0, 100²) in 2-D, σ = 10 for queries and entries,
match_threshold = 25. Ratios are reference time / method time, measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resonant_kernels as rk  # noqa: E402
from _measure import (add_out_argument, add_speedups, machine_description, median_time, out_path,  # noqa: E402
                      peak_extra_rss_mb, write_json)

SIGMA, THRESHOLD, SPREAD = 10.0, 25.0, 100.0


def make_inputs(Q, M, d, E, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    query_loc = torch.randn(Q, d, generator=gen, dtype=dtype) * SPREAD
    mem_loc = torch.randn(M, d, generator=gen, dtype=dtype) * SPREAD
    mem_values = torch.randn(M, E, generator=gen, dtype=dtype)
    if requires_grad:
        for t in (query_loc, mem_loc, mem_values):
            t.requires_grad_()
    return query_loc, mem_loc, mem_values


def chunked_torch_read(query_loc, mem_loc, mem_values, sd, threshold, block=256):
    """What a careful PyTorch user writes for isotropic σ: torch.cdist per query block, so memory
    is block × M instead of Q × M × d. Same maths as the reference."""
    d = query_loc.shape[-1]
    var = 2 * sd * sd
    const = -0.5 * d * (math.log(var) + math.log(2 * math.pi))
    outs = []
    for start in range(0, query_loc.shape[0], block):
        dist2 = torch.cdist(query_loc[start:start + block], mem_loc).square()
        logk = dist2 * (-0.5 / var) + const
        if threshold is not None:
            logk = logk.masked_fill(dist2 > threshold**2, -math.inf)
        weights = rk.reference.masked_softmax(logk)
        outs.append(weights @ mem_values)
    return torch.cat(outs)


def keops_read(query_loc, mem_loc, mem_values, sd, threshold):
    """KeOps LazyTensor form: masked entries get a -1e30 logit (KeOps has no -inf masking), and a
    second reduction zeroes the queries that matched nothing, so it computes exactly our op."""
    from pykeops.torch import LazyTensor

    d = query_loc.shape[-1]
    var = 2 * sd * sd
    const = -0.5 * d * (math.log(var) + math.log(2 * math.pi))
    q = LazyTensor(query_loc[:, None, :].contiguous())
    m = LazyTensor(mem_loc[None, :, :].contiguous())
    dist2 = ((q - m) ** 2).sum(-1)
    logk = dist2 * (-0.5 / var) + const
    values = LazyTensor(mem_values[None, :, :].contiguous())
    if threshold is None:
        return logk.sumsoftmaxweight(values, axis=1)
    inside = (threshold**2 - dist2).step()
    matched = inside.max(dim=1)
    return (logk + (inside - 1.0) * 1e30).sumsoftmaxweight(values, axis=1) * matched


def keops_reason():
    try:
        import pykeops  # noqa: F401
        from pykeops.torch import LazyTensor  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"pykeops unavailable ({type(exc).__name__}: {exc})"
    return None


METHODS = ("reference", "chunked_torch", "cpu", "keops")


def build(method, Q, M, d, E, threshold=THRESHOLD, backward=False, dtype="float32"):
    """A zero-argument callable running `method` once (forward, or forward + backward)."""
    dtype = getattr(torch, dtype)
    query_loc, mem_loc, mem_values = make_inputs(Q, M, d, E, dtype, requires_grad=backward)
    if method in ("reference", "cpu"):
        fn = lambda: rk.gaussian_read(query_loc, SIGMA, mem_loc, SIGMA, mem_values,  # noqa: E731
                                      match_threshold=threshold, backend=method)
    elif method == "chunked_torch":
        fn = lambda: chunked_torch_read(query_loc, mem_loc, mem_values, SIGMA, threshold)  # noqa: E731
    elif method == "keops":
        fn = lambda: keops_read(query_loc, mem_loc, mem_values, SIGMA, threshold)  # noqa: E731
    else:
        raise ValueError(method)
    if not backward:
        def run():
            with torch.no_grad():
                return fn()
        return run
    grad_out = torch.randn(Q, E, dtype=dtype)

    def run_backward():
        out = fn()
        torch.autograd.backward(out, grad_out)
        for t in (query_loc, mem_loc, mem_values):
            t.grad = None
    return run_backward


def rows_for(args):
    Q, M, d = args.Q, args.M, 2
    rows = [dict(Q=Q, M=M, d=d, E=E, threshold=THRESHOLD, backward=False) for E in (16, 256)]
    if not args.quick:
        rows += [dict(Q=Q, M=M, d=d, E=E, threshold=THRESHOLD, backward=True) for E in (16, 256)]
        rows += [dict(Q=Q, M=M, d=d, E=E, threshold=None, backward=False) for E in (16, 256)]
    return rows


def run(args):
    keops_why = keops_reason()
    results = []
    reference_outputs = {}
    key = lambda row: tuple(sorted(row.items()))  # noqa: E731
    rows = rows_for(args)
    methods = [m for m in METHODS if m in args.methods]
    progress = tqdm(total=len(rows) * len(methods), desc="bench_read", unit="case")
    for row in rows:
        for method in methods:
            entry = dict(row, method=method)
            if method == "keops" and keops_why:
                entry["skipped"] = keops_why
            elif method == "keops" and row["backward"]:
                entry["skipped"] = "KeOps row measured forward only"
            else:
                try:
                    call = build(method, **row)
                    entry["seconds"] = median_time(call, repeats=args.repeats, warmup=1)
                    if not row["backward"]:
                        # every row computes the same read: say how far each is from the reference
                        want = reference_outputs.setdefault(key(row), build("reference", **row)())
                        entry["max_abs_diff_vs_reference"] = float((call() - want).abs().max())
                    if not args.no_memory:
                        entry["peak_extra_mb"] = peak_extra_rss_mb("bench_read", "build", dict(method=method, **row))
                except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
                    entry["skipped"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            results.append(entry)
            progress.update()
    progress.close()
    add_speedups(results, "method", ("Q", "M", "E", "threshold", "backward"))
    return results


def print_table(results):
    print(f"\n{'pass':<8} {'thr':>4} {'E':>4} {'method':<14} {'median ms':>10} {'vs reference':>13} "
          f"{'peak extra MB':>14} {'max |diff|':>10}")
    for r in results:
        thr = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        pass_ = "fwd+bwd" if r["backward"] else "fwd"
        if "skipped" in r:
            print(f"{pass_:<8} {thr:>4} {r['E']:>4} {r['method']:<14} skipped: {r['skipped']}")
            continue
        mem = f"{r['peak_extra_mb']:.1f}" if "peak_extra_mb" in r else "-"
        # accuracy is checked on the forward rows (the gradients are checked by the tests)
        diff = f"{r['max_abs_diff_vs_reference']:.1e}" if "max_abs_diff_vs_reference" in r else "-"
        print(f"{pass_:<8} {thr:>4} {r['E']:>4} {r['method']:<14} {r['seconds'] * 1e3:>10.2f} "
              f"{r.get('speedup_vs_reference', float('nan')):>12.1f}x {mem:>14} {diff:>10}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="forward rows only (the BENCHMARKS.md table)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--Q", type=int, default=4096)
    parser.add_argument("--M", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    add_out_argument(parser)
    args, rest = parser.parse_known_args(argv)
    if args.device == "cuda":
        import bench_read_gpu

        return bench_read_gpu.main(rest + (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else []))
    results = run(args)
    print_table(results)
    name = "bench_read_cpu_quick.json" if args.quick else "bench_read_cpu.json"
    path = out_path(args.out, name)
    write_json(path, dict(command="python benchmarks/bench_read.py" + (" --quick" if args.quick else ""),
                          machine=machine_description(), sigma=SIGMA, spread=SPREAD, results=results))
    print(f"\nmachine: {machine_description()}\nwritten: {os.path.relpath(path)}")


# ---- pytest-benchmark entry points: pytest benchmarks/bench_read.py --benchmark-only ----------

def _pytest_params():
    import pytest

    return pytest.mark.parametrize("method", METHODS), pytest.mark.parametrize("E", (16, 256))


try:
    _method_param, _e_param = _pytest_params()

    @_method_param
    @_e_param
    def test_read_forward(benchmark, method, E):
        import pytest

        if method == "keops" and keops_reason():
            pytest.skip(keops_reason())
        benchmark(build(method, 4096, 2048, 2, E))
except ImportError:  # pytest is not needed to run the script
    pass


if __name__ == "__main__":
    main()
