"""Simulations for the memories: TreeWorld (Gymnasium id "resonant/TreeWorld-v0") and the
projective-simulation seed's SubGridWorld ("resonant/SubGridWorld-v0").

The environments need the `rl` extra (gymnasium): `resonant.sim.TreeWorld` and the other names of
treeworld.py and subgrid.py raise a one-line MissingExtra without it. The embedders and the
notebook's tree table (embeddings.py, notebook_world.py) need nothing beyond the package.
"""
import importlib

from . import notebook_world
from .embeddings import embed_texts, hash_embed, minilm_available, tree_vectors, word_vectors
from .notebook_world import NOTEBOOK_TREES

ENV_ID = "resonant/TreeWorld-v0"
SUBGRID_ENV_ID = "resonant/SubGridWorld-v0"

# names defined by the gymnasium-backed modules, imported when first asked for
_ENV_NAMES = {name: ".treeworld" for name in
              ("EDIBLE_FRUITS", "POISONOUS_FRUITS", "Tree", "TreeWorld", "TreeWorldConfig", "sense")}
_ENV_NAMES["SubGridWorld"] = ".subgrid"


def __getattr__(name):
    if name in _ENV_NAMES:
        return getattr(importlib.import_module(_ENV_NAMES[name], __name__), name)
    raise AttributeError(f"module 'resonant.sim' has no attribute {name!r}")


try:
    import gymnasium as _gym
except ModuleNotFoundError:  # no `rl` extra: the environments say so when asked for
    _gym = None
if _gym is not None:
    if ENV_ID not in _gym.registry:
        _gym.register(id=ENV_ID, entry_point="resonant.sim.treeworld:TreeWorld", max_episode_steps=1000)
    if SUBGRID_ENV_ID not in _gym.registry:
        _gym.register(id=SUBGRID_ENV_ID, entry_point="resonant.sim.subgrid:SubGridWorld")  # caps episodes itself

__all__ = ["ENV_ID", "SUBGRID_ENV_ID", "EDIBLE_FRUITS", "NOTEBOOK_TREES", "POISONOUS_FRUITS", "SubGridWorld", "Tree",
           "TreeWorld", "TreeWorldConfig", "embed_texts", "hash_embed", "minilm_available", "notebook_world", "sense",
           "tree_vectors", "word_vectors"]
