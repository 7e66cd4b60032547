"""Checks of what reaches an engram store or brain: errors name the argument and its valid range.

Every store validates a batch of engrams here before anything is written (EngramStore.add), so
bad input fails the same way whichever store would have held it.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch

from resonant_kernels import validation
from ..types import ArrayLike
from .eviction import EVICTION_POLICIES


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


def engrams(states: ArrayLike, actions: ArrayLike, outcomes: ArrayLike, episode_returns: ArrayLike, *,
            state_dim: int, num_actions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks one batch of engrams; returns (states (N,d) f32, actions (N,) i64, outcomes (N,) f32,
    episode_returns (N,) f32; one episode return is repeated for every engram). Raises
    ValueError/TypeError naming the bad argument."""
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


def store_config(state_dim: int, num_actions: int, capacity: Optional[int], eviction: str) -> None:
    positive_int(state_dim, "state_dim")
    positive_int(num_actions, "num_actions")
    if capacity is not None:
        positive_int(capacity, "capacity", "a positive integer or None")
    if eviction not in EVICTION_POLICIES:
        raise ValueError(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")


def positive_int(value, name: str, valid: str = "a positive integer") -> int:
    """`value` if it is an int >= 1 (not a bool); else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    return value


def positive_or_none(value, name: str) -> Optional[float]:
    """A finite positive number as float, or None; anything else raises ValueError naming `name`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    return float(value)


def in_unit_interval(value, name: str) -> float:
    """A number in [0, 1] as float; else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def number(value, name: str, valid: str = "a number") -> float:
    """A real number other than NaN (infinities allowed) as float; else ValueError naming `name`."""
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    return float(value)


def relevance_factors(value) -> tuple:
    """Scoring.relevance as a tuple of floats, each finite and >= 0, at least one of them > 0."""
    try:
        factors = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"relevance must be a sequence of numbers (one per state dimension), got {value!r}") from None
    if not factors or not all(math.isfinite(v) and v >= 0 for v in factors) or max(factors) <= 0:
        raise ValueError("relevance must hold one finite number >= 0 per state dimension, at least one > 0; got "
                         f"{value!r}")
    return factors
