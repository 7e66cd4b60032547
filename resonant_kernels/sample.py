"""Conditional sampling from a Gaussian-kernel memory (design.md §4).

    logit_t = (y · z_t) · E^-½ / temperature  [+ log k(ℓ, ℓ_t) / location_temperature]
    t ~ Categorical(softmax(logit)),   sample = ℓ_t + sigma_scale · σ_t ⊙ ε,   ε ~ N(0, I)

Public entry points: `conditional_probs` and `conditional_sample`. Their kernels (custom ops, one
implementation per backend, docs/architecture.md), all tensors flattened to a batch B, contiguous
or strided, on the backend's device:

    sample_probs(key (B,Q,E), values (B,M,E), qloc (B,Q,d), qvar (B,Q,d), mloc (B,M,d), mvar (B,M,d),
                 drive_scale, location_scale, threshold, uniform_var) -> probs (B,Q,M)
    sample_indices(..., uniforms (B,Q,S) float64 in [0,1), same scalars) -> int64 (B,Q,S)

drive_scale = E^-½/temperature (0.0 when E = 0: an empty key matches every entry equally);
location_scale = 1/location_temperature, or 0.0 for no location term (qloc/qvar are then
zero-stride dummies); threshold < 0 means none; uniform_var is qv + mv when every variance is one
number (fast path), else -1. `sample_indices` returns, per uniform u, the first entry whose
cumulative probability exceeds u · total (an inverse-CDF draw), so every backend turns the same
uniforms into the same entries up to rounding at bin edges.

A query row whose logits are not usable — a logit is NaN or +inf, or every logit is -inf, which
only an overflow in the dtype can cause (the all-masked fallback never leaves a row empty) — is
reported, not computed: `sample_probs` writes NaN across the row and `sample_indices` writes -1
for each of its draws. Where value checks run (validation.value_checks) the public functions turn
that into a ValueError, the same on every backend; elsewhere the row's probabilities and samples
are NaN (no device sync).

`sample_probs` is differentiable on every backend: its autograd formula is the softmax and
log-kernel chain in PyTorch (`_probs_backward`), which materialises (chunk, M, d) for the location
term, chunked over queries. `sample_indices` is not (integer draws). The random numbers come
from the caller's torch generator, not from the kernels: a seed reproduces the draws on every
backend. The final gather and jitter (Q·S·d numbers) are done once, below, in PyTorch, so they are
differentiable in mem_loc and mem_sd (pathwise) for every backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _registry, reference, validation

PROBS_OP = "conditional_probs"
SAMPLE_OP = "conditional_sample"


@torch.library.custom_op("resonant_kernels::sample_probs", mutates_args=())
def sample_probs(
    key: Tensor, values: Tensor, qloc: Tensor, qvar: Tensor, mloc: Tensor, mvar: Tensor,
    drive_scale: float, location_scale: float, threshold: float, uniform_var: float, backend: str,
) -> Tensor:
    return _registry.implementation("sample_probs", backend)(key, values, qloc, qvar, mloc, mvar, drive_scale,
                                                            location_scale, threshold, uniform_var)


@sample_probs.register_fake
def _(key, values, qloc, qvar, mloc, mvar, drive_scale, location_scale, threshold, uniform_var, backend):
    return mloc.new_empty((key.shape[0], key.shape[1], values.shape[1]))


# Queries per chunk of the location term's backward: chunk × M × d numbers at a time.
_BACKWARD_CHUNK_NUMBERS = 1 << 22


def _probs_backward(ctx, grad_probs):
    """The softmax backward, then the drive term's (two products) and the location term's (the
    log-kernel chain over chunks of queries)."""
    key, values, qloc, qvar, mloc, mvar, probs = ctx.saved_tensors
    drive_scale, location_scale, threshold = ctx.scalars
    g = grad_probs.to(probs.dtype)
    dlogit = probs * (g - (probs * g).sum(-1, keepdim=True))
    drive = dlogit * drive_scale
    grad_key = (drive.to(values.dtype) @ values).to(key.dtype)
    grad_values = (drive.transpose(-1, -2).to(key.dtype) @ key).to(values.dtype)
    if location_scale <= 0:
        return grad_key, grad_values, None, None, None, None, None, None, None, None, None
    grads = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (qloc, qvar, mloc, mvar)]
    B, Q, M = probs.shape
    chunk = max(1, _BACKWARD_CHUNK_NUMBERS // max(1, M * qloc.shape[-1]))
    thr = None if threshold < 0 else threshold
    for q0 in range(0, Q, chunk):
        rows = slice(q0, q0 + chunk)
        ql, qv = qloc[:, rows], qvar[:, rows]
        # a query the threshold leaves with nothing has no location term (the drive alone)
        matched = reference.within_threshold(ql, mloc, thr).any(-1, keepdim=True)
        d_logk = torch.where(matched, dlogit[:, rows] * location_scale, 0.0)
        g_ql, g_qv, g_ml, g_mv = reference.log_kernel_vjp(d_logk, ql, qv, mloc, mvar)
        grads[0][:, rows], grads[1][:, rows] = g_ql, g_qv
        grads[2] += g_ml
        grads[3] += g_mv
    return grad_key, grad_values, *grads, None, None, None, None, None


def _probs_setup_context(ctx, inputs, output):
    key, values, qloc, qvar, mloc, mvar, drive_scale, location_scale, threshold, _, _ = inputs
    ctx.save_for_backward(key, values, qloc, qvar, mloc, mvar, output)
    ctx.scalars = (drive_scale, location_scale, threshold)


sample_probs.register_autograd(_probs_backward, setup_context=_probs_setup_context)


@torch.library.custom_op("resonant_kernels::sample_indices", mutates_args=())
def sample_indices(
    key: Tensor, values: Tensor, qloc: Tensor, qvar: Tensor, mloc: Tensor, mvar: Tensor, uniforms: Tensor,
    drive_scale: float, location_scale: float, threshold: float, uniform_var: float, backend: str,
) -> Tensor:
    """Not differentiable (integer draws): no autograd formula; conditional_sample calls it under
    torch.no_grad()."""
    return _registry.implementation("sample_indices", backend)(key, values, qloc, qvar, mloc, mvar, uniforms,
                                                              drive_scale, location_scale, threshold, uniform_var)


@sample_indices.register_fake
def _(key, values, qloc, qvar, mloc, mvar, uniforms, drive_scale, location_scale, threshold, uniform_var, backend):
    return uniforms.new_empty(uniforms.shape, dtype=torch.int64)


@dataclass
class _Call:
    """A validated call, batch dims broadcast and flattened to B."""

    backend: str
    batch: torch.Size
    single: bool
    check: bool  # value checks on (validation.value_checks)
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

    def kernel_args(self):
        qloc, qvar = self.qloc, self.qvar
        if qloc is None:  # zero-stride dummies: the kernels never read them without a location term
            B, Q, _, d, _ = self.shape
            qloc = qvar = self.mem_loc.new_zeros(()).expand(B, Q, d)
        return (self.key, self.values, qloc, qvar, self.mem_loc, self.mem_var)

    def scalars(self):
        return (self.drive_scale, self.location_scale, -1.0 if self.threshold is None else self.threshold,
                self.uniform_var)


def compute_dtype(mem: validation.MemoryArgs) -> torch.dtype:
    """The dtype the logits are computed in on every backend: the locations' (at least float32)."""
    return torch.promote_types(torch.promote_types(mem.values.dtype, torch.float32), mem.loc.dtype)


def _logit_scales(mem: validation.MemoryArgs, temperature, location_temperature) -> tuple[float, float]:
    """(drive_scale, location_scale), each finite in the compute dtype (else a ValueError naming the
    temperature and its smallest usable value)."""
    temperature = validation.positive_number(temperature, "temperature")
    location_temperature = validation.positive_number(location_temperature, "location_temperature")
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
             location_temperature, match_threshold, backend, validate) -> _Call:
    mem = validation.memory(mem_loc, mem_sd, mem_values, value_dtypes=validation.VALUE_DTYPES, validate=validate)
    key, single = validation.search_key(search_key, mem)
    drive_scale, location_scale = _logit_scales(mem, temperature, location_temperature)
    threshold = validation.match_threshold(match_threshold)
    if (search_loc is None) != (search_sd is None):
        raise ValueError("search_loc and search_sd must be given together (or neither)")
    shapes, names = [key.shape[:-1], mem.loc.shape[:-2] + (1,), mem.values.shape[:-2] + (1,)], \
        ["search_key", "mem_loc", "mem_values"]
    qloc = qvariance = None
    if search_loc is not None:
        qloc, qvariance, loc_single = validation.queries(search_loc, search_sd, mem, loc_name="search_loc",
                                                         sd_name="search_sd")
        single = single and loc_single
        shapes.append(qloc.shape[:-1])
        names.append("search_loc")
    validation.nonempty_memory(mem, op)
    rows = validation.batch_shape(*shapes, names=names)
    batch, Q = rows[:-1], rows[-1]
    M, d, E = mem.size, mem.dim, mem.values.shape[-1]
    name = _registry.select(op, backend, mem.loc.device, mem.loc.dtype, mem.values.dtype)
    flat = validation.flatten_batch
    qvar, uniform = None, -1.0
    if qloc is not None:
        uniform = validation.uniform_variance(qvariance, mem.variance, check=mem.check)
        qloc, qvar = flat(qloc, batch, (Q, d)), flat(qvariance.var, batch, (Q, d))
    return _Call(
        name, batch, single, mem.check, flat(key, batch, (Q, E)), flat(mem.values, batch, (M, E)),
        flat(mem.loc, batch, (M, d)), flat(mem.var, batch, (M, d)), qloc, qvar,
        drive_scale, 0.0 if qloc is None else location_scale, threshold, uniform,
    )


def _raise_on_unusable_rows(op: str, call: _Call, unusable: Tensor, temperature, location_temperature) -> None:
    """unusable (B, Q) bool: rows whose logits overflowed the compute dtype (read only where value
    checks run: on a GPU it is a sync)."""
    if not call.check or not bool(unusable.any()):
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


def conditional_probs(
    mem_loc: Tensor, mem_sd, mem_values: Tensor, search_key: Tensor, *, search_loc: Optional[Tensor] = None,
    search_sd=None, temperature: float = 1.0, location_temperature: float = 1.0,
    match_threshold: Optional[float] = None, backend: str = "auto", validate: Optional[bool] = None,
) -> Tensor:
    """The categorical distribution `conditional_sample` draws entries from: (..., Q, M).

    logit_t = (search_key · mem_values_t) · E^-½ / temperature, plus
    log k(search_loc, mem_loc_t) / location_temperature when search_loc (with search_sd) is given.
    match_threshold masks the location term of entries farther than θ (Euclidean); a query whose
    every entry is masked falls back to the drive term alone (never an empty distribution).
    search_key is (..., Q, E) or (..., E); search_loc (..., Q, d) or (..., d); with a single key and
    a single (or no) location the result is (..., M). Differentiable in every tensor argument on
    every backend (the backward runs in PyTorch). validate: as for gaussian_read; a query whose
    logits overflow raises where value checks run, else reads NaN.
    """
    call = _prepare(PROBS_OP, mem_loc, mem_sd, mem_values, search_key, search_loc, search_sd, temperature,
                    location_temperature, match_threshold, backend, validate)
    B, Q, M, _, _ = call.shape
    probs = _registry.run_kernel(sample_probs, *call.kernel_args(), *call.scalars(), call.backend)
    _raise_on_unusable_rows(PROBS_OP, call, torch.isnan(probs[..., 0]), temperature, location_temperature)
    out = probs.reshape(*call.batch, Q, M)
    return out.squeeze(-2) if call.single else out


def conditional_sample(
    mem_loc: Tensor, mem_sd, mem_values: Tensor, search_key: Tensor, *, search_loc: Optional[Tensor] = None,
    search_sd=None, num_samples: int = 1, temperature: float = 1.0, location_temperature: float = 1.0,
    sigma_scale: float = 1.0, match_threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None, backend: str = "auto", validate: Optional[bool] = None,
) -> Tensor:
    """Draw locations whose remembered values match a search key, biased towards a search location.

    Each of num_samples draws picks an entry t from `conditional_probs(...)` (see there for the
    logits, the threshold and the all-masked fallback to the drive term alone) and returns
    mem_loc_t + sigma_scale · mem_sd_t ⊙ ε with ε ~ N(0, I). Shape (..., Q, S, d), or (..., S, d) for
    a single key (and a single or no location). The random numbers come from `generator` (or
    torch's default one): first the uniforms of the draws (float64, (B, Q, S)), then the normals,
    so a seeded generator reproduces the samples on a backend; the same seed gives the same draws
    on every backend up to rounding at bin edges. The choice of entry is not differentiable; the
    jitter is (pathwise) in mem_loc and mem_sd. An empty memory (M = 0) raises a ValueError.
    validate: as for conditional_probs (a query whose logits overflow raises, or samples NaN).
    """
    call = _prepare(SAMPLE_OP, mem_loc, mem_sd, mem_values, search_key, search_loc, search_sd, temperature,
                    location_temperature, match_threshold, backend, validate)
    S = validation.positive_count(num_samples, "num_samples")
    sigma_scale = validation.nonnegative_number(sigma_scale, "sigma_scale")
    device = call.mem_loc.device
    validation.check_generator(generator, device)
    B, Q, M, d, _ = call.shape
    uniforms = torch.rand((B, Q, S), generator=generator, dtype=torch.float64, device=device)
    noise = torch.randn((B, Q, S, d), generator=generator, dtype=call.mem_loc.dtype, device=device)
    with torch.no_grad():
        idx = _registry.run_kernel(sample_indices, *call.kernel_args(), uniforms, *call.scalars(), call.backend)
    unusable = idx < 0
    _raise_on_unusable_rows(SAMPLE_OP, call, unusable[..., 0], temperature, location_temperature)
    gather_idx = idx.clamp(min=0).reshape(B, Q * S, 1).expand(B, Q * S, d)
    centres = torch.gather(call.mem_loc, 1, gather_idx)
    spreads = torch.gather(call.mem_var.expand(B, M, d), 1, gather_idx).sqrt()
    samples = (centres + sigma_scale * spreads * noise.reshape(B, Q * S, d)).reshape(B, Q, S, d)
    samples = torch.where(unusable.unsqueeze(-1), torch.nan, samples)  # (only reached without value checks)
    samples = samples.reshape(*call.batch, Q, S, d)
    return samples.squeeze(-3) if call.single else samples
