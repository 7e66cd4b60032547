"""TorchEngramStore: engrams in torch tensors (CPU or GPU), exact search, fused kernel scoring.

Scoring without k (kernel-weighted): ONE `resonant_kernels.gaussian_read` over the whole memory
whose values are each engram's read columns (engram/scoring.py: [one-hot(action)·outcome,
one-hot(action)], or the local linear moments; kept up to date on insert, so no per-call table is
built), then `scoring.from_read`. `match_threshold` (default 3 bandwidths) bounds the
neighbourhood, so a state far from all experience reads zero evidence instead of borrowing from
the nearest far-away engram. With a recency half-life or an outcome temperature the columns are
scaled per engram (scoring.weighted_columns); that scaled copy is rebuilt only when the memory
changes: engrams are added once per episode but read at every decision. For the same reason the
value checks gaussian_read runs on the memory (resonant_kernels.validation.memory) run once per
version of the memory and the scoring (`_checked_memory`), the queries' at every call. With k: the
k nearest (EngramStore.action_values).

Exact k-NN (`search`): torch.cdist + topk over chunks of queries, so at most chunk×M distances
exist at once (never Q×M×d).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

import resonant_kernels
from resonant_kernels import validation as kernel_checks
from ..types import ArrayLike, Device, PathLike
from .config import Scoring
from .scoring import column_count, from_read, read_columns, weighted_columns
from .store import EngramStore, Neighbours
from .validation import as_states, positive_int

_QUERY_CHUNK_ELEMENTS = 1 << 24  # distances materialised per search chunk


class TorchEngramStore(EngramStore):
    def __init__(self, state_dim: int, num_actions: int, *, capacity: Optional[int] = None,
                 eviction: str = "oldest", device: Device = "cpu", seed: Optional[int] = None,
                 initial_size: int = 4096):
        self._configure(state_dim, num_actions, capacity, eviction, seed)
        self.device = torch.device(device)
        self._n = 0
        self._next_index = 0
        # read columns kept per engram: the mean's 2A, widened to the local linear columns the
        # first time that estimator is asked for (then maintained on insert)
        self._value_width = column_count(state_dim, num_actions, "mean")
        self._alloc(max(1, min(initial_size, capacity or initial_size)))

    # ---- storage ---------------------------------------------------------------------------
    def _alloc(self, size: int) -> None:
        old = getattr(self, "_states", None)
        dev, A = self.device, self.num_actions
        new = {
            "_states": torch.zeros(size, self.state_dim, device=dev),
            "_actions": torch.zeros(size, dtype=torch.int64, device=dev),
            "_outcomes": torch.zeros(size, device=dev),
            "_returns": torch.zeros(size, device=dev),
            "_index": torch.zeros(size, dtype=torch.int64, device=dev),
            "_values": torch.zeros(size, self._value_width, device=dev),
        }
        for name, buf in new.items():
            if old is not None:
                buf[: self._n] = getattr(self, name)[: self._n]
            setattr(self, name, buf)

    def __len__(self) -> int:
        return self._n

    def _insert(self, states, actions, outcomes, episode_returns) -> None:
        n = states.shape[0]
        if self._n + n > self._states.shape[0]:
            size = max(self._n + n, 2 * self._states.shape[0])
            self._alloc(min(size, self.capacity) if self.capacity else size)
        rows = slice(self._n, self._n + n)
        dev = self.device
        actions = actions.to(dev)
        outcomes = outcomes.to(dev)
        states = states.to(dev)
        self._states[rows] = states
        self._actions[rows] = actions
        self._outcomes[rows] = outcomes
        self._returns[rows] = episode_returns.to(dev)
        self._index[rows] = torch.arange(self._next_index, self._next_index + n, device=dev)
        self._values[rows] = self._value_rows(states, actions, outcomes)
        self._n += n
        self._next_index += n

    def _value_rows(self, states, actions, outcomes) -> torch.Tensor:
        # the local linear columns begin with the mean's
        return read_columns(states, actions, outcomes, self.num_actions)[:, : self._value_width]

    def _widen_for_local_linear(self) -> None:
        width = column_count(self.state_dim, self.num_actions, "local_linear")
        if self._value_width == width:
            return
        self._value_width = width
        n = self._n
        self._values = torch.zeros(self._states.shape[0], width, device=self.device)
        self._values[:n] = self._value_rows(self._states[:n], self._actions[:n], self._outcomes[:n])

    def _eviction_view(self):
        return self._index[: self._n].cpu().numpy(), self._outcomes[: self._n].cpu().numpy()

    def _evict(self, positions: np.ndarray) -> None:
        keep = torch.ones(self._n, dtype=torch.bool, device=self.device)
        keep[torch.as_tensor(positions, device=self.device)] = False
        m = int(keep.sum())
        for name in ("_states", "_actions", "_outcomes", "_returns", "_index", "_values"):
            buf = getattr(self, name)
            buf[:m] = buf[: self._n][keep]
        self._n = m

    def engrams(self) -> dict:
        """Views of the stored engrams (insertion order is not guaranteed after eviction)."""
        n = self._n
        return {"states": self._states[:n], "actions": self._actions[:n], "outcomes": self._outcomes[:n],
                "episode_returns": self._returns[:n], "index": self._index[:n]}

    # ---- queries ---------------------------------------------------------------------------
    def search(self, states: ArrayLike, k: int, *, with_states: bool = False) -> Neighbours:
        k = positive_int(k, "k")
        q = as_states(states, self.state_dim).to(self.device)
        Q, n = q.shape[0], self._n
        kk = min(k, n)
        dist = torch.full((Q, k), math.inf, device=self.device)
        pos = torch.full((Q, k), -1, dtype=torch.int64, device=self.device)
        if kk:
            mem = self._states[:n]
            chunk = max(1, _QUERY_CHUNK_ELEMENTS // n)
            for start in range(0, Q, chunk):
                block = q[start:start + chunk]
                # exact: cdist's matmul shortcut loses precision for near neighbours
                d = torch.cdist(block, mem, compute_mode="donot_use_mm_for_euclid_dist")
                top = torch.topk(d, kk, dim=1, largest=False, sorted=True)
                dist[start:start + chunk, :kk] = top.values
                pos[start:start + chunk, :kk] = top.indices
        valid = pos >= 0
        p = pos.clamp_min(0)
        return Neighbours(
            index=torch.where(valid, self._index[p], -1).cpu(),
            action=torch.where(valid, self._actions[p], -1).cpu(),
            outcome=torch.where(valid, self._outcomes[p], 0.0).cpu(),
            distance=dist.cpu(),
            state=torch.where(valid[:, :, None], self._states[p], 0.0).cpu() if with_states else None,
        )

    def _read_values(self, scoring: Scoring) -> torch.Tensor:
        """The read's values for this scoring (scoring.weighted_columns), cached until the memory
        or the weighting changes."""
        n = self._n
        if scoring.estimator == "local_linear":
            self._widen_for_local_linear()
        columns = self._values[:n, : column_count(self.state_dim, self.num_actions, scoring.estimator)]
        key = (n, self._next_index, scoring.recency_halflife, scoring.outcome_temperature, scoring.estimator)
        if getattr(self, "_read_key", None) != key:
            self._read_cache = weighted_columns(columns, self._index[:n], self._outcomes[:n], self._next_index - 1,
                                                self.num_actions, scoring)
            self._read_key = key
        return self._read_cache

    def _scaled(self, states: torch.Tensor, scoring: Scoring) -> torch.Tensor:
        """States as the kernel measures them: times scoring.relevance per dimension (if set)."""
        if scoring.relevance is None:
            return states
        if len(scoring.relevance) != self.state_dim:
            raise ValueError(f"scoring.relevance has {len(scoring.relevance)} factors but the store's states have "
                             f"{self.state_dim} dimensions")
        return states * torch.tensor(scoring.relevance, dtype=states.dtype, device=states.device)

    def _kernel_states(self, scoring: Scoring) -> torch.Tensor:
        """The memory's states as the kernel measures them, cached until the memory or the relevance
        changes (a decision reads them at every step, the memory changes once per episode)."""
        states = self._states[: self._n]
        if scoring.relevance is None:
            return states
        key = (self._n, self._next_index, scoring.relevance)
        if getattr(self, "_kernel_key", None) != key:
            self._kernel_cache = self._scaled(states, scoring)
            self._kernel_key = key
        return self._kernel_cache

    def action_values(self, states: ArrayLike, scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor]:
        if scoring.k is not None:
            return super().action_values(states, scoring)
        q = as_states(states, self.state_dim).to(self.device)
        if self._n == 0:
            zeros = torch.zeros(q.shape[0], self.num_actions)
            return zeros, zeros.clone()
        bandwidth = scoring.bandwidth
        threshold = 3.0 * bandwidth if scoring.match_threshold is None else scoring.match_threshold
        # query and memory share the bandwidth: v = σ_q² + σ_m² = bandwidth²
        sd = bandwidth / math.sqrt(2.0)
        query_loc = self._scaled(q, scoring)
        mem_loc, mem_values = self._checked_memory(scoring, sd)
        kernel_checks.check_locations(query_loc, "query_loc", check=kernel_checks.value_checks(None, query_loc.device))
        read = resonant_kernels.gaussian_read(query_loc, sd, mem_loc, sd, mem_values, match_threshold=threshold,
                                              validate=False).cpu()
        return from_read(read, q.cpu(), self.num_actions, scoring)

    def _checked_memory(self, scoring: Scoring, sd: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The read's memory side (kernel states, values), with the value checks gaussian_read would
        run on it (resonant_kernels.validation.memory: the same errors) once per version of the
        memory and the scoring rather than at every decision: engrams arrive once per episode and
        decisions every step, and the checks read the whole memory (0.81 against 1.19 ms a decision
        of 8 states at 10 000 engrams, local linear, one thread, on the 2-core development machine).
        A failed check is not remembered: every read raises until the memory changes."""
        mem_loc, mem_values = self._kernel_states(scoring), self._read_values(scoring)
        key = (self._n, self._next_index, scoring.relevance, scoring.recency_halflife, scoring.outcome_temperature,
               scoring.estimator, sd)
        if getattr(self, "_checked_key", None) != key:
            kernel_checks.memory(mem_loc, sd, mem_values, value_dtypes=kernel_checks.VALUE_DTYPES)
            self._checked_key = key
        return mem_loc, mem_values

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        payload = {
            "state_dim": self.state_dim, "num_actions": self.num_actions, "capacity": self.capacity,
            "eviction": self.eviction, "next_index": self._next_index,
            **{k: v.cpu().clone() for k, v in self.engrams().items()},
        }
        tmp = f"{os.fspath(path)}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a crash mid-save leaves the previous file intact

    @classmethod
    def load(cls, path: PathLike, *, device: Device = "cpu", seed: Optional[int] = None) -> "TorchEngramStore":
        p = torch.load(path, map_location="cpu", weights_only=True)
        store = cls(p["state_dim"], p["num_actions"], capacity=p["capacity"], eviction=p["eviction"],
                    device=device, seed=seed, initial_size=max(1, p["states"].shape[0]))
        order = torch.argsort(p["index"])
        store._insert(p["states"][order], p["actions"][order], p["outcomes"][order], p["episode_returns"][order])
        store._index[: store._n] = p["index"][order].to(store.device)
        store._next_index = p["next_index"]
        return store
