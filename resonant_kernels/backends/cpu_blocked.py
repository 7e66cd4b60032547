"""The cpu backend's dense read in blocks of queries (issue #17): for a read without a threshold whose
every (query, entry) pair of a batch row shares its variance, with values at least
BLOCKED_FROM_E wide and locations of fewer than BLOCKED_BELOW_D dimensions (`applies`).

Each block of queries gets its softmax weights in a tile (block rows × M, about TILE_BYTES) from
csrc/read_blocked_cpu.cpp, unnormalised, and the BLAS that torch ships (MKL on x86) multiplies the
tile with the values, each product row then divided by its weights' sum: the product is the bare
`logits @ V`'s, the elementwise work a few vector operations per pair, and nothing of size Q × M
exists beyond the tile. Backward, per block: dp = g @ valuesᵀ (BLAS); the weights again from the
saved log-sum-exps, the score gradients and from them the location and variance gradients (C++);
dL/dvalues += weightsᵀ @ g (BLAS), the blocks in order.

Determinism: the C++ parts give the same bits for any thread count. The BLAS products are the same
bits run to run for a given thread count, but MKL may split a product differently for another
thread count or block size (docs/design.md §7).
"""
from __future__ import annotations

import threading

import torch

# Values at least this wide. Measured against csrc/read_dense_cpu.cpp's fused kernel (runs of
# interleaved calls, both beside the bare product, float32, d = 2, σ = 10, no threshold; 2 threads):
# the fused kernel was faster at E = 128, 256, 384 and 512 (forward 1.06-1.22x the bare product
# against 1.20-1.28x here), this path at E = 768 and 1024 (1.14-1.18x against 1.19-1.26x, and
# forward + backward 3.1-3.8x against 3.3-3.8x). With one thread this path was ahead from E = 384.
BLOCKED_FROM_E = 768
# Locations of fewer dimensions: from 32 on, csrc/read_dense_cpu.cpp computes the scores as a
# product too, which these direct scores (d operations per pair) are not.
BLOCKED_BELOW_D = 32
# Bytes of a block's weights tile: it stays in the L2 cache (2 MB a core here) between the kernel
# that writes it and the product that reads it; 4 MB tiles made the kernel ~15% slower per pair
# (runs/mb/bench.cpp at M = 4096).
TILE_BYTES = 2 << 20
MOST_ROWS = 512
LEAST_ROWS = 16

_scratch = threading.local()  # per thread: a call's kernels run with the GIL released


def applies(module, dtype_name, shape, query_var_view, mem_var_view, d, E) -> bool:
    return E >= BLOCKED_FROM_E and d < BLOCKED_BELOW_D and module.blocked_read_applies(
        dtype_name, shape, query_var_view, mem_var_view)


def block_rows(Q: int, row_bytes: int) -> int:
    """Queries per block: the tile near TILE_BYTES, a multiple of LEAST_ROWS (the shapes alone decide
    it, never the thread count)."""
    rows = max(LEAST_ROWS, min(MOST_ROWS, TILE_BYTES // max(row_bytes, 1)) // LEAST_ROWS * LEAST_ROWS)
    return max(1, min(rows, Q))


def scratch(name: str, rows: int, ld: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, ld) buffer of the calling thread, kept from call to call: a fresh 2 MB tile costs its
    page faults on first touch, a few percent of a call at the issue's shapes."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < rows * ld:
        buf = buffers[(name, dtype)] = torch.empty(rows * ld, dtype=dtype)
    return buf[:rows * ld].view(rows, ld)


def _blas_operand(t: torch.Tensor) -> torch.Tensor:
    """t (2-D) itself where BLAS reads it in place (one unit stride), else a contiguous copy."""
    if (t.stride(-1) == 1 and t.stride(-2) >= max(t.shape[-1], 1)) or (
            t.stride(-2) == 1 and t.stride(-1) >= max(t.shape[-2], 1)):
        return t
    return t.contiguous()


class _Blocks:
    """A call's blocks of queries, with the views of the tile that each block size uses (made once:
    the Python per block is a kernel call and the products)."""

    def __init__(self, module, dtype_name, query_loc, M, name):
        Q = query_loc.shape[1]
        self.ld = module.blocked_read_row_lanes(dtype_name, M)
        self.rows = block_rows(Q, self.ld * query_loc.element_size())
        self.tile = scratch(name, self.rows, self.ld, query_loc.dtype)
        sizes = {self.rows, Q - (Q - 1) // self.rows * self.rows} if Q else set()
        self.weights = {n: self.tile[:n, :M] for n in sizes}  # a whole block's, the last's


def read_forward(module, dtype_name, shape, views, query_loc, mem_values):
    B, Q, _ = query_loc.shape
    M, E = mem_values.shape[1:]
    out = mem_values.new_empty((B, Q, E))
    lse = query_loc.new_empty((B, Q))
    if Q == 0:
        return out, lse
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
    g_mloc, g_mvar = mem_loc.new_zeros((B, M, d)), mem_loc.new_zeros((B, M, d))
    g_values = mem_values.new_zeros((B, M, E))
    if Q == 0:
        return g_qloc, g_qvar, g_mloc, g_mvar, g_values
    blocks = _Blocks(module, dtype_name, query_loc, M, "weights")
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
