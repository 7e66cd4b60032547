"""backend="cpu": the fused C++ kernels in csrc/ (OpenMP) through the pybind11 module
resonant_kernels._C. Tensors cross as (data_ptr, batch stride, row stride, column stride) in
elements; nothing is copied, and every output is allocated here.

    read_forward / read_backward   csrc/read_cpu.cpp, or for wide dense reads cpu_blocked.py
                                   (csrc/read_blocked_cpu.cpp and torch's BLAS)
    loo_errors / loo_dependencies  csrc/loo_cpu.cpp
    sample_probs / sample_indices  csrc/sample_cpu.cpp
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import _registry
from . import SUMMARIES, cpu_blocked

NAME = "cpu"
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def module():
    return importlib.import_module("resonant_kernels._C")


def _available() -> Optional[str]:
    try:
        module()
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unusable
        return f"the compiled CPU extension resonant_kernels._C could not be imported ({type(exc).__name__}: {exc})"
    return None


def view(t: torch.Tensor, name: str) -> tuple[int, int, int, int]:
    """A rank-3 CPU tensor as the C++ side's strided view (data_ptr, stride_b, stride_r, stride_c)."""
    if t.dim() != 3 or t.device.type != "cpu":
        raise ValueError(f"cpu backend: {name} must be a rank-3 CPU tensor, got shape {tuple(t.shape)} on {t.device}")
    return (t.data_ptr(), *t.stride())


# ---- read ------------------------------------------------------------------------------------

def _read_shape(query_loc, mem_values, threshold, uniform_var):
    B, Q, d = query_loc.shape
    M, E = mem_values.shape[1:]
    return module().ReadShape(B, Q, M, d, E, threshold, uniform_var >= 0, max(uniform_var, 0.0))


def _read_args(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var):
    """The read's ReadShape and the views of its locations and variances (forward and backward alike)."""
    shape = _read_shape(query_loc, mem_values, threshold, uniform_var)
    return shape, (view(query_loc, "query_loc"), view(query_var, "query_var"), view(mem_loc, "mem_loc"),
                   view(mem_var, "mem_var"))


def _blocked(query_loc, mem_values, shape, views, backward=False):
    """Whether the read's forward (backward) goes to cpu_blocked (its rule: cpu_blocked.applies)."""
    return cpu_blocked.applies(module(), DTYPE_NAMES[query_loc.dtype], shape, views[1], views[3],
                               query_loc.shape[1], mem_values.shape[1], query_loc.shape[-1], mem_values.shape[-1],
                               mem_values.element_size(), backward)


def read_forward(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, allow_tf32=False):
    B, Q, _ = query_loc.shape
    shape, views = _read_args(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var)
    if _blocked(query_loc, mem_values, shape, views):
        return cpu_blocked.read_forward(module(), DTYPE_NAMES[query_loc.dtype], shape, views, query_loc, mem_values)
    out = mem_values.new_empty((B, Q, mem_values.shape[-1]))
    lse = query_loc.new_empty((B, Q))
    module().read_forward(DTYPE_NAMES[query_loc.dtype], shape, *views, view(mem_values, "mem_values"), out.data_ptr(),
                          lse.data_ptr())
    return out, lse


def read_backward(grad_out, out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var,
                  allow_tf32=False):
    shape, views = _read_args(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var)
    if _blocked(query_loc, mem_values, shape, views, backward=True):
        return cpu_blocked.read_backward(module(), DTYPE_NAMES[query_loc.dtype], shape, views, grad_out, out, lse,
                                         query_loc, mem_loc, mem_values)
    grads = [torch.empty(t.shape, dtype=t.dtype) for t in (query_loc, query_var, mem_loc, mem_var, mem_values)]
    module().read_backward(
        DTYPE_NAMES[query_loc.dtype], shape, *views, view(mem_values, "mem_values"),
        grad_out.data_ptr(), out.data_ptr(), lse.data_ptr(), *(g.data_ptr() for g in grads),
    )
    return tuple(grads)


# ---- leave-one-out and pruning ---------------------------------------------------------------

def _loo_shape(mem_loc, E, threshold, uniform_var):
    B, M, d = mem_loc.shape
    return module().LooShape(B, M, d, E, threshold, uniform_var >= 0, max(uniform_var, 0.0))


def loo_errors(mem_loc, mem_var, mem_values, active, threshold, uniform_var):
    B, M, _ = mem_loc.shape
    estimate = mem_values.new_empty((B, M, mem_values.shape[-1]))
    error, lse = mem_loc.new_empty((B, M)), mem_loc.new_empty((B, M))
    active = active.to(torch.uint8).contiguous()
    module().loo_errors(
        DTYPE_NAMES[mem_loc.dtype], _loo_shape(mem_loc, mem_values.shape[-1], threshold, uniform_var),
        view(mem_loc, "mem_loc"), view(mem_var, "mem_var"), view(mem_values, "mem_values"), active.data_ptr(),
        estimate.data_ptr(), error.data_ptr(), lse.data_ptr(),
    )
    return estimate, error, lse


def loo_dependencies(mem_loc, mem_var, active, error, lse, threshold, uniform_var, max_error):
    B, M, _ = mem_loc.shape
    num_dependencies = torch.empty((B, M), dtype=torch.int64)
    candidate = torch.empty((B, M), dtype=torch.uint8)
    active, error, lse = active.to(torch.uint8).contiguous(), error.contiguous(), lse.contiguous()
    module().loo_dependencies(
        DTYPE_NAMES[mem_loc.dtype], _loo_shape(mem_loc, 0, threshold, uniform_var),
        view(mem_loc, "mem_loc"), view(mem_var, "mem_var"), active.data_ptr(), error.data_ptr(), lse.data_ptr(),
        max_error, num_dependencies.data_ptr(), candidate.data_ptr(),
    )
    return num_dependencies, candidate.bool()


# ---- conditional sampling --------------------------------------------------------------------

def _sample_shape(key, values, qloc, drive_scale, location_scale, threshold, uniform_var, S=0):
    B, Q, E = key.shape
    M, d = values.shape[1], qloc.shape[2]
    return module().SampleShape(B, Q, M, d, E, S, drive_scale, location_scale, threshold, uniform_var)


def _sample_views(key, values, qloc, qvar, mloc, mvar):
    return (view(key, "search_key"), view(values, "mem_values"), view(qloc, "search_loc"), view(qvar, "search_var"),
            view(mloc, "mem_loc"), view(mvar, "mem_var"))


def sample_probs(key, values, qloc, qvar, mloc, mvar, *scalars):
    probs = mloc.new_empty((key.shape[0], key.shape[1], values.shape[1]))
    module().conditional_probs(DTYPE_NAMES[mloc.dtype], _sample_shape(key, values, qloc, *scalars),
                               *_sample_views(key, values, qloc, qvar, mloc, mvar), probs.data_ptr())
    return probs


def sample_indices(key, values, qloc, qvar, mloc, mvar, uniforms, *scalars):
    uniforms = uniforms.contiguous()
    idx = torch.empty(uniforms.shape, dtype=torch.int64)
    module().conditional_sample_indices(
        DTYPE_NAMES[mloc.dtype], _sample_shape(key, values, qloc, *scalars, S=uniforms.shape[2]),
        *_sample_views(key, values, qloc, qvar, mloc, mvar), uniforms.data_ptr(), idx.data_ptr(),
    )
    return idx


_registry.add_backend(_registry.Backend(NAME, SUMMARIES[NAME], _available, _registry.cpu_only,
                                        _registry.float_dtypes()))
_registry.register_kernels(NAME, globals())
