"""The table of (op, backend) the shared tests run, and the one way a test skips a backend.

Each backend runs its tests on its own device — `reference` and `cpu` on CPU tensors, `cuda` on
CUDA tensors, `triton` on CUDA tensors with a GPU and on CPU tensors under Triton's interpreter
without one (tests/conftest.py sets TRITON_INTERPRET=1 there) — and at the sizes that device
allows: the interpreter runs one Triton program at a time in Python, so its cases are tiny
(`interpreted`), and the sizes that span many GPU tiles run on CUDA devices only (`on_gpu`).

A row whose backend cannot run here is skipped with the registry's own reason
(`_registry.BACKENDS[name]`: the backend's availability, device and dtype rules), and a row on a
CUDA device is marked `gpu` (`pytest -m gpu` runs those on a GPU machine). A kernel the table says a
backend has but the registry lacks is not a reason: that row runs and fails (test_registry.py
checks the table against the registry).

    rows("gaussian_read")                  # [param(backend)] for every backend with that op
    rows("gaussian_read", fused=True, cases=read_cases, dtypes=DTYPES)   # (backend, case, dtype)
    skip_unless_usable("triton", "gaussian_read", value_dtype=torch.bfloat16)   # inside a test
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import pytest
import torch

from resonant_kernels import _registry

_registry._load_backends()

OPS = tuple(_registry.OP_KERNELS)
NAMES = _registry.BACKEND_NAMES
FUSED = tuple(name for name in NAMES if name != "reference")
SAMPLING = ("conditional_probs", "conditional_sample")

# The ops each backend implements. cuda has no leave-one-out kernels (triton serves them on GPUs).
IMPLEMENTS = {
    "reference": OPS,
    "cpu": OPS,
    "triton": OPS,
    "cuda": ("gaussian_read", *SAMPLING),
}


@dataclass(frozen=True)
class Tol:
    """|actual − expected| ≤ atol + scale·max|expected| + rtol·|expected|, elementwise."""

    rtol: float
    atol: float
    scale: float = 0.0

    def check(self, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        size = float(expected.detach().abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(actual.float(), expected, rtol=self.rtol, atol=self.atol + self.scale * size,
                                   msg=lambda m: f"{what}: {m}")


# gaussian_read's half-precision values (weights @ values on tensor cores, accumulated in float32)
# on the backends that take them, against the reference on the same values held in float32:
# (output, gradient) tolerances per value dtype. triton's are relative to each tensor's scale.
HALF_VALUES = {
    "triton": {torch.float16: (Tol(0, 0, 2e-2), Tol(0, 1e-6, 3e-2)),
               torch.bfloat16: (Tol(0, 0, 2e-2), Tol(0, 1e-6, 3e-2))},
    "cuda": {torch.float16: (Tol(4e-3, 4e-3), Tol(2e-2, 2e-2)),
             torch.bfloat16: (Tol(2e-2, 2e-2), Tol(1e-1, 1e-1))},
}

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
HALF = {torch.float16: "f16", torch.bfloat16: "bf16"}


def interpreted(backend: str) -> bool:
    """True where `backend` runs under the Triton interpreter: tiny cases only."""
    return backend == "triton" and _registry.triton_interpreting()


def device(backend: str) -> torch.device:
    """The device `backend`'s tests put their tensors on."""
    gpu = backend == "cuda" or (backend == "triton" and not _registry.triton_interpreting())
    return torch.device("cuda" if gpu else "cpu")


def on_gpu(backend: str) -> bool:
    """True where `backend` runs on a CUDA device: the sizes that span many GPU tiles run there."""
    return device(backend).type == "cuda"


# The backends whose tests run on CPU tensors in this process (the triton interpreter's included),
# for the tests that build CPU tensors only (fuzzing, hardening, the sync-free path's check).
ON_CPU = tuple(name for name in NAMES if not on_gpu(name))


def not_imported(backend: str) -> Optional[str]:
    """Why `backend`'s module failed to import (it then registered nothing), or None."""
    entry = _registry.BACKENDS[backend]
    return None if entry.ops() else entry.unavailable_reason()


def reason(backend: str, op: Optional[str] = None, *, on: Optional[str] = None, dtype: torch.dtype = torch.float64,
           value_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why `backend` cannot run `op` here (None: it can), in the registry's words: its availability,
    then its rules for the device (`on`, default `device(backend)`) and the dtypes."""
    entry = _registry.BACKENDS[backend]
    why = entry.unavailable_reason()
    if why or op is None:
        return why
    where = torch.device(on) if on else device(backend)
    return entry.device_check(where) or entry.dtype_check(op, dtype, value_dtype or dtype)


def _skip_message(backend: str, op: Optional[str], why: str) -> str:
    return f"{backend} backend cannot run {op or 'here'}: {why}"


def marks(backend: str, op: Optional[str] = None, needs: str = "usable", **rule) -> list:
    """The skip (with the registry's reason) and the `gpu` mark of a row; `rule` as in `reason`.
    needs="module": skip only where the backend's module failed to import (the tests of its rules,
    which hold without its extension or device)."""
    why = reason(backend, op, **rule) if needs == "usable" else not_imported(backend)
    found = [pytest.mark.skipif(why is not None, reason=_skip_message(backend, op, why or ""))]
    if needs == "usable" and on_gpu(backend) and rule.get("on") in (None, "cuda"):
        found.append(pytest.mark.gpu)
    return found


def requires(backend: str, op: Optional[str] = None, *, gpu: bool = False, **rule):
    """A decorator for a test of one backend: its skip and `gpu` marks (`marks`); gpu=True: the test
    also needs the backend on a CUDA device (not under the Triton interpreter)."""
    found = marks(backend, op, **rule)
    if gpu:
        found += [pytest.mark.gpu, pytest.mark.skipif(not on_gpu(backend), reason=(
            f"{backend} runs under the Triton interpreter here; this test needs it on a GPU"))]

    def apply(test):
        for mark in found:
            test = mark(test)
        return test
    return apply


def usable(backend: str, op: Optional[str] = None, **rule) -> bool:
    return reason(backend, op, **rule) is None


def skip_unless_usable(backend: str, op: Optional[str] = None, **rule) -> None:
    """The same skip inside a test, where the reason depends on what the test builds."""
    why = reason(backend, op, **rule)
    if why:
        pytest.skip(_skip_message(backend, op, why))


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return HALF.get(value) or {torch.float32: "f32", torch.float64: "f64"}[value]
    return str(value)


def _values(axis) -> list:
    """(value, id) of each entry of a parameter axis: pytest.params keep their own ids."""
    return [(p.values[0], p.id) if isinstance(p, type(pytest.param(0))) else (p, _id(p)) for p in axis]


def rows(op: str, *, fused: bool = False, cases: Optional[Callable[[str], Iterable]] = None,
         backends: Optional[Iterable[str]] = None, on: Optional[str] = None, needs: str = "usable", **axes) -> list:
    """pytest params of the table's rows for `op`: (backend, [case], [one value per axis]...).

    fused: leave out `reference` (the tests compare against it); cases: the cases of each backend
    (its size limits); backends: a subset of the table's; on: run every row on this device type
    (the tests that build CPU tensors); needs: as in `marks`; axes: further parameters, each a list of values, whose
    dtypes (`dtype`, `value_dtype`) also decide the skip.
    """
    names = [b for b in NAMES if op in IMPLEMENTS[b] and not (fused and b == "reference")]
    if backends is not None:
        names = [b for b in names if b in backends]
    grid = [((b,), b) for b in names]
    if cases is not None:
        grid = [((b, c), f"{b}-{c}") for b in names for c in cases(b)]
    for axis in axes.values():
        grid = [(vals + (v,), f"{ident}-{vid}") for vals, ident in grid for v, vid in _values(axis)]
    out = []
    for vals, ident in grid:
        named = dict(zip(axes, vals[len(vals) - len(axes):]))
        rule = {k: named[k] for k in ("dtype", "value_dtype") if k in named}
        if "value_dtype" in rule and "dtype" not in rule:
            rule["dtype"] = torch.float32
        out.append(pytest.param(*vals, marks=marks(vals[0], op, needs, on=on, **rule), id=ident))
    return out


def table(ops: Iterable[str] = OPS, **kw) -> list:
    """pytest params (op, backend, ...) of every op's rows (`rows`' keyword arguments)."""
    return [pytest.param(op, *p.values, marks=p.marks, id=f"{op}-{p.id}") for op in ops for p in rows(op, **kw)]
