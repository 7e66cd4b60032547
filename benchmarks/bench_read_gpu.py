"""Read benchmark on CUDA (issue 3, point 4): reference, torch.compile(reference), the fused
`triton` and `cuda` (CUDA C++, csrc/cuda/read.cu) backends, and the speed-of-light peers PyTorch
SDPA and FlexAttention on the dot-product reformulation of the isotropic read.

    python benchmarks/bench_read_gpu.py            # full grid (Q, M, E, value dtype, fwd / fwd+bwd)
    python benchmarks/bench_read_gpu.py --quick    # the target row: Q=65536, M=8192, E=1024
    python benchmarks/bench_read.py --device cuda  # the same, through the main read benchmark
    TRITON_INTERPRET=1 python benchmarks/bench_read_gpu.py --dry-run  # tiny, on CPU: checks the maths

Isotropic reformulation (σ shared, v = σ_q² + σ_m²): log k = (ℓ·ℓ_t)/v − ‖ℓ_t‖²/(2v) + (per-query
terms that cancel in the softmax). SDPA gets q = [ℓ/√v, 1, 0…], k = [ℓ_t/√v, −‖ℓ_t‖²/(2v), 0…]
with scale 1; its kernels need q, k and v of one head dim ≤ 256, so the values are split into
≤ 256-wide chunks run as heads (each head recomputes the scores) and q, k are zero-padded to the
chunk width. FlexAttention gets q = ℓ/√v, k = ℓ_t/√v padded to 16 and the per-key bias through a
score_mod. Neither peer applies a match threshold, so every row runs without one. The peers'
timings include building their operands (bias column, padding, head split) from the inputs.

TFLOP/s counts only the value products, the same for every method: 2·Q·M·E forward and 6·Q·M·E
forward+backward. Ratios compare methods measured in the same run.
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
from _measure import (add_out_argument, cuda_peak_extra_mb, machine_description, median_time, out_path,  # noqa: E402
                      write_json)

SIGMA, SPREAD, D = 10.0, 100.0, 2
METHODS = ("reference", "compiled_reference", "triton", "cuda", "sdpa", "flex")
SDPA_CHUNK = 256


def make_inputs(Q, M, E, value_dtype, device, requires_grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query_loc = (torch.randn(Q, D, generator=gen) * SPREAD).to(device)
    mem_loc = (torch.randn(M, D, generator=gen) * SPREAD).to(device)
    mem_values = torch.randn(M, E, generator=gen).to(device=device, dtype=value_dtype)
    for t in (query_loc, mem_loc, mem_values):
        t.requires_grad_(requires_grad)
    return query_loc, mem_loc, mem_values


def dot_product_operands(query_loc, mem_loc, mem_values, width, bias_column):
    """q, k (1, heads, N, width) and v (1, heads, M, chunk) for the isotropic reformulation.
    The E axis becomes heads of ≤ SDPA_CHUNK values; q and k are shared by every head."""
    var = 2 * SIGMA * SIGMA
    dtype = mem_values.dtype
    q = query_loc / math.sqrt(var)
    k = mem_loc / math.sqrt(var)
    bias = -(mem_loc * mem_loc).sum(-1, keepdim=True) / (2 * var)
    if bias_column:
        q = torch.cat([q, torch.ones_like(q[:, :1])], -1)
        k = torch.cat([k, bias], -1)
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1])).to(dtype)
    k = torch.nn.functional.pad(k, (0, width - k.shape[-1])).to(dtype)
    M, E = mem_values.shape
    chunk = min(E, SDPA_CHUNK)
    heads = math.ceil(E / chunk)
    v = torch.nn.functional.pad(mem_values, (0, heads * chunk - E)).reshape(M, heads, chunk).transpose(0, 1)
    q = q.expand(heads, *q.shape).unsqueeze(0).contiguous()
    k = k.expand(heads, *k.shape).unsqueeze(0).contiguous()
    return q, k, v.unsqueeze(0).contiguous(), bias.squeeze(-1).to(torch.float32), E


def merge_heads(out, E):
    """(1, heads, Q, chunk) -> (Q, E)."""
    _, heads, Q, chunk = out.shape
    return out[0].transpose(0, 1).reshape(Q, heads * chunk)[:, :E]


def sdpa_read(query_loc, mem_loc, mem_values):
    chunk = min(mem_values.shape[1], SDPA_CHUNK)
    width = max(chunk, 16) if chunk % 8 == 0 else max(8 * math.ceil(chunk / 8), 16)
    q, k, v, _, E = dot_product_operands(query_loc, mem_loc, mem_values, width, bias_column=True)
    if v.shape[-1] != width:
        v = torch.nn.functional.pad(v, (0, width - v.shape[-1]))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
    return merge_heads(out, E)


_FLEX = {}


def flex_reason():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"FlexAttention unavailable ({type(exc).__name__}: {exc})"
    return None


def flex_read(query_loc, mem_loc, mem_values):
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False) if query_loc.is_cuda else flex_attention
    q, k, v, bias, E = dot_product_operands(query_loc, mem_loc, mem_values, 16, bias_column=False)

    def add_key_bias(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    return merge_heads(_FLEX["fn"](q, k, v, score_mod=add_key_bias, scale=1.0), E)


_COMPILED = {}


def compiled_reference(query_loc, query_var, mem_loc, mem_var, mem_values):
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(rk.reference.gaussian_read, dynamic=False)
    return _COMPILED["fn"](query_loc, query_var, mem_loc, mem_var, mem_values)


def read_fn(method, query_loc, mem_loc, mem_values, allow_tf32):
    """The read by `method` as a function of the three tracked tensors (σ fixed, no threshold)."""
    if method in ("reference", "triton", "cuda"):
        return lambda: rk.gaussian_read(query_loc, SIGMA, mem_loc, SIGMA, mem_values, backend=method,
                                        allow_tf32=allow_tf32)
    if method == "compiled_reference":
        var = torch.tensor(SIGMA * SIGMA, device=query_loc.device)
        return lambda: compiled_reference(query_loc, var, mem_loc, var, mem_values)
    if method == "sdpa":
        return lambda: sdpa_read(query_loc, mem_loc, mem_values)
    if method == "flex":
        return lambda: flex_read(query_loc, mem_loc, mem_values)
    raise ValueError(method)


def build(method, Q, M, E, value_dtype, backward, device="cuda", allow_tf32=False):
    """A zero-argument callable running one read (forward, or forward + backward), and the
    forward callable (for the accuracy column)."""
    tensors = make_inputs(Q, M, E, getattr(torch, value_dtype), device, requires_grad=backward)
    fn = read_fn(method, *tensors, allow_tf32)
    if not backward:
        def run():
            with torch.no_grad():
                return fn()
        return run, run
    grad_out = torch.randn(Q, E, device=device).to(tensors[2].dtype)

    def run_backward():
        torch.autograd.backward(fn(), grad_out)
        for t in tensors:
            t.grad = None
    return run_backward, fn


def value_flops(Q, M, E, backward):
    return (6 if backward else 2) * Q * M * E


def rows_for(args):
    if args.dry_run:
        grid = [(70, 50, E) for E in (16, 40)]
        dtypes = ["float32"]
    elif args.quick:
        grid, dtypes = [(65536, 8192, 1024)], ["float32", "bfloat16"]
    else:
        grid = [(Q, M, E) for Q in (4096, 65536) for M in (1024, 8192, 32768) for E in (64, 1024)]
        dtypes = ["float32", "bfloat16"]
    return [dict(Q=Q, M=M, E=E, value_dtype=dt, backward=bw)
            for Q, M, E in grid for dt in dtypes for bw in (False, True)]


def skip_reason(method, row, device):
    if method == "flex" and flex_reason():
        return flex_reason()
    if method == "compiled_reference" and device == "cpu":
        return "torch.compile is not exercised in a dry run"
    if method == "cuda":
        cuda = next(info for info in rk.backends(print_table=False) if info.name == "cuda")
        if not cuda.usable:
            return f"cuda backend unusable: {cuda.reason}"
        if device != "cuda":
            return "the cuda backend runs on CUDA tensors only"
    return None


def run(args, device):
    results = []
    rows = rows_for(args)
    methods = list(dict.fromkeys(args.methods))  # measuring order: the first is the accuracy baseline
    progress = tqdm(total=len(rows) * len(methods), desc="bench_read_gpu", unit="case")
    for row in rows:
        want = None
        for method in methods:
            entry = dict(row, method=method)
            why = skip_reason(method, row, device)
            if why:
                entry["skipped"] = why
            else:
                try:
                    call, forward = build(method, **row, device=device, allow_tf32=args.allow_tf32)
                    entry["seconds"] = median_time(call, device=device, repeats=args.repeats, warmup=2)
                    entry["tflops"] = value_flops(row["Q"], row["M"], row["E"], row["backward"]) / entry["seconds"] / 1e12
                    if device == "cuda":
                        entry["peak_extra_mb"] = cuda_peak_extra_mb(call)
                    with torch.no_grad():
                        out = forward().float()
                    # Every method computes the same read: its distance from the triton output
                    # (or the first method measured) shows the reformulations are right.
                    want = out if want is None else want
                    entry["max_abs_diff_vs_first"] = float((out - want).abs().max())
                    del out
                except Exception as exc:  # noqa: BLE001 - OOM or an unsupported peer is reported, not fatal
                    entry["skipped"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                if device == "cuda":
                    torch.cuda.empty_cache()
            results.append(entry)
            progress.update()
    progress.close()
    add_ratios(results)
    return results


def add_ratios(results):
    same = ("Q", "M", "E", "value_dtype", "backward")
    for entry in results:
        if "seconds" not in entry:
            continue
        for peer in ("reference", "compiled_reference", "sdpa", "flex"):
            match = next((r for r in results if r["method"] == peer and "seconds" in r
                          and all(r[k] == entry[k] for k in same)), None)
            if match and match is not entry:
                entry[f"speedup_vs_{peer}"] = match["seconds"] / entry["seconds"]


def print_table(results, gpu):
    print(f"\nGPU: {gpu}. TFLOP/s counts the value products only (2QME fwd, 6QME fwd+bwd).")
    print("| Q | M | E | values | pass | method | ms | TFLOP/s | vs reference | vs compile(ref) | vs SDPA | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        head = f"| {r['Q']} | {r['M']} | {r['E']} | {r['value_dtype']} | {'fwd+bwd' if r['backward'] else 'fwd'} | {r['method']} |"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']} | | | | | |")
            continue
        ratio = lambda peer: f"{r[f'speedup_vs_{peer}']:.2f}x" if f"speedup_vs_{peer}" in r else "-"  # noqa: E731
        print(f"{head} {r['seconds'] * 1e3:.3f} | {r['tflops']:.1f} | {ratio('reference')} | "
              f"{ratio('compiled_reference')} | {ratio('sdpa')} | {r.get('max_abs_diff_vs_first', float('nan')):.1e} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the issue's target row (Q=65536, M=8192, E=1024)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["triton", *[m for m in METHODS if m != "triton"]],
                        choices=METHODS, help="the first one measured is the accuracy baseline")
    parser.add_argument("--allow-tf32", action="store_true", help="let triton use TF32 for float32 value products")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU tensors (Triton interpreter)")
    add_out_argument(parser)
    args, _ = parser.parse_known_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            # Triton reads the variable when the kernels are defined, i.e. at import time.
            print("a dry run needs the Triton interpreter: TRITON_INTERPRET=1 python benchmarks/bench_read_gpu.py --dry-run")
            return 1
        device, args.repeats = "cpu", 1
    elif not torch.cuda.is_available():
        print("bench_read_gpu needs a CUDA GPU (none is visible to torch); nothing measured.")
        return 0
    else:
        device = "cuda"
    results = run(args, device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (dry run on CPU)"
    print_table(results, gpu)
    if args.dry_run:
        return 0
    name = "bench_read_gpu_quick.json" if args.quick else "bench_read_gpu.json"
    path = out_path(args.out, name)
    write_json(path, dict(command="python benchmarks/bench_read_gpu.py" + (" --quick" if args.quick else ""),
                          machine=machine_description(), sigma=SIGMA, spread=SPREAD, d=D,
                          sdpa_note=f"values split into <= {SDPA_CHUNK}-wide chunks run as heads; q/k padded",
                          allow_tf32=args.allow_tf32, results=results))
    print(f"\nwritten: {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
