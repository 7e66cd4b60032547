"""Local linear action scores from one fused kernel read.

The plain score of action a at query state q is the kernel-weighted mean outcome of the engrams
that took a (Nadaraya–Watson). Its bias is the problem on control tasks: the engrams behind
each action sit at *different* places around q, because the policy chose actions by state (e.g. the
main engine fired where the lander falls fastest), and the outcome changes across the
neighbourhood by more than actions differ. Local linear regression removes that: within the
kernel around q fit

    outcome ≈ c[action] + βᵀ (state − q)

by weighted least squares, one intercept per action and one slope shared by all actions, and
score each action by c[a], its outcome *at q*. Everything the fit needs is a kernel-weighted sum
over the memory, so it is ONE `gaussian_read` with these value columns per engram (s: state,
o: outcome, e: one-hot(action)):

    [e·o (A), e (A), e⊗s (A·d), upper triangle of s sᵀ (d(d+1)/2), s·o (d)]

followed by a d×d solve per query. Nothing of size Q×M is formed. Stores that answer k-nearest
queries (Milvus) fit the same model over each query's k neighbours (scores_from_neighbours).
Recency weights scale whole rows, so they combine with it; the outcome tilt does not (it is not
a weighted sum of these).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def column_count(state_dim: int, num_actions: int) -> int:
    d, A = state_dim, num_actions
    return A * (2 + d) + d * (d + 1) // 2 + d


def value_columns(states: torch.Tensor, actions: torch.Tensor, outcomes: torch.Tensor,
                  num_actions: int) -> torch.Tensor:
    """(N, column_count) value rows, in the states' dtype, for engrams (states (N, d), actions (N,), outcomes (N,))."""
    n, d = states.shape
    e = F.one_hot(actions, num_actions).to(states.dtype)
    iu = torch.triu_indices(d, d, device=states.device)
    outer = states[:, iu[0]] * states[:, iu[1]]
    return torch.cat([e * outcomes[:, None], e, (e[:, :, None] * states[:, None, :]).reshape(n, -1), outer,
                      states * outcomes[:, None]], dim=1)


def scores_from_neighbours(query: torch.Tensor, states: torch.Tensor, actions: torch.Tensor, outcomes: torch.Tensor,
                           weights: torch.Tensor, num_actions: int, ridge: float,
                           bandwidth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same fit over k neighbours per query (states (Q, k, d), actions/outcomes/weights (Q, k);
    padded neighbours weigh 0): the weighted sums of value_columns a read would return."""
    Q, k, d = states.shape
    cols = value_columns(states.reshape(Q * k, d).double(), actions.reshape(-1), outcomes.reshape(-1).double(),
                         num_actions).reshape(Q, k, -1)
    read = (weights.double()[:, :, None] * cols).sum(1)
    return scores_from_read(read, query, num_actions, ridge, bandwidth)


def scores_from_read(read: torch.Tensor, query: torch.Tensor, num_actions: int, ridge: float,
                     bandwidth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, evidence), both (Q, A), from a read of value_columns: evidence[a] is action a's
    total weight and sums[a] / evidence[a] its local linear intercept c[a]. The slope is solved
    with a ridge of `ridge` · bandwidth² · (total weight), relative to the kernel's own spread
    (bandwidth² per dimension), so it stays defined where the neighbourhood is flat in some
    direction (a single engram, a leg contact that never changes)."""
    r, q = read.double(), query.double()
    Q, d = q.shape
    A = num_actions
    sum_o, weight = r[:, :A], r[:, A:2 * A]
    # moments about the query, not the origin: the slope multiplies (state − q)
    dx = r[:, 2 * A:2 * A + A * d].reshape(Q, A, d) - weight[:, :, None] * q[:, None, :]
    off = A * (2 + d)
    iu = torch.triu_indices(d, d)
    ss = torch.zeros(Q, d, d, dtype=torch.float64)
    ss[:, iu[0], iu[1]] = r[:, off:off + iu.shape[1]]
    ss = ss + ss.transpose(1, 2) - torch.diag_embed(torch.diagonal(ss, dim1=1, dim2=2))
    so = r[:, off + iu.shape[1]:]
    total = weight.sum(1)
    s_sum = dx.sum(1) + total[:, None] * q
    xx = (ss - q[:, :, None] * s_sum[:, None, :] - s_sum[:, :, None] * q[:, None, :]
          + total[:, None, None] * q[:, :, None] * q[:, None, :])
    xo = so - q * sum_o.sum(1, keepdim=True)
    # eliminate the intercepts: the slope sees only the within-action (co)variation
    inv = torch.where(weight > 0, 1.0 / weight.clamp_min(1e-300), 0.0)
    lhs = xx - torch.einsum("qad,qae,qa->qde", dx, dx, inv)
    rhs = xo - torch.einsum("qad,qa,qa->qd", dx, sum_o, inv)
    lam = ridge * bandwidth**2 * total + 1e-300  # the floor keeps rows with no evidence solvable
    beta = torch.linalg.solve(lhs + lam[:, None, None] * torch.eye(d, dtype=torch.float64), rhs)
    sums = sum_o - torch.einsum("qad,qd->qa", dx, beta)
    return sums.float(), weight.float()
