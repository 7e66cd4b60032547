// Fused conditional sampling on CUDA (design.md §4); the interface is resonant_kernels/sample.py's.
//
// One block per query row (b, q). Every pass recomputes the logits it needs, so nothing of size
// Q×M (or Q×M×d) is stored; only `conditional_probs` writes its Q×M output:
//   pass 0 (with a search location): does any entry's location term survive the threshold? If
//          none does, the row uses the drive term alone, as the reference does;
//   pass 1: per warp an online max and Σ exp(logit − max) over its entries, merged per block;
//   pass 2: tiles of kTile entries, in entry order: the tile's exp(logit − max) into shared
//          memory, then either the normalised probabilities (coalesced stores) or, for sampling,
//          the tile's cumulative sums in float64 and, per uniform u, the number of entries whose
//          cumulative sum is <= u·total (upper_bound: the first entry whose sum exceeds u·total).
// A warp computes one entry's logit at a time: its lanes split the E-wide drive dot (coalesced
// reads of the value row) and end up holding the same logit, so the branches on it are
// warp-uniform. Masked entries skip the dot. The location term's maths is common.h's Geometry,
// shared with the CPU kernels. No fast-math: exp and log are exact to the dtype.
#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>

#include "../common.h"
#include "../sample_cpu.h"
#include "launch.cuh"
#include "sample_cuda.h"

namespace rk::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kPerLane = 8;             // consecutive entries each lane of warp 0 sums in a tile
constexpr int kTile = 32 * kPerLane;    // entries per pass-2 tile
constexpr unsigned kFullMask = 0xffffffffu;

template <class T, int D>
struct SampleArgs {
  SampleShape s;
  Geometry<T, D> geo;
  View3<const T> key, values, qloc, qvar, mloc, mvar;
};

// The logits of query row (b, q).
template <class T, int D>
struct RowLogits {
  const SampleArgs<T, D>& a;
  int64_t b, q;
  bool location;  // the location term is on and at least one entry survives the threshold

  // log k(ℓ, ℓ_t) · location_scale, −inf when the threshold masks the entry. One thread.
  __device__ T location_term(int64_t t) const {
    T diff[kDim<D>], inv[kDim<D>];
    const T score = a.geo.score(row_ref(a.qloc, b, q), row_ref(a.qvar, b, q), row_ref(a.mloc, b, t),
                                row_ref(a.mvar, b, t), diff, inv);
    return score * T(a.s.location_scale);
  }

  // The logit of entry t, or −inf when masked. Called by all 32 lanes of a warp, which all get
  // the same value: the xor-shuffle reduction adds the same pairs in every lane.
  __device__ T logit(int64_t t, int lane) const {
    T loc = 0;
    if (location) {
      loc = location_term(t);
      if (loc == neg_inf<T>()) return loc;
    }
    T dot = 0;
    for (int64_t e = lane; e < a.s.E; e += 32) dot += a.key(b, q, e) * a.values(b, t, e);
    for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(kFullMask, dot, o);
    return dot * T(a.s.drive_scale) + loc;
  }
};

// Warp 0, once per tile: the tile's exp(logit − max) become inclusive cumulative sums in place,
// continuing from `running` (the sum before the tile); returns the sum after the tile, the same
// in every lane. Each lane sums kPerLane consecutive entries in order, and the lanes' offsets are
// chained in lane order by the very additions that end each lane's run, so the sums never
// decrease and stay exactly flat across entries of probability zero: the first sum exceeding a
// target always belongs to an entry of positive probability. Also records the last such entry.
__device__ double cumulative_tile(double* tile, double running, int64_t t0, int lane, int64_t* last_drawable) {
  double own[kPerLane], lane_sum = 0;
  int64_t last = -1;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const double p = tile[lane * kPerLane + k];
    lane_sum += p;
    own[k] = lane_sum;
    if (p > 0) last = t0 + lane * kPerLane + k;
  }
  double offset = running, lane_offset = 0;
  for (int l = 0; l < 32; ++l) {
    const double sum_l = __shfl_sync(kFullMask, lane_sum, l);
    if (lane == l) lane_offset = offset;
    offset += sum_l;  // bitwise the same as lane l's last cumulative sum below
  }
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) tile[lane * kPerLane + k] = lane_offset + own[k];
  for (int o = 16; o > 0; o /= 2) last = max(last, __shfl_xor_sync(kFullMask, last, o));
  if (lane == 0 && last >= 0) *last_drawable = last;
  return offset;
}

// How many of the n nondecreasing sums are <= target.
__device__ int count_at_most(const double* sums, int n, double target) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (sums[mid] <= target) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// kSample: idx (B,Q,S) from uniforms (B,Q,S); else probs (B,Q,M).
template <class T, int D, bool kSample>
__global__ void __launch_bounds__(kThreads)
    conditional_kernel(SampleArgs<T, D> a, const double* uniforms, T* probs, int64_t* idx) {
  __shared__ T warp_max[kWarps];
  __shared__ double warp_sum[kWarps];
  __shared__ double tile[kTile];  // exp(logit − max) of a tile, then (sampling) its cumulative sums
  __shared__ int64_t last_drawable;

  const SampleShape& s = a.s;
  const int64_t row = blockIdx.x, b = row / s.Q, q = row % s.Q;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const bool has_location = s.location_scale > 0;

  // Pass 0: with every entry masked, the row keeps the drive term alone.
  RowLogits<T, D> logits{a, b, q, false};
  bool matched = false;
  if (has_location)  // the threshold alone decides (a score overflowing to -inf is not masked)
    for (int64_t t = tid; t < s.M && !matched; t += kThreads)
      matched = a.geo.within_threshold(row_ref(a.qloc, b, q), row_ref(a.mloc, b, t));
  logits.location = __syncthreads_or(matched) != 0;

  // Pass 1: online max and sum per warp (the sum in float64), then merged by every thread.
  T run_max = neg_inf<T>();
  double run_sum = 0;
  for (int64_t t = warp; t < s.M; t += kWarps) {
    const T l = logits.logit(t, lane);
    if (l == neg_inf<T>()) continue;
    if (l > run_max) {
      run_sum = run_max == neg_inf<T>() ? 0.0 : run_sum * exp(double(run_max) - double(l));
      run_max = l;
    }
    run_sum += double(exp(l - run_max));
  }
  if (lane == 0) {
    warp_max[warp] = run_max;
    warp_sum[warp] = run_sum;
  }
  if (tid == 0) last_drawable = 0;
  __syncthreads();
  T row_max = neg_inf<T>();
  for (int w = 0; w < kWarps; ++w) row_max = max(row_max, warp_max[w]);
  double total = 0;
  for (int w = 0; w < kWarps; ++w)
    if (warp_max[w] != neg_inf<T>()) total += warp_sum[w] * exp(double(warp_max[w]) - double(row_max));
  // A NaN or +inf logit, or all -inf, means the logits overflowed T: the row is unusable (NaN
  // probabilities, -1 draws; the caller raises). The same in every thread, so all return here.
  if (!(row_max > neg_inf<T>() && row_max < -neg_inf<T>() && total == total)) {
    if constexpr (kSample) {
      for (int64_t i = tid; i < s.S; i += kThreads) idx[row * s.S + i] = -1;
    } else {
      for (int64_t t = tid; t < s.M; t += kThreads) probs[row * s.M + t] = T(NAN);
    }
    return;
  }

  // Pass 2, tile by tile in entry order.
  double running = 0;  // warp 0: the cumulative sum before the tile
  for (int64_t t0 = 0; t0 < s.M; t0 += kTile) {
    const int n = int(min(int64_t(kTile), s.M - t0));
    for (int j = warp; j < kTile; j += kWarps) {
      double p = 0;  // entries past the memory's end weigh nothing
      if (j < n) {
        const T l = logits.logit(t0 + j, lane);
        if (l != neg_inf<T>()) p = double(exp(l - row_max));
      }
      if (lane == 0) tile[j] = p;
    }
    __syncthreads();
    if constexpr (kSample) {
      if (warp == 0) running = cumulative_tile(tile, running, t0, lane, &last_drawable);
      __syncthreads();
      // Each thread keeps its uniforms' running counts in idx (no other thread touches them).
      for (int64_t i = tid; i < s.S; i += kThreads) {
        int64_t* count = idx + row * s.S + i;
        const int here = count_at_most(tile, n, uniforms[row * s.S + i] * total);
        *count = (t0 == 0 ? 0 : *count) + here;
      }
    } else {
      for (int j = tid; j < n; j += kThreads) probs[row * s.M + t0 + j] = total > 0 ? T(tile[j] / total) : T(0);
    }
    __syncthreads();  // before the next tile overwrites `tile`
  }
  if constexpr (kSample) {
    // Rounding can put u·total at or past the last cumulative sum (count M): take the last
    // entry of positive probability instead, as the reference does.
    for (int64_t i = tid; i < s.S; i += kThreads) {
      int64_t* count = idx + row * s.S + i;
      *count = min(*count, last_drawable);
    }
  }
}

// Calls f.template operator()<T>() for the sampling kernels' dtypes (values in the locations' dtype).
template <class F>
void by_float_dtype(Dtype dtype, F&& f) {
  if (dtype == Dtype::float32) f.template operator()<float>();
  else if (dtype == Dtype::float64) f.template operator()<double>();
  else throw std::invalid_argument("cuda backend: conditional sampling supports float32 and float64");
}

template <bool kSample>
void launch(const SampleShape& s, Dtype dtype, Strided key, Strided values, Strided qloc, Strided qvar,
            Strided mloc, Strided mvar, uintptr_t uniforms, uintptr_t out, uintptr_t stream, const char* what) {
  if (s.location_scale > 0) check_location_dim(s.d);  // without a location term d is never read
  if (s.B * s.Q == 0 || (kSample && s.S == 0)) return;
  if (s.M < 1) throw std::invalid_argument("cuda backend: conditional sampling needs a nonempty memory");
  if (s.B * s.Q > INT_MAX) throw std::invalid_argument("cuda backend: more than INT_MAX query rows");
  by_float_dtype(dtype, [&]<class T>() {
    dispatch_dim(s.d, [&]<int D>() {
      const SampleArgs<T, D> args{s, sample_geometry<T, D>(s), view<T>(key), view<T>(values), view<T>(qloc),
                                  view<T>(qvar), view<T>(mloc), view<T>(mvar)};
      conditional_kernel<T, D, kSample><<<unsigned(s.B * s.Q), kThreads, 0, as_stream(stream)>>>(
          args, reinterpret_cast<const double*>(uniforms), reinterpret_cast<T*>(out),
          reinterpret_cast<int64_t*>(out));
      check_launch(what);
    });
  });
}

}  // namespace

void conditional_probs(const SampleShape& s, Dtype dtype, Strided key, Strided values, Strided qloc,
                       Strided qvar, Strided mloc, Strided mvar, uintptr_t probs, uintptr_t stream) {
  launch<false>(s, dtype, key, values, qloc, qvar, mloc, mvar, 0, probs, stream, "conditional probs");
}

void conditional_sample_indices(const SampleShape& s, Dtype dtype, Strided key, Strided values, Strided qloc,
                                Strided qvar, Strided mloc, Strided mvar, uintptr_t uniforms, uintptr_t idx,
                                uintptr_t stream) {
  launch<true>(s, dtype, key, values, qloc, qvar, mloc, mvar, uniforms, idx, stream, "conditional sample");
}

}  // namespace rk::cuda
