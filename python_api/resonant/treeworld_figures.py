"""Figures of the tree-world demo, readable without the notebook.

Every map shows the world in metres (x to the right, y up), the trees with one colour per fruit
and a shape per kind (circle edible, cross poisonous), and a legend for every marker. Fields of
vectors are drawn either as PCA colours (similar colour = similar reading; the explanation sits
under the title) or as a scalar with a colour bar that names the quantity.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

DPI = 100
SINGLE = (10.0, 10.0)  # about 900 px wide once cropped to the map, its colour bar and the legend under it
NO_VALUE = "#e8e8e8"  # log-scale maps: exact zeros (nothing changed) are drawn in this grey
TREE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
                "#9467bd", "#d62728", "#000000", "#aec7e8")
VECTOR_NORM_UNIT = "embedding units"  # sensor vectors are sums of word vectors: no physical unit


def matplotlib_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pca_colours(values: torch.Tensor, seed: int = 42) -> Callable[[torch.Tensor], torch.Tensor]:
    """An RGB map of vectors (the notebook's 3-component PCA over ≤ 4000 readings), in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    subset = values[torch.randperm(values.shape[0], generator=gen)[:4000]].double()
    mean = subset.mean(0)
    _, _, vt = torch.linalg.svd(subset - mean, full_matrices=False)
    basis = vt[:3].T
    rgb = (subset - mean) @ basis
    lo, hi = rgb.min(0).values, rgb.max(0).values
    return lambda v: ((((v.detach().double() - mean) @ basis) - lo) / (hi - lo + 1e-8)).clamp(0, 1)


@dataclass
class Points:
    """Extra markers on a map: locations (N, 2) in metres and how the legend names them."""
    loc: torch.Tensor
    label: str
    marker: str = "."
    colour: str = "black"
    size: float = 6.0
    edge: Optional[str] = None


class TreeWorldFigures:
    """Draws maps over the demo's read grid (side × side points spanning ±world_size)."""

    def __init__(self, world, grid_side: int, out: Path):
        self.world, self.side, self.out = world, grid_side, Path(out)
        self.half = float(world.config.world_size)
        self.files: list[str] = []

    # ---- building blocks ---------------------------------------------------------------------

    def image(self, per_point: torch.Tensor):
        """(side², C) values on the grid -> (side, side, C) array with rows along y (imshow, origin lower)."""
        arr = per_point.detach().reshape(self.side, self.side, -1)  # [x index, y index, C]
        return arr.transpose(0, 1).double().numpy()

    def new(self, ncols: int = 1, width: float = None, height: float = SINGLE[1]):
        plt = matplotlib_pyplot()
        fig, axes = plt.subplots(1, ncols, figsize=(width or SINGLE[0] * ncols, height), squeeze=False)
        return fig, list(axes[0])

    def frame(self, ax, title: str, note: str = "") -> None:
        ax.set_xlim(-self.half, self.half)
        ax.set_ylim(-self.half, self.half)
        ax.set_aspect("equal")
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        ax.set_title(title + (f"\n{note}" if note else ""), fontsize=11)

    def show(self, ax, img, **kw):
        return ax.imshow(img, extent=[-self.half, self.half, -self.half, self.half], origin="lower",
                         interpolation="nearest", **kw)

    def trees(self, ax) -> None:
        fruits = sorted({t.fruit for t in self.world.trees}, key=lambda f: (f in _poisonous(self.world), f))
        colour = {f: TREE_COLOURS[i % len(TREE_COLOURS)] for i, f in enumerate(fruits)}
        for fruit in fruits:
            trees = [t for t in self.world.trees if t.fruit == fruit]
            loc = torch.stack([t.location for t in trees]).numpy()
            poisonous = trees[0].is_poisonous
            ax.scatter(loc[:, 0], loc[:, 1], s=90, marker="X" if poisonous else "o", c=colour[fruit],
                       edgecolors="black", linewidths=0.8, zorder=5,
                       label=f"{fruit} tree ({'poisonous' if poisonous else 'edible'})")

    def points(self, ax, extra: Sequence[Points]) -> None:
        for p in extra:
            loc = p.loc.detach().reshape(-1, 2).numpy()
            ax.scatter(loc[:, 0], loc[:, 1], s=p.size, marker=p.marker, c=p.colour, label=p.label, zorder=4,
                       edgecolors=p.edge, linewidths=0.6 if p.edge else None)

    def legend(self, fig, ax, patches: Sequence = ()) -> None:
        handles, labels = ax.get_legend_handles_labels()
        handles, labels = handles + [h for h, _ in patches], labels + [lbl for _, lbl in patches]
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize=9,
                  frameon=False)

    def save(self, fig, filename: str) -> str:
        path = self.out / filename
        fig.savefig(path, dpi=DPI, bbox_inches="tight")  # the legend hangs below the axes
        matplotlib_pyplot().close(fig)
        self.files.append(str(path))
        return str(path)

    # ---- panels (draw into a given axis) -----------------------------------------------------

    def pca_panel(self, ax, values: torch.Tensor, colours: Callable, title: str, extra: Sequence[Points] = (),
                  unmatched: Optional[torch.Tensor] = None) -> list:
        """Returns the legend patches it needs (the grey of places no entry reaches)."""
        from matplotlib.patches import Patch

        self.show(ax, self.image(colours(values)))
        if unmatched is not None and bool(unmatched.any()):
            grey = torch.zeros(unmatched.numel(), 4)
            grey[unmatched.reshape(-1)] = torch.tensor([0.85, 0.85, 0.85, 1.0])
            self.show(ax, self.image(grey))
        self.frame(ax, title, "colour: the first 3 principal components of the reading as RGB (alike = similar)")
        self.trees(ax)
        self.points(ax, extra)
        return [(Patch(color="#d9d9d9"), "no memory entry in range: reads zero")] if unmatched is not None else []

    def scalar_panel(self, fig, ax, values: torch.Tensor, title: str, label: str, *, log: bool = False,
                     diverging: bool = False, cmap: str = "viridis", vmin=None, vmax=None,
                     extra: Sequence[Points] = (), note: str = ""):
        from matplotlib import colors

        import numpy as np
        from matplotlib import colormaps

        img = self.image(values.reshape(-1, 1))[..., 0]
        cmap = colormaps[cmap]
        if log:
            positive = img[img > 0]
            floor = vmin or (max(float(positive.min()), float(positive.max()) * 1e-6) if positive.size else 1e-12)
            norm = colors.LogNorm(vmin=floor, vmax=vmax or max(float(img.max()), floor * 10))
            # exact zeros stay visible as "no value" instead of the bottom of the scale
            img = np.ma.masked_less_equal(np.where(img > 0, img.clip(min=floor), 0.0), 0.0)
            cmap = cmap.with_extremes(bad=NO_VALUE)
        elif diverging:
            # symmetric log: changes spanning many decades all stay visible, zero stays white
            bound = max(float(abs(img).max()), 1e-12)
            norm = colors.SymLogNorm(linthresh=bound * 1e-4, vmin=-bound, vmax=bound, base=10)
            cmap = colormaps["RdBu_r"]
        else:
            norm = colors.Normalize(vmin=vmin if vmin is not None else float(img.min()),
                                    vmax=vmax if vmax is not None else float(img.max()))
        mappable = self.show(ax, img, cmap=cmap, norm=norm)
        bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label(label)
        self.frame(ax, title, note)
        self.trees(ax)
        self.points(ax, extra)
        return mappable

    def drive_panel(self, ax, probs: torch.Tensor, title: str, extra: Sequence[Points] = ()) -> list:
        from matplotlib.patches import Patch

        colours = torch.eye(3, dtype=torch.float64)  # the classifier's drives: poison, edible, neutral
        self.show(ax, self.image(probs.double() @ colours))
        self.frame(ax, title, "colour mixes the drive probabilities: pure colour = certain")
        self.trees(ax)
        self.points(ax, extra)
        return [(Patch(color="red"), "P(poison)"), (Patch(color="lime"), "P(edible: food)"),
                (Patch(color="blue"), "P(neutral: nothing)")]

    # ---- whole figures -----------------------------------------------------------------------

    def pca_figure(self, values, colours, title, filename, extra: Sequence[Points] = (), unmatched=None) -> str:
        fig, (ax,) = self.new()
        self.legend(fig, ax, self.pca_panel(ax, values, colours, title, extra, unmatched))
        return self.save(fig, filename)

    def sensor_figure(self, sensor: torch.Tensor, colours, filename: str) -> str:
        fig, axes = self.new(2, width=17.0, height=9.0)
        self.pca_panel(axes[0], sensor, colours, "What the sensor reads at each place")
        self.scalar_panel(fig, axes[1], torch.linalg.vector_norm(sensor, dim=-1), "Strength of the sensor reading",
                          f"‖sensor reading‖ ({VECTOR_NORM_UNIT})", log=True,
                          note="Σ over trees of 10^(−(distance / 100 m)²) × tree vector")
        self.legend(fig, axes[1])
        return self.save(fig, filename)

    def drive_figure(self, probs, title, filename, extra: Sequence[Points] = ()) -> str:
        fig, (ax,) = self.new()
        patches = self.drive_panel(ax, probs, title, extra)
        self.legend(fig, ax, patches)
        return self.save(fig, filename)

    def scalar_figure(self, values, title, label, filename, **kw) -> str:
        fig, (ax,) = self.new()
        self.scalar_panel(fig, ax, values, title, label, **kw)
        self.legend(fig, ax)
        return self.save(fig, filename)

    def error_figure(self, before: torch.Tensor, after: torch.Tensor, what: str, filename: str,
                     extra: Sequence[Points] = ()) -> str:
        """Error before and after (log colour, one scale) and their difference (diverging colour)."""
        fig, axes = self.new(3, width=25.0, height=9.0)
        top = float(torch.maximum(before.max(), after.max()))
        floor = max(top * 1e-6, 1e-12)
        for ax, values, when in ((axes[0], before, "before"), (axes[1], after, "after")):
            self.scalar_panel(fig, ax, values, f"Read error vs sensor {when} {what}",
                              f"‖memory read − sensor‖ ({VECTOR_NORM_UNIT}, log scale)", log=True, vmin=floor,
                              vmax=top, cmap="magma", note="where no entry is in reach the read is zero: "
                              "the error is the sensor itself")
        self.scalar_panel(fig, axes[2], after - before, f"Change of the read error from {what}",
                          f"error after − error before ({VECTOR_NORM_UNIT}, symmetric log; red = worse)",
                          diverging=True, extra=extra, note="white: unchanged")
        self.legend(fig, axes[2])
        return self.save(fig, filename)

    def entries_panel(self, fig, ax, loc: torch.Tensor, values: torch.Tensor, title: str, label: str,
                      extra: Sequence[Points] = (), note: str = "") -> None:
        """Memory entries as dots coloured by a positive per-entry value (log colour bar)."""
        from matplotlib import colors

        v = values.detach().double().clamp(min=1e-12).numpy()
        xy = loc.detach().numpy()
        ax.set_facecolor("#f2f2f2")
        dots = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=12, cmap="viridis", norm=colors.LogNorm(v.min(), v.max()),
                          zorder=3, label="memory entry (colour: see the colour bar)")
        bar = fig.colorbar(dots, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label(label)
        self.frame(ax, title, note)
        self.trees(ax)
        self.points(ax, extra)

    def entries_figure(self, loc, values, title, label, filename, extra: Sequence[Points] = (), note="") -> str:
        fig, (ax,) = self.new()
        self.entries_panel(fig, ax, loc, values, title, label, extra, note)
        self.legend(fig, ax)
        return self.save(fig, filename)

    def overview(self, panels: Sequence[Callable], title: str, filename: str, dpi: int = 62) -> str:
        """Panels (each draws into (fig, ax) and may return legend patches) on a 2 x 3 grid with one
        legend for every marker used."""
        plt = matplotlib_pyplot()
        fig, axes = plt.subplots(2, 3, figsize=(22, 15))
        seen, handles = set(), []
        for ax, panel in zip(axes.reshape(-1), panels):
            extra = panel(fig, ax)
            extra = extra if isinstance(extra, list) else []  # legend patches, when the panel has any
            for handle, label in list(zip(*ax.get_legend_handles_labels())) + list(extra):
                if label not in seen:
                    seen.add(label)
                    handles.append((handle, label))
        fig.suptitle(title, fontsize=16)
        fig.legend([h for h, _ in handles], [lbl for _, lbl in handles], loc="lower center", ncol=6, fontsize=10,
                   frameon=False)
        fig.tight_layout(rect=(0, 0.07, 1, 0.97))
        path = self.out / filename
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        self.files.append(str(path))
        return str(path)

    def loss_figure(self, losses: Sequence[float], published: Sequence[float], published_every: int,
                    filename: str) -> str:
        fig, (ax,) = self.new(width=10.0, height=6.0)
        ax.plot(range(len(losses)), losses, label="this run", color="tab:blue")
        ax.plot([i * published_every for i in range(len(published))], published, "o", color="tab:orange",
                label="the notebook (printed every 10 steps)")
        ax.set_yscale("log")
        ax.set_xlabel("Adam step")
        ax.set_ylabel(f"mean ‖read − read before pruning‖² over the grid ({VECTOR_NORM_UNIT}², log scale)")
        ax.set_title("Refitting the pruned memory to the reads it gave before pruning")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        return self.save(fig, filename)


def _poisonous(world) -> set:
    return {t.fruit for t in world.trees if t.is_poisonous}
