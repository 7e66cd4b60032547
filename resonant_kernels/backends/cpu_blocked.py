"""The cpu backend's dense read in blocks of queries (issue #17): for a read without a threshold whose
every (query, entry) pair of a batch row shares its variance, with values at least
BLOCKED_FROM_E wide and locations of fewer than BLOCKED_BELOW_D dimensions.

Each block of queries gets its softmax weights in a tile of its own (block rows × M, about
TILE_BYTES) from csrc/read_blocked_cpu.cpp, and the BLAS that torch ships (MKL on x86) multiplies
the tile with the values: the product is the bare `logits @ V`'s, the elementwise work a few vector
operations per pair, and nothing of size Q × M exists beyond the tile. Backward, per block: the
weights again from the saved log-sum-exps, dp = g @ valuesᵀ (BLAS), the score, location and
variance gradients from dp (C++), dL/dvalues += weightsᵀ @ g (BLAS), blocks in order.

Determinism: the C++ parts give the same bits for any thread count; the BLAS products are the same
bits run to run, but may differ in the last bits with the number of threads (MKL splits its work
by thread count) and with the size of the block that holds a query (docs/design.md §7).
"""
from __future__ import annotations

import torch

# Values at least this wide: below, the weights' exp and the block loop are a large share of the
# product, and csrc/read_dense_cpu.cpp's fused kernel is faster.
BLOCKED_FROM_E = 64
# Locations of fewer dimensions: from 32 on, csrc/read_dense_cpu.cpp computes the scores as a
# product too, which these direct scores (d operations per pair) are not.
BLOCKED_BELOW_D = 32
# Bytes of a block's weights tile: the tile stays in the last-level cache between the kernel that
# writes it and the product that reads it.
TILE_BYTES = 4 << 20
MOST_ROWS = 512
LEAST_ROWS = 16


def applies(module, dtype_name, shape, query_var_view, mem_var_view, d, E) -> bool:
    return E >= BLOCKED_FROM_E and d < BLOCKED_BELOW_D and module.blocked_read_applies(
        dtype_name, shape, query_var_view, mem_var_view)


def block_rows(Q: int, row_bytes: int) -> int:
    """Queries per block: the tile near TILE_BYTES, a multiple of LEAST_ROWS (the shapes alone decide
    it, never the thread count)."""
    rows = max(LEAST_ROWS, min(MOST_ROWS, TILE_BYTES // max(row_bytes, 1)) // LEAST_ROWS * LEAST_ROWS)
    return max(1, min(rows, Q))


def _blas_operand(t: torch.Tensor) -> torch.Tensor:
    """t (2-D) itself where BLAS can read it in place (one unit stride), else a contiguous copy."""
    if (t.stride(-1) == 1 and t.stride(-2) >= max(t.shape[-1], 1)) or (
            t.stride(-2) == 1 and t.stride(-1) >= max(t.shape[-2], 1)):
        return t
    return t.contiguous()


def read_forward(module, dtype_name, shape, views, query_loc, mem_values):
    qloc_v, qvar_v, mloc_v, mvar_v = views
    B, Q, _ = query_loc.shape
    M, E = mem_values.shape[1:]
    out = mem_values.new_empty((B, Q, E))
    lse = query_loc.new_empty((B, Q))
    if Q == 0:
        return out, lse
    ld = module.blocked_read_row_lanes(dtype_name, M)
    rows = block_rows(Q, ld * query_loc.element_size())
    tile = query_loc.new_empty((rows, ld))
    for b in range(B):
        values = _blas_operand(mem_values[b])
        for q0 in range(0, Q, rows):
            n = min(rows, Q - q0)
            module.blocked_read_weights(dtype_name, shape, qloc_v, qvar_v, mloc_v, mvar_v, b, q0, n, tile.data_ptr(),
                                        ld, lse[b, q0:].data_ptr())
            torch.mm(tile[:n, :M], values, out=out[b, q0:q0 + n])
    return out, lse


def read_backward(module, dtype_name, shape, views, grad_out, out, lse, query_loc, mem_loc, mem_values):
    qloc_v, qvar_v, mloc_v, mvar_v = views
    B, Q, d = query_loc.shape
    M, E = mem_values.shape[1:]
    g_qloc, g_qvar = query_loc.new_empty((B, Q, d)), query_loc.new_empty((B, Q, d))
    g_mloc, g_mvar = mem_loc.new_zeros((B, M, d)), mem_loc.new_zeros((B, M, d))
    g_values = mem_values.new_zeros((B, M, E))
    if Q == 0:
        return g_qloc, g_qvar, g_mloc, g_mvar, g_values
    ld = module.blocked_read_row_lanes(dtype_name, M)
    rows = block_rows(Q, ld * query_loc.element_size())
    tile = query_loc.new_empty((rows, ld))
    dp = query_loc.new_zeros((rows, ld))  # zero past M: the kernel reads whole vectors
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    for b in range(B):
        values = _blas_operand(mem_values[b])
        for q0 in range(0, Q, rows):
            n = min(rows, Q - q0)
            g = grad_out[b, q0:q0 + n]
            torch.mm(g, values.t(), out=dp[:n, :M])
            module.blocked_read_backward_block(
                dtype_name, shape, qloc_v, qvar_v, mloc_v, mvar_v, b, q0, n, lse[b, q0:].data_ptr(),
                grad_out.data_ptr(), out.data_ptr(), tile.data_ptr(), dp.data_ptr(), ld, g_qloc.data_ptr(),
                g_qvar.data_ptr(), g_mloc.data_ptr(), g_mvar.data_ptr())
            if q0 == 0:
                torch.mm(tile[:n, :M].t(), g, out=g_values[b])
            else:
                g_values[b].addmm_(tile[:n, :M].t(), g)
    return g_qloc, g_qvar, g_mloc, g_mvar, g_values
