"""backend="cuda" (csrc/cuda): against the reference on a GPU; its build and skip logic everywhere.

The shared sampling tests (probabilities, chi-square draws, same draws as the reference, fallback,
shapes) run for cuda in test_sample.py; the cuda-specific sampling cases are here."""
import os
import shutil
import sys

import pytest
import torch

import resonant_kernels as rk
from resonant_kernels import _registry as _backends, sample
from cases import (TOL, Case, awkward_cases, batch_broadcast_inputs, check_read_against_reference, clone_inputs,
                   grads_of, make_inputs, sample_inputs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_REASON = _backends.BACKENDS["cuda"].unavailable_reason()
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda backend unusable: {CUDA_REASON}")

# Cases spanning several query tiles (16), memory tiles (64) and value tiles (64 / 32 in fp64).
TILED = [
    Case((), 40, 200, 2, 70, "per_dim", None),
    Case((2,), 33, 129, 3, 65, "float", 1.5),
    Case((), 17, 300, 9, 33, "per_entry", None),
]


# ---- everywhere (CPU CI) -------------------------------------------------------------------------

def test_backend_table_lists_cuda_with_its_op_and_reason():
    row = next(r for r in rk.backends(print_table=False) if r.name == "cuda")
    # backends/cuda.py registered its kernels without the extension
    assert {"gaussian_read", "conditional_probs", "conditional_sample"} <= set(row.ops)
    if not torch.cuda.is_available():
        assert not row.usable and "CUDA device" in row.reason
    elif CUDA_REASON is not None:
        assert not row.usable and "_C_cuda" in row.reason


@pytest.mark.skipif(CUDA_REASON is None, reason="the cuda backend is usable here")
def test_requesting_unusable_cuda_names_the_reason():
    q, qs, m, ms, z = make_inputs(Case((), 3, 4, 2, 5, "float", None))
    with pytest.raises(ValueError, match="backend 'cuda' cannot run gaussian_read") as err:
        rk.gaussian_read(q, qs, m, ms, z, backend="cuda")
    assert CUDA_REASON in str(err.value)


@pytest.mark.skipif(CUDA_REASON is None, reason="the cuda backend is usable here")
@pytest.mark.parametrize("op", ["conditional_probs", "conditional_sample"])
def test_requesting_unusable_cuda_for_sampling_names_the_reason(op):
    mem_loc, mem_sd, mem_values, key, _, _ = sample_inputs(Case((), 3, 4, 2, 5, "float", None), torch.float32)
    with pytest.raises(ValueError, match=f"backend 'cuda' cannot run {op}") as err:
        getattr(rk, op)(mem_loc, mem_sd, mem_values, key, backend="cuda")
    assert CUDA_REASON in str(err.value)


def test_sampling_dtype_rule():
    """Both sampling ops share one implementation: float32 or float64, values in that dtype."""
    for op in ("conditional_probs", "conditional_sample"):
        def why(loc, value):
            return _backends.BACKENDS["cuda"].dtype_check(op, loc, value)

        for dtype in (torch.float32, torch.float64):
            assert why(dtype, dtype) is None
        assert "mem_values" in why(torch.float32, torch.float16)
        assert "mem_values" in why(torch.float64, torch.float32)
        assert "locations" in why(torch.float16, torch.float16)


def test_dtype_rule():
    f32, f64, f16, bf16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
    def why(loc, value):
        return _backends.BACKENDS["cuda"].dtype_check("gaussian_read", loc, value)

    for loc, val in [(f32, f32), (f32, f16), (f32, bf16), (f64, f64)]:
        assert why(loc, val) is None
    assert "mem_values" in why(f64, f32)
    assert "mem_values" in why(f32, f64)
    assert "locations" in why(f16, f16)


def _build_module():
    sys.path.insert(0, ROOT)
    try:
        from csrc.cuda import build
    finally:
        sys.path.remove(ROOT)
    return build


def test_build_flags_target_ampere_and_hopper_without_fast_math():
    build = _build_module()
    flags = build.gencode_flags("80;90")
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    assert any(f.endswith("code=compute_90") for f in flags)  # PTX for newer GPUs
    assert not any("fast_math" in f or "fast-math" in f for f in build.nvcc_flags())
    sources = build.cuda_sources()
    assert {"csrc/cuda/read.cu", "csrc/cuda/sample.cu"} <= set(sources)
    assert all(os.path.exists(os.path.join(ROOT, s)) for s in sources)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_build_finds_the_cuda_toolkit_of_nvcc():
    build = _build_module()
    home = build.cuda_home()
    assert os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
    assert os.path.isdir(build.cuda_lib_dir(home))


# ---- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", awkward_cases() + TILED, ids=str)
def test_cuda_matches_reference(case, dtype):
    check_read_against_reference("cuda", case, dtype, device="cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("value_dtype, tol", [(torch.float16, 4e-3), (torch.bfloat16, 2e-2)], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", [awkward_cases()[5], awkward_cases()[8]] + TILED, ids=str)
def test_half_values_use_fp32_accumulation(case, value_dtype, tol):
    """Tensor-core P @ V: against the reference on the same (rounded) values held in float32; the
    only extra error is the weights' rounding to the value dtype."""
    inputs = make_inputs(case, dtype=torch.float32, value_dtype=value_dtype, requires_grad=True, device="cuda")
    wide = clone_inputs(inputs)
    wide[4] = inputs[4].detach().float().requires_grad_()
    kw = dict(match_threshold=case.threshold)
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="cuda", **kw), inputs)
    ref, ref_grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="reference", **kw), wide)
    assert out.dtype == value_dtype and grads[-1].dtype == value_dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), rg, rtol=5 * tol, atol=5 * tol)


@pytest.mark.gpu
@needs_cuda
def test_broadcast_and_strided_inputs():
    inputs = [t.cuda().requires_grad_() for t in batch_broadcast_inputs()]  # memory batch dim of 1
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="cuda"), inputs)
    ref, ref_grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="reference"), clone_inputs(inputs))
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)
    # Transposed storage: every tensor has a non-unit innermost stride.
    q, qs, m, ms, z = make_inputs(Case((2,), 9, 70, 3, 20, "per_dim", 2.0), device="cuda")
    nc = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, qs, m, ms, z)]
    assert all(t.stride(-1) != 1 for t in nc)
    torch.testing.assert_close(rk.gaussian_read(*nc, match_threshold=2.0, backend="cuda"),
                               rk.gaussian_read(q, qs, m, ms, z, match_threshold=2.0, backend="reference"))


@pytest.mark.gpu
@needs_cuda
def test_empty_rows_and_memory_read_exact_zeros():
    q, qs, m, ms, z = make_inputs(Case((), 20, 70, 2, 4, "per_dim", None), requires_grad=True, device="cuda")
    far = (q.detach() + 100.0).requires_grad_()
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, match_threshold=1.0, backend="cuda"), [far, qs, m, ms, z])
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    empty_loc = torch.zeros(0, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    empty_val = torch.zeros(0, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    out, grads = grads_of(lambda a, b, c: rk.gaussian_read(a, 0.5, b, 0.5, c, backend="cuda"), [q, empty_loc, empty_val])
    assert out.shape == (20, 4) and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(grads[0], torch.zeros_like(q))


@pytest.mark.gpu
@needs_cuda
def test_runs_on_the_current_stream():
    q, qs, m, ms, z = make_inputs(Case((3,), 50, 500, 2, 256, "per_dim", None), dtype=torch.float32, device="cuda")
    want = rk.gaussian_read(q, qs, m, ms, z, backend="reference")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = rk.gaussian_read(q, qs, m, ms, z, backend="cuda")
    side.synchronize()
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.gpu
@needs_cuda
def test_location_dim_limit_is_a_clear_error():
    q, qs, m, ms, z = make_inputs(Case((), 3, 5, 17, 2, "float", None), device="cuda")
    with pytest.raises(ValueError, match="location dimension d <= 16"):
        rk.gaussian_read(q, qs, m, ms, z, backend="cuda")


@pytest.mark.gpu
@needs_cuda
def test_custom_op_registration_passes_opcheck():
    from resonant_kernels import read

    q, qs, m, ms, z = make_inputs(Case((2,), 5, 70, 2, 9, "per_dim", 1.5), requires_grad=True, device="cuda")
    args = (q, qs * qs, m, ms * ms, z, 1.5, -1.0, "cuda")
    torch.library.opcheck(read.read_forward, [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a
                                              for a in args])


# ---- conditional sampling on a GPU (the shared cases run in test_sample.py) ---------------------

# Memories spanning several 256-entry tiles, values wider than a warp, thresholds that mask most
# entries (and whole rows), every σ layout.
SAMPLE_TILED = [
    Case((), 19, 700, 2, 70, "per_dim", 1.0),
    Case((2,), 5, 1000, 3, 33, "float", None),
    Case((), 9, 513, 1, 300, "per_entry", 0.3),
    Case((3,), 4, 257, 5, 8, "per_dim", 0.05),
]


def _sample_call(inputs, with_location):
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = inputs
    loc = dict(search_loc=query_loc, search_sd=query_sd) if with_location else {}
    return (mem_loc, mem_sd, mem_values, key), loc


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("with_location", [True, False], ids=["loc", "noloc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", SAMPLE_TILED, ids=str)
def test_cuda_sampling_matches_reference_across_tiles(case, dtype, with_location):
    args, loc = _sample_call(sample_inputs(case, dtype, device="cuda"), with_location)
    kw = dict(temperature=0.7, location_temperature=1.3, match_threshold=case.threshold, **loc)
    want = rk.conditional_probs(*args, backend="reference", **kw)
    got = rk.conditional_probs(*args, backend="cuda", **kw)
    torch.testing.assert_close(got, want, **TOL[dtype])
    # S > the block's 256 threads: each thread draws several uniforms
    draws = {b: rk.conditional_sample(*args, num_samples=300, sigma_scale=0.0, backend=b,
                                      generator=torch.Generator(device="cuda").manual_seed(3), **kw)
             for b in ("reference", "cuda")}
    assert (draws["cuda"] == draws["reference"]).all(-1).double().mean() > 0.999
    # every draw is an entry of positive probability
    mem_loc = args[0]
    entry = (draws["cuda"].unsqueeze(-2) == mem_loc[..., None, None, :, :]).all(-1).double().argmax(-1)  # (.., Q, S)
    assert bool((want.gather(-1, entry) > 0).all())


@pytest.mark.gpu
@needs_cuda
def test_cuda_sampling_broadcast_and_strided_inputs():
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = sample_inputs(
        Case((2,), 9, 300, 3, 40, "per_dim", 2.0), torch.float64, device="cuda")
    # transposed storage: every tensor has a non-unit innermost stride
    nc = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (mem_loc, mem_sd, mem_values, key, query_loc,
                                                                       query_sd)]
    assert all(t.stride(-1) != 1 for t in nc)
    kw = dict(match_threshold=2.0)
    want = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, search_loc=query_loc, search_sd=query_sd,
                                backend="reference", **kw)
    got = rk.conditional_probs(*nc[:4], search_loc=nc[4], search_sd=nc[5], backend="cuda", **kw)
    torch.testing.assert_close(got, want)
    # one memory (batch dim 1) against a batch of keys
    probs = rk.conditional_probs(mem_loc[:1], mem_sd[:1], mem_values[:1], key, backend="cuda")
    torch.testing.assert_close(probs, rk.conditional_probs(mem_loc[:1], mem_sd[:1], mem_values[:1], key,
                                                           backend="reference"))


@pytest.mark.gpu
@needs_cuda
def test_cuda_sampling_runs_on_the_current_stream():
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = sample_inputs(
        Case((3,), 50, 2000, 2, 256, "float", None), torch.float32, device="cuda")
    kw = dict(search_loc=query_loc, search_sd=query_sd)
    want = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend="reference", **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend="cuda", **kw)
    side.synchronize()
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.gpu
@needs_cuda
def test_cuda_sampling_location_dim_limit():
    """d > 16 is a clear error with a search location; without one the locations are never read."""
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = sample_inputs(
        Case((), 3, 20, 17, 4, "float", None), torch.float64, device="cuda")
    with pytest.raises(ValueError, match="location dimension d <= 16"):
        rk.conditional_probs(mem_loc, mem_sd, mem_values, key, search_loc=query_loc, search_sd=query_sd,
                             backend="cuda")
    torch.testing.assert_close(rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend="cuda"),
                               rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend="reference"))


@pytest.mark.gpu
@needs_cuda
def test_cuda_sampling_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(0)
    B, Q, M, d, E, S = 2, 3, 300, 2, 5, 4
    tensors = [torch.randn(B, Q, E, generator=gen), torch.randn(B, M, E, generator=gen),
               torch.randn(B, Q, d, generator=gen), torch.rand(B, Q, d, generator=gen) + 0.5,
               torch.randn(B, M, d, generator=gen), torch.rand(B, M, d, generator=gen) + 0.5]
    tensors = [t.cuda() for t in tensors]
    scalars = (0.4, 1.0, 1.5, -1.0, "cuda")
    torch.library.opcheck(sample.sample_probs, (*tensors, *scalars))
    uniforms = torch.rand(B, Q, S, generator=gen, dtype=torch.float64).cuda()
    torch.library.opcheck(sample.sample_indices, (*tensors, uniforms, *scalars))
