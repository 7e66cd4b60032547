// The register-blocked matrix-product core shared by the CPU kernels (csrc/sample_cpu.cpp's drive
// term, csrc/read_dense_cpu.cpp's scores and weighted sums): explicit SIMD vectors (GCC/Clang
// vector extension) and one micro-kernel, C[r][0 .. 2L) += Σ_k A(r, k) · B[k][0 .. 2L), whose
// MR × 2 accumulators stay in registers while B streams through once per k.
#pragma once

#include <cstdint>

namespace rk {

// The widest SIMD register the build targets (-march=native here), and how many there are.
#if defined(__AVX512F__)
constexpr int64_t kNativeVectorBytes = 64;
constexpr int kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int64_t kNativeVectorBytes = 32;
constexpr int kVectorRegisters = 16;
#else
constexpr int64_t kNativeVectorBytes = 16;  // every 64-bit target has 16-byte vectors
constexpr int kVectorRegisters = 16;
#endif

constexpr int64_t round_up_const(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One vector of VB bytes of T. The element-aligned type makes each load and store one full-width
// unaligned move (a memcpy into a vector was compiled as half-width copies through the stack,
// which stall store-to-load forwarding).
template <class T, int64_t VB>
struct Simd {
  typedef T Vec __attribute__((vector_size(VB), aligned(alignof(T))));
  static constexpr int64_t L = VB / int64_t(sizeof(T));  // lanes
  static inline Vec load(const T* p) { return *reinterpret_cast<const Vec*>(p); }
  static inline void store(T* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
  static inline Vec splat(T x) { return Vec{} + x; }
};

// Rows of accumulators per register block: MR × 2 accumulators + 2 loads of B + 1 broadcast fit
// the register file (6 with 16 registers, 12 with 32).
constexpr int micro_rows(int64_t vector_bytes) { return vector_bytes >= 64 && kVectorRegisters >= 32 ? 12 : 6; }

// A's element (r, k) from MR row pointers, each row contiguous in k.
template <class T, int MR>
struct RowPointers {
  const T* const* rows;
  inline T operator()(int r, int64_t k) const { return rows[r][k]; }
};

// A's element (r, k) at p[k · k_step + r · RS]: rows RS apart (a compile-time stride, so each of
// the MR loads is a constant displacement from one pointer), k_step between consecutive k.
template <class T, int64_t RS>
struct Strided {
  const T* p;
  int64_t k_step;
  inline T operator()(int r, int64_t k) const { return p[k * k_step + r * RS]; }
};

// A's element (r, k) of a packed micro-panel (pack_micro_panels below): p[k · MR + r], MR consecutive
// numbers per k, so the K × MR panel is one stream the prefetcher follows.
template <class T, int MR>
struct Packed {
  const T* p;
  inline T operator()(int r, int64_t k) const { return p[k * MR + r]; }
};

// Copies the lanes [0, n) (n rounded up to a multiple of MR) of K rows (row k at src + k · ld) into
// micro-panels of MR lanes, panel i0 / MR at dst + (i0 / MR) · packed_stride(K) holding [k][MR]:
// the layout Packed reads. Read in place, the MR numbers of one k sit in a row of their own, K rows
// far apart, a cache line (and often a TLB entry) per k that the micro-kernel would wait for. Each
// source row is read once, in order. Whole vectors of VB bytes are copied: lanes up to
// pack_reach() past a panel's first are read, and written past its last k (into the gap between
// panels, and past the last panel: dst needs that slack).
template <class T, int64_t VB, int MR>
constexpr int64_t pack_reach() { return round_up_const(MR, Simd<T, VB>::L); }

template <class T, int64_t VB, int MR>
constexpr int64_t packed_stride(int64_t K) { return K * MR + pack_reach<T, VB, MR>() - MR; }

template <class T, int64_t VB, int MR>
inline void pack_micro_panels(const T* src, int64_t ld, int64_t n, int64_t K, T* dst) {
  using S = Simd<T, VB>;
  constexpr int64_t L = S::L, NV = pack_reach<T, VB, MR>() / L;
  const int64_t stride = packed_stride<T, VB, MR>(K);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i0 = 0; i0 < n; i0 += MR)
      for (int64_t v = 0; v < NV; ++v)
        S::store(dst + (i0 / MR) * stride + k * MR + v * L, S::load(src + k * ld + i0 + v * L));
}

// c[r · ldc + j] += Σ_{k < K} a(r, k) · b[k · ldb + j] for r < MR, j < NV · L (NV vectors of L
// lanes of VB bytes: 2, or 1 where the caller's columns end after one). Each c element is one chain
// of fused multiply-adds in k order, so the result does not depend on how the caller blocks rows
// or columns.
template <class T, int64_t VB, int MR, int NV = 2, class A>
inline void block_dots(const A& a, const T* b, int64_t ldb, int64_t K, T* c, int64_t ldc) {
  static_assert(NV == 1 || NV == 2);
  using S = Simd<T, VB>;
  using Vec = typename S::Vec;
  constexpr int64_t L = S::L;
  Vec sum[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) sum[r][v] = S::load(c + r * ldc + v * L);
  for (int64_t k = 0; k < K; ++k) {
    Vec y[NV];
    for (int v = 0; v < NV; ++v) y[v] = S::load(b + k * ldb + v * L);
    for (int r = 0; r < MR; ++r) {
      const T z = a(r, k);
      for (int v = 0; v < NV; ++v) sum[r][v] += z * y[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) S::store(c + r * ldc + v * L, sum[r][v]);
}

inline int64_t round_up(int64_t x, int64_t m) { return round_up_const(x, m); }

}  // namespace rk
