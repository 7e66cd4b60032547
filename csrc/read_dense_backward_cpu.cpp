// The read's backward as matrix products on the CPU, for the calls read_dense_cpu.cpp's forward
// takes (every pair of a batch row shares its variance). With w the weights recomputed from the
// saved log-sum-exps, g the output's gradient and δ_q = g_q · out_q:
//   dp[q][m] = g_q · z_m                    (a product over E: g rows × the group's values)
//   ds = w (dp − δ_q)                         (the softmax's backward)
//   dL/dz_m = Σ_q w[q][m] g_q                 (a product over the queries)
//   location and variance gradients from Σ ds (q − m) and Σ ds (q − m)² per dimension.
// Layout: the SIMD lanes run over entries. A task is a group of entries of one batch row (its
// locations packed into panels, its values transposed once, [e][lanes]); it streams the queries
// in tiles of kQueryTile, each tile's output gradients packed in column blocks (pack_grad_blocks)
// that both products read: B of dL/dz's, A of dp's. (In A/B runs at the shapes, packing
// each tile once per call for all the groups (dense::SharedPanels) was no faster than each group
// packing its own, which then stays in its L2, nor was a second copy as micro-panels for dp.)
// The entries' gradients are the task's own; the queries' are summed per thread, the tasks dealt
// round-robin (a static schedule), then over threads in order: the same bits run to run for a given number of
// threads (design.md §7), the entries' gradients for any. Tiles whose weights are mostly zero (a
// tight threshold) take one pair at a time instead.
#include "read_dense_cpu.h"

#include "fast_exp.h"
#include "gemm.h"
#include "read_dense_common.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rk {
namespace {

using dense::Cfg;
using dense::Metric;
using dense::dot;

constexpr int64_t kQueryTile = 120;  // a multiple of every MR (6, 12): no partial register block inside a tile
static_assert(kQueryTile % Cfg<float>::MR == 0 && kQueryTile % Cfg<double>::MR == 0);
constexpr int64_t kDimChunk = 4;  // location sums: dimensions whose entry sums stay in registers at once
constexpr int64_t kGroupValueBytes = int64_t(512) << 10;  // a group's transposed values stay in L2
constexpr int64_t kDotChunk = 256;  // dp product: value columns per chunk ([256][NR] of the values in L1)

template <class T>
struct Call {
  const ReadShape& s;
  View3<const T> qloc, qvar, mloc, mvar, values;
  const T *grad_out, *out, *lse, *delta;
};

// Per-thread working memory of one task (a group of entries) and its query tiles.
template <class T>
struct Work {
  int64_t G_pad = 0, ldw = 0, lda = 0, E_pad = 0, d = 0;
  std::vector<T> panels;      // the group's locations, [panel][dim][NR]
  std::vector<T> zt;          // the group's values transposed, a panel of lanes at a time: [panel][e][NR] (zero
                              // past the group); each panel contiguous, as the micro-kernel streams it (rows
                              // of all the group's lanes were 5-10% slower: a TLB entry every few rows)
  std::vector<T> w, ds;       // the tile's weights and score gradients, [query][ldw] (+ MR: blocks read past)
  std::vector<T> apack;       // the tile's weights as micro-panels [block of MR entries][query][MR]
  std::vector<T> gpack;       // the tile's output gradients in column blocks (pack_grad_blocks)
  std::vector<T> gv;          // Σ_q w g_q per entry, [roundup(G_pad, MR)][lda]
  std::vector<T> s1, s2, s0;  // per entry: Σ ds (q − m)_k and Σ ds (q − m)_k² ([dim][G_pad]), Σ ds
  std::vector<T> qterms;      // per query of the tile, Σ over the group's lanes of ds (q − m)_k and ds (q − m)_k²
                              // per lane, [query][2 · dim][L], and of ds, [query][L] after them
  std::vector<T> lane_valid;  // 1 for the group's entries, 0 for padding lanes

  std::array<std::vector<T>*, 12> buffers() {
    return {&panels, &zt, &w, &ds, &apack, &gpack, &gv, &s1, &s2, &s0, &qterms, &lane_valid};
  }

  // Sizes every buffer for a call (dense::thread_work keeps them between calls).
  void reset(int64_t G, int64_t d_, int64_t E) {
    using C = Cfg<T>;
    d = d_;
    G_pad = round_up(G, C::NR);
    E_pad = round_up(E, C::NR);
    ldw = G_pad + C::L;  // not a large power of two apart (cache sets), as in the forward
    lda = E_pad + C::L;
    const int64_t tile_rows = round_up(kQueryTile, C::MR);
    panels.assign(G_pad * d, T(0));
    zt.assign(E * G_pad, T(0));
    constexpr int64_t reach = pack_reach<T, C::VB, C::MR>();
    w.assign(tile_rows * ldw + std::max<int64_t>(C::MR, reach), T(0));
    apack.assign(round_up(G_pad, C::MR) / C::MR * packed_stride<T, C::VB, C::MR>(kQueryTile) + reach, T(0));
    ds.assign(tile_rows * ldw + C::MR, T(0));
    gpack.assign(kQueryTile * E_pad, T(0));
    gv.assign(round_up(G_pad, C::MR) * lda, T(0));
    s1.assign(d * G_pad, T(0));
    s2.assign(d * G_pad, T(0));
    s0.assign(G_pad, T(0));
    qterms.assign(kQueryTile * (2 * d + 1) * C::L, T(0));
    lane_valid.assign(G_pad, T(0));
  }
};

// w[i][lanes] for the tile's nq queries from q0 (0 for a query that matched nothing and for
// padding lanes); returns how many are nonzero.
template <class T, int D, bool Unit, bool Thr>
int64_t tile_weights(const Call<T>& c, const Metric<T>& mt, int64_t b, int64_t q0, int64_t nq, Work<T>& w) {
  using S = typename Cfg<T>::S;
  using Vec = typename Cfg<T>::Vec;
  constexpr int64_t L = Cfg<T>::L, NR = Cfg<T>::NR;
  const int64_t panels = w.G_pad / NR, d = c.s.d;
  const Vec zero{}, one = S::splat(T(1));
  Vec count{};
  for (int64_t i = 0; i < nq; ++i) {
    T* row = w.w.data() + i * w.ldw;
    const T lse = c.lse[b * c.s.Q + q0 + i];
    if (lse == neg_inf<T>()) {
      std::fill(row, row + w.G_pad, T(0));
      continue;
    }
    for (int64_t p = 0; p < panels; ++p) {
      Vec s0, s1;
      dense::lane_scores<T, D, Unit, Thr>(mt, w.panels.data() + p * d * NR, c.qloc.row(b, q0 + i), c.qloc.sc, d, s0, s1);
      // s ≤ lse up to rounding; a padding lane (a point at the origin) may score far above it, so
      // it is cleared by a select (its exp may be inf; inf · 0 would be NaN)
      Vec x0 = s0 - lse, x1 = s1 - lse;
      x0 = x0 < zero ? x0 : zero;
      x1 = x1 < zero ? x1 : zero;
      const Vec valid0 = S::load(w.lane_valid.data() + p * NR), valid1 = S::load(w.lane_valid.data() + p * NR + L);
      const Vec w0 = valid0 != zero ? exp_nonpositive_lanes(x0) : zero;
      const Vec w1 = valid1 != zero ? exp_nonpositive_lanes(x1) : zero;
      S::store(row + p * NR, w0);
      S::store(row + p * NR + L, w1);
      count += (w0 != zero ? one : zero) + (w1 != zero ? one : zero);
    }
  }
  T total = 0;
  for (int64_t l = 0; l < L; ++l) total += count[l];
  return int64_t(total);
}

// The output gradients of a tile's nq queries from q0 in column blocks [e / NR][query][NR] (the
// layout of dense::pack_column_blocks), with zero rows up to round_up(nq, MR): the B operand of
// the value gradients' product and, through ColumnBlocks, the A operand of dp's (read in place,
// dp's rows were E apart, often a large power of two: lines that evict each other from L1).
template <class T>
void pack_grad_blocks(const Call<T>& c, int64_t b, int64_t q0, int64_t nq, T* dst) {
  constexpr int64_t NR = Cfg<T>::NR;
  const int64_t E = c.s.E, rows = round_up(nq, Cfg<T>::MR), E_pad = round_up(E, NR);
  const int64_t full = E / NR * NR;
  for (int64_t j = 0; j < nq; ++j) {  // each row read once, in order (the prefetcher follows)
    const T* g = c.grad_out + (b * c.s.Q + q0 + j) * E;
    T* row = dst + j * NR;
    for (int64_t e0 = 0; e0 < full; e0 += NR)
      for (int64_t e = 0; e < NR; ++e) row[e0 * rows + e] = g[e0 + e];
    for (int64_t e = full; e < E_pad; ++e) row[full * rows + e - full] = e < E ? g[e] : T(0);
  }
  for (int64_t e0 = 0; e0 < E_pad; e0 += NR) std::fill(dst + e0 * rows + nq * NR, dst + (e0 + NR) * rows, T(0));
}

// A's element (r, k) from column blocks of NR (pack_grad_blocks): rows NR apart within a block,
// blocks `block` apart, so the MR loads of one k are constant displacements from one pointer.
template <class T>
struct ColumnBlocks {
  const T* p;
  int64_t block;
  inline T operator()(int r, int64_t k) const {
    constexpr int64_t NR = Cfg<T>::NR;
    return p[(k / NR) * block + r * NR + k % NR];
  }
};

// One register block of dp over K value columns (gemm.h's block_dots with ColumnBlocks for A,
// B = the group's transposed values): MR queries × NR lanes, started from zero on the first chunk
// (else from c) and, on the last (weights given), stored as the score gradients
// ds = w (dp − δ_q) instead: no separate pass over the tile to clear dp or to form ds.
template <class T>
inline void score_block(const ColumnBlocks<T>& a, const T* b, int64_t K, bool first, const T* weights,
                        const T* delta, T* c, int64_t ldc) {
  using S = typename Cfg<T>::S;
  using Vec = typename Cfg<T>::Vec;
  constexpr int64_t L = Cfg<T>::L, NR = Cfg<T>::NR;
  constexpr int MR = Cfg<T>::MR;
  Vec sum[MR][2];
  for (int r = 0; r < MR; ++r) {
    sum[r][0] = first ? Vec{} : S::load(c + r * ldc);
    sum[r][1] = first ? Vec{} : S::load(c + r * ldc + L);
  }
  for (int64_t k = 0; k < K; ++k) {
    const Vec y0 = S::load(b + k * NR), y1 = S::load(b + k * NR + L);
    for (int r = 0; r < MR; ++r) {
      const T z = a(r, k);
      sum[r][0] += z * y0;
      sum[r][1] += z * y1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    if (weights) {  // w = 0 -> ds = 0
      const Vec d = S::splat(delta[r]);
      sum[r][0] = S::load(weights + r * ldc) * (sum[r][0] - d);
      sum[r][1] = S::load(weights + r * ldc + L) * (sum[r][1] - d);
    }
    S::store(c + r * ldc, sum[r][0]);
    S::store(c + r * ldc + L, sum[r][1]);
  }
}

// ds[i][lanes] = w (dp − δ_q) with dp[i][l] = g_q · z_{t0+l}, q = q0 + i: a product when the tile
// is dense (gblocks: its output gradients from pack_grad_blocks), else (null) one dot per nonzero
// weight.
template <class T>
void score_gradients(const Call<T>& c, int64_t b, int64_t t0, int64_t q0, int64_t nq, const T* gblocks, Work<T>& w) {
  constexpr int64_t NR = Cfg<T>::NR;
  constexpr int MR = Cfg<T>::MR;
  const int64_t E = c.s.E, Q = c.s.Q, panels = w.G_pad / NR;
  T* dp = w.ds.data();
  const bool dense_tile = gblocks != nullptr;
  const int64_t rows = round_up(nq, MR);
  if (dense_tile) {
    for (int64_t e0 = 0; e0 < E; e0 += kDotChunk) {
      const int64_t K = std::min(kDotChunk, E - e0);
      const bool last = e0 + K >= E;
      for (int64_t p = 0; p < panels; ++p)
        for (int64_t i0 = 0; i0 < nq; i0 += MR) {
          T delta[MR];  // δ of the block's queries (0 past the tile: those rows are never read)
          for (int r = 0; r < MR; ++r) delta[r] = i0 + r < nq ? c.delta[b * Q + q0 + i0 + r] : T(0);
          score_block(ColumnBlocks<T>{gblocks + e0 * rows + i0 * NR, rows * NR}, w.zt.data() + (p * E + e0) * NR, K,
                      e0 == 0, last ? w.w.data() + i0 * w.ldw + p * NR : nullptr, delta, dp + i0 * w.ldw + p * NR,
                      w.ldw);
        }
    }
    return;
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t bq = b * Q + q0 + i;
    const T* wr = w.w.data() + i * w.ldw;
    T* row = dp + i * w.ldw;
    const T delta = c.delta[bq];
    for (int64_t l = 0; l < w.G_pad; ++l)
      row[l] = wr[l] == T(0) ? T(0) : wr[l] * (dot(c.grad_out + bq * E, c.values.row(b, t0 + l), c.values.sc, E) - delta);
  }
}

// Σ_q w g_q into the group's value gradients: a product when the tile is dense (gblocks: the
// tile's output gradients from pack_grad_blocks; its weights in micro-panels), else (null) one row
// update per nonzero weight.
template <class T>
void value_gradients(const Call<T>& c, int64_t b, int64_t n, int64_t q0, int64_t nq, const T* gblocks, Work<T>& w) {
  constexpr int64_t NR = Cfg<T>::NR;
  constexpr int MR = Cfg<T>::MR;
  const int64_t E = c.s.E, Q = c.s.Q;
  if (gblocks) {
    const int64_t rows = round_up(nq, MR);
    if (w.E_pad >= dense::kPackWeightsFromBlocks * NR) {
      pack_micro_panels<T, Cfg<T>::VB, MR>(w.w.data(), w.ldw, n, nq, w.apack.data());
      for (int64_t e0 = 0; e0 < w.E_pad; e0 += NR)
        for (int64_t m0 = 0; m0 < n; m0 += MR)
          block_dots<T, Cfg<T>::VB, MR>(Packed<T, MR>{w.apack.data() + m0 / MR * packed_stride<T, Cfg<T>::VB, MR>(nq)},
                                        gblocks + e0 * rows, NR, nq, w.gv.data() + m0 * w.lda + e0, w.lda);
    } else {
      for (int64_t e0 = 0; e0 < w.E_pad; e0 += NR)
        for (int64_t m0 = 0; m0 < n; m0 += MR)
          block_dots<T, Cfg<T>::VB, MR>(Strided<T, 1>{w.w.data() + m0, w.ldw}, gblocks + e0 * rows, NR, nq,
                                        w.gv.data() + m0 * w.lda + e0, w.lda);
    }
    return;
  }
  for (int64_t i = 0; i < nq; ++i) {
    const T* g = c.grad_out + (b * Q + q0 + i) * E;
    const T* wr = w.w.data() + i * w.ldw;
    for (int64_t l = 0; l < n; ++l) {
      if (wr[l] == T(0)) continue;  // an underflowed or masked weight adds exactly nothing
      T* a = w.gv.data() + l * w.lda;
      for (int64_t e = 0; e < E; ++e) a[e] += wr[l] * g[e];
    }
  }
}

// Σ ds (q − m)_k and Σ ds (q − m)_k² per entry lane (s1, s2) and per query (into qsum, the
// thread's [bq][Σ_k terms d | Σ_k squares d | Σ ds]), and Σ ds per entry (s0). Panel by panel,
// kDimChunk dimensions at a time: the panel's sums stay in registers while the tile's queries
// stream past; each query's share is kept per lane ([query][·][L]) and summed over the lanes at
// the end, in lane order. In a sparse tile (mostly zero weights) the queries whose ds are all zero
// for a panel are skipped (the test costs more than it saves in a dense one).
template <class T, int D>
void location_sums(const Call<T>& c, int64_t b, int64_t q0, int64_t nq, bool sparse_tile, Work<T>& w, T* qsum) {
  using S = typename Cfg<T>::S;
  using Vec = typename Cfg<T>::Vec;
  constexpr int64_t L = Cfg<T>::L, NR = Cfg<T>::NR;
  constexpr int KC = D > 0 && D < kDimChunk ? D : kDimChunk;
  const int64_t d = D > 0 ? D : c.s.d, panels = w.G_pad / NR, width = (2 * d + 1) * L;
  T* qt = w.qterms.data();
  std::fill(qt, qt + nq * width, T(0));
  const Vec zero{};
  for (int64_t p = 0; p < panels; ++p) {
    const T* panel = w.panels.data() + p * d * NR;
    for (int64_t k0 = 0; k0 < d; k0 += KC) {
      const int nk = int(std::min<int64_t>(KC, d - k0));
      Vec m0[KC], m1[KC], a10[KC], a11[KC], a20[KC], a21[KC];
      for (int kk = 0; kk < KC; ++kk) {
        if (kk >= nk) break;
        const int64_t k = k0 + kk;
        m0[kk] = S::load(panel + k * NR);
        m1[kk] = S::load(panel + k * NR + L);
        a10[kk] = S::load(w.s1.data() + k * w.G_pad + p * NR);
        a11[kk] = S::load(w.s1.data() + k * w.G_pad + p * NR + L);
        a20[kk] = S::load(w.s2.data() + k * w.G_pad + p * NR);
        a21[kk] = S::load(w.s2.data() + k * w.G_pad + p * NR + L);
      }
      Vec a00 = S::load(w.s0.data() + p * NR), a01 = S::load(w.s0.data() + p * NR + L);
      for (int64_t i = 0; i < nq; ++i) {
        const T* dsr = w.ds.data() + i * w.ldw + p * NR;
        const Vec ds0 = S::load(dsr), ds1 = S::load(dsr + L);
        if (sparse_tile) {  // skip the pairs thresholded out (or underflowed): they add nothing
          const auto nonzero = (ds0 != zero) | (ds1 != zero);
          bool any = false;
          for (int64_t l = 0; l < L; ++l) any |= nonzero[l] != 0;
          if (!any) continue;
        }
        const T* q = c.qloc.row(b, q0 + i);
        T* qi = qt + i * width;
        if (k0 == 0) {
          a00 += ds0;
          a01 += ds1;
          S::store(qi + 2 * d * L, S::load(qi + 2 * d * L) + (ds0 + ds1));
        }
        for (int kk = 0; kk < KC; ++kk) {
          if (kk >= nk) break;
          const int64_t k = k0 + kk;
          const T qk = q[k * c.qloc.sc];
          const Vec x0 = qk - m0[kk], x1 = qk - m1[kk];
          const Vec t0 = ds0 * x0, t1 = ds1 * x1, u0 = t0 * x0, u1 = t1 * x1;
          a10[kk] += t0;
          a11[kk] += t1;
          a20[kk] += u0;
          a21[kk] += u1;
          S::store(qi + k * L, S::load(qi + k * L) + (t0 + t1));
          S::store(qi + (d + k) * L, S::load(qi + (d + k) * L) + (u0 + u1));
        }
      }
      for (int kk = 0; kk < KC; ++kk) {
        if (kk >= nk) break;
        const int64_t k = k0 + kk;
        S::store(w.s1.data() + k * w.G_pad + p * NR, a10[kk]);
        S::store(w.s1.data() + k * w.G_pad + p * NR + L, a11[kk]);
        S::store(w.s2.data() + k * w.G_pad + p * NR, a20[kk]);
        S::store(w.s2.data() + k * w.G_pad + p * NR + L, a21[kk]);
      }
      S::store(w.s0.data() + p * NR, a00);
      S::store(w.s0.data() + p * NR + L, a01);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    T* dst = qsum + (b * c.s.Q + q0 + i) * (2 * d + 1);
    const T* qi = qt + i * width;
    for (int64_t k = 0; k < 2 * d + 1; ++k) {
      T total = 0;
      for (int64_t l = 0; l < L; ++l) total += qi[k * L + l];
      dst[k] += total;
    }
  }
}

// One task: the gradients of the group's n entries from t0 of batch row b, and its share of the
// queries' (into qsum).
template <class T, int D>
void group_backward(const Call<T>& c, int64_t b, int64_t t0, int64_t n, Work<T>& w, T* qsum, T* g_mloc,
                    T* g_mvar, T* g_values) {
  constexpr int64_t NR = Cfg<T>::NR;
  const ReadShape& s = c.s;
  const int64_t d = s.d, E = s.E, M = s.M;
  const Metric<T> mt(s, c.qvar, c.mvar, b);
  dense::pack_lanes(c.mloc, b, t0, n, d, w.panels);
  for (int64_t l = 0; l < w.G_pad; ++l) w.lane_valid[l] = l < n ? T(1) : T(0);
  for (int64_t l = 0; l < w.G_pad; ++l) {  // each value row read once, in order
    T* dst = w.zt.data() + (l / NR) * E * NR + l % NR;
    if (l >= n) {
      for (int64_t e = 0; e < E; ++e) dst[e * NR] = T(0);
      continue;
    }
    const T* z = c.values.row(b, t0 + l);
    for (int64_t e = 0; e < E; ++e) dst[e * NR] = z[e * c.values.sc];
  }
  std::fill(w.gv.begin(), w.gv.end(), T(0));
  for (auto* v : {&w.s0, &w.s1, &w.s2}) std::fill(v->begin(), v->end(), T(0));
  for (int64_t q0 = 0; q0 < s.Q; q0 += kQueryTile) {
    const int64_t nq = std::min(kQueryTile, s.Q - q0);
    int64_t nonzero = 0;
    mt.dispatch_kind([&]<bool Unit, bool Thr>() { nonzero = tile_weights<T, D, Unit, Thr>(c, mt, b, q0, nq, w); });
    if (nonzero == 0) continue;
    const bool dense_tile = nonzero * 4 > nq * n;
    const T* gblocks = nullptr;  // the sparse path reads the output gradients in place
    if (dense_tile) {
      pack_grad_blocks(c, b, q0, nq, w.gpack.data());
      gblocks = w.gpack.data();
    }
    score_gradients(c, b, t0, q0, nq, gblocks, w);
    value_gradients(c, b, n, q0, nq, gblocks, w);
    location_sums<T, D>(c, b, q0, nq, !dense_tile, w, qsum);
  }
  for (int64_t l = 0; l < n; ++l) {
    const int64_t bm = b * M + t0 + l;
    for (int64_t k = 0; k < d; ++k) {
      const T inv = mt.inv(k);
      g_mloc[bm * d + k] = inv * w.s1[k * w.G_pad + l];
      g_mvar[bm * d + k] = T(0.5) * (inv * inv * w.s2[k * w.G_pad + l] - inv * w.s0[l]);
    }
    std::copy(w.gv.begin() + l * w.lda, w.gv.begin() + l * w.lda + E, g_values + bm * E);
  }
  (void)NR;
}

template <class T, int D>
void backward_impl(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                   View3<const T> mvar, View3<const T> values, const T* grad_out, const T* out, const T* lse,
                   T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values) {
  using C = Cfg<T>;
  const int64_t B = s.B, Q = s.Q, M = s.M, E = s.E, d = s.d, BQ = B * Q;
  std::vector<T> delta(BQ);  // δ_q = g_q · out_q, the softmax backward's per-row term
#pragma omp parallel for schedule(static)
  for (int64_t bq = 0; bq < BQ; ++bq) delta[bq] = dot(grad_out + bq * E, out + bq * E, 1, E);
  const int64_t max_panels = std::clamp<int64_t>(kGroupValueBytes / (round_up(E, C::NR) * int64_t(sizeof(T)) * C::NR),
                                                 1, dense::kPanelsPerGroup);
  const auto [G, groups] = dense::lane_groups<T>(B, M, max_panels);
  const int64_t tasks = B * groups;
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  const int64_t width = 2 * d + 1;
  std::vector<T> qsums(size_t(threads) * BQ * width, T(0));  // per thread: [bq][Σ terms | Σ squares | Σ ds]
  const Call<T> c{s, qloc, qvar, mloc, mvar, values, grad_out, out, lse, delta.data()};
#pragma omp parallel num_threads(threads)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    Work<T>& w = dense::thread_work<Work<T>>();
    w.reset(G, d, E);
#pragma omp for schedule(static, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / groups, t0 = (task % groups) * G;
      group_backward<T, D>(c, b, t0, std::min(G, M - t0), w, qsums.data() + size_t(tid) * BQ * width, g_mloc, g_mvar,
                           g_values);
    }
    dense::release_if_large(w);
  }
#pragma omp parallel for schedule(static)
  for (int64_t bq = 0; bq < BQ; ++bq) {
    const Metric<T> mt(s, qvar, mvar, bq / Q);
    T total_ds = 0;
    for (int t = 0; t < threads; ++t) total_ds += qsums[(size_t(t) * BQ + bq) * width + 2 * d];
    for (int64_t k = 0; k < d; ++k) {
      T terms = 0, squares = 0;
      for (int t = 0; t < threads; ++t) {
        const T* src = qsums.data() + (size_t(t) * BQ + bq) * width;
        terms += src[k];
        squares += src[d + k];
      }
      const T inv = mt.inv(k);
      g_qloc[bq * d + k] = -inv * terms;
      g_qvar[bq * d + k] = T(0.5) * (inv * inv * squares - inv * total_ds);
    }
  }
}

}  // namespace

template <class T>
bool dense_read_backward_applies(const ReadShape& s, View3<const T> qvar, View3<const T> mvar) {
  // the lanes run over entries here
  const bool shared = s.uniform_var || ((qvar.sr == 0 || s.Q <= 1) && (mvar.sr == 0 || s.M <= 1));
  return shared && s.E >= 1 && s.M >= Cfg<T>::L && s.Q >= 1;
}

template <class T>
void dense_read_backward_cpu(const ReadShape& s, View3<const T> qloc, View3<const T> qvar, View3<const T> mloc,
                             View3<const T> mvar, View3<const T> values, const T* grad_out, const T* out,
                             const T* lse, T* g_qloc, T* g_qvar, T* g_mloc, T* g_mvar, T* g_values) {
  dispatch_dim(s.d, [&]<int D>() {
    backward_impl<T, D>(s, qloc, qvar, mloc, mvar, values, grad_out, out, lse, g_qloc, g_qvar, g_mloc, g_mvar,
                        g_values);
  });
}

#define RK_INSTANTIATE(T)                                                                                      \
  template bool dense_read_backward_applies<T>(const ReadShape&, View3<const T>, View3<const T>);             \
  template void dense_read_backward_cpu<T>(const ReadShape&, View3<const T>, View3<const T>, View3<const T>, \
                                           View3<const T>, View3<const T>, const T*, const T*, const T*, T*,  \
                                           T*, T*, T*, T*);
RK_INSTANTIATE(float)
RK_INSTANTIATE(double)
#undef RK_INSTANTIATE

}  // namespace rk
