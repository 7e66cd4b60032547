"""conditional_probs / conditional_sample (design.md §4) on every backend against the reference."""
import math
import os
import subprocess
import sys

import pytest
import torch
from scipy import stats

import resonant_kernels as rk
from resonant_kernels import _registry as _backends
from cases import TOL, awkward_cases, make_sd, sample_inputs


# Where each backend's tests run (the reference it is compared with runs there too): triton takes
# CPU tensors only under its interpreter.
DEVICE = {"reference": "cpu", "cpu": "cpu", "triton": "cpu" if _backends.triton_interpreting() else "cuda",
          "cuda": "cuda"}


def _fused(name):
    why = _backends.BACKENDS[name].unavailable_reason()
    marks = [pytest.mark.skipif(why is not None, reason=f"{name} backend unusable: {why}")]
    return pytest.param(name, marks=marks + ([pytest.mark.gpu] if DEVICE[name] == "cuda" else []))


FUSED = [_fused(b) for b in ("cpu", "triton", "cuda")]
ALL = ["reference", *FUSED]
# The Triton interpreter runs one program at a time: it gets the small cases only.
CASES = [c for c in awkward_cases(full=False) if c.M > 0]
SMALL = [c for c in CASES if c.Q * c.M * max(c.E, 8) <= 2000]


def on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def on_device_kw(device, kw):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def generator(backend, seed):
    return torch.Generator(device=DEVICE[backend]).manual_seed(seed)


def probs_kwargs(case, with_location, **extra):
    kw = dict(temperature=0.7, match_threshold=case.threshold, **extra)
    if with_location:
        kw["location_temperature"] = 1.3
    return kw


def call_probs(inputs, with_location, backend, **kw):
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = inputs
    loc = dict(search_loc=query_loc, search_sd=query_sd) if with_location else {}
    return rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend=backend, **loc, **kw)


def test_reference_probs_follow_the_formula():
    """An independent, loop-by-loop computation of §4's logits, including the all-masked fallback."""
    gen = torch.Generator().manual_seed(0)
    M, d, E = 6, 3, 5
    mem_loc = torch.randn(M, d, generator=gen, dtype=torch.float64)
    mem_sd = torch.rand(M, d, generator=gen, dtype=torch.float64) + 0.3
    mem_values = torch.randn(M, E, generator=gen, dtype=torch.float64)
    key = torch.randn(3, E, generator=gen, dtype=torch.float64)
    search_loc = torch.stack([mem_loc[0] + 0.1, mem_loc[1] - 0.2, torch.full((d,), 50.0, dtype=torch.float64)])
    search_sd = torch.rand(3, d, generator=gen, dtype=torch.float64) + 0.3
    T, LT, theta = 0.8, 1.7, 1.5
    got = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, search_loc=search_loc, search_sd=search_sd,
                               temperature=T, location_temperature=LT, match_threshold=theta, backend="reference")
    for q in range(3):
        logits = []
        for t in range(M):
            drive = float(key[q] @ mem_values[t]) / math.sqrt(E) / T
            far = float((search_loc[q] - mem_loc[t]).norm()) > theta
            v = search_sd[q] ** 2 + mem_sd[t] ** 2
            logk = float(torch.distributions.Normal(mem_loc[t], v.sqrt()).log_prob(search_loc[q]).sum())
            logits.append((drive, None if far else drive + logk / LT))
        if all(loc is None for _, loc in logits):  # third query: nothing within θ
            want = torch.softmax(torch.tensor([dr for dr, _ in logits], dtype=torch.float64), 0)
        else:
            want = torch.softmax(torch.tensor([-math.inf if loc is None else loc for _, loc in logits],
                                              dtype=torch.float64), 0)
        torch.testing.assert_close(got[q], want)
    assert (got[0] > 0).sum() < M  # the threshold did mask something in a matched row


@pytest.mark.parametrize("with_location", [True, False], ids=["loc", "noloc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_probs_match_reference(backend, dtype, with_location):
    for case in SMALL if backend == "triton" and DEVICE["triton"] == "cpu" else CASES:
        inputs = sample_inputs(case, dtype, device=DEVICE[backend])
        kw = probs_kwargs(case, with_location)
        want = call_probs(inputs, with_location, "reference", **kw)
        got = call_probs(inputs, with_location, backend, **kw)
        assert got.shape == want.shape, case
        assert torch.isfinite(got).all(), case
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), **TOL[dtype])


def chi_square_setup(dtype=torch.float32):
    """12 distinct entries, two queries: one biased towards a location with a threshold that masks
    some entries, one matching nothing (drive term alone)."""
    gen = torch.Generator().manual_seed(7)
    M, d, E = 12, 2, 8
    mem_loc = torch.randn(M, d, generator=gen, dtype=dtype) * 2
    mem_sd = torch.rand(M, d, generator=gen, dtype=dtype) + 0.5
    mem_values = torch.randn(M, E, generator=gen, dtype=dtype)
    key = torch.randn(2, E, generator=gen, dtype=dtype) * 2
    search_loc = torch.stack([mem_loc[3], torch.full((d,), 100.0, dtype=dtype)])
    kw = dict(search_loc=search_loc, search_sd=1.0, match_threshold=2.5, temperature=0.5)
    return (mem_loc, mem_sd, mem_values, key), kw


@pytest.mark.parametrize("backend", ALL)
def test_draw_frequencies_match_probs(backend):
    args, kw = chi_square_setup()
    args, kw = on(DEVICE[backend], *args), on_device_kw(DEVICE[backend], kw)
    mem_loc = args[0]
    N = 20_000
    probs = rk.conditional_probs(*args, backend="reference", **kw).double().cpu()
    assert 0 < int((probs[0] == 0).sum()) < 11  # the location row has masked entries
    samples = rk.conditional_sample(*args, num_samples=N, sigma_scale=0.0, backend=backend,
                                    generator=generator(backend, 11), **kw)
    assert samples.shape == (2, N, 2)
    # sigma_scale = 0: every sample is exactly an entry's location; recover which
    hits = (samples.unsqueeze(-2) == mem_loc).all(-1).cpu()  # (Q, N, M)
    assert bool((hits.sum(-1) == 1).all())
    for q in range(2):
        counts = hits[q].sum(0).double()
        expected = probs[q] * N
        assert float(counts[expected == 0].sum()) == 0, "drew an entry of probability zero"
        # merge the bins expected to get < 5 draws into one
        small = expected < 5
        obs = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)]) if small.any() else counts
        exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)]) if small.any() else expected
        keep = exp > 0
        result = stats.chisquare(obs[keep].numpy(), exp[keep].numpy() * float(obs[keep].sum() / exp[keep].sum()))
        assert result.pvalue > 1e-3, (q, counts, expected)


@pytest.mark.parametrize("backend", ALL)
def test_seeded_draws_are_reproducible(backend):
    args, kw = chi_square_setup(torch.float64)
    args, kw = on(DEVICE[backend], *args), on_device_kw(DEVICE[backend], kw)

    def draw(seed):
        return rk.conditional_sample(*args, num_samples=300, backend=backend, generator=generator(backend, seed),
                                     **kw)

    first, again, other = draw(5), draw(5), draw(6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.manual_seed(3)
    a = rk.conditional_sample(*args, num_samples=10, backend=backend, **kw)
    torch.manual_seed(3)
    assert torch.equal(a, rk.conditional_sample(*args, num_samples=10, backend=backend, **kw))


@pytest.mark.parametrize("backend", FUSED)
def test_same_seed_same_draws_as_reference(backend):
    """Every backend turns the generator's uniforms into entries by the same inverse CDF."""
    # batch (2,), Q 17, M 33, threshold 0.05: most rows fall back to the drive term
    case = next(c for c in CASES if c.batch == (2,) and c.threshold == 0.05)
    mem_loc, mem_sd, mem_values, key, query_loc, query_sd = sample_inputs(case, torch.float64,
                                                                            device=DEVICE[backend])
    kw = dict(search_loc=query_loc, search_sd=query_sd, num_samples=64, match_threshold=case.threshold)
    # both on the backend's device: the same generator there gives both the same uniforms
    want = rk.conditional_sample(mem_loc, mem_sd, mem_values, key, backend="reference",
                                 generator=generator(backend, 1), **kw)
    got = rk.conditional_sample(mem_loc, mem_sd, mem_values, key, backend=backend, generator=generator(backend, 1),
                                **kw)
    assert got.shape == want.shape == (2, 17, 64, 2)
    same = (got == want).all(-1).double().mean()
    assert same > 0.999  # only a uniform within rounding of a bin edge may differ


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("sigma_scale", [0.5, 2.0])
def test_jitter_is_sigma_scaled_normal(backend, sigma_scale):
    """(sample − ℓ_t) / σ_t has mean 0 and standard deviation sigma_scale in every dimension."""
    gen = torch.Generator().manual_seed(2)
    M, d, E, N = 5, 3, 4, 20_000
    mem_loc = torch.arange(M, dtype=torch.float64)[:, None].expand(M, d) * 1000.0  # far apart: the entry is the nearest
    mem_sd = torch.rand(M, d, generator=gen, dtype=torch.float64) * 2 + 0.5
    mem_values = torch.randn(M, E, generator=gen, dtype=torch.float64)
    key = torch.randn(E, generator=gen, dtype=torch.float64)
    samples = rk.conditional_sample(mem_loc, mem_sd, mem_values, key, num_samples=N, sigma_scale=sigma_scale,
                                    backend=backend, generator=torch.Generator().manual_seed(4))
    assert samples.shape == (N, d)
    entry = (samples[:, None, :] - mem_loc).norm(dim=-1).argmin(-1)
    z = (samples - mem_loc[entry]) / mem_sd[entry]
    assert z.mean(0).abs().max() < 4 * sigma_scale / math.sqrt(N)
    torch.testing.assert_close(z.std(0), torch.full((d,), sigma_scale, dtype=torch.float64), rtol=0.03, atol=0)


def test_jitter_is_pathwise_differentiable():
    args, kw = chi_square_setup(torch.float64)
    mem_loc = args[0].clone().requires_grad_()
    samples = rk.conditional_sample(mem_loc, *args[1:], num_samples=500, backend="cpu", sigma_scale=1e-3,
                                    generator=torch.Generator().manual_seed(0), **kw)
    samples.sum().backward()
    counts = (samples.detach().unsqueeze(-2) - mem_loc.detach()).norm(dim=-1).argmin(-1).flatten().bincount(
        minlength=mem_loc.shape[0])
    # sigma_scale σ ε does not depend on mem_loc: each draw of entry t adds 1 to its gradient
    torch.testing.assert_close(mem_loc.grad, counts.double()[:, None].expand_as(mem_loc))


@pytest.mark.parametrize("backend", ALL)
def test_all_masked_query_falls_back_to_drive_term(backend):
    args, _ = chi_square_setup(torch.float64)
    mem_loc, mem_sd, mem_values, key = on(DEVICE[backend], *args)
    far = torch.full((2, 2), 1e3, dtype=torch.float64, device=DEVICE[backend])
    masked = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, search_loc=far, search_sd=1.0,
                                  match_threshold=0.0, backend=backend)
    drive_only = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend=backend)
    torch.testing.assert_close(masked, drive_only)
    torch.testing.assert_close(drive_only, torch.softmax(key @ mem_values.T / math.sqrt(key.shape[-1]), -1))


@pytest.mark.parametrize("backend", ALL)
def test_shapes_and_batch_broadcast(backend):
    gen = torch.Generator().manual_seed(9)
    mem_loc, mem_values, keys = on(DEVICE[backend], torch.randn(1, 7, 2, generator=gen),
                                   torch.randn(1, 7, 3, generator=gen), torch.randn(4, 5, 3, generator=gen))
    out = rk.conditional_sample(mem_loc, 0.5, mem_values, keys, num_samples=6, backend=backend)
    assert out.shape == (4, 5, 6, 2)
    single = rk.conditional_sample(mem_loc[0], 0.5, mem_values[0], keys[0, 0], num_samples=6, backend=backend)
    assert single.shape == (6, 2)
    # one key, several search locations: a Q axis appears
    locs = rk.conditional_probs(mem_loc[0], 0.5, mem_values[0], keys[0, 0], search_loc=mem_loc.new_zeros(3, 2),
                                search_sd=1.0, backend=backend)
    assert locs.shape == (3, 7)
    # batch rows broadcast against the shared memory: row r equals a call with row r alone
    probs = rk.conditional_probs(mem_loc, 0.5, mem_values, keys, backend=backend)
    torch.testing.assert_close(probs[2], rk.conditional_probs(mem_loc[0], 0.5, mem_values[0], keys[2],
                                                              backend="reference"), **TOL[torch.float32])


def test_custom_ops_pass_opcheck():
    from resonant_kernels import sample

    gen = torch.Generator().manual_seed(0)
    B, Q, M, d, E, S = 2, 3, 9, 2, 5, 4
    key, values = torch.randn(B, Q, E, generator=gen), torch.randn(B, M, E, generator=gen)
    qloc, qvar = torch.randn(B, Q, d, generator=gen), torch.rand(B, Q, d, generator=gen) + 0.5
    mloc, mvar = torch.randn(B, M, d, generator=gen), torch.rand(B, M, d, generator=gen) + 0.5
    scalars = (0.4, 1.0, 1.5, -1.0, "cpu")
    torch.library.opcheck(sample.sample_probs, (key, values, qloc, qvar, mloc, mvar, *scalars))
    uniforms = torch.rand(B, Q, S, generator=gen, dtype=torch.float64)
    torch.library.opcheck(sample.sample_indices, (key, values, qloc, qvar, mloc, mvar, uniforms, *scalars))


def test_reference_probs_are_differentiable():
    args, kw = chi_square_setup(torch.float64)
    inputs = [a.clone().requires_grad_() for a in args]
    probs = rk.conditional_probs(*inputs, backend="reference", **kw)
    probs[:, :5].sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


def good():
    return dict(mem_loc=torch.zeros(5, 2), mem_sd=1.0, mem_values=torch.zeros(5, 3), search_key=torch.zeros(4, 3))


BAD = [
    (dict(mem_loc=torch.zeros(0, 2), mem_values=torch.zeros(0, 3)), ValueError, "nothing to sample"),
    (dict(search_key=torch.zeros(4, 2)), ValueError, "search_key has value dimension 2"),
    (dict(search_key=torch.zeros(2, 4, 3)), ValueError, "search_key must have shape"),
    (dict(search_key=torch.zeros(4, 3, dtype=torch.float64)), TypeError, "search_key has dtype"),
    (dict(search_key=torch.full((4, 3), math.nan)), ValueError, "search_key contains NaN"),
    (dict(temperature=0.0), ValueError, "temperature must be positive"),
    (dict(temperature=-2.0), ValueError, "temperature must be positive"),
    (dict(location_temperature=math.inf), ValueError, "location_temperature must be positive"),
    (dict(num_samples=0), ValueError, "num_samples must be >= 1"),
    (dict(num_samples=2.0), TypeError, "num_samples must be an int"),
    (dict(sigma_scale=-0.1), ValueError, "sigma_scale must be >= 0"),
    (dict(search_loc=torch.zeros(4, 2)), ValueError, "search_loc and search_sd must be given together"),
    (dict(search_sd=1.0), ValueError, "search_loc and search_sd must be given together"),
    (dict(search_loc=torch.zeros(4, 3), search_sd=1.0), ValueError, "search_loc has location dimension 3"),
    (dict(search_loc=torch.zeros(4, 2), search_sd=0.0), ValueError, "search_sd must be positive"),
    (dict(search_loc=torch.zeros(3, 2), search_sd=1.0), ValueError, "batch dimensions do not broadcast"),
    (dict(match_threshold=-1.0), ValueError, "match_threshold must be >= 0"),
    (dict(generator=7), TypeError, "generator must be a torch.Generator"),
    (dict(backend="fastest"), ValueError, "unknown backend 'fastest'"),
    (dict(backend="cuda"), ValueError, "backend 'cuda' cannot run conditional_sample"),
]


@pytest.mark.parametrize("over,exc,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_raises_clear_error(over, exc, message):
    kw = {**good(), **over}
    positional = [kw.pop(k) for k in ("mem_loc", "mem_sd", "mem_values", "search_key")]
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        rk.conditional_sample(*positional, **kw)


def test_empty_memory_raises_for_probs_too():
    with pytest.raises(ValueError, match="nothing to sample"):
        rk.conditional_probs(torch.zeros(0, 2), 1.0, torch.zeros(0, 3), torch.zeros(3))


@pytest.mark.parametrize("Q", [1, 40])
def test_cpu_probs_match_reference_on_a_larger_memory(Q):
    """Sizes past the small cases: a lone query's dots spread over threads (Q = 1), and several
    query groups with packed value chunks longer than one chunk (E > 256) (Q = 40)."""
    if _backends.BACKENDS["cpu"].unavailable_reason() is not None:
        pytest.skip("cpu backend unavailable")
    gen = torch.Generator().manual_seed(12)
    M, E = 2100, 530
    mem_loc, mem_values = torch.randn(M, 2, generator=gen) * 10, torch.randn(M, E, generator=gen)
    key, search_loc = torch.randn(Q, E, generator=gen), torch.randn(Q, 2, generator=gen) * 10
    kw = dict(search_loc=search_loc, search_sd=2.0, match_threshold=8.0)
    want = rk.conditional_probs(mem_loc, 1.0, mem_values, key, backend="reference", **kw)
    got = rk.conditional_probs(mem_loc, 1.0, mem_values, key, backend="cpu", **kw)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


# Shapes for the cpu kernel's plan (csrc/sample_cpu.cpp, make_plan): queries in groups of up to 128
# (fewer where M is large); a group is shared by all threads, which split the entries into passes
# of 96 (float32) or 48 (float64) and then the queries, unless the groups share out evenly over the
# threads (and their buffers fit), when each thread takes whole groups.
CPU_PLANS = {
    # 300 queries: groups of 128, 128 and 44 (shared by 2 threads); a shared variance (the
    # vectorised location term) and a threshold that masks many pairs; M = 1000: a last pass of 40
    # entries, a last block of 4
    "groups": dict(batch=(), Q=300, M=1000, d=2, E=300, sd="float", threshold=1.0),
    # values and locations as strided views (the copied-rows and generic location paths), a batch
    # of 3 (groups shared by 2 threads, whole with 1 or 3)
    "strided": dict(batch=(3,), Q=40, M=517, d=3, E=260, sd="per_entry", threshold=None, strided=True),
    # fewer queries than a register block: one streamed dot per pair, entries split over threads
    "streamed": dict(batch=(), Q=5, M=5000, d=2, E=200, sd="float", threshold=1.5),
    # M so large that 128 queries' logits would pass the buffer bound: smaller groups
    "capped": dict(batch=(), Q=70, M=40000, d=1, E=12, sd="per_dim", threshold=None),
    # a batch of small problems: whole groups (128 + 72 queries per row) handed to threads
    "small": dict(batch=(5,), Q=200, M=40, d=2, E=8, sd="per_dim", threshold=0.8),
}


def plan_inputs(plan, dtype, seed=21):
    gen = torch.Generator().manual_seed(seed)
    batch, Q, M, d, E = plan["batch"], plan["Q"], plan["M"], plan["d"], plan["E"]
    if plan.get("strided"):
        mem_values = torch.randn((*batch, E, M), generator=gen, dtype=dtype).transpose(-1, -2)
        mem_loc = torch.randn((*batch, M, 2 * d), generator=gen, dtype=dtype)[..., ::2]
    else:
        mem_values = torch.randn((*batch, M, E), generator=gen, dtype=dtype)
        mem_loc = torch.randn((*batch, M, d), generator=gen, dtype=dtype)
    key = torch.randn((*batch, Q, E), generator=gen, dtype=dtype) * 2
    search_loc = torch.randn((*batch, Q, d), generator=gen, dtype=dtype)
    mem_sd = make_sd(plan["sd"], mem_loc.shape, dtype, gen, 0.5)
    search_sd = make_sd(plan["sd"], search_loc.shape, dtype, gen, 0.6)
    return mem_loc, mem_sd, mem_values, key, search_loc, search_sd


def check_cpu_plan(name, dtype):
    """cpu probs within tolerance of the reference, and the same inverse-CDF draws from the same
    uniforms (all but draws within rounding of a bin edge), never an entry of probability zero."""
    from resonant_kernels import reference, sample

    plan = CPU_PLANS[name]
    mem_loc, mem_sd, mem_values, key, search_loc, search_sd = plan_inputs(plan, dtype)
    kw = dict(search_loc=search_loc, search_sd=search_sd, match_threshold=plan["threshold"], temperature=0.7)
    want = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend="reference", **kw)
    got = rk.conditional_probs(mem_loc, mem_sd, mem_values, key, backend="cpu", **kw)
    torch.testing.assert_close(got, want, **TOL[dtype])
    call = sample._prepare(sample.SAMPLE_OP, mem_loc, mem_sd, mem_values, key, search_loc, search_sd, 0.7, 1.0,
                           plan["threshold"], "cpu", None)
    B, Q, M, _, _ = call.shape
    # 61 draws per query: the last batch of the lockstep searches (8 draws) is partial
    uniforms = torch.rand((B, Q, 61), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    drawn = sample.sample_indices(*call.kernel_args(), uniforms, *call.scalars(), "cpu")
    probs = sample.sample_probs(*call.kernel_args(), *call.scalars(), "reference")
    expected = reference.inverse_cdf(probs, uniforms)
    assert drawn.shape == expected.shape and drawn.min() >= 0 and drawn.max() < M
    assert float((drawn == expected).double().mean()) > 0.999
    assert bool((probs.gather(-1, drawn) > 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CPU_PLANS))
def test_cpu_plans_match_reference(name, dtype):
    if _backends.BACKENDS["cpu"].unavailable_reason() is not None:
        pytest.skip("cpu backend unavailable")
    check_cpu_plan(name, dtype)


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_plans_with_other_thread_counts(threads):
    """The same checks in a fresh process with OMP_NUM_THREADS set: one thread (no split) and an
    odd team that divides neither the passes nor the queries evenly."""
    if _backends.BACKENDS["cpu"].unavailable_reason() is not None:
        pytest.skip("cpu backend unavailable")
    code = ("import sys, torch; sys.path.insert(0, %r); import test_sample as t\n"
            "for name in ('groups', 'strided', 'streamed', 'capped'):\n"
            "    for dtype in (torch.float32, torch.float64): t.check_cpu_plan(name, dtype)\n"
            "print('ok')" % os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
