"""resonant: the high-level API over resonant_kernels (memories, agents, simulations)."""
from typing import TYPE_CHECKING, Any

import resonant_kernels as kernels

from .drives import DriveClassifier
from .engram import EngramBrain, EngramStore, Exploration, Outcomes, Scoring, TorchEngramStore
from .hippocampus import PatternMemory
from .memory import PruneHandle, SpatialMemory
from .trainer import Trainer

# resonant.sim (TreeWorld) needs gymnasium, an optional dependency: import it explicitly.
__all__ = [
    "kernels", "DriveClassifier", "PatternMemory", "PruneHandle", "SpatialMemory",
    "EngramBrain", "Scoring", "Outcomes", "Exploration", "EngramStore", "TorchEngramStore", "MilvusEngramStore",
    "Trainer",
]


if TYPE_CHECKING:
    from .engram.milvus_store import MilvusEngramStore


def __getattr__(name: str) -> Any:
    # pymilvus is optional (the `milvus` extra): loaded only when the Milvus store is asked for
    if name == "MilvusEngramStore":
        from .engram.milvus_store import MilvusEngramStore

        return MilvusEngramStore
    raise AttributeError(f"module 'resonant' has no attribute {name!r}")
