#pragma once
#include <cstdint>
#include "common.h"

namespace rk {

struct LooShape {
  int64_t B, M, d, E;
  double threshold;  // < 0: no threshold
  bool uniform_var;  // every entry's variance is the same number...
  double uniform_var_value;  // ...and twice it (v_i + v_j) equals this
};

// Pass 1: every active entry read from the other active entries of its batch row (its own
// variance standing in for the query's). estimate (B,M,E), error (B,M) = ‖estimate − value‖ and
// lse (B,M) = log Σ_j k_ij are contiguous; lse is -inf where nothing else matched. `active`
// (B,M contiguous, 1 = present) may be null: all present. Inactive entries get zeros.
template <class T>
void loo_errors_cpu(const LooShape& s, View3<const T> mloc, View3<const T> mvar, View3<const T> values,
                    const uint8_t* active, T* estimate, T* error, T* lse);

// Pass 2: from pass 1's error and lse, recomputes w_ij = exp(s_ij − lse_i) pair by pair and writes
// num_dependencies (w_ij > 1/n, n = the row's active count) and candidate: error_i < max_error and
// i depends on some j with (error_j, j) < (error_i, i). Both (B,M) contiguous.
template <class T>
void loo_dependencies_cpu(const LooShape& s, View3<const T> mloc, View3<const T> mvar, const uint8_t* active,
                          const T* error, const T* lse, double max_error, int64_t* num_dependencies,
                          uint8_t* candidate);

}  // namespace rk
