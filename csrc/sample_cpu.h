#pragma once
#include <cstdint>
#include "common.h"

namespace rk {

// One conditional-sampling call (design.md §4), batch flattened to B.
struct SampleShape {
  int64_t B, Q, M, d, E, S;
  double drive_scale;        // E^-1/2 / temperature
  double location_scale;     // 1 / location_temperature; 0: no location term (qloc/qvar unused)
  double threshold;          // < 0: no threshold
  double uniform_var_value;  // qv + mv when every variance is one number, else < 0
};

// The location term's geometry for a call (shared by the CPU and CUDA kernels).
template <class T, int D>
Geometry<T, D> sample_geometry(const SampleShape& s) {
  const bool uniform = s.uniform_var_value >= 0;
  return make_geometry<T, D>(s.d, s.threshold, uniform, uniform ? s.uniform_var_value : 0.0);
}

// A query row is unusable when a logit is NaN or +inf or every logit is -inf (only an overflow of
// the logits in T causes that): probs are then NaN across the row and its draws -1, for the
// caller to raise.

// probs (B,Q,M) contiguous: softmax over entries of the logits.
template <class T>
void conditional_probs_cpu(const SampleShape& s, View3<const T> key, View3<const T> values, View3<const T> qloc,
                           View3<const T> qvar, View3<const T> mloc, View3<const T> mvar, T* probs);

// idx (B,Q,S) contiguous: for each uniform u in [0,1) (B,Q,S contiguous), the first entry whose
// cumulative probability exceeds u * total (inverse CDF).
template <class T>
void conditional_sample_indices_cpu(const SampleShape& s, View3<const T> key, View3<const T> values,
                                    View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                                    View3<const T> mvar, const double* uniforms, int64_t* idx);

}  // namespace rk
