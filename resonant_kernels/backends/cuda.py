"""backend="cuda": the fused CUDA C++ kernels in csrc/cuda through the pybind11 module
resonant_kernels._C_cuda. Tensors cross as (data_ptr, batch stride, row stride, column stride);
kernels launch on the current CUDA stream of the tensors' device.

    read_forward / read_backward   csrc/cuda/read.cu (fp16/bf16 values on tensor cores)
    sample_probs / sample_indices  csrc/cuda/sample.cu

Importing this never needs the extension or a GPU: the module is loaded on the first call, and
the backend table says why cuda is unusable here. Leave-one-out and pruning have no CUDA kernels
(triton serves them on GPUs).
"""
from __future__ import annotations

import importlib
import json
from contextlib import contextmanager
from importlib import resources
from typing import Optional

import torch

from .. import _registry
from . import SUMMARIES

NAME = "cuda"
DTYPE_NAMES = {
    torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16",
}


def module():
    return importlib.import_module("resonant_kernels._C_cuda")


def _build_note() -> Optional[str]:
    """Why the install did not build the CUDA module, where setup.py recorded it (_build_info.json)."""
    try:
        info = json.loads(resources.files("resonant_kernels").joinpath("_build_info.json").read_text())
        return info["cuda"]["reason"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no record (a source checkout never built): the import below says what is missing


def _available() -> Optional[str]:
    note = _build_note()
    if note:
        return f"the CUDA module was not built when this package was installed: {note}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    try:
        module()
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unusable
        return f"the compiled CUDA extension resonant_kernels._C_cuda could not be imported ({type(exc).__name__}: {exc})"
    return None


def view(t: torch.Tensor, name: str):
    """A rank-3 device tensor as the C++ side's (data_ptr, stride_b, stride_r, stride_c)."""
    if t.dim() != 3 or t.device.type != "cuda":
        raise ValueError(f"cuda backend: {name} must be a rank-3 CUDA tensor, got shape {tuple(t.shape)} on {t.device}")
    return (t.data_ptr(), *t.stride())


def check_location_dim(d: int, names: str) -> None:
    """The kernels keep per-pair location arrays of at most max_dim elements in registers."""
    max_dim = module().max_dim
    if d > max_dim:
        raise ValueError(f"{names}: the cuda backend supports location dimension d <= {max_dim}, got {d}")


@contextmanager
def current_stream(device: torch.device):
    """The handle of `device`'s current CUDA stream, with `device` made current for the launch."""
    with torch.cuda.device(device):
        yield torch.cuda.current_stream().cuda_stream


# ---- read ------------------------------------------------------------------------------------

def _read_args(query_loc, mem_values, threshold, uniform_var):
    """dtype names and the shape arguments; checks what only this backend limits."""
    B, Q, d = query_loc.shape
    M, E = mem_values.shape[1:]
    check_location_dim(d, "query_loc/mem_loc")
    return (DTYPE_NAMES[query_loc.dtype], DTYPE_NAMES[mem_values.dtype], B, Q, M, d, E, threshold,
            uniform_var >= 0, max(uniform_var, 0.0))


def _read_views(query_loc, query_var, mem_loc, mem_var, mem_values):
    return (view(query_loc, "query_loc"), view(query_var, "query_var"), view(mem_loc, "mem_loc"),
            view(mem_var, "mem_var"), view(mem_values, "mem_values"))


def read_forward(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, allow_tf32=False):
    # allow_tf32 is accepted for the kernel's signature; float32 values always take the exact fp32 path.
    B, Q, _ = query_loc.shape
    out = mem_values.new_empty((B, Q, mem_values.shape[-1]))
    lse = query_loc.new_empty((B, Q))
    args = _read_args(query_loc, mem_values, threshold, uniform_var)
    with current_stream(query_loc.device) as stream:
        module().read_forward(*args, *_read_views(query_loc, query_var, mem_loc, mem_var, mem_values),
                              out.data_ptr(), lse.data_ptr(), stream)
    return out, lse


def read_backward(grad_out, out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var,
                  allow_tf32=False):
    # out and lse are the forward's own contiguous buffers; grad_out arrives contiguous (read.py).
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device)
             for t in (query_loc, query_var, mem_loc, mem_var, mem_values)]
    delta = torch.empty(lse.shape, dtype=lse.dtype, device=lse.device)
    args = _read_args(query_loc, mem_values, threshold, uniform_var)
    with current_stream(query_loc.device) as stream:
        module().read_backward(*args, *_read_views(query_loc, query_var, mem_loc, mem_var, mem_values),
                               grad_out.data_ptr(), out.data_ptr(), lse.data_ptr(), delta.data_ptr(),
                               *(g.data_ptr() for g in grads), stream)
    return tuple(grads)


# ---- conditional sampling --------------------------------------------------------------------

def _sample_args(key, values, qloc, mloc, location_scale):
    """(dtype, B, Q, M, d, E); checks what only this backend limits (d, with a location term)."""
    B, Q, E = key.shape
    M, d = values.shape[1], qloc.shape[2]
    if location_scale > 0:
        check_location_dim(d, "search_loc/mem_loc")
    return DTYPE_NAMES[mloc.dtype], B, Q, M, d, E


def _sample_views(key, values, qloc, qvar, mloc, mvar):
    return (view(key, "search_key"), view(values, "mem_values"), view(qloc, "search_loc"), view(qvar, "search_var"),
            view(mloc, "mem_loc"), view(mvar, "mem_var"))


def sample_probs(key, values, qloc, qvar, mloc, mvar, drive_scale, location_scale, threshold, uniform_var):
    dtype, B, Q, M, d, E = _sample_args(key, values, qloc, mloc, location_scale)
    probs = mloc.new_empty((B, Q, M))
    with current_stream(mloc.device) as stream:
        module().conditional_probs(dtype, B, Q, M, d, E, drive_scale, location_scale, threshold, uniform_var,
                                   *_sample_views(key, values, qloc, qvar, mloc, mvar), probs.data_ptr(), stream)
    return probs


def sample_indices(key, values, qloc, qvar, mloc, mvar, uniforms, drive_scale, location_scale, threshold,
                   uniform_var):
    dtype, B, Q, M, d, E = _sample_args(key, values, qloc, mloc, location_scale)
    uniforms = uniforms.contiguous()
    idx = torch.empty(uniforms.shape, dtype=torch.int64, device=mloc.device)
    with current_stream(mloc.device) as stream:
        module().conditional_sample_indices(
            dtype, B, Q, M, d, E, uniforms.shape[2], drive_scale, location_scale, threshold, uniform_var,
            *_sample_views(key, values, qloc, qvar, mloc, mvar), uniforms.data_ptr(), idx.data_ptr(), stream,
        )
    return idx


_registry.add_backend(_registry.Backend(NAME, SUMMARIES[NAME], _available, _registry.cuda_only,
                                        _registry.float_dtypes(_registry.HALF_READ_VALUES)))
_registry.register_kernels(NAME, globals())
