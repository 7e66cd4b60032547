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
from typing import Callable, Optional

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


def play(spec: WorkerSpec, worker: int, decide: Callable[[np.ndarray], np.ndarray],
         submit: Callable[[Episode], None], *, first_episode: int = 0, restart: int = 0) -> int:
    """Plays episodes first_episode … spec.episodes − 1; returns how many finished. A StopRequested
    from `decide` ends the run quietly (the unfinished episode is dropped: engrams are stored per
    finished episode)."""
    env = make_env(spec.env_id, spec.env_kwargs)
    rng = np.random.default_rng([spec.seed, worker, restart])
    repeats = EpisodeRepeats() if spec.exploration.avoid_repeats else None
    finished = 0
    try:
        for index in range(first_episode, spec.episodes):
            epsilon = spec.exploration.epsilon_after(index)
            obs, _ = env.reset(seed=episode_seed(spec.seed, worker, index))
            states, actions, rewards, latencies = [], [], [], []
            env_steps, terminated, truncated = 0, False, False
            if repeats is not None:
                repeats.reset()
            while not (terminated or truncated):
                obs = np.asarray(obs, dtype=np.float32)
                t0 = time.perf_counter()
                scores = np.asarray(decide(obs))
                latencies.append(time.perf_counter() - t0)
                if repeats is not None:
                    scores = repeats.scores(obs, scores)
                action = int(select_actions(scores[None, :], rng, policy=spec.exploration.policy,
                                            epsilon=epsilon, beta=spec.exploration.beta)[0])
                if repeats is not None:
                    repeats.record(obs, action)
                reward = 0.0
                for _ in range(spec.action_repeat):
                    next_obs, step_reward, terminated, truncated, _ = env.step(action)
                    reward += float(step_reward)
                    env_steps += 1
                    if terminated or truncated:
                        break
                states.append(obs)
                actions.append(action)
                rewards.append(reward)
                obs = next_obs
            submit(Episode(worker=worker, index=index, states=np.stack(states), actions=np.asarray(actions, np.int64),
                           rewards=np.asarray(rewards, np.float64), final_state=np.asarray(obs, np.float32),
                           terminated=bool(terminated), env_steps=env_steps,
                           latencies=np.asarray(latencies, np.float64)))
            finished += 1
    except StopRequested:
        pass
    finally:
        env.close()
    return finished
