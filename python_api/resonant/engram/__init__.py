"""Engram memories for EngramBrain: the store interface and its torch and Milvus stores."""
from .brain import EngramBrain
from .store import EngramStore, Neighbours
from .torch_store import TorchEngramStore

__all__ = ["EngramBrain", "EngramStore", "Neighbours", "TorchEngramStore", "MilvusEngramStore"]


def __getattr__(name):
    # pymilvus is an optional extra: import it only when the Milvus store is asked for
    if name == "MilvusEngramStore":
        from .milvus_store import MilvusEngramStore

        return MilvusEngramStore
    raise AttributeError(name)
