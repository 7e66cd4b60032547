"""backend="triton": fused Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1, for tests).

    read.py    read_forward / read_backward (flash-attention style, tl.dot for weights @ values)
    loo.py     loo_errors / loo_dependencies (the two passes of csrc/loo_cpu.cpp)
    sample.py  sample_probs / sample_indices (logits recomputed per pass, nothing Q×M stored)
    _common.py the score tile and its constants, shared by all three

Importing this package imports triton; without it (or with a kernel that fails to compile at
import) the backend is listed as unusable with the error.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _registry
from .. import SUMMARIES
from . import loo, read, sample  # noqa: F401 - each registers its kernels

NAME = "triton"



def _available() -> Optional[str]:
    if not torch.cuda.is_available() and not _registry.triton_interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly, for tests)"
    return None


def _device(device: torch.device) -> Optional[str]:
    if device.type == "cuda" or (device.type == "cpu" and _registry.triton_interpreting()):
        return None
    return f"runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"


_float_dtypes = _registry.float_dtypes(_registry.HALF_READ_VALUES)  # half values multiply on tensor cores


def _dtypes(op: str, loc_dtype: torch.dtype, value_dtype: torch.dtype) -> Optional[str]:
    if value_dtype == torch.bfloat16 and _registry.triton_interpreting():
        return "the Triton interpreter (TRITON_INTERPRET=1) has no bfloat16 arithmetic; use a GPU or float16"
    return _float_dtypes(op, loc_dtype, value_dtype)


_registry.add_backend(_registry.Backend(NAME, SUMMARIES[NAME], _available, _device, _dtypes))
