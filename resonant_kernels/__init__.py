"""resonant-kernels: fused kernels for Gaussian-kernel memories.

Ops (design.md): `gaussian_read`, `conditional_probs`, `conditional_sample`. Backends: reference, cpu, triton, cuda; `backends()` prints
which are usable here and why not.
"""
from ._backends import backends
from .read import gaussian_read
from .sample import conditional_probs, conditional_sample

__all__ = ["backends", "gaussian_read", "conditional_probs", "conditional_sample"]

try:  # registers the triton backend; a missing or broken triton never breaks the package
    from . import triton_sample  # noqa: F401
except ImportError:
    pass
__version__ = "0.1.0"
