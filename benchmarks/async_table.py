"""Shared vs isolated vs lone: episodes each agent needs, and one figure, from train-async reports.

    python benchmarks/async_table.py runs/lunar/shared_w8.json runs/lunar/isolated_w8.json runs/lunar/lone.json \\
        --metric return --threshold 100 --out runs/lunar/shared_vs_isolated.png
    python benchmarks/async_table.py runs/subgrid/*.json --metric env_steps --threshold 40 --below \\
        --out runs/subgrid/shared_vs_isolated.png

For every worker of every report: the first of its own episodes n at which the mean of its last
`--window` episodes (n − window + 1 … n) reaches the threshold (returns: ≥; episode lengths in
environment steps with --below: ≤), or "not reached" within its budget. Prints a Markdown table
(one row per report) and draws the rolling means of every worker, one colour per report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python_api"))

from resonant.trainer import rolling_mean  # noqa: E402


def first_reached(values, threshold: float, window: int, below: bool):
    rm = rolling_mean(np.asarray(values, dtype=np.float64), window)
    hit = np.nonzero(rm <= threshold if below else rm >= threshold)[0]
    return int(hit[0]) + window if len(hit) else None


def per_worker(report: dict, metric: str) -> list:
    key = "returns_worker" if metric == "return" else "env_steps_worker"
    return [report[f"{key}{w}"] for w in range(report["summary"]["workers"])]


def label(report: dict, path: str) -> str:
    c = report["config"]
    who = "1 agent alone" if c["workers"] == 1 else f"{c['workers']} agents, {c['memory']} memory"
    return f"{who} ({os.path.basename(path)})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+")
    p.add_argument("--metric", choices=("return", "env_steps"), default="return")
    p.add_argument("--threshold", type=float, default=100.0)
    p.add_argument("--below", action="store_true", help="the target is a rolling mean at or below the threshold")
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--out", default=None, help="PNG of every worker's rolling mean")
    p.add_argument("--episode-windows", nargs="*", default=[], metavar="FIRST-LAST",
                   help="also tabulate the metric over these episodes of every agent (1-based, inclusive), pooled "
                        "over the agents: mean, median and the share at --cap or beyond")
    p.add_argument("--cap", type=float, default=400, help="with --episode-windows (default: %(default)s)")
    p.add_argument("--labels", nargs="*", default=None, metavar="TEXT",
                   help="the figure's legend entry of each report, in order (default: agents, memory and file name)")
    args = p.parse_args()
    if args.labels is not None and len(args.labels) != len(args.reports):
        p.error(f"--labels needs one label per report ({len(args.reports)}), got {len(args.labels)}")
    reports = [(path, json.load(open(path))) for path in args.reports]
    if args.episode_windows:
        print(f"| run | agents' episodes | {args.metric}: mean | median | share ≥ {args.cap:g} |")
        print("|---|---|---|---|---|")
        for path, r in reports:
            for window in args.episode_windows:
                first, last = (int(x) for x in window.split("-"))
                pooled = np.concatenate([np.asarray(s[first - 1:last], dtype=np.float64)
                                         for s in per_worker(r, args.metric)])
                if len(pooled):
                    print(f"| {os.path.basename(path)} | {first}–{last} | {pooled.mean():.1f} | {np.median(pooled):.0f} | "
                          f"{(pooled >= args.cap).mean():.2f} |")
        print()
    rel = "≤" if args.below else "≥"
    print(f"| run | workers | memory | episodes per worker | episodes to a rolling-{args.window} mean {rel} "
          f"{args.threshold:g} (per worker) | slowest worker | final rolling mean (per worker, mean) |")
    print("|---|---|---|---|---|---|---|")
    for path, r in reports:
        series = per_worker(r, args.metric)
        reached = [first_reached(s, args.threshold, args.window, args.below) for s in series]
        finals = [float(np.mean(s[-args.window:])) for s in series]
        shown = ", ".join("not reached" if n is None else str(n) for n in reached)
        slowest = "not reached" if any(n is None for n in reached) else str(max(reached))
        c = r["config"]
        print(f"| {os.path.basename(path)} | {c['workers']} | {c['memory']} | {c['episodes_per_worker']} | {shown} | "
              f"{slowest} | {np.mean(finals):+.1f} |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 5))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (path, r) in enumerate(reports):
            for w, s in enumerate(per_worker(r, args.metric)):
                rm = rolling_mean(np.asarray(s, dtype=np.float64), args.window)
                ax.plot(np.arange(args.window, len(s) + 1), rm, color=colours[i % len(colours)], lw=1, alpha=0.8,
                        label=(args.labels[i] if args.labels else label(r, path)) if w == 0 else None)
        ax.axhline(args.threshold, color="k", ls="--", lw=1, label=f"target {rel} {args.threshold:g}")
        ax.set_xlabel("episode of the agent (its own episodes)")
        unit = "return" if args.metric == "return" else "environment steps per episode"
        ax.set_ylabel(f"{unit}\n(mean of the agent's last {args.window} episodes)")
        ax.set_title(f"{reports[0][1]['config']['env']}: every agent's rolling mean, shared vs isolated memory")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        plt.close(fig)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
