"""The local engine: worker processes on this machine, the predictor and writer in this process.

Each worker is a process with one duplex pipe to this process. A decision is one small message
each way (the observation's float32 bytes out, the scores' bytes back: no pickling, no shared
memory segments to leak); a finished episode is one pickled message. The loop here waits on all
pipes at once (`multiprocessing.connection.wait`), gathers pending decisions until it has one
from every worker still playing (at most `batch_size`) or `batch_timeout` has passed since the
first, stores every finished episode that arrived (one write), and answers the batch with one
read. Workers start with the "forkserver" method on Linux (not "fork": this process already runs
threads: torch's, tqdm's) and "spawn" elsewhere; like "spawn", the fork server imports the
script that started the run, so a script must guard its run with `if __name__ == "__main__":`.

Stopping. Ctrl-C (SIGINT) in this process sets a flag that the loop checks at least every
`poll_interval` seconds; a second Ctrl-C raises KeyboardInterrupt at once. Workers ignore SIGINT
(a terminal sends it to the whole process group) and are stopped by this process: their pipes
close, each worker ends at its next decision, every process is joined (after `join_timeout`
seconds terminated, then killed), and episodes that had finished are still stored. A worker that
raises sends its traceback before it exits; one that dies without a word (a signal, os._exit) is
noticed by its pipe closing. Either way the failure is reported (stderr and the run's `errors`)
and, with `on_worker_error="restart"`, the worker is started again on its remaining episodes (at
most `max_restarts` times in all; its unfinished episode is lost), otherwise the run stops cleanly
and raises WorkerFailed.
"""
from __future__ import annotations

import multiprocessing as mp
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
from .worker import Episode, StopRequested, WorkerSpec, play

# message tags, first byte of every message
DECIDE, EPISODE, FINISHED, ERROR, SCORES = b"D", b"E", b"F", b"X", b"A"


def _worker_main(worker: int, spec: WorkerSpec, first_episode: int, restart: int, conn) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop

    def decide(obs: np.ndarray) -> np.ndarray:
        try:
            conn.send_bytes(DECIDE + obs.tobytes())
            reply = conn.recv_bytes()
        except (EOFError, OSError) as exc:  # the trainer closed the pipe: the run is stopping
            raise StopRequested from exc
        return np.frombuffer(reply[1:], dtype=np.float32)

    def submit(episode: Episode) -> None:
        try:
            conn.send_bytes(EPISODE + pickle.dumps(episode, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            raise StopRequested from exc

    try:
        play(spec, worker, decide, submit, first_episode=first_episode, restart=restart)
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


@dataclass
class _Worker:
    id: int
    process: Optional[mp.process.BaseProcess] = None
    conn: Optional[object] = None
    episodes_done: int = 0
    restarts: int = 0
    finished: bool = False
    waiting_since: Optional[float] = None  # a decision of this worker is in the current batch


def default_start_method() -> str:
    methods = mp.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


class LocalEngine:
    def __init__(self, *, batch_size: int = 64, batch_timeout: float = 0.005, start_method: Optional[str] = None,
                 on_worker_error: str = "stop", max_restarts: int = 3, poll_interval: float = 0.1,
                 join_timeout: float = 5.0, max_seconds: Optional[float] = None):
        check_failure_policy(on_worker_error, max_restarts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not batch_timeout >= 0:
            raise ValueError(f"batch_timeout must be >= 0 seconds, got {batch_timeout}")
        self.batch_size, self.batch_timeout = batch_size, batch_timeout
        self.ctx = mp.get_context(start_method or default_start_method())
        if self.ctx.get_start_method() == "forkserver":
            # imported once by the fork server, so each worker forks from it ready (not importing torch anew)
            self.ctx.set_forkserver_preload([__name__])
        self.on_worker_error, self.max_restarts = on_worker_error, max_restarts
        self.poll_interval, self.join_timeout, self.max_seconds = poll_interval, join_timeout, max_seconds

    # ---- process management ----------------------------------------------------------------
    def _start(self, w: _Worker, spec: WorkerSpec, stats: RunStats) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        w.process = self.ctx.Process(target=_worker_main, args=(w.id, spec, w.episodes_done, w.restarts, child),
                                     name=f"resonant-worker-{w.id}", daemon=True)
        w.process.start()
        stats.worker_pids.append(w.process.pid)
        child.close()  # ours is closed so that the worker's death shows as EOF on `parent`
        w.conn, w.waiting_since = parent, None

    def _stop_all(self, workers: dict, server: MemoryServer, stats: RunStats) -> None:
        """Stores episodes still in the pipes, closes every pipe, joins every process."""
        for w in workers.values():
            if w.conn is None:
                continue
            try:
                while w.conn.poll(0):
                    msg = w.conn.recv_bytes()
                    if msg[:1] == EPISODE:
                        self._accept_episode(w, pickle.loads(msg[1:]), server, stats)
            except (EOFError, OSError):
                pass
            w.conn.close()
            w.conn = None
        deadline = time.monotonic() + self.join_timeout
        for w in workers.values():
            if w.process is not None:
                w.process.join(max(0.0, deadline - time.monotonic()))
        for w in workers.values():
            p = w.process
            if p is not None and p.is_alive():
                p.terminate()
                p.join(1.0)
                if p.is_alive():
                    p.kill()
                    p.join(1.0)
            if p is not None:
                p.close()
            w.process = None

    @staticmethod
    def _accept_episode(w: _Worker, episode: Episode, server: MemoryServer, stats: RunStats) -> None:
        server.submit(episode)
        stats.record_episode(episode)
        w.episodes_done = episode.index + 1

    def _failure_report(self, w: _Worker, report: Optional[str]) -> str:
        if report is None:
            w.process.join(1.0)
            code = w.process.exitcode
            if code is not None and code < 0:
                report = f"worker {w.id} was killed by signal {signal.Signals(-code).name} (no traceback)"
            else:
                report = f"worker {w.id} exited with code {code} without finishing (no traceback)"
        return report

    # ---- the loop --------------------------------------------------------------------------
    def run(self, server: MemoryServer, specs: list[WorkerSpec], stats: RunStats, on_episode=None) -> RunStats:
        """Runs every worker to the end of its budget. Returns the stats; raises WorkerFailed or
        KeyboardInterrupt (after a clean stop) when the run could not finish."""
        workers = {i: _Worker(i) for i in range(len(specs))}
        batch: list = []  # (worker, observation, arrival time)
        failure: Optional[str] = None
        with RunControl(self.max_seconds) as control:
            try:
                for w in workers.values():
                    self._start(w, specs[w.id], stats)
                batch_deadline = None
                while True:
                    live = [w for w in workers.values() if not w.finished]
                    if not live:
                        break
                    stop = control.stop_reason()
                    if stop:
                        stats.stop_reason = stop
                        break
                    listening = [w for w in live if w.waiting_since is None]
                    timeout = self.poll_interval if not batch else max(0.0, batch_deadline - time.monotonic())
                    ready = wait([w.conn for w in listening], timeout) if listening else []
                    by_conn = {id(w.conn): w for w in listening}
                    for conn in ready:
                        w = by_conn[id(conn)]
                        failure = self._drain(w, specs[w.id], server, stats, batch, on_episode)
                        if failure:
                            break
                    if failure:
                        break
                    if batch and batch_deadline is None:
                        batch_deadline = batch[0][2] + self.batch_timeout
                    target = min(self.batch_size, sum(1 for w in workers.values() if not w.finished))
                    if batch and (len(batch) >= target or time.monotonic() >= batch_deadline):
                        self._answer(batch, workers, server, stats)
                        batch, batch_deadline = [], None
            finally:
                server_error = None
                try:
                    self._stop_all(workers, server, stats)
                finally:
                    try:
                        server.flush(final=True)
                    except Exception as exc:  # reported, never swallowed
                        server_error = exc
                    stats.finish(server.counters())
                if server_error is not None:
                    raise server_error
        return control.finish(stats, failure)

    def _drain(self, w: _Worker, spec: WorkerSpec, server, stats, batch, on_episode) -> Optional[str]:
        """Reads what worker w sent (up to its next decision). Returns a failure report that stops
        the run, or None."""
        try:
            while w.conn.poll(0):
                msg = w.conn.recv_bytes()
                tag = msg[:1]
                if tag == DECIDE:
                    now = time.monotonic()
                    w.waiting_since = now
                    batch.append((w, np.frombuffer(msg[1:], dtype=np.float32), now))
                    return None
                if tag == EPISODE:
                    episode = pickle.loads(msg[1:])
                    self._accept_episode(w, episode, server, stats)
                    if on_episode is not None:
                        on_episode(episode)
                elif tag == FINISHED:
                    w.finished = True
                    w.process.join(self.join_timeout)
                    return None
                elif tag == ERROR:
                    return self._on_failure(w, spec, stats, msg[1:].decode(errors="replace"))
            return None
        except (EOFError, OSError):
            return self._on_failure(w, spec, stats, None)

    def _on_failure(self, w: _Worker, spec: WorkerSpec, stats: RunStats, report: Optional[str]) -> Optional[str]:
        report = self._failure_report(w, report)
        stats.record_failure(w.id, w.restarts, w.episodes_done, report)
        w.conn.close()
        w.process.join(self.join_timeout)
        w.process.close()
        w.conn = w.process = None
        if self.on_worker_error == "restart" and stats.may_restart(self.max_restarts):
            w.restarts += 1
            print(f"resonant.parallel: restarting worker {w.id} at its episode {w.episodes_done} "
                  f"(restart {stats.restarts} of at most {self.max_restarts})", file=sys.stderr, flush=True)
            self._start(w, spec, stats)
            return None
        stats.stop_reason = f"worker {w.id} failed"
        w.finished = True
        return report

    def _answer(self, batch: list, workers: dict, server: MemoryServer, stats: RunStats) -> None:
        ids = np.asarray([w.id for w, _, _ in batch], dtype=np.int64)
        scores = server.decide(ids, np.stack([obs for _, obs, _ in batch]))
        now = time.monotonic()
        stats.record_batch(len(batch), [now - t for _, _, t in batch])
        for (w, _, _), row in zip(batch, scores):
            w.waiting_since = None
            if w.conn is None:
                continue
            try:
                w.conn.send_bytes(SCORES + row.tobytes())
            except OSError:
                pass  # the worker died meanwhile: its pipe reports EOF on the next wait
