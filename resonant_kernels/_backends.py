"""Backend registry and dispatch.

Each backend says which ops it implements, on which devices and dtypes, and gives a readable reason
when it cannot serve a call; `backends()` returns that table. Op modules register their
implementations here (`register`), so adding a backend never edits the ops.
"""
from __future__ import annotations

import importlib
import json
import os
from importlib import resources
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

AUTO_ORDER = {
    # Which usable backend `backend="auto"` takes first, by device type.
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


def _module_reason(module: str, what: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unusable
        return f"{what} could not be imported ({type(exc).__name__}: {exc})"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Backend:
    name: str
    summary: str
    # why the backend is unusable anywhere in this process (None: usable); evaluated lazily
    availability: Callable[[], Optional[str]]
    # why it cannot run on a device of this type (None: it can)
    device_check: Callable[[torch.device], Optional[str]]
    impls: dict = field(default_factory=dict)  # op name -> implementation object

    def unavailable_reason(self) -> Optional[str]:
        return self.availability()

    def reason(self, op: str, device: torch.device, loc_dtype: torch.dtype, value_dtype: torch.dtype) -> Optional[str]:
        why = self.unavailable_reason()
        if why:
            return why
        if op not in self.impls:
            return f"the {self.name} backend does not implement {op}"
        why = self.device_check(device)
        if why:
            return why
        supported = getattr(self.impls[op], "supports_dtypes", None)
        if supported is not None:
            return supported(loc_dtype, value_dtype)
        return None


def _cpu_available() -> Optional[str]:
    return _module_reason("resonant_kernels._C", "the compiled CPU extension resonant_kernels._C")


def _cuda_build_note() -> Optional[str]:
    """Why the install did not build the CUDA module (setup.py records it in _build_info.json)."""
    try:
        info = json.loads(resources.files(__package__).joinpath("_build_info.json").read_text())
        return info["cuda"]["reason"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no record (a source checkout never built): the import below says what is missing


def _cuda_available() -> Optional[str]:
    note = _cuda_build_note()
    if note:
        return f"the CUDA module was not built when this package was installed: {note}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return _module_reason("resonant_kernels._C_cuda", "the compiled CUDA extension resonant_kernels._C_cuda")


def _triton_available() -> Optional[str]:
    why = _module_reason("triton", "triton")
    if why:
        return why
    if not torch.cuda.is_available() and not triton_interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly, for tests)"
    return None


def _cpu_only(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else f"runs on CPU tensors only, got {device}"


def _cuda_only(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else f"runs on CUDA tensors only, got {device}"


def _triton_device(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return f"runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", "pure PyTorch, materialises (Q, M, d); the ground truth", lambda: None, lambda _: None),
        Backend("cpu", "fused C++ (csrc), OpenMP, pybind11", _cpu_available, _cpu_only),
        Backend("triton", "fused Triton kernels (GPU)", _triton_available, _triton_device),
        Backend("cuda", "fused CUDA C++ (csrc), pybind11", _cuda_available, _cuda_only),
    )
}


def register(backend: str, op: str, impl) -> None:
    BACKENDS[backend].impls[op] = impl


def select(op: str, backend: str, device: torch.device, loc_dtype: torch.dtype, value_dtype=None) -> Backend:
    """The backend to run `op` on, or a ValueError that says why the requested one cannot."""
    value_dtype = value_dtype or loc_dtype
    if backend == "auto":
        reasons = []
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            why = BACKENDS[name].reason(op, device, loc_dtype, value_dtype)
            if why is None:
                return BACKENDS[name]
            reasons.append(f"{name}: {why}")
        raise ValueError(f"no backend can run {op} here: " + "; ".join(reasons))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {['auto', *BACKENDS]}")
    why = BACKENDS[backend].reason(op, device, loc_dtype, value_dtype)
    if why:
        raise ValueError(f"backend {backend!r} cannot run {op} on {device} ({loc_dtype}): {why}")
    return BACKENDS[backend]


@dataclass
class BackendInfo:
    name: str
    usable: bool
    reason: str
    ops: tuple
    summary: str


class BackendTable(list):
    """The rows of `backends()` (a list of BackendInfo); its repr is the table, so the REPL shows it once."""

    def __repr__(self) -> str:
        width = max((len(r.name) for r in self), default=len("backend"))
        lines = [f"{'backend':<{width}}  usable  ops / reason"]
        for r in self:
            detail = ", ".join(r.ops) if r.usable else r.reason
            lines.append(f"{r.name:<{width}}  {'yes' if r.usable else 'no':<6}  {detail}")
        return "\n".join(lines)

    __str__ = __repr__


def _load_op_modules() -> None:
    # Importing the package registers every op; this keeps backends() honest if called early.
    importlib.import_module("resonant_kernels")


def backends(print_table: bool = False) -> BackendTable:
    """Each backend: usable in this process or not (and why), and the ops it implements.

    Returns a list of BackendInfo whose repr is the table, so the REPL (or `print(backends())`)
    shows it once; print_table=True also prints it.
    """
    _load_op_modules()
    rows = BackendTable()
    for b in BACKENDS.values():
        why = b.unavailable_reason()
        rows.append(BackendInfo(b.name, why is None, why or "", tuple(sorted(b.impls)), b.summary))
    if print_table:
        print(rows)
    return rows
