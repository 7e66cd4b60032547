"""The EngramStore interface: a memory of (state, action, outcome) engrams.

An engram is one step of experience: the (normalised) state the agent was in, the action it
took, the outcome that followed (a discounted return), the return of its whole episode, and a
store-assigned insertion index (monotonic, so "oldest" is well defined across reopen).
Stores hold at most `capacity` engrams; when an insert would exceed it, engrams are evicted by
`eviction` = "oldest" | "random" | "smallest" (smallest |outcome|: the least informative).

Every store validates its input here, before anything is written, so bad input fails the same
way (naming the argument) whichever store would have held it.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from resonant_kernels import validation
from ..types import ArrayLike
from . import local_linear

EVICTION_POLICIES = ("oldest", "random", "smallest")
# how an action's outcomes near a state become its score: the kernel-weighted mean, or the
# intercept of a local linear fit (engram/local_linear.py)
ESTIMATORS = ("mean", "local_linear")


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


def as_states(states: ArrayLike, state_dim: int, name: str = "states") -> torch.Tensor:
    """(N, state_dim) float32 CPU tensor from anything array-like; a single state may be (state_dim,)."""
    t = torch.as_tensor(np.asarray(states, dtype=np.float32) if not isinstance(states, torch.Tensor) else states)
    t = t.detach().to("cpu", torch.float32)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != state_dim:
        raise ValueError(f"{name} must have shape (N, {state_dim}) (state_dim={state_dim}); got {tuple(t.shape)}")
    validation.check_finite(t, name)
    return t


def validate_engrams(states: ArrayLike, actions: ArrayLike, outcomes: ArrayLike, episode_returns: ArrayLike, *,
                     state_dim: int, num_actions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks one batch of engrams; returns (states (N,d) f32, actions (N,) i64, outcomes (N,) f32,
    episode_returns (N,) f32). Raises ValueError/TypeError naming the bad argument."""
    states = as_states(states, state_dim)
    n = states.shape[0]
    actions_t = torch.as_tensor(np.asarray(actions) if not isinstance(actions, torch.Tensor) else actions).reshape(-1)
    if actions_t.dtype.is_floating_point or actions_t.dtype == torch.bool or actions_t.dtype.is_complex:
        raise TypeError(f"actions must be integers, got dtype {actions_t.dtype}")
    actions_t = actions_t.to("cpu", torch.int64)
    outcomes_t = torch.as_tensor(outcomes, dtype=torch.float32).reshape(-1).cpu()
    returns_t = torch.as_tensor(episode_returns, dtype=torch.float32).reshape(-1).cpu()
    if returns_t.numel() == 1 and n != 1:
        returns_t = returns_t.expand(n).clone()
    for name, t in (("actions", actions_t), ("outcomes", outcomes_t), ("episode_returns", returns_t)):
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} entries but states has {n}")
    if n and (actions_t.min() < 0 or actions_t.max() >= num_actions):
        bad = actions_t[(actions_t < 0) | (actions_t >= num_actions)][0].item()
        raise ValueError(f"actions must lie in [0, {num_actions}); got {bad}")
    validation.check_finite(outcomes_t, "outcomes")
    validation.check_finite(returns_t, "episode_returns")
    return states, actions_t, outcomes_t, returns_t


def check_store_config(state_dim: int, num_actions: int, capacity: Optional[int], eviction: str) -> None:
    if not isinstance(state_dim, int) or state_dim < 1:
        raise ValueError(f"state_dim must be a positive integer, got {state_dim!r}")
    if not isinstance(num_actions, int) or num_actions < 1:
        raise ValueError(f"num_actions must be a positive integer, got {num_actions!r}")
    if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
        raise ValueError(f"capacity must be a positive integer or None, got {capacity!r}")
    if eviction not in EVICTION_POLICIES:
        raise ValueError(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")


def choose_evictions(count: int, policy: str, index: np.ndarray, outcome: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Positions (into index/outcome) of the `count` engrams to evict under `policy`."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if policy == "oldest":
        return np.argsort(index, kind="stable")[:count]
    if policy == "random":
        return rng.choice(len(index), size=count, replace=False)
    # smallest |outcome|; ties go to the older engram
    return np.lexsort((index, np.abs(outcome)))[:count]


def check_positive_or_none(value, name: str) -> Optional[float]:
    """A finite positive number as float, or None; anything else raises ValueError naming `name`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    return float(value)


def recency_weights(index: torch.Tensor, newest_index: int, recency_halflife: Optional[float]) -> torch.Tensor:
    """Evidence weight 2^(−age / recency_halflife) of engrams with these insertion indices, where age
    is the number of engrams stored after it (the newest weighs 1); all ones when halflife is None.

    Why: outcomes are returns of the policy that was acting when the engram was stored; as the
    policy improves, older outcomes describe a worse policy, so they should count for less."""
    if recency_halflife is None:
        return torch.ones(index.shape, dtype=torch.float32)
    age = (newest_index - index).clamp_min(0).double()
    return torch.exp2(-age / recency_halflife).float()


def check_estimator(estimator: str, ridge, outcome_temperature: Optional[float]) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if estimator == "local_linear" and outcome_temperature is not None:
        raise ValueError("outcome_temperature cannot be combined with estimator='local_linear': the tilted mean "
                         "is not a weighted sum the local linear fit can use")


# Outcomes more than this many temperatures below the best are all tilted by exp(-TILT_FLOOR): far
# below float32's limits even after the kernel weight multiplies it, so a state whose evidence is
# all poor still reads that evidence instead of underflowing to "no evidence".
TILT_FLOOR = 30.0


def outcome_tilt(outcome: torch.Tensor, best: torch.Tensor, temperature: Optional[float]) -> torch.Tensor:
    """exp((outcome − best) / temperature), floored at exp(−TILT_FLOOR); ones when temperature is None.

    Why: an action's score is the tilted weighted mean of its outcomes, a soft maximum between the
    plain mean (temperature → ∞) and the best outcome seen (→ 0, as model-free episodic control
    keeps the max): the returns that followed an action mix what the action allows with the
    mistakes of the (exploring, older) policy that acted afterwards."""
    if temperature is None:
        return torch.ones(outcome.shape, dtype=torch.float32)
    return torch.exp(((outcome.double() - best) / temperature).clamp_min(-TILT_FLOOR)).float()


def tilted_sums(tilted_sums_: torch.Tensor, tilted_evidence: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """sums whose ratio to `evidence` is the tilted mean: (Σ w·t·o / Σ w·t) · Σ w (0 where no evidence)."""
    return torch.where(tilted_evidence > 0, tilted_sums_ / tilted_evidence.clamp_min(1e-38), 0.0) * evidence


def weighted_action_values(nb: Neighbours, num_actions: int, bandwidth: Optional[float], *,
                           recency_halflife: Optional[float] = None, newest_index: int = 0,
                           outcome_temperature: Optional[float] = None, estimator: str = "mean",
                           ridge: float = 0.01, query: Optional[torch.Tensor] = None):
    """Per-action weighted outcome sums and evidence weights from neighbours: (Q, A), (Q, A).
    Evidence weights are Gaussian in the distance (bandwidth) or uniform (bandwidth None), times
    the recency weight of each engram (recency_weights; newest_index: the newest engram's index).
    sums / evidence is each action's score: the weighted mean outcome, tilted towards the better
    outcomes with outcome_temperature (outcome_tilt, relative to the query's best neighbour), or
    with estimator="local_linear" the intercept of the local linear fit over the neighbours
    (needs nb.state, the query states and a bandwidth, which scales the ridge)."""
    valid = nb.valid
    if bandwidth is None:
        w = valid.float()
    else:
        # relative to the nearest neighbour, so far-but-nearest evidence does not underflow
        d2 = torch.where(valid, nb.distance.double() ** 2, torch.inf)
        w = torch.exp(-(d2 - d2.min(dim=1, keepdim=True).values.clamp_max(1e300)) / (2 * bandwidth**2)).float()
        w = torch.where(valid, w, torch.zeros_like(w))
    if recency_halflife is not None:
        w = w * recency_weights(nb.index, newest_index, recency_halflife)
    act = nb.action.clamp_min(0)
    Q = nb.action.shape[0]
    if estimator == "local_linear":
        if nb.state is None or query is None or bandwidth is None:
            raise ValueError("estimator='local_linear' over neighbours needs their states, the query states and a "
                             "bandwidth")
        return local_linear.scores_from_neighbours(query, nb.state, act, nb.outcome, w, num_actions, ridge, bandwidth)
    evidence = torch.zeros(Q, num_actions).scatter_add_(1, act, w)
    if outcome_temperature is None:
        return torch.zeros(Q, num_actions).scatter_add_(1, act, w * nb.outcome), evidence
    best = torch.where(valid, nb.outcome.double(), -torch.inf).max(dim=1, keepdim=True).values
    wt = w * outcome_tilt(nb.outcome, best.clamp_min(-1e300), outcome_temperature)
    sums_t = torch.zeros(Q, num_actions).scatter_add_(1, act, wt * nb.outcome)
    evidence_t = torch.zeros(Q, num_actions).scatter_add_(1, act, wt)
    return tilted_sums(sums_t, evidence_t, evidence), evidence


class EngramStore(abc.ABC):
    """Where an EngramBrain keeps its engrams. Subclasses implement _insert, _evict, search,
    __len__ and close, and keep _next_index (the insertion index the next engram will get);
    validation and eviction choice live here."""

    state_dim: int
    num_actions: int
    capacity: Optional[int]
    eviction: str
    _next_index: int

    def _configure(self, state_dim, num_actions, capacity, eviction, seed) -> None:
        check_store_config(state_dim, num_actions, capacity, eviction)
        self.state_dim, self.num_actions = state_dim, num_actions
        self.capacity, self.eviction = capacity, eviction
        self._rng = np.random.default_rng(seed)

    def add(self, states: ArrayLike, actions: ArrayLike, outcomes: ArrayLike,
            episode_returns: ArrayLike = 0.0) -> int:
        """Validates and stores a batch of engrams (evicting if over capacity). Returns how many
        were stored. Nothing is stored when any argument is bad."""
        states, actions, outcomes, returns = validate_engrams(
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

    def action_values(self, states: ArrayLike, *, k: Optional[int], bandwidth: Optional[float],
                      recency_halflife: Optional[float] = None, outcome_temperature: Optional[float] = None,
                      estimator: str = "mean", ridge: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, evidence), both (Q, A): per action, the total weight of the engrams consulted for
        each query state and the weighted sum of their outcomes (sums / evidence is the score;
        see weighted_action_values for recency_halflife and outcome_temperature). The base
        version uses the k nearest engrams (search); stores with a faster exact route override it.
        estimator="local_linear" (ridge: its slope's regularisation) fits over the k neighbours,
        Gaussian-weighted, so it needs a bandwidth."""
        check_estimator(estimator, ridge, outcome_temperature)
        if k is None:
            raise ValueError(f"{type(self).__name__} needs k (k-nearest scoring); kernel-weighted scoring over "
                             "the whole memory is available with TorchEngramStore")
        if estimator == "local_linear" and bandwidth is None:
            raise ValueError("estimator='local_linear' needs a bandwidth (Gaussian weights over the k neighbours)")
        recency_halflife = check_positive_or_none(recency_halflife, "recency_halflife")
        outcome_temperature = check_positive_or_none(outcome_temperature, "outcome_temperature")
        local = estimator == "local_linear"
        q = as_states(states, self.state_dim)
        return weighted_action_values(self.search(q, k, with_states=local), self.num_actions, bandwidth,
                                      recency_halflife=recency_halflife, newest_index=self._next_index - 1,
                                      outcome_temperature=outcome_temperature, estimator=estimator, ridge=ridge,
                                      query=q)

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

    def check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        return k
