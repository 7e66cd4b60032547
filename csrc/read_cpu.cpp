// Fused Gaussian-kernel read on the CPU: OpenMP over queries, an online softmax over the memory,
// values accumulated in a per-thread row of E numbers. Nothing of size Q×M is ever allocated.
#include "read_cpu.h"

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

template <class T, int D>
void forward_impl(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                  View3<const T> mvar, View3<const T> values, T* out, T* lse) {
  const auto geo = make_geometry<T, D>(s.d, s.threshold, s.uniform_var, s.uniform_var_value);
  const int64_t E = s.E, M = s.M;
#pragma omp parallel
  {
    std::vector<T> acc(E), diff(s.d), inv(s.d);
#pragma omp for schedule(dynamic, 8)
    for (int64_t bq = 0; bq < s.B * s.Q; ++bq) {
      const int64_t b = bq / s.Q, q = bq % s.Q;
      const auto ql = row_ref(qloc, b, q), qv = row_ref(qvar, b, q);
      std::fill(acc.begin(), acc.end(), T(0));
      OnlineSoftmax<T> softmax;
      for (int64_t t = 0; t < M; ++t) {
        const T sc = geo.score(ql, qv, row_ref(mloc, b, t), row_ref(mvar, b, t), diff.data(), inv.data());
        if (sc == neg_inf<T>()) continue;
        T rescale;
        const T p = softmax.add(sc, rescale);
        if (rescale != T(1)) for (auto& a : acc) a *= rescale;
        // An underflowed weight contributes exactly nothing: skip the E-wide update.
        if (p != T(0)) axpy(p, values.row(b, t), values.s2, acc.data(), E);
      }
      T* o = out + bq * E;
      if (softmax.sum > T(0)) {
        const T inv_sum = T(1) / softmax.sum;
        for (int64_t k = 0; k < E; ++k) o[k] = acc[k] * inv_sum;
      } else {
        std::fill(o, o + E, T(0));
      }
      lse[bq] = softmax.lse();
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
        const T w = std::exp(sc - lse[bq]);
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
        const T w = std::exp(sc - lse[bq]);
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
