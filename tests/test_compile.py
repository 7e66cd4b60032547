"""Every op through torch.compile(fullgraph=True), every kernel through torch.library.opcheck, and
the sync-free path (issue #14 point 3).

The default CPU run compiles each op (forward and backward where differentiable) with the
`aot_eager` backend, which captures the whole graph and runs AOTAutograd as inductor would;
gaussian_read also runs through inductor's generated code. The other ops through inductor are
slow-marked (each costs seconds of C++ compilation).
"""
from __future__ import annotations

import pytest
import torch

import resonant_kernels as rk
from backends import DTYPES, IMPLEMENTS, ON_CPU, ON_GPU, device, interpreted, on_gpu, rows, table
from cases import OP_CALLS, op_inputs
from resonant_kernels import loo, read, sample

OPS = OP_CALLS
DIFFERENTIABLE = {"gaussian_read", "conditional_probs"}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run(op, backend, compile_backend=None):
    """The op's output, and the gradients of its sum w.r.t. q, m, z when it is differentiable."""
    q, m, z, key = op_inputs(device=device(backend))
    fn = OPS[op]
    torch.manual_seed(0)  # conditional_sample draws from the default generator
    if compile_backend:
        fn = torch.compile(fn, fullgraph=True, backend=compile_backend)
    out = fn(q, m, z, key, backend)
    grads = None
    if op in DIFFERENTIABLE:
        grads = torch.autograd.grad(_first(out).sum(), (q, m, z), allow_unused=True)
    return out, grads


def _assert_same(a, b):
    a, b = (x if isinstance(x, (tuple, list)) else (x,) for x in (a, b))
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y)


def _compiled_matches_eager(op, backend, compile_backend):
    torch._dynamo.reset()
    eager_out, eager_grads = _run(op, backend)
    out, grads = _run(op, backend, compile_backend)
    if op == "conditional_sample" and compile_backend == "inductor":
        # inductor draws its own random numbers (Philox), so the draws differ from eager ones;
        # with sigma_scale 0 each must still be the location of an entry
        _, m, _, _ = op_inputs(device=device(backend))
        assert out.shape == eager_out.shape
        assert (out.detach().unsqueeze(-2) == m.detach()).all(-1).any(-1).all()
        return
    _assert_same(out, eager_out)
    if grads is not None:
        _assert_same(grads, eager_grads)


@pytest.mark.parametrize("op,backend", table())
def test_fullgraph_compile_of_every_op(op, backend):
    _compiled_matches_eager(op, backend, "aot_eager")


def test_gaussian_read_through_inductor():
    _compiled_matches_eager("gaussian_read", "cpu", "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("op", [op for op in OPS if op != "gaussian_read"])
def test_every_op_through_inductor(op):
    _compiled_matches_eager(op, "cpu", "inductor")


# ---- opcheck: schema, fake (meta) impls, autograd registration, AOT dispatch --------------------

# The kernel each op's opcheck covers (read_backward runs inside read_forward's autograd check).
OPCHECKED = {"gaussian_read": ("read_forward",), "leave_one_out": ("loo_errors", "loo_dependencies"),
             "conditional_probs": ("sample_probs",), "conditional_sample": ("sample_indices",)}
CUSTOM_OPS = {"read_forward": read.read_forward, "loo_errors": loo.loo_errors,
              "loo_dependencies": loo.loo_dependencies, "sample_probs": sample.sample_probs,
              "sample_indices": sample.sample_indices}


def _kernel_args(backend, dtype):
    """The arguments of every kernel `backend` implements, on its device: a batch of 2 and, on a
    GPU, more entries than one tile (64 for the read, 256 for sampling)."""
    gen = torch.Generator().manual_seed(1)
    B, Q, M, d, E, S = 2, 3, 300 if on_gpu(backend) else 9, 2, 4, 5
    where = device(backend)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(where)

    def var(*shape):
        return (torch.rand(*shape, generator=gen, dtype=dtype) + 0.5).to(where)

    qloc, qvar, mloc, mvar, values, key = randn(B, Q, d), var(B, Q, d), randn(B, M, d), var(B, M, d), randn(B, M, E), \
        randn(B, Q, E)
    active = torch.ones(B, M, dtype=torch.uint8, device=where)
    active[1, 2] = 0
    error, lse = loo.loo_errors(mloc, mvar, values, active, 1.5, -1.0, "reference")[1:]
    uniforms = torch.rand(B, Q, S, generator=gen, dtype=torch.float64).to(where)
    scalars = (E ** -0.5, 1.0, 1.5, -1.0, backend)
    args = {
        "read_forward": (qloc, qvar, mloc, mvar, values, 1.5, -1.0, backend),
        "loo_errors": (mloc, mvar, values, active, 1.5, -1.0, backend),
        "loo_dependencies": (mloc, mvar, active, error, lse, 1.5, -1.0, 0.3, backend),
        "sample_probs": (key, values, qloc, qvar, mloc, mvar, *scalars),
        "sample_indices": (key, values, qloc, qvar, mloc, mvar, uniforms, *scalars),
    }
    kernels = [k for op in IMPLEMENTS[backend] for k in OPCHECKED.get(op, ())]
    return {CUSTOM_OPS[k]: args[k] for k in kernels}


# every backend has the read; the interpreter takes float64 only (opcheck runs each kernel a dozen times)
@pytest.mark.parametrize("backend,dtype", [p for p in rows("gaussian_read", dtype=DTYPES)
                                           if not (interpreted(p.values[0]) and p.values[1] == torch.float32)])
def test_every_kernel_passes_opcheck(backend, dtype):
    for kernel, args in _kernel_args(backend, dtype).items():
        differentiable = kernel in (read.read_forward, sample.sample_probs)
        args = [a.detach().requires_grad_(differentiable and a.is_floating_point()) if isinstance(a, torch.Tensor)
                else a for a in args]
        torch.library.opcheck(kernel, args)


# ---- no host reads of tensor data with value checks off (the default on CUDA tensors) ----------

class _NoHostReads:
    """Fails any read of tensor data into Python (item, bool, float, int, tolist): on a GPU each
    would be a device-to-host sync."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def forbid(name):
            def read(*_a, **_k):
                raise AssertionError(f"Tensor.{name} called: a device-to-host sync on a GPU")
            return read

        for n in self.NAMES:
            setattr(torch.Tensor, n, forbid(n))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("op,backend", table([op for op in OPS if op != "prune_mask"], backends=ON_CPU))
def test_validate_false_reads_no_tensor_data(op, backend):
    """What validate=None does on CUDA tensors, checked on CPU: no value check, no uniform-variance
    read of a tensor σ, no unusable-row check reads the data (prune_mask reads one bool per step to
    stop early, its documented exception)."""
    q, m, z, key = op_inputs()
    sd = torch.tensor(0.5)  # a tensor σ: its value must not be read either
    calls = {
        "gaussian_read": lambda: rk.gaussian_read(q, sd, m, sd, z, match_threshold=2.0, backend=backend,
                                                  validate=False),
        "leave_one_out": lambda: rk.leave_one_out(m, sd, z, backend=backend, validate=False),
        "conditional_probs": lambda: rk.conditional_probs(m, sd, z, key, search_loc=q, search_sd=sd,
                                                          backend=backend, validate=False),
        "conditional_sample": lambda: rk.conditional_sample(m, sd, z, key, search_loc=q, search_sd=sd,
                                                            num_samples=2, backend=backend, validate=False),
    }
    want = calls[op]()
    with _NoHostReads():
        got = calls[op]()
    if op != "conditional_sample":
        _assert_same(got, want)


@pytest.mark.parametrize("op,backend", table([op for op in OPS if op != "prune_mask"], fused=True, backends=ON_GPU))
def test_default_path_on_cuda_issues_no_sync(op, backend):
    """Each backend on CUDA tensors (`auto` takes the first of them) with the default validate."""
    q, m, z, key = (t.detach() for t in op_inputs(device=device(backend)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        OPS[op](q, m, z, key, backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
