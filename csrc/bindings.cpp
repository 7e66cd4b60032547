// pybind11 module resonant_kernels._C: the CPU kernels on raw pointers and element strides.
// Python owns every buffer (torch tensors) and validates shapes before calling in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "loo_cpu.h"
#include "read_blocked_cpu.h"
#include "read_cpu.h"
#include "sample_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

using Arr = std::tuple<uintptr_t, int64_t, int64_t, int64_t>;  // (data_ptr, batch stride, row stride, column stride)

template <class T>
rk::View3<const T> view(const Arr& a) {
  return {reinterpret_cast<const T*>(std::get<0>(a)), std::get<1>(a), std::get<2>(a), std::get<3>(a)};
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

template <class F>
void by_dtype(const std::string& dtype, F&& f) {
  if (dtype == "float32") f.template operator()<float>();
  else if (dtype == "float64") f.template operator()<double>();
  else throw std::invalid_argument("cpu backend: unsupported dtype " + dtype);
}

void read_forward(const std::string& dtype, const rk::ReadShape& s, const Arr& qloc, const Arr& qvar,
                  const Arr& mloc, const Arr& mvar, const Arr& values, uintptr_t out, uintptr_t lse) {
  by_dtype(dtype, [&]<class T>() {
    rk::read_forward_cpu<T>(s, view<T>(qloc), view<T>(qvar), view<T>(mloc), view<T>(mvar), view<T>(values),
                            ptr<T>(out), ptr<T>(lse));
  });
}

void read_forward_per_pair(const std::string& dtype, const rk::ReadShape& s, const Arr& qloc, const Arr& qvar,
                           const Arr& mloc, const Arr& mvar, const Arr& values, uintptr_t out, uintptr_t lse) {
  by_dtype(dtype, [&]<class T>() {
    rk::read_forward_per_pair_cpu<T>(s, view<T>(qloc), view<T>(qvar), view<T>(mloc), view<T>(mvar),
                                     view<T>(values), ptr<T>(out), ptr<T>(lse));
  });
}

void read_backward(const std::string& dtype, const rk::ReadShape& s, const Arr& qloc, const Arr& qvar,
                   const Arr& mloc, const Arr& mvar, const Arr& values, uintptr_t grad_out, uintptr_t out,
                   uintptr_t lse, uintptr_t g_qloc, uintptr_t g_qvar, uintptr_t g_mloc, uintptr_t g_mvar,
                   uintptr_t g_values) {
  by_dtype(dtype, [&]<class T>() {
    rk::read_backward_cpu<T>(s, view<T>(qloc), view<T>(qvar), view<T>(mloc), view<T>(mvar), view<T>(values),
                             ptr<const T>(grad_out), ptr<const T>(out), ptr<const T>(lse), ptr<T>(g_qloc),
                             ptr<T>(g_qvar), ptr<T>(g_mloc), ptr<T>(g_mvar), ptr<T>(g_values));
  });
}

std::string read_forward_path(const std::string& dtype, const rk::ReadShape& s, const Arr& qvar, const Arr& mvar) {
  std::string path;
  by_dtype(dtype, [&]<class T>() { path = rk::read_forward_path<T>(s, view<T>(qvar), view<T>(mvar)); });
  return path;
}

bool blocked_read_applies(const std::string& dtype, const rk::ReadShape& s, const Arr& qvar, const Arr& mvar) {
  bool applies = false;
  by_dtype(dtype, [&]<class T>() { applies = rk::blocked_read_applies<T>(s, view<T>(qvar), view<T>(mvar)); });
  return applies;
}

void blocked_read_weights(const std::string& dtype, const rk::ReadShape& s, const Arr& qloc, const Arr& qvar,
                          const Arr& mloc, const Arr& mvar, int64_t b, int64_t q0, int64_t n, uintptr_t tile,
                          int64_t ld, uintptr_t lse, uintptr_t scale) {
  by_dtype(dtype, [&]<class T>() {
    rk::blocked_read_weights_cpu<T>(s, view<T>(qloc), view<T>(qvar), view<T>(mloc), view<T>(mvar), b, q0, n,
                                    ptr<T>(tile), ld, ptr<T>(lse), ptr<T>(scale));
  });
}

// The BLAS's functions by address (resonant_kernels/backends/cpu_blocked.py blas_functions): gemm,
// local threads, and the packed-gemm trio (pack size, pack, compute), each 0 where absent.
using BlasAddresses = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t>;

template <class T>
rk::Blas<T> blas_of(const BlasAddresses& a) {
  const auto [gemm, local_threads, pack_size, pack, compute] = a;
  if (!gemm) throw std::invalid_argument("blocked read: no BLAS gemm");
  if ((pack_size || pack || compute) && !(pack_size && pack && compute))
    throw std::invalid_argument("blocked read: the packed gemm needs its size, pack and compute functions, or none");
  rk::Blas<T> blas;
  blas.gemm = reinterpret_cast<rk::BlasGemm<T>>(gemm);
  blas.local_threads = reinterpret_cast<rk::BlasLocalThreads>(local_threads);
  blas.pack_size = reinterpret_cast<rk::BlasPackSize>(pack_size);
  blas.pack = reinterpret_cast<rk::BlasPack<T>>(pack);
  blas.compute = reinterpret_cast<rk::BlasCompute<T>>(compute);
  return blas;
}

void blocked_read_forward(const std::string& dtype, const rk::ReadShape& s, const Arr& qloc, const Arr& qvar,
                          const Arr& mloc, const Arr& mvar, const Arr& values, uintptr_t out, uintptr_t lse,
                          const BlasAddresses& blas) {
  by_dtype(dtype, [&]<class T>() {
    rk::blocked_read_forward_cpu<T>(s, view<T>(qloc), view<T>(qvar), view<T>(mloc), view<T>(mvar), view<T>(values),
                                    ptr<T>(out), ptr<T>(lse), blas_of<T>(blas));
  });
}

void blocked_read_backward(const std::string& dtype, const rk::ReadShape& s, const Arr& qloc, const Arr& qvar,
                           const Arr& mloc, const Arr& mvar, const Arr& values, uintptr_t lse, uintptr_t grad_out,
                           uintptr_t out, uintptr_t g_qloc, uintptr_t g_qvar, uintptr_t g_mloc, uintptr_t g_mvar,
                           uintptr_t g_values, const BlasAddresses& blas) {
  by_dtype(dtype, [&]<class T>() {
    rk::blocked_read_backward_cpu<T>(s, view<T>(qloc), view<T>(qvar), view<T>(mloc), view<T>(mvar), view<T>(values),
                                     ptr<const T>(lse), ptr<const T>(grad_out), ptr<const T>(out), ptr<T>(g_qloc),
                                     ptr<T>(g_qvar), ptr<T>(g_mloc), ptr<T>(g_mvar), ptr<T>(g_values),
                                     blas_of<T>(blas));
  });
}

void blocked_read_backward_block(const std::string& dtype, const rk::ReadShape& s, const Arr& qloc, const Arr& qvar,
                                 const Arr& mloc, const Arr& mvar, int64_t b, int64_t q0, int64_t n, uintptr_t lse,
                                 uintptr_t grad_out, uintptr_t out, uintptr_t tile, uintptr_t dp, int64_t ld,
                                 uintptr_t g_qloc, uintptr_t g_qvar, uintptr_t g_mloc, uintptr_t g_mvar) {
  by_dtype(dtype, [&]<class T>() {
    rk::blocked_read_backward_block_cpu<T>(s, view<T>(qloc), view<T>(qvar), view<T>(mloc), view<T>(mvar), b, q0, n,
                                           ptr<const T>(lse), ptr<const T>(grad_out), ptr<const T>(out),
                                           ptr<T>(tile), ptr<const T>(dp), ld, ptr<T>(g_qloc), ptr<T>(g_qvar),
                                           ptr<T>(g_mloc), ptr<T>(g_mvar));
  });
}

void loo_errors(const std::string& dtype, const rk::LooShape& s, const Arr& mloc, const Arr& mvar,
                const Arr& values, uintptr_t active, uintptr_t estimate, uintptr_t error, uintptr_t lse) {
  by_dtype(dtype, [&]<class T>() {
    rk::loo_errors_cpu<T>(s, view<T>(mloc), view<T>(mvar), view<T>(values), ptr<const uint8_t>(active),
                          ptr<T>(estimate), ptr<T>(error), ptr<T>(lse));
  });
}

void loo_dependencies(const std::string& dtype, const rk::LooShape& s, const Arr& mloc, const Arr& mvar,
                      uintptr_t active, uintptr_t error, uintptr_t lse, double max_error, uintptr_t num_dependencies,
                      uintptr_t candidate) {
  by_dtype(dtype, [&]<class T>() {
    rk::loo_dependencies_cpu<T>(s, view<T>(mloc), view<T>(mvar), ptr<const uint8_t>(active), ptr<const T>(error),
                                ptr<const T>(lse), max_error, ptr<int64_t>(num_dependencies),
                                ptr<uint8_t>(candidate));
  });
}

void conditional_probs(const std::string& dtype, const rk::SampleShape& s, const Arr& key, const Arr& values,
                       const Arr& qloc, const Arr& qvar, const Arr& mloc, const Arr& mvar, uintptr_t probs) {
  by_dtype(dtype, [&]<class T>() {
    rk::conditional_probs_cpu<T>(s, view<T>(key), view<T>(values), view<T>(qloc), view<T>(qvar), view<T>(mloc),
                                 view<T>(mvar), ptr<T>(probs));
  });
}

void conditional_sample_indices(const std::string& dtype, const rk::SampleShape& s, const Arr& key,
                                const Arr& values, const Arr& qloc, const Arr& qvar, const Arr& mloc,
                                const Arr& mvar, uintptr_t uniforms, uintptr_t idx) {
  by_dtype(dtype, [&]<class T>() {
    rk::conditional_sample_indices_cpu<T>(s, view<T>(key), view<T>(values), view<T>(qloc), view<T>(qvar),
                                          view<T>(mloc), view<T>(mvar), ptr<const double>(uniforms),
                                          ptr<int64_t>(idx));
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "resonant-kernels fused CPU kernels (OpenMP), raw pointers and strides";
  py::class_<rk::ReadShape>(m, "ReadShape")
      .def(py::init([](int64_t B, int64_t Q, int64_t M, int64_t d, int64_t E, double threshold, bool uniform_var,
                       double uniform_var_value) {
             return rk::ReadShape{B, Q, M, d, E, threshold, uniform_var, uniform_var_value};
           }),
           py::arg("B"), py::arg("Q"), py::arg("M"), py::arg("d"), py::arg("E"), py::arg("threshold"),
           py::arg("uniform_var"), py::arg("uniform_var_value"));
  m.def("read_forward", &read_forward, py::call_guard<py::gil_scoped_release>());
  m.def("read_backward", &read_backward, py::call_guard<py::gil_scoped_release>());
  // the per-pair forward whatever the call (tests and benchmarks comparing it with the dense one)
  m.def("read_forward_per_pair", &read_forward_per_pair, py::call_guard<py::gil_scoped_release>());
  m.def("read_forward_path", &read_forward_path);
  m.def("blocked_read_applies", &blocked_read_applies);
  m.def("blocked_read_row_lanes", [](const std::string& dtype, int64_t M) {
    if (dtype != "float32" && dtype != "float64") throw std::invalid_argument("cpu backend: unsupported dtype " + dtype);
    return rk::blocked_read_row_lanes(dtype == "float64", M);
  });
  m.def("blocked_read_weights", &blocked_read_weights, py::call_guard<py::gil_scoped_release>());
  m.def("blocked_read_forward", &blocked_read_forward, py::call_guard<py::gil_scoped_release>());
  m.def("blocked_read_block_rows", &rk::blocked_read_block_rows);
  m.def("blocked_read_backward", &blocked_read_backward, py::call_guard<py::gil_scoped_release>());
  m.def("blocked_read_backward_block", &blocked_read_backward_block, py::call_guard<py::gil_scoped_release>());
  py::class_<rk::LooShape>(m, "LooShape")
      .def(py::init([](int64_t B, int64_t M, int64_t d, int64_t E, double threshold, bool uniform_var,
                       double uniform_var_value) {
             return rk::LooShape{B, M, d, E, threshold, uniform_var, uniform_var_value};
           }),
           py::arg("B"), py::arg("M"), py::arg("d"), py::arg("E"), py::arg("threshold"), py::arg("uniform_var"),
           py::arg("uniform_var_value"));
  m.def("loo_errors", &loo_errors, py::call_guard<py::gil_scoped_release>());
  m.def("loo_dependencies", &loo_dependencies, py::call_guard<py::gil_scoped_release>());
  py::class_<rk::SampleShape>(m, "SampleShape")
      .def(py::init([](int64_t B, int64_t Q, int64_t M, int64_t d, int64_t E, int64_t S, double drive_scale,
                       double location_scale, double threshold, double uniform_var_value) {
        return rk::SampleShape{B, Q, M, d, E, S, drive_scale, location_scale, threshold, uniform_var_value};
      }));
  m.def("conditional_probs", &conditional_probs, py::call_guard<py::gil_scoped_release>());
  m.def("conditional_sample_indices", &conditional_sample_indices, py::call_guard<py::gil_scoped_release>());
  m.def("num_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.attr("has_openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
}
