"""Regression tests for the edges found by probing the kernels (issue #13): each test names the
point it guards. The property-based sweep is tests/test_fuzz.py; guard pages tests/test_guard_pages.py."""
from __future__ import annotations

import pytest
import torch

import resonant_kernels as rk
from resonant_kernels import _backends

CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if _backends.BACKENDS[b].unavailable_reason() is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sd", [1e10, 1e-6, 1e100, 1e-100])
def test_per_entry_sd_at_large_d_reads_like_float64_oracle(backend, sd):
    """Point 2: the log-determinant of d per-dimension variances must not over/underflow."""
    gen = torch.Generator().manual_seed(0)
    d = 32
    mem_loc = torch.randn(5, d, generator=gen, dtype=torch.float64) * sd
    query_loc = torch.randn(3, d, generator=gen, dtype=torch.float64) * sd
    mem_values = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    # different σ per entry, so the log-determinant term does not cancel in the softmax
    mem_sd = torch.full((5, d), sd, dtype=torch.float64) * torch.linspace(1, 2, 5, dtype=torch.float64)[:, None]
    out = rk.gaussian_read(query_loc, sd, mem_loc, mem_sd, mem_values, backend=backend)
    # oracle in scaled units: the read is invariant to scaling every location and σ together
    expect = rk.gaussian_read(query_loc / sd, 1.0, mem_loc / sd, mem_sd / sd, mem_values, backend="reference")
    torch.testing.assert_close(out, expect, rtol=1e-9, atol=1e-12)
    _, error, deps = rk.leave_one_out(mem_loc, mem_sd, mem_values, backend=backend)
    _, expect_error, expect_deps = rk.leave_one_out(mem_loc / sd, mem_sd / sd, mem_values, backend="reference")
    torch.testing.assert_close(error, expect_error, rtol=1e-9, atol=1e-12)
    assert torch.equal(deps, expect_deps)
