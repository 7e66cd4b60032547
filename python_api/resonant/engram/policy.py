"""Action selection and credit assignment options of EngramBrain (from projective simulation).

Action selection, given every action's score at a state (EngramBrain.action_scores):

- "epsilon_greedy": the best-scored action, replaced by a uniformly random one with probability
  epsilon (ties between equal scores broken at random).
- "softmax": the energy-based policy of projective simulation, P(a) ∝ exp(β · score(a)). β is
  an inverse temperature in the units of the outcomes: the seed's β = 0.5 was set for h-values of
  order 1–10; with outcomes that are discounted returns (LunarLander: hundreds; a goal reward of
  1 discounted over tens of steps: 0.01–1) choose β so that β times a meaningful score difference
  is a few units.

Repeats within an episode (`EpisodeRepeats`, Exploration.avoid_repeats): the actions taken at
each exact observation so far this episode are scored below every action not yet taken there
(until all have been). The memory changes only between episodes, so a greedy agent that meets an
observation again meets the same scores, and in a deterministic environment walks the same loop
until the episode is cut off (SubGridWorld: BENCHMARKS.md); the next-best untaken action leaves it.

Credit assignment ("glow"), given one episode's rewards r_0 … r_{T-1}:

Projective simulation keeps a glow value per (state, action) edge: every step all glows decay by
the factor (1 − η), the edge just used is set to 1, and a reward r at time T adds r · glow(e) to
each edge's strength. The reward at time T therefore reaches the step t that last used an edge
with weight (1 − η)^(T − t): exactly the discounted return with discount γ = 1 − η, *except*
that the glow is reset when the edge is used again, so an earlier visit of the same
(state, action) gets only the rewards that arrive before the revisit. With one engram per step
that is

    credit(t) = Σ_{t ≤ T < t'} (1 − η)^(T − t) r_T     (t': the next step with the same state and action, or the end)

which `glow_credit` computes as G_t − γ^(t' − t) G_{t'} from the discounted returns G. On
continuous states (LunarLander) no (state, action) pair repeats exactly, and glow credit equals
the discounted return with γ = 1 − η; on a grid an action that walked in a loop back to the same
pair receives nothing for the reward found after the loop (the later visit does). The seed's
other PS parameter, the damping γ_PS that pulls every h-value back towards its initial value, has
the role of `recency_halflife` here (old experience counts for less).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

POLICIES = ("epsilon_greedy", "softmax")
CREDITS = ("discount", "glow")


def check_policy(policy: str, beta) -> float:
    """Validates the policy options; returns beta as float."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta (the softmax inverse temperature) must be a positive finite number, got {beta!r}")
    return float(beta)


def check_credit(credit: str) -> str:
    if credit not in CREDITS:
        raise ValueError(f"credit must be one of {CREDITS}, got {credit!r}")
    return credit


def select_actions(scores: np.ndarray, rng: np.random.Generator, *, policy: str = "epsilon_greedy",
                   epsilon: float = 0.0, beta: float = 1.0, explore: bool = True) -> np.ndarray:
    """One action per row of scores (Q, A) as an int64 array (Q,).

    The greedy path adds the tie-breaking noise in the scores' own dtype (float32 from a read), so
    epsilon-greedy draws are those EngramBrain.decide always made. explore=False is greedy under either policy. Draws come from `rng` only, in a fixed order, so
    a seeded generator reproduces the actions."""
    # (called for every decision of every asynchronous worker, one row at a time: the checks and
    # draws below are the cheap forms of the same ones; one row took 17.3 µs before, 10.4 µs so,
    # interleaved, epsilon 0.1, the 2-core AMD EPYC development VM, 2026-12-03)
    scores = np.asarray(scores)
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must have shape (Q, A) with A >= 1, got {scores.shape}")
    # random tie-breaking: untried actions all share the prior
    noise = rng.random(scores.shape) * 1e-6 * (1.0 + np.abs(scores))
    if not explore or policy == "epsilon_greedy":
        actions = np.argmax(scores + noise, axis=1).astype(np.int64, copy=False)
        if explore and epsilon > 0:
            explore_mask = rng.random(len(actions)) < epsilon
            count = int(np.count_nonzero(explore_mask))
            if count:  # (a draw of no integers leaves the generator as it is: the same stream either way)
                actions[explore_mask] = rng.integers(0, scores.shape[1], count)
        return actions
    # softmax: P(a) ∝ exp(β (score − max)), by inverse CDF of one uniform per row
    cdf = np.cumsum(softmax_probabilities(scores, beta), axis=1)
    u = rng.random(len(scores))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=1), scores.shape[1] - 1).astype(np.int64)


class EpisodeRepeats:
    """The actions one agent has taken at each exact observation in its current episode
    (Exploration.avoid_repeats). `scores(obs, scores)` pushes the taken ones below every untaken
    one (all kept when every action was taken there), `record(obs, action)` after each decision,
    `reset()` when an episode starts."""

    def __init__(self):
        self._taken: dict = {}

    def reset(self) -> None:
        self._taken.clear()

    @staticmethod
    def _key(obs) -> bytes:
        return np.ascontiguousarray(obs, dtype=np.float32).tobytes()

    def record(self, obs, action: int) -> None:
        self._taken.setdefault(self._key(obs), set()).add(int(action))

    def scores(self, obs, scores: np.ndarray) -> np.ndarray:
        """A copy of one observation's action scores (A,) with the actions taken at `obs` this
        episode scored below the lowest untaken one (by 1 + the scores' range: finite, so the
        greedy tie-breaking noise and the softmax stay defined)."""
        scores = np.asarray(scores)
        taken = self._taken.get(self._key(obs))
        if not taken or len(taken) >= scores.shape[-1]:
            return scores
        out = scores.astype(np.float64, copy=True)
        mask = np.zeros(out.shape[-1], dtype=bool)
        mask[list(taken)] = True
        untaken_min = out[~mask].min()
        out[mask] = untaken_min - 1.0 - (out.max() - out.min()) - (out[mask].max() - out[mask])
        return out


def softmax_probabilities(scores: np.ndarray, beta: float) -> np.ndarray:
    """P(a) = exp(β score(a)) / Σ_b exp(β score(b)) per row (what select_actions samples from)."""
    s = np.asarray(scores, dtype=np.float64)
    w = np.exp(beta * (s - s.max(axis=-1, keepdims=True)))
    return w / w.sum(axis=-1, keepdims=True)


def glow_credit(rewards, discount: float, states: np.ndarray, actions, tail_value: float = 0.0) -> np.ndarray:
    """Glow credit of every step of one episode (module docstring): the discounted return with
    discount = 1 − η, cut at the next step that repeats the same (state, action) exactly."""
    from .brain import discounted_returns

    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    T = len(rewards)
    states = np.ascontiguousarray(np.asarray(states, dtype=np.float32).reshape(T, -1))
    actions = np.asarray(actions).reshape(-1)
    if len(actions) != T:
        raise ValueError(f"actions has {len(actions)} entries but rewards has {T}")
    returns = discounted_returns(rewards, discount, tail_value)
    credit = returns.copy()
    next_visit: dict = {}
    for t in range(T - 1, -1, -1):
        key = (states[t].tobytes(), int(actions[t]))
        later: Optional[int] = next_visit.get(key)
        if later is not None:
            credit[t] -= discount ** (later - t) * returns[later]
        next_visit[key] = t
    return credit
