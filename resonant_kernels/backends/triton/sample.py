"""Triton backend for conditional sampling (design.md §4); the interface is described in sample.py.

One program per (query, block of samples). It makes up to three passes over the memory, each
recomputing the logits of a block of entries on the fly, so nothing of size Q×M (or Q×M×d) is
ever stored: (0) with a threshold, whether any entry matches (else the drive term alone is
used), (1) an online max and sum of exp(logit), (2) either the normalised probabilities or an
inverse-CDF draw: per uniform u, the number of entries whose running cumulative sum is <= u·total,
which is the index `upper_bound` returns on the CPU. The drive term is recomputed in pass 2 (and
by every sample block), so it costs 2× the E-wide work of a stored-logits design; that is the
price of no Q×M buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _registry
from ._common import accumulator, load_constants, on_device, score_constants, scores

BLOCK_E = 64
MAX_BLOCK_S = 1024


@triton.jit
def _block_logits(k_row, sk_c, z_ptr, sz_r, sz_c, ql_ptr, sql_r, sql_c, qv_ptr, sqv_r, sqv_c,
                  ml_ptr, sml_r, sml_c, mv_ptr, smv_r, smv_c, q, offs_m, mask_m, any_match, E, consts,
                  D: tl.constexpr, HAS_LOC: tl.constexpr, HAS_THR: tl.constexpr, UNIFORM: tl.constexpr,
                  COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Logits of query q (its key row k_row; the other pointers at its batch row) against a block of
    entries (-inf outside the memory or when masked), and whether the threshold keeps each entry.
    The location term is the read's score tile (_common.scores) for a single query."""
    acc = tl.zeros([BLOCK_M], COMPUTE)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        k = tl.load(k_row + offs_e * sk_c, mask=mask_e, other=0.0).to(COMPUTE)
        v = tl.load(z_ptr + offs_m[:, None] * sz_r + offs_e[None, :] * sz_c,
                    mask=mask_m[:, None] & mask_e[None, :], other=0.0).to(COMPUTE)
        acc += tl.sum(v * k[None, :], axis=1)
    logit = acc * tl.load(consts + 4)  # drive_scale
    within = mask_m
    if HAS_LOC:
        thr2, uniform_inv, uniform_norm, norm_const = load_constants(consts)
        q_offs = q + tl.arange(0, 1)
        score, within_tile = scores(ql_ptr, qv_ptr, q_offs, q_offs == q, sql_r, sql_c, sqv_r, sqv_c,
                                    ml_ptr, mv_ptr, offs_m, mask_m, sml_r, sml_c, smv_r, smv_c,
                                    thr2, uniform_inv, uniform_norm, norm_const, D, UNIFORM, HAS_THR)
        score = tl.max(score, axis=0).to(COMPUTE)  # (1, BLOCK_M) -> (BLOCK_M,)
        within = tl.max(within_tile.to(tl.int32), axis=0) > 0
        # a query the threshold leaves with nothing keeps the drive term alone
        logit = tl.where(any_match > 0, logit + score * tl.load(consts + 5), logit)  # location_scale
        keep = mask_m & (within | (any_match == 0))
    else:
        keep = mask_m
    return tl.where(keep, logit, float("-inf")), within


@triton.jit
def _conditional_kernel(k_ptr, z_ptr, ql_ptr, qv_ptr, ml_ptr, mv_ptr, uniforms, probs_out, idx_out, Q, M, E, S,
                        sk_b, sk_r, sk_c, sz_b, sz_r, sz_c, sql_b, sql_r, sql_c, sqv_b, sqv_r, sqv_c,
                        sml_b, sml_r, sml_c, smv_b, smv_r, smv_c, consts,
                        D: tl.constexpr, HAS_LOC: tl.constexpr, HAS_THR: tl.constexpr, UNIFORM: tl.constexpr,
                        SAMPLE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    b = (row // Q).to(tl.int64)
    q = row % Q
    # this query's key row and its batch row of every other tensor
    k_row = k_ptr + b * sk_b + q * sk_r
    z_ptr += b * sz_b
    ql_ptr += b * sql_b
    qv_ptr += b * sqv_b
    ml_ptr += b * sml_b
    mv_ptr += b * smv_b
    # pass 0: with a threshold, does any entry match this query at all?
    any_match = tl.full([], 1, tl.int32)
    if HAS_LOC and HAS_THR:
        any_match = tl.full([], 0, tl.int32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            _, within = _block_logits(k_row, sk_c, z_ptr, sz_r, sz_c, ql_ptr, sql_r, sql_c, qv_ptr, sqv_r, sqv_c,
                                      ml_ptr, sml_r, sml_c, mv_ptr, smv_r, smv_c, q, offs_m, offs_m < M, any_match,
                                      0, consts, D, HAS_LOC, HAS_THR, UNIFORM, COMPUTE, BLOCK_M, BLOCK_E)
            any_match = tl.maximum(any_match, tl.max(within.to(tl.int32), axis=0))

    # pass 1: online max and sum of exp(logit)
    run_max = tl.full([], float("-inf"), COMPUTE)
    run_sum = tl.full([], 0.0, COMPUTE)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        logit, _ = _block_logits(k_row, sk_c, z_ptr, sz_r, sz_c, ql_ptr, sql_r, sql_c, qv_ptr, sqv_r, sqv_c,
                                 ml_ptr, sml_r, sml_c, mv_ptr, smv_r, smv_c, q, offs_m, offs_m < M, any_match,
                                 E, consts, D, HAS_LOC, HAS_THR, UNIFORM, COMPUTE, BLOCK_M, BLOCK_E)
        new_max = tl.maximum(run_max, tl.max(logit, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(logit - safe_max), axis=0)
        run_max = new_max

    # an overflow in the dtype (a NaN or +inf logit, or all -inf) makes the row unusable: NaN
    # probabilities, -1 draws (sample.py raises)
    usable = (run_max > float("-inf")) & (run_max < float("inf")) & (run_sum == run_sum)
    # pass 2: probabilities, or an inverse-CDF draw for a block of uniforms
    if SAMPLE:
        offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        target = (tl.load(uniforms + row * S + offs_s, mask=mask_s, other=0.0) * run_sum).to(COMPUTE)
        count = tl.zeros([BLOCK_S], tl.int32)
        last_drawable = tl.full([], 0, tl.int32)
        running = tl.full([], 0.0, COMPUTE)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        logit, _ = _block_logits(k_row, sk_c, z_ptr, sz_r, sz_c, ql_ptr, sql_r, sql_c, qv_ptr, sqv_r, sqv_c,
                                 ml_ptr, sml_r, sml_c, mv_ptr, smv_r, smv_c, q, offs_m, mask_m, any_match,
                                 E, consts, D, HAS_LOC, HAS_THR, UNIFORM, COMPUTE, BLOCK_M, BLOCK_E)
        p = tl.exp(logit - run_max)
        if SAMPLE:
            cdf = running + tl.cumsum(p, axis=0)
            below = (cdf[None, :] <= target[:, None]) & mask_m[None, :]
            count += tl.sum(below.to(tl.int32), axis=1)
            running += tl.sum(p, axis=0)
            last_drawable = tl.maximum(last_drawable, tl.max(tl.where(p > 0, offs_m, 0), axis=0))
        else:
            tl.store(probs_out + row * M + offs_m, tl.where(usable, p / run_sum, float("nan")), mask=mask_m)
    if SAMPLE:
        # rounding may put u·total at or past the last cumulative sum: take the last drawable entry
        draw = tl.where(usable, tl.minimum(count, last_drawable), -1)
        tl.store(idx_out + row * S + offs_s, draw.to(tl.int64), mask=mask_s)


def _launch(key, values, qloc, qvar, mloc, mvar, uniforms, drive_scale, location_scale, threshold, uniform_var):
    B, Q, E = key.shape
    M, d = values.shape[1], mloc.shape[2]
    sampling = uniforms is not None
    S = uniforms.shape[2] if sampling else 0
    out = (torch.empty((B, Q, S), dtype=torch.int64, device=mloc.device) if sampling
           else mloc.new_empty((B, Q, M)))
    if out.numel() == 0:
        return out
    if sampling:
        uniforms = uniforms.contiguous()
    block_s = min(triton.next_power_of_2(max(S, 1)), MAX_BLOCK_S)
    grid = (B * Q, triton.cdiv(S, block_s) if sampling else 1)
    consts = score_constants(mloc, d, threshold, uniform_var, drive_scale, location_scale)
    with on_device(mloc):
        _conditional_kernel[grid](
            key, values, qloc, qvar, mloc, mvar, uniforms if sampling else out, out, out, Q, M, E, S,
            *key.stride(), *values.stride(), *qloc.stride(), *qvar.stride(), *mloc.stride(), *mvar.stride(), consts,
            D=d, HAS_LOC=location_scale > 0, HAS_THR=threshold >= 0, UNIFORM=uniform_var >= 0, SAMPLE=sampling,
            COMPUTE=accumulator(mloc.dtype), BLOCK_M=32 if sampling and block_s > 256 else 64,
            BLOCK_E=min(BLOCK_E, triton.next_power_of_2(max(E, 1))), BLOCK_S=block_s,
        )
    return out


def _probs(key, values, qloc, qvar, mloc, mvar, *scalars):
    return _launch(key, values, qloc, qvar, mloc, mvar, None, *scalars)


def _indices(key, values, qloc, qvar, mloc, mvar, uniforms, *scalars):
    return _launch(key, values, qloc, qvar, mloc, mvar, uniforms, *scalars)


_registry.register("triton", "sample_probs", _probs)
_registry.register("triton", "sample_indices", _indices)
