"""Which engrams leave a full store. A store holds at most `capacity` engrams; when an insert would
exceed it, `count` engrams are evicted by `eviction`:

- "oldest": the lowest insertion indices;
- "random": uniformly at random (the store's seeded generator);
- "smallest": the smallest |outcome|, the least informative (ties: the older engram).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

EVICTION_POLICIES = ("oldest", "random", "smallest")


def choose_evictions(count: int, policy: str, index: np.ndarray, outcome: np.ndarray,
                     rng: Optional[np.random.Generator]) -> np.ndarray:
    """Positions (into index/outcome) of the `count` engrams to evict under `policy`."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if policy == "oldest":
        return np.argsort(index, kind="stable")[:count]
    if policy == "random":
        return rng.choice(len(index), size=count, replace=False)
    # smallest |outcome|; ties go to the older engram
    return np.lexsort((index, np.abs(outcome)))[:count]
