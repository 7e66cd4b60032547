"""Rows of BENCHMARKS.md's EngramBrain LunarLander table, read from the runs' JSON files.

Each row spells out the full `resonant train` command from the run's recorded config (every
flag that shaped it, so the command stays right when CLI defaults change), then the numbers the
trainer recorded: last-100 mean, mean of the last 500 episodes (less noisy than the last 100
when comparing configurations), share of episodes >= 200 (all / last 100), wall time.

    python benchmarks/engram_table.py                       # every engram_lunarlander_* run
    python benchmarks/engram_table.py NAME [NAME ...]       # these runs, in this order
    python benchmarks/engram_table.py --results runs/NAME NAME   # a new run, from its runs/ folder
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Runs recorded before a flag existed ran with what is now spelled by these values.
FLAGS_BEFORE_THEY_EXISTED = {"action_repeat": 1, "epsilon_end": 0.02, "recency_halflife": None,
                             "outcome_temperature": None, "estimator": "mean"}
TARGET = 100.0


def spelled(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def command(name: str, config: dict) -> str:
    c = {**FLAGS_BEFORE_THEY_EXISTED, **config}
    parts = [f"resonant train lunarlander --episodes {c['episodes']} --store torch --seed {c['seed']}",
             f"--action-repeat {c['action_repeat']} --gamma {spelled(c['gamma'])}",
             f"--bandwidth {spelled(c['bandwidth'])}",
             f"--capacity {c['capacity']} --epsilon-decay {spelled(c['epsilon_decay'])}",
             f"--epsilon-end {spelled(c['epsilon_end'])} --estimator {c['estimator']}"]
    if c["estimator"] == "local_linear":
        parts.append(f"--ridge {spelled(c['ridge'])}")
    for key in ("k", "n_step", "recency_halflife", "outcome_temperature"):
        if c.get(key) is not None:
            parts.append(f"--{key.replace('_', '-')} {spelled(c[key])}")
    if c.get("num_envs", 8) != 8:
        parts.append(f"--num-envs {c['num_envs']}")
    return " ".join(parts + [f"--name {name}"])


def row(name: str, results: str = RESULTS) -> str:
    with open(os.path.join(results, f"{name}.json")) as f:
        run = json.load(f)
    returns = np.asarray(run["episode_returns"], dtype=np.float64)
    s = run["summary"]
    last100 = s["last100_mean_return"]
    return (f"| {name.replace('engram_lunarlander_', '')} | `{command(name, run['config'])}` | {s['episodes']} | "
            f"{last100:+.1f} | {returns[-500:].mean():+.1f} | {100 * s['share_episodes_ge_200']:.1f}% / "
            f"{100 * s['last100_share_ge_200']:.0f}% | {s['wall_seconds']:.0f} s | "
            f"{'met' if last100 >= TARGET else 'missed'} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="run names (default: every engram_lunarlander_* JSON)")
    p.add_argument("--results", default=RESULTS, help="folder of the runs' JSON files (default: the recorded runs "
                                                     "in benchmarks/results)")
    args = p.parse_args(argv)
    names = args.names or sorted(os.path.basename(f)[:-5]
                                 for f in glob.glob(os.path.join(args.results, "engram_lunarlander_*.json")))
    print("| run | command | episodes | last-100 mean | last-500 mean | share ≥ 200 (all / last 100) | wall time "
          "| target ≥ +100 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        print(row(name, args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
