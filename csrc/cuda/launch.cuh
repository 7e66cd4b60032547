// Host-side launch plumbing shared by the CUDA kernel files (read.cu, sample.cu): strided views
// of the pybind11 arguments, the location-dimension limit and launch-error reporting. The score
// maths itself is ../common.h's Geometry, shared with the CPU kernels.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../common.h"
#include "read_cuda.h"  // Dtype, Strided, kMaxDim

namespace rk::cuda {

// Per-pair location arrays: D elements when the dimension is fixed at compile time, else kMaxDim.
template <int D>
constexpr int kDim = D > 0 ? D : int(kMaxDim);

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class T>
View3<const T> view(const Strided& a) {
  return {reinterpret_cast<const T*>(a.p), a.sb, a.sr, a.sc};
}

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Throws when the last launch failed (bad configuration, missing kernel image for this GPU).
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cuda backend: ") + what + ": " + cudaGetErrorString(err));
}

// The kernels keep per-pair location arrays of kMaxDim elements in registers.
inline void check_location_dim(int64_t d) {
  if (d < 1 || d > kMaxDim)
    throw std::invalid_argument("cuda backend: location dimension d must be in 1.." + std::to_string(kMaxDim));
}

}  // namespace rk::cuda
