"""The cpu backend's dense read (issue #17, issue #15 point 4): csrc/read_dense_cpu.cpp (forward,
queries in vector lanes, weights x values as a register-blocked product; from 32 dimensions on the
scores as ‖q‖² + ‖m‖² − 2 q·m with a cancellation guard) and csrc/read_dense_backward_cpu.cpp,
taken when every (query, entry) pair of a batch row shares its variance (one σ, or one σ per
dimension). Each test checks which kernel ran (`_C.read_forward_path`), so a change of dispatch
cannot silently leave a path untested.

Accuracy is measured against the reference evaluated in float64 (the oracle) with the tolerance
of tests/test_fuzz.py: |error| ≤ 16 ε · cond · (max |oracle| + 1), cond = 1 + the largest |log k|
of the call (a float32 score of size S carries an absolute rounding error of about S ε).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import resonant_kernels as rk
from backends import marks
from resonant_kernels import reference

pytestmark = marks("cpu", "gaussian_read")  # tests/backends.py: the one skip policy (a broken cpu backend fails)

EPS = {torch.float32: 2.0**-23, torch.float64: 2.0**-52}


@contextlib.contextmanager
def forward_paths():
    """Records the forward kernel of every cpu read_forward call made inside the block: the path
    csrc/read_cpu.cpp takes, or "dense-blocked" (resonant_kernels/backends/cpu_blocked.py: its one
    C++ call, or the first block of its Python loop)."""
    from resonant_kernels import _C

    seen = []
    original, original_blocked, original_one_call = _C.read_forward, _C.blocked_read_weights, _C.blocked_read_forward

    def spy(dtype, shape, qloc, qvar, mloc, mvar, values, out, lse):
        seen.append(_C.read_forward_path(dtype, shape, qvar, mvar))
        return original(dtype, shape, qloc, qvar, mloc, mvar, values, out, lse)

    def spy_blocked(dtype, shape, qloc, qvar, mloc, mvar, b, q0, *rest):
        if b == 0 and q0 == 0:
            seen.append("dense-blocked")
        return original_blocked(dtype, shape, qloc, qvar, mloc, mvar, b, q0, *rest)

    def spy_one_call(*args):
        seen.append("dense-blocked")
        return original_one_call(*args)

    _C.read_forward, _C.blocked_read_weights, _C.blocked_read_forward = spy, spy_blocked, spy_one_call
    try:
        yield seen
    finally:
        _C.read_forward, _C.blocked_read_weights, _C.blocked_read_forward = original, original_blocked, original_one_call


MIB = 1 << 20


def blocked_forward_expected(Q, M, E, dtype):
    """The sizes at which a read the blocked path can run takes its forward (docs/design.md §7,
    resonant_kernels/backends/cpu_blocked.py): float32 values of at most 4 MiB, not from E = 1024 with
    256 queries or fewer; float64 at most 4 queries with values of at most 16 MiB."""
    if dtype == torch.float64:
        return Q <= 4 and M * E * 8 <= 16 * MIB
    return M * E * 4 <= 4 * MIB and not (E >= 1024 and Q <= 256)


def dense_path(d, E, threshold, product, Q, M, dtype):
    """The dense forward a call takes: blocked (no threshold, E ≥ 64, d < 32, at the sizes of
    blocked_forward_expected), else csrc/read_dense_cpu.cpp."""
    from resonant_kernels.backends import cpu_blocked

    if (threshold is None and E >= cpu_blocked.BLOCKED_FROM_E and d < cpu_blocked.BLOCKED_BELOW_D
            and blocked_forward_expected(Q, M, E, dtype)):
        return "dense-blocked"
    return "dense-product" if product else "dense"


def to64(x):
    return x.detach().to(torch.float64) if isinstance(x, torch.Tensor) else x


def var64(sd):
    return to64(sd) ** 2 if isinstance(sd, torch.Tensor) else torch.tensor(float(sd) ** 2, dtype=torch.float64)


def conditioning(q, qs, m, ms, threshold=None) -> float:
    logk = reference.log_kernel(to64(q), var64(qs), to64(m), var64(ms), threshold)
    finite = logk[torch.isfinite(logk)]
    return 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)


def assert_within(actual, oracle, eps, cond, what, terms=0.0):
    actual, oracle = to64(actual), to64(oracle)
    assert actual.shape == oracle.shape
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if not actual.numel():
        return
    bound = 16 * eps * cond * (float(oracle.abs().max()) + terms + 1.0)
    err = float((actual - oracle).abs().max())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (conditioning {cond:.3g})"


def read_and_grads(backend, q, qs, m, ms, z, threshold, cot):
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in (q, qs, m, ms, z)]
    out = rk.gaussian_read(*leaves, match_threshold=threshold, backend=backend)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(out, tensors, cot.to(out.dtype), allow_unused=True)
    return out, [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, tensors)]


def make(Q, M, d, E, dtype, sd_kind, seed, spread=1.0, sd=0.7):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(Q, d, generator=gen, dtype=torch.float64) * spread).to(dtype)
    m = (torch.randn(M, d, generator=gen, dtype=torch.float64) * spread).to(dtype)
    z = torch.randn(M, E, generator=gen, dtype=torch.float64).to(dtype)
    if sd_kind == "float":
        qs = ms = sd
    elif sd_kind == "0d":
        qs, ms = torch.tensor(sd, dtype=dtype), torch.tensor(sd * 1.3, dtype=dtype)
    else:  # one σ per dimension, shared by every query and entry
        qs = ((torch.rand(d, generator=gen, dtype=torch.float64) + 0.5) * sd).to(dtype)
        ms = ((torch.rand(d, generator=gen, dtype=torch.float64) + 0.5) * sd).to(dtype)
    return q, qs, m, ms, z


def check_against_oracle(q, qs, m, ms, z, threshold, seed, expect_path):
    """The read on the expected path and its gradients against the float64 oracle (any batch dims)."""
    dtype = q.dtype
    cot = torch.randn(*q.shape[:-1], z.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with forward_paths() as paths:
        out, grads = read_and_grads("cpu", q, qs, m, ms, z, threshold, cot)
    assert paths == [expect_path]
    oracle, oracle_grads = read_and_grads("reference", *(to64(t) for t in (q, qs, m, ms, z)), threshold, cot)
    eps, cond = EPS[dtype], conditioning(q, qs, m, ms, threshold)
    assert_within(out, oracle, eps, cond, "read")
    terms = float(cot.abs().max()) * float(to64(z).abs().max()) * z.shape[-1] ** 0.5
    for i, (g, og) in enumerate(zip(grads, oracle_grads)):
        assert_within(g, og, eps, 4 * cond, f"gradient {i}", terms)


# Shapes at the tails of the dense kernels' blocks (float32 with AVX-512: lanes of 16, panels of 32,
# groups of up to 8 panels, register blocks of 12 rows, tiles of up to 128 entries, 32 value
# columns per block, product-form scores from d = 32 in chunks of 128 dimensions; the backward's
# query tiles of 120, their output gradients packed in column blocks with zero rows up to a
# register block, and the weights packed from 8 value blocks on: Q = 131, E = 260).
SHAPES = [(16, 9, 2, 5), (33, 130, 2, 31), (95, 257, 3, 64), (257, 129, 2, 33), (40, 300, 1, 100),
          (17, 40, 5, 257), (33, 70, 32, 8), (47, 129, 129, 40), (20, 33, 300, 3), (131, 70, 2, 260)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sd_kind", ["float", "0d", "per_dim"])
@pytest.mark.parametrize("threshold", [None, "moderate", "tight"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"Q{s[0]}-M{s[1]}-d{s[2]}-E{s[3]}" for s in SHAPES])
def test_dense_read_matches_float64_oracle(shape, threshold, sd_kind, dtype):
    Q, M, d, E = shape
    seed = sum(shape) + len(sd_kind)
    q, qs, m, ms, z = make(Q, M, d, E, dtype, sd_kind, seed)
    typical = math.sqrt(2 * d)
    thr = {None: None, "moderate": 0.8 * typical, "tight": 0.3 * typical}[threshold]
    product = d >= 32 and (sd_kind != "per_dim" or thr is None)
    check_against_oracle(q, qs, m, ms, z, thr, seed, dense_path(d, E, thr, product, Q, M, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [None, 12.0])
@pytest.mark.parametrize("d", [2, 40])
def test_softmax_shift_rising_from_tile_to_tile(d, threshold, dtype):
    """Entries ordered from far to near, so every tile of 128 entries holds larger scores than the
    last by far more than the forward's slack on its softmax shift (kShiftSlack = 8): each raise
    must rescale what the queries summed and accumulated so far, in either accumulator layout.
    (A build that computed the rescale factors but never applied them read O(1) errors here.)"""
    gen = torch.Generator().manual_seed(7)
    Q, M, E = 70, 700, 37
    q = (torch.randn(Q, d, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    m = torch.randn(M, d, generator=gen, dtype=torch.float64)
    m = m / m.norm(dim=1, keepdim=True) * torch.linspace(15.0, 0.0, M, dtype=torch.float64)[:, None]
    m = m.to(dtype)
    z = torch.randn(M, E, generator=gen, dtype=torch.float64).to(dtype)
    check_against_oracle(q, 1.0, m, 1.0, z, threshold, 7, "dense-product" if d >= 32 else "dense")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [2, 40])
def test_panels_switching_between_product_and_row_sums(dtype, d):
    """csrc/read_dense_cpu.cpp adds a panel's tile as a product (a transposed accumulator) where most
    of its weights are nonzero, else row by row (an accumulator per query), and moves the sums
    between the two layouts. The memory alternates, by blocks of 384 entries (whole tiles of 128 or
    96), between entries among the queries (every pair within the threshold) and entries far away
    but one in 20: every panel switches several times, in both directions, and the read matches
    the float64 oracle and is the same for a query alone as in the batch."""
    gen = torch.Generator().manual_seed(d)
    Q, E, block, scale = 70, 37, 384, math.sqrt(d / 2)
    q = torch.randn(Q, d, generator=gen, dtype=torch.float64) * 0.3
    blocks = []
    for i in range(5):
        m = torch.randn(block, d, generator=gen, dtype=torch.float64) * 0.3
        if i % 2:
            m[torch.arange(block) % 20 != 0] += 50.0
        blocks.append(m)
    m = torch.cat(blocks).to(dtype)
    q, z = q.to(dtype), torch.randn(5 * block, E, generator=gen, dtype=torch.float64).to(dtype)
    thr = 4.0 * scale
    check_against_oracle(q, 0.7, m, 0.7, z, thr, d, "dense-product" if d >= 32 else "dense")
    full = rk.gaussian_read(q, 0.7, m, 0.7, z, match_threshold=thr, backend="cpu")
    for i in (0, 33, 69):
        assert torch.equal(full[i:i + 1], rk.gaussian_read(q[i:i + 1].expand(16, d), 0.7, m, 0.7, z,
                                                           match_threshold=thr, backend="cpu")[:1])


@pytest.mark.parametrize("layout", ["transposed", "stride0", "batch_broadcast"])
def test_dense_read_takes_strided_and_broadcast_inputs(layout):
    q, qs, m, ms, z = make(40, 50, 3, 45, torch.float32, "float", 3)
    if layout == "transposed":
        q, m, z = (t.t().contiguous().t() for t in (q, m, z))
    elif layout == "stride0":
        z = z[:1].expand_as(z)
    else:  # two batch rows sharing the memory (batch stride 0)
        q, m, z = torch.stack([q, q.flip(0)]), m[None], z[None]
    check_float32_layout_against_oracle(q, qs, m, ms, z, "dense")


def check_float32_layout_against_oracle(q, qs, m, ms, z, expect_path):
    """A float32 read of any shapes and strides (no threshold) on the expected path, its read and
    gradients against the float64 oracle."""
    cot_shape = (*q.shape[:-1], z.shape[-1])
    cot = torch.randn(cot_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with forward_paths() as paths:
        out, grads = read_and_grads("cpu", q, qs, m, ms, z, None, cot)
    assert paths == [expect_path]
    oracle, oracle_grads = read_and_grads("reference", *(to64(t) for t in (q, qs, m, ms, z)), None, cot)
    cond = conditioning(q, qs, m, ms)
    assert_within(out, oracle, EPS[torch.float32], cond, "read")
    for i, (g, og) in enumerate(zip(grads, oracle_grads)):
        assert_within(g, og, EPS[torch.float32], 4 * cond, f"gradient {i}", 10.0)


def test_per_dimension_sd_that_requires_grad_gets_its_gradient():
    """PatternMemory's training: one σ per dimension shared by queries and entries, learnt."""
    q, qs, m, ms, z = make(64, 80, 6, 20, torch.float32, "per_dim", 5)
    sd = qs.clone().requires_grad_()
    with forward_paths() as paths:
        out = rk.gaussian_read(q, sd, m, sd, z, backend="cpu")
        (g,) = torch.autograd.grad(out.square().sum(), sd)
    assert paths == ["dense"]
    sd64 = to64(qs).requires_grad_()
    (want,) = torch.autograd.grad(rk.gaussian_read(to64(q), sd64, to64(m), sd64, to64(z), backend="reference")
                                  .square().sum(), sd64)
    torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-4)


def test_below_one_vector_of_queries_the_per_pair_kernel_runs():
    q, qs, m, ms, z = make(3, 50, 2, 40, torch.float32, "float", 1)
    with forward_paths() as paths:
        rk.gaussian_read(q, qs, m, ms, z, backend="cpu")
    assert paths == ["per-pair"]


# A memory-based agent's read: one query per environment (4 to 15), a threshold, narrow values.
# From 4 queries the dense kernel runs (dense_read_min_queries); a panel of at most one vector of
# queries takes its scores, weights and products on that vector (the other half is neither
# computed nor summed).
FEW = [(4, 129, 2, 5), (5, 300, 8, 84), (7, 257, 3, 1), (8, 300, 8, 84), (9, 129, 2, 5), (12, 257, 3, 1),
       (15, 70, 40, 33), (6, 65, 33, 13)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [None, "moderate", "tight"])
@pytest.mark.parametrize("shape", FEW, ids=[f"Q{s[0]}-M{s[1]}-d{s[2]}-E{s[3]}" for s in FEW])
def test_four_to_fifteen_queries_take_the_dense_kernel(shape, threshold, dtype):
    Q, M, d, E = shape
    seed = sum(shape)
    q, qs, m, ms, z = make(Q, M, d, E, dtype, "float", seed, sd=0.5)
    typical = math.sqrt(2 * d)
    thr = {None: None, "moderate": 0.8 * typical, "tight": 0.3 * typical}[threshold]
    check_against_oracle(q, qs, m, ms, z, thr, seed, dense_path(d, E, thr, d >= 32, Q, M, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [None, 2.0])
@pytest.mark.parametrize("d", [3, 40])
def test_a_few_queries_read_as_in_a_full_panel(d, threshold, dtype):
    """A query's read does not depend on the call's other queries: the first 4 and 8 of 40 (two
    vectors of lanes in use) read the same bits alone, where half a panel's lanes are computed, and
    agree with the per-pair kernel (csrc/read_cpu.cpp) on the same call to rounding."""
    from resonant_kernels import _C

    q, qs, m, ms, z = make(40, 500, d, 20, dtype, "float", d, sd=0.6)
    with forward_paths() as paths:
        full = rk.gaussian_read(q, qs, m, ms, z, match_threshold=threshold, backend="cpu")
        few = rk.gaussian_read(q[:8], qs, m, ms, z, match_threshold=threshold, backend="cpu")
        four = rk.gaussian_read(q[:4], qs, m, ms, z, match_threshold=threshold, backend="cpu")
    assert paths == ["dense-product" if d >= 32 else "dense"] * 3
    assert torch.equal(full[:8], few)
    assert torch.equal(full[:4], four)
    original = _C.read_forward
    _C.read_forward = _C.read_forward_per_pair
    try:
        per_pair = rk.gaussian_read(q[:8], qs, m, ms, z, match_threshold=threshold, backend="cpu")
    finally:
        _C.read_forward = original
    oracle = rk.gaussian_read(to64(q[:8]), qs, to64(m), ms, to64(z), match_threshold=threshold, backend="reference")
    cond = conditioning(q[:8], qs, m, ms, threshold)
    assert_within(per_pair, oracle, EPS[dtype], cond, "per-pair read")
    assert_within(few, oracle, EPS[dtype], cond, "dense read")


# ---- the product form's edges (issue #15 point 4: numerically safe, exact to the tolerance) ----------


def product_form_alone(q, qs, m, ms):
    """Scores as a plain float32 matmul would give them, without centring or a guard."""
    v = var64(qs).to(q.dtype) + var64(ms).to(q.dtype)
    dist = (q * q / v).sum(-1, keepdim=True) + (m * m / v).sum(-1) - 2 * (q / v) @ m.T
    return -0.5 * dist - 0.5 * torch.log(v).expand(q.shape[-1]).sum() - 0.5 * q.shape[-1] * math.log(2 * math.pi)


def edge_case(name, seed=0):
    """d = 1024 reads whose weights spread over several entries (so score errors show in the read)."""
    gen = torch.Generator().manual_seed(seed)
    d, Q, M, E = 1024, 48, 200, 16
    if name == "far_from_origin_small_sd":  # every location near 1e4, σ a few thousandths of the offset
        m = 1e4 + torch.randn(M, d, generator=gen, dtype=torch.float64) * 0.02
        q = m[:Q] + torch.randn(Q, d, generator=gen, dtype=torch.float64) * 0.02
        sd = 0.3
    elif name == "near_duplicates":  # entries in close pairs far from the centre, a query beside each pair
        first = torch.randn(M // 2, d, generator=gen, dtype=torch.float64) * 3
        m = torch.cat([first, first + torch.randn(M // 2, d, generator=gen, dtype=torch.float64) * 0.03])
        q = first[:Q] + torch.randn(Q, d, generator=gen, dtype=torch.float64) * 0.03
        sd = 1.0
    elif name == "clusters_far_apart":  # tight clusters hundreds of σ apart: norms ≫ distances within one
        centres = torch.randn(10, d, generator=gen, dtype=torch.float64) * 300
        m = centres.repeat_interleave(M // 10, 0) + torch.randn(M, d, generator=gen, dtype=torch.float64) * 0.05
        q = m[:Q] + torch.randn(Q, d, generator=gen, dtype=torch.float64) * 0.05
        sd = 1.0
    else:  # binary patterns, as PatternMemory stores them, cues with half the active units off
        m = (torch.rand(M, d, generator=gen) < 0.25).double()
        q = m[:Q] * (torch.rand(Q, d, generator=gen) < 0.5).double()
        sd = 4.0
    z = torch.randn(M, E, generator=gen, dtype=torch.float64)
    return q.float(), sd, m.float(), sd, z.float()


EDGES = ["far_from_origin_small_sd", "near_duplicates", "clusters_far_apart", "binary_patterns"]


def assert_as_accurate_as_the_reference(out, q, qs, m, ms, z, what):
    """Within 4× the float32 reference's own distance from the float64 oracle (+16 ε): at these
    edges the fuzz tolerance (scaled by the largest |log k| of the call) would be far looser."""
    oracle = rk.gaussian_read(to64(q), qs, to64(m), ms, to64(z), backend="reference")
    ref32 = rk.gaussian_read(q, qs, m, ms, z, backend="reference")
    err, ref_err = float((to64(out) - oracle).abs().max()), float((to64(ref32) - oracle).abs().max())
    assert err <= 4 * ref_err + 16 * EPS[torch.float32], f"{what}: error {err:.3g}, the reference's {ref_err:.3g}"


@pytest.mark.parametrize("name", EDGES)
def test_product_form_stays_exact_at_its_edges(name):
    q, qs, m, ms, z = edge_case(name)
    with forward_paths() as paths:
        out = rk.gaussian_read(q, qs, m, ms, z, backend="cpu")
    assert paths == ["dense-product"]
    assert_as_accurate_as_the_reference(out, q, qs, m, ms, z, name)


@pytest.mark.parametrize("name", ["far_from_origin_small_sd", "near_duplicates", "clusters_far_apart"])
def test_these_edges_break_an_unguarded_product_form(name):
    """The edges above can fail: a plain float32 product form reads them wrongly."""
    q, qs, m, ms, z = edge_case(name)
    naive = reference.masked_softmax(product_form_alone(q, qs, m, ms)) @ z
    with pytest.raises(AssertionError):
        assert_as_accurate_as_the_reference(naive, q, qs, m, ms, z, "unguarded product form")


def test_threshold_decisions_at_exact_grid_distances_match_the_reference():
    """Integer grid points with θ equal to grid distances: every pair at exactly θ is kept (≤ θ), in
    the product form too (a pair whose product-form distance is within rounding of θ² is recomputed)."""
    gen = torch.Generator().manual_seed(0)
    d = 40
    m = torch.randint(-3, 4, (300, d), generator=gen).float()
    q = torch.randint(-3, 4, (64, d), generator=gen).float()
    z = torch.randn(300, 8, generator=gen)
    for theta in (6.0, 7.0, math.sqrt(50.0)):
        with forward_paths() as paths:
            out = rk.gaussian_read(q, 5.0, m, 5.0, z, match_threshold=theta, backend="cpu")
        assert paths == ["dense-product"]
        want = rk.gaussian_read(q.double(), 5.0, m.double(), 5.0, z.double(), match_threshold=theta,
                                backend="reference")
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


# ---- determinism (design.md §7) ---------------------------------------------------------------


def test_a_query_reads_the_same_alone_or_in_a_batch():
    """Group and tile sizes depend on the shapes only and each query's numbers on its own lane."""
    for d in (2, 64):
        q, qs, m, ms, z = make(200, 300, d, 40, torch.float32, "float", d)
        full = rk.gaussian_read(q, qs, m, ms, z, backend="cpu")
        part = rk.gaussian_read(q[37:37 + 20], qs, m, ms, z, backend="cpu")
        assert torch.equal(full[37:37 + 20], part)


# (d, E): the fused dense kernels (csrc/read_dense_cpu.cpp; the blocked read, whose backward's memory
# gradients may change with the thread count (docs/design.md §7), takes d < 32 from E = 64): direct
# scores, product-form scores, and product-form with values wide enough that the weights are packed
# into micro-panels; 300 queries are two groups of floats, so the values are packed once and shared
THREAD_CASES = [(2, 40), (40, 70), (40, 260)]
def test_dense_read_is_bitwise_reproducible_and_independent_of_threads():
    """The read and the memory's gradients are the same bits for 1, 2 and 3 threads; every gradient
    is the same bits run to run at each thread count (three calls: the later ones reuse the
    per-thread working memory the first left behind)."""
    from resonant.parallel.server import torch_threads

    gen = torch.Generator().manual_seed(0)
    cases = []
    for d, E in THREAD_CASES:
        q, m = torch.randn(300, d, generator=gen), torch.randn(260, d, generator=gen)
        z, sd = torch.randn(260, E, generator=gen), torch.rand(d, generator=gen) + 0.5
        cases.append(([t.requires_grad_() for t in (q, m, z, sd)], torch.randn(300, E, generator=gen)))
    results = {}
    for threads in (1, 2, 3):
        results[threads] = []
        with torch_threads(threads), forward_paths() as taken:
            for (q, m, z, sd), cot in cases:
                out = rk.gaussian_read(q, sd, m, sd, z, backend="cpu")
                grads = torch.autograd.grad(out, (q, m, z, sd), cot)
                for _ in range(2):
                    again = torch.autograd.grad(rk.gaussian_read(q, sd, m, sd, z, backend="cpu"), (q, m, z, sd), cot)
                    assert all(torch.equal(a, b) for a, b in zip(grads, again)), f"{threads} threads: runs differ"
                results[threads].append([out.detach(), grads[1], grads[2]])
        assert "dense-blocked" not in taken, taken
    for threads in (2, 3):
        for mine, first in zip(results[threads], results[1]):
            assert all(torch.equal(a, b) for a, b in zip(mine, first))
