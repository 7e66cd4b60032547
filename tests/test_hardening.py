"""Regression tests for the edges found by probing the kernels (issue #13): each test names the
point it guards. The property-based sweep is tests/test_fuzz.py; guard pages tests/test_guard_pages.py."""
from __future__ import annotations

import pytest
import torch

import resonant_kernels as rk
from backends import ON_CPU, interpreted, requires, rows

# The tests build CPU tensors: the backends that run on them here (tests/backends.py); each of
# them has every op.
CPU_BACKENDS = rows("gaussian_read", backends=ON_CPU)


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


@requires("cpu", "gaussian_read")
@pytest.mark.parametrize("threads", [1, 3, 5])
def test_cpu_read_gradients_are_bitwise_reproducible(threads):
    """Point 6: more threads than cores makes scheduling order vary; the sums must not."""
    from resonant.parallel.server import torch_threads

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(300, 3, generator=gen, dtype=torch.float64).requires_grad_()
    qs = (torch.rand(300, 3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    m = torch.randn(200, 3, generator=gen, dtype=torch.float64).requires_grad_()
    ms = (torch.rand(200, 3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    z = torch.randn(200, 37, generator=gen, dtype=torch.float64).requires_grad_()
    cot = torch.randn(300, 37, generator=gen, dtype=torch.float64)
    with torch_threads(threads):
        first = torch.autograd.grad(rk.gaussian_read(q, qs, m, ms, z, backend="cpu"), (q, qs, m, ms, z), cot)
        for _ in range(5):
            grads = torch.autograd.grad(rk.gaussian_read(q, qs, m, ms, z, backend="cpu"), (q, qs, m, ms, z), cot)
            assert all(torch.equal(a, b) for a, b in zip(first, grads)), "gradients differ between runs"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_default_gradcheck_passes_reentrancy(backend):
    """Point 6: torch.autograd.gradcheck with its default nondet_tol=0 runs the backward twice."""
    gen = torch.Generator().manual_seed(1)
    # several entry blocks for cpu's threads; tiny under the (slow) Triton interpreter
    Q, M, E = (3, 5, 2) if interpreted(backend) else (20, 17, 9)
    q = torch.randn(Q, 2, generator=gen, dtype=torch.float64).requires_grad_()
    qs = (torch.rand(Q, 2, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    m = torch.randn(M, 2, generator=gen, dtype=torch.float64).requires_grad_()
    ms = (torch.rand(M, 1, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    z = torch.randn(M, E, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: rk.gaussian_read(*a, backend=backend), (q, qs, m, ms, z))


# ---- point 3: σ and locations outside the dtype's usable range are rejected, naming the argument ----

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sd", [1e-23, 1e20])
def test_float32_sd_whose_square_leaves_float32_is_rejected(backend, sd):
    m, z, q = torch.randn(6, 2), torch.randn(6, 3), torch.randn(2, 2)
    with pytest.raises(ValueError, match=r"query_sd .*\[1\.084e-19, 9\.223e\+18\]"):
        rk.gaussian_read(q, sd, m, 1.0, z, backend=backend)
    with pytest.raises(ValueError, match=r"mem_sd contains"):
        rk.gaussian_read(q, 1.0, m, torch.full((6, 1), sd), z, backend=backend)
    with pytest.raises(ValueError, match=r"mem_sd .*float32"):
        rk.leave_one_out(m, sd, z, backend=backend)
    with pytest.raises(ValueError, match=r"search_sd .*float32"):
        rk.conditional_probs(m, 1.0, z, torch.randn(3), search_loc=q[0], search_sd=sd, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_same_sd_in_float64_is_fine_and_matches_scaled_units(backend):
    gen = torch.Generator().manual_seed(3)
    m, z, q = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((6, 2), (6, 3), (2, 2)))
    for sd in (1e-23, 1e20):
        out = rk.gaussian_read(q * sd, sd, m * sd, sd, z, backend=backend)
        torch.testing.assert_close(out, rk.gaussian_read(q, 1.0, m, 1.0, z, backend="reference"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_locations_whose_squared_distances_overflow_are_rejected(backend):
    m, z = torch.randn(6, 2), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"query_loc has a value of magnitude 1e\+20.*d = 2"):
        rk.gaussian_read(torch.tensor([[1e20, 0.0]]), 1.0, m, 1.0, z, backend=backend)
    with pytest.raises(ValueError, match=r"mem_loc .*float32"):
        rk.leave_one_out(m * 1e19, 1.0, z, backend=backend)
    with pytest.raises(ValueError, match=r"mem_values has a value of magnitude .* M = 6"):
        rk.gaussian_read(m, 1.0, m, 1.0, z * 1e38, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_far_beyond_every_entry_reads_zero_like_a_masked_query(backend):
    """The documented edge inside the ranges: a squared standardised distance above the dtype's
    largest number weighs zero on every backend, exactly as if the threshold masked it."""
    m, z = torch.zeros(3, 2), torch.ones(3, 2)
    q = torch.tensor([[1e18, 0.0]])
    out = rk.gaussian_read(q, 1e-18, m, 1e-18, z, backend=backend)
    assert torch.equal(out, torch.zeros(1, 2))


# ---- points 4 and 5: logits that overflow, E = 0, huge thresholds ----

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["probs", "sample"])
def test_sampling_logits_that_overflow_raise_the_same_error_everywhere(backend, op):
    gen = torch.Generator().manual_seed(4)
    m, z = torch.randn(16, 2, generator=gen), torch.randn(16, 8, generator=gen)
    key = torch.randn(2, 8, generator=gen)
    fn = rk.conditional_probs if op == "probs" else rk.conditional_sample
    kw = {} if op == "probs" else dict(num_samples=4)
    name = "conditional_probs" if op == "probs" else "conditional_sample"
    with pytest.raises(ValueError, match=rf"{name}: the logits of 2 of 2 queries .* not finite in float32"):
        fn(m, 1.0, z * 1e5, key * 1e5, temperature=1e-30, backend=backend, **kw)
    with pytest.raises(ValueError, match=r"location_temperature is 1e-40; it must be at least 2\.9"):
        fn(m, 1.0, z, key, search_loc=m[:2], search_sd=1.0, location_temperature=1e-40, backend=backend, **kw)
    with pytest.raises(ValueError, match=r"not finite in float32: .*log k\(search_loc, mem_loc\)"):
        # finite scale, but log k (≈ -1e6 for an entry 1e3 σ away) / 1e-37 overflows for every entry
        fn(m, 1.0, z, key, search_loc=m[:2] + 2e3, search_sd=1.0, location_temperature=1e-37, backend=backend, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sampling_with_tiny_but_finite_temperature_is_the_argmax(backend):
    gen = torch.Generator().manual_seed(5)
    m, z = torch.randn(16, 2, generator=gen), torch.randn(16, 8, generator=gen)
    key = torch.randn(8, generator=gen)
    best = int((z @ key).argmax())
    probs = rk.conditional_probs(m, 1.0, z, key, temperature=1e-30, backend=backend)
    assert torch.equal(probs, torch.nn.functional.one_hot(torch.tensor(best), 16).float())
    draws = rk.conditional_sample(m, 1.0, z, key, temperature=1e-30, num_samples=5, sigma_scale=0.0, backend=backend)
    assert torch.equal(draws, m[best].expand(5, 2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sampling_with_empty_values_uses_the_location_term_alone(backend):
    gen = torch.Generator().manual_seed(6)
    m = torch.randn(9, 2, generator=gen, dtype=torch.float64)
    z, key = torch.zeros(9, 0, dtype=torch.float64), torch.zeros(3, 0, dtype=torch.float64)
    here = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    probs = rk.conditional_probs(m, 0.5, z, key, search_loc=here, search_sd=0.5, backend=backend)
    expect = torch.softmax(rk.reference.log_kernel(here, torch.tensor(0.25, dtype=torch.float64), m,
                                                   torch.tensor(0.25, dtype=torch.float64)), -1)
    torch.testing.assert_close(probs, expect)
    flat = rk.conditional_probs(m, 0.5, z, key, backend=backend)  # no location: every entry alike
    torch.testing.assert_close(flat, torch.full((3, 9), 1 / 9, dtype=torch.float64))
    draws = rk.conditional_sample(m, 0.5, z, key, num_samples=4, generator=torch.Generator().manual_seed(0),
                                  backend=backend)
    assert draws.shape == (3, 4, 2) and torch.isfinite(draws).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("threshold", [1.3e154, 1e155, 1e300, float("inf")])
def test_thresholds_beyond_any_distance_mean_none(backend, threshold):
    gen = torch.Generator().manual_seed(7)
    m, z, q = torch.randn(6, 2, generator=gen), torch.randn(6, 3, generator=gen), torch.randn(2, 2, generator=gen)
    none = rk.gaussian_read(q, 1.0, m, 1.0, z, backend="reference")
    torch.testing.assert_close(rk.gaussian_read(q, 1.0, m, 1.0, z, match_threshold=threshold, backend=backend), none)
    half = z.to(torch.float16)  # `auto` on CPU sends half values to the reference
    rk.gaussian_read(q, 1.0, m, 1.0, half, match_threshold=threshold)
    rk.leave_one_out(m, 1.0, z, match_threshold=threshold, backend=backend)
    rk.conditional_probs(m, 1.0, z, z[0], search_loc=q, search_sd=1.0, match_threshold=threshold, backend=backend)


# ---- point 7: conditional_probs has the reference's gradient on every backend ----

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("threshold", [None, 0.8])
def test_conditional_probs_gradients_match_the_reference(backend, threshold):
    gen = torch.Generator().manual_seed(8)
    leaves = [torch.randn(7, 2, generator=gen, dtype=torch.float64),     # mem_loc
              torch.rand(7, 2, generator=gen, dtype=torch.float64) + 0.5,  # mem_sd
              torch.randn(7, 3, generator=gen, dtype=torch.float64),     # mem_values
              torch.randn(4, 3, generator=gen, dtype=torch.float64),     # search_key
              torch.randn(4, 2, generator=gen, dtype=torch.float64),     # search_loc
              torch.rand(4, 1, generator=gen, dtype=torch.float64) + 0.5]  # search_sd
    cot = torch.randn(4, 7, generator=gen, dtype=torch.float64)

    def grads(b):
        args = [t.clone().requires_grad_() for t in leaves]
        probs = rk.conditional_probs(*args[:4], search_loc=args[4], search_sd=args[5], match_threshold=threshold,
                                     temperature=0.7, backend=b)
        return torch.autograd.grad(probs, args, cot)

    # the reference's own autograd through its maths, independent of the op's backward formula
    from resonant_kernels import reference
    args = [t.clone().requires_grad_() for t in leaves]
    logits = reference.conditional_logits(args[3], args[2], 3 ** -0.5 / 0.7, args[4], args[5] ** 2, args[0],
                                          args[1] ** 2, 1.0, threshold)
    direct = torch.autograd.grad(torch.softmax(logits, -1), args, cot)
    for g, want in zip(grads(backend), direct):
        torch.testing.assert_close(g, want)
