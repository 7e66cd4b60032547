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

import math

import torch
import triton
import triton.language as tl

from . import _cpu, sample

BLOCK_E = 64
MAX_BLOCK_S = 1024


@triton.jit
def _block_logits(key, values, qloc, qvar, mloc, mvar, b, q, offs_m, mask_m, any_match, E, d,
                  skb, skq, ske, svb, svm, sve, sqlb, sqlq, sqld, sqvb, sqvq, sqvd, smlb, smlm, smld,
                  smvb, smvm, smvd, drive_scale, location_scale, thr2, uniform_inv, uniform_norm, norm_const,
                  HAS_LOC: tl.constexpr, HAS_THR: tl.constexpr, UNIFORM: tl.constexpr, COMPUTE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """Logits of one query against a block of entries (-inf outside the memory or when masked),
    and whether the location term matched each entry."""
    acc = tl.zeros([BLOCK_M], COMPUTE)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        k = tl.load(key + b * skb + q * skq + offs_e * ske, mask=mask_e, other=0.0).to(COMPUTE)
        v = tl.load(values + b * svb + offs_m[:, None] * svm + offs_e[None, :] * sve,
                    mask=mask_m[:, None] & mask_e[None, :], other=0.0).to(COMPUTE)
        acc += tl.sum(v * k[None, :], axis=1)
    logit = acc * drive_scale
    valid = mask_m
    if HAS_LOC:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        mask_md = mask_m[:, None] & mask_d[None, :]
        ql = tl.load(qloc + b * sqlb + q * sqlq + offs_d * sqld, mask=mask_d, other=0.0).to(COMPUTE)
        ml = tl.load(mloc + b * smlb + offs_m[:, None] * smlm + offs_d[None, :] * smld, mask=mask_md,
                     other=0.0).to(COMPUTE)
        diff = ql[None, :] - ml
        dist2 = tl.sum(diff * diff, axis=1)
        if UNIFORM:
            score = -0.5 * dist2 * uniform_inv + uniform_norm
        else:
            # padded dims get v = 1 + 0 and diff = 0: they add nothing to either sum
            qv = tl.load(qvar + b * sqvb + q * sqvq + offs_d * sqvd, mask=mask_d, other=1.0).to(COMPUTE)
            mv = tl.load(mvar + b * smvb + offs_m[:, None] * smvm + offs_d[None, :] * smvd, mask=mask_md,
                         other=0.0).to(COMPUTE)
            var = qv[None, :] + mv
            score = -0.5 * tl.sum(diff * diff / var, axis=1) - 0.5 * tl.sum(tl.log(var), axis=1) + norm_const
        if HAS_THR:
            valid = valid & (dist2 <= thr2)
        # a query that matched nothing keeps the drive term alone
        logit = tl.where(any_match > 0, logit + score * location_scale, logit)
        keep = mask_m & (valid | (any_match == 0))
    else:
        keep = mask_m
    return tl.where(keep, logit, float("-inf")), valid


@triton.jit
def _conditional_kernel(key, values, qloc, qvar, mloc, mvar, uniforms, probs_out, idx_out, Q, M, E, d, S,
                        skb, skq, ske, svb, svm, sve, sqlb, sqlq, sqld, sqvb, sqvq, sqvd, smlb, smlm, smld,
                        smvb, smvm, smvd, drive_scale, location_scale, thr2, uniform_inv, uniform_norm,
                        norm_const, HAS_LOC: tl.constexpr, HAS_THR: tl.constexpr, UNIFORM: tl.constexpr,
                        SAMPLE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    b = row // Q
    q = row % Q
    # pass 0: with a threshold, does any entry match this query at all?
    any_match = tl.full([], 1, tl.int32)
    if HAS_LOC and HAS_THR:
        any_match = tl.full([], 0, tl.int32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            _, valid = _block_logits(key, values, qloc, qvar, mloc, mvar, b, q, offs_m, offs_m < M, any_match,
                                     0, d, skb, skq, ske, svb, svm, sve, sqlb, sqlq, sqld, sqvb, sqvq, sqvd,
                                 smlb, smlm, smld, smvb, smvm, smvd, drive_scale, location_scale, thr2, uniform_inv,
                                 uniform_norm, norm_const, HAS_LOC, HAS_THR, UNIFORM, COMPUTE, BLOCK_M,
                                     BLOCK_E, BLOCK_D)
            any_match = tl.maximum(any_match, tl.max(valid.to(tl.int32), axis=0))

    # pass 1: online max and sum of exp(logit)
    run_max = tl.full([], float("-inf"), COMPUTE)
    run_sum = tl.full([], 0.0, COMPUTE)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        logit, _ = _block_logits(key, values, qloc, qvar, mloc, mvar, b, q, offs_m, offs_m < M, any_match, E, d,
                                 skb, skq, ske, svb, svm, sve, sqlb, sqlq, sqld, sqvb, sqvq, sqvd,
                                 smlb, smlm, smld, smvb, smvm, smvd, drive_scale, location_scale, thr2, uniform_inv,
                                 uniform_norm, norm_const, HAS_LOC, HAS_THR, UNIFORM, COMPUTE, BLOCK_M, BLOCK_E,
                                 BLOCK_D)
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
        logit, _ = _block_logits(key, values, qloc, qvar, mloc, mvar, b, q, offs_m, mask_m, any_match, E, d,
                                 skb, skq, ske, svb, svm, sve, sqlb, sqlq, sqld, sqvb, sqvq, sqvd,
                                 smlb, smlm, smld, smvb, smvm, smvd, drive_scale, location_scale, thr2, uniform_inv,
                                 uniform_norm, norm_const, HAS_LOC, HAS_THR, UNIFORM, COMPUTE, BLOCK_M, BLOCK_E,
                                 BLOCK_D)
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
    if sampling:
        uniforms = uniforms.contiguous()
    block_s = min(triton.next_power_of_2(max(S, 1)), MAX_BLOCK_S)
    uniform = uniform_var >= 0
    grid = (B * Q, triton.cdiv(S, block_s) if sampling else 1)
    _conditional_kernel[grid](
        key, values, qloc, qvar, mloc, mvar, uniforms if sampling else out, out, out, Q, M, E, d, S,
        *key.stride(), *values.stride(), *qloc.stride(), *qvar.stride(), *mloc.stride(), *mvar.stride(),
        drive_scale, location_scale, threshold * threshold if threshold >= 0 else -1.0,
        1.0 / uniform_var if uniform else 0.0,
        -0.5 * d * (math.log(uniform_var) + math.log(2 * math.pi)) if uniform else 0.0,
        -0.5 * d * math.log(2 * math.pi),
        HAS_LOC=location_scale > 0, HAS_THR=threshold >= 0, UNIFORM=uniform, SAMPLE=sampling,
        COMPUTE=tl.float64 if mloc.dtype == torch.float64 else tl.float32,
        BLOCK_M=32 if sampling and block_s > 256 else 64, BLOCK_E=min(BLOCK_E, triton.next_power_of_2(max(E, 1))),
        BLOCK_D=triton.next_power_of_2(d), BLOCK_S=block_s,
    )
    return out


def _probs(key, values, qloc, qvar, mloc, mvar, *scalars):
    return _launch(key, values, qloc, qvar, mloc, mvar, None, *scalars)


def _indices(key, values, qloc, qvar, mloc, mvar, uniforms, *scalars):
    return _launch(key, values, qloc, qvar, mloc, mvar, uniforms, *scalars)


sample.register_impl("triton", sample.SampleImpl(_probs, _indices, _cpu.same_float_dtypes))
