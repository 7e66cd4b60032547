"""Timing and peak-memory helpers shared by the benchmarks.

Peak memory on CPU is measured in a fresh subprocess: the kernel's high-water mark (VmHWM) is
reset through /proc/self/clear_refs, the call runs once, and the peak RSS above the RSS before
the call is reported. MALLOC_MMAP_THRESHOLD_ makes glibc return big freed blocks to the OS, so
an earlier allocation cannot hide a later one. On CUDA, torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from resonant import runs

MB = 1024 * 1024


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], *, device="cpu", repeats: int = 5, warmup: int = 1,
                max_seconds: float = 60.0) -> float:
    """Median wall time of fn() in seconds; fewer repeats if one call is slow."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_rss_mb(module: str, func: str, kwargs: dict, timeout: float = 600.0) -> float:
    """Peak RSS (MB) above the baseline while `module.func(**kwargs)` runs once, measured in a
    fresh subprocess. `func` builds its inputs and returns a zero-argument callable to measure."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", ""))
    if not env["OMP_NUM_THREADS"]:
        env.pop("OMP_NUM_THREADS")
    code = (
        "import json, sys; sys.path.insert(0, %r); from _measure import _child; _child(%r, %r, json.loads(%r))"
        % (os.path.dirname(os.path.abspath(__file__)), module, func, json.dumps(kwargs))
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip()[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _child(module: str, func: str, kwargs: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    call = getattr(importlib.import_module(module), func)(**kwargs)
    call()  # warm up: lazy initialisation (thread pools, JIT) is not the op's memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    call()
    peak = _status_kb("VmHWM")
    print((peak - before) / 1024.0)


def cuda_peak_extra_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MB


def add_speedups(results: list, method_key: str, same_case: tuple, baseline: str = "reference") -> None:
    """Sets entry["speedup_vs_<baseline>"] = baseline seconds / entry seconds for every timed
    entry whose case (the `same_case` fields) has a timed baseline row in the same run."""
    for entry in results:
        ref = next((r for r in results if r[method_key] == baseline and
                    all(r[k] == entry[k] for k in same_case)), None)
        if ref and "seconds" in ref and "seconds" in entry:
            entry[f"speedup_vs_{baseline}"] = ref["seconds"] / entry["seconds"]


RUN_NAME = "benchmarks"  # outputs go to runs/benchmarks/ unless --out says otherwise


def add_out_argument(parser) -> None:
    runs.add_out_argument(parser, RUN_NAME, "the JSON results (and figures)")


def out_path(out, filename: str) -> str:
    """Where a result file goes: --out DIR, else runs/benchmarks/ (never the tracked benchmarks/results/)."""
    return str(runs.run_dir(RUN_NAME, out) / filename)


def write_json(path: str, payload: dict) -> None:
    runs.write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def machine_description() -> dict:
    import platform

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
