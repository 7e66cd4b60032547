"""How long one refit of the learnt per-dimension relevance takes (engram/relevance.py).

    python benchmarks/bench_relevance_fit.py                      # 30 000 engrams, 36 dims, 6 actions
    python benchmarks/bench_relevance_fit.py --engrams 8000 --repeats 5

The engrams are SubGridWorld-like: one-hot positions on three axes of 12 cells, random actions
and outcomes (the fit's cost does not depend on the values). A refit runs in the asynchronous
trainer's predictor, which holds its answers meanwhile; the predictor reads with one torch thread,
so this times one thread too (--threads to change it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python_api"))

from resonant.engram.relevance import LearnedRelevance, fit_relevance  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engrams", type=int, default=30_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.engrams
    states = torch.nn.functional.one_hot(torch.randint(0, 12, (n, 3), generator=g), 12).reshape(n, 36).float()
    actions, outcomes = torch.randint(0, 6, (n,), generator=g), torch.rand(n, generator=g)
    settings = LearnedRelevance()
    print(f"fit_relevance: {n} engrams, 36 dims, {settings}, {args.threads} thread(s)")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fit_relevance(states, actions, outcomes, bandwidth=0.4, settings=settings, rng=np.random.default_rng(0))
        print(f"{time.perf_counter() - t0:.2f} s per fit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
