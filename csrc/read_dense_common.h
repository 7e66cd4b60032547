// Pieces shared by the dense read's forward (read_dense_cpu.cpp) and backward
// (read_dense_backward_cpu.cpp): the register configuration, how rows are grouped into vector
// lanes, the geometry of a batch row whose variance every pair shares, the direct scores of a
// panel of lanes against one point, and the packing of a tile's rows for the micro-kernel.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "read_cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rk {
namespace dense {

template <class T>
struct Cfg {
  static constexpr int64_t VB = kNativeVectorBytes;
  using S = Simd<T, VB>;
  using Vec = typename S::Vec;
  static constexpr int64_t L = S::L;
  static constexpr int64_t NR = 2 * L;  // lanes of a panel; value columns of a register block
  static constexpr int MR = micro_rows(VB);
};

// Bit l set where lane l of v is nonzero: one compare into a mask register with AVX-512 (the
// generic loop below is compiled as a scalar test per lane).
template <class T>
inline uint64_t nonzero_lanes(const typename Cfg<T>::Vec& v) {
#if defined(__AVX512F__)
  if constexpr (Cfg<T>::VB == 64 && sizeof(T) == 4) return _mm512_cmpneq_ps_mask(__m512(v), _mm512_setzero_ps());
  if constexpr (Cfg<T>::VB == 64 && sizeof(T) == 8) return _mm512_cmpneq_pd_mask(__m512d(v), _mm512_setzero_pd());
#endif
  uint64_t bits = 0;
  for (int64_t l = 0; l < Cfg<T>::L; ++l) bits |= uint64_t(v[l] != T(0)) << l;
  return bits;
}

// The weights operand of the backward's products (weights × output gradients; the forward's
// weights × values runs transposed and reads its weights in place, read_dense_cpu.cpp) is read in place (rows of lanes, one row per entry or query) or first packed into
// micro-panels (pack_micro_panels): packing pays where its MR lanes are reused by at least this many
// column blocks of NR (E ≥ 256 floats with AVX-512); below, the copy costs more than it saves
// (runs of runs/ab.py at the shapes: within ±4%).
constexpr int64_t kPackWeightsFromBlocks = 8;

constexpr int64_t kPanelsPerGroup = 8;  // rows per task: 8 panels (256 floats' lanes with AVX-512)
constexpr int64_t kGroupsWanted = 2;    // smaller groups where a call would have fewer

// n rows (per batch row) cut into groups of at most max_panels panels of lanes, smaller ones (down
// to one vector of lanes) where the call would have fewer than kGroupsWanted. Depends on the shapes
// only, never on the thread count, so no result does.
struct LaneGroups {
  int64_t size, count;  // rows per group (the last may have fewer), groups per batch row
};

template <class T>
LaneGroups lane_groups(int64_t B, int64_t n, int64_t max_panels) {
  const int64_t most = max_panels * Cfg<T>::NR;
  int64_t groups = (n + most - 1) / most;
  if (B * groups < kGroupsWanted)
    groups = std::min<int64_t>((kGroupsWanted + B - 1) / B, (n + Cfg<T>::L - 1) / Cfg<T>::L);
  groups = std::max<int64_t>(groups, 1);
  const int64_t size = (n + groups - 1) / groups;
  return {size, (n + size - 1) / size};
}

// The pair geometry of one batch row whose every pair has the same variance per dimension:
// log k = −½ · dist · scale + norm with dist = Σ_k w_k (q_k − m_k)².
template <class T>
struct Metric {
  std::vector<T> w;  // 1 / v_k per dimension, or all 1 where every variance is one number (scale = 1 / v)
  bool unit;         // all weights 1: dist is the plain squared distance
  T scale, norm;
  T thr2;            // squared threshold on the plain distance; < 0: none

  Metric(const ReadShape& s, const View3<const T>& qvar, const View3<const T>& mvar, int64_t b) : w(s.d, T(1)) {
    const auto geo = make_geometry<T, 0>(s.d, s.threshold, s.uniform_var, s.uniform_var_value);
    thr2 = geo.thr2;
    unit = s.uniform_var;
    if (unit) {
      scale = geo.uniform_inv_var;
      norm = geo.uniform_norm;
      return;
    }
    scale = T(1);
    LogProduct log_det;
    for (int64_t k = 0; k < s.d; ++k) {
      const T v = qvar(b, 0, k) + mvar(b, 0, k);
      w[k] = T(1) / v;
      log_det.multiply(double(v));
    }
    norm = T(-0.5 * log_det.log()) + geo.norm_const;
  }

  // 1 / v_k, the factor of the gradients
  inline T inv(int64_t k) const { return unit ? scale : w[k]; }

  // f.template operator()<Unit, Thr>() with this metric's kind (unit weights; a threshold) as
  // compile-time flags, for lane_scores.
  template <class F>
  void dispatch_kind(F&& f) const {
    if (unit) {
      if (thr2 >= 0) f.template operator()<true, true>();
      else f.template operator()<true, false>();
    } else {
      if (thr2 >= 0) f.template operator()<false, true>();
      else f.template operator()<false, false>();
    }
  }

  inline T score_of(T dist, T plain) const {
    return thr2 >= 0 && plain > thr2 ? neg_inf<T>() : T(-0.5) * dist * scale + norm;
  }

  // log k of one pair, directly.
  template <class QL, class ML>
  inline T score(const QL& q, const ML& m, int64_t d) const {
    T dist = 0, plain = 0;
    for (int64_t k = 0; k < d; ++k) {
      const T diff = q(k) - m(k);
      dist += unit ? diff * diff : diff * diff * w[k];
      plain += diff * diff;
    }
    return score_of(dist, plain);
  }
};

// Copies n rows (from r0) of a View3's batch row b into panels [panel][dim][NR], lane i of panel
// i / NR holding row r0 + i; lanes past n are zero.
template <class T>
void pack_lanes(const View3<const T>& rows, int64_t b, int64_t r0, int64_t n, int64_t d, std::vector<T>& panels) {
  constexpr int64_t NR = Cfg<T>::NR;
  std::fill(panels.begin(), panels.end(), T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) panels[(i / NR) * d * NR + k * NR + i % NR] = rows(b, r0 + i, k);
}

// log k between the 2 × L points of a panel ([dim][NR]) and one point p (stride sc), vectorised
// over the panel's lanes: (s0, s1). Unit: every weight 1 (Metric::unit); Thr: a threshold masks
// (Metric::thr2 ≥ 0), as Metric::dispatch_kind passes them. Low: only the panel's first L lanes
// hold points (a call of at most L queries): s1 is −inf (weight 0) without being computed.
template <class T, int D, bool Unit, bool Thr, bool Low = false>
inline void lane_scores(const Metric<T>& mt, const T* panel, const T* p, int64_t sc, int64_t d,
                        typename Cfg<T>::Vec& s0, typename Cfg<T>::Vec& s1) {
  using S = typename Cfg<T>::S;
  using Vec = typename Cfg<T>::Vec;
  constexpr int64_t L = Cfg<T>::L, NR = Cfg<T>::NR;
  constexpr bool plain_needed = !Unit && Thr;  // the threshold is on the plain distance
  const int64_t n = D > 0 ? D : d;
  Vec dist0{}, dist1{}, plain0{}, plain1{};
  for (int64_t k = 0; k < n; ++k) {
    const T pk = p[k * sc];
    const Vec x0 = S::load(panel + k * NR) - pk, x1 = Low ? Vec{} : S::load(panel + k * NR + L) - pk;
    if constexpr (Unit) {
      dist0 += x0 * x0;
      if constexpr (!Low) dist1 += x1 * x1;
    } else {
      dist0 += x0 * x0 * mt.w[k];
      if constexpr (!Low) dist1 += x1 * x1 * mt.w[k];
      if constexpr (plain_needed) {
        plain0 += x0 * x0;
        if constexpr (!Low) plain1 += x1 * x1;
      }
    }
  }
  // dist · (−½ scale) is (−½ dist) · scale exactly (a halving is exact): one multiply-add fewer
  const T half_scale = T(-0.5) * mt.scale;
  s0 = dist0 * half_scale + mt.norm;
  s1 = dist1 * half_scale + mt.norm;
  if constexpr (Thr) {
    if constexpr (!plain_needed) {
      plain0 = dist0;
      plain1 = dist1;
    }
    const Vec thr2 = S::splat(mt.thr2), ninf = S::splat(neg_inf<T>());
    s0 = plain0 > thr2 ? ninf : s0;
    s1 = plain1 > thr2 ? ninf : s1;
  }
  if constexpr (Low) s1 = S::splat(neg_inf<T>());
}

// Packs nt rows (from r0) of E columns of a View3's batch row b into column blocks
// dst[block][row][NR] (block e0 / NR at dst + e0 · nt), zero past E: each block is one contiguous
// panel the micro-kernel streams from L1 (rows in place are a large power of two apart for the
// usual E, so their lines would evict each other), and the rows are read once, in order, which
// the hardware prefetcher follows.
template <class T>
void pack_column_blocks(const View3<const T>& src, int64_t b, int64_t r0, int64_t nt, int64_t E, T* dst) {
  constexpr int64_t NR = Cfg<T>::NR;
  const int64_t full = E / NR * NR;
  for (int64_t j = 0; j < nt; ++j) {
    const T* z = src.row(b, r0 + j);
    T* row = dst + j * NR;
    if (src.sc == 1) {
      for (int64_t e0 = 0; e0 < full; e0 += NR)
        for (int64_t e = 0; e < NR; ++e) row[e0 * nt + e] = z[e0 + e];
    } else {
      for (int64_t e0 = 0; e0 < full; e0 += NR)
        for (int64_t e = 0; e < NR; ++e) row[e0 * nt + e] = z[(e0 + e) * src.sc];
    }
    if (full < E) {
      for (int64_t e = full; e < E; ++e) row[full * nt + e - full] = z[e * src.sc];
      for (int64_t e = E; e < full + NR; ++e) row[full * nt + e - full] = T(0);
    }
  }
}

// The calling thread's instance of W (a kernel's per-thread working memory, std::vector members
// listed by W::buffers()), kept from one call to the next: its vectors keep their capacity, so a
// call reuses the pages the previous one faulted in (a fresh page costs a fault and its zeroing,
// about 0.4 ms per MB: a few percent of a read at the shapes). W::reset sizes it for a
// call; release_if_large() after the call keeps at most kRetainBytes per thread.
constexpr size_t kRetainBytes = size_t(16) << 20;

template <class W>
W& thread_work() {
  thread_local W w;
  return w;
}

template <class W>
void release_if_large(W& w) {
  size_t bytes = 0;
  for (auto* v : w.buffers()) bytes += v->capacity() * sizeof((*v)[0]);
  if (bytes <= kRetainBytes) return;
  for (auto* v : w.buffers()) {
    v->clear();
    v->shrink_to_fit();
  }
}

// Uninitialised memory for one call's packed operands (M × E or Q × E numbers). Fresh memory costs
// a page fault and the zeroing of each page on first touch: a 40 MB buffer in 4 KiB pages took
// 17 ms of faults, in 2 MiB pages 3 ms (runs/fault.cpp), and zeroing fresh huge pages still cost
// the backward at Q = 3000, M = 1500, E = 512 a tenth of a matrix product's time per call. So the
// calling thread keeps one block of up to kScratchRetainBytes from call to call (grown to the
// largest request, aligned to 2 MiB and offered to transparent huge pages on Linux); a larger
// request, or a second one while the block is in use, gets memory of its own, freed at the end.
constexpr size_t kScratchRetainBytes = size_t(64) << 20;

class ScratchBlock {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;

  // bytes of memory aligned to 2 MiB, offered to huge pages (Linux)
  static void* allocate(size_t bytes, size_t& allocated) {
    allocated = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = std::aligned_alloc(kHugePage, allocated);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, allocated, MADV_HUGEPAGE);  // advice only: nothing to do if it is refused
#endif
    return p;
  }

  // The calling thread's block, at least `bytes` long, or nullptr if it is in use or that would
  // exceed kScratchRetainBytes.
  static void* acquire(size_t bytes) {
    ScratchBlock& b = mine();
    if (b.busy_ || bytes > kScratchRetainBytes) return nullptr;
    if (b.bytes_ < bytes) {
      std::free(b.p_);
      b.p_ = nullptr;
      b.bytes_ = 0;
      b.p_ = allocate(bytes, b.bytes_);
    }
    b.busy_ = true;
    return b.p_;
  }
  static void release() { mine().busy_ = false; }

  ~ScratchBlock() { std::free(p_); }

 private:
  static ScratchBlock& mine() {
    thread_local ScratchBlock block;
    return block;
  }
  void* p_ = nullptr;
  size_t bytes_ = 0;
  bool busy_ = false;
};

template <class T>
class Scratch {
 public:
  explicit Scratch(size_t n) {
    const size_t bytes = std::max<size_t>(n, 1) * sizeof(T);
#if defined(__SANITIZE_ADDRESS__)
    p_ = static_cast<T*>(::operator new(bytes));  // the exact size: AddressSanitizer sees a read past the end
    return;
#endif
    p_ = static_cast<T*>(ScratchBlock::acquire(bytes));
    if (p_) {
      cached_ = true;
      return;
    }
    size_t allocated;
    p_ = static_cast<T*>(ScratchBlock::allocate(bytes, allocated));
    aligned_ = true;
  }
  ~Scratch() {
    if (cached_) ScratchBlock::release();
    else if (aligned_) std::free(p_);
    else ::operator delete(p_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  T* data() const { return p_; }

 private:
  T* p_ = nullptr;
  bool cached_ = false, aligned_ = false;
};

// Tiles of rows (one batch row's rows t0 .. t0 + nt, tile t0 / kc) packed once per call for every
// task that streams them (pack_column_blocks: the forward's values, the backward's output
// gradients), instead of once per task: with many tasks per batch row the packing was a tenth of
// the product's time. The first task to need a tile packs it into the shared copy; one that finds
// it being packed packs into its own buffer instead of waiting. The packed numbers are the same
// either way, so nothing depends on who packed. Not used (tasks pack their own) where a batch row
// has one task, or where the shared copy would exceed kSharedPanelBytes.
constexpr int64_t kSharedPanelBytes = int64_t(64) << 20;

template <class T>
class SharedPanels {
 public:
  // rows per batch row, tile rows kc, panel_size numbers per tile; batches: 1 where every batch
  // row reads the same rows (batch stride 0)
  SharedPanels(int64_t batches, int64_t rows, int64_t kc, int64_t panel_size)
      : tiles_((rows + kc - 1) / kc), panel_size_(panel_size), one_batch_(batches == 1) {
    const int64_t n = batches * tiles_;
    if (n == 0 || n * panel_size * int64_t(sizeof(T)) > kSharedPanelBytes) return;
    data_ = std::make_unique<Scratch<T>>(size_t(n * panel_size));  // every panel is written before it is read
    state_.reset(new std::atomic<uint8_t>[size_t(n)]);
    for (int64_t i = 0; i < n; ++i) state_[i].store(kEmpty, std::memory_order_relaxed);
  }

  bool enabled() const { return bool(data_); }

  // The packed tile `tile` of batch row b: pack(dst) fills a panel.
  template <class Pack>
  const T* get(int64_t b, int64_t tile, T* own, const Pack& pack) {
    if (!data_) {
      pack(own);
      return own;
    }
    const int64_t i = (one_batch_ ? 0 : b) * tiles_ + tile;
    T* shared = data_->data() + i * panel_size_;
    uint8_t st = state_[i].load(std::memory_order_acquire);
    if (st == kReady) return shared;
    if (st == kEmpty && state_[i].compare_exchange_strong(st, kPacking, std::memory_order_acq_rel)) {
      pack(shared);
      state_[i].store(kReady, std::memory_order_release);
      return shared;
    }
    pack(own);
    return own;
  }

 private:
  static constexpr uint8_t kEmpty = 0, kPacking = 1, kReady = 2;
  int64_t tiles_, panel_size_;
  bool one_batch_;
  std::unique_ptr<Scratch<T>> data_;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;
};

// Σ_k a[k] b[k · sb]. With b contiguous, in two vectors of lanes (k mod 2L), summed in lane order,
// then the tail: one chain of scalar adds was latency-bound (4 cycles a number: δ alone took 3% of
// the fused backward at Q = 10000, E = 1024, and was the hottest loop of the blocked backward's
// grads_impl in a perf profile at (3000, 1500, 512)). The order depends on n only: the same bits
// for any thread.
template <class T>
inline T dot(const T* a, const T* b, int64_t sb, int64_t n) {
  using S = typename Cfg<T>::S;
  using Vec = typename Cfg<T>::Vec;
  constexpr int64_t L = Cfg<T>::L;
  T acc = 0;
  int64_t k = 0;
  if (sb == 1 && n >= 2 * L) {
    Vec v0{}, v1{};
    for (; k + 2 * L <= n; k += 2 * L) {
      v0 += S::load(a + k) * S::load(b + k);
      v1 += S::load(a + k + L) * S::load(b + k + L);
    }
    const Vec v = v0 + v1;
    for (int64_t l = 0; l < L; ++l) acc += v[l];
  }
  for (; k < n; ++k) acc += a[k] * b[k * sb];
  return acc;
}

}  // namespace dense
}  // namespace rk
