"""Tiny environments for the asynchronous trainer's tests (imported by worker processes and Ray
actors through Gymnasium's "module:EnvId" syntax, e.g. gym.make("parallel_envs:Chain-v0")).

Chain-v0: observation (position / 10, episode length / 10); every action moves one step; the episode
terminates after `length` decisions, 3 to 7 (fixed by the reset seed), with reward 1 on the last
step when action 1 was taken most often, else 0. Optional failure after `fail_at_step` steps of
the process's environment: mode "raise" (an exception), "exit" (os._exit) or "kill" (SIGKILL). With
`once_file` only the first process to get there fails (it creates the file), so a restarted
worker, and every other worker, plays on. `step_seconds`: each step sleeps that long (a slow
environment).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Optional

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class Chain(gym.Env):
    def __init__(self, fail_at_step: Optional[int] = None, fail_mode: str = "raise", once_file: Optional[str] = None,
                 step_seconds: float = 0.0):
        self.step_seconds = step_seconds
        self.observation_space = spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self.fail_at_step, self.fail_mode, self.once_file = fail_at_step, fail_mode, once_file
        self.total_steps = 0
        self.position = self.length = self.ones = 0

    def _obs(self):
        return np.array([self.position / 10, self.length / 10], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.length = int(self.np_random.integers(3, 8))
        self.position = self.ones = 0
        return self._obs(), {}

    def _maybe_fail(self):
        if self.fail_at_step is None or self.total_steps != self.fail_at_step:
            return
        if self.once_file is not None:
            try:
                os.close(os.open(self.once_file, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
        if self.fail_mode == "raise":
            raise RuntimeError("Chain crashed on purpose")
        if self.fail_mode == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)

    def step(self, action):
        if self.step_seconds:
            time.sleep(self.step_seconds)
        self.total_steps += 1
        self._maybe_fail()
        self.position += 1
        self.ones += int(action)
        terminated = self.position >= self.length
        reward = float(terminated and 2 * self.ones > self.length)
        return self._obs(), reward, terminated, False, {}


if "Chain-v0" not in gym.registry:
    gym.register(id="Chain-v0", entry_point=Chain)
