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
import contextlib
import functools
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
import _measure  # noqa: E402
from _cases import Case, Unavailable  # noqa: E402

from resonant.engram import EngramBrain, Exploration, Scoring, TorchEngramStore  # noqa: E402
from resonant.engram.scoring import from_neighbours  # noqa: E402
from resonant.engram.store import Neighbours  # noqa: E402


def engrams(n, d, num_actions, seed=0):
    g = np.random.default_rng(seed)
    return (g.normal(size=(n, d)).astype(np.float32), g.integers(0, num_actions, n),
            g.normal(size=n).astype(np.float32), g.normal(size=n).astype(np.float32))


STORES = ("torch-kernel", "torch-kernel-local-linear", "torch-knn", "milvus-lite", "faiss-flat")


@dataclass(frozen=True)
class Setting:
    engrams: int = 100_000
    batch: int = 256
    dim: int = 8
    actions: int = 4
    k: int = 50
    bandwidth: float = 0.5
    milvus_index: str = "FLAT"


SIZES = {"smoke": Setting(engrams=500, batch=8, k=10), "quick": Setting(engrams=5_000, batch=64), "full": Setting()}


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


@contextlib.contextmanager
def decider(store: str, data, setting: Setting):
    """decide(states) -> greedy actions of `store` holding `data`; closes what it opened. Raises
    Unavailable when the store's optional package (milvus, faiss) is not installed."""
    greedy = Exploration(epsilon_start=0.0)
    if store == "faiss-flat":
        try:
            decide = faiss_decider(data, setting.k, setting.actions, setting.bandwidth)
        except ImportError as exc:
            raise Unavailable(f"faiss-cpu skipped: {exc}") from exc
        yield decide
        return
    if store == "milvus-lite":
        try:
            from resonant.engram.milvus_store import MilvusEngramStore
        except ImportError as exc:
            raise Unavailable(f"milvus-lite skipped: {exc}") from exc
        with tempfile.TemporaryDirectory() as tmp:
            milvus = MilvusEngramStore(setting.dim, setting.actions, os.path.join(tmp, "bench.db"),
                                       index_type=setting.milvus_index)
            try:
                milvus.add(*data)
                milvus.flush()
                brain = EngramBrain(milvus, scoring=Scoring(k=setting.k, bandwidth=setting.bandwidth),
                                    exploration=greedy)
                yield lambda q: brain.decide(q, explore=False)
            finally:
                milvus.close()
        return
    scoring = {"torch-kernel": Scoring(k=None, bandwidth=setting.bandwidth),
               "torch-kernel-local-linear": Scoring(bandwidth=setting.bandwidth, estimator="local_linear"),
               "torch-knn": Scoring(k=setting.k, bandwidth=setting.bandwidth)}
    if store not in scoring:
        raise ValueError(f"store must be one of {STORES}, got {store!r}")
    torch_store = TorchEngramStore(setting.dim, setting.actions, initial_size=setting.engrams)
    torch_store.add(*data)
    brain = EngramBrain(torch_store, scoring=scoring[store], exploration=greedy)
    yield lambda q: brain.decide(q, explore=False)


def states(setting: Setting):
    return np.random.default_rng(1).normal(size=(setting.batch, setting.dim)).astype(np.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engrams", type=int, default=Setting.engrams)
    p.add_argument("--batch", type=int, default=Setting.batch)
    p.add_argument("--dim", type=int, default=Setting.dim)
    p.add_argument("--actions", type=int, default=Setting.actions)
    p.add_argument("--k", type=int, default=Setting.k)
    p.add_argument("--bandwidth", type=float, default=Setting.bandwidth)
    p.add_argument("--milvus-index", default=Setting.milvus_index, choices=("FLAT", "IVF_FLAT", "HNSW"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="64 states vs 5 000 engrams")
    _measure.add_out_argument(p)
    args = p.parse_args(argv)
    if args.quick:
        args.engrams, args.batch, args.repeats = SIZES["quick"].engrams, SIZES["quick"].batch, 3
    setting = Setting(**{f.name: getattr(args, f.name) for f in fields(Setting)})
    data = engrams(setting.engrams, setting.dim, setting.actions)
    queries = states(setting)
    rows = []
    for store in tqdm(STORES, desc="engram stores", unit="store"):
        name = f"milvus-lite-{setting.milvus_index.lower()}" if store == "milvus-lite" else store
        try:
            with decider(store, data, setting) as decide:
                seconds = _measure.median_time(lambda: decide(queries), repeats=args.repeats)
        except Unavailable as exc:
            tqdm.write(str(exc))
            continue
        rows.append({"store": name, "seconds_per_batch": seconds, "decisions_per_second": setting.batch / seconds})
        tqdm.write(f"{name:26s} {setting.batch / seconds:12.0f} decisions/s  ({seconds * 1e3:.2f} ms per batch)")
    by = {r["store"]: r["decisions_per_second"] for r in rows}
    milvus_key = f"milvus-lite-{setting.milvus_index.lower()}"
    ratios = {f"{name}_over_{milvus_key}": by[name] / by[milvus_key] for name in ("torch-kernel", "torch-kernel-local-linear", "torch-knn")
              if milvus_key in by}
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.1f}x")
    path = _measure.out_path(args.out, "engram_bench.json")
    _measure.write_json(path, {"config": {k: v for k, v in vars(args).items() if k != "out"},
                               "machine": _measure.machine_description(), "rows": rows, "ratios": ratios})
    print(f"wrote {path}")


# ---- the cases of pytest-benchmark (benchmarks/test_benchmarks.py) ---------------------------

@contextlib.contextmanager
def _decide_states(store, setting):
    with decider(store, engrams(setting.engrams, setting.dim, setting.actions), setting) as decide:
        queries = states(setting)
        yield lambda: decide(queries)


def benchmark_cases(size):
    """One group (a batch of states against the memory), one row per store."""
    setting = SIZES[size]
    group = f"engram decide states={setting.batch} engrams={setting.engrams} d={setting.dim} A={setting.actions}"
    return [Case(group, store, functools.partial(_decide_states, store, setting), info=asdict(setting))
            for store in STORES]


if __name__ == "__main__":
    main()
