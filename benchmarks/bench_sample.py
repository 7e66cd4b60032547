"""Conditional-sampling benchmark (design.md §4, issue #5): reference vs the fused backends.

    python benchmarks/bench_sample.py                 # M ∈ {1024, 16384}, E = 1024, Q ∈ {1, 256}, S = 256
    python benchmarks/bench_sample.py --quick         # small sizes, to check that it runs
    python benchmarks/bench_sample.py --device cuda   # reference vs triton vs cuda (CUDA C++, csrc/cuda/sample.cu)

Inputs follow the notebook's search: entries at N(0, 100²) in 2-D with σ = 10, values ~ N(0, 1),
random search keys, search locations ~ N(0, 100²) with σ = 25 (the location term is on; add
--threshold to mask far entries). Ratios are reference time / backend time from the same run.
Writes bench_sample_<device>[_quick].json and a PNG bar chart to runs/benchmarks/ (or --out).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resonant_kernels as rk  # noqa: E402
from _cases import Case, ready  # noqa: E402
from _measure import (add_out_argument, add_speedups, cuda_peak_extra_mb, machine_description,  # noqa: E402
                      median_time, out_path, peak_extra_rss_mb, write_json)

MEM_SD, SEARCH_SD, SPREAD, D = 10.0, 25.0, 100.0, 2


def build(backend, Q, M, E, S, threshold=None, device="cpu", seed=0):
    """A zero-argument callable drawing S samples for each of Q queries on `backend`."""
    gen = torch.Generator().manual_seed(seed)
    mem_loc = (torch.randn(M, D, generator=gen) * SPREAD).to(device)
    mem_values = torch.randn(M, E, generator=gen).to(device)
    search_key = torch.randn(Q, E, generator=gen).to(device)
    search_loc = (torch.randn(Q, D, generator=gen) * SPREAD).to(device)
    draw_gen = torch.Generator(device=device)

    def run():
        draw_gen.manual_seed(1)
        return rk.conditional_sample(mem_loc, MEM_SD, mem_values, search_key, search_loc=search_loc,
                                     search_sd=SEARCH_SD, num_samples=S, match_threshold=threshold,
                                     generator=draw_gen, backend=backend)
    return run


def backends_for(device):
    names = ("reference", "cpu") if device == "cpu" else ("reference", "triton", "cuda")
    usable = {info.name: info for info in rk.backends(print_table=False)}
    out = []
    for name in names:
        info = usable[name]
        why = None if info.usable and "conditional_sample" in info.ops else (
            info.reason or f"{name} does not implement conditional_sample")
        out.append((name, why))
    return out


def sized_rows(size):
    if size == "smoke":
        return [dict(Q=Q, M=64, E=8, S=4) for Q in (1, 4)]
    if size == "quick":
        return [dict(Q=Q, M=M, E=64, S=32) for M in (256, 1024) for Q in (1, 16)]
    return [dict(Q=Q, M=M, E=1024, S=256) for M in (1024, 16384) for Q in (1, 256)]


def rows_for(args):
    return sized_rows("quick" if args.quick else "full")


def run(args):
    rows = rows_for(args)
    methods = backends_for(args.device)
    results = []
    progress = tqdm(total=len(rows) * len(methods), desc="bench_sample", unit="case")
    for row in rows:
        row = dict(row, threshold=args.threshold)
        reference_samples = None
        for name, why in methods:
            entry = dict(row, backend=name)
            if why:
                entry["skipped"] = why
            else:
                try:
                    call = build(name, device=args.device, **row)
                    entry["seconds"] = median_time(call, device=args.device, repeats=args.repeats, warmup=1)
                    # same seed, same uniforms: the fraction of draws that land on the reference's entries
                    samples = call()
                    if reference_samples is None:
                        reference_samples = samples
                    entry["same_draws_as_reference"] = float((samples == reference_samples).all(-1).double().mean())
                    if args.device == "cuda":
                        entry["peak_extra_mb"] = cuda_peak_extra_mb(call)
                    elif not args.no_memory:
                        entry["peak_extra_mb"] = peak_extra_rss_mb("bench_sample", "build", dict(backend=name, **row))
                except Exception as exc:  # noqa: BLE001 - a failing backend is reported, not fatal
                    entry["skipped"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            results.append(entry)
            progress.update()
    progress.close()
    add_speedups(results, "backend", ("Q", "M", "E", "S"))
    return results


def print_table(results):
    print(f"\n{'M':>6} {'Q':>4} {'E':>5} {'S':>4} {'backend':<10} {'median ms':>10} {'vs reference':>13} "
          f"{'peak extra MB':>14} {'same draws':>10}")
    for r in results:
        head = f"{r['M']:>6} {r['Q']:>4} {r['E']:>5} {r['S']:>4} {r['backend']:<10}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
            continue
        mem = f"{r['peak_extra_mb']:.1f}" if "peak_extra_mb" in r else "-"
        print(f"{head} {r['seconds'] * 1e3:>10.2f} {r.get('speedup_vs_reference', float('nan')):>12.2f}x "
              f"{mem:>14} {r['same_draws_as_reference']:>10.4f}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if "seconds" in r]
    configs = sorted({(r["M"], r["Q"]) for r in timed})
    names = sorted({r["backend"] for r in timed}, key=lambda n: n != "reference")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        ms = [next((r["seconds"] * 1e3 for r in timed if r["backend"] == name and (r["M"], r["Q"]) == c),
                   float("nan")) for c in configs]
        ax.bar([j + i * width for j in range(len(configs))], ms, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(configs))])
    ax.set_xticklabels([f"M={m}\nQ={q}" for m, q in configs])
    ax.set_yscale("log")
    ax.set_ylabel("median ms per call (log)")
    ax.set_title(f"conditional_sample, E={timed[0]['E']}, S={timed[0]['S']}" if timed else "conditional_sample")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the benchmark runs")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threshold", type=float, default=None, help="match_threshold for the location term")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses (CPU)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    results = run(args)
    print_table(results)
    stem = f"bench_sample_{args.device}" + ("_quick" if args.quick else "")
    path = out_path(args.out, stem + ".json")
    command = "python benchmarks/bench_sample.py" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    write_json(path, dict(command=command, machine=machine_description(), mem_sd=MEM_SD, search_sd=SEARCH_SD,
                          spread=SPREAD, results=results))
    plot(results, out_path(args.out, stem + ".png"))
    print(f"\nmachine: {machine_description()}\nwritten: {os.path.relpath(path)} and {stem}.png")


# ---- the cases of pytest-benchmark (benchmarks/test_benchmarks.py) ---------------------------

def benchmark_cases(size):
    """One group per (M, Q, E, S) row of the script's table, one row per CPU backend."""
    cases = []
    for row in sized_rows(size):
        group = "conditional_sample M={M} Q={Q} E={E} S={S}".format(**row)
        cases += [Case(group, name, ready(build, name, **row), skip=why, info=row) for name, why in backends_for("cpu")]
    return cases


if __name__ == "__main__":
    main()
