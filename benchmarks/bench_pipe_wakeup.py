"""What a blocked wait costs: round trips of a small message between two processes over a pipe,
each side either blocking in its receive or polling first (resonant.parallel.local.wait_ready, the
local engine's `spin_wait`).

    python benchmarks/bench_pipe_wakeup.py                  # 2 000 round trips each way
    python benchmarks/bench_pipe_wakeup.py --trips 5000 --work-ms 1.0

Between two round trips the sending side works for --work-ms (a busy loop), as the predictor and
the workers do between their messages, so a blocked receiver has gone to sleep when the message
comes. Prints the round trip's median and 90th percentile in microseconds for each mode and writes
--out (JSON, untracked by default).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python_api"))

from resonant.parallel.local import wait_ready  # noqa: E402
from resonant.runs import run_dir, write_text_atomic  # noqa: E402

STOP = b"q"


def receive(conn, spin: float) -> bytes:
    if spin:
        wait_ready([conn], spin, spin)
    return conn.recv_bytes()


def echo(conn, spin: float) -> None:
    """The other process: sends back every message until STOP."""
    while (message := receive(conn, spin)) != STOP:
        conn.send_bytes(message)


def round_trips(spin: float, trips: int, work_seconds: float, warmup: int = 200) -> np.ndarray:
    """Seconds of each round trip, both sides polling for `spin` seconds first (0: blocking)."""
    ours, theirs = mp.Pipe()
    other = mp.Process(target=echo, args=(theirs, spin), daemon=True)
    other.start()
    try:
        seconds = []
        message = b"x" * 100
        for i in range(warmup + trips):
            t0 = time.perf_counter()
            ours.send_bytes(message)
            receive(ours, spin)
            if i >= warmup:
                seconds.append(time.perf_counter() - t0)
            end = time.perf_counter() + work_seconds
            while time.perf_counter() < end:  # the work between two messages
                pass
        ours.send_bytes(STOP)
    finally:
        other.join(5)
        if other.is_alive():
            other.kill()
    return np.asarray(seconds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trips", type=int, default=2000, help="round trips per mode (default: %(default)s)")
    p.add_argument("--work-ms", type=float, default=0.5,
                   help="busy work between two round trips, milliseconds (default: %(default)s)")
    p.add_argument("--spin-ms", type=float, default=5.0, help="polling mode's spin_wait (default: %(default)s)")
    p.add_argument("--out", default=str(run_dir("benchmarks") / "pipe_wakeup.json"),
                   help="the JSON results (default: %(default)s, untracked)")
    args = p.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = []
    for mode, spin in (("blocking", 0.0), ("polling", args.spin_ms / 1e3)):
        us = round_trips(spin, args.trips, args.work_ms / 1e3) * 1e6
        rows.append({"mode": mode, "spin_ms": spin * 1e3, "trips": args.trips, "work_ms": args.work_ms,
                     "p50_us": round(float(np.percentile(us, 50)), 1), "p90_us": round(float(np.percentile(us, 90)), 1),
                     "p99_us": round(float(np.percentile(us, 99)), 1)})
        print(f"{mode:<9} round trip p50 {rows[-1]['p50_us']:8.1f} us  p90 {rows[-1]['p90_us']:8.1f} us  "
              f"p99 {rows[-1]['p99_us']:8.1f} us", flush=True)
    write_text_atomic(args.out, json.dumps({"command": " ".join(sys.argv), "uptime_start": load, "rows": rows,
                                            "cpu_count": os.cpu_count()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
