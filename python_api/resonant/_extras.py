"""Optional dependencies: import one, or fail with one line naming the extra that installs it."""
from __future__ import annotations

import importlib


def require(module: str, extra: str, feature: str):
    """The imported `module`; if it is missing, an ImportError whose one-line message says which
    pip extra of resonant-kernels provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{feature} needs {module.split('.')[0]}, which the '{extra}' extra installs: "
                          f"pip install 'resonant-kernels[{extra}]'") from None
