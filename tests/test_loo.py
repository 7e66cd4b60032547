import math

import pytest
import torch

import resonant_kernels as rk
from resonant_kernels import _registry as _backends, reference
from cases import Case, awkward_cases, make_inputs, TOL

FUSED = ["cpu", "triton"]
# Triton runs under its interpreter in CI: a few small cases are enough to pin it to the reference.
TRITON_CASES = {"b2_Q17_M33_d2_E16_per_dim_t0.05", "b2x3_Q6_M11_d5_E7_per_entry_t1.5", "-_Q1_M13_d2_E5_per_entry_t1.0",
                "-_Q9_M0_d2_E4_float_tNone", "b2_Q10_M65_d4_E33_float_t2.0"}


def fused_backend(backend):
    why = _backends.BACKENDS[backend].unavailable_reason()
    if why:
        pytest.skip(f"{backend} backend unusable here: {why}")
    return backend


def memory_of(case: Case, dtype, seed=0):
    _, _, mem_loc, mem_sd, mem_values = make_inputs(case, dtype=dtype, seed=seed)
    return mem_loc, mem_sd, mem_values


def loo_cases(backend):
    cases = awkward_cases(full=False)
    return [c for c in cases if backend != "triton" or str(c) in TRITON_CASES]


def loo_params():
    return [pytest.param(b, c, id=f"{b}-{c}") for b in FUSED for c in loo_cases(b)]


def test_reference_reads_each_entry_from_the_others():
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64)
    sd = torch.rand(2, 9, 3, generator=gen, dtype=torch.float64) + 0.3
    z = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64)
    estimate, error, num_dependencies = rk.leave_one_out(loc, sd, z, backend="reference")
    for b in range(2):
        for i in range(9):
            others = torch.arange(9) != i
            want = rk.gaussian_read(loc[b, i], sd[b, i], loc[b, others], sd[b, others], z[b, others],
                                    backend="reference")
            torch.testing.assert_close(estimate[b, i], want)
            assert abs(float(error[b, i] - (want - z[b, i]).norm())) < 1e-12
            logk = torch.distributions.Normal(loc[b, others], (sd[b, i] ** 2 + sd[b, others] ** 2).sqrt())
            w = torch.softmax(logk.log_prob(loc[b, i]).sum(-1), -1)
            assert int(num_dependencies[b, i]) == int((w > 1 / 9).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend,case", loo_params())
def test_fused_leave_one_out_matches_reference(backend, case, dtype):
    fused_backend(backend)
    mem = memory_of(case, dtype)
    kw = dict(match_threshold=case.threshold)
    ref = rk.leave_one_out(*mem, backend="reference", **kw)
    got = rk.leave_one_out(*mem, backend=backend, **kw)
    batch = mem[0].shape[:-2]
    assert got[0].shape == (*batch, case.M, case.E) and got[1].shape == got[2].shape == (*batch, case.M)
    assert got[2].dtype == torch.int64
    torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
    torch.testing.assert_close(got[1], ref[1], **TOL[dtype])
    # Counts compare w_ij with 1/M; random data puts no weight within rounding of that edge.
    assert torch.equal(got[2], ref[2])


def prune_cases():
    # (batch, M, d, E, sd_kind, threshold): batch rows, thresholds that isolate entries, d up to 8.
    return [
        Case((3,), 1, 40, 2, 3, "per_entry", None),
        Case((2,), 1, 37, 1, 5, "per_dim", 0.3),
        Case((), 1, 70, 3, 2, "float", 1.0),
        Case((2, 2), 1, 19, 8, 4, "per_dim", None),
        Case((), 1, 2, 2, 3, "float", None),
        Case((), 1, 1, 2, 3, "float", None),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", prune_cases(), ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_fused_prune_mask_matches_reference(backend, case, dtype):
    fused_backend(backend)
    mem = memory_of(case, dtype, seed=5)
    mem = (mem[0] * 0.7, mem[1], mem[2])
    _, error, _ = rk.leave_one_out(*mem, match_threshold=case.threshold, backend="reference")
    # Half way between two neighbouring errors, so no error sits within rounding of max_error.
    ordered = error.flatten().sort().values
    max_error = float(ordered[len(ordered) // 2 - 1: len(ordered) // 2 + 1].mean()) if len(ordered) > 1 else 1.0
    kw = dict(max_error=max_error, match_threshold=case.threshold, max_steps=10)
    want = rk.prune_mask(*mem, backend="reference", **kw)
    got = rk.prune_mask(*mem, backend=backend, **kw)
    assert got.dtype == torch.bool and got.shape == want.shape == (*case.batch, case.M)
    assert torch.equal(got, want)
    if case.M > 2:
        assert 0 < int(want.sum()) < want.numel()  # the case prunes something but not everything


def test_batch_rows_prune_different_counts():
    gen = torch.Generator().manual_seed(2)
    loc = torch.randn(3, 50, 2, generator=gen, dtype=torch.float64)
    loc[1] *= 0.2  # a crowded row prunes more than a sparse one
    loc[2] *= 4.0
    z = torch.randn(1, 50, 3, generator=gen, dtype=torch.float64) * 0.1
    kw = dict(max_error=0.1, match_threshold=1.0)
    want = rk.prune_mask(loc, 0.4, z, backend="reference", **kw)
    counts = want.sum(-1).tolist()
    assert len(set(counts)) == 3, counts
    # Row by row on its own gives the same keep: rows do not see each other's 1/M or survivors.
    for b in range(3):
        assert torch.equal(rk.prune_mask(loc[b], 0.4, z[0], backend="reference", **kw), want[b])
    for backend in FUSED:
        fused_backend(backend)
        assert torch.equal(rk.prune_mask(loc, 0.4, z, backend=backend, **kw), want), backend


def tied_memory(dtype):
    """Two tight clusters whose values are all zero (every leave-one-out error is exactly 0, a
    tie) and two entries far from everything (isolated by the threshold)."""
    gen = torch.Generator().manual_seed(4)
    cluster_a = torch.randn(4, 2, generator=gen, dtype=dtype) * 0.05
    cluster_b = torch.randn(3, 2, generator=gen, dtype=dtype) * 0.05 + 10
    lonely = torch.tensor([[-10.0, 0.0], [0.0, 20.0]], dtype=dtype)
    loc = torch.cat([lonely[:1], cluster_a[:2], cluster_b, cluster_a[2:], lonely[1:]])
    values = torch.zeros(loc.shape[0], 3, dtype=dtype)
    values[0] = torch.tensor([1.0, 2.0, 2.0])  # an isolated entry with a large value
    return loc, values


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_ties_in_error_are_broken_by_index_and_isolated_entries_stay(backend):
    fused_backend(backend) if backend != "reference" else None
    loc, values = tied_memory(torch.float64)
    estimate, error, num_dependencies = rk.leave_one_out(loc, 0.1, values, match_threshold=1.0, backend=backend)
    # Isolated: no dependency, reads zeros, error is the value's norm.
    for lonely in (0, 8):
        assert int(num_dependencies[lonely]) == 0
        assert torch.equal(estimate[lonely], torch.zeros(3, dtype=torch.float64))
    assert float(error[0]) == pytest.approx(3.0)
    assert torch.equal(error[1:], torch.zeros(8, dtype=torch.float64))
    # Entry order: 0 lonely, 1-2 cluster a, 3-5 cluster b, 6-7 cluster a, 8 lonely. Within a cluster
    # every entry depends on the others; with all errors tied, the lowest index of each cluster has
    # nothing of lower rank and survives, the rest go in one step, and isolated entries never go.
    keep = rk.prune_mask(loc, 0.1, values, max_error=100.0, match_threshold=1.0, max_steps=1, backend=backend)
    expected = torch.tensor([True, True, False, True, False, False, False, False, True], dtype=torch.bool)
    assert torch.equal(keep, expected)
    assert torch.equal(rk.prune_mask(loc, 0.1, values, max_error=100.0, match_threshold=1.0, backend=backend), keep)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_one_and_two_entries(backend):
    fused_backend(backend) if backend != "reference" else None
    z = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    estimate, error, num_dependencies = rk.leave_one_out(torch.zeros(1, 2, dtype=torch.float64), 1.0, z,
                                                         backend=backend)
    assert torch.equal(estimate, torch.zeros(1, 2, dtype=torch.float64))
    assert float(error[0]) == 5.0 and int(num_dependencies[0]) == 0
    assert torch.equal(rk.prune_mask(torch.zeros(1, 2, dtype=torch.float64), 1.0, z, max_error=1e9, backend=backend),
                       torch.tensor([True]))
    # Two entries read each other (w = 1 > 1/2): equal errors, the higher index is pruned.
    loc = torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    estimate, error, num_dependencies = rk.leave_one_out(loc, 1.0, z, backend=backend)
    assert torch.equal(estimate, z.flip(0))
    assert torch.equal(num_dependencies, torch.tensor([1, 1]))
    assert float(error[0]) == float(error[1]) == pytest.approx(math.sqrt(2))
    keep = rk.prune_mask(loc, 1.0, z, max_error=2.0, backend=backend)
    assert torch.equal(keep, torch.tensor([True, False]))
    # Below max_error only: an error of √2 is not pruned at max_error √2.
    assert rk.prune_mask(loc, 1.0, z, max_error=1.0, backend=backend).all()


def smooth_field(points, centers, directions, radius=60.0):
    bumps = torch.exp(-((points[:, None, :] - centers[None]) ** 2).sum(-1) / (2 * radius**2))
    return bumps @ directions


def test_notebook_style_pruning_keeps_the_read():
    """design.md §3's notebook case with a smooth field in place of the tree-world sensor."""
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(1024, 2, generator=gen, dtype=torch.float64) * 100
    centers = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 100
    directions = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen, dtype=torch.float64), dim=-1)
    values = smooth_field(loc, centers, directions)
    kw = dict(max_error=0.05, match_threshold=25.0)
    keep = rk.prune_mask(loc, 10.0, values, backend="cpu" if rk.backends(False)[1].usable else "reference", **kw)
    assert torch.equal(keep, rk.prune_mask(loc, 10.0, values, backend="reference", **kw))
    removed = 1024 - int(keep.sum())
    assert removed >= 200, removed  # a substantial share goes

    axis = torch.linspace(-200, 200, 100, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    before = rk.gaussian_read(grid, 10.0, loc, 10.0, values, match_threshold=25.0)
    after = rk.gaussian_read(grid, 10.0, loc[keep], 10.0, values[keep], match_threshold=25.0)
    moved = float((after - before).norm(dim=-1).mean())
    field_norm = float(smooth_field(grid, centers, directions).norm(dim=-1).mean())
    assert moved < 0.05 * field_norm, (moved, field_norm)
    # Pruning that ignores the rule (dropping as many entries at random) moves the read far more.
    random_keep = torch.ones(1024, dtype=torch.bool)
    random_keep[torch.randperm(1024, generator=gen)[:removed]] = False
    after_random = rk.gaussian_read(grid, 10.0, loc[random_keep], 10.0, values[random_keep], match_threshold=25.0)
    assert float((after_random - before).norm(dim=-1).mean()) > 1.5 * moved


def test_max_steps_bounds_the_steps():
    gen = torch.Generator().manual_seed(6)
    loc = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    z = torch.randn(60, 2, generator=gen, dtype=torch.float64) * 0.05
    kw = dict(max_error=1.0, match_threshold=1.5)
    assert rk.prune_mask(loc, 0.3, z, max_steps=0, backend="reference", **kw).all()
    one = rk.prune_mask(loc, 0.3, z, max_steps=1, backend="reference", **kw)
    many = rk.prune_mask(loc, 0.3, z, max_steps=10, backend="reference", **kw)
    _, error, _, deps = reference.leave_one_out(loc, torch.tensor(0.09, dtype=torch.float64), z, 1.5)
    assert torch.equal(~one, reference.prune_candidates(error, deps, 1.0))
    assert int(many.sum()) < int(one.sum()) < 60 and not (many & ~one).any()
    for backend in FUSED:
        fused_backend(backend)
        assert torch.equal(rk.prune_mask(loc, 0.3, z, max_steps=1, backend=backend, **kw), one)


def test_bad_arguments_are_named():
    loc, z = torch.zeros(4, 2), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="mem_sd"):
        rk.leave_one_out(loc, -1.0, z)
    with pytest.raises(ValueError, match="mem_values"):
        rk.leave_one_out(loc, 1.0, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="match_threshold"):
        rk.prune_mask(loc, 1.0, z, max_error=0.1, match_threshold=-1.0)
    with pytest.raises(TypeError, match="max_error"):
        rk.prune_mask(loc, 1.0, z, max_error="0.1")
    with pytest.raises(ValueError, match="max_error"):
        rk.prune_mask(loc, 1.0, z, max_error=math.nan)
    with pytest.raises(ValueError, match="max_steps"):
        rk.prune_mask(loc, 1.0, z, max_error=0.1, max_steps=-1)
    with pytest.raises(ValueError, match="unknown backend"):
        rk.leave_one_out(loc, 1.0, z, backend="gpu")
    with pytest.raises(ValueError, match="cpu"):
        rk.prune_mask(loc, 1.0, z.double(), max_error=0.1, backend="cpu")


def test_fused_cpu_prune_never_holds_an_m_by_m_matrix():
    """Peak extra RSS of a whole prune_mask at M = 4096 stays far below one float32 M×M (64 MB)."""
    fused_backend("cpu")
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from _measure import peak_extra_rss_mb

    peak = peak_extra_rss_mb("bench_prune", "make_call", dict(M=4096, E=4, backend="cpu"), timeout=300)
    assert peak < 16.0, peak
    # The probe does see M×M allocations: the reference at M = 1024 needs several 4 MB matrices.
    assert peak_extra_rss_mb("bench_prune", "make_call", dict(M=1024, E=4, backend="reference"), timeout=300) > 16.0


@pytest.mark.parametrize("backend", FUSED)
def test_batch_broadcast_and_thresholds_that_isolate_everything(backend):
    fused_backend(backend)
    gen = torch.Generator().manual_seed(8)
    loc = torch.randn(1, 30, 2, generator=gen, dtype=torch.float64)  # one layout, three value sets
    sd = torch.rand(30, 1, generator=gen, dtype=torch.float64) + 0.3
    z = torch.randn(3, 30, 4, generator=gen, dtype=torch.float64) * torch.tensor([0.05, 0.5, 2.0]).view(3, 1, 1)
    for threshold in (None, 0.8):
        want = rk.leave_one_out(loc, sd, z, match_threshold=threshold, backend="reference")
        got = rk.leave_one_out(loc, sd, z, match_threshold=threshold, backend=backend)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, check_dtype=True)
        keep = rk.prune_mask(loc, sd, z, max_error=0.3, match_threshold=threshold, backend="reference")
        assert keep.shape == (3, 30) and len(set(keep.sum(-1).tolist())) > 1
        assert torch.equal(rk.prune_mask(loc, sd, z, max_error=0.3, match_threshold=threshold, backend=backend), keep)
    # θ = 0: every entry is isolated, reads zeros, depends on nothing and is never pruned.
    estimate, error, num_dependencies = rk.leave_one_out(loc, sd, z, match_threshold=0.0, backend=backend)
    assert not estimate.any() and not num_dependencies.any()
    torch.testing.assert_close(error, z.norm(dim=-1))
    assert rk.prune_mask(loc, sd, z, max_error=1e9, match_threshold=0.0, backend=backend).all()
