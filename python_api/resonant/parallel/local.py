"""The local engine: worker processes on this machine, the predictor and writer in this process.

Each worker process hosts one worker (the default) or `workers_per_process` of them, and has one
duplex pipe to this process. A process steps its workers in lock step: one decision message per
step for all of its workers still playing (their ids and observations' float32 bytes out, the
scores' bytes back: no pickling, no shared memory segments to leak); a finished episode is one
pickled message. Hosting several workers per process changes nothing a worker does (its own
environment, seeds, exploration schedule and returns), only how many processes share the cores:
on a machine with fewer cores than workers, every extra process adds a wake-up per decision
(BENCHMARKS.md, "Throughput"). The loop here waits on all pipes at once
(`multiprocessing.connection.wait`), gathers pending decisions until it has one from every
process still playing (at most `batch_size` decisions) or `batch_timeout` has passed since the
first, stores every finished episode that arrived (one write), and answers the batch with one
read. Episodes that arrive while a batch waits for a worker process are stored then, while the
predictor would otherwise only wait (the read finds them stored).

`predictor_workers=K` puts the first K workers in this process: the predictor steps them (one
AgentGroup, as a worker process steps its own) right after sending the batch's other answers, so
they play while the worker processes play theirs, and their next decisions open the next batch.
On a machine with fewer cores than workers this fills the predictor's wait for the processes with
work the synchronous loop would do anyway, without a process wake-up per decision (BENCHMARKS.md,
"Throughput"); the price is that a slow or failing environment of these workers holds the predictor
up for as long as it steps. They fail, restart and stop as one group, like a process's workers (an
exception's traceback is reported; a crash of the interpreter itself takes the run with it).

Waiting. A side that waits for the other (a worker process for its scores, the predictor for the
decisions that complete its batch) first polls its pipe for up to `spin_wait` seconds, then blocks.
A blocked process gives its core back and pays a wake-up when the message comes: on the 2-core VM
of BENCHMARKS.md a small message's round trip between two blocked processes took 127 µs (median;
567 µs at the 90th percentile) against 37 µs polling (benchmarks/bench_pipe_wakeup.py), and the
predictor's read and the workers' steps alternate in lock step, so that is time in every round. Polling costs a core only
while the other side works, so the default (`spin_wait=None`) polls for SPIN_WAIT_SECONDS when
the run's processes (the worker processes and this one) fit the cores this process may run on,
and not at all otherwise (there a poller would take a core from a process that has work).

Workers start with the "forkserver" method on Linux (not "fork": this process already runs
threads: torch's, tqdm's) and "spawn" elsewhere; like "spawn", the fork server imports the
script that started the run, so a script must guard its run with `if __name__ == "__main__":`.

Stopping. Ctrl-C (SIGINT) in this process sets a flag that the loop checks at least every
`poll_interval` seconds; a second Ctrl-C raises KeyboardInterrupt at once. Workers ignore SIGINT
(a terminal sends it to the whole process group) and are stopped by this process: their pipes
close, each worker ends at its next decision, every process is joined (after `join_timeout`
seconds terminated, then killed), and episodes that had finished are still stored. A worker that
raises sends its traceback before it exits; one that dies without a word (a signal, os._exit) is
noticed by its pipe closing. Either way the failure is reported (stderr and the run's `errors`)
and, with `on_worker_error="restart"`, the process is started again with its workers on their
remaining episodes (at most `max_restarts` times in all; their unfinished episodes are lost),
otherwise the run stops cleanly and raises WorkerFailed. A process hosting several workers fails
and restarts as one.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Optional

import numpy as np

from .control import RunControl, check_failure_policy
from .server import MemoryServer
from .stats import RunStats
from .worker import AgentGroup, Episode, StopRequested, WorkerSpec, play_group

# message tags, first byte of every message
DECIDE, EPISODE, FINISHED, ERROR, SCORES = b"D", b"E", b"F", b"X", b"A"

# how long a waiting side polls its pipe before it blocks, where the processes fit the cores:
# longer than the predictor's read of a batch at ordinary memory sizes (about 1-5 ms for 8 states
# at 10 000-50 000 engrams on the 2-core VM), so that a worker process polls through the read
SPIN_WAIT_SECONDS = 0.005


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every platform)
        return os.cpu_count() or 1


def check_spin_wait(spin_wait) -> None:
    if spin_wait is not None and (isinstance(spin_wait, bool) or not isinstance(spin_wait, (int, float))
                                  or not math.isfinite(spin_wait) or spin_wait < 0):
        raise ValueError(f"spin_wait must be None (automatic) or a finite number of seconds >= 0, got {spin_wait!r}")


def spin_seconds(spin_wait: Optional[float], worker_processes: int) -> float:
    """The seconds a waiting side polls: spin_wait, or for None SPIN_WAIT_SECONDS where the worker
    processes and this one fit the usable cores, else 0."""
    if spin_wait is not None:
        return spin_wait
    return SPIN_WAIT_SECONDS if worker_processes + 1 <= usable_cores() else 0.0


def wait_ready(conns: list, timeout: float, spin: float) -> list:
    """multiprocessing.connection.wait(conns, timeout), polling for up to `spin` of those seconds
    before it blocks."""
    if spin > 0:
        start = time.perf_counter()
        end = start + min(spin, timeout)
        while True:
            ready = wait(conns, 0)
            if ready:
                return ready
            now = time.perf_counter()
            if now >= end:
                break
        timeout = max(0.0, timeout - (now - start))
    return wait(conns, timeout)


def _worker_main(workers: list, spec: WorkerSpec, first_episodes: list, restart: int, spin: float, conn) -> None:
    """Entry point of a worker process (hosting one worker, or several in lock step); `spin`: the
    seconds it polls for its scores before it blocks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop

    def decide(ids: np.ndarray, obs: np.ndarray) -> np.ndarray:
        # one message for every worker of this process still playing: their ids, then their observations
        try:
            conn.send_bytes(DECIDE + len(ids).to_bytes(4, "little") + ids.astype(np.int32).tobytes()
                            + obs.astype(np.float32, copy=False).tobytes())
            if spin:
                wait_ready([conn], spin, spin)  # (then recv_bytes blocks if nothing came)
            reply = conn.recv_bytes()
        except (EOFError, OSError) as exc:  # the trainer closed the pipe: the run is stopping
            raise StopRequested from exc
        return np.frombuffer(reply[1:], dtype=np.float32).reshape(len(ids), -1)

    def submit(episode: Episode) -> None:
        try:
            conn.send_bytes(EPISODE + pickle.dumps(episode, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            raise StopRequested from exc

    try:
        play_group(spec, workers, decide, submit, first_episodes=first_episodes, restart=restart)
        conn.send_bytes(FINISHED)
    except (StopRequested, OSError):
        pass
    except BaseException:
        try:
            conn.send_bytes(ERROR + traceback.format_exc().encode())
        except OSError:
            pass
        sys.exit(1)
    finally:
        conn.close()


def _decision(msg: bytes, state_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(worker ids, observations) of a DECIDE message."""
    k = int.from_bytes(msg[1:5], "little")
    ids = np.frombuffer(msg, dtype=np.int32, count=k, offset=5).astype(np.int64)
    return ids, np.frombuffer(msg, dtype=np.float32, offset=5 + 4 * k).reshape(k, state_dim)


def _group_name(workers: list, where: str) -> str:
    return f"worker{'s' if len(workers) > 1 else ''} {', '.join(map(str, workers))}{where}"


def _failure_key(workers: list):
    """How RunStats.errors names a failed group: the worker, or the list of a group's workers."""
    return workers[0] if len(workers) == 1 else list(workers)


@dataclass
class _Process:
    """A worker process and the workers it hosts."""

    id: int
    workers: list
    process: Optional[mp.process.BaseProcess] = None
    conn: Optional[object] = None
    restarts: int = 0
    finished: bool = False
    waiting_since: Optional[float] = None  # a decision of this process is in the current batch

    @property
    def name(self) -> str:
        return _group_name(self.workers, " (one process)" if len(self.workers) > 1 else "")

    @property
    def failure_key(self):
        return _failure_key(self.workers)


@dataclass
class _Inline:
    """The workers that the predictor's own process steps between its reads (predictor_workers)."""

    workers: list
    group: Optional[AgentGroup] = None
    restarts: int = 0
    finished: bool = False

    @property
    def name(self) -> str:
        return _group_name(self.workers, " (in the predictor's process)")

    @property
    def failure_key(self):
        return _failure_key(self.workers)


def default_start_method() -> str:
    methods = mp.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def process_groups(num_workers: int, workers_per_process: int, first: int = 0) -> list:
    """Workers first … num_workers − 1 in consecutive groups of workers_per_process (the last may be smaller)."""
    return [list(range(i, min(i + workers_per_process, num_workers)))
            for i in range(first, num_workers, workers_per_process)]


class LocalEngine:
    def __init__(self, *, batch_size: int = 64, batch_timeout: float = 0.005, start_method: Optional[str] = None,
                 on_worker_error: str = "stop", max_restarts: int = 3, poll_interval: float = 0.1,
                 join_timeout: float = 5.0, max_seconds: Optional[float] = None, workers_per_process: int = 1,
                 predictor_workers: int = 0, spin_wait: Optional[float] = None):
        check_failure_policy(on_worker_error, max_restarts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not batch_timeout >= 0:
            raise ValueError(f"batch_timeout must be >= 0 seconds, got {batch_timeout}")
        if isinstance(workers_per_process, bool) or not isinstance(workers_per_process, int) or workers_per_process < 1:
            raise ValueError(f"workers_per_process must be a positive integer, got {workers_per_process!r}")
        if isinstance(predictor_workers, bool) or not isinstance(predictor_workers, int) or predictor_workers < 0:
            raise ValueError(f"predictor_workers must be an integer >= 0, got {predictor_workers!r}")
        check_spin_wait(spin_wait)
        self.batch_size, self.batch_timeout, self.spin_wait = batch_size, batch_timeout, spin_wait
        self._spin = 0.0  # a run's polling seconds (spin_seconds), set when it starts
        self.workers_per_process, self.predictor_workers = workers_per_process, predictor_workers
        self.ctx = mp.get_context(start_method or default_start_method())
        if self.ctx.get_start_method() == "forkserver":
            # imported once by the fork server, so each worker forks from it ready (not importing torch anew)
            self.ctx.set_forkserver_preload([__name__])
        self.on_worker_error, self.max_restarts = on_worker_error, max_restarts
        self.poll_interval, self.join_timeout, self.max_seconds = poll_interval, join_timeout, max_seconds

    # ---- process management ----------------------------------------------------------------
    def _start(self, p: _Process, spec: WorkerSpec, stats: RunStats) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        playing = [w for w in p.workers if self._episodes_done[w] < spec.episodes]
        first = [self._episodes_done[w] for w in playing]
        p.process = self.ctx.Process(target=_worker_main,
                                     args=(playing, spec, first, p.restarts, self._spin, child),
                                     name=f"resonant-worker-{p.workers[0]}", daemon=True)
        p.process.start()
        stats.worker_pids.append(p.process.pid)
        child.close()  # ours is closed so that the worker's death shows as EOF on `parent`
        p.conn, p.waiting_since = parent, None

    def _start_inline(self, inline: _Inline, spec: WorkerSpec, stats, batch) -> Optional[str]:
        """(Re)starts the predictor's own workers on their remaining episodes and puts their first
        decision in the batch. Returns a failure report that stops the run, or None."""
        playing = [w for w in inline.workers if self._episodes_done[w] < spec.episodes]
        try:
            inline.group = AgentGroup(spec, playing, [self._episodes_done[w] for w in playing], inline.restarts)
        except Exception:
            return self._on_inline_failure(inline, spec, stats, batch, traceback.format_exc())
        self._post_inline(inline, batch)
        return None

    @staticmethod
    def _post_inline(inline: _Inline, batch: list) -> None:
        pending = inline.group.pending()
        if pending is None:
            inline.finished = True
            inline.group.close()
            inline.group = None
        else:
            batch.append((inline, *pending, time.monotonic()))

    def _step_inline(self, inline: _Inline, scores: np.ndarray, latency: float, spec: WorkerSpec, server, stats,
                     batch, on_episode) -> Optional[str]:
        """The predictor's own workers play one step (while the worker processes play theirs) and
        their next decision joins the (new) batch. Returns a failure report that stops the run, or None."""
        try:
            inline.group.act(scores, latency, lambda e: self._accept_episode(e, server, stats, on_episode))
        except Exception:
            return self._on_inline_failure(inline, spec, stats, batch, traceback.format_exc())
        self._post_inline(inline, batch)
        return None

    def _on_inline_failure(self, inline: _Inline, spec: WorkerSpec, stats, batch, report: str) -> Optional[str]:
        done = min(self._episodes_done[w] for w in inline.workers)
        stats.record_failure(inline.failure_key, inline.restarts, done, f"{inline.name} failed:\n{report}")
        if inline.group is not None:
            inline.group.close()
            inline.group = None
        if self.on_worker_error == "restart" and stats.may_restart(self.max_restarts):
            inline.restarts += 1
            self._announce_restart(inline.workers, stats)
            return self._start_inline(inline, spec, stats, batch)
        stats.stop_reason = f"{inline.name} failed"
        inline.finished = True
        return report

    def _announce_restart(self, workers: list, stats: RunStats) -> None:
        where = ", ".join(f"worker {w} from its episode {self._episodes_done[w]}" for w in workers)
        print(f"resonant.parallel: restarting {where} (restart {stats.restarts} of at most {self.max_restarts})",
              file=sys.stderr, flush=True)

    def _stop_all(self, processes: dict, server: MemoryServer, stats: RunStats, inline: Optional[_Inline] = None) -> None:
        """Stores episodes still in the pipes, closes every pipe, joins every process, closes the
        predictor's own workers' environments."""
        if inline is not None and inline.group is not None:
            inline.group.close()
            inline.group = None
        for p in processes.values():
            if p.conn is None:
                continue
            try:
                while p.conn.poll(0):
                    msg = p.conn.recv_bytes()
                    if msg[:1] == EPISODE:
                        self._accept_episode(pickle.loads(msg[1:]), server, stats)
            except (EOFError, OSError):
                pass
            p.conn.close()
            p.conn = None
        deadline = time.monotonic() + self.join_timeout
        for p in processes.values():
            if p.process is not None:
                p.process.join(max(0.0, deadline - time.monotonic()))
        for p in processes.values():
            proc = p.process
            if proc is not None and proc.is_alive():
                proc.terminate()
                proc.join(1.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join(1.0)
            if proc is not None:
                proc.close()
            p.process = None

    def _accept_episode(self, episode: Episode, server: MemoryServer, stats: RunStats, on_episode=None) -> None:
        server.submit(episode)
        stats.record_episode(episode)
        self._episodes_done[episode.worker] = episode.index + 1
        if on_episode is not None:
            on_episode(episode)

    def _failure_report(self, p: _Process, report: Optional[str]) -> str:
        if report is None:
            p.process.join(1.0)
            code = p.process.exitcode
            if code is not None and code < 0:
                report = f"{p.name} was killed by signal {signal.Signals(-code).name} (no traceback)"
            else:
                report = f"{p.name} exited with code {code} without finishing (no traceback)"
        return report

    # ---- the loop --------------------------------------------------------------------------
    def run(self, server: MemoryServer, specs: list[WorkerSpec], stats: RunStats, on_episode=None) -> RunStats:
        """Runs every worker to the end of its budget. Returns the stats; raises WorkerFailed or
        KeyboardInterrupt (after a clean stop) when the run could not finish."""
        spec = specs[0]
        if any(s != spec for s in specs):
            raise ValueError("the local engine runs every worker with the same WorkerSpec")
        if self.predictor_workers > len(specs):
            raise ValueError(f"predictor_workers={self.predictor_workers} exceeds the {len(specs)} worker(s)")
        self._episodes_done = {w: 0 for w in range(len(specs))}
        inline = _Inline(list(range(self.predictor_workers))) if self.predictor_workers else None
        processes = {i: _Process(i, group) for i, group in enumerate(
            process_groups(len(specs), self.workers_per_process, first=self.predictor_workers))}
        self._spin = spin_seconds(self.spin_wait, len(processes))
        stats.spin_wait = self._spin
        batch: list = []  # (process or _Inline, worker ids, observations, arrival time)
        failure: Optional[str] = None
        with RunControl(self.max_seconds) as control:
            try:
                for p in processes.values():
                    self._start(p, spec, stats)
                if inline is not None:
                    failure = self._start_inline(inline, spec, stats, batch)
                batch_deadline = None
                while not failure:
                    live = [p for p in processes.values() if not p.finished]
                    if not live and (inline is None or inline.finished):
                        break
                    stop = control.stop_reason()
                    if stop:
                        stats.stop_reason = stop
                        break
                    listening = [p for p in live if p.waiting_since is None]
                    if batch and batch_deadline is None:  # (the predictor's own workers' decision came first)
                        batch_deadline = batch[0][3] + self.batch_timeout
                    if batch and listening and server.queued_episodes() and not any(p.conn.poll(0) for p in listening):
                        self._store_while_waiting(server, stats)
                    timeout = self.poll_interval if not batch else max(0.0, batch_deadline - time.monotonic())
                    ready = wait_ready([p.conn for p in listening], timeout, self._spin) if listening else []
                    by_conn = {id(p.conn): p for p in listening}
                    for conn in ready:
                        p = by_conn[id(conn)]
                        failure = self._drain(p, spec, server, stats, batch, on_episode)
                        if failure:
                            break
                    if failure:
                        break
                    if batch and batch_deadline is None:
                        batch_deadline = batch[0][3] + self.batch_timeout
                    # every live process has a decision pending, or the batch is full, or it is due
                    waiting = sum(1 for p in processes.values() if not p.finished and p.waiting_since is None)
                    rows = sum(len(ids) for _, ids, _, _ in batch)
                    if batch and (not waiting or rows >= self.batch_size or time.monotonic() >= batch_deadline):
                        inline_answer = self._answer(batch, server, stats)
                        batch, batch_deadline = [], None
                        if inline_answer is not None:  # after the processes' replies: both step at once
                            failure = self._step_inline(inline, *inline_answer, spec, server, stats, batch,
                                                        on_episode)
            finally:
                server_error = None
                try:
                    self._stop_all(processes, server, stats, inline)
                finally:
                    try:
                        server.flush(final=True)
                    except Exception as exc:  # reported, never swallowed
                        server_error = exc
                    stats.finish(server.counters())
                if server_error is not None:
                    raise server_error
        return control.finish(stats, failure)

    @staticmethod
    def _store_while_waiting(server: MemoryServer, stats: RunStats) -> None:
        """Stores the episodes that came in while the batch waits for a worker process's decision:
        the predictor would only wait, and the read that answers the batch (which stores every
        episode still queued first) then finds them stored. About 3 % more decisions/s at 8 workers
        on 2 cores, where the worker process's half of the stepping is the longer one (12
        interleaved paired rounds, median; an A/B outside benchmarks/)."""
        started = time.perf_counter()
        server.flush()
        stats.record_predictor_work(started)

    def _drain(self, p: _Process, spec: WorkerSpec, server, stats, batch, on_episode) -> Optional[str]:
        """Reads what process p sent (up to its next decision). Returns a failure report that stops
        the run, or None."""
        try:
            while p.conn.poll(0):
                msg = p.conn.recv_bytes()
                tag = msg[:1]
                if tag == DECIDE:
                    now = time.monotonic()
                    p.waiting_since = now
                    ids, obs = _decision(msg, spec.state_dim)
                    batch.append((p, ids, obs, now))
                    return None
                if tag == EPISODE:
                    self._accept_episode(pickle.loads(msg[1:]), server, stats, on_episode)
                elif tag == FINISHED:
                    p.finished = True
                    p.process.join(self.join_timeout)
                    return None
                elif tag == ERROR:
                    return self._on_failure(p, spec, stats, msg[1:].decode(errors="replace"))
            return None
        except (EOFError, OSError):
            return self._on_failure(p, spec, stats, None)

    def _on_failure(self, p: _Process, spec: WorkerSpec, stats: RunStats, report: Optional[str]) -> Optional[str]:
        report = self._failure_report(p, report)
        done = min(self._episodes_done[w] for w in p.workers)
        stats.record_failure(p.failure_key, p.restarts, done, report)
        p.conn.close()
        p.process.join(self.join_timeout)
        p.process.close()
        p.conn = p.process = None
        if self.on_worker_error == "restart" and stats.may_restart(self.max_restarts):
            p.restarts += 1
            self._announce_restart(p.workers, stats)
            self._start(p, spec, stats)
            return None
        stats.stop_reason = f"{p.name} failed"
        p.finished = True
        return report

    def _answer(self, batch: list, server: MemoryServer, stats: RunStats) -> Optional[tuple[np.ndarray, float]]:
        """Answers the batch: one read, each process's scores sent. Returns the scores and the wait of
        the predictor's own workers (None if they had no decision in it), for the caller to play after."""
        started = time.perf_counter()
        inline_answer = None
        ids = np.concatenate([ids for _, ids, _, _ in batch])
        scores = server.decide(ids, np.concatenate([obs for _, _, obs, _ in batch]))
        now = time.monotonic()
        start = 0
        for p, rows, _, arrived in batch:
            part = scores[start:start + len(rows)]
            start += len(rows)
            if isinstance(p, _Inline):
                inline_answer = (part, now - arrived)
                continue
            p.waiting_since = None
            if p.conn is None:
                continue
            try:
                p.conn.send_bytes(SCORES + np.ascontiguousarray(part, dtype=np.float32).tobytes())
            except OSError:
                pass  # the process died meanwhile: its pipe reports EOF on the next wait
        # (after the replies: the processes step meanwhile)
        stats.record_batch(len(ids), np.repeat([now - t for _, _, _, t in batch], [len(i) for _, i, _, _ in batch]))
        stats.record_predictor_work(started)
        return inline_answer
