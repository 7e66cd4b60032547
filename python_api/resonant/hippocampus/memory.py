"""PatternMemory: pattern completion from partial cues on Gaussian-kernel reads.

The stored patterns x_1..x_N are both the locations and the values of a Gaussian-kernel memory.
A cue q is cleaned by reading the memory at q,

    x̂ = Σ_t softmax_t(−½ Σ_j (q_j − x_tj)² / v_j) x_t,      v_j = exp(−log β − ρ_j),

which is one update of a modern (dense) Hopfield network with per-unit precisions: β is the
inverse temperature (kernel width), ρ the per-unit log-precisions (zero mean, so β alone sets the
overall width). Binary patterns are made binary again by k-winners-take-all with the training
set's activity, and the read is iterated from the result until a fixed point.

Reads and training run through `resonant_kernels.gaussian_read` (the fused kernels and their
backward): `train` fits β and ρ by gradient descent on randomly corrupted copies of the
training patterns.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import resonant_kernels as kernels

from ..types import ArrayLike, Device
from . import patterns as patgen

# Magnitude limits that keep every squared distance / variance of a float32 read finite (the
# variance floor below, times e^±(LOG_RANGE) after training, over num_units ≤ MAX_UNITS units).
MAX_ABS_VALUE = 1e6
MIN_VARIANCE = 1e-12
MAX_UNITS = 1 << 16
LOG_RANGE = 8.0  # log β and each ρ_j stay within ±LOG_RANGE of their starting values
RHO_LR = 0.1  # ρ's learning rate relative to β's: Adam moves every ρ_j as fast as β otherwise
IDENTITY_DIM = 256
TIE_SEED = 1323
RTOL, ATOL = 1e-5, 1e-8  # a unit is recalled correctly when isclose(recalled, target) (numpy's defaults)


@dataclass
class PatternTest:
    """What `test_pattern` returns (one row per cue; no batch axis for a single cue).

    recalled: the recalled patterns; distance: the number of units where the recall differs from
    the target (not isclose); closest_index / closest_pattern: the training pattern nearest to the
    recall (Euclidean, so for binary patterns the one with the fewest differing units), the lowest
    index on ties.
    """

    recalled: Tensor
    distance: Tensor
    closest_index: Tensor
    closest_pattern: Tensor


def _positive_int(value, name: str, *, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum and value > maximum):
        bound = f" and <= {maximum}" if maximum else ""
        raise ValueError(f"{name} must be an int >= 1{bound}, got {value!r}")
    return value


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def kwta(x: Tensor, k: int, tie_order: Optional[Tensor] = None) -> Tensor:
    """k-winners-take-all per row: 1 at the k largest entries, else 0. Among equal entries the one
    earliest in `tie_order` (a permutation of the units; default: unit order) wins."""
    if k <= 0:
        return torch.zeros_like(x)
    if tie_order is None:
        tie_order = torch.arange(x.shape[-1], device=x.device)
    # a stable descending sort of the units in tie order: equal entries keep that order
    ranked = x.index_select(-1, tie_order).argsort(dim=-1, descending=True, stable=True)[..., :k]
    return torch.zeros_like(x).scatter_(-1, tie_order[ranked], 1.0)


def tie_order(num_units: int) -> Tensor:
    """The fixed pseudo-random unit order PatternMemory's k-WTA breaks ties in. A read that blends
    two patterns equally ties all their unshared units; a tie order that follows unit index would
    favour whichever pattern has more low-index units, which correlates with cues made by
    switching off the *first* active units (the seed experiment's) and would credit the memory
    with recalls the cue does not support."""
    return torch.randperm(num_units, generator=torch.Generator().manual_seed(TIE_SEED))


def mismatches(a: Tensor, b: Tensor) -> Tensor:
    """Units where a and b differ (not isclose), counted over the last axis."""
    return (~torch.isclose(a, b, rtol=RTOL, atol=ATOL)).sum(-1)


class PatternMemory:
    """An associative memory of patterns of `num_units` units, recalled from partial cues.

    `update(patterns)` replaces the training set; `train(epochs, runs)` fits the kernel width and
    per-unit precisions; `recall(cues)` completes cues; `test_pattern` and `step` are the seed
    service's test operations. Every read runs through `resonant_kernels.gaussian_read` on
    `backend`. Thread-safe: operations take a snapshot of the training set and parameters, and
    `update`/`train` swap new ones in only once they are complete.
    """

    def __init__(self, num_units: int, *, backend: str = "auto", device: Device = None,
                 dtype: torch.dtype = torch.float32):
        self.num_units = _positive_int(num_units, "num_units", maximum=MAX_UNITS)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        self.backend, self.dtype = backend, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._lock = threading.RLock()
        self._state: Optional[_State] = None
        self.tie_order = tie_order(num_units).to(self.device)

    # ---- state ------------------------------------------------------------------------------------

    def _snapshot(self, op: str) -> "_State":
        state = self._state
        if state is None:
            raise ValueError(f"{op}: the memory has no training set; call update(patterns) first")
        return state

    @property
    def patterns(self) -> Optional[Tensor]:
        """The training set (N, num_units), or None before the first update."""
        return None if self._state is None else self._state.patterns

    @property
    def binary(self) -> Optional[bool]:
        return None if self._state is None else self._state.binary

    @property
    def activity(self) -> Optional[int]:
        """Active units a binary recall keeps (the training set's mean, rounded); None for real patterns."""
        return None if self._state is None or not self._state.binary else self._state.activity

    @property
    def inverse_temperature(self) -> float:
        """β: the softmax sharpness of a read (1 / the kernel variance, averaged over units)."""
        return float(self._snapshot("inverse_temperature").log_beta.exp())

    @property
    def precisions(self) -> Tensor:
        """Per-unit relative precisions exp(ρ_j) (geometric mean 1); the kernel variance of unit j is
        1 / (β exp(ρ_j))."""
        return self._snapshot("precisions").log_precision.exp()

    @property
    def trained(self) -> bool:
        return self._state is not None and self._state.trained

    def __len__(self) -> int:
        return 0 if self._state is None else self._state.patterns.shape[0]

    def __repr__(self) -> str:
        kind = "untrained" if not self.trained else f"β={self.inverse_temperature:.3g}"
        return (f"PatternMemory(num_units={self.num_units}, patterns={len(self)}, binary={self.binary}, {kind}, "
                f"backend={self.backend!r})")

    # ---- input checks -----------------------------------------------------------------------------

    def _rows(self, x, name: str) -> tuple[Tensor, bool]:
        """x as a (rows, num_units) tensor of the memory's dtype/device; single says x was one row."""
        if isinstance(x, Tensor):
            t = x.detach()
        else:
            try:
                t = torch.as_tensor(x, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"{name} must be a tensor or a nested list of numbers ({exc})") from None
        if t.dtype.is_complex:
            raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
        if t.dim() not in (1, 2):
            raise ValueError(f"{name} must have shape (num_units,) or (rows, num_units), got {tuple(t.shape)}")
        single = t.dim() == 1
        t = t.reshape(1, -1) if single else t
        if t.shape[-1] != self.num_units:
            raise ValueError(f"{name} has {t.shape[-1]} units per pattern but the memory has num_units={self.num_units}")
        t = t.to(device=self.device, dtype=self.dtype)
        if t.numel():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
            biggest = float(t.abs().max())
            if biggest > MAX_ABS_VALUE:
                raise ValueError(f"{name} has a value of magnitude {biggest:.3g}; values must lie within "
                                 f"±{MAX_ABS_VALUE:g} (rescale the patterns)")
        return t, single

    def _pair(self, a, b, name_a: str, name_b: str) -> tuple[Tensor, Tensor, bool]:
        a, single = self._rows(a, name_a)
        b, _ = self._rows(b, name_b)
        if a.shape != b.shape:
            raise ValueError(f"{name_a} has {a.shape[0]} rows but {name_b} has {b.shape[0]}")
        return a, b, single

    # ---- update -----------------------------------------------------------------------------------

    def update(self, patterns: ArrayLike, *, binary: Optional[bool] = None) -> None:
        """Replaces the training set with `patterns` (N, num_units), binary {0, 1} or real.

        binary=None detects it (every value 0 or 1); binary=True requires it; binary=False treats
        0/1 patterns as real (recall without k-winners-take-all). Resets the trained parameters to
        the untrained ones of the new set. Nothing changes when the call raises.
        """
        x, _ = self._rows(patterns, "patterns")
        if x.shape[0] == 0:
            raise ValueError("patterns is empty: the training set needs at least one pattern")
        if binary is not None and not isinstance(binary, bool):
            raise TypeError(f"binary must be True, False or None, got {binary!r}")
        is_binary = bool(((x == 0) | (x == 1)).all())
        if binary and not is_binary:
            bad = x[(x != 0) & (x != 1)][0]
            raise ValueError(f"patterns must be binary (every value 0 or 1) with binary=True; found {float(bad):g}")
        state = _State.initial(x.clone(), is_binary if binary is None else binary)
        with self._lock:
            self._state = state

    def set_parameters(self, *, inverse_temperature: Optional[float] = None,
                       precisions: Optional[ArrayLike] = None) -> None:
        """Sets the kernel by hand (instead of `train`): the variance of unit j becomes
        1 / (inverse_temperature · precisions[j]). Either may be left as it is (None). Precisions
        are stored relative to their geometric mean, which moves into the inverse temperature."""
        with self._lock:
            state = self._snapshot("set_parameters")
            log_beta, rho = state.log_beta, state.log_precision
            if inverse_temperature is not None:
                if isinstance(inverse_temperature, bool) or not isinstance(inverse_temperature, (int, float)) or \
                        not 0 < inverse_temperature < math.inf:
                    raise ValueError(f"inverse_temperature must be a positive finite number, got {inverse_temperature!r}")
                log_beta = torch.tensor(math.log(inverse_temperature), dtype=self.dtype, device=self.device)
            if precisions is not None:
                p = torch.as_tensor(precisions, dtype=self.dtype, device=self.device)
                if p.shape != (self.num_units,) or not bool(torch.isfinite(p).all() and (p > 0).all()):
                    raise ValueError(f"precisions must be {self.num_units} positive finite numbers, got shape "
                                     f"{tuple(p.shape)}")
                log_p = p.log()
                log_beta, rho = log_beta + log_p.mean(), log_p - log_p.mean()
            self._state = state.with_parameters(log_beta, rho)

    # ---- reads ------------------------------------------------------------------------------------

    def _read(self, state: "_State", cues: Tensor, log_beta: Tensor, log_precision: Tensor,
              values: Optional[Tensor] = None) -> Tensor:
        """One Gaussian-kernel read at the cues over the stored patterns, of their `values` (the
        patterns themselves by default); differentiable in β and ρ."""
        variance = torch.exp(-log_beta - log_precision)  # (num_units,)
        sd = (variance * 0.5).sqrt()  # query and entry σ alike: σ_q² + σ_m² = v
        if not sd.requires_grad and bool((log_precision == log_precision[0]).all()):
            sd = float(sd[0])  # one shared variance: the kernels' uniform fast path
        values = state.patterns if values is None else values
        out = kernels.gaussian_read(cues, sd, state.patterns, sd, values, backend=self.backend)
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError(f"gaussian_read (backend={self.backend!r}) returned non-finite values for finite "
                               f"inputs (β={float(log_beta.exp()):.4g}); please report this")
        return out

    def _clean(self, state: "_State", read: Tensor) -> Tensor:
        return kwta(read, state.activity, self.tie_order) if state.binary else read

    def _recall(self, state: "_State", cues: Tensor, steps: int) -> Tensor:
        out = cues.clone()
        pending = torch.arange(cues.shape[0], device=cues.device)  # cues not yet at a fixed point
        for _ in range(steps):
            if pending.numel() == 0:
                break
            current = out[pending]
            new = self._clean(state, self._read(state, current, state.log_beta, state.log_precision))
            moved = mismatches(new, current) > 0
            out[pending] = new
            pending = pending[moved]
        return out

    @torch.no_grad()
    def recall(self, cues: ArrayLike, steps: int = 10) -> Tensor:
        """Completes cues (num_units,) or (Q, num_units): reads the memory at each cue, cleans the
        read (k-winners-take-all for binary patterns) and repeats from the result until it stops
        changing or `steps` reads were made. Returns the recalled patterns, shaped like cues."""
        state = self._snapshot("recall")
        cues, single = self._rows(cues, "cues")
        steps = _positive_int(steps, "steps", maximum=10_000)
        out = self._recall(state, cues, steps)
        return out[0] if single else out

    def closest(self, recalled: ArrayLike) -> tuple[Tensor, Tensor]:
        """(index (Q,), squared distance (Q,)) of the training pattern nearest (Euclidean) to each
        row of `recalled`, the lowest index on ties; for binary rows, the one with the fewest
        differing units."""
        state = self._snapshot("closest")
        rows, single = self._rows(recalled, "recalled")
        index, distance = patgen.nearest(state.patterns, rows)
        return (index[0], distance[0]) if single else (index, distance)

    @torch.no_grad()
    def test_pattern(self, corrupted: ArrayLike, target: ArrayLike, *, steps: int = 10) -> PatternTest:
        """The seed's "Test Pattern": recalls from `corrupted` and reports the recall, its distance
        (units differing) to `target`, and the training pattern closest to the recall. Batched
        over rows when corrupted and target are (Q, num_units)."""
        state = self._snapshot("test_pattern")
        corrupted, target, single = self._pair(corrupted, target, "corrupted", "target")
        recalled = self._recall(state, corrupted, _positive_int(steps, "steps", maximum=10_000))
        index, _ = patgen.nearest(state.patterns, recalled)
        result = PatternTest(recalled, mismatches(recalled, target), index, state.patterns[index])
        if single:
            result = PatternTest(*(getattr(result, f)[0] for f in ("recalled", "distance", "closest_index",
                                                                  "closest_pattern")))
        return result

    @torch.no_grad()
    def step(self, cues: ArrayLike, targets: ArrayLike, repeats: int = 1, *, steps: int = 10) -> Tensor:
        """The seed's gym-like "Step": per cue, the mean over `repeats` tests of the reward
        num_units − (units recalled wrongly). Recall here is deterministic, so every repeat scores
        the same and one test is computed. Returns a float tensor (Q,) (0-d for a single cue)."""
        _positive_int(repeats, "repeats", maximum=1_000_000)
        result = self.test_pattern(cues, targets, steps=steps)
        return (self.num_units - result.distance).to(self.dtype)

    # ---- train ------------------------------------------------------------------------------------

    def train(self, epochs: int = 20, runs: int = 1, *, max_corruption: float = 0.9, copies: int = 16,
              batch_size: int = 256, lr: float = 0.1, seed: Optional[int] = None, progress: bool = False) -> float:
        """Fits the inverse temperature β and the per-unit log-precisions ρ by Adam, through the
        read's backward kernels, so that a read at a randomly corrupted copy of a training pattern
        puts its weight on that pattern. Returns the seconds it took.

        The loss is the squared error of a read of identity codes (one per stored pattern:
        one-hot for up to IDENTITY_DIM patterns, random ±1/√IDENTITY_DIM codes beyond), i.e. the
        Brier score of the read's weights: it counts confusing two similar patterns as much as two
        different ones, which the read's error in pattern space would not. Each epoch shows every
        pattern `copies` times, each copy with a random fraction r ~ U(0, max_corruption) of its
        units switched off (of its active units for binary patterns), in minibatches of
        `batch_size`. `runs` are independent restarts (the first from the untrained parameters,
        the others from random ones); the run that recalls most of a fixed validation set of
        corrupted copies (ties: lower loss) is kept (with one run there is nothing to choose, and
        no validation set is made).
        """
        start = time.perf_counter()
        state = self._snapshot("train")
        epochs = _positive_int(epochs, "epochs", maximum=100_000)
        runs = _positive_int(runs, "runs", maximum=1_000)
        copies = _positive_int(copies, "copies", maximum=100_000)
        batch_size = _positive_int(batch_size, "batch_size", maximum=1 << 20)
        max_corruption = _fraction(max_corruption, "max_corruption")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))

        corrupt = _Corruptor(state, max_corruption)
        codes = identity_codes(len(state.patterns), gen, dtype=self.dtype, device=self.device)
        validation = corrupt.copies(torch.arange(len(state.patterns)).repeat(copies), gen) if runs > 1 else None
        best: Optional[tuple] = None
        from tqdm.auto import tqdm

        bar = tqdm(total=runs * epochs, desc="train", unit="epoch", disable=not progress)
        for run in range(runs):
            log_beta, log_precision = self._fit(state, run, epochs, copies, batch_size, float(lr), corrupt, codes,
                                                gen, bar)
            score = self._validate(state, validation, codes, log_beta, log_precision) if runs > 1 else ()
            if best is None or score > best[0]:
                best = (score, log_beta, log_precision)
        bar.close()
        trained = state.with_parameters(best[1], best[2])
        with self._lock:
            if self._state is state:  # an update() meanwhile wins: its new set is not ours to overwrite
                self._state = trained
        return time.perf_counter() - start

    def _fit(self, state, run, epochs, copies, batch_size, lr, corrupt, codes, gen, bar):
        n = len(state.patterns)
        log_beta0, D = state.initial_log_beta, self.num_units
        if run == 0:
            init_beta, init_rho = log_beta0.clone(), torch.zeros(D, dtype=self.dtype, device=self.device)
        else:  # a random restart: another width and random per-unit precisions
            init_beta = log_beta0 + (torch.rand((), generator=gen) * 4 - 2).to(log_beta0)
            init_rho = (torch.randn(D, generator=gen) * 0.3).to(log_beta0)
        log_beta = init_beta.clone().requires_grad_()
        raw_rho = init_rho.clone().requires_grad_()
        optimizer = torch.optim.Adam([dict(params=[log_beta], lr=lr), dict(params=[raw_rho], lr=lr * RHO_LR)])
        for _ in range(epochs):
            order = torch.arange(n).repeat(copies)[torch.randperm(n * copies, generator=gen)]
            for rows in order.split(batch_size):
                cues, rows = corrupt.copies(rows, gen)
                with torch.enable_grad():
                    read = self._read(state, cues, log_beta, raw_rho - raw_rho.mean(), codes)
                    loss = (read - codes[rows]).pow(2).sum(-1).mean()
                    optimizer.zero_grad()
                    loss.backward()
                optimizer.step()
                with torch.no_grad():
                    log_beta.clamp_(float(log_beta0) - LOG_RANGE, float(log_beta0) + LOG_RANGE)
                    raw_rho.clamp_(-LOG_RANGE, LOG_RANGE)
            bar.update()
        rho = (raw_rho - raw_rho.mean()).detach()
        return log_beta.detach(), rho

    @torch.no_grad()
    def _validate(self, state, validation, codes, log_beta, log_precision) -> tuple[float, float]:
        cues, rows = validation
        candidate = state.with_parameters(log_beta, log_precision)
        index, _ = patgen.nearest(state.patterns, self._recall(candidate, cues, steps=10))
        hits = float((state.patterns[index] == state.patterns[rows]).all(-1).double().mean())
        loss = float((self._read(candidate, cues, log_beta, log_precision, codes) - codes[rows]).pow(2).sum(-1).mean())
        return hits, -loss


@dataclass(frozen=True)
class _State:
    """A training set and the parameters fitted to it, replaced whole (never modified in place)."""

    patterns: Tensor
    binary: bool
    activity: int
    initial_log_beta: Tensor
    log_beta: Tensor
    log_precision: Tensor
    trained: bool = False

    @classmethod
    def initial(cls, patterns: Tensor, binary: bool) -> "_State":
        # Untrained width: the kernel variance equals the patterns' mean per-unit variance (their
        # spread), so a read is as sharp for patterns of any scale and any number of units.
        spread = patterns.double().var(dim=0, unbiased=False).mean() if len(patterns) > 1 else patterns.new_zeros(())
        if float(spread) <= 0:
            spread = patterns.double().pow(2).mean()
        variance = max(float(spread), MIN_VARIANCE) if float(spread) > 0 else 1.0
        log_beta = torch.tensor(-math.log(variance), dtype=patterns.dtype, device=patterns.device)
        activity = int(round(float((patterns != 0).sum(-1).double().mean()))) if binary else 0
        rho = torch.zeros(patterns.shape[-1], dtype=patterns.dtype, device=patterns.device)
        return cls(patterns, binary, activity, log_beta, log_beta, rho)

    def with_parameters(self, log_beta: Tensor, log_precision: Tensor) -> "_State":
        return _State(self.patterns, self.binary, self.activity, self.initial_log_beta, log_beta.detach(),
                      log_precision.detach(), trained=True)


class _Corruptor:
    """Randomly corrupted copies of training patterns (cues, targets) for training and validation."""

    def __init__(self, state: _State, max_corruption: float):
        self.patterns, self.max_corruption = state.patterns, max_corruption
        self.units = "active" if state.binary else "all"

    def copies(self, rows: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """(cues, rows): a corrupted copy of each listed training pattern, and the list."""
        rows = rows.to(self.patterns.device)
        ratio = torch.rand(len(rows), generator=gen, dtype=torch.float64) * self.max_corruption
        return patgen.switch_off_random(self.patterns[rows], ratio, units=self.units, generator=gen), rows


def identity_codes(n: int, gen: torch.Generator, *, dtype, device) -> Tensor:
    """(n, min(n, IDENTITY_DIM)) codes: the identity matrix, or random ±1/√IDENTITY_DIM rows (nearly
    orthogonal) when n is larger, so the training read stays IDENTITY_DIM wide at any n."""
    if n <= IDENTITY_DIM:
        return torch.eye(n, dtype=dtype, device=device)
    signs = torch.randint(0, 2, (n, IDENTITY_DIM), generator=gen).to(dtype) * 2 - 1
    return (signs / math.sqrt(IDENTITY_DIM)).to(device)
