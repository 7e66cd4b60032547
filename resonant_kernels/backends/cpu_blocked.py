"""The cpu backend's dense read in blocks of queries (issue #17): for a read without a threshold whose
every (query, entry) pair of a batch row shares its variance, with locations of fewer than
BLOCKED_BELOW_D dimensions and values at least BLOCKED_FROM_E wide (forward) or
BLOCKED_BACKWARD_FROM_E wide (backward) (`can_run`); a forward only at the sizes where it measured
faster than the fused kernel (`faster_forward`: float32 values of at most 4 MiB, not from E = 1024
with a few hundred queries or fewer; float64 only 4 queries or fewer with values of at most 16 MiB).

Each block of queries gets its softmax weights in a tile (block rows × M, about 1 MB) from
csrc/read_blocked_cpu.cpp, unnormalised, and the BLAS that torch ships (MKL on x86) multiplies the
tile with the values, each product row then divided by its weights' sum: the product is the bare
`logits @ V`'s, the elementwise work a few vector operations per pair, and nothing of size Q × M
exists beyond one tile per thread. Where torch's library exports the BLAS's gemm (blas_functions)
the whole forward is one C++ call, each thread running its blocks' gemm itself (from E = 1024 on
values packed once per call where the BLAS packs: MKL's sgemm_pack); elsewhere the blocks run from
Python around torch.mm (read_forward_python). The backward likewise (one C++ call where the gemm is
exported): each thread takes an equal run of the (batch row, query) rows in blocks, and per block
dp = g @ valuesᵀ (gemm; the values packed once per call where the BLAS packs); the weights again
from the saved log-sum-exps, the score gradients and from them the location and variance
gradients; dL/dvalues += weightsᵀ @ g (gemm) into the thread's own partial, the partials (values,
entry locations and variances) added in thread order at the end. Elsewhere read_backward_python:
the same per block from Python, the products by torch.mm / torch.addmm_, blocks in order.

Determinism (docs/design.md §7): the one-call forward and the C++ elementwise parts give the same
bits for any thread count; the one-call backward, the Python-loop forward and backward are the
same bits run to run for a given thread count, but another count sums the memory's gradients (or
the BLAS splits a product) differently. A query read in a block of another size (alone rather
than in a batch) may differ in the last bits.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Optional

import torch

# Values at least this wide (forward; backward). Measured against csrc/read_dense_cpu.cpp's fused
# kernels in interleaved calls, each beside the bare product (float32, d = 2, σ = 10, no threshold,
# 2 threads on a 2-core machine, medians of 7-9 rounds; forward + backward over the bare product).
# Forward (load ~1.2): 0.95-1.13x at E = 64, 128, 256, 384, 512, 768, 1024 against the fused
# kernel's 0.99-1.27x. Backward, the one-call backward with blocks twice the forward's
# (kBackwardRows in csrc/read_blocked_cpu.cpp) against the fused backward, two quiet runs (load
# 1.2-1.3): 3.33 / 3.39 and 3.43 / 3.56 at (Q, M, E) = (4096, 2048, 64), 3.45 / 3.48 at
# (4096, 2048, 128), 3.49 / 3.47 and 3.48 / 3.35 at (4096, 4096, 128), 3.33 / 3.43 and 3.40 / 3.55 at
# (4096, 2048, 256), 3.46 / 3.64 and 3.46 / 3.70 at (3000, 1500, 512), 3.61 / 3.91 at
# (10000, 1024, 1024): ahead from E = 256, level below. With blocks of the forward's size it was no
# faster than the fused backward below E = 768 (3.66 at (3000, 1500, 512)): its per-block
# dL/dvalues product, weightsᵀ (M × rows) times the block's gradients, adds into an M × E partial
# that twice the rows update half as often.
BLOCKED_FROM_E = 64
BLOCKED_BACKWARD_FROM_E = 64
# Locations of fewer dimensions: from 32 on, csrc/read_dense_cpu.cpp computes the scores as a
# product too, which these direct scores (d operations per pair) are not.
BLOCKED_BELOW_D = 32

_scratch = threading.local()  # per thread: a call's kernels run with the GIL released


@functools.lru_cache(maxsize=None)
def _torch_blas_symbol(symbol: str) -> Optional[int]:
    if not torch.backends.mkl.is_available():
        return None
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def blas_functions(dtype_name: str) -> Optional[tuple[int, int, int, int, int]]:
    """The addresses of the functions of the BLAS that torch ships that the one-call forward and
    backward use, where torch's CPU library exports them (MKL builds do): its gemm (Fortran
    interface: sgemm_ / dgemm_), its per-thread thread count (MKL_Set_Num_Threads_Local), and its
    packed gemm (sgemm_pack_get_size, sgemm_pack, sgemm_compute; 0, 0, 0 where not exported, as for
    doubles in torch 2.13's library: the blocks then multiply by the plain gemm). None where the
    gemm or the thread count is missing: the blocks then run from Python around torch.mm."""
    prefix = {"float32": "s", "float64": "d"}[dtype_name]
    gemm = _torch_blas_symbol(f"{prefix}gemm_")
    local_threads = _torch_blas_symbol("MKL_Set_Num_Threads_Local")  # the C interface (by value)
    if not (gemm and local_threads):
        return None
    packed = tuple(_torch_blas_symbol(f"{prefix}gemm_{name}_") for name in ("pack_get_size", "pack", "compute"))
    return (gemm, local_threads, *packed) if all(packed) else (gemm, local_threads, 0, 0, 0)


# Which forwards the blocked path keeps (issue #17 tuned it in float32 on an Intel VM at four shapes
# of thousands of queries and 2-4 MiB of values). benchmarks/bench_blocked_dispatch.py (each case
# both ways in one run; BENCHMARKS.md "Dense reads without a threshold: the blocked path or the
# fused kernel", JSON in benchmarks/results/blocked_dispatch/) on the 2-core AMD EPYC VM, 2026-12-03,
# had the fused dense kernel faster
# - with more than 4 MiB of values (a batch row's M·E): 1.08-5.40x in float32 on 2 threads
#   (1.16-5.66x on one): every block streams all the values, from beyond the caches there, where
#   the fused kernel streams them once per panel of queries;
# - from E = 1024 with a few hundred queries or fewer (float32: the blocked forward packs all the
#   values once per call, csrc/read_blocked_cpu.cpp's kPackForwardFromE, which few blocks do not
#   repay): 1.48-4.47x at 4 to 256 queries and 1 024 entries (1.17-1.57x on one thread);
# - in float64, which #17 never measured: on one thread everywhere (1.01-3.27x), on two from 16
#   queries (0.91-3.02x). With 4 queries and values within 16 MiB the blocked path was the faster
#   on two threads in 6 of 7 cases (0.63-1.10x; one at 1.62x), its blocks giving both threads work
#   where the fused kernel runs its one panel of queries on one, and slower on one thread
#   (1.08-1.25x): they keep it.
# Float32 reads of up to 4 MiB keep the blocked path, at #17's shapes too, where this VM had the
# fused kernel 1.14-1.22x faster (1.09-1.22x on one thread) against the Intel VM's measurements
# above: not changed on one machine's word. The rule looks at the shapes and the dtype only, never
# at the thread count, so a forward's bits stay the same for any number of threads
# (docs/design.md §7).
BLOCKED_MOST_VALUE_BYTES = 4 << 20
PACKED_FROM_E, PACKED_MOST_FEW_QUERIES = 1024, 256
FLOAT64_MOST_QUERIES, FLOAT64_MOST_VALUE_BYTES = 4, 16 << 20


def can_run(module, dtype_name, shape, query_var_view, mem_var_view, d, E, backward=False) -> bool:
    """Whether the blocked path can run a read's forward (backward) and would at some size."""
    return E >= (BLOCKED_BACKWARD_FROM_E if backward else BLOCKED_FROM_E) and d < BLOCKED_BELOW_D and (
        module.blocked_read_applies(dtype_name, shape, query_var_view, mem_var_view))


def faster_forward(dtype_name, Q, M, E, value_bytes) -> bool:
    """Whether the blocked forward is the faster at this size (Q queries and M entries a batch row, E
    value columns of value_bytes bytes each): the measurements above."""
    values = M * E * value_bytes
    if dtype_name == "float64":
        return Q <= FLOAT64_MOST_QUERIES and values <= FLOAT64_MOST_VALUE_BYTES
    return values <= BLOCKED_MOST_VALUE_BYTES and not (E >= PACKED_FROM_E and Q <= PACKED_MOST_FEW_QUERIES)


def applies(module, dtype_name, shape, query_var_view, mem_var_view, Q, M, d, E, value_bytes,
            backward=False) -> bool:
    """Whether a read runs its forward (backward) on the blocked path rather than the fused kernels."""
    return can_run(module, dtype_name, shape, query_var_view, mem_var_view, d, E, backward) and (
        backward or faster_forward(dtype_name, Q, M, E, value_bytes))


def block_rows(module, Q: int, row_bytes: int) -> int:
    """Queries per block (csrc/read_blocked_cpu.cpp: the tile near 1 MB; the shapes alone decide it)."""
    return module.blocked_read_block_rows(Q, row_bytes)


SCRATCH_RETAIN_BYTES = 16 << 20


def scratch(name: str, rows: int, ld: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, ld) buffer of the calling thread, kept from call to call up to SCRATCH_RETAIN_BYTES (a
    fresh 2 MB tile costs its page faults on first touch, a few percent of a call at the issue's
    shapes); a larger one is the call's own."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < rows * ld:
        buf = torch.empty(rows * ld, dtype=dtype)
        if buf.numel() * buf.element_size() <= SCRATCH_RETAIN_BYTES:
            buffers[(name, dtype)] = buf
    return buf[:rows * ld].view(rows, ld)


def _blas_layout(t: torch.Tensor) -> bool:
    """Whether BLAS reads the matrices of t (..., rows, cols) in place: one unit stride, the other at
    least the width."""
    return (t.stride(-1) == 1 and t.stride(-2) >= max(t.shape[-1], 1)) or (
        t.stride(-2) == 1 and t.stride(-1) >= max(t.shape[-2], 1))


def _blas_operand(t: torch.Tensor) -> torch.Tensor:
    """t itself where BLAS reads it in place, else a contiguous copy."""
    return t if _blas_layout(t) else t.contiguous()


class _Blocks:
    """A call's blocks of queries, with the views of the tile that each block size uses (made once:
    the Python per block is a kernel call and the products). `scale` multiplies the rows of a block
    (read_backward_python's blocks are twice the forward's: each costs three products called from Python)."""

    def __init__(self, module, dtype_name, query_loc, M, name, scale=1):
        Q = query_loc.shape[1]
        self.ld = module.blocked_read_row_lanes(dtype_name, M)
        self.rows = min(Q, scale * block_rows(module, Q, self.ld * query_loc.element_size()))
        self.tile = scratch(name, self.rows, self.ld, query_loc.dtype)
        sizes = {self.rows, Q - (Q - 1) // self.rows * self.rows} if Q else set()
        self.weights = {n: self.tile[:n, :M] for n in sizes}  # a whole block's, the last's


def read_forward(module, dtype_name, shape, views, query_loc, mem_values):
    B, Q, _ = query_loc.shape
    M, E = mem_values.shape[1:]
    out = mem_values.new_empty((B, Q, E))
    lse = query_loc.new_empty((B, Q))
    if B == 0 or Q == 0:
        return out, lse
    blas = blas_functions(dtype_name)
    if blas is not None:  # the whole call in C++, each thread's blocks multiplied by the BLAS on that thread
        values = _blas_operand(mem_values)  # (a batch stride of 0 stays)
        module.blocked_read_forward(dtype_name, shape, *views, (values.data_ptr(), *values.stride()), out.data_ptr(),
                                    lse.data_ptr(), blas)
        return out, lse
    return read_forward_python(module, dtype_name, shape, views, query_loc, mem_values, out, lse)


def read_forward_python(module, dtype_name, shape, views, query_loc, mem_values, out, lse):
    """The forward's blocks from Python, around torch.mm (where torch's BLAS exports no gemm)."""
    B, Q, _ = query_loc.shape
    M = mem_values.shape[1]
    blocks = _Blocks(module, dtype_name, query_loc, M, "weights")
    rows, tile_ptr = blocks.rows, blocks.tile.data_ptr()
    scale = query_loc.new_empty((rows, 1))  # 1 / each row's sum of weights
    scales = {n: scale[:n] for n in blocks.weights}
    lse_ptr, item = lse.data_ptr(), lse.element_size()
    for b in range(B):
        values = _blas_operand(mem_values[b])
        for i, block in enumerate(out[b].split(rows)):
            n = block.shape[0]
            module.blocked_read_weights(dtype_name, shape, *views, b, i * rows, n, tile_ptr, blocks.ld,
                                        lse_ptr + (b * Q + i * rows) * item, scale.data_ptr())
            torch.mm(blocks.weights[n], values, out=block)
            block.mul_(scales[n])
    return out, lse


def read_backward(module, dtype_name, shape, views, grad_out, out, lse, query_loc, mem_loc, mem_values):
    B, Q, d = query_loc.shape
    M, E = mem_values.shape[1:]
    g_qloc, g_qvar = query_loc.new_empty((B, Q, d)), query_loc.new_empty((B, Q, d))
    blas = blas_functions(dtype_name)
    if blas is not None and B and Q:  # the whole call in C++ (writing every gradient), each thread's blocks
        # multiplied by the BLAS on that thread
        g_mloc, g_mvar = mem_loc.new_empty((B, M, d)), mem_loc.new_empty((B, M, d))
        g_values = mem_values.new_empty((B, M, E))
        values = _blas_operand(mem_values)
        grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
        module.blocked_read_backward(dtype_name, shape, *views, (values.data_ptr(), *values.stride()), lse.data_ptr(),
                                     grad_out.data_ptr(), out.data_ptr(), g_qloc.data_ptr(), g_qvar.data_ptr(),
                                     g_mloc.data_ptr(), g_mvar.data_ptr(), g_values.data_ptr(), blas)
        return g_qloc, g_qvar, g_mloc, g_mvar, g_values
    g_mloc, g_mvar = mem_loc.new_zeros((B, M, d)), mem_loc.new_zeros((B, M, d))
    g_values = mem_values.new_zeros((B, M, E))
    if B == 0 or Q == 0:
        return g_qloc, g_qvar, g_mloc, g_mvar, g_values
    return read_backward_python(module, dtype_name, shape, views, grad_out, out, lse, query_loc, mem_values,
                                (g_qloc, g_qvar, g_mloc, g_mvar, g_values))


def read_backward_python(module, dtype_name, shape, views, grad_out, out, lse, query_loc, mem_values, grads):
    """The backward's blocks from Python, around torch.mm (where torch's BLAS exports no gemm)."""
    g_qloc, g_qvar, g_mloc, g_mvar, g_values = grads
    B, Q, _ = query_loc.shape
    M = mem_values.shape[1]
    blocks = _Blocks(module, dtype_name, query_loc, M, "weights", scale=2)
    rows, ld = blocks.rows, blocks.ld
    dp = scratch("dp", rows, ld, query_loc.dtype).zero_()  # zero past M: the kernel reads whole vectors
    dps = {n: dp[:n, :M] for n in blocks.weights}
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    lse_ptr, item = lse.data_ptr(), lse.element_size()
    pointers = (grad_out.data_ptr(), out.data_ptr(), blocks.tile.data_ptr(), dp.data_ptr(), ld, g_qloc.data_ptr(),
                g_qvar.data_ptr(), g_mloc.data_ptr(), g_mvar.data_ptr())
    for b in range(B):
        values = _blas_operand(mem_values[b])
        for i, g in enumerate(grad_out[b].split(rows)):
            n = g.shape[0]
            torch.mm(g, values.t(), out=dps[n])
            module.blocked_read_backward_block(dtype_name, shape, *views, b, i * rows, n,
                                               lse_ptr + (b * Q + i * rows) * item, *pointers)
            weights = blocks.weights[n]
            if i == 0:
                torch.mm(weights.t(), g, out=g_values[b])
            else:
                g_values[b].addmm_(weights.t(), g)
    return g_qloc, g_qvar, g_mloc, g_mvar, g_values
