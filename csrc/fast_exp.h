// exp over a row of non-positive arguments (or -inf), written so the compiler vectorises it:
// the softmax weights need one exp per (query, entry) pair and the scalar libm call is the
// bottleneck of a dense read. Cephes' polynomial / Padé forms, within ~1 ulp of libm.
// Arguments below the smallest normal's log return exactly 0: such a weight is < 1e-38 (float)
// or < 1e-307 (double) of the row's largest weight (which is exp(0) = 1), so dropping it cannot
// change a read at working precision, and it keeps denormals out of the accumulation.
//
// The same formulas hold for positive arguments up to 88 (float) and 709 (double): the dense read's
// softmax (read_dense_cpu.cpp) passes arguments up to its kShiftSlack.
//
// One definition for scalars and for SIMD vectors (GCC/Clang vector extension, csrc/gemm.h): V is
// float or double or a vector of them, I the signed integer type of the same shape.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rk {

// x as a V: itself for a scalar, every lane for a vector.
template <class V, class S>
inline V splat_as(S x) {
  if constexpr (std::is_arithmetic_v<V>) return V(x);
  else return V{} + x;
}

template <class V, class I>
inline V exp_nonpositive_f32(V v) {
  const auto keep = v >= -87.33f;  // false for -inf and NaN
  v = keep ? v : splat_as<V>(-87.33f);
  // round to nearest by the 1.5·2^23 shifter trick: no libm call, so the loop vectorises
  // (the shifted number's low bits hold k as an integer, which builds 2^k without a conversion)
  const V shifted = v * 1.44269504088896341f + 12582912.0f;
  const V k = shifted - 12582912.0f;
  const V r = v - k * 0.693359375f - k * -2.12194440e-4f;
  V p = splat_as<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * r * r + r + 1.0f;
  const V scale = std::bit_cast<V>(I((std::bit_cast<I>(shifted) - 0x4B400000 + 127) << 23));
  return keep ? y * scale : splat_as<V>(0.0f);
}

template <class V, class I>
inline V exp_nonpositive_f64(V v) {
  const auto keep = v >= -708.39;
  v = keep ? v : splat_as<V>(-708.39);
  const V shifted = v * 1.4426950408889634073599 + 6755399441055744.0;
  const V k = shifted - 6755399441055744.0;
  const V r = v - k * 6.93145751953125e-1 - k * 1.42860682030941723212e-6;
  const V rr = r * r;
  const V px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr +
                    9.99999999999999999910e-1);
  const V qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
  const V y = 1.0 + 2.0 * (px / (qx - px));
  const V scale = std::bit_cast<V>(I((std::bit_cast<I>(shifted) - 0x4338000000000000LL + 1023) << 52));
  return keep ? y * scale : splat_as<V>(0.0);
}

inline float exp_nonpositive(float v) { return exp_nonpositive_f32<float, int32_t>(v); }
inline double exp_nonpositive(double v) { return exp_nonpositive_f64<double, int64_t>(v); }

#if defined(__AVX512F__)
// exp_nonpositive_f32 on 16 floats with AVX-512's scaling instruction: the same k, reduction and
// polynomial, then y · 2^k in one instruction (no integer build of 2^k, and no clamp: the lanes a
// clamp would guard are the masked ones). y · 2^k is rounded once either way, so every lane has the
// generic form's bits (compared over 32 M arguments, -inf, NaN and the cut-off included, when it was
// written).
inline __m512 exp_nonpositive_avx512(__m512 v) {
  const __mmask16 keep = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.33f), _CMP_GE_OQ);  // false for -inf, NaN
  const __m512 shifter = _mm512_set1_ps(12582912.0f);
  const __m512 k = _mm512_sub_ps(_mm512_fmadd_ps(v, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, y, k);
}
#endif

// The same on a vector of float or double (every lane).
template <class V>
inline V exp_nonpositive_lanes(V v) {
  using E = std::remove_cvref_t<decltype(v[0])>;
#if defined(__AVX512F__)
  if constexpr (sizeof(E) == 4 && sizeof(V) == 64) return V(exp_nonpositive_avx512(__m512(v)));
#endif
  if constexpr (sizeof(E) == 4) {
    typedef int32_t I __attribute__((vector_size(sizeof(V))));
    return exp_nonpositive_f32<V, I>(v);
  } else {
    typedef int64_t I __attribute__((vector_size(sizeof(V))));
    return exp_nonpositive_f64<V, I>(v);
  }
}

}  // namespace rk
