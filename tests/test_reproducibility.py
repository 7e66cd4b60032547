"""docs/design.md §7 on the CPU backends: the same inputs give bitwise the same outputs from run to
run and for any thread count, except the read's query gradients on `cpu` (per-thread partial
sums): bitwise the same run to run for a thread count, within rounding across thread counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from backends import rows, usable

SCRIPT = textwrap.dedent("""
    import json, sys, torch, resonant_kernels as rk


    def outputs(backend):
        g = torch.Generator().manual_seed(0)
        q = (torch.randn(300, 2, generator=g, dtype=torch.float64) * 50).requires_grad_()
        qsd = torch.full((300, 1), 8.0, dtype=torch.float64, requires_grad=True)
        m = (torch.randn(500, 2, generator=g, dtype=torch.float64) * 50).requires_grad_()
        msd = (torch.rand(500, 2, generator=g, dtype=torch.float64) * 5 + 8).requires_grad_()
        z = torch.randn(500, 16, generator=g, dtype=torch.float64, requires_grad=True)
        out = rk.gaussian_read(q, qsd, m, msd, z, match_threshold=40.0, backend=backend)
        out.sum().backward()
        mem = (m.detach(), msd.detach(), z.detach())
        est, err, deps = rk.leave_one_out(*mem, match_threshold=40.0, backend=backend)
        keep = rk.prune_mask(*mem, max_error=0.5, match_threshold=40.0, backend=backend)
        key = torch.randn(64, 16, generator=g, dtype=torch.float64)
        probs = rk.conditional_probs(*mem, key, search_loc=q.detach()[:64], search_sd=20.0, backend=backend)
        draws = rk.conditional_sample(*mem, key, num_samples=8, backend=backend,
                                      generator=torch.Generator().manual_seed(1))
        named = dict(out=out, mem_loc_grad=m.grad, mem_sd_grad=msd.grad, mem_values_grad=z.grad, estimate=est,
                     error=err, deps=deps, keep=keep, probs=probs, draws=draws, query_loc_grad=q.grad,
                     query_sd_grad=qsd.grad)
        return {k: v.detach().double().flatten().tolist() for k, v in named.items()}


    print(json.dumps({backend: outputs(backend) for backend in sys.argv[1:]}))
""")
QUERY_GRADS = ("query_loc_grad", "query_sd_grad")
CPU_BACKENDS = ("cpu", "reference")
BACKENDS = [b for b in CPU_BACKENDS if usable(b)]  # the ones the child processes run


def run(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *BACKENDS], env=env, capture_output=True, text=True,
                          check=True)
    return {backend: {k: torch.tensor(v, dtype=torch.float64) for k, v in named.items()}
            for backend, named in json.loads(done.stdout).items()}


@pytest.fixture(scope="module")
def runs():
    return run(1), run(2), run(2)


@pytest.mark.parametrize("backend", rows("gaussian_read", backends=CPU_BACKENDS))
def test_outputs_are_bitwise_reproducible_across_runs_and_thread_counts(backend, runs):
    one, two, again = (r[backend] for r in runs)
    assert set(one) == {"out", "mem_loc_grad", "mem_sd_grad", "mem_values_grad", "estimate", "error", "deps", "keep",
                        "probs", "draws", *QUERY_GRADS}
    for name in one:
        assert torch.equal(two[name], again[name]), f"{backend} {name}: run to run"
        if backend == "cpu" and name in QUERY_GRADS:
            # per-thread partial sums: across thread counts equal within rounding, not bitwise
            torch.testing.assert_close(two[name], one[name], rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(one[name], two[name]), f"{backend} {name}: 1 vs 2 threads"
