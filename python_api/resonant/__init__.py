"""resonant: the high-level API over resonant_kernels (memories, agents, simulations)."""
import resonant_kernels as kernels

from .engram import EngramBrain, EngramStore, TorchEngramStore
from .trainer import Trainer

__all__ = ["kernels", "EngramBrain", "EngramStore", "TorchEngramStore", "MilvusEngramStore", "Trainer"]


def __getattr__(name):
    # pymilvus is optional (the `milvus` extra): loaded only when the Milvus store is asked for
    if name == "MilvusEngramStore":
        from .engram.milvus_store import MilvusEngramStore

        return MilvusEngramStore
    raise AttributeError(f"module 'resonant' has no attribute {name!r}")
