"""resonant-kernels: fused kernels for Gaussian-kernel memories.

Ops (design.md): `gaussian_read`. Backends: reference, cpu, triton, cuda; `backends()` prints
which are usable here and why not.
"""
from ._backends import backends
from .read import gaussian_read
from . import cuda_read  # noqa: F401,E402 - registers backend="cuda" (usable only with _C_cuda and a GPU)

__all__ = ["backends", "gaussian_read"]
__version__ = "0.1.0"
