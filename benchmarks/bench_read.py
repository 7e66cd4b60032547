"""Read benchmark (design.md §2, issue #17) on CPU: the fused `cpu` backend beside the reference,
a chunked-PyTorch baseline, `torch.compile` of the naive PyTorch read, KeOps (when pykeops is
installed) and the bare product `logits @ V` of the same shape, times and peak extra memory in one run.

    python benchmarks/bench_read.py --quick       # forward rows with a threshold (make bench)
    python benchmarks/bench_read.py               # adds forward+backward and no-threshold rows (make bench-full)
    python benchmarks/bench_read.py --dense       # issue #17: four dense shapes, then the threshold/narrow rows
    python benchmarks/bench_read.py --device cuda # GPU table (benchmarks/bench_read_gpu.py)
    pytest benchmarks/ --benchmark-only           # the same cases under pytest-benchmark (BENCHMARKS.md)

Inputs follow the notebook: locations ~ N(0, 100²) in 2-D, σ = 10 for queries and entries,
match_threshold = 25 (or none: every entry weighs in). Methods:
  reference       the library's pure-PyTorch reference (materialises Q×M×d)
  chunked_torch   torch.cdist per block of 256 queries (block × M instead of Q × M × d)
  cpu             the fused C++ backend
  keops           a pykeops LazyTensor reduction of the same maths (forward only)
  compiled_naive  torch.compile(naive_read): the read as a user writes it in plain PyTorch (the
                  Q×M Gaussian log-density, softmax, @ values), compiled by inductor; its first
                  call (the compilation, for that shape and pass) is reported apart as
                  `first call s` and left out of the median
  compiled_naive_ftz  the same compiled read called with denormal floats flushed to zero
                  (torch.set_flush_denormal(True) around each call, which sets the calling thread's
                  FTZ/DAZ flags): at σ = 10 most softmax weights are denormal float32 numbers, which
                  the CPU multiplies many times slower; a user who knows this flushes them
  bare_matmul     the speed-of-light yardstick: `logits @ V` for a ready (Q, M) float matrix and
                  the (M, E) values, forward only (also in the forward+backward blocks); every
                  row's `x logits@V` is its time over this product's, same shape, same threads,
                  measured in pairs: each of `--repeats` rounds calls the method once and the
                  product once, and the ratio is the median of the rounds' ratios (so both see
                  the same moments of a shared machine, where the product alone moved by 10-15%
                  between blocks measured minutes apart)
Ratios compare methods measured in the same run: `vs reference` is reference time / method time.
"""
from __future__ import annotations

import argparse
import math
import statistics
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resonant_kernels as rk  # noqa: E402
from _cases import Case, ready  # noqa: E402
from _measure import (add_out_argument, add_speedups, machine_description, median_time, out_path,  # noqa: E402
                      peak_extra_rss_mb, write_json)

SIGMA, THRESHOLD, SPREAD = 10.0, 25.0, 100.0
# issue #17: float32, d = 2, σ = 10, no threshold, (Q, M, E)
DENSE_SHAPES = ((4096, 2048, 256), (3000, 1500, 512), (4096, 4096, 128), (10000, 1024, 1024))


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


def naive_read(query_loc, mem_loc, mem_values, query_sd, mem_sd, threshold):
    """The read as a user writes it in plain PyTorch: the whole Q×M Gaussian log-density with the
    combined variance v = σ_q² + σ_m² per dimension, softmax over the entries, @ values."""
    d = query_loc.shape[-1]
    var = query_sd**2 + mem_sd**2
    diff = query_loc[:, None, :] - mem_loc[None, :, :]
    dist2 = (diff * diff).sum(-1)
    logk = dist2 * (-0.5 / var) - 0.5 * d * math.log(2 * math.pi * var)
    if threshold is None:
        return torch.softmax(logk, dim=-1) @ mem_values
    logk = logk.masked_fill(dist2 > threshold**2, -math.inf)
    # a query that matches nothing gets a softmax of NaNs; the op reads zeros there
    return torch.softmax(logk, dim=-1).nan_to_num(0.0) @ mem_values


def compiled_naive_read(compile_backend="inductor"):
    """torch.compile(naive_read) with a fresh compiler state: every build compiles for its own
    shape and pass (no recompile limit reached across many rows, the first call is the compile)."""
    torch.compiler.reset()
    return torch.compile(naive_read, dynamic=False, fullgraph=True, backend=compile_backend)


def flushing_denormals(fn):
    """fn called with denormals flushed to zero (the calling thread's FTZ/DAZ), then the default
    (off) restored, so no other row of the table runs with it."""
    def call():
        torch.set_flush_denormal(True)
        try:
            return fn()
        finally:
            torch.set_flush_denormal(False)
    return call


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


METHODS = ("reference", "chunked_torch", "cpu", "keops", "compiled_naive", "compiled_naive_ftz", "bare_matmul")
YARDSTICK = "bare_matmul"


def build(method, Q, M, d, E, threshold=THRESHOLD, backward=False, dtype="float32", compile_backend="inductor"):
    """A zero-argument callable running `method` once (forward, or forward + backward; the bare
    product is always the forward `logits @ V`)."""
    dtype = getattr(torch, dtype)
    if method == YARDSTICK:
        gen = torch.Generator().manual_seed(1)
        logits = torch.randn(Q, M, generator=gen, dtype=dtype)
        values = make_inputs(Q, M, d, E, dtype)[2]
        return lambda: logits @ values
    query_loc, mem_loc, mem_values = make_inputs(Q, M, d, E, dtype, requires_grad=backward)
    if method in ("reference", "cpu"):
        fn = lambda: rk.gaussian_read(query_loc, SIGMA, mem_loc, SIGMA, mem_values,  # noqa: E731
                                      match_threshold=threshold, backend=method)
    elif method == "chunked_torch":
        fn = lambda: chunked_torch_read(query_loc, mem_loc, mem_values, SIGMA, threshold)  # noqa: E731
    elif method == "keops":
        fn = lambda: keops_read(query_loc, mem_loc, mem_values, SIGMA, threshold)  # noqa: E731
    elif method in ("compiled_naive", "compiled_naive_ftz"):
        compiled = compiled_naive_read(compile_backend)
        fn = lambda: compiled(query_loc, mem_loc, mem_values, SIGMA, SIGMA, threshold)  # noqa: E731
        if method == "compiled_naive_ftz":
            fn = flushing_denormals(fn)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
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


def skip_reason(method, backward):
    if method == "keops":
        if keops_reason():
            return keops_reason()
        if backward:
            return "KeOps row measured forward only"
    return None


def threshold_rows(Q, M, *, backward, no_threshold_E):
    """The issue #2 rows: E = 16 and 256 with match_threshold 25 (forward, then forward+backward),
    then no threshold at the widths in `no_threshold_E`."""
    passes = (False, True) if backward else (False,)
    rows = [dict(Q=Q, M=M, d=2, E=E, threshold=THRESHOLD, backward=bw) for bw in passes for E in (16, 256)]
    return rows + [dict(Q=Q, M=M, d=2, E=E, threshold=None, backward=False) for E in no_threshold_E]


def dense_rows(shapes=DENSE_SHAPES):
    return [dict(Q=Q, M=M, d=2, E=E, threshold=None, backward=bw) for bw in (False, True) for Q, M, E in shapes]


def rows_for(args):
    if args.dense:  # issue #17's table: the dense shapes, and the sparse / narrow rows beside them
        return dense_rows() + threshold_rows(args.Q, args.M, backward=True, no_threshold_E=(16,))
    if args.quick:
        return threshold_rows(args.Q, args.M, backward=False, no_threshold_E=())
    return threshold_rows(args.Q, args.M, backward=True, no_threshold_E=(16, 256))


def paired_times(call, yardstick, repeats: int, max_seconds: float = 60.0) -> tuple[float, float]:
    """(median seconds of call(), median over rounds of call's time / yardstick's time), the two
    called alternately, one each per round."""
    times, ratios = [], []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        yardstick()
        t2 = time.perf_counter()
        times.append(t1 - t0)
        ratios.append((t1 - t0) / (t2 - t1))
        if time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times), statistics.median(ratios)


def first_call_seconds(call) -> float:
    """The first call's wall time: lazy set-up, KeOps' and torch.compile's compilation included."""
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def run(args):
    results = []
    reference_outputs = {}
    key = lambda row: tuple(sorted(row.items()))  # noqa: E731
    rows = rows_for(args)
    methods = [m for m in METHODS if m in args.methods]
    progress = tqdm(total=len(rows) * len(methods), desc="bench_read", unit="case")
    for row in rows:
        yardstick = build(YARDSTICK, **row) if YARDSTICK in methods else None
        if yardstick is not None:
            yardstick()  # its first call (allocation) outside the pairs
        for method in methods:
            entry = dict(row, method=method)
            why = skip_reason(method, row["backward"])
            if why:
                entry["skipped"] = why
            else:
                try:
                    call = build(method, **row)
                    entry["first_call_seconds"] = first_call_seconds(call)
                    if yardstick is None or method == YARDSTICK:
                        entry["seconds"] = median_time(call, repeats=args.repeats, warmup=0)
                    else:
                        entry["seconds"], entry[f"paired_times_{YARDSTICK}"] = paired_times(
                            call, yardstick, args.repeats)
                    if not row["backward"] and method != YARDSTICK:
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
    same_case = ("Q", "M", "E", "threshold", "backward")
    add_speedups(results, "method", same_case)
    add_speedups(results, "method", same_case, baseline=YARDSTICK)
    for entry in results:  # as a multiple of the bare product's time: 1.15 means 15% slower than it
        if f"speedup_vs_{YARDSTICK}" in entry:
            entry[f"times_{YARDSTICK}"] = 1.0 / entry.pop(f"speedup_vs_{YARDSTICK}")
        if f"paired_times_{YARDSTICK}" in entry:  # measured in the same moments: the ratio reported
            entry[f"times_{YARDSTICK}"] = entry.pop(f"paired_times_{YARDSTICK}")
        if entry["method"] == YARDSTICK:  # not the read: no speed-up over it
            entry.pop("speedup_vs_reference", None)
    return results


def print_table(results):
    print(f"\n{'pass':<8} {'thr':>4} {'Q':>6} {'M':>5} {'E':>5} {'method':<15} {'median ms':>10} {'vs reference':>13} "
          f"{'x logits@V':>11} {'first call s':>13} {'peak extra MB':>14} {'max |diff|':>10}")
    for r in results:
        thr = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        pass_ = "fwd+bwd" if r["backward"] else "fwd"
        head = f"{pass_:<8} {thr:>4} {r['Q']:>6} {r['M']:>5} {r['E']:>5} {r['method']:<15}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
            continue
        mem = f"{r['peak_extra_mb']:.1f}" if "peak_extra_mb" in r else "-"
        # accuracy is checked on the forward rows (the gradients are checked by the tests)
        diff = f"{r['max_abs_diff_vs_reference']:.1e}" if "max_abs_diff_vs_reference" in r else "-"
        versus = f"{r['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in r else "-"
        bare = f"{r[f'times_{YARDSTICK}']:.2f}" if f"times_{YARDSTICK}" in r else "-"
        print(f"{head} {r['seconds'] * 1e3:>10.2f} {versus:>13} {bare:>11} {r['first_call_seconds']:>13.2f} "
              f"{mem:>14} {diff:>10}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cases = parser.add_mutually_exclusive_group()
    cases.add_argument("--quick", action="store_true", help="forward rows with a threshold only (make bench)")
    cases.add_argument("--dense", action="store_true",
                       help="issue #17: the four dense shapes (no threshold), then the threshold and narrow rows")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--Q", type=int, default=4096, help="queries of the threshold rows")
    parser.add_argument("--M", type=int, default=2048, help="entries of the threshold rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    add_out_argument(parser)
    args, rest = parser.parse_known_args(argv)
    if args.device == "cuda":
        if args.dense:
            parser.error("--dense is the CPU table; on CUDA, benchmarks/bench_read_gpu.py runs its own dense grid")
        import bench_read_gpu

        return bench_read_gpu.main(rest + (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else []))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    results = run(args)
    print_table(results)
    name = "bench_read_cpu" + ("_quick" if args.quick else "_dense" if args.dense else "") + ".json"
    path = out_path(args.out, name)
    command = "python benchmarks/bench_read.py" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    write_json(path, dict(command=command, machine=machine_description(), sigma=SIGMA, spread=SPREAD, results=results))
    print(f"\nmachine: {machine_description()}\nwritten: {os.path.relpath(path)}")


# ---- the cases of pytest-benchmark (benchmarks/test_benchmarks.py) ---------------------------

def benchmark_cases(size):
    """One group per (pass, shape, threshold), one row per method; "full" is the --dense table."""
    if size == "smoke":
        rows = [dict(Q=64, M=128, d=2, E=16, threshold=THRESHOLD, backward=bw) for bw in (False, True)]
        rows += [dict(Q=64, M=128, d=2, E=32, threshold=None, backward=bw) for bw in (False, True)]
    elif size == "quick":
        rows = [dict(Q=2048, M=1024, d=2, E=16, threshold=THRESHOLD, backward=bw) for bw in (False, True)]
        rows += dense_rows([(2048, 1024, 256)])
    else:
        rows = dense_rows() + threshold_rows(4096, 2048, backward=True, no_threshold_E=(16,))
    cases = []
    for row in rows:
        thr = "no-threshold" if row["threshold"] is None else f"threshold={row['threshold']:g}"
        group = f"read {'fwd+bwd' if row['backward'] else 'fwd'} Q={row['Q']} M={row['M']} E={row['E']} {thr}"
        for method in METHODS:
            skip = skip_reason(method, row["backward"])
            if size == "smoke" and method == "keops":
                skip = skip or "left out of the smoke size (KeOps compiles C++ for ~20 s per value width)"
            # inductor's C++ build takes ~10 s per graph on a cold cache: the smoke size checks the
            # capture (dynamo + AOTAutograd) only
            compiled = method.startswith("compiled_naive")
            extra = {"compile_backend": "aot_eager" if size == "smoke" else "inductor"} if compiled else {}
            cases.append(Case(group, method, ready(build, method, **row, **extra), skip=skip, info=dict(row, **extra)))
    return cases


if __name__ == "__main__":
    main()
