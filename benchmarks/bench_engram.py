"""EngramBrain decisions per second: a batch of states against a memory of engrams.

Stores compared (all exact unless --milvus-index says otherwise):
  torch-kernel  TorchEngramStore, kernel-weighted scoring: one fused gaussian_read for all actions
  torch-kernel-local-linear  the same, estimator="local_linear" (the `resonant train` default): one
                read with A(2+d) + d(d+3)/2 value columns (84 for d=8, A=4) instead of 2A, then a
                d×d solve per state (resonant/engram/scoring.py)
  torch-knn     TorchEngramStore, exact k-NN (chunked cdist + topk) then per-action weighting
  milvus-lite   MilvusEngramStore on an embedded Milvus Lite file, k-NN (FLAT index by default)
  faiss-flat    faiss IndexFlatL2 k-NN (if faiss-cpu is installed), same per-action weighting
Every row runs EngramBrain.decide (or, for faiss, the same scoring helper) on the same states,
so the rows differ only in how neighbours are found. Writes engram_bench.json to runs/benchmarks/
(or --out DIR).

    python benchmarks/bench_engram.py            # 256 states vs 100 000 engrams
    python benchmarks/bench_engram.py --quick    # 64 states vs 5 000 engrams (a smoke run)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from tqdm import tqdm

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
import _measure  # noqa: E402

from resonant.engram import EngramBrain, Exploration, Scoring, TorchEngramStore  # noqa: E402
from resonant.engram.scoring import from_neighbours  # noqa: E402
from resonant.engram.store import Neighbours  # noqa: E402


def engrams(n, d, num_actions, seed=0):
    g = np.random.default_rng(seed)
    return (g.normal(size=(n, d)).astype(np.float32), g.integers(0, num_actions, n),
            g.normal(size=n).astype(np.float32), g.normal(size=n).astype(np.float32))


def faiss_decider(data, k, num_actions, bandwidth):
    import faiss

    states, actions, outcomes, _ = data
    index = faiss.IndexFlatL2(states.shape[1])
    index.add(states)
    actions_t, outcomes_t = torch.as_tensor(actions), torch.as_tensor(outcomes)
    knn = Scoring(k=k, bandwidth=bandwidth)

    def decide(q):
        d2, pos = index.search(q, k)
        pos_t = torch.as_tensor(pos)
        nb = Neighbours(index=pos_t, action=actions_t[pos_t.clamp_min(0)], outcome=outcomes_t[pos_t.clamp_min(0)],
                        distance=torch.as_tensor(d2).clamp_min(0).sqrt())
        sums, evidence = from_neighbours(nb, torch.as_tensor(q), num_actions, len(states) - 1, knn)
        return torch.argmax(sums / evidence.clamp_min(1e-30), dim=1)

    return decide


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engrams", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--actions", type=int, default=4)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--bandwidth", type=float, default=0.5)
    p.add_argument("--milvus-index", default="FLAT", choices=("FLAT", "IVF_FLAT", "HNSW"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="64 states vs 5 000 engrams")
    _measure.add_out_argument(p)
    args = p.parse_args(argv)
    if args.quick:
        args.engrams, args.batch, args.repeats = 5_000, 64, 3
    data = engrams(args.engrams, args.dim, args.actions)
    queries = np.random.default_rng(1).normal(size=(args.batch, args.dim)).astype(np.float32)
    rows = []

    def record(name, decide):
        seconds = _measure.median_time(lambda: decide(queries), repeats=args.repeats)
        rows.append({"store": name, "seconds_per_batch": seconds, "decisions_per_second": args.batch / seconds})
        print(f"{name:26s} {args.batch / seconds:12.0f} decisions/s  ({seconds * 1e3:.2f} ms per batch)", flush=True)

    steps = tqdm(total=4, desc="building stores", unit="store")
    torch_store = TorchEngramStore(args.dim, args.actions, initial_size=args.engrams)
    torch_store.add(*data)
    steps.update()
    greedy = Exploration(epsilon_start=0.0)
    kernel = Scoring(k=None, bandwidth=args.bandwidth)
    knn = Scoring(k=args.k, bandwidth=args.bandwidth)
    brains = {
        "torch-kernel": EngramBrain(torch_store, scoring=kernel, exploration=greedy),
        "torch-kernel-local-linear": EngramBrain(torch_store, scoring=Scoring(bandwidth=args.bandwidth,
                                                                              estimator="local_linear"),
                                                 exploration=greedy),
        "torch-knn": EngramBrain(torch_store, scoring=knn, exploration=greedy),
    }
    with tempfile.TemporaryDirectory() as tmp:
        try:
            from resonant.engram.milvus_store import MilvusEngramStore

            milvus = MilvusEngramStore(args.dim, args.actions, os.path.join(tmp, "bench.db"),
                                       index_type=args.milvus_index)
            milvus.add(*data)
            milvus.flush()
            brains[f"milvus-lite-{args.milvus_index.lower()}"] = EngramBrain(milvus, scoring=knn, exploration=greedy)
        except ImportError as exc:
            milvus = None
            print(f"milvus-lite skipped: {exc}")
        steps.update()
        try:
            faiss_decide = faiss_decider(data, args.k, args.actions, args.bandwidth)
        except ImportError as exc:
            faiss_decide = None
            print(f"faiss-cpu skipped: {exc}")
        steps.update(2)
        steps.close()
        for name, brain in brains.items():
            record(name, lambda q, b=brain: b.decide(q, explore=False))
        if faiss_decide is not None:
            record("faiss-flat", faiss_decide)
        if milvus is not None:
            milvus.close()
    by = {r["store"]: r["decisions_per_second"] for r in rows}
    milvus_key = f"milvus-lite-{args.milvus_index.lower()}"
    ratios = {f"{name}_over_{milvus_key}": by[name] / by[milvus_key] for name in ("torch-kernel", "torch-kernel-local-linear", "torch-knn")
              if milvus_key in by}
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.1f}x")
    path = _measure.out_path(args.out, "engram_bench.json")
    _measure.write_json(path, {"config": {k: v for k, v in vars(args).items() if k != "out"},
                               "machine": _measure.machine_description(), "rows": rows, "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
