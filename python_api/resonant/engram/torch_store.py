"""TorchEngramStore: engrams in torch tensors (CPU or GPU), exact search, fused kernel scoring.

Scoring without k (kernel-weighted): ONE `resonant_kernels.gaussian_read` over the whole memory
with values [one-hot(action)·outcome, one-hot(action)] (kept up to date on insert, so no per-call
table is built). The read's first half over its second half is every action's kernel-weighted
mean outcome; the second half alone is each action's share of the evidence. `match_threshold`
(default 3 bandwidths) bounds the neighbourhood, so a state far from all experience reads zero
evidence instead of borrowing from the nearest far-away engram. With a recency half-life the
values are scaled per engram by its recency weight (the read is linear in the values, so sums and
evidence are both recency-weighted); with an outcome temperature the read gains a block of
tilted columns (store.outcome_tilt). That scaled copy is rebuilt only when the memory changes.

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
from . import local_linear
from ..types import ArrayLike, Device, PathLike
from .store import (EngramStore, Neighbours, as_states, check_estimator, check_positive_or_none,
                    outcome_tilt, recency_weights, tilted_sums)

_QUERY_CHUNK_ELEMENTS = 1 << 24  # distances materialised per search chunk


class TorchEngramStore(EngramStore):
    def __init__(self, state_dim: int, num_actions: int, *, capacity: Optional[int] = None,
                 eviction: str = "oldest", device: Device = "cpu", seed: Optional[int] = None,
                 initial_size: int = 4096):
        self._configure(state_dim, num_actions, capacity, eviction, seed)
        self.device = torch.device(device)
        self._n = 0
        self._next_index = 0
        # value columns kept per engram: [one-hot·outcome, one-hot], widened to the local linear
        # columns the first time that estimator is asked for (then maintained on insert)
        self._value_width = 2 * num_actions
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
        # the local linear columns begin with the plain read's [one-hot·outcome, one-hot]
        return local_linear.value_columns(states, actions, outcomes, self.num_actions)[:, : self._value_width]

    def _widen_for_local_linear(self) -> None:
        width = local_linear.column_count(self.state_dim, self.num_actions)
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
        k = self.check_k(k)
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

    def _weighted_values(self, recency_halflife: Optional[float], outcome_temperature: Optional[float],
                         estimator: str):
        """The read's values with each row scaled by its engram's weight: [one-hot·outcome·w·t,
        one-hot·w·t, one-hot·w] (w: recency weight, t: outcome tilt against the memory's best
        outcome; the last block only when tilting), or the local linear columns times w. Cached
        until the memory changes: engrams are added once per episode but read at every decision."""
        n, A = self._n, self.num_actions
        if estimator == "local_linear":
            self._widen_for_local_linear()
            base = self._values[:n]
        else:
            base = self._values[:n, : 2 * A]
        if recency_halflife is None and outcome_temperature is None:
            return base
        key = (self._n, self._next_index, recency_halflife, outcome_temperature, estimator)
        if getattr(self, "_weighted_key", None) != key:
            w = recency_weights(self._index[:n].cpu(), self._next_index - 1, recency_halflife).to(self.device)
            values = base * w[:, None]
            if outcome_temperature is not None:
                outcomes = self._outcomes[:n]
                t = outcome_tilt(outcomes.cpu(), outcomes.max().item(), outcome_temperature).to(self.device)
                values = torch.cat([values * t[:, None], values[:, A:]], dim=1)
            self._weighted_cache, self._weighted_key = values, key
        return self._weighted_cache

    def action_values(self, states: ArrayLike, *, k: Optional[int], bandwidth: Optional[float],
                      match_threshold: Optional[float] = None, recency_halflife: Optional[float] = None,
                      outcome_temperature: Optional[float] = None, estimator: str = "mean",
                      ridge: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        if k is not None:
            return super().action_values(states, k=k, bandwidth=bandwidth, recency_halflife=recency_halflife,
                                         outcome_temperature=outcome_temperature, estimator=estimator, ridge=ridge)
        recency_halflife = check_positive_or_none(recency_halflife, "recency_halflife")
        outcome_temperature = check_positive_or_none(outcome_temperature, "outcome_temperature")
        check_estimator(estimator, ridge, outcome_temperature)
        if bandwidth is None or not bandwidth > 0:
            raise ValueError(f"kernel-weighted scoring (k=None) needs a positive bandwidth, got {bandwidth!r}")
        q = as_states(states, self.state_dim).to(self.device)
        if self._n == 0:
            zeros = torch.zeros(q.shape[0], self.num_actions)
            return zeros, zeros.clone()
        threshold = 3.0 * bandwidth if match_threshold is None else match_threshold
        # query and memory share the bandwidth: v = σ_q² + σ_m² = bandwidth²
        sd = bandwidth / math.sqrt(2.0)
        values = self._weighted_values(recency_halflife, outcome_temperature, estimator)
        read = resonant_kernels.gaussian_read(
            q, sd, self._states[: self._n], sd, values, match_threshold=threshold
        ).cpu()
        A = self.num_actions
        if estimator == "local_linear":
            return local_linear.scores_from_read(read, q.cpu(), A, ridge, bandwidth)
        if outcome_temperature is None:
            return read[:, :A], read[:, A:]
        evidence = read[:, 2 * A:]
        return tilted_sums(read[:, :A], read[:, A:2 * A], evidence), evidence

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
