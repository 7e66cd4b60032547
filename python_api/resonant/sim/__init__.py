"""Simulations for the memories: TreeWorld (Gymnasium id "resonant/TreeWorld-v0") and the
projective-simulation seed's SubGridWorld ("resonant/SubGridWorld-v0"); the `rl` extra."""
from ..extras import require

gym = require("gymnasium", "rl", "resonant.sim")

from .embeddings import embed_texts, hash_embed, minilm_available  # noqa: E402
from .subgrid import SubGridWorld  # noqa: E402
from .treeworld import EDIBLE_FRUITS, POISONOUS_FRUITS, Tree, TreeWorld, TreeWorldConfig, sense  # noqa: E402

ENV_ID = "resonant/TreeWorld-v0"
SUBGRID_ENV_ID = "resonant/SubGridWorld-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="resonant.sim.treeworld:TreeWorld", max_episode_steps=1000)
if SUBGRID_ENV_ID not in gym.registry:
    gym.register(id=SUBGRID_ENV_ID, entry_point="resonant.sim.subgrid:SubGridWorld")  # caps episodes itself

__all__ = ["ENV_ID", "SUBGRID_ENV_ID", "EDIBLE_FRUITS", "POISONOUS_FRUITS", "SubGridWorld", "Tree", "TreeWorld",
           "TreeWorldConfig", "embed_texts", "hash_embed", "minilm_available", "sense"]
