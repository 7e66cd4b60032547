"""Argument checks and broadcasting shared by every op and every backend (docs/validation.md).

Every public op calls into here before any kernel runs, so a bad argument fails the same way
whichever backend would have served it. Public for libraries that build on the ops (the `resonant`
package validates its memories' inputs with it).

Two kinds of checks: metadata (types, ranks, shapes, dtypes, devices, Python scalars), which always
run and cost nothing, and values (NaN/Inf, the σ, location and value ranges), which read the data.
`validate=None` (every op's default) runs the value checks where they are free: on CPU tensors,
outside torch.compile. On CUDA tensors each would be a device-to-host sync, and inside a compiled
graph a graph break, so there they run only with validate=True (validate=False skips them
everywhere). See `value_checks`.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

Sd = Union[torch.Tensor, float, int]

LOCATION_DTYPES = (torch.float32, torch.float64)
VALUE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(x, name: str, *, min_rank: int = 1, dtypes=LOCATION_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_rank:
        raise ValueError(f"{name} must have at least {min_rank} dimension(s), got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(x.dtype).replace('torch.', '')}; expected one of {names}")
    return x


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- the numeric ranges every backend computes correctly (docs/validation.md) ----------------
# F is the largest finite number of the computation's dtype (the locations'), N its smallest
# normal number. Every bound below keeps an intermediate of the kernels finite and normal, so
# inside them every backend agrees with the maths (and outside them every backend raises).

def sd_range(dtype: torch.dtype) -> tuple[float, float]:
    """σ in [√N, √F/2]: σ² is a normal number (so 1/v is finite) and σ_q² + σ_m² ≤ F/2."""
    fi = torch.finfo(dtype)
    return math.sqrt(fi.tiny), math.sqrt(fi.max) / 2


def location_bound(dtype: torch.dtype, d: int) -> float:
    """|coordinate| ≤ √(F/d)/4, so that a squared distance Σ_i (q_i − m_i)² over d dims is ≤ F/4."""
    return math.sqrt(torch.finfo(dtype).max / max(d, 1)) / 4


def value_bound(dtype: torch.dtype, num_entries: int) -> float:
    """|value| ≤ F/(2M): a softmax-weighted sum of M values, accumulated under a running max whose
    weights are each ≤ 1 before normalising, stays finite."""
    return torch.finfo(dtype).max / (2 * max(num_entries, 1))


def value_checks(validate: Optional[bool], device: torch.device) -> bool:
    """Whether a call runs the value checks: `validate` when given, else only where they are free
    (CPU tensors, not while torch.compile traces the call)."""
    if validate is not None:
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be True, False or None, got {validate!r}")
        return validate
    return device.type == "cpu" and not torch.compiler.is_compiling()


def check_range(x: torch.Tensor, name: str, bound: float = math.inf, why: str = "", *, check: bool = True) -> None:
    """x is finite and every |x| ≤ bound; one reduction (aminmax: no copy of x, NaN propagates).
    A no-op when check is False (value checks off for this call)."""
    if not check or not x.numel():
        return
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"{name} contains NaN values")
    if math.isinf(low) or math.isinf(high):
        raise ValueError(f"{name} contains Inf values")
    peak = max(-low, high)
    if peak > bound:
        raise ValueError(f"{name} has a value of magnitude {peak:.4g}, above the usable bound {bound:.4g} "
                         f"for {_dtype_name(x.dtype)}{why}")


def check_finite(x: torch.Tensor, name: str, *, check: bool = True) -> None:
    check_range(x, name, check=check)


def check_device(named: Sequence[tuple[str, torch.Tensor]], *, same_dtype: bool = False) -> None:
    """All tensors on the first one's device (and of its dtype, with same_dtype)."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        if same_dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}")


def check_same_device_dtype(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    check_device(named, same_dtype=True)


@dataclass
class Variance:
    """σ² of a validated standard deviation: a tensor broadcastable to its locations, and the same
    number as a Python float when σ was given as one (known without reading a tensor)."""

    var: torch.Tensor
    scalar: Optional[float] = None


def standard_deviation(sd: Sd, name: str, like: torch.Tensor, like_name: str, *, check: bool = True) -> Variance:
    """σ² of a float, a 0-d tensor or a tensor broadcastable to `like`, checked positive, finite
    and inside the dtype's usable range (values only when `check`).

    The variance is a tensor of like's dtype and device that broadcasts to like's shape (a float
    becomes a 0-d tensor, so no per-entry copy is made).
    """
    if isinstance(sd, bool) or not isinstance(sd, (torch.Tensor, float, int)):
        raise TypeError(f"{name} must be a positive float or a tensor, got {type(sd).__name__}")
    low, high = sd_range(like.dtype)
    usable = (f"; with {_dtype_name(like.dtype)} locations σ must lie in [{low:.4g}, {high:.4g}] "
              f"(σ² must be a normal {_dtype_name(like.dtype)} number)")
    if not isinstance(sd, torch.Tensor):
        if not math.isfinite(sd) or sd <= 0:
            raise ValueError(f"{name} must be positive and finite, got {sd}")
        if not low <= sd <= high:
            raise ValueError(f"{name} is {sd:.4g}{usable}")
        var = float(sd) ** 2
        return Variance(torch.tensor(var, dtype=like.dtype, device=like.device), var)
    check_tensor(sd, name, min_rank=0)
    check_same_device_dtype([(like_name, like), (name, sd)])
    try:
        torch.broadcast_shapes(sd.shape, like.shape)
        if torch.broadcast_shapes(sd.shape, like.shape) != like.shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(sd.shape)} does not broadcast to {like_name}'s shape {tuple(like.shape)}"
        ) from None
    if check and sd.numel():
        smallest, largest = (float(v) for v in torch.aminmax(sd.detach()))
        if math.isnan(smallest) or math.isnan(largest) or math.isinf(largest):
            raise ValueError(f"{name} contains non-finite values")
        if smallest <= 0:
            raise ValueError(f"{name} must be positive everywhere (found a value <= 0)")
        if smallest < low or largest > high:
            bad = smallest if smallest < low else largest
            raise ValueError(f"{name} contains {bad:.4g}{usable}")
    return Variance(sd * sd)


def uniform_variance(query: Variance, mem: Variance, *, check: bool) -> float:
    """qv + mv when every variance of the call is one number (the kernels' fast path), else -1.

    Known for free when both σ were Python numbers; a one-element tensor σ is read only where
    value checks run (reading a CUDA tensor would sync; inside torch.compile it would break the
    graph), else the call takes the general path, which gives the same result more slowly."""
    if query.scalar is not None and mem.scalar is not None:
        return query.scalar + mem.scalar
    if check and query.var.numel() == 1 and mem.var.numel() == 1:
        return float(query.var.detach().reshape(()) + mem.var.detach().reshape(()))
    return -1.0


# A threshold whose square overflows a double masks no finite squared distance: it means "none".
NO_THRESHOLD_ABOVE = math.sqrt(sys.float_info.max)


def match_threshold(threshold: Optional[float]) -> Optional[float]:
    """None, or a float θ >= 0. θ = inf, or any θ >= √(largest double) ≈ 1.34e154 (θ² overflows, so
    no squared distance exceeds it), is the same as no threshold and returns None."""
    if threshold is None:
        return None
    if isinstance(threshold, torch.Tensor):
        threshold = float(threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (float, int)):
        raise TypeError(f"match_threshold must be a float or None, got {type(threshold).__name__}")
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"match_threshold must be >= 0, got {threshold}")
    if threshold >= NO_THRESHOLD_ABOVE:
        return None
    return float(threshold)


@dataclass
class MemoryArgs:
    """A validated memory: locations, variances and values, batch dims broadcast."""

    loc: torch.Tensor  # (..., M, d)
    variance: Variance  # broadcastable to loc
    values: torch.Tensor  # (..., M, E)
    check: bool  # whether this call runs the value checks

    @property
    def var(self) -> torch.Tensor:
        return self.variance.var

    @property
    def size(self) -> int:
        return self.loc.shape[-2]

    @property
    def dim(self) -> int:
        return self.loc.shape[-1]


def memory(mem_loc, mem_sd: Sd, mem_values, *, value_dtypes=LOCATION_DTYPES, validate: Optional[bool] = None,
           names=("mem_loc", "mem_sd", "mem_values")) -> MemoryArgs:
    loc_name, sd_name, values_name = names
    check_tensor(mem_loc, loc_name, min_rank=2)
    check_tensor(mem_values, values_name, min_rank=2, dtypes=value_dtypes)
    check_device([(loc_name, mem_loc), (values_name, mem_values)])
    if mem_loc.shape[-2] != mem_values.shape[-2]:
        raise ValueError(
            f"{loc_name} has {mem_loc.shape[-2]} entries (shape {tuple(mem_loc.shape)}) but {values_name} has "
            f"{mem_values.shape[-2]} (shape {tuple(mem_values.shape)})"
        )
    if mem_loc.dim() != mem_values.dim():
        raise ValueError(
            f"{loc_name} {tuple(mem_loc.shape)} and {values_name} {tuple(mem_values.shape)} must have the same rank"
        )
    if mem_loc.shape[-1] < 1:
        raise ValueError(f"{loc_name} must have a location dimension d >= 1")
    check = value_checks(validate, mem_loc.device)
    check_locations(mem_loc, loc_name, check=check)
    M = mem_loc.shape[-2]
    check_range(mem_values, values_name, value_bound(torch.promote_types(mem_values.dtype, mem_loc.dtype), M),
                f" with M = {M} entries (a weighted sum of M values must stay finite)", check=check)
    variance = standard_deviation(mem_sd, sd_name, mem_loc, loc_name, check=check)
    return MemoryArgs(mem_loc, variance, mem_values, check)


def check_locations(loc: torch.Tensor, name: str, *, check: bool = True) -> None:
    d = loc.shape[-1]
    check_range(loc, name, location_bound(loc.dtype, d), f" with d = {d} (squared distances must stay finite)",
                check=check)


def is_single_row(x: torch.Tensor, name: str, like: torch.Tensor, like_name: str, rows: str, one: str) -> bool:
    """Whether x (rank of `like` minus one) is a single row per batch, or (same rank) a stack of rows."""
    if x.dim() in (like.dim() - 1, like.dim()):
        return x.dim() == like.dim() - 1
    raise ValueError(f"{name} must have shape {rows} with the rank of {like_name} {tuple(like.shape)}, or {one}; "
                     f"got {tuple(x.shape)}")


def queries(query_loc, query_sd: Sd, mem: MemoryArgs, *, loc_name="query_loc", sd_name="query_sd"):
    """Checks the queries against the memory. Returns (loc, variance, single) where single says
    the caller passed one query per batch row, shape (..., d); loc (and a per-query variance) then
    gain a Q=1 axis."""
    check_tensor(query_loc, loc_name, min_rank=1)
    check_same_device_dtype([("mem_loc", mem.loc), (loc_name, query_loc)])
    single = is_single_row(query_loc, loc_name, mem.loc, "mem_loc", "(..., Q, d)", "(..., d) for a single query")
    if query_loc.shape[-1] != mem.dim:
        raise ValueError(
            f"{loc_name} has location dimension {query_loc.shape[-1]} but mem_loc has {mem.dim}"
        )
    check_locations(query_loc, loc_name, check=mem.check)
    variance = standard_deviation(query_sd, sd_name, query_loc, loc_name, check=mem.check)
    if single:
        query_loc = query_loc.unsqueeze(-2)
        if variance.var.dim() >= 1:
            variance = Variance(variance.var.unsqueeze(-2), variance.scalar)
    return query_loc, variance, single


def batch_shape(*shapes: torch.Size, names: Sequence[str]) -> torch.Size:
    if all(s == shapes[0] for s in shapes[1:]):  # the common case, without torch's general broadcasting (in Python)
        return torch.Size(shapes[0])
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        desc = ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes))
        raise ValueError(f"batch dimensions do not broadcast: {desc}") from None


def flatten_batch(x: torch.Tensor, batch: torch.Size, tail: tuple[int, ...]) -> torch.Tensor:
    """Expands x to batch + tail and views it as (B, *tail) without copying where strides allow."""
    if not batch:  # (not expand(1, *tail): its backward sums over the new dim, a copy of the gradient)
        return x.expand(*tail).unsqueeze(0)
    x = x.expand(*batch, *tail)
    return x.reshape(math.prod(batch), *tail) if len(batch) != 1 else x


def positive_number(x, name: str) -> float:
    """A finite float > 0 (temperatures)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = float(x)
    if isinstance(x, bool) or not isinstance(x, (float, int)):
        raise TypeError(f"{name} must be a positive float, got {type(x).__name__}")
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be positive and finite, got {x}")
    return float(x)


def nonnegative_number(x, name: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = float(x)
    if isinstance(x, bool) or not isinstance(x, (float, int)):
        raise TypeError(f"{name} must be a float >= 0, got {type(x).__name__}")
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be >= 0 and finite, got {x}")
    return float(x)


def positive_count(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def nonempty_memory(mem: MemoryArgs, op: str) -> None:
    if mem.size == 0:
        raise ValueError(f"{op}: the memory is empty (M = 0), so there is nothing to sample from")


def search_key(key, mem: MemoryArgs, name: str = "search_key"):
    """A key (..., Q, E) or (..., E) in mem_values' space. Returns (key with a Q axis, single)."""
    check_tensor(key, name, min_rank=1, dtypes=VALUE_DTYPES)
    check_same_device_dtype([("mem_values", mem.values), (name, key)])
    single = is_single_row(key, name, mem.values, "mem_values", "(..., Q, E)", "(..., E) for a single key")
    if key.shape[-1] != mem.values.shape[-1]:
        raise ValueError(f"{name} has value dimension {key.shape[-1]} but mem_values has {mem.values.shape[-1]}")
    check_finite(key, name, check=mem.check)
    return (key.unsqueeze(-2) if single else key), single


def check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but mem_loc is on {device}")
