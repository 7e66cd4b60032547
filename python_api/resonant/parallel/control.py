"""How a run stops, shared by the engines: Ctrl-C, a time limit, a failed worker."""
from __future__ import annotations

import signal
import threading
import time
from typing import Optional

from .stats import RunStats


class WorkerFailed(RuntimeError):
    """A worker failed and the run stopped (on_worker_error="stop", or restarts exhausted). The
    partial run's statistics are `stats`; every episode that finished before is stored."""

    def __init__(self, message: str, stats: RunStats):
        super().__init__(message)
        self.stats = stats


def check_failure_policy(on_worker_error: str, max_restarts) -> None:
    if on_worker_error not in ("stop", "restart"):
        raise ValueError(f"on_worker_error must be 'stop' or 'restart', got {on_worker_error!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"max_restarts must be an integer >= 0, got {max_restarts!r}")


class RunControl:
    """Within the block, Ctrl-C (SIGINT) sets a flag the engine's loop polls (a second Ctrl-C
    raises KeyboardInterrupt at once), and `max_seconds` bounds the run. The previous SIGINT
    handler is restored afterwards; outside the main thread only the time limit applies.

    (A process started in the background by a non-interactive shell ignores SIGINT until this
    handler is installed: that is the shell's rule, not this module's.)"""

    def __init__(self, max_seconds: Optional[float] = None):
        self.max_seconds = max_seconds
        self.interrupted = False
        self._deadline = None
        self._previous = None

    def _handler(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True

    def __enter__(self):
        if self.max_seconds is not None:
            self._deadline = time.monotonic() + self.max_seconds
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def stop_reason(self) -> Optional[str]:
        """Why the run must stop now, or None."""
        if self.interrupted:
            return "interrupted"
        if self._deadline is not None and time.monotonic() > self._deadline:
            return f"stopped after max_seconds={self.max_seconds}"
        return None

    @staticmethod
    def finish(stats: RunStats, failure: Optional[str]) -> RunStats:
        """Raises what the run's end calls for (after the engine has cleaned up)."""
        if failure:
            raise WorkerFailed(failure, stats)
        if stats.stop_reason == "interrupted":
            raise KeyboardInterrupt
        return stats
