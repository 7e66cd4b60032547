"""Leave-one-out error and memory pruning (design.md §3).

`leave_one_out` reads every entry from all the others; `prune_mask` repeats the notebook's pruning
step on the survivors of each batch row. Fused backends implement two passes that never hold the
M×M weights: `errors` (online softmax over j ≠ i -> estimate, error, log-sum-exp) and
`dependencies` (recomputes each w_ij from the log-sum-exp, counts w_ij > 1/n and tests whether i
depends on an entry of lower (error, index) rank). Batch rows are pruned independently through
an `active` mask (B, M), so a later step reads only the row's surviving entries.

Neither op is differentiable: they decide what to keep, their outputs carry no gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _backends, _cpu, _validate, reference
from .read import uniform_variance

LOO_OP = "leave_one_out"
PRUNE_OP = "prune_mask"


@dataclass
class LooImpl:
    """A fused backend's two passes, on flattened (B, M, ·) tensors and an active mask (B, M) uint8.

    errors(mem_loc, mem_var, mem_values, active, threshold, uniform_var) -> (estimate, error, lse)
    dependencies(mem_loc, mem_var, active, error, lse, threshold, uniform_var, max_error)
        -> (num_dependencies int64, candidate bool)
    """

    errors: callable
    dependencies: callable
    supports_dtypes: Optional[callable] = None


_IMPLS: dict[str, LooImpl] = {}


def register_impl(backend: str, impl: LooImpl) -> None:
    _IMPLS[backend] = impl
    _backends.register(backend, LOO_OP, impl)
    _backends.register(backend, PRUNE_OP, impl)


@dataclass
class _Flat:
    """A validated memory with batch dims flattened to B, as the fused passes take it."""

    batch: torch.Size
    loc: Tensor
    var: Tensor
    values: Tensor
    threshold: float  # -1: none
    uniform_var: float  # v_i + v_j when every variance is one number, else -1

    @classmethod
    def of(cls, mem: _validate.MemoryArgs, threshold: Optional[float]) -> "_Flat":
        batch = _validate.batch_shape(mem.loc.shape[:-2], mem.values.shape[:-2], names=("mem_loc", "mem_values"))
        M, d, E = mem.size, mem.dim, mem.values.shape[-1]
        flat = _validate.flatten_batch
        return cls(batch, flat(mem.loc, batch, (M, d)), flat(mem.var.expand_as(mem.loc), batch, (M, d)),
                   flat(mem.values, batch, (M, E)), -1.0 if threshold is None else threshold,
                   uniform_variance(mem.var, mem.var))

    def all_active(self) -> Tensor:
        return torch.ones(self.loc.shape[:2], dtype=torch.uint8, device=self.loc.device)


def _validated(mem_loc, mem_sd, mem_values, match_threshold, backend, op):
    mem = _validate.memory(mem_loc, mem_sd, mem_values, value_dtypes=_validate.VALUE_DTYPES)
    threshold = _validate.match_threshold(match_threshold)
    impl = _backends.select(op, backend, mem.loc.device, mem.loc.dtype, mem.values.dtype)
    return mem, threshold, impl


def leave_one_out(mem_loc: Tensor, mem_sd, mem_values: Tensor, *, match_threshold: Optional[float] = None,
                  backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Read every entry from all the others (design.md §3).

    mem_loc (..., M, d), mem_sd a positive float or a tensor broadcastable to mem_loc, mem_values
    (..., M, E). Entry i is read as a query at its own location with its own σ_i (so pair
    variances are σ_i² + σ_j²), with itself left out. Returns estimate (..., M, E),
    error = ‖estimate − value‖ (..., M) and num_dependencies (..., M) int64, the number of j with
    w_ij > 1/M. An entry that matches no other entry (threshold) reads zeros and depends on
    nothing. Not differentiable.
    """
    mem, threshold, impl = _validated(mem_loc, mem_sd, mem_values, match_threshold, backend, LOO_OP)
    with torch.no_grad():
        if impl.name == "reference":
            estimate, error, num_dependencies, _ = reference.leave_one_out(mem.loc, mem.var, mem.values, threshold)
            return estimate, error, num_dependencies
        f = _Flat.of(mem, threshold)
        fused = _IMPLS[impl.name]
        active = f.all_active()
        estimate, error, lse = fused.errors(f.loc, f.var, f.values, active, f.threshold, f.uniform_var)
        num_dependencies, _ = fused.dependencies(f.loc, f.var, active, error, lse, f.threshold, f.uniform_var,
                                                 -math.inf)
        M, E = mem.size, mem.values.shape[-1]
        return (estimate.reshape(*f.batch, M, E), error.reshape(*f.batch, M),
                num_dependencies.reshape(*f.batch, M))


def _check_max_error(max_error) -> float:
    if isinstance(max_error, torch.Tensor) and max_error.numel() == 1:
        max_error = float(max_error)
    if isinstance(max_error, bool) or not isinstance(max_error, (float, int)):
        raise TypeError(f"max_error must be a float, got {type(max_error).__name__}")
    if math.isnan(max_error):
        raise ValueError("max_error must not be NaN")
    return float(max_error)


def _check_max_steps(max_steps) -> int:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int):
        raise TypeError(f"max_steps must be an int, got {type(max_steps).__name__}")
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    return max_steps


def prune_mask(mem_loc: Tensor, mem_sd, mem_values: Tensor, *, max_error: float,
               match_threshold: Optional[float] = None, max_steps: int = 10, backend: str = "auto") -> Tensor:
    """Which entries to keep after recursive pruning (design.md §3). -> keep (..., M) bool.

    One step ranks the row's surviving entries by leave-one-out error ascending (ties by index)
    and removes together every entry whose error is below max_error and that depends
    (w_ij > 1/n, n the row's surviving count) on some entry of lower rank. Steps repeat until one
    removes nothing or max_steps is reached; each batch row is pruned on its own, so rows may keep
    different counts. Not differentiable.
    """
    max_error = _check_max_error(max_error)
    max_steps = _check_max_steps(max_steps)
    mem, threshold, impl = _validated(mem_loc, mem_sd, mem_values, match_threshold, backend, PRUNE_OP)
    with torch.no_grad():
        if impl.name == "reference":
            return reference.prune_mask(mem.loc, mem.var, mem.values, max_error, threshold, max_steps)
        f = _Flat.of(mem, threshold)
        fused = _IMPLS[impl.name]
        active = f.all_active()
        for _ in range(max_steps):
            _, error, lse = fused.errors(f.loc, f.var, f.values, active, f.threshold, f.uniform_var)
            _, candidate = fused.dependencies(f.loc, f.var, active, error, lse, f.threshold, f.uniform_var,
                                              max_error)
            if not bool(candidate.any()):
                break
            active = active & ~candidate
        return active.bool().reshape(*f.batch, mem.size)


# ---- cpu backend (csrc/loo_cpu.cpp) ----------------------------------------------------------

def _cpu_shape(mem_loc, E, threshold, uniform_var):
    B, M, d = mem_loc.shape
    return _cpu.module().LooShape(B, M, d, E, threshold, uniform_var >= 0, max(uniform_var, 0.0))


def _cpu_errors(mem_loc, mem_var, mem_values, active, threshold, uniform_var):
    B, M, _ = mem_loc.shape
    estimate = mem_values.new_empty((B, M, mem_values.shape[-1]))
    error, lse = mem_loc.new_empty((B, M)), mem_loc.new_empty((B, M))
    active = active.contiguous()
    a = _cpu.arr
    _cpu.module().loo_errors(
        _cpu.dtype_name(mem_loc), _cpu_shape(mem_loc, mem_values.shape[-1], threshold, uniform_var), a(mem_loc), a(mem_var),
        a(mem_values), active.data_ptr(), estimate.data_ptr(), error.data_ptr(), lse.data_ptr(),
    )
    return estimate, error, lse


def _cpu_dependencies(mem_loc, mem_var, active, error, lse, threshold, uniform_var, max_error):
    B, M, _ = mem_loc.shape
    num_dependencies = torch.empty((B, M), dtype=torch.int64)
    candidate = torch.empty((B, M), dtype=torch.uint8)
    active = active.contiguous()
    a = _cpu.arr
    _cpu.module().loo_dependencies(
        _cpu.dtype_name(mem_loc), _cpu_shape(mem_loc, 0, threshold, uniform_var),
        a(mem_loc), a(mem_var), active.data_ptr(), error.data_ptr(), lse.data_ptr(), max_error,
        num_dependencies.data_ptr(), candidate.data_ptr(),
    )
    return num_dependencies, candidate.bool()


_backends.register("reference", LOO_OP, reference.leave_one_out)
_backends.register("reference", PRUNE_OP, reference.prune_mask)
register_impl("cpu", LooImpl(_cpu_errors, _cpu_dependencies, _cpu.same_float_dtypes))
