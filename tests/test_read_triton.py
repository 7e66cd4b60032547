"""backend="triton" for gaussian_read against the reference.

Without CUDA the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): small shapes only, it is slow. With a GPU the `gpu`-marked suite runs the full
awkward-shape suite plus larger, multi-tile shapes and the half-precision values on CUDA tensors.
"""
import pytest
import torch

pytest.importorskip("triton")

import resonant_kernels as rk  # noqa: E402
from resonant_kernels import _registry as _backends, read  # noqa: E402
from cases import (Case, GRAD_TOL, TOL, awkward_cases, batch_broadcast_inputs, check_read_against_reference,  # noqa: E402
                   clone_inputs, grads_of, make_inputs)

HAS_CUDA = torch.cuda.is_available()
interpreted = pytest.mark.skipif(not _backends.triton_interpreting(),
                                 reason="needs TRITON_INTERPRET=1 (set by conftest.py when no CUDA device exists)")
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: the full-size Triton suite needs a GPU")

# Several query/entry tiles and (interpreter BLOCK_E = 64) several value blocks, whose partial
# location/variance gradients must add up; the uniform-variance fast path; a tight threshold.
MULTI_TILE = [
    Case((), 70, 100, 2, 150, "per_dim", 2.0),
    Case((2,), 33, 65, 3, 65, "float", None),
    Case((), 40, 50, 2, 20, "per_entry", 0.3),
]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def half_value_check(device, value_dtype, case, seed=0, **read_kwargs):
    """Half-precision values against the reference on the same values in float32: outputs and
    gradients agree to half-precision accuracy, relative to each tensor's scale."""
    q, qs, m, ms, z = make_inputs(case, dtype=torch.float32, value_dtype=value_dtype, seed=seed, device=device)
    inputs = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in (q, qs, m, ms, z)]
    ref_inputs = clone_inputs(inputs)
    ref_inputs[4] = ref_inputs[4].detach().float().requires_grad_()
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="triton", **read_kwargs), inputs)
    ref, ref_grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="reference"), ref_inputs)
    assert out.dtype == value_dtype
    scale = ref.detach().abs().max()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2 * float(scale))
    for name, g, rg in zip(["query_loc", "query_sd", "mem_loc", "mem_sd", "mem_values"], grads, ref_grads):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.float(), rg, rtol=0, atol=3e-2 * float(rg.abs().max()) + 1e-6,
                                   msg=lambda msg: f"grad {name}: {msg}")


# ---- interpreted on CPU (CI) ------------------------------------------------------------------

@interpreted
@DTYPES
@pytest.mark.parametrize("case", awkward_cases(full=False) + MULTI_TILE, ids=str)
def test_triton_matches_reference(case, dtype):
    check_read_against_reference("triton", case, dtype)


@interpreted
def test_float16_values_accumulate_in_float32():
    half_value_check("cpu", torch.float16, MULTI_TILE[0])


@interpreted
def test_interpreter_refuses_bfloat16_with_reason():
    q, qs, m, ms, z = make_inputs(Case((), 3, 4, 2, 5, "float", None), dtype=torch.float32,
                                  value_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        rk.gaussian_read(q, qs, m, ms, z, backend="triton")


@interpreted
def test_empty_rows_and_empty_memory_read_exact_zeros():
    q, qs, m, ms, z = make_inputs(Case((), 5, 8, 2, 4, "per_dim", None), requires_grad=True, seed=2)
    far = (q.detach() + 100.0).requires_grad_()
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, match_threshold=1.0, backend="triton"), [far, qs, m, ms, z])
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    empty = [torch.zeros(0, 2, dtype=torch.float64, requires_grad=True),
             torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)]
    out, grads = grads_of(lambda a, b, c: rk.gaussian_read(a, 0.5, b, 0.5, c, backend="triton"), [q, *empty])
    assert out.shape == (5, 4) and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(grads[0], torch.zeros_like(q))


@interpreted
def test_far_entries_underflow_without_nan():
    q = torch.zeros(2, 1, dtype=torch.float32)
    m = torch.tensor([[0.0], [1e4], [-1e4]], dtype=torch.float32)
    z = torch.tensor([[2.0], [5.0], [7.0]], dtype=torch.float32)
    assert torch.equal(rk.gaussian_read(q, 0.1, m, 0.1, z, backend="triton"), torch.full((2, 1), 2.0))


@interpreted
def test_batch_broadcast_memory():
    inputs = [t.requires_grad_() for t in batch_broadcast_inputs()]
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="triton"), inputs)
    ref, ref_grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="reference"), clone_inputs(inputs))
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for g, rg, t in zip(grads, ref_grads, inputs):
        assert g.shape == t.shape
        torch.testing.assert_close(g, rg, **GRAD_TOL[torch.float64])


@interpreted
def test_strided_and_broadcast_views_match_reference():
    """Kernels read through strides: sliced queries, transposed values, a stride-0 batch."""
    gen = torch.Generator().manual_seed(4)
    query_loc = torch.randn(2, 40, 6, generator=gen, dtype=torch.float64)[:, ::2, 1:4]
    mem_loc = torch.randn(1, 30, 3, generator=gen, dtype=torch.float64).expand(2, 30, 3)
    mem_values = torch.randn(2, 24, 30, generator=gen, dtype=torch.float64).transpose(1, 2)
    query_sd = torch.rand(2, 20, 1, generator=gen, dtype=torch.float64) + 0.5
    inputs = [t.requires_grad_() if t.is_leaf else t for t in (query_loc, query_sd, mem_loc, mem_values)]
    call = lambda q, qs, m, z, backend: rk.gaussian_read(q, qs, m, 0.8, z, backend=backend)  # noqa: E731
    out, grads = grads_of(lambda *a: call(*a, "triton"), inputs)
    ref, ref_grads = grads_of(lambda *a: call(*a, "reference"), inputs)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **GRAD_TOL[torch.float64])


@interpreted
def test_torch_compile_graph():
    q, qs, m, ms, z = make_inputs(Case((), 6, 9, 2, 4, "per_dim", None), dtype=torch.float32)
    fn = torch.compile(lambda *a: rk.gaussian_read(*a, backend="triton"), backend="eager", fullgraph=False)
    torch.testing.assert_close(fn(q, qs, m, ms, z), rk.gaussian_read(q, qs, m, ms, z, backend="reference"))


@interpreted
def test_gradcheck_float64():
    case = Case((2,), 4, 6, 3, 3, "per_dim", 2.0)
    inputs = make_inputs(case, requires_grad=True, seed=5)
    assert torch.autograd.gradcheck(lambda *a: rk.gaussian_read(*a, match_threshold=2.0, backend="triton"), inputs)


@interpreted
def test_opcheck_custom_op():
    q, qs, m, ms, z = make_inputs(Case((2,), 3, 4, 2, 3, "per_dim", 1.5), requires_grad=True)
    torch.library.opcheck(read.read_forward, (q, qs * qs, m, ms * ms, z, 1.5, -1.0, "triton"))


@interpreted
def test_allow_tf32_reaches_both_kernels(monkeypatch):
    seen = []

    def spy(kernel, tag):
        fn = _backends.implementation(kernel, "triton")

        def wrapped(*args):
            seen.append((tag, args[-1]))  # allow_tf32, the kernels' last argument
            return fn(*args)
        monkeypatch.setitem(_backends._IMPLS, (kernel, "triton"), wrapped)

    spy("read_forward", "forward")
    spy("read_backward", "backward")
    inputs = make_inputs(Case((), 4, 6, 2, 3, "per_dim", None), dtype=torch.float32, requires_grad=True)
    grads_of(lambda *a: rk.gaussian_read(*a, backend="triton", allow_tf32=True), inputs)
    grads_of(lambda *a: rk.gaussian_read(*a, backend="triton"), clone_inputs(inputs))
    assert seen == [("forward", True), ("backward", True), ("forward", False), ("backward", False)]


def test_dtype_rules_name_the_argument():
    def why(loc, value):
        return _backends.BACKENDS["triton"].dtype_check("gaussian_read", loc, value)

    assert why(torch.float32, torch.float32) is None and why(torch.float32, torch.float16) is None
    assert why(torch.float64, torch.float64) is None
    assert "mem_values" in why(torch.float64, torch.float32)
    assert "mem_values" in why(torch.float32, torch.float64)
    assert "float32 and float64" in why(torch.float16, torch.float16)


def test_auto_order_prefers_triton_for_cuda_and_cpu_for_cpu():
    if not (HAS_CUDA or _backends.triton_interpreting()):
        pytest.skip("triton backend unusable here (no CUDA, no interpreter)")
    # select() only inspects the device type, so this holds without a GPU too.
    assert _backends.select("gaussian_read", "auto", torch.device("cuda"), torch.float32) == "triton"
    assert _backends.select("gaussian_read", "auto", torch.device("cpu"), torch.float32) == "cpu"


@pytest.mark.skipif(HAS_CUDA, reason="with a CUDA device the triton backend is usable")
def test_unusable_on_cpu_without_interpreter_and_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rows = {r.name: r for r in rk.backends(print_table=False)}
    assert not rows["triton"].usable and "TRITON_INTERPRET=1" in rows["triton"].reason
    q, qs, m, ms, z = make_inputs(Case((), 2, 3, 2, 2, "float", None), dtype=torch.float32)
    with pytest.raises(ValueError, match="no CUDA device"):
        rk.gaussian_read(q, qs, m, ms, z, backend="triton")
    assert _backends.select("gaussian_read", "auto", torch.device("cpu"), torch.float32) == "cpu"


# ---- on a GPU ---------------------------------------------------------------------------------

GPU_CASES = awkward_cases(full=True) + MULTI_TILE + [
    Case((), 1000, 3000, 2, 300, "per_dim", None),
    Case((2,), 513, 2049, 3, 1024, "float", 3.0),
    Case((), 4096, 1024, 2, 64, "per_entry", 0.5),
]


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@DTYPES
def test_gpu_matches_reference(case, dtype):
    check_read_against_reference("triton", case, dtype, device="cuda")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", [MULTI_TILE[0], Case((), 2000, 4096, 2, 1024, "float", None)], ids=str)
def test_gpu_half_values(case, value_dtype):
    half_value_check("cuda", value_dtype, case)


@pytest.mark.gpu
@gpu_only
def test_gpu_tf32_close_to_reference():
    case = Case((), 1000, 2048, 2, 256, "per_dim", None)
    # TF32 keeps 10 mantissa bits: the float32 contract loosens to about 1e-3 relative.
    check_read_against_reference("triton", case, torch.float32, device="cuda", allow_tf32=True,
                                 tol=dict(rtol=5e-3, atol=5e-3), grad_tol=dict(rtol=2e-2, atol=2e-2))


@pytest.mark.gpu
@gpu_only
def test_gpu_no_query_by_memory_buffers():
    Q, M, E = 4096, 8192, 64
    q, qs, m, ms, z = make_inputs(Case((), Q, M, 2, E, "per_dim", None), dtype=torch.float32, device="cuda",
                                  requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = rk.gaussian_read(q, qs, m, ms, z, backend="triton")
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # Inputs-sized buffers only: a Q×M float32 matrix alone would be 128 MiB.
    assert extra < Q * M * 4 / 8, f"peak extra memory {extra / 2**20:.1f} MiB suggests a Q×M buffer"
