"""Every op on every backend against the reference: the shared correctness tests, one table.

The rows come from tests/backends.py: each (op, backend) pair the table lists runs on the backend's
device (CPU tensors for reference and cpu, CUDA tensors for cuda, and for triton on a GPU; CPU
tensors under the Triton interpreter without one), at the sizes that device allows (tiny cases
under the interpreter, many-tile sizes on GPUs only), and is skipped with the registry's reason
where the backend cannot run here. Rows on a CUDA device are marked `gpu`.
What only one backend has (cpu's sampling plans and thread counts, triton's allow_tf32, cuda's
streams and location-dim limit) lives in test_backend_<name>.py; the reference's own maths in
test_reference.py.
"""
import dataclasses
import math

import pytest
import torch
from scipy import stats

import resonant_kernels as rk
from backends import DTYPES, FUSED, HALF, HALF_VALUES, ON_GPU, device, interpreted, on_gpu, rows
from cases import (GRAD_TOL, LARGE, LARGE_HALF, MULTI_TILE, NOTEBOOK_PRUNE, SAMPLE_TILED, TILED, TOL, Case,
                   awkward_cases, batch_broadcast_inputs, check_read_against_reference, chi_square_setup, clone_inputs,
                   grads_of, make_inputs, memory_of, notebook_memory, notebook_reference_keep, prune_cases,
                   sample_inputs)

READ = "gaussian_read"
INPUT_NAMES = ("query_loc", "query_sd", "mem_loc", "mem_sd", "mem_values")
LOCATION = [pytest.param(True, id="loc"), pytest.param(False, id="noloc")]


def to(backend, *tensors):
    """The tensors on `backend`'s device (numbers as they are)."""
    return [t.to(device(backend)) if isinstance(t, torch.Tensor) else t for t in tensors]


def generator(backend, seed):
    return torch.Generator(device=device(backend)).manual_seed(seed)


# ---- gaussian_read -----------------------------------------------------------------------------

def read_cases(backend):
    """Awkward shapes (narrower values under the interpreter) and several tiles of each kernel; on a
    GPU also the CUDA read's tiles and sizes of many tiles."""
    cases = awkward_cases(full=not interpreted(backend)) + MULTI_TILE
    return cases + TILED + LARGE if on_gpu(backend) else cases


@pytest.mark.parametrize("backend,case,dtype", rows(READ, fused=True, cases=read_cases, dtype=DTYPES))
def test_read_matches_reference(backend, case, dtype):
    check_read_against_reference(backend, case, dtype, device=device(backend))


def half_cases(backend):
    if interpreted(backend):  # several tiles of each kernel, with and without a threshold
        return [MULTI_TILE[0], dataclasses.replace(MULTI_TILE[0], threshold=None)]
    awkward = awkward_cases()
    return [awkward[5], awkward[8], MULTI_TILE[0], *TILED, *([LARGE_HALF] if on_gpu(backend) else [])]


@pytest.mark.parametrize("backend,case,value_dtype",
                         rows(READ, backends=HALF_VALUES, cases=half_cases, value_dtype=list(HALF)))
def test_read_half_precision_values(backend, case, value_dtype):
    """Half-precision values accumulate in float32: against the reference on the same (rounded)
    values held in float32, the only extra error is the weights' rounding to the value dtype."""
    inputs = make_inputs(case, dtype=torch.float32, value_dtype=value_dtype, requires_grad=True, device=device(backend))
    wide = clone_inputs(inputs)
    wide[4] = inputs[4].detach().float().requires_grad_()
    kw = dict(match_threshold=case.threshold)
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, backend=backend, **kw), inputs)
    ref, ref_grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="reference", **kw), wide)
    assert out.dtype == value_dtype and grads[-1].dtype == value_dtype
    out_tol, grad_tol = HALF_VALUES[backend][value_dtype]
    out_tol.check(out, ref, "read")
    names = [n for n, t in zip(INPUT_NAMES, inputs) if isinstance(t, torch.Tensor)]
    for name, g, rg in zip(names, grads, ref_grads):
        assert torch.isfinite(g).all(), name
        grad_tol.check(g, rg, f"grad {name}")


@pytest.mark.parametrize("backend", rows(READ))
def test_read_batch_broadcast_memory(backend):
    """Queries with a batch of 3 against one memory (batch dim 1): row r is the read of row r alone."""
    inputs = [t.requires_grad_() for t in to(backend, *batch_broadcast_inputs())]
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, backend=backend), inputs)
    ref, ref_grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="reference"), clone_inputs(inputs))
    assert out.shape == (3, 4, 5)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for g, rg, t in zip(grads, ref_grads, inputs):
        assert g.shape == t.shape
        torch.testing.assert_close(g, rg, **GRAD_TOL[torch.float64])
    q, qs, m, ms, z = (t.detach() for t in inputs)
    for row in range(3):
        want = rk.gaussian_read(q[row], qs[row], m[0], ms[0], z[0], backend="reference")
        torch.testing.assert_close(out[row].detach(), want, **TOL[torch.float64])


@pytest.mark.parametrize("backend", rows(READ, fused=True))
def test_read_strided_and_broadcast_views(backend):
    """The kernels read through strides: sliced queries, transposed values, a stride-0 batch (with
    gradients), and every tensor stored transposed (a non-unit innermost stride)."""
    gen = torch.Generator().manual_seed(4)
    # the views are taken on the device (a copy to another device would make them contiguous)
    query_loc, mem_loc, mem_values, query_sd = to(backend, *(
        torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((2, 40, 6), (1, 30, 3), (2, 24, 30))),
        torch.rand(2, 20, 1, generator=gen, dtype=torch.float64) + 0.5)
    views = [query_loc[:, ::2, 1:4], query_sd, mem_loc.expand(2, 30, 3), mem_values.transpose(1, 2)]
    inputs = [t.requires_grad_() if t.is_leaf else t for t in views]

    def call(q, qs, m, z, name):
        return rk.gaussian_read(q, qs, m, 0.8, z, backend=name)

    out, grads = grads_of(lambda *a: call(*a, backend), inputs)
    ref, ref_grads = grads_of(lambda *a: call(*a, "reference"), inputs)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **GRAD_TOL[torch.float64])
    q, qs, m, ms, z = make_inputs(Case((2,), 9, 70, 3, 20, "per_dim", 2.0), device=device(backend))
    transposed = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, qs, m, ms, z)]
    assert all(t.stride(-1) != 1 for t in transposed)
    torch.testing.assert_close(rk.gaussian_read(*transposed, match_threshold=2.0, backend=backend),
                               rk.gaussian_read(q, qs, m, ms, z, match_threshold=2.0, backend="reference"),
                               **TOL[torch.float64])


@pytest.mark.parametrize("backend", rows(READ))
def test_read_empty_rows_and_empty_memory_are_exact_zeros(backend):
    """A query with no entry within the threshold, and any query of an empty memory, reads zeros
    with zero gradients (over more than one 64-entry tile)."""
    q, qs, m, ms, z = make_inputs(Case((), 20, 70, 2, 4, "per_dim", None), requires_grad=True, seed=2,
                                  device=device(backend))
    far = (q.detach() + 100.0).requires_grad_()
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, match_threshold=1.0, backend=backend), [far, qs, m, ms, z])
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    empty = [t.requires_grad_() for t in to(backend, torch.zeros(0, 2, dtype=torch.float64),
                                             torch.zeros(0, 4, dtype=torch.float64))]
    out, grads = grads_of(lambda a, b, c: rk.gaussian_read(a, 0.5, b, 0.5, c, backend=backend), [q, *empty])
    assert out.shape == (20, 4) and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(grads[0], torch.zeros_like(q))


@pytest.mark.parametrize("backend", rows(READ))
def test_read_partially_masked_rows_ignore_far_entries(backend):
    q, m, z = to(backend, torch.tensor([[0.0, 0.0]], dtype=torch.float64),
                 torch.tensor([[0.5, 0.0], [3.0, 0.0]], dtype=torch.float64),
                 torch.tensor([[1.0], [100.0]], dtype=torch.float64))
    out = rk.gaussian_read(q, 1.0, m, 1.0, z, match_threshold=1.0, backend=backend)
    assert out.item() == pytest.approx(1.0, abs=1e-12)
    out = rk.gaussian_read(q, 1.0, m, 1.0, z, backend=backend)
    assert 1.0 < out.item() < 100.0


@pytest.mark.parametrize("backend", rows(READ))
def test_read_far_entries_underflow_without_nan(backend):
    """Scores far below the max underflow exp() to 0; the read must stay exact and finite."""
    q, m, z = to(backend, torch.zeros(2, 1, dtype=torch.float32), torch.tensor([[0.0], [1e4], [-1e4]]),
                 torch.tensor([[2.0], [5.0], [7.0]]))
    assert torch.equal(rk.gaussian_read(q, 0.1, m, 0.1, z, backend=backend).cpu(), torch.full((2, 1), 2.0))


@pytest.mark.parametrize("backend", rows(READ))
def test_read_gradcheck_float64(backend):
    """Finite differences agree with the backward (run twice: gradcheck's reentrancy check), with
    batch rows and a threshold, and with σ given as numbers (no σ gradients)."""
    # the interpreter runs the forward once per perturbed element: fewer queries and entries there
    # (still a batch, a threshold and d = 3, not a power of two: the kernels pad d to a block), and
    # gradcheck's fast mode (the Jacobian along random directions, not element by element: 23 s of
    # the interpreter's time per run otherwise); the backward's every element is checked against
    # the reference's gradients in test_read_matches_reference
    interp = interpreted(backend)
    case = Case((2,), 2, 3, 3, 2, "per_dim", 2.0) if interp else Case((2,), 4, 6, 3, 3, "per_dim", 2.0)
    inputs = make_inputs(case, requires_grad=True, seed=5, device=device(backend))
    assert torch.autograd.gradcheck(lambda *a: rk.gaussian_read(*a, match_threshold=2.0, backend=backend), inputs,
                                    fast_mode=interp)
    q, qs, m, ms, z = make_inputs(Case((), 3, 5, 2, 2, "float", None), requires_grad=True, seed=6,
                                  device=device(backend))
    assert torch.autograd.gradcheck(lambda a, b, c: rk.gaussian_read(a, qs, b, ms, c, backend=backend), (q, m, z),
                                    fast_mode=interp)


@pytest.mark.parametrize("backend", rows(READ, fused=True, backends=ON_GPU))
def test_read_holds_no_query_by_memory_buffer(backend):
    Q, M, E = 4096, 8192, 64
    q, qs, m, ms, z = make_inputs(Case((), Q, M, 2, E, "per_dim", None), dtype=torch.float32, device=device(backend),
                                  requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = rk.gaussian_read(q, qs, m, ms, z, backend=backend)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # Inputs-sized buffers only: a Q×M float32 matrix alone would be 128 MiB.
    assert extra < Q * M * 4 / 8, f"peak extra memory {extra / 2**20:.1f} MiB suggests a Q×M buffer"


# ---- leave_one_out and prune_mask ----------------------------------------------------------------

# The Triton interpreter runs one program at a time: a few small cases pin it to the reference.
INTERPRETER_LOO_CASES = {"b2_Q17_M33_d2_E16_per_dim_t0.05", "b2x3_Q6_M11_d5_E7_per_entry_t1.5",
                         "-_Q1_M13_d2_E5_per_entry_t1.0", "-_Q9_M0_d2_E4_float_tNone", "b2_Q10_M65_d4_E33_float_t2.0"}


def loo_cases(backend):
    cases = awkward_cases(full=False)
    return [c for c in cases if not interpreted(backend) or str(c) in INTERPRETER_LOO_CASES]


@pytest.mark.parametrize("backend,case,dtype", rows("leave_one_out", fused=True, cases=loo_cases, dtype=DTYPES))
def test_leave_one_out_matches_reference(backend, case, dtype):
    mem = memory_of(case, dtype, device=device(backend))
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


@pytest.mark.parametrize("backend,case,dtype", rows("prune_mask", fused=True, cases=lambda _: prune_cases(),
                                                    dtype=DTYPES))
def test_prune_mask_matches_reference(backend, case, dtype):
    mem = memory_of(case, dtype, seed=5, device=device(backend))
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


@pytest.mark.parametrize("backend", rows("prune_mask"))
def test_prune_mask_batch_rows_prune_different_counts(backend):
    gen = torch.Generator().manual_seed(2)
    loc = torch.randn(3, 50, 2, generator=gen, dtype=torch.float64)
    loc[1] *= 0.2  # a crowded row prunes more than a sparse one
    loc[2] *= 4.0
    z = torch.randn(1, 50, 3, generator=gen, dtype=torch.float64) * 0.1
    loc, z = to(backend, loc, z)
    kw = dict(max_error=0.1, match_threshold=1.0)
    got = rk.prune_mask(loc, 0.4, z, backend=backend, **kw)
    assert torch.equal(got, rk.prune_mask(loc, 0.4, z, backend="reference", **kw))
    counts = got.sum(-1).tolist()
    assert len(set(counts)) == 3, counts
    # Row by row on its own gives the same keep: rows do not see each other's 1/M or survivors.
    for b in range(3):
        assert torch.equal(rk.prune_mask(loc[b], 0.4, z[0], backend=backend, **kw), got[b])


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


@pytest.mark.parametrize("backend", rows("prune_mask"))
def test_ties_in_error_are_broken_by_index_and_isolated_entries_stay(backend):
    loc, values = to(backend, *tied_memory(torch.float64))
    estimate, error, num_dependencies = rk.leave_one_out(loc, 0.1, values, match_threshold=1.0, backend=backend)
    estimate, error, num_dependencies = estimate.cpu(), error.cpu(), num_dependencies.cpu()
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
    assert torch.equal(keep.cpu(), expected)
    assert torch.equal(rk.prune_mask(loc, 0.1, values, max_error=100.0, match_threshold=1.0, backend=backend), keep)


@pytest.mark.parametrize("backend", rows("prune_mask"))
def test_leave_one_out_and_prune_mask_of_one_and_two_entries(backend):
    one_loc, z = to(backend, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    estimate, error, num_dependencies = rk.leave_one_out(one_loc, 1.0, z, backend=backend)
    assert torch.equal(estimate, torch.zeros_like(z))
    assert float(error[0]) == 5.0 and int(num_dependencies[0]) == 0
    assert rk.prune_mask(one_loc, 1.0, z, max_error=1e9, backend=backend).tolist() == [True]
    # Two entries read each other (w = 1 > 1/2): equal errors, the higher index is pruned.
    loc, z = to(backend, torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=torch.float64),
                torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    estimate, error, num_dependencies = rk.leave_one_out(loc, 1.0, z, backend=backend)
    assert torch.equal(estimate, z.flip(0))
    assert num_dependencies.tolist() == [1, 1]
    assert float(error[0]) == float(error[1]) == pytest.approx(math.sqrt(2))
    assert rk.prune_mask(loc, 1.0, z, max_error=2.0, backend=backend).tolist() == [True, False]
    # Below max_error only: an error of √2 is not pruned at max_error √2.
    assert rk.prune_mask(loc, 1.0, z, max_error=1.0, backend=backend).all()


@pytest.mark.parametrize("backend", rows("prune_mask"))
def test_prune_mask_max_steps_bounds_the_steps(backend):
    gen = torch.Generator().manual_seed(6)
    loc = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    z = torch.randn(60, 2, generator=gen, dtype=torch.float64) * 0.05
    loc, z = to(backend, loc, z)
    kw = dict(max_error=1.0, match_threshold=1.5, backend=backend)
    assert rk.prune_mask(loc, 0.3, z, max_steps=0, **kw).all()
    one = rk.prune_mask(loc, 0.3, z, max_steps=1, **kw)
    many = rk.prune_mask(loc, 0.3, z, max_steps=10, **kw)
    _, error, _, deps = rk.reference.leave_one_out(loc, torch.tensor(0.09, dtype=torch.float64, device=loc.device), z,
                                                   1.5)
    assert torch.equal(~one, rk.reference.prune_candidates(error, deps, 1.0))
    assert int(many.sum()) < int(one.sum()) < 60 and not (many & ~one).any()


@pytest.mark.parametrize("backend", rows("leave_one_out", fused=True))
def test_leave_one_out_batch_broadcast_and_thresholds_that_isolate_everything(backend):
    gen = torch.Generator().manual_seed(8)
    loc = torch.randn(1, 30, 2, generator=gen, dtype=torch.float64)  # one layout, three value sets
    sd = torch.rand(30, 1, generator=gen, dtype=torch.float64) + 0.3
    z = torch.randn(3, 30, 4, generator=gen, dtype=torch.float64) * torch.tensor([0.05, 0.5, 2.0]).view(3, 1, 1)
    loc, sd, z = to(backend, loc, sd, z)
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


@pytest.mark.parametrize("backend", rows("prune_mask", fused=True, backends=[b for b in FUSED if not interpreted(b)]))
def test_prune_mask_of_the_notebook_field(backend):
    """design.md §3's case at its size (1024 entries; too large for the interpreter): the same keep
    as the reference (test_reference.py checks what that keep does to the read)."""
    loc, values, *_ = notebook_memory()
    loc, values = to(backend, loc, values)
    keep = rk.prune_mask(loc, 10.0, values, backend=backend, **NOTEBOOK_PRUNE)
    assert torch.equal(keep.cpu(), notebook_reference_keep())


# ---- conditional_probs and conditional_sample ----------------------------------------------------

def probs_kwargs(case, with_location):
    kw = dict(temperature=0.7, match_threshold=case.threshold)
    if with_location:
        kw["location_temperature"] = 1.3
    return kw


def call_probs(inputs, with_location, backend, **kw):
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = inputs
    loc = dict(search_loc=query_loc, search_sd=query_sd) if with_location else {}
    return rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend=backend, **loc, **kw)


def sample_cases(backend):
    """The awkward cases with entries (the smallest under the interpreter); on a GPU also memories
    of several 256-entry tiles."""
    cases = [c for c in awkward_cases(full=False) if c.M > 0]
    if interpreted(backend):
        return [c for c in cases if c.Q * c.M * max(c.E, 8) <= 2000]
    return cases + SAMPLE_TILED if on_gpu(backend) else cases


@pytest.mark.parametrize("backend,case,dtype,with_location",
                         rows("conditional_probs", fused=True, cases=sample_cases, dtype=DTYPES,
                              with_location=LOCATION))
def test_probs_match_reference(backend, case, dtype, with_location):
    inputs = sample_inputs(case, dtype, device=device(backend))
    kw = probs_kwargs(case, with_location)
    want = call_probs(inputs, with_location, "reference", **kw)
    got = call_probs(inputs, with_location, backend, **kw)
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), **TOL[dtype])


def draw_cases(backend):
    """batch (2,), Q 17, M 33, threshold 0.05: most rows fall back to the drive term; on a GPU also
    memories of several tiles."""
    fallback = next(c for c in awkward_cases(full=False) if c.batch == (2,) and c.threshold == 0.05)
    return [fallback, *(SAMPLE_TILED if on_gpu(backend) else [])]


@pytest.mark.parametrize("backend,case,dtype,with_location",
                         rows("conditional_sample", fused=True, cases=draw_cases, dtype=DTYPES,
                              with_location=LOCATION))
def test_same_seed_same_draws_as_reference(backend, case, dtype, with_location):
    """Every backend turns the generator's uniforms into entries by the same inverse CDF, and never
    draws an entry of probability zero."""
    inputs = sample_inputs(case, dtype, device=device(backend))
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = inputs
    loc = dict(search_loc=query_loc, search_sd=query_sd) if with_location else {}
    # more draws than a GPU block's 256 threads: each thread draws several uniforms
    num_samples = 300 if on_gpu(backend) else 64
    kw = dict(num_samples=num_samples, sigma_scale=0.0, **probs_kwargs(case, with_location), **loc)
    # both on the backend's device: the same generator there gives both the same uniforms
    draws = {b: rk.conditional_sample(mem_loc, mem_sd, mem_values, key, backend=b, generator=generator(backend, 1),
                                      **kw) for b in ("reference", backend)}
    got, want = draws[backend], draws["reference"]
    assert got.shape == want.shape == (*case.batch, case.Q, num_samples, case.d)
    assert (got == want).all(-1).double().mean() > 0.999  # only a uniform within rounding of a bin edge may differ
    # sigma_scale 0: every draw is the location of an entry, which must have a positive probability
    probs = call_probs(inputs, with_location, "reference", **probs_kwargs(case, with_location))
    entry = (got.unsqueeze(-2) == mem_loc[..., None, None, :, :]).all(-1).double().argmax(-1)  # (.., Q, S)
    assert bool((probs.gather(-1, entry) > 0).all())


@pytest.mark.parametrize("backend", rows("conditional_sample"))
def test_draw_frequencies_match_probs(backend):
    args, kw = chi_square_setup(device=device(backend))
    mem_loc = args[0]
    N = 20_000
    probs = rk.conditional_probs(*args, backend="reference", **kw).double().cpu()
    assert 0 < int((probs[0] == 0).sum()) < 11  # the location row has masked entries
    samples = rk.conditional_sample(*args, num_samples=N, sigma_scale=0.0, backend=backend,
                                    generator=generator(backend, 11), **kw)
    assert samples.shape == (2, N, 2)
    # sigma_scale = 0: every sample is exactly an entry's location; recover which
    hits = (samples.unsqueeze(-2) == mem_loc).all(-1).cpu()  # (Q, N, M)
    assert bool((hits.sum(-1) == 1).all())
    for q in range(2):
        counts = hits[q].sum(0).double()
        expected = probs[q] * N
        assert float(counts[expected == 0].sum()) == 0, "drew an entry of probability zero"
        # merge the bins expected to get < 5 draws into one
        small = expected < 5
        obs = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)]) if small.any() else counts
        exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)]) if small.any() else expected
        keep = exp > 0
        result = stats.chisquare(obs[keep].numpy(), exp[keep].numpy() * float(obs[keep].sum() / exp[keep].sum()))
        assert result.pvalue > 1e-3, (q, counts, expected)


@pytest.mark.parametrize("backend", rows("conditional_sample"))
def test_seeded_draws_are_reproducible(backend):
    args, kw = chi_square_setup(torch.float64, device=device(backend))

    def draw(seed):
        return rk.conditional_sample(*args, num_samples=300, backend=backend, generator=generator(backend, seed),
                                     **kw)

    first, again, other = draw(5), draw(5), draw(6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.manual_seed(3)
    a = rk.conditional_sample(*args, num_samples=10, backend=backend, **kw)
    torch.manual_seed(3)
    assert torch.equal(a, rk.conditional_sample(*args, num_samples=10, backend=backend, **kw))


@pytest.mark.parametrize("backend,sigma_scale", rows("conditional_sample", sigma_scale=[0.5, 2.0]))
def test_jitter_is_sigma_scaled_normal(backend, sigma_scale):
    """(sample − ℓ_t) / σ_t has mean 0 and standard deviation sigma_scale in every dimension."""
    gen = torch.Generator().manual_seed(2)
    M, d, E, N = 5, 3, 4, 20_000
    mem_loc = torch.arange(M, dtype=torch.float64)[:, None].expand(M, d) * 1000.0  # far apart: the entry is the nearest
    mem_sd = torch.rand(M, d, generator=gen, dtype=torch.float64) * 2 + 0.5
    mem_values = torch.randn(M, E, generator=gen, dtype=torch.float64)
    key = torch.randn(E, generator=gen, dtype=torch.float64)
    mem_loc, mem_sd, mem_values, key = to(backend, mem_loc, mem_sd, mem_values, key)
    samples = rk.conditional_sample(mem_loc, mem_sd, mem_values, key, num_samples=N, sigma_scale=sigma_scale,
                                    backend=backend, generator=generator(backend, 4))
    assert samples.shape == (N, d)
    entry = (samples[:, None, :] - mem_loc).norm(dim=-1).argmin(-1)
    z = (samples - mem_loc[entry]) / mem_sd[entry]
    assert z.mean(0).abs().max() < 4 * sigma_scale / math.sqrt(N)
    torch.testing.assert_close(z.std(0), torch.full((d,), sigma_scale, dtype=torch.float64, device=z.device),
                               rtol=0.03, atol=0)


@pytest.mark.parametrize("backend", rows("conditional_sample"))
def test_jitter_is_pathwise_differentiable(backend):
    args, kw = chi_square_setup(torch.float64, device=device(backend))
    mem_loc = args[0].clone().requires_grad_()
    samples = rk.conditional_sample(mem_loc, *args[1:], num_samples=500, backend=backend, sigma_scale=1e-3,
                                    generator=generator(backend, 0), **kw)
    samples.sum().backward()
    counts = (samples.detach().unsqueeze(-2) - mem_loc.detach()).norm(dim=-1).argmin(-1).flatten().bincount(
        minlength=mem_loc.shape[0])
    # sigma_scale σ ε does not depend on mem_loc: each draw of entry t adds 1 to its gradient
    torch.testing.assert_close(mem_loc.grad, counts.double()[:, None].expand_as(mem_loc))


@pytest.mark.parametrize("backend", rows("conditional_probs"))
def test_all_masked_query_falls_back_to_drive_term(backend):
    (mem_loc, mem_sd, mem_values, key), _ = chi_square_setup(torch.float64, device=device(backend))
    far = torch.full((2, 2), 1e3, dtype=torch.float64, device=device(backend))
    masked = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, search_loc=far, search_sd=1.0,
                                  match_threshold=0.0, backend=backend)
    drive_only = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend=backend)
    torch.testing.assert_close(masked, drive_only)
    torch.testing.assert_close(drive_only, torch.softmax(key @ mem_values.T / math.sqrt(key.shape[-1]), -1))


@pytest.mark.parametrize("backend", rows("conditional_sample"))
def test_sampling_shapes_and_batch_broadcast(backend):
    gen = torch.Generator().manual_seed(9)
    mem_loc, mem_values, keys = to(backend, torch.randn(1, 7, 2, generator=gen), torch.randn(1, 7, 3, generator=gen),
                                   torch.randn(4, 5, 3, generator=gen))
    out = rk.conditional_sample(mem_loc, 0.5, mem_values, keys, num_samples=6, backend=backend)
    assert out.shape == (4, 5, 6, 2)
    single = rk.conditional_sample(mem_loc[0], 0.5, mem_values[0], keys[0, 0], num_samples=6, backend=backend)
    assert single.shape == (6, 2)
    # one key, several search locations: a Q axis appears
    locs = rk.conditional_probs(mem_loc[0], 0.5, mem_values[0], keys[0, 0], search_loc=mem_loc.new_zeros(3, 2),
                                search_sd=1.0, backend=backend)
    assert locs.shape == (3, 7)
    # batch rows broadcast against the shared memory: row r equals a call with row r alone
    probs = rk.conditional_probs(mem_loc, 0.5, mem_values, keys, backend=backend)
    torch.testing.assert_close(probs[2], rk.conditional_probs(mem_loc[0], 0.5, mem_values[0], keys[2],
                                                              backend="reference"), **TOL[torch.float32])


@pytest.mark.parametrize("backend", rows("conditional_probs", fused=True))
def test_probs_of_strided_and_broadcast_views(backend):
    """Every tensor stored transposed (a non-unit innermost stride), and one memory (batch dim 1)
    against a batch of keys."""
    case = Case((2,), 9, 40 if interpreted(backend) else 300, 3, 40, "per_dim", 2.0)
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = sample_inputs(case, torch.float64,
                                                                            device=device(backend))
    nc = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (mem_loc, mem_sd, mem_values, key, query_loc,
                                                                       query_sd)]
    assert all(t.stride(-1) != 1 for t in nc)
    kw = dict(match_threshold=2.0)
    want = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, search_loc=query_loc, search_sd=query_sd,
                                backend="reference", **kw)
    got = rk.conditional_probs(*nc[:4], search_loc=nc[4], search_sd=nc[5], backend=backend, **kw)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    probs = rk.conditional_probs(mem_loc[:1], mem_sd[:1], mem_values[:1], key, backend=backend)
    torch.testing.assert_close(probs, rk.conditional_probs(mem_loc[:1], mem_sd[:1], mem_values[:1], key,
                                                           backend="reference"), **TOL[torch.float64])
