"""backend="reference": every kernel of the ops from the pure-PyTorch maths in
resonant_kernels/reference.py — short and obviously right, at the price of materialising (B, Q, M)
and (B, Q, M, d) tensors. It runs on any device and dtype torch supports, and is the ground truth
every fused backend is tested against.

The kernels' interface (batch dims flattened to B, thresholds < 0 meaning none) is the one every
backend implements; see resonant_kernels/read.py, loo.py and sample.py.
"""
from __future__ import annotations

import math

import torch

from .. import _registry, reference as maths
from . import SUMMARIES

NAME = "reference"


def _threshold(threshold: float):
    return None if threshold < 0 else threshold


# ---- read ------------------------------------------------------------------------------------

def _read_weights(query_loc, query_var, mem_loc, mem_var, threshold):
    logk = maths.log_kernel(query_loc, query_var, mem_loc, mem_var, _threshold(threshold))
    return maths.masked_softmax(logk), torch.logsumexp(logk, -1)


def read_forward(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, allow_tf32=False):
    weights, lse = _read_weights(query_loc, query_var, mem_loc, mem_var, threshold)
    return weights.to(mem_values.dtype) @ mem_values, lse  # lse is -inf where nothing matched


def read_backward(grad_out, out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var,
                  allow_tf32=False):
    # the softmax backward (flash-attention's: ds = w ⊙ (g·z − g·out)), then the log-kernel's chain
    weights, _ = _read_weights(query_loc, query_var, mem_loc, mem_var, threshold)
    g = grad_out.to(weights.dtype)
    values = mem_values.to(weights.dtype)
    grad_values = (weights.transpose(-1, -2) @ g).to(mem_values.dtype)
    ds = weights * (g @ values.transpose(-1, -2) - (g * out.to(weights.dtype)).sum(-1, keepdim=True))
    return (*maths.log_kernel_vjp(ds, query_loc, query_var, mem_loc, mem_var), grad_values)


# ---- leave-one-out and pruning ---------------------------------------------------------------

def _loo_log_kernel(mem_loc, mem_var, active, threshold):
    """log k_ij of entry i read from entry j: -inf on the diagonal, for inactive entries and where masked."""
    M = mem_loc.shape[-2]
    logk = maths.log_kernel(mem_loc, mem_var, mem_loc, mem_var, _threshold(threshold))
    present = active.bool()
    keep = ~torch.eye(M, dtype=torch.bool, device=mem_loc.device) & present.unsqueeze(-1) & present.unsqueeze(-2)
    return logk.masked_fill(~keep, -math.inf)


def loo_errors(mem_loc, mem_var, mem_values, active, threshold, uniform_var):
    logk = _loo_log_kernel(mem_loc, mem_var, active, threshold)
    estimate = maths.masked_softmax(logk).to(mem_values.dtype) @ mem_values
    error = torch.linalg.vector_norm(estimate - mem_values, dim=-1) * active.bool()
    return estimate, error.to(mem_loc.dtype), torch.logsumexp(logk, -1)


def loo_dependencies(mem_loc, mem_var, active, error, lse, threshold, uniform_var, max_error):
    logk = _loo_log_kernel(mem_loc, mem_var, active, threshold)
    weights = torch.exp(logk - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    count = active.bool().sum(-1).clamp(min=1)[..., None, None]
    depends = weights > 1.0 / count  # w_ij > 1/n, n the row's active count
    candidate = maths.prune_candidates(error, depends, max_error, active=active.bool())
    return depends.sum(-1), candidate


# ---- conditional sampling --------------------------------------------------------------------

def _probs(key, values, qloc, qvar, mloc, mvar, drive_scale, location_scale, threshold):
    """Softmax of the logits, NaN across unusable rows (a NaN or +inf logit, or all -inf)."""
    if location_scale > 0:
        logits = maths.conditional_logits(key, values, drive_scale, qloc, qvar, mloc, mvar, location_scale,
                                          _threshold(threshold))
    else:
        logits = maths.conditional_logits(key, values, drive_scale)
    usable = torch.isfinite(logits.amax(-1, keepdim=True))  # amax propagates NaN
    return torch.where(usable, torch.softmax(logits, dim=-1), torch.nan)


def sample_probs(key, values, qloc, qvar, mloc, mvar, drive_scale, location_scale, threshold, uniform_var):
    return _probs(key, values, qloc, qvar, mloc, mvar, drive_scale, location_scale, threshold).to(mloc.dtype)


def sample_indices(key, values, qloc, qvar, mloc, mvar, uniforms, drive_scale, location_scale, threshold,
                   uniform_var):
    probs = _probs(key, values, qloc, qvar, mloc, mvar, drive_scale, location_scale, threshold)
    usable = ~torch.isnan(probs[..., :1])
    return torch.where(usable, maths.inverse_cdf(torch.nan_to_num(probs), uniforms), -1)


_registry.add_backend(_registry.Backend(NAME, SUMMARIES[NAME], lambda: None, _registry.any_device,
                                        lambda op, loc_dtype, value_dtype: None))
_registry.register_kernels(NAME, globals())
