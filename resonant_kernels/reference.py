"""Pure-PyTorch reference implementations: the ground truth every fused backend is tested against.

Short and obviously right, at the price of materialising (..., Q, M, d) and (..., Q, M) tensors.
All functions take variances (σ²), already validated and broadcastable, see `validation`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def log_kernel(query_loc, query_var, mem_loc, mem_var, match_threshold: Optional[float] = None):
    """log N(query_loc; mem_loc, diag(query_var + mem_var)) for every (query, entry) pair.

    Shapes: query (..., Q, d), memory (..., M, d) -> (..., Q, M). Entries farther than
    match_threshold (plain Euclidean distance) get -inf.
    """
    d = query_loc.shape[-1]
    diff = query_loc.unsqueeze(-2) - mem_loc.unsqueeze(-3)  # (..., Q, M, d)
    var = query_var.expand_as(query_loc).unsqueeze(-2) + mem_var.expand_as(mem_loc).unsqueeze(-3)
    logk = -0.5 * (diff * diff / var).sum(-1) - 0.5 * torch.log(var).sum(-1) - 0.5 * d * math.log(2 * math.pi)
    logk = logk.expand(diff.shape[:-1])
    if match_threshold is not None:
        too_far = (diff * diff).sum(-1) > match_threshold**2
        logk = logk.masked_fill(too_far, -math.inf)
    return logk


def log_kernel_vjp(grad_logk, query_loc, query_var, mem_loc, mem_var):
    """The gradients of Σ grad_logk · log k w.r.t. (query_loc, query_var, mem_loc, mem_var), each
    shaped like its (expanded) argument; grad_logk (..., Q, M) must be 0 where log k is -inf.

    ∂log k/∂q_i = −(q_i − m_i)/v_i = −∂log k/∂m_i;  ∂log k/∂qv_i = ∂log k/∂mv_i = ½ ((q_i − m_i)²/v_i² − 1/v_i).
    Materialises (..., Q, M, d), like log_kernel."""
    diff = query_loc.unsqueeze(-2) - mem_loc.unsqueeze(-3)  # (..., Q, M, d)
    inv = 1.0 / (query_var.expand_as(query_loc).unsqueeze(-2) + mem_var.expand_as(mem_loc).unsqueeze(-3))
    g = grad_logk.unsqueeze(-1)
    scaled = diff * inv
    d_loc = g * scaled
    d_var = g * (0.5 * (scaled * scaled - inv))
    return -d_loc.sum(-2), d_var.sum(-2), d_loc.sum(-3), d_var.sum(-3)


def masked_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where a row of only -inf gives zeros (and zero gradients)."""
    any_valid = (logits > -math.inf).any(-1, keepdim=True)
    # A fully masked row gets finite dummy logits, then is zeroed: no NaN forward or backward.
    safe = torch.where(any_valid, logits, torch.zeros_like(logits))
    return torch.softmax(safe, dim=-1) * any_valid


def gaussian_read(query_loc, query_var, mem_loc, mem_var, mem_values, match_threshold=None):
    """Nadaraya–Watson read: softmax over entries of log k, times the values. -> (..., Q, E)."""
    weights = masked_softmax(log_kernel(query_loc, query_var, mem_loc, mem_var, match_threshold))
    return weights.to(mem_values.dtype) @ mem_values


def leave_one_out(mem_loc, mem_var, mem_values, match_threshold=None, active=None):
    """Each entry read from all the other (active) entries, its own variance as the query's.

    Returns estimate (..., M, E), error ‖estimate − value‖ (..., M), num_dependencies (..., M)
    where i depends on j when w_ij > 1/M (M: the row's active count). Materialises (..., M, M).
    """
    M = mem_loc.shape[-2]
    logk = log_kernel(mem_loc, mem_var, mem_loc, mem_var, match_threshold)
    others = ~torch.eye(M, dtype=torch.bool, device=mem_loc.device)
    if active is not None:
        others = others & active.unsqueeze(-2)
    weights = masked_softmax(logk.masked_fill(~others, -math.inf))
    estimate = weights.to(mem_values.dtype) @ mem_values
    error = torch.linalg.vector_norm(estimate - mem_values, dim=-1)
    count = max(M, 1) if active is None else active.sum(-1).clamp(min=1)[..., None, None]
    depends = (weights > 1.0 / count).expand(*error.shape, M)  # values may carry more batch dims
    return estimate, error, depends.sum(-1), depends


def prune_candidates(error, depends, max_error, active=None):
    """One pruning step (design.md §3): i is a candidate when error_i < max_error and i depends on
    some j of lower rank, ranks by (error, index) ascending."""
    M = error.shape[-1]
    index = torch.arange(M, device=error.device)
    err_i, err_j = error.unsqueeze(-1), error.unsqueeze(-2)
    lower_rank = (err_j < err_i) | ((err_j == err_i) & (index < index.unsqueeze(-1)))
    candidate = (error < max_error) & (depends & lower_rank).any(-1)
    return candidate if active is None else candidate & active


def prune_mask(mem_loc, mem_var, mem_values, max_error, match_threshold=None, max_steps=10):
    """Repeats prune steps on the surviving entries of each batch row until a step removes
    nothing or max_steps is reached. -> keep (..., M) bool."""
    batch = torch.broadcast_shapes(mem_loc.shape[:-2], mem_values.shape[:-2])
    M = mem_loc.shape[-2]
    keep = torch.ones((*batch, M), dtype=torch.bool, device=mem_loc.device)
    for _ in range(max_steps):
        _, error, _, depends = leave_one_out(mem_loc, mem_var, mem_values, match_threshold, active=keep)
        candidate = prune_candidates(error, depends, max_error, active=keep)
        if not bool(candidate.any()):
            break
        keep = keep & ~candidate
    return keep


def conditional_logits(search_key, mem_values, drive_scale, query_loc=None, query_var=None, mem_loc=None,
                       mem_var=None, location_scale=1.0, match_threshold=None):
    """(y · z_t) · drive_scale [+ log k(ℓ, ℓ_t) · location_scale] -> (..., Q, M) (design.md §4).

    drive_scale = E^-½ / temperature, location_scale = 1 / location_temperature. A query whose
    every entry is masked by the threshold keeps the drive term alone.
    """
    dtype = torch.promote_types(mem_values.dtype, torch.float32)
    if query_loc is not None:
        dtype = torch.promote_types(dtype, query_loc.dtype)
    logits = (search_key.to(dtype) @ mem_values.to(dtype).transpose(-1, -2)) * drive_scale
    if query_loc is None:
        return logits
    location = log_kernel(query_loc, query_var, mem_loc, mem_var, match_threshold) * location_scale
    # the threshold alone decides the fallback: a location term that overflows to -inf is not masked
    any_match = within_threshold(query_loc, mem_loc, match_threshold).any(-1, keepdim=True)
    return torch.where(any_match, logits + location, logits)


def within_threshold(query_loc, mem_loc, match_threshold=None):
    """(..., Q, M) bool: the pair's Euclidean distance is at most match_threshold (all True without one)."""
    diff = query_loc.unsqueeze(-2) - mem_loc.unsqueeze(-3)
    if match_threshold is None:
        return torch.ones(diff.shape[:-1], dtype=torch.bool, device=diff.device)
    return (diff * diff).sum(-1) <= match_threshold**2


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """For each uniform u in [0, 1) of (..., S): the first entry t whose cumulative probability
    exceeds u · total, as int64 (..., S). Only entries of positive probability are returned."""
    cdf = probs.to(torch.float64).cumsum(-1)
    idx = torch.searchsorted(cdf, uniforms.to(torch.float64) * cdf[..., -1:], right=True)
    # u · total can round up to total: fall back to the last entry that can be drawn.
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_drawable = torch.where(probs > 0, positions, 0).amax(-1, keepdim=True)
    return torch.minimum(idx, last_drawable)
