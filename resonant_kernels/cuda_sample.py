"""backend="cuda" for conditional_probs / conditional_sample: csrc/cuda/sample.cu through _C_cuda.

The fused interface is sample.py's; one block per query row recomputes the logits in each pass,
so nothing of size Q×M is stored except the probabilities `conditional_probs` returns. Importing
this never needs the extension or a GPU; the kernels run on the current CUDA stream.
"""
from __future__ import annotations

import torch

from . import _cpu, sample
from ._cuda import DTYPE_NAMES, check_location_dim, current_stream, module, strided


def _shape_args(key, values, qloc, location_scale):
    """(B, Q, M, d, E); checks what only this backend limits (d, when the location term is on)."""
    B, Q, E = key.shape
    M, d = values.shape[1], qloc.shape[2]
    if location_scale > 0:
        check_location_dim(d, "search_loc/mem_loc")
    return B, Q, M, d, E


def _probs(key, values, qloc, qvar, mloc, mvar, drive_scale, location_scale, threshold, uniform_var):
    B, Q, M, d, E = _shape_args(key, values, qloc, location_scale)
    probs = mloc.new_empty((B, Q, M))
    with current_stream(mloc.device) as stream:
        module().conditional_probs(
            DTYPE_NAMES[mloc.dtype], B, Q, M, d, E, drive_scale, location_scale, threshold, uniform_var,
            *(strided(t) for t in (key, values, qloc, qvar, mloc, mvar)), probs.data_ptr(), stream,
        )
    return probs


def _indices(key, values, qloc, qvar, mloc, mvar, uniforms, drive_scale, location_scale, threshold, uniform_var):
    B, Q, M, d, E = _shape_args(key, values, qloc, location_scale)
    uniforms = uniforms.contiguous()
    idx = torch.empty(uniforms.shape, dtype=torch.int64, device=mloc.device)
    with current_stream(mloc.device) as stream:
        module().conditional_sample_indices(
            DTYPE_NAMES[mloc.dtype], B, Q, M, d, E, uniforms.shape[2], drive_scale, location_scale, threshold,
            uniform_var, *(strided(t) for t in (key, values, qloc, qvar, mloc, mvar)), uniforms.data_ptr(),
            idx.data_ptr(), stream,
        )
    return idx


# Same dtype rule as the other fused sampling backends: float32 or float64, values in that dtype.
sample.register_impl("cuda", sample.SampleImpl(_probs, _indices, _cpu.same_float_dtypes))
