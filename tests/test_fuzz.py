"""Property-based fuzzing of every op on every CPU-runnable backend (issue #13).

Each example draws a call — batch and broadcast shapes, Q and M from 1 (M from 0 where the op
allows), d up to 64, E from 0, σ as a float, a 0-d tensor, per entry or per dimension, thresholds
0 / tiny / moderate / huge / inf, contiguous, transposed and stride-0 inputs, a single query — and
checks the backend against the reference in the same dtype and against a float64 evaluation of
the reference (the oracle), forward and gradients, with tolerances scaled by the conditioning of
the call (the largest |log-kernel| or |logit|: a float32 score of magnitude S carries an absolute
rounding error of about S·2⁻²⁴, which the softmax turns into relative weight errors).

Profiles (HYPOTHESIS_PROFILE, registered in conftest.py): `ci` (default: derandomized, bounded
time, part of `make test`) and `long` (many more random examples, run before a release).
The examples are CPU tensors: the rows are tests/backends.py's backends that run on CPU tensors
here (triton under TRITON_INTERPRET=1, with tiny and fewer examples).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import resonant_kernels as rk
from backends import ON_CPU, interpreted, rows
from resonant_kernels import reference

EXAMPLES = settings().max_examples  # from the active profile


def examples(backend: str) -> settings:
    # the interpreter runs one Triton program at a time in Python: a fraction of the examples
    n = max(4, EXAMPLES // 4) if interpreted(backend) else EXAMPLES
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- drawing a call -------------------------------------------------------------------------

THRESHOLDS = ("none", "zero", "tiny", "moderate", "huge", "inf")
SD_KINDS = ("float", "0d", "per_entry", "per_dim")
LAYOUTS = ("contiguous", "transposed", "stride0")


@dataclass
class Call:
    dtype: torch.dtype
    batch: tuple
    Q: int
    M: int
    d: int
    E: int
    single: bool
    query_sd_kind: str
    mem_sd_kind: str
    threshold_kind: str
    threshold_scale: float
    layouts: tuple  # query_loc, mem_loc, mem_values, search_key
    broadcast: tuple  # per tensor: which batch dims are 1
    spread: float
    seed: int

    @property
    def threshold(self) -> Optional[float]:
        k = self.threshold_kind
        typical = self.spread * math.sqrt(2 * self.d)  # distance between two random points
        return {"none": None, "zero": 0.0, "tiny": 1e-30, "moderate": self.threshold_scale * typical,
                "huge": 1e30, "inf": math.inf}[k]


def calls(*, tiny: bool, min_m: int = 0, min_e: int = 0, loo: bool = False,
          dtypes=(torch.float32, torch.float64)):
    """A strategy of Calls; tiny: sizes for the Triton interpreter."""
    top = 6 if tiny else 24
    dims = st.integers(1, 4) if tiny else st.one_of(st.integers(1, 4), st.sampled_from([7, 16, 33, 64]))

    @st.composite
    def build(draw):
        nb = draw(st.integers(0, 2))
        batch = tuple(draw(st.integers(1, 3)) for _ in range(nb))
        return Call(
            dtype=draw(st.sampled_from(dtypes)),
            batch=batch,
            Q=draw(st.integers(1, top)),
            # reads also beyond the cpu dense forward's tile of 128 entries: several tiles per call,
            # whose softmax shifts rise from tile to tile (a missing rescale there read O(1) errors);
            # leave-one-out keeps to one tile (its error bound below is for sums of few entries)
            M=draw(st.integers(min_m, top + (0 if tiny else 17)) if tiny or loo
                   else st.one_of(st.integers(min_m, top + 17), st.integers(129, 300))),
            d=draw(dims),
            E=draw(st.integers(min_e, 8 if tiny else 40)),
            single=draw(st.booleans()) and not loo,
            query_sd_kind=draw(st.sampled_from(SD_KINDS)),
            mem_sd_kind=draw(st.sampled_from(SD_KINDS)),
            threshold_kind=draw(st.sampled_from(THRESHOLDS)),
            threshold_scale=draw(st.sampled_from([0.3, 0.7, 1.5])),
            layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(4)),
            broadcast=tuple(tuple(draw(st.booleans()) for _ in batch) for _ in range(4)),
            spread=draw(st.sampled_from([0.5, 1.0, 3.0])),
            seed=draw(st.integers(0, 2**31 - 1)),
        )

    return build()


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x with the same shape in another memory layout (stride0 also changes the values: every row
    becomes the first)."""
    if x.dim() < 2 or x.shape[-2] == 0 or x.shape[-1] == 0:
        return x
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "stride0":
        return x[..., :1, :].expand(x.shape)
    return x


def _batch_of(c: Call, which: int) -> tuple:
    return tuple(1 if one else b for b, one in zip(c.batch, c.broadcast[which]))


def _sd(kind: str, loc_shape, dtype, gen, scale):
    if kind == "float":
        return float(scale)
    if kind == "0d":
        return torch.tensor(scale, dtype=dtype)
    shape = (*loc_shape[:-1], 1) if kind == "per_entry" else loc_shape
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5).mul(scale).to(dtype)


def make_tensors(c: Call):
    """(query_loc, query_sd, mem_loc, mem_sd, mem_values, search_key) for the call."""
    gen = torch.Generator().manual_seed(c.seed)
    qb, mb, vb, kb = (_batch_of(c, i) for i in range(4))
    qshape = (*qb, c.d) if c.single else (*qb, c.Q, c.d)
    query_loc = torch.randn(qshape, generator=gen, dtype=torch.float64) * c.spread
    mem_loc = torch.randn((*mb, c.M, c.d), generator=gen, dtype=torch.float64) * c.spread
    mem_values = torch.randn((*vb, c.M, c.E), generator=gen, dtype=torch.float64)
    kshape = (*kb, c.E) if c.single else (*kb, c.Q, c.E)
    key = torch.randn(kshape, generator=gen, dtype=torch.float64)
    sd_scale = c.spread * 0.4
    query_sd = _sd(c.query_sd_kind, qshape, c.dtype, gen, sd_scale)
    mem_sd = _sd(c.mem_sd_kind, mem_loc.shape, c.dtype, gen, sd_scale)
    query_loc, mem_loc, mem_values, key = (
        _layout(t.to(c.dtype), lay) for t, lay in zip((query_loc, mem_loc, mem_values, key), c.layouts)
    )
    return query_loc, query_sd, mem_loc, mem_sd, mem_values, key


def to64(x):
    return x.detach().to(torch.float64) if isinstance(x, torch.Tensor) else x


def _var(sd):
    return to64(sd) ** 2 if isinstance(sd, torch.Tensor) else torch.tensor(float(sd) ** 2, dtype=torch.float64)


def conditioning(query_loc, query_sd, mem_loc, mem_sd, threshold, single=False) -> float:
    """1 + the largest |log-kernel| over the pairs the threshold keeps (float64)."""
    q, qv = to64(query_loc), _var(query_sd)
    if single:
        q = q.unsqueeze(-2)
        qv = qv.unsqueeze(-2) if qv.dim() else qv
    logk = reference.log_kernel(q, qv, to64(mem_loc), _var(mem_sd), threshold)
    finite = logk[torch.isfinite(logk)]
    return 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)


EPS = {torch.float32: 2.0**-23, torch.float64: 2.0**-52}
# A gradient sums pair terms over the other side (and E-wide dots): its rounding grows with the
# sum of the terms' magnitudes, which cancellation can make larger than the result's.
GRAD_SLACK = 4


def assert_close_scaled(actual, expected, eps, cond, what, terms=0.0):
    """|actual − expected| ≤ 16·eps·cond·(max|expected| + terms + 1), elementwise. `terms` is the
    size of the summands behind the result where they can cancel (a gradient of exactly zero
    computed from nonzero pair terms carries their rounding)."""
    actual, expected = to64(actual), to64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if not actual.numel():
        return
    scale = float(expected.abs().max()) + terms + 1.0
    bound = 16 * eps * cond * scale
    err = float((actual - expected).abs().max())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (eps {eps:.3g}, conditioning {cond:.3g})"


# ---- gaussian_read ---------------------------------------------------------------------------

def _cotangent(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _read_with_grads(backend, tensors, threshold, cot_seed):
    query_loc, query_sd, mem_loc, mem_sd, mem_values = tensors
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t
              for t in (query_loc, query_sd, mem_loc, mem_sd, mem_values)]
    out = rk.gaussian_read(*leaves, match_threshold=threshold, backend=backend)
    cot = _cotangent(out.shape, cot_seed)
    diff = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, diff, cot.to(out.dtype), allow_unused=True) if out.numel() else [None] * len(diff)
    return out, [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, diff)]


@pytest.mark.parametrize("backend", rows("gaussian_read", backends=ON_CPU))
def test_read_matches_reference_and_float64(backend):
    @examples(backend)
    @given(calls(tiny=interpreted(backend)))
    def check(c: Call):
        note(str(c))
        q, qs, m, ms, z, _ = make_tensors(c)
        threshold = c.threshold
        cond = conditioning(q, qs, m, ms, threshold, c.single)
        out, grads = _read_with_grads(backend, (q, qs, m, ms, z), threshold, c.seed)
        eps = EPS[c.dtype]
        oracle_out, oracle_grads = _read_with_grads("reference", [to64(t) for t in (q, qs, m, ms, z)], threshold, c.seed)
        assert_close_scaled(out, oracle_out, eps, cond, "read vs float64 oracle")
        # the score gradient w (g·z − g·out) is a difference of dot products of this size
        cot = _cotangent(out.shape, c.seed)
        terms = float(cot.abs().max()) * float(to64(z).abs().max()) * max(c.E, 1) ** 0.5 if out.numel() and z.numel() else 0.0
        for i, (g, og) in enumerate(zip(grads, oracle_grads)):
            assert_close_scaled(g, og, eps, GRAD_SLACK * cond, f"gradient {i} vs float64 oracle", terms)
        if backend != "reference":
            ref_out, ref_grads = _read_with_grads("reference", (q, qs, m, ms, z), threshold, c.seed)
            assert_close_scaled(out, ref_out, eps, cond, "read vs reference")
            for i, (g, rg) in enumerate(zip(grads, ref_grads)):
                assert_close_scaled(g, rg, eps, GRAD_SLACK * cond, f"gradient {i} vs reference", terms)

    check()


# ---- leave_one_out and prune_mask -------------------------------------------------------------

def _loo_log_weights(mem_loc, mem_sd, threshold):
    """float64 log w_ij of the leave-one-out read (−inf on the diagonal and where masked)."""
    m = to64(mem_loc)
    v = _var(mem_sd)
    logk = reference.log_kernel(m, v, m, v, threshold)
    M = m.shape[-2]
    logk = logk.masked_fill(torch.eye(M, dtype=torch.bool), -math.inf)
    lse = torch.logsumexp(logk, -1, keepdim=True)
    return logk - torch.where(torch.isfinite(lse), lse, 0.0)


@pytest.mark.parametrize("backend", rows("leave_one_out", backends=ON_CPU))
def test_leave_one_out_matches_reference_and_float64(backend):
    @examples(backend)
    @given(calls(tiny=interpreted(backend), loo=True))
    def check(c: Call):
        note(str(c))
        _, _, m, ms, z, _ = make_tensors(c)
        threshold = c.threshold
        est, err, deps = rk.leave_one_out(m, ms, z, match_threshold=threshold, backend=backend)
        o_est, o_err, o_deps = rk.leave_one_out(to64(m), to64(ms), to64(z), match_threshold=threshold,
                                                backend="reference")
        cond = conditioning(m, ms, m, ms, threshold)
        eps = EPS[c.dtype]
        assert_close_scaled(est, o_est, eps, cond, "estimate vs float64 oracle")
        assert_close_scaled(err, o_err, eps, cond, "error vs float64 oracle")
        # dependency counts may differ only by pairs whose weight is within rounding of 1/M
        logw = _loo_log_weights(m, ms, threshold)
        M = max(c.M, 1)
        near = ((logw + math.log(M)).abs() <= 64 * eps * cond).sum(-1).expand(deps.shape)
        assert ((deps - o_deps).abs() <= near).all(), f"num_dependencies {deps} vs oracle {o_deps}"

    check()


@pytest.mark.parametrize("backend", rows("prune_mask", fused=True, backends=ON_CPU))
def test_prune_mask_matches_reference(backend):
    @examples(backend)
    @given(calls(tiny=interpreted(backend), loo=True), st.sampled_from([0.05, 0.3, 1.0, 10.0]), st.integers(0, 4))
    def check(c: Call, max_error, max_steps):
        note(str(c))
        _, _, m, ms, z, _ = make_tensors(c)
        m, ms, z = (to64(t) for t in (m, ms, z))  # float64: no rank ties from rounding
        threshold = c.threshold
        # the rule compares weights with 1/n and errors with each other and max_error: skip draws
        # where the first step has a comparison within rounding (a tie the float64 sums may break
        # either way)
        logw = _loo_log_weights(m, ms, threshold)
        n = max(c.M, 1)
        assume(not ((logw + math.log(n)).abs() < 1e-9).any())
        _, err, _ = rk.leave_one_out(m, ms, z, match_threshold=threshold, backend="reference")
        assume(not ((err - max_error).abs() < 1e-9).any())
        # ranks: errors within rounding of each other (identical entries, e.g. stride-0 values,
        # have errors that differ only by rounding) may be ordered either way
        gaps = (err.unsqueeze(-1) - err.unsqueeze(-2)).abs() + torch.eye(err.shape[-1], dtype=err.dtype)
        assume(not (gaps < 1e-9 * (1 + (float(err.abs().max()) if err.numel() else 0.0))).any())
        keep = rk.prune_mask(m, ms, z, max_error=max_error, match_threshold=threshold, max_steps=max_steps,
                             backend=backend)
        want = rk.prune_mask(m, ms, z, max_error=max_error, match_threshold=threshold, max_steps=max_steps,
                             backend="reference")
        assert torch.equal(keep, want)

    check()


# ---- conditional_probs and conditional_sample -------------------------------------------------

def _sample_args(c: Call, with_location: bool):
    q, qs, m, ms, z, key = make_tensors(c)
    kw = dict(match_threshold=c.threshold)
    if with_location:
        kw.update(search_loc=q, search_sd=qs)
    return m, ms, z, key, kw


def _logit_conditioning(m, ms, z, key, kw, single) -> float:
    k, zz = to64(key), to64(z)
    drive = (k.unsqueeze(-2) if single else k) @ zz.transpose(-1, -2) * (max(z.shape[-1], 1) ** -0.5)
    cond = 1.0 + (float(drive.abs().max()) if drive.numel() else 0.0)
    if "search_loc" in kw:
        cond += conditioning(kw["search_loc"], kw["search_sd"], m, ms, kw["match_threshold"], single)
    return cond


@pytest.mark.parametrize("backend", rows("conditional_probs", backends=ON_CPU))
def test_conditional_probs_matches_reference_and_float64(backend):
    @examples(backend)
    @given(calls(tiny=interpreted(backend), min_m=1), st.booleans(), st.sampled_from([0.5, 1.0, 3.0]))
    def check(c: Call, with_location, temperature):
        note(str(c))
        m, ms, z, key, kw = _sample_args(c, with_location)
        kw.update(temperature=temperature, location_temperature=temperature)
        probs = rk.conditional_probs(m, ms, z, key, backend=backend, **kw)
        o_kw = {k: to64(v) for k, v in kw.items()}
        oracle = rk.conditional_probs(to64(m), to64(ms), to64(z), to64(key), backend="reference", **o_kw)
        cond = _logit_conditioning(m, ms, z, key, kw, c.single) / temperature
        eps = EPS[c.dtype]
        assert_close_scaled(probs, oracle, eps, cond, "probs vs float64 oracle")
        sums = to64(probs).sum(-1)
        assert_close_scaled(sums, torch.ones_like(sums), eps, max(c.M, 1), "probabilities sum to 1")
        if backend != "reference":
            ref = rk.conditional_probs(m, ms, z, key, backend="reference", **kw)
            assert_close_scaled(probs, ref, eps, cond, "probs vs reference")

    check()


@pytest.mark.parametrize("backend", rows("conditional_sample", fused=True, backends=ON_CPU))
def test_conditional_sample_draws_match_reference(backend):
    @examples(backend)
    @given(calls(tiny=interpreted(backend), min_m=1), st.booleans(), st.integers(1, 9))
    def check(c: Call, with_location, num_samples):
        note(str(c))
        m, ms, z, key, kw = _sample_args(c, with_location)
        draws = {b: rk.conditional_sample(m, ms, z, key, num_samples=num_samples, sigma_scale=0.0,
                                          generator=torch.Generator().manual_seed(c.seed), backend=b, **kw)
                 for b in (backend, "reference")}
        got, want = draws[backend], draws["reference"]
        assert got.shape == want.shape
        differ = (got != want).any(-1)
        if not differ.any():
            return
        # a draw may differ only where its uniform lies within rounding of a bin edge of the CDF
        probs = to64(rk.conditional_probs(to64(m), to64(ms), to64(z), to64(key), backend="reference",
                                          **{k: to64(v) for k, v in kw.items()}))
        batch_shape = got.shape[:-2]
        uniforms = torch.rand(batch_shape.numel() if batch_shape else 1, num_samples,
                              generator=torch.Generator().manual_seed(c.seed), dtype=torch.float64)
        cdf = probs.cumsum(-1).expand(*batch_shape, probs.shape[-1]).reshape(-1, probs.shape[-1])
        gap = (uniforms.reshape(cdf.shape[0], num_samples, 1) - cdf.unsqueeze(1)).abs().amin(-1)
        cond = _logit_conditioning(m, ms, z, key, kw, c.single)
        assert (gap.reshape(differ.shape)[differ] <= 64 * EPS[c.dtype] * cond * max(c.M, 1)).all(), \
            "draws differ away from a bin edge"

    check()


@pytest.mark.parametrize("backend", rows("conditional_sample", backends=ON_CPU))
def test_sampling_an_overflowing_call_raises_on_every_backend(backend):
    """Outside the usable range (the logits overflow the dtype) every backend raises the same error."""
    @examples(backend)
    @given(calls(tiny=interpreted(backend), min_m=1, min_e=1, dtypes=(torch.float32,)), st.sampled_from([1e-30, 1e-34]))
    def check(c: Call, temperature):
        note(str(c))
        m, ms, z, key, kw = _sample_args(c, False)
        big = key * 1e6
        logits = to64(big) @ to64(z).transpose(-1, -2) if not c.single else to64(big).unsqueeze(-2) @ to64(z).transpose(-1, -2)
        assume(bool((logits.abs() * c.E**-0.5 / temperature > 3.4e38).any()))
        for fn in (rk.conditional_probs, rk.conditional_sample):
            try:
                fn(m, ms, z, big, temperature=temperature, backend=backend, **kw)
            except ValueError as exc:
                assert "not finite in float32" in str(exc)
            else:
                # allowed only when no row's logits left the range after all (every row still has a
                # finite maximum and no +inf): then the answer must match the oracle's argmax row
                rows = logits.reshape(-1, logits.shape[-1]) * c.E**-0.5 / temperature
                assert (rows.amax(-1) < 3.4e38).all() and (rows.amax(-1) > -3.4e38).all()

    check()
