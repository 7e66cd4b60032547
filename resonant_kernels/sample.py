"""Conditional sampling from a Gaussian-kernel memory (design.md §4).

    logit_t = (y · z_t) · E^-½ / temperature  [+ log k(ℓ, ℓ_t) / location_temperature]
    t ~ Categorical(softmax(logit)),   sample = ℓ_t + sigma_scale · σ_t ⊙ ε,   ε ~ N(0, I)

Public entry points: `conditional_probs` and `conditional_sample`.

Fused-backend interface (what a backend registers with `register_impl`), all tensors flattened to
a batch B, contiguous or strided, on the backend's device:

    probs(key (B,Q,E), values (B,M,E), qloc (B,Q,d), qvar (B,Q,d), mloc (B,M,d), mvar (B,M,d),
          drive_scale, location_scale, threshold, uniform_var) -> probs (B,Q,M)
    indices(..., uniforms (B,Q,S) float64 in [0,1), same scalars) -> int64 (B,Q,S)

drive_scale = E^-½/temperature (0.0 when E = 0: an empty key matches every entry equally);
location_scale = 1/location_temperature, or 0.0 for no location term (qloc/qvar are then
zero-stride dummies); threshold < 0 means none; uniform_var is qv + mv when every variance is one
number (fast path), else -1. `indices` returns, per uniform u, the first entry whose cumulative
probability exceeds u · total (an inverse-CDF draw), so every backend turns the same uniforms into
the same entries up to rounding at bin edges.

A query row whose logits are not usable — a logit is NaN or +inf, or every logit is -inf, which
only an overflow in the dtype can cause (the all-masked fallback never leaves a row empty) — is
reported, not computed: `probs` writes NaN across the row and `indices` writes -1 for each of its
draws. The public functions turn that into a ValueError (`_raise_on_unusable_rows`), the same on
every backend. The random
numbers come from the caller's torch generator here, not from the kernels: a seed reproduces
the draws on every backend. The final gather and jitter (Q·S·d numbers) are done once, below,
in PyTorch, so they are differentiable in mem_loc and mem_sd (pathwise) for every backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _backends, _cpu, _validate, reference
from .read import uniform_variance

PROBS_OP = "conditional_probs"
SAMPLE_OP = "conditional_sample"


@dataclass
class SampleImpl:
    probs: callable
    indices: callable
    supports_dtypes: Optional[callable] = None


_IMPLS: dict[str, SampleImpl] = {}


def register_impl(backend: str, impl: SampleImpl) -> None:
    _IMPLS[backend] = impl
    _backends.register(backend, PROBS_OP, impl)
    _backends.register(backend, SAMPLE_OP, impl)


@torch.library.custom_op("resonant_kernels::conditional_probs_fused", mutates_args=())
def probs_fused(
    key: Tensor, values: Tensor, qloc: Tensor, qvar: Tensor, mloc: Tensor, mvar: Tensor,
    drive_scale: float, location_scale: float, threshold: float, uniform_var: float, backend: str,
) -> Tensor:
    return _IMPLS[backend].probs(key, values, qloc, qvar, mloc, mvar, drive_scale, location_scale, threshold,
                                 uniform_var)


@probs_fused.register_fake
def _(key, values, qloc, qvar, mloc, mvar, drive_scale, location_scale, threshold, uniform_var, backend):
    return mloc.new_empty((key.shape[0], key.shape[1], values.shape[1]))


@torch.library.custom_op("resonant_kernels::conditional_sample_indices", mutates_args=())
def indices_fused(
    key: Tensor, values: Tensor, qloc: Tensor, qvar: Tensor, mloc: Tensor, mvar: Tensor, uniforms: Tensor,
    drive_scale: float, location_scale: float, threshold: float, uniform_var: float, backend: str,
) -> Tensor:
    return _IMPLS[backend].indices(key, values, qloc, qvar, mloc, mvar, uniforms, drive_scale, location_scale,
                                   threshold, uniform_var)


@indices_fused.register_fake
def _(key, values, qloc, qvar, mloc, mvar, uniforms, drive_scale, location_scale, threshold, uniform_var, backend):
    return uniforms.new_empty(uniforms.shape, dtype=torch.int64)


@dataclass
class _Call:
    """A validated call, batch dims broadcast and flattened to B."""

    backend: str
    batch: torch.Size
    single: bool
    key: Tensor  # (B, Q, E)
    values: Tensor  # (B, M, E)
    mem_loc: Tensor  # (B, M, d)
    mem_var: Tensor  # (B, M, d)
    qloc: Optional[Tensor]  # (B, Q, d) or None without a search location
    qvar: Optional[Tensor]
    drive_scale: float
    location_scale: float  # 0.0: no location term
    threshold: Optional[float]
    uniform_var: float

    @property
    def shape(self):
        B, Q, E = self.key.shape
        return B, Q, self.values.shape[1], self.mem_loc.shape[2], E

    def fused_args(self):
        qloc, qvar = self.qloc, self.qvar
        if qloc is None:  # zero-stride dummies: the kernels never read them without a location term
            B, Q, _, d, _ = self.shape
            qloc = qvar = self.mem_loc.new_zeros(()).expand(B, Q, d)
        return (self.key, self.values, qloc, qvar, self.mem_loc, self.mem_var)

    def scalars(self):
        return (self.drive_scale, self.location_scale, -1.0 if self.threshold is None else self.threshold,
                self.uniform_var)

    def reference_logits(self):
        return reference.conditional_logits(
            self.key, self.values, self.drive_scale, self.qloc, self.qvar, self.mem_loc, self.mem_var,
            self.location_scale, self.threshold,
        )


def compute_dtype(mem: _validate.MemoryArgs) -> torch.dtype:
    """The dtype the logits are computed in on every backend: the locations' (at least float32)."""
    return torch.promote_types(torch.promote_types(mem.values.dtype, torch.float32), mem.loc.dtype)


def _logit_scales(mem: _validate.MemoryArgs, temperature, location_temperature) -> tuple[float, float]:
    """(drive_scale, location_scale), each finite in the compute dtype (else a ValueError naming the
    temperature and its smallest usable value)."""
    temperature = _validate.positive_number(temperature, "temperature")
    location_temperature = _validate.positive_number(location_temperature, "location_temperature")
    dtype = compute_dtype(mem)
    largest = torch.finfo(dtype).max
    E = mem.values.shape[-1]
    root = E ** -0.5 if E else 0.0
    for name, numerator, value in (("temperature", root, temperature), ("location_temperature", 1.0, location_temperature)):
        if numerator / value > largest:
            raise ValueError(f"{name} is {value:.4g}; it must be at least {numerator / largest:.4g} for "
                             f"{str(dtype).replace('torch.', '')} logits (their scale {numerator:.4g} / {name} "
                             f"must be a finite number)")
    return root / temperature, 1.0 / location_temperature


def _prepare(op, mem_loc, mem_sd, mem_values, search_key, search_loc, search_sd, temperature,
             location_temperature, match_threshold, backend) -> _Call:
    mem = _validate.memory(mem_loc, mem_sd, mem_values, value_dtypes=_validate.VALUE_DTYPES)
    key, single = _validate.search_key(search_key, mem)
    drive_scale, location_scale = _logit_scales(mem, temperature, location_temperature)
    threshold = _validate.match_threshold(match_threshold)
    if (search_loc is None) != (search_sd is None):
        raise ValueError("search_loc and search_sd must be given together (or neither)")
    shapes, names = [key.shape[:-1], mem.loc.shape[:-2] + (1,), mem.values.shape[:-2] + (1,)], \
        ["search_key", "mem_loc", "mem_values"]
    qloc = qvar = None
    if search_loc is not None:
        qloc, qvar, loc_single = _validate.queries(search_loc, search_sd, mem, loc_name="search_loc",
                                                   sd_name="search_sd")
        single = single and loc_single
        shapes.append(qloc.shape[:-1])
        names.append("search_loc")
    _validate.nonempty_memory(mem, op)
    rows = _validate.batch_shape(*shapes, names=names)
    batch, Q = rows[:-1], rows[-1]
    M, d, E = mem.size, mem.dim, mem.values.shape[-1]
    impl = _backends.select(op, backend, mem.loc.device, mem.loc.dtype, mem.values.dtype)
    flat = _validate.flatten_batch
    if qloc is not None:
        uniform = uniform_variance(qvar, mem.var)
        qloc, qvar = flat(qloc, batch, (Q, d)), flat(qvar, batch, (Q, d))
    else:
        uniform = -1.0
    return _Call(
        impl.name, batch, single, flat(key, batch, (Q, E)), flat(mem.values, batch, (M, E)),
        flat(mem.loc, batch, (M, d)), flat(mem.var, batch, (M, d)), qloc, qvar,
        drive_scale, 0.0 if qloc is None else location_scale, threshold, uniform,
    )


def _reference_probs(call: _Call) -> Tensor:
    """Softmax of the reference logits, NaN across unusable rows (see the module docstring)."""
    logits = call.reference_logits()
    usable = torch.isfinite(logits.amax(-1, keepdim=True))  # amax propagates NaN
    return torch.where(usable, torch.softmax(logits, dim=-1), torch.nan)


def _raise_on_unusable_rows(op: str, call: _Call, unusable: Tensor, temperature, location_temperature) -> None:
    """unusable (B, Q) bool: rows whose logits overflowed the compute dtype."""
    if not bool(unusable.any()):
        return
    B, Q = unusable.shape
    first = int(unusable.reshape(-1).nonzero()[0])
    where = f"query {first % Q}" + (f" of batch row {first // Q}" if B > 1 else "")
    terms = "(search_key · mem_values) · E^-½ / temperature"
    if call.qloc is not None:
        terms += " + log k(search_loc, mem_loc) / location_temperature"
    raise ValueError(
        f"{op}: the logits of {int(unusable.sum())} of {B * Q} queries (first: {where}) are not finite in "
        f"{str(call.mem_loc.dtype).replace('torch.', '')}: {terms} overflows (temperature={temperature}, "
        f"location_temperature={location_temperature}). Raise the temperatures, scale search_key down, "
        f"or use float64."
    )


def _probs(call: _Call) -> Tensor:
    if call.backend == "reference":
        return _reference_probs(call)
    # The fused kernels compute no gradient (the reference does): the result says so by not
    # requiring one, instead of failing at backward time.
    with torch.no_grad():
        return probs_fused(*call.fused_args(), *call.scalars(), call.backend)


def conditional_probs(
    mem_loc: Tensor, mem_sd, mem_values: Tensor, search_key: Tensor, *, search_loc: Optional[Tensor] = None,
    search_sd=None, temperature: float = 1.0, location_temperature: float = 1.0,
    match_threshold: Optional[float] = None, backend: str = "auto",
) -> Tensor:
    """The categorical distribution `conditional_sample` draws entries from: (..., Q, M).

    logit_t = (search_key · mem_values_t) · E^-½ / temperature, plus
    log k(search_loc, mem_loc_t) / location_temperature when search_loc (with search_sd) is given.
    match_threshold masks the location term of entries farther than θ (Euclidean); a query whose
    every entry is masked falls back to the drive term alone (never an empty distribution).
    search_key is (..., Q, E) or (..., E); search_loc (..., Q, d) or (..., d); with a single key and
    a single (or no) location the result is (..., M). Differentiable on the reference backend;
    fused backends (cpu, triton, cuda) return probabilities without a gradient.
    """
    call = _prepare(PROBS_OP, mem_loc, mem_sd, mem_values, search_key, search_loc, search_sd, temperature,
                    location_temperature, match_threshold, backend)
    B, Q, M, _, _ = call.shape
    probs = _probs(call)
    _raise_on_unusable_rows(PROBS_OP, call, torch.isnan(probs[..., 0]), temperature, location_temperature)
    out = probs.reshape(*call.batch, Q, M)
    return out.squeeze(-2) if call.single else out


def conditional_sample(
    mem_loc: Tensor, mem_sd, mem_values: Tensor, search_key: Tensor, *, search_loc: Optional[Tensor] = None,
    search_sd=None, num_samples: int = 1, temperature: float = 1.0, location_temperature: float = 1.0,
    sigma_scale: float = 1.0, match_threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None, backend: str = "auto",
) -> Tensor:
    """Draw locations whose remembered values match a search key, biased towards a search location.

    Each of num_samples draws picks an entry t from `conditional_probs(...)` (see there for the
    logits, the threshold and the all-masked fallback to the drive term alone) and returns
    mem_loc_t + sigma_scale · mem_sd_t ⊙ ε with ε ~ N(0, I). Shape (..., Q, S, d), or (..., S, d) for
    a single key (and a single or no location). The random numbers come from `generator` (or
    torch's default one), so a seeded generator reproduces the samples on a backend; the same
    seed gives the same draws on every backend up to rounding at bin edges. The choice of entry is
    not differentiable; the jitter is (pathwise) in mem_loc and mem_sd. An empty memory (M = 0)
    raises a ValueError.
    """
    call = _prepare(SAMPLE_OP, mem_loc, mem_sd, mem_values, search_key, search_loc, search_sd, temperature,
                    location_temperature, match_threshold, backend)
    S = _validate.positive_count(num_samples, "num_samples")
    sigma_scale = _validate.nonnegative_number(sigma_scale, "sigma_scale")
    device = call.mem_loc.device
    _validate.check_generator(generator, device)
    B, Q, M, d, _ = call.shape
    uniforms = torch.rand((B, Q, S), generator=generator, dtype=torch.float64, device=device)
    noise = torch.randn((B, Q, S, d), generator=generator, dtype=call.mem_loc.dtype, device=device)
    if call.backend == "reference":
        with torch.no_grad():
            probs = _reference_probs(call)
            _raise_on_unusable_rows(SAMPLE_OP, call, torch.isnan(probs[..., 0]), temperature, location_temperature)
            idx = reference.inverse_cdf(probs, uniforms)
    else:
        idx = indices_fused(*call.fused_args(), uniforms, *call.scalars(), call.backend)
        _raise_on_unusable_rows(SAMPLE_OP, call, (idx[..., :1] < 0).any(-1), temperature, location_temperature)
    gather_idx = idx.reshape(B, Q * S, 1).expand(B, Q * S, d)
    centres = torch.gather(call.mem_loc, 1, gather_idx)
    spreads = torch.gather(call.mem_var.expand(B, M, d), 1, gather_idx).sqrt()
    samples = (centres + sigma_scale * spreads * noise.reshape(B, Q * S, d)).reshape(*call.batch, Q, S, d)
    return samples.squeeze(-3) if call.single else samples


# ---- cpu backend (csrc/sample_cpu.cpp) --------------------------------------------------------

def _cpu_shape(key, values, qloc, drive_scale, location_scale, threshold, uniform_var, S=0):
    B, Q, E = key.shape
    M, d = values.shape[1], qloc.shape[2]
    return _cpu.module().SampleShape(B, Q, M, d, E, S, drive_scale, location_scale, threshold, uniform_var)


def _cpu_probs(key, values, qloc, qvar, mloc, mvar, *scalars):
    probs = mloc.new_empty((key.shape[0], key.shape[1], values.shape[1]))
    a = _cpu.arr
    _cpu.module().conditional_probs(
        _cpu.dtype_name(mloc), _cpu_shape(key, values, qloc, *scalars),
        a(key), a(values), a(qloc), a(qvar), a(mloc), a(mvar), probs.data_ptr(),
    )
    return probs


def _cpu_indices(key, values, qloc, qvar, mloc, mvar, uniforms, *scalars):
    uniforms = uniforms.contiguous()
    idx = torch.empty(uniforms.shape, dtype=torch.int64)
    a = _cpu.arr
    _cpu.module().conditional_sample_indices(
        _cpu.dtype_name(mloc), _cpu_shape(key, values, qloc, *scalars, S=uniforms.shape[2]),
        a(key), a(values), a(qloc), a(qvar), a(mloc), a(mvar), uniforms.data_ptr(), idx.data_ptr(),
    )
    return idx


_backends.register("reference", PROBS_OP, reference.conditional_logits)
_backends.register("reference", SAMPLE_OP, reference.conditional_logits)
register_impl("cpu", SampleImpl(_cpu_probs, _cpu_indices, _cpu.same_float_dtypes))
