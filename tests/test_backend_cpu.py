"""What only the cpu backend (csrc/*.cpp, OpenMP) has: the sampling kernel's plans (query groups,
entry passes, thread splits) at sizes past the shared cases, with other thread counts in a fresh
process, and pruning without an M×M buffer. Its correctness against the reference on the shared
cases is tests/test_ops.py's."""
import os
import sys

import pytest
import torch

import resonant_kernels as rk
from backends import requires
from cases import TOL, make_sd

HERE = os.path.dirname(os.path.abspath(__file__))


@requires("cpu", "conditional_probs")
@pytest.mark.parametrize("Q", [1, 40])
def test_cpu_probs_match_reference_on_a_larger_memory(Q):
    """Sizes past the small cases: a lone query's dots spread over threads (Q = 1), and several
    query groups with packed value chunks longer than one chunk (E > 256) (Q = 40)."""
    gen = torch.Generator().manual_seed(12)
    M, E = 2100, 530
    mem_loc, mem_values = torch.randn(M, 2, generator=gen) * 10, torch.randn(M, E, generator=gen)
    key, search_loc = torch.randn(Q, E, generator=gen), torch.randn(Q, 2, generator=gen) * 10
    kw = dict(search_loc=search_loc, search_sd=2.0, match_threshold=8.0)
    want = rk.conditional_probs(mem_loc, 1.0, mem_values, key, backend="reference", **kw)
    got = rk.conditional_probs(mem_loc, 1.0, mem_values, key, backend="cpu", **kw)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


# Shapes for the cpu kernel's plan (csrc/sample_cpu.cpp, make_plan): queries in groups of up to 128
# (fewer where M is large); a group is shared by all threads, which split the entries into passes
# of 96 (float32) or 48 (float64) and then the queries, unless the groups share out evenly over the
# threads (and their buffers fit), when each thread takes whole groups.
CPU_PLANS = {
    # 300 queries: groups of 128, 128 and 44 (shared by 2 threads); a shared variance (the
    # vectorised location term) and a threshold that masks many pairs; M = 1000: a last pass of 40
    # entries, a last block of 4
    "groups": dict(batch=(), Q=300, M=1000, d=2, E=300, sd="float", threshold=1.0),
    # values and locations as strided views (the copied-rows and generic location paths), a batch
    # of 3 (groups shared by 2 threads, whole with 1 or 3)
    "strided": dict(batch=(3,), Q=40, M=517, d=3, E=260, sd="per_entry", threshold=None, strided=True),
    # fewer queries than a register block: one streamed dot per pair, entries split over threads
    "streamed": dict(batch=(), Q=5, M=5000, d=2, E=200, sd="float", threshold=1.5),
    # M so large that 128 queries' logits would pass the buffer bound: smaller groups
    "capped": dict(batch=(), Q=70, M=40000, d=1, E=12, sd="per_dim", threshold=None),
    # a batch of small problems: whole groups (128 + 72 queries per row) handed to threads
    "small": dict(batch=(5,), Q=200, M=40, d=2, E=8, sd="per_dim", threshold=0.8),
}


def plan_inputs(plan, dtype, seed=21):
    gen = torch.Generator().manual_seed(seed)
    batch, Q, M, d, E = plan["batch"], plan["Q"], plan["M"], plan["d"], plan["E"]
    if plan.get("strided"):
        mem_values = torch.randn((*batch, E, M), generator=gen, dtype=dtype).transpose(-1, -2)
        mem_loc = torch.randn((*batch, M, 2 * d), generator=gen, dtype=dtype)[..., ::2]
    else:
        mem_values = torch.randn((*batch, M, E), generator=gen, dtype=dtype)
        mem_loc = torch.randn((*batch, M, d), generator=gen, dtype=dtype)
    key = torch.randn((*batch, Q, E), generator=gen, dtype=dtype) * 2
    search_loc = torch.randn((*batch, Q, d), generator=gen, dtype=dtype)
    mem_sd = make_sd(plan["sd"], mem_loc.shape, dtype, gen, 0.5)
    search_sd = make_sd(plan["sd"], search_loc.shape, dtype, gen, 0.6)
    return mem_loc, mem_sd, mem_values, key, search_loc, search_sd


def check_cpu_plan(name, dtype):
    """cpu probs within tolerance of the reference, and the same inverse-CDF draws from the same
    uniforms (all but draws within rounding of a bin edge), never an entry of probability zero."""
    from resonant_kernels import reference, sample

    plan = CPU_PLANS[name]
    mem_loc, mem_sd, mem_values, key, search_loc, search_sd = plan_inputs(plan, dtype)
    kw = dict(search_loc=search_loc, search_sd=search_sd, match_threshold=plan["threshold"], temperature=0.7)
    want = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend="reference", **kw)
    got = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend="cpu", **kw)
    torch.testing.assert_close(got, want, **TOL[dtype])
    call = sample._prepare(sample.SAMPLE_OP, mem_loc, mem_sd, mem_values, key, search_loc, search_sd, 0.7, 1.0,
                           plan["threshold"], "cpu", None)
    B, Q, M, _, _ = call.shape
    # 61 draws per query: the last batch of the lockstep searches (8 draws) is partial
    uniforms = torch.rand((B, Q, 61), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    drawn = sample.sample_indices(*call.kernel_args(), uniforms, *call.scalars(), "cpu")
    probs = sample.sample_probs(*call.kernel_args(), *call.scalars(), "reference")
    expected = reference.inverse_cdf(probs, uniforms)
    assert drawn.shape == expected.shape and drawn.min() >= 0 and drawn.max() < M
    assert float((drawn == expected).double().mean()) > 0.999
    assert bool((probs.gather(-1, drawn) > 0).all())


@requires("cpu", "conditional_sample")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CPU_PLANS))
def test_cpu_plans_match_reference(name, dtype):
    check_cpu_plan(name, dtype)


@requires("cpu", "conditional_sample")
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_plans_with_other_thread_counts(threads):
    """The same checks with one thread (no split) and an odd team that divides neither the passes
    nor the queries evenly."""
    from resonant.parallel.server import torch_threads

    with torch_threads(threads):
        for name in ("groups", "strided", "streamed", "capped"):
            for dtype in (torch.float32, torch.float64):
                check_cpu_plan(name, dtype)


@requires("cpu", "prune_mask")
def test_fused_cpu_prune_never_holds_an_m_by_m_matrix():
    """Peak extra RSS of a whole prune_mask at M = 4096 stays far below one float32 M×M (64 MB)."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
    from _measure import peak_extra_rss_mb

    peak = peak_extra_rss_mb("bench_prune", "make_call", dict(M=4096, E=4, backend="cpu"), timeout=300)
    assert peak < 16.0, peak
    # The probe does see M×M allocations: the reference at M = 1024 needs several 4 MB matrices.
    assert peak_extra_rss_mb("bench_prune", "make_call", dict(M=1024, E=4, backend="reference"), timeout=300) > 16.0
