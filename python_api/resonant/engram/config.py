"""The options of an EngramBrain, in three frozen groups, each checked when it is built (errors
name the option and its valid range):

- `Scoring`: how the actions at a state are scored from the memory. Every store's
  `action_values(states, scoring)` reads it (engram/scoring.py has the maths), and the brain
  turns what the store returns into scores with its prior.
- `Outcomes`: the outcome each remembered step carries (discount, n-step bootstrap, credit).
- `Exploration`: how an action is chosen from the scores (engram/policy.py) and how epsilon decays.

    EngramBrain(store, scoring=Scoring(bandwidth=0.3, estimator="local_linear"),
                outcomes=Outcomes(gamma=0.96), exploration=Exploration(epsilon_end=0.0))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from . import validation
from .policy import check_credit, check_policy

# How an action's outcomes near a state become its score: the kernel-weighted mean, or the
# intercept of a local linear fit (engram/scoring.py).
ESTIMATORS = ("mean", "local_linear")


@dataclass(frozen=True)
class Scoring:
    """How the actions at a state are scored from the engrams near it.

    Which engrams, and how much each counts:
      k: None scores over the whole memory, kernel-weighted (TorchEngramStore: one fused read);
         an int scores over the k nearest engrams (any store).
      bandwidth: the Gaussian kernel's width in state units; with k, None weighs the k nearest
         uniformly.
      match_threshold: kernel-weighted scoring (k=None) ignores engrams farther than this
         (None: 3 bandwidths; inf: none), so a state far from all experience reads no evidence.
      recency_halflife: an engram's evidence halves for every this many engrams stored after it
         (None: no decay): the scores follow the current policy's outcomes.
      relevance: per-dimension factors r (one per state dimension, >= 0) the kernel measures
         distances with: |(s − q) · r| (None: all 1). r_j = 0 ignores dimension j; the match
         threshold applies to the scaled distance. EngramBrain(relevance=LearnedRelevance(...))
         learns them from the memory (engram/relevance.py). Kernel-weighted scoring only (k=None).
    How an action's outcomes become its score:
      estimator: "mean", the weighted mean outcome; "local_linear", the intercept of a local
         linear fit of outcome on state around the query (ridge: its slope's regularisation,
         relative to bandwidth² times the evidence). The fit corrects for where each action's
         engrams lie; it needs a bandwidth and cannot be tilted.
      outcome_temperature: T scores by the exp(outcome/T)-weighted mean, a soft maximum between
         the mean (T → ∞) and the best outcome seen (T → 0) (None: the mean).
    Where the evidence is thin:
      min_evidence: an action whose share of the state's evidence is below this is scored by
      prior: a float, or "neighbourhood": the mean outcome of all evidence at that state,
         falling back to empty_prior where there is none.
    """

    k: Optional[int] = None
    bandwidth: Optional[float] = 0.5
    match_threshold: Optional[float] = None
    recency_halflife: Optional[float] = None
    relevance: Optional[Sequence[float]] = None
    estimator: str = "mean"
    ridge: float = 0.01
    outcome_temperature: Optional[float] = None
    min_evidence: float = 1e-3
    prior: Union[float, str] = "neighbourhood"
    empty_prior: float = 0.0

    def __post_init__(self):
        if self.k is not None:
            validation.positive_int(self.k, "k", "a positive integer or None (kernel-weighted over the memory)")
        validation.positive_or_none(self.bandwidth, "bandwidth")
        if self.k is None and self.bandwidth is None:
            raise ValueError("kernel-weighted scoring (k=None) needs a positive bandwidth, got None")
        threshold = self.match_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or math.isnan(threshold) or threshold <= 0):
            raise ValueError(f"match_threshold must be a positive number (inf: no threshold) or None (3 bandwidths), "
                             f"got {threshold!r}")
        validation.positive_or_none(self.recency_halflife, "recency_halflife")
        if self.relevance is not None:
            object.__setattr__(self, "relevance", validation.relevance_factors(self.relevance))
            if self.k is not None:
                raise ValueError("relevance scales the kernel's distances: it needs kernel-weighted scoring (k=None), "
                                 f"got k={self.k!r}")
        validation.positive_or_none(self.outcome_temperature, "outcome_temperature")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        ridge = self.ridge
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        if self.estimator == "local_linear":
            if self.outcome_temperature is not None:
                raise ValueError("outcome_temperature cannot be combined with estimator='local_linear': the tilted "
                                 "mean is not a weighted sum the local linear fit can use")
            if self.bandwidth is None:
                raise ValueError("estimator='local_linear' needs a bandwidth (it weighs the fit and scales its ridge)")
        validation.in_unit_interval(self.min_evidence, "min_evidence")
        if self.prior != "neighbourhood":
            validation.number(self.prior, "prior", "a number or 'neighbourhood'")
        validation.number(self.empty_prior, "empty_prior")


@dataclass(frozen=True)
class Outcomes:
    """The outcome each remembered step carries.

      gamma: the discount per decision (in [0, 1]).
      n_step: None, Monte-Carlo discounted returns; n, n-step targets that bootstrap from the
         memory's greedy value n steps later.
      credit: "discount", the discounted returns; "glow", projective simulation's glow credit
         with glow rate 1 − gamma (engram/policy.py; Monte-Carlo only).
    """

    gamma: float = 0.99
    n_step: Optional[int] = None
    credit: str = "discount"

    def __post_init__(self):
        validation.in_unit_interval(self.gamma, "gamma")
        if self.n_step is not None:
            validation.positive_int(self.n_step, "n_step", "a positive integer or None (Monte-Carlo)")
        check_credit(self.credit)
        if self.credit == "glow" and self.n_step is not None:
            raise ValueError("credit='glow' spreads Monte-Carlo rewards; it cannot be combined with n_step")


@dataclass(frozen=True)
class Exploration:
    """How an action is chosen from the scores (engram/policy.py).

      policy: "epsilon_greedy", the best-scored action, replaced by a random one with probability
         epsilon; "softmax", P(a) ∝ exp(beta · score(a)) (beta in 1/outcome units).
      epsilon_start, epsilon_end, epsilon_decay: epsilon starts at epsilon_start and is
         multiplied by epsilon_decay after every remembered episode, down to epsilon_end.
      avoid_repeats: within an episode, an action already taken at exactly the same observation
         is scored below every action not yet taken there, until all have been (engram/policy.py,
         EpisodeRepeats): a greedy agent in a deterministic environment that meets an observation
         again with the same scores would repeat its loop until the episode is cut off.
    """

    policy: str = "epsilon_greedy"
    beta: float = 1.0
    epsilon_start: float = 1.0
    epsilon_end: float = 0.02
    epsilon_decay: float = 0.995
    avoid_repeats: bool = False

    def __post_init__(self):
        check_policy(self.policy, self.beta)
        if not isinstance(self.avoid_repeats, bool):
            raise ValueError(f"avoid_repeats must be True or False, got {self.avoid_repeats!r}")
        for name in ("epsilon_start", "epsilon_end", "epsilon_decay"):
            validation.in_unit_interval(getattr(self, name), name)

    def decayed(self, epsilon: float) -> float:
        """Epsilon after one more episode."""
        return max(self.epsilon_end, epsilon * self.epsilon_decay)

    def epsilon_after(self, episodes_played: int) -> float:
        """Epsilon after this many episodes from epsilon_start (in closed form)."""
        return max(self.epsilon_end, self.epsilon_start * self.epsilon_decay ** episodes_played)

