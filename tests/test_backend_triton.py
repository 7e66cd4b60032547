"""What only the triton backend has: allow_tf32 (its plumbing, and TF32 accuracy on a GPU), the
interpreter's refusal of bfloat16, and its reason when neither a GPU nor the interpreter is there.
Its correctness against the reference is tests/test_ops.py's."""
import pytest
import torch

import resonant_kernels as rk
from backends import device, requires
from cases import Case, check_read_against_reference, clone_inputs, grads_of, make_inputs
from resonant_kernels import _registry

READ = "gaussian_read"


@requires("triton", READ)
def test_allow_tf32_reaches_both_kernels(monkeypatch):
    backend = "triton"
    seen = []

    def spy(kernel, tag):
        fn = _registry.implementation(kernel, backend)

        def wrapped(*args):
            seen.append((tag, args[-1]))  # allow_tf32, the kernels' last argument
            return fn(*args)
        monkeypatch.setitem(_registry._IMPLS, (kernel, backend), wrapped)

    spy("read_forward", "forward")
    spy("read_backward", "backward")
    inputs = make_inputs(Case((), 4, 6, 2, 3, "per_dim", None), dtype=torch.float32, requires_grad=True,
                         device=device(backend))
    grads_of(lambda *a: rk.gaussian_read(*a, backend=backend, allow_tf32=True), inputs)
    grads_of(lambda *a: rk.gaussian_read(*a, backend=backend), clone_inputs(inputs))
    assert seen == [("forward", True), ("backward", True), ("forward", False), ("backward", False)]


@requires("triton", READ, where="gpu")
def test_tf32_close_to_reference():
    backend = "triton"
    case = Case((), 1000, 2048, 2, 256, "per_dim", None)
    # TF32 keeps 10 mantissa bits: the float32 contract loosens to about 1e-3 relative.
    check_read_against_reference(backend, case, torch.float32, device=device(backend), allow_tf32=True,
                                 tol=dict(rtol=5e-3, atol=5e-3), grad_tol=dict(rtol=2e-2, atol=2e-2))


@requires("triton", READ, where="interpreter")
def test_interpreter_refuses_bfloat16_with_reason():
    q, qs, m, ms, z = make_inputs(Case((), 3, 4, 2, 5, "float", None), dtype=torch.float32,
                                  value_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        rk.gaussian_read(q, qs, m, ms, z, backend="triton")


@requires("triton", needs="module")
def test_unusable_on_cpu_without_interpreter_and_says_why(monkeypatch):
    """A machine without a GPU, outside the interpreter (run anywhere: no CUDA device is visible)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = {r.name: r for r in rk.backends(print_table=False)}
    assert not rows["triton"].usable and "TRITON_INTERPRET=1" in rows["triton"].reason
    q, qs, m, ms, z = make_inputs(Case((), 2, 3, 2, 2, "float", None), dtype=torch.float32)
    with pytest.raises(ValueError, match="no CUDA device"):
        rk.gaussian_read(q, qs, m, ms, z, backend="triton")
    assert _registry.select("gaussian_read", "auto", torch.device("cpu"), torch.float32) == "cpu"
