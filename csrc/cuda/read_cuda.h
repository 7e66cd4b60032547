// Host-side entry points of the CUDA read kernels (read.cu). Plain C++ types only, so the
// pybind11 bindings compile without CUDA headers; tensors arrive as device pointers + strides.
#pragma once
#include <cstdint>

#include "../read_cpu.h"  // ReadShape

namespace rk::cuda {

enum class Dtype { float32, float64, float16, bfloat16 };

// A rank-3 device tensor: data pointer and element strides (0 for broadcast dims).
struct Strided {
  uintptr_t p;
  int64_t sb, sr, sc;  // batch, row and column strides (resonant_kernels/backends/triton/_common.py: one scheme)
};

// The largest location dimension the kernels keep in registers / shared memory.
constexpr int64_t kMaxDim = 16;

// out (B,Q,E, value dtype) and lse (B,Q, location dtype) contiguous; lse = -inf marks a query that
// matched nothing. `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream).
void read_forward(const ReadShape& s, Dtype loc, Dtype value, Strided qloc, Strided qvar, Strided mloc,
                  Strided mvar, Strided values, uintptr_t out, uintptr_t lse, uintptr_t stream);

// grad_out, out (B,Q,E) and lse contiguous; the five gradients contiguous in their inputs' shapes,
// variances' gradients w.r.t. the variances. `delta` is caller-owned scratch of B*Q location-dtype.
void read_backward(const ReadShape& s, Dtype loc, Dtype value, Strided qloc, Strided qvar, Strided mloc,
                   Strided mvar, Strided values, uintptr_t grad_out, uintptr_t out, uintptr_t lse,
                   uintptr_t delta, uintptr_t g_qloc, uintptr_t g_qvar, uintptr_t g_mloc, uintptr_t g_mvar,
                   uintptr_t g_values, uintptr_t stream);

}  // namespace rk::cuda
