"""Gaussian-kernel read (design.md §2): ẑ = Σ_t softmax_t(log k(ℓ, ℓ_t)) z_t.

The op's shape, the same for every op (docs/architecture.md):

    gaussian_read (public: validation, broadcasting, batch dims flattened to B)
      -> resonant_kernels::read_forward  (custom op: fake impl, autograd)
           -> the selected backend's read_forward (resonant_kernels/backends/*)
      <- resonant_kernels::read_backward (custom op, called by the autograd formula)

The kernels work on variances with batch dims flattened to (B, ·, ·); σ → σ² and the batch
broadcast stay in autograd-tracked PyTorch, so their gradients (sums over broadcast dims, the 2σ
chain rule) come for free.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _registry, validation

OP = "gaussian_read"


@torch.library.custom_op("resonant_kernels::read_forward", mutates_args=())
def read_forward(
    query_loc: Tensor, query_var: Tensor, mem_loc: Tensor, mem_var: Tensor, mem_values: Tensor,
    threshold: float, uniform_var: float, backend: str, allow_tf32: bool = False,
) -> tuple[Tensor, Tensor]:
    """(out (B, Q, E), lse (B, Q)): the read and each query's log-sum-exp (in the backend's own
    convention for a query that matched nothing; only its read_backward reads it)."""
    return _registry.implementation("read_forward", backend)(
        query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, allow_tf32
    )


@read_forward.register_fake
def _(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, backend, allow_tf32=False):
    B, Q, _ = query_loc.shape
    return mem_values.new_empty((B, Q, mem_values.shape[-1])), query_loc.new_empty((B, Q))


@torch.library.custom_op("resonant_kernels::read_backward", mutates_args=())
def read_backward(
    grad_out: Tensor, out: Tensor, lse: Tensor, query_loc: Tensor, query_var: Tensor, mem_loc: Tensor,
    mem_var: Tensor, mem_values: Tensor, threshold: float, uniform_var: float, backend: str, allow_tf32: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients w.r.t. query_loc, query_var, mem_loc, mem_var, mem_values (B-shaped)."""
    return _registry.implementation("read_backward", backend)(
        grad_out.contiguous(), out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var,
        allow_tf32,
    )


@read_backward.register_fake
def _(grad_out, out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, backend,
      allow_tf32=False):
    return tuple(t.new_empty(t.shape) for t in (query_loc, query_var, mem_loc, mem_var, mem_values))


def _setup_context(ctx, inputs, output):
    query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, backend, *allow_tf32 = inputs
    out, lse = output
    ctx.save_for_backward(query_loc, query_var, mem_loc, mem_var, mem_values, out, lse)
    ctx.args = (threshold, uniform_var, backend, *allow_tf32)


def _backward(ctx, grad_out, _grad_lse):
    query_loc, query_var, mem_loc, mem_var, mem_values, out, lse = ctx.saved_tensors
    grads = _registry.run_kernel(read_backward, grad_out, out, lse, query_loc, query_var, mem_loc, mem_var, mem_values,
                                 *ctx.args)
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
    validate: Optional[bool] = None,
) -> Tensor:
    """Read a Gaussian-kernel memory at query locations (design.md §2).

    query_loc (..., Q, d) or (..., d); query_sd and mem_sd are positive floats or tensors
    broadcastable to their locations; mem_loc (..., M, d); mem_values (..., M, E).
    Returns (..., Q, E) (or (..., E) for a single query). Entries farther than match_threshold
    (Euclidean) are ignored; a query that matches nothing, or any query against an empty memory,
    reads zeros with zero gradients. Differentiable in all five tensors. allow_tf32 lets GPU
    backends use TF32 tensor cores for the float32 value products (weights @ values). validate:
    the value checks of docs/validation.md (None: where they are free, i.e. CPU tensors outside
    torch.compile; True: always; False: never).
    """
    mem = validation.memory(mem_loc, mem_sd, mem_values, value_dtypes=validation.VALUE_DTYPES, validate=validate)
    qloc, qvariance, single = validation.queries(query_loc, query_sd, mem)
    threshold = validation.match_threshold(match_threshold)
    name = _registry.select(OP, backend, qloc.device, qloc.dtype, mem.values.dtype)
    batch = validation.batch_shape(
        qloc.shape[:-2], mem.loc.shape[:-2], mem.values.shape[:-2], names=("query_loc", "mem_loc", "mem_values")
    )
    Q, M, d, E = qloc.shape[-2], mem.size, mem.dim, mem.values.shape[-1]
    flat = validation.flatten_batch
    out, _ = _registry.run_kernel(
        read_forward, flat(qloc, batch, (Q, d)), flat(qvariance.var, batch, (Q, d)), flat(mem.loc, batch, (M, d)),
        flat(mem.var, batch, (M, d)), flat(mem.values, batch, (M, E)),
        -1.0 if threshold is None else threshold, validation.uniform_variance(qvariance, mem.variance, check=mem.check),
        name, bool(allow_tf32),
    )
    out = out.reshape(*batch, Q, E)
    return out.squeeze(-2) if single else out
