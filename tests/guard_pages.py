"""Guard-page runs of every C++ kernel (issue #13): each buffer a kernel reads or writes is placed so
that its last byte is followed by an unreadable page (mmap + mprotect(PROT_NONE)), or its first byte
preceded by one, so a read or write one element past either end kills the process with SIGSEGV.

Run as a script (tests/test_guard_pages.py does, in a child process, so a crash fails a test
instead of the whole session):

    python tests/guard_pages.py [GROUP ...]      # groups: read, loo, sample, blocked (default: all)

Each case is printed before it runs; the last line printed names the case that crashed.
Shapes cover the tails of every block size of the kernels (csrc/read_cpu.cpp: 8-query and 8-entry
blocks, 64-wide tiles, 32-byte vectors over E; csrc/read_dense_cpu.cpp and
read_dense_backward_cpu.cpp: see _dense_read_shapes; csrc/sample_cpu.cpp: 6-entry register blocks,
8/16-query panels, passes of 48/96 entries, 256-column chunks, 16-entry CDF blocks, batches of 8
draws), with contiguous, transposed, row-broadcast (stride 0) and batch-broadcast inputs.
"""
from __future__ import annotations

import ctypes
import itertools
import mmap
import sys

import torch

from resonant_kernels.backends import cpu_blocked

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_NONE, PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
_MAPPINGS = []  # (address, length) of this case's mappings, unmapped by release()


def release() -> None:
    """Unmaps every guarded buffer (call when no tensor of the case is alive: the process keeps
    under the kernel's limit on mappings, three per buffer)."""
    while _MAPPINGS:
        _libc.munmap(*_MAPPINGS.pop())


def guarded_empty(numel: int, dtype: torch.dtype, at_end: bool = True) -> torch.Tensor:
    """A 1-D tensor of numel elements whose last byte is followed (at_end) or whose first byte is
    preceded (not at_end) by a PROT_NONE page."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = max(numel, 0) * itemsize
    data_pages = max(1, -(-nbytes // PAGE))
    total = (data_pages + 2) * PAGE  # a guard page on each side
    addr = _libc.mmap(None, total, PROT_RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    _MAPPINGS.append((addr, total))
    for guard in (addr, addr + (data_pages + 1) * PAGE):
        if _libc.mprotect(guard, PAGE, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    start = addr + PAGE + (data_pages * PAGE - nbytes if at_end else 0)
    buf = (ctypes.c_byte * max(nbytes, 1)).from_address(start)
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=numel)


def guarded_like(x: torch.Tensor, layout: str = "contiguous", at_end: bool = True) -> torch.Tensor:
    """A copy of the rank-3 tensor x (B, R, C) in guarded memory with the given layout:
    contiguous; transposed (column-major rows: stride (R·C, 1, R)); row_broadcast (x's first row,
    stride 0 over rows); batch_broadcast (x's first batch row, stride 0 over the batch)."""
    B, R, C = x.shape
    if layout == "row_broadcast":
        src = x[:, :1, :]
        flat = guarded_empty(src.numel(), x.dtype, at_end)
        return flat.view(B, 1, C).copy_(src).expand(B, R, C)
    if layout == "batch_broadcast":
        src = x[:1]
        flat = guarded_empty(src.numel(), x.dtype, at_end)
        return flat.view(1, R, C).copy_(src).expand(B, R, C)
    flat = guarded_empty(x.numel(), x.dtype, at_end)
    if layout == "transposed":
        return flat.view(B, C, R).copy_(x.transpose(1, 2)).transpose(1, 2)
    return flat.view(B, R, C).copy_(x)


def arr(t: torch.Tensor):
    return (t.data_ptr(), *t.stride())


def out_buffer(shape, dtype, at_end=True) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return guarded_empty(n, dtype, at_end).view(*shape).fill_(0) if n else torch.empty(shape, dtype=dtype)


LAYOUTS = ("contiguous", "transposed", "row_broadcast", "batch_broadcast")
DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _inputs(B, Q, M, d, E, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    qloc = torch.randn(B, Q, d, generator=gen, dtype=dtype)
    mloc = torch.randn(B, M, d, generator=gen, dtype=dtype)
    qvar = torch.rand(B, Q, d, generator=gen, dtype=dtype) * 0.5 + 0.5
    mvar = torch.rand(B, M, d, generator=gen, dtype=dtype) * 0.5 + 0.5
    values = torch.randn(B, M, E, generator=gen, dtype=dtype)
    return qloc, qvar, mloc, mvar, values


def _layouts(n_inputs, seed):
    """A layout per input: all contiguous, all of one other layout (taking turns with the seed, so
    every layout meets every shape group), and a seeded mix."""
    yield ("contiguous",) * n_inputs
    yield (LAYOUTS[1 + seed % (len(LAYOUTS) - 1)],) * n_inputs
    rng = torch.Generator().manual_seed(seed)
    yield tuple(LAYOUTS[int(i)] for i in torch.randint(0, len(LAYOUTS), (n_inputs,), generator=rng))


def _shapes(group):
    """(B, Q, M, d, E) covering each block size's tails, each dimension varied with the others small."""
    if group == "read":
        qs, ms, es = (1, 7, 8, 9, 65), (1, 3, 5, 7, 8, 9, 63, 64, 65, 71), (1, 3, 4, 5, 7, 8, 9, 17, 33)
    elif group == "loo":
        qs, ms, es = (1,), (1, 2, 3, 7, 9, 17), (1, 3, 4, 5, 9)
    else:
        qs, ms, es = (1, 5, 6, 7, 9, 16, 17, 33, 130), (1, 5, 6, 7, 13, 47, 49, 97, 98), (0, 1, 3, 5, 8, 9, 257)
    seen = set()
    for Q in qs:
        seen.add((1, Q, 9, 2, 5))
    for M in ms:
        seen.add((1, 9, M, 2, 5))
    for E in es:
        seen.add((1, 9, 7, 2, E))
    for d in (1, 3, 4, 7):
        seen.add((2, 9, 9, d, 3))
    seen.add((3, qs[-1], ms[-1], 2, es[-1]))
    if group == "read":
        seen.update(_dense_read_shapes())
    return sorted(seen)


def _dense_read_shapes():
    """The dense read (csrc/read_dense_cpu.cpp, read_dense_backward_cpu.cpp; taken with a shared
    variance and at least 4 queries or one vector of them where that is fewer (dense_read_min_queries),
    resp. one vector of entries): calls of 4 to 15 float queries, whose panels' scores, weights and
    products take one vector of lanes (Q = 4, 7, 8, 12, 15 against tails of the tiles, values and
    dimensions); tails of the lanes (16 or 8 floats,
    8 or 4 doubles), panels of two vectors, groups of up to 8 panels, micro-kernel blocks of 6 or 12
    rows, tiles of up to 128 entries (fewer for wide E or d), value columns in blocks of 2 vectors
    and dot chunks of 256, query tiles of 120 in the backward, and the product-form scores from
    d = 32 on in chunks of 128 dimensions, up to d = 1024. From 8 column blocks of values on
    (E ≥ 225 with AVX-512) the weights are packed into micro-panels (gemm.h pack_micro_panels, which
    copies whole vectors past each panel), and with more than one group of queries per batch row
    the values are packed once per call and shared (dense::SharedPanels): Q = 300 and 130 > one
    group of floats resp. doubles, E = 260. The backward packs each query tile's output gradients in
    column blocks, with zero rows up to a 12-row block: Q = 131 (a tile of 11), E = 37 (a tail of
    5 value columns), M = 40 (several groups). The forward's weights × values product runs over
    blocks of 12 (6) value columns, the last one 4 or 8 wide (E = 1, 4, 5, 8, 9, 13, 25), and its
    groups are whole panels spread evenly (Q = 290, 520: groups of 5, and of 6, 6 and 5 panels)."""
    shapes = {(1, Q, 9, 2, 5) for Q in (16, 17, 31, 32, 33, 47, 95, 257)}
    shapes |= {(1, 17, M, 2, 5) for M in (16, 33, 127, 128, 129, 257)}
    shapes |= {(1, 17, 17, 2, E) for E in (31, 32, 33, 64, 257)}
    shapes |= {(1, 17, 20, d, 3) for d in (32, 33, 129)}
    shapes |= {(1, 20, 20, 1024, 8), (2, 40, 130, 33, 40), (1, 129, 40, 2, 96)}
    shapes |= {(1, 300, 40, 2, 260), (2, 130, 33, 3, 257), (1, 300, 20, 40, 260), (1, 131, 40, 2, 37)}
    shapes |= {(1, 17, 17, 2, E) for E in (1, 4, 5, 8, 9, 13, 25)} | {(1, 290, 30, 2, 7), (1, 520, 30, 2, 13)}
    shapes |= {(1, Q, M, 2, 5) for Q in (4, 7, 8, 12, 15) for M in (16, 129)}
    shapes |= {(1, Q, 17, 2, E) for Q in (4, 12) for E in (1, 33, 257)}
    shapes |= {(2, Q, 40, d, 9) for Q in (5, 15) for d in (8, 33)}
    return shapes


def run_read(C, shape, dtype, layouts, threshold, uniform, at_end):
    B, Q, M, d, E = shape
    x = _inputs(B, Q, M, d, E, dtype, seed=sum(shape))
    if uniform:
        x = (*x[:1], torch.full_like(x[1], 0.5), *x[2:3], torch.full_like(x[3], 0.5), x[4])
    qloc, qvar, mloc, mvar, values = (guarded_like(t, lay, at_end) for t, lay in zip(x, layouts))
    s = C.ReadShape(B, Q, M, d, E, -1.0 if threshold is None else threshold, uniform, 1.0 if uniform else 0.0)
    name = DTYPES[dtype]
    path = C.read_forward_path(name, s, arr(qvar), arr(mvar))
    PATHS[path] = PATHS.get(path, 0) + 1
    out, lse = out_buffer((B, Q, E), dtype, at_end), out_buffer((B, Q), dtype, at_end)
    C.read_forward(name, s, arr(qloc), arr(qvar), arr(mloc), arr(mvar), arr(values), out.data_ptr(), lse.data_ptr())
    grad_out = guarded_like(torch.randn(B, Q, E, dtype=dtype), "contiguous", at_end)
    out_g = guarded_like(out.clone(), "contiguous", at_end)
    lse_g = guarded_empty(B * Q, dtype, at_end).view(B, Q).copy_(lse) if B * Q else lse
    grads = [out_buffer(t.shape, dtype, at_end) for t in (qloc, qvar, mloc, mvar, values)]
    C.read_backward(name, s, arr(qloc), arr(qvar), arr(mloc), arr(mvar), arr(values), grad_out.data_ptr(),
                    out_g.data_ptr(), lse_g.data_ptr(), *(g.data_ptr() for g in grads))


def run_loo(C, shape, dtype, layouts, threshold, uniform, at_end):
    B, _, M, d, E = shape
    _, _, mloc, mvar, values = _inputs(B, 1, M, d, E, dtype, seed=sum(shape))
    if uniform:
        mvar = torch.full_like(mvar, 0.5)
    mloc, mvar, values = (guarded_like(t, lay, at_end) for t, lay in zip((mloc, mvar, values), layouts))
    s = C.LooShape(B, M, d, E, -1.0 if threshold is None else threshold, uniform, 1.0 if uniform else 0.0)
    name = DTYPES[dtype]
    active = guarded_empty(B * M, torch.uint8, at_end).view(B, M).fill_(1) if B * M else torch.ones(B, M, dtype=torch.uint8)
    if M > 2:
        active[:, 1] = 0
    estimate, error, lse = (out_buffer(sh, dtype, at_end) for sh in ((B, M, E), (B, M), (B, M)))
    C.loo_errors(name, s, arr(mloc), arr(mvar), arr(values), active.data_ptr(), estimate.data_ptr(),
                 error.data_ptr(), lse.data_ptr())
    num_dependencies = out_buffer((B, M), torch.int64, at_end)
    candidate = out_buffer((B, M), torch.uint8, at_end)
    C.loo_dependencies(name, s, arr(mloc), arr(mvar), active.data_ptr(), error.data_ptr(), lse.data_ptr(), 0.5,
                       num_dependencies.data_ptr(), candidate.data_ptr())


def run_sample(C, shape, dtype, layouts, threshold, uniform, at_end):
    B, Q, M, d, E = shape
    qloc, qvar, mloc, mvar, values = _inputs(B, Q, M, d, E, dtype, seed=sum(shape))
    if uniform:
        qvar, mvar = torch.full_like(qvar, 0.5), torch.full_like(mvar, 0.5)
    key = torch.randn(B, Q, E, dtype=dtype)
    tensors = (key, values, qloc, qvar, mloc, mvar)
    key, values, qloc, qvar, mloc, mvar = (guarded_like(t, lay, at_end) for t, lay in zip(tensors, layouts * 2))
    name = DTYPES[dtype]
    # the last variant's logits overflow (the unusable-row path: NaN probabilities, -1 draws)
    for location_scale, drive_scale in ((0.0, max(E, 1) ** -0.5), (1.0, max(E, 1) ** -0.5), (1.0, 1e300)):
        for S in (1, 7, 9):
            s = C.SampleShape(B, Q, M, d, E, S, drive_scale, location_scale,
                              -1.0 if threshold is None else threshold, 1.0 if uniform else -1.0)
            probs = out_buffer((B, Q, M), dtype, at_end)
            C.conditional_probs(name, s, arr(key), arr(values), arr(qloc), arr(qvar), arr(mloc), arr(mvar),
                                probs.data_ptr())
            uniforms = guarded_empty(B * Q * S, torch.float64, at_end).view(B, Q, S)
            uniforms.copy_(torch.rand(B, Q, S, dtype=torch.float64))
            uniforms[..., 0] = 0.0
            if S > 1:
                uniforms[..., 1] = float(torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)))
            idx = out_buffer((B, Q, S), torch.int64, at_end)
            C.conditional_sample_indices(name, s, arr(key), arr(values), arr(qloc), arr(qvar), arr(mloc), arr(mvar),
                                         uniforms.data_ptr(), idx.data_ptr())
            if M and not ((idx >= -1) & (idx < M)).all():
                raise AssertionError(f"draws out of range: {idx.min()}..{idx.max()} with M={M}")


def run_blocked(C, shape, dtype, layouts, threshold, uniform, at_end):
    """csrc/read_blocked_cpu.cpp's kernels: the one-call forward and backward (where torch exports a BLAS gemm),
    and the block kernels on the last n = min(Q, 5) queries of the last batch row (resonant_kernels/backends/cpu_blocked.py's blocks): tile, dp, lse and scale exactly one
    block's size, the tile rows blocked_read_row_lanes long (the kernels write and read whole
    vectors up to there). Only calls the blocked read takes: no threshold, a variance every pair
    shares (one number, or row-broadcast per-dimension variances)."""
    B, Q, M, d, E = shape
    qloc, qvar, mloc, mvar, _ = _inputs(B, Q, M, d, E, dtype, seed=sum(shape))
    if uniform:
        qvar, mvar = torch.full_like(qvar, 0.5), torch.full_like(mvar, 0.5)
    value_layout, layouts = layouts[4], list(layouts[:4])
    if not uniform:
        layouts[1] = layouts[3] = "row_broadcast"
    qloc, qvar, mloc, mvar = (guarded_like(t, lay, at_end) for t, lay in zip((qloc, qvar, mloc, mvar), layouts))
    s = C.ReadShape(B, Q, M, d, E, -1.0, uniform, 1.0 if uniform else 0.0)
    name = DTYPES[dtype]
    if not C.blocked_read_applies(name, s, arr(qvar), arr(mvar)):
        raise AssertionError(f"the blocked read does not apply to {shape}")
    ld = C.blocked_read_row_lanes(name, M)
    b, n = B - 1, min(Q, 5)
    q0 = Q - n
    tile = guarded_empty(n * ld, dtype, at_end)
    lse, scale = out_buffer((n,), dtype, at_end), out_buffer((n,), dtype, at_end)
    C.blocked_read_weights(name, s, arr(qloc), arr(qvar), arr(mloc), arr(mvar), b, q0, n, tile.data_ptr(), ld,
                           lse.data_ptr(), scale.data_ptr())
    dp = out_buffer((n, ld), dtype, at_end)
    dp[:, :M] = torch.randn(n, M, dtype=dtype)
    grad_out = guarded_like(torch.randn(B, Q, E, dtype=dtype), "contiguous", at_end)
    out = guarded_like(torch.randn(B, Q, E, dtype=dtype), "contiguous", at_end)
    grads = [out_buffer(sh, dtype, at_end) for sh in ((B, Q, d), (B, Q, d), (B, M, d), (B, M, d))]
    C.blocked_read_backward_block(name, s, arr(qloc), arr(qvar), arr(mloc), arr(mvar), b, q0, n, lse.data_ptr(),
                                  grad_out.data_ptr(), out.data_ptr(), tile.data_ptr(), dp.data_ptr(), ld,
                                  *(g.data_ptr() for g in grads))
    blas = cpu_blocked.blas_functions(name)
    if blas is not None:  # the one-call forward, its values row- or column-major
        values = torch.randn(B, M, E, dtype=dtype)
        values = guarded_like(values, "transposed" if value_layout == "transposed" else "contiguous", at_end)
        out_all, lse_all = out_buffer((B, Q, E), dtype, at_end), out_buffer((B, Q), dtype, at_end)
        C.blocked_read_forward(name, s, arr(qloc), arr(qvar), arr(mloc), arr(mvar), arr(values), out_all.data_ptr(),
                               lse_all.data_ptr(), blas)
        # the one-call backward from that forward's lse, every gradient exactly its size
        all_grads = [out_buffer(sh, dtype, at_end) for sh in ((B, Q, d), (B, Q, d), (B, M, d), (B, M, d), (B, M, E))]
        C.blocked_read_backward(name, s, arr(qloc), arr(qvar), arr(mloc), arr(mvar), arr(values), lse_all.data_ptr(),
                                grad_out.data_ptr(), out_all.data_ptr(), *(g.data_ptr() for g in all_grads), blas)


def _blocked_shapes():
    """Lanes of 16 floats or 8 doubles (M around them), the backward's column chunks of about 512
    entries in multiples of 4 (M = 1025, 2049, 2100), one to five query rows, d up to 31, values
    packed once (csrc/read_blocked_cpu.cpp ValuesOperand)."""
    shapes = {(1, 5, M, 2, 3) for M in (1, 7, 8, 9, 15, 16, 17, 33, 511, 513, 1025, 2049, 2100)}
    shapes |= {(2, 530, 9, 2, 5), (1, 1101, 70, 3, 1)}  # four blocks (of 133, of 276), a short last one
    # blocks of 26 queries (forward) and 52 (backward), whole ones multiplying the packed values of each
    # batch row (float32, where torch's BLAS packs; the forward from E = 1024), a short last one not
    shapes |= {(2, 201, 4100, 2, 1024)}
    shapes |= {(2, Q, 20, 2, 4) for Q in (1, 2, 6)} | {(1, 6, 21, d, 2) for d in (1, 3, 4, 7, 31)}
    return sorted(shapes)


PATHS = {}  # read forward kernel -> runs (csrc/read_cpu.h: read_forward_path)
RUNNERS = {"read": run_read, "loo": run_loo, "sample": run_sample, "blocked": run_blocked}
N_INPUTS = {"read": 5, "loo": 3, "sample": 3, "blocked": 5}


def cases(group):
    thresholds = {"loo": (None, 0.5), "blocked": (None,)}.get(group, (None, 0.3))
    shapes = _blocked_shapes() if group == "blocked" else _shapes(group)
    for i, (shape, dtype, threshold, uniform) in enumerate(
        itertools.product(shapes, DTYPES, thresholds, (False, True))
    ):
        for j, layouts in enumerate(_layouts(N_INPUTS[group], seed=i)):
            at_end = (i + j) % 4 != 3  # mostly guard the end; every fourth case guards the start
            yield shape, dtype, threshold, uniform, layouts, at_end


def main(groups) -> int:
    from resonant_kernels import _C

    count = 0
    for group in groups:
        for shape, dtype, threshold, uniform, layouts, at_end in cases(group):
            print(f"{group} BQMdE={shape} {DTYPES[dtype]} threshold={threshold} uniform={uniform} "
                  f"layouts={layouts} guard={'end' if at_end else 'start'}", flush=True)
            RUNNERS[group](_C, shape, dtype, layouts, threshold, uniform, at_end)
            release()
            count += 1
    paths = ", ".join(f"{k} {v}" for k, v in sorted(PATHS.items()))
    print(f"ok: {count} guarded kernel runs" + (f" (read forward: {paths})" if paths else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(RUNNERS)))
