"""Trainer: runs an EngramBrain on any discrete-action Gymnasium environment.

Several environments run side by side so each decision is one batched `decide` call (the
memory read dominates the cost). Observations are normalised by a per-dimension mean and
standard deviation estimated from the first `normalise_episodes` episodes, which are played
at random (they count as training episodes and are remembered once the statistics exist);
the statistics are then frozen, so stored engrams and queries always share coordinates
(normalise_episodes=0: raw observations from the first episode).
With `action_repeat` r > 1 each decision is held for r environment steps and becomes one
engram whose reward is the sum over those steps: one step of LunarLander (1/50 s of thrust)
moves the return by far less than the noise between neighbouring engrams, r steps by r times
more (choose gamma per decision accordingly, e.g. 0.99**r).
Seeded: environment resets, exploration and eviction are reproducible for a given seed
(up to floating-point summation order).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .engram.brain import EngramBrain
from .engram.policy import EpisodeRepeats
from .extras import missing, require
from .runs import write_text_atomic
from .types import PathLike


@dataclass
class Normaliser:
    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.mean) / self.std

    @classmethod
    def fit(cls, observations: np.ndarray) -> "Normaliser":
        obs = torch.as_tensor(np.asarray(observations, dtype=np.float32))
        # a dimension that never varied (e.g. a leg contact) keeps unit scale
        std = obs.std(0)
        return cls(obs.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std)))


@dataclass
class TrainResult:
    episode_returns: list = field(default_factory=list)
    episode_lengths: list = field(default_factory=list)
    wall_seconds: float = 0.0

    def summary(self, window: int = 100) -> dict:
        """The run's numbers; the last-`window` ones are None until `window` episodes have ended
        (a shorter run reports its mean over all episodes, `mean_return`, instead)."""
        r = np.asarray(self.episode_returns, dtype=np.float64)
        last = r[-window:] if len(r) >= window else None
        return {
            "episodes": len(r), "steps": int(np.sum(self.episode_lengths)),
            "mean_return": float(r.mean()) if len(r) else None,
            f"last{window}_mean_return": float(last.mean()) if last is not None else None,
            "best_rolling_mean_return": float(rolling_mean(r, window).max()) if last is not None else None,
            "share_episodes_ge_200": float((r >= 200).mean()) if len(r) else None,
            f"last{window}_share_ge_200": float((last >= 200).mean()) if last is not None else None,
            "wall_seconds": self.wall_seconds,
        }


def compact_json(payload: dict) -> str:
    """Indented JSON with each per-episode list on one line (thousands of entries)."""
    lists = {k: v for k, v in payload.items() if isinstance(v, list)}
    text = json.dumps({k: ("@" + k if k in lists else v) for k, v in payload.items()}, indent=1)
    for k, v in lists.items():
        text = text.replace(json.dumps("@" + k), json.dumps(v))
    return text + "\n"


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    if len(x) < window:
        return np.zeros(0)
    c = np.cumsum(np.insert(np.asarray(x, dtype=np.float64), 0, 0.0))
    return (c[window:] - c[:-window]) / window


class Trainer:
    def __init__(self, brain: EngramBrain, env_id: str = "LunarLander-v3", *, num_envs: int = 8,
                 seed: int = 0, normalise_episodes: int = 20, action_repeat: int = 1,
                 env_kwargs: Optional[dict] = None, first_episode: int = 0):
        gym = require("gymnasium", "rl", "Trainer")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if action_repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
        self.action_repeat = action_repeat
        self.brain, self.env_id, self.seed = brain, env_id, seed
        from .parallel.worker import make_env  # gym.make, the resonant/ environments registered first

        try:
            self.envs = [make_env(env_id, env_kwargs) for _ in range(num_envs)]
        except gym.error.DependencyNotInstalled as exc:  # e.g. Box2D for LunarLander
            raise missing("rl", f"Trainer({env_id!r})", str(exc).splitlines()[0]) from None
        space = self.envs[0].action_space
        if not isinstance(space, gym.spaces.Discrete):
            raise ValueError(f"{env_id} has a {type(space).__name__} action space; the Trainer needs Discrete")
        if space.n != brain.num_actions or self.envs[0].observation_space.shape != (brain.state_dim,):
            raise ValueError(f"{env_id} has {space.n} actions and observations {self.envs[0].observation_space.shape}; "
                             f"the brain expects {brain.num_actions} and ({brain.state_dim},)")
        if normalise_episodes < 0:
            raise ValueError(f"normalise_episodes must be >= 0, got {normalise_episodes}")
        self.normalise_episodes = normalise_episodes
        # Episode i resets its environment with seed * 100_003 + first_episode + i, so a run that
        # resumes a stored memory (first_episode = episodes played before) plays new episodes.
        self.first_episode = first_episode
        if normalise_episodes == 0 and brain.normalise is None:  # raw observations, no random episodes
            d = brain.state_dim
            brain.normalise = Normaliser(torch.zeros(d), torch.ones(d))
        self._rng = np.random.default_rng(seed)
        self.result = TrainResult()

    def train(self, episodes: int, *, progress: bool = True) -> TrainResult:
        brain, envs = self.brain, self.envs
        pending = []  # finished random-play episodes waiting for the normaliser
        started = 0
        obs = []
        for i, env in enumerate(envs):
            o, _ = env.reset(seed=self.seed * 100_003 + self.first_episode + started)
            started += 1
            obs.append(o)
        traj = [([], [], []) for _ in envs]
        # each environment's episode so far, for Exploration.avoid_repeats (reset with the environment)
        repeats = [EpisodeRepeats() for _ in envs] if brain.exploration.avoid_repeats else None
        lengths = [0] * len(envs)  # environment steps of each running episode
        active = [True] * len(envs)
        t0 = time.perf_counter()
        bar = tqdm(total=episodes, desc=f"train {self.env_id}", disable=not progress, unit="ep")
        done_count = 0
        while done_count < episodes:
            idx = [i for i in range(len(envs)) if active[i]]
            if not idx:
                break
            batch = np.stack([obs[i] for i in idx])
            if brain.normalise is None:
                actions = self._rng.integers(0, brain.num_actions, len(idx))
            else:
                actions = brain.decide(batch, repeats=None if repeats is None else [repeats[i] for i in idx])
            for i, a in zip(idx, actions):
                r, steps = 0.0, 0
                while steps < self.action_repeat:
                    o2, step_reward, term, trunc, _ = envs[i].step(int(a))
                    r += step_reward
                    steps += 1
                    if term or trunc:
                        break
                lengths[i] += steps
                s, acts, rews = traj[i]
                s.append(obs[i]); acts.append(int(a)); rews.append(float(r))
                obs[i] = o2
                ended = (bool(term), o2)
                if term or trunc:
                    done_count += 1
                    self.result.episode_returns.append(float(np.sum(rews)))
                    self.result.episode_lengths.append(lengths[i])
                    lengths[i] = 0
                    if brain.normalise is None:
                        pending.append((traj[i], ended))
                        if len(pending) >= self.normalise_episodes:
                            brain.normalise = Normaliser.fit(np.concatenate([np.stack(p[0][0]) for p in pending]))
                            for (ps, pa, pr), (pterm, pfinal) in pending:
                                brain.remember(np.stack(ps), pa, pr, final_state=pfinal, terminated=pterm)
                            pending = []
                    else:
                        brain.remember(np.stack(s), acts, rews, final_state=o2, terminated=bool(term))
                    traj[i] = ([], [], [])
                    recent = self.result.episode_returns[-100:]
                    bar.update(1)
                    bar.set_postfix(mean100=f"{np.mean(recent):.1f}", eps=f"{brain.epsilon:.3f}",
                                    mem=len(brain.store))
                    if repeats is not None:
                        repeats[i].reset()
                    if started < episodes:
                        obs[i], _ = envs[i].reset(seed=self.seed * 100_003 + self.first_episode + started)
                        started += 1
                    else:
                        active[i] = False
        bar.close()
        self.result.wall_seconds += time.perf_counter() - t0
        return self.result

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def write_report(self, out_dir: PathLike, name: str, extra: Optional[dict] = None) -> dict:
        """Writes NAME.json (config, per-episode returns, summary; atomically) and NAME.png (learning
        curve) into out_dir, e.g. runs.run_dir(name)."""
        summary = self.result.summary()
        payload = {"env": self.env_id, "seed": self.seed, "summary": summary, **(extra or {}),
                   "episode_returns": self.result.episode_returns, "episode_lengths": self.result.episode_lengths}
        write_text_atomic(os.path.join(out_dir, f"{name}.json"), compact_json(payload))
        plot_learning_curve(self.result.episode_returns, os.path.join(out_dir, f"{name}.png"),
                            title=f"EngramBrain on {self.env_id} (seed {self.seed})")
        return summary


def plot_learning_curve(returns: Sequence[float], path: PathLike, *, title: str, window: int = 100) -> None:
    require("matplotlib", "rl", "the learning-curve figure").use("Agg")
    import matplotlib.pyplot as plt

    r = np.asarray(returns, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(np.arange(1, len(r) + 1), r, ".", ms=2, alpha=0.4, label="episode return")
    rm = rolling_mean(r, window)
    if len(rm):
        ax.plot(np.arange(window, len(r) + 1), rm, lw=2, label=f"mean of last {window}")
    ax.axhline(200, color="g", ls="--", lw=1, label="solved (200)")
    ax.axhline(-43.8, color="r", ls=":", lw=1, label="upstream best mean (−43.8)")
    ax.set_xlabel("episode")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
