"""The seed's recall experiment: recall as patterns are corrupted and as their number grows.

Patterns of 144 units (the seed's 6×2×3×4 layer) with 36 active at random; N = 2, 4, …, 20
stored patterns; each stored pattern is cued with its first int(36·r) active units switched off,
r = 0, 0.1, …, 0.9; a recall succeeds when the training pattern closest to it is the cued one.
Each of the 10 trials draws a fresh set of patterns (the seed drew one set and repeated the tests
on it, which for a deterministic recall would repeat the same numbers), stores it, trains and
tests every (pattern, r) cue in one batched call.

Beside the memory's recall it reports exact nearest-neighbour lookup from the cue itself (the
closest stored pattern to the cue, same tie rule): for random patterns that is the information
limit — at r = 0.9 four active units are left, and another pattern containing all four is
indistinguishable from the target.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import patterns as patgen

UNITS, ACTIVE = 144, 36
COUNTS = tuple(range(2, 21, 2))
RATIOS = tuple(round(0.1 * i, 1) for i in range(10))

# The seed's published figure (5 training epochs), read off its heatmap; about 6 minutes on an
# i7-7820HQ for the whole experiment.
SEED_PUBLISHED = {
    "recall_r_le_0.4_every_N": 1.0,
    "recall_r_0.9": {"N=2": 1.0, "N=10": 0.6, "N=16..20": "0.45-0.5"},
    "seconds": 360,
}


def run(memory, *, counts: Sequence[int] = COUNTS, ratios: Sequence[float] = RATIOS, trials: int = 10,
        units: int = UNITS, active: int = ACTIVE, epochs: int = 5, runs: int = 1, copies: int = 4, seed: int = 0,
        compare_untrained: bool = False, progress: bool = True) -> dict:
    """Runs the grid against `memory` (a PatternMemory of `units` units, or a Client). Returns a
    dict of (len(counts), len(ratios)) lists — recall (trained), nearest (nearest neighbour from
    the cue) and, with compare_untrained, untrained (tested before train) — with the timings."""
    from tqdm.auto import tqdm

    shape = (len(counts), len(ratios))
    results = {k: torch.zeros(shape, dtype=torch.float64) for k in ("recall", "nearest", "untrained")}
    seconds = {"update": 0.0, "train": 0.0, "test": 0.0}
    start, cpu_start = time.perf_counter(), time.process_time()
    with tqdm(total=len(counts) * trials, desc="recall experiment", unit="trial", disable=not progress) as bar:
        for i, n in enumerate(counts):
            for trial in range(trials):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + n * 1_009 + trial)
                stored = patgen.random_binary_patterns(n, units, active, generator=gen)
                cues = torch.cat([patgen.switch_off_first(stored, r) for r in ratios])  # (R·n, units), r-major
                targets = torch.arange(n).repeat(len(ratios))

                def hits(index: torch.Tensor) -> torch.Tensor:
                    return (index == targets).double().reshape(len(ratios), n).mean(-1)

                t0 = time.perf_counter()
                memory.update(stored)
                t1 = time.perf_counter()
                if compare_untrained:
                    results["untrained"][i] += hits(memory.test_pattern(cues, stored[targets]).closest_index)
                t2 = time.perf_counter()
                memory.train(epochs=epochs, runs=runs, copies=copies, seed=seed * 1_000_003 + n * 1_009 + trial)
                t3 = time.perf_counter()
                results["recall"][i] += hits(memory.test_pattern(cues, stored[targets]).closest_index)
                t4 = time.perf_counter()
                seconds["update"] += t1 - t0
                seconds["train"] += t3 - t2
                seconds["test"] += t4 - t3
                results["nearest"][i] += hits(patgen.nearest(stored, cues)[0])
                bar.update()
    out = {k: (v / trials).tolist() for k, v in results.items() if k != "untrained" or compare_untrained}
    out.update(counts=list(counts), ratios=list(ratios), trials=trials, units=units, active=active, epochs=epochs,
               runs=runs, copies=copies, seed=seed, seconds=time.perf_counter() - start,
               cpu_seconds=time.process_time() - cpu_start, seconds_by_operation=seconds)
    return out


def format_table(result: dict, key: str = "recall", *, flag_below: Optional[float] = 0.95) -> str:
    """The grid as text: one row per N, one column per r; cells below flag_below show the
    nearest-neighbour recall beside them."""
    head = "   N  " + " ".join(f"r={r:<4}" for r in result["ratios"])
    lines = [head]
    for n, row, nn_row in zip(result["counts"], result[key], result["nearest"]):
        cells = []
        for v, nn in zip(row, nn_row):
            mark = "*" if flag_below is not None and v < flag_below else " "
            cells.append(f"{v:.3f}{mark}")
        lines.append(f"{n:>4}  " + "  ".join(cells))
    return "\n".join(lines)


def heatmap(result: dict, path: Path) -> None:
    """PNG: the memory's recall grid beside nearest-neighbour lookup's, value in every cell."""
    from ..extras import require

    matplotlib = require("matplotlib", "serve", "the recall experiment's heatmap")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("recall", "PatternMemory (trained), recall"),
              ("nearest", "Exact nearest neighbour of the cue\n(the information limit)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.6), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels):
        grid = torch.tensor(result[key])
        image = ax.imshow(grid.numpy(), cmap="Reds", vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
        ax.set_xticks(range(len(result["ratios"])), [f"{r:.1f}" for r in result["ratios"]])
        ax.set_yticks(range(len(result["counts"])), [str(n) for n in result["counts"]])
        ax.set_xlabel(f"corruption r (fraction of the {result['active']} active units switched off)")
        ax.set_ylabel("patterns stored, N")
        ax.set_title(title, fontsize=10)
        for (row, col), v in zip(torch.cartesian_prod(torch.arange(grid.shape[0]), torch.arange(grid.shape[1])).tolist(),
                                 grid.reshape(-1).tolist()):
            ax.text(col, row, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 else "black")
    fig.colorbar(image, ax=axes, label="recall: fraction of cues whose recall is closest to the cued pattern")
    fig.suptitle(f"Recall vs corruption and number of patterns ({result['units']} units, {result['active']} active; "
                 f"{result['trials']} trials per cell)", fontsize=11)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    if args.url:
        from .client import Client

        memory = Client(args.url, model=args.model)
    else:
        from .memory import PatternMemory

        memory = PatternMemory(UNITS, backend=args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.max_n < 2:
        raise SystemExit(f"--max-n must be >= 2, got {args.max_n}")
    result = run(memory, counts=tuple(range(2, args.max_n + 1, 2)), trials=args.trials, epochs=args.epochs,
                 runs=args.runs, copies=args.copies, seed=args.seed,
                 compare_untrained=args.compare_untrained)
    result.update(where=args.url or "in-process", backend=args.backend if not args.url else None,
                  threads=torch.get_num_threads(), loadavg_after=os.getloadavg(),
                  seed_published=SEED_PUBLISHED)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    np.save(out / "results.npy", np.array(result["recall"]))
    np.save(out / "nearest.npy", np.array(result["nearest"]))
    heatmap(result, out / "heatmap.png")
    tqdm.write(f"recall (trained, {args.epochs} epochs); * = below 0.95:\n{format_table(result)}")
    tqdm.write(f"nearest-neighbour lookup from the cue (the information limit):\n"
               f"{format_table(result, 'nearest', flag_below=None)}")
    if args.compare_untrained:
        tqdm.write(f"untrained memory:\n{format_table(result, 'untrained')}")
    by_op = ", ".join(f"{k} {v:.2f} s" for k, v in result["seconds_by_operation"].items())
    tqdm.write(f"{result['seconds']:.2f} s in all ({by_op}; this process's CPU time {result['cpu_seconds']:.2f} s, "
               f"load average {os.getloadavg()[0]:.1f}); wrote results.json, results.npy, nearest.npy and "
               f"heatmap.png to {out}")
    return 0
