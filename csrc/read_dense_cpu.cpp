// The Gaussian-kernel read as matrix products on the CPU, for calls whose variance is the same for
// every (query, entry) pair of a batch row (read_dense_cpu.h): the weights × values product, and for
// many dimensions the scores too, run on the register-blocked micro-kernel of csrc/gemm.h.
//
// Layout: the SIMD lanes run over queries. A task is a group of whole panels of NR queries (NR =
// two vectors of lanes; up to kPanelsPerGroup panels, fewer for wide values: most_panels; spread
// evenly: query_groups) of one batch row, its queries packed once into panels [dim][NR]; it
// streams the memory in tiles of nt entries, each tile once:
//   1. scores s[j][q] of the tile, [panel][entry j][NR lanes], either directly (Σ_k w_k
//      (q_k − m_k)², vectorised over the queries) or, from kGemmScoresFromDim dimensions on, as
//      ‖q‖² + ‖m‖² − 2 q·m on centred coordinates with the cross term a matrix product (below);
//   then panel by panel:
//   2. an online softmax per query (lane): a shift raised only where the tile's maximum passes it
//      by more than kShiftSlack (a rescale of the query's sums), then the weights exp(s − shift)
//      in place, their sums and how many are nonzero (panel_softmax);
//   3. Σ_j w[j][q] · values[j][:] (panel_product): transposed, acc_t[e][q] += Σ_j values[j][e] ·
//      w[j][q], the micro-kernel with MR value columns × NR queries in registers, the values
//      broadcast from the tile's blocks of MR columns (packed once per call and shared by the
//      groups: dense::SharedPanels), the weights streamed from where step 2 wrote them (still in
//      L1; no repacking); a panel whose weights are mostly zero (a tight threshold) adds only its
//      nonzero weights' rows instead, to an accumulator per query (AccLayout: the sums move
//      between the two layouts as the panel's tiles change kind).
// Nothing of size Q × M exists beyond one tile per thread. Tasks share no outputs, so the result
// does not depend on the number of threads or their scheduling.
//
// Scores as a product. With c the mean of up to kCentreSample entries (centre()), a = Σ w (q − c)²,
// b = Σ w (m − c)² and x = Σ w (q − c)(m − c) (the product), the distance is D = a + b − 2x. Its rounding error is
// at most about (d + 4) ε (a + b) (ε: the unit roundoff), against (d + 3) ε D for the direct sum of
// d squared differences: the product form loses precision where a + b ≫ D (points far from the
// centre relative to their distance: near-duplicates, or a small σ against a wide spread). Each
// pair's product-form distance is kept only where a + b ≤ kCancellation · D + slack, i.e. where its
// worst-case error is within kCancellation of the direct form's, and where a threshold's decision
// (D vs θ²) cannot flip within that error; every other pair is recomputed directly.
#include "read_dense_cpu.h"

#include "fast_exp.h"
#include "gemm.h"
#include "read_dense_common.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rk {
namespace {

using dense::Cfg;
using dense::Metric;

constexpr int64_t kTileEntries = 128;   // entries per tile at most
constexpr int64_t kLanesForTile = 256;  // the weights' share of tile_bytes() (so the tile does not depend on G)
constexpr int64_t kScoreChunk = 128;    // score product: dimensions per chunk (a [128][NR] panel stays in L1)
constexpr int64_t kGemmScoresFromDim = 32;
constexpr double kCancellation = 4.0;
constexpr int64_t kCentreSample = 64;
// How far a tile's maximum score may pass a query's softmax shift before the shift is raised (and
// its sums rescaled): rescaling the transposed accumulator of a panel is a pass over all its value
// rows, which a running maximum would pay in most tiles; the weights stay below e^8.
constexpr double kShiftSlack = 8.0;

// Bytes of a tile's weights, values and packed locations: half the L2 cache of a core (the other
// half holds the group's accumulators), from 256 KB to 1 MB (sysconf; 512 KB where unknown). With
// 2 MB of L2, 1 MB tiles were 6% faster than 512 KB ones at E = d = 1024 (runs/ab.py). The tile
// size orders each query's sums, so a read's bits depend on the machine (as they do on its vector
// width), never on the thread count.
int64_t tile_bytes() {
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = int64_t(sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
    return l2 > 0 ? std::clamp<int64_t>(l2 / 2, int64_t(256) << 10, int64_t(1) << 20) : int64_t(512) << 10;
  }();
  return bytes;
}

// The product form's centre c for batch row b: the mean of up to kCentreSample entries spread over
// the memory (not of the queries: a query's numbers must not depend on which other queries share
// its call).
template <class T>
std::vector<T> centre(const View3<const T>& mloc, int64_t b, int64_t M, int64_t d) {
  const int64_t n = std::min(M, kCentreSample);
  std::vector<double> sum(d, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) sum[k] += double(mloc(b, i * M / n, k));
  std::vector<T> c(d);
  for (int64_t k = 0; k < d; ++k) c[k] = T(sum[k] / double(n));
  return c;
}

// The weights × values product runs transposed: acc_t[e][lane] += Σ_j values[j][e] · w[j][lane],
// the micro-kernel's MR rows over value columns (broadcast from the tile's values, packed once per
// call into blocks of up to MR columns: pack_value_blocks) and its 2L columns over one panel's
// lanes, read from the tile's weights rows where the softmax pass wrote them (nothing to repack).
// A value block narrower than MR (the last one) is 4 or 8 rows wide: value_block_width.
template <class T>
inline int64_t value_block_width(int64_t E, int64_t e0) {
  return std::min<int64_t>(Cfg<T>::MR, round_up(E - e0, 4));
}

// Rows of acc_t the blocks write: up to the last block's end (zero past E).
template <class T>
inline int64_t value_rows(int64_t E) {
  const int64_t last = (E - 1) / Cfg<T>::MR * Cfg<T>::MR;
  return last + value_block_width<T>(E, last);
}

// Packs nt rows (from t0) of the values of batch row b into blocks of value_block_width columns:
// block e0 / MR at dst + e0 · kc, [row][width], zero past E. Each source row is read once, in order.
template <class T>
void pack_value_blocks(const View3<const T>& values, int64_t b, int64_t t0, int64_t nt, int64_t E, int64_t kc,
                       T* dst) {
  constexpr int64_t MR = Cfg<T>::MR;
  const int64_t full = E / MR * MR, sc = values.sc;
  for (int64_t k = 0; k < nt; ++k) {
    const T* z = values.row(b, t0 + k);
    for (int64_t e0 = 0; e0 < full; e0 += MR) {  // whole blocks: MR numbers, a fixed-length copy
      T* out = dst + e0 * kc + k * MR;
      for (int64_t r = 0; r < MR; ++r) out[r] = z[(e0 + r) * sc];
    }
    if (full < E) {
      const int64_t width = value_block_width<T>(E, full);
      T* out = dst + full * kc + k * width;
      for (int64_t r = 0; r < width; ++r) out[r] = full + r < E ? z[(full + r) * sc] : T(0);
    }
  }
}

// Numbers per packed tile of values (pack_value_blocks).
template <class T>
inline int64_t value_panel_size(int64_t E, int64_t kc) {
  return round_up(E, Cfg<T>::MR) * kc;
}

// Whether panel p of a group of n queries holds them in its first L lanes only (a call of few
// queries): its scores, weights and products then take one vector, the other half is left out.
template <class T>
inline bool low_panel(int64_t n, int64_t p) {
  return n - p * Cfg<T>::NR <= Cfg<T>::L;
}

// Where a panel's accumulated Σ w · values lives: nowhere yet (zero), transposed in acc_t (the
// product's layout), or as rows in acc_r (the layout of a tile with few nonzero weights: each adds
// one row of values to one query's row). A panel moves between the two as its tiles change kind;
// the numbers move with it unchanged, and both paths add w · value to each (lane, column) in entry
// order with one fused multiply-add (a zero weight adds exactly nothing), so a query's read does
// not depend on which path its tiles took, and so not on the other queries of its panel.
enum class AccLayout : uint8_t { kZero, kColumns, kRows };

// Per-thread working memory of one task (a group of queries) and its tiles.
template <class T>
struct Work {
  int64_t G_pad = 0, rows = 0, E_rows = 0, E_pad = 0, d = 0;
  int64_t lda = 0, ldr = 0;  // row strides of acc_t and acc_r: one vector more than a multiple of the
                     // vector, so that the rows a micro-kernel walks down are not a large power of two
                     // apart (their cache lines would compete for a few sets of L1)
  std::vector<T> panels;  // the group's queries, [panel][dim][NR] (product form: w (q − c), centred)
  std::vector<T> qnorm;   // product form: a per lane
  std::vector<T> center;  // product form: c (centre()) of batch row center_row
  int64_t center_row = -1;
  std::vector<T> weights; // the tile's scores, then weights: [panel][entry][NR] (weight_row), so that
                          // the product streams a panel's weights as one contiguous block
  std::vector<T> mem;     // product form: the tile's centred entries, [chunk][rows][kScoreChunk]
  std::vector<T> mnorm;   // product form: b per entry
  std::vector<T> vpack;   // the tile's values, packed by pack_value_blocks (where not shared)
  std::vector<T> acc_t;   // Σ w · values, transposed: [E_rows][lda], lane columns
  std::vector<T> acc_r;   // Σ w · values as rows: [G_pad][ldr]
  std::vector<T> run_max, run_sum, tile_max;  // per lane: softmax shift (panel_softmax), Σ exp(s − shift), tile maximum
  std::vector<AccLayout> layout;              // per panel

  std::array<std::vector<T>*, 12> buffers() {
    return {&panels, &qnorm, &center, &weights, &mem, &mnorm, &vpack, &acc_t, &acc_r, &run_max, &run_sum,
            &tile_max};
  }

  // Sizes every buffer for a call (dense::thread_work keeps them between calls). The accumulators
  // are zeroed panel by panel where a group first uses them.
  void reset(int64_t G, int64_t kc, int64_t d_, int64_t E, bool product) {
    using C = Cfg<T>;
    d = d_;
    center_row = -1;
    G_pad = round_up(G, C::NR);
    rows = round_up(kc, C::MR);
    E_rows = value_rows<T>(E);
    E_pad = round_up(E, C::L);
    lda = G_pad + C::L;
    ldr = E_pad + C::L;
    panels.assign(G_pad * d, T(0));
    weights.assign(G_pad * rows, T(0));
    acc_t.resize(E_rows * lda);
    acc_r.resize(G_pad * ldr);
    for (auto* v : {&run_max, &run_sum, &tile_max}) v->assign(G_pad, T(0));
    layout.assign(G_pad / C::NR, AccLayout::kZero);
    if (product) {
      qnorm.assign(G_pad, T(0));
      mem.assign((d + kScoreChunk - 1) / kScoreChunk * rows * kScoreChunk, T(0));
      mnorm.assign(rows, T(0));
    }
    vpack.resize(value_panel_size<T>(E, kc));
  }

  // The NR lanes of panel p's weights (or scores) for the tile's entry j.
  T* weight_row(int64_t p, int64_t j) { return weights.data() + (p * rows + j) * Cfg<T>::NR; }

  // Panel p's accumulator in `want` (zeroed or moved there from the other layout).
  void use_layout(int64_t p, AccLayout want, int64_t E) {
    constexpr int64_t NR = Cfg<T>::NR;
    const AccLayout have = layout[p];
    if (have == want) return;
    T* t = acc_t.data() + p * NR;
    T* r = acc_r.data() + p * NR * ldr;
    if (want == AccLayout::kColumns) {
      for (int64_t e = 0; e < E_rows; ++e)
        for (int64_t l = 0; l < NR; ++l) t[e * lda + l] = have == AccLayout::kRows && e < E ? r[l * ldr + e] : T(0);
    } else {
      for (int64_t l = 0; l < NR; ++l)
        for (int64_t e = 0; e < E; ++e) r[l * ldr + e] = have == AccLayout::kColumns ? t[e * lda + l] : T(0);
    }
    layout[p] = want;
  }

  // Multiplies what panel p's first `lanes` lanes summed and accumulated by factor[lane] (their
  // softmax shift rose: the sums so far were taken against the lower shift).
  void rescale(int64_t p, const T* factor, int64_t lanes, int64_t E) {
    constexpr int64_t NR = Cfg<T>::NR;
    T* sums = run_sum.data() + p * NR;
    for (int64_t l = 0; l < lanes; ++l) sums[l] *= factor[l];
    if (layout[p] == AccLayout::kColumns) {
      T* t = acc_t.data() + p * NR;
      for (int64_t e = 0; e < E; ++e)
        for (int64_t l = 0; l < lanes; ++l) t[e * lda + l] *= factor[l];
    } else if (layout[p] == AccLayout::kRows) {
      T* r = acc_r.data() + p * NR * ldr;
      for (int64_t l = 0; l < lanes; ++l)
        for (int64_t e = 0; e < E; ++e) r[l * ldr + e] *= factor[l];
    }
  }
};

template <class T>
struct Call {
  const ReadShape& s;
  View3<const T> qloc, qvar, mloc, mvar, values;
  bool product;  // scores from the product form
  int64_t kc;    // entries per tile
  dense::SharedPanels<T>* values_packed;  // the tiles' values packed for the micro-kernel, shared by the groups
};

// Packs the group's n queries (from q0) into panels; product form: centred and weighted, with their
// norms a. Lanes past n stay zero.
template <class T>
void pack_queries(const Call<T>& c, const Metric<T>& mt, int64_t b, int64_t q0, int64_t n, Work<T>& w) {
  constexpr int64_t NR = Cfg<T>::NR;
  const int64_t d = c.s.d;
  if (!c.product) return dense::pack_lanes(c.qloc, b, q0, n, d, w.panels);
  std::fill(w.panels.begin(), w.panels.end(), T(0));
  std::fill(w.qnorm.begin(), w.qnorm.end(), T(0));
  for (int64_t i = 0; i < n; ++i) {
    double norm = 0;
    for (int64_t k = 0; k < d; ++k) {
      const T x = c.qloc(b, q0 + i, k) - w.center[k];
      w.panels[(i / NR) * d * NR + k * NR + i % NR] = mt.w[k] * x;
      norm += double(mt.w[k]) * double(x) * double(x);
    }
    w.qnorm[i] = T(norm);
  }
}

// Direct scores: weights[j][lanes of panel p] = log k for the tile's entries, vectorised over the
// panel's queries; tile_max[lanes] their maxima. Low: the panel's queries fill at most its first
// L lanes (a call of few queries), whose other half is then −inf without being computed.
template <class T, int D, bool Unit, bool Thr, bool Low>
void direct_scores(const Call<T>& c, const Metric<T>& mt, int64_t b, int64_t t0, int64_t nt, int64_t p, Work<T>& w) {
  using C = Cfg<T>;
  using S = typename C::S;
  using Vec = typename C::Vec;
  constexpr int64_t L = C::L, NR = C::NR;
  const T* qp = w.panels.data() + p * c.s.d * NR;
  Vec max0 = S::splat(neg_inf<T>()), max1 = max0;
  for (int64_t j = 0; j < nt; ++j) {
    Vec s0, s1;
    dense::lane_scores<T, D, Unit, Thr, Low>(mt, qp, c.mloc.row(b, t0 + j), c.mloc.sc, c.s.d, s0, s1);
    T* out = w.weight_row(p, j);
    S::store(out, s0);
    S::store(out + L, s1);
    max0 = s0 > max0 ? s0 : max0;
    max1 = s1 > max1 ? s1 : max1;
  }
  S::store(w.tile_max.data() + p * NR, max0);
  S::store(w.tile_max.data() + p * NR + L, max1);
}

// Packs the tile's entries centred ([chunk][row][kScoreChunk], zero past d) with their norms b.
template <class T>
void pack_entries(const Call<T>& c, const Metric<T>& mt, int64_t b, int64_t t0, int64_t nt, Work<T>& w) {
  const int64_t d = c.s.d, chunks = (d + kScoreChunk - 1) / kScoreChunk;
  for (int64_t j = 0; j < nt; ++j) {
    const T* m = c.mloc.row(b, t0 + j);
    T norm = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      T* dst = w.mem.data() + (ch * w.rows + j) * kScoreChunk;
      const int64_t k0 = ch * kScoreChunk, K = std::min(kScoreChunk, d - k0);
      T part = 0;
      if (c.mloc.sc == 1) {
#pragma omp simd reduction(+ : part)
        for (int64_t k = 0; k < K; ++k) {
          const T x = m[k0 + k] - w.center[k0 + k];
          dst[k] = x;
          part += mt.w[k0 + k] * x * x;
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const T x = m[(k0 + k) * c.mloc.sc] - w.center[k0 + k];
          dst[k] = x;
          part += mt.w[k0 + k] * x * x;
        }
      }
      norm += part;
    }
    w.mnorm[j] = norm;
  }
}

// Recomputes directly the scores of the n queries from q (lanes) against entry t that the product
// form rejected (rare: out of line, so that the vectoriser does not compute it for every lane).
template <class T, class Mask>
__attribute__((noinline)) void recompute(const Call<T>& c, const Metric<T>& mt, int64_t b, int64_t q, int64_t n,
                                         int64_t t, const Mask& ok, T* scores) {
  for (int64_t l = 0; l < n; ++l)
    if (!ok[l]) scores[l] = mt.score(row_ref(c.qloc, b, q + l), row_ref(c.mloc, b, t), c.s.d);
}

// Product-form scores of the tile (see the top of the file), every pair whose product form is not
// exact enough recomputed directly; tile_max[lanes] their maxima.
template <class T>
void product_scores(const Call<T>& c, const Metric<T>& mt, int64_t b, int64_t q0, int64_t n, int64_t t0,
                    int64_t nt, Work<T>& w) {
  using C = Cfg<T>;
  using S = typename C::S;
  using Vec = typename C::Vec;
  constexpr int64_t L = C::L, NR = C::NR;
  constexpr int MR = C::MR;
  // the group's panels, and its lanes up to the last vector holding a query (a panel whose queries
  // fill at most L lanes: the other half's weights are zero, panel_softmax)
  const int64_t d = c.s.d, chunks = (d + kScoreChunk - 1) / kScoreChunk, panels = (n + NR - 1) / NR;
  const int64_t lane_end = round_up(n, L);
  pack_entries(c, mt, b, t0, nt, w);
  std::fill(w.weights.begin(), w.weights.end(), T(0));
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t K = std::min(kScoreChunk, d - ch * kScoreChunk);
    for (int64_t p = 0; p < panels; ++p) {
      const T* panel = w.panels.data() + p * d * NR + ch * kScoreChunk * NR;
      for (int64_t j0 = 0; j0 < nt; j0 += MR) {
        const Strided<T, kScoreChunk> block{w.mem.data() + (ch * w.rows + j0) * kScoreChunk, 1};
        if (low_panel<T>(n, p)) block_dots<T, C::VB, MR, 1>(block, panel, NR, K, w.weight_row(p, j0), NR);
        else block_dots<T, C::VB, MR, 2>(block, panel, NR, K, w.weight_row(p, j0), NR);
      }
    }
  }
  const T eps = std::numeric_limits<T>::epsilon();
  // slack: accept any pair whose worst-case error is below a few ε of log k (an absolute error
  // far below the reference's own rounding of a score of size 1)
  const Vec R = S::splat(T(kCancellation)), slack = S::splat(T(32.0 / double(d + 4)) / (mt.unit ? mt.scale : T(1)));
  const Vec bound = S::splat(T(double(d + 4) * double(eps))), two = S::splat(T(2)), zero{};
  const bool thr = mt.thr2 >= 0;
  const Vec thr2 = S::splat(thr ? mt.thr2 : std::numeric_limits<T>::infinity());
  const Vec half_scale = S::splat(T(-0.5)), scale = S::splat(mt.scale), norm = S::splat(mt.norm);
  const Vec ninf = S::splat(neg_inf<T>());
  T* tmax = w.tile_max.data();
  std::fill(tmax, tmax + w.G_pad, neg_inf<T>());
  for (int64_t j = 0; j < nt; ++j) {
    const T bj = w.mnorm[j];
    for (int64_t l0 = 0; l0 < lane_end; l0 += L) {
      T* lanes = w.weight_row(l0 / NR, j) + l0 % NR;
      const Vec ab = S::load(w.qnorm.data() + l0) + bj;
      Vec dist = ab - two * S::load(lanes);
      dist = dist > zero ? dist : zero;
      auto ok = ab <= R * dist + slack;
      if (thr) {
        const Vec gap = dist - thr2;
        ok &= (gap > zero ? gap : -gap) > bound * ab;  // the threshold's decision is certain
      }
      Vec sc = half_scale * dist * scale + norm;
      sc = dist > thr2 ? ninf : sc;
      S::store(lanes, sc);
      bool rejected = false;
      for (int64_t l = 0; l < L; ++l) rejected |= !ok[l] && l0 + l < n;
      if (rejected) recompute(c, mt, b, q0 + l0, std::min(L, n - l0), t0 + j, ok, lanes);
      const Vec now = S::load(lanes), before = S::load(tmax + l0);
      S::store(tmax + l0, now > before ? now : before);
    }
  }
}

// One panel's share of a tile whose scores are in the weights rows: the online softmax of its
// lanes (what a lane accumulated is rescaled when its shift rises; the weights exp(s − shift) are
// written in place, and summed). A panel whose weights are mostly zero adds them row by row here;
// true where most are nonzero: Σ w · values is then a product (panel_product), its accumulator
// made ready for it.
template <class T>
bool panel_softmax(const Call<T>& c, int64_t b, int64_t t0, int64_t nt, int64_t p, int64_t n, Work<T>& w) {
  using C = Cfg<T>;
  using S = typename C::S;
  using Vec = typename C::Vec;
  constexpr int64_t L = C::L, NR = C::NR;
  const int64_t E = c.s.E, l0 = p * NR, lanes = std::min(NR, n - l0);
  const Vec ninf = S::splat(neg_inf<T>()), zero{}, one = S::splat(T(1));
  T* run_max = w.run_max.data() + l0;
  T* run_sum = w.run_sum.data() + l0;
  const T* tile_max = w.tile_max.data() + l0;
  // 1. each lane's shift: its first finite score's tile maximum, raised only where a tile's maximum
  // passes it by more than kShiftSlack (each raise rescales what the lane summed and accumulated,
  // a pass over its accumulator); the weights exp(s − shift) are then at most e^kShiftSlack
  Vec shift[2];
  std::array<T, NR> factor;
  bool rises = false;
  for (int h = 0; h < 2; ++h) {
    const Vec old = S::load(run_max + h * L), tile = S::load(tile_max + h * L);
    const Vec now = tile > old + T(kShiftSlack) ? tile : old;
    for (int64_t l = 0; l < L; ++l) {
      const bool up = h * L + l < lanes && now[l] > old[l] && old[l] != neg_inf<T>();
      factor[h * L + l] = up ? std::exp(old[l] - now[l]) : T(1);
      rises |= up;
    }
    S::store(run_max + h * L, now);
    shift[h] = now == ninf ? zero : now;  // a lane with nothing yet: every weight is 0
  }
  if (rises) w.rescale(p, factor.data(), lanes, E);  // before this tile's weights are summed in
  // 2. the weights in place, their sums, and how many are nonzero
  T* x = w.weight_row(p, 0);  // row j at x + j · NR
  Vec sum0 = zero, sum1 = zero, count0 = zero, count1 = zero;
  const bool low = low_panel<T>(n, p);  // the second half holds no query: weights 0, not computed
  for (int64_t j = 0; j < nt; ++j) {
    T* row = x + j * NR;
    const Vec p0 = exp_nonpositive_lanes(S::load(row) - shift[0]);  // ≤ kShiftSlack; masked: -inf -> 0
    const Vec p1 = low ? zero : exp_nonpositive_lanes(S::load(row + L) - shift[1]);
    S::store(row, p0);
    S::store(row + L, p1);
    sum0 += p0;
    sum1 += p1;
    count0 += p0 != zero ? one : zero;
    count1 += p1 != zero ? one : zero;
  }
  S::store(run_sum, S::load(run_sum) + sum0);
  S::store(run_sum + L, S::load(run_sum + L) + sum1);
  T total = 0;
  for (int64_t l = 0; l < lanes; ++l) total += l < L ? count0[l] : count1[l - L];
  if (total == T(0)) return false;
  // 3. Σ w · values
  if (int64_t(total) * 4 > NR * nt) {
    w.use_layout(p, AccLayout::kColumns, E);
    return true;
  } else {
    w.use_layout(p, AccLayout::kRows, E);
    const int64_t sc = c.values.sc;
    const uint64_t valid = lanes == 64 ? ~uint64_t(0) : (uint64_t(1) << lanes) - 1;
    for (int64_t j = 0; j < nt; ++j) {
      const T* row = x + j * NR;
      uint64_t nonzero =
          (dense::nonzero_lanes<T>(S::load(row)) | dense::nonzero_lanes<T>(S::load(row + L)) << L) & valid;
      if (!nonzero) continue;  // underflowed or masked weights add exactly nothing
      const T* z = c.values.row(b, t0 + j);
      for (; nonzero; nonzero &= nonzero - 1) {
        const int64_t l = std::countr_zero(nonzero);
        const T wt = row[l];
        T* a = w.acc_r.data() + (l0 + l) * w.ldr;
        if (sc == 1) {
          for (int64_t e = 0; e < E; ++e) a[e] = std::fma(wt, z[e], a[e]);
        } else {
          for (int64_t e = 0; e < E; ++e) a[e] = std::fma(wt, z[e * sc], a[e]);
        }
      }
    }
  }
  return false;
}

// acc_t[e][panel p's lanes] += Σ_j values[j][e] · w[j][lane]: the micro-kernel over the tile's
// packed values vp and the panel's weights, on NV vectors of lanes (1: the panel's queries fill at
// most its first L lanes; the other half of its accumulator is then never read).
template <class T, int NV>
void panel_product(const Call<T>& c, int64_t nt, int64_t p, const T* vp, Work<T>& w) {
  using C = Cfg<T>;
  constexpr int64_t NR = C::NR;
  constexpr int MR = C::MR;
  const T* x = w.weight_row(p, 0);
  for (int64_t e0 = 0; e0 < c.s.E; e0 += MR) {
    const int64_t width = value_block_width<T>(c.s.E, e0);
    const T* a = vp + e0 * c.kc;
    T* acc = w.acc_t.data() + e0 * w.lda + p * NR;
    if (width == MR) block_dots<T, C::VB, MR, NV>(Packed<T, MR>{a}, x, NR, nt, acc, w.lda);
    else if (width == 8) block_dots<T, C::VB, 8, NV>(Packed<T, 8>{a}, x, NR, nt, acc, w.lda);
    else block_dots<T, C::VB, 4, NV>(Packed<T, 4>{a}, x, NR, nt, acc, w.lda);
  }
}

#if defined(__AVX512F__)
// out[l · ldo + e] = in[e · ldi + l] · scale[l] for a 16 × 16 block of floats: a transpose in
// registers (the output's rows written whole, where a loop over lanes writes one number per row).
inline void transpose16_scaled(const float* in, int64_t ldi, float* out, int64_t ldo, const float* scale) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * ldi);
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 128-bit lane j of r[i + c]: column 4j + c of rows i .. i + 3
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]), c = _mm512_castps_pd(t[i + 2]),
                  d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int h = 0; h < 16; h += 8)  // then the 128-bit lanes gathered across registers
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + i * ldo, _mm512_mul_ps(r[i], _mm512_set1_ps(scale[i])));
}
#endif

// Runs one group's read: n queries from q0 of batch row b.
template <class T, int D>
void group_read(const Call<T>& c, const Metric<T>& mt, int64_t b, int64_t q0, int64_t n, Work<T>& w, T* out,
                T* lse) {
  constexpr int64_t L = Cfg<T>::L, NR = Cfg<T>::NR;
  const ReadShape& s = c.s;
  const int64_t M = s.M, E = s.E, used = (n + NR - 1) / NR;
  if (c.product && w.center_row != b) {
    w.center = centre(c.mloc, b, M, s.d);
    w.center_row = b;
  }
  pack_queries(c, mt, b, q0, n, w);
  std::fill(w.run_max.begin(), w.run_max.end(), neg_inf<T>());
  std::fill(w.run_sum.begin(), w.run_sum.end(), T(0));
  std::fill(w.layout.begin(), w.layout.end(), AccLayout::kZero);
  for (int64_t t0 = 0; t0 < M; t0 += c.kc) {
    const int64_t nt = std::min(c.kc, M - t0);
    const T* vp = nullptr;
    if (c.product) product_scores(c, mt, b, q0, n, t0, nt, w);
    for (int64_t p = 0; p < used; ++p) {
      if (!c.product)
        mt.dispatch_kind([&]<bool Unit, bool Thr>() {
          if (low_panel<T>(n, p)) direct_scores<T, D, Unit, Thr, true>(c, mt, b, t0, nt, p, w);
          else direct_scores<T, D, Unit, Thr, false>(c, mt, b, t0, nt, p, w);
        });
      if (!panel_softmax(c, b, t0, nt, p, n, w)) continue;
      // the product right after the panel's softmax, its weights still in L1
      if (!vp) vp = c.values_packed->get(b, t0 / c.kc, w.vpack.data(), [&](T* dst) {
        pack_value_blocks(c.values, b, t0, nt, E, c.kc, dst);
      });
      if (low_panel<T>(n, p)) panel_product<T, 1>(c, nt, p, vp, w);
      else panel_product<T, 2>(c, nt, p, vp, w);
    }
  }
  for (int64_t p = 0; p < used; ++p) {
    const int64_t l0 = p * NR, lanes = std::min(NR, n - l0);
    std::array<T, NR> inv{};
    for (int64_t l = 0; l < lanes; ++l) {
      const T sum = w.run_sum[l0 + l];
      const int64_t bq = b * s.Q + q0 + l0 + l;
      inv[l] = sum > T(0) ? T(1) / sum : T(0);
      lse[bq] = sum > T(0) ? w.run_max[l0 + l] + std::log(sum) : neg_inf<T>();
    }
    T* o = out + (b * s.Q + q0 + l0) * E;  // the panel's rows of the output
    if (w.layout[p] == AccLayout::kColumns) {
      // by blocks of L value columns, so that each output row is written a whole vector at a time
      // (a row per lane: for the usual E a large power of two apart, one L1 set for all of them)
      for (int64_t e0 = 0; e0 < E; e0 += L) {
        const int64_t ne = std::min(L, E - e0);
        const T* a = w.acc_t.data() + e0 * w.lda + l0;
        int64_t l = 0;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<T, float> && L == 16)
          for (; ne == L && l + L <= lanes; l += L) transpose16_scaled(a + l, w.lda, o + l * E + e0, E, inv.data() + l);
#endif
        for (; l < lanes; ++l)
          for (int64_t e = 0; e < ne; ++e) o[l * E + e0 + e] = a[e * w.lda + l] * inv[l];
      }
    } else if (w.layout[p] == AccLayout::kRows) {
      for (int64_t l = 0; l < lanes; ++l) {
        const T* a = w.acc_r.data() + (l0 + l) * w.ldr;
        for (int64_t e = 0; e < E; ++e) o[l * E + e] = a[e] * inv[l];
      }
    }
    for (int64_t l = 0; l < lanes; ++l)  // nothing read (or only zero weights): exact zeros
      if (w.layout[p] == AccLayout::kZero || !(w.run_sum[l0 + l] > T(0))) std::fill(o + l * E, o + (l + 1) * E, T(0));
  }
}

// A batch row's queries in groups (tasks): whole panels of NR lanes, at most most_panels(), the
// panels spread evenly (group sizes differ by one panel at most: 3000 queries are 10 groups of 8
// panels and 2 of 7, where groups of 250 queries each would compute 256 lanes); where that gives
// fewer than kGroupsWanted groups in the call, dense::lane_groups' smaller ones (down to one
// vector of lanes). Group i holds the queries [start(i), start(i + 1)) (clipped to Q).
struct QueryGroups {
  int64_t count;        // groups per batch row
  int64_t unit;         // lanes per unit: a panel, or one group of lane_groups
  int64_t base, extra;  // units per group: base, and one more for the first `extra` groups
  int64_t start(int64_t i) const { return (i * base + std::min(i, extra)) * unit; }
  int64_t most() const { return (base + (extra > 0)) * unit; }
};

template <class T>
QueryGroups query_groups(int64_t B, int64_t Q, int64_t max_panels) {
  constexpr int64_t NR = Cfg<T>::NR;
  const int64_t panels = (Q + NR - 1) / NR, count = (panels + max_panels - 1) / max_panels;
  if (B * count >= dense::kGroupsWanted) return {count, NR, panels / count, panels % count};
  const auto [size, small] = dense::lane_groups<T>(B, Q, max_panels);
  return {small, size, 1, 0};
}

// Panels per group at most: kPanelsPerGroup, halved while the group's transposed accumulator
// (value rows × lanes) would reach tile_bytes(), so that it and the tile's values (which every
// panel streams) stay in L2: at E = 1024 floats, groups of 4 panels were 5% faster than of 8
// (runs/ab.py; E = 512 and below: no difference).
template <class T>
int64_t most_panels(int64_t E) {
  int64_t panels = dense::kPanelsPerGroup;
  while (panels > 1 && value_rows<T>(E) * panels * Cfg<T>::NR * int64_t(sizeof(T)) >= tile_bytes()) panels /= 2;
  return panels;
}

template <class T, int D>
void forward_impl(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                  View3<const T> mvar, View3<const T> values, T* out, T* lse) {
  using C = Cfg<T>;
  const int64_t B = s.B, Q = s.Q, M = s.M, E = s.E, d = s.d;
  if (M == 0) {  // nothing to read: zeros (and no variance row to look at)
    std::fill(out, out + B * Q * E, T(0));
    std::fill(lse, lse + B * Q, neg_inf<T>());
    return;
  }
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  // Group and tile sizes depend on the shapes only, never on the thread count, and each query's
  // numbers only on its own lane: the read is the same for any number of threads and for a query
  // alone or in a batch.
  const QueryGroups groups = query_groups<T>(B, Q, most_panels<T>(E));
  const int64_t G = groups.most();
  const bool product = dense_read_product_scores(s);
  const int64_t E_pad = round_up(E, C::NR);
  const int64_t per_entry = int64_t(sizeof(T)) * (E_pad + kLanesForTile + (product ? round_up(d, C::L) : 0));
  const int64_t kc = std::clamp<int64_t>(tile_bytes() / per_entry / C::MR * C::MR, C::MR, kTileEntries);
  dense::SharedPanels<T> values_packed(groups.count > 1 ? (values.sb == 0 ? 1 : B) : 0, M, kc,
                                       value_panel_size<T>(E, kc));
  const Call<T> c{s, qloc, qvar, mloc, mvar, values, product, kc, &values_packed};
  const int64_t tasks = B * groups.count;
#pragma omp parallel num_threads(int(std::max<int64_t>(1, std::min<int64_t>(threads, tasks))))
  {
    Work<T>& w = dense::thread_work<Work<T>>();
    w.reset(G, kc, d, E, product);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / groups.count, q0 = groups.start(task % groups.count);
      const int64_t n = std::min(groups.start(task % groups.count + 1), Q) - q0;
      group_read<T, D>(c, Metric<T>(s, qvar, mvar, b), b, q0, n, w, out, lse);
    }
    dense::release_if_large(w);
  }
}

}  // namespace

// Queries a dense call needs at least: 4, or one vector's lanes where that is fewer. A panel whose
// queries fill at most L lanes computes its scores, weights and products on one vector (the other
// half is neither computed nor summed), so a few queries waste at most that vector's other lanes.
// Measured against the per-pair kernel on the same calls (benchmarks/bench_small_reads.py, M =
// 10 000, one thread; BENCHMARKS.md "Reads of a few queries, CPU", a 2-core AMD EPYC with
// AVX-512): from 4 queries the dense kernel was the faster in most cases, an agent's read (d = 8,
// 84 value columns, a tight threshold) 1.9x with 4 queries and 3.2x with 8; it lost (0.72-0.95x)
// where most weights are nonzero and the per-pair kernel's accumulation is cheap (d = 2 with 8
// value columns) or the values wide (256); with 2 or 3 queries it was down to 0.57x (d = 32).
template <class T>
constexpr int64_t dense_read_min_queries() {
  return std::min<int64_t>(Cfg<T>::L, 4);
}

template <class T>
bool dense_read_applies(const ReadShape& s, View3<const T> qvar, View3<const T> mvar) {
  // per-pair variances (σ per entry or per query) keep the per-pair kernel, and so do calls with
  // too few queries (dense_read_min_queries)
  const bool shared = s.uniform_var || ((qvar.sr == 0 || s.Q <= 1) && (mvar.sr == 0 || s.M <= 1));
  return shared && s.E >= 1 && s.Q >= dense_read_min_queries<T>();
}

bool dense_read_product_scores(const ReadShape& s) {
  // the threshold is on the plain distance: with per-dimension variances the product form gives
  // the weighted one only
  return s.d >= kGemmScoresFromDim && (s.uniform_var || s.threshold < 0);
}

template <class T>
void dense_read_forward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                            View3<const T> mvar, View3<const T> values, T* out, T* lse) {
  dispatch_dim(s.d, [&]<int D>() { forward_impl<T, D>(s, qloc, qvar, mloc, mvar, values, out, lse); });
}

#define RK_INSTANTIATE(T)                                                                                    \
  template bool dense_read_applies<T>(const ReadShape&, View3<const T>, View3<const T>);                    \
  template void dense_read_forward_cpu<T>(const ReadShape&, View3<const T>, View3<const T>, View3<const T>, \
                                          View3<const T>, View3<const T>, T*, T*);
RK_INSTANTIATE(float)
RK_INSTANTIATE(double)
#undef RK_INSTANTIATE

}  // namespace rk
