"""Statistics of an asynchronous run: per-worker returns, throughput, predictor batches, waits.

Latencies are kept as histograms with 40 logarithmic bins per decade from 1 µs to 100 s
(quantiles are read to within a bin, 6 %), so millions of decisions cost a fixed few kilobytes.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..trainer import compact_json, rolling_mean
from .worker import Episode

_EDGES = np.geomspace(1e-6, 1e2, 8 * 40 + 1)


class LatencyHistogram:
    def __init__(self):
        self.counts = np.zeros(len(_EDGES) + 1, dtype=np.int64)  # [below 1 µs, bins…, above 100 s]
        self.total = 0.0
        self.count = 0

    def add(self, seconds) -> None:
        s = np.asarray(seconds, dtype=np.float64).reshape(-1)
        if not len(s):
            return
        self.counts += np.bincount(np.searchsorted(_EDGES, s, side="right"), minlength=len(self.counts))
        self.total += float(s.sum())
        self.count += len(s)

    def merge(self, other: "LatencyHistogram") -> None:
        self.counts += other.counts
        self.total += other.total
        self.count += other.count

    def quantile(self, q: float) -> Optional[float]:
        """The upper edge of the bin holding the q-quantile (None when empty)."""
        if not self.count:
            return None
        i = int(np.searchsorted(np.cumsum(self.counts), q * self.count, side="left"))
        return float(_EDGES[min(i, len(_EDGES) - 1)])

    def mean(self) -> Optional[float]:
        return self.total / self.count if self.count else None

    def summary(self, scale: float = 1e3) -> dict:
        """mean, p50, p99 (milliseconds by default)."""
        pick = (lambda v: None if v is None else round(v * scale, 4))
        return {"mean": pick(self.mean()), "p50": pick(self.quantile(0.5)), "p99": pick(self.quantile(0.99)),
                "count": self.count}


@dataclass
class AllPlayingRate:
    """Decisions answered per second while every worker still plays: from the predictor's first
    answer until the first worker has played the last episode of its budget (from then on fewer
    workers ask, the batches shrink, and the rate is no longer that of all the workers). Kept where
    the predictor answers (RunStats for the local engine, the memory actor on Ray)."""

    episodes_per_worker: Optional[int] = None  # None: the budget is unknown, every batch counts
    decisions: int = 0  # answered after the first answer, while every worker still played
    seconds: float = 0.0
    _first_answer: Optional[float] = None
    _first_done: bool = False

    def episode(self, index: int) -> None:
        """A worker finished its episode `index` (0-based)."""
        if self.episodes_per_worker is not None and index + 1 >= self.episodes_per_worker:
            self._first_done = True

    def batch(self, size: int, now: float) -> None:
        if self._first_answer is None:
            self._first_answer = now
        elif not self._first_done:
            self.decisions += size
            self.seconds = now - self._first_answer

    def rate(self) -> Optional[float]:
        return round(self.decisions / self.seconds, 1) if self.seconds > 0 else None


@dataclass
class RunStats:
    num_workers: int
    returns: dict = field(default_factory=dict)  # worker -> [return per finished episode]
    env_steps: dict = field(default_factory=dict)  # worker -> [environment steps per episode]
    decisions: dict = field(default_factory=dict)  # worker -> [decisions per episode]
    episode_log: list = field(default_factory=list)  # (seconds since start, worker, return, env steps) in arrival order
    decision_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # as the worker saw it
    request_wait: LatencyHistogram = field(default_factory=LatencyHistogram)  # arrival at the predictor -> answer
    batch_sizes: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # {"worker", "restart", "report"}
    restarts: int = 0
    stop_reason: str = "finished"
    started: float = field(default_factory=time.perf_counter)
    wall_seconds: float = 0.0
    memory: dict = field(default_factory=dict)  # MemoryServer.counters() at the end
    worker_pids: list = field(default_factory=list)  # every worker process started (local engine)
    # seconds from the predictor's first answer to its last: the run without process start-up
    answering_seconds: float = 0.0
    # local engine: seconds the predictor spent answering (store, read, reply) and storing while a
    # batch waited (record_predictor_work); the rest of answering_seconds it waited for the workers
    predictor_seconds: Optional[float] = None
    # local engine: the seconds a waiting side polled its pipe before blocking (LocalEngine's spin_wait)
    spin_wait: Optional[float] = None
    # the rate while every worker plays (AllPlayingRate: give it the workers' budget to stop counting
    # when the first has played its last episode)
    all_playing: AllPlayingRate = field(default_factory=AllPlayingRate)
    _first_answer: Optional[float] = None

    def __post_init__(self):
        for w in range(self.num_workers):
            self.returns.setdefault(w, [])
            self.env_steps.setdefault(w, [])
            self.decisions.setdefault(w, [])

    def record_episode(self, e: Episode) -> None:
        self.returns[e.worker].append(e.total_reward)
        self.env_steps[e.worker].append(e.env_steps)
        self.decisions[e.worker].append(e.decisions)
        self.episode_log.append((round(time.perf_counter() - self.started, 4), e.worker, e.total_reward, e.env_steps))
        self.all_playing.episode(e.index)
        self.decision_latency.add(e.latencies)

    def record_failure(self, worker: int, restart: int, episodes_done: int, report: str) -> None:
        """Keeps a worker's failure and reports it on stderr, where a person sees it."""
        self.errors.append({"worker": worker, "restart": restart, "episodes_done": episodes_done, "report": report})
        print(f"\nresonant.parallel: worker {worker} failed after {episodes_done} episodes:\n{report}",
              file=sys.stderr, flush=True)

    def may_restart(self, max_restarts: int) -> bool:
        """Counts a restart when one is left."""
        if self.restarts >= max_restarts:
            return False
        self.restarts += 1
        return True

    def record_batch(self, size: int, waits) -> None:
        now = time.perf_counter()
        if self._first_answer is None:
            self._first_answer = now
        self.all_playing.batch(size, now)
        self.answering_seconds = now - self._first_answer
        self.batch_sizes.append(size)
        self.request_wait.add(waits)

    def record_predictor_work(self, started: float) -> None:
        """Adds the predictor's work since `started` (time.perf_counter()) to predictor_seconds when it
        began within answering_seconds' span, i.e. after the first answer (so not that answer itself)."""
        if self._first_answer is not None and started >= self._first_answer:
            self.predictor_seconds = (self.predictor_seconds or 0.0) + time.perf_counter() - started

    def finish(self, memory_counters: dict) -> None:
        self.wall_seconds = time.perf_counter() - self.started
        self.memory = memory_counters

    @property
    def episodes(self) -> int:
        return sum(len(r) for r in self.returns.values())

    @property
    def total_decisions(self) -> int:
        return int(sum(sum(d) for d in self.decisions.values()))

    def summary(self, window: int = 100) -> dict:
        wall = self.wall_seconds or (time.perf_counter() - self.started)
        per_worker = {}
        for w, r in self.returns.items():
            r = np.asarray(r, dtype=np.float64)
            rm = rolling_mean(r, window)
            per_worker[str(w)] = {
                "episodes": len(r), f"last{window}_mean_return": float(r[-window:].mean()) if len(r) else None,
                "best_rolling_mean_return": float(rm.max()) if len(rm) else None,
                f"last{window}_mean_env_steps": float(np.mean(self.env_steps[w][-window:])) if len(r) else None,
            }
        batches = np.asarray(self.batch_sizes, dtype=np.float64)
        return {
            "workers": self.num_workers, "episodes": self.episodes, "decisions": self.total_decisions,
            "env_steps": int(sum(sum(s) for s in self.env_steps.values())), "wall_seconds": round(wall, 3),
            "episodes_per_s": round(self.episodes / wall, 3) if wall > 0 else None,
            "decisions_per_s": round(self.total_decisions / wall, 1) if wall > 0 else None,
            # without the start-up (processes, imports): the rate while the predictor answers
            "answering_seconds": round(self.answering_seconds, 3),
            "steady_decisions_per_s": round(self.total_decisions / self.answering_seconds, 1)
            if self.answering_seconds > 0 else None,
            "all_playing_decisions_per_s": self.all_playing.rate(),
            "predictor_batches": len(batches), "mean_predictor_batch": round(float(batches.mean()), 3) if len(batches)
            else None,
            "predictor_busy_share": round(self.predictor_seconds / self.answering_seconds, 3)
            if self.predictor_seconds is not None and self.answering_seconds > 0 else None,
            "spin_wait_seconds": self.spin_wait,
            "decision_latency_ms": self.decision_latency.summary(), "request_wait_ms": self.request_wait.summary(),
            "restarts": self.restarts, "errors": len(self.errors), "stop_reason": self.stop_reason,
            "memory": self.memory, "per_worker": per_worker,
        }

    def write_report(self, out_dir, name: str, *, title: str, extra: Optional[dict] = None) -> dict:
        """NAME.json (summary, config, every episode) and NAME.png (learning curves per worker)."""
        os.makedirs(out_dir, exist_ok=True)
        summary = self.summary()
        payload = {"summary": summary, **(extra or {}), "errors": self.errors,
                   "batch_size_counts": np.bincount(np.asarray(self.batch_sizes, dtype=np.int64)).tolist()
                   if self.batch_sizes else [],
                   "episode_log": [list(e) for e in self.episode_log]}
        for w in range(self.num_workers):
            payload[f"returns_worker{w}"] = self.returns[w]
            payload[f"env_steps_worker{w}"] = self.env_steps[w]
        tmp = os.path.join(out_dir, f".{name}.json.tmp")
        with open(tmp, "w") as f:
            f.write(compact_json(payload))
        os.replace(tmp, os.path.join(out_dir, f"{name}.json"))
        plot_workers(self.returns, self.env_steps, os.path.join(out_dir, f"{name}.png"), title=title)
        return summary


def plot_workers(returns: dict, env_steps: dict, path, *, title: str, window: int = 100) -> None:
    """Two panels against each worker's own episode number: the rolling mean return, and the
    rolling mean episode length in environment steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for w in sorted(returns):
        r = np.asarray(returns[w], dtype=np.float64)
        s = np.asarray(env_steps[w], dtype=np.float64)
        win = max(1, min(window, len(r)))
        if len(r):
            ax_r.plot(np.arange(win, len(r) + 1), rolling_mean(r, win), lw=1.2, label=f"worker {w}")
            ax_s.plot(np.arange(win, len(s) + 1), rolling_mean(s, win), lw=1.2, label=f"worker {w}")
    ax_r.set_xlabel("episode of the worker")
    ax_r.set_ylabel(f"return (mean of last {window} episodes)")
    ax_r.set_title("return")
    ax_s.set_xlabel("episode of the worker")
    ax_s.set_ylabel(f"environment steps per episode (mean of last {window})")
    ax_s.set_title("episode length")
    for ax in (ax_r, ax_s):
        ax.grid(alpha=0.3)
    if len(returns) <= 16:
        ax_r.legend(loc="best", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
