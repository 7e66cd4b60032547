"""The Ray engine: workers as Ray actors, the predictor and writer as one Ray actor holding the memory.

    pip install "resonant-kernels[ray]"
    resonant train-async lunarlander --engine ray --workers 8                      # a local Ray instance
    resonant train-async lunarlander --engine ray --ray-address auto --workers 64  # an existing cluster

The memory actor (`MemoryActor`) builds the brain(s) with the trainer's brain factory *inside* the
actor, so the torch store lives where it is read and written, and batches decisions exactly as
the local engine does: a batch is answered when every playing worker has a decision pending (at
most `batch_size`) or `batch_timeout` after the first, with one fused read after storing every
episode that arrived. Worker actors (`WorkerActor`) play their episodes with the same loop as
local workers (worker.play), each decision one actor call.

On a cluster the memory actor runs on one node (the driver's cluster picks it); workers spread
over the nodes, one CPU each (`worker_cpus`). A store shared *across machines* is a Milvus server:
run with `--store milvus:http://HOST:19530`, and the memory actor reads and writes that server
(scored from the k nearest engrams, as Milvus answers k-NN queries). When this engine starts its
own local Ray instance it declares one logical CPU per actor, so any number of workers fits on a
small machine, and shuts the instance down at the end.

Failures: a worker actor whose run raises is reported with the remote traceback (Ray's
RayTaskError); one that dies (RayActorError) with Ray's reason. As in the local engine the run
then restarts the worker on its remaining episodes (on_worker_error="restart", at most
max_restarts in all) or stops cleanly and raises WorkerFailed. Ctrl-C kills every actor of the
run and, when this engine started Ray, shuts it down.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Optional

import numpy as np

from .control import RunControl, check_failure_policy
from .stats import AllPlayingRate, LatencyHistogram, RunStats
from .worker import Episode, StopRequested, WorkerSpec, play


def require_ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImportError("engine='ray' needs Ray: pip install 'resonant-kernels[ray]'") from exc
    return ray


class MemoryActor:
    """The predictor and writer (a MemoryServer) inside one asyncio Ray actor."""

    def __init__(self, brain_factory, num_workers: int, memory: str, normalise_episodes: int, batch_size: int,
                 batch_timeout: float, predictor_threads: Optional[int], episodes_per_worker: Optional[int] = None):
        import torch

        from .trainer import build_server

        if predictor_threads is not None:
            torch.set_num_threads(predictor_threads)
        self.server = build_server(brain_factory, num_workers, memory, normalise_episodes)
        self.batch_size, self.batch_timeout = batch_size, batch_timeout
        self.playing = num_workers
        self.pending: list = []  # (worker, observation, future, arrival)
        self.timer = None
        self.records: list = []
        self.batch_sizes: list = []
        self.request_wait = LatencyHistogram()
        self.all_playing = AllPlayingRate(episodes_per_worker)
        self.stopping = False
        self.first_answer = self.last_answer = None

    async def decide(self, worker: int, observation: np.ndarray) -> np.ndarray:
        if self.stopping:
            raise StopRequested("the run is stopping")
        future = asyncio.get_running_loop().create_future()
        self.pending.append((worker, np.asarray(observation, dtype=np.float32), future, time.monotonic()))
        if len(self.pending) >= min(self.batch_size, max(1, self.playing)):
            self._answer()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.batch_timeout, self._answer)
        return await future

    def _answer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending = self.pending, []
        if not batch:
            return
        try:
            scores = self.server.decide([b[0] for b in batch], np.stack([b[1] for b in batch]))
        except Exception as exc:  # every waiting worker sees the predictor's error
            for b in batch:
                b[2].set_exception(exc)
            return
        now = time.monotonic()
        if self.first_answer is None:
            self.first_answer = now
        self.last_answer = now
        self.batch_sizes.append(len(batch))
        self.all_playing.batch(len(batch), now)
        self.request_wait.add([now - b[3] for b in batch])
        for b, row in zip(batch, scores):
            if not b[2].done():
                b[2].set_result(row)

    async def submit(self, episode: Episode) -> None:
        # arrays arrive read-only (Ray's zero-copy deserialisation); the store wants its own copies
        episode = dataclasses.replace(episode, states=np.array(episode.states), actions=np.array(episode.actions),
                                      rewards=np.array(episode.rewards), final_state=np.array(episode.final_state))
        self.server.submit(episode)
        self.all_playing.episode(episode.index)
        # the driver's record of the episode, without its states
        self.records.append(dataclasses.replace(episode, states=episode.states[:0], final_state=episode.final_state[:0]))

    async def worker_done(self) -> None:
        self.playing -= 1
        if self.pending and len(self.pending) >= min(self.batch_size, max(1, self.playing)):
            self._answer()

    async def take_records(self) -> list:
        records, self.records = self.records, []
        return records

    async def finish(self) -> tuple:
        """Stops answering, stores everything, returns (records, batch sizes, request waits, seconds
        from the first answer to the last, counters, the rate while every worker played)."""
        self.stopping = True
        for b in self.pending:
            b[2].set_exception(StopRequested("the run is stopping"))
        self.pending = []
        self.server.flush(final=True)
        records, self.records = self.records, []
        counters = self.server.counters()
        for brain in self.server.brains:
            brain.store.close()
        answering = 0.0 if self.first_answer is None else self.last_answer - self.first_answer
        return records, self.batch_sizes, self.request_wait, answering, counters, self.all_playing


class WorkerActor:
    def __init__(self, worker: int, spec: WorkerSpec, memory, first_episode: int, restart: int):
        self.worker, self.spec, self.memory = worker, spec, memory
        self.first_episode, self.restart = first_episode, restart

    def run(self) -> int:
        import ray

        def decide(observation):
            return ray.get(self.memory.decide.remote(self.worker, observation))

        def submit(episode):
            ray.get(self.memory.submit.remote(episode))  # waits, so every finished episode is stored by the end

        finished = play(self.spec, self.worker, decide, submit, first_episode=self.first_episode,
                        restart=self.restart)
        ray.get(self.memory.worker_done.remote())
        return finished


class RayEngine:
    def __init__(self, *, address: Optional[str] = None, batch_size: int = 64, batch_timeout: float = 0.005,
                 on_worker_error: str = "stop", max_restarts: int = 3, max_seconds: Optional[float] = None,
                 predictor_threads: Optional[int] = 1, worker_cpus: float = 1.0, poll_interval: float = 0.2):
        check_failure_policy(on_worker_error, max_restarts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        require_ray()
        self.address, self.batch_size, self.batch_timeout = address, batch_size, batch_timeout
        self.on_worker_error, self.max_restarts, self.max_seconds = on_worker_error, max_restarts, max_seconds
        self.predictor_threads, self.worker_cpus, self.poll_interval = predictor_threads, worker_cpus, poll_interval

    def run(self, brain_factory, memory: str, normalise_episodes: int, specs: list[WorkerSpec], stats: RunStats,
            on_episode=None) -> RunStats:
        ray = require_ray()
        started_ray = False
        if not ray.is_initialized():
            if self.address is None:
                # logical CPUs: one per actor, so a run of any size schedules on a small machine
                ray.init(num_cpus=int(np.ceil(len(specs) * self.worker_cpus)) + 1, include_dashboard=False,
                         log_to_driver=True)
            else:
                ray.init(address=self.address)
            started_ray = True
        memory_cls = ray.remote(num_cpus=1)(MemoryActor)
        worker_cls = ray.remote(num_cpus=self.worker_cpus)(WorkerActor)
        mem = memory_cls.remote(brain_factory, len(specs), memory, normalise_episodes, self.batch_size,
                                self.batch_timeout, self.predictor_threads, specs[0].episodes)
        actors: dict = {}  # worker -> actor
        running: dict = {}  # ObjectRef -> worker
        done_episodes = [0] * len(specs)
        restarts = [0] * len(specs)
        failure: Optional[str] = None

        def start(w: int) -> None:
            actors[w] = worker_cls.remote(w, specs[w], mem, done_episodes[w], restarts[w])
            running[actors[w].run.remote()] = w

        def absorb(records) -> None:
            for e in records:
                stats.record_episode(e)
                done_episodes[e.worker] = max(done_episodes[e.worker], e.index + 1)
                if on_episode is not None:
                    on_episode(e)

        with RunControl(self.max_seconds) as control:
            try:
                for w in range(len(specs)):
                    start(w)
                while running:
                    stop = control.stop_reason()
                    if stop:
                        stats.stop_reason = stop
                        break
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=self.poll_interval)
                    absorb(ray.get(mem.take_records.remote()))
                    for ref in ready:
                        w = running.pop(ref)
                        try:
                            ray.get(ref)
                            continue
                        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                            report = str(exc)
                        absorb(ray.get(mem.take_records.remote()))
                        stats.record_failure(w, restarts[w], done_episodes[w], report)
                        ray.kill(actors.pop(w))
                        if self.on_worker_error == "restart" and stats.may_restart(self.max_restarts):
                            restarts[w] += 1
                            start(w)
                        else:
                            ray.get(mem.worker_done.remote())
                            stats.stop_reason = f"worker {w} failed"
                            failure = report
                            break
                    if failure:
                        break
            finally:
                for actor in actors.values():
                    ray.kill(actor)
                try:
                    records, batch_sizes, request_wait, answering, counters, all_playing = ray.get(
                        mem.finish.remote(), timeout=60)
                    absorb(records)
                    stats.batch_sizes.extend(batch_sizes)
                    stats.request_wait.merge(request_wait)
                    stats.answering_seconds = answering
                    stats.all_playing = all_playing
                    stats.finish(counters)
                finally:
                    ray.kill(mem)
                    if started_ray:
                        ray.shutdown()
        return control.finish(stats, failure)
