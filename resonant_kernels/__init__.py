"""resonant-kernels: fused kernels for Gaussian-kernel memories.

Ops (design.md): `gaussian_read`, `leave_one_out`, `prune_mask`. Backends: reference, cpu, triton,
cuda; `backends()` prints which are usable here and why not.
"""
from ._backends import backends
from .read import gaussian_read
from .loo import leave_one_out, prune_mask

try:  # the Triton backend registers itself; without triton the other backends still work
    from . import triton_loo  # noqa: F401
except ImportError:
    pass

__all__ = ["backends", "gaussian_read", "leave_one_out", "prune_mask"]
__version__ = "0.1.0"
