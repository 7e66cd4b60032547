"""The memory side of the asynchronous trainer: one predictor and one writer over the brains.

`MemoryServer` holds the EngramBrain(s) and is driven by an engine (the local process loop or a
Ray actor), always from one thread, so reads and writes never overlap:

- **writer**: `submit(episode)` queues a finished episode; `flush()` stores every queued episode
  of a memory with ONE `store.add` (each episode's outcomes computed by `brain.remember`, its
  writes collected and concatenated). The predictor flushes before every read, so a decision
  sees every episode that finished before it was answered: every agent immediately benefits from
  every other agent's experience.
- **predictor**: `decide(workers, states)` answers a batch of pending decisions with ONE fused
  read per memory (`brain.action_scores`): one read for a shared memory, one per memory that has
  requests in the batch when memories are isolated.

Observation normalisation follows `resonant.Trainer`: a memory's first `normalise_episodes`
finished episodes are played at random (the predictor answers with equal scores), then the
per-dimension mean and standard deviation of their states are frozen as the brain's normaliser and
the episodes are stored. A run that ends before that fits the normaliser from what it has, so
every finished episode becomes engrams.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np
import torch

from ..engram import validation
from ..engram.brain import EngramBrain
from ..trainer import Normaliser
from .worker import Episode


@contextmanager
def torch_threads(count: Optional[int]):
    """torch (and the fused kernels') intra-op threads set to `count` within the block (None: as
    they are). The predictor shares the machine with its workers: on 2 cores one read thread
    measured ~5x faster than two competing with the workers (BENCHMARKS.md)."""
    if count is None:
        yield
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"predictor_threads must be a positive integer or None, got {count!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _CollectingStore:
    """Stands in for a brain's store while a batch of episodes is remembered: reads (action_values,
    search, ...) go to the real store, writes are checked as the real store checks them, collected,
    and stored with one `add` at the end."""

    def __init__(self, store):
        self._store = store
        self.parts: list = []

    def add(self, states, actions, outcomes, episode_returns=0.0) -> int:
        batch = validation.engrams(states, actions, outcomes, episode_returns, state_dim=self._store.state_dim,
                                   num_actions=self._store.num_actions)
        self.parts.append(batch)
        return batch[0].shape[0]

    def __getattr__(self, name):
        return getattr(self._store, name)


@contextmanager
def collected_writes(brain: EngramBrain):
    """Within the block, brain.remember(...) collects its engrams; they are stored together, with
    one store.add, when the block ends (also when it ends by an exception, so nothing remembered
    is lost)."""
    real = brain.store
    collector = _CollectingStore(real)
    brain.store = collector
    try:
        yield
    finally:
        brain.store = real
        if collector.parts:
            real.add(*(torch.cat(column) for column in zip(*collector.parts)))


class MemoryServer:
    def __init__(self, brains: Sequence[EngramBrain], memory_of_worker: Sequence[int], *, normalise_episodes: int = 20):
        if not brains:
            raise ValueError("MemoryServer needs at least one brain")
        if isinstance(normalise_episodes, bool) or not isinstance(normalise_episodes, int) or normalise_episodes < 0:
            raise ValueError(f"normalise_episodes must be an integer >= 0, got {normalise_episodes!r}")
        if any(not 0 <= m < len(brains) for m in memory_of_worker):
            raise ValueError(f"memory_of_worker must index the {len(brains)} brain(s); got {list(memory_of_worker)}")
        self.brains = list(brains)
        self.memory_of_worker = np.asarray(memory_of_worker, dtype=np.int64)
        self.normalise_episodes = normalise_episodes
        self.num_actions = self.brains[0].num_actions
        self._ready = [normalise_episodes == 0] * len(self.brains)
        self._queued: list[list[Episode]] = [[] for _ in self.brains]  # submitted, not yet stored
        self._held: list[list[Episode]] = [[] for _ in self.brains]  # waiting for the normaliser
        self.engrams_written = [0] * len(self.brains)
        self.episodes_written = [0] * len(self.brains)
        self.read_seconds = self.write_seconds = 0.0
        self.reads = self.writes = 0

    # ---- writer ----------------------------------------------------------------------------
    def submit(self, episode: Episode) -> None:
        self._queued[self.memory_of_worker[episode.worker]].append(episode)

    def queued_episodes(self) -> int:
        """Episodes submitted and not stored yet (flush stores them)."""
        return sum(len(q) for q in self._queued)

    def flush(self, *, final: bool = False) -> int:
        """Stores every queued episode (one store.add per memory); returns the engrams stored.
        final=True also stores episodes still waiting for the normaliser (fitting it from them)."""
        stored = 0
        for m, brain in enumerate(self.brains):
            episodes, self._queued[m] = self._queued[m], []
            if not self._ready[m]:
                self._held[m].extend(episodes)
                if len(self._held[m]) < self.normalise_episodes and not (final and self._held[m]):
                    continue
                brain.normalise = Normaliser.fit(np.concatenate([e.states for e in self._held[m]]))
                episodes, self._held[m] = self._held[m], []
                self._ready[m] = True
            if episodes:
                stored += self._write(m, brain, episodes)
        return stored

    def _write(self, m: int, brain: EngramBrain, episodes: list[Episode]) -> int:
        t0 = time.perf_counter()
        with collected_writes(brain):
            for e in episodes:
                brain.remember(e.states, e.actions, e.rewards, final_state=e.final_state, terminated=e.terminated)
        n = sum(e.decisions for e in episodes)
        self.engrams_written[m] += n
        self.episodes_written[m] += len(episodes)
        self.write_seconds += time.perf_counter() - t0
        self.writes += 1
        return n

    # ---- predictor -------------------------------------------------------------------------
    def decide(self, workers: Sequence[int], states: np.ndarray) -> np.ndarray:
        """Scores (Q, num_actions) float32 for the pending decisions of these workers, after
        storing every queued episode. Equal scores (a uniformly random choice) while a memory's
        normaliser is not fitted yet."""
        self.flush()
        t0 = time.perf_counter()
        states = np.asarray(states, dtype=np.float32)
        memories = self.memory_of_worker[np.asarray(workers, dtype=np.int64)]
        scores = np.zeros((len(states), self.num_actions), dtype=np.float32)
        for m in np.unique(memories):
            if self._ready[m]:
                rows = memories == m
                scores[rows] = self.brains[m].action_scores(states[rows])[0].numpy()
        self.read_seconds += time.perf_counter() - t0
        self.reads += 1
        return scores

    def memory_sizes(self) -> list[int]:
        return [len(b.store) for b in self.brains]

    def counters(self) -> dict:
        return {"engrams_written": list(self.engrams_written), "episodes_written": list(self.episodes_written),
                "memory_sizes": self.memory_sizes(), "reads": self.reads, "read_seconds": self.read_seconds,
                "writes": self.writes, "write_seconds": self.write_seconds}
