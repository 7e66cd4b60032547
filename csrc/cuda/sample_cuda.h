// Host-side entry points of the CUDA conditional-sampling kernels (sample.cu), design.md §4.
// Plain C++ types only, so the pybind11 bindings compile without CUDA headers; tensors arrive as
// device pointers + element strides, the stream as an integer (a cudaStream_t).
#pragma once
#include <cstdint>

#include "../sample_cpu.h"  // SampleShape
#include "read_cuda.h"      // Dtype, Strided, kMaxDim

namespace rk::cuda {

// probs (B,Q,M) contiguous, in `dtype` (float32 or float64, every tensor in that dtype): the
// softmax over entries of the logits. qloc/qvar are not read when s.location_scale is 0.
void conditional_probs(const SampleShape& s, Dtype dtype, Strided key, Strided values, Strided qloc,
                       Strided qvar, Strided mloc, Strided mvar, uintptr_t probs, uintptr_t stream);

// idx (B,Q,S) int64 contiguous: for each uniform u in [0,1) (B,Q,S float64 contiguous) the first
// entry whose cumulative probability exceeds u * total, clamped to the last entry of positive
// probability (an inverse-CDF draw).
void conditional_sample_indices(const SampleShape& s, Dtype dtype, Strided key, Strided values, Strided qloc,
                                Strided qvar, Strided mloc, Strided mvar, uintptr_t uniforms, uintptr_t idx,
                                uintptr_t stream);

}  // namespace rk::cuda
