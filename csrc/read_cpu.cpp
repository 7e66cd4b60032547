// Fused Gaussian-kernel read on the CPU: OpenMP over queries, an online softmax over the memory,
// values accumulated in a per-thread row of E numbers. Nothing of size Q×M is ever allocated.
#include "read_cpu.h"
#include "fast_exp.h"
#include "read_dense_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rk {
namespace {

template <class T>
inline T dot(const T* a, const T* b, int64_t sb, int64_t n) {
  T acc = 0;
  if (sb == 1) {
    for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  } else {
    for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k * sb];
  }
  return acc;
}

template <class T>
inline void axpy(T alpha, const T* x, int64_t sx, T* y, int64_t n) {
  if (sx == 1) {
    for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
  } else {
    for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k * sx];
  }
}

// Queries are processed in blocks of kQueryBlock against memory tiles of kTile entries: the
// scores of a block × tile are computed first (a tight loop), then one max/rescale per query and
// tile, then each value row is loaded once and added into every query of the block, so the wide
// value rows stay in L1 instead of streaming once per query.
constexpr int64_t kQueryBlock = 8;
constexpr int64_t kTile = 64;

// acc[i, :] += Σ_j prob[i][j] · z_j for a block × tile, register-blocked: a chunk of E columns
// of every query's accumulator stays in registers while the tile's value rows stream through
// once (one load per kQueryBlock FMAs). For dense tiles (no threshold, or a wide one).
template <class T>
void accumulate_dense(const T (*prob)[kTile], int64_t nt, const T* z0, int64_t z_row_stride, T* acc, int64_t E) {
  // GCC vector extension: keeps the kQueryBlock accumulators in registers, which plain arrays
  // (auto-vectorised) did not, at 3x the cost.
  typedef T V __attribute__((vector_size(32)));
  constexpr int64_t C = sizeof(V) / sizeof(T);
  int64_t e0 = 0;
  for (; e0 + C <= E; e0 += C) {
    V a[kQueryBlock];
    for (int64_t i = 0; i < kQueryBlock; ++i) __builtin_memcpy(&a[i], acc + i * E + e0, sizeof(V));
    for (int64_t j = 0; j < nt; ++j) {
      V z;
      __builtin_memcpy(&z, z0 + j * z_row_stride + e0, sizeof(V));
      for (int64_t i = 0; i < kQueryBlock; ++i) a[i] += prob[i][j] * z;
    }
    for (int64_t i = 0; i < kQueryBlock; ++i) __builtin_memcpy(acc + i * E + e0, &a[i], sizeof(V));
  }
  for (; e0 < E; ++e0)
    for (int64_t j = 0; j < nt; ++j)
      for (int64_t i = 0; i < kQueryBlock; ++i) acc[i * E + e0] += prob[i][j] * z0[j * z_row_stride + e0];
}

template <class T, int D>
void forward_impl(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                  View3<const T> mvar, View3<const T> values, T* out, T* lse) {
  const auto geo = make_geometry<T, D>(s.d, s.threshold, s.uniform_var, s.uniform_var_value);
  const int64_t E = s.E, M = s.M, Q = s.Q;
  const int64_t blocks_per_batch = (Q + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel
  {
    std::vector<T> acc(kQueryBlock * E), diff(s.d), inv(s.d);
    T prob[kQueryBlock][kTile] = {};  // rows past a short last block stay 0
    T run_max[kQueryBlock], run_sum[kQueryBlock];
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < s.B * blocks_per_batch; ++blk) {
      const int64_t b = blk / blocks_per_batch, q0 = (blk % blocks_per_batch) * kQueryBlock;
      const int64_t nq = std::min(kQueryBlock, Q - q0);
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(run_max, run_max + kQueryBlock, neg_inf<T>());
      std::fill(run_sum, run_sum + kQueryBlock, T(0));
      for (int64_t t0 = 0; t0 < M; t0 += kTile) {
        const int64_t nt = std::min(kTile, M - t0);
        bool any = false;
        int64_t nonzero = 0;
        for (int64_t i = 0; i < nq; ++i) {
          const auto ql = row_ref(qloc, b, q0 + i), qv = row_ref(qvar, b, q0 + i);
          T tile_max = neg_inf<T>();
          for (int64_t j = 0; j < nt; ++j) {
            const T sc = geo.score(ql, qv, row_ref(mloc, b, t0 + j), row_ref(mvar, b, t0 + j), diff.data(),
                                   inv.data());
            prob[i][j] = sc;
            tile_max = std::max(tile_max, sc);
          }
          if (tile_max == neg_inf<T>()) {
            std::fill(prob[i], prob[i] + nt, T(0));
            continue;
          }
          any = true;
          if (tile_max > run_max[i]) {
            // Rescale what was accumulated under the old maximum (nothing the first time).
            const T scale = run_max[i] == neg_inf<T>() ? T(0) : std::exp(run_max[i] - tile_max);
            run_sum[i] *= scale;
            T* a = acc.data() + i * E;
            for (int64_t k = 0; k < E; ++k) a[k] *= scale;
            run_max[i] = tile_max;
          }
          T sum = 0;
          for (int64_t j = 0; j < nt; ++j) {
            const T p = exp_nonpositive(prob[i][j] - run_max[i]);  // -inf (masked) -> 0
            prob[i][j] = p;
            sum += p;
            nonzero += p != T(0);
          }
          run_sum[i] += sum;
        }
        if (!any) continue;
        if (values.sc == 1 && nonzero * 4 > nq * nt) {
          accumulate_dense<T>(prob, nt, values.row(b, t0), values.sr, acc.data(), E);
          continue;
        }
        for (int64_t j = 0; j < nt; ++j) {
          const T* z = values.row(b, t0 + j);
          for (int64_t i = 0; i < nq; ++i) {
            // An underflowed weight contributes exactly nothing: skip the E-wide update.
            if (prob[i][j] != T(0)) axpy(prob[i][j], z, values.sc, acc.data() + i * E, E);
          }
        }
      }
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t bq = b * Q + q0 + i;
        T* o = out + bq * E;
        const T* a = acc.data() + i * E;
        if (run_sum[i] > T(0)) {
          const T inv_sum = T(1) / run_sum[i];
          for (int64_t k = 0; k < E; ++k) o[k] = a[k] * inv_sum;
          lse[bq] = run_max[i] + std::log(run_sum[i]);
        } else {
          std::fill(o, o + E, T(0));
          lse[bq] = neg_inf<T>();
        }
      }
    }
  }
}

// dp[i][j] = z_i · g_j for a block of nm ≤ kQueryBlock entries × a tile of queries, the z chunks
// of the block reused across each g row (E contiguous in both). Rows past nm (a short last block)
// repeat the last entry's row, so the unrolled loop never reads past the values (their dp is unused).
template <class T>
void dots_dense(const T* z0, int64_t z_row_stride, int64_t nm, const T* g0, int64_t nt, int64_t E,
                T (*dp)[kTile]) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int64_t C = sizeof(V) / sizeof(T);
  const T* z[kQueryBlock];
  for (int64_t i = 0; i < kQueryBlock; ++i) z[i] = z0 + std::min(i, nm - 1) * z_row_stride;
  for (int64_t j = 0; j < nt; ++j) {
    const T* g = g0 + j * E;
    V acc[kQueryBlock] = {};
    int64_t e0 = 0;
    for (; e0 + C <= E; e0 += C) {
      V gv;
      __builtin_memcpy(&gv, g + e0, sizeof(V));
      for (int64_t i = 0; i < kQueryBlock; ++i) {
        V zv;
        __builtin_memcpy(&zv, z[i] + e0, sizeof(V));
        acc[i] += zv * gv;
      }
    }
    for (int64_t i = 0; i < kQueryBlock; ++i) {
      T sum = 0;
      for (int64_t k = 0; k < C; ++k) sum += acc[i][k];
      for (int64_t e = e0; e < E; ++e) sum += z[i][e] * g[e];
      dp[i][j] = sum;
    }
  }
}

// One pass over all (entry, query) pairs, parallel over blocks of kQueryBlock entries against
// tiles of kTile queries: entry gradients are owned by their block; query gradients go to a
// per-thread buffer (threads × Q × d, never Q × M) summed at the end. Weights are recomputed
// from the saved log-sum-exp.
//
// Deterministic: the blocks are dealt to the threads round-robin (a static schedule, not a
// dynamic one), each thread adds its blocks in order, and the per-thread sums are added in
// thread order, so the gradients are bitwise the same run to run for a given thread count
// (gradcheck's reentrancy test needs that; a dynamic schedule summed in scheduling order).
template <class T, int D>
void backward_impl(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                   View3<const T> mvar, View3<const T> values, const T* grad_out, const T* out,
                   const T* lse, T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values) {
  const auto geo = make_geometry<T, D>(s.d, s.threshold, s.uniform_var, s.uniform_var_value);
  const int64_t E = s.E, M = s.M, Q = s.Q, d = s.d, BQ = s.B * Q;
  // delta_q = g_q · out_q, the softmax backward's per-row term (flash-attention's D).
  std::vector<T> delta(BQ);
#pragma omp parallel for schedule(static)
  for (int64_t bq = 0; bq < BQ; ++bq) delta[bq] = dot(grad_out + bq * E, out + bq * E, 1, E);

  int nthreads = 1;
#ifdef _OPENMP
  nthreads = omp_get_max_threads();
#endif
  std::vector<T> query_grads(size_t(nthreads) * BQ * 2 * d, T(0));  // [thread][bq][loc d | var d]
  const int64_t blocks_per_batch = (M + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    T* my_query_grads = query_grads.data() + size_t(tid) * BQ * 2 * d;
    std::vector<T> dz(kQueryBlock * E), diff(d), inv(d);
    T w[kQueryBlock][kTile] = {}, dp[kQueryBlock][kTile] = {};
#pragma omp for schedule(static, 1)
    for (int64_t blk = 0; blk < s.B * blocks_per_batch; ++blk) {
      const int64_t b = blk / blocks_per_batch, t0 = (blk % blocks_per_batch) * kQueryBlock;
      const int64_t nm = std::min(kQueryBlock, M - t0);
      std::fill(dz.begin(), dz.end(), T(0));
      for (int64_t i = 0; i < nm; ++i) {
        std::fill(g_mloc + (b * M + t0 + i) * d, g_mloc + (b * M + t0 + i + 1) * d, T(0));
        std::fill(g_mvar + (b * M + t0 + i) * d, g_mvar + (b * M + t0 + i + 1) * d, T(0));
      }
      for (int64_t q0 = 0; q0 < Q; q0 += kTile) {
        const int64_t nt = std::min(kTile, Q - q0);
        int64_t nonzero = 0;
        for (int64_t i = 0; i < kQueryBlock; ++i) {
          for (int64_t j = 0; j < nt; ++j) {
            const int64_t bq = b * Q + q0 + j;
            T wij = 0;
            if (i < nm && lse[bq] != neg_inf<T>()) {
              const T sc = geo.score(row_ref(qloc, b, q0 + j), row_ref(qvar, b, q0 + j), row_ref(mloc, b, t0 + i),
                                     row_ref(mvar, b, t0 + i), diff.data(), inv.data());
              wij = exp_nonpositive(sc - lse[bq]);  // masked: -inf -> 0
            }
            w[i][j] = wij;
            nonzero += wij != T(0);
          }
        }
        if (nonzero == 0) continue;
        const T* g0 = grad_out + (b * Q + q0) * E;
        const bool dense = values.sc == 1 && nonzero * 4 > kQueryBlock * nt;
        if (dense) {
          dots_dense<T>(values.row(b, t0), values.sr, nm, g0, nt, E, dp);
          accumulate_dense<T>(w, nt, g0, E, dz.data(), E);
        }
        for (int64_t i = 0; i < nm; ++i) {
          const T* z = values.row(b, t0 + i);
          T* gml = g_mloc + (b * M + t0 + i) * d;
          T* gmv = g_mvar + (b * M + t0 + i) * d;
          for (int64_t j = 0; j < nt; ++j) {
            const T wij = w[i][j];
            if (wij == T(0)) continue;
            const int64_t bq = b * Q + q0 + j;
            const T* g = g0 + j * E;
            const T dpij = dense ? dp[i][j] : dot(g, z, values.sc, E);
            if (!dense) axpy(wij, g, 1, dz.data() + i * E, E);
            const T ds = wij * (dpij - delta[bq]);
            geo.score(row_ref(qloc, b, q0 + j), row_ref(qvar, b, q0 + j), row_ref(mloc, b, t0 + i),
                      row_ref(mvar, b, t0 + i), diff.data(), inv.data());
            T* gq = my_query_grads + bq * 2 * d;
            accumulate_pair_grads(ds, diff.data(), inv.data(), d, gq, gq + d, T(-1));
            accumulate_pair_grads(ds, diff.data(), inv.data(), d, gml, gmv, T(1));
          }
        }
      }
      for (int64_t i = 0; i < nm; ++i)
        std::copy(dz.begin() + i * E, dz.begin() + (i + 1) * E, g_values + (b * M + t0 + i) * E);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t bq = 0; bq < BQ; ++bq) {
    for (int64_t k = 0; k < d; ++k) {
      T gl = 0, gv = 0;
      for (int t = 0; t < nthreads; ++t) {
        const T* src = query_grads.data() + (size_t(t) * BQ + bq) * 2 * d;
        gl += src[k];
        gv += src[d + k];
      }
      g_qloc[bq * d + k] = gl;
      g_qvar[bq * d + k] = gv;
    }
  }
}

}  // namespace

template <class T>
void read_forward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                      View3<const T> mvar, View3<const T> values, T* out, T* lse) {
  if (s.B == 0) return;  // nothing to read (and the dense kernels' grouping divides by B)
  if (dense_read_applies<T>(s, qvar, mvar)) return dense_read_forward_cpu<T>(s, qloc, qvar, mloc, mvar, values, out, lse);
  read_forward_per_pair_cpu<T>(s, qloc, qvar, mloc, mvar, values, out, lse);
}

template <class T>
void read_forward_per_pair_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                               View3<const T> mvar, View3<const T> values, T* out, T* lse) {
  if (s.B == 0) return;
  dispatch_dim(s.d, [&]<int D>() { forward_impl<T, D>(s, qloc, qvar, mloc, mvar, values, out, lse); });
}

template <class T>
const char* read_forward_path(const ReadShape& s, View3<const T> qvar, View3<const T> mvar) {
  if (!dense_read_applies<T>(s, qvar, mvar)) return "per-pair";
  return dense_read_product_scores(s) ? "dense-product" : "dense";
}

template <class T>
void read_backward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                       View3<const T> mvar, View3<const T> values, const T* grad_out, const T* out,
                       const T* lse, T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values) {
  if (s.B == 0) return;  // no gradient to write
  if (dense_read_backward_applies<T>(s, qvar, mvar))
    return dense_read_backward_cpu<T>(s, qloc, qvar, mloc, mvar, values, grad_out, out, lse, g_qloc, g_qvar, g_mloc,
                                      g_mvar, g_values);
  dispatch_dim(s.d, [&]<int D>() {
    backward_impl<T, D>(s, qloc, qvar, mloc, mvar, values, grad_out, out, lse, g_qloc, g_qvar, g_mloc, g_mvar,
                        g_values);
  });
}

template void read_forward_cpu<float>(const ReadShape&, View3<const float>, View3<const float>,
                                      View3<const float>, View3<const float>, View3<const float>, float*,
                                      float*);
template void read_forward_cpu<double>(const ReadShape&, View3<const double>, View3<const double>,
                                       View3<const double>, View3<const double>, View3<const double>, double*,
                                       double*);
template void read_forward_per_pair_cpu<float>(const ReadShape&, View3<const float>, View3<const float>,
                                               View3<const float>, View3<const float>, View3<const float>, float*,
                                               float*);
template void read_forward_per_pair_cpu<double>(const ReadShape&, View3<const double>, View3<const double>,
                                                View3<const double>, View3<const double>, View3<const double>,
                                                double*, double*);
template const char* read_forward_path<float>(const ReadShape&, View3<const float>, View3<const float>);
template const char* read_forward_path<double>(const ReadShape&, View3<const double>, View3<const double>);
template void read_backward_cpu<float>(const ReadShape&, View3<const float>, View3<const float>,
                                       View3<const float>, View3<const float>, View3<const float>,
                                       const float*, const float*, const float*, float*, float*, float*, float*,
                                       float*);
template void read_backward_cpu<double>(const ReadShape&, View3<const double>, View3<const double>,
                                        View3<const double>, View3<const double>, View3<const double>,
                                        const double*, const double*, const double*, double*, double*, double*,
                                        double*, double*);

}  // namespace rk
