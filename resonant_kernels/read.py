"""Gaussian-kernel read (design.md §2): ẑ = Σ_t softmax_t(log k(ℓ, ℓ_t)) z_t.

The public entry point is `gaussian_read`. Fused backends run through one custom op pair,
`resonant_kernels::read_forward` / `read_backward`, working on variances with batch dims
flattened to (B, ·, ·); σ → σ² and the batch broadcast stay in autograd-tracked PyTorch, so their
gradients (sums over broadcast dims, 2σ chain rule) come for free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _backends, _cpu, _validate, reference

OP = "gaussian_read"


@dataclass
class ReadImpl:
    """A fused backend's read: forward -> (out, lse); backward -> five gradients (B-shaped)."""

    forward: callable
    backward: callable
    supports_dtypes: Optional[callable] = None


_IMPLS: dict[str, ReadImpl] = {}


def register_impl(backend: str, impl: ReadImpl) -> None:
    _IMPLS[backend] = impl
    _backends.register(backend, OP, impl)


def uniform_variance(query_var: Tensor, mem_var: Tensor) -> float:
    """qv + mv when every variance in the call is the same scalar (fast path), else -1."""
    if query_var.numel() == 1 and mem_var.numel() == 1:
        return float(query_var.detach().reshape(()) + mem_var.detach().reshape(()))
    return -1.0


@torch.library.custom_op("resonant_kernels::read_forward", mutates_args=())
def read_forward(
    query_loc: Tensor, query_var: Tensor, mem_loc: Tensor, mem_var: Tensor, mem_values: Tensor,
    threshold: float, uniform_var: float, backend: str, allow_tf32: bool = False,
) -> tuple[Tensor, Tensor]:
    return _IMPLS[backend].forward(
        query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, allow_tf32=allow_tf32
    )


@read_forward.register_fake
def _(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, backend, allow_tf32=False):
    B, Q, _ = query_loc.shape
    out = mem_values.new_empty((B, Q, mem_values.shape[-1]))
    return out, query_loc.new_empty((B, Q))


@torch.library.custom_op("resonant_kernels::read_backward", mutates_args=())
def read_backward(
    grad_out: Tensor, out: Tensor, lse: Tensor, query_loc: Tensor, query_var: Tensor, mem_loc: Tensor,
    mem_var: Tensor, mem_values: Tensor, threshold: float, uniform_var: float, backend: str, allow_tf32: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _IMPLS[backend].backward(
        grad_out.contiguous(), out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var,
        allow_tf32=allow_tf32,
    )


@read_backward.register_fake
def _(grad_out, out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, backend,
      allow_tf32=False):
    B, Q, d = query_loc.shape
    M, E = mem_values.shape[1:]
    return (
        query_loc.new_empty((B, Q, d)), query_loc.new_empty((B, Q, d)), mem_loc.new_empty((B, M, d)),
        mem_loc.new_empty((B, M, d)), mem_values.new_empty((B, M, E)),
    )


def _setup_context(ctx, inputs, output):
    query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, backend, *allow_tf32 = inputs
    out, lse = output
    ctx.save_for_backward(query_loc, query_var, mem_loc, mem_var, mem_values, out, lse)
    ctx.args = (threshold, uniform_var, backend, *allow_tf32)


def _backward(ctx, grad_out, _grad_lse):
    query_loc, query_var, mem_loc, mem_var, mem_values, out, lse = ctx.saved_tensors
    grads = read_backward(grad_out, out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, *ctx.args)
    return (*grads, None, None, None, None)


read_forward.register_autograd(_backward, setup_context=_setup_context)


def gaussian_read(
    query_loc: Tensor,
    query_sd,
    mem_loc: Tensor,
    mem_sd,
    mem_values: Tensor,
    *,
    match_threshold: Optional[float] = None,
    backend: str = "auto",
    allow_tf32: bool = False,
) -> Tensor:
    """Read a Gaussian-kernel memory at query locations (design.md §2).

    query_loc (..., Q, d) or (..., d); query_sd and mem_sd are positive floats or tensors
    broadcastable to their locations; mem_loc (..., M, d); mem_values (..., M, E).
    Returns (..., Q, E) (or (..., E) for a single query). Entries farther than match_threshold
    (Euclidean) are ignored; a query that matches nothing, or any query against an empty memory,
    reads zeros with zero gradients. Differentiable in all five tensors. allow_tf32 lets GPU
    backends use TF32 tensor cores for the float32 value products (weights @ values).
    """
    mem = _validate.memory(mem_loc, mem_sd, mem_values, value_dtypes=_validate.VALUE_DTYPES)
    qloc, qvar, single = _validate.queries(query_loc, query_sd, mem)
    threshold = _validate.match_threshold(match_threshold)
    impl = _backends.select(OP, backend, qloc.device, qloc.dtype, mem.values.dtype)

    if impl.name == "reference":
        out = reference.gaussian_read(qloc, qvar, mem.loc, mem.var, mem.values, threshold)
    else:
        batch = _validate.batch_shape(
            qloc.shape[:-2], mem.loc.shape[:-2], mem.values.shape[:-2], names=("query_loc", "mem_loc", "mem_values")
        )
        Q, M, d, E = qloc.shape[-2], mem.size, mem.dim, mem.values.shape[-1]
        flat = _validate.flatten_batch
        out, _ = read_forward(
            flat(qloc, batch, (Q, d)), flat(qvar, batch, (Q, d)), flat(mem.loc, batch, (M, d)),
            flat(mem.var, batch, (M, d)), flat(mem.values, batch, (M, E)),
            -1.0 if threshold is None else threshold, uniform_variance(qvar, mem.var), impl.name, bool(allow_tf32),
        )
        out = out.reshape(*batch, Q, E)
    return out.squeeze(-2) if single else out


# ---- cpu backend (csrc/read_cpu.cpp) ---------------------------------------------------------

def _cpu_shape(query_loc, mem_values, threshold, uniform_var):
    B, Q, d = query_loc.shape
    M, E = mem_values.shape[1:]
    return _cpu.module().ReadShape(B, Q, M, d, E, threshold, uniform_var >= 0, max(uniform_var, 0.0))


def _cpu_forward(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, allow_tf32=False):
    B, Q, _ = query_loc.shape
    out = mem_values.new_empty((B, Q, mem_values.shape[-1]))
    lse = query_loc.new_empty((B, Q))
    a = _cpu.arr
    _cpu.module().read_forward(
        _cpu.dtype_name(query_loc), _cpu_shape(query_loc, mem_values, threshold, uniform_var),
        a(query_loc), a(query_var), a(mem_loc), a(mem_var), a(mem_values), out.data_ptr(), lse.data_ptr(),
    )
    return out, lse


def _cpu_backward(grad_out, out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var,
                  allow_tf32=False):
    grads = [torch.empty(t.shape, dtype=t.dtype) for t in (query_loc, query_var, mem_loc, mem_var, mem_values)]
    a = _cpu.arr
    _cpu.module().read_backward(
        _cpu.dtype_name(query_loc), _cpu_shape(query_loc, mem_values, threshold, uniform_var),
        a(query_loc), a(query_var), a(mem_loc), a(mem_var), a(mem_values),
        grad_out.data_ptr(), out.data_ptr(), lse.data_ptr(), *(g.data_ptr() for g in grads),
    )
    return tuple(grads)


_backends.register("reference", OP, reference.gaussian_read)
register_impl("cpu", ReadImpl(_cpu_forward, _cpu_backward, _cpu.same_float_dtypes))
