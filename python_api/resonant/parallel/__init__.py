"""Asynchronous actor–learner training on a shared engram memory (GA3C style).

N workers each step their own environment; one predictor answers their pending decisions in
batches with one fused read of the memory; one writer stores their finished episodes into the
same memory. Engines: local processes (default) or Ray actors (the `ray` extra).
"""
from .control import WorkerFailed
from .local import LocalEngine
from .server import MemoryServer
from .stats import LatencyHistogram, RunStats
from .trainer import AsyncTrainer
from .worker import Episode, WorkerSpec

__all__ = ["AsyncTrainer", "Episode", "LatencyHistogram", "LocalEngine", "MemoryServer", "RunStats", "WorkerFailed",
           "WorkerSpec"]
