"""Leave-one-out error and memory pruning (design.md §3).

`leave_one_out` reads every entry from all the others; `prune_mask` repeats the notebook's pruning
step on the survivors of each batch row. Both run two kernels (custom ops, one implementation per
backend, docs/architecture.md) that never hold the M×M weights on the fused backends:

    loo_errors        online softmax over j ≠ i -> estimate, error, log-sum-exp
    loo_dependencies  recomputes each w_ij from the log-sum-exp, counts w_ij > 1/n and tests
                      whether i depends on an entry of lower (error, index) rank

Batch rows are pruned independently through an `active` mask (B, M), so a later step reads only
the row's surviving entries.

Not differentiable: they decide what to keep. Their kernels register no autograd formula and the
public functions run them under torch.no_grad(), so their outputs never require grad.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _registry, validation

LOO_OP = "leave_one_out"
PRUNE_OP = "prune_mask"


@torch.library.custom_op("resonant_kernels::loo_errors", mutates_args=())
def loo_errors(mem_loc: Tensor, mem_var: Tensor, mem_values: Tensor, active: Tensor, threshold: float,
               uniform_var: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1 on (B, M, ·) tensors and active (B, M) uint8 -> (estimate (B, M, E), error (B, M),
    lse (B, M)); inactive entries get zeros (lse in the backend's convention)."""
    return _registry.implementation("loo_errors", backend)(mem_loc, mem_var, mem_values, active, threshold,
                                                          uniform_var)


@loo_errors.register_fake
def _(mem_loc, mem_var, mem_values, active, threshold, uniform_var, backend):
    B, M, _ = mem_loc.shape
    return mem_values.new_empty((B, M, mem_values.shape[-1])), mem_loc.new_empty((B, M)), mem_loc.new_empty((B, M))


@torch.library.custom_op("resonant_kernels::loo_dependencies", mutates_args=())
def loo_dependencies(mem_loc: Tensor, mem_var: Tensor, active: Tensor, error: Tensor, lse: Tensor, threshold: float,
                     uniform_var: float, max_error: float, backend: str) -> tuple[Tensor, Tensor]:
    """Pass 2 -> (num_dependencies (B, M) int64, candidate (B, M) bool)."""
    return _registry.implementation("loo_dependencies", backend)(mem_loc, mem_var, active, error, lse, threshold,
                                                                uniform_var, max_error)


@loo_dependencies.register_fake
def _(mem_loc, mem_var, active, error, lse, threshold, uniform_var, max_error, backend):
    B, M, _ = mem_loc.shape
    return mem_loc.new_empty((B, M), dtype=torch.int64), mem_loc.new_empty((B, M), dtype=torch.bool)


@dataclass
class _Flat:
    """A validated memory with batch dims flattened to B, as the kernels take it."""

    backend: str
    batch: torch.Size
    loc: Tensor
    var: Tensor
    values: Tensor
    threshold: float  # -1: none
    uniform_var: float  # v_i + v_j when every variance is one number, else -1

    def all_active(self) -> Tensor:
        return torch.ones(self.loc.shape[:2], dtype=torch.uint8, device=self.loc.device)

    def errors(self, active):
        return _registry.run_kernel(loo_errors, self.loc, self.var, self.values, active, self.threshold,
                                    self.uniform_var, self.backend)

    def dependencies(self, active, error, lse, max_error):
        return _registry.run_kernel(loo_dependencies, self.loc, self.var, active, error, lse, self.threshold,
                                    self.uniform_var, max_error, self.backend)


def _flat(op, mem_loc, mem_sd, mem_values, match_threshold, backend, validate) -> _Flat:
    mem = validation.memory(mem_loc, mem_sd, mem_values, value_dtypes=validation.VALUE_DTYPES, validate=validate)
    threshold = validation.match_threshold(match_threshold)
    name = _registry.select(op, backend, mem.loc.device, mem.loc.dtype, mem.values.dtype)
    batch = validation.batch_shape(mem.loc.shape[:-2], mem.values.shape[:-2], names=("mem_loc", "mem_values"))
    M, d, E = mem.size, mem.dim, mem.values.shape[-1]
    flat = validation.flatten_batch
    return _Flat(name, batch, flat(mem.loc, batch, (M, d)), flat(mem.var.expand_as(mem.loc), batch, (M, d)),
                 flat(mem.values, batch, (M, E)), -1.0 if threshold is None else threshold,
                 validation.uniform_variance(mem.variance, mem.variance, check=mem.check))


def leave_one_out(mem_loc: Tensor, mem_sd, mem_values: Tensor, *, match_threshold: Optional[float] = None,
                  backend: str = "auto", validate: Optional[bool] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Read every entry from all the others (design.md §3).

    mem_loc (..., M, d), mem_sd a positive float or a tensor broadcastable to mem_loc, mem_values
    (..., M, E). Entry i is read as a query at its own location with its own σ_i (so pair
    variances are σ_i² + σ_j²), with itself left out. Returns estimate (..., M, E),
    error = ‖estimate − value‖ (..., M) and num_dependencies (..., M) int64, the number of j with
    w_ij > 1/M. An entry that matches no other entry (threshold) reads zeros and depends on
    nothing. Not differentiable. validate: as for gaussian_read.
    """
    f = _flat(LOO_OP, mem_loc, mem_sd, mem_values, match_threshold, backend, validate)
    with torch.no_grad():
        active = f.all_active()
        estimate, error, lse = f.errors(active)
        num_dependencies, _ = f.dependencies(active, error, lse, -math.inf)
    M, E = f.loc.shape[1], f.values.shape[-1]
    return (estimate.reshape(*f.batch, M, E), error.reshape(*f.batch, M), num_dependencies.reshape(*f.batch, M))


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
               match_threshold: Optional[float] = None, max_steps: int = 10, backend: str = "auto",
               validate: Optional[bool] = None) -> Tensor:
    """Which entries to keep after recursive pruning (design.md §3). -> keep (..., M) bool.

    One step ranks the row's surviving entries by leave-one-out error ascending (ties by index)
    and removes together every entry whose error is below max_error and that depends
    (w_ij > 1/n, n the row's surviving count) on some entry of lower rank. Steps repeat until one
    removes nothing or max_steps is reached; each batch row is pruned on its own, so rows may keep
    different counts. Not differentiable.

    Stopping early reads one bool per step from the device (a sync on GPUs, which saves the
    remaining O(M²) passes); inside torch.compile every step runs instead (a step that removes
    nothing leaves the mask as it was, so the result is the same).
    """
    max_error = _check_max_error(max_error)
    max_steps = _check_max_steps(max_steps)
    f = _flat(PRUNE_OP, mem_loc, mem_sd, mem_values, match_threshold, backend, validate)
    early_exit = not torch.compiler.is_compiling()
    with torch.no_grad():
        active = f.all_active()
        for _ in range(max_steps):
            _, error, lse = f.errors(active)
            _, candidate = f.dependencies(active, error, lse, max_error)
            if early_exit and not bool(candidate.any()):
                break
            active = active & ~candidate
    return active.bool().reshape(*f.batch, f.loc.shape[1])
