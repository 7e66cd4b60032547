"""SubGridWorld: the 3-D sub-grid world of the projective-simulation seed (Gymnasium id
"resonant/SubGridWorld-v0").

The seed (reinforced-scinet's representation-learning experiments on gym-subgridworld) describes
a grid of 12 cells per axis in which only a 2-D plane matters: the reward sits at a fixed place
of the plane the agent starts in, so the optimal policy moves within that plane and never along
the third axis. What the seed fixes, and how it is kept here:

- 12 × 12 × 12 cells; 6 actions, ±1 along x, y, z in the order +x, −x, +y, −y, +z, −z.
- The observation is the agent's position one-hot per axis, concatenated: 36 values, exactly
  three of them 1 (the seed's "simplified" observation; it also offers a 3-D pixel image, not
  kept). The goal is not part of the observation.
- Reward +1 on reaching the goal, which ends the episode (terminated). Episodes are capped at
  400 steps (`max_steps`): the environment truncates them itself, so the cap's reward
  (`cap_reward`) lands on the capped step.
- At each reset the agent starts at a uniformly random cell that is not the goal; the goal is at
  a fixed position of the plane, in the plane through the agent's *starting* cell. Moving off
  that plane is never useful, and the agent is not told which plane it started in.

Choices the seed leaves open or makes differently in different places, and what this
environment does:

- Plane and goal: the seed's first of three configurations, the (x, y) plane with the goal at
  (x, y) = (6, 11) (its other two use the (y, z) plane with the goal at (11, 6) and the (x, z)
  plane at (6, 6)); `plane` and `goal` choose others. An older version of the environment put the
  goal at the centre of the plane.
- Walls: none (the seed's configurations list none); not implemented.
- The cap: the seed's environment gives −1 on the step that reaches the cap, but its trainer
  clipped negative rewards to 0 before learning; here the capped step gives 0 (set `cap_reward`
  to −1 for the environment's own value).
- A move into the border leaves the agent where it is (as the seed's does) and costs a step.
- Randomness: starts come from the generator that `reset(seed=...)` seeds (Gymnasium's
  np_random); the seed's environment used numpy's global generator.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..extras import require

gym = require("gymnasium", "rl", "resonant.sim.SubGridWorld")
spaces = gym.spaces

GRID_SIZE = 12
MAX_EPISODE_STEPS = 400
# action -> (axis, step): +x, −x, +y, −y, +z, −z
MOVES = ((0, 1), (0, -1), (1, 1), (1, -1), (2, 1), (2, -1))


class SubGridWorld(gym.Env):
    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, grid_size: int = GRID_SIZE, plane: Sequence[int] = (0, 1), goal: Sequence[int] = (6, 11),
                 max_steps: int = MAX_EPISODE_STEPS, cap_reward: float = 0.0, render_mode: Optional[str] = None):
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2:
            raise ValueError(f"grid_size must be an integer >= 2, got {grid_size!r}")
        plane = tuple(int(a) for a in plane)
        if len(plane) != 2 or len(set(plane)) != 2 or not all(0 <= a < 3 for a in plane):
            raise ValueError(f"plane must name two different axes out of 0, 1, 2; got {plane!r}")
        goal = tuple(int(g) for g in goal)
        if len(goal) != 2 or not all(0 <= g < grid_size for g in goal):
            raise ValueError(f"goal must be two coordinates in [0, {grid_size}) within the plane; got {goal!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.grid_size, self.plane, self.goal_in_plane = grid_size, plane, goal
        self.max_steps, self.cap_reward = max_steps, float(cap_reward)
        self.render_mode = render_mode
        self.off_axis = ({0, 1, 2} - set(plane)).pop()
        self.observation_space = spaces.Box(0.0, 1.0, shape=(3 * grid_size,), dtype=np.float32)
        self.action_space = spaces.Discrete(len(MOVES))
        self.position = np.zeros(3, dtype=np.int64)
        self.goal = np.zeros(3, dtype=np.int64)
        self._steps = 0

    def _observation(self) -> np.ndarray:
        obs = np.zeros(3 * self.grid_size, dtype=np.float32)
        obs[np.arange(3) * self.grid_size + self.position] = 1.0
        return obs

    def _info(self) -> dict:
        return {"position": self.position.copy(), "goal": self.goal.copy(),
                "shortest_path": int(np.abs(self.position - self.goal).sum())}

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        while True:
            self.position = self.np_random.integers(0, self.grid_size, size=3).astype(np.int64)
            self.goal = self.position.copy()
            self.goal[list(self.plane)] = self.goal_in_plane
            if not np.array_equal(self.position, self.goal):
                break
        self._steps = 0
        return self._observation(), self._info()

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an integer in [0, {self.action_space.n}), got {action!r}")
        axis, delta = MOVES[int(action)]
        self.position[axis] = min(self.grid_size - 1, max(0, self.position[axis] + delta))
        self._steps += 1
        terminated = bool(np.array_equal(self.position, self.goal))
        truncated = not terminated and self._steps >= self.max_steps
        reward = 1.0 if terminated else (self.cap_reward if truncated else 0.0)
        return self._observation(), reward, terminated, truncated, self._info()

    def render(self):
        if self.render_mode != "ansi":
            return None
        return (f"agent at {tuple(int(p) for p in self.position)}, goal at {tuple(int(g) for g in self.goal)}, "
                f"step {self._steps}")
