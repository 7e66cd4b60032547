"""What one worker does, whichever engine runs it: step its own environment, ask the predictor
for every decision, choose the action itself, and hand each finished episode to the writer.

The worker never touches the memory: `decide(observation)` returns every action's score (one row
of the predictor's batched read) and `submit(episode)` sends a finished episode. Choosing the
action here (epsilon-greedy or softmax, engram/policy.py) keeps the predictor's batch a pure read
and gives every worker its own exploration schedule: epsilon decays per episode *this worker*
played, so each of N agents sharing one memory explores as a lone agent would.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..engram.config import Exploration
from ..engram.policy import EpisodeRepeats, select_actions


class StopRequested(Exception):
    """Raised by an engine's `decide` when the run is stopping: the worker ends without error."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, picklable (it travels to worker processes and Ray actors)."""

    env_id: str
    episodes: int  # this worker's budget of episodes
    state_dim: int
    num_actions: int
    seed: int = 0
    env_kwargs: dict = field(default_factory=dict)
    action_repeat: int = 1
    exploration: Exploration = Exploration()  # the policy, and the epsilon schedule from this worker's first episode

    def __post_init__(self):
        if isinstance(self.episodes, bool) or not isinstance(self.episodes, int) or self.episodes < 1:
            raise ValueError(f"episodes (per worker) must be a positive integer, got {self.episodes!r}")
        if isinstance(self.action_repeat, bool) or not isinstance(self.action_repeat, int) or self.action_repeat < 1:
            raise ValueError(f"action_repeat must be a positive integer, got {self.action_repeat!r}")

    @classmethod
    def from_brain(cls, brain, env_id: str, episodes: int, **kwargs) -> "WorkerSpec":
        """The action-selection settings of `brain` (its exploration, from its current epsilon)."""
        return cls(env_id=env_id, episodes=episodes, state_dim=brain.state_dim, num_actions=brain.num_actions,
                   exploration=dataclasses.replace(brain.exploration, epsilon_start=brain.epsilon), **kwargs)


@dataclass
class Episode:
    """One finished episode of one worker: one engram per decision (states[t], actions[t], rewards[t])."""

    worker: int
    index: int  # the worker's episode number, 0-based
    states: np.ndarray  # (T, state_dim) float32, the observation each decision was made at
    actions: np.ndarray  # (T,) int64
    rewards: np.ndarray  # (T,) float64, summed over the action_repeat steps of each decision
    final_state: np.ndarray  # the observation after the last step
    terminated: bool  # False: truncated (time limit), the outcome bootstraps from final_state
    env_steps: int
    latencies: np.ndarray  # (T,) float64 seconds each decision took to come back from the predictor

    @property
    def decisions(self) -> int:
        return len(self.actions)

    @property
    def total_reward(self) -> float:
        return float(self.rewards.sum())


def episode_seed(seed: int, worker: int, index: int) -> int:
    """The reset seed of a worker's episode: fixed by (seed, worker, index), so a restarted worker
    replays the same starts."""
    return int(np.random.SeedSequence([seed, worker, index]).generate_state(1)[0])


def make_env(env_id: str, env_kwargs: Optional[dict] = None):
    import gymnasium as gym

    if env_id.startswith("resonant/"):
        import resonant.sim  # noqa: F401  (registers the resonant environments)
    return gym.make(env_id, **(env_kwargs or {}))


class _Agent:
    """One worker's environment, exploration and episode in progress (a process may host several)."""

    def __init__(self, spec: WorkerSpec, worker: int, first_episode: int, restart: int):
        self.spec, self.worker = spec, worker
        self.env = make_env(spec.env_id, spec.env_kwargs)
        self.rng = np.random.default_rng([spec.seed, worker, restart])
        self.repeats = EpisodeRepeats() if spec.exploration.avoid_repeats else None
        self.index = first_episode - 1
        self.finished = 0
        self.playing = self._next_episode()

    def _next_episode(self) -> bool:
        """Starts the next episode of the budget; False when the budget is spent."""
        self.index += 1
        if self.index >= self.spec.episodes:
            return False
        self.epsilon = self.spec.exploration.epsilon_after(self.index)
        obs, _ = self.env.reset(seed=episode_seed(self.spec.seed, self.worker, self.index))
        self.obs = np.asarray(obs, dtype=np.float32)
        self.states, self.actions, self.rewards, self.latencies = [], [], [], []
        self.env_steps = 0
        if self.repeats is not None:
            self.repeats.reset()
        return True

    def act(self, scores: np.ndarray, latency: float, submit: Callable[[Episode], None]) -> None:
        """Chooses and plays the action for `scores`; at the episode's end submits it and starts the next."""
        spec, obs = self.spec, self.obs
        self.latencies.append(latency)
        if self.repeats is not None:
            scores = self.repeats.scores(obs, scores)
        action = int(select_actions(scores[None, :], self.rng, policy=spec.exploration.policy, epsilon=self.epsilon,
                                    beta=spec.exploration.beta)[0])
        if self.repeats is not None:
            self.repeats.record(obs, action)
        reward, terminated, truncated = 0.0, False, False
        for _ in range(spec.action_repeat):
            next_obs, step_reward, terminated, truncated, _ = self.env.step(action)
            reward += float(step_reward)
            self.env_steps += 1
            if terminated or truncated:
                break
        self.states.append(obs)
        self.actions.append(action)
        self.rewards.append(reward)
        self.obs = np.asarray(next_obs, dtype=np.float32)
        if terminated or truncated:
            submit(Episode(worker=self.worker, index=self.index, states=np.stack(self.states),
                           actions=np.asarray(self.actions, np.int64), rewards=np.asarray(self.rewards, np.float64),
                           final_state=self.obs, terminated=bool(terminated), env_steps=self.env_steps,
                           latencies=np.asarray(self.latencies, np.float64)))
            self.finished += 1
            self.playing = self._next_episode()


class AgentGroup:
    """Several workers stepped in lock step by whoever hosts them (a worker process, or the
    predictor's own process between its reads: LocalEngine's predictor_workers). `pending()` gives
    the workers still playing and their observations, `act(scores, ...)` plays one step of each
    with its row of scores. Worker w plays episodes first_episodes[i] … spec.episodes − 1."""

    def __init__(self, spec: WorkerSpec, workers: Sequence[int], first_episodes: Sequence[int], restart: int = 0):
        self.agents: list[_Agent] = []
        try:
            for w, first in zip(workers, first_episodes):
                self.agents.append(_Agent(spec, w, first, restart))
        except BaseException:
            self.close()
            raise
        self._playing: list[_Agent] = []

    def pending(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(worker ids, observations (n, state_dim) float32) of the workers still playing; None when all are done."""
        self._playing = [a for a in self.agents if a.playing]
        if not self._playing:
            return None
        return (np.asarray([a.worker for a in self._playing], dtype=np.int64),
                np.stack([a.obs for a in self._playing]))

    def act(self, scores: np.ndarray, latency: float, submit: Callable[[Episode], None]) -> None:
        """One step of each worker of the last pending(), with its row of `scores`."""
        for a, row in zip(self._playing, np.asarray(scores)):
            a.act(row, latency, submit)

    def finished(self) -> dict:
        return {a.worker: a.finished for a in self.agents}

    def close(self) -> None:
        for a in self.agents:
            a.env.close()


def play_group(spec: WorkerSpec, workers: Sequence[int], decide: Callable[[np.ndarray, np.ndarray], np.ndarray],
               submit: Callable[[Episode], None], *, first_episodes: Sequence[int], restart: int = 0) -> dict:
    """Plays the episodes of several workers in one process, in lock step (AgentGroup): every step,
    ONE call `decide(workers_playing, observations)` returns the scores (one row per worker still
    playing), then each worker chooses its action (its own rng and epsilon schedule) and steps its
    own environment. Returns {worker: episodes finished}. A StopRequested from `decide` ends the run
    quietly (unfinished episodes are dropped: engrams are stored per finished episode)."""
    group = AgentGroup(spec, workers, first_episodes, restart)
    try:
        while (pending := group.pending()) is not None:
            t0 = time.perf_counter()
            scores = decide(*pending)
            group.act(scores, time.perf_counter() - t0, submit)
    except StopRequested:
        pass
    finally:
        group.close()
    return group.finished()


def play(spec: WorkerSpec, worker: int, decide: Callable[[np.ndarray], np.ndarray],
         submit: Callable[[Episode], None], *, first_episode: int = 0, restart: int = 0) -> int:
    """One worker: plays episodes first_episode … spec.episodes − 1 with `decide(observation)` → scores;
    returns how many finished (play_group with one worker)."""
    done = play_group(spec, [worker], lambda ids, obs: np.asarray(decide(obs[0]))[None, :], submit,
                      first_episodes=[first_episode], restart=restart)
    return done[worker]
