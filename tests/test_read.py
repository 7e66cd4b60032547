import math

import pytest
import torch

import resonant_kernels as rk
from resonant_kernels import reference
from cases import (Case, awkward_cases, batch_broadcast_inputs, check_read_against_reference, clone_inputs,
                   grads_of, make_inputs)

CASES = awkward_cases()


def naive_density_read(query_loc, query_sd, mem_loc, mem_sd, mem_values):
    """Independent check of the maths: weights from torch.distributions.Normal densities."""
    v = query_sd**2 + mem_sd**2
    logk = torch.distributions.Normal(mem_loc, v.sqrt()).log_prob(query_loc).sum(-1)
    return torch.softmax(logk, -1) @ mem_values


def test_reference_is_the_gaussian_density():
    gen = torch.Generator().manual_seed(0)
    q, m = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(6, 3, generator=gen, dtype=torch.float64)
    qs, ms = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.2, torch.rand(6, 3, generator=gen, dtype=torch.float64) + 0.2
    z = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    logk = reference.log_kernel(q, qs**2, m, ms**2)
    for i in range(4):
        for j in range(6):
            v = qs[i] ** 2 + ms[j] ** 2
            expected = torch.distributions.Normal(m[j], v.sqrt()).log_prob(q[i]).sum()
            assert abs(float(logk[i, j] - expected)) < 1e-12
    want = torch.stack([naive_density_read(q[i], qs[i], m, ms, z) for i in range(4)])
    torch.testing.assert_close(rk.gaussian_read(q, qs, m, ms, z, backend="reference"), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_matches_reference(case, dtype):
    check_read_against_reference("cpu", case, dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_batch_broadcast_memory(backend):
    inputs = [t.requires_grad_() for t in batch_broadcast_inputs()]
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, backend=backend), inputs)
    assert out.shape == (3, 4, 5)
    for row in range(3):
        want = rk.gaussian_read(inputs[0][row].detach(), inputs[1][row].detach(), inputs[2][0].detach(),
                                inputs[3][0].detach(), inputs[4][0].detach(), backend="reference")
        torch.testing.assert_close(out[row].detach(), want)
    for g, t in zip(grads, inputs):
        assert g.shape == t.shape


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    case = Case((2,), 4, 6, 3, 3, "per_dim", 2.0)
    inputs = make_inputs(case, requires_grad=True, seed=5)
    assert torch.autograd.gradcheck(lambda *a: rk.gaussian_read(*a, match_threshold=2.0, backend=backend), inputs)
    floats = Case((), 3, 5, 2, 2, "float", None)
    q, qs, m, ms, z = make_inputs(floats, requires_grad=True, seed=6)
    assert torch.autograd.gradcheck(lambda a, b, c: rk.gaussian_read(a, qs, b, ms, c, backend=backend), (q, m, z))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empty_rows_and_empty_memory_read_exact_zeros(backend):
    q, qs, m, ms, z = make_inputs(Case((), 5, 8, 2, 4, "per_dim", None), requires_grad=True, seed=2)
    far = (q.detach() + 100.0).requires_grad_()
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, match_threshold=1.0, backend=backend), [far, qs, m, ms, z])
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    empty = [torch.zeros(0, 2, dtype=torch.float64, requires_grad=True), torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)]
    out, grads = grads_of(lambda a, b, c: rk.gaussian_read(a, 0.5, b, 0.5, c, backend=backend), [q, *empty])
    assert out.shape == (5, 4) and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(grads[0], torch.zeros_like(q))


def test_partially_masked_rows_ignore_far_entries():
    q = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[0.5, 0.0], [3.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[1.0], [100.0]], dtype=torch.float64)
    for backend in ("reference", "cpu"):
        out = rk.gaussian_read(q, 1.0, m, 1.0, z, match_threshold=1.0, backend=backend)
        assert out.item() == pytest.approx(1.0, abs=1e-12)
        out = rk.gaussian_read(q, 1.0, m, 1.0, z, backend=backend)
        assert 1.0 < out.item() < 100.0


def test_far_entries_underflow_without_nan():
    """Scores far below the max underflow exp() to 0; the read must stay exact and finite."""
    q = torch.zeros(2, 1, dtype=torch.float32)
    m = torch.tensor([[0.0], [1e4], [-1e4]], dtype=torch.float32)
    z = torch.tensor([[2.0], [5.0], [7.0]], dtype=torch.float32)
    for backend in ("reference", "cpu"):
        assert torch.equal(rk.gaussian_read(q, 0.1, m, 0.1, z, backend=backend), torch.full((2, 1), 2.0))


def test_auto_picks_cpu_backend_on_cpu_tensors():
    from resonant_kernels import _registry as _backends

    assert _backends.select("gaussian_read", "auto", torch.device("cpu"), torch.float32) == "cpu"


def test_backends_table(capsys):
    rows = rk.backends()
    assert capsys.readouterr().out == ""  # the REPL shows the returned table once, through its repr
    printed = repr(rows)
    assert printed == str(rows) and printed.splitlines()[0].split() == ["backend", "usable", "ops", "/", "reason"]
    names = {r.name: r for r in rows}
    assert {"reference", "cpu", "triton", "cuda"} <= set(names)
    assert names["cpu"].usable and names["reference"].usable
    if not torch.cuda.is_available():
        assert not names["cuda"].usable and "CUDA" in names["cuda"].reason
    for r in rows:
        assert r.name in printed
        if not r.usable:
            assert r.reason and r.reason in printed


def test_opcheck_custom_op():
    from resonant_kernels import read

    case = Case((2,), 3, 4, 2, 3, "per_dim", 1.5)
    q, qs, m, ms, z = make_inputs(case, requires_grad=True)
    args = (q, qs * qs, m, ms * ms, z, 1.5, -1.0, "cpu")
    torch.library.opcheck(read.read_forward, args)


def test_torch_compile_graph():
    case = Case((), 6, 9, 2, 4, "per_dim", None)
    q, qs, m, ms, z = make_inputs(case, dtype=torch.float32)
    fn = torch.compile(lambda *a: rk.gaussian_read(*a, backend="cpu"), backend="eager", fullgraph=False)
    torch.testing.assert_close(fn(q, qs, m, ms, z), rk.gaussian_read(q, qs, m, ms, z, backend="reference"))
