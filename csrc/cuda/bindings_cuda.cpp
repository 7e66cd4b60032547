// pybind11 module resonant_kernels._C_cuda: the CUDA kernels on device pointers, element strides
// and the caller's CUDA stream (an integer). Python owns and validates every buffer; no libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "read_cuda.h"
#include "sample_cuda.h"

namespace py = pybind11;
using rk::cuda::Dtype;
using rk::cuda::Strided;

namespace {

using Arr = std::tuple<uintptr_t, int64_t, int64_t, int64_t>;  // (data_ptr, batch stride, row stride, column stride)

Strided strided(const Arr& a) { return {std::get<0>(a), std::get<1>(a), std::get<2>(a), std::get<3>(a)}; }

Dtype dtype(const std::string& name) {
  if (name == "float32") return Dtype::float32;
  if (name == "float64") return Dtype::float64;
  if (name == "float16") return Dtype::float16;
  if (name == "bfloat16") return Dtype::bfloat16;
  throw std::invalid_argument("cuda backend: unsupported dtype " + name);
}

rk::ReadShape read_shape(int64_t B, int64_t Q, int64_t M, int64_t d, int64_t E, double threshold, bool uniform_var,
                         double uniform_var_value) {
  return rk::ReadShape{B, Q, M, d, E, threshold, uniform_var, uniform_var_value};
}

rk::SampleShape sample_shape(int64_t B, int64_t Q, int64_t M, int64_t d, int64_t E, int64_t S, double drive_scale,
                             double location_scale, double threshold, double uniform_var_value) {
  return rk::SampleShape{B, Q, M, d, E, S, drive_scale, location_scale, threshold, uniform_var_value};
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "resonant-kernels fused CUDA kernels, device pointers, strides and a stream handle";
  m.attr("max_dim") = rk::cuda::kMaxDim;
  m.def(
      "read_forward",
      [](const std::string& loc_dtype, const std::string& value_dtype, int64_t B, int64_t Q, int64_t M, int64_t d,
         int64_t E, double threshold, bool uniform_var, double uniform_var_value, const Arr& qloc, const Arr& qvar,
         const Arr& mloc, const Arr& mvar, const Arr& values, uintptr_t out, uintptr_t lse, uintptr_t stream) {
        rk::cuda::read_forward(read_shape(B, Q, M, d, E, threshold, uniform_var, uniform_var_value),
                               dtype(loc_dtype), dtype(value_dtype), strided(qloc), strided(qvar), strided(mloc),
                               strided(mvar), strided(values), out, lse, stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "read_backward",
      [](const std::string& loc_dtype, const std::string& value_dtype, int64_t B, int64_t Q, int64_t M, int64_t d,
         int64_t E, double threshold, bool uniform_var, double uniform_var_value, const Arr& qloc, const Arr& qvar,
         const Arr& mloc, const Arr& mvar, const Arr& values, uintptr_t grad_out, uintptr_t out, uintptr_t lse,
         uintptr_t delta, uintptr_t g_qloc, uintptr_t g_qvar, uintptr_t g_mloc, uintptr_t g_mvar, uintptr_t g_values,
         uintptr_t stream) {
        rk::cuda::read_backward(read_shape(B, Q, M, d, E, threshold, uniform_var, uniform_var_value),
                                dtype(loc_dtype), dtype(value_dtype), strided(qloc), strided(qvar), strided(mloc),
                                strided(mvar), strided(values), grad_out, out, lse, delta, g_qloc, g_qvar, g_mloc,
                                g_mvar, g_values, stream);
      },
      py::call_guard<py::gil_scoped_release>());
  // Conditional sampling: (B, Q, M, d, E, S) and the four scalars of sample.py's fused interface.
  m.def(
      "conditional_probs",
      [](const std::string& dtype_name, int64_t B, int64_t Q, int64_t M, int64_t d, int64_t E, double drive_scale,
         double location_scale, double threshold, double uniform_var, const Arr& key, const Arr& values,
         const Arr& qloc, const Arr& qvar, const Arr& mloc, const Arr& mvar, uintptr_t probs, uintptr_t stream) {
        rk::cuda::conditional_probs(sample_shape(B, Q, M, d, E, 0, drive_scale, location_scale, threshold, uniform_var),
                                    dtype(dtype_name), strided(key), strided(values), strided(qloc), strided(qvar),
                                    strided(mloc), strided(mvar), probs, stream);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "conditional_sample_indices",
      [](const std::string& dtype_name, int64_t B, int64_t Q, int64_t M, int64_t d, int64_t E, int64_t S,
         double drive_scale, double location_scale, double threshold, double uniform_var, const Arr& key,
         const Arr& values, const Arr& qloc, const Arr& qvar, const Arr& mloc, const Arr& mvar, uintptr_t uniforms,
         uintptr_t idx, uintptr_t stream) {
        rk::cuda::conditional_sample_indices(
            sample_shape(B, Q, M, d, E, S, drive_scale, location_scale, threshold, uniform_var), dtype(dtype_name),
            strided(key), strided(values), strided(qloc), strided(qvar), strided(mloc), strided(mvar), uniforms, idx,
            stream);
      },
      py::call_guard<py::gil_scoped_release>());
}
