"""Triton backend for the read (design.md §2), flash-attention style.

Forward: one program per (query block, batch row, value block); scores come from locations and
variances in registers, masked entries get -inf, an online softmax runs over memory tiles and
`tl.dot` accumulates weights @ values. Only the per-query log-sum-exp is saved.

Backward: weights are recomputed from the log-sum-exp; D = rowsum(dO * O) is precomputed. One
kernel runs over memory blocks (grads of mem_values, mem_loc, mem_var), one over query blocks
(grads of query_loc, query_var). Both are also split over value blocks: the score gradient
ds = P * (dO·z − D) is linear in the value-block partial dot products, so each value block writes
its partial location/variance gradients to a small (value blocks, B, N, d) buffer that is summed
afterwards. No Q×M buffer and no atomics.

The kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ... import _registry
from ._common import (accumulator, dim_terms, load_constants, on_device, online_softmax_step, score_constants,
                      scores)


def _autotuned(configs, key):
    """triton.autotune on a real GPU; fixed block sizes (given at launch) otherwise, because the
    autotuner may need a driver when it is created and the interpreter gains nothing from it."""
    if torch.cuda.is_available() and not _registry.triton_interpreting():
        return triton.autotune(configs=configs, key=key)
    return lambda fn: fn


def _configs():
    return [
        triton.Config({"BLOCK_Q": bq, "BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bq, bm, w, s in [
            (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 2), (128, 128, 8, 2),
        ]
    ]


_TUNE_KEY = ["Q", "M", "E", "D", "BLOCK_E", "UNIFORM", "HAS_THR"]
_INTERPRETER_BLOCKS = {"BLOCK_Q": 32, "BLOCK_M": 32}


# ---- device helpers ---------------------------------------------------------------------------

@triton.jit
def _program_tiles(N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's batch row, value block, and its rows (queries or entries) and values."""
    # int64 batch index: b * batch stride can pass 2**31 elements for large batched reads.
    b, pid_e = tl.program_id(1).to(tl.int64), tl.program_id(2)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    e_offs = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    return b, pid_e, offs, offs < N, e_offs, e_offs < E


@triton.jit
def _batch_row(ql_ptr, qv_ptr, ml_ptr, mv_ptr, b, sql_b, sqv_b, sml_b, smv_b):
    return ql_ptr + b * sql_b, qv_ptr + b * sqv_b, ml_ptr + b * sml_b, mv_ptr + b * smv_b


@triton.jit
def _weights(score, lse):
    """exp(score − lse): lse is +inf for rows that match nothing, so they get zero weights."""
    return tl.exp(score - lse[:, None])


@triton.jit
def _dot(a, b, acc, ALLOW_TF32: tl.constexpr):
    if ALLOW_TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _loc_var_grads(ds, ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
                   ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c,
                   uniform_inv, acc_loc, acc_var, AXIS: tl.constexpr,
                   D: tl.constexpr, D_POW2: tl.constexpr, UNIFORM: tl.constexpr):
    """Adds Σ ds · ∂score/∂(location, variance) to the (N, D_POW2) accumulators: the query's
    side when AXIS = 1 (sum over entries), the entry's side when AXIS = 0 (sum over queries).
    ∂score/∂q = −(q − m)/v = −∂score/∂m; ∂score/∂qv = ∂score/∂mv = ½ ((q − m)²/v² − 1/v)."""
    cols = tl.arange(0, D_POW2)
    for i in tl.static_range(D):
        diff, inv = dim_terms(ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
                              ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c, i,
                              UNIFORM, uniform_inv)
        scaled = diff * inv
        g_loc = tl.sum(ds * scaled, axis=AXIS)
        g_var = tl.sum(ds * (0.5 * scaled * scaled - 0.5 * inv), axis=AXIS)
        if AXIS == 1:
            g_loc = -g_loc
        onehot = (cols == i)[None, :]
        acc_loc += tl.where(onehot, g_loc[:, None], 0.0)
        acc_var += tl.where(onehot, g_var[:, None], 0.0)
    return acc_loc, acc_var


# ---- forward ----------------------------------------------------------------------------------

@_autotuned(_configs(), _TUNE_KEY)
@triton.jit
def _read_fwd(ql_ptr, qv_ptr, ml_ptr, mv_ptr, z_ptr, out_ptr, lse_ptr,
              sql_b, sql_r, sql_c, sqv_b, sqv_r, sqv_c, sml_b, sml_r, sml_c, smv_b, smv_r, smv_c,
              sz_b, sz_r, sz_c, so_b, so_r, so_c, slse_b,
              Q, M, E, consts_ptr,
              D: tl.constexpr, UNIFORM: tl.constexpr, HAS_THR: tl.constexpr, ALLOW_TF32: tl.constexpr,
              ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    b, pid_e, q_offs, q_mask, e_offs, e_mask = _program_tiles(Q, E, BLOCK_Q, BLOCK_E)
    thr2, uniform_inv, uniform_norm, norm_const = load_constants(consts_ptr)
    ql_ptr, qv_ptr, ml_ptr, mv_ptr = _batch_row(ql_ptr, qv_ptr, ml_ptr, mv_ptr, b, sql_b, sqv_b, sml_b, smv_b)
    z_ptr += b * sz_b

    row_max = tl.full((BLOCK_Q,), float("-inf"), ACC)
    row_sum = tl.zeros((BLOCK_Q,), ACC)
    acc = tl.zeros((BLOCK_Q, BLOCK_E), ACC)
    for start in range(0, M, BLOCK_M):
        m_offs = start + tl.arange(0, BLOCK_M)
        m_mask = m_offs < M
        score, _ = scores(ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
                          ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c,
                          thr2, uniform_inv, uniform_norm, norm_const, D, UNIFORM, HAS_THR)
        row_max, p, rescale, row_sum = online_softmax_step(row_max, row_sum, score)
        z = tl.load(z_ptr + m_offs[:, None] * sz_r + e_offs[None, :] * sz_c,
                    mask=m_mask[:, None] & e_mask[None, :], other=0.0)
        acc = _dot(p.to(z.dtype), z, acc * rescale[:, None], ALLOW_TF32)

    matched = row_sum > 0
    out = tl.where(matched[:, None], acc / tl.where(matched, row_sum, 1.0)[:, None], 0.0)
    tl.store(out_ptr + b * so_b + q_offs[:, None] * so_r + e_offs[None, :] * so_c,
             out.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & e_mask[None, :])
    if pid_e == 0:
        lse = tl.where(matched, row_max + tl.log(tl.where(matched, row_sum, 1.0)), float("inf"))
        tl.store(lse_ptr + b * slse_b + q_offs, lse, mask=q_mask)


# ---- backward ---------------------------------------------------------------------------------

@triton.jit
def _tile_weights_and_score_grads(ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
                                  ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c,
                                  thr2, uniform_inv, uniform_norm, norm_const, lse, delta, go, z,
                                  D: tl.constexpr, UNIFORM: tl.constexpr, HAS_THR: tl.constexpr,
                                  ALLOW_TF32: tl.constexpr, ACC: tl.constexpr):
    """Recomputed weights P and the score gradient ds = P * (dO·z − D) for one tile (this value
    block's share of dO·z; `delta` is zero except in the first value block)."""
    score, _ = scores(ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
                      ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c,
                      thr2, uniform_inv, uniform_norm, norm_const, D, UNIFORM, HAS_THR)
    p = _weights(score, lse)
    dp = _dot(go, tl.trans(z), tl.zeros((q_offs.shape[0], m_offs.shape[0]), ACC), ALLOW_TF32)
    return p, p * (dp - delta[:, None])


@triton.jit
def _store_partials(gloc_ptr, gvar_ptr, grad_loc, grad_var, offs, mask, pid_e, b, spart_e, spart_b,
                    D: tl.constexpr, D_POW2: tl.constexpr):
    cols = tl.arange(0, D_POW2)
    part = pid_e * spart_e + b * spart_b + offs[:, None] * D + cols[None, :]
    part_mask = mask[:, None] & (cols < D)[None, :]
    tl.store(gloc_ptr + part, grad_loc, mask=part_mask)
    tl.store(gvar_ptr + part, grad_var, mask=part_mask)


@_autotuned(_configs(), _TUNE_KEY)
@triton.jit
def _read_bwd_mem(ql_ptr, qv_ptr, ml_ptr, mv_ptr, z_ptr, go_ptr, lse_ptr, delta_ptr,
                  gz_ptr, gml_ptr, gmv_ptr,
                  sql_b, sql_r, sql_c, sqv_b, sqv_r, sqv_c, sml_b, sml_r, sml_c, smv_b, smv_r, smv_c,
                  sz_b, sz_r, sz_c, sgo_b, sgo_r, sgo_c, slse_b, sgz_b, sgz_r, sgz_c, spart_e, spart_b,
                  Q, M, E, consts_ptr,
                  D: tl.constexpr, D_POW2: tl.constexpr, UNIFORM: tl.constexpr, HAS_THR: tl.constexpr,
                  ALLOW_TF32: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Grads of mem_values (this value block) and this value block's share of mem_loc/mem_var."""
    b, pid_e, m_offs, m_mask, e_offs, e_mask = _program_tiles(M, E, BLOCK_M, BLOCK_E)
    thr2, uniform_inv, uniform_norm, norm_const = load_constants(consts_ptr)
    ql_ptr, qv_ptr, ml_ptr, mv_ptr = _batch_row(ql_ptr, qv_ptr, ml_ptr, mv_ptr, b, sql_b, sqv_b, sml_b, smv_b)
    go_ptr += b * sgo_b
    lse_ptr += b * slse_b
    delta_ptr += b * slse_b
    z = tl.load(z_ptr + b * sz_b + m_offs[:, None] * sz_r + e_offs[None, :] * sz_c,
                mask=m_mask[:, None] & e_mask[None, :], other=0.0)
    # D is subtracted once, by the first value block; the others add only their dO·z share.
    delta_weight = tl.where(pid_e == 0, 1.0, 0.0)

    grad_z = tl.zeros((BLOCK_M, BLOCK_E), ACC)
    grad_loc = tl.zeros((BLOCK_M, D_POW2), ACC)
    grad_var = tl.zeros((BLOCK_M, D_POW2), ACC)
    for start in range(0, Q, BLOCK_Q):
        q_offs = start + tl.arange(0, BLOCK_Q)
        q_mask = q_offs < Q
        lse = tl.load(lse_ptr + q_offs, mask=q_mask, other=float("inf"))
        delta = tl.load(delta_ptr + q_offs, mask=q_mask, other=0.0) * delta_weight
        go = tl.load(go_ptr + q_offs[:, None] * sgo_r + e_offs[None, :] * sgo_c,
                     mask=q_mask[:, None] & e_mask[None, :], other=0.0)
        p, ds = _tile_weights_and_score_grads(ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
                                              ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c,
                                              thr2, uniform_inv, uniform_norm, norm_const, lse, delta, go, z,
                                              D, UNIFORM, HAS_THR, ALLOW_TF32, ACC)
        grad_z = _dot(tl.trans(p).to(go.dtype), go, grad_z, ALLOW_TF32)
        grad_loc, grad_var = _loc_var_grads(ds, ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
                                            ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c,
                                            uniform_inv, grad_loc, grad_var, 0, D, D_POW2, UNIFORM)

    tl.store(gz_ptr + b * sgz_b + m_offs[:, None] * sgz_r + e_offs[None, :] * sgz_c,
             grad_z.to(gz_ptr.dtype.element_ty), mask=m_mask[:, None] & e_mask[None, :])
    _store_partials(gml_ptr, gmv_ptr, grad_loc, grad_var, m_offs, m_mask, pid_e, b, spart_e, spart_b, D, D_POW2)


@_autotuned(_configs(), _TUNE_KEY)
@triton.jit
def _read_bwd_query(ql_ptr, qv_ptr, ml_ptr, mv_ptr, z_ptr, go_ptr, lse_ptr, delta_ptr,
                    gql_ptr, gqv_ptr,
                    sql_b, sql_r, sql_c, sqv_b, sqv_r, sqv_c, sml_b, sml_r, sml_c, smv_b, smv_r, smv_c,
                    sz_b, sz_r, sz_c, sgo_b, sgo_r, sgo_c, slse_b, spart_e, spart_b,
                    Q, M, E, consts_ptr,
                    D: tl.constexpr, D_POW2: tl.constexpr, UNIFORM: tl.constexpr, HAS_THR: tl.constexpr,
                    ALLOW_TF32: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """This value block's share of the grads of query_loc and query_var."""
    b, pid_e, q_offs, q_mask, e_offs, e_mask = _program_tiles(Q, E, BLOCK_Q, BLOCK_E)
    thr2, uniform_inv, uniform_norm, norm_const = load_constants(consts_ptr)
    ql_ptr, qv_ptr, ml_ptr, mv_ptr = _batch_row(ql_ptr, qv_ptr, ml_ptr, mv_ptr, b, sql_b, sqv_b, sml_b, smv_b)
    z_ptr += b * sz_b
    lse = tl.load(lse_ptr + b * slse_b + q_offs, mask=q_mask, other=float("inf"))
    delta = tl.load(delta_ptr + b * slse_b + q_offs, mask=q_mask, other=0.0)
    delta = delta * tl.where(pid_e == 0, 1.0, 0.0)
    go = tl.load(go_ptr + b * sgo_b + q_offs[:, None] * sgo_r + e_offs[None, :] * sgo_c,
                 mask=q_mask[:, None] & e_mask[None, :], other=0.0)

    grad_loc = tl.zeros((BLOCK_Q, D_POW2), ACC)
    grad_var = tl.zeros((BLOCK_Q, D_POW2), ACC)
    for start in range(0, M, BLOCK_M):
        m_offs = start + tl.arange(0, BLOCK_M)
        m_mask = m_offs < M
        z = tl.load(z_ptr + m_offs[:, None] * sz_r + e_offs[None, :] * sz_c,
                    mask=m_mask[:, None] & e_mask[None, :], other=0.0)
        _, ds = _tile_weights_and_score_grads(ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
                                              ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c,
                                              thr2, uniform_inv, uniform_norm, norm_const, lse, delta, go, z,
                                              D, UNIFORM, HAS_THR, ALLOW_TF32, ACC)
        grad_loc, grad_var = _loc_var_grads(ds, ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
                                            ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c,
                                            uniform_inv, grad_loc, grad_var, 1, D, D_POW2, UNIFORM)

    _store_partials(gql_ptr, gqv_ptr, grad_loc, grad_var, q_offs, q_mask, pid_e, b, spart_e, spart_b, D, D_POW2)


# ---- launchers --------------------------------------------------------------------------------

def _geometry(query_loc, mem_values, threshold, uniform_var):
    """Scalar kernel arguments and compile-time switches shared by the three launches."""
    B, Q, d = query_loc.shape
    M, E = mem_values.shape[1:]
    scalars = dict(
        Q=Q, M=M, E=E, consts_ptr=score_constants(query_loc, d, threshold, uniform_var),
        D=d, UNIFORM=uniform_var >= 0, HAS_THR=threshold >= 0, ACC=accumulator(query_loc.dtype),
        BLOCK_E=_block_e(E),
    )
    return B, Q, M, d, E, scalars


def _block_e(E: int) -> int:
    # tl.dot needs every block dim >= 16; 128 keeps the accumulator in registers on a GPU.
    return min(max(16, triton.next_power_of_2(E)), 64 if _registry.triton_interpreting() else 128)


def _launch(kernel, grid_rows: int, B: int, E: int, args: tuple, scalars: dict, **extra):
    n_e = triton.cdiv(E, scalars["BLOCK_E"])
    autotuned = hasattr(kernel, "configs")
    blocks = {} if autotuned else _INTERPRETER_BLOCKS
    row_block = "BLOCK_M" if kernel is _read_bwd_mem else "BLOCK_Q"

    def grid(meta):
        return (triton.cdiv(grid_rows, meta[row_block]), B, n_e)

    kernel[grid](*args, **scalars, **extra, **blocks)


def _strides(*tensors):
    return tuple(s for t in tensors for s in t.stride())


def triton_forward(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, allow_tf32=False):
    B, Q, M, d, E, scalars = _geometry(query_loc, mem_values, threshold, uniform_var)
    out = mem_values.new_empty((B, Q, E))
    lse = query_loc.new_empty((B, Q))
    if out.numel() == 0:
        lse.fill_(math.inf)
        return out, lse
    args = (query_loc, query_var, mem_loc, mem_var, mem_values, out, lse,
            *_strides(query_loc, query_var, mem_loc, mem_var, mem_values, out), lse.stride(0))
    with on_device(query_loc):
        _launch(_read_fwd, Q, B, E, args, scalars, ALLOW_TF32=allow_tf32)
    return out, lse


def triton_backward(grad_out, out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var,
                    allow_tf32=False):
    B, Q, M, d, E, scalars = _geometry(query_loc, mem_values, threshold, uniform_var)
    acc_dtype = torch.float64 if query_loc.dtype == torch.float64 else torch.float32
    if min(B, Q, M, E) == 0:
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                     for t in (query_loc, query_var, mem_loc, mem_var, mem_values))
    grad_z = torch.empty(mem_values.shape, dtype=mem_values.dtype, device=mem_values.device)
    delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1)  # (B, Q): rowsum(dO * O)
    n_e = triton.cdiv(E, scalars["BLOCK_E"])
    mem_parts = [torch.empty((n_e, B, M, d), dtype=acc_dtype, device=mem_loc.device) for _ in range(2)]
    query_parts = [torch.empty((n_e, B, Q, d), dtype=acc_dtype, device=query_loc.device) for _ in range(2)]
    common = (query_loc, query_var, mem_loc, mem_var, mem_values, grad_out, lse, delta)
    strides = _strides(query_loc, query_var, mem_loc, mem_var, mem_values, grad_out) + (lse.stride(0),)
    extra = dict(D_POW2=triton.next_power_of_2(d), ALLOW_TF32=allow_tf32)
    with on_device(query_loc):
        _launch(_read_bwd_mem, M, B, E,
                (*common, grad_z, *mem_parts, *strides, *grad_z.stride(), *mem_parts[0].stride()[:2]), scalars, **extra)
        _launch(_read_bwd_query, Q, B, E,
                (*common, *query_parts, *strides, *query_parts[0].stride()[:2]), scalars, **extra)
    g_ql, g_qv = (p.sum(0).to(query_loc.dtype) for p in query_parts)
    g_ml, g_mv = (p.sum(0).to(mem_loc.dtype) for p in mem_parts)
    return g_ql, g_qv, g_ml, g_mv, grad_z


_registry.register("triton", "read_forward", triton_forward)
_registry.register("triton", "read_backward", triton_backward)
