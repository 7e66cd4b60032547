// The elementwise halves of the blocked dense read (read_blocked_cpu.h). The cpu backend runs a
// dense read without a threshold one block of queries at a time: these kernels write the block's
// softmax weights into a tile of its own (rows × entries, a few MB), the BLAS that torch ships
// multiplies the tile with the values, and the backward's kernel turns the product of the output
// gradients with the values into the score gradients and the location and variance gradients.
// The weights × values products are then the BLAS's (within a few percent of the bare product
// `logits @ V`); what is left here is a few vector operations per (query, entry) pair.
//
// Layout: the SIMD lanes run over entries, whose locations are packed per call as [dim][entry]
// (EntryLanes), so a query's scores against L entries are d subtractions and d multiply-adds.
//
// Forward, per query row (OpenMP over the block's rows; each row is one thread's, in a fixed
// order, so the weights do not depend on the thread count): (1) the weighted squared distances to
// every entry and their minimum; (2) the weights exp(−½ · scale · (dist − min)), written in
// place, and their sum; (3) the weights divided by the sum. The shift is the row's largest score
// (the smallest distance: the scores fall with the distance), so every weight is at most 1 and the
// sum at least 1. With AVX-512 floats the exp is exp2 from a 16-entry table and a cubic
// (exp2_table_avx512): about two-thirds of the operations of fast_exp.h's polynomial.
//
// Backward, per column chunk of kChunkEntries entries (OpenMP over chunks; each chunk walks the
// block's rows in order): the weights again (from the saved log-sum-exp), ds = w (dp − δ_i), the
// entries' location and variance sums in the chunk's own arrays (added to the gradient at the end,
// chunks holding disjoint entries), and the queries' sums as per-chunk partials added over the
// chunks in chunk order: the same bits for any thread count. The one-call backward
// (blocked_read_backward_cpu) runs that per block on one thread, the blocks' products by the BLAS
// on the same thread, the entries' sums in per-thread partials (backward_impl).
#include "read_blocked_cpu.h"

#include "fast_exp.h"
#include "read_dense_common.h"

#include <algorithm>
#include <memory>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rk {
namespace {

using dense::Cfg;
using dense::Metric;
using dense::dot;

// Backward: the entries are cut into column chunks of about kChunkEntries (their accumulators, 5 × 2 KB
// at d = 2, stay in L1; each row of a chunk ends in horizontal sums, which narrower chunks paid
// for: 0.64 against 0.54 ns per pair at 256 and 512 entries, runs/mb/bbench.cpp), their number a
// multiple of kChunkMultiple so that 1, 2 or 4 threads share them evenly. From the shapes alone.
constexpr int64_t kChunkEntries = 512;
constexpr int64_t kChunkMultiple = 4;

struct Chunks {
  int64_t count, width;  // chunk c holds lanes [c · width, min((c + 1) · width, lanes))
};

template <class T>
Chunks column_chunks(int64_t lanes) {
  constexpr int64_t L = Cfg<T>::L;
  const int64_t vectors = lanes / L;
  const int64_t wanted = round_up((lanes + kChunkEntries - 1) / kChunkEntries, kChunkMultiple);
  const int64_t width = ((vectors + std::min(wanted, vectors) - 1) / std::min(wanted, vectors)) * L;
  return {(lanes + width - 1) / width, width};
}
constexpr double kLog2e = 1.4426950408889634074;
constexpr int64_t kMaxGenericDim = 31;  // the blocked read takes d < 32 (cpu_blocked.BLOCKED_BELOW_D)
// A block's weights tile: it stays in the L2 cache (2 MB a core here) between the weights and the
// product. The forward at the four shapes (2 threads, interleaved with the bare product):
// 1 MB tiles 1.02-1.13x the bare product, 2 MB 1.01-1.26x (E = 512 the slow one), 4 MB 1.07-1.28x,
// 512 KB 1.04-1.30x (E = 1024: blocks of 128 queries).
constexpr int64_t kTileBytes = int64_t(1) << 20;
constexpr int64_t kLeastRows = 16, kMostRows = 512;
// A batch row's blocks: their number rounded up to a multiple of this and the queries shared evenly
// among them, so 1, 2 or 4 threads get equal shares of the forward's blocks (one more block for one
// thread cost the forward 2-4% at (Q, M, E) = (3000, 1500, 512): 19 blocks of up to 160 queries,
// 1.13-1.17x the bare product against 1.09-1.15x with 20 of 150, interleaved runs; the other
// issue-#17 shapes level). From the shapes alone.
constexpr int64_t kBlockMultiple = 4;
// The one-call backward's blocks: this many times the forward's rows (a weights and a dp tile of
// ~2 MB each per thread). Its dL/dvalues product adds a block's weightsᵀ · g into the thread's
// M × E partial, which then is read and written once per block: at (Q, M, E) = (3000, 1500, 512)
// forward + backward took 3.66x the bare product with 1x, 3.46x with 2x, 3.45-3.50x with 3-4x
// (resonant_kernels/backends/cpu_blocked.py has the measurements); with dp's values packed
// (ValuesOperand) 3.56x with 1x, 3.51x with 2x, 3.59x with 3x, 3.58x with 4x (interleaved).
constexpr int64_t kBackwardRows = 2;
constexpr size_t kRetainTileBytes = size_t(16) << 20;  // a thread's tile kept from call to call up to this

#if defined(__AVX512F__)
// 2^x for 16 floats, exactly 0 below cut ≥ −126 (so no weight is a denormal, which the BLAS
// multiplies many times slower: see kept_below): x = n/16 + r, |r| ≤ 1/32, n
// the nearest integer to 16 x by the shifter trick (1.5 · 2^19 puts 1/16 in the last place: the
// shifted number's low 4 bits are n mod 16, the table index of vpermps); 2^x = 2^⌊n/16⌋ ·
// 2^((n mod 16)/16) · 2^r, the last a cubic (Taylor; its error (r ln 2)^4 / 24 ≤ 1e-8, below a
// tenth of a float's unit roundoff). Within 1.5 units in the last place of the exact value
// (tests/test_read_blocked.py compares against exp on a grid).
inline __m512 exp2_table_avx512(__m512 x, float cut) {
  const __m512 table = _mm512_setr_ps(1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f,
                                      1.1892070770263672f, 1.2418577671051025f, 1.2968395948410034f,
                                      1.3542555570602417f, 1.4142135381698608f, 1.4768261909484863f,
                                      1.5422108173370361f, 1.610490322113037f, 1.6817928552627563f,
                                      1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(cut), _CMP_GE_OQ);  // false for -inf, NaN
  const __m512 shifter = _mm512_set1_ps(786432.0f);                                     // 1.5 · 2^19
  const __m512 shifted = _mm512_add_ps(x, shifter);
  const __m512 n16 = _mm512_sub_ps(shifted, shifter);  // n / 16, exactly
  const __m512 r = _mm512_sub_ps(x, n16);
  const __m512 t = _mm512_permutexvar_ps(_mm512_castps_si512(shifted), table);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.05550410971045494f), r, _mm512_set1_ps(0.24022650718688965f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.6931471824645996f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, _mm512_mul_ps(p, t), n16);  // scalef: · 2^⌊n/16⌋
}
#endif

// The weights' exp on a vector: exp2 (the table above) for AVX-512 floats, fast_exp.h's exp
// elsewhere; scores are multiplied by kLogScale (log2 e, or 1) before it. Arguments below `cut`
// (cutoff()) give exactly 0.
template <class T>
struct WeightExp {
  using Vec = typename Cfg<T>::Vec;
#if defined(__AVX512F__)
  static constexpr bool kBase2 = std::is_same_v<T, float> && Cfg<T>::L == 16;
#else
  static constexpr bool kBase2 = false;
#endif
  static constexpr T kLogScale = kBase2 ? T(kLog2e) : T(1);
  static inline Vec apply(Vec x, T cut) {
#if defined(__AVX512F__)
    if constexpr (kBase2) return Vec(exp2_table_avx512(__m512(x), cut));
#endif
    return exp_nonpositive_lanes(x < cut ? S::splat(neg_inf<T>()) : x);  // ≤ 0 but for rounding: fine up to 88 / 709
  }
  // The smallest argument kept: the log (in the exp's base) of the smallest normal number.
  static T cutoff() { return T(std::log(double(std::numeric_limits<T>::min())) * double(kLogScale)); }
  using S = typename Cfg<T>::S;
};

// Batch row b's entry locations as [dim][lanes], lanes = M rounded up to a vector, and their
// bounding box (lo, hi per dimension). The padding lanes sit at kFar in every dimension: their
// squared distance to any finite query overflows to +inf, so their weight is exactly 0, and with it
// every gradient term (0 × (q − kFar) = 0), with no test per vector.
template <class T>
struct EntryLanes {
  static constexpr T kFar = std::numeric_limits<T>::max() / 4;
  int64_t lanes;
  std::vector<T> soa, lo, hi;
  EntryLanes(const View3<const T>& mloc, int64_t b, int64_t M, int64_t d)
      : lanes(round_up(M, Cfg<T>::L)), soa(size_t(std::max<int64_t>(d, 1) * lanes), kFar),
        lo(size_t(d), std::numeric_limits<T>::infinity()), hi(size_t(d), -std::numeric_limits<T>::infinity()) {
    for (int64_t j = 0; j < M; ++j)
      for (int64_t k = 0; k < d; ++k) {
        const T x = mloc(b, j, k);
        soa[k * lanes + j] = x;
        lo[k] = std::min(lo[k], x);
        hi[k] = std::max(hi[k], x);
      }
  }
  const T* dim(int64_t k) const { return soa.data() + k * lanes; }

  // A lower bound of the weighted squared distance from q to every entry: to the bounding box.
  T box_distance(const Metric<T>& mt, const T* q, int64_t d) const {
    T dist = 0;
    for (int64_t k = 0; k < d; ++k) {
      const T out = std::max({lo[k] - q[k], q[k] - hi[k], T(0)});
      dist += out * out * (mt.unit ? T(1) : mt.w[k]);
    }
    return dist;
  }
};

// The weighted squared distance Σ_k w_k (q_k − m_k)² from one query (q: its d coordinates) to the
// L entries from j0, and their differences (diff[k]) for the gradients.
template <class T, int D, bool Unit>
inline typename Cfg<T>::Vec lane_distances(const Metric<T>& mt, const T* q, const EntryLanes<T>& m, int64_t d,
                                           int64_t j0, typename Cfg<T>::Vec* diff) {
  using S = typename Cfg<T>::S;
  typename Cfg<T>::Vec dist{};
  const int64_t n = D > 0 ? D : d;
  for (int64_t k = 0; k < n; ++k) {
    const auto x = q[k] - S::load(m.dim(k) + j0);
    if (diff) diff[k] = x;
    if constexpr (Unit) dist += x * x;
    else dist += x * x * mt.w[k];
  }
  return dist;
}

// A vector's lanes reduced as a tree (halves added, then quarters, ...): a few dependent
// operations instead of a chain of L (per row of a block, several times: in the backward's chunks
// the chain cost as much as the chunk's pairs).
template <class T, class Op>
inline T lanes_reduce(typename Cfg<T>::Vec v, Op op) {
  constexpr int64_t L = Cfg<T>::L;
  T buf[L];
  Cfg<T>::S::store(buf, v);
  for (int64_t half = L / 2; half >= 1; half /= 2)
    for (int64_t l = 0; l < half; ++l) buf[l] = op(buf[l], buf[l + half]);
  return buf[0];
}

template <class T>
inline T lanes_min(const typename Cfg<T>::Vec& v) {
  return lanes_reduce<T>(v, [](T x, T y) { return std::min(x, y); });
}

template <class T>
inline T lanes_sum(const typename Cfg<T>::Vec& v) {
  return lanes_reduce<T>(v, [](T x, T y) { return x + y; });
}

template <class T>
std::vector<T> query_row(const View3<const T>& qloc, int64_t b, int64_t q, int64_t d) {
  std::vector<T> r(d);
  for (int64_t k = 0; k < d; ++k) r[k] = qloc(b, q, k);
  return r;
}

// The rows' weights are left unnormalised: the product's rows are divided by their sums instead
// (scale[i] = 1 / sum, a pass over E numbers per row instead of M). least_sum(): a row whose sum is at
// least this (2^−62 float, 2^−510 double) has its largest weight at least that / M, so the weights
// the exp drops (below the smallest normal) are below M · 2^−64 ≤ 2^−34 of it (M < 2^30), their
// sum too: nothing at working precision.
template <class T>
inline T least_sum() { return std::ldexp(T(1), std::numeric_limits<T>::min_exponent / 2); }

// One query's weights against every entry, in one pass: exp(−½ scale (dist − shift)) with the shift
// the distance to the entries' bounding box (box_distance: at most the smallest distance, so every
// weight is at most 1: nothing overflows, and no pass for the row's maximum is needed). Where that
// leaves the sum below least_sum() (the query far from every entry but inside their box: clustered
// entries, a small σ), the row is redone with the exact shift, the smallest distance.
template <class T, int D, bool Unit>
void row_weights(const ReadShape& s, const Metric<T>& mt, const T* q, const EntryLanes<T>& m, T* row, T& lse,
                 T& scale) {
  using C = Cfg<T>;
  using S = typename C::S;
  using Vec = typename C::Vec;
  constexpr int64_t L = C::L;
  const int64_t M = s.M, lanes = m.lanes;
  const T a = T(-0.5) * mt.scale * WeightExp<T>::kLogScale, cut = WeightExp<T>::cutoff();
  T shift = m.box_distance(mt, q, s.d);
  // x = dist · a + c as one multiply-add (x at the shift: a rounding error of a · shift, |x| ≤ its
  // half unit: exp fine)
  Vec sum{};
  for (int64_t j0 = 0; j0 < lanes; j0 += L) {
    const Vec dist = lane_distances<T, D, Unit>(mt, q, m, s.d, j0, nullptr);
    const Vec w = WeightExp<T>::apply(dist * a + (-a * shift), cut);
    S::store(row + j0, w);
    sum += w;
  }
  T total = lanes_sum<T>(sum);
  if (!(total >= least_sum<T>())) {  // redo: the distances and their minimum, then the weights
    Vec low = S::splat(std::numeric_limits<T>::infinity());
    for (int64_t j0 = 0; j0 < lanes; j0 += L) {
      const Vec dist = lane_distances<T, D, Unit>(mt, q, m, s.d, j0, nullptr);
      S::store(row + j0, dist);
      low = dist < low ? dist : low;
    }
    shift = lanes_min<T>(low);
    sum = Vec{};
    for (int64_t j0 = 0; j0 < lanes; j0 += L) {
      const Vec w = WeightExp<T>::apply(S::load(row + j0) * a + (-a * shift), cut);
      S::store(row + j0, w);
      sum += w;
    }
    total = lanes_sum<T>(sum);
  }
  if (!(total > T(0)) || !std::isfinite(total)) {  // no finite distance (overflowing coordinates): nothing read
    std::fill(row, row + lanes, T(0));
    lse = neg_inf<T>();
    scale = T(0);
    return;
  }
  scale = T(1) / total;
  lse = mt.norm + T(-0.5) * mt.scale * shift + std::log(total);
}

template <class T>
void check_block(const ReadShape& s, int64_t b, int64_t q0, int64_t n, int64_t ld) {
  if (s.threshold >= 0) throw std::invalid_argument("blocked read: only calls without a threshold");
  if (s.d < 1 || s.d > kMaxGenericDim)
    throw std::invalid_argument("blocked read: d must be in [1, " + std::to_string(kMaxGenericDim) + "], got " +
                                std::to_string(s.d));
  if (b < 0 || b >= s.B || q0 < 0 || n < 0 || q0 + n > s.Q)
    throw std::invalid_argument("blocked read: block (b=" + std::to_string(b) + ", q0=" + std::to_string(q0) +
                                ", n=" + std::to_string(n) + ") outside B=" + std::to_string(s.B) +
                                ", Q=" + std::to_string(s.Q));
  if (ld < round_up(s.M, Cfg<T>::L))
    throw std::invalid_argument("blocked read: row stride " + std::to_string(ld) + " below the row lanes " +
                                std::to_string(round_up(s.M, Cfg<T>::L)));
}

int threads_for(int64_t tasks) {
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  return int(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
}

template <class T, int D, bool Unit>
void weights_impl(const ReadShape& s, const Metric<T>& mt, View3<const T> qloc, const EntryLanes<T>& m, int64_t b,
                  int64_t q0, int64_t n, T* tile, int64_t ld, T* lse, T* scale) {
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads_for(n))
  for (int64_t i = 0; i < n; ++i) {
    const std::vector<T> q = query_row(qloc, b, q0 + i, s.d);
    row_weights<T, D, Unit>(s, mt, q.data(), m, tile + i * ld, lse[i], scale[i]);
  }
}

// One chunk of entries [j_begin, j_end) against the block's rows: weights from lse into tile, ds,
// the chunk's entry sums (acc: [1 + 2d][chunk lanes]: Σ ds, Σ ds diff_k, Σ ds diff_k²) and the
// rows' partial sums as vectors (part: [row][1 + 2d][L], reduced across lanes once per row, after
// the chunks are added: grads_impl).
template <class T, int D, bool Unit>
void chunk_grads(const ReadShape& s, const Metric<T>& mt, View3<const T> qloc, const EntryLanes<T>& m, int64_t b,
                 int64_t q0, int64_t n, const T* lse, const T* delta, T* tile, const T* dp, int64_t ld,
                 int64_t j_begin, int64_t j_end, T* acc, T* part) {
  using C = Cfg<T>;
  using S = typename C::S;
  using Vec = typename C::Vec;
  constexpr int64_t L = C::L;
  constexpr int64_t KD = D > 0 ? D : kMaxGenericDim;  // dimensions held in registers (D: all of them)
  const int64_t d = s.d, width = j_end - j_begin, sums = 1 + 2 * d;
  const T a = T(-0.5) * mt.scale * WeightExp<T>::kLogScale, cut = WeightExp<T>::cutoff();
  std::fill(acc, acc + sums * width, T(0));
  for (int64_t i = 0; i < n; ++i) {
    T* out_p = part + i * sums * L;
    if (!(lse[i] > neg_inf<T>())) {  // nothing read: zero weights, zero gradients
      std::fill(out_p, out_p + sums * L, T(0));
      for (int64_t j0 = j_begin; j0 < j_end; j0 += L) S::store(tile + i * ld + j0, Vec{});
      continue;
    }
    T q[KD];
    for (int64_t k = 0; k < d; ++k) q[k] = qloc(b, q0 + i, k);
    const T c = (mt.norm - lse[i]) * WeightExp<T>::kLogScale;
    const Vec del = S::splat(delta[i]);
    Vec r0{}, r1[KD], r2[KD];  // the row's Σ ds, Σ ds diff_k, Σ ds diff_k²
    for (int64_t k = 0; k < d; ++k) r1[k] = r2[k] = Vec{};
    T* wrow = tile + i * ld;
    const T* dprow = dp + i * ld;
    for (int64_t j0 = j_begin; j0 < j_end; j0 += L) {
      Vec diff[KD];
      const Vec dist = lane_distances<T, D, Unit>(mt, q, m, d, j0, diff);
      const Vec w = WeightExp<T>::apply(dist * a + c, cut);
      S::store(wrow + j0, w);
      const Vec ds = w * (S::load(dprow + j0) - del);  // padding lanes: w = 0 and dp = 0
      T* ac = acc + (j0 - j_begin);
      r0 += ds;
      S::store(ac, S::load(ac) + ds);
      for (int64_t k = 0; k < (D > 0 ? D : d); ++k) {
        const Vec t = ds * diff[k], u = t * diff[k];
        r1[k] += t;
        r2[k] += u;
        T* a1 = ac + (1 + k) * width;
        T* a2 = ac + (1 + d + k) * width;
        S::store(a1, S::load(a1) + t);
        S::store(a2, S::load(a2) + u);
      }
    }
    S::store(out_p, r0);
    for (int64_t k = 0; k < d; ++k) {
      S::store(out_p + (1 + k) * L, r1[k]);
      S::store(out_p + (1 + d + k) * L, r2[k]);
    }
  }
}

// g_mloc_b / g_mvar_b: batch row b's (M, d) sums, added to; `threads` runs the chunks (1: on the
// calling thread, as the one-call backward's threads do with their blocks).
template <class T, int D, bool Unit>
void grads_impl(const ReadShape& s, const Metric<T>& mt, View3<const T> qloc, const EntryLanes<T>& m, int64_t b,
                int64_t q0, int64_t n, const T* lse, const T* grad_out, const T* out, T* tile, const T* dp, int64_t ld,
                T* g_qloc, T* g_qvar, T* g_mloc_b, T* g_mvar_b, int threads) {
  const int64_t d = s.d, E = s.E, M = s.M, sums = 1 + 2 * d;
  const Chunks cut = column_chunks<T>(m.lanes);
  const int64_t chunks = cut.count;
  // δ_i = g_i · out_i (rows of E, contiguous)
  std::vector<T> delta(size_t(std::max<int64_t>(n, 1)));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = ((b * s.Q) + q0 + i) * E;
    delta[i] = dot(grad_out + row, out + row, 1, E);
  }
  constexpr int64_t L = Cfg<T>::L;
  using S = typename Cfg<T>::S;
  using Vec = typename Cfg<T>::Vec;
  std::vector<T> part(size_t(chunks * std::max<int64_t>(n, 1) * sums * L));
#pragma omp parallel num_threads(std::min(threads, threads_for(chunks)))
  {
    std::vector<T> acc(size_t(sums * cut.width));
#pragma omp for schedule(dynamic, 1)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t j_begin = ch * cut.width, j_end = std::min(m.lanes, j_begin + cut.width);
      const int64_t width = j_end - j_begin;
      chunk_grads<T, D, Unit>(s, mt, qloc, m, b, q0, n, lse, delta.data(), tile, dp, ld, j_begin, j_end, acc.data(),
                              part.data() + ch * n * sums * L);
      // the chunk's entries: dlogk/dm = diff / v, dlogk/dv = ½ (diff² / v² − 1 / v)
      for (int64_t j = j_begin; j < std::min(j_end, M); ++j) {
        const int64_t l = j - j_begin;
        for (int64_t k = 0; k < d; ++k) {
          const T inv = mt.inv(k);
          T* gm = g_mloc_b + j * d + k;
          T* gv = g_mvar_b + j * d + k;
          *gm += acc[(1 + k) * width + l] * inv;
          *gv += T(0.5) * (acc[(1 + d + k) * width + l] * inv * inv - acc[l] * inv);
        }
      }
    }
  }
  // the queries: partial sums over the chunks, in chunk order, then across the lanes
  for (int64_t i = 0; i < n; ++i) {
    auto total = [&](int64_t k) {
      Vec v{};
      for (int64_t ch = 0; ch < chunks; ++ch) v += S::load(part.data() + ((ch * n + i) * sums + k) * L);
      return lanes_sum<T>(v);
    };
    const T s0 = total(0);
    for (int64_t k = 0; k < d; ++k) {
      const T s1 = total(1 + k), s2 = total(1 + d + k), inv = mt.inv(k);
      const int64_t at = ((b * s.Q) + q0 + i) * d + k;
      g_qloc[at] = -s1 * inv;
      g_qvar[at] = T(0.5) * (s2 * inv * inv - s0 * inv);
    }
  }
}

// A thread's scratch of n values, 64-byte aligned, kept from call to call (its pages touched once).
template <class T>
struct ThreadTile {
  std::vector<T> data;
  T* get(size_t n) {
    if (data.size() < n + 16) data.resize(n + 16);
    return data.data() + (16 - (reinterpret_cast<uintptr_t>(data.data()) / sizeof(T)) % 16) % 16;  // 64-byte aligned
  }
  void trim() {
    if (data.capacity() * sizeof(T) > kRetainTileBytes) data = std::vector<T>();  // kept: ≤ 16 MB
  }
};

// The values as the A operand of a one-call forward's or backward's products (op(A) = values or
// valuesᵀ as `trans` says, m × k; each block multiplies it with an operand of n ≤ rows columns).
// Where the BLAS packs (Blas::packs), the caller asks for it and a batch row has at least
// kPackFromBlocks whole blocks, each distinct batch row's values are packed once (alpha 1; by one
// thread each, the BLAS told to use one thread as the blocks' products are) into the calling
// thread's retained buffer (never moved: MKL's packed layout depends on its address), and every
// whole block multiplies the packed values; other blocks (a shorter last one) use the plain gemm,
// which packs all of A on every call. Whether a block is packed depends on the shapes alone: the
// same bits for any thread count. Measured (float32, d = 2, 2 threads, interleaved, forward +
// backward or forward over the bare product, medians of 12-15 rounds): the backward's
// dp = g · valuesᵀ packed was faster at every shape tried, E = 64 to 1024 (by 0.01-0.15: 3.52 →
// 3.48 at (Q, M, E) = (3000, 1500, 512), 3.47 → 3.33 at (4096, 4096, 128), 3.38 → 3.26 at
// (4096, 2048, 1024)); the forward's product packed was slower below E = 768 (1.03 → 1.08-1.13 at
// (4096, 2048, 64-256), 1.14 → 1.17 at (3000, 1500, 512)), either way at 768 and faster from
// E = 1024 (1.50 → 1.08 at (4096, 2048, 1024), 1.53 → 1.16 at (3000, 1500, 1024), 1.10 → 1.07 at
// (10000, 1024, 1024), 1.29 → 1.24 at (4096, 256, 1024)): kPackForwardFromE. A batch row's
// packing runs on one thread while the others wait (0.3-1.2 ms at (M, E) = (1500, 512)); packed
// in two runs of rows, one per thread, each block then multiplying two halves, it measured slower
// (3.60 against 3.41 at (3000, 1500, 512)).
constexpr int64_t kPackFromBlocks = 2;
constexpr int64_t kPackForwardFromE = 1024;

template <class T>
class ValuesOperand {
 public:
  ValuesOperand(const Blas<T>& blas, View3<const T> values, int64_t B, char trans, int m, int k, int ld, int64_t rows,
                int64_t Q, bool pack)
      : blas_(blas), values_(values), trans_(trans), m_(m), k_(k), ld_(ld), rows_(int(rows)) {
    if (!pack || !blas.packs() || Q / std::max<int64_t>(rows, 1) < kPackFromBlocks) return;
    const int64_t distinct = values.sb == 0 ? 1 : B;
    stride_ = size_t(round_up(int64_t((blas.pack_size("A", &m_, &rows_, &k_) + sizeof(T) - 1) / sizeof(T)), 16));
    thread_local ThreadTile<T> buffer;  // the calling thread's (a call packs and multiplies before it returns)
    packed_ = buffer.get(size_t(distinct) * stride_);
    buffer_ = &buffer;
    const T one = T(1);
#pragma omp parallel for num_threads(threads_for(distinct)) schedule(dynamic, 1)
    for (int64_t b = 0; b < distinct; ++b) {
      const int previous = blas.local_threads ? blas.local_threads(1) : 0;
      blas.pack("A", &trans_, &m_, &rows_, &k_, &one, values.row(b, 0), &ld_, packed_ + b * stride_);
      if (blas.local_threads) blas.local_threads(previous);
    }
  }
  ~ValuesOperand() {
    if (buffer_) buffer_->trim();
  }
  ValuesOperand(const ValuesOperand&) = delete;
  ValuesOperand& operator=(const ValuesOperand&) = delete;

  // c (m × n, column-major, ldc) = op(batch row b's values) · x (k × n, ldx)
  void multiply(int64_t b, int n, const T* x, int ldx, T* c, int ldc) const {
    const T zero = T(0);
    if (packed_ && n == rows_) {
      blas_.compute("P", "N", &m_, &n, &k_, packed_ + (values_.sb == 0 ? 0 : b) * stride_, &ld_, x, &ldx, &zero, c,
                    &ldc);
    } else {
      const T one = T(1);
      blas_.gemm(&trans_, "N", &m_, &n, &k_, &one, values_.row(b, 0), &ld_, x, &ldx, &zero, c, &ldc);
    }
  }

 private:
  const Blas<T>& blas_;
  View3<const T> values_;
  char trans_;
  int m_, k_, ld_, rows_;
  size_t stride_ = 0;
  T* packed_ = nullptr;
  ThreadTile<T>* buffer_ = nullptr;
};

// The whole forward in one call, where the caller passes a BLAS gemm (Fortran interface, as the
// BLAS that torch ships exports it): each thread takes whole blocks of queries (a fixed cut of
// the shapes: blocked_read_block_rows), writes the block's weights into its own tile and
// multiplies them with the values itself (ValuesOperand: packed once from E = kPackForwardFromE;
// the BLAS told to run on the calling thread alone: local_threads(1), which also holds where the
// region has one thread and the BLAS would otherwise start its own), then divides the rows by
// their sums. No barrier and no Python between blocks, and each read row the product of one
// thread's sequential gemm on a block of a size fixed by the shapes: the same bits for any thread
// count (not for a query read in a block of another size).

template <class T, int D, bool Unit>
void forward_impl(const ReadShape& s, const std::vector<Metric<T>>& metrics, View3<const T> qloc,
                  const std::vector<EntryLanes<T>>& entries, View3<const T> values, T* out, T* lse, int64_t rows,
                  const Blas<T>& blas) {
  const int64_t Q = s.Q, E = s.E, M = s.M, blocks = (Q + rows - 1) / rows, tasks = s.B * blocks;
  const int64_t ld = entries[0].lanes;
  const bool row_major = values.sc == 1;
  const int ldt = int(ld), ldo = int(E);
  // out rows (row-major n × E) = tile (n × M, ld) · values (M × E): in the BLAS's column-major
  // terms outᵀ (E × n) = valuesᵀ (E × M) · tileᵀ (M × n)
  const ValuesOperand<T> product(blas, values, s.B, row_major ? 'N' : 'T', int(E), int(M),
                                 int(row_major ? values.sr : values.sc), rows, Q, E >= kPackForwardFromE);
  const BlasLocalThreads local_threads = blas.local_threads;
#pragma omp parallel num_threads(threads_for(tasks))
  {
    thread_local ThreadTile<T> tile_buf;
    T* tile = tile_buf.get(size_t(rows * ld));
    std::vector<T> scale(static_cast<size_t>(rows));
    const int previous = local_threads ? local_threads(1) : 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / blocks, q0 = task % blocks * rows, n = std::min(rows, Q - q0);
      for (int64_t i = 0; i < n; ++i) {
        T q[kMaxGenericDim];
        for (int64_t k = 0; k < s.d; ++k) q[k] = qloc(b, q0 + i, k);
        row_weights<T, D, Unit>(s, metrics[b], q, entries[b], tile + i * ld, lse[b * Q + q0 + i], scale[i]);
      }
      T* o = out + (b * Q + q0) * E;
      product.multiply(b, int(n), tile, ldt, o, ldo);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t e = 0; e < E; ++e) o[i * E + e] *= scale[i];
    }
    if (local_threads) local_threads(previous);
    tile_buf.trim();
  }
}

// The whole backward in one call, like the forward: thread t of T takes the t-th of T equal runs
// of the call's (batch row, query) rows, cut into blocks of at most `rows` queries within a batch
// row (so the threads' shares differ by one query at most, and which queries a thread sums is fixed
// by the shapes and the thread count). Per block: dp = g_block · valuesᵀ on that thread (the
// values packed once: ValuesOperand), the weights again from the saved lse with the score, query
// and entry gradients (grads_impl on this thread alone), and the thread's partial dL/dvalues += weightsᵀ · g_block (gemm, beta = 1
// after the thread's first block of a batch row). The entries' gradients (values, locations,
// variances) are per-thread partials over the batch rows the thread's run touches, added at the
// end over the threads in thread order: the same bits run to run for a given thread count
// (another count cuts the sums otherwise). Scratch per thread: two tiles (weights, dp) of `rows`
// rows, kept from call to call up to kRetainTileBytes, and its partials.
template <class T, int D, bool Unit>
void backward_impl(const ReadShape& s, const std::vector<Metric<T>>& metrics, View3<const T> qloc,
                   const std::vector<EntryLanes<T>>& entries, View3<const T> values, const T* lse, const T* grad_out,
                   const T* out, T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values, int64_t rows,
                   const Blas<T>& blas) {
  const int64_t B = s.B, Q = s.Q, E = s.E, M = s.M, d = s.d, total = B * Q;
  const int64_t ld = entries[0].lanes;
  const bool row_major = values.sc == 1;
  const int threads = threads_for((total + rows - 1) / rows);
  // thread t: global rows [first[t], first[t + 1]) (row b · Q + q), batch rows b_first(t) .. b_last(t)
  std::vector<int64_t> first(size_t(threads) + 1);
  for (int t = 0; t <= threads; ++t) first[t] = total * t / threads;
  auto b_first = [&](int t) { return first[t] / Q; };
  auto b_last = [&](int t) { return (first[t + 1] - 1) / Q; };
  std::vector<std::unique_ptr<T[]>> part_values(threads);
  std::vector<std::vector<T>> part_loc(threads), part_var(threads);
  // dp rows (row-major n × M, ld) = g (n × E) · valuesᵀ: column-major dpᵀ (M × n) = values (M × E) · gᵀ
  const ValuesOperand<T> dp_product(blas, values, B, row_major ? 'T' : 'N', int(M), int(E),
                                    int(row_major ? values.sr : values.sc), rows, Q, true);
  const BlasGemm<T> gemm = blas.gemm;
  const BlasLocalThreads local_threads = blas.local_threads;
#pragma omp parallel num_threads(threads)
  {
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    const int64_t b0 = b_first(t), nb = b_last(t) - b0 + 1;
    part_values[t].reset(new T[size_t(nb * M * E)]);  // each batch row's written by its first block (beta = 0)
    part_loc[t].assign(size_t(nb * M * d), T(0));
    part_var[t].assign(size_t(nb * M * d), T(0));
    thread_local ThreadTile<T> tile_buf, dp_buf;
    T* tile = tile_buf.get(size_t(rows * ld));
    T* dp = dp_buf.get(size_t(rows * ld));
    const int previous = local_threads ? local_threads(1) : 0;
    const int m_ = int(M), e_ = int(E), ldt = int(ld);
    const T one = T(1), zero = T(0);
    int64_t previous_b = -1;
    for (int64_t at = first[t]; at < first[t + 1];) {
      const int64_t b = at / Q, q0 = at % Q, n = std::min({rows, Q - q0, first[t + 1] - at});
      at += n;
      const int n_ = int(n);
      const T* g = grad_out + (b * Q + q0) * E;
      // dp; the lanes past M zero (grads_impl reads whole vectors: 0 × a zero weight)
      dp_product.multiply(b, n_, g, e_, dp, ldt);
      for (int64_t i = 0; i < n; ++i) std::fill(dp + i * ld + M, dp + (i + 1) * ld, T(0));
      grads_impl<T, D, Unit>(s, metrics[b], qloc, entries[b], b, q0, n, lse + b * Q + q0, grad_out, out, tile, dp, ld,
                             g_qloc, g_qvar, part_loc[t].data() + (b - b0) * M * d,
                             part_var[t].data() + (b - b0) * M * d, 1);
      // dL/dvalues rows (row-major M × E) += weightsᵀ (M × n) · g (n × E): column-major, its transpose
      // (E × M) += gᵀ (E × n) · weights (n × M)
      const T* beta = b == previous_b ? &one : &zero;
      gemm("N", "T", &e_, &m_, &n_, &one, g, &e_, tile, &ldt, beta, part_values[t].get() + (b - b0) * M * E, &e_);
      previous_b = b;
    }
    if (local_threads) local_threads(previous);
    tile_buf.trim();
    dp_buf.trim();
#pragma omp barrier
    // the partials added over the threads in thread order, each (batch row, entry) by one thread
    for (int64_t bj = B * M * t / threads; bj < B * M * (t + 1) / threads; ++bj) {
      const int64_t b = bj / M, j = bj % M;
      T* gv = g_values + bj * E;
      T* gl = g_mloc + bj * d;
      T* gr = g_mvar + bj * d;
      bool any = false;
      for (int u = 0; u < threads; ++u) {
        if (b < b_first(u) || b > b_last(u)) continue;
        const int64_t at = (b - b_first(u)) * M + j;
        const T* pvu = part_values[u].get() + at * E;
        const T* plu = part_loc[u].data() + at * d;
        const T* pru = part_var[u].data() + at * d;
        if (!any) {
          std::copy(pvu, pvu + E, gv);
          std::copy(plu, plu + d, gl);
          std::copy(pru, pru + d, gr);
          any = true;
        } else {
          for (int64_t e = 0; e < E; ++e) gv[e] += pvu[e];
          for (int64_t k = 0; k < d; ++k) gl[k] += plu[k], gr[k] += pru[k];
        }
      }
    }
  }
}

template <class T, class F>
void dispatch(const Metric<T>& mt, int64_t d, F&& f) {
  dispatch_dim(d, [&]<int D>() {
    if (mt.unit) f.template operator()<D, true>();
    else f.template operator()<D, false>();
  });
}

}  // namespace

template <class T>
bool blocked_read_applies(const ReadShape& s, View3<const T> qvar, View3<const T> mvar) {
  const bool shared = s.uniform_var || ((qvar.sr == 0 || s.Q <= 1) && (mvar.sr == 0 || s.M <= 1));
  return shared && s.threshold < 0 && s.M >= 1 && s.d >= 1 && s.d <= kMaxGenericDim;
}

int64_t blocked_read_row_lanes(bool is_double, int64_t M) {
  return is_double ? round_up(M, Cfg<double>::L) : round_up(M, Cfg<float>::L);
}

template <class T>
void blocked_read_weights_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                              View3<const T> mvar, int64_t b, int64_t q0, int64_t n, T* tile, int64_t ld, T* lse,
                              T* scale) {
  check_block<T>(s, b, q0, n, ld);
  if (n == 0) return;
  if (s.M == 0) throw std::invalid_argument("blocked read: M must be at least 1");
  const Metric<T> mt(s, qvar, mvar, b);
  const EntryLanes<T> m(mloc, b, s.M, s.d);
  dispatch(mt, s.d, [&]<int D, bool Unit>() { weights_impl<T, D, Unit>(s, mt, qloc, m, b, q0, n, tile, ld, lse, scale); });
}

template <class T>
void blocked_read_backward_block_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar,
                                     View3<const T> mloc, View3<const T> mvar, int64_t b, int64_t q0, int64_t n,
                                     const T* lse, const T* grad_out, const T* out, T* tile, const T* dp, int64_t ld,
                                     T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar) {
  check_block<T>(s, b, q0, n, ld);
  if (n == 0) return;
  if (s.M == 0) throw std::invalid_argument("blocked read: M must be at least 1");
  const Metric<T> mt(s, qvar, mvar, b);
  const EntryLanes<T> m(mloc, b, s.M, s.d);
  dispatch(mt, s.d, [&]<int D, bool Unit>() {
    grads_impl<T, D, Unit>(s, mt, qloc, m, b, q0, n, lse, grad_out, out, tile, dp, ld, g_qloc, g_qvar,
                           g_mloc + b * s.M * s.d, g_mvar + b * s.M * s.d, threads_for(s.M));
  });
}

int64_t blocked_read_block_rows(int64_t Q, int64_t row_bytes) {
  const int64_t rows = std::clamp<int64_t>(kTileBytes / std::max<int64_t>(row_bytes, 1), kLeastRows, kMostRows);
  const int64_t most = std::min(rows / kLeastRows * kLeastRows, Q);
  if (most < 1) return 1;
  const int64_t blocks = round_up((Q + most - 1) / most, kBlockMultiple);
  return (Q + blocks - 1) / blocks;
}

// The one-call forward's and backward's arguments: what the BLAS calls need.
template <class T>
void check_blas_call(const ReadShape& s, View3<const T> values) {
  if (s.threshold >= 0 || s.d < 1 || s.d > kMaxGenericDim || s.M < 1 || s.E < 1)
    throw std::invalid_argument("blocked read: only calls without a threshold, 1 ≤ d ≤ 31, M ≥ 1 and E ≥ 1");
  const bool row_major = values.sc == 1 && values.sr >= s.E, column_major = values.sr == 1 && values.sc >= s.M;
  if (!row_major && !column_major)
    throw std::invalid_argument("blocked read: the values need one unit stride and the other at least their width");
  if (std::max({s.M, s.E, round_up(s.M, Cfg<T>::L), values.sr, values.sc}) > int64_t(std::numeric_limits<int>::max()))
    throw std::invalid_argument("blocked read: M, E and the values' strides must fit the BLAS's int");
}

// A one-call forward's or backward's per-batch-row metrics and packed entries, and its block rows.
template <class T>
struct CallRows {
  std::vector<Metric<T>> metrics;
  std::vector<EntryLanes<T>> entries;
  int64_t rows;
  CallRows(const ReadShape& s, View3<const T> qvar, View3<const T> mloc, View3<const T> mvar) {
    for (int64_t b = 0; b < s.B; ++b) {
      metrics.emplace_back(s, qvar, mvar, b);
      entries.emplace_back(mloc, b, s.M, s.d);
    }
    rows = blocked_read_block_rows(s.Q, entries[0].lanes * int64_t(sizeof(T)));
  }
};

template <class T>
void blocked_read_forward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                              View3<const T> mvar, View3<const T> values, T* out, T* lse, const Blas<T>& blas) {
  check_blas_call<T>(s, values);
  if (s.Q == 0 || s.B == 0) return;
  const CallRows<T> c(s, qvar, mloc, mvar);
  dispatch(c.metrics[0], s.d, [&]<int D, bool Unit>() {
    forward_impl<T, D, Unit>(s, c.metrics, qloc, c.entries, values, out, lse, c.rows, blas);
  });
}

template <class T>
void blocked_read_backward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                               View3<const T> mvar, View3<const T> values, const T* lse, const T* grad_out,
                               const T* out, T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values,
                               const Blas<T>& blas) {
  check_blas_call<T>(s, values);
  if (s.Q == 0 || s.B == 0) return;
  const CallRows<T> c(s, qvar, mloc, mvar);
  dispatch(c.metrics[0], s.d, [&]<int D, bool Unit>() {
    backward_impl<T, D, Unit>(s, c.metrics, qloc, c.entries, values, lse, grad_out, out, g_qloc, g_qvar, g_mloc,
                              g_mvar, g_values, std::min(s.Q, c.rows * kBackwardRows), blas);
  });
}

#define RK_INSTANTIATE(T)                                                                                          \
  template bool blocked_read_applies<T>(const ReadShape&, View3<const T>, View3<const T>);                        \
  template void blocked_read_weights_cpu<T>(const ReadShape&, View3<const T>, View3<const T>, View3<const T>,     \
                                            View3<const T>, int64_t, int64_t, int64_t, T*, int64_t, T*, T*);      \
  template void blocked_read_backward_block_cpu<T>(const ReadShape&, View3<const T>, View3<const T>,               \
                                                   View3<const T>, View3<const T>, int64_t, int64_t, int64_t,     \
                                                   const T*, const T*, const T*, T*, const T*, int64_t, T*, T*, \
                                                   T*, T*);
RK_INSTANTIATE(float)
RK_INSTANTIATE(double)
template void blocked_read_forward_cpu<float>(const ReadShape&, View3<const float>, View3<const float>,
                                              View3<const float>, View3<const float>, View3<const float>, float*,
                                              float*, const Blas<float>&);
template void blocked_read_forward_cpu<double>(const ReadShape&, View3<const double>, View3<const double>,
                                               View3<const double>, View3<const double>, View3<const double>,
                                               double*, double*, const Blas<double>&);
template void blocked_read_backward_cpu<float>(const ReadShape&, View3<const float>, View3<const float>,
                                               View3<const float>, View3<const float>, View3<const float>,
                                               const float*, const float*, const float*, float*, float*, float*,
                                               float*, float*, const Blas<float>&);
template void blocked_read_backward_cpu<double>(const ReadShape&, View3<const double>, View3<const double>,
                                                View3<const double>, View3<const double>, View3<const double>,
                                                const double*, const double*, const double*, double*, double*,
                                                double*, double*, double*, const Blas<double>&);
#undef RK_INSTANTIATE

}  // namespace rk
