"""PatternMemory benchmarks (issue #15): capacity timing, trained vs untrained, recall vs N.

capacity   N stored binary patterns of `units` units (25% active) and a batch of cues on CPU, one
           recall step each (read + k-winners-take-all):
             PatternMemory.recall(steps=1)  the fused gaussian_read (backend auto -> cpu)
             torch modern Hopfield         kwta(softmax(β Q Xᵀ) X): two matrix products and a softmax,
                                           holding the (batch, N) score matrix
             two bare matmuls              (Q Xᵀ) X, the floor any dense read pays
           For equal-activity binary patterns the three compute the same weights (‖x‖² is the same
           for every pattern), so the recalls are compared too. Peak extra memory (RSS above the
           inputs, in a fresh subprocess) beside each time.
trained    clustered real-valued patterns (5 prototypes × 8 variants, noise 0.1): the untrained
           width (the patterns' overall spread) blends a cluster; training narrows it. Recall at
           r = 0 .. 0.3 of the units switched off, beside exact nearest-neighbour lookup.
curve      recall vs N (144 units, 36 active, the seed experiment's patterns) at r = 0.5 .. 0.9, the
           memory beside nearest-neighbour lookup, up to --curve-max-n; a plot.

    python benchmarks/bench_hippocampus.py                       # N = 100 000, 1024 units, 256 cues
    python benchmarks/bench_hippocampus.py --n 20000 --parts capacity
    python benchmarks/bench_hippocampus.py --quick               # small sizes: a smoke run

Writes bench_hippocampus.json (and recall_vs_n.png) to --out (default runs/bench-hippocampus).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
import _measure  # noqa: E402

from resonant.hippocampus import PatternMemory  # noqa: E402
from resonant.hippocampus import patterns as patgen  # noqa: E402
from resonant.hippocampus.memory import kwta  # noqa: E402

# ---- capacity ---------------------------------------------------------------------------------


def capacity_inputs(n: int, units: int, batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    active = units // 4
    stored = torch.empty(n, units)
    # in place, a block at a time, so building the inputs does not raise the process's peak RSS
    for lo in range(0, n, 8192):
        stored[lo:lo + 8192] = patgen.random_binary_patterns(min(8192, n - lo), units, active, generator=gen)
    rows = torch.randint(0, n, (batch,), generator=gen)
    cues = patgen.switch_off_random(stored[rows], 0.5, generator=gen)
    return stored, cues, rows, active


def build(method: str, n: int, units: int, batch: int, seed: int = 0):
    """A zero-argument callable doing one recall step of `method` (for _measure's memory probe)."""
    stored, cues, _, active = capacity_inputs(n, units, batch, seed)
    memory = PatternMemory(units)
    memory.update(stored, binary=True)
    beta = memory.inverse_temperature
    if method == "ours":
        return lambda: memory.recall(cues, steps=1)
    if method == "hopfield":
        return lambda: kwta(torch.softmax(beta * (cues @ stored.T), dim=-1) @ stored, active)
    if method == "matmuls":
        return lambda: (cues @ stored.T) @ stored
    raise ValueError(method)


def capacity(args) -> dict:
    from tqdm.auto import tqdm

    n, units, batch = args.n, args.units, args.batch
    rows = {}
    for method in tqdm(("matmuls", "hopfield", "ours"), desc=f"capacity N={n}", unit="method"):
        call = build(method, n, units, batch)
        seconds = _measure.median_time(call, repeats=args.repeats, warmup=1, max_seconds=args.max_seconds)
        rows[method] = {"seconds": seconds}
        if args.memory:
            kw = dict(method=method, n=n, units=units, batch=batch)
            rows[method]["peak_extra_mb"] = _measure.peak_extra_rss_mb("bench_hippocampus", "build", kw)
        tqdm.write(f"  {method:<9} {seconds * 1e3:10.1f} ms" +
                   (f"  peak extra {rows[method]['peak_extra_mb']:.1f} MB" if args.memory else ""))
    # the three recall steps agree (same weights for equal-activity binary patterns)
    stored, cues, targets, active = capacity_inputs(n, units, batch)
    memory = PatternMemory(units)
    memory.update(stored, binary=True)
    ours = memory.recall(cues, steps=1)
    hopfield = kwta(torch.softmax(memory.inverse_temperature * (cues @ stored.T), dim=-1) @ stored, active)
    index, _ = patgen.nearest(stored, ours)
    return {
        "n": n, "units": units, "batch": batch, "active": active, "inverse_temperature": memory.inverse_temperature,
        "rows": rows,
        "ours_over_hopfield": rows["ours"]["seconds"] / rows["hopfield"]["seconds"],
        "ours_over_matmuls": rows["ours"]["seconds"] / rows["matmuls"]["seconds"],
        "recalls_equal_to_hopfield": int((ours == hopfield).all(-1).sum()),
        "recall_at_r0.5": float((index == targets).double().mean()),
        "score_matrix_mb": batch * n * 4 / _measure.MB,
    }


# ---- trained vs untrained -------------------------------------------------------------------------


def clustered(clusters=5, variants=8, units=144, noise=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(clusters, units, generator=gen)
    return (prototypes[:, None] + noise * torch.randn(clusters, variants, units, generator=gen)).reshape(-1, units)


def trained_vs_untrained(args) -> dict:
    stored = clustered()
    ratios = (0.0, 0.1, 0.2, 0.3)
    cues = {r: patgen.switch_off_random(stored, r, units="all", generator=torch.Generator().manual_seed(1))
            for r in ratios}
    truth = torch.arange(len(stored))

    def rates(memory):
        return [float((memory.test_pattern(cues[r], stored).closest_index == truth).double().mean()) for r in ratios]

    memory = PatternMemory(stored.shape[1])
    memory.update(stored)
    untrained, beta0 = rates(memory), memory.inverse_temperature
    seconds = memory.train(epochs=20, max_corruption=0.3, seed=0)
    out = {
        "patterns": "5 prototypes x 8 variants, 144 real units, variant noise 0.1 (prototype spread 1)",
        "ratios": list(ratios), "untrained": untrained, "trained": rates(memory),
        "nearest": [float((patgen.nearest(stored, cues[r])[0] == truth).double().mean()) for r in ratios],
        "inverse_temperature": {"untrained": beta0, "trained": memory.inverse_temperature},
        "train": "epochs=20, max_corruption=0.3, seed=0", "train_seconds": seconds,
    }
    print(f"  trained vs untrained (clustered): r {out['ratios']}\n    untrained {untrained}\n"
          f"    trained   {out['trained']}\n    nearest   {out['nearest']}\n    β {beta0:.3g} -> "
          f"{memory.inverse_temperature:.3g} in {seconds:.2f} s")
    return out


# ---- recall vs N --------------------------------------------------------------------------------


def curve(args) -> dict:
    from tqdm.auto import tqdm

    ratios = (0.5, 0.6, 0.7, 0.8, 0.9)
    counts, n = [], 2
    while n < args.curve_max_n:
        counts.append(n)
        n = int(math.ceil(n * 2.5))
    counts.append(args.curve_max_n)
    result = {"ratios": list(ratios), "counts": counts, "recall": [], "nearest": [], "cues_per_point": args.curve_cues,
              "units": 144, "active": 36, "memory": "untrained (the spread's width)"}
    for n in tqdm(counts, desc="recall vs N", unit="N"):
        gen = torch.Generator().manual_seed(n)
        stored = patgen.random_binary_patterns(n, 144, 36, generator=gen)
        rows = torch.randperm(n, generator=gen)[:args.curve_cues]
        memory = PatternMemory(144)
        memory.update(stored)
        ours, nn = [], []
        for r in ratios:
            cues = patgen.switch_off_first(stored[rows], r)
            ours.append(float((memory.test_pattern(cues, stored[rows]).closest_index == rows).double().mean()))
            nn.append(float((patgen.nearest(stored, cues)[0] == rows).double().mean()))
        result["recall"].append(ours)
        result["nearest"].append(nn)
        tqdm.write(f"  N={n:<7} recall {ours}  nearest {nn}")
    return result


def plot_curve(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    recall, nearest = torch.tensor(result["recall"]), torch.tensor(result["nearest"])
    for j, r in enumerate(result["ratios"]):
        line, = ax.plot(result["counts"], recall[:, j], marker="o", label=f"r = {r} PatternMemory")
        ax.plot(result["counts"], nearest[:, j], linestyle="--", color=line.get_color(), alpha=0.6,
                label=f"r = {r} nearest neighbour")
    ax.axhline(0.9, color="grey", linewidth=0.8, label="recall 0.9")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("patterns stored, N (log scale)")
    ax.set_ylabel("recall (fraction of cues recalled as their pattern)")
    ax.set_title(f"Recall vs number of patterns ({result['units']} units, {result['active']} active; "
                 f"{result['cues_per_point']} cues per point)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="capacity,trained,curve", help="comma-separated: capacity, trained, curve")
    p.add_argument("--n", type=int, default=100_000, help="stored patterns for capacity (default: %(default)s)")
    p.add_argument("--units", type=int, default=1024, help="units per pattern for capacity (default: %(default)s)")
    p.add_argument("--batch", type=int, default=256, help="cues per recall for capacity (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median) (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop repeating after this long")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory probes")
    p.add_argument("--curve-max-n", type=int, default=100_000, help="largest N of the curve (default: %(default)s)")
    p.add_argument("--curve-cues", type=int, default=200, help="cues per curve point (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="N=5000, 256 units, curve to N=2000: a smoke run")
    p.add_argument("--out", default="runs/bench-hippocampus", help="output folder (default: %(default)s)")
    args = p.parse_args()
    if args.quick:
        args.n, args.units, args.curve_max_n, args.curve_cues = 5000, 256, 2000, 50
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "loadavg_before": os.getloadavg(), "torch": torch.__version__},
              "command": " ".join(sys.argv)}
    parts = set(args.parts.split(","))
    start = time.perf_counter()
    if "capacity" in parts:
        result["capacity"] = capacity(args)
        c = result["capacity"]
        print(f"  ours / hopfield {c['ours_over_hopfield']:.2f}x, ours / bare matmuls {c['ours_over_matmuls']:.2f}x; "
              f"{c['recalls_equal_to_hopfield']}/{c['batch']} recalls equal the torch Hopfield step; recall at "
              f"r=0.5 {c['recall_at_r0.5']:.3f}; the torch score matrix is {c['score_matrix_mb']:.0f} MB")
    if "trained" in parts:
        result["trained_vs_untrained"] = trained_vs_untrained(args)
    if "curve" in parts:
        result["recall_vs_n"] = curve(args)
        plot_curve(result["recall_vs_n"], out / "recall_vs_n.png")
    result["machine"]["loadavg_after"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - start
    _measure.write_json(str(out / "bench_hippocampus.json"), result)
    print(f"wrote {out / 'bench_hippocampus.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
