// Fused Gaussian-kernel read on CUDA. The score maths is common.h's Geometry (shared with the CPU
// kernels); this file only tiles it.
//
// Forward: one block per (batch, 16 queries, E tile); an online softmax over memory tiles of 64
// entries, P @ V accumulated in fp32/fp64 registers. With fp16/bf16 values P @ V runs on tensor
// cores (WMMA m16n16k16, fp32 accumulate) and the per-row online-softmax rescale stays in registers.
// Backward (flash-attention style, recomputing weights from lse, nothing of size Q×M stored):
//   delta_q = g_q · out_q;
//   pair_grads<query side>: per 16 queries over memory tiles -> d query_loc, d query_var;
//   pair_grads<memory side>: per 16 entries over query tiles -> d mem_loc, d mem_var;
//   value_grads: per (16 entries, E tile) over query tiles -> d mem_values = Wᵀ g.
// No fast-math: weights are exact to the dtype, as on the other backends.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common.h"
#include "launch.cuh"
#include "read_cuda.h"

namespace rk::cuda {
namespace {

constexpr int kThreads = 128;     // 4 warps
constexpr int kRows = 16;         // rows a block owns (queries, or entries in the backward)
constexpr int kInner = 64;        // entries (or queries) per tile of the other side
constexpr int kLanesPerRow = kThreads / kRows;  // 8 threads share one row
constexpr int kEChunk = 32;       // E columns per step of the backward's dot products

// E columns per block: 64 (tensor-core friendly) in fp32, 32 in fp64 to stay in 48 KiB of smem.
template <class T>
constexpr int kBlockE = sizeof(T) == 8 ? 32 : 64;

template <class To, class From>
__device__ inline To cvt(From x) {
  if constexpr (std::is_same_v<To, From>) return x;
  else if constexpr (std::is_same_v<From, __half>) return To(__half2float(x));
  else if constexpr (std::is_same_v<From, __nv_bfloat16>) return To(__bfloat162float(x));
  else if constexpr (std::is_same_v<To, __half>) return __float2half_rn(float(x));
  else if constexpr (std::is_same_v<To, __nv_bfloat16>) return __float2bfloat16_rn(float(x));
  else return To(x);
}

template <class T>
__device__ inline T dev_neg_inf() {
  return neg_inf<T>();
}

// Rows [r0, r0 + n) of a (loc, var) pair into shared memory; rows past `rows` get harmless
// fillers (they are masked by the callers' bounds checks).
template <class T, int KD>
__device__ void load_locs(T (*dst_loc)[KD], T (*dst_var)[KD], const View3<const T>& loc,
                          const View3<const T>& var, int64_t b, int64_t r0, int n, int64_t rows, int64_t d) {
  for (int i = threadIdx.x; i < n * d; i += blockDim.x) {
    const int r = i / d, k = i % d;
    const bool ok = r0 + r < rows;
    dst_loc[r][k] = ok ? loc(b, r0 + r, k) : T(0);
    dst_var[r][k] = ok ? var(b, r0 + r, k) : T(1);
  }
}

// A kInner × BE tile of a strided (B, N, E) tensor into shared memory, zeros outside.
template <class S, class V, int BE>
__device__ void load_tile(S (*dst)[BE], const View3<const V>& src, int64_t b, int64_t r0, int64_t rows,
                          int64_t e0, int64_t cols) {
  for (int i = threadIdx.x; i < kInner * BE; i += blockDim.x) {
    const int r = i / BE, c = i % BE;
    const bool ok = r0 + r < rows && e0 + c < cols;
    dst[r][c] = ok ? cvt<S>(src(b, r0 + r, e0 + c)) : cvt<S>(0.0f);
  }
}

// The block's kRows × kInner tile of products: acc[j] (row tid / 8, column tid % 8 + 8 j) becomes
// acc * scale + Σ_k P[row][k] B[k][column]. P arrives in T (sP) and, for tensor cores, in V (sPh).
template <class T, class V, int BE>
__device__ void accumulate_tile(T (&acc)[BE / kLanesPerRow], T scale, const T (*sP)[kInner],
                                const V (*sPh)[kInner], const V (*sB)[BE], float (*sOut)[BE]) {
  const int row = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  constexpr int NC = BE / kLanesPerRow;
  if constexpr (std::is_same_v<T, V>) {
    for (int j = 0; j < NC; ++j) acc[j] *= scale;
    for (int k = 0; k < kInner; ++k) {
      const T p = sP[row][k];
#pragma unroll
      for (int j = 0; j < NC; ++j) acc[j] += p * sB[k][lane + kLanesPerRow * j];
    }
  } else {
    static_assert(std::is_same_v<T, float> && BE == 16 * (kThreads / 32), "one 16-column slab per warp");
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, V, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, V, wmma::row_major> bfrag;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
#pragma unroll
    for (int k = 0; k < kInner; k += 16) {
      wmma::load_matrix_sync(a, &sPh[0][k], kInner);
      wmma::load_matrix_sync(bfrag, &sB[k][16 * warp], BE);
      wmma::mma_sync(c, a, bfrag, c);
    }
    wmma::store_matrix_sync(&sOut[0][16 * warp], c, BE, wmma::mem_row_major);
    __syncthreads();
    for (int j = 0; j < NC; ++j) acc[j] = acc[j] * scale + sOut[row][lane + kLanesPerRow * j];
  }
}

// Shared memory of a block that weighs its kRows rows against a tile of kInner rows of the other
// side (locations, weights P) and multiplies P into a kInner × BE slab: values in the forward,
// output gradients for d mem_values. p_half / out are the tensor-core path's staging.
template <class T, class V, int D>
struct ProductSmem {
  static constexpr int KD = kDim<D>, BE = kBlockE<T>;
  static constexpr bool kMma = !std::is_same_v<T, V>;
  T row_loc[kRows][KD], row_var[kRows][KD], inner_loc[kInner][KD], inner_var[kInner][KD];
  T p[kRows][kInner];
  alignas(32) V slab[kInner][BE];
  alignas(32) V p_half[kMma ? kRows : 1][kInner];
  alignas(32) float out[kMma ? kRows : 1][BE];
};

template <class T, class V, int D>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(ReadShape s, Geometry<T, D> geo, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                   View3<const T> mvar, View3<const V> values, V* out, T* lse) {
  using Smem = ProductSmem<T, V, D>;
  constexpr int KD = Smem::KD, BE = Smem::BE, NC = BE / kLanesPerRow;
  __shared__ Smem sm;  // rows: queries, inner: memory entries, slab: values
  __shared__ T row_max[kRows], row_sum[kRows], row_scale[kRows];

  const int64_t qtiles = ceil_div(s.Q, kRows);
  const int64_t b = blockIdx.x / qtiles, q0 = (blockIdx.x % qtiles) * kRows, e0 = int64_t(blockIdx.y) * BE;
  const int tid = threadIdx.x, row = tid / kLanesPerRow, lane = tid % kLanesPerRow;
  const int warp = tid / 32, wlane = tid % 32;
  T diff[KD], inv[KD];

  load_locs<T, KD>(sm.row_loc, sm.row_var, qloc, qvar, b, q0, kRows, s.Q, s.d);
  if (tid < kRows) {
    row_max[tid] = dev_neg_inf<T>();
    row_sum[tid] = T(0);
  }
  T acc[NC];
  for (int j = 0; j < NC; ++j) acc[j] = T(0);

  for (int64_t t0 = 0; t0 < s.M; t0 += kInner) {
    load_locs<T, KD>(sm.inner_loc, sm.inner_var, mloc, mvar, b, t0, kInner, s.M, s.d);
    load_tile<V, V, BE>(sm.slab, values, b, t0, s.M, e0, s.E);
    __syncthreads();
    for (int i = tid; i < kRows * kInner; i += kThreads) {
      const int q = i / kInner, t = i % kInner;
      sm.p[q][t] = (q0 + q < s.Q && t0 + t < s.M)
                       ? geo.score(RowRef<T>{sm.row_loc[q], 1}, RowRef<T>{sm.row_var[q], 1},
                                   RowRef<T>{sm.inner_loc[t], 1}, RowRef<T>{sm.inner_var[t], 1}, diff, inv)
                       : dev_neg_inf<T>();
    }
    __syncthreads();
    // Online softmax, one warp per row: new running max, rescale factor, probabilities in place.
    for (int q = warp; q < kRows; q += kThreads / 32) {
      T tile_max = dev_neg_inf<T>();
      for (int t = wlane; t < kInner; t += 32) tile_max = max(tile_max, sm.p[q][t]);
      for (int o = 16; o > 0; o /= 2) tile_max = max(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
      const T old_max = row_max[q], new_max = max(old_max, tile_max);
      T tile_sum = 0;
      for (int t = wlane; t < kInner; t += 32) {
        const T sc = sm.p[q][t];
        const T p = sc == dev_neg_inf<T>() ? T(0) : exp(sc - new_max);
        sm.p[q][t] = p;
        if constexpr (Smem::kMma) sm.p_half[q][t] = cvt<V>(p);
        tile_sum += p;
      }
      for (int o = 16; o > 0; o /= 2) tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, o);
      __syncwarp();
      if (wlane == 0) {
        // Nothing accumulated yet under an infinite max: the factor only has to be finite.
        const T scale = old_max == dev_neg_inf<T>() ? T(0) : exp(old_max - new_max);
        row_scale[q] = scale;
        row_sum[q] = row_sum[q] * scale + tile_sum;
        row_max[q] = new_max;
      }
    }
    __syncthreads();
    accumulate_tile<T, V, BE>(acc, row_scale[row], sm.p, sm.p_half, sm.slab, sm.out);
    __syncthreads();
  }
  __syncthreads();  // with M = 0 the loop never ran: the row state's initialisation must be visible

  const int64_t q = q0 + row;
  if (q < s.Q) {
    const T total = row_sum[row];
    const T inv_sum = total > T(0) ? T(1) / total : T(0);
    V* o = out + (b * s.Q + q) * s.E;
    for (int j = 0; j < NC; ++j) {
      const int64_t e = e0 + lane + kLanesPerRow * j;
      if (e < s.E) o[e] = cvt<V>(acc[j] * inv_sum);
    }
    if (blockIdx.y == 0 && lane == 0) lse[b * s.Q + q] = total > T(0) ? row_max[row] + log(total) : dev_neg_inf<T>();
  }
}

// delta[bq] = g_bq · out_bq, one warp per row.
template <class T, class V>
__global__ void delta_kernel(int64_t rows, int64_t E, const V* grad_out, const V* out, T* delta) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int wlane = threadIdx.x % 32;
  if (r >= rows) return;
  T acc = 0;
  for (int64_t e = wlane; e < E; e += 32) acc += cvt<T>(grad_out[r * E + e]) * cvt<T>(out[r * E + e]);
  for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (wlane == 0) delta[r] = acc;
}

// Location and variance gradients of one side. A block owns kRows rows of that side (queries when
// kQuerySide, else entries) and sweeps tiles of the other side; thread (row, lane) handles the pairs
// (row, lane + 8 j): ds = w (g_q · z_t − delta_q), chained by accumulate_pair_grads.
template <class T, class V, int D, bool kQuerySide>
__global__ void __launch_bounds__(kThreads)
    pair_grads_kernel(ReadShape s, Geometry<T, D> geo, View3<const T> qloc, View3<const T> qvar,
                      View3<const T> mloc, View3<const T> mvar, View3<const V> values, View3<const V> grad_out,
                      const T* lse, const T* delta, T* g_loc, T* g_var) {
  constexpr int KD = kDim<D>, NJ = kInner / kLanesPerRow;
  __shared__ T so_loc[kRows][KD], so_var[kRows][KD], sx_loc[kInner][KD], sx_var[kInner][KD];
  __shared__ T so_vec[kRows][kEChunk], sx_vec[kInner][kEChunk + 1];
  __shared__ T s_lse[kQuerySide ? kRows : kInner], s_delta[kQuerySide ? kRows : kInner];

  const int64_t own_n = kQuerySide ? s.Q : s.M, other_n = kQuerySide ? s.M : s.Q;
  const View3<const T>& own_loc = kQuerySide ? qloc : mloc;
  const View3<const T>& own_var = kQuerySide ? qvar : mvar;
  const View3<const T>& other_loc = kQuerySide ? mloc : qloc;
  const View3<const T>& other_var = kQuerySide ? mvar : qvar;
  const View3<const V>& own_vec = kQuerySide ? grad_out : values;
  const View3<const V>& other_vec = kQuerySide ? values : grad_out;

  const int64_t tiles = ceil_div(own_n, kRows);
  const int64_t b = blockIdx.x / tiles, r0 = (blockIdx.x % tiles) * kRows;
  const int tid = threadIdx.x, row = tid / kLanesPerRow, lane = tid % kLanesPerRow;
  T diff[KD], inv[KD], g_l[KD], g_v[KD];
  for (int i = 0; i < KD; ++i) g_l[i] = g_v[i] = T(0);

  load_locs<T, KD>(so_loc, so_var, own_loc, own_var, b, r0, kRows, own_n, s.d);
  if (kQuerySide && tid < kRows) {
    const bool ok = r0 + tid < s.Q;
    s_lse[tid] = ok ? lse[b * s.Q + r0 + tid] : dev_neg_inf<T>();
    s_delta[tid] = ok ? delta[b * s.Q + r0 + tid] : T(0);
  }
  for (int64_t c0 = 0; c0 < other_n; c0 += kInner) {
    load_locs<T, KD>(sx_loc, sx_var, other_loc, other_var, b, c0, kInner, other_n, s.d);
    if (!kQuerySide && tid < kInner) {
      const bool ok = c0 + tid < s.Q;
      s_lse[tid] = ok ? lse[b * s.Q + c0 + tid] : dev_neg_inf<T>();
      s_delta[tid] = ok ? delta[b * s.Q + c0 + tid] : T(0);
    }
    T dot[NJ];
    for (int j = 0; j < NJ; ++j) dot[j] = T(0);
    for (int64_t e0 = 0; e0 < s.E; e0 += kEChunk) {
      __syncthreads();
      for (int i = tid; i < kRows * kEChunk; i += kThreads) {
        const int r = i / kEChunk, e = i % kEChunk;
        so_vec[r][e] = (r0 + r < own_n && e0 + e < s.E) ? cvt<T>(own_vec(b, r0 + r, e0 + e)) : T(0);
      }
      for (int i = tid; i < kInner * kEChunk; i += kThreads) {
        const int r = i / kEChunk, e = i % kEChunk;
        sx_vec[r][e] = (c0 + r < other_n && e0 + e < s.E) ? cvt<T>(other_vec(b, c0 + r, e0 + e)) : T(0);
      }
      __syncthreads();
      for (int e = 0; e < kEChunk; ++e) {
        const T g = so_vec[row][e];
#pragma unroll
        for (int j = 0; j < NJ; ++j) dot[j] += g * sx_vec[lane + kLanesPerRow * j][e];
      }
    }
    __syncthreads();  // the lse/delta and location tiles are complete (also when E = 0)
    if (r0 + row < own_n) {
      for (int j = 0; j < NJ; ++j) {
        const int c = lane + kLanesPerRow * j;
        if (c0 + c >= other_n) break;
        const int qi = kQuerySide ? row : c;
        const T l = s_lse[qi];
        if (l == dev_neg_inf<T>()) continue;
        const T sc = kQuerySide ? geo.score(RowRef<T>{so_loc[row], 1}, RowRef<T>{so_var[row], 1},
                                            RowRef<T>{sx_loc[c], 1}, RowRef<T>{sx_var[c], 1}, diff, inv)
                                : geo.score(RowRef<T>{sx_loc[c], 1}, RowRef<T>{sx_var[c], 1},
                                            RowRef<T>{so_loc[row], 1}, RowRef<T>{so_var[row], 1}, diff, inv);
        if (sc == dev_neg_inf<T>()) continue;
        const T w = exp(sc - l);
        accumulate_pair_grads(w * (dot[j] - s_delta[qi]), diff, inv, geo.dim(), g_l, g_v,
                              kQuerySide ? T(-1) : T(1));
      }
    }
    __syncthreads();  // before the next tile overwrites sx_loc / s_lse
  }
  // The 8 lanes of a row are adjacent in one warp: reduce with xor shuffles inside the group.
  for (int i = 0; i < geo.dim(); ++i) {
    for (int o = kLanesPerRow / 2; o > 0; o /= 2) {
      g_l[i] += __shfl_xor_sync(0xffffffffu, g_l[i], o);
      g_v[i] += __shfl_xor_sync(0xffffffffu, g_v[i], o);
    }
  }
  if (lane == 0 && r0 + row < own_n) {
    const int64_t base = (b * own_n + r0 + row) * s.d;
    for (int i = 0; i < geo.dim(); ++i) {
      g_loc[base + i] = g_l[i];
      g_var[base + i] = g_v[i];
    }
  }
}

// d mem_values[t] = Σ_q w_qt g_q: the forward's P @ V with the roles of queries and entries swapped.
template <class T, class V, int D>
__global__ void __launch_bounds__(kThreads)
    value_grads_kernel(ReadShape s, Geometry<T, D> geo, View3<const T> qloc, View3<const T> qvar,
                       View3<const T> mloc, View3<const T> mvar, View3<const V> grad_out, const T* lse, V* g_values) {
  using Smem = ProductSmem<T, V, D>;
  constexpr int KD = Smem::KD, BE = Smem::BE, NC = BE / kLanesPerRow;
  __shared__ Smem sm;  // rows: memory entries, inner: queries, slab: output gradients
  __shared__ T s_lse[kInner];

  const int64_t tiles = ceil_div(s.M, kRows);
  const int64_t b = blockIdx.x / tiles, t0 = (blockIdx.x % tiles) * kRows, e0 = int64_t(blockIdx.y) * BE;
  const int tid = threadIdx.x, row = tid / kLanesPerRow, lane = tid % kLanesPerRow;
  T diff[KD], inv[KD];
  T acc[NC];
  for (int j = 0; j < NC; ++j) acc[j] = T(0);

  load_locs<T, KD>(sm.row_loc, sm.row_var, mloc, mvar, b, t0, kRows, s.M, s.d);
  for (int64_t q0 = 0; q0 < s.Q; q0 += kInner) {
    load_locs<T, KD>(sm.inner_loc, sm.inner_var, qloc, qvar, b, q0, kInner, s.Q, s.d);
    load_tile<V, V, BE>(sm.slab, grad_out, b, q0, s.Q, e0, s.E);
    if (tid < kInner) s_lse[tid] = q0 + tid < s.Q ? lse[b * s.Q + q0 + tid] : dev_neg_inf<T>();
    __syncthreads();
    for (int i = tid; i < kRows * kInner; i += kThreads) {
      const int t = i / kInner, q = i % kInner;
      T w = 0;
      if (t0 + t < s.M && s_lse[q] != dev_neg_inf<T>()) {
        const T sc = geo.score(RowRef<T>{sm.inner_loc[q], 1}, RowRef<T>{sm.inner_var[q], 1},
                               RowRef<T>{sm.row_loc[t], 1}, RowRef<T>{sm.row_var[t], 1}, diff, inv);
        if (sc != dev_neg_inf<T>()) w = exp(sc - s_lse[q]);
      }
      sm.p[t][q] = w;
      if constexpr (Smem::kMma) sm.p_half[t][q] = cvt<V>(w);
    }
    __syncthreads();
    accumulate_tile<T, V, BE>(acc, T(1), sm.p, sm.p_half, sm.slab, sm.out);
    __syncthreads();
  }
  if (t0 + row < s.M) {
    V* gz = g_values + (b * s.M + t0 + row) * s.E;
    for (int j = 0; j < NC; ++j) {
      const int64_t e = e0 + lane + kLanesPerRow * j;
      if (e < s.E) gz[e] = cvt<V>(acc[j]);
    }
  }
}

// Calls f.template operator()<T, V>() for the supported (location, value) dtype pairs.
template <class F>
void by_dtypes(Dtype loc, Dtype value, F&& f) {
  if (loc == Dtype::float64 && value == Dtype::float64) f.template operator()<double, double>();
  else if (loc == Dtype::float32 && value == Dtype::float32) f.template operator()<float, float>();
  else if (loc == Dtype::float32 && value == Dtype::float16) f.template operator()<float, __half>();
  else if (loc == Dtype::float32 && value == Dtype::bfloat16) f.template operator()<float, __nv_bfloat16>();
  else throw std::invalid_argument("cuda backend: unsupported (location, value) dtype pair");
}

}  // namespace

void read_forward(const ReadShape& s, Dtype loc, Dtype value, Strided qloc, Strided qvar, Strided mloc,
                  Strided mvar, Strided values, uintptr_t out, uintptr_t lse, uintptr_t stream) {
  check_location_dim(s.d);
  if (s.B * s.Q == 0) return;
  auto st = as_stream(stream);
  by_dtypes(loc, value, [&]<class T, class V>() {
    dispatch_dim(s.d, [&]<int D>() {
      const auto geo = make_geometry<T, D>(s.d, s.threshold, s.uniform_var, s.uniform_var_value);
      // E = 0 still needs one column tile: the blocks also write lse.
      const dim3 grid(unsigned(s.B * ceil_div(s.Q, kRows)), unsigned(std::max<int64_t>(1, ceil_div(s.E, kBlockE<T>))));
      forward_kernel<T, V, D><<<grid, kThreads, 0, st>>>(s, geo, view<T>(qloc), view<T>(qvar), view<T>(mloc),
                                                         view<T>(mvar), view<V>(values), reinterpret_cast<V*>(out),
                                                         reinterpret_cast<T*>(lse));
      check_launch("read forward");
    });
  });
}

void read_backward(const ReadShape& s, Dtype loc, Dtype value, Strided qloc, Strided qvar, Strided mloc,
                   Strided mvar, Strided values, uintptr_t grad_out, uintptr_t out, uintptr_t lse,
                   uintptr_t delta, uintptr_t g_qloc, uintptr_t g_qvar, uintptr_t g_mloc, uintptr_t g_mvar,
                   uintptr_t g_values, uintptr_t stream) {
  check_location_dim(s.d);
  auto st = as_stream(stream);
  by_dtypes(loc, value, [&]<class T, class V>() {
    const auto* lse_p = reinterpret_cast<const T*>(lse);
    auto* delta_p = reinterpret_cast<T*>(delta);
    const View3<const V> g_view{reinterpret_cast<const V*>(grad_out), s.Q * s.E, s.E, 1};
    if (s.B * s.Q > 0) {
      const int64_t rows = s.B * s.Q;
      delta_kernel<T, V><<<unsigned(ceil_div(rows * 32, 256)), 256, 0, st>>>(
          rows, s.E, reinterpret_cast<const V*>(grad_out), reinterpret_cast<const V*>(out), delta_p);
      check_launch("read backward (delta)");
    }
    dispatch_dim(s.d, [&]<int D>() {
      const auto geo = make_geometry<T, D>(s.d, s.threshold, s.uniform_var, s.uniform_var_value);
      const auto ql = view<T>(qloc), qv = view<T>(qvar), ml = view<T>(mloc), mv = view<T>(mvar);
      const auto z = view<V>(values);
      if (s.B * s.Q > 0) {
        pair_grads_kernel<T, V, D, true><<<unsigned(s.B * ceil_div(s.Q, kRows)), kThreads, 0, st>>>(
            s, geo, ql, qv, ml, mv, z, g_view, lse_p, delta_p, reinterpret_cast<T*>(g_qloc),
            reinterpret_cast<T*>(g_qvar));
        check_launch("read backward (query gradients)");
      }
      if (s.B * s.M > 0) {
        pair_grads_kernel<T, V, D, false><<<unsigned(s.B * ceil_div(s.M, kRows)), kThreads, 0, st>>>(
            s, geo, ql, qv, ml, mv, z, g_view, lse_p, delta_p, reinterpret_cast<T*>(g_mloc),
            reinterpret_cast<T*>(g_mvar));
        check_launch("read backward (entry gradients)");
        if (s.E > 0) {
          const dim3 grid(unsigned(s.B * ceil_div(s.M, kRows)), unsigned(ceil_div(s.E, kBlockE<T>)));
          value_grads_kernel<T, V, D><<<grid, kThreads, 0, st>>>(s, geo, ql, qv, ml, mv, g_view, lse_p,
                                                                 reinterpret_cast<V*>(g_values));
          check_launch("read backward (value gradients)");
        }
      }
    });
  });
}

}  // namespace rk::cuda
