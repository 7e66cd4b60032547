"""resonant-kernels: fused kernels for Gaussian-kernel memories.

Ops (docs/validation.md, docs/architecture.md): `gaussian_read`, `leave_one_out`, `prune_mask`,
`conditional_probs`, `conditional_sample`. Backends (resonant_kernels/backends/): reference, cpu,
triton, cuda; `backends()` shows which are usable here and why not.
"""
from . import backends as _backends_package  # noqa: F401 - registers every backend
from . import validation
from ._registry import backends
from .loo import leave_one_out, prune_mask
from .read import gaussian_read
from .sample import conditional_probs, conditional_sample

__all__ = ["backends", "gaussian_read", "leave_one_out", "prune_mask", "conditional_probs", "conditional_sample",
           "select_backend", "validation"]
__version__ = "0.1.0"


def select_backend(op: str, backend: str, device, loc_dtype, value_dtype=None) -> str:
    """The backend `op` would run on for tensors of this device and dtypes ("auto" resolved), or a
    ValueError saying why the requested one cannot. For libraries that fix a backend up front."""
    import torch

    from ._registry import OP_KERNELS, select

    if op not in OP_KERNELS:
        raise ValueError(f"unknown op {op!r}; choose one of {sorted(OP_KERNELS)}")
    return select(op, backend, torch.device(device), loc_dtype, value_dtype)
