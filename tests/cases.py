"""Random inputs of awkward shapes, shared by the tests of every op and backend."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Optional

import torch

import resonant_kernels as rk


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


# Several query/entry tiles and (interpreter BLOCK_E = 64) several value blocks of the Triton read,
# whose partial location/variance gradients must add up; the uniform-variance fast path; a tight threshold.
MULTI_TILE = [
    Case((), 70, 100, 2, 150, "per_dim", 2.0),
    Case((2,), 33, 65, 3, 65, "float", None),
    Case((), 40, 50, 2, 20, "per_entry", 0.3),
]
# Several query tiles (16), memory tiles (64) and value tiles (64 / 32 in fp64) of the CUDA read.
TILED = [
    Case((), 40, 200, 2, 70, "per_dim", None),
    Case((2,), 33, 129, 3, 65, "float", 1.5),
    Case((), 17, 300, 9, 33, "per_entry", None),
]
# Sizes of many GPU tiles (CUDA devices only).
LARGE = [
    Case((), 1000, 3000, 2, 300, "per_dim", None),
    Case((2,), 513, 2049, 3, 1024, "float", 3.0),
    Case((), 4096, 1024, 2, 64, "per_entry", 0.5),
]
LARGE_HALF = Case((), 2000, 4096, 2, 1024, "float", None)
# Conditional sampling on a GPU: memories spanning several 256-entry tiles, values wider than a
# warp, thresholds that mask most entries (and whole rows), every σ layout.
SAMPLE_TILED = [
    Case((), 19, 700, 2, 70, "per_dim", 1.0),
    Case((2,), 5, 1000, 3, 33, "float", None),
    Case((), 9, 513, 1, 300, "per_entry", 0.3),
    Case((3,), 4, 257, 5, 8, "per_dim", 0.05),
]


def prune_cases():
    """Memories (Q unused) for prune_mask: batch rows, thresholds that isolate entries, d up to 8, M of 1 and 2."""
    return [
        Case((3,), 1, 40, 2, 3, "per_entry", None),
        Case((2,), 1, 37, 1, 5, "per_dim", 0.3),
        Case((), 1, 70, 3, 2, "float", 1.0),
        Case((2, 2), 1, 19, 8, 4, "per_dim", None),
        Case((), 1, 2, 2, 3, "float", None),
        Case((), 1, 1, 2, 3, "float", None),
    ]


def memory_of(case: Case, dtype, seed=0, device=None):
    """(mem_loc, mem_sd, mem_values) of the case."""
    _, _, mem_loc, mem_sd, mem_values = make_inputs(case, dtype=dtype, seed=seed, device=device)
    return mem_loc, mem_sd, mem_values


def smooth_field(points, centers, directions, radius=60.0):
    bumps = torch.exp(-((points[:, None, :] - centers[None]) ** 2).sum(-1) / (2 * radius**2))
    return bumps @ directions


def notebook_memory():
    """design.md §3's notebook case with a smooth field in place of the tree-world sensor: 1024
    entries at σ = 10 (loc, values, and the field's centers and directions)."""
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(1024, 2, generator=gen, dtype=torch.float64) * 100
    centers = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 100
    directions = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen, dtype=torch.float64), dim=-1)
    return loc, smooth_field(loc, centers, directions), centers, directions, gen


NOTEBOOK_PRUNE = dict(max_error=0.05, match_threshold=25.0)


@functools.lru_cache(maxsize=1)
def notebook_reference_keep():
    """The reference's prune_mask of notebook_memory() (NOTEBOOK_PRUNE): seconds of M×M maths,
    computed once per session for every test that compares with it."""
    loc, values, *_ = notebook_memory()
    return rk.prune_mask(loc, 10.0, values, backend="reference", **NOTEBOOK_PRUNE)


def chi_square_setup(dtype=torch.float32, device=None):
    """12 distinct entries, two queries: one biased towards a location with a threshold that masks
    some entries, one matching nothing (drive term alone). ((mem_loc, mem_sd, mem_values, key), kwargs)"""
    gen = torch.Generator().manual_seed(7)
    M, d, E = 12, 2, 8
    mem_loc = torch.randn(M, d, generator=gen, dtype=dtype) * 2
    mem_sd = torch.rand(M, d, generator=gen, dtype=dtype) + 0.5
    mem_values = torch.randn(M, E, generator=gen, dtype=dtype)
    key = torch.randn(2, E, generator=gen, dtype=dtype) * 2
    search_loc = torch.stack([mem_loc[3], torch.full((d,), 100.0, dtype=dtype)])
    args = [t.to(device) if device is not None else t for t in (mem_loc, mem_sd, mem_values, key)]
    kw = dict(search_loc=search_loc.to(device) if device is not None else search_loc, search_sd=1.0,
              match_threshold=2.5, temperature=0.5)
    return args, kw


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


def op_inputs(seed=0, device=None):
    """(q, m, z, key) for OP_CALLS: 5 queries, 9 entries in 2 dims, 3 values; q, m, z require grad."""
    gen = torch.Generator().manual_seed(seed)
    q, m, z, key = (torch.randn(*shape, generator=gen) for shape in ((5, 2), (9, 2), (9, 3), (5, 3)))
    q, m, z, key = (t.to(device) if device is not None else t for t in (q, m, z, key))
    return q.requires_grad_(), m.requires_grad_(), z.requires_grad_(), key


# One small call of each public op: OP_CALLS[op](q, m, z, key, backend) with op_inputs' tensors.
OP_CALLS = {
    "gaussian_read": lambda q, m, z, key, b: rk.gaussian_read(q, 0.7, m, 0.5, z, match_threshold=2.0, backend=b),
    "leave_one_out": lambda q, m, z, key, b: rk.leave_one_out(m, 0.5, z, match_threshold=2.0, backend=b),
    "prune_mask": lambda q, m, z, key, b: rk.prune_mask(m, 0.5, z, max_error=1.0, max_steps=3, backend=b),
    "conditional_probs": lambda q, m, z, key, b: rk.conditional_probs(m, 0.5, z, key, search_loc=q, search_sd=0.7,
                                                                      match_threshold=2.0, backend=b),
    "conditional_sample": lambda q, m, z, key, b: rk.conditional_sample(
        m, 0.5, z, key, search_loc=q, search_sd=0.7, num_samples=3, sigma_scale=0.0, backend=b),
}
