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
// chunks in chunk order: the same bits for any thread count.
#include "read_blocked_cpu.h"

#include "fast_exp.h"
#include "read_dense_common.h"

#include <algorithm>
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

constexpr int64_t kChunkEntries = 256;  // backward: entries per task (its accumulators, 5 × 1 KB at d = 2, stay in L1)
constexpr double kLog2e = 1.4426950408889634074;

#if defined(__AVX512F__)
// 2^x for 16 floats, exactly 0 below −126 (so no weight is a denormal, which the BLAS multiplies
// many times slower, and none is below 2^−126 of the row's largest): x = n/16 + r, |r| ≤ 1/32, n
// the nearest integer to 16 x by the shifter trick (1.5 · 2^19 puts 1/16 in the last place: the
// shifted number's low 4 bits are n mod 16, the table index of vpermps); 2^x = 2^⌊n/16⌋ ·
// 2^((n mod 16)/16) · 2^r, the last a cubic (Taylor; its error (r ln 2)^4 / 24 ≤ 1e-8, below a
// tenth of a float's unit roundoff). Within 1.5 units in the last place of the exact value
// (tests/test_read_blocked.py compares against exp on a grid).
inline __m512 exp2_table_avx512(__m512 x) {
  const __m512 table = _mm512_setr_ps(1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f,
                                      1.1892070770263672f, 1.2418577671051025f, 1.2968395948410034f,
                                      1.3542555570602417f, 1.4142135381698608f, 1.4768261909484863f,
                                      1.5422108173370361f, 1.610490322113037f, 1.6817928552627563f,
                                      1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);  // false for -inf, NaN
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
// elsewhere; scores are multiplied by kLogScale (log2 e, or 1) before it.
template <class T>
struct WeightExp {
  using Vec = typename Cfg<T>::Vec;
#if defined(__AVX512F__)
  static constexpr bool kBase2 = std::is_same_v<T, float> && Cfg<T>::L == 16;
#else
  static constexpr bool kBase2 = false;
#endif
  static constexpr T kLogScale = kBase2 ? T(kLog2e) : T(1);
  static inline Vec apply(Vec x) {
#if defined(__AVX512F__)
    if constexpr (kBase2) return Vec(exp2_table_avx512(__m512(x)));
#endif
    return exp_nonpositive_lanes(x);  // ≤ 0 but for rounding (see below): fine up to 88 / 709
  }
};

// Batch row b's entry locations as [dim][lanes], lanes = M rounded up to a vector, zero padding.
template <class T>
struct EntryLanes {
  int64_t lanes;
  std::vector<T> soa;
  EntryLanes(const View3<const T>& mloc, int64_t b, int64_t M, int64_t d)
      : lanes(round_up(M, Cfg<T>::L)), soa(size_t(std::max<int64_t>(d, 1) * lanes), T(0)) {
    for (int64_t j = 0; j < M; ++j)
      for (int64_t k = 0; k < d; ++k) soa[k * lanes + j] = mloc(b, j, k);
  }
  const T* dim(int64_t k) const { return soa.data() + k * lanes; }
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

// Lanes from j0 at or past M: +inf distances (weight 0).
template <class T>
inline typename Cfg<T>::Vec mask_tail(typename Cfg<T>::Vec dist, int64_t j0, int64_t M) {
  constexpr int64_t L = Cfg<T>::L;
  if (j0 + L <= M) return dist;
  for (int64_t l = M - j0; l < L; ++l) dist[l] = std::numeric_limits<T>::infinity();
  return dist;
}

template <class T>
inline T lanes_min(const typename Cfg<T>::Vec& v) {
  T m = v[0];
  for (int64_t l = 1; l < Cfg<T>::L; ++l) m = std::min(m, v[l]);
  return m;
}

template <class T>
inline T lanes_sum(const typename Cfg<T>::Vec& v) {
  T s = 0;
  for (int64_t l = 0; l < Cfg<T>::L; ++l) s += v[l];
  return s;
}

template <class T>
std::vector<T> query_row(const View3<const T>& qloc, int64_t b, int64_t q, int64_t d) {
  std::vector<T> r(d);
  for (int64_t k = 0; k < d; ++k) r[k] = qloc(b, q, k);
  return r;
}

template <class T, int D, bool Unit>
void row_weights(const ReadShape& s, const Metric<T>& mt, const T* q, const EntryLanes<T>& m, T* row, T& lse) {
  using C = Cfg<T>;
  using S = typename C::S;
  using Vec = typename C::Vec;
  constexpr int64_t L = C::L;
  const int64_t M = s.M, lanes = m.lanes;
  // 1. distances, and the smallest
  Vec low = S::splat(std::numeric_limits<T>::infinity());
  for (int64_t j0 = 0; j0 < lanes; j0 += L) {
    const Vec dist = mask_tail<T>(lane_distances<T, D, Unit>(mt, q, m, s.d, j0, nullptr), j0, M);
    S::store(row + j0, dist);
    low = dist < low ? dist : low;
  }
  const T dmin = lanes_min<T>(low);
  // 2. weights exp(−½ scale (dist − dmin)) as one multiply-add: x = dist · a + c (x at dmin is
  // a rounding error of a · dmin, |x| ≤ its half unit: exp fine)
  const T a = T(-0.5) * mt.scale * WeightExp<T>::kLogScale;
  const T c = -a * dmin;
  Vec sum{};
  for (int64_t j0 = 0; j0 < lanes; j0 += L) {
    const Vec w = WeightExp<T>::apply(S::load(row + j0) * a + c);
    S::store(row + j0, w);
    sum += w;
  }
  const T total = lanes_sum<T>(sum);
  if (!(total > T(0)) || !std::isfinite(total)) {  // no finite distance (overflowing coordinates): nothing read
    std::fill(row, row + lanes, T(0));
    lse = neg_inf<T>();
    return;
  }
  // 3. normalised
  const T inv = T(1) / total;
  for (int64_t j0 = 0; j0 < lanes; j0 += L) S::store(row + j0, S::load(row + j0) * inv);
  lse = mt.norm + T(-0.5) * mt.scale * dmin + std::log(total);
}

template <class T>
void check_block(const ReadShape& s, int64_t b, int64_t q0, int64_t n, int64_t ld) {
  if (s.threshold >= 0) throw std::invalid_argument("blocked read: only calls without a threshold");
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
                  int64_t q0, int64_t n, T* tile, int64_t ld, T* lse) {
#pragma omp parallel for schedule(static) num_threads(threads_for(n))
  for (int64_t i = 0; i < n; ++i) {
    const std::vector<T> q = query_row(qloc, b, q0 + i, s.d);
    row_weights<T, D, Unit>(s, mt, q.data(), m, tile + i * ld, lse[i]);
  }
}

// One chunk of entries [j_begin, j_end) against the block's rows: weights from lse into tile, ds,
// the chunk's entry sums (acc: [1 + 2d][chunk lanes]: Σ ds, Σ ds diff_k, Σ ds diff_k²) and the
// rows' partial sums (part: [row][1 + 2d]).
template <class T, int D, bool Unit>
void chunk_grads(const ReadShape& s, const Metric<T>& mt, View3<const T> qloc, const EntryLanes<T>& m, int64_t b,
                 int64_t q0, int64_t n, const T* lse, const T* delta, T* tile, const T* dp, int64_t ld,
                 int64_t j_begin, int64_t j_end, T* acc, T* part) {
  using C = Cfg<T>;
  using S = typename C::S;
  using Vec = typename C::Vec;
  constexpr int64_t L = C::L;
  constexpr int kMaxDim = 3;
  const int64_t d = s.d, width = j_end - j_begin, sums = 1 + 2 * d;
  const T a = T(-0.5) * mt.scale * WeightExp<T>::kLogScale;
  std::fill(acc, acc + sums * width, T(0));
  std::vector<Vec> diff_heap(D > 0 ? 0 : size_t(d)), row_heap(D > 0 ? 0 : size_t(sums));
  Vec diff_fixed[kMaxDim], row_fixed[1 + 2 * kMaxDim];
  Vec* diff = D > 0 ? diff_fixed : diff_heap.data();
  Vec* rs = D > 0 ? row_fixed : row_heap.data();
  for (int64_t i = 0; i < n; ++i) {
    T* out_p = part + i * sums;
    if (!(lse[i] > neg_inf<T>())) {  // nothing read: zero weights, zero gradients
      std::fill(out_p, out_p + sums, T(0));
      for (int64_t j0 = j_begin; j0 < j_end; j0 += L) S::store(tile + i * ld + j0, Vec{});
      continue;
    }
    const std::vector<T> q = query_row(qloc, b, q0 + i, d);
    const T c = (mt.norm - lse[i]) * WeightExp<T>::kLogScale;
    const Vec del = S::splat(delta[i]);
    for (int64_t k = 0; k < sums; ++k) rs[k] = Vec{};
    for (int64_t j0 = j_begin; j0 < j_end; j0 += L) {
      const Vec dist = mask_tail<T>(lane_distances<T, D, Unit>(mt, q.data(), m, d, j0, diff), j0, s.M);
      const Vec w = WeightExp<T>::apply(dist * a + c);
      S::store(tile + i * ld + j0, w);
      const Vec ds = w * (S::load(dp + i * ld + j0) - del);  // padding lanes: w = 0 (dp there is never read past M)
      T* ac = acc + (j0 - j_begin);
      rs[0] += ds;
      S::store(ac, S::load(ac) + ds);
      for (int64_t k = 0; k < (D > 0 ? D : d); ++k) {
        const Vec t = ds * diff[k];
        rs[1 + k] += t;
        rs[1 + d + k] += t * diff[k];
        T* a1 = ac + (1 + k) * width;
        T* a2 = ac + (1 + d + k) * width;
        S::store(a1, S::load(a1) + t);
        S::store(a2, S::load(a2) + t * diff[k]);
      }
    }
    for (int64_t k = 0; k < sums; ++k) out_p[k] = lanes_sum<T>(rs[k]);
  }
}

template <class T, int D, bool Unit>
void grads_impl(const ReadShape& s, const Metric<T>& mt, View3<const T> qloc, const EntryLanes<T>& m, int64_t b,
                int64_t q0, int64_t n, const T* lse, const T* grad_out, const T* out, T* tile, const T* dp, int64_t ld,
                T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar) {
  constexpr int64_t L = Cfg<T>::L;
  const int64_t d = s.d, E = s.E, M = s.M, sums = 1 + 2 * d;
  const int64_t chunks = (m.lanes + kChunkEntries - 1) / kChunkEntries;
  // δ_i = g_i · out_i (rows of E, contiguous)
  std::vector<T> delta(size_t(std::max<int64_t>(n, 1)));
  for (int64_t i = 0; i < n; ++i) {
    const T* g = grad_out + ((b * s.Q) + q0 + i) * E;
    const T* o = out + ((b * s.Q) + q0 + i) * E;
    T dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += g[e] * o[e];
    delta[i] = dot;
  }
  std::vector<T> part(size_t(chunks * std::max<int64_t>(n, 1) * sums));
#pragma omp parallel num_threads(threads_for(chunks))
  {
    std::vector<T> acc(size_t(sums * kChunkEntries));
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t j_begin = ch * kChunkEntries, j_end = std::min(m.lanes, j_begin + kChunkEntries);
      const int64_t width = j_end - j_begin;
      chunk_grads<T, D, Unit>(s, mt, qloc, m, b, q0, n, lse, delta.data(), tile, dp, ld, j_begin, j_end, acc.data(),
                              part.data() + ch * n * sums);
      // the chunk's entries: dlogk/dm = diff / v, dlogk/dv = ½ (diff² / v² − 1 / v)
      for (int64_t j = j_begin; j < std::min(j_end, M); ++j) {
        const int64_t l = j - j_begin;
        for (int64_t k = 0; k < d; ++k) {
          const T inv = mt.inv(k);
          T* gm = g_mloc + (b * M + j) * d + k;
          T* gv = g_mvar + (b * M + j) * d + k;
          *gm += acc[(1 + k) * width + l] * inv;
          *gv += T(0.5) * (acc[(1 + d + k) * width + l] * inv * inv - acc[l] * inv);
        }
      }
    }
  }
  (void)L;
  // the queries: partial sums over the chunks, in chunk order
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < d; ++k) {
      T s0 = 0, s1 = 0, s2 = 0;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const T* p = part.data() + (ch * n + i) * sums;
        s0 += p[0];
        s1 += p[1 + k];
        s2 += p[1 + d + k];
      }
      const T inv = mt.inv(k);
      const int64_t at = ((b * s.Q) + q0 + i) * d + k;
      g_qloc[at] = -s1 * inv;
      g_qvar[at] = T(0.5) * (s2 * inv * inv - s0 * inv);
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
  return shared && s.threshold < 0 && s.M >= 1;
}

int64_t blocked_read_row_lanes(bool is_double, int64_t M) {
  return is_double ? round_up(M, Cfg<double>::L) : round_up(M, Cfg<float>::L);
}

template <class T>
void blocked_read_weights_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                              View3<const T> mvar, int64_t b, int64_t q0, int64_t n, T* tile, int64_t ld, T* lse) {
  check_block<T>(s, b, q0, n, ld);
  if (n == 0) return;
  if (s.M == 0) throw std::invalid_argument("blocked read: M must be at least 1");
  const Metric<T> mt(s, qvar, mvar, b);
  const EntryLanes<T> m(mloc, b, s.M, s.d);
  dispatch(mt, s.d, [&]<int D, bool Unit>() { weights_impl<T, D, Unit>(s, mt, qloc, m, b, q0, n, tile, ld, lse); });
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
    grads_impl<T, D, Unit>(s, mt, qloc, m, b, q0, n, lse, grad_out, out, tile, dp, ld, g_qloc, g_qvar, g_mloc,
                           g_mvar);
  });
}

#define RK_INSTANTIATE(T)                                                                                          \
  template bool blocked_read_applies<T>(const ReadShape&, View3<const T>, View3<const T>);                        \
  template void blocked_read_weights_cpu<T>(const ReadShape&, View3<const T>, View3<const T>, View3<const T>,     \
                                            View3<const T>, int64_t, int64_t, int64_t, T*, int64_t, T*);          \
  template void blocked_read_backward_block_cpu<T>(const ReadShape&, View3<const T>, View3<const T>,               \
                                                   View3<const T>, View3<const T>, int64_t, int64_t, int64_t,     \
                                                   const T*, const T*, const T*, T*, const T*, int64_t, T*, T*, \
                                                   T*, T*);
RK_INSTANTIATE(float)
RK_INSTANTIATE(double)
#undef RK_INSTANTIATE

}  // namespace rk
