"""The table of (op, backend) the shared tests run, and the one way a test skips a backend.

Each backend runs its tests on its own device — `reference` and `cpu` on CPU tensors, `cuda` on
CUDA tensors, `triton` on CUDA tensors with a GPU and on CPU tensors under Triton's interpreter
without one (tests/conftest.py sets TRITON_INTERPRET=1 there) — and at the sizes that device
allows: the interpreter runs one Triton program at a time in Python, so its cases are tiny
(`interpreted`), and the sizes that span many GPU tiles run on CUDA devices only (`on_gpu`).

A row whose backend cannot run here is skipped with the reason `resonant_kernels.backends()`
gives (no CUDA device, the CUDA module not built, the `triton` package not installed), or the
registry's device and dtype rules; a row on a CUDA device is marked `gpu` (`pytest -m gpu` runs
those on a GPU machine). What is a bug is never a reason to skip: a backend every install has
(`ALWAYS_USABLE`) that cannot run, or a backend module that failed to import for any other reason
than its missing optional package, fails its rows with the cause (`broken`, the `backend_broken`
mark, tests/conftest.py); and a kernel the table says a backend has but the registry lacks is no
reason either: that row runs and fails (test_registry.py checks the table against the registry).

    rows("gaussian_read")                  # [param(backend)] for every backend with that op
    rows("gaussian_read", fused=True, cases=read_cases, dtype=DTYPES)   # (backend, case, dtype)
    @requires("triton", "gaussian_read", where="gpu")                     # a test of one backend
    skip_unless_usable("triton", "gaussian_read", value_dtype=torch.bfloat16)   # inside a test
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import pytest
import torch

import resonant_kernels as rk
from resonant_kernels import _registry

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
# for the tests that build CPU tensors only (fuzzing, hardening, the sync-free path's check), and
# those whose tests run on CUDA tensors.
ON_CPU = tuple(name for name in NAMES if not on_gpu(name))
ON_GPU = tuple(name for name in NAMES if on_gpu(name))

# What backends() says of each backend in this process: usable or not, and why not.
AVAILABILITY = {row.name: row for row in rk.backends()}
# The backends every install has (setup.py always builds resonant_kernels._C): where one cannot
# run, the install is broken.
ALWAYS_USABLE = ("reference", "cpu")
# The package a backend's module imports beyond torch and this library (an extra of pyproject.toml):
# without it the module cannot import, a reason to skip; any other import failure is a bug.
OPTIONAL_PACKAGE = {"triton": "triton"}


def imported(backend: str) -> bool:
    """Whether `backend`'s module imported (one that failed is not in sys.modules)."""
    return f"resonant_kernels.backends.{backend}" in sys.modules


def broken(backend: str) -> Optional[str]:
    """Why `backend` is unusable here by a bug, not by what this machine lacks (None: it is not):
    it is one every install has, or its module failed to import with its optional package there."""
    row = AVAILABILITY[backend]
    if row.usable:
        return None
    if backend in ALWAYS_USABLE:
        return f"every install has the {backend} backend, but here it is unusable: {row.reason}"
    package = OPTIONAL_PACKAGE.get(backend)
    if not imported(backend) and not (package and importlib.util.find_spec(package) is None):
        return f"the {backend} backend is broken (not a reason to skip): {row.reason}"
    return None


def reason(backend: str, op: Optional[str] = None, *, on: Optional[str] = None, dtype: torch.dtype = torch.float64,
           value_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why `backend` cannot run `op` here (None: it can): backends()' reason, then the registry's
    rules for the device (`on`, default `device(backend)`) and the dtypes."""
    row = AVAILABILITY[backend]
    if not row.usable or op is None:
        return row.reason or None
    entry = _registry.BACKENDS[backend]
    where = torch.device(on) if on else device(backend)
    return entry.device_check(where) or entry.dtype_check(op, dtype, value_dtype or dtype)


def _skip_message(backend: str, op: Optional[str], why: str) -> str:
    return f"{backend} backend cannot run {op or 'here'}: {why}"


# Where a test of one backend needs it: (whether it is there, the reason to skip where not).
WHERE = {
    "gpu": (on_gpu, "{} runs under the Triton interpreter here; this test needs it on a GPU"),
    "interpreter": (interpreted, "{} runs on a GPU here; this test needs it under the Triton interpreter"),
}


def marks(backend: str, op: Optional[str] = None, needs: str = "usable", where: Optional[str] = None,
          **rule) -> list:
    """The marks of a row: a failure where `backend` is `broken`, else the skip (with backends()'
    reason) and the `gpu` mark; `rule` as in `reason`.
    needs="module": skip only where the backend's module could not import for want of its optional
    package (the tests of its rules, which hold without its extension or device).
    where: "gpu" or "interpreter", where the test needs the backend to run (`WHERE`)."""
    bug = broken(backend)
    if bug:
        return [pytest.mark.backend_broken(reason=bug)]
    why = reason(backend, op, **rule) if needs == "usable" else (None if imported(backend) else reason(backend))
    found = [pytest.mark.skipif(why is not None, reason=_skip_message(backend, op, why or ""))]
    if where is not None:
        there, message = WHERE[where]
        found.append(pytest.mark.skipif(not there(backend), reason=message.format(backend)))
    if needs == "usable" and on_gpu(backend):
        found.append(pytest.mark.gpu)
    return found


def requires(backend: str, op: Optional[str] = None, **kw):
    """A decorator for a test of one backend: the marks of its row (`marks`' arguments)."""
    found = marks(backend, op, **kw)

    def apply(test):
        for mark in found:
            test = mark(test)
        return test
    return apply


def usable(backend: str, op: Optional[str] = None, **rule) -> bool:
    return reason(backend, op, **rule) is None


def skip_unless_usable(backend: str, op: Optional[str] = None, **rule) -> None:
    """The same skip (or failure, where `broken`) inside a test, where the reason depends on what
    the test builds."""
    bug = broken(backend)
    if bug:
        pytest.fail(bug, pytrace=False)
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
         backends: Optional[Iterable[str]] = None, needs: str = "usable", **axes) -> list:
    """pytest params of the table's rows for `op`: (backend, [case], [one value per axis]...).

    fused: leave out `reference` (the tests compare against it); cases: the cases of each backend
    (its size limits); backends: a subset of the table's; needs: as in `marks`; axes: further
    parameters, each a list of values, whose dtypes (`dtype`, `value_dtype`) also decide the skip.
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
        out.append(pytest.param(*vals, marks=marks(vals[0], op, needs, **rule), id=ident))
    return out


def table(ops: Iterable[str] = OPS, **kw) -> list:
    """pytest params (op, backend, ...) of every op's rows (`rows`' keyword arguments)."""
    return [pytest.param(op, *p.values, marks=p.marks, id=f"{op}-{p.id}") for op in ops for p in rows(op, **kw)]
