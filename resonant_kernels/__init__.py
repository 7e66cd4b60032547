"""resonant-kernels: fused kernels for Gaussian-kernel memories.

Ops (design.md): `gaussian_read`, `leave_one_out`, `prune_mask`, `conditional_probs`,
`conditional_sample`. Backends: reference, cpu, triton, cuda; `backends()` shows which are usable
here and why not.
"""
import importlib as _importlib

from ._backends import backends
from .loo import leave_one_out, prune_mask
from .read import gaussian_read
from .sample import conditional_probs, conditional_sample
from . import cuda_read, cuda_sample  # noqa: F401 - register backend="cuda" (usable only with _C_cuda and a GPU)

for _module in ("triton_read", "triton_loo", "triton_sample"):
    # Triton kernels register backend="triton"; without a working triton the backend table says
    # why it is unusable, and a broken triton install must not break the other backends.
    try:
        _importlib.import_module(f".{_module}", __name__)
    except Exception:  # noqa: BLE001
        pass

__all__ = ["backends", "gaussian_read", "leave_one_out", "prune_mask", "conditional_probs", "conditional_sample"]
__version__ = "0.1.0"
