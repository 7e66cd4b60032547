// exp over a row of non-positive arguments (or -inf), written so the compiler vectorises it:
// the softmax weights need one exp per (query, entry) pair and the scalar libm call is the
// bottleneck of a dense read. Cephes' polynomial / Padé forms, within ~1 ulp of libm.
// Arguments below the smallest normal's log return exactly 0: such a weight is < 1e-38 (float)
// or < 1e-307 (double) of the row's largest weight (which is exp(0) = 1), so dropping it cannot
// change a read at working precision, and it keeps denormals out of the accumulation.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace rk {

inline float exp_nonpositive(float v) {
  const bool under = !(v >= -87.33f);  // also true for -inf and NaN
  v = under ? -87.33f : v;
  // round to nearest by the 1.5·2^23 shifter trick: no libm call, so the loop vectorises
  // (the shifted number's low bits hold k as an integer, which builds 2^k without a conversion)
  const float shifted = v * 1.44269504088896341f + 12582912.0f;
  const float k = shifted - 12582912.0f;
  const float r = v - k * 0.693359375f - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = std::bit_cast<float>((std::bit_cast<int32_t>(shifted) - 0x4B400000 + 127) << 23);
  return under ? 0.0f : y * scale;
}

inline double exp_nonpositive(double v) {
  const bool under = !(v >= -708.39);
  v = under ? -708.39 : v;
  const double shifted = v * 1.4426950408889634073599 + 6755399441055744.0;
  const double k = shifted - 6755399441055744.0;
  const double r = v - k * 6.93145751953125e-1 - k * 1.42860682030941723212e-6;
  const double rr = r * r;
  const double px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr +
                         9.99999999999999999910e-1);
  const double qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr +
                     2.27265548208155028766e-1) * rr + 2.00000000000000000009e0;
  const double y = 1.0 + 2.0 * (px / (qx - px));
  const double scale =
      std::bit_cast<double>((std::bit_cast<int64_t>(shifted) - 0x4338000000000000LL + 1023) << 52);
  return under ? 0.0 : y * scale;
}

}  // namespace rk
