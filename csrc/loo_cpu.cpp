// Leave-one-out errors and the pruning candidate test on the CPU, in two passes over the pairs
// (OpenMP over entries). Extra memory is O(M + E) per thread: the M×M weights are recomputed
// in pass 2 from pass 1's log-sum-exps instead of being stored.
#include "loo_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace rk {
namespace {

inline bool is_active(const uint8_t* active, int64_t bi) { return active == nullptr || active[bi] != 0; }

template <class T, int D>
void errors_impl(const LooShape& s, View3<const T> mloc, View3<const T> mvar, View3<const T> values,
                 const uint8_t* active, T* estimate, T* error, T* lse) {
  const auto geo = make_geometry<T, D>(s.d, s.threshold, s.uniform_var, s.uniform_var_value);
  const int64_t E = s.E, M = s.M;
#pragma omp parallel
  {
    std::vector<T> acc(E), diff(s.d), inv(s.d);
#pragma omp for schedule(dynamic, 8)
    for (int64_t bi = 0; bi < s.B * M; ++bi) {
      const int64_t b = bi / M, i = bi % M;
      T* est = estimate + bi * E;
      const T* z = values.row(b, i);
      std::fill(acc.begin(), acc.end(), T(0));
      OnlineSoftmax<T> softmax;
      if (is_active(active, bi)) {
        const auto ql = row_ref(mloc, b, i), qv = row_ref(mvar, b, i);
        for (int64_t j = 0; j < M; ++j) {
          if (j == i || !is_active(active, b * M + j)) continue;
          const T sc = geo.score(ql, qv, row_ref(mloc, b, j), row_ref(mvar, b, j), diff.data(), inv.data());
          if (sc == neg_inf<T>()) continue;
          T rescale;
          const T p = softmax.add(sc, rescale);
          if (rescale != T(1)) for (auto& a : acc) a *= rescale;
          if (p != T(0)) {
            const T* zj = values.row(b, j);
            for (int64_t k = 0; k < E; ++k) acc[k] += p * zj[k * values.sc];
          }
        }
      }
      const T inv_sum = softmax.sum > T(0) ? T(1) / softmax.sum : T(0);
      T err2 = 0;
      for (int64_t k = 0; k < E; ++k) {
        est[k] = acc[k] * inv_sum;
        const T r = est[k] - z[k * values.sc];
        err2 += r * r;
      }
      error[bi] = is_active(active, bi) ? std::sqrt(err2) : T(0);
      lse[bi] = softmax.lse();
    }
  }
}

template <class T, int D>
void dependencies_impl(const LooShape& s, View3<const T> mloc, View3<const T> mvar, const uint8_t* active,
                       const T* error, const T* lse, double max_error, int64_t* num_dependencies,
                       uint8_t* candidate) {
  const auto geo = make_geometry<T, D>(s.d, s.threshold, s.uniform_var, s.uniform_var_value);
  const int64_t M = s.M;
  // w_ij > 1/n  <=>  s_ij > lse_i − log n: the comparison stays in log space, no exp per pair.
  std::vector<T> log_count(s.B);
  for (int64_t b = 0; b < s.B; ++b) {
    int64_t n = 0;
    for (int64_t j = 0; j < M; ++j) n += is_active(active, b * M + j);
    log_count[b] = T(std::log(double(std::max<int64_t>(n, 1))));
  }
#pragma omp parallel
  {
    std::vector<T> diff(s.d), inv(s.d);
#pragma omp for schedule(dynamic, 8)
    for (int64_t bi = 0; bi < s.B * M; ++bi) {
      const int64_t b = bi / M, i = bi % M;
      int64_t count = 0;
      bool has_lower = false;
      if (is_active(active, bi) && lse[bi] != neg_inf<T>()) {
        const auto ql = row_ref(mloc, b, i), qv = row_ref(mvar, b, i);
        const T cut = lse[bi] - log_count[b];
        const T err_i = error[bi];
        for (int64_t j = 0; j < M; ++j) {
          if (j == i || !is_active(active, b * M + j)) continue;
          const T sc = geo.score(ql, qv, row_ref(mloc, b, j), row_ref(mvar, b, j), diff.data(), inv.data());
          if (!(sc > cut)) continue;
          ++count;
          const T err_j = error[b * M + j];
          has_lower = has_lower || err_j < err_i || (err_j == err_i && j < i);
        }
      }
      num_dependencies[bi] = count;
      candidate[bi] = has_lower && error[bi] < T(max_error);  // compared in T, as torch compares a tensor with a float
    }
  }
}

}  // namespace

template <class T>
void loo_errors_cpu(const LooShape& s, View3<const T> mloc, View3<const T> mvar, View3<const T> values,
                    const uint8_t* active, T* estimate, T* error, T* lse) {
  dispatch_dim(s.d, [&]<int D>() { errors_impl<T, D>(s, mloc, mvar, values, active, estimate, error, lse); });
}

template <class T>
void loo_dependencies_cpu(const LooShape& s, View3<const T> mloc, View3<const T> mvar, const uint8_t* active,
                          const T* error, const T* lse, double max_error, int64_t* num_dependencies,
                          uint8_t* candidate) {
  dispatch_dim(s.d, [&]<int D>() {
    dependencies_impl<T, D>(s, mloc, mvar, active, error, lse, max_error, num_dependencies, candidate);
  });
}

template void loo_errors_cpu<float>(const LooShape&, View3<const float>, View3<const float>, View3<const float>,
                                    const uint8_t*, float*, float*, float*);
template void loo_errors_cpu<double>(const LooShape&, View3<const double>, View3<const double>,
                                     View3<const double>, const uint8_t*, double*, double*, double*);
template void loo_dependencies_cpu<float>(const LooShape&, View3<const float>, View3<const float>, const uint8_t*,
                                          const float*, const float*, double, int64_t*, uint8_t*);
template void loo_dependencies_cpu<double>(const LooShape&, View3<const double>, View3<const double>,
                                           const uint8_t*, const double*, const double*, double, int64_t*,
                                           uint8_t*);

}  // namespace rk
