"""Pattern sets and cue corruptions shared by PatternMemory.train, the recall experiment and the
capacity benchmark.

Two corruptions: the recall experiment's deterministic one (the first int(active·r) active units of
each pattern switched off, in unit order, as the seed experiment does) and the random one training
uses (a random subset of that size, so the memory learns from every unit equally).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor


def random_binary_patterns(num_patterns: int, num_units: int, active: int, *,
                           generator: Optional[torch.Generator] = None, dtype=torch.float32) -> Tensor:
    """(num_patterns, num_units) patterns of 0/1 with exactly `active` ones each, at uniformly random units."""
    if not 0 <= active <= num_units:
        raise ValueError(f"active must be in [0, num_units={num_units}], got {active}")
    scores = torch.rand(num_patterns, num_units, generator=generator)
    on = scores.argsort(dim=-1)[:, :active]
    return torch.zeros(num_patterns, num_units, dtype=dtype).scatter_(-1, on, 1.0)


def _check_ratio(ratio: Tensor) -> None:
    if bool(((ratio < 0) | (ratio > 1) | ratio.isnan()).any()):
        raise ValueError("corruption ratios must lie in [0, 1]")


def _as_ratio(ratio, rows: int) -> Tensor:
    ratio = torch.as_tensor(ratio, dtype=torch.float64)
    _check_ratio(ratio)
    return ratio.expand(rows) if ratio.dim() == 0 else ratio


def _rowwise(corrupt):
    """Lets a corruption of (rows, units) patterns take one pattern (units,) too."""
    @functools.wraps(corrupt)
    def wrapper(patterns: Tensor, ratio, **kwargs) -> Tensor:
        if patterns.dim() == 1:
            return corrupt(patterns[None], ratio, **kwargs)[0]
        return corrupt(patterns, ratio, **kwargs)

    return wrapper


@_rowwise
def switch_off_first(patterns: Tensor, ratio) -> Tensor:
    """The seed experiment's cue: each row with its first int(active·ratio) active units (in unit
    order) set to 0. `ratio` is a float or one per row; active counts the row's nonzero units."""
    ratio = _as_ratio(ratio, patterns.shape[0])
    active = patterns != 0
    n_off = (active.sum(-1).double() * ratio).floor().long()  # int() of a non-negative number
    rank = active.long().cumsum(-1)  # 1 for a row's first active unit, 2 for its second, ...
    off = active & (rank <= n_off[:, None].to(rank.device))
    return patterns.masked_fill(off, 0)


@_rowwise
def switch_off_random(patterns: Tensor, ratio, *, units: str = "active",
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Each row with a random int(count·ratio) of its units set to 0: of its active (nonzero)
    units with units="active" (binary patterns), of all its units with units="all"."""
    if units not in ("active", "all"):
        raise ValueError(f"units must be 'active' or 'all', got {units!r}")
    ratio = _as_ratio(ratio, patterns.shape[0])
    eligible = patterns != 0 if units == "active" else torch.ones_like(patterns, dtype=torch.bool)
    n_off = (eligible.sum(-1).double() * ratio).floor().long().to(patterns.device)
    # random keys for the eligible units (ineligible ones get -1): a row's n_off largest keys are
    # n_off of its eligible units drawn uniformly without replacement
    keys = torch.rand(patterns.shape, generator=generator).to(patterns.device).masked_fill(~eligible, -1.0)
    ordered = keys.sort(dim=-1, descending=True).values
    cutoff = ordered.gather(-1, (n_off - 1).clamp(min=0)[:, None])
    off = eligible & (keys >= cutoff) & (n_off[:, None] > 0)
    return patterns.masked_fill(off, 0)


def nearest(patterns: Tensor, rows: Tensor, chunk_elements: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """For each row, (index, squared Euclidean distance) of the nearest pattern, the lowest index on
    ties. For 0/1 patterns and rows the distance is the number of differing units (exact: the sums
    are integers, computed in float64). Works in blocks of patterns, so no (rows, N) matrix is held."""
    rows64 = rows.double()
    row_norm = rows64.pow(2).sum(-1, keepdim=True)
    best_d = torch.full((rows.shape[0],), float("inf"), dtype=torch.float64, device=rows.device)
    best_i = torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
    step = max(1, chunk_elements // max(1, rows.shape[0]))
    for lo in range(0, patterns.shape[0], step):
        block = patterns[lo:lo + step].double()
        d = (row_norm + block.pow(2).sum(-1) - 2 * rows64 @ block.T).clamp(min=0)
        block_d, block_i = d.min(-1)  # the first index of the minimum
        better = block_d < best_d  # strictly: an earlier block keeps its ties
        best_d, best_i = torch.where(better, block_d, best_d), torch.where(better, block_i + lo, best_i)
    return best_i, best_d
