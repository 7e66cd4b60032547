"""resonant-kernels: fused kernels for Gaussian-kernel memories.

Ops (design.md): `gaussian_read`. Backends: reference, cpu, triton, cuda; `backends()` prints
which are usable here and why not.
"""
from ._backends import backends
from .read import gaussian_read

try:  # registers backend="triton"; without triton the backend table says why it is unusable
    from . import triton_read  # noqa: F401
except Exception:  # noqa: BLE001 - a broken triton install must not break the package
    pass

__all__ = ["backends", "gaussian_read"]
__version__ = "0.1.0"
