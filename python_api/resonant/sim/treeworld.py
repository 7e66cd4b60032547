"""TreeWorld: the 2-D world of the spatial-memory notebook as a Gymnasium environment.

Trees have a name and a fruit type, edible or poisonous, and a vector: the fruit's word vector
plus the name's, not renormalised (embeddings.tree_vectors, the notebook's construction). The
agent's sensor sees the sum over trees of 10^(−(dist/sensor_scale)²) × tree vector (the
notebook's SimpleSensor). `TreeWorld.from_notebook()` is the notebook's own world, its 25 printed
trees (notebook_world.py); `TreeWorld(seed=...)` draws a random one the way the notebook's
generator does, each coordinate ~ N(0, tree_sd²).

Actions are 2-D moves in [-1, 1]², scaled by max_step. Standing within eat_radius of a tree whose
fruit is ripe eats it: edible fruit restores health, poisonous fruit costs health, and the tree
regrows its fruit after regrow_steps. Health drains by hunger_per_step every step; the episode
terminates when it reaches zero. The reward is the change in health.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch

from ..extras import require
from .embeddings import HASH_DIM, OFFLINE_WORD_COSINE, tree_vectors, word_vectors
from .notebook_world import NOTEBOOK_TREES

gym = require("gymnasium", "rl", "resonant.sim.TreeWorld")
spaces = gym.spaces

EDIBLE_FRUITS = ("apple", "banana", "cherry", "date", "elderberry", "mango", "orange", "papaya", "pear")
POISONOUS_FRUITS = ("strychnine fruit", "nightshade", "manchineel")
TREE_NAMES = (
    "Abigail", "Clinton", "Elizabeth", "Florence", "George", "Homer", "Jane", "Julia", "Kamala", "Kramer", "Peter",
    "Rachel", "Richard", "Rupert", "Sam", "Toby", "Ursula", "Wendy", "Winston", "Yogi",
)


@dataclass
class TreeWorldConfig:
    num_trees: int = 25
    layout: str = "random"  # "random" (drawn from seed) or "notebook" (the notebook's 25 printed trees)
    world_size: float = 500.0  # the world is [-world_size, world_size]^2
    tree_sd: float = 200.0  # random trees: each coordinate ~ N(0, tree_sd^2), like the notebook's world
    tree_extent: float = 450.0  # random trees: redrawn until inside [-tree_extent, tree_extent]^2
    poison_fraction: float = 0.3
    sensor_scale: float = 100.0
    embedder: str = "auto"  # "auto" (MiniLM when installed, else hashing), "hash", "minilm"
    embed_dim: int = HASH_DIM  # for the hashing embedder; MiniLM is always 384
    word_cosine: float = OFFLINE_WORD_COSINE  # hashing embedder: cosine of unrelated words (embeddings.py)
    max_step: float = 10.0
    eat_radius: float = 10.0
    max_health: float = 100.0
    hunger_per_step: float = 0.1
    food_health: float = 20.0
    poison_damage: float = 30.0
    regrow_steps: int = 100
    seed: int = 0  # the map; reset(seed=...) only moves the agent's start


@dataclass(frozen=True)
class Tree:
    tree_id: int
    name: str
    fruit: str
    location: torch.Tensor  # (2,)
    is_poisonous: bool
    embedding: torch.Tensor = field(repr=False)


LAYOUTS = ("random", "notebook")


def _trees(names, fruits, locations, config: TreeWorldConfig) -> list[Tree]:
    vectors = tree_vectors(names, fruits, config.embedder, config.embed_dim, cosine=config.word_cosine)
    return [
        Tree(i, names[i], fruits[i], torch.tensor(locations[i], dtype=torch.float32), fruits[i] in POISONOUS_FRUITS,
             vectors[i])
        for i in range(len(names))
    ]


def _gaussian_locations(rng: np.random.Generator, n: int, sd: float, extent: float) -> np.ndarray:
    """n points with coordinates ~ N(0, sd²), each redrawn until inside [-extent, extent]²."""
    locations = np.empty((0, 2))
    while len(locations) < n:
        draw = rng.normal(0.0, sd, size=(n, 2))
        locations = np.concatenate([locations, draw[np.abs(draw).max(-1) <= extent]])
    return locations[:n]


def random_trees(config: TreeWorldConfig) -> list[Tree]:
    rng = np.random.default_rng(config.seed)
    locations = _gaussian_locations(rng, config.num_trees, config.tree_sd, config.tree_extent)
    poisonous = rng.random(config.num_trees) < config.poison_fraction
    names = [TREE_NAMES[i] for i in rng.integers(len(TREE_NAMES), size=config.num_trees)]
    fruits = [
        POISONOUS_FRUITS[rng.integers(len(POISONOUS_FRUITS))] if p else EDIBLE_FRUITS[rng.integers(len(EDIBLE_FRUITS))]
        for p in poisonous
    ]
    return _trees(names, fruits, locations, config)


def notebook_trees(config: TreeWorldConfig) -> list[Tree]:
    names, fruits, xs, ys = zip(*NOTEBOOK_TREES)
    return _trees(names, fruits, np.stack([xs, ys], axis=-1), config)


def _check_config(c: TreeWorldConfig) -> None:
    if c.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {c.layout!r}")
    if c.layout == "notebook" and c.num_trees != len(NOTEBOOK_TREES):
        raise ValueError(f"num_trees must be {len(NOTEBOOK_TREES)} with layout='notebook', got {c.num_trees}")
    if isinstance(c.num_trees, bool) or not isinstance(c.num_trees, int) or c.num_trees < 1:
        raise ValueError(f"num_trees must be a positive int, got {c.num_trees!r}")
    for name in ("world_size", "tree_sd", "tree_extent", "sensor_scale"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def sense(points: torch.Tensor, tree_locations: torch.Tensor, tree_embeddings: torch.Tensor,
          scale: float = 100.0) -> torch.Tensor:
    """Σ_trees 10^(−(‖p − tree‖/scale)²) · embedding, for points (..., 2) -> (..., E)."""
    flat = points.reshape(-1, points.shape[-1]).to(tree_locations.dtype)
    dist = torch.cdist(flat, tree_locations)
    weights = torch.pow(10.0, -(dist / scale) ** 2)
    return (weights @ tree_embeddings).reshape(*points.shape[:-1], tree_embeddings.shape[-1])


class TreeWorld(gym.Env):
    """Gymnasium id "resonant/TreeWorld-v0". Observation: {"sense": (E,), "position": (2,),
    "health": (1,)}; action: a 2-D move in [-1, 1]² (times max_step)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, config: Optional[TreeWorldConfig] = None, render_mode: Optional[str] = None, **overrides):
        self.config = replace(config or TreeWorldConfig(), **overrides)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        c = self.config
        _check_config(c)
        self.trees = notebook_trees(c) if c.layout == "notebook" else random_trees(c)
        self.tree_locations = torch.stack([t.location for t in self.trees])
        self.tree_embeddings = torch.stack([t.embedding for t in self.trees])
        self.tree_poisonous = torch.tensor([t.is_poisonous for t in self.trees])
        fruits = EDIBLE_FRUITS + POISONOUS_FRUITS
        self.fruit_embeddings = dict(zip(fruits, word_vectors(list(fruits), c.embedder, c.embed_dim,
                                                               cosine=c.word_cosine)))
        self.embed_dim = self.tree_embeddings.shape[-1]
        # sensor weights lie in [0, 1], so component i never exceeds Σ_trees |vector_i| (+ float32 rounding)
        bound = float(self.tree_embeddings.abs().sum(0).max()) * (1.0 + 1e-4)
        self.observation_space = spaces.Dict({
            "sense": spaces.Box(-bound, bound, (self.embed_dim,), np.float32),
            "position": spaces.Box(-c.world_size, c.world_size, (2,), np.float32),
            "health": spaces.Box(0.0, c.max_health, (1,), np.float32),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.position = np.zeros(2, dtype=np.float32)
        self.health = c.max_health
        self.ripe_in = np.zeros(len(self.trees), dtype=np.int64)  # steps until a tree has fruit again

    @classmethod
    def from_notebook(cls, embedder: str = "hash", render_mode: Optional[str] = None, **overrides) -> "TreeWorld":
        """The notebook's own world: its 25 printed trees (names, fruit, locations). The default
        embedder is the offline one, whose tree vectors have the notebook's lengths and
        similarities (embeddings.py); MiniLM's are shorter and less alike (README)."""
        return cls(layout="notebook", embedder=embedder, render_mode=render_mode, **overrides)

    # ---- sensor --------------------------------------------------------------------------------

    def sense(self, points: torch.Tensor) -> torch.Tensor:
        return sense(points, self.tree_locations, self.tree_embeddings, self.config.sensor_scale)

    def nearest_tree(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, tree index) of the nearest tree to each point (..., 2)."""
        dist = torch.cdist(points.reshape(-1, 2).to(torch.float32), self.tree_locations)
        d, i = dist.min(-1)
        return d.reshape(points.shape[:-1]), i.reshape(points.shape[:-1])

    # ---- gymnasium API -------------------------------------------------------------------------

    def _observation(self) -> dict:
        sensed = self.sense(torch.from_numpy(self.position)).numpy().astype(np.float32)
        health = np.array([min(max(self.health, 0.0), self.config.max_health)], dtype=np.float32)
        return {"sense": sensed, "position": self.position.copy(), "health": health}

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        half = self.config.world_size / 2
        self.position = self.np_random.uniform(-half, half, size=2).astype(np.float32)
        if options and "position" in options:
            self.position = np.asarray(options["position"], dtype=np.float32).reshape(2).copy()
        self.health = self.config.max_health
        self.ripe_in[:] = 0
        return self._observation(), {}

    def step(self, action):
        c = self.config
        move = np.clip(np.asarray(action, dtype=np.float32).reshape(2), -1.0, 1.0) * c.max_step
        self.position = np.clip(self.position + move, -c.world_size, c.world_size).astype(np.float32)
        before = self.health
        self.health -= c.hunger_per_step
        self.ripe_in = np.maximum(self.ripe_in - 1, 0)
        info = {"ate": None, "poisoned": False}
        dist, idx = self.nearest_tree(torch.from_numpy(self.position))
        tree = self.trees[int(idx)]
        if float(dist) <= c.eat_radius and self.ripe_in[tree.tree_id] == 0:
            self.ripe_in[tree.tree_id] = c.regrow_steps
            info["ate"] = tree.fruit
            info["poisoned"] = tree.is_poisonous
            self.health += -c.poison_damage if tree.is_poisonous else c.food_health
        self.health = float(min(max(self.health, 0.0), c.max_health))
        info.update(nearest_tree=int(idx), distance=float(dist), health=self.health)
        return self._observation(), self.health - before, self.health <= 0.0, False, info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        size, ws = 200, self.config.world_size
        img = np.full((size, size, 3), 255, dtype=np.uint8)

        def pixel(p):
            col, row = ((np.asarray(p) + ws) / (2 * ws) * (size - 1)).round().astype(int)
            return size - 1 - row, col

        for tree in self.trees:
            r, cidx = pixel(tree.location.numpy())
            img[max(r - 2, 0):r + 3, max(cidx - 2, 0):cidx + 3] = (200, 0, 0) if tree.is_poisonous else (0, 150, 0)
        r, cidx = pixel(self.position)
        img[max(r - 3, 0):r + 4, max(cidx - 3, 0):cidx + 4] = (0, 0, 220)
        return img
