"""The packages ship type hints (PEP 561): a py.typed marker, and annotations on the public API of
`resonant` (every parameter and return of its exported classes and functions)."""
from __future__ import annotations

import inspect
from importlib import resources

import resonant
import resonant_kernels

# Owned by the SpatialMemory construction/load rework, which annotates them with its new signature.
PENDING = {"SpatialMemory.__init__", "SpatialMemory.load"}


def public_callables():
    for name in resonant.__all__:
        obj = getattr(resonant, name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if inspect.isfunction(function) and (not attr.startswith("_") or attr == "__init__"):
                    yield f"{name}.{attr}", function
        elif inspect.isfunction(obj):
            yield name, obj


def test_py_typed_markers_ship_with_both_packages():
    for package in (resonant, resonant_kernels):
        assert resources.files(package.__name__).joinpath("py.typed").is_file(), package.__name__


def test_public_api_of_resonant_is_annotated():
    missing = []
    for qualname, function in public_callables():
        if qualname in PENDING:
            continue
        signature = inspect.signature(function)
        for p in signature.parameters.values():
            if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) \
                    and p.annotation is inspect.Parameter.empty:
                missing.append(f"{qualname}({p.name})")
        if not qualname.endswith("__init__") and signature.return_annotation is inspect.Signature.empty:
            missing.append(f"{qualname} -> ?")
    assert not missing, f"unannotated: {missing}"
