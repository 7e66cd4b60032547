#pragma once
#include <cstdint>
#include "common.h"

namespace rk {

struct ReadShape {
  int64_t B, Q, M, d, E;
  double threshold;  // < 0: no threshold
  bool uniform_var;  // every query and entry variance is the same number...
  double uniform_var_value;  // ...and qv + mv equals this
};

// out (B,Q,E) and lse (B,Q) are contiguous; lse is -inf for a query that matched nothing.
template <class T>
void read_forward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                      View3<const T> mvar, View3<const T> values, T* out, T* lse);

// The per-pair kernel (csrc/read_cpu.cpp) whatever the call, where read_forward_cpu may take the
// dense one: for tests and benchmarks that compare the two on the same call.
template <class T>
void read_forward_per_pair_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                               View3<const T> mvar, View3<const T> values, T* out, T* lse);

// Which forward kernel takes the call: "dense-product" (csrc/read_dense_cpu.cpp, scores as a matrix
// product), "dense" (the same, direct scores) or "per-pair" (csrc/read_cpu.cpp). For tests and
// benchmarks.
template <class T>
const char* read_forward_path(const ReadShape& s, View3<const T> qvar, View3<const T> mvar);

// Gradients w.r.t. the five inputs, all contiguous (B, ·, ·); variances' gradients are w.r.t.
// the variances themselves (the caller chains through σ²).
template <class T>
void read_backward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                       View3<const T> mvar, View3<const T> values, const T* grad_out, const T* out,
                       const T* lse, T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values);

}  // namespace rk
