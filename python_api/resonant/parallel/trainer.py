"""AsyncTrainer: N workers, one predictor, one writer, one memory (or one memory per worker).

    from resonant import EngramBrain, Outcomes, Scoring, TorchEngramStore
    from resonant.parallel import AsyncTrainer

    def make_brain():
        return EngramBrain(TorchEngramStore(8, 4), scoring=Scoring(bandwidth=0.3, estimator="local_linear"),
                           outcomes=Outcomes(gamma=0.96))

    trainer = AsyncTrainer(make_brain, "LunarLander-v3", num_workers=8, episodes_per_worker=200,
                           action_repeat=4)
    stats = trainer.train()          # RunStats: returns per worker, decisions/s, batches, latencies
    trainer.write_report("runs", "async_lunarlander")

`memory="shared"` builds one brain that every worker reads and writes; `"isolated"` one brain
per worker (the same machinery, so the two compare fairly). `engine="local"` runs worker processes
on this machine (resonant/parallel/local.py); `engine="ray"` runs them as Ray actors, joining the
cluster at `ray_address` when given (resonant/parallel/ray_engine.py). The brain factory is called
where the memory lives (in this process, or inside the memory actor), so it must be picklable for
Ray (a module-level function or a functools.partial; cloudpickle also takes closures).

Each worker plays `episodes_per_worker` episodes, the same budget a lone agent would get. Runs
are seeded (environment starts, exploration, eviction) but not reproducible: which episodes a
decision sees depends on timing.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from ..engram.brain import EngramBrain
from .server import MemoryServer, torch_threads
from .stats import AllPlayingRate, RunStats
from .worker import Episode, WorkerSpec, make_env

MEMORIES = ("shared", "isolated")
ENGINES = ("local", "ray")


def check_env_matches(env_id: str, env_kwargs: Optional[dict], brain: EngramBrain) -> None:
    import gymnasium as gym

    env = make_env(env_id, env_kwargs)
    try:
        space, shape = env.action_space, env.observation_space.shape
    finally:
        env.close()
    if not isinstance(space, gym.spaces.Discrete):
        raise ValueError(f"{env_id} has a {type(space).__name__} action space; the trainer needs Discrete")
    if space.n != brain.num_actions or shape != (brain.state_dim,):
        raise ValueError(f"{env_id} has {space.n} actions and observations {shape}; the brain expects "
                         f"{brain.num_actions} and ({brain.state_dim},)")


def build_server(brain_factory: Callable[[], EngramBrain], num_workers: int, memory: str,
                 normalise_episodes: int) -> MemoryServer:
    """The predictor/writer over one shared brain or one brain per worker (called where the memory lives)."""
    count = 1 if memory == "shared" else num_workers
    brains = [brain_factory() for _ in range(count)]
    for b in brains:
        if not isinstance(b, EngramBrain):
            raise TypeError(f"brain_factory must return an EngramBrain, got {type(b).__name__}")
    owner = [0] * num_workers if memory == "shared" else list(range(num_workers))
    return MemoryServer(brains, owner, normalise_episodes=normalise_episodes)


class AsyncTrainer:
    def __init__(self, brain_factory: Callable[[], EngramBrain], env_id: str, *, num_workers: int = 8,
                 episodes_per_worker: int = 100, memory: str = "shared", engine: str = "local", seed: int = 0,
                 action_repeat: int = 1, normalise_episodes: int = 20, env_kwargs: Optional[dict] = None,
                 batch_size: int = 64, batch_timeout: float = 0.005, on_worker_error: str = "stop",
                 max_restarts: int = 3, max_seconds: Optional[float] = None, start_method: Optional[str] = None,
                 ray_address: Optional[str] = None, predictor_threads: Optional[int] = 1,
                 workers_per_process: int = 1, predictor_workers: int = 0, spin_wait: Optional[float] = None):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        if memory not in MEMORIES:
            raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if engine == "ray" and workers_per_process != 1:
            raise ValueError(f"workers_per_process={workers_per_process!r}: the Ray engine runs one worker per actor "
                             "(workers_per_process=1)")
        if isinstance(predictor_workers, bool) or not isinstance(predictor_workers, int) or not (
                0 <= predictor_workers <= num_workers):
            raise ValueError(f"predictor_workers must be an integer in [0, num_workers={num_workers}], "
                             f"got {predictor_workers!r}")
        if engine == "ray" and predictor_workers != 0:
            raise ValueError(f"predictor_workers={predictor_workers!r}: the Ray engine runs every worker as an actor "
                             "(predictor_workers=0)")
        if engine == "ray" and spin_wait is not None:
            raise ValueError(f"spin_wait={spin_wait!r}: only the local engine polls its pipes (spin_wait=None)")
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive or None, got {max_seconds!r}")
        self.brain_factory, self.env_id, self.env_kwargs = brain_factory, env_id, dict(env_kwargs or {})
        self.num_workers, self.memory, self.engine, self.seed = num_workers, memory, engine, seed
        self.normalise_episodes, self.predictor_threads = normalise_episodes, predictor_threads
        probe = brain_factory()  # the settings every worker uses, and a check of the environment
        check_env_matches(env_id, self.env_kwargs, probe)
        probe.store.close()
        self.spec = WorkerSpec.from_brain(probe, env_id, episodes_per_worker, seed=seed, env_kwargs=self.env_kwargs,
                                          action_repeat=action_repeat)
        self.engine_options = dict(batch_size=batch_size, batch_timeout=batch_timeout,
                                   on_worker_error=on_worker_error, max_restarts=max_restarts,
                                   max_seconds=max_seconds, predictor_threads=predictor_threads,
                                   workers_per_process=workers_per_process, predictor_workers=predictor_workers,
                                   spin_wait=spin_wait)
        # each engine takes its own
        given_apart = ("predictor_threads", "workers_per_process", "predictor_workers", "spin_wait")
        options = {k: v for k, v in self.engine_options.items() if k not in given_apart}
        if engine == "local":
            from .local import LocalEngine

            self._engine = LocalEngine(start_method=start_method, workers_per_process=workers_per_process,
                                       predictor_workers=predictor_workers, spin_wait=spin_wait, **options)
        else:
            from .ray_engine import RayEngine

            self._engine = RayEngine(address=ray_address, predictor_threads=predictor_threads, **options)
        self.server: Optional[MemoryServer] = None
        self.stats: Optional[RunStats] = None

    @property
    def total_episodes(self) -> int:
        return self.num_workers * self.spec.episodes

    def train(self, *, progress: bool = True, on_episode: Optional[Callable[[Episode], None]] = None) -> RunStats:
        """Runs every worker's budget; returns the RunStats (also kept as self.stats). Raises
        WorkerFailed when a worker fails and is not restarted, KeyboardInterrupt on Ctrl-C, both
        after a clean stop with every finished episode stored (self.stats holds the partial run).
        `on_episode(episode)` is called in this process for every finished episode (with the Ray
        engine, without its states)."""
        self.stats = RunStats(self.num_workers, all_playing=AllPlayingRate(self.spec.episodes))
        bar = tqdm(total=self.total_episodes, desc=f"async {self.env_id} x{self.num_workers}", unit="ep",
                   disable=not progress)
        recent: list = []

        def record(e: Episode) -> None:
            if on_episode is not None:
                on_episode(e)
            recent.append(e.total_reward)
            del recent[:-100]
            bar.update(1)
            bar.set_postfix(mean100=f"{np.mean(recent):.1f}", refresh=False)

        specs = [self.spec] * self.num_workers
        try:
            if self.engine == "local":
                self.server = build_server(self.brain_factory, self.num_workers, self.memory, self.normalise_episodes)
                try:
                    with torch_threads(self.predictor_threads):
                        self._engine.run(self.server, specs, self.stats, record)
                finally:
                    for b in self.server.brains:
                        b.store.close()
            else:
                self._engine.run(self.brain_factory, self.memory, self.normalise_episodes, specs, self.stats, record)
        finally:
            bar.close()
        return self.stats

    def config(self) -> dict:
        s = self.spec
        return {"env": self.env_id, "env_kwargs": self.env_kwargs, "workers": self.num_workers,
                "episodes_per_worker": s.episodes, "memory": self.memory, "engine": self.engine, "seed": self.seed,
                "action_repeat": s.action_repeat, "normalise_episodes": self.normalise_episodes,
                **dataclasses.asdict(s.exploration), **self.engine_options}

    def write_report(self, out_dir, name: str, extra: Optional[dict] = None) -> dict:
        if self.stats is None:
            raise RuntimeError("nothing to report: call train() first")
        title = (f"EngramBrain on {self.env_id}: {self.num_workers} worker(s), {self.memory} memory, "
                 f"{self.engine} engine (seed {self.seed})")
        return self.stats.write_report(out_dir, name, title=title, extra={"config": self.config(), **(extra or {})})
