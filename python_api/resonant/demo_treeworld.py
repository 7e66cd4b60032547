"""`resonant demo treeworld`: the spatial-memory notebook, step by step, on the fused ops.

Each step of the "Developing Spatial Memory" notebook runs in order, in the notebook's own world
(its 25 printed trees; `--world random` for a random one): the sensor field; memory reads from a
grid, a coarse grid and Gaussian points; threshold reads; drive fields; hunger sampling (free,
√E temperature, location-biased); leave-one-out statistics, pruning step counts and read errors
before and after; the post-pruning regression; and a background prune with hot swap.

The notebook drew its memories without a seed, so every number that depends on a memory draw is
measured again over --range-seeds memory seeds, and each published number is printed beside our
run, our range and a verdict (inside the range or not). Figures go to PNG files and all numbers
to numbers.json in --out.

The default embedder is the offline one, built to the notebook's geometry (tree vectors = fruit
vector + name vector, about 2.6 long, unrelated words at cosine 0.8; resonant.sim.embeddings);
with MiniLM the vectors are shorter and less alike, so its numbers are not expected to match.
The notebook used bge-large-en-v1.5 (E = 1024); E = 384 here. Sampling parameters are translated
to design.md §4, where the key term is (y·z)·E^(−½)/temperature: the notebook's softmax(y·z / T)
is temperature = T·E^(−½) here (its default T = √1024 = 32 stays 32, not √384), and its location
weight β is location_temperature = 1/β.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import resonant_kernels as kernels

from .drives import DriveClassifier
from .extras import require
from .memory import SpatialMemory
from .runs import run_dir, write_text_atomic
from .treeworld_compare import NOTEBOOK, SAMPLING_RUNS, compare, exact, summary, table
from .treeworld_figures import Points, TreeWorldFigures, pca_colours

DEMO_NAME = "treeworld-demo"  # outputs: runs/treeworld-demo/ unless --out

# independent random streams of one memory seed
STREAM_GAUSSIAN, STREAM_SAMPLING, STREAM_PRUNE, STREAM_SECOND_PRUNE, STREAM_HOT_SWAP = range(5)
SEARCH_LOCATION, SEARCH_SD = (100.0, 100.0), 25.0  # the notebook's location-biased searches
NOTEBOOK_EMBED_DIM = 1024  # its default sampling temperature is √1024


def generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 16 + stream)


def say(text: str = "") -> None:
    from tqdm.auto import tqdm

    tqdm.write(text)  # plain print when no bar is shown; above the bar on a terminal


def progress_shown() -> bool:
    """Bars only on a terminal: piped output stays free of carriage-return residue."""
    return sys.stderr.isatty()


def stats(x: torch.Tensor) -> dict:
    x = x.detach().double().reshape(-1)
    return dict(min=float(x.min()), mean=float(x.mean()), max=float(x.max()), std=float(x.std()))


def make_grid(points_per_axis: int, world_size: float = 500.0) -> torch.Tensor:
    points = torch.linspace(-world_size, world_size, points_per_axis)
    return torch.cartesian_prod(points, points)


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(a - b, dim=-1)


@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    numbers: dict = field(default_factory=dict)
    world: object = None
    figures: Optional[TreeWorldFigures] = None
    classifier: Optional[DriveClassifier] = None
    grid: Optional[torch.Tensor] = None
    sensor_grid: Optional[torch.Tensor] = None
    colours: Optional[Callable] = None
    gaussian: dict = field(default_factory=dict)  # the 100-point memory of the run with figures
    pruning: dict = field(default_factory=dict)  # tensors of the pruning draw with figures
    samples: dict = field(default_factory=dict)
    verdicts: list = field(default_factory=list)

    def record(self, name: str, value) -> None:
        self.numbers[name] = value

    def new_memory(self, max_size: Optional[int] = None) -> SpatialMemory:
        return SpatialMemory(2, self.world.embed_dim, max_size=max_size, backend=self.args.backend)

    def sense(self, loc: torch.Tensor) -> torch.Tensor:
        return self.world.sense(loc)


def _fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def show(ctx: Context, name: str, value) -> None:
    """Records a number and prints it (with the published one, when there is one)."""
    ctx.record(name, value)
    published = NOTEBOOK.get(name)
    say(f"  {name:<40} {_fmt(value)}" + (f"   (notebook: {_fmt(published)})" if published is not None else ""))


# ---- the notebook's steps ----------------------------------------------------------------------

def describe_embedder(world) -> str:
    from .sim.embeddings import resolve_embedder

    c = world.config
    lengths = torch.linalg.vector_norm(world.tree_embeddings, dim=-1)
    unit = world.tree_embeddings / lengths[:, None]
    cos = (unit @ unit.T)[~torch.eye(len(world.trees), dtype=torch.bool)]
    name = resolve_embedder(c.embedder)
    what = (f"offline hashing embedder, notebook geometry (unrelated words at cosine {c.word_cosine})"
            if name == "hash" else "all-MiniLM-L6-v2 (not calibrated to the notebook: its numbers will differ)")
    return (f"embedder: {name}: {what}; E = {world.embed_dim}; tree vector length {float(lengths.min()):.2f}-"
            f"{float(lengths.max()):.2f} (notebook ~2.6); cosine between trees {float(cos.min()):.2f}-"
            f"{float(cos.max()):.2f}")


def step_world(ctx: Context) -> None:
    from .sim import TreeWorld

    a = ctx.args
    if a.world == "notebook":
        ctx.world = TreeWorld.from_notebook(embedder=a.embedder, word_cosine=a.word_cosine)
    else:
        ctx.world = TreeWorld(seed=a.world_seed, embedder=a.embedder, word_cosine=a.word_cosine)
    say("  " + describe_embedder(ctx.world))
    say(f"  {'id':>3} {'name':<10} {'fruit':<17} {'kind':<10} {'x (m)':>9} {'y (m)':>9} {'|vector|':>9}")
    for tree in ctx.world.trees:
        x, y = tree.location.tolist()
        say(f"  {tree.tree_id:>3} {tree.name:<10} {tree.fruit:<17} {'poisonous' if tree.is_poisonous else 'edible':<10}"
            f" {x:>9.2f} {y:>9.2f} {float(tree.embedding.norm()):>9.3f}")
    dist, idx = ctx.world.nearest_tree(torch.zeros(2))
    tree = ctx.world.trees[int(idx)]
    say(f"  closest tree to (0, 0): {tree.name} ({tree.fruit})")
    show(ctx, "sensor_at_origin.closest_distance", float(dist))
    ctx.record("embed_dim", ctx.world.embed_dim)
    ctx.figures = TreeWorldFigures(ctx.world, a.grid, ctx.out)


def step_sensor_field(ctx: Context) -> None:
    ctx.grid = make_grid(ctx.args.grid, ctx.world.config.world_size)
    ctx.sensor_grid = ctx.sense(ctx.grid)
    ctx.colours = pca_colours(ctx.sensor_grid)
    ctx.figures.sensor_figure(ctx.sensor_grid, ctx.colours, "01_sensor_field.png")


def written_memory(ctx: Context, loc: torch.Tensor, sd: float) -> SpatialMemory:
    memory = ctx.new_memory()
    memory.write(loc, sd, ctx.sense(loc))
    return memory


def entries(loc: torch.Tensor, label: str = "memory entry") -> Points:
    return Points(loc, label, marker=".", colour="black", size=8)


def gaussian_points(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=generator(seed, STREAM_GAUSSIAN)) * 100


def step_memory_reads(ctx: Context) -> None:
    a, fig = ctx.args, ctx.figures
    g = a.grid
    recall = written_memory(ctx, ctx.grid, 1.0).read(ctx.grid, 1.0)
    show(ctx, "recall_grid.error", stats(distance(ctx.sensor_grid, recall)))
    fig.pca_figure(recall, ctx.colours, f"Memory written on the {g}×{g} read grid, read back (σ = 1 m)",
                   "02_memory_recall.png")

    coarse_loc = make_grid(a.coarse_grid, ctx.world.config.world_size)
    coarse = written_memory(ctx, coarse_loc, 1.0).read(ctx.grid, 1.0)
    show(ctx, "coarse_grid.error_vs_sensor", stats(distance(ctx.sensor_grid, coarse)))
    fig.pca_figure(coarse, ctx.colours, f"Memory written on a coarse {a.coarse_grid}×{a.coarse_grid} grid, "
                   f"read on the {g}×{g} grid", "03_memory_coarse_grid.png", [entries(coarse_loc)])

    loc = gaussian_points(a.random_points, a.seed)
    memory = written_memory(ctx, loc, 1.0)
    read = memory.read(ctx.grid, 1.0)
    thresholded = memory.read(ctx.grid, 1.0, match_threshold=100.0)
    unmatched = thresholded.abs().sum(-1) == 0
    ctx.gaussian = dict(loc=loc, memory=memory, read=read, thresholded=thresholded, unmatched=unmatched)
    fig.pca_figure(read, ctx.colours, f"Memory of {a.random_points} places ~ N(0, (100 m)²), read everywhere",
                   "04_memory_gaussian.png", [entries(loc)])
    fig.pca_figure(thresholded, ctx.colours, "The same memory read only within 100 m of an entry",
                   "05_memory_gaussian_threshold.png", [entries(loc)], unmatched=unmatched)
    show(ctx, "gaussian.unmatched_fraction_at_threshold_100", float(unmatched.float().mean()))


def step_drives(ctx: Context) -> None:
    from .sim import POISONOUS_FRUITS

    ctx.classifier, report = DriveClassifier.train_on_fruits(ctx.world.fruit_embeddings, POISONOUS_FRUITS)
    show(ctx, "drive_classifier.loss", report.loss)
    show(ctx, "drive_classifier.accuracy", report.accuracy)
    probs = ctx.classifier(ctx.world.tree_embeddings)
    truth = torch.tensor([ctx.classifier.drive_keys["poison" if t.is_poisonous else "edible"] for t in ctx.world.trees])
    for tree, p in zip(ctx.world.trees, probs):
        best = int(p.argmax())
        say(f"  {tree.name:<10} {tree.fruit:<17} -> {ctx.classifier.drives[best]} ({float(p[best]) * 100:.2f}%)")
    show(ctx, "drive_classifier.tree_accuracy", float((probs.argmax(-1) == truth).float().mean()))
    y_hunger = ctx.classifier.key("edible")
    # the notebook's own measure, (e_apple ⊙ y)² summed; it depends on the embedding's basis
    show(ctx, "value_of_apple_for_hunger", float((ctx.world.fruit_embeddings["apple"] * y_hunger).pow(2).sum()))
    fig, gaussian = ctx.figures, ctx.gaussian
    fig.drive_figure(ctx.classifier(ctx.sensor_grid), "Which drive the sensor reading satisfies",
                     "06_drives_sensor.png")
    fig.drive_figure(ctx.classifier(gaussian["read"]), "Which drive the memory reading satisfies",
                     "07_drives_memory.png", [entries(gaussian["loc"])])
    fig.drive_figure(ctx.classifier(gaussian["thresholded"]), "Drives of the memory read within 100 m of an entry",
                     "08_drives_memory_threshold.png", [entries(gaussian["loc"])])
    fig.drive_figure(sharpen(ctx.classifier(gaussian["thresholded"]), 10.0),
                     "The same, sharpened (probabilities to the power 1/10, renormalised)",
                     "09_drives_memory_threshold_T10.png", [entries(gaussian["loc"])])


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    probs = probs ** (1.0 / temperature)
    return probs / probs.sum(-1, keepdim=True)


def sampling_runs(E: int) -> dict:
    location, location_sd = torch.tensor(SEARCH_LOCATION), torch.tensor([SEARCH_SD, SEARCH_SD])
    sqrt_notebook_e = (NOTEBOOK_EMBED_DIM / E) ** 0.5  # the notebook's T = √1024, whatever E is here
    # name: design.md §4 arguments reproducing the notebook's call (its memory.sample also divides by √1024)
    return {
        "sample.free_T1_sigma25": dict(temperature=E ** -0.5, sigma_scale=25.0),
        "sample.sqrtE_temperature": dict(temperature=sqrt_notebook_e, sigma_scale=1.0),
        "sample.location_biased": dict(temperature=E ** -0.5, location_temperature=100.0, sigma_scale=1.0,
                                       search_loc=location, search_sd=location_sd),
        "sample.memory_location_temperature_100": dict(temperature=sqrt_notebook_e, location_temperature=100.0,
                                                       sigma_scale=1.0, search_loc=location, search_sd=location_sd),
    }


def hunger_at(ctx: Context, samples: torch.Tensor) -> dict:
    edible = ctx.classifier(ctx.sense(samples))[:, ctx.classifier.drive_keys["edible"]]
    # the notebook's "deviation": std of ‖x − mean over the coordinate axis‖, kept as published
    deviation = torch.linalg.vector_norm(samples - samples.mean(-1, keepdim=True), dim=-1).std()
    return dict(deviation=float(deviation), avg_hunger=float(edible.mean()), min_hunger=float(edible.min()))


def sampling_draw(ctx: Context, seed: int, memory: Optional[SpatialMemory] = None) -> tuple[dict, dict]:
    """The hunger searches over the memory of `random_points` Gaussian places of one seed."""
    a = ctx.args
    memory = memory or written_memory(ctx, gaussian_points(a.random_points, seed), 1.0)
    y_hunger, gen = ctx.classifier.key("edible"), generator(seed, STREAM_SAMPLING)
    numbers, samples = {}, {}
    for name, kw in sampling_runs(ctx.world.embed_dim).items():
        samples[name] = memory.sample(y_hunger, num_samples=a.samples, generator=gen, **kw).reshape(a.samples, 2)
        numbers[name] = hunger_at(ctx, samples[name])
    return numbers, samples


def step_sampling(ctx: Context) -> None:
    numbers, ctx.samples = sampling_draw(ctx, ctx.args.seed, ctx.gaussian["memory"])
    probs = ctx.classifier(ctx.sensor_grid)
    search = Points(torch.tensor(SEARCH_LOCATION), f"search location ({SEARCH_LOCATION[0]:.0f}, "
                    f"{SEARCH_LOCATION[1]:.0f}) m, σ {SEARCH_SD:.0f} m", marker="s", colour="white", size=110,
                    edge="black")
    for i, (name, words) in enumerate(SAMPLING_RUNS.items()):
        show(ctx, name, numbers[name])
        extra = [entries(ctx.gaussian["loc"]),
                 Points(ctx.samples[name], f"{ctx.args.samples} sampled places", marker="^", colour="orange", size=40,
                        edge="black")]
        if "search_loc" in sampling_runs(ctx.world.embed_dim)[name]:
            extra.append(search)
        ctx.figures.drive_figure(probs, f"Where the memory says food is: {words}",
                                 f"{10 + i:02d}_{name.replace('.', '_')}.png", extra)


def pruning_draw(ctx: Context, seed: int, keep: bool = False) -> tuple[dict, dict]:
    """The notebook's pruning section on one memory draw of `prune_points` places ~ N(0, (100 m)²)."""
    a, out = ctx.args, {}
    loc = torch.randn(a.prune_points, 2, generator=generator(seed, STREAM_PRUNE)) * 100
    values = ctx.sense(loc)
    memory = ctx.new_memory(max_size=1024)
    memory.write(loc, 10.0, values)

    _, error, deps = memory.leave_one_out(match_threshold=25.0)
    out["leave_one_out.error"] = stats(error)
    out["leave_one_out.dependencies"] = stats(deps)
    candidates = {}
    for max_error in (0.05, 0.01):
        keep_mask = kernels.prune_mask(memory.loc, memory.sd, memory.values, max_error=max_error,
                                       match_threshold=25.0, max_steps=1, backend=a.backend)
        candidates[max_error] = ~keep_mask
        out[f"prune.candidates_at_{max_error}"] = int((~keep_mask).sum())

    before = memory.read(ctx.grid, 10.0, match_threshold=25.0)
    removed = []
    for _ in range(10):  # the notebook's recursive prune, one step at a time to log each count
        removed.append(memory.prune(0.05, match_threshold=25.0, max_steps=1))
        if removed[-1] == 0:
            break
    out["prune.removed_per_step"] = removed
    out["prune.final_size"] = len(memory)
    kept = torch.isin(torch.arange(len(loc)), memory.ids)
    after = memory.read(ctx.grid, 10.0, match_threshold=25.0)
    out["prune.read_change"] = stats(distance(after, before))
    out["prune.error_vs_sensor_before"] = stats(distance(before, ctx.sensor_grid))
    out["prune.error_vs_sensor_after"] = stats(distance(after, ctx.sensor_grid))

    losses = memory.regress(ctx.grid, 10.0, before, steps=a.regress_steps, lr=1e-3, match_threshold=25.0,
                            progress=keep and progress_shown())
    out["regress.loss_every_10_steps"] = losses[::10]
    regressed = memory.read(ctx.grid, 10.0, match_threshold=25.0)
    out["regress.read_change"] = stats(distance(regressed, before))
    out["regress.error_vs_sensor_after"] = stats(distance(regressed, ctx.sensor_grid))

    second = torch.randn(a.prune_points, 2, generator=generator(seed, STREAM_SECOND_PRUNE)) * 100
    fresh = ctx.new_memory(max_size=1024)
    fresh.write(second, 10.0, ctx.sense(second))
    fresh.prune(0.05, match_threshold=25.0, max_steps=10)
    out["memory_prune.final_size"] = len(fresh)
    tensors = dict(loc=loc, values=values, loo_error=error, candidates=candidates[0.05], kept=kept, before=before,
                   after=after, regressed=regressed, losses=losses) if keep else {}
    return out, tensors


def step_pruning(ctx: Context) -> None:
    numbers, ctx.pruning = pruning_draw(ctx, ctx.args.seed, keep=True)
    for name, value in numbers.items():
        show(ctx, name, value)
    hot_swap(ctx)
    pruning_figures(ctx)


def hot_swap(ctx: Context) -> None:
    """The notebook's proposal: observations written while a prune runs are all kept."""
    loc, values = ctx.pruning["loc"], ctx.pruning["values"]
    swap = ctx.new_memory()
    swap.write(loc, 10.0, values)
    handle = swap.prune(0.05, match_threshold=25.0, max_steps=10, background=True)
    extra = torch.randn(32, 2, generator=generator(ctx.args.seed, STREAM_HOT_SWAP)) * 100
    for i in range(extra.shape[0]):
        swap.write(extra[i], 10.0, ctx.sense(extra[i]))
    removed = handle.wait()
    kept_new = int((swap.ids >= len(loc)).sum())
    show(ctx, "background_prune", dict(removed=removed, written_meanwhile=extra.shape[0], kept_of_those=kept_new,
                                       final_size=len(swap)))


def pruning_figures(ctx: Context) -> None:
    fig, p = ctx.figures, ctx.pruning
    kept_pts = entries(p["loc"][p["kept"]], "entry kept by pruning")
    removed_pts = Points(p["loc"][~p["kept"]], "entry removed by pruning", marker="x", colour="black", size=10)
    cand = Points(p["loc"][p["candidates"]], "candidate at max error 0.05 (first step)", marker="o",
                  colour="none", size=40, edge="red")
    fig.entries_figure(p["loc"], p["loo_error"], f"Leave-one-out error of each of the {len(p['loc'])} memory entries",
                       "‖entry read from the others − entry‖ (embedding units, log scale)", "14_leave_one_out.png",
                       [cand], note="match threshold 25 m, σ = 10 m")
    fig.pca_figure(p["before"], ctx.colours, "Memory read before pruning (within 25 m of an entry)",
                   "15_before_pruning.png", [entries(p["loc"])], unmatched=p["before"].abs().sum(-1) == 0)
    fig.pca_figure(p["after"], ctx.colours, f"Memory read after pruning to {int(p['kept'].sum())} entries",
                   "16_after_pruning.png", [kept_pts, removed_pts], unmatched=p["after"].abs().sum(-1) == 0)
    fig.scalar_figure(distance(p["after"], p["before"]), "How much pruning changed the memory read",
                      "‖read after − read before‖ (embedding units, log scale)", "17_prune_read_change.png", log=True,
                      extra=[kept_pts, removed_pts], note="grey: exactly unchanged")
    fig.error_figure(distance(p["before"], ctx.sensor_grid), distance(p["after"], ctx.sensor_grid),
                     "pruning", "18_prune_error_vs_sensor.png", [removed_pts])
    fig.scalar_figure(distance(p["regressed"], p["before"]), "Read change after pruning and regression",
                      "‖read after regression − read before pruning‖ (embedding units, log scale)",
                      "19_regress_read_change.png", log=True, extra=[kept_pts], note="grey: exactly unchanged")
    fig.loss_figure(p["losses"], NOTEBOOK["regress.loss_every_10_steps"], 10, "20_regression_loss.png")


def step_ranges(ctx: Context) -> None:
    """Every memory-draw number again over range seeds 0..N-1 (the notebook's draw was unseeded)."""
    from tqdm.auto import tqdm

    a = ctx.args
    draws = []
    for seed in tqdm(range(a.range_seeds), desc="memory seeds", unit="seed", disable=not progress_shown()):
        if seed == a.seed:
            draws.append(ctx.numbers)
            continue
        numbers, _ = pruning_draw(ctx, seed)
        numbers.update(sampling_draw(ctx, seed)[0])
        draws.append(numbers)
    ctx.verdicts = [
        exact("distance from (0, 0) to the closest tree (m)", ctx.numbers["sensor_at_origin.closest_distance"],
              NOTEBOOK["sensor_at_origin.closest_distance"], 0.001),
        exact("smallest grid read error = sensor at (500, 500) m", ctx.numbers["prune.error_vs_sensor_before"]["min"],
              NOTEBOOK["prune.error_vs_sensor_before"]["min"], 0.05),
        exact("trees the drive classifier gets right (fraction)", ctx.numbers["drive_classifier.tree_accuracy"],
              NOTEBOOK["drive_classifier.tree_accuracy"], 0.0),
    ] + compare(ctx.numbers, draws)
    ctx.record("ranges_over_seeds", list(range(a.range_seeds)))
    say()
    for line in table(ctx.verdicts, a.seed, a.range_seeds) + [""] + summary(ctx.verdicts):
        say(line)


def step_overview(ctx: Context) -> None:
    fig, p, g = ctx.figures, ctx.pruning, ctx.gaussian
    biased = "sample.location_biased"
    search = Points(torch.tensor(SEARCH_LOCATION), "search location", marker="s", colour="white", size=110,
                    edge="black")
    removed_pts = Points(p["loc"][~p["kept"]], "entry removed by pruning", marker="x", colour="black", size=10)
    panels = [
        lambda f, ax: fig.pca_panel(ax, ctx.sensor_grid, ctx.colours, "What the sensor reads at each place"),
        lambda f, ax: fig.pca_panel(ax, g["thresholded"], ctx.colours,
                                    f"Memory of {len(g['loc'])} places, read within 100 m", [entries(g["loc"])],
                                    unmatched=g["unmatched"]),
        lambda f, ax: fig.drive_panel(ax, ctx.classifier(ctx.sensor_grid), "Searching the memory for food near a place",
                                      [Points(ctx.samples[biased], "sampled place", marker="^", colour="orange",
                                              size=40, edge="black"), search]),
        lambda f, ax: fig.entries_panel(f, ax, p["loc"], p["loo_error"], "Leave-one-out error per memory entry",
                                        "error (embedding units, log scale)"),
        lambda f, ax: fig.scalar_panel(f, ax, distance(p["after"], p["before"]),
                                       f"Read change from pruning {len(p['loc'])} → {int(p['kept'].sum())} entries",
                                       "‖read after − before‖ (log scale; grey: unchanged)", log=True,
                                       extra=[removed_pts]),
        lambda f, ax: fig.scalar_panel(f, ax, distance(p["after"], ctx.sensor_grid),
                                       "Read error vs the sensor after pruning", "‖read − sensor‖ (log scale)",
                                       log=True, cmap="magma"),
    ]
    fig.overview(panels, "The spatial-memory notebook's tree world on resonant's fused ops", "overview.png")


STEPS = (
    ("world and sensor", step_world),
    ("sensor field", step_sensor_field),
    ("memory reads", step_memory_reads),
    ("drive classifier and fields", step_drives),
    ("hunger sampling", step_sampling),
    ("leave-one-out, pruning, regression", step_pruning),
    ("ranges over memory seeds and verdicts", step_ranges),
    ("overview figure", step_overview),
)


def check_args(a) -> None:
    for name in ("grid", "coarse_grid", "random_points", "prune_points", "samples"):
        if getattr(a, name) < 2:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 2, got {getattr(a, name)}")
    for name in ("regress_steps", "range_seeds"):
        if getattr(a, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if not 0.0 <= a.word_cosine < 1.0:
        raise SystemExit(f"--word-cosine must be in [0, 1), got {a.word_cosine}")


def run(args) -> int:
    from tqdm.auto import tqdm

    check_args(args)
    # everything the demo needs, checked before the first step
    require("gymnasium", "rl", "resonant demo treeworld")
    require("matplotlib", "rl", "resonant demo treeworld")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, out)
    start = time.perf_counter()
    for title, step in tqdm(STEPS, desc="treeworld demo", unit="step", disable=not progress_shown()):
        say(f"== {title}")
        began = time.perf_counter()
        step(ctx)
        say(f"   ({time.perf_counter() - began:.1f} s)")
    result = dict(
        embedder=describe_embedder(ctx.world),
        numbers=ctx.numbers,
        comparison=[v.as_dict() for v in ctx.verdicts],
        notebook=NOTEBOOK,
        figures=ctx.figures.files,
        settings={k: v for k, v in vars(args).items() if k != "func"},
        seconds=time.perf_counter() - start,
    )
    write_text_atomic(out / "numbers.json", json.dumps(result, indent=2) + "\n")
    say(f"wrote {len(ctx.figures.files)} figures and numbers.json to {out} in {result['seconds']:.0f} s")
    return 0


def add_subcommand(subparsers) -> None:
    from .cli import subgroup
    from .sim.embeddings import OFFLINE_WORD_COSINE

    p = subgroup(subparsers, "demo").add_parser("treeworld", help="the tree-world spatial-memory notebook",
                                                description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(run_dir(DEMO_NAME)), metavar="DIR",
                   help="output folder for PNGs and numbers.json, under the current directory")
    p.add_argument("--world", default="notebook", choices=("notebook", "random"),
                   help="the notebook's 25 printed trees, or a random world from --world-seed")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the random world (--world random)")
    p.add_argument("--seed", type=int, default=0, help="memory seed of the run whose figures are drawn")
    p.add_argument("--range-seeds", type=int, default=10,
                   help="memory seeds 0..N-1 over which each number's range is measured (0: no ranges)")
    p.add_argument("--grid", type=int, default=100, help="points per axis of the read grid (notebook: 100)")
    p.add_argument("--coarse-grid", type=int, default=10, help="points per axis of the coarse training grid")
    p.add_argument("--random-points", type=int, default=100, help="Gaussian training points")
    p.add_argument("--prune-points", type=int, default=1024, help="memory size before pruning (notebook: 1024)")
    p.add_argument("--regress-steps", type=int, default=100, help="Adam steps of the post-pruning regression")
    p.add_argument("--samples", type=int, default=250, help="samples per hunger search")
    p.add_argument("--embedder", default="hash", choices=("hash", "minilm", "auto"),
                   help="hash: offline, built to the notebook's vector geometry; minilm: all-MiniLM-L6-v2 "
                        "(the minilm extra); auto: minilm when installed")
    p.add_argument("--word-cosine", type=float, default=OFFLINE_WORD_COSINE,
                   help="offline embedder: cosine between two unrelated words")
    p.add_argument("--backend", default="auto", help="resonant_kernels backend for every op")
    p.set_defaults(func=run)
