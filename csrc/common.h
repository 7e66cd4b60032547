// Shared plumbing for the CPU kernels: strided views over caller-owned memory and the
// Gaussian log-kernel of one (query, entry) pair. No libtorch: tensors arrive as raw pointers
// plus element strides, so the module builds with plain pybind11 against any torch release.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

// Marks the helpers below callable from CUDA device code too (csrc/cuda), so the GPU kernels
// share this one definition of the kernel maths.
#if defined(__CUDACC__)
#define RK_HD __host__ __device__
#else
#define RK_HD
#endif

namespace rk {

// A rank-3 strided view (batch, row, column); strides are in elements and may be 0 (broadcast).
template <class T>
struct View3 {
  T* p;
  int64_t sb, sr, sc;  // batch, row and column strides (resonant_kernels/backends/triton/_common.py: one scheme)
  RK_HD inline T& operator()(int64_t b, int64_t r, int64_t c) const { return p[b * sb + r * sr + c * sc]; }
  RK_HD inline T* row(int64_t b, int64_t r) const { return p + b * sb + r * sr; }
};

template <class T>
RK_HD constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// The running max and Σ exp(score − max) of a softmax streamed one score at a time.
template <class T>
struct OnlineSoftmax {
  T max = neg_inf<T>(), sum = 0;

  // Adds a finite score and returns its weight exp(score − max). `rescale` receives the factor
  // that anything accumulated under the previous max must be multiplied by (1: unchanged).
  inline T add(T score, T& rescale) {
    rescale = T(1);
    if (score > max) {
      rescale = max == neg_inf<T>() ? T(0) : std::exp(max - score);
      sum *= rescale;
      max = score;
    }
    const T p = std::exp(score - max);
    sum += p;
    return p;
  }

  inline T lse() const { return sum > T(0) ? max + std::log(sum) : neg_inf<T>(); }
};

constexpr double kLog2Pi = 1.8378770664093454835606594728112;
constexpr double kLn2 = 0.69314718055994530941723212145818;

// log Π v_i over the d variances of a pair with one log instead of d, without the product ever
// over- or underflowing: each factor's binary exponent is split off (frexp) into an integer, so
// the running product holds only mantissas in [0.5, 1), renormalised before it could underflow.
// (A plain product of d float32 variances overflows from d = 3 at σ = 1e7, and a double product
// of 16 variances of 1e20 or of 32 of 1e-12 leaves double's range.) Takes positive finite v.
struct LogProduct {
  double mantissa = 1.0;
  int64_t exponent = 0;

  RK_HD inline void multiply(double v) {
    int e;
    mantissa *= ::frexp(v, &e);
    exponent += e;
    if (mantissa < 0x1p-512) {  // after ≥ 512 factors: back to [0.5, 1)
      mantissa = ::frexp(mantissa, &e);
      exponent += e;
    }
  }
  RK_HD inline double log() const { return ::log(mantissa) + double(exponent) * kLn2; }
};

// The kernel's geometry for one call: location dim d (D > 0 fixes it at compile time), the
// threshold (squared; negative means none) and whether every variance in the call is one shared
// number, in which case the score needs no per-pair division or log.
template <class T, int D>
struct Geometry {
  int64_t d;
  T thr2;
  bool uniform_var;
  T uniform_inv_var;  // 1 / (qv + mv) when uniform_var
  T uniform_norm;     // -0.5 * d * log(qv + mv) - 0.5 * d * log(2π) when uniform_var
  T norm_const;       // -0.5 * d * log(2π)

  RK_HD inline int64_t dim() const { return D > 0 ? D : d; }

  // log k of a pair at squared distance dist2 when uniform_var (or -inf when masked): branch-free
  // and without scratch writes, so a loop over entries that calls it vectorises.
  RK_HD inline T uniform_score(T dist2) const {
    return thr2 >= 0 && dist2 > thr2 ? neg_inf<T>() : T(-0.5) * dist2 * uniform_inv_var + uniform_norm;
  }

  // Whether the pair survives the threshold (always, without one): the geometry alone, so an
  // overflow of the score to -inf never counts as masked.
  template <class QL, class ML>
  RK_HD inline bool within_threshold(const QL& ql, const ML& ml) const {
    if (thr2 < 0) return true;
    T dist2 = 0;
    for (int64_t i = 0; i < dim(); ++i) dist2 += (ql(i) - ml(i)) * (ql(i) - ml(i));
    return !(dist2 > thr2);
  }

  // log k for the pair, or -inf when masked by the threshold. `dv` (optional, size d) receives
  // the per-dimension (q - m) and `inv` the per-dimension 1 / v, which the backward reuses.
  template <class QL, class QV, class ML, class MV>
  RK_HD inline T score(const QL& ql, const QV& qv, const ML& ml, const MV& mv, T* diff, T* inv) const {
    const int64_t n = dim();
    T dist2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      diff[i] = ql(i) - ml(i);
      dist2 += diff[i] * diff[i];
    }
    if (uniform_var) {
      for (int64_t i = 0; i < n; ++i) inv[i] = uniform_inv_var;
      return uniform_score(dist2);
    }
    if (thr2 >= 0 && dist2 > thr2) return neg_inf<T>();
    T quad = 0;
    LogProduct log_det;
    for (int64_t i = 0; i < n; ++i) {
      const T v = qv(i) + mv(i);
      inv[i] = T(1) / v;
      quad += diff[i] * diff[i] * inv[i];
      log_det.multiply(double(v));
    }
    return T(-0.5) * quad - T(0.5 * log_det.log()) + norm_const;
  }
};

template <class T, int D>
Geometry<T, D> make_geometry(int64_t d, double threshold, bool uniform_var, double uniform_var_value) {
  Geometry<T, D> g;
  g.d = d;
  g.thr2 = threshold < 0 ? T(-1) : T(threshold * threshold);
  g.uniform_var = uniform_var;
  g.norm_const = T(-0.5 * double(d) * kLog2Pi);
  g.uniform_inv_var = uniform_var ? T(1.0 / uniform_var_value) : T(0);
  g.uniform_norm = uniform_var ? T(-0.5 * double(d) * (std::log(uniform_var_value) + kLog2Pi)) : T(0);
  return g;
}

// Chains ds = dL/dlogk of one pair into location and variance gradients (diff, inv as score()
// left them): dlogk/dv_i = ½ (diff_i² / v_i² − 1 / v_i); dlogk/dq_i = −diff_i / v_i = −dlogk/dm_i.
template <class T>
RK_HD inline void accumulate_pair_grads(T ds, const T* diff, const T* inv, int64_t n, T* g_loc, T* g_var,
                                        T loc_sign) {
  for (int64_t i = 0; i < n; ++i) {
    const T r = diff[i] * inv[i];
    g_loc[i] += loc_sign * ds * r;
    g_var[i] += ds * T(0.5) * (r * r - inv[i]);
  }
}

// Calls f.template operator()<D>() with D fixed for the common small location dims.
template <class F>
void dispatch_dim(int64_t d, F&& f) {
  switch (d) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    default: f.template operator()<0>(); break;
  }
}

// A row of a View3 as an indexable accessor, so score() reads any stride layout.
template <class T>
struct RowRef {
  const T* p;
  int64_t s;
  RK_HD inline T operator()(int64_t i) const { return p[i * s]; }
};

template <class T>
RK_HD inline RowRef<T> row_ref(const View3<const T>& v, int64_t b, int64_t r) {
  return RowRef<T>{v.row(b, r), v.sc};
}

}  // namespace rk
