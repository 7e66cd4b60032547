"""Simulations for the memories: TreeWorld (Gymnasium id "resonant/TreeWorld-v0")."""
from ..extras import require
from .embeddings import embed_texts, hash_embed, minilm_available
from .treeworld import EDIBLE_FRUITS, POISONOUS_FRUITS, Tree, TreeWorld, TreeWorldConfig, sense

ENV_ID = "resonant/TreeWorld-v0"
gym = require("gymnasium", "rl", "resonant.sim")

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="resonant.sim.treeworld:TreeWorld", max_episode_steps=1000)

__all__ = ["ENV_ID", "EDIBLE_FRUITS", "POISONOUS_FRUITS", "Tree", "TreeWorld", "TreeWorldConfig", "embed_texts",
           "hash_embed", "minilm_available", "sense"]
