"""Calling the pybind11 CPU module: tensors become (data_ptr, strides) and nothing is copied."""
from __future__ import annotations

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def module():
    from resonant_kernels import _C

    return _C


def arr(t: torch.Tensor) -> tuple[int, int, int, int]:
    """A rank-3 tensor as the C++ side's strided view."""
    assert t.dim() == 3, t.shape
    return (t.data_ptr(), *t.stride())


def dtype_name(t: torch.Tensor) -> str:
    return DTYPE_NAMES[t.dtype]


def same_float_dtypes(loc_dtype: torch.dtype, value_dtype: torch.dtype):
    """dtype rule of the C++ kernels: float32 or float64, values in the locations' dtype."""
    if loc_dtype not in DTYPE_NAMES:
        return f"supports float32 and float64 locations, got {loc_dtype}"
    if value_dtype != loc_dtype:
        return f"needs mem_values in the locations' dtype {loc_dtype}, got {value_dtype}"
    return None
