"""The cpu backend's blocked dense read (issue #17): resonant_kernels/backends/cpu_blocked.py with
csrc/read_blocked_cpu.cpp, taken without a threshold when every pair of a batch row shares its
variance, E ≥ cpu_blocked.BLOCKED_FROM_E and d < 32. Each test checks that the blocked path ran (tests/test_read_cpu_paths.py's
spy), and compares the read and all five gradients with the float64 oracle at the tolerance of
tests/test_fuzz.py, on the shapes at the edges of its blocks: one query or one entry, the last block
of queries shorter than the others, entries around a vector of lanes and the backward's column
chunks, d = 1 and 31, batch dims, strided and broadcast values."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import resonant_kernels as rk
from backends import marks
from resonant.parallel.server import torch_threads as threads
from resonant_kernels.backends import cpu_blocked
from test_read_cpu_paths import (EPS, check_against_oracle, check_float32_layout_against_oracle, forward_paths,
                                 make, read_and_grads, to64)

pytestmark = marks("cpu", "gaussian_read")


@pytest.fixture(autouse=True, scope="module")
def blocked_forward_at_every_size():
    """The tests here check the blocked path itself, also at sizes where its forward measured slower
    than the fused kernel and the shipped rule sends it there (float64, few queries: its rule's own
    tests are tests/test_read_blocked_rule.py). Module-scoped: hypothesis' tests here refuse
    function-scoped fixtures."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_blocked, "faster_forward", lambda *args, **kwargs: True)
        yield


MOST_ROWS, LEAST_ROWS, TILE_BYTES = 512, 16, 1 << 20  # csrc/read_blocked_cpu.cpp's blocks


def rows_of(Q, M, dtype):
    from resonant_kernels import _C

    name = {torch.float32: "float32", torch.float64: "float64"}[dtype]
    return cpu_blocked.block_rows(_C, Q, _C.blocked_read_row_lanes(name, M) * torch.empty((), dtype=dtype).element_size())


WIDE, WIDE_BACKWARD = cpu_blocked.BLOCKED_FROM_E, cpu_blocked.BLOCKED_BACKWARD_FROM_E
# (Q, M, d, E): one query; one entry; four blocks of 276 queries with a short last one (M small: up
# to 512 a block, their number rounded up to a multiple of 4); four of 151, the last of 148 (M = 1025:
# rows of 1040 lanes, up to 240 a block; the backward's blocks of 302 and its four column chunks of
# 272 entries); entries just past a vector; d = 1 and the largest d (31); E past the smallest; each
# with the blocked backward (E ≥ WIDE_BACKWARD) and with the fused one behind the blocked forward
SHAPES = [(1, 300, 2, WIDE_BACKWARD), (700, 1, 2, WIDE + 6), (1101, 40, 2, WIDE_BACKWARD + 1),
          (1101, 40, 2, WIDE + 1), (601, 1025, 3, WIDE_BACKWARD), (601, 1025, 3, WIDE), (70, 17, 1, WIDE + 33),
          (130, 33, 31, WIDE_BACKWARD), (40, 513, 2, WIDE_BACKWARD + 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sd_kind", ["float", "0d", "per_dim"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"Q{s[0]}-M{s[1]}-d{s[2]}-E{s[3]}" for s in SHAPES])
def test_blocked_read_matches_float64_oracle(shape, sd_kind, dtype):
    Q, M, d, E = shape
    seed = sum(shape) + len(sd_kind)
    q, qs, m, ms, z = make(Q, M, d, E, dtype, sd_kind, seed)
    check_against_oracle(q, qs, m, ms, z, None, seed, "dense-blocked")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES[:6], ids=[f"Q{s[0]}-M{s[1]}-d{s[2]}-E{s[3]}" for s in SHAPES[:6]])
def test_forward_from_python_blocks_where_the_blas_exports_no_gemm(shape, dtype, monkeypatch):
    """cpu_blocked.read_forward_python: the blocks from Python around torch.mm (torch builds whose
    library exports no BLAS gemm)."""
    monkeypatch.setattr(cpu_blocked, "blas_functions", lambda dtype_name: None)
    Q, M, d, E = shape
    q, qs, m, ms, z = make(Q, M, d, E, dtype, "per_dim", sum(shape))
    check_against_oracle(q, qs, m, ms, z, None, sum(shape), "dense-blocked")


def test_the_shapes_cover_several_blocks_and_a_short_last_one():
    """The test shapes above reach the block loop's edges (so a change of block_rows cannot silently
    leave them untested)."""
    assert rows_of(1101, 40, torch.float32) == 276 and 1101 % 276
    rows = rows_of(601, 1025, torch.float32)
    assert rows == 151 and 601 % rows


@pytest.mark.parametrize("Q, M, rows", [(3000, 1500, 150), (10000, 1024, 250), (4096, 2048, 128), (4096, 4096, 64),
                                        (100, 1500, 25), (5, 40, 2), (1, 40, 1)])
def test_a_batch_row_has_blocks_in_multiples_of_four(Q, M, rows):
    """At most a tile's rows a block (160 for 1500 float entries, 256 for 1024, 512 for 40), the
    blocks of a batch row rounded up to a multiple of 4 and the queries shared evenly: 2 or 4
    threads get equal shares (3000 queries: 20 blocks of 150, not 18 of 160 and one of 120), and a
    batch row of fewer queries than one tile holds still runs on several threads."""
    assert rows_of(Q, M, torch.float32) == rows


def test_a_tile_stays_near_its_budget_whatever_q_and_m():
    """Nothing of size Q × M: a block's tile is rows × (M rounded up to a vector), rows ≤ MOST_ROWS
    and the tile within TILE_BYTES unless one LEAST_ROWS block alone exceeds it."""
    for Q in (1, 17, 10_000, 1_000_000):
        for M in (1, 1000, 100_000):
            rows = rows_of(Q, M, torch.float32)
            assert 1 <= rows <= min(Q, MOST_ROWS)
            assert rows * M * 4 <= max(TILE_BYTES, LEAST_ROWS * (M + 16) * 4)


@pytest.mark.parametrize("layout", ["transposed", "column_major_values", "stride0_values", "batch_broadcast",
                                    "batch_dims"])
def test_blocked_read_takes_strided_broadcast_and_batched_inputs(layout):
    q, qs, m, ms, z = make(90, 50, 2, WIDE_BACKWARD + 2, torch.float32, "float", 3)
    if layout == "transposed":
        q, m = (t.t().contiguous().t() for t in (q, m))
    elif layout == "column_major_values":
        z = z.t().contiguous().t()
    elif layout == "stride0_values":  # every entry the same value row (stride 0 over entries)
        z = z[:1].expand_as(z)
    elif layout == "batch_broadcast":  # two batch rows sharing the memory (batch stride 0)
        q, m, z = torch.stack([q, q.flip(0)]), m[None], z[None]
    else:  # (2, 3) batch dims, the memory broadcast over the first
        q = torch.stack([q, q.flip(0), q * 0.5]).expand(2, 3, 90, 2)
        m, z = torch.stack([m, m.flip(0), m * 2])[None], torch.stack([z, -z, z.flip(0)])[None]
    check_float32_layout_against_oracle(q, qs, m, ms, z, "dense-blocked")


def _counting_packed_gemm(calls):
    """cpu_blocked.blas_functions("float32") with its packed-gemm functions (size, pack, compute)
    wrapped in ctypes callbacks that count their calls in `calls` and forward to the BLAS's own;
    None where torch's BLAS does not pack."""
    import ctypes

    blas = cpu_blocked.blas_functions("float32")
    if blas is None or not all(blas[2:]):
        return None
    wrapped = []
    for name, address, restype, arity in zip(("size", "pack", "compute"), blas[2:], (ctypes.c_size_t, None, None),
                                             (4, 9, 12)):
        kind = ctypes.CFUNCTYPE(restype, *[ctypes.c_void_p] * arity)
        real = kind(address)

        def spy(*args, real=real, name=name):
            calls[name] = calls.get(name, 0) + 1
            return real(*args)

        wrapped.append(kind(spy))
    functions = (*blas[:2], *(ctypes.cast(w, ctypes.c_void_p).value for w in wrapped))
    return functions, wrapped  # the callbacks must outlive the calls


# (Q, M, E, whole forward blocks per batch row, packings of the forward's values, of the backward's):
# with M = 4100 the forward's blocks hold 25 queries and the backward's 50, so 200 queries make eight
# whole forward blocks and at least one whole backward block per thread; the forward packs from
# E = kPackForwardFromE = 1024, whose values take the blocked forward up to 4 MiB
# (cpu_blocked.BLOCKED_MOST_VALUE_BYTES): M = 1000, four whole blocks of 200 queries (two of 400
# backward); with M = 300 the blocks hold 263 queries (526 backward).
PACKED = [(200, 4100, WIDE_BACKWARD, 8, 0, 1), (800, 1000, 1024, 4, 1, 1), (2100, 300, WIDE_BACKWARD, 7, 0, 1)]


@pytest.mark.parametrize("layout", ["one_batch_row", "batch_rows", "batch_broadcast", "column_major_values"])
@pytest.mark.parametrize("case", PACKED, ids=[f"Q{c[0]}-M{c[1]}-E{c[2]}" for c in PACKED])
def test_whole_blocks_multiply_the_values_packed_once(layout, case, monkeypatch):
    """csrc/read_blocked_cpu.cpp ValuesOperand: each distinct batch row's values are packed once per
    call and the whole blocks multiply the packed values; the read and every gradient match the
    float64 oracle."""
    calls = {}
    counting = _counting_packed_gemm(calls)
    if counting is None:
        pytest.skip("torch's BLAS exports no packed gemm: every block multiplies by the plain gemm")
    monkeypatch.setattr(cpu_blocked, "blas_functions", lambda name: counting[0] if name == "float32" else None)
    Q, M, E, forward_blocks, forward_packs, backward_packs = case
    rows = rows_of(Q, M, torch.float32)
    assert Q // rows == forward_blocks and Q // min(Q, 2 * rows) >= 2
    q, qs, m, ms, z = make(Q, M, 2, E, torch.float32, "float", E)
    distinct = 1
    if layout == "batch_rows":
        q, m, z, distinct = torch.stack([q, q.flip(0)]), torch.stack([m, m.flip(0)]), torch.stack([z, -z]), 2
    elif layout == "batch_broadcast":  # two batch rows reading one memory (values of batch stride 0)
        q, m, z = torch.stack([q, q.flip(0)]), m[None], z[None]
    elif layout == "column_major_values":
        z = z.t().contiguous().t()
    check_float32_layout_against_oracle(q, qs, m, ms, z, "dense-blocked")
    batch_rows = q.shape[0] if q.dim() == 3 else 1
    assert calls.get("pack") == distinct * (forward_packs + backward_packs)
    assert calls.get("compute", 0) >= batch_rows * (forward_packs * forward_blocks + backward_packs)


@pytest.mark.parametrize("E, path", [(0, "per-pair"), (1, "dense"), (WIDE - 1, "dense"), (WIDE, "dense-blocked")])
def test_narrow_values_keep_the_fused_kernel(E, path):
    q, qs, m, ms, z = make(40, 30, 2, E, torch.float32, "float", E)
    with forward_paths() as paths:
        out = rk.gaussian_read(q, qs, m, ms, z, backend="cpu")
    assert paths == [path] and out.shape == (40, E)
    torch.testing.assert_close(out, rk.gaussian_read(q, qs, m, ms, z, backend="reference"), rtol=1e-5, atol=1e-5)


def test_thresholds_and_many_dimensions_keep_the_fused_kernel():
    q, qs, m, ms, z = make(40, 30, 2, WIDE, torch.float32, "float", 1)
    with forward_paths() as paths:
        rk.gaussian_read(q, qs, m, ms, z, match_threshold=3.0, backend="cpu")
    assert paths == ["dense"]
    q, qs, m, ms, z = make(40, 30, 32, WIDE, torch.float32, "float", 1)
    with forward_paths() as paths:
        rk.gaussian_read(q, qs, m, ms, z, backend="cpu")
    assert paths == ["dense-product"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_queries_far_from_every_entry_inside_or_outside_their_box(dtype):
    """The weights are shifted by the distance to the entries' bounding box. Queries outside the box,
    hundreds of σ away, keep that shift; a query inside the box but far from every entry (two
    clusters 100 apart, σ = 0.5: its weights all underflow against that shift) is redone with the
    row's smallest distance: both read what the oracle reads (a weight spread over both clusters)."""
    gen = torch.Generator().manual_seed(0)
    m = torch.cat([torch.randn(40, 2, generator=gen, dtype=torch.float64) * 0.3 + torch.tensor([-50.0, 0.0]),
                   torch.randn(40, 2, generator=gen, dtype=torch.float64) * 0.3 + torch.tensor([50.0, 0.0])])
    q = torch.cat([torch.tensor([[0.0, 0.0], [0.0, 3.0], [400.0, 10.0], [-300.0, -300.0]], dtype=torch.float64),
                   torch.randn(30, 2, generator=gen, dtype=torch.float64) * 60])
    z = torch.randn(80, WIDE_BACKWARD, generator=gen, dtype=torch.float64)
    q, m, z = q.to(dtype), m.to(dtype), z.to(dtype)
    check_against_oracle(q, 0.5, m, 0.5, z, None, 1, "dense-blocked")
    out = rk.gaussian_read(q, 0.5, m, 0.5, z, backend="cpu")
    assert out[0].abs().max() > 0.1  # the middle query reads its nearest entries, not zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_weight_to_a_few_units_in_the_last_place(dtype):
    """Value column c is 1 for entry c only (E ≥ M), so out[:, c] is entry c's weight itself: every weight of
    a spread of scores (0 to about −60 nats, the exp's table and polynomial over many arguments)
    within 8 units in the last place of the float64 oracle's, relative, times 1 + |log w| (a score
    of size S is only known to S units in the last place, so neither is its weight)."""
    gen = torch.Generator().manual_seed(2)
    M = 64
    m = torch.linspace(0, 11, M, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    q = torch.randn(50, 2, generator=gen, dtype=torch.float64) * 0.5
    z = torch.eye(M, max(M, WIDE), dtype=torch.float64)
    out = rk.gaussian_read(q.to(dtype), 1.0, m.to(dtype), 1.0, z.to(dtype), backend="cpu")
    want = rk.gaussian_read(q, 1.0, m, 1.0, z, backend="reference")
    kept = want > 1e-30
    out, want = out[:, :M], want[:, :M]
    kept = kept[:, :M]
    rel = ((to64(out) - want).abs() / want / (1 + want.log().abs()))[kept]
    assert float(rel.max()) <= 8 * EPS[dtype], float(rel.max()) / EPS[dtype]


def test_blocked_forward_is_the_same_bits_for_any_thread_count():
    """The one-call forward: each block's weights and gemm on one thread (the BLAS on that thread
    alone, also where the call has a single block): 1, 2 and 3 threads read the same bits."""
    if cpu_blocked.blas_functions("float32") is None:
        pytest.skip("torch's library exports no BLAS gemm: the forward runs from Python")
    gen = torch.Generator().manual_seed(0)
    cases = []
    for Q, M, E in ((1100, 300, 80), (600, 1025, 64), (1, 40, 70), (200, 4100, 1024)):  # the last: values packed
        cases.append((torch.randn(Q, 2, generator=gen), torch.randn(M, 2, generator=gen),
                      torch.randn(M, E, generator=gen)))
    reads = []
    for count in (1, 2, 3):
        with threads(count), forward_paths() as taken:
            reads.append([rk.gaussian_read(q, 0.8, m, 0.8, z, backend="cpu") for q, m, z in cases])
        assert taken == ["dense-blocked"] * len(cases), taken
    for other in reads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, reads[0]))


def test_blocked_read_is_the_same_bits_run_to_run():
    """For a given thread count (docs/design.md §7: the backward's BLAS products may change in the
    last bits with the thread count)."""
    q, qs, m, ms, z = make(1100, 300, 2, WIDE_BACKWARD + 16, torch.float32, "per_dim", 4)
    cot = torch.randn(1100, WIDE_BACKWARD + 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = read_and_grads("cpu", q, qs, m, ms, z, None, cot)
    for _ in range(2):
        again = read_and_grads("cpu", q, qs, m, ms, z, None, cot)
        assert torch.equal(again[0], first[0])
        assert all(torch.equal(a, b) for a, b in zip(again[1], first[1]))


def test_the_kernels_reject_blocks_outside_the_call():
    from resonant_kernels import _C

    q, m = torch.zeros(1, 4, 2), torch.zeros(1, 20, 2)
    var = torch.ones(1, 1, 2).expand(1, 4, 2)
    shape = _C.ReadShape(1, 4, 20, 2, WIDE, -1.0, True, 1.0)
    views = tuple((t.data_ptr(), *t.stride()) for t in (q, var, m, var))
    tile, lse, scale = torch.zeros(4, 32), torch.zeros(4), torch.zeros(4)
    ld = _C.blocked_read_row_lanes("float32", 20)
    with pytest.raises(ValueError, match="outside"):
        _C.blocked_read_weights("float32", shape, *views, 0, 2, 3, tile.data_ptr(), ld, lse.data_ptr(),
                                scale.data_ptr())
    with pytest.raises(ValueError, match="row stride"):
        _C.blocked_read_weights("float32", shape, *views, 0, 0, 4, tile.data_ptr(), 19, lse.data_ptr(),
                                scale.data_ptr())
    thresholded = _C.ReadShape(1, 4, 20, 2, WIDE, 1.0, True, 1.0)
    with pytest.raises(ValueError, match="threshold"):
        _C.blocked_read_weights("float32", thresholded, *views, 0, 0, 4, tile.data_ptr(), ld, lse.data_ptr(),
                                scale.data_ptr())


@pytest.mark.parametrize("E", [16, WIDE, WIDE_BACKWARD])
def test_an_empty_batch_reads_nothing_and_does_not_crash(E):
    """Batch dims of size 0 (the fused kernels' grouping divided by the batch size: SIGFPE)."""
    q, m = torch.randn(0, 30, 2), torch.randn(0, 40, 2)
    z = torch.randn(0, 40, E, requires_grad=True)
    out = rk.gaussian_read(q, 1.0, m, 1.0, z, backend="cpu")
    out.sum().backward()
    assert out.shape == (0, 30, E) and z.grad.shape == (0, 40, E)


def test_blocked_backward_with_1_to_4_threads_matches_the_oracle_and_repeats_its_bits():
    """The one-call backward: each thread's run of blocks summed into its own partials of the entries'
    gradients, added over the threads in order. With 1, 2, 3 and 4 threads (runs that end inside a
    batch row, float32 and float64, batch dims, a single query): every gradient within the oracle's
    tolerance, and a second call the same bits as the first."""
    if cpu_blocked.blas_functions("float32") is None:
        pytest.skip("torch's library exports no BLAS gemm: the backward runs from Python")
    from test_read_cpu_paths import EPS, assert_within, conditioning

    gen = torch.Generator().manual_seed(0)
    cases = []
    # (batch rows, Q, M, E): three blocks of 512 queries per batch row, the last short, so that with 2-4
    # threads a thread's run of blocks ends inside a batch row and two threads' partials share it
    for B, Q, M, E in ((3, 1100, 300, cpu_blocked.BLOCKED_BACKWARD_FROM_E + 3),
                       (1, 1, 40, cpu_blocked.BLOCKED_BACKWARD_FROM_E)):
        for dtype in (torch.float32, torch.float64):
            q, m = torch.randn(B, Q, 2, generator=gen, dtype=dtype), torch.randn(B, M, 2, generator=gen, dtype=dtype)
            z = torch.randn(B, M, E, generator=gen, dtype=dtype)
            cot = torch.randn(B, Q, E, generator=gen, dtype=torch.float64)
            oracle = read_and_grads("reference", to64(q), 0.8, to64(m), 0.9, to64(z), None, cot)
            cases.append(((q, m, z, cot), oracle))
    for count in (1, 2, 3, 4):
        for (q, m, z, cot), (oracle, oracle_grads) in cases:
            with threads(count):
                out, grads = read_and_grads("cpu", q, 0.8, m, 0.9, z, None, cot)
                again = read_and_grads("cpu", q, 0.8, m, 0.9, z, None, cot)
            assert torch.equal(out, again[0]) and all(torch.equal(a, b) for a, b in zip(grads, again[1])), \
                f"{count} threads: a second call gave other bits"
            eps, cond = EPS[q.dtype], conditioning(q, 0.8, m, 0.9, None)
            assert_within(out, oracle, eps, cond, "read")
            terms = float(cot.abs().max()) * float(z.abs().max()) * z.shape[-1] ** 0.5
            for i, (g, og) in enumerate(zip(grads, oracle_grads)):
                assert_within(g, og, eps, 4 * cond, f"{count} threads, gradient {i}", terms)


def test_the_one_call_backward_rejects_values_the_blas_cannot_read():
    from resonant_kernels import _C

    q, m = torch.zeros(1, 4, 2), torch.zeros(1, 20, 2)
    var = torch.ones(1, 1, 2).expand(1, 4, 2)
    shape = _C.ReadShape(1, 4, 20, 2, 8, -1.0, True, 1.0)
    views = tuple((t.data_ptr(), *t.stride()) for t in (q, var, m, var))
    values = torch.zeros(1, 20, 16)[:, :, ::2]  # no unit stride
    # lse, grad_out, out; the gradients of the query locations and variances, the entries', the values'
    buffers = [torch.zeros(n) for n in (4, 32, 32, 8, 8, 40, 40, 160)]
    with pytest.raises(ValueError, match="unit stride"):
        _C.blocked_read_backward("float32", shape, *views, (values.data_ptr(), *values.stride()),
                                 *(b.data_ptr() for b in buffers), cpu_blocked.blas_functions("float32") or (1, 0, 0, 0, 0))


@st.composite
def wide_reads(draw):
    """A read the blocked path takes (no threshold, a variance every pair shares, d < 32, E ≥ 64):
    queries and entries from one to a few blocks with a short last one (a batch row in four blocks
    or more, so about a quarter of the float32 draws have two whole backward blocks and multiply
    values packed once), batch dims, values row- or column-major or shared over a batch, float32 and
    float64."""
    batch = draw(st.sampled_from([(), (1,), (2,), (2, 2)]))
    Q, M = draw(st.integers(1, 300)), draw(st.one_of(st.integers(1, 40), st.integers(41, 700)))
    d = draw(st.sampled_from([1, 2, 3, 7, 31]))
    E = draw(st.one_of(st.integers(WIDE_BACKWARD, WIDE_BACKWARD + 40), st.sampled_from([255, 1024])))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    sd_kind = draw(st.sampled_from(["float", "0d", "per_dim"]))
    values = draw(st.sampled_from(["row_major", "column_major", "shared_over_batch"]))
    return batch, Q, M, d, E, dtype, sd_kind, values, draw(st.integers(0, 2**31 - 1))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wide_reads())
def test_wide_reads_match_the_float64_oracle(call):
    """Property-based: the blocked read and its five gradients against the float64 oracle, at the
    tolerance of the other tests here."""
    batch, Q, M, d, E, dtype, sd_kind, layout, seed = call
    note(f"batch {batch} Q {Q} M {M} d {d} E {E} {dtype} {sd_kind} {layout}")
    q, qs, m, ms, z = make(Q, M, d, E, dtype, sd_kind, seed % 1000)
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(batch)
    q = (q + torch.randn(n, Q, d, generator=gen, dtype=torch.float64).to(dtype)).reshape(*batch, Q, d)
    m = (m + torch.randn(n, M, d, generator=gen, dtype=torch.float64).to(dtype)).reshape(*batch, M, d)
    ones = (1,) * len(batch)
    if layout == "shared_over_batch":  # one memory for every batch row (values of batch stride 0)
        m, z = m.reshape(-1, M, d)[:1].reshape(*ones, M, d), z.reshape(*ones, M, E)
    else:
        z = (z.t().contiguous().t() if layout == "column_major" else z).expand(*batch, M, E)
    check_against_oracle(q, qs, m, ms, z, None, seed, "dense-blocked")
