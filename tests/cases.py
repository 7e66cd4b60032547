"""Random inputs of awkward shapes, shared by the tests of every op and backend."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Case:
    batch: tuple
    Q: int
    M: int
    d: int
    E: int
    sd_kind: str  # "float", "per_dim", "per_entry" (…, N, 1)
    threshold: Optional[float]
    single: bool = False

    def __str__(self):
        b = "x".join(map(str, self.batch)) or "-"
        return f"b{b}_Q{self.Q}{'s' if self.single else ''}_M{self.M}_d{self.d}_E{self.E}_{self.sd_kind}_t{self.threshold}"


def make_sd(kind: str, shape, dtype, gen, value=0.7):
    if kind == "float":
        return value
    if kind == "per_entry":
        shape = (*shape[:-1], 1)
    return (torch.rand(shape, generator=gen, dtype=dtype) * 0.8 + 0.4).to(dtype)


def make_inputs(case: Case, dtype=torch.float64, seed=0, value_dtype=None, requires_grad=False, spread=1.0,
                device=None):
    gen = torch.Generator().manual_seed(seed)
    value_dtype = value_dtype or dtype
    qshape = (*case.batch, case.d) if case.single else (*case.batch, case.Q, case.d)
    query_loc = torch.randn(qshape, generator=gen, dtype=dtype) * spread
    mem_loc = torch.randn((*case.batch, case.M, case.d), generator=gen, dtype=dtype) * spread
    mem_values = torch.randn((*case.batch, case.M, case.E), generator=gen, dtype=dtype).to(value_dtype)
    query_sd = make_sd(case.sd_kind, qshape, dtype, gen, 0.6)
    mem_sd = make_sd(case.sd_kind, mem_loc.shape, dtype, gen, 0.5)
    tensors = [query_loc, query_sd, mem_loc, mem_sd, mem_values]
    if device is not None:
        tensors = [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]
    if requires_grad:
        tensors = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in tensors]
    return tensors


def sample_inputs(case: Case, dtype, seed=0, device=None):
    """(mem_loc, mem_sd, mem_values, search_key, search_loc, search_sd) for conditional sampling; keys
    scaled so the drive term is not flat."""
    query_loc, query_sd, mem_loc, mem_sd, mem_values = make_inputs(case, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    key = torch.randn((*query_loc.shape[:-1], case.E), generator=gen, dtype=dtype) * 2
    tensors = [mem_loc, mem_sd, mem_values, key, query_loc, query_sd]
    return [t.to(device) if device is not None and isinstance(t, torch.Tensor) else t for t in tensors]


def awkward_cases(full: bool = True):
    """Batch dims, Q or M of 1, M = 0, d in 1..8, E up to 300, non-powers-of-two, thresholds that
    empty whole rows (0.05 leaves most queries with nothing), σ as float, per-dim and per-entry."""
    cases = [
        Case((), 1, 1, 1, 1, "float", None),
        Case((), 7, 1, 2, 3, "per_dim", None),
        Case((), 1, 13, 2, 5, "per_entry", 1.0),
        Case((), 9, 0, 2, 4, "float", None),
        Case((3,), 5, 0, 3, 2, "per_dim", 0.5),
        Case((2,), 17, 33, 2, 16, "per_dim", 0.05),
        Case((2, 3), 6, 11, 5, 7, "per_entry", 1.5),
        Case((), 31, 47, 8, 300 if full else 40, "per_dim", None),
        Case((2,), 10, 65, 4, 129 if full else 33, "float", 2.0),
        Case((), 23, 19, 7, 1, "per_dim", 0.0),
        Case((4,), 3, 5, 6, 9, "float", 0.8, single=True),
        Case((), 1, 64, 2, 64, "per_dim", 1.0, single=True),
    ]
    return cases


def batch_broadcast_inputs(dtype=torch.float64, seed=1):
    """Queries with a batch of 3, one memory shared by all rows (batch dim of size 1)."""
    gen = torch.Generator().manual_seed(seed)
    query_loc = torch.randn(3, 4, 2, generator=gen, dtype=dtype)
    mem_loc = torch.randn(1, 6, 2, generator=gen, dtype=dtype)
    mem_values = torch.randn(1, 6, 5, generator=gen, dtype=dtype)
    query_sd = torch.rand(3, 4, 2, generator=gen, dtype=dtype) + 0.5
    mem_sd = torch.rand(1, 6, 1, generator=gen, dtype=dtype) + 0.5
    return [query_loc, query_sd, mem_loc, mem_sd, mem_values]


TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}
GRAD_TOL = {torch.float32: dict(rtol=2e-3, atol=2e-4), torch.float64: dict(rtol=1e-7, atol=1e-9)}


def grads_of(fn, inputs, seed=3):
    """Runs fn(*inputs), backpropagates a fixed random cotangent, returns (output, grads)."""
    out = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, tensors, cot, allow_unused=True) if tensors and out.numel() else []
    return out, [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, tensors)]


def clone_inputs(inputs):
    return [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]


def check_read_against_reference(backend: str, case: Case, dtype, seed=0, value_dtype=None, tol=None, grad_tol=None,
                                 device=None, **read_kwargs):
    """gaussian_read on `backend` equals the reference, forward and every gradient."""
    import resonant_kernels as rk

    inputs = make_inputs(case, dtype=dtype, seed=seed, value_dtype=value_dtype, requires_grad=True, device=device)
    kw = dict(match_threshold=case.threshold)
    ref_out, ref_grads = grads_of(lambda *a: rk.gaussian_read(*a, backend="reference", **kw), clone_inputs(inputs))
    out, grads = grads_of(lambda *a: rk.gaussian_read(*a, backend=backend, **kw, **read_kwargs), clone_inputs(inputs))
    assert out.shape == ref_out.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, **(tol or TOL[dtype]))
    names = [n for n, t in zip(["query_loc", "query_sd", "mem_loc", "mem_sd", "mem_values"], inputs)
             if isinstance(t, torch.Tensor)]
    for name, g, rg in zip(names, grads, ref_grads):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, rg, **(grad_tol or GRAD_TOL[dtype]), msg=lambda m: f"grad {name}: {m}")
    return out
