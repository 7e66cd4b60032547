"""Triton backend of leave_one_out / prune_mask: the same two passes as csrc/loo_cpu.cpp.

Pass 1 (`_errors_kernel`): a block of entries i against blocks of entries j, online softmax over
active j ≠ i, values accumulated with tl.dot (float32) or a broadcast product (float64); writes the estimate and log-sum-exp (the error is an
O(M·E) norm taken afterwards). Pass 2 (`_dependencies_kernel`): recomputes every score, compares
it with lse_i − log n (⟺ w_ij > 1/n), counts dependencies and tests for one of lower
(error, index) rank. Nothing of size M×M is stored. Runs on CUDA, or on CPU tensors under
TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ... import _registry
from ._common import load_constants, online_softmax_step, score_constants, scores

BLOCK_I = 32
BLOCK_J = 32


@triton.jit
def _scores(ml_ptr, mv_ptr, b, offs_i, offs_j, mask_i, mask_j, sml_b, sml_r, sml_c, smv_b, smv_r, smv_c, consts,
            D: tl.constexpr, HAS_THR: tl.constexpr, UNIFORM: tl.constexpr):
    """log k_ij for a (BLOCK_I, BLOCK_J) tile of entries against entries: the read's score tile
    (design.md §1) with the memory as its own queries. consts: score_constants(..., max_error)."""
    thr2, uniform_inv, uniform_norm, norm_const = load_constants(consts)
    ml_ptr, mv_ptr = ml_ptr + b * sml_b, mv_ptr + b * smv_b
    score, _ = scores(ml_ptr, mv_ptr, offs_i, mask_i, sml_r, sml_c, smv_r, smv_c,
                      ml_ptr, mv_ptr, offs_j, mask_j, sml_r, sml_c, smv_r, smv_c,
                      thr2, uniform_inv, uniform_norm, norm_const, D, UNIFORM, HAS_THR)
    return score


@triton.jit
def _pair_mask(active, b, M, offs_i, offs_j, mask_i, mask_j):
    act_i = tl.load(active + b * M + offs_i, mask=mask_i, other=0) != 0
    act_j = tl.load(active + b * M + offs_j, mask=mask_j, other=0) != 0
    return act_i[:, None] & act_j[None, :] & (offs_i[:, None] != offs_j[None, :])


@triton.jit
def _errors_kernel(ml_ptr, mv_ptr, z_ptr, active, estimate, lse, M, E,
                   sml_b, sml_r, sml_c, smv_b, smv_r, smv_c, sz_b, sz_r, sz_c, consts,
                   D: tl.constexpr, HAS_THR: tl.constexpr, UNIFORM: tl.constexpr,
                   BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr, USE_DOT: tl.constexpr):
    pid_i, b, pid_e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_i = offs_i < M
    mask_e = offs_e < E
    dt = ml_ptr.dtype.element_ty
    run_max = tl.full((BLOCK_I,), float("-inf"), dt)
    run_sum = tl.zeros((BLOCK_I,), dt)
    acc = tl.zeros((BLOCK_I, BLOCK_E), dt)
    for j0 in range(0, M, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < M
        s = _scores(ml_ptr, mv_ptr, b, offs_i, offs_j, mask_i, mask_j, sml_b, sml_r, sml_c, smv_b, smv_r, smv_c,
                    consts, D, HAS_THR, UNIFORM)
        s = tl.where(_pair_mask(active, b, M, offs_i, offs_j, mask_i, mask_j), s, float("-inf"))
        run_max, p, scale, run_sum = online_softmax_step(run_max, run_sum, s)
        z = tl.load(z_ptr + b * sz_b + offs_j[:, None] * sz_r + offs_e[None, :] * sz_c,
                    mask=mask_j[:, None] & mask_e[None, :], other=0.0)
        if USE_DOT:
            contrib = tl.dot(p.to(z.dtype), z, input_precision="ieee").to(dt)
        else:  # float64: tl.dot has no fp64 lowering on every GPU; a broadcast product does
            contrib = tl.sum(p[:, :, None] * z[None, :, :].to(dt), 1)
        acc = acc * scale[:, None] + contrib
    found = run_sum > 0
    out = tl.where(found[:, None], acc / tl.where(found, run_sum, 1.0)[:, None], 0.0)
    tl.store(estimate + (b * M + offs_i[:, None]) * E + offs_e[None, :], out.to(estimate.dtype.element_ty),
             mask=mask_i[:, None] & mask_e[None, :])
    row_lse = tl.where(found, run_max + tl.log(tl.where(found, run_sum, 1.0)), float("-inf"))
    if pid_e == 0:
        tl.store(lse + b * M + offs_i, row_lse, mask=mask_i)


@triton.jit
def _dependencies_kernel(ml_ptr, mv_ptr, active, error, lse, log_count, num_dependencies, candidate, M,
                         sml_b, sml_r, sml_c, smv_b, smv_r, smv_c, consts,
                         D: tl.constexpr, HAS_THR: tl.constexpr, UNIFORM: tl.constexpr,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    pid_i, b = tl.program_id(0), tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < M
    err_i = tl.load(error + b * M + offs_i, mask=mask_i, other=0.0)
    cut = tl.load(lse + b * M + offs_i, mask=mask_i, other=float("-inf")) - tl.load(log_count + b)
    count = tl.zeros((BLOCK_I,), tl.int64)
    has_lower = tl.zeros((BLOCK_I,), tl.int32)
    for j0 in range(0, M, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < M
        s = _scores(ml_ptr, mv_ptr, b, offs_i, offs_j, mask_i, mask_j, sml_b, sml_r, sml_c, smv_b, smv_r, smv_c,
                    consts, D, HAS_THR, UNIFORM)
        depends = _pair_mask(active, b, M, offs_i, offs_j, mask_i, mask_j) & (s > cut[:, None])
        err_j = tl.load(error + b * M + offs_j, mask=mask_j, other=0.0)
        lower = (err_j[None, :] < err_i[:, None]) | ((err_j[None, :] == err_i[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        count += tl.sum(depends.to(tl.int64), 1)
        has_lower = tl.maximum(has_lower, tl.max((depends & lower).to(tl.int32), 1))
    tl.store(num_dependencies + b * M + offs_i, count, mask=mask_i)
    is_candidate = (has_lower > 0) & (err_i < tl.load(consts + 4))
    tl.store(candidate + b * M + offs_i, is_candidate.to(tl.int8), mask=mask_i)


def _geometry(mem_loc, threshold, uniform_var, max_error=0.0):
    return dict(consts=score_constants(mem_loc, mem_loc.shape[-1], threshold, uniform_var, max_error),
                D=mem_loc.shape[-1], HAS_THR=threshold >= 0, UNIFORM=uniform_var >= 0)


def _errors(mem_loc, mem_var, mem_values, active, threshold, uniform_var):
    B, M, _ = mem_loc.shape
    E = mem_values.shape[-1]
    estimate = mem_values.new_zeros((B, M, E))
    lse = mem_loc.new_full((B, M), -math.inf)
    if B and M:
        use_dot = mem_loc.dtype == torch.float32
        block_e = max(16, min(64 if use_dot else 16, triton.next_power_of_2(max(E, 1))))
        grid = (triton.cdiv(M, BLOCK_I), B, max(1, triton.cdiv(E, block_e)))
        _errors_kernel[grid](
            mem_loc, mem_var, mem_values, active.contiguous(), estimate, lse, M, E,
            *mem_loc.stride(), *mem_var.stride(), *mem_values.stride(),
            **_geometry(mem_loc, threshold, uniform_var), BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, BLOCK_E=block_e,
            USE_DOT=use_dot,
        )
    error = torch.linalg.vector_norm(estimate - mem_values, dim=-1) * active
    return estimate, error, lse


def _dependencies(mem_loc, mem_var, active, error, lse, threshold, uniform_var, max_error):
    B, M, _ = mem_loc.shape
    num_dependencies = torch.zeros((B, M), dtype=torch.int64, device=mem_loc.device)
    candidate = torch.zeros((B, M), dtype=torch.int8, device=mem_loc.device)
    if B and M:
        log_count = active.sum(-1).clamp(min=1).to(mem_loc.dtype).log()
        _dependencies_kernel[(triton.cdiv(M, BLOCK_I), B)](
            mem_loc, mem_var, active.contiguous(), error.contiguous(), lse, log_count, num_dependencies, candidate,
            M, *mem_loc.stride(), *mem_var.stride(),
            **_geometry(mem_loc, threshold, uniform_var, max_error), BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
        )
    return num_dependencies, candidate.bool()


_registry.register("triton", "loo_errors", _errors)
_registry.register("triton", "loo_dependencies", _dependencies)
