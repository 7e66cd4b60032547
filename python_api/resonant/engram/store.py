"""The EngramStore interface: a memory of (state, action, outcome) engrams.

An engram is one step of experience: the (normalised) state the agent was in, the action it
took, the outcome that followed (a discounted return), the return of its whole episode, and a
store-assigned insertion index (monotonic, so "oldest" is well defined across reopen).
Stores hold at most `capacity` engrams; when an insert would exceed it, engrams are evicted by
`eviction` = "oldest" | "random" | "smallest" (engram/eviction.py).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..types import ArrayLike
from . import validation
from .config import Scoring
from .eviction import choose_evictions
from .scoring import from_neighbours


@dataclass
class Neighbours:
    """k nearest engrams per query, nearest first; rows with fewer than k engrams are padded
    with index -1, action -1, outcome 0 and distance +inf."""

    index: torch.Tensor  # (Q, k) int64 insertion indices
    action: torch.Tensor  # (Q, k) int64
    outcome: torch.Tensor  # (Q, k) float32
    distance: torch.Tensor  # (Q, k) float32, Euclidean
    state: Optional[torch.Tensor] = None  # (Q, k, d) float32 (zeros where padded); only search(..., with_states=True)

    @property
    def valid(self) -> torch.Tensor:
        return self.index >= 0


class EngramStore(abc.ABC):
    """Where an EngramBrain keeps its engrams.

    A store calls _configure(state_dim, num_actions, capacity, eviction, seed) when it is built,
    sets _next_index (the insertion index its next engram gets), and implements
      search(states, k, *, with_states=False) -> Neighbours: the k nearest engrams (Euclidean);
      __len__: the engrams stored;
      _insert(states, actions, outcomes, episode_returns): store a validated batch, giving it the
          insertion indices _next_index, _next_index + 1, ... (and advancing _next_index);
      _eviction_view() -> (index, outcome): every stored engram's insertion index and outcome;
      _evict(positions): remove the engrams at these positions of _eviction_view();
    and may override close() (release resources; a store is a context manager) and
    action_values (the same signature) where it has a faster exact route than the k nearest:
    TorchEngramStore scores over the whole memory with one fused read when scoring.k is None.

    What is the same for every store lives here: `add` validates (engram/validation.py) and
    chooses evictions (engram/eviction.py); `action_values` scores with engram/scoring.py.
    """

    state_dim: int
    num_actions: int
    capacity: Optional[int]
    eviction: str
    _next_index: int

    def _configure(self, state_dim, num_actions, capacity, eviction, seed) -> None:
        validation.store_config(state_dim, num_actions, capacity, eviction)
        self.state_dim, self.num_actions = state_dim, num_actions
        self.capacity, self.eviction = capacity, eviction
        self._rng = np.random.default_rng(seed)

    def add(self, states: ArrayLike, actions: ArrayLike, outcomes: ArrayLike,
            episode_returns: ArrayLike = 0.0) -> int:
        """Validates and stores a batch of engrams (evicting if over capacity). Returns how many
        were stored. Nothing is stored when any argument is bad."""
        states, actions, outcomes, returns = validation.engrams(
            states, actions, outcomes, episode_returns, state_dim=self.state_dim, num_actions=self.num_actions
        )
        if self.capacity is not None and states.shape[0] > self.capacity:
            # only the newest `capacity` of an oversized batch can survive anyway
            keep = slice(states.shape[0] - self.capacity, None)
            states, actions, outcomes, returns = states[keep], actions[keep], outcomes[keep], returns[keep]
        n = states.shape[0]
        if n == 0:
            return 0
        if self.capacity is not None:
            over = len(self) + n - self.capacity
            if over > 0:
                index, outcome = self._eviction_view()
                self._evict(choose_evictions(over, self.eviction, index, outcome, self._rng))
        self._insert(states, actions, outcomes, returns)
        return n

    def action_values(self, states: ArrayLike, scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, evidence), both (Q, A): per action, the total weight of the engrams consulted for
        each query state and the weighted sum of their outcomes; sums / evidence is the action's
        estimate (engram/scoring.py). Here: from the scoring.k nearest engrams."""
        if scoring.k is None:
            raise ValueError(f"{type(self).__name__} needs k (k-nearest scoring); kernel-weighted scoring over "
                             "the whole memory is available with TorchEngramStore")
        q = validation.as_states(states, self.state_dim)
        nb = self.search(q, scoring.k, with_states=scoring.estimator == "local_linear")
        return from_neighbours(nb, q, self.num_actions, self._next_index - 1, scoring)

    @abc.abstractmethod
    def search(self, states: ArrayLike, k: int, *, with_states: bool = False) -> Neighbours:
        """The k nearest engrams (Euclidean) of each state, nearest first (with their states when
        with_states)."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _insert(self, states, actions, outcomes, episode_returns) -> None: ...

    @abc.abstractmethod
    def _eviction_view(self) -> tuple[np.ndarray, np.ndarray]:
        """(insertion index, outcome) of every stored engram, as numpy arrays."""

    @abc.abstractmethod
    def _evict(self, positions: np.ndarray) -> None:
        """Removes the engrams at these positions of _eviction_view()."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "EngramStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
