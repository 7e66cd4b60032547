"""The backend registry: which backends exist, which kernels each implements, and dispatch.

Every public op runs one or more *kernels* (custom ops, see the op modules): the read runs
`read_forward` and `read_backward`, leave-one-out and pruning run `loo_errors` and
`loo_dependencies`, sampling runs `sample_probs` or `sample_indices`. A backend is a module in
`resonant_kernels/backends/` that describes itself (`Backend`) and registers one implementation
per kernel it supports (`register`); `reference` is registered like any other. `select` picks the
backend of a call (or says why the requested one cannot run it), and `implementation` is what a
custom op calls.

A backend module that fails to import is still listed, unusable, with the exception's text
(`record_import_failure`), so `backends()` shows the cause instead of a missing op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# The kernels behind each public op.
OP_KERNELS = {
    "gaussian_read": ("read_forward", "read_backward"),
    "leave_one_out": ("loo_errors", "loo_dependencies"),
    "prune_mask": ("loo_errors", "loo_dependencies"),
    "conditional_probs": ("sample_probs",),
    "conditional_sample": ("sample_indices",),
}

AUTO_ORDER = {
    # Which usable backend `backend="auto"` takes first, by device type.
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

# The order backends() lists them in.
BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")


@dataclass
class Backend:
    """What a backend module tells the registry about itself."""

    name: str
    summary: str
    # why the backend is unusable anywhere in this process (None: usable); called lazily
    availability: Callable[[], Optional[str]]
    # why it cannot run on a device of this type (None: it can)
    device_check: Callable[[torch.device], Optional[str]]
    # why it cannot run `op` on these (location, value) dtypes (None: it can)
    dtype_check: Callable[[str, torch.dtype, torch.dtype], Optional[str]]

    def unavailable_reason(self) -> Optional[str]:
        return self.availability()

    def reason(self, op: str, device: torch.device, loc_dtype: torch.dtype, value_dtype: torch.dtype) -> Optional[str]:
        """Why this backend cannot run `op` on these arguments, or None."""
        why = self.unavailable_reason()
        if why:
            return why
        missing = [k for k in OP_KERNELS[op] if (k, self.name) not in _IMPLS]
        if missing:
            return f"the {self.name} backend does not implement {op}"
        return self.device_check(device) or self.dtype_check(op, loc_dtype, value_dtype)

    def ops(self) -> tuple[str, ...]:
        return tuple(op for op, kernels in OP_KERNELS.items() if all((k, self.name) in _IMPLS for k in kernels))


BACKENDS: dict[str, Backend] = {}
_IMPLS: dict[tuple[str, str], Callable] = {}


def add_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def record_import_failure(name: str, summary: str, exc: BaseException) -> None:
    """Lists backend `name` as unusable because its module failed to import."""
    why = f"its module failed to import ({type(exc).__name__}: {exc})"
    add_backend(Backend(name, summary, lambda: why, lambda _: why, lambda *_: why))


def register(backend: str, kernel: str, impl: Callable) -> None:
    if not any(kernel in kernels for kernels in OP_KERNELS.values()):
        raise ValueError(f"unknown kernel {kernel!r}")
    _IMPLS[(kernel, backend)] = impl


def register_kernels(backend: str, namespace: dict) -> None:
    """Registers every function in `namespace` (a backend module's globals()) named after a kernel."""
    for kernels in OP_KERNELS.values():
        for kernel in kernels:
            if kernel in namespace:
                register(backend, kernel, namespace[kernel])


def implementation(kernel: str, backend: str) -> Callable:
    return _IMPLS[(kernel, backend)]


# Tensor types that intercept nothing (a Parameter disables __torch_function__); any other subclass
# (fake tensors, DTensor, ...) may override what the op does and gets the custom op.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _dispatch_modes_active() -> bool:
    """Whether a dispatch mode (fake tensors, tracing, profiling modes), a torch-function mode or a
    functorch transform (vmap, grad) is active: each must see the custom op. True where this torch
    lacks the private query (the custom op then always runs)."""
    try:
        return bool(torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
                    or torch._C._are_functorch_transforms_active())
    except AttributeError:
        return True


def custom_op_needed(args) -> bool:
    """Whether a kernel call must run through its custom op: torch.compile traces the op, autograd
    records it (a tensor argument requires grad while grad mode is on), and tensor subclasses,
    dispatch modes and functorch transforms intercept it. Without any of them the op only adds its
    dispatch (its Python autograd and backend layers) in front of its body."""
    if torch.compiler.is_compiling():
        return True
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors):
        return True
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return _dispatch_modes_active()


def run_kernel(op, *args):
    """op(*args) for a kernel's custom op (`torch.library.custom_op`), or the op's own body with the
    same arguments where the custom op adds nothing (custom_op_needed): the same function, the
    same result, without the dispatch: ~15 µs a call warm, ~0.2 ms right after a large product has
    left the caches cold (2-core development machine: a gaussian_read of 4 queries took 0.91 ms
    right after a (3000 x 1500) @ (1500 x 512) product against 0.14 ms warm, and 0.63 ms with this
    and validation.batch_shape's shortcut; the dense read's forward at (Q, M, E) = (3000, 1500, 512)
    went from 1.111x to 1.103x the bare product with this alone, in one interleaved run). The body
    is the function the op was made from (CustomOpDef's `_init_fn`); where a torch release lacks
    it, the op always runs."""
    body = getattr(op, "_init_fn", None)
    if body is None or custom_op_needed(args):
        return op(*args)
    return body(*args)


# Under torch.compile the choice is a constant of the graph (it depends on names, devices and
# dtypes only), so the compiler need not trace the availability checks (imports, environment).
@torch.compiler.assume_constant_result
def select(op: str, backend: str, device: torch.device, loc_dtype: torch.dtype,
           value_dtype: Optional[torch.dtype] = None) -> str:
    """The name of the backend to run `op` on, or a ValueError saying why the requested one cannot."""
    _load_backends()
    value_dtype = value_dtype or loc_dtype
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        reasons = []
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            why = BACKENDS[name].reason(op, device, loc_dtype, value_dtype)
            if why is None:
                return name
            reasons.append(f"{name}: {why}")
        raise ValueError(f"no backend can run {op} here: " + "; ".join(reasons))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {['auto', *BACKENDS]}")
    why = BACKENDS[backend].reason(op, device, loc_dtype, value_dtype)
    if why:
        raise ValueError(f"backend {backend!r} cannot run {op} on {device} ({loc_dtype}): {why}")
    return backend


# ---- device and dtype rules shared by the backend modules ------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float64)
# the read's value dtypes on GPUs: half-precision values (tensor cores) under float32 locations
HALF_READ_VALUES = {torch.float32: (torch.float32, torch.bfloat16, torch.float16), torch.float64: (torch.float64,)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def float_dtypes(read_values: Optional[dict] = None) -> Callable[[str, torch.dtype, torch.dtype], Optional[str]]:
    """The dtype rule of the fused kernels: float32 or float64 locations, values in the locations'
    dtype, except gaussian_read's values where `read_values` (location dtype -> value dtypes) allows more."""
    def check(op: str, loc_dtype: torch.dtype, value_dtype: torch.dtype) -> Optional[str]:
        if loc_dtype not in FLOAT_DTYPES:
            return f"supports float32 and float64 locations, got {_dtype_name(loc_dtype)}"
        allowed = read_values[loc_dtype] if read_values and op == "gaussian_read" else (loc_dtype,)
        if value_dtype not in allowed:
            names = ", ".join(_dtype_name(d) for d in allowed)
            return f"{op} with {_dtype_name(loc_dtype)} locations needs mem_values in {names}, got {_dtype_name(value_dtype)}"
        return None

    return check


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def any_device(_: torch.device) -> Optional[str]:
    return None


def cpu_only(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else f"runs on CPU tensors only, got {device}"


def cuda_only(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else f"runs on CUDA tensors only, got {device}"


# ---- the table ----------------------------------------------------------------------------------

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


def _load_backends() -> None:
    if len(BACKENDS) < len(BACKEND_NAMES):
        from . import backends  # noqa: F401 - importing it registers every backend


def backends(print_table: bool = False) -> BackendTable:
    """Each backend: usable in this process or not (and why), and the ops it implements.

    Returns a list of BackendInfo whose repr is the table (the REPL, or `print(backends())`, shows
    it once); print_table=True also prints it.
    """
    _load_backends()
    rows = BackendTable()
    for name in BACKEND_NAMES:
        b = BACKENDS[name]
        why = b.unavailable_reason()
        rows.append(BackendInfo(b.name, why is None, why or "", b.ops(), b.summary))
    if print_table:
        print(rows)
    return rows
