"""The backends, one module (or package) each, holding every adapter between the ops' kernels
(custom ops in read.py, loo.py, sample.py) and that backend's code:

    reference.py  the pure-PyTorch maths (resonant_kernels/reference.py) behind every kernel
    cpu.py        csrc/*.cpp through the pybind11 module resonant_kernels._C
    triton/       Triton kernels (read.py, loo.py, sample.py; _common.py: score constants, strides)
    cuda.py       csrc/cuda/*.cu through the pybind11 module resonant_kernels._C_cuda

Importing this package imports each of them; one that fails to import is still listed by
`backends()`, unusable, with the exception (docs/architecture.md: how to add a backend).
"""
import importlib

from .._registry import record_import_failure

SUMMARIES = {
    "reference": "pure PyTorch, materialises (Q, M, d); the ground truth",
    "cpu": "fused C++ (csrc), OpenMP, pybind11",
    "triton": "fused Triton kernels (GPU)",
    "cuda": "fused CUDA C++ (csrc/cuda), pybind11",
}

for _name, _summary in SUMMARIES.items():
    try:
        importlib.import_module(f".{_name}", __name__)
    except Exception as _exc:  # noqa: BLE001 - any failure makes the backend unusable, with its cause
        record_import_failure(_name, _summary, _exc)
