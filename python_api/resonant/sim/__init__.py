"""Simulations for the memories: TreeWorld (Gymnasium id "resonant/TreeWorld-v0"; the `rl` extra)."""
from ..extras import require

gym = require("gymnasium", "rl", "resonant.sim")

from .embeddings import embed_texts, hash_embed, minilm_available  # noqa: E402
from .treeworld import EDIBLE_FRUITS, POISONOUS_FRUITS, Tree, TreeWorld, TreeWorldConfig, sense  # noqa: E402

ENV_ID = "resonant/TreeWorld-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="resonant.sim.treeworld:TreeWorld", max_episode_steps=1000)

__all__ = ["ENV_ID", "EDIBLE_FRUITS", "POISONOUS_FRUITS", "Tree", "TreeWorld", "TreeWorldConfig", "embed_texts",
           "hash_embed", "minilm_available", "sense"]
