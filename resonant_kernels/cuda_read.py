"""backend="cuda" for the read: csrc/cuda/read.cu through the pybind11 module _C_cuda (_cuda.py).

Importing this never needs the extension or a GPU (the backend table says why cuda is unusable);
the kernels run on the caller's current CUDA stream, on the tensors' device.
"""
from __future__ import annotations

import torch

from . import read
from ._cuda import DTYPE_NAMES, check_location_dim, current_stream, module, strided

# Location dtype -> value dtypes the kernels take (half-precision values: tensor-core P @ V).
VALUE_DTYPES = {
    torch.float64: (torch.float64,),
    torch.float32: (torch.float32, torch.float16, torch.bfloat16),
}


def supports_dtypes(loc_dtype: torch.dtype, value_dtype: torch.dtype):
    if loc_dtype not in VALUE_DTYPES:
        return f"supports float32 and float64 locations, got {loc_dtype}"
    if value_dtype not in VALUE_DTYPES[loc_dtype]:
        allowed = ", ".join(DTYPE_NAMES[t] for t in VALUE_DTYPES[loc_dtype])
        return f"with {DTYPE_NAMES[loc_dtype]} locations mem_values must be one of {allowed}, got {value_dtype}"
    return None


def _call_args(query_loc, mem_values, threshold, uniform_var):
    """dtype names and the shape arguments; checks what only this backend limits."""
    B, Q, d = query_loc.shape
    M, E = mem_values.shape[1:]
    check_location_dim(d, "query_loc/mem_loc")
    return (DTYPE_NAMES[query_loc.dtype], DTYPE_NAMES[mem_values.dtype], B, Q, M, d, E, threshold,
            uniform_var >= 0, max(uniform_var, 0.0))


def _forward(query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var, allow_tf32=False):
    # allow_tf32 is accepted for the op's signature; float32 values always take the exact fp32 path.
    B, Q, _ = query_loc.shape
    out = mem_values.new_empty((B, Q, mem_values.shape[-1]))
    lse = query_loc.new_empty((B, Q))
    args = _call_args(query_loc, mem_values, threshold, uniform_var)
    with current_stream(query_loc.device) as stream:
        module().read_forward(
            *args, *(strided(t) for t in (query_loc, query_var, mem_loc, mem_var, mem_values)),
            out.data_ptr(), lse.data_ptr(), stream,
        )
    return out, lse


def _backward(grad_out, out, lse, query_loc, query_var, mem_loc, mem_var, mem_values, threshold, uniform_var,
              allow_tf32=False):
    # out and lse are the forward's own contiguous buffers; read.py makes grad_out contiguous.
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device)
             for t in (query_loc, query_var, mem_loc, mem_var, mem_values)]
    delta = torch.empty(lse.shape, dtype=lse.dtype, device=lse.device)
    args = _call_args(query_loc, mem_values, threshold, uniform_var)
    with current_stream(query_loc.device) as stream:
        module().read_backward(
            *args, *(strided(t) for t in (query_loc, query_var, mem_loc, mem_var, mem_values)),
            grad_out.data_ptr(), out.data_ptr(), lse.data_ptr(), delta.data_ptr(),
            *(g.data_ptr() for g in grads), stream,
        )
    return tuple(grads)


read.register_impl("cuda", read.ReadImpl(_forward, _backward, supports_dtypes))
