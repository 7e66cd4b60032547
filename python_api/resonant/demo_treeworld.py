"""`resonant demo treeworld`: the spatial-memory notebook, step by step, on the fused ops.

Each step of the notebook (shared/seeds/tree-world-spatial-memory-notebook.txt) runs in order:
the sensor field; memory reads from a 100×100 grid, a 10×10 grid and Gaussian samples; threshold
reads; drive fields; hunger sampling (free, √E temperature, location-biased); leave-one-out
statistics, pruning step counts and read errors before and after; the post-pruning regression;
and a background prune with hot swap. Figures go to PNG files and the numbers to numbers.json in
runs/treeworld-demo/ (or --out); every number is printed beside the one the notebook published.

The world is ours, not the notebook's (random trees from --seed, embeddings from the offline
embedder or MiniLM instead of bge-large-en-v1.5, E = 384 instead of 1024), so numbers that depend
on the particular trees differ; the ones that measure the memory (recall error, pruning counts,
relative errors) should land near the published ones. Sampling parameters are translated to
design.md §4, where the key term is (y·z)·E^(−½)/temperature: the notebook's softmax(y·z / T)
is temperature = T·E^(−½) here, and its location weight β is location_temperature = 1/β.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import resonant_kernels as kernels

from .drives import DriveClassifier
from .extras import require
from .runs import add_out_argument, run_dir, write_text_atomic
from .memory import SpatialMemory

DEMO_NAME = "treeworld-demo"  # outputs: runs/treeworld-demo/ unless --out

# Published in the notebook (its world, bge-large embeddings, E = 1024).
NOTEBOOK = {
    "sensor_at_origin.closest_distance": 23.07,
    "recall_100x100.error": dict(min=0.0, mean=0.0, max=0.0, std=0.0),
    "drive_classifier.accuracy": 1.0,
    "drive_classifier.loss": 0.30583107471466064,
    "drive_classifier.tree_accuracy": 1.0,
    "value_of_apple_for_hunger": 1.2691352367401123,
    "sample.free_T1_sigma25": dict(deviation=53.28778076171875, avg_hunger=0.9949816465377808,
                                   min_hunger=0.4727088510990143),
    "sample.sqrtE_temperature": dict(deviation=70.107177734375, avg_hunger=0.7755414843559265,
                                     min_hunger=0.12780991196632385),
    "sample.location_biased": dict(deviation=32.35943603515625, avg_hunger=0.9999754428863525,
                                   min_hunger=0.9981056451797485),
    "sample.memory_location_temperature_100": dict(deviation=31.077287673950195, avg_hunger=0.6531907916069031,
                                                   min_hunger=0.11184682697057724),
    "leave_one_out.error": dict(min=0.0016184506239369512, mean=0.12764671444892883, max=4.752317905426025,
                                std=0.2841464579105377),
    "leave_one_out.dependencies": dict(min=0.0, mean=16.591796875, max=45.0, std=10.440792083740234),
    "prune.candidates_at_0.05": 273,
    "prune.candidates_at_0.01": 7,
    "prune.removed_per_step": [273, 127, 75, 28, 6, 6, 0],
    "prune.final_size": 509,
    "prune.read_change": dict(min=0.0, mean=0.010287650860846043, max=0.6817408204078674, std=0.04173653572797775),
    "prune.error_vs_sensor_before": dict(min=2.1720796209291453e-15, mean=0.4647279381752014, max=6.12962007522583,
                                         std=0.8044621348381042),
    "prune.error_vs_sensor_after": dict(min=2.1720796209291453e-15, mean=0.4682459533214569, max=6.12962007522583,
                                        std=0.8031671643257141),
    "regress.loss_every_10_steps": [0.0018476002151146531, 0.0009380565606988966, 0.000766694953199476,
                                    0.0006861960282549262, 0.000640565063804388, 0.0006383216823451221,
                                    0.0006177577306516469, 0.0006020850269123912, 0.0005893675261177123,
                                    0.0005786488763988018],
    "regress.read_change": dict(min=0.0, mean=0.005942051764577627, max=0.517316460609436, std=0.02310255914926529),
    "regress.error_vs_sensor_after": dict(min=2.1720796209291453e-15, mean=0.46631109714508057,
                                          max=6.12962007522583, std=0.8038018941879272),
    "memory_prune.final_size": 558,
}


@dataclass
class Context:
    args: object
    out: Path
    numbers: dict = field(default_factory=dict)
    world: object = None
    classifier: Optional[DriveClassifier] = None
    grid: Optional[torch.Tensor] = None
    sensor_grid: Optional[torch.Tensor] = None
    pca: Optional[Callable] = None
    memory: Optional[SpatialMemory] = None  # the memory the sampling steps search (the Gaussian one)
    gaussian_read: Optional[torch.Tensor] = None
    gaussian_read_thresholded: Optional[torch.Tensor] = None
    figures: list = field(default_factory=list)

    def record(self, name: str, value) -> None:
        self.numbers[name] = value
        published = NOTEBOOK.get(name)
        tqdm_write(f"  {name:<42} ours {_fmt(value):<60} notebook {_fmt(published) if published is not None else '-'}")

    def new_memory(self, max_size: Optional[int] = None) -> SpatialMemory:
        return SpatialMemory(2, self.world.embed_dim, max_size=max_size, backend=self.args.backend)


def tqdm_write(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text)


def _fmt(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def stats(x: torch.Tensor) -> dict:
    x = x.detach().double().reshape(-1)
    return dict(min=float(x.min()), mean=float(x.mean()), max=float(x.max()), std=float(x.std()))


def make_grid(points_per_axis: int, world_size: float = 500.0) -> torch.Tensor:
    points = torch.linspace(-world_size, world_size, points_per_axis)
    return torch.cartesian_prod(points, points)


# ---- figures ---------------------------------------------------------------------------------

def pca_colors(values: torch.Tensor, seed: int = 42) -> Callable:
    """An RGB map (the notebook's 3-component PCA over ≤ 4000 readings), scaled to [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    subset = values[torch.randperm(values.shape[0], generator=gen)[:4000]].double()
    mean = subset.mean(0)
    _, _, vt = torch.linalg.svd(subset - mean, full_matrices=False)
    basis = vt[:3].T
    rgb = (subset - mean) @ basis
    lo, hi = rgb.min(0).values, rgb.max(0).values
    return lambda v: ((((v.detach().double() - mean) @ basis) - lo) / (hi - lo + 1e-8)).clamp(0, 1)


def _plot(ctx: Context, rgb: torch.Tensor, title: str, filename: str, points=None, marker_at=None) -> None:
    require("matplotlib", "rl", "resonant demo treeworld").use("Agg")
    import matplotlib.pyplot as plt

    side = int(round(math.sqrt(rgb.shape[0])))
    ws = ctx.world.config.world_size
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(rgb.reshape(side, side, 3).numpy(), extent=[-ws, ws, -ws, ws], origin="lower",
              interpolation="nearest", aspect="equal")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    for tree in ctx.world.trees:
        # the grid's first coordinate runs along image rows, so a tree at (x, y) is drawn at (y, x)
        x, y = tree.location.tolist()
        ax.scatter(y, x, c="red" if tree.is_poisonous else "green", marker="x" if tree.is_poisonous else "o", s=60)
    if points is not None:
        ax.scatter(points[:, 1], points[:, 0], c="orange", marker="^", s=30, edgecolors="k", linewidths=0.5)
    if marker_at is not None:
        ax.scatter([marker_at[1]], [marker_at[0]], c="blue", marker="s", s=80, edgecolors="k")
    path = ctx.out / filename
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    ctx.figures.append(str(path))


def plot_field(ctx: Context, values: torch.Tensor, title: str, filename: str, **kw) -> None:
    _plot(ctx, ctx.pca(values), f"{title} (PCA colours)", filename, **kw)


def plot_drives(ctx: Context, values: torch.Tensor, title: str, filename: str, temperature: float = 1.0) -> None:
    probs = ctx.classifier(values)
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
        probs = probs / probs.sum(-1, keepdim=True)
    colours = torch.eye(3, dtype=probs.dtype)  # poison red, edible green, neutral blue
    _plot(ctx, (probs @ colours).double(), f"{title} (red poison, green food, blue neutral)", filename)


# ---- the notebook's steps ----------------------------------------------------------------------

def step_world(ctx: Context) -> None:
    from .sim import TreeWorld

    ctx.world = TreeWorld(seed=ctx.args.seed, embedder=ctx.args.embedder)
    for tree in ctx.world.trees:
        tqdm_write(f"  tree {tree.tree_id:>2} {tree.name:<10} {tree.fruit:<17} {[round(v, 1) for v in tree.location.tolist()]}")
    dist, idx = ctx.world.nearest_tree(torch.zeros(2))
    tree = ctx.world.trees[int(idx)]
    tqdm_write(f"  closest tree to (0, 0): {tree.name} ({tree.fruit})")
    ctx.record("sensor_at_origin.closest_distance", float(dist))
    ctx.record("embed_dim", ctx.world.embed_dim)


def step_sensor_field(ctx: Context) -> None:
    ctx.grid = make_grid(ctx.args.grid)
    ctx.sensor_grid = ctx.world.sense(ctx.grid)
    ctx.pca = pca_colors(ctx.sensor_grid)
    plot_field(ctx, ctx.sensor_grid, "Sensor field", "01_sensor_field.png")


def memory_field(ctx: Context, train_loc: torch.Tensor, sd: float = 1.0, match_threshold=None) -> torch.Tensor:
    memory = ctx.new_memory()
    memory.write(train_loc, sd, ctx.world.sense(train_loc))
    ctx.memory = memory
    return memory.read(ctx.grid, sd, match_threshold=match_threshold)


def step_memory_reads(ctx: Context) -> None:
    recall = memory_field(ctx, ctx.grid)
    plot_field(ctx, recall, f"Memory field, trained on the {ctx.args.grid}x{ctx.args.grid} grid", "02_memory_recall.png")
    ctx.record("recall_100x100.error", stats(torch.linalg.vector_norm(ctx.sensor_grid - recall, dim=-1)))

    coarse = memory_field(ctx, make_grid(ctx.args.coarse_grid))
    plot_field(ctx, coarse, f"Memory field, trained on a {ctx.args.coarse_grid}x{ctx.args.coarse_grid} grid",
               "03_memory_coarse_grid.png")
    ctx.record("coarse_grid.error_vs_sensor", stats(torch.linalg.vector_norm(ctx.sensor_grid - coarse, dim=-1)))

    gen = torch.Generator().manual_seed(ctx.args.seed)
    gaussian_loc = torch.randn(ctx.args.random_points, 2, generator=gen) * 100
    ctx.gaussian_read = memory_field(ctx, gaussian_loc)
    plot_field(ctx, ctx.gaussian_read, f"Memory field, {ctx.args.random_points} points ~ N(0, 100²)",
               "04_memory_gaussian.png")
    ctx.gaussian_read_thresholded = memory_field(ctx, gaussian_loc, match_threshold=100.0)
    plot_field(ctx, ctx.gaussian_read_thresholded, "Memory field, Gaussian points, match_threshold=100",
               "05_memory_gaussian_threshold.png")
    ctx.record("gaussian.unmatched_fraction_at_threshold_100",
               float((ctx.gaussian_read_thresholded.abs().sum(-1) == 0).float().mean()))


def step_drives(ctx: Context) -> None:
    from .sim import POISONOUS_FRUITS

    ctx.classifier, report = DriveClassifier.train_on_fruits(ctx.world.fruit_embeddings, POISONOUS_FRUITS)
    ctx.record("drive_classifier.loss", report.loss)
    ctx.record("drive_classifier.accuracy", report.accuracy)
    probs = ctx.classifier(ctx.world.tree_embeddings)
    truth = torch.tensor([ctx.classifier.drive_keys["poison" if t.is_poisonous else "edible"] for t in ctx.world.trees])
    for tree, p in zip(ctx.world.trees, probs):
        best = int(p.argmax())
        tqdm_write(f"  {tree.name:<10} {tree.fruit:<17} -> {ctx.classifier.drives[best]} ({float(p[best]) * 100:.2f}%)")
    ctx.record("drive_classifier.tree_accuracy", float((probs.argmax(-1) == truth).float().mean()))
    y_hunger = ctx.classifier.key("edible")
    # the notebook's own measure: (e_apple * y)² summed
    ctx.record("value_of_apple_for_hunger", float((ctx.world.fruit_embeddings["apple"] * y_hunger).pow(2).sum()))
    plot_drives(ctx, ctx.sensor_grid, "Drives from sensors", "06_drives_sensor.png")
    plot_drives(ctx, ctx.gaussian_read, "Drives from memory", "07_drives_memory.png")
    plot_drives(ctx, ctx.gaussian_read_thresholded, "Drives from memory, threshold", "08_drives_memory_threshold.png")
    plot_drives(ctx, ctx.gaussian_read_thresholded, "Drives from memory, threshold, temperature 10",
                "09_drives_memory_threshold_T10.png", temperature=10)


def hunger_at(ctx: Context, samples: torch.Tensor) -> dict:
    edible = ctx.classifier(ctx.world.sense(samples))[:, ctx.classifier.drive_keys["edible"]]
    # the notebook's "deviation": std of ‖x − mean over the coordinate axis‖, kept as published
    deviation = torch.linalg.vector_norm(samples - samples.mean(-1, keepdim=True), dim=-1).std()
    return dict(deviation=float(deviation), avg_hunger=float(edible.mean()), min_hunger=float(edible.min()))


def step_sampling(ctx: Context) -> None:
    memory, E = ctx.memory, ctx.world.embed_dim
    y_hunger = ctx.classifier.key("edible")
    n, gen = ctx.args.samples, torch.Generator().manual_seed(ctx.args.seed)
    location, location_sd = torch.tensor([100.0, 100.0]), torch.tensor([25.0, 25.0])
    runs = {
        # name: (design.md §4 arguments, the notebook's call they reproduce)
        "sample.free_T1_sigma25": dict(temperature=E ** -0.5, sigma_scale=25.0),
        "sample.sqrtE_temperature": dict(temperature=1.0, sigma_scale=1.0),
        "sample.location_biased": dict(temperature=E ** -0.5, location_temperature=100.0, sigma_scale=1.0,
                                       search_loc=location, search_sd=location_sd),
        "sample.memory_location_temperature_100": dict(temperature=1.0, location_temperature=100.0, sigma_scale=1.0,
                                                       search_loc=location, search_sd=location_sd),
    }
    for i, (name, kw) in enumerate(runs.items()):
        samples = memory.sample(y_hunger, num_samples=n, generator=gen, **kw).reshape(n, 2)
        ctx.record(name, hunger_at(ctx, samples))
        plot_field(ctx, ctx.sensor_grid, name, f"{10 + i:02d}_{name.replace('.', '_')}.png", points=samples,
                   marker_at=location if "search_loc" in kw else None)


def step_pruning(ctx: Context) -> None:
    a = ctx.args
    gen = torch.Generator().manual_seed(a.seed + 1)
    loc = torch.randn(a.prune_points, 2, generator=gen) * 100
    values = ctx.world.sense(loc)
    memory = ctx.new_memory(max_size=1024)
    memory.write(loc, 10.0, values)

    _, error, deps = memory.leave_one_out(match_threshold=25.0)
    ctx.record("leave_one_out.error", stats(error))
    ctx.record("leave_one_out.dependencies", stats(deps))
    for max_error in (0.05, 0.01):
        keep = kernels.prune_mask(memory.loc, memory.sd, memory.values, max_error=max_error, match_threshold=25.0,
                                  max_steps=1, backend=a.backend)
        ctx.record(f"prune.candidates_at_{max_error}", int((~keep).sum()))

    before = memory.read(ctx.grid, 10.0, match_threshold=25.0)
    removed = []
    for _ in range(10):  # the notebook's recursive prune, one step at a time to log each count
        removed.append(memory.prune(0.05, match_threshold=25.0, max_steps=1))
        if removed[-1] == 0:
            break
    ctx.record("prune.removed_per_step", removed)
    ctx.record("prune.final_size", len(memory))
    after = memory.read(ctx.grid, 10.0, match_threshold=25.0)
    ctx.record("prune.read_change", stats(torch.linalg.vector_norm(after - before, dim=-1)))
    ctx.record("prune.error_vs_sensor_before", stats(torch.linalg.vector_norm(before - ctx.sensor_grid, dim=-1)))
    ctx.record("prune.error_vs_sensor_after", stats(torch.linalg.vector_norm(after - ctx.sensor_grid, dim=-1)))
    plot_field(ctx, before, "Before pruning", "14_before_pruning.png")
    plot_field(ctx, after, "After pruning", "15_after_pruning.png")
    plot_field(ctx, after - before, "Read change after pruning", "16_prune_read_change.png")
    plot_field(ctx, ctx.sensor_grid - after, "Error vs sensor after pruning", "17_prune_error_vs_sensor.png")

    losses = memory.regress(ctx.grid, 10.0, before, steps=a.regress_steps, lr=1e-3, match_threshold=25.0,
                            progress=True)
    ctx.record("regress.loss_every_10_steps", losses[::10])
    regressed = memory.read(ctx.grid, 10.0, match_threshold=25.0)
    ctx.record("regress.read_change", stats(torch.linalg.vector_norm(regressed - before, dim=-1)))
    ctx.record("regress.error_vs_sensor_after", stats(torch.linalg.vector_norm(regressed - ctx.sensor_grid, dim=-1)))
    plot_field(ctx, regressed - before, "Read change after pruning + regression", "18_regress_read_change.png")

    fresh = ctx.new_memory(max_size=1024)
    fresh.write(loc, 10.0, values)
    fresh.prune(0.05, match_threshold=25.0, max_steps=10)
    ctx.record("memory_prune.final_size", len(fresh))

    # the hot swap the notebook proposes: observations written while the prune runs are all kept
    swap = ctx.new_memory()
    swap.write(loc, 10.0, values)
    handle = swap.prune(0.05, match_threshold=25.0, max_steps=10, background=True)
    extra = torch.randn(32, 2, generator=gen) * 100
    for i in range(extra.shape[0]):
        swap.write(extra[i], 10.0, ctx.world.sense(extra[i]))
    removed_bg = handle.wait()
    new_kept = int((swap.ids >= len(loc)).sum())
    ctx.record("background_prune", dict(removed=removed_bg, written_meanwhile=extra.shape[0], kept_of_those=new_kept,
                                        final_size=len(swap)))


STEPS = (
    ("world and sensor", step_world),
    ("sensor field", step_sensor_field),
    ("memory reads", step_memory_reads),
    ("drive classifier and fields", step_drives),
    ("hunger sampling", step_sampling),
    ("leave-one-out, pruning, regression", step_pruning),
)


def run(args) -> int:
    from tqdm.auto import tqdm

    require("gymnasium", "rl", "resonant demo treeworld")
    require("matplotlib", "rl", "resonant demo treeworld")
    out = run_dir(DEMO_NAME, args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, out)
    start = time.perf_counter()
    for title, step in tqdm(STEPS, desc="treeworld demo", unit="step"):
        tqdm_write(f"== {title}")
        step(ctx)
    result = dict(
        numbers=ctx.numbers,
        notebook=NOTEBOOK,
        figures=ctx.figures,
        settings={k: v for k, v in vars(args).items() if k != "func"},
        seconds=time.perf_counter() - start,
    )
    write_text_atomic(out / "numbers.json", json.dumps(result, indent=2) + "\n")
    tqdm_write(f"wrote {len(ctx.figures)} figures and numbers.json to {out}")
    return 0


def add_subcommand(subparsers) -> None:
    from .cli import subgroup

    p = subgroup(subparsers, "demo").add_parser("treeworld", help="the tree-world spatial-memory notebook",
                                                description=__doc__.splitlines()[0])
    add_out_argument(p, DEMO_NAME, "the PNG figures and numbers.json")
    p.add_argument("--grid", type=int, default=100, help="points per axis of the read grid (notebook: 100)")
    p.add_argument("--coarse-grid", type=int, default=10, help="points per axis of the coarse training grid")
    p.add_argument("--random-points", type=int, default=100, help="Gaussian training points")
    p.add_argument("--prune-points", type=int, default=1024, help="memory size before pruning (notebook: 1024)")
    p.add_argument("--regress-steps", type=int, default=100, help="Adam steps of the post-pruning regression")
    p.add_argument("--samples", type=int, default=250, help="samples per hunger search")
    # seed 4: the first world of TreeWorldConfig whose nearest tree stands near the origin (6 m), like the
    # notebook's (23 m), where the Gaussian memories of the notebook are written
    p.add_argument("--seed", type=int, default=4, help="world and data seed")
    p.add_argument("--embedder", default="auto", choices=("auto", "hash", "minilm"))
    p.add_argument("--backend", default="auto", help="resonant_kernels backend for every op")
    p.set_defaults(func=run)
