"""Calling the pybind11 CUDA module _C_cuda (csrc/cuda): tensors become (data_ptr, strides), kernels
run on the current CUDA stream of the tensors' device. Shared by cuda_read.py and cuda_sample.py.

Importing this never needs the extension or a GPU: the module is imported on first call.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

DTYPE_NAMES = {
    torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16",
}


def module():
    from resonant_kernels import _C_cuda

    return _C_cuda


def strided(t: torch.Tensor):
    """A rank-3 device tensor as the C++ side's (data_ptr, stride0, stride1, stride2)."""
    assert t.dim() == 3, t.shape
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
