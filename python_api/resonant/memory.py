"""SpatialMemory: a Gaussian-kernel memory of (location, σ, value) observations.

Every operation runs on the resonant_kernels ops (gaussian_read, leave_one_out, prune_mask,
conditional_sample), on whichever backend the memory was asked for.

Entries carry increasing integer ids (their write order). The ids are what makes eviction
("drop the oldest") and the hot swap of a background prune exact: the prune removes the ids it
decided to drop from whatever the memory holds when it finishes, so entries written, fused or
evicted meanwhile are neither lost nor resurrected.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

import resonant_kernels as kernels
from resonant_kernels import validation

from .types import Device, PathLike, Sd

FORMAT = "resonant.SpatialMemory/1"


def check_backend(backend, device: torch.device, dtype: torch.dtype) -> str:
    """The memory's backend name, checked now (not at the first read): "auto" or a backend that can
    read this memory's device and dtype."""
    kernels.select_backend("gaussian_read", backend, device, dtype)  # raises naming the reason
    return backend


def _check_count(value, name: str, minimum: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


class PruneHandle:
    """A prune running in a background thread; `wait()` returns how many entries it removed."""

    def __init__(self, memory: "SpatialMemory", run: Callable[[], int]):
        self._memory = memory
        self._removed: Optional[int] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(run,), name="SpatialMemory.prune", daemon=True)
        self._thread.start()

    def _run(self, run):
        try:
            self._removed = run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread by wait()
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> int:
        """Blocks until the pruned set is swapped in; returns the number of entries removed."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"background prune still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._removed


class SpatialMemory:
    """Observations z ∈ R^value_dim at uncertain locations ℓ ∈ R^location_dim (σ per dim).

    `write` appends (or fuses, with merge_radius), dropping the oldest entries beyond max_size;
    `read` regresses values at query locations; `sample` draws locations whose values match a
    drive key; `leave_one_out` and `prune` manage the size; `regress` refits the entries to
    reads taken before a prune.

    Prunes are serialised: a prune (background or not) starts when any earlier one has swapped its
    result in, and decides on the entries held at that moment, so two prunes remove exactly what
    running them one after the other removes.
    """

    def __init__(self, location_dim: int, value_dim: int, *, max_size: Optional[int] = None, device=None,
                 dtype=None, backend: str = "auto"):
        location_dim = _check_count(location_dim, "location_dim", 1)
        value_dim = _check_count(value_dim, "value_dim", 1)
        max_size = _check_count(max_size, "max_size", 1, allow_none=True)
        dtype = dtype or torch.get_default_dtype()
        if dtype not in validation.LOCATION_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        backend = check_backend(backend, device, dtype)
        self.location_dim, self.value_dim, self.max_size, self.backend = location_dim, value_dim, max_size, backend
        self._lock = threading.RLock()
        self._prune_lock = threading.Lock()  # held by the running prune, from its snapshot to its swap
        self._set(torch.empty(0, location_dim, dtype=dtype, device=device),
                  torch.empty(0, location_dim, dtype=dtype, device=device),
                  torch.empty(0, value_dim, dtype=dtype, device=device),
                  torch.empty(0, dtype=torch.int64, device=device))
        self._next_id = 0

    # ---- state -------------------------------------------------------------------------------

    def _set(self, loc: Tensor, sd: Tensor, values: Tensor, ids: Tensor) -> None:
        # Tensors are replaced, never modified in place, so a reader or a background prune that
        # took references keeps a consistent snapshot without copying.
        self.loc, self.sd, self.values, self.ids = loc, sd, values, ids

    def snapshot(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loc (M, d), sd (M, d), values (M, E), ids (M,)) as of now, consistent with each other."""
        with self._lock:
            return self.loc, self.sd, self.values, self.ids

    @property
    def device(self) -> torch.device:
        return self.loc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.loc.dtype

    def __len__(self) -> int:
        return self.loc.shape[0]

    def __repr__(self) -> str:
        return (f"SpatialMemory(location_dim={self.location_dim}, value_dim={self.value_dim}, size={len(self)}, "
                f"max_size={self.max_size}, device={self.device}, dtype={self.dtype}, backend={self.backend!r})")

    def reset(self) -> None:
        with self._lock:
            self._set(self.loc[:0], self.sd[:0], self.values[:0], self.ids[:0])

    # ---- write -------------------------------------------------------------------------------

    def _observations(self, loc, sd, values) -> tuple[Tensor, Tensor, Tensor]:
        """Validated observations flattened to (N, d), (N, d), (N, E) in the memory's dtype/device.

        Errors name write's own arguments (loc, sd, values). Tensors are converted to the memory's
        dtype only where that loses nothing (float32 into a float64 memory); float64 into a
        float32 memory raises rather than rounding silently."""
        if isinstance(loc, Tensor) and loc.dim() == 1:
            loc = loc.unsqueeze(0)
            values = values.unsqueeze(0) if isinstance(values, Tensor) and values.dim() == 1 else values
            sd = sd.unsqueeze(0) if isinstance(sd, Tensor) and sd.dim() == 1 else sd
        args = validation.memory(loc, sd, values, names=("loc", "sd", "values"))
        for name, t in (("loc", loc), ("sd", sd), ("values", values)):
            if isinstance(t, Tensor) and torch.promote_types(t.dtype, self.dtype) != self.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the memory holds {self.dtype}; converting would "
                                f"round it: pass {name}.to({self.dtype}) or create the memory with dtype={t.dtype}")
        if args.dim != self.location_dim:
            raise ValueError(f"loc has location dimension {args.dim} but the memory has location_dim {self.location_dim}")
        if args.values.shape[-1] != self.value_dim:
            raise ValueError(f"values have dimension {args.values.shape[-1]} but the memory has value_dim {self.value_dim}")
        d, E = self.location_dim, self.value_dim
        like = dict(dtype=self.dtype, device=self.device)
        loc = args.loc.reshape(-1, d).to(**like)
        sd = args.var.sqrt().expand(args.loc.shape).reshape(-1, d).to(**like)
        return loc, sd, args.values.reshape(-1, E).to(**like)

    def write(self, loc: Tensor, sd: Sd, values: Tensor, *, merge_radius: Optional[float] = None) -> None:
        """Stores observations: loc (..., N, d) or (d,), sd a float or a tensor broadcastable to
        loc, values (..., N, E) or (E,).

        Beyond max_size the oldest entries are dropped. With merge_radius, an observation whose
        nearest entry lies within merge_radius (Euclidean) is fused into it instead of appended:
        per dimension the precisions add, the location is the precision-weighted mean, and the
        value is the mean weighted by each side's total precision. The fused entry counts as newly
        written (it moves to the young end of the eviction order).
        """
        loc, sd, values = self._observations(loc, sd, values)
        if merge_radius is not None:
            if isinstance(merge_radius, bool) or not isinstance(merge_radius, (int, float)) or not merge_radius >= 0:
                raise ValueError(f"merge_radius must be a float >= 0 or None, got {merge_radius!r}")
            merge_radius = float(merge_radius)
        with self._lock:
            if merge_radius is None:
                self._append(loc, sd, values)
            else:
                for i in range(loc.shape[0]):
                    self._write_one_merging(loc[i], sd[i], values[i], merge_radius)
            self._evict()

    def _new_ids(self, n: int) -> Tensor:
        ids = torch.arange(self._next_id, self._next_id + n, dtype=torch.int64, device=self.device)
        self._next_id += n
        return ids

    def _append(self, loc, sd, values) -> None:
        self._set(torch.cat([self.loc, loc]), torch.cat([self.sd, sd]), torch.cat([self.values, values]),
                  torch.cat([self.ids, self._new_ids(loc.shape[0])]))

    def _write_one_merging(self, loc, sd, values, radius: float) -> None:
        if len(self):
            dist = torch.linalg.vector_norm(self.loc - loc, dim=-1)
            j = int(dist.argmin())
            if float(dist[j]) <= radius:
                loc, sd, values = fuse(self.loc[j], self.sd[j], self.values[j], loc, sd, values)
                keep = torch.arange(len(self), device=self.device) != j
                self._set(self.loc[keep], self.sd[keep], self.values[keep], self.ids[keep])
        self._append(loc[None], sd[None], values[None])

    def _evict(self) -> None:
        if self.max_size is not None and len(self) > self.max_size:
            # ids grow with write order and entries are kept in id order: the head is the oldest.
            n = self.max_size
            self._set(self.loc[-n:], self.sd[-n:], self.values[-n:], self.ids[-n:])

    # ---- read and sample -----------------------------------------------------------------------

    def read(self, query_loc: Tensor, query_sd: Sd, *, match_threshold: Optional[float] = None) -> Tensor:
        """gaussian_read over the current entries: (..., Q, d) -> (..., Q, E); (..., d) -> (..., E)."""
        loc, sd, values, _ = self.snapshot()
        mem_loc, mem_sd, mem_values = _broadcast_memory(loc, sd, values, query_loc)
        return kernels.gaussian_read(query_loc, query_sd, mem_loc, mem_sd, mem_values,
                                     match_threshold=match_threshold, backend=self.backend)

    def sample(self, search_key: Tensor, *, search_loc: Optional[Tensor] = None, search_sd: Optional[Sd] = None,
               num_samples: int = 1, temperature: float = 1.0, location_temperature: float = 1.0,
               sigma_scale: float = 1.0, match_threshold: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Locations whose values match a drive key (design.md §4): key (..., Q, E) or (..., E) ->
        (..., Q, S, d). search_loc/search_sd bias the draw towards a location."""
        loc, sd, values, _ = self.snapshot()
        mem_loc, mem_sd, mem_values = _broadcast_memory(loc, sd, values, search_key)
        return kernels.conditional_sample(
            mem_loc, mem_sd, mem_values, search_key, search_loc=search_loc, search_sd=search_sd,
            num_samples=num_samples, temperature=temperature, location_temperature=location_temperature,
            sigma_scale=sigma_scale, match_threshold=match_threshold, generator=generator, backend=self.backend,
        )

    def leave_one_out(self, *, match_threshold: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
        """(estimate (M, E), error (M,), num_dependencies (M,)): each entry read from the others."""
        loc, sd, values, _ = self.snapshot()
        return kernels.leave_one_out(loc, sd, values, match_threshold=match_threshold, backend=self.backend)

    # ---- prune ---------------------------------------------------------------------------------

    def prune(self, max_error: float, match_threshold: Optional[float] = None, max_steps: int = 10, *,
              background: bool = False) -> Union[int, PruneHandle]:
        """Removes entries the others predict within max_error (design.md §3).

        Returns the number removed; with background=True returns a PruneHandle at once, and reads
        and writes go on against the current entries until the pruned set is swapped in. Prunes
        run one at a time (the class docstring): a prune started while another runs waits for it
        and then prunes what the memory holds.
        """
        def run() -> int:
            with self._prune_lock:
                loc, sd, values, ids = self.snapshot()
                keep = kernels.prune_mask(loc, sd, values, max_error=max_error, match_threshold=match_threshold,
                                          max_steps=max_steps, backend=self.backend)
                return self._drop(ids[~keep])

        return PruneHandle(self, run) if background else run()

    def _drop(self, dropped_ids: Tensor) -> int:
        """Removes the entries with these ids if they are still here; returns how many were."""
        with self._lock:
            keep = ~torch.isin(self.ids, dropped_ids.to(self.ids.device))
            removed = len(self) - int(keep.sum())
            self._set(self.loc[keep], self.sd[keep], self.values[keep], self.ids[keep])
            return removed

    # ---- regress -------------------------------------------------------------------------------

    def regress(self, probe_loc: Tensor, probe_sd: Sd, target: Tensor, *, steps: int = 100, lr: float = 1e-3,
                match_threshold: Optional[float] = None, progress: bool = False) -> list[float]:
        """Moves the entries (locations, σ, values) so reads at the probes match `target` (e.g.
        the reads before a prune), by Adam on the mean squared read error through the read's
        backward kernels. σ is optimised as log σ so it stays positive. Returns the loss per step.
        """
        validation.check_tensor(target, "target", min_rank=1)
        with self._lock:
            loc, sd, values, ids = self.loc, self.sd, self.values, self.ids
            params = [loc.clone().requires_grad_(), sd.log().requires_grad_(), values.clone().requires_grad_()]
        optimizer = torch.optim.Adam(params, lr=lr)
        losses = []
        from tqdm.auto import trange

        for _ in trange(steps, desc="regress", disable=not progress):
            optimizer.zero_grad()
            read = kernels.gaussian_read(probe_loc, probe_sd, params[0], params[1].exp(), params[2],
                                         match_threshold=match_threshold, backend=self.backend)
            loss = (read - target).pow(2).sum(-1).mean()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        with self._lock:
            # Entries written meanwhile (another thread) keep their values; the refit ones are replaced.
            fitted = dict(zip(ids.tolist(), range(len(ids))))
            rows = [fitted.get(i, -1) for i in self.ids.tolist()]
            pick = torch.tensor(rows, dtype=torch.int64, device=self.device)
            has = pick >= 0
            with torch.no_grad():
                new = [p.detach()[pick.clamp(min=0)] for p in (params[0], params[1].exp(), params[2])]
                cur = (self.loc, self.sd, self.values)
                merged = [torch.where(has[:, None], n, c) for n, c in zip(new, cur)]
            self._set(*merged, self.ids)
        return losses

    # ---- persistence ---------------------------------------------------------------------------

    def config(self) -> dict:
        return dict(format=FORMAT, location_dim=self.location_dim, value_dim=self.value_dim, max_size=self.max_size,
                    backend=self.backend)

    def state_dict(self) -> dict:
        loc, sd, values, ids = self.snapshot()
        return dict(loc=loc, sd=sd, values=values, ids=ids, next_id=torch.tensor(self._next_id, dtype=torch.int64))

    def load_state_dict(self, state: dict) -> None:
        missing = {"loc", "sd", "values", "ids", "next_id"} - set(state)
        if missing:
            raise KeyError(f"state_dict is missing {sorted(missing)}")
        loc, sd, values = self._observations(state["loc"], state["sd"], state["values"])
        ids = state["ids"]
        if not isinstance(ids, Tensor) or ids.shape != (loc.shape[0],) or ids.dtype != torch.int64:
            raise ValueError(f"ids must be an int64 tensor of shape ({loc.shape[0]},)")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("ids must be strictly increasing (write order)")
        if ids.numel() and int(ids[0]) < 0:
            raise ValueError(f"ids must be >= 0, got {int(ids[0])}")
        next_id = state["next_id"]
        if isinstance(next_id, Tensor) and next_id.numel() == 1 and not next_id.is_floating_point():
            next_id = int(next_id)
        least = int(ids[-1]) + 1 if ids.numel() else 0
        if isinstance(next_id, bool) or not isinstance(next_id, int) or next_id < least:
            raise ValueError(f"next_id must be an int >= {least} (one past the largest id), got {state['next_id']!r}")
        if self.max_size is not None and loc.shape[0] > self.max_size:
            raise ValueError(f"the state holds {loc.shape[0]} entries but the memory's max_size is {self.max_size}")
        with self._lock:
            self._set(loc, sd, values, ids.to(self.device))
            self._next_id = next_id

    def save(self, path: PathLike) -> None:
        """Writes tensors and a JSON config with torch.save; `load` reads it with weights_only=True.

        Atomic: the file is written beside `path` under a temporary name, flushed to disk and
        renamed over `path`, so a crash (even kill -9) mid-save leaves the previous file intact."""
        path = Path(path)
        blob = dict(config=json.dumps(self.config()), state=self.state_dict())
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(blob, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)

    @classmethod
    def load(cls, path, *, device=None, backend: Optional[str] = None) -> "SpatialMemory":
        """Reads a file written by `save` (weights_only: no code runs) and checks it before use:
        its format, dimensions, max_size against the stored count, ids, next_id and backend."""
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or not isinstance(blob.get("config"), str) or \
                not isinstance(blob.get("state"), dict):
            raise ValueError(f"{path} is not a saved SpatialMemory (expected a config and a state)")
        try:
            config = json.loads(blob["config"])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} has an unreadable config: {exc}") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved SpatialMemory (format {config.get('format') if isinstance(config, dict) else None!r})")
        missing = {"location_dim", "value_dim", "max_size", "backend"} - set(config)
        if missing:
            raise ValueError(f"{path}: the config is missing {sorted(missing)}")
        loc = blob["state"].get("loc")
        if not isinstance(loc, Tensor):
            raise ValueError(f"{path}: the state has no loc tensor")
        memory = cls(config["location_dim"], config["value_dim"], max_size=config["max_size"], device=device,
                     dtype=loc.dtype, backend=backend or config["backend"])
        memory.load_state_dict(blob["state"])
        return memory

    def to(self, device: Device = None, dtype: Optional[torch.dtype] = None) -> "SpatialMemory":
        """Moves the entries (in place) and returns the memory."""
        if dtype is not None and dtype not in validation.LOCATION_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        with self._lock:
            move = dict(device=device, dtype=dtype)
            self._set(self.loc.to(**move), self.sd.to(**move), self.values.to(**move), self.ids.to(device=device))
        return self


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in `directory` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fuse(loc_a: Tensor, sd_a: Tensor, values_a: Tensor, loc_b: Tensor, sd_b: Tensor,
         values_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Precision-weighted fusion of two observations (the product of their Gaussians per dim)."""
    prec_a, prec_b = sd_a.pow(-2), sd_b.pow(-2)
    prec = prec_a + prec_b
    loc = (prec_a * loc_a + prec_b * loc_b) / prec
    weight_a, weight_b = prec_a.sum(), prec_b.sum()
    values = (weight_a * values_a + weight_b * values_b) / (weight_a + weight_b)
    return loc, prec.rsqrt(), values


def _broadcast_memory(loc: Tensor, sd: Tensor, values: Tensor, query: Tensor):
    """The (M, ·) memory with leading size-1 dims so it broadcasts against a batched query."""
    if not isinstance(query, Tensor):
        return loc, sd, values
    extra = max(query.dim() - 2, 0)
    shape = (1,) * extra
    return loc.reshape(*shape, *loc.shape), sd.reshape(*shape, *sd.shape), values.reshape(*shape, *values.shape)

