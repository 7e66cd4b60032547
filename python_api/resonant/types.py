"""Type aliases of the public API (the package ships a py.typed marker)."""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
import torch

# A standard deviation: a positive number, or a tensor broadcasting to its locations.
Sd = Union[torch.Tensor, float, int]
# States, actions, rewards, outcomes: a tensor, an array or anything numpy.asarray accepts.
ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]
PathLike = Union[str, os.PathLike]
Device = Union[str, torch.device, None]

__all__ = ["ArrayLike", "Device", "PathLike", "Sd"]
