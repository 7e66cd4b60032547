"""Simulations for the memories: TreeWorld (Gymnasium id "resonant/TreeWorld-v0")."""
import gymnasium as gym

from . import notebook_world
from .embeddings import embed_texts, hash_embed, minilm_available, tree_vectors, word_vectors
from .notebook_world import NOTEBOOK_TREES
from .treeworld import EDIBLE_FRUITS, POISONOUS_FRUITS, Tree, TreeWorld, TreeWorldConfig, sense

ENV_ID = "resonant/TreeWorld-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="resonant.sim.treeworld:TreeWorld", max_episode_steps=1000)

__all__ = ["ENV_ID", "EDIBLE_FRUITS", "NOTEBOOK_TREES", "POISONOUS_FRUITS", "Tree", "TreeWorld", "TreeWorldConfig",
           "embed_texts", "hash_embed", "minilm_available", "notebook_world", "sense", "tree_vectors", "word_vectors"]
