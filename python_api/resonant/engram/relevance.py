"""Per-dimension relevance learnt from the memory: which state dimensions an action's outcome
depends on.

The kernel weighs every state dimension alike: exp(−Σ_j (s_j − q_j)² / 2 bandwidth²). Where
some dimensions do not change what an action is worth (SubGridWorld's third axis: the goal is in
whatever plane the agent starts in), that kernel keeps experiences apart that should be pooled,
and each one is learnt on its own from fewer samples. With a relevance r_j per dimension the
distances are measured on s_j · r_j instead (r_j = 0: the dimension is ignored; r_j > 1: it
separates more than the bandwidth says), i.e. a bandwidth of bandwidth / r_j per dimension;
`Scoring.relevance` holds the factors and the match threshold applies to the scaled distance.

`fit_relevance` chooses r from the stored engrams by the leave-one-out error of the scores: each
engram of a random sample is predicted, as the "mean" estimator would score it, from the other
engrams that took the same action (itself left out), and the squared error against its own
outcome, averaged over the sample, is minimised over log r by Adam. Pooling over a dimension
lowers that error only when the outcomes agree across it, so the fit widens exactly the
dimensions the outcomes do not depend on, and only as far as the stored data show it.
`EngramBrain(..., relevance=LearnedRelevance(every=...))` refits every `every` remembered episodes
(warm-started from the previous fit) and scores with the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import validation


@dataclass(frozen=True)
class LearnedRelevance:
    """When and how EngramBrain learns `Scoring.relevance` (module docstring).

      every: refit after this many remembered episodes.
      queries: engrams whose leave-one-out error is minimised per fit (a random sample).
      memory: at most this many engrams (a random sample) they are predicted from.
      steps, lr: Adam steps per fit and its learning rate on log relevance.
      floor, ceiling: the range of every factor (floor > 0 keeps log r finite; a factor at the
         floor makes its dimension's distances negligible against the bandwidth).
    """

    every: int = 10
    queries: int = 256
    memory: int = 8192
    steps: int = 20
    lr: float = 0.1
    floor: float = 1e-2
    ceiling: float = 10.0

    def __post_init__(self):
        for name in ("every", "queries", "memory", "steps"):
            validation.positive_int(getattr(self, name), name)
        for name in ("lr", "floor", "ceiling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.floor >= self.ceiling:
            raise ValueError(f"floor must be below ceiling, got floor={self.floor!r}, ceiling={self.ceiling!r}")


def leave_one_out_loss(query_rows: torch.Tensor, states: torch.Tensor, actions: torch.Tensor, outcomes: torch.Tensor,
                       relevance: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Mean squared leave-one-out error of the kernel-weighted mean outcome at the engrams
    `query_rows` of the memory (states (M, d), actions (M,), outcomes (M,)).

    Engram i is predicted from the other engrams with its action, with weights
    exp(−|(s − s_i) · relevance|² / 2 bandwidth²) (no match threshold: the fit needs the gradient
    of far weights). Engrams whose action no other engram took are left out of the mean.
    Differentiable in `relevance` (d,); one (queries × engrams) block per action."""
    scaled = states * relevance
    errors = []
    for action in torch.unique(actions[query_rows]).tolist():
        members = torch.nonzero(actions == action).squeeze(1)
        if len(members) < 2:
            continue
        rows = query_rows[actions[query_rows] == action]
        q, m = scaled[rows], scaled[members]
        d2 = ((q * q).sum(1, keepdim=True) + (m * m).sum(1)[None, :] - 2.0 * q @ m.T).clamp_min(0.0)
        logits = (-d2 / (2.0 * bandwidth**2)).masked_fill(rows[:, None] == members[None, :], -math.inf)
        prediction = torch.softmax(logits, dim=1) @ outcomes[members]
        errors.append((prediction - outcomes[rows]) ** 2)
    if not errors:
        return (relevance * 0.0).sum()
    return torch.cat(errors).mean()


def fit_relevance(states: torch.Tensor, actions: torch.Tensor, outcomes: torch.Tensor, *, bandwidth: float,
                  settings: LearnedRelevance = LearnedRelevance(), initial: Optional[torch.Tensor] = None,
                  rng: Optional[np.random.Generator] = None) -> torch.Tensor:
    """Per-dimension relevance (d,) minimising the leave-one-out error of the stored outcomes
    (`leave_one_out_loss`) over random samples of the engrams, from `initial` (default all 1)."""
    states = states.detach().float().cpu()
    actions, outcomes = actions.detach().cpu(), outcomes.detach().float().cpu()
    n, d = states.shape
    rng = rng if rng is not None else np.random.default_rng()
    start = torch.ones(d) if initial is None else initial.detach().float().cpu()
    if start.shape != (d,):
        raise ValueError(f"initial must have shape ({d},), got {tuple(start.shape)}")
    if n < 2:
        return start.clamp(settings.floor, settings.ceiling)
    memory = torch.as_tensor(rng.choice(n, size=min(n, settings.memory), replace=False))
    states, actions, outcomes = states[memory], actions[memory], outcomes[memory]
    log_r = start.clamp(settings.floor, settings.ceiling).log().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([log_r], lr=settings.lr)
    low, high = math.log(settings.floor), math.log(settings.ceiling)
    m = states.shape[0]
    for _ in range(settings.steps):
        rows = torch.as_tensor(rng.choice(m, size=min(m, settings.queries), replace=False))
        loss = leave_one_out_loss(rows, states, actions, outcomes, log_r.exp(), bandwidth)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            log_r.clamp_(low, high)
    return log_r.detach().exp()
