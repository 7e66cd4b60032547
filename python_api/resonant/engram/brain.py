"""EngramBrain: act from the outcomes of similar past experience (episodic control).

Each step of an episode becomes an engram (state, action, outcome) whose outcome is the
discounted return that followed it (Monte-Carlo, or n-step, or glow credit: `Outcomes`). To
decide, every action is scored from the engrams near the state that took it (`Scoring`,
engram/scoring.py): kernel-weighted over the whole memory (k=None, TorchEngramStore: one fused
gaussian_read for all actions) or over the k nearest engrams (any store), by their weighted mean
outcome or, with estimator="local_linear" (the default of `resonant train`, BENCHMARKS.md), by
the intercept of a local linear fit of outcome on state around the query, which corrects for
where each action's engrams lie. Two optional reweightings (recency_halflife, outcome_temperature)
did not help on LunarLander (BENCHMARKS.md).

Per-dimension relevance (`LearnedRelevance`, engram/relevance.py): optionally, every few
remembered episodes the brain refits how much each state dimension counts in the kernel's
distances, by the leave-one-out error of the stored outcomes, and scores with it
(`Scoring.relevance`): dimensions the outcomes do not depend on stop keeping experience apart.

Exploration (`Exploration`, engram/policy.py): epsilon-greedy with epsilon decaying
geometrically per remembered episode (epsilon_end 0, fully greedy in the end, did best on
LunarLander: the episodes that count are the ones played while learning), or softmax
P(a) ∝ exp(beta · score(a)), projective simulation's energy-based policy.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..types import ArrayLike
from . import validation
from .config import Exploration, Outcomes, Scoring
from .policy import EpisodeRepeats, glow_credit, select_actions
from .relevance import LearnedRelevance, fit_relevance
from .scoring import action_scores
from .store import EngramStore


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
    """An agent whose memory is its engram store. One decision, for a batch of raw states:

    1. the states are normalised (`normalise`, e.g. `resonant train`'s observation normaliser);
    2. the store reads, per action, the evidence near each state and a weighted sum of its outcomes:
       `store.action_values(states, scoring)` (engram/scoring.py, the same maths in every store);
    3. each action's score is that sum over its evidence, or `scoring.prior` where evidence is thin;
    4. an action is chosen from the scores (`exploration`: epsilon-greedy or softmax).

    After an episode, `remember` stores one engram per step with its outcome (`outcomes`) and decays
    epsilon. The options are three frozen groups (engram/config.py): Scoring, Outcomes, Exploration.
    With `relevance` (a LearnedRelevance; TorchEngramStore only), every `relevance.every`
    remembered episodes the next decision first refits `scoring.relevance` from the memory.
    """

    def __init__(self, store: EngramStore, *, scoring: Scoring = Scoring(), outcomes: Outcomes = Outcomes(),
                 exploration: Exploration = Exploration(), seed: Optional[int] = None,
                 normalise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 relevance: Optional[LearnedRelevance] = None):
        for name, value, kind in (("scoring", scoring, Scoring), ("outcomes", outcomes, Outcomes),
                                  ("exploration", exploration, Exploration)):
            if not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        if not isinstance(store, EngramStore):
            raise TypeError(f"store must be an EngramStore, got {type(store).__name__}")
        if relevance is not None:
            if not isinstance(relevance, LearnedRelevance):
                raise TypeError(f"relevance must be a LearnedRelevance or None, got {type(relevance).__name__}")
            if not hasattr(store, "engrams") or scoring.k is not None or scoring.bandwidth is None:
                raise ValueError("relevance (learnt per-dimension relevance) needs a TorchEngramStore with "
                                 "kernel-weighted scoring (Scoring(k=None) and a bandwidth)")
            if scoring.relevance is not None and len(scoring.relevance) != store.state_dim:
                raise ValueError(f"scoring.relevance has {len(scoring.relevance)} factors but the store's states "
                                 f"have {store.state_dim} dimensions")
        self.relevance = relevance
        self._episodes_since_fit = 0
        self.store, self.state_dim, self.num_actions = store, store.state_dim, store.num_actions
        self.scoring, self.outcomes, self.exploration = scoring, outcomes, exploration
        self.epsilon = exploration.epsilon_start
        self.normalise = normalise
        self._rng = np.random.default_rng(seed)

    def _prepare(self, states) -> torch.Tensor:
        s = validation.as_states(states, self.state_dim)
        return self.normalise(s) if self.normalise is not None else s

    def action_scores(self, states: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (Q, A), evidence share (Q, A)) for a batch of raw states (a due relevance refit
        first)."""
        if self.relevance is not None and self._episodes_since_fit >= self.relevance.every:
            self.refit_relevance()
        return self._scores(states)

    def _scores(self, states) -> tuple[torch.Tensor, torch.Tensor]:
        # no refit here: `remember` bootstraps from these while its episode is being written
        # (the asynchronous writer collects the writes of a batch of episodes before storing them)
        sums, evidence = self.store.action_values(self._prepare(states), self.scoring)
        return action_scores(sums, evidence, self.scoring)

    def refit_relevance(self) -> Optional[torch.Tensor]:
        """Refits scoring.relevance from the stored engrams (engram/relevance.py), warm-started
        from the current factors; returns them (None without `relevance` or engrams)."""
        self._episodes_since_fit = 0
        if self.relevance is None or len(self.store) < 2:
            return None
        e = self.store.engrams()
        initial = None if self.scoring.relevance is None else torch.tensor(self.scoring.relevance)
        factors = fit_relevance(e["states"], e["actions"], e["outcomes"], bandwidth=self.scoring.bandwidth,
                                settings=self.relevance, initial=initial, rng=self._rng)
        self.scoring = dataclasses.replace(self.scoring, relevance=tuple(factors.tolist()))
        return factors

    def decide(self, states: ArrayLike, *, explore: bool = True,
               repeats: Optional[Sequence[EpisodeRepeats]] = None) -> np.ndarray:
        """One action per state (a batch (Q, state_dim) or a single state) as an int64 array (Q,).

        repeats: one EpisodeRepeats per state (each agent's current episode, engram/policy.py):
        the actions each agent already took at its observation are scored below the others, and
        the chosen actions are recorded in them (the caller resets one when its episode starts)."""
        scores, _ = self.action_scores(states)
        scores = scores.numpy()
        if repeats is not None:
            observations = np.asarray(validation.as_states(states, self.state_dim))
            if len(repeats) != len(observations):
                raise ValueError(f"repeats has {len(repeats)} entries but states has {len(observations)} rows")
            scores = np.stack([r.scores(o, s) for r, o, s in zip(repeats, observations, scores)])
        x = self.exploration
        actions = select_actions(scores, self._rng, policy=x.policy, epsilon=self.epsilon, beta=x.beta,
                                 explore=explore)
        if repeats is not None:
            for r, o, a in zip(repeats, observations, actions):
                r.record(o, a)
        return actions

    def remember(self, states: ArrayLike, actions: ArrayLike, rewards: ArrayLike, *,
                 final_state: Optional[ArrayLike] = None, terminated: bool = True) -> int:
        """Stores one finished episode and decays epsilon; returns the engrams stored.

        Outcomes are discounted returns (`outcomes`): Monte-Carlo (n_step None), n-step targets
        that bootstrap from the memory's greedy value of the state n steps later, or glow credit.
        A truncated episode (terminated False) bootstraps from `final_state`, the observation
        after the last step. The episode's total reward is kept beside every engram.

        Checked before anything is stored or epsilon moves (errors name the argument): a nonempty
        episode, one reward and one action per state, finite rewards whose returns fit the float32
        outcomes the stores keep."""
        states = validation.as_states(states, self.state_dim)
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
            tail = float(self._scores(final_state)[0].max())
        gamma, n_step = self.outcomes.gamma, self.outcomes.n_step
        if self.outcomes.credit == "glow":
            outcomes = glow_credit(rewards, gamma, states.numpy(), actions, tail)
        elif n_step is None:
            outcomes = discounted_returns(rewards, gamma, tail)
        else:
            later = states[1:]
            values = np.zeros(len(rewards) + 1)
            if len(later):
                values[1:len(rewards)] = self._scores(later)[0].max(1).values.double().numpy()
            values[len(rewards)] = tail
            outcomes = n_step_targets(rewards, values, gamma, n_step)
        peak = max(float(np.abs(outcomes).max()), abs(float(rewards.sum())))
        if not peak <= RETURN_LIMIT:
            raise ValueError(f"rewards: the episode's discounted returns or total reach {peak:.4g}, beyond "
                             f"±{RETURN_LIMIT:.0e}; scale the rewards down (see RETURN_LIMIT)")
        # validate raw input first so a bad episode stores nothing and names the argument
        raw, acts, outs, _ = validation.engrams(states, actions, outcomes, float(rewards.sum()),
                                                state_dim=self.state_dim, num_actions=self.num_actions)
        s = self.normalise(raw) if self.normalise is not None else raw
        stored = self.store.add(s, acts, outs, float(rewards.sum()))
        self.epsilon = self.exploration.decayed(self.epsilon)
        self._episodes_since_fit += 1
        return stored
