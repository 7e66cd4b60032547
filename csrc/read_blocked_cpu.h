#pragma once
#include <cstddef>
#include <cstdint>

#include "read_cpu.h"

namespace rk {

// The elementwise halves of the blocked dense read (csrc/read_blocked_cpu.cpp): the cpu backend
// (resonant_kernels/backends/cpu.py) runs a dense read one block of queries at a time, these
// kernels making the block's softmax weights (and, backward, its score gradients) and the BLAS
// that torch ships multiplying them with the values. Only for calls without a threshold whose
// every (query, entry) pair of a batch row shares its variance (blocked_read_applies).
template <class T>
bool blocked_read_applies(const ReadShape& s, View3<const T> qvar, View3<const T> mvar);

// A BLAS gemm with the Fortran interface (sgemm_ / dgemm_: column-major, every argument by pointer).
template <class T>
using BlasGemm = void (*)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                          const T* alpha, const T* a, const int* lda, const T* b, const int* ldb, const T* beta, T* c,
                          const int* ldc);

// The BLAS's "threads for calls from this thread" (MKL's mkl_set_num_threads_local: returns the
// previous setting, 0 meaning the global one), or null.
using BlasLocalThreads = int (*)(int threads);

// MKL's packed gemm (Fortran interface: sgemm_pack_get_size, sgemm_pack, sgemm_compute): an operand
// packed once into the BLAS's internal layout and multiplied many times without packing it again.
using BlasPackSize = size_t (*)(const char* identifier, const int* m, const int* n, const int* k);
template <class T>
using BlasPack = void (*)(const char* identifier, const char* trans, const int* m, const int* n, const int* k,
                          const T* alpha, const T* src, const int* ld, T* dest);
template <class T>
using BlasCompute = void (*)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                             const T* a, const int* lda, const T* b, const int* ldb, const T* beta, T* c,
                             const int* ldc);

// The BLAS functions of a one-call forward or backward: gemm is required; local_threads and the
// packed-gemm trio (all three or none) may be null.
template <class T>
struct Blas {
  BlasGemm<T> gemm = nullptr;
  BlasLocalThreads local_threads = nullptr;
  BlasPackSize pack_size = nullptr;
  BlasPack<T> pack = nullptr;
  BlasCompute<T> compute = nullptr;
  bool packs() const { return pack_size && pack && compute; }
};

// Queries per block: at most the rows of a tile (rows × row_bytes) near 1 MB (a multiple of 16, 16
// to 512), then a batch row's blocks rounded up to a multiple of 4 and its queries shared evenly.
int64_t blocked_read_block_rows(int64_t Q, int64_t row_bytes);

// The whole forward (out (B, Q, E), lse (B, Q), contiguous), blocks of queries dealt to the threads,
// each multiplying its block's weights with the values by the caller's BLAS on its own thread
// (local_threads(1) around the calls where given; the values packed once per batch row where the
// BLAS packs and a batch row has two whole blocks or more). The values need one unit stride (row-
// or column-major).
template <class T>
void blocked_read_forward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                              View3<const T> mvar, View3<const T> values, T* out, T* lse, const Blas<T>& blas);

// The whole backward of blocked_read_forward_cpu (lse, grad_out, out contiguous (B, Q, ·); writes
// g_qloc, g_qvar (B, Q, d), g_mloc, g_mvar (B, M, d), g_values (B, M, E), all contiguous), blocks of
// queries dealt to the threads in fixed runs, each thread's BLAS calls on its own thread; the
// entries' gradients summed per thread and added over the threads in thread order (the same bits
// run to run for a given thread count). Values as for the forward.
template <class T>
void blocked_read_backward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                               View3<const T> mvar, View3<const T> values, const T* lse, const T* grad_out,
                               const T* out, T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values,
                               const Blas<T>& blas);

// Entries per weights row, rounded up to whole vectors: a tile row's stride must be at least this.
int64_t blocked_read_row_lanes(bool is_double, int64_t M);

// tile[i · ld + j] = scale[i] ⁻¹ × the softmax weight of entry j for query q0 + i of batch row b
// (i < n, j < M; zero for M ≤ j < row lanes): the weights unnormalised, the product's row i to be
// multiplied by scale[i] (0 where nothing is read); lse[i] = that query's log-sum-exp (−inf where
// nothing is read).
template <class T>
void blocked_read_weights_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                              View3<const T> mvar, int64_t b, int64_t q0, int64_t n, T* tile, int64_t ld, T* lse,
                              T* scale);

// The backward of one block of queries, its product dp[i · ld + j] = g_i · z_j ready (the output
// gradients times the values; zero for M ≤ j < row lanes): tile gets the block's weights again,
// recomputed from the saved lse (the dL/dz product needs them next); with ds = w (dp − δ_i),
// δ_i = g_i · out_i (grad_out and out contiguous (B, Q, E)), rows q0 .. q0 + n of g_qloc / g_qvar
// (contiguous (B, Q, d)) are written and batch row b of g_mloc / g_mvar (contiguous (B, M, d))
// added to.
template <class T>
void blocked_read_backward_block_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar,
                                     View3<const T> mloc, View3<const T> mvar, int64_t b, int64_t q0, int64_t n,
                                     const T* lse, const T* grad_out, const T* out, T* tile, const T* dp, int64_t ld,
                                     T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar);

}  // namespace rk
