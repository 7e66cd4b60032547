"""What the Triton kernels share: the score of a (query, entry) tile — the one Triton definition
of log k, used by the read, leave-one-out and sampling kernels — and its per-call constants.

Stride names follow one scheme across the C++, CUDA and Triton code: a rank-3 tensor's strides
are (batch, row, column), `s<tensor>_b, s<tensor>_r, s<tensor>_c` here (ql/qv: query locations
and variances, ml/mv: the memory's, z: values, k: search keys), `sb, sr, sc` in csrc's View3.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

LOG_2PI = math.log(2 * math.pi)


def score_constants(like: torch.Tensor, d: int, threshold: float, uniform_var: float, *extra: float) -> torch.Tensor:
    """The kernels' per-call scalars [θ², 1/v, uniform normaliser, −(d/2) log 2π, *extra] as a tensor
    in the locations' dtype (a plain float argument would reach the kernel as float32)."""
    uniform = uniform_var >= 0
    return torch.tensor([
        threshold * threshold if threshold >= 0 else 0.0,
        1.0 / uniform_var if uniform else 0.0,
        -0.5 * d * (math.log(uniform_var) + LOG_2PI) if uniform else 0.0,
        -0.5 * d * LOG_2PI,
        *extra,
    ], dtype=like.dtype, device=like.device)


def accumulator(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def on_device(t: torch.Tensor):
    """Launches go to the tensors' GPU (and its current stream), whatever device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def load_constants(consts_ptr):
    """θ², 1/v (uniform), the uniform normaliser and −(d/2) log 2π (score_constants)."""
    return tl.load(consts_ptr), tl.load(consts_ptr + 1), tl.load(consts_ptr + 2), tl.load(consts_ptr + 3)


@triton.jit
def dim_terms(ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
              ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c, i,
              UNIFORM: tl.constexpr, uniform_inv):
    """Per-dimension pair terms for dim i: (q − m) and 1 / (qv + mv), each (BLOCK_Q, BLOCK_M)."""
    q = tl.load(ql_ptr + q_offs * sql_r + i * sql_c, mask=q_mask, other=0.0)
    m = tl.load(ml_ptr + m_offs * sml_r + i * sml_c, mask=m_mask, other=0.0)
    diff = q[:, None] - m[None, :]
    if UNIFORM:
        inv = tl.zeros_like(diff) + uniform_inv
    else:
        qv = tl.load(qv_ptr + q_offs * sqv_r + i * sqv_c, mask=q_mask, other=1.0)
        mv = tl.load(mv_ptr + m_offs * smv_r + i * smv_c, mask=m_mask, other=1.0)
        inv = 1.0 / (qv[:, None] + mv[None, :])
    return diff, inv


@triton.jit
def scores(ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
           ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c,
           thr2, uniform_inv, uniform_norm, norm_const,
           D: tl.constexpr, UNIFORM: tl.constexpr, HAS_THR: tl.constexpr):
    """(log k, within) for a (BLOCK_Q, BLOCK_M) tile: log k is -inf for out-of-range and thresholded
    pairs; `within` says the threshold keeps the pair (the geometry alone: a score that overflows
    to -inf is still within)."""
    dist2 = tl.zeros((q_offs.shape[0], m_offs.shape[0]), dtype=ql_ptr.dtype.element_ty)
    quad = tl.zeros_like(dist2)
    log_det = tl.zeros_like(dist2)
    for i in tl.static_range(D):
        diff, inv = dim_terms(ql_ptr, qv_ptr, q_offs, q_mask, sql_r, sql_c, sqv_r, sqv_c,
                              ml_ptr, mv_ptr, m_offs, m_mask, sml_r, sml_c, smv_r, smv_c, i,
                              UNIFORM, uniform_inv)
        sq = diff * diff
        dist2 += sq
        if not UNIFORM:
            quad += sq * inv
            # A sum of logs, not the log of a product: a product of even two float32 variances
            # can overflow (σ = 1e10) or underflow (σ = 1e-10) where each variance is fine.
            log_det += tl.log(inv)
    if UNIFORM:
        score = -0.5 * dist2 * uniform_inv + uniform_norm
    else:
        score = -0.5 * quad + 0.5 * log_det + norm_const
    keep = q_mask[:, None] & m_mask[None, :]
    within = keep
    if HAS_THR:
        within = keep & (dist2 <= thr2)
    return tl.where(within, score, float("-inf")), within


@triton.jit
def online_softmax_step(run_max, run_sum, score):
    """One tile of a row-wise online softmax: (new max, weights exp(score − new max), the factor
    for what was accumulated under the old max, new sum). A row that has matched nothing so far
    keeps max -inf; shifting it by 0 keeps exp() NaN-free."""
    new_max = tl.maximum(run_max, tl.max(score, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp(score - shift[:, None])
    rescale = tl.exp(run_max - shift)
    return new_max, p, rescale, run_sum * rescale + tl.sum(p, axis=1)
