"""Hippocampus-style pattern completion on the fused Gaussian-kernel reads.

`PatternMemory` stores patterns and recalls them from partial cues in-process;
`Client(url)` has the same methods against a `resonant serve hippocampus` server (needs the
`serve` extra), so an experiment runs unchanged against either.
"""
from .memory import PatternMemory, PatternTest

__all__ = ["PatternMemory", "PatternTest", "Client"]


def __getattr__(name):
    # httpx is optional (the `serve` extra): loaded only when the client is asked for
    if name == "Client":
        from .client import Client

        return Client
    raise AttributeError(f"module 'resonant.hippocampus' has no attribute {name!r}")
