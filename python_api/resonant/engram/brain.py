"""EngramBrain: act from the outcomes of similar past experience (episodic control).

Each step of an episode becomes an engram (state, action, outcome) whose outcome is the
discounted return that followed it (Monte-Carlo, discount `gamma`). To decide, every action is
scored by the weighted mean outcome of the engrams near the state that took that action:
kernel-weighted over the whole memory (k=None, TorchEngramStore: one fused gaussian_read for all
actions) or over the k nearest engrams (any store; Gaussian weights in the distance, or uniform
when bandwidth is None). An action whose share of the evidence is below `min_evidence` is scored
by the explicit `prior`: a float, or "neighbourhood" (the mean outcome of all evidence at that
state, falling back to `empty_prior` where there is none).

`estimator="local_linear"` scores each action by the intercept of a local linear fit of outcome
on state around the query (over the whole memory, or over the k nearest) instead of the plain
weighted mean:
the engrams behind different actions sit at different places in the neighbourhood (the policy
chose them by state), and the fit corrects for where they sit (engram/local_linear.py). It is
the default of `resonant train` (BENCHMARKS.md).

Two optional reweightings (both off by default; store.recency_weights, store.outcome_tilt):
`recency_halflife` (in engrams) halves an engram's evidence for every recency_halflife engrams
stored after it, so the scores follow the current policy's outcomes rather than the average over
every policy that ever acted; `outcome_temperature` T scores each action by its
exp(outcome/T)-weighted mean, a soft maximum between the mean (T → ∞) and the best outcome seen
(T → 0, as model-free episodic control keeps). Neither helped on LunarLander (BENCHMARKS.md).

Exploration: epsilon-greedy with epsilon decaying geometrically per remembered episode, from
epsilon_start to epsilon_end (epsilon_end 0: fully greedy in the end, which did best on
LunarLander: the episodes that count are the ones played while learning), or
`policy="softmax"`: P(a) ∝ exp(beta · score(a)), projective simulation's energy-based policy.
`credit="glow"` turns the discounted returns into projective simulation's glow credit with
glow rate η = 1 − gamma (the same discount, cut where a (state, action) pair repeats within the
episode). Both are described in engram/policy.py.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..types import ArrayLike
from .policy import check_credit, check_policy, glow_credit, select_actions
from .store import EngramStore, as_states, check_estimator, check_positive_or_none, validate_engrams


# The largest |return| an engram may carry. The stores keep outcomes in float32 (max 3.4e38) and a
# decision reads weighted sums of them over the whole memory; with returns up to 1e30 those sums
# stay finite for memories of up to ~1e8 engrams (the read's bound is float32 max / 2M).
RETURN_LIMIT = 1e30


def discounted_returns(rewards: Sequence[float], gamma: float, tail_value: float = 0.0) -> np.ndarray:
    """G_t = Σ_i γ^i r_{t+i} + γ^(T−t) tail_value for every step t of an episode of length T."""
    out = np.zeros(len(rewards), dtype=np.float64)
    running = float(tail_value)
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def n_step_targets(rewards: np.ndarray, values: np.ndarray, gamma: float, n: int) -> np.ndarray:
    """G_t = Σ_{i<n} γ^i r_{t+i} + γ^n values[t+n]; values has T+1 entries (values[T] is the
    value after the last step: 0 for a terminal state)."""
    T = len(rewards)
    disc = gamma ** np.arange(n)
    padded = np.concatenate([rewards, np.zeros(n)])
    sums = np.array([padded[t:t + n] @ disc for t in range(T)])
    boot = np.minimum(np.arange(T) + n, T)
    return sums + gamma ** (boot - np.arange(T)) * values[boot]


class EngramBrain:
    def __init__(self, state_dim: int, num_actions: int, store: EngramStore, *, k: Optional[int] = None,
                 bandwidth: Optional[float] = 0.5, match_threshold: Optional[float] = None,
                 gamma: float = 0.99, prior: Union[float, str] = "neighbourhood", empty_prior: float = 0.0,
                 min_evidence: float = 1e-3, epsilon_start: float = 1.0, epsilon_end: float = 0.02,
                 epsilon_decay: float = 0.995, seed: Optional[int] = None,
                 n_step: Optional[int] = None, recency_halflife: Optional[float] = None,
                 outcome_temperature: Optional[float] = None, estimator: str = "mean", ridge: float = 0.01,
                 normalise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 policy: str = "epsilon_greedy", beta: float = 1.0, credit: str = "discount"):
        if store.state_dim != state_dim or store.num_actions != num_actions:
            raise ValueError(f"store holds {store.state_dim}-dim states and {store.num_actions} actions; the brain "
                             f"was given state_dim={state_dim}, num_actions={num_actions}")
        if k is not None:
            store.check_k(k)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        if isinstance(prior, str) and prior != "neighbourhood":
            raise ValueError(f"prior must be a float or 'neighbourhood', got {prior!r}")
        for name, value in (("epsilon_start", epsilon_start), ("epsilon_end", epsilon_end),
                            ("epsilon_decay", epsilon_decay)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        self.state_dim, self.num_actions, self.store = state_dim, num_actions, store
        self.k, self.bandwidth, self.match_threshold = k, bandwidth, match_threshold
        self.gamma, self.prior, self.empty_prior, self.min_evidence = gamma, prior, float(empty_prior), min_evidence
        self.epsilon, self.epsilon_end, self.epsilon_decay = epsilon_start, epsilon_end, epsilon_decay
        if n_step is not None and (isinstance(n_step, bool) or not isinstance(n_step, int) or n_step < 1):
            raise ValueError(f"n_step must be a positive integer or None (Monte-Carlo), got {n_step!r}")
        self.n_step = n_step
        self.recency_halflife = check_positive_or_none(recency_halflife, "recency_halflife")
        self.outcome_temperature = check_positive_or_none(outcome_temperature, "outcome_temperature")
        check_estimator(estimator, ridge, self.outcome_temperature)
        if estimator == "local_linear" and bandwidth is None:
            raise ValueError("estimator='local_linear' needs a bandwidth (it weighs the fit and scales its ridge)")
        self.estimator, self.ridge = estimator, float(ridge)
        self.normalise = normalise
        self.policy, self.beta, self.credit = policy, check_policy(policy, beta), check_credit(credit)
        if credit == "glow" and n_step is not None:
            raise ValueError("credit='glow' spreads Monte-Carlo rewards; it cannot be combined with n_step")
        self._rng = np.random.default_rng(seed)

    def _prepare(self, states) -> torch.Tensor:
        s = as_states(states, self.state_dim)
        return self.normalise(s) if self.normalise is not None else s

    def action_scores(self, states: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (Q, A), evidence share (Q, A)) for a batch of raw states."""
        s = self._prepare(states)
        # match_threshold only shapes kernel-weighted scoring (k=None); None keeps the store's default
        kwargs = {"match_threshold": self.match_threshold} if self.k is None and self.match_threshold else {}
        for name in ("recency_halflife", "outcome_temperature"):
            if getattr(self, name) is not None:  # stores without the option keep working when it is off
                kwargs[name] = getattr(self, name)
        if self.estimator != "mean":
            kwargs.update(estimator=self.estimator, ridge=self.ridge)
        sums, evidence = self.store.action_values(s, k=self.k, bandwidth=self.bandwidth, **kwargs)
        total_evidence = evidence.sum(1, keepdim=True)
        share = evidence / total_evidence.clamp_min(1e-30)
        has = share >= self.min_evidence
        if self.prior == "neighbourhood":
            prior = torch.where(total_evidence > 0, sums.sum(1, keepdim=True) / total_evidence.clamp_min(1e-30),
                                torch.full_like(total_evidence, self.empty_prior))
        else:
            prior = torch.full_like(total_evidence, float(self.prior))
        mean = sums / evidence.clamp_min(1e-30)
        return torch.where(has, mean, prior.expand_as(mean)), share

    def decide(self, states: ArrayLike, *, explore: bool = True) -> np.ndarray:
        """One action per state (a batch (Q, state_dim) or a single state) as an int64 array (Q,)."""
        scores, _ = self.action_scores(states)
        return select_actions(scores.numpy(), self._rng, policy=self.policy, epsilon=self.epsilon, beta=self.beta,
                              explore=explore)

    def remember(self, states: ArrayLike, actions: ArrayLike, rewards: ArrayLike, *,
                 final_state: Optional[ArrayLike] = None, terminated: bool = True) -> int:
        """Stores one finished episode and decays epsilon; returns the engrams stored.

        Outcomes are discounted returns: Monte-Carlo (n_step None), or n-step targets that
        bootstrap from the memory's greedy value of the state n steps later. A truncated episode
        (terminated False) bootstraps from `final_state`, the observation after the last step.
        The episode's total reward is kept beside every engram.

        Checked before anything is stored or epsilon moves (errors name the argument): a nonempty
        episode, one reward and one action per state, finite rewards whose returns fit the float32
        outcomes the stores keep."""
        states = as_states(states, self.state_dim)
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if states.shape[0] == 0:
            raise ValueError("remember() got an empty episode (states has 0 rows); nothing was stored")
        if len(rewards) != states.shape[0]:
            raise ValueError(f"rewards has {len(rewards)} entries but states has {states.shape[0]}")
        if not np.isfinite(rewards).all():
            raise ValueError("rewards contains NaN or Inf values")
        tail = 0.0
        if not terminated:
            if final_state is None:
                raise ValueError("a truncated episode (terminated=False) needs final_state")
            tail = float(self.action_scores(final_state)[0].max())
        if self.credit == "glow":
            outcomes = glow_credit(rewards, self.gamma, states.numpy(), actions, tail)
        elif self.n_step is None:
            outcomes = discounted_returns(rewards, self.gamma, tail)
        else:
            later = states[1:]
            values = np.zeros(len(rewards) + 1)
            if len(later):
                values[1:len(rewards)] = self.action_scores(later)[0].max(1).values.double().numpy()
            values[len(rewards)] = tail
            outcomes = n_step_targets(rewards, values, self.gamma, self.n_step)
        peak = max(float(np.abs(outcomes).max()), abs(float(rewards.sum())))
        if not peak <= RETURN_LIMIT:
            raise ValueError(f"rewards: the episode's discounted returns or total reach {peak:.4g}, beyond "
                             f"±{RETURN_LIMIT:.0e}; scale the rewards down (see RETURN_LIMIT)")
        # validate raw input first so a bad episode stores nothing and names the argument
        raw, acts, outs, _ = validate_engrams(states, actions, outcomes, float(rewards.sum()),
                                              state_dim=self.state_dim, num_actions=self.num_actions)
        s = self.normalise(raw) if self.normalise is not None else raw
        stored = self.store.add(s, acts, outs, float(rewards.sum()))
        self.epsilon = max(self.epsilon_end, self.epsilon * self.epsilon_decay)
        return stored
