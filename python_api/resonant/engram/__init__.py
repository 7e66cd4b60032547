"""EngramBrain, its options (Scoring, Outcomes, Exploration), the store interface and its torch and
Milvus stores."""
from typing import TYPE_CHECKING, Any

from .brain import EngramBrain
from .config import Exploration, Outcomes, Scoring
from .relevance import LearnedRelevance
from .store import EngramStore, Neighbours
from .torch_store import TorchEngramStore

if TYPE_CHECKING:
    from .milvus_store import MilvusEngramStore

__all__ = ["EngramBrain", "Scoring", "Outcomes", "Exploration", "LearnedRelevance", "EngramStore", "Neighbours", "TorchEngramStore",
           "MilvusEngramStore"]


def __getattr__(name: str) -> Any:
    # pymilvus is an optional extra: import it only when the Milvus store is asked for
    if name == "MilvusEngramStore":
        from .milvus_store import MilvusEngramStore

        return MilvusEngramStore
    raise AttributeError(name)
