"""Argument checks and broadcasting shared by every op and every backend.

Every public op calls into here before any kernel runs, so a bad argument fails the same way
whichever backend would have served it.
"""
from __future__ import annotations

import math
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


def check_finite(x: torch.Tensor, name: str) -> None:
    # One reduction without a bool copy of x: NaN and ±Inf always reach the sum; only a sum that
    # overflows from finite values needs the elementwise check.
    if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


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


def standard_deviation(sd: Sd, name: str, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """A float, a 0-d tensor or a tensor broadcastable to `like`, checked positive and finite.

    Returns a tensor of like's dtype and device that broadcasts to like's shape (a float becomes a
    0-d tensor, so no per-entry copy is made).
    """
    if isinstance(sd, bool) or not isinstance(sd, (torch.Tensor, float, int)):
        raise TypeError(f"{name} must be a positive float or a tensor, got {type(sd).__name__}")
    if not isinstance(sd, torch.Tensor):
        if not math.isfinite(sd) or sd <= 0:
            raise ValueError(f"{name} must be positive and finite, got {sd}")
        return torch.tensor(float(sd), dtype=like.dtype, device=like.device)
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
    if sd.numel():
        if not bool(torch.isfinite(sd).all()):
            raise ValueError(f"{name} contains non-finite values")
        if not bool((sd > 0).all()):
            raise ValueError(f"{name} must be positive everywhere (found a value <= 0)")
    return sd


def match_threshold(threshold: Optional[float]) -> Optional[float]:
    if threshold is None:
        return None
    if isinstance(threshold, torch.Tensor):
        threshold = float(threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (float, int)):
        raise TypeError(f"match_threshold must be a float or None, got {type(threshold).__name__}")
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"match_threshold must be >= 0, got {threshold}")
    return float(threshold)


@dataclass
class MemoryArgs:
    """A validated memory: locations, variances and values, batch dims broadcast."""

    loc: torch.Tensor  # (..., M, d)
    var: torch.Tensor  # broadcastable to loc
    values: torch.Tensor  # (..., M, E)

    @property
    def size(self) -> int:
        return self.loc.shape[-2]

    @property
    def dim(self) -> int:
        return self.loc.shape[-1]


def memory(mem_loc, mem_sd: Sd, mem_values, *, value_dtypes=LOCATION_DTYPES) -> MemoryArgs:
    check_tensor(mem_loc, "mem_loc", min_rank=2)
    check_tensor(mem_values, "mem_values", min_rank=2, dtypes=value_dtypes)
    check_device([("mem_loc", mem_loc), ("mem_values", mem_values)])
    if mem_loc.shape[-2] != mem_values.shape[-2]:
        raise ValueError(
            f"mem_loc has {mem_loc.shape[-2]} entries (shape {tuple(mem_loc.shape)}) but mem_values has "
            f"{mem_values.shape[-2]} (shape {tuple(mem_values.shape)})"
        )
    if mem_loc.dim() != mem_values.dim():
        raise ValueError(
            f"mem_loc {tuple(mem_loc.shape)} and mem_values {tuple(mem_values.shape)} must have the same rank"
        )
    if mem_loc.shape[-1] < 1:
        raise ValueError("mem_loc must have a location dimension d >= 1")
    check_finite(mem_loc, "mem_loc")
    check_finite(mem_values, "mem_values")
    sd = standard_deviation(mem_sd, "mem_sd", mem_loc, "mem_loc")
    return MemoryArgs(mem_loc, sd * sd, mem_values)


def is_single_row(x: torch.Tensor, name: str, like: torch.Tensor, like_name: str, rows: str, one: str) -> bool:
    """Whether x (rank of `like` minus one) is a single row per batch, or (same rank) a stack of rows."""
    if x.dim() in (like.dim() - 1, like.dim()):
        return x.dim() == like.dim() - 1
    raise ValueError(f"{name} must have shape {rows} with the rank of {like_name} {tuple(like.shape)}, or {one}; "
                     f"got {tuple(x.shape)}")


def queries(query_loc, query_sd: Sd, mem: MemoryArgs, *, loc_name="query_loc", sd_name="query_sd"):
    """Checks the queries against the memory. Returns (loc, var, single) where single says the
    caller passed one query per batch row, shape (..., d); loc then gains a Q=1 axis."""
    check_tensor(query_loc, loc_name, min_rank=1)
    check_same_device_dtype([("mem_loc", mem.loc), (loc_name, query_loc)])
    single = is_single_row(query_loc, loc_name, mem.loc, "mem_loc", "(..., Q, d)", "(..., d) for a single query")
    if query_loc.shape[-1] != mem.dim:
        raise ValueError(
            f"{loc_name} has location dimension {query_loc.shape[-1]} but mem_loc has {mem.dim}"
        )
    check_finite(query_loc, loc_name)
    sd = standard_deviation(query_sd, sd_name, query_loc, loc_name)
    var = sd * sd
    if single:
        query_loc = query_loc.unsqueeze(-2)
        var = var.unsqueeze(-2) if var.dim() >= 1 else var
    return query_loc, var, single


def batch_shape(*shapes: torch.Size, names: Sequence[str]) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        desc = ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes))
        raise ValueError(f"batch dimensions do not broadcast: {desc}") from None


def flatten_batch(x: torch.Tensor, batch: torch.Size, tail: tuple[int, ...]) -> torch.Tensor:
    """Expands x to batch + tail and views it as (B, *tail) without copying where strides allow."""
    x = x.expand(*batch, *tail)
    return x.reshape(math.prod(batch), *tail) if len(batch) != 1 else x


def reduce_to(grad: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    if grad is None:
        return None
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


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
    check_finite(key, name)
    return (key.unsqueeze(-2) if single else key), single


def check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but mem_loc is on {device}")
