"""_registry.run_kernel: a kernel's custom op runs where something needs it (autograd, dispatch
modes, tensor subclasses, functorch, torch.compile: tests/test_compile.py), its body directly
otherwise; either way every op gives the same bits."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import resonant_kernels as rk
from backends import skip_unless_usable
from cases import OP_CALLS, op_inputs
from resonant_kernels import _registry, loo, read, sample

KERNEL_OPS = (read.read_forward, read.read_backward, loo.loo_errors, loo.loo_dependencies, sample.sample_probs,
              sample.sample_indices)


@pytest.fixture
def bodies_called(monkeypatch):
    """The kernels whose body run_kernel called directly (the custom op calls the function it was
    made from, not this attribute)."""
    called = []
    for op in KERNEL_OPS:
        body = op._init_fn

        def counted(*args, _body=body, _name=op._name):
            called.append(_name)
            return _body(*args)
        monkeypatch.setattr(op, "_init_fn", counted)
    return called


class PassThrough(TorchDispatchMode):
    """A dispatch mode that runs every op as is (and so makes every kernel call go through its custom op)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _detached(*tensors):
    return [t.detach() for t in tensors]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("op", sorted(OP_CALLS))
def test_the_body_and_the_custom_op_give_the_same_bits(op, backend, bodies_called):
    skip_unless_usable(backend, op)
    q, m, z, key = _detached(*op_inputs())
    call = lambda: OP_CALLS[op](q, m, z, key, backend)  # noqa: E731
    torch.manual_seed(0)
    direct = call()
    assert bodies_called, "a plain eager call ran its kernels' bodies directly"
    bodies_called.clear()
    torch.manual_seed(0)
    with PassThrough() as mode:
        through_op = call()
    assert not bodies_called
    assert any(name.startswith("resonant_kernels.") for name in mode.ops), mode.ops  # the mode saw the custom op
    for a, b in zip(direct if isinstance(direct, tuple) else (direct,),
                    through_op if isinstance(through_op, tuple) else (through_op,)):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a[~a.isnan()], b[~b.isnan()]))


def test_a_call_without_autograd_or_modes_skips_the_dispatch():
    q, m, z, _ = op_inputs()
    plain = _detached(q, m, z)
    assert not _registry.custom_op_needed(plain)
    assert not _registry.custom_op_needed([torch.nn.Parameter(t, requires_grad=False) for t in plain])
    with torch.no_grad():
        assert not _registry.custom_op_needed((q, m, z))  # they require grad, but nothing records
    with torch.inference_mode():
        assert not _registry.custom_op_needed(plain)


def test_autograd_modes_subclasses_and_vmap_get_the_custom_op():
    q, m, z, _ = op_inputs()
    assert _registry.custom_op_needed((q.detach(), m, 1.0, "cpu"))  # m requires grad, grad mode on
    plain = _detached(q, m, z)
    with PassThrough():
        assert _registry.custom_op_needed(plain)

    class Sub(torch.Tensor):
        pass

    assert _registry.custom_op_needed([plain[0].as_subclass(Sub), *plain[1:]])
    seen = []
    torch.vmap(lambda row: (seen.append(_registry.custom_op_needed([row])), row.sum())[1])(plain[0])
    assert seen == [True]


def test_a_read_that_needs_gradients_runs_its_forward_custom_op(bodies_called):
    q, m, z, _ = op_inputs()
    rk.gaussian_read(q, 0.7, m, 0.5, z, backend="cpu").sum().backward()
    # the forward through the op (autograd records it); its backward, under no_grad, calls the body
    assert bodies_called == ["read_backward"]
    assert q.grad is not None and m.grad is not None and z.grad is not None


def test_a_torch_without_the_body_attribute_runs_the_op():
    calls = []

    class OpWithoutBody:
        def __call__(self, *args):
            calls.append(args)
            return "op"

    assert _registry.run_kernel(OpWithoutBody(), torch.zeros(1)) == "op" and len(calls) == 1
