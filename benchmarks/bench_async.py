"""Throughput of the asynchronous trainer against the synchronous `resonant train --num-envs 8`.

    python benchmarks/bench_async.py                          # local engine, 1 2 4 8 workers + sync
    python benchmarks/bench_async.py --engines local ray      # the same table on a local Ray instance
    python benchmarks/bench_async.py --workers-per-process 1 2 4   # also 2 and 4 workers per worker process
    python benchmarks/bench_async.py --workers 8 --workers-per-process 4 --predictor-workers 0 4
                                                              # also 4 of the 8 stepped by the predictor's process
    python benchmarks/bench_async.py --workers 8 --workers-per-process 4 --predictor-workers 4 --spin-wait-ms auto 0 \
        --repeats 8                                           # that layout polling and not, in 8 rounds
    python benchmarks/bench_async.py ... --phases             # also the steps of each round, timed
    python benchmarks/bench_async.py --costs-only             # only the per-decision costs (projection)
    python benchmarks/bench_async.py --summarise benchmarks/results/async/async_throughput_repeats*.json
                                                              # the rounds of earlier runs, each file and pooled

Every row trains LunarLander-v3 with `resonant train`'s default agent (local linear scores,
bandwidth 0.3, action repeat 4) for the same total number of episodes (--episodes, split evenly
over the workers). The memories do not grow alike: each asynchronous worker decays its exploration
over its own episodes, so 8 workers of 40 episodes explore longer, end more episodes early and
store fewer engrams than the synchronous loop, whose one brain decays it over all 320; reads get
slower as the memory grows. decisions/s is decisions (engrams stored) over the run's time: for
the asynchronous rows from the predictor's first answer to its last (worker processes or actors
starting up are left out, and reported beside it as with_startup_decisions_per_s), for the
synchronous rows the whole train() call. `all playing` is the asynchronous rate while every worker
still played (until the first one had played its last episode: from then on fewer workers ask and
the batches shrink, which the synchronous loop, whose eight environments play until the total is
reached, never sees). The predictor reads with one torch thread; the synchronous baseline runs
with one thread (as the LunarLander runs in BENCHMARKS.md) and with torch's default (one per core:
what `resonant train` uses), each a row; `vs sync` is against the faster of them. `window`
compares rows at the same memory sizes: the rate from the FIRST-th to the LAST-th decision answered
by a read (--window; the random-play episodes before the normaliser is fitted are not read), for
the synchronous rows and the local engine's. With --repeats every row runs in each of several
rounds, each round's ratios against its own synchronous rows (the VM's speed drifts from minute to
minute). --phases times the steps of each round (Phases, timed_predictor).

Per-decision costs for the projection: the predictor's read (brain.action_scores) for batches of
Q states against M engrams, and a worker's own work per decision (4 LunarLander steps and the
action choice). Writes --out (JSON) with the machine load (`uptime`) before and after, and per row
the hypervisor's steal share of the CPU time (`steal`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python_api"))

from resonant.cli import build_parser  # noqa: E402
from resonant.engram.policy import select_actions  # noqa: E402
from resonant.parallel import AsyncTrainer  # noqa: E402
from resonant.parallel.server import MemoryServer  # noqa: E402
from resonant.runs import run_dir, write_text_atomic  # noqa: E402
from resonant.train_cli import brain_options, build_brain  # noqa: E402
from resonant.trainer import Trainer  # noqa: E402

ENV = "LunarLander-v3"


class Phases:
    """Durations of the steps of a run's rounds (--phases), summarised as medians in milliseconds
    over the run after its first tenth (start-up and the random-play episodes)."""

    def __init__(self):
        self.seconds: dict = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds.setdefault(name, []).append(seconds)

    def summary(self) -> dict:
        return {f"{name}_ms": round(float(np.median(v[len(v) // 10:])) * 1e3, 3) for name, v in self.seconds.items()}


@contextlib.contextmanager
def timed_predictor(phases: Phases):
    """Times the local engine's predictor loop in this process: answering a batch (`answer`: the
    read with its writes, timed as `read` by logged_server_reads, and the replies), stepping its own
    workers (`own_step`), from the replies to a worker process's next decision (`process_turn`), and
    from one answer to the next (`round`). Restores the engine's methods afterwards."""
    from resonant.parallel.local import LocalEngine

    originals = LocalEngine._answer, LocalEngine._step_inline, LocalEngine._drain
    answer, step_inline, drain = originals
    last = {}

    def timed_answer(self, batch, server, stats):
        t0 = time.perf_counter()
        if "start" in last:
            phases.add("round", t0 - last["start"])
        last["start"] = t0
        result = answer(self, batch, server, stats)
        last["replied"] = time.perf_counter()
        phases.add("answer", last["replied"] - t0)
        return result

    def timed_step(self, *args, **kwargs):
        t0 = time.perf_counter()
        failure = step_inline(self, *args, **kwargs)
        phases.add("own_step", time.perf_counter() - t0)
        return failure

    def timed_drain(self, p, *args, **kwargs):
        failure = drain(self, p, *args, **kwargs)
        if p.waiting_since is not None and "replied" in last:  # its next decision came
            phases.add("process_turn", time.perf_counter() - last["replied"])
        return failure

    LocalEngine._answer, LocalEngine._step_inline, LocalEngine._drain = timed_answer, timed_step, timed_drain
    try:
        yield
    finally:
        LocalEngine._answer, LocalEngine._step_inline, LocalEngine._drain = originals


def cpu_times() -> Optional[list]:
    """The machine's CPU time counters (/proc/stat: user nice system idle iowait irq softirq steal), or None."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None


def steal_share(before: Optional[list]) -> Optional[float]:
    """The share of the machine's CPU time since `before` that the hypervisor gave to others (steal):
    a VM whose cores are shared runs everything slower, and two processes in parallel slower still."""
    after = cpu_times()
    if before is None or after is None:
        return None
    delta = [b - a for a, b in zip(before, after)]
    return round(delta[7] / sum(delta), 3) if sum(delta) > 0 else None


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def default_options(seed: int) -> dict:
    return brain_options(build_parser().parse_args(["train", "lunarlander", "--seed", str(seed)]))


DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before any row sets it
WINDOW = (1000, 5000)  # --window's default


class ReadLog:
    """When each decision answered from the memory (the normaliser fitted, a read made) came back:
    the rate over a window of them compares runs at the same memory sizes (the memory holds about
    the random-play episodes' engrams plus the decisions read so far), which the whole runs are not
    (their episodes, so their memories, grow differently)."""

    def __init__(self):
        self.times, self.counts = [], []

    def add(self, decisions: int) -> None:
        if decisions:
            self.times.append(time.perf_counter())
            self.counts.append((self.counts[-1] if self.counts else 0) + decisions)

    def rate(self, first: int, last: int) -> Optional[float]:
        """Decisions per second from the answer that reached `first` read decisions to the one that
        reached `last` (None if the run read fewer)."""
        counts = np.asarray(self.counts)
        if not len(counts) or counts[-1] < last:
            return None
        a, b = int(np.searchsorted(counts, first)), int(np.searchsorted(counts, last))
        return round((counts[b] - counts[a]) / (self.times[b] - self.times[a]), 1)


@contextlib.contextmanager
def logged_server_reads(log: ReadLog, phases: Optional[Phases] = None):
    """MemoryServer.decide logs its answers to `log` within the block, and its seconds as `read` to
    `phases` when given (the local engine's predictor runs in this process)."""
    original = MemoryServer.decide

    def decide(self, workers, states):
        t0 = time.perf_counter()
        scores = original(self, workers, states)
        if phases is not None:
            phases.add("read", time.perf_counter() - t0)
        log.add(len(states) if all(self._ready) else 0)
        return scores

    MemoryServer.decide = decide
    try:
        yield
    finally:
        MemoryServer.decide = original


def run_sync(episodes: int, seed: int, threads: int = 1, window=WINDOW, phases: Optional[Phases] = None) -> dict:
    torch.set_num_threads(threads)
    brain = build_brain(default_options(seed), 8, 4)
    log, decide, remember = ReadLog(), brain.decide, brain.remember
    last = {}

    def logged_decide(states, **kwargs):
        t0 = time.perf_counter()
        actions = decide(states, **kwargs)
        if phases is not None:  # the decision of a round (the read and the choice), and the round
            phases.add("decision", time.perf_counter() - t0)
            if "start" in last:
                phases.add("round", t0 - last["start"])
            last["start"] = t0
        log.add(len(actions))
        return actions

    def timed_remember(*args, **kwargs):
        t0 = time.perf_counter()
        stored = remember(*args, **kwargs)
        phases.add("remember", time.perf_counter() - t0)
        return stored

    brain.decide = logged_decide
    if phases is not None:
        brain.remember = timed_remember
    trainer = Trainer(brain, ENV, num_envs=8, seed=seed, action_repeat=4)
    load, cpu = uptime(), cpu_times()
    t0 = time.perf_counter()
    trainer.train(episodes, progress=False)
    wall = time.perf_counter() - t0
    steal = steal_share(cpu)
    trainer.close()
    decisions = len(brain.store)  # one engram per decision (capacity not reached)
    return {"mode": f"sync --num-envs 8, {threads} thr", "engine": "-", "workers": 8, "per_process": 8,
            "in_predictor": 8, "threads": threads, "episodes": episodes, "all_playing_decisions_per_s": None,
            "decisions": decisions, "window": list(window), "window_decisions_per_s": log.rate(*window),
            "wall_seconds": round(wall, 2), "decisions_per_s": round(decisions / wall, 1), "mean_batch": None,
            "latency_p50_ms": None, "latency_p99_ms": None, "uptime_before": load, "steal_share": steal,
            "phases": None if phases is None else phases.summary()}


def run_async(engine: str, workers: int, episodes: int, seed: int, workers_per_process: int = 1,
              predictor_workers: int = 0, spin_wait: Optional[float] = None, window=WINDOW,
              phases: Optional[Phases] = None) -> dict:
    per_worker = max(1, episodes // workers)
    trainer = AsyncTrainer(functools.partial(build_brain, default_options(seed), 8, 4), ENV, num_workers=workers,
                           episodes_per_worker=per_worker, engine=engine, seed=seed, action_repeat=4,
                           workers_per_process=workers_per_process, predictor_workers=predictor_workers,
                           spin_wait=spin_wait)
    load, cpu = uptime(), cpu_times()
    log = ReadLog()
    timing = timed_predictor(phases) if phases is not None and engine == "local" else contextlib.nullcontext()
    with logged_server_reads(log, phases), timing:  # (a Ray run's predictor is an actor: no log, no timings)
        stats = trainer.train(progress=False)
    steal = steal_share(cpu)
    s = stats.summary()
    return {"mode": "async", "engine": engine, "workers": workers, "per_process": workers_per_process,
            "in_predictor": predictor_workers,
            "all_playing_decisions_per_s": s["all_playing_decisions_per_s"],
            "episodes": s["episodes"],
            "decisions": s["decisions"], "window": list(window),
            "window_decisions_per_s": log.rate(*window) if engine == "local" else None,
            "wall_seconds": s["answering_seconds"],
            "decisions_per_s": s["steady_decisions_per_s"], "with_startup_decisions_per_s": s["decisions_per_s"],
            "mean_batch": s["mean_predictor_batch"], "latency_p50_ms": s["decision_latency_ms"]["p50"],
            "latency_p99_ms": s["decision_latency_ms"]["p99"], "request_wait_p50_ms": s["request_wait_ms"]["p50"],
            "read_seconds": round(s["memory"]["read_seconds"], 2), "predictor_busy_share": s["predictor_busy_share"],
            "spin_wait_ms": None if s["spin_wait_seconds"] is None else s["spin_wait_seconds"] * 1e3,
            "uptime_before": load, "steal_share": steal,
            "phases": phases.summary() if phases is not None and engine == "local" else None}


def decision_costs(seed: int, sizes=(10_000, 50_000, 200_000), batches=(1, 8, 64), repeats: int = 25) -> dict:
    """Seconds per read (brain.action_scores) of Q states against M engrams (the median of `repeats`
    reads: single reads on a shared VM swing by tens of percent), and a worker's own seconds per
    decision (4 environment steps and the choice)."""
    import gymnasium as gym

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    reads = []
    for m in sizes:
        brain = build_brain(default_options(seed), 8, 4)
        brain.store.add(rng.normal(size=(m, 8)).astype(np.float32), rng.integers(0, 4, m), rng.normal(size=m) * 50)
        for q in batches:
            states = rng.normal(size=(q, 8)).astype(np.float32)
            brain.action_scores(states)
            seconds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                brain.action_scores(states)
                seconds.append(time.perf_counter() - t0)
            reads.append({"engrams": m, "batch": q, "ms_per_read": round(float(np.median(seconds)) * 1e3, 3)})
    env = gym.make(ENV)
    obs, _ = env.reset(seed=seed)
    n, t0 = 0, time.perf_counter()
    while n < 2000:
        a = int(select_actions(rng.normal(size=(1, 4)), rng, epsilon=0.1)[0])
        for _ in range(4):
            obs, _, term, trunc, _ = env.step(a)
            if term or trunc:
                obs, _ = env.reset()
                break
        n += 1
    return {"reads": reads, "worker_ms_per_decision": round((time.perf_counter() - t0) / n * 1e3, 4)}


def run_round(args, spins: list, repeat: int) -> list:
    """The synchronous rows, then every asynchronous row; `vs sync` against the faster synchronous row."""
    rows = []
    for threads in dict.fromkeys(args.sync_threads):
        rows.append(run_sync(args.episodes, args.seed, threads, args.window, Phases() if args.phases else None))
        print(rows[-1], flush=True)
    sync = max(r["decisions_per_s"] for r in rows)
    sync_window = max((r["window_decisions_per_s"] or 0.0) for r in rows) or None
    for engine in args.engines:
        for k in (args.workers_per_process if engine == "local" else [1]):
            for pw in (args.predictor_workers if engine == "local" else [0]):
                for spin in (spins if engine == "local" else [None]):
                    for w in args.workers:
                        if k > w or pw > w or (pw == w and k > 1):  # (all in the predictor: k plays no part)
                            continue
                        rows.append(run_async(engine, w, args.episodes, args.seed, k, pw, spin, args.window,
                                              Phases() if args.phases else None))
                        print(rows[-1], flush=True)
    for r in rows:
        r["repeat"] = repeat
        r["vs_sync"] = round(r["decisions_per_s"] / sync, 2)
        if r["all_playing_decisions_per_s"] is not None:
            r["all_playing_vs_sync"] = round(r["all_playing_decisions_per_s"] / sync, 2)
        if r["window_decisions_per_s"] is not None and sync_window:
            r["window_vs_sync"] = round(r["window_decisions_per_s"] / sync_window, 2)
    return rows


def print_repeats(rows: list) -> None:
    """Per layout over the rounds: the ratios to the round's synchronous loop, each round's and their median."""
    layouts: dict = {}
    for r in rows:
        if r["mode"] == "async":
            key = (r["engine"], r["workers"], r["per_process"], r["in_predictor"], r.get("spin_wait_ms"))
            layouts.setdefault(key, []).append(r)
    print("over the rounds (engine, workers, per proc, in pred, spin ms): vs sync over the run | while all play | "
          "over the window")
    for key, rs in layouts.items():
        parts = []
        for field in ("vs_sync", "all_playing_vs_sync", "window_vs_sync"):
            ratios = [float(r[field]) for r in rs if r.get(field) is not None]
            parts.append(f"{ratios} median {np.median(ratios):.2f}, {sum(x >= 1 for x in ratios)} of {len(ratios)} "
                         f">= 1" if ratios else "-")
        print(f"  {key}: " + " | ".join(parts))


def summarise(paths: list) -> None:
    """print_repeats of each earlier result file (--out of runs with --repeats), then of all their rounds pooled."""
    pooled = []
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["rows"]
        print(path)
        print_repeats(rows)
        pooled += rows
    print(f"pooled, {len(paths)} files")
    print_repeats(pooled)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=160, help="total episodes per row (default: %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--engines", nargs="+", choices=("local", "ray"), default=["local"])
    p.add_argument("--workers-per-process", type=int, nargs="+", default=[1],
                   help="local engine: also run each worker count with this many workers per process "
                        "(default: %(default)s)")
    p.add_argument("--predictor-workers", type=int, nargs="+", default=[0],
                   help="local engine: also run each worker count with this many workers stepped by the predictor's "
                        "own process (default: %(default)s)")
    p.add_argument("--sync-threads", type=int, nargs="+", default=[1, DEFAULT_THREADS],
                   help="torch threads of the synchronous baseline rows (default: %(default)s: one, and torch's "
                        "default here)")
    p.add_argument("--spin-wait-ms", nargs="+", default=["auto"],
                   help="local engine: also run each layout with each of these spin waits (milliseconds a waiting "
                        "side polls its pipe before it blocks; auto: the engine's default) (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every row this many times, the synchronous rows first in each round; `vs sync` is "
                        "against the round's own synchronous rows (default: %(default)s)")
    p.add_argument("--window", type=int, nargs=2, default=list(WINDOW), metavar=("FIRST", "LAST"),
                   help="also the rate from the FIRST-th to the LAST-th decision answered by a read (the same memory "
                        "sizes in every row; local engine and synchronous rows) (default: %(default)s)")
    p.add_argument("--phases", action="store_true",
                   help="also time the steps of each round (medians, in the JSON and printed): the synchronous "
                        "loop's decision and remember, the local predictor's answer, read, own workers' step and "
                        "the worker processes' turn (a few timer calls per round)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--costs-only", action="store_true")
    p.add_argument("--summarise", nargs="+", metavar="JSON",
                   help="run nothing: print the rounds of these earlier results (--repeats runs), each file's and "
                        "pooled over all")
    p.add_argument("--out", default=str(run_dir("benchmarks") / "async_throughput.json"),
                   help="the JSON results (default: %(default)s, untracked)")
    args = p.parse_args(argv)
    if args.summarise:
        summarise(args.summarise)
        return 0
    spins = [None if v == "auto" else float(v) / 1e3 for v in args.spin_wait_ms]
    result = {"command": " ".join(sys.argv), "uptime_start": uptime(), "rows": []}
    if not args.costs_only:
        for repeat in range(args.repeats):
            result["rows"] += run_round(args, spins, repeat)
    result["costs"] = decision_costs(args.seed)
    result["uptime_end"] = uptime()
    write_text_atomic(args.out, json.dumps(result, indent=1))
    print(f"{'mode':<24} {'engine':<6} {'workers':>7} {'per proc':>8} {'in pred':>7} {'spin ms':>7} {'decisions':>9} "
          f"{'wall s':>7} {'dec/s':>7} {'vs sync':>7} {'all playing':>11} {'vs sync':>7} {'window':>7} {'vs sync':>7} "
          f"{'batch':>6} {'p50 ms':>7} {'p99 ms':>7} {'steal':>5}")
    for r in result["rows"]:
        print(f"{r['mode']:<24} {r['engine']:<6} {r['workers']:>7} {str(r['per_process']):>8} "
              f"{str(r['in_predictor']):>7} {str(r.get('spin_wait_ms', '-')):>7} {r['decisions']:>9} "
              f"{r['wall_seconds']:>7} {r['decisions_per_s']:>7} "
              f"{r['vs_sync']:>7} {str(r['all_playing_decisions_per_s'] or '-'):>11} "
              f"{str(r.get('all_playing_vs_sync', '-')):>7} {str(r['window_decisions_per_s'] or '-'):>7} "
              f"{str(r.get('window_vs_sync', '-')):>7} {str(r['mean_batch']):>6} {str(r['latency_p50_ms']):>7} "
              f"{str(r['latency_p99_ms']):>7} {str(r['steal_share']):>5}")
    if args.phases:
        for r in result["rows"]:
            if r.get("phases"):
                print(f"phases, {r['mode']} {r['workers']} workers, {r['per_process']} per proc, {r['in_predictor']} "
                      f"in pred, spin {r.get('spin_wait_ms', '-')} ms (repeat {r['repeat']}): {r['phases']}")
    if args.repeats > 1:
        print_repeats(result["rows"])
    print(json.dumps(result["costs"], indent=1))
    print("load:", result["uptime_start"], "->", result["uptime_end"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
