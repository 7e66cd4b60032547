// Fused Gaussian-kernel read on the CPU: OpenMP over queries, an online softmax over the memory,
// values accumulated in a per-thread row of E numbers. Nothing of size Q×M is ever allocated.
#include "read_cpu.h"
#include "fast_exp.h"

#include <algorithm>
#include <cmath>
#include <vector>

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
        if (values.s2 == 1 && nonzero * 4 > nq * nt) {
          accumulate_dense<T>(prob, nt, values.row(b, t0), values.s1, acc.data(), E);
          continue;
        }
        for (int64_t j = 0; j < nt; ++j) {
          const T* z = values.row(b, t0 + j);
          for (int64_t i = 0; i < nq; ++i) {
            // An underflowed weight contributes exactly nothing: skip the E-wide update.
            if (prob[i][j] != T(0)) axpy(prob[i][j], z, values.s2, acc.data() + i * E, E);
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

// dlogk/dv_i = ½ (diff_i² / v_i² − 1 / v_i); dlogk/dq_i = −diff_i / v_i = −dlogk/dm_i.
template <class T>
inline void accumulate_pair_grads(T ds, const T* diff, const T* inv, int64_t n, T* g_loc, T* g_var,
                                  T loc_sign) {
  for (int64_t i = 0; i < n; ++i) {
    const T r = diff[i] * inv[i];
    g_loc[i] += loc_sign * ds * r;
    g_var[i] += ds * T(0.5) * (r * r - inv[i]);
  }
}

template <class T, int D>
void backward_impl(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                   View3<const T> mvar, View3<const T> values, const T* grad_out, const T* out,
                   const T* lse, T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values) {
  const auto geo = make_geometry<T, D>(s.d, s.threshold, s.uniform_var, s.uniform_var_value);
  const int64_t E = s.E, M = s.M, Q = s.Q, d = s.d;
  // delta_q = g_q · out_q, the softmax backward's per-row term (flash-attention's D).
  std::vector<T> delta(s.B * Q);
  // Pass 1, parallel over queries: query gradients.
#pragma omp parallel
  {
    std::vector<T> diff(d), inv(d);
#pragma omp for schedule(dynamic, 8)
    for (int64_t bq = 0; bq < s.B * Q; ++bq) {
      const int64_t b = bq / Q, q = bq % Q;
      const T* g = grad_out + bq * E;
      delta[bq] = dot(g, out + bq * E, 1, E);
      T* gl = g_qloc + bq * d;
      T* gv = g_qvar + bq * d;
      std::fill(gl, gl + d, T(0));
      std::fill(gv, gv + d, T(0));
      if (lse[bq] == neg_inf<T>()) continue;  // matched nothing: output is a constant zero
      const auto ql = row_ref(qloc, b, q), qv = row_ref(qvar, b, q);
      for (int64_t t = 0; t < M; ++t) {
        const T sc = geo.score(ql, qv, row_ref(mloc, b, t), row_ref(mvar, b, t), diff.data(), inv.data());
        if (sc == neg_inf<T>()) continue;
        const T w = exp_nonpositive(sc - lse[bq]);
        if (w == T(0)) continue;
        const T ds = w * (dot(g, values.row(b, t), values.s2, E) - delta[bq]);
        accumulate_pair_grads(ds, diff.data(), inv.data(), d, gl, gv, T(-1));
      }
    }
  }
  // Pass 2, parallel over memory entries: entry gradients, so no two threads write one row.
#pragma omp parallel
  {
    std::vector<T> diff(d), inv(d);
#pragma omp for schedule(dynamic, 8)
    for (int64_t bt = 0; bt < s.B * M; ++bt) {
      const int64_t b = bt / M, t = bt % M;
      T* gz = g_values + bt * E;
      T* gl = g_mloc + bt * d;
      T* gv = g_mvar + bt * d;
      std::fill(gz, gz + E, T(0));
      std::fill(gl, gl + d, T(0));
      std::fill(gv, gv + d, T(0));
      const auto ml = row_ref(mloc, b, t), mv = row_ref(mvar, b, t);
      const T* z = values.row(b, t);
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t bq = b * Q + q;
        if (lse[bq] == neg_inf<T>()) continue;
        const T sc = geo.score(row_ref(qloc, b, q), row_ref(qvar, b, q), ml, mv, diff.data(), inv.data());
        if (sc == neg_inf<T>()) continue;
        const T w = exp_nonpositive(sc - lse[bq]);
        if (w == T(0)) continue;
        const T* g = grad_out + bq * E;
        const T ds = w * (dot(g, z, values.s2, E) - delta[bq]);
        axpy(w, g, 1, gz, E);
        accumulate_pair_grads(ds, diff.data(), inv.data(), d, gl, gv, T(1));
      }
    }
  }
}

}  // namespace

template <class T>
void read_forward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                      View3<const T> mvar, View3<const T> values, T* out, T* lse) {
  dispatch_dim(s.d, [&]<int D>() { forward_impl<T, D>(s, qloc, qvar, mloc, mvar, values, out, lse); });
}

template <class T>
void read_backward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                       View3<const T> mvar, View3<const T> values, const T* grad_out, const T* out,
                       const T* lse, T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values) {
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
template void read_backward_cpu<float>(const ReadShape&, View3<const float>, View3<const float>,
                                       View3<const float>, View3<const float>, View3<const float>,
                                       const float*, const float*, const float*, float*, float*, float*, float*,
                                       float*);
template void read_backward_cpu<double>(const ReadShape&, View3<const double>, View3<const double>,
                                        View3<const double>, View3<const double>, View3<const double>,
                                        const double*, const double*, const double*, double*, double*, double*,
                                        double*, double*);

}  // namespace rk
