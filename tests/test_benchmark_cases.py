"""The benchmarks cannot rot unnoticed: every case of benchmarks/ runs at its smoke size under
pytest-benchmark, as a user runs it (`pytest benchmarks/ --bench-size smoke`, one round each, in a
subprocess: `make test` itself never collects benchmarks/), one group per case and one row per
peer, and a saved run lands under runs/pytest-benchmark/ of the current directory."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from checkout import ROOT

OPTIONAL_PEERS = {"milvus-lite", "faiss-flat"}  # skipped, with the reason, where the extra is not installed


def benchmark_module(name: str):
    """benchmarks/<name>.py imported as a module (the folder on sys.path only while it imports)."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def expected_rows() -> dict[str, set[str]]:
    """group -> the peers that run at the smoke size, from the benchmark modules themselves."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _cases import all_cases

        rows: dict[str, set[str]] = {}
        for case in all_cases("smoke"):
            if not case.skip:
                rows.setdefault(case.group, set()).add(case.peer)
        return rows
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_every_benchmark_case_runs_at_smoke_size(tmp_path):
    pytest.importorskip("pytest_benchmark")
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--bench-size", "smoke", "--benchmark-only",
         "--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off", "--benchmark-autosave",
         f"--benchmark-json={report_path}", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    measured: dict[str, set[str]] = {}
    for bench in json.loads(report_path.read_text())["benchmarks"]:
        assert bench["stats"]["rounds"] >= 1 and bench["stats"]["min"] > 0
        measured.setdefault(bench["group"], set()).add(bench["extra_info"]["peer"])
    expected = expected_rows()
    assert set(measured) == set(expected), "a case group did not run"
    for group, peers in expected.items():
        assert measured[group] <= peers and peers - measured[group] <= OPTIONAL_PEERS, (group, measured[group])
    # every benchmark module contributes: read fwd and fwd+bwd, prune, sampling, engram decisions
    for family in ("read fwd ", "read fwd+bwd ", "prune_mask ", "conditional_sample ", "engram decide "):
        assert any(group.startswith(family) for group in measured), family
    read_peers = measured["read fwd Q=64 M=128 E=32 no-threshold"]
    assert {"reference", "cpu", "chunked_torch", "compiled_naive", "compiled_naive_ftz", "bare_matmul"} <= read_peers

    saved = list((tmp_path / "runs" / "pytest-benchmark").glob("*/0001_*.json"))
    assert len(saved) == 1 and not (tmp_path / ".benchmarks").exists()


@pytest.mark.parametrize("threshold", [None, 1.5])
def test_naive_peer_computes_the_read_and_its_gradients(threshold):
    """benchmarks/bench_read.py's naive_read (what torch.compile compiles there) is the same op as
    the reference, values and gradients, including queries that match nothing under a threshold."""
    import torch

    import resonant_kernels as rk

    naive_read = benchmark_module("bench_read").naive_read
    gen = torch.Generator().manual_seed(3)
    query_loc = torch.randn(7, 2, generator=gen, dtype=torch.float64) * 2  # spread out: some match nothing
    inputs = [query_loc, torch.randn(11, 2, generator=gen, dtype=torch.float64),
              torch.randn(11, 5, generator=gen, dtype=torch.float64)]
    grad_out = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    results = []
    for read in (lambda q, m, z: naive_read(q, m, z, 0.7, 0.5, threshold),
                 lambda q, m, z: rk.gaussian_read(q, 0.7, m, 0.5, z, match_threshold=threshold, backend="reference")):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = read(*leaves)
        out.backward(grad_out)
        results.append([out.detach(), *(t.grad for t in leaves)])
    if threshold is not None:
        assert (results[1][0] == 0).all(-1).any(), "no query is isolated: the test would miss the empty rows"
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_flushing_denormals_flushes_inside_the_call_only():
    """bench_read's compiled_naive_ftz peer: denormals are flushed in its calls and nowhere else."""
    import torch

    bench_read = benchmark_module("bench_read")
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returned False)")
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a denormal float32
    inside = bench_read.flushing_denormals(lambda: tiny * 1.0)()
    assert inside.item() == 0.0
    assert (tiny * 1.0).item() > 0.0


def test_paired_times_alternates_the_calls_and_takes_the_median_ratio(monkeypatch):
    """bench_read's `x logits@V`: each round one call of the method and one of the product; the ratio
    is the median of the rounds' ratios (a round where the machine was slow for both stays ~1)."""
    bench_read = benchmark_module("bench_read")
    now = [0.0]
    monkeypatch.setattr(bench_read.time, "perf_counter", lambda: now[0])
    order = []
    # rounds: (method seconds, product seconds); the third round is slow for both
    costs = iter([(3.0, 1.0), (2.0, 1.0), (30.0, 10.0), (2.5, 1.0), (2.0, 1.0)])
    pending = []

    def method():
        order.append("m")
        pending.append(next(costs))
        now[0] += pending[-1][0]

    def product():
        order.append("p")
        now[0] += pending[-1][1]

    seconds, ratio = bench_read.paired_times(method, product, repeats=5)
    assert order == ["m", "p"] * 5
    assert seconds == 2.5  # median of 3, 2, 30, 2.5, 2
    assert ratio == 2.5  # median of 3, 2, 3, 2.5, 2


def test_small_reads_benchmark_times_both_kernels(tmp_path):
    """benchmarks/bench_small_reads.py at a tiny size: each case's path as the dispatch chose it
    (2 queries per-pair, 8 dense, no threshold with wide values the blocked path) and both timings."""
    out = tmp_path / "small.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_small_reads.py"), "--queries", "2", "8", "--entries", "300",
         "--dims", "3", "--values", "4", "64", "--thresholds", "tight", "none", "--rounds", "2", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    paths = {(r["E"], r["threshold"], r["Q"]): r["path"] for r in rows}
    assert paths == {(4, "tight", 2): "per-pair", (4, "tight", 8): "dense", (4, "none", 2): "per-pair",
                     (4, "none", 8): "dense", (64, "tight", 2): "per-pair", (64, "tight", 8): "dense",
                     (64, "none", 2): "dense-blocked", (64, "none", 8): "dense-blocked"}
    assert all(r["chosen_ms"] > 0 and r["per_pair_ms"] > 0 and r["per_pair_over_chosen"] > 0 for r in rows)


def test_blocked_dispatch_benchmark_times_both_paths(tmp_path, monkeypatch):
    """benchmarks/bench_blocked_dispatch.py at a tiny size: both paths timed for every case and the
    shipped rule's choice recorded (float32: the blocked forward up to 4 MiB of values, the fused
    kernel beyond)."""
    import torch

    bench_blocked_dispatch = benchmark_module("bench_blocked_dispatch")
    out = tmp_path / "blocked.json"
    threads = torch.get_num_threads()
    argv = ["bench_blocked_dispatch.py", "--threads", "1", "--queries", "20", "--entries", "300", "5000", "--widths",
            "256", "--rounds", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    try:  # in this process: the script's own start-up is most of a subprocess's time at this size
        assert bench_blocked_dispatch.main() == 0
    finally:
        torch.set_num_threads(threads)
    cases = json.loads(out.read_text())["cases"]
    assert {(c["M"], c["shipped"]) for c in cases} == {(300, "blocked"), (5000, "dense")}
    assert all(c["blocked_ms"] > 0 and c["dense_ms"] > 0 and c["dense_speedup"] > 0 for c in cases)


def test_async_benchmark_summarises_earlier_rounds_per_file_and_pooled(tmp_path, capsys):
    """bench_async.py --summarise: each file's rounds, then all files' rounds together (the pooled
    medians BENCHMARKS.md quotes for issue #16)."""
    bench = benchmark_module("bench_async")

    def row(window, repeat, spin=5.0):
        return {"mode": "async", "engine": "local", "workers": 8, "per_process": 4, "in_predictor": 4,
                "spin_wait_ms": spin, "repeat": repeat, "vs_sync": window, "all_playing_vs_sync": None,
                "window_vs_sync": window}

    sync = {"mode": "sync --num-envs 8, 1 thr", "engine": "-", "repeat": 0, "vs_sync": 1.0, "window_vs_sync": 1.0}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"rows": [sync, row(0.9, 0), row(1.1, 1), row(0.5, 0, spin=0.0)]}))
    second.write_text(json.dumps({"rows": [sync, row(1.2, 0)]}))
    assert bench.main(["--summarise", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    pooled = out.split("pooled, 2 files")[1]
    assert "('local', 8, 4, 4, 5.0): [0.9, 1.1, 1.2] median 1.10, 2 of 3 >= 1 | - | [0.9, 1.1, 1.2] median 1.10" in pooled
    assert "('local', 8, 4, 4, 0.0): [0.5] median 0.50, 0 of 1 >= 1" in pooled
    assert "[0.9, 1.1] median 1.00, 1 of 2 >= 1" in out.split("pooled")[0]
