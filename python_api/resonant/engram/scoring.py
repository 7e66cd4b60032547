"""How engrams near a state score its actions: the maths every store uses (Scoring holds the options).

A store answers `action_values(states, scoring)` with (sums, evidence), both (Q, A): per action,
the total weight of the engrams consulted for each state (evidence) and a weighted sum of their
outcomes whose ratio to the evidence is the action's estimate. Two routes, the same maths:

- over the whole memory (k=None, TorchEngramStore): ONE fused `gaussian_read` whose values are
  each engram's `read_columns`, scaled by `weighted_columns`; `from_read` turns the read into
  (sums, evidence).
- over the k nearest engrams (any store): `from_neighbours` weighs each neighbour and forms the
  same sums.

`action_scores` then turns (sums, evidence) into scores, with the prior where evidence is thin.

Weights. An engram's evidence weight is its kernel weight exp(−|s − q|² / 2 bandwidth²), times its
recency weight 2^(−age / recency_halflife) (`recency_weights`: outcomes are returns of the policy
that was acting when the engram was stored; as the policy improves, older outcomes describe a
worse policy). With an outcome temperature the outcomes are averaged with the extra weight
exp((outcome − best) / T) (`outcome_tilt`; best: the memory's best outcome over the whole memory,
the query's best neighbour's over k), a soft maximum between the mean (T → ∞) and the best
outcome seen (T → 0, as model-free episodic control keeps): the returns that followed an action
mix what the action allows with the mistakes of the (exploring, older) policy that acted after it.
The evidence itself is not tilted.

Estimators. "mean": the weighted mean outcome of the engrams that took the action (Nadaraya–
Watson). Its bias is the problem on control tasks: the engrams behind each action sit at
*different* places around q, because the policy chose actions by state (e.g. the main engine fired
where the lander falls fastest), and the outcome changes across the neighbourhood by more than
actions differ. "local_linear" removes that: within the kernel around q fit

    outcome ≈ c[action] + βᵀ (state − q)

by weighted least squares, one intercept per action and one slope shared by all actions, and
score each action by c[a], its outcome *at q*. Everything the fit needs is a weighted sum over the
engrams, so over the whole memory it is still ONE read, with these value columns per engram (s:
state, o: outcome, e: one-hot(action)):

    [e·o (A), e (A), e⊗s (A·d), upper triangle of s sᵀ (d(d+1)/2), s·o (d)]

followed by a d×d solve per query (`local_linear_fit`); nothing of size Q×M is formed. Over k
neighbours the same sums are formed from the neighbours' states. Recency weights scale whole rows,
so they combine with the fit; the outcome tilt does not (it is not a weighted sum of these).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import Scoring

if TYPE_CHECKING:
    from .store import Neighbours

# Outcomes more than this many temperatures below the best are all tilted by exp(-TILT_FLOOR): far
# below float32's limits even after the kernel weight multiplies it, so a state whose evidence is
# all poor still reads that evidence instead of underflowing to "no evidence".
TILT_FLOOR = 30.0


# ---- weights ---------------------------------------------------------------------------------
def recency_weights(index: torch.Tensor, newest_index: int, recency_halflife: Optional[float]) -> torch.Tensor:
    """Evidence weight 2^(−age / recency_halflife) of engrams with these insertion indices, where age
    is the number of engrams stored after it (the newest weighs 1); all ones when halflife is None."""
    if recency_halflife is None:
        return torch.ones(index.shape, dtype=torch.float32)
    age = (newest_index - index).clamp_min(0).double()
    return torch.exp2(-age / recency_halflife).float()


def outcome_tilt(outcome: torch.Tensor, best, temperature: Optional[float]) -> torch.Tensor:
    """exp((outcome − best) / temperature), floored at exp(−TILT_FLOOR); ones when temperature is None."""
    if temperature is None:
        return torch.ones(outcome.shape, dtype=torch.float32)
    return torch.exp(((outcome.double() - best) / temperature).clamp_min(-TILT_FLOOR)).float()


def tilted_sums(tilted_sums_: torch.Tensor, tilted_evidence: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
    """sums whose ratio to `evidence` is the tilted mean: (Σ w·t·o / Σ w·t) · Σ w (0 where no evidence)."""
    return torch.where(tilted_evidence > 0, tilted_sums_ / tilted_evidence.clamp_min(1e-38), 0.0) * evidence


# ---- over the whole memory: one read -----------------------------------------------------------
def column_count(state_dim: int, num_actions: int, estimator: str = "local_linear") -> int:
    """Value columns per engram the read needs: 2A for the mean, the local linear moments otherwise."""
    d, A = state_dim, num_actions
    return 2 * A if estimator == "mean" else A * (2 + d) + d * (d + 1) // 2 + d


def read_columns(states: torch.Tensor, actions: torch.Tensor, outcomes: torch.Tensor,
                 num_actions: int) -> torch.Tensor:
    """(N, column_count) value rows, in the states' dtype, for engrams (states (N, d), actions (N,),
    outcomes (N,)): the local linear columns, whose first 2A are the mean's [e·o, e]."""
    n, d = states.shape
    e = F.one_hot(actions, num_actions).to(states.dtype)
    iu = torch.triu_indices(d, d, device=states.device)
    outer = states[:, iu[0]] * states[:, iu[1]]
    return torch.cat([e * outcomes[:, None], e, (e[:, :, None] * states[:, None, :]).reshape(n, -1), outer,
                      states * outcomes[:, None]], dim=1)


def weighted_columns(columns: torch.Tensor, index: torch.Tensor, outcomes: torch.Tensor, newest_index: int,
                     num_actions: int, scoring: Scoring) -> torch.Tensor:
    """The read's values with each engram's row scaled by its weight: [e·o·w·t, e·w·t, e·w] (w:
    recency weight, t: outcome tilt against the memory's best outcome; the last block only when
    tilting), or the local linear columns times w; `columns` themselves when neither applies.
    columns: the engrams' read_columns (first column_count of them, on the store's device);
    index, outcomes: their insertion indices and outcomes."""
    if scoring.recency_halflife is None and scoring.outcome_temperature is None:
        return columns
    device = columns.device
    w = recency_weights(index.cpu(), newest_index, scoring.recency_halflife).to(device)
    values = columns * w[:, None]
    if scoring.outcome_temperature is not None:
        t = outcome_tilt(outcomes.cpu(), outcomes.max().item(), scoring.outcome_temperature).to(device)
        values = torch.cat([values * t[:, None], values[:, num_actions:]], dim=1)
    return values


def from_read(read: torch.Tensor, query: torch.Tensor, num_actions: int,
              scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, evidence), both (Q, A), from a read of the (weighted) columns at these query states."""
    A = num_actions
    if scoring.estimator == "local_linear":
        return local_linear_fit(read, query, A, scoring.ridge, scoring.bandwidth)
    if scoring.outcome_temperature is None:
        return read[:, :A], read[:, A:]
    evidence = read[:, 2 * A:]
    return tilted_sums(read[:, :A], read[:, A:2 * A], evidence), evidence


# ---- over the k nearest engrams ----------------------------------------------------------------
def from_neighbours(nb: "Neighbours", query: torch.Tensor, num_actions: int, newest_index: int,
                    scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, evidence), both (Q, A), from each query's k nearest engrams (`newest_index`: the
    store's newest insertion index, for the recency weights). Local linear needs nb.state."""
    valid = nb.valid
    bandwidth = scoring.bandwidth
    if bandwidth is None:
        w = valid.float()
    else:
        # relative to the nearest neighbour, so far-but-nearest evidence does not underflow
        d2 = torch.where(valid, nb.distance.double() ** 2, torch.inf)
        w = torch.exp(-(d2 - d2.min(dim=1, keepdim=True).values.clamp_max(1e300)) / (2 * bandwidth**2)).float()
        w = torch.where(valid, w, torch.zeros_like(w))
    if scoring.recency_halflife is not None:
        w = w * recency_weights(nb.index, newest_index, scoring.recency_halflife)
    act = nb.action.clamp_min(0)
    Q = nb.action.shape[0]
    if scoring.estimator == "local_linear":
        if nb.state is None:
            raise ValueError("estimator='local_linear' over neighbours needs their states (search(..., "
                             "with_states=True))")
        k, d = nb.state.shape[1:]
        cols = read_columns(nb.state.reshape(Q * k, d).double(), act.reshape(-1), nb.outcome.reshape(-1).double(),
                            num_actions).reshape(Q, k, -1)
        read = (w.double()[:, :, None] * cols).sum(1)
        return local_linear_fit(read, query, num_actions, scoring.ridge, bandwidth)
    evidence = torch.zeros(Q, num_actions).scatter_add_(1, act, w)
    if scoring.outcome_temperature is None:
        return torch.zeros(Q, num_actions).scatter_add_(1, act, w * nb.outcome), evidence
    best = torch.where(valid, nb.outcome.double(), -torch.inf).max(dim=1, keepdim=True).values
    wt = w * outcome_tilt(nb.outcome, best.clamp_min(-1e300), scoring.outcome_temperature)
    sums_t = torch.zeros(Q, num_actions).scatter_add_(1, act, wt * nb.outcome)
    evidence_t = torch.zeros(Q, num_actions).scatter_add_(1, act, wt)
    return tilted_sums(sums_t, evidence_t, evidence), evidence


# ---- the local linear fit ----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _packed_position(d: int) -> np.ndarray:
    """(d, d): where entry (i, j) of a symmetric matrix sits in its upper triangle packed row by row
    (read_columns' torch.triu_indices order)."""
    rows, cols = np.triu_indices(d)
    position = np.empty((d, d), dtype=np.int64)
    position[rows, cols] = position[cols, rows] = np.arange(len(rows))
    position.flags.writeable = False
    return position


@functools.lru_cache(maxsize=None)
def _identity(d: int) -> np.ndarray:
    eye = np.eye(d)
    eye.flags.writeable = False
    return eye


def local_linear_fit(read: torch.Tensor, query: torch.Tensor, num_actions: int, ridge: float,
                     bandwidth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, evidence), both (Q, A), from weighted sums of read_columns: evidence[a] is action a's
    total weight and sums[a] / evidence[a] its local linear intercept c[a]. The slope is solved
    with a ridge of `ridge` · bandwidth² · (total weight), relative to the kernel's own spread
    (bandwidth² per dimension), so it stays defined where the neighbourhood is flat in some
    direction (a single engram, a leg contact that never changes)."""
    # in numpy: a decision's fit is some twenty operations on (Q, A, d) arrays of a few numbers each,
    # where torch's per-operation overhead was most of the time: the fit of 8 states (d = 8, 4
    # actions) took 0.30 ms in torch against 0.11 ms here, and brain.action_scores of 8 states
    # against 10 000 engrams 0.67 against 0.52 ms (interleaved A/B, one thread, the 2-core AMD EPYC
    # development VM, 2026-12-03); the second moments gathered in one indexing step through a cached
    # position table (not a zeroed matrix filled, mirrored and halved on the diagonal: the same
    # numbers) then took it from 127 to 83 µs (interleaved, the same VM, 2026-12-03)
    r = read.detach().to("cpu", torch.float64).numpy()
    q = query.detach().to("cpu", torch.float64).numpy()
    Q, d = q.shape
    A = num_actions
    sum_o, weight = r[:, :A], r[:, A:2 * A]
    # moments about the query, not the origin: the slope multiplies (state − q)
    dx = r[:, 2 * A:2 * A + A * d].reshape(Q, A, d) - weight[:, :, None] * q[:, None, :]
    off = A * (2 + d)
    ss = r[:, off + _packed_position(d)]  # the symmetric (d, d) second moments from their upper triangle
    so = r[:, off + d * (d + 1) // 2:]
    total = weight.sum(1)
    s_sum = dx.sum(1) + total[:, None] * q
    xx = (ss - q[:, :, None] * s_sum[:, None, :] - s_sum[:, :, None] * q[:, None, :]
          + total[:, None, None] * q[:, :, None] * q[:, None, :])
    xo = so - q * sum_o.sum(1, keepdims=True)
    # eliminate the intercepts: the slope sees only the within-action (co)variation
    inv = np.where(weight > 0, 1.0 / np.maximum(weight, 1e-300), 0.0)
    weighted_dx = dx * inv[:, :, None]
    lhs = xx - weighted_dx.transpose(0, 2, 1) @ dx
    rhs = xo - (weighted_dx * sum_o[:, :, None]).sum(1)
    lam = ridge * bandwidth**2 * total + 1e-300  # the floor keeps rows with no evidence solvable
    beta = np.linalg.solve(lhs + lam[:, None, None] * _identity(d), rhs[:, :, None])[:, :, 0]
    sums = sum_o - (dx @ beta[:, :, None])[:, :, 0]
    return (torch.from_numpy(sums).to(read.device, torch.float32),
            torch.from_numpy(np.ascontiguousarray(weight)).to(read.device, torch.float32))


# ---- scores ------------------------------------------------------------------------------------
def action_scores(sums: torch.Tensor, evidence: torch.Tensor, scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (Q, A), evidence share (Q, A)): sums / evidence, or the prior where an action's
    share of the state's evidence is below scoring.min_evidence."""
    total_evidence = evidence.sum(1, keepdim=True)
    share = evidence / total_evidence.clamp_min(1e-30)
    has = share >= scoring.min_evidence
    if scoring.prior == "neighbourhood":
        prior = torch.where(total_evidence > 0, sums.sum(1, keepdim=True) / total_evidence.clamp_min(1e-30),
                            torch.full_like(total_evidence, float(scoring.empty_prior)))
    else:
        prior = torch.full_like(total_evidence, float(scoring.prior))
    mean = sums / evidence.clamp_min(1e-30)
    return torch.where(has, mean, prior.expand_as(mean)), share
